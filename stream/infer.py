"""The infer stage: frames → raw per-branch scores, in dynamic batches.

Per step, in order:

1. **Hot reload.** Every couple of seconds the bundle's manifest is stat-ed; when it changed,
   the new bundle is loaded, verified, opened and warmed up *before* it replaces the old one,
   so no frame waits on a half-loaded model. Every ``Scores`` names the model version that
   produced it, and decide calibrates with that version.
2. **Reclaim.** Every ``reclaim_interval_ms`` entries that sat unacknowledged in some
   consumer's pending list for longer than ``reclaim_idle_ms`` (a worker that died mid-batch)
   are taken over with XAUTOCLAIM and scored here.
3. **Batch.** XREADGROUP blocks only for the first entry; the batch is then topped up until
   ``max_batch`` entries or ``max_delay_ms`` after the first (``Bus.read_batch``). A restarted
   worker first re-reads its own unacknowledged backlog.
4. **Score.** Each entry is decoded on its own: a message that is not a valid frame goes to the
   dead stream with the decoder's reason; a valid frame whose image cannot be decoded becomes
   that frame's error ``Scores`` (the rest of the batch is unaffected). The good images go
   through the runtime in one call (runtimes that need fixed shapes pad to their buckets
   inside); if the forward fails or returns the wrong number of rows, every frame of the
   batch gets an error ``Scores``.
5. **Publish and acknowledge** in one MULTI (``Bus.ack_with_result``).

Entries delivered more than ``max_deliveries`` times (they keep killing workers) are not run
again: they get an error ``Scores`` (so the frame still receives an ``error`` verdict) and a
copy goes to the dead stream with reason ``max_deliveries``.

**Trimmed frames.** A frame trimmed from the frames stream before anyone scored it leaves no
message to score. If it had been delivered, XAUTOCLAIM (or a backlog re-read) reports its id
as deleted; we count it (``lineguard_trimmed_total{stage="infer"}``), log it and drop it from
the pending list, but the id alone does not say which frame it was. If it had not been
delivered, nothing reports it at all. Both cases are therefore turned into ``uninspected``
events by decide, from the hole the frame leaves in its camera's sequence numbers — one rule
that covers every way a frame can vanish before scoring.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import structlog

from lineguard.engines.bundle import Bundle, load_bundle
from lineguard.engines.errors import BundleError, ConfigError, LineguardError
from lineguard.engines.runtimes import Runtime, open_runtime
from lineguard.stream.bus import Bus, Entry, consumer_name
from lineguard.stream.logs import frame_context
from lineguard.stream.metrics import get_metrics, observe_queue
from lineguard.stream.protocol import (
    ENTRY_FIELD,
    Frame,
    FrameIdentity,
    LowResMap,
    ProtocolError,
    Scores,
    decode_frame,
    decode_image,
    frame_identity,
    resize_to,
)
from lineguard.stream.settings import Settings
from lineguard.stream.worker import BundleWatcher, Reclaimer

log = structlog.get_logger("lineguard.infer")

RUNTIME_CHOICES = ("auto", "torch", "onnxruntime", "tensorrt")
_OPEN_ATTEMPTS = 5


def entry_time(entry_id: str) -> float:
    """The server's clock (seconds) when a stream entry was added, from its id."""
    try:
        return int(entry_id.split("-", 1)[0]) / 1000.0
    except ValueError:
        return 0.0


def resolve_runtime(kind: str, device: str, bundle: Bundle) -> str:
    """``auto``: ONNX Runtime on CPU when the bundle has an export (about twice torch's speed
    on CPU here), torch on a GPU (CUDA graphs, fp16)."""
    if kind not in RUNTIME_CHOICES:
        raise ConfigError(f"unknown runtime {kind!r}; use one of {', '.join(RUNTIME_CHOICES)}")
    if kind != "auto":
        return kind
    if device == "cpu" and bundle.onnx_path is not None:
        return "onnxruntime"
    return "torch"


