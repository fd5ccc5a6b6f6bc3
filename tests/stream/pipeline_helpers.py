"""Shared pieces of the pipeline tests: a bundle whose verdicts we control, frames, settings.

The tiny test model is untrained, so its scores barely depend on the image. What matters for
these tests is that they are *deterministic*: a dark grey frame and a red frame score a few
1e-5 apart on the LGST branch, every time, whatever the batch. ``split_bundle`` measures both
with the runtime and writes a calibration that puts the threshold between them (made-up μ and
a tiny σ), so "good" frames pass and "bad" frames fail by a wide fused margin.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from lineguard.engines.bundle import save_bundle
from lineguard.engines.fusion import Calibration
from lineguard.engines.runtimes import open_runtime
from lineguard.stream.bus import Bus
from lineguard.stream.protocol import ENTRY_FIELD, Event, decode_event
from lineguard.stream.settings import Settings
from tests.conftest import tiny_model

SIZE = 64
GOOD = np.full((SIZE, SIZE, 3), 30, np.uint8)
BAD = np.zeros((SIZE, SIZE, 3), np.uint8) + np.array([200, 0, 0], np.uint8)


@dataclass(frozen=True)
class SplitBundle:
    path: Path
    version: str
    good: np.ndarray
    bad: np.ndarray
    good_raw: dict[str, float]
    bad_raw: dict[str, float]
    calibration: Calibration


_cache: dict[str, SplitBundle] = {}
_raw: dict[str, np.ndarray] = {}


def _calibrated(raw: np.ndarray, branches: tuple[str, ...]) -> Calibration:
    good, bad = raw[0].astype(np.float64), raw[1].astype(np.float64)
    k = int(np.argmax(np.abs(bad - good)))
    gap = float(bad[k] - good[k])
    assert abs(gap) > 1e-7, f"the test model cannot tell the two images apart: {raw}"
    sigma = [1.0] * len(branches)
    # the other branches sit 10 σ below the good image, so the fused score (max or sum) is
    # ≈ −10 for GOOD and ≈ +10 for BAD whatever the combine rule
    mu = [float(good[i]) + 10.0 for i in range(len(branches))]
    mu[k] = float((good[k] + bad[k]) / 2)
    sigma[k] = abs(gap) / 20  # fused ≈ ±10 around a threshold of 0
    if gap < 0:
        raise AssertionError("expected the red frame to score higher; swap GOOD and BAD")
    return Calibration(tuple(branches), tuple(mu), tuple(sigma), threshold=0.0)


def split_bundle(path: Path | None = None, *, threshold_shift: float = 0.0) -> SplitBundle:
    """A tiny bundle at ``path`` (or a cached session one) where GOOD passes and BAD fails.

    ``threshold_shift`` writes a different threshold (hence a different model version) with
    the same weights, for hot-reload tests.
    """
    key = f"{path}:{threshold_shift}"
    if path is None and key in _cache:
        return _cache[key]
    model = tiny_model()
    branches = model.config.branches
    scratch = Path(tempfile.mkdtemp(prefix="lg-split-"))
    atexit.register(shutil.rmtree, scratch, True)
    if "raw" not in _raw:  # the model is deterministic: measure the two images once
        neutral = save_bundle(
            model, scratch / "neutral", Calibration.neutral(branches), export_onnx=True
        )
        rt = open_runtime(neutral, kind="onnxruntime")
        _raw["raw"] = np.asarray(rt.run(np.stack([GOOD, BAD])).scores, dtype=np.float64)
        rt.close()
    raw = _raw["raw"]
    cal = _calibrated(raw, branches)
    if threshold_shift:
        cal = Calibration(cal.branches, cal.mu, cal.sigma, cal.threshold + threshold_shift)
    target = path or scratch / "split"
    bundle = save_bundle(model, target, cal, overwrite=True)
    out = SplitBundle(
        bundle.path,
        bundle.version,
        GOOD,
        BAD,
        dict(zip(branches, map(float, raw[0]), strict=True)),
        dict(zip(branches, map(float, raw[1]), strict=True)),
        cal,
    )
    if path is None:
        _cache[key] = out
    return out


def settings_for(bus: Bus, url: str, **overrides: Any) -> Settings:
    """Settings pointing at the test server and the bus's private key prefix."""
    base: dict[str, Any] = {
        "redis.url": url,
        "redis.key_prefix": bus.prefix,
        "line.id": bus.line,
        "ingest.encoding": "png",
        # no verdict deadline unless a test asks for one: these tests stop and restart workers
        # on a loaded CI box and check the verdicts they then make (tests/**/test_*deadline*)
        "decide.deadline_ms": 0,
    }
    base.update({k.replace("__", "."): v for k, v in overrides.items()})
    return Settings.load(base, env_file=None)


def write_folder(folder: Path, bad: Callable[[int], bool], n: int) -> list[bool]:
    """``n`` PNG frames named in order; frame i is BAD where ``bad(i)``. Returns the labels."""
    folder.mkdir(parents=True, exist_ok=True)
    labels = []
    for i in range(n):
        is_bad = bad(i)
        img = BAD if is_bad else GOOD
        cv2.imwrite(str(folder / f"{i:04d}.png"), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
        labels.append(is_bad)
    return labels


def all_events(bus: Bus) -> list[Event]:
    """Every event on the bus, in stream order."""
    return [
        decode_event(fields[ENTRY_FIELD], bus.limits)
        for _id, fields in bus.client.xrange(bus.key("events"))
    ]


def wait_until(cond: Callable[[], bool], timeout_s: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.02)
