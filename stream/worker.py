"""The loop every stage shares: set up, step until told to stop, drain, tear down.

A stage (ingest, infer, decide) implements ``setup()`` (load the bundle, warm up, create its
consumer group), ``step()`` (read, process, write and acknowledge one batch; returns how many
entries it handled) and ``teardown()``. ``run_worker`` adds what they have in common:

* **Drain on SIGTERM/SIGINT**: the signal only sets a flag. The batch in flight is finished,
  written and acknowledged before the loop ends, and every blocking read is short (``block_ms``
  ≤ half the socket timeout), so a worker exits within about a second of the signal. A second
  SIGINT interrupts at once.
* **Heartbeat**: ``<prefix>:{line}:health:<stage>:<consumer>`` holds a small JSON status with
  a TTL; ``lineguard health`` turns the keys into an exit code. A clean exit deletes the key.
  It is written from its own thread (``HeartbeatThread``), so a long step (a big batch, a
  slow server) cannot let it expire, but only while the loop keeps completing steps: a loop
  stuck for ``stall_s`` stops beating and the probes see a dead worker, as they should.
* **Reloads off the hot path**: a stage loads a new bundle version with ``BackgroundLoad``
  (verify, build, warm up in a thread) and swaps it in between two batches; its status says
  ``loading since …`` meanwhile.
* **Transient Redis failures** (after redis-py's own retries) are logged and retried with a
  capped backoff rather than killing the worker; a stage with a ``recover()`` method is told,
  so it can re-read what it held unacknowledged. Anything else is a bug and propagates, the
  process dies, and a peer reclaims its pending entries.
* **Burst mode** ends the loop once ``done()`` says the stage has nothing left (tests,
  ``--burst``, replays).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from types import FrameType
from typing import Any, Generic, Protocol, TypeVar

import redis
import structlog

from lineguard.stream.bus import Bus, Entry, StreamName
from lineguard.stream.logs import bind_worker

log = structlog.get_logger("lineguard.worker")
T = TypeVar("T")

HEARTBEAT_INTERVAL_S = 2.0
HEARTBEAT_TTL_S = 10
# A loop that has not finished a step for this long is stuck: its heartbeat thread stops, the
# key expires and the probes restart it. Far above any step (a blocking read is ≤ 1 s, a batch
# seconds on a CPU), far below what an operator would tolerate.
HEARTBEAT_STALL_S = 120.0
_MAX_BACKOFF_S = 5.0


def line_key(bus: Bus, *parts: str) -> str:
    """An auxiliary key of the bus's line, hash-tagged like its streams (same Cluster slot)."""
    return f"{bus.prefix}:{{{bus.line}}}:" + ":".join(parts)


def health_pattern(bus: Bus, stage: str = "*") -> str:
    return line_key(bus, "health", stage, "*")


class Stage(Protocol):
    """What ``run_worker`` drives; see the module docstring."""

    name: str
    consumer: str

    def setup(self) -> None: ...

    def step(self) -> int: ...

    def teardown(self) -> None: ...

    def done(self) -> bool:
        """Burst mode: True once there is nothing left for this stage to do."""
        ...

    def status(self) -> dict[str, Any]:
        """A JSON-ready snapshot for the heartbeat (counters, model version, ...)."""
        ...