@dataclass
class LoadedModel:
    """A verified bundle with its runtime open and warmed up."""

    bundle: Bundle
    runtime: Runtime

    @property
    def version(self) -> str:
        return self.bundle.version

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) the model takes."""
        return self.bundle.config.input_size

    def close(self) -> None:
        self.runtime.close()


def open_model(
    path: str | Path,
    *,
    runtime: str = "auto",
    device: str = "cpu",
    precision: str = "fp32",
    max_batch: int = 8,
    bundle: Bundle | None = None,
) -> LoadedModel:
    """Load and verify the bundle at ``path``, open its runtime and run a warm-up batch."""
    bnd = bundle if bundle is not None else load_bundle(path)
    kind = resolve_runtime(runtime, device, bnd)
    rt = open_runtime(bnd, kind=kind, device=device, precision=precision, max_batch=max_batch)
    # first-call allocations happen here, not on the first frame
    rt.run(np.zeros((1, *bnd.config.input_size, 3), dtype=np.uint8))
    return LoadedModel(bnd, rt)


class InferStage:
    """``run_worker`` stage for the infer consumer group (see the module docstring)."""

    name = "infer"

    def __init__(
        self,
        bus: Bus,
        settings: Settings,
        bundle_path: str | Path,
        *,
        runtime: str = "auto",
        device: str = "cpu",
        precision: str = "fp32",
        consumer: str | None = None,
        maps: bool = False,
        reload_interval_s: float = 2.0,
    ) -> None:
        if runtime not in RUNTIME_CHOICES:
            raise ConfigError(
                f"unknown runtime {runtime!r}; use one of {', '.join(RUNTIME_CHOICES)}"
            )
        limit_ms = settings.redis.socket_timeout * 1000 / 2
        if settings.infer.max_delay_ms >= limit_ms:
            # the batch top-up waits up to max_delay_ms in one blocking read
            raise ConfigError(
                f"LINEGUARD_INFER__MAX_DELAY_MS={settings.infer.max_delay_ms} must stay below "
                f"half of LINEGUARD_REDIS__SOCKET_TIMEOUT={settings.redis.socket_timeout} s "
                "or the batch wait times out on the client; lower it or raise the timeout"
            )
        self.bus = bus
        self.settings = settings
        self.cfg = settings.infer
        self.bundle_path = Path(bundle_path)
        self.runtime_kind = runtime
        self.device = device
        self.precision = precision
        self.consumer = consumer_name(consumer)
        self._encodings_seen: set[tuple[str, str, str]] = set()
        self.maps = maps
        self.reload_interval_s = reload_interval_s
        self.model: LoadedModel | None = None
        self.watcher: BundleWatcher | None = None
        self.reader = bus.reader("frames", self.cfg.group, self.consumer)
        self.metrics = get_metrics()
        self.counts = {
            "batches": 0,
            "frames": 0,
            "errors": 0,
            "dead": 0,
            "trimmed": 0,
            "reclaimed": 0,
            "reloads": 0,
        }
        self.reclaimer = Reclaimer(
            bus,
            "frames",
            self.cfg.group,
            self.consumer,
            stage="infer",
            min_idle_ms=self.cfg.reclaim_idle_ms,
            count=self.cfg.max_batch,
            every_s=self.cfg.reclaim_interval_ms / 1000,
            counts=self.counts,
        )

    # lifecycle ---------------------------------------------------------------------

    def _check_encoding(self, frame: Frame, model: LoadedModel) -> None:
        """Warn once per camera and model when frames arrive lossy for a bundle calibrated on
        lossless frames or the other way round: a producer that ignored the bundle's codec
        (ingest without --bundle, or a third-party sender). JPEG quality is not on the wire,
        so a JPEG at another quality is ingest's to warn about."""
        key = (frame.camera, frame.encoding, model.version)
        if key in self._encodings_seen:
            return
        if len(self._encodings_seen) > 4096:  # forged camera names cannot grow it unbounded
            self._encodings_seen.clear()
        self._encodings_seen.add(key)
        expected = model.bundle.config.codec
        if (frame.encoding == "jpeg") != (expected.encoding == "jpeg"):
            log.warning(
                "infer.codec_mismatch",
                camera=frame.camera,
                frame_encoding=frame.encoding,
                bundle=expected.spec,
                hint="scores will differ from 'lineguard evaluate'; start ingest with "
                "--bundle so it sends frames as the bundle was calibrated",
            )

    def setup(self) -> None:
        self.bus.ensure_group("frames", self.cfg.group)
        self.watcher = BundleWatcher(self.bundle_path, self.reload_interval_s)
        self.model = self._open()
        self.metrics.set_model("infer", self.model.version)
        self.reclaimer.rest()

    def _open(self, bundle: Bundle | None = None) -> LoadedModel:
        """Open the bundle at ``bundle_path`` so that every file comes from one bundle.

        The runtime reads the weights (or the ONNX graph) from the path after the manifest
        was verified; if the bundle was replaced in between, what was opened would carry one
        bundle's version and another's weights. So the opened model is kept only if the
        manifest it was verified from is still the one at the path; otherwise it is closed
        and the (new) bundle is loaded again.
        """
        for _attempt in range(_OPEN_ATTEMPTS):
            bnd = bundle if bundle is not None else load_bundle(self.bundle_path)
            bundle = None
            model = open_model(
                self.bundle_path,
                runtime=self.runtime_kind,
                device=self.device,
                precision=self.precision,
                max_batch=self.cfg.max_batch,
                bundle=bnd,
            )
            if bnd.is_current():
                return model
            model.close()
            log.info("infer.bundle_changed_while_opening", path=str(self.bundle_path))
            time.sleep(0.05)
        raise BundleError(
            f"the bundle at {self.bundle_path} was replaced {_OPEN_ATTEMPTS} times while it "
            "was being opened; replace bundles less often than a model takes to load"
        )

    def recover(self) -> None:
        """After a Redis failure: re-read what this consumer read but could not acknowledge
        (the batch in flight), at once rather than after ``reclaim_idle_ms``."""
        self.reader.rewind()

    def teardown(self) -> None:
        if self.model is not None:
            self.model.close()

    def status(self) -> dict[str, Any]:
        observe_queue(self.bus, self.metrics, "frames", self.cfg.group)
        return {
            "model": self.model.version if self.model else None,
            "runtime": self.model.runtime.kind if self.model else None,
            **self.counts,
        }

    def done(self) -> bool:
        stats = self.bus.group_stats("frames", self.cfg.group)
        return stats is None or stats.pending == 0

    # one step ----------------------------------------------------------------------

    def step(self) -> int:
        assert self.model is not None, "setup() first"
        if self.watcher is not None and self.watcher.changed():
            self.reload()
        reclaimed = self.reclaimer.take()
        if reclaimed:
            self.process(reclaimed)
            return len(reclaimed)
        entries = self.reader.read_batch(
            self.cfg.max_batch, self.cfg.max_delay_ms, self.cfg.block_ms
        )
        if entries:
            self.process(entries)
        return len(entries)

    def reload(self) -> bool:
        """Swap in the bundle now at ``bundle_path`` if it loads; True if the model changed."""
        assert self.model is not None
        try:
            candidate = load_bundle(self.bundle_path)
            if candidate.version == self.model.version:
                return False
            new = self._open(candidate)
        except LineguardError as exc:
            self.metrics.model_reloads.labels("infer", "failed").inc()
            log.error("infer.reload_failed", path=str(self.bundle_path), error=str(exc))
            return False
        old, self.model = self.model, new
        old.close()
        self.counts["reloads"] += 1
        self.metrics.model_reloads.labels("infer", "ok").inc()
        self.metrics.set_model("infer", new.version, previous=old.version)
        log.info("infer.reloaded", old=old.version, new=new.version)
        return True

    # processing --------------------------------------------------------------------

    def process(self, entries: list[Entry]) -> None:
        """Score one batch of entries, publish one ``Scores`` per frame, acknowledge all."""
        assert self.model is not None
        model = self.model
        t_read = time.time()
        limits = self.bus.limits
        m = self.metrics
        m.frames_in.labels("infer").inc(len(entries))
        ack_only: list[str] = []
        work: list[tuple[Entry, Frame]] = []
        poison: list[tuple[Entry, Frame]] = []
        refused: list[Scores | None] = []  # error verdicts for dead-lettered frames we can name
        for e in entries:
            if e.deleted:
                # Delivered once, then trimmed away before it was acknowledged.
                ack_only.append(e.id)
                self.counts["trimmed"] += 1
                m.trimmed.labels("infer").inc()
                log.warning("infer.trimmed_pending", count=1, first=e.id)
                continue
            data = e.data
            if data is None:
                self._dead(e, "missing_field", f"entry has no {ENTRY_FIELD.decode()!r} field")
                continue
            try:
                frame = decode_frame(data, limits)
            except ProtocolError as exc:
                self._dead(e, exc.reason, str(exc))
                refused.append(self._refused(data, e, model, exc, {"t_read": t_read}))
                continue
            if frame.line != self.bus.line:
                self._dead(e, "wrong_line", f"frame of line {frame.line!r} on {self.bus.line!r}")
                continue
            if e.deliveries is not None and e.deliveries > self.cfg.max_deliveries:
                poison.append((e, frame))
                continue
            work.append((e, frame))

        base = {"t_read": t_read}
        results: list[Scores | None] = [None] * len(work)
        images: list[np.ndarray] = []
        rows: list[int] = []
        t0 = time.perf_counter()
        for i, (e, frame) in enumerate(work):
            try:
                img = decode_image(frame, limits)
            except ProtocolError as exc:
                with frame_context(frame.key):
                    log.warning("infer.bad_image", reason=exc.reason, error=str(exc))
                results[i] = self._error(frame, e, model, f"cannot decode frame: {exc}", base)
                continue
            self._check_encoding(frame, model)
            if img.shape[:2] != model.size:
                img = resize_to(img, model.size)
            images.append(img)
            rows.append(i)
        decode_s = time.perf_counter() - t0

        forward_s = 0.0
        if images:
            t1 = time.perf_counter()
            failure: str | None = None
            scores = amap = seg = None
            try:
                out = model.runtime.run(np.stack(images))
                scores = np.asarray(out.scores, dtype=np.float64)
                amap, seg = out.anomaly_map, out.segmentation
                k = len(model.bundle.branches)
                if scores.shape != (len(images), k):
                    failure = (
                        f"runtime returned scores of shape {scores.shape} for {len(images)} "
                        f"frames and {k} branches"
                    )
            except Exception as exc:  # any forward failure becomes each frame's error verdict
                failure = f"inference failed: {type(exc).__name__}: {exc}"
                log.exception("infer.forward_failed", batch=len(images))
            forward_s = time.perf_counter() - t1
            m.batch_size.observe(len(images))
            m.infer_seconds.observe(forward_s)
            timings = {**base, "decode": decode_s, "forward": forward_s, "batch": len(images)}
            for j, i in enumerate(rows):
                e, frame = work[i]
                if failure is not None or scores is None:
                    results[i] = self._error(frame, e, model, failure or "no scores", timings)
                    continue
                row = scores[j]
                if not np.isfinite(row).all():
                    with frame_context(frame.key):
                        log.warning("infer.non_finite", scores=row.tolist())
                    results[i] = self._error(
                        frame, e, model, "model produced a non-finite score", timings
                    )
                    continue
                results[i] = Scores(
                    frame.line,
                    frame.camera,
                    frame.seq,
                    frame.t_capture,
                    {b: float(row[k]) for k, b in enumerate(model.bundle.branches)},
                    model.version,
                    self._timings(e, timings),
                    self._map(amap, j),
                    self._seg(seg, amap, j),
                )

        for e, frame in poison:
            reason = (
                f"delivered {e.deliveries} times without completing (over "
                f"LINEGUARD_INFER__MAX_DELIVERIES={self.cfg.max_deliveries}); dead-lettered"
            )
            with frame_context(frame.key):
                log.error("infer.poison", deliveries=e.deliveries, entry_id=e.id)
            results.append(self._error(frame, e, model, reason, base))

        messages = [r for r in results + refused if r is not None]
        t_scored = time.time()
        messages = [_stamp(s, t_scored) for s in messages]
        ids = [e.id for e, _ in work] + [e.id for e, _ in poison] + ack_only
        if ids or messages:
            self.bus.ack_with_result(
                "frames",
                self.cfg.group,
                ids,
                "scores",
                messages,
                max_len=self.cfg.scores_max_len,
            )
        for e, _frame in poison:
            self._dead(e, "max_deliveries", "delivered too often; an error verdict was published")

        n_err = sum(1 for s in messages if s.error is not None)
        self.counts["batches"] += 1
        self.counts["frames"] += len(messages)
        self.counts["errors"] += n_err
        m.frames_out.labels("infer").inc(len(messages))
        if n_err:
            m.frame_errors.labels("infer").inc(n_err)
        for s in messages:
            q = s.timings.get("queue")
            if q is not None:
                m.batch_wait.observe(q)
                m.stage_seconds.labels("queue").observe(q)
            m.stage_seconds.labels("infer").observe(max(0.0, t_scored - t_read))
        if messages:
            log.debug(
                "infer.batch",
                size=len(messages),
                errors=n_err,
                forward_ms=round(forward_s * 1000, 2),
                first=messages[0].key,
                last=messages[-1].key,
            )

    def _timings(self, e: Entry, extra: dict[str, float]) -> dict[str, float]:
        t_queued = entry_time(e.id)
        out = dict(extra)
        out["t_queued"] = t_queued
        if t_queued > 0:
            out["queue"] = max(0.0, extra["t_read"] - t_queued)
        out["deliveries"] = float(e.deliveries or 1)
        return out

    def _error(
        self,
        frame: Frame | FrameIdentity,
        e: Entry,
        model: LoadedModel,
        reason: str,
        extra: dict[str, float],
    ) -> Scores:
        text = reason[: self.bus.limits.max_text_len]
        return Scores(
            frame.line,
            frame.camera,
            frame.seq,
            frame.t_capture,
            {},
            model.version,
            self._timings(e, extra),
            error=text,
        )

    def _refused(
        self,
        data: Any,
        e: Entry,
        model: LoadedModel,
        exc: ProtocolError,
        extra: dict[str, float],
    ) -> Scores | None:
        """An error verdict naming why a frame was dead-lettered, when the message still says
        which frame it is (its line, camera, seq and capture time are well-formed and on this
        line); otherwise decide accounts for the hole as a gap."""
        ident = frame_identity(data, self.bus.limits)
        if ident is None or ident.line != self.bus.line:
            return None
        text = f"refused by infer ({exc.reason}): {exc}; the message is in the dead stream"
        return self._error(ident, e, model, text, extra)

    def _map(self, amap: Any, row: int) -> LowResMap | None:
        if not self.maps or amap is None:
            return None
        plane = np.asarray(amap[row, 0], dtype=np.float32)
        if not np.isfinite(plane).all():
            return None
        return LowResMap.from_float(plane)

    def _seg(self, seg: Any, amap: Any, row: int) -> LowResMap | None:
        """The segmentation at the anomaly map's resolution (nearest class), for the page.

        Full-size class maps would put a 256² plane per frame on the bus; the anomaly map's
        grid (a quarter of the side) keeps components recognisable at a few hundred bytes.
        """
        if not self.maps or seg is None:
            return None
        labels = np.asarray(seg[row])
        if labels.ndim != 2 or labels.size == 0:
            return None
        if amap is not None:
            h, w = int(amap.shape[-2]), int(amap.shape[-1])
            if 0 < h < labels.shape[0] and 0 < w < labels.shape[1]:
                labels = cv2.resize(
                    labels.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST
                )
        return LowResMap.from_labels(labels)

    def _dead(self, e: Entry, reason: str, detail: str) -> None:
        self.counts["dead"] += 1
        self.metrics.dead_lettered.labels("infer", reason).inc()
        self.bus.dead_letter(
            "frames",
            self.cfg.group,
            e.id,
            dict(e.fields),
            reason,
            detail=detail,
            deliveries=e.deliveries,
        )


def _stamp(s: Scores, t_scored: float) -> Scores:
    s.timings["t_scored"] = t_scored
    return s
