"""What the demo, ``bench e2e`` and ``bench soak`` share around the pipeline they drive.

On a shared Redis (``LINEGUARD_REDIS__URL`` set) such a run must not mix with a live line or
with another run, so it works under a key prefix of its own and deletes its keys afterwards;
with the embedded server the configured prefix is used, since the server goes away anyway.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis

from lineguard.stream.bus import Bus
from lineguard.stream.protocol import ENTRY_FIELD, ProtocolError, Scores, decode_scores
from lineguard.stream.settings import Settings


def with_sections(settings: Settings, **sections: dict[str, Any]) -> Settings:
    """A copy of ``settings`` with fields of some sections replaced (``line={"camera": …}``)."""
    update = {n: getattr(settings, n).model_copy(update=v) for n, v in sections.items()}
    return settings.model_copy(update=update)


def run_prefix(settings: Settings, kind: str) -> str:
    """The key prefix for one ``kind`` run: a fresh one on an external server."""
    if settings.redis.url is None:
        return settings.redis.key_prefix
    return f"lineguard-{kind}-{uuid.uuid4().hex[:8]}"


def delete_prefix(client: redis.Redis, prefix: str) -> None:
    """Delete every key under ``prefix`` (in chunks, so a long run's keys fit one call each)."""
    keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
    for i in range(0, len(keys), 1000):
        client.delete(*keys[i : i + 1000])


def bundle_or_untrained(
    bundle: str | Path | None, folder: Path, say: Callable[[str], None]
) -> Path:
    """``bundle``, or an untrained 256-px lite0 bundle built in ``folder`` (speed, not accuracy)."""
    if bundle is not None:
        return Path(bundle)
    from lineguard.engines.bench.model import synthetic_bundle

    say("building an untrained efficientnet_lite0 (lite) bundle at 256 px")
    return synthetic_bundle("efficientnet_lite0", "lite", 256, folder).path


def scores_by_seq(bus: Bus, camera: str, seqs: set[int]) -> dict[int, Scores]:
    """The scores message of each of ``seqs`` from ``camera`` still in the scores stream."""
    out: dict[int, Scores] = {}
    rows: Any = bus.client.xrange(bus.key("scores"), count=100_000)
    for _id, fields in rows:
        try:
            s = decode_scores(fields.get(ENTRY_FIELD), bus.limits)
        except ProtocolError:
            continue
        if s.camera == camera and s.seq in seqs:
            out[s.seq] = s
    return out
