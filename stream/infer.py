"""The infer stage: frames → raw per-branch scores, in dynamic batches.

Per step, in order:

1. **Hot reload.** Every couple of seconds the bundle's manifest is stat-ed; when it changed,
   the new bundle is loaded, verified, opened and warmed up in a background thread
   (``BackgroundLoad``) while the old model keeps scoring, and swapped in between two batches
   once it is ready, so no frame waits on a half-loaded model and a reload that builds an
   engine for minutes stalls nothing. Every ``Scores`` names the model version that produced
   it, and decide calibrates with that version.
2. **Reclaim.** Every ``reclaim_interval_ms`` entries that sat unacknowledged in some
   consumer's pending list for longer than ``reclaim_idle_ms`` (a worker that died mid-batch)
   are taken over with XAUTOCLAIM and scored here.
3. **Batch.** With the model idle, XREADGROUP blocks only for the first entry; the batch is
   then topped up until ``max_batch`` entries or ``max_delay_ms`` after the first
   (``Bus.read_batch``; 0 by default, so an idle model starts on a frame at once, as Triton's
   dynamic batcher does by default) and launched. While a forward runs, frames queue up
   behind it and become the next batch: what is queued is read (never waiting) and decoded
   while the forward runs, and the moment it ends the batch is topped up, without waiting,
   with the frames that landed since. So batches grow only when frames queue behind a
   running forward, and a frame never waits a forward more than it must. A restarted worker
   first re-reads its own unacknowledged backlog.
4. **Decode.** Each entry is decoded on its own: a message that is not a valid frame goes to
   the dead stream with the decoder's reason; a valid frame whose image cannot be decoded
   becomes that frame's error ``Scores`` (the rest of the batch is unaffected). Images are
   decoded by a small thread pool straight into a staging batch allocated once per model
   (page-locked on CUDA; ``lineguard.stream.staging``), the one no forward is reading.
5. **Score, overlapped.** The forward pass runs in its own thread; batch *n+1* is submitted
   as soon as batch *n*'s forward returns, and batch *n* is published while *n+1* runs. If
   the forward fails or returns the wrong number of rows, every frame of the batch gets an
   error ``Scores``. Each ``Scores`` carries its own batch's times: ``decode`` (wall time of
   that batch's decode), ``wait`` (decoded, waiting for the previous forward) and
   ``forward`` (``runtime.run`` alone), and its own ``t_read``.
6. **Publish and acknowledge** batch *n* in one MULTI (``Bus.ack_with_result``), before batch
   *n+1* is published, so batches are published in the order they were read. The batch in
   flight when the worker stops is finished in ``teardown``; after a Redis failure it is
   dropped unpublished and re-read from this consumer's pending list.

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

import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import redis
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
    frame_identity,
)
from lineguard.stream.settings import Settings
from lineguard.stream.staging import DecodePool, plain_host_batch
from lineguard.stream.worker import BackgroundLoad, BundleWatcher, Reclaimer

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


STAGING_BUFFERS = 2  # one read by the forward in flight, one being decoded into


@dataclass
class LoadedModel:
    """A verified bundle with its runtime open and warmed up, and its staging buffers."""

    bundle: Bundle
    runtime: Runtime
    staging: tuple[np.ndarray, ...] = ()

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
    maps: bool = True,
) -> LoadedModel:
    """Load and verify the bundle at ``path``, open its runtime, allocate its staging buffers
    and warm it up at batch 1 and ``max_batch`` (first-call allocations happen here, not on
    live traffic; the torch runtime on CUDA captures every bucket's graph as it opens).

    ``maps=False`` asks the torch runtime to bring back scores only (other runtimes compute
    every output anyway and the worker drops what it does not publish).
    """
    bnd = bundle if bundle is not None else load_bundle(path)
    kind = resolve_runtime(runtime, device, bnd)
    options: dict[str, Any] = {"outputs": "maps" if maps else "scores"} if kind == "torch" else {}
    rt = open_runtime(
        bnd, kind=kind, device=device, precision=precision, max_batch=max_batch, **options
    )
    size = bnd.config.input_size
    host_batch = getattr(rt, "host_batch", None)
    staging = tuple(
        host_batch(max_batch) if host_batch is not None else plain_host_batch(max_batch, *size)
        for _ in range(STAGING_BUFFERS)
    )
    for buf in staging:
        buf.fill(0)
    rt.run(staging[0][:1])
    if max_batch > 1:
        rt.run(staging[0])
    return LoadedModel(bnd, rt, staging)


def decode_threads(requested: int) -> int:
    """Threads of the decode pool: ``requested``, or with 0 as many as there are cores, at
    most 4 (a 256² JPEG decodes in about a millisecond; more threads only contend)."""
    if requested > 0:
        return requested
    return max(1, min(4, os.cpu_count() or 1))


@dataclass
class _Batch:
    """One batch between its read and its publication (see the module docstring)."""

    model: LoadedModel
    t_read: float
    slot: int = 0  # which of the model's staging buffers holds its images
    read_late: dict[str, float] = field(default_factory=dict)  # entry id → read, if after t_read
    ack_only: list[str] = field(default_factory=list)
    work: list[tuple[Entry, Frame]] = field(default_factory=list)
    poison: list[tuple[Entry, Frame]] = field(default_factory=list)
    refused: list[Scores | None] = field(default_factory=list)
    results: list[Scores | None] = field(default_factory=list)
    rows: list[int] = field(default_factory=list)  # index into work of each staged image
    images: np.ndarray | None = None  # staging[:len(rows)], compacted
    decode_s: float = 0.0
    t_decoded: float = 0.0
    future: Future[tuple[Any, float, float]] | None = None


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
        self.loading: BackgroundLoad[LoadedModel | None] = BackgroundLoad("infer")
        self.decoder = DecodePool(decode_threads(self.cfg.decode_threads), bus.limits)
        self._forward_pool = ThreadPoolExecutor(1, thread_name_prefix="infer-forward")
        self._inflight: _Batch | None = None
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
                maps=self.maps,
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
        (the batch in flight), at once rather than after ``reclaim_idle_ms``. The batch whose
        forward was running is dropped unpublished: the re-read scores it again."""
        batch, self._inflight = self._inflight, None
        if batch is not None and batch.future is not None:
            try:
                batch.future.result()  # its staging buffer is free only once it returned
            except Exception:
                log.debug("infer.dropped_batch_failed", exc_info=True)
        self.reader.rewind()

    def teardown(self) -> None:
        try:
            if self._inflight is not None:
                batch, self._inflight = self._inflight, None
                try:
                    self._finish(batch)
                except redis.RedisError as exc:
                    log.warning(
                        "infer.last_batch_unpublished",
                        error=f"{type(exc).__name__}: {exc}",
                        note="its frames stay pending; a peer or the next start scores them",
                    )
            self.loading.wait()
            done = self.loading.take()
            if done is not None and done[0] is not None:
                done[0].close()
        finally:
            self._forward_pool.shutdown(wait=True)
            self.decoder.close()
            if self.model is not None:
                self.model.close()

    def status(self) -> dict[str, Any]:
        observe_queue(self.bus, self.metrics, "frames", self.cfg.group)
        model = self.model
        out: dict[str, Any] = {
            "model": model.version if model else None,
            "runtime": model.runtime.kind if model else None,
            **self.counts,
        }
        loading = self.loading.status()
        if loading is not None:
            out["reload"] = loading
        return out

    def done(self) -> bool:
        stats = self.bus.group_stats("frames", self.cfg.group)
        return stats is None or stats.pending == 0

    # one step ----------------------------------------------------------------------

    def step(self) -> int:
        assert self.model is not None, "setup() first"
        self._swap_loaded()
        if self.watcher is not None and self.watcher.changed():
            self.loading.start(self._load_new)
        if self._inflight is not None and self.reclaimer.due():
            # finish first: a reclaim pass must not take over this worker's own batch in flight
            done, self._inflight = self._inflight, None
            self._finish(done)
        if self._inflight is None:
            # the model is idle: wait for the first entry only and launch at once
            entries = self.reclaimer.take() or self.reader.read_batch(
                self.cfg.max_batch, self.cfg.max_delay_ms, self.cfg.block_ms
            )
            if entries:
                self._launch(self._prepare(entries), None)
            return len(entries)
        # a forward is running: stage what is queued now (decoded while the forward runs),
        # never waiting, since waiting here would hold back the batch in flight
        entries = self.reader.read_batch(self.cfg.max_batch, 0, None)
        batch = self._prepare(entries) if entries else None
        done, self._inflight = self._inflight, None
        if done.future is not None:
            done.future.exception()  # the forward is over: its staging buffer is free
        # frames that arrived during the forward join the next batch before it starts
        room = self.cfg.max_batch - (len(batch.work) if batch is not None else 0)
        more = self.reader.read_batch(room, 0, None) if room > 0 else []
        if more:
            batch = self._prepare(more, batch)
        self._launch(batch, done)
        return len(entries) + len(more)

    def _launch(self, batch: _Batch | None, done: _Batch | None) -> None:
        """Start ``batch``'s forward, then publish ``done`` (whose forward has returned) while
        it runs: the model never waits for a publication. Batches are still published in the
        order they were read: ``batch`` is published by a later step, after ``done``."""
        if batch is not None and batch.images is not None:
            self._submit(batch)
            batch = None
        if done is not None:
            self._finish(done)
        if batch is not None:  # nothing to score (every frame refused or undecodable)
            self._finish(batch)

    def process(self, entries: list[Entry]) -> None:
        """Score one batch of entries and publish it now (nothing left in flight)."""
        if self._inflight is not None:
            done, self._inflight = self._inflight, None
            self._finish(done)
        if entries:
            self._submit(self._prepare(entries))
        if self._inflight is not None:
            done, self._inflight = self._inflight, None
            self._finish(done)

    def _load_new(self) -> LoadedModel | None:
        """Background thread: the bundle now at the path, opened and warm; None when its
        version is the one already running."""
        candidate = load_bundle(self.bundle_path)
        model = self.model
        if model is not None and candidate.version == model.version:
            return None
        return self._open(candidate)

    def _swap_loaded(self) -> bool:
        """Between batches: swap in a model the background load finished; True if swapped."""
        done = self.loading.take()
        if done is None:
            return False
        new, error = done
        if error is not None:
            if not isinstance(error, LineguardError):
                raise error  # a bug, not a bad bundle
            self.metrics.model_reloads.labels("infer", "failed").inc()
            log.error("infer.reload_failed", path=str(self.bundle_path), error=str(error))
            return False
        if new is None:
            return False
        if self._inflight is not None:  # the old model's forward must end before it closes
            batch, self._inflight = self._inflight, None
            self._finish(batch)
        assert self.model is not None
        old, self.model = self.model, new
        old.close()
        self.counts["reloads"] += 1
        self.metrics.model_reloads.labels("infer", "ok").inc()
        self.metrics.set_model("infer", new.version, previous=old.version)
        log.info("infer.reloaded", old=old.version, new=new.version)
        return True

    def reload(self, timeout_s: float | None = None) -> bool:
        """Load the bundle now at ``bundle_path`` and swap it in once ready (waiting up to
        ``timeout_s``); True if the model changed. The worker loop does the same without
        waiting."""
        self.loading.start(self._load_new)
        self.loading.wait(timeout_s)
        return self._swap_loaded()

    # processing --------------------------------------------------------------------

    def _prepare(self, entries: list[Entry], batch: _Batch | None = None) -> _Batch:
        """Sort entries (trimmed, dead, poison, work) and decode the work's images into the
        staging buffer no forward is reading; with ``batch``, add them to that batch (frames
        that arrived while the previous forward ran), after the rows it already holds."""
        assert self.model is not None
        t_read = time.time()
        if batch is None:
            slot = 0 if self._inflight is None or self._inflight.slot != 0 else 1
            batch = _Batch(self.model, t_read, slot=slot)
        model = batch.model
        limits = self.bus.limits
        m = self.metrics
        m.frames_in.labels("infer").inc(len(entries))
        base = {"t_read": t_read}
        start = len(batch.work)
        for e in entries:
            if t_read != batch.t_read:
                batch.read_late[e.id] = t_read
            if e.deleted:
                # Delivered once, then trimmed away before it was acknowledged.
                batch.ack_only.append(e.id)
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
                batch.refused.append(self._refused(data, e, model, exc, base))
                continue
            if frame.line != self.bus.line:
                self._dead(e, "wrong_line", f"frame of line {frame.line!r} on {self.bus.line!r}")
                continue
            if e.deliveries is not None and e.deliveries > self.cfg.max_deliveries:
                batch.poison.append((e, frame))
                continue
            batch.work.append((e, frame))

        new = batch.work[start:]
        batch.results.extend([None] * len(new))
        if not new:
            return batch
        staging = model.staging[batch.slot]
        first = len(batch.rows)  # staged rows so far; the new images go after them
        t0 = time.perf_counter()
        errors = self.decoder.decode_into([frame for _e, frame in new], staging[first:])
        kept: list[int] = []
        for k, ((e, frame), bad) in enumerate(zip(new, errors, strict=True)):
            if bad is not None:
                with frame_context(frame.key):
                    log.warning("infer.bad_image", reason=bad.reason, error=str(bad))
                reason = f"cannot decode frame: {bad}"
                batch.results[start + k] = self._error(frame, e, model, reason, base)
                continue
            self._check_encoding(frame, model)
            kept.append(first + k)
            batch.rows.append(start + k)
        if len(kept) < len(new) and kept:  # close the gaps the failed frames left
            staging[first : first + len(kept)] = staging[kept]
        if batch.rows:
            batch.images = staging[: len(batch.rows)]
        batch.decode_s += time.perf_counter() - t0
        batch.t_decoded = time.perf_counter()
        return batch

    def _submit(self, batch: _Batch) -> None:
        """Start the batch's forward pass in the forward thread (or publish it at once when
        it has no image to score)."""
        if batch.images is None:
            self._finish(batch)
            return
        batch.future = self._forward_pool.submit(_forward, batch.model.runtime, batch.images)
        self._inflight = batch

    def _finish(self, batch: _Batch) -> None:
        """Wait for the batch's forward, turn its outputs into ``Scores``, publish and ack."""
        model = batch.model
        m = self.metrics
        base = {"t_read": batch.t_read}
        results = batch.results
        forward_s = 0.0
        if batch.future is not None:
            n = len(batch.rows)
            failure: str | None = None
            scores = amap = seg = None
            wait_s = 0.0
            try:
                out, t_start, forward_s = batch.future.result()
                wait_s = max(0.0, t_start - batch.t_decoded)
                scores = np.asarray(out.scores, dtype=np.float64)
                amap, seg = out.anomaly_map, out.segmentation
                k = len(model.bundle.branches)
                if scores.shape != (n, k):
                    failure = (
                        f"runtime returned scores of shape {scores.shape} for {n} "
                        f"frames and {k} branches"
                    )
            except Exception as exc:  # any forward failure becomes each frame's error verdict
                failure = f"inference failed: {type(exc).__name__}: {exc}"
                log.error("infer.forward_failed", batch=n, exc_info=exc)
            m.batch_size.observe(n)
            m.infer_seconds.observe(forward_s)
            timings = {
                **base,
                "decode": batch.decode_s,
                "wait": wait_s,
                "forward": forward_s,
                "batch": n,
            }
            for j, i in enumerate(batch.rows):
                e, frame = batch.work[i]
                own = _read_at(timings, batch, e)
                if failure is not None or scores is None:
                    results[i] = self._error(frame, e, model, failure or "no scores", own)
                    continue
                row = scores[j]
                if not np.isfinite(row).all():
                    with frame_context(frame.key):
                        log.warning("infer.non_finite", scores=row.tolist())
                    results[i] = self._error(
                        frame, e, model, "model produced a non-finite score", own
                    )
                    continue
                results[i] = Scores(
                    frame.line,
                    frame.camera,
                    frame.seq,
                    frame.t_capture,
                    {b: float(row[k]) for k, b in enumerate(model.bundle.branches)},
                    model.version,
                    self._timings(e, own),
                    self._map(amap, j),
                    self._seg(seg, amap, j),
                    epoch=frame.epoch,
                )

        for e, frame in batch.poison:
            reason = (
                f"delivered {e.deliveries} times without completing (over "
                f"LINEGUARD_INFER__MAX_DELIVERIES={self.cfg.max_deliveries}); dead-lettered"
            )
            with frame_context(frame.key):
                log.error("infer.poison", deliveries=e.deliveries, entry_id=e.id)
            results.append(self._error(frame, e, model, reason, _read_at(base, batch, e)))

        messages = [r for r in results + batch.refused if r is not None]
        t_scored = time.time()
        messages = [_stamp(s, t_scored) for s in messages]
        ids = [e.id for e, _ in batch.work] + [e.id for e, _ in batch.poison] + batch.ack_only
        if ids or messages:
            self.bus.ack_with_result(
                "frames",
                self.cfg.group,
                ids,
                "scores",
                messages,
                max_len=self.cfg.scores_max_len,
            )
        for e, _frame in batch.poison:
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
            t_read = s.timings.get("t_read", batch.t_read)
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
            epoch=frame.epoch,
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


def _forward(runtime: Runtime, images: np.ndarray) -> tuple[Any, float, float]:
    """The forward thread's job: outputs, when it started (perf_counter) and how long it took."""
    t0 = time.perf_counter()
    out = runtime.run(images)
    return out, t0, time.perf_counter() - t0


def _read_at(timings: dict[str, float], batch: _Batch, e: Entry) -> dict[str, float]:
    """``timings`` with the entry's own read time when it joined ``batch`` after the first
    read (its queue wait ends when it was read, not when the batch's first entry was)."""
    late = batch.read_late.get(e.id)
    return timings if late is None else {**timings, "t_read": late}


def _stamp(s: Scores, t_scored: float) -> Scores:
    s.timings["t_scored"] = t_scored
    return s