class StopFlag:
    """A threading.Event that signal handlers can set; shared by workers of one process."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.signals = 0

    def set(self) -> None:
        self.event.set()

    def is_set(self) -> bool:
        return self.event.is_set()

    def wait(self, timeout: float) -> bool:
        return self.event.wait(timeout)


class signals_stop:
    """Context manager: SIGTERM/SIGINT set ``flag`` instead of killing the process.

    Only the main thread may install handlers; elsewhere this does nothing. A second SIGINT
    raises ``KeyboardInterrupt`` so an operator can always get out.
    """

    def __init__(self, flag: StopFlag) -> None:
        self.flag = flag
        self._saved: dict[int, Any] = {}

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        self.flag.signals += 1
        if signum == signal.SIGINT and self.flag.signals > 1:
            raise KeyboardInterrupt
        log.info("worker.stopping", signal=signal.Signals(signum).name)
        self.flag.set()

    def __enter__(self) -> signals_stop:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._saved[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._saved.items():
            signal.signal(sig, handler)
        self._saved.clear()


class Heartbeat:
    """Writes the stage's health key every ``interval_s``; deleted on a clean stop."""

    def __init__(self, bus: Bus, stage: Stage, *, interval_s: float, ttl_s: int) -> None:
        self.bus = bus
        self.stage = stage
        self.interval_s = interval_s
        self.ttl_s = max(1, int(ttl_s))
        self.key = line_key(bus, "health", stage.name, stage.consumer)
        self._last = 0.0
        self._started = time.time()

    def beat(self, *, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last < self.interval_s:
            return
        self._last = now
        payload = {
            "stage": self.stage.name,
            "consumer": self.stage.consumer,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": self._started,
            "t": time.time(),
            **self.stage.status(),
        }
        self.bus.client.set(self.key, json.dumps(payload, default=str), ex=self.ttl_s)

    def clear(self) -> None:
        try:
            self.bus.client.delete(self.key)
        except redis.RedisError as exc:
            log.warning("worker.heartbeat_clear_failed", error=str(exc))


class HeartbeatThread:
    """Calls ``Heartbeat.beat`` every interval from a daemon thread, while the loop lives.

    The loop calls ``progress()`` after each step; when none came for ``stall_s`` the thread
    skips its beats (and logs why) until one does. A failed write (server away) is logged and
    retried at the next interval; the loop's own error handling deals with the server.
    """

    def __init__(self, heartbeat: Heartbeat, *, stall_s: float = HEARTBEAT_STALL_S) -> None:
        self.heartbeat = heartbeat
        self.stall_s = stall_s
        self._last_progress = time.monotonic()
        self._stop = threading.Event()
        self._stalled = False
        self._thread = threading.Thread(
            target=self._run, name=f"heartbeat-{heartbeat.stage.name}", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def progress(self) -> None:
        self._last_progress = time.monotonic()

    def _run(self) -> None:
        interval = max(0.05, self.heartbeat.interval_s)
        while not self._stop.wait(interval):
            idle = time.monotonic() - self._last_progress
            if idle > self.stall_s:
                if not self._stalled:
                    log.error("worker.stalled", idle_s=round(idle, 1), stall_s=self.stall_s)
                self._stalled = True
                continue
            self._stalled = False
            try:
                self.heartbeat.beat(force=True)
            except redis.RedisError as exc:
                log.warning("worker.heartbeat_failed", error=f"{type(exc).__name__}: {exc}")
            except Exception:  # a status() bug must not kill the thread silently
                log.exception("worker.heartbeat_failed")

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=self.heartbeat.interval_s + 5)


def run_worker(
    stage: Stage,
    bus: Bus,
    *,
    stop: StopFlag | None = None,
    burst: bool = False,
    handle_signals: bool = True,
    heartbeat_interval_s: float = HEARTBEAT_INTERVAL_S,
    heartbeat_ttl_s: int = HEARTBEAT_TTL_S,
    heartbeat_stall_s: float = HEARTBEAT_STALL_S,
    on_ready: Callable[[], None] | None = None,
) -> int:
    """Run ``stage`` until ``stop`` is set (or, with ``burst``, until it is done).

    Returns the number of entries handled. ``on_ready`` is called once set-up has finished
    (the bundle is loaded and warm), which is what ``lineguard run`` waits for.
    """
    flag = stop or StopFlag()
    bind_worker(stage.name, stage.consumer)
    handled = 0
    with signals_stop(flag) if handle_signals else nullcontext():
        stage.setup()
        heartbeat = Heartbeat(bus, stage, interval_s=heartbeat_interval_s, ttl_s=heartbeat_ttl_s)
        log.info("worker.ready", **_short_status(stage))
        if on_ready is not None:
            on_ready()
        backoff = 0.1
        beating = HeartbeatThread(heartbeat, stall_s=heartbeat_stall_s)
        try:
            heartbeat.beat(force=True)
            beating.start()
            while not flag.is_set():
                try:
                    n = stage.step()
                    beating.progress()
                except (redis.ConnectionError, redis.TimeoutError) as exc:
                    log.warning(
                        "worker.redis_unavailable",
                        error=f"{type(exc).__name__}: {exc}",
                        retry_in_s=round(backoff, 2),
                    )
                    flag.wait(backoff)
                    backoff = min(backoff * 2, _MAX_BACKOFF_S)
                    recover = getattr(stage, "recover", None)
                    if recover is not None:
                        recover()
                    continue
                backoff = 0.1
                handled += n
                if burst and n == 0 and stage.done():
                    log.info("worker.burst_done", handled=handled)
                    break
        finally:
            beating.stop()
            stage.teardown()  # may still publish the batch in flight: beat until it is done
            heartbeat.clear()
            log.info("worker.stopped", handled=handled, **_short_status(stage))
    return handled


def _short_status(stage: Stage) -> dict[str, Any]:
    try:
        return {k: v for k, v in stage.status().items() if not isinstance(v, dict | list)}
    except Exception:  # status is for logs only; never fail a stop because of it
        return {}


class BundleWatcher:
    """Notices when the bundle at ``path`` was replaced, cheaply, between batches.

    ``save_bundle`` swaps whole directories by rename, so the manifest's inode, size and
    mtime change together; a stat every ``interval_s`` is enough. While the path is briefly
    missing during the swap, nothing is reported. A change is reported once: if loading the
    new bundle fails, the worker keeps the old one until the manifest changes again.
    """

    def __init__(self, path: str | Path, interval_s: float = 2.0) -> None:
        self.path = Path(path)
        self.interval_s = interval_s
        self._signature = self._stat()
        self._next = time.monotonic() + interval_s

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            st = (self.path / "manifest.json").stat()
        except OSError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def changed(self, *, force: bool = False) -> bool:
        now = time.monotonic()
        if not force and now < self._next:
            return False
        self._next = now + self.interval_s
        sig = self._stat()
        if sig is None or sig == self._signature:
            return False
        self._signature = sig
        return True


class BackgroundLoad(Generic[T]):
    """One load at a time in a daemon thread; the loop collects the result between batches.

    Loading a bundle means verifying hashes, building a runtime (minutes for a TensorRT
    engine), capturing CUDA graphs and warming up: all of it here, while the old model keeps
    scoring. ``start`` does nothing while a load runs (the watcher reports the next change
    again, and the load in flight reads the path afresh at its end anyway). ``take`` returns
    the finished load at most once, as ``(value, None)`` or ``(None, error)``.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._done: tuple[T | None, BaseException | None] | None = None
        self.since: float | None = None  # wall clock of the load in flight

    @property
    def busy(self) -> bool:
        with self._lock:
            return self._thread is not None and self._done is None

    def start(self, load: Callable[[], T]) -> bool:
        """Run ``load`` in the background; False if one is already running or not taken."""
        with self._lock:
            if self._thread is not None:
                return False
            self.since = time.time()
            self._thread = threading.Thread(
                target=self._run, args=(load,), name=f"load-{self.name}", daemon=True
            )
            self._thread.start()
        return True

    def _run(self, load: Callable[[], T]) -> None:
        result: tuple[T | None, BaseException | None]
        try:
            result = (load(), None)
        except BaseException as exc:  # handed to the loop, which decides what it means
            result = (None, exc)
        with self._lock:
            self._done = result

    def take(self) -> tuple[T | None, BaseException | None] | None:
        """The finished load, once; None while it runs or when none was started."""
        with self._lock:
            if self._done is None:
                return None
            done, self._done = self._done, None
            self._thread = None
            self.since = None
            return done

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the load in flight; True when none is running any more."""
        with self._lock:
            thread = self._thread
        if thread is not None:
            thread.join(timeout)
            return not thread.is_alive()
        return True

    def status(self) -> str | None:
        """``loading since <UTC time>`` while a load runs (for the heartbeat)."""
        since = self.since
        if since is None or not self.busy:
            return None
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(since))
        return f"loading since {stamp} ({time.time() - since:.0f} s)"


