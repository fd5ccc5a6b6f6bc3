"""``lineguard bench sinks``: how fast each sink delivers, and how it comes back from an outage.

Two phases, both on real parts (Redis or an embedded Valkey, a Mosquitto broker of our own,
an HTTP receiver on loopback, the sink's own OPC UA server):

1. **Throughput**: ``events`` verdicts are written to a fresh events stream first; then one
   sink at a time starts and the time until the last one is acknowledged gives the
   verdicts/s it sustains (its catch-up speed, which is also its steady-state ceiling).
2. **Outage**: the sinks run side by side on one stream while verdicts arrive at ``rate``/s.
   Then the broker and the HTTP receiver are stopped, and the OPC UA sink itself (its
   receiver is the PLC reading it; what can be down is the sink's process), for
   ``outage_s``. Measured from the moment they are back: the lag each sink has, how long
   until its first delivery (reconnecting, the retry delay, the OPC UA server starting) and
   until its lag is zero; the producer stops at that moment so catch-up has an end. Then
   every receiver's log is checked: every verdict there (after deduplication on the frame
   key), in capture order per camera, and how many copies it received.
"""

from __future__ import annotations

import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rich.table import Table

from lineguard.engines.errors import LineguardError
from lineguard.stream.bus import Bus, connect
from lineguard.stream.protocol import Event
from lineguard.stream.server import redis_url_for
from lineguard.stream.settings import Settings
from lineguard.stream.sinks import SINK_KINDS, SinkStage, sink_group, sink_stage
from lineguard.stream.tools.harness import delete_prefix, run_prefix, with_sections
from lineguard.stream.tools.receivers import (
    HttpReceiver,
    Mosquitto,
    MqttRecorder,
    first_seen_in_order,
    free_port,
)
from lineguard.stream.worker import StopFlag, run_worker

_SECRET = "bench-sinks-hmac-secret-not-for-production"
_VERDICTS = ("pass", "pass", "pass", "fail", "uninspected", "pass", "pass", "error")


def bench_event(line: str, camera: str, seq: int) -> Event:
    """A verdict shaped like decide's (a fail, an error and an uninspected in every eight)."""
    verdict = _VERDICTS[seq % len(_VERDICTS)]
    scored = verdict in ("pass", "fail")
    t = time.time()
    return Event(
        line, camera, seq, verdict,  # type: ignore[arg-type]
        (1.4 if verdict == "fail" else 0.3) if scored else None,
        1.0 if scored else None,
        {"lgst": 0.25, "patch": 0.05} if scored else {},
        "bench-model",
        {"ingest": 0.001, "queue": 0.002, "infer": 0.02, "decide": 0.001, "total": 0.025},
        "" if verdict == "pass" else f"{verdict} (benchmark)",
        t - 0.025,
        t,
    )  # fmt: skip


def _produce(bus: Bus, cameras: list[str], seqs: range) -> int:
    """Write events the way decide does (``Bus.add``), round-robin over the cameras."""
    n = 0
    for seq in seqs:
        for cam in cameras:
            bus.add("events", bench_event(bus.line, cam, seq))
            n += 1
    return n


class _Worker:
    """One sink stage under ``run_worker`` in a thread."""

    def __init__(self, stage: SinkStage, bus: Bus) -> None:
        self.stage, self.bus = stage, bus
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True, name=stage.label)

    def _run(self) -> None:
        try:
            run_worker(
                self.stage, self.bus, stop=self.stage.stop, handle_signals=False,
                on_ready=self.ready.set,
            )  # fmt: skip
        except BaseException as exc:  # reported by start()/stop()
            self.error = exc
            self.ready.set()

    def start(self) -> _Worker:
        self.thread.start()
        if not self.ready.wait(60) or self.error is not None:
            raise LineguardError(f"sink {self.stage.label} did not start: {self.error}")
        return self

    def stop(self) -> None:
        self.stage.stop.set()
        self.thread.join(30)
        if self.error is not None:
            raise LineguardError(f"sink {self.stage.label} failed: {self.error}")


def _wait(cond: Callable[[], bool], timeout: float, what: str) -> float:
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            raise LineguardError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.02)
    return time.monotonic() - t0


def _lag(bus: Bus, group: str) -> int:
    st = bus.group_stats("events", group)
    return 0 if st is None else (st.lag or 0) + st.pending


@contextmanager
def _receivers(work: Path, kinds: tuple[str, ...]) -> Iterator[dict[str, Any]]:
    out: dict[str, Any] = {}
    broker: Mosquitto | None = None
    http: HttpReceiver | None = None
    try:
        if "mqtt" in kinds:
            broker = Mosquitto(work)
            if not broker.available:
                raise LineguardError(
                    "bench sinks starts a Mosquitto of its own (it stops it for the outage): "
                    "install mosquitto or leave mqtt out with --sinks opcua,webhook"
                )
            broker.start()
            out["broker"] = broker
        if "webhook" in kinds:
            http = HttpReceiver()
            http.start()
            out["http"] = http
        yield out
    finally:
        if http is not None:
            http.stop()
        if broker is not None:
            broker.stop()


def _sink_settings(settings: Settings, kind: str, line: str, rx: dict[str, Any]) -> Settings:
    """``settings`` with sink ``kind`` pointed at the benchmark's receivers; every other knob
    (queue size, retry delays) is what the user configured, so the figures are theirs."""
    from pydantic import SecretStr

    update: dict[str, Any] = {"name": "bench", "start": "all"}
    if kind == "mqtt":
        update |= {"port": rx["broker"].port, "topic": "bench/{line}/{camera}"}
    elif kind == "opcua":
        update["port"] = free_port()
    else:
        update |= {"url": rx["http"].url, "secret": SecretStr(_SECRET)}
    section = getattr(settings.sinks, kind).model_copy(update=update)
    cfg = with_sections(settings, line={"id": line})
    return cfg.model_copy(update={"sinks": cfg.sinks.model_copy(update={kind: section})})


def bench_sinks(
    settings: Settings,
    *,
    kinds: tuple[str, ...] = SINK_KINDS,
    events: int = 3000,
    outage_s: float = 60.0,
    rate: float = 50.0,
    cameras: int = 2,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run both phases; returns a JSON-ready dict (``result_table`` shows it)."""
    unknown = sorted(set(kinds) - set(SINK_KINDS))
    if unknown:
        raise LineguardError(f"unknown sink(s) {unknown}; use {', '.join(SINK_KINDS)}")
    if events < 1 or rate <= 0 or outage_s < 0:
        raise LineguardError("--events must be ≥ 1, --rate > 0 and --outage ≥ 0")
    say = progress or (lambda _m: None)
    cams = [f"cam{i}" for i in range(cameras)]
    load_before = os.getloadavg()
    prefix = run_prefix(settings, "bench-sinks")
    base = with_sections(settings, redis={"key_prefix": prefix})
    result: dict[str, Any] = {"events": events, "rate": rate, "outage_s": outage_s,
                              "cameras": cameras, "throughput": {}, "outage": {}}  # fmt: skip
    with (
        tempfile.TemporaryDirectory(prefix="lineguard-bench-sinks-") as tmp,
        redis_url_for(base) as url,
        _receivers(Path(tmp), kinds) as rx,
    ):
        client = connect(base, url, client_name="lineguard-bench-sinks")
        try:
            for kind in kinds:
                result["throughput"][kind] = _throughput(base, client, kind, events, cams, rx, say)
            if outage_s > 0:
                result["outage"] = _outage(base, client, kinds, outage_s, rate, cams, rx, say)
        finally:
            if settings.redis.url is not None:
                delete_prefix(client, prefix)
            client.close()
    from lineguard.engines.bench.machine import machine_info

    result.update(
        load_avg_before=[round(x, 2) for x in load_before],
        load_avg_after=[round(x, 2) for x in os.getloadavg()],
        machine=machine_info(),
        finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    )
    return result


def _throughput(
    base: Settings, client: Any, kind: str, events: int, cams: list[str], rx: dict[str, Any],
    say: Callable[[str], None],
) -> dict[str, Any]:  # fmt: skip
    line = f"tp-{kind}"
    cfg = _sink_settings(base, kind, line, rx)
    bus = Bus.from_settings(client, cfg)
    per_cam = -(-events // len(cams))
    n = _produce(bus, cams, range(per_cam))
    recorder = None
    if kind == "mqtt":
        recorder = MqttRecorder("127.0.0.1", rx["broker"].port, f"bench/{line}/#")
    http_before = len(rx["http"].delivered_keys()) if kind == "webhook" else 0
    say(f"{kind}: delivering a backlog of {n} verdicts")
    stage = sink_stage(kind, cfg, bus, stop=StopFlag())
    worker = _Worker(stage, bus).start()  # set up (connected, serving) before the clock
    try:
        elapsed = _wait(stage.done, max(120.0, n / 20), f"{kind} to deliver {n} verdicts")
    finally:
        worker.stop()
    arrived = stage.counts["delivered"]
    if recorder is not None:
        _wait(lambda: len(set(recorder.keys())) >= n, 30, "the MQTT subscriber")
        arrived = len(set(recorder.keys()))
        recorder.close()
    elif kind == "webhook":
        arrived = len(set(rx["http"].delivered_keys()[http_before:]))
    return {
        "verdicts": n,
        "seconds": round(elapsed, 3),
        "verdicts_per_s": round(n / elapsed, 1),
        "arrived": arrived,
    }


def _outage(
    base: Settings, client: Any, kinds: tuple[str, ...], outage_s: float, rate: float,
    cams: list[str], rx: dict[str, Any], say: Callable[[str], None],
) -> dict[str, Any]:  # fmt: skip
    line = "outage"
    cfgs = {k: _sink_settings(base, k, line, rx) for k in kinds}
    bus = Bus.from_settings(client, cfgs[kinds[0]])
    recorder = None
    if "mqtt" in kinds:  # a durable session: the broker keeps what arrives while it is away
        recorder = MqttRecorder(
            "127.0.0.1", rx["broker"].port, f"bench/{line}/#", client_id="bench-recorder"
        )
    http_before = len(rx["http"].requests) if "webhook" in kinds else 0
    workers = {k: _Worker(sink_stage(k, cfgs[k], bus, stop=StopFlag()), bus).start() for k in kinds}
    stop_producing = threading.Event()
    produced = [0]

    def producer() -> None:
        seq, t0 = 0, time.monotonic()
        while not stop_producing.is_set():
            due = t0 + seq * len(cams) / rate
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            produced[0] += _produce(bus, cams, range(seq, seq + 1))
            seq += 1

    thread = threading.Thread(target=producer, daemon=True)
    thread.start()
    out: dict[str, Any] = {}
    try:
        time.sleep(min(3.0, outage_s))  # steady state first
        say(f"outage: receivers down for {outage_s:.0f} s while {rate:g} verdicts/s arrive")
        if "mqtt" in kinds:
            rx["broker"].stop()
        if "webhook" in kinds:
            rx["http"].stop()
        if "opcua" in kinds:
            workers["opcua"].stop()
        time.sleep(outage_s)
        lags = {k: _lag(bus, sink_group(k, "bench")) for k in kinds}
        before = {k: workers[k].stage.counts["delivered"] for k in kinds if k != "opcua"}
        t_back = time.monotonic()
        stop_producing.set()
        thread.join(10)
        if "mqtt" in kinds:
            rx["broker"].start()
        if "webhook" in kinds:
            rx["http"].start()
        if "opcua" in kinds:
            workers["opcua"] = _Worker(
                sink_stage("opcua", cfgs["opcua"], bus, stop=StopFlag()), bus
            )
            workers["opcua"].start()
        say("outage over: catching up")
        caught: dict[str, float] = {}
        first: dict[str, float] = {}  # back → first delivery: reconnect and retry delay
        deadline = t_back + max(120.0, produced[0] / 20)
        while len(caught) < len(kinds) and time.monotonic() < deadline:
            for k in kinds:
                now = time.monotonic() - t_back
                if k not in first and workers[k].stage.counts["delivered"] > before.get(k, 0):
                    first[k] = now
                if k not in caught and workers[k].stage.done():
                    caught[k] = now
            time.sleep(0.02)
        total = produced[0]
        for k in kinds:
            keys: list[str] | None = None
            if k == "mqtt" and recorder is not None:
                _wait(lambda: len(set(recorder.keys())) >= total, 60, "the MQTT subscriber")
                keys = recorder.keys()
            elif k == "webhook":
                keys = rx["http"].delivered_keys()[http_before:]
            entry: dict[str, Any] = {
                "lag_at_recovery": lags[k],
                "catch_up_s": None if k not in caught else round(caught[k], 2),
                "first_delivery_s": None if k not in first else round(first[k], 2),
                "delivered": None,
                "missing": None,
                "duplicates": None,
                "order_kept": None,
            }
            if keys is not None:
                order = first_seen_in_order(keys)
                want = -(-total // len(cams))
                entry["delivered"] = len(set(keys))
                entry["missing"] = total - len(set(keys))
                entry["duplicates"] = len(keys) - len(set(keys))
                entry["order_kept"] = all(s == list(range(len(s))) for s in order.values()) and (
                    all(len(s) == want for s in order.values())
                )
            else:  # opcua: its counters are kept with the acknowledgement (exactly once)
                key = getattr(workers[k].stage.sink, "state_key")  # noqa: B009 - OPC UA only
                counts: dict[bytes, bytes] = bus.client.hgetall(key)  # type: ignore[assignment]
                counted = sum(int(v) for f, v in counts.items() if not f.endswith(b"|last"))
                entry["delivered"] = counted
                entry["missing"] = total - counted
                entry["duplicates"] = 0 if counted <= total else counted - total
            out[k] = entry
        out["produced"] = total
    finally:
        stop_producing.set()
        for w in workers.values():
            if w.thread.is_alive():
                w.stop()
        if recorder is not None:
            recorder.close()
    return out


def result_table(result: dict[str, Any]) -> Table:
    table = Table(title=f"lineguard bench sinks ({result['cameras']} cameras)")
    for col in ("sink", "verdicts/s", "backlog", "outage s", "lag after", "first s",
                "catch-up s", "missing", "copies", "order"):  # fmt: skip
        table.add_column(col, justify="right")
    outage = result.get("outage") or {}
    for kind, tp in result["throughput"].items():
        o = outage.get(kind, {})

        def cell(key: str, entry: dict[str, Any] = o) -> str:
            v = entry.get(key)
            return "-" if v is None else str(v)

        order = o.get("order_kept")
        table.add_row(
            kind,
            f"{tp['verdicts_per_s']:.0f}",
            str(tp["verdicts"]),
            f"{result['outage_s']:g}" if o else "-",
            cell("lag_at_recovery"),
            cell("first_delivery_s"),
            cell("catch_up_s"),
            cell("missing"),
            cell("duplicates"),
            "-" if order is None else ("kept" if order else "BROKEN"),
        )
    return table