class ConsumerPruner:
    """Removes the consumers that workers which are gone left in a group.

    Redis creates a consumer on its first read and never forgets it, so every pod or restart
    with a fresh name adds one to ``XINFO CONSUMERS`` for good. Every ``every_s`` the worker
    deletes those idle for ``idle_ms`` that own no pending entries (``Bus.prune_consumers``
    keeps one that does: deleting it would orphan its entries). A live worker's blocking reads
    keep its idle time near zero, and deleting an idle one is harmless anyway: its next read
    creates it again.
    """

    def __init__(
        self,
        bus: Bus,
        stream: StreamName,
        group: str,
        *,
        idle_ms: int = 3_600_000,
        every_s: float = 600.0,
    ) -> None:
        self.bus, self.stream, self.group = bus, stream, group
        self.idle_ms, self.every_s = idle_ms, every_s
        self._next = time.monotonic() + every_s

    def maybe_prune(self, now: float | None = None) -> list[str]:
        now = time.monotonic() if now is None else now
        if now < self._next:
            return []
        self._next = now + self.every_s
        removed = self.bus.prune_consumers(self.stream, self.group, min_idle_ms=self.idle_ms)
        if removed:
            log.info("bus.consumers_pruned", stream=self.stream, group=self.group, names=removed)
        return removed


class Reclaimer:
    """Takes over entries a dead peer left pending in a group, one page per call.

    One XAUTOCLAIM page per step keeps every step short; after a full pass that found nothing
    it rests for ``every_s`` and prunes the names of consumers that are gone. Entries trimmed
    from the stream while still pending are counted in ``counts["trimmed"]`` (decide reports
    those frames as uninspected), taken-over ones in ``counts["reclaimed"]``.
    """

    def __init__(
        self,
        bus: Bus,
        stream: StreamName,
        group: str,
        consumer: str,
        *,
        stage: str,
        min_idle_ms: int,
        count: int,
        every_s: float,
        counts: dict[str, int],
    ) -> None:
        from lineguard.stream.metrics import get_metrics

        self.bus, self.stream, self.group, self.consumer = bus, stream, group, consumer
        self.stage, self.min_idle_ms, self.count, self.every_s = stage, min_idle_ms, count, every_s
        self.counts = counts
        self.counts.setdefault("trimmed", 0)
        self.counts.setdefault("reclaimed", 0)
        self.metrics = get_metrics()
        self.pruner = ConsumerPruner(bus, stream, group)
        self.cursor = "0-0"
        self.next_at = 0.0

    def rest(self) -> None:
        """Wait a full interval before the first pass (a worker that just started)."""
        self.next_at = time.monotonic() + self.every_s

    def due(self, now: float | None = None) -> bool:
        """Whether the next ``take`` runs a page (rather than returning nothing at once)."""
        return (time.monotonic() if now is None else now) >= self.next_at

    def take(self, now: float | None = None) -> list[Entry]:
        now = time.monotonic() if now is None else now
        if now < self.next_at:
            return []
        r = self.bus.reclaim(
            self.stream,
            self.group,
            self.consumer,
            min_idle_ms=self.min_idle_ms,
            count=self.count,
            start_id=self.cursor,
        )
        self.cursor = r.cursor
        if r.cursor == "0-0" and not r.entries:
            self.next_at = now + self.every_s
            self.pruner.maybe_prune(now)
        if r.deleted_ids:
            self.counts["trimmed"] += len(r.deleted_ids)
            self.metrics.trimmed.labels(self.stage).inc(len(r.deleted_ids))
            log.warning(
                f"{self.stage}.trimmed_pending",
                count=len(r.deleted_ids),
                first=r.deleted_ids[0],
                note="entries were trimmed before they were handled; decide reports their "
                "frames as uninspected",
            )
        if r.entries:
            self.counts["reclaimed"] += len(r.entries)
            self.metrics.reclaimed.labels(self.stage).inc(len(r.entries))
        return r.entries


def health_report(bus: Bus) -> list[dict[str, Any]]:
    """Every live heartbeat of the line (expired keys are gone, so these are the live ones)."""
    out: list[dict[str, Any]] = []
    keys = sorted(bus.client.scan_iter(match=health_pattern(bus), count=500))
    if not keys:
        return out
    values = bus.client.mget(keys)
    for key, raw in zip(keys, values, strict=True):
        if raw is None:
            continue
        try:
            item = json.loads(raw)
        except (ValueError, TypeError):
            item = {}
        if not isinstance(item, dict):
            item = {}
        item.setdefault("key", key.decode() if isinstance(key, bytes) else str(key))
        ttl = bus.client.ttl(key)
        item["ttl_s"] = int(ttl) if ttl is not None else None
        out.append(item)
    return out
