"""The ``lineguard`` command line: one Typer app, one command per verb.

Commands only parse arguments and hand off to plain functions; a ``LineguardError`` is printed
as one line and exits with status 1 (``--verbose`` shows the traceback). Flags override the
``LINEGUARD_*`` settings. Training code in ``offline`` is imported inside the commands that
need it (``demo``), never at module import, and so are torch-heavy modules, so ``--help`` and
``health`` stay fast.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from lineguard.engines.errors import LineguardError

app = typer.Typer(
    name="lineguard",
    help="Streaming inspection for production lines (CSAD over Redis Streams).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
bench_app = typer.Typer(help="Benchmarks: print a table and write JSON.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")

# Tables are wider than 80 columns; keep them readable when piped to a file or CI log.
console = Console(width=None if Console().is_terminal else 160)
err_console = Console(stderr=True)
_state: dict[str, Any] = {"verbose": False, "log_level": None, "log_format": None}

F = TypeVar("F", bound=Callable[..., Any])


def friendly_errors(func: F) -> F:
    """Turn a ``LineguardError`` into one red line and exit status 1."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except LineguardError as exc:
            if _state["verbose"]:
                raise
            # soft_wrap: the message stays one line however narrow the terminal is
            err_console.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(code=1) from None

    return wrapper  # type: ignore[return-value]


def split_list(value: str, cast: Callable[[str], Any] = str) -> list[Any]:
    try:
        return [cast(v.strip()) for v in value.split(",") if v.strip()]
    except ValueError as exc:
        raise typer.BadParameter(f"cannot parse {value!r}: {exc}") from None


@app.callback()
def main(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show tracebacks.")] = False,
    log_level: Annotated[
        str | None, typer.Option(help="debug, info, warning, error (LINEGUARD_LOG__LEVEL).")
    ] = None,
    log_format: Annotated[
        str | None, typer.Option(help="auto, json or console (LINEGUARD_LOG__FORMAT).")
    ] = None,
) -> None:
    """lineguard: pass/fail for every part, with the reason."""
    _state["verbose"] = verbose
    _state["log_level"] = log_level
    _state["log_format"] = log_format


@bench_app.command("model")
@friendly_errors
def bench_model_cmd(
    backbone: Annotated[
        str, typer.Option(help="Comma-separated backbone names.")
    ] = "efficientnet_lite0",
    runtime: Annotated[
        str, typer.Option(help="Comma-separated: torch, onnxruntime, tensorrt.")
    ] = "torch,onnxruntime",
    batch: Annotated[str, typer.Option(help="Comma-separated batch sizes.")] = "1,8,32",
    device: Annotated[str, typer.Option(help="cpu or cuda[:N].")] = "cpu",
    precision: Annotated[str, typer.Option(help="Comma-separated: fp32, fp16.")] = "fp32",
    bundle: Annotated[
        Path | None, typer.Option(help="Time this bundle instead of a fresh model.")
    ] = None,
    profile: Annotated[
        str | None, typer.Option(help="lite or paper (default: by backbone).")
    ] = None,
    input_size: Annotated[int, typer.Option(help="Square input size.")] = 256,
    min_time: Annotated[float, typer.Option(help="Seconds to time each configuration.")] = 3.0,
    cuda_graphs: Annotated[str, typer.Option(help="torch on CUDA: on, off or on,off.")] = "on",
    json_path: Annotated[
        Path | None, typer.Option("--json", help="Write the rows as JSON here.")
    ] = None,
) -> None:
    """Time the fused model per runtime and batch size (images/s, p50/p99 ms per batch)."""
    from lineguard.engines.bench.model import bench_model, rows_to_json

    graphs = [g == "on" for g in split_list(cuda_graphs)]
    rows = bench_model(
        backbones=split_list(backbone),
        runtimes=split_list(runtime),
        batches=split_list(batch, int),
        device=device,
        precisions=split_list(precision),
        bundle=bundle,
        profile=profile,
        input_size=input_size,
        min_time_s=min_time,
        cuda_graphs=graphs,
        progress=lambda msg: err_console.print(f"[dim]timing {msg}…[/dim]"),
    )
    table = Table(title="lineguard bench model")
    for col in (
        "backbone",
        "profile",
        "runtime",
        "device",
        "precision",
        "batch",
        "images/s",
        "p50 ms",
        "p99 ms",
        "GFLOP/img",
        "note",
    ):
        numeric = col in ("batch", "images/s", "p50 ms", "p99 ms", "GFLOP/img")
        table.add_column(col, justify="right" if numeric else "left", no_wrap=True)
    for r in rows:
        table.add_row(
            r.backbone,
            r.profile,
            r.runtime,
            r.device,
            r.precision,
            str(r.batch),
            f"{r.images_per_s:.1f}",
            f"{r.p50_ms:.1f}",
            f"{r.p99_ms:.1f}",
            f"{r.gflop_per_image:.2f}",
            r.note,
        )
    console.print(table)
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(rows_to_json(rows), indent=2))
        console.print(f"wrote {json_path}")


# ------------------------------------------------------------------------------ shared bits

BundleOpt = Annotated[Path, typer.Option("--bundle", "-b", help="Model bundle directory.")]
LineOpt = Annotated[str | None, typer.Option(help="Line id (LINEGUARD_LINE__ID).")]
CameraOpt = Annotated[str | None, typer.Option(help="Camera id (LINEGUARD_LINE__CAMERA).")]
RuntimeOpt = Annotated[str, typer.Option(help="auto, torch, onnxruntime or tensorrt.")]
DeviceOpt = Annotated[str, typer.Option(help="cpu or cuda[:N].")]
PrecisionOpt = Annotated[str, typer.Option(help="fp32 or fp16 (CUDA).")]
MaxBatchOpt = Annotated[
    int | None, typer.Option(help="Largest inference batch (LINEGUARD_INFER__MAX_BATCH).")
]
MaxDelayOpt = Annotated[
    int | None,
    typer.Option(
        help="Wait this long after a batch's first frame (LINEGUARD_INFER__MAX_DELAY_MS)."
    ),
]
MetricsPortOpt = Annotated[
    int | None, typer.Option(help="Serve Prometheus metrics here (LINEGUARD_METRICS__PORT).")
]
RateOpt = Annotated[str, typer.Option(help="'max' or frames per second, e.g. 60.")]
EncodingOpt = Annotated[
    str | None, typer.Option(help="raw, jpeg or png on the bus (LINEGUARD_INGEST__ENCODING).")
]
SizeOpt = Annotated[
    int | None, typer.Option(help="Resize frames to SIZE×SIZE (default: the bundle's input size).")
]
JsonOpt = Annotated[Path | None, typer.Option("--json", help="Also write the result as JSON here.")]
DashboardOpt = Annotated[
    bool, typer.Option(help="Also serve the web dashboard (see 'lineguard dashboard').")
]
DashboardPortOpt = Annotated[
    int, typer.Option(help="Port of the --dashboard page on 127.0.0.1 (0 = any free port).")
]
DASHBOARD_PORT = (
    8470  # the same default as lineguard.stream.dashboard.DEFAULT_PORT (kept import-free)
)


def _start_dashboard(settings: Any, url: str, port: int, **kwargs: Any) -> Any:
    """Serve the dashboard beside a pipeline on loopback and print where to open it."""
    from lineguard.stream.dashboard import DashboardServer

    server = DashboardServer(settings, url=url, port=port, **kwargs).start()
    err_console.print(f"dashboard: [bold]{server.url}[/bold]", highlight=False)
    return server


def _buckets_for(max_batch: int | None) -> str | None:
    """Batch buckets that fit ``--max-batch`` (powers of two, then the maximum itself)."""
    if max_batch is None or max_batch < 1:
        return None
    sizes, b = [], 1
    while b < max_batch:
        sizes.append(b)
        b *= 2
    sizes.append(max_batch)
    return ",".join(map(str, sizes))


def _load_settings(overrides: dict[str, Any], *, quiet: bool = False) -> Any:
    """Validated settings with the flags applied, and logging configured from them.

    ``quiet`` commands (demo, benchmarks) log warnings and worse unless --log-level says
    otherwise, so their own output stays readable."""
    from lineguard.stream.logs import configure_logging
    from lineguard.stream.settings import Settings

    if overrides.get("infer.max_batch") is not None and "infer.batch_buckets" not in overrides:
        overrides["infer.batch_buckets"] = _buckets_for(overrides["infer.max_batch"])
    # through the settings, so worker processes started by this one log the same way
    overrides.setdefault("log.level", _state["log_level"] or ("warning" if quiet else None))
    overrides.setdefault("log.format", _state["log_format"])
    settings = Settings.load(overrides)
    configure_logging(settings.log)
    return settings


def _external_client(settings: Any, what: str) -> Any:
    """A connected client for commands that join an existing pipeline (no embedded server)."""
    from lineguard.engines.errors import ConfigError
    from lineguard.stream.bus import connect, wait_for_server

    if not settings.redis.url:
        raise ConfigError(
            f"'lineguard {what}' joins a running pipeline: set LINEGUARD_REDIS__URL to its "
            "Redis (e.g. redis://127.0.0.1:6379/0); 'lineguard run' starts everything on "
            "one box with an embedded Valkey"
        )
    client = connect(settings, client_name=f"lineguard-{what}")
    wait_for_server(client, settings.redis.wait_timeout)
    return client


def _summary_table(title: str, data: dict[str, Any]) -> Table:
    table = Table(title=title)
    table.add_column("frames", justify="right")
    for v in ("pass", "fail", "error", "uninspected"):
        table.add_column(v, justify="right")
    for col in ("missing", "duplicates", "frames/s", "p50 ms", "p99 ms"):
        table.add_column(col, justify="right")
    lat = data.get("latency_ms", {})
    fps = data.get("frames_per_s")
    table.add_row(
        str(data["sent"]),
        *(str(data["verdicts"].get(v, 0)) for v in ("pass", "fail", "error", "uninspected")),
        str(data["missing"]),
        str(data["duplicates"]),
        "-" if fps is None else f"{fps:.1f}",
        f"{lat['p50']:.1f}" if "p50" in lat else "-",
        f"{lat['p99']:.1f}" if "p99" in lat else "-",
    )
    return table


def _write_json(path: Path | None, data: Any) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2))
    err_console.print(f"wrote {path}")


def _print_event(ev: Any) -> None:
    from lineguard.stream.tools.events import event_line

    console.print(event_line(ev), highlight=False, soft_wrap=True)


# ------------------------------------------------------------------------------ workers


@app.command("run")
@friendly_errors
def run_cmd(
    bundle: BundleOpt,
    source: Annotated[
        str, typer.Option(help="Image folder, video file, recording, camera index or URL.")
    ],
    rate: RateOpt = "max",
    loop: Annotated[bool, typer.Option(help="Loop a folder, video or recording.")] = False,
    size: SizeOpt = None,
    record: Annotated[Path | None, typer.Option(help="Record what is sent into DIR.")] = None,
    workers: Annotated[str, typer.Option(help="threads or processes.")] = "threads",
    infer_workers: Annotated[int, typer.Option(help="How many infer workers.")] = 1,
    runtime: RuntimeOpt = "auto",
    device: DeviceOpt = "cpu",
    precision: PrecisionOpt = "fp32",
    max_batch: MaxBatchOpt = None,
    max_delay_ms: MaxDelayOpt = None,
    maps: Annotated[
        bool, typer.Option(help="Publish low-res anomaly maps and segmentations with the scores.")
    ] = False,
    encoding: EncodingOpt = None,
    line: LineOpt = None,
    camera: CameraOpt = None,
    metrics_port: MetricsPortOpt = None,
    drain_timeout: Annotated[
        float, typer.Option(help="Seconds to wait for the last events after the source ends.")
    ] = 60.0,
    show: Annotated[
        str, typer.Option(help="Print events as they arrive: none, rejects or all.")
    ] = "rejects",
    json_path: JsonOpt = None,
    dashboard: DashboardOpt = False,
    dashboard_port: DashboardPortOpt = DASHBOARD_PORT,
) -> None:
    """Run ingest, infer and decide on this box and feed SOURCE through them.

    Uses an embedded Valkey when LINEGUARD_REDIS__URL is unset. Ends when the source does and
    every frame has its event, or on Ctrl-C/SIGTERM after draining what was sent.
    --dashboard also turns on --maps, so the page can show each reject's anomaly map.
    """
    from lineguard.stream.ingest import parse_rate
    from lineguard.stream.run import run_line
    from lineguard.stream.settings import redacted_url

    if show not in ("none", "rejects", "all"):
        raise typer.BadParameter("--show must be none, rejects or all")
    settings = _load_settings(
        {
            "line.id": line,
            "line.camera": camera,
            "ingest.encoding": encoding,
            "infer.max_batch": max_batch,
            "infer.max_delay_ms": max_delay_ms,
            "metrics.port": metrics_port,
        }
    )

    def on_event(ev: Any) -> None:
        if show == "all" or (show == "rejects" and ev.verdict != "pass"):
            _print_event(ev)

    pages: list[Any] = []

    def on_ready(url: str) -> None:
        err_console.print(f"[dim]workers ready on {redacted_url(url)}[/dim]")
        if dashboard:
            pages.append(_start_dashboard(settings, url, dashboard_port))

    try:
        summary = run_line(
            settings,
            bundle,
            source,
            rate=parse_rate(rate),
            loop=loop,
            size=size,
            record=record,
            mode=workers,  # type: ignore[arg-type]
            runtime=runtime,
            device=device,
            precision=precision,
            maps=maps or dashboard,
            infer_workers=infer_workers,
            metrics_port=settings.metrics.port,
            drain_timeout_s=drain_timeout,
            on_event=on_event,
            on_ready=on_ready,
        )
    finally:
        for page in pages:
            page.stop()
    data = summary.to_json()
    console.print(_summary_table("lineguard run", data))
    _write_json(json_path, data)
    if not summary.ok:
        raise typer.Exit(code=1)


@app.command()
@friendly_errors
def ingest(
    source: Annotated[
        str, typer.Option(help="Image folder, video file, recording, camera index or URL.")
    ],
    bundle: Annotated[
        Path | None, typer.Option("--bundle", "-b", help="Read the input size from this bundle.")
    ] = None,
    size: SizeOpt = None,
    rate: RateOpt = "max",
    loop: Annotated[bool, typer.Option(help="Loop a folder, video or recording.")] = False,
    limit: Annotated[int | None, typer.Option(help="Stop after N frames.")] = None,
    record: Annotated[Path | None, typer.Option(help="Record what is sent into DIR.")] = None,
    encoding: EncodingOpt = None,
    line: LineOpt = None,
    camera: CameraOpt = None,
    metrics_port: MetricsPortOpt = None,
) -> None:
    """Capture frames from SOURCE and append them to the frames stream (one camera)."""
    from lineguard.stream.bus import Bus
    from lineguard.stream.ingest import IngestStage, bundle_input_size, parse_rate
    from lineguard.stream.metrics import serve_metrics
    from lineguard.stream.sources import open_source
    from lineguard.stream.worker import StopFlag, run_worker

    settings = _load_settings(
        {
            "line.id": line,
            "line.camera": camera,
            "ingest.encoding": encoding,
            "metrics.port": metrics_port,
        }
    )
    if size is None and bundle is not None:
        size = bundle_input_size(bundle)
    client = _external_client(settings, "ingest")
    stop_metrics = serve_metrics(settings.metrics.port, settings.metrics.addr)
    try:
        bus = Bus.from_settings(client, settings)
        stop = StopFlag()
        src = open_source(source, loop=loop)
        stage = IngestStage(
            bus,
            settings,
            src,
            size=size,
            fps=parse_rate(rate),
            record=record,
            limit=limit,
            stop=stop,
        )
        run_worker(stage, bus, stop=stop, burst=True)
        err_console.print(
            f"sent {stage.ingestor.sent} frames as {settings.line.id}/{settings.line.camera}"
        )
    finally:
        stop_metrics()
        client.close()


@app.command()
@friendly_errors
def infer(
    bundle: BundleOpt,
    runtime: RuntimeOpt = "auto",
    device: DeviceOpt = "cpu",
    precision: PrecisionOpt = "fp32",
    max_batch: MaxBatchOpt = None,
    max_delay_ms: MaxDelayOpt = None,
    consumer: Annotated[
        str | None, typer.Option(help="Stable consumer name (default host-pid).")
    ] = None,
    maps: Annotated[
        bool, typer.Option(help="Publish low-res anomaly maps and segmentations with the scores.")
    ] = False,
    burst: Annotated[bool, typer.Option(help="Exit once the frames stream is drained.")] = False,
    line: LineOpt = None,
    metrics_port: MetricsPortOpt = None,
) -> None:
    """Score frames in dynamic batches (consumer group 'infer'); hot-reloads the bundle."""
    from lineguard.stream.bus import Bus
    from lineguard.stream.infer import InferStage
    from lineguard.stream.metrics import serve_metrics
    from lineguard.stream.worker import run_worker

    settings = _load_settings(
        {
            "line.id": line,
            "infer.max_batch": max_batch,
            "infer.max_delay_ms": max_delay_ms,
            "metrics.port": metrics_port,
        }
    )
    client = _external_client(settings, "infer")
    stop_metrics = serve_metrics(settings.metrics.port, settings.metrics.addr)
    try:
        bus = Bus.from_settings(client, settings)
        stage = InferStage(
            bus,
            settings,
            bundle,
            runtime=runtime,
            device=device,
            precision=precision,
            consumer=consumer,
            maps=maps,
        )
        run_worker(stage, bus, burst=burst)
    finally:
        stop_metrics()
        client.close()


@app.command()
@friendly_errors
def decide(
    bundle: BundleOpt,
    consumer: Annotated[
        str | None, typer.Option(help="Stable consumer name (default host-pid).")
    ] = None,
    gap_grace_s: Annotated[
        float,
        typer.Option(help="Declare a missing frame uninspected after this long at the latest."),
    ] = 60.0,
    burst: Annotated[bool, typer.Option(help="Exit once the scores stream is drained.")] = False,
    line: LineOpt = None,
    metrics_port: MetricsPortOpt = None,
) -> None:
    """Turn scores into pass/fail/error/uninspected events (consumer group 'decide')."""
    from lineguard.stream.bus import Bus
    from lineguard.stream.decide import DecideStage
    from lineguard.stream.metrics import serve_metrics
    from lineguard.stream.worker import run_worker

    settings = _load_settings({"line.id": line, "metrics.port": metrics_port})
    client = _external_client(settings, "decide")
    stop_metrics = serve_metrics(settings.metrics.port, settings.metrics.addr)
    try:
        bus = Bus.from_settings(client, settings)
        stage = DecideStage(bus, settings, bundle, consumer=consumer, gap_grace_s=gap_grace_s)
        run_worker(stage, bus, burst=burst)
    finally:
        stop_metrics()
        client.close()


# ------------------------------------------------------------------------------ observers


@app.command()
@friendly_errors
def replay(
    source: Annotated[str, typer.Argument(help="Image folder, video file or recording dir.")],
    rate: RateOpt = "max",
    bundle: Annotated[
        Path | None, typer.Option("--bundle", "-b", help="Read the input size from this bundle.")
    ] = None,
    size: SizeOpt = None,
    limit: Annotated[int | None, typer.Option(help="Send at most N frames.")] = None,
    loop: Annotated[bool, typer.Option(help="Loop the source (needs --limit).")] = False,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the events.")] = 120.0,
    encoding: EncodingOpt = None,
    line: LineOpt = None,
    camera: CameraOpt = None,
    show: Annotated[str, typer.Option(help="Print events: none, rejects or all.")] = "none",
    json_path: JsonOpt = None,
) -> None:
    """Send SOURCE into the running pipeline, then exit once every frame has its event."""
    from lineguard.stream.ingest import parse_rate
    from lineguard.stream.tools.replay import replay as do_replay

    settings = _load_settings({"line.id": line, "line.camera": camera, "ingest.encoding": encoding})

    def on_event(ev: Any) -> None:
        if show == "all" or (show == "rejects" and ev.verdict != "pass"):
            _print_event(ev)

    summary = do_replay(
        settings,
        source,
        rate=parse_rate(rate),
        size=size,
        bundle=bundle,
        loop=loop,
        limit=limit,
        timeout_s=timeout,
        on_event=on_event,
    )
    data = summary.to_json()
    console.print(_summary_table("lineguard replay", data))
    _write_json(json_path, data)
    if not summary.ok:
        err_console.print(
            f"[red]error:[/red] {summary.missing} frame(s) got no event within {timeout:g} s",
            soft_wrap=True,
        )
        raise typer.Exit(code=1)


@app.command()
@friendly_errors
def events(
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep printing new events.")
    ] = False,
    last: Annotated[int, typer.Option(help="Print the last N events first.")] = 20,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False,
    line: LineOpt = None,
    camera: Annotated[str | None, typer.Option(help="Only this camera.")] = None,
) -> None:
    """Print verdicts: the last N, then (with --follow) each new one as it arrives."""
    from lineguard.stream.bus import Bus
    from lineguard.stream.tools.events import event_json, follow_events, last_events
    from lineguard.stream.worker import StopFlag, signals_stop

    settings = _load_settings({"line.id": line})
    client = _external_client(settings, "events")
    try:
        bus = Bus.from_settings(client, settings)

        def show(entry_id: str, ev: Any) -> None:
            if as_json:
                typer.echo(event_json(ev, entry_id))
            else:
                _print_event(ev)

        cursor = "$"
        if last > 0:
            rows = last_events(bus, last, camera)
            for entry_id, ev in rows:
                show(entry_id, ev)
        if follow:
            stop = StopFlag()
            with signals_stop(stop):
                for entry_id, ev in follow_events(bus, since=cursor, camera=camera, stop=stop):
                    show(entry_id, ev)
    finally:
        client.close()


@app.command()
@friendly_errors
def health(
    stage: Annotated[
        str, typer.Option(help="Comma-separated stages that must have a live worker.")
    ] = "infer,decide",
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    line: LineOpt = None,
) -> None:
    """Exit 0 if every named stage has a live worker heartbeat, else 1 (for probes)."""
    from lineguard.stream.bus import Bus
    from lineguard.stream.worker import health_report

    settings = _load_settings({"line.id": line})
    client = _external_client(settings, "health")
    try:
        bus = Bus.from_settings(client, settings)
        workers = health_report(bus)
        queues = {}
        for stream, group in (("frames", settings.infer.group), ("scores", settings.decide.group)):
            st = bus.group_stats(stream, group)  # type: ignore[arg-type]
            queues[stream] = (
                None
                if st is None
                else {
                    "group": group,
                    "length": st.length,
                    "lag": st.lag,
                    "pending": st.pending,
                    "consumers": st.consumers,
                }
            )
        dead = bus.length("dead")
    finally:
        client.close()
    required = split_list(stage)
    live = {str(w.get("stage")) for w in workers}
    missing = [s for s in required if s not in live]
    if as_json:
        typer.echo(
            json.dumps(
                {
                    "ok": not missing,
                    "missing": missing,
                    "workers": workers,
                    "queues": queues,
                    "dead": dead,
                },
                default=str,
            )
        )
    else:
        table = Table(title=f"lineguard health: line {settings.line.id}")
        for col in ("stage", "consumer", "host", "pid", "model", "age s", "ttl s"):
            table.add_column(col)
        now = time.time()
        for w in workers:
            t = w.get("t")
            age = f"{now - t:.1f}" if isinstance(t, int | float) else "-"
            table.add_row(
                str(w.get("stage")),
                str(w.get("consumer")),
                str(w.get("host")),
                str(w.get("pid")),
                str(w.get("model") or "-"),
                age,
                str(w.get("ttl_s")),
            )
        console.print(table)
        for stream, q in queues.items():
            text = (
                "no group"
                if q is None
                else (f"length {q['length']}, lag {q['lag']}, pending {q['pending']}")
            )
            console.print(f"{stream}: {text}", highlight=False)
        console.print(f"dead letters: {dead}", highlight=False)
    if missing:
        err_console.print(f"[red]unhealthy:[/red] no live worker for {', '.join(missing)}")
        raise typer.Exit(code=1)


@app.command()
@friendly_errors
def dashboard(
    port: Annotated[
        int,
        typer.Option(
            help="Port to serve on (0 = any free port).", envvar="LINEGUARD_DASHBOARD__PORT"
        ),
    ] = DASHBOARD_PORT,
    host: Annotated[
        str,
        typer.Option(
            help="Address to bind; anything but loopback needs --token.",
            envvar="LINEGUARD_DASHBOARD__HOST",
        ),
    ] = "127.0.0.1",
    token: Annotated[
        str | None,
        typer.Option(
            help="Require this token: open the page as /?token=T (or send Authorization: "
            "Bearer T).",
            envvar="LINEGUARD_DASHBOARD__TOKEN",
            show_default=False,
        ),
    ] = None,
    line: LineOpt = None,
    prefix: Annotated[
        str | None,
        typer.Option(
            help="Key prefix (LINEGUARD_REDIS__KEY_PREFIX); a glob such as 'lineguard-demo-*' "
            "follows the newest matching one."
        ),
    ] = None,
    window: Annotated[float, typer.Option(help="Minutes of history in the charts.")] = 10.0,
) -> None:
    """Serve a live web page of the line: verdicts, throughput, latency, queues, rejects.

    Reads the bus only (no consumer group), so the page never slows the line down.
    """
    from lineguard.stream.dashboard import DashboardConfig, DashboardServer, check_binding
    from lineguard.stream.worker import StopFlag, signals_stop

    check_binding(host, token)
    if window <= 0:
        raise typer.BadParameter("--window must be a positive number of minutes")
    settings = _load_settings({"line.id": line})
    _external_client(settings, "dashboard").close()  # fail now if Redis does not answer
    server = DashboardServer(
        settings,
        host=host,
        port=port,
        token=token,
        prefix=prefix,
        config=DashboardConfig(window_s=window * 60),
    )
    stop = StopFlag()
    with signals_stop(stop), server:
        hint = " (add ?token=… to the URL)" if token else ""
        err_console.print(
            f"dashboard of line {settings.line.id}: [bold]{server.url}[/bold]{hint}; "
            "Ctrl-C to stop",
            highlight=False,
        )
        while not stop.wait(0.5):
            pass


# ------------------------------------------------------------------------------ demo & bench


@app.command()
@friendly_errors
def demo(
    directory: Annotated[
        Path | None,
        typer.Option("--dir", help="Cache for the synthetic line, bundle and report."),
    ] = None,
    rate: RateOpt = "max",
    fresh: Annotated[bool, typer.Option(help="Rebuild the line and retrain the bundle.")] = False,
    live: Annotated[bool, typer.Option(help="Show the live dashboard.")] = True,
    dashboard: Annotated[
        bool,
        typer.Option(
            help="Also serve the web dashboard and print its URL; in a terminal it stays up "
            "after the demo until Ctrl-C."
        ),
    ] = False,
    dashboard_port: DashboardPortOpt = DASHBOARD_PORT,
) -> None:
    """Make a synthetic line, train a small bundle, run the pipeline on it and report."""
    import sys
    from contextlib import ExitStack

    from lineguard.stream.ingest import parse_rate
    from lineguard.stream.tools.demo import DEMO_LINE, default_demo_dir, run_demo

    settings = _load_settings({}, quiet=True)
    with ExitStack() as stack:
        page = None
        if dashboard:
            from lineguard.stream.server import redis_url_for

            # The demo gives each run on a given server its own key prefix; start the server
            # here so the page can follow the newest 'lineguard-demo-*' prefix on it.
            url = stack.enter_context(redis_url_for(settings))
            redis_cfg = settings.redis.model_copy(update={"url": url})
            settings = settings.model_copy(update={"redis": redis_cfg})
            page = _start_dashboard(
                settings, url, dashboard_port, line=DEMO_LINE, prefix="lineguard-demo-*"
            )
            stack.callback(page.stop)
        result = run_demo(
            directory or default_demo_dir(),
            settings=settings,
            rate=parse_rate(rate),
            fresh=fresh,
            live=live,
            console=console,
        )
        if page is not None and sys.stdin.isatty():
            from lineguard.stream.worker import StopFlag, signals_stop

            err_console.print(f"the dashboard stays up at {page.url}; Ctrl-C to stop")
            stop = StopFlag()
            with signals_stop(stop):
                while not stop.wait(0.5):
                    pass
    if not result.ok:
        raise typer.Exit(code=1)


@bench_app.command("knn")
@friendly_errors
def bench_knn_cmd(
    sizes: Annotated[str, typer.Option(help="Comma-separated bank sizes.")] = (
        "1024,4096,16384,65536,262144"
    ),
    methods: Annotated[
        str,
        typer.Option(help="Comma-separated: graph-torch, graph-onnxruntime, faiss-flat|ivf|hnsw."),
    ] = "graph-torch,graph-onnxruntime,faiss-flat,faiss-ivf,faiss-hnsw",
    dim: Annotated[int, typer.Option(help="Descriptor size (lite0's patch bank: 64).")] = 64,
    queries: Annotated[int, typer.Option(help="Patches per image (64×64 map: 4096).")] = 4096,
    min_time: Annotated[float, typer.Option(help="Seconds to time each configuration.")] = 2.0,
    json_path: Annotated[
        Path | None, typer.Option("--json", help="Write the rows as JSON here.")
    ] = None,
) -> None:
    """Patch-bank search: in-graph matrix product vs faiss, per bank size, and the crossover."""
    from lineguard.engines.bench.knn import bench_knn, crossover, rows_to_json

    rows = bench_knn(
        split_list(sizes, int),
        dim=dim,
        queries=queries,
        methods=tuple(split_list(methods)),
        min_time_s=min_time,
        progress=lambda msg: err_console.print(f"[dim]timing {msg}…[/dim]"),
    )
    table = Table(title=f"lineguard bench knn ({queries} queries of dim {dim} per image)")
    for col in ("method", "bank", "ms/image p50", "p99 ms", "build s", "recall"):
        table.add_column(col, justify="left" if col == "method" else "right", no_wrap=True)
    for r in rows:
        table.add_row(
            r.method,
            str(r.bank),
            f"{r.ms_per_image:.2f}",
            f"{r.p99_ms:.2f}",
            f"{r.build_s:.2f}",
            f"{r.recall:.3f}",
        )
    console.print(table)
    for method, size in crossover(rows).items():
        console.print(
            f"{method} beats the in-graph search from bank size {size}"
            if size
            else f"{method} never beats the in-graph search at these sizes"
        )
    _write_json(json_path, rows_to_json(rows))


@bench_app.command("e2e")
@friendly_errors
def bench_e2e_cmd(
    frames: Annotated[int, typer.Option(help="Frames to time (after the warm-up).")] = 300,
    rate: RateOpt = "max",
    bundle: Annotated[
        Path | None,
        typer.Option("--bundle", "-b", help="Bundle to use (default: untrained 256-px lite)."),
    ] = None,
    runtime: RuntimeOpt = "auto",
    device: DeviceOpt = "cpu",
    max_batch: MaxBatchOpt = None,
    max_delay_ms: MaxDelayOpt = None,
    workers: Annotated[str, typer.Option(help="threads or processes.")] = "threads",
    encoding: EncodingOpt = None,
    warmup: Annotated[int, typer.Option(help="Untimed frames sent first.")] = 16,
    dashboard: Annotated[
        bool,
        typer.Option(
            help="Serve the dashboard (with anomaly maps) and keep a simulated viewer on it, "
            "to measure what an open page costs."
        ),
    ] = False,
    json_path: JsonOpt = None,
) -> None:
    """Throughput and capture→event latency through Redis, with a per-stage breakdown."""
    from lineguard.stream.ingest import parse_rate
    from lineguard.stream.tools.bench_e2e import bench_e2e, result_table

    settings = _load_settings(
        {
            "ingest.encoding": encoding,
            "infer.max_batch": max_batch,
            "infer.max_delay_ms": max_delay_ms,
        },
        quiet=True,
    )
    result = bench_e2e(
        settings,
        frames=frames,
        rate=parse_rate(rate),
        bundle=bundle,
        runtime=runtime,
        device=device,
        mode=workers,  # type: ignore[arg-type]  # typer checks it against the choices
        warmup=warmup,
        progress=lambda msg: err_console.print(f"[dim]{msg}[/dim]"),
        dashboard=dashboard,
    )
    console.print(result_table(result))
    _write_json(json_path, result)


@bench_app.command("soak")
@friendly_errors
def bench_soak_cmd(
    minutes: Annotated[float, typer.Option(help="How long to run the line.")] = 20.0,
    rate: Annotated[float, typer.Option(help="Frames per second sent by ingest.")] = 5.0,
    bundle: Annotated[
        Path | None,
        typer.Option("--bundle", "-b", help="Bundle to use (default: untrained 256-px lite)."),
    ] = None,
    runtime: RuntimeOpt = "auto",
    device: DeviceOpt = "cpu",
    report_s: Annotated[float, typer.Option(help="Seconds between progress lines.")] = 60.0,
    sample_s: Annotated[float, typer.Option(help="Seconds between memory samples.")] = 5.0,
    max_growth: Annotated[
        float, typer.Option(help="Fail above this RSS growth (MiB/min, second half).")
    ] = 1.0,
    json_path: JsonOpt = None,
) -> None:
    """The whole line as processes at a fixed rate: memory, queues, p99 and verdict accounting
    once a minute; exit 1 if memory grows without bound or the counts do not add up."""
    from lineguard.stream.tools.soak import soak

    settings = _load_settings({}, quiet=True)
    result = soak(
        settings,
        minutes=minutes,
        rate=rate,
        bundle=bundle,
        runtime=runtime,
        device=device,
        sample_s=sample_s,
        report_s=report_s,
        max_growth_mib_per_min=max_growth,
        say=lambda msg: console.print(msg, highlight=False, soft_wrap=True),
    )
    _write_json(json_path, result)
    v, rss = result["verdicts"], result["rss_mib"]
    console.print(
        f"soak: {result['minutes']:g} min at {result['rate']:g} frames/s, sent {result['sent']} = "
        f"pass {v['pass']} + fail {v['fail']} + uninspected {v['uninspected']} + error "
        f"{v['error']}; missing {result['missing']}, duplicates {result['duplicates']}; "
        f"p99 {result['latency_ms']['p99']} ms; RSS MiB "
        + ", ".join(
            f"{w} {r['start']} → {r['end']} ({r['growth_mib_per_min']} MiB/min)"
            for w, r in rss.items()
        ),
        highlight=False,
        soft_wrap=True,
    )
    if not result["ok"]:
        for problem in result["problems"]:
            err_console.print(f"[red]soak failed:[/red] {problem}", highlight=False)
        raise typer.Exit(code=1)


# ------------------------------------------------------------------ offline: synth, train, evaluate
# These import ``offline`` inside the command, so the workers above never load training code.


@app.command()
@friendly_errors
def synth(
    out_dir: Annotated[Path, typer.Argument(help="Folder to write the line into (LOCO layout).")],
    seed: Annotated[int, typer.Option(help="Same seed, same images.")] = 0,
    kind: Annotated[str, typer.Option(help="Product: tray or connectors.")] = "tray",
    size: Annotated[int, typer.Option(help="Image side in pixels.")] = 256,
    train: Annotated[int, typer.Option(help="Good training images.")] = 200,
    validation: Annotated[int, typer.Option(help="Good validation images.")] = 100,
    test_good: Annotated[int, typer.Option(help="Good test images.")] = 100,
    logical: Annotated[int, typer.Option(help="Test images with a logical anomaly.")] = 100,
    structural: Annotated[int, typer.Option(help="Test images with a structural anomaly.")] = 100,
) -> None:
    """Write a synthetic product line (good parts, logical and structural anomalies, masks)."""
    from lineguard.offline.synth import make_line

    summary = make_line(
        out_dir,
        seed=seed,
        kind=kind,
        size=size,
        n_train=train,
        n_val=validation,
        n_test_good=test_good,
        n_test_logical=logical,
        n_test_structural=structural,
        progress=True,
    )
    console.print(
        f"wrote {sum(summary.counts.values())} images of '{summary.kind}' to {summary.root} "
        f"in {summary.seconds:.1f} s: {summary.counts}"
    )


@app.command()
@friendly_errors
def train(
    data_dir: Annotated[Path, typer.Argument(help="MVTec LOCO AD, MVTec AD or a folder of goods.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Bundle directory to write.")],
    backbone: Annotated[str, typer.Option(help="efficientnet_lite0 or wide_resnet50_2.")] = (
        "efficientnet_lite0"
    ),
    profile: Annotated[str, typer.Option(help="lite (CPU) or paper (CSAD's sizes).")] = "lite",
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    preset: Annotated[str, typer.Option(help="demo, default or paper (GPU schedules).")] = (
        "default"
    ),
    target_frr: Annotated[
        float, typer.Option(help="False-reject rate on good parts the threshold aims at.")
    ] = 0.01,
    normalisation: Annotated[
        str, typer.Option(help="Fusion: trimmed_z (CSAD) or loo_max (PSAD).")
    ] = "trimmed_z",
    fusion: Annotated[
        str, typer.Option(help="Combine normalised branch scores: max (default) or sum (CSAD).")
    ] = "max",
    labels: Annotated[
        Path | None, typer.Option(help="Few-shot mode: folder of <stem>.png label maps.")
    ] = None,
    patch_bank: Annotated[
        int | None, typer.Option(help="Patch memory bank size (0: none); default from preset.")
    ] = None,
    hist_bank: Annotated[
        bool | None, typer.Option(help="PSAD class-histogram bank over the training images.")
    ] = None,
    comp_bank: Annotated[
        bool | None, typer.Option(help="PSAD composition-embedding bank over the training images.")
    ] = None,
    fewshot: Annotated[
        int | None, typer.Option(help="Training-free few-shot branch from the first K images.")
    ] = None,
    patch_search: Annotated[
        str, typer.Option(help="Patch bank search: graph, or faiss-flat|ivf|hnsw after the engine.")
    ] = "graph",
    position_prior: Annotated[
        bool | None,
        typer.Option(help="Subtract good parts' mean map per position (default: on)."),
    ] = None,
    position_scale: Annotated[
        bool | None,
        typer.Option(help="Divide LGST's map by good parts' spread per position (default: on)."),
    ] = None,
    restart: Annotated[bool, typer.Option(help="Discard finished stages and start over.")] = False,
) -> None:
    """Pseudo-labels → segmentation → LGST → memory banks → calibration → bundle (resumable)."""
    from lineguard.engines.allocator import keep_freed_memory
    from lineguard.offline.train import train_bundle

    keep_freed_memory()  # this process is the job: keep its freed tensors for the next step

    bundle = train_bundle(
        data_dir,
        out,
        backbone=backbone,
        profile=profile,
        device=device,
        preset=preset,
        target_frr=target_frr,
        normalisation=normalisation,
        fusion=fusion,
        labels_dir=labels,
        patch_bank=patch_bank,
        hist_bank=hist_bank,
        comp_bank=comp_bank,
        fewshot_shots=fewshot,
        patch_search=patch_search,
        position_prior=position_prior,
        position_scale=position_scale,
        restart=restart,
        log=lambda msg: err_console.print(msg, highlight=False),
    )
    console.print(f"bundle {bundle.path} ready: model {bundle.version}")


@app.command()
@friendly_errors
def evaluate(
    bundle_dir: Annotated[Path, typer.Argument(help="Bundle to evaluate.")],
    data_dir: Annotated[Path, typer.Argument(help="Dataset with a labelled test split.")],
    runtime: Annotated[str, typer.Option(help="onnxruntime or torch.")] = "onnxruntime",
    out_dir: Annotated[Path | None, typer.Option("--out", help="Report folder.")] = None,
    json_path: Annotated[
        Path | None, typer.Option("--json", help="Also write metrics here.")
    ] = None,
) -> None:
    """Image AUROC (overall, per anomaly type, per branch), F1-max, operating point, report."""
    from lineguard.offline.evaluate import evaluate_bundle

    result = evaluate_bundle(bundle_dir, data_dir, runtime=runtime, out_dir=out_dir)
    m = result.metrics
    branches = list(m["overall"]["branches"])
    table = Table(title=f"lineguard evaluate: {m['bundle']}")
    for col in ("set", "n", "AUROC", "escape rate", *(f"AUROC {b}" for b in branches)):
        table.add_column(col, justify="left" if col == "set" else "right", no_wrap=True)

    def fmt(v: float | None) -> str:
        return "–" if v is None else f"{v:.3f}"

    rows = [("all defects", m["overall"]), *m["by_type"].items()]
    rows += [(f"  {k}", v) for k, v in m["by_defect"].items()]
    for name, block in rows:
        table.add_row(
            name,
            str(block["n"]),
            fmt(block["auroc"]),
            fmt(block["escape_rate"]),
            *(fmt(block["branches"][b]) for b in branches),
        )
    console.print(table)
    console.print(
        f"F1-max {fmt(m['overall']['f1_max'])}; at the calibrated threshold "
        f"{m['threshold']:.3f}: false-reject rate {fmt(m['false_reject_rate'])} on "
        f"{m['n_good']} good parts"
    )
    console.print(f"report: {result.report_dir}/report.html")
    _write_json(json_path, m)


@app.command()
@friendly_errors
def refit(
    bundle_dir: Annotated[Path, typer.Argument(help="Trained bundle to start from.")],
    data_dir: Annotated[Path, typer.Argument(help="The dataset it was trained on.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="New bundle directory.")],
    patch_bank: Annotated[int | None, typer.Option(help="Patch bank size (0: none).")] = None,
    hist_bank: Annotated[bool | None, typer.Option(help="PSAD class-histogram bank.")] = None,
    comp_bank: Annotated[bool | None, typer.Option(help="PSAD composition bank.")] = None,
    fewshot: Annotated[int | None, typer.Option(help="Few-shot branch from K images.")] = None,
    patch_search: Annotated[
        str | None, typer.Option(help="graph, or faiss-flat|ivf|hnsw after the engine.")
    ] = None,
    position_prior: Annotated[
        bool | None, typer.Option(help="Subtract good parts' mean map per position.")
    ] = None,
    position_scale: Annotated[
        bool | None, typer.Option(help="Also divide LGST's map by good parts' spread per position.")
    ] = None,
    normalisation: Annotated[
        str | None, typer.Option(help="trimmed_z (CSAD) or loo_max (PSAD).")
    ] = None,
    fusion: Annotated[str | None, typer.Option(help="max or sum.")] = None,
    target_frr: Annotated[float | None, typer.Option(help="Threshold's false-reject rate.")] = None,
) -> None:
    """Refill the memory banks and recalibrate a trained bundle, without retraining (minutes)."""
    from lineguard.engines.allocator import keep_freed_memory
    from lineguard.offline.refit import refit_bundle

    keep_freed_memory()  # this process is the job: keep its freed tensors for the next step

    bundle = refit_bundle(
        bundle_dir,
        data_dir,
        out,
        patch_bank=patch_bank,
        hist_bank=hist_bank,
        comp_bank=comp_bank,
        fewshot_shots=fewshot,
        patch_search=patch_search,
        position_prior=position_prior,
        position_scale=position_scale,
        normalisation=normalisation,
        fusion=fusion,
        target_frr=target_frr,
        progress=True,
        log=lambda msg: err_console.print(msg, highlight=False),
    )
    console.print(
        f"bundle {bundle.path} ready: model {bundle.version}, branches {', '.join(bundle.branches)}"
    )


@app.command("fewshot-curve")
@friendly_errors
def fewshot_curve_command(
    data_dir: Annotated[Path, typer.Argument(help="Dataset with train goods and a test split.")],
    shots: Annotated[str, typer.Option(help="Comma-separated k values.")] = "1,2,4,8",
    backbone: Annotated[str, typer.Option(help="Backbone for the patch features.")] = (
        "efficientnet_lite0"
    ),
    json_path: Annotated[Path | None, typer.Option("--json", help="Also write it here.")] = None,
) -> None:
    """AUROC of the training-free few-shot branch from k good images (no training at all)."""
    from lineguard.engines.errors import ConfigError
    from lineguard.offline.fewshot import fewshot_curve

    try:
        ks = [int(v) for v in shots.split(",") if v.strip()]
    except ValueError as exc:
        raise ConfigError(f"--shots takes integers like 1,2,4,8, got {shots!r}") from exc
    result = fewshot_curve(
        data_dir, ks, backbone=backbone, log=lambda msg: err_console.print(msg, highlight=False)
    )
    types = sorted({t for row in result["curve"] for t in row["by_type"]})
    table = Table(title=f"few-shot branch on {data_dir}")
    for col in ("k", "AUROC", *(f"AUROC {t}" for t in types), "F1-max", "masking"):
        table.add_column(col, justify="right")
    for row in result["curve"]:
        table.add_row(
            str(row["shots"]),
            f"{row['auroc']:.3f}",
            *(f"{row['by_type'][t]:.3f}" for t in types),
            f"{row['f1_max']:.3f}",
            "on" if row["masking"] else "off",
        )
    console.print(table)
    _write_json(json_path, result)


bundle_app = typer.Typer(help="Inspect and verify model bundles.", no_args_is_help=True)
app.add_typer(bundle_app, name="bundle")


@bundle_app.command("info")
@friendly_errors
def bundle_info(
    bundle_dir: Annotated[Path, typer.Argument(help="Bundle directory.")],
) -> None:
    """Verify a bundle (schema, files, hashes) and show what it contains."""
    from lineguard.engines.bundle import load_bundle

    bundle = load_bundle(bundle_dir)
    cal = bundle.calibration
    table = Table(title=f"bundle {bundle.path}", show_header=False)
    table.add_row("model version", bundle.version)
    table.add_row("backbone / profile", f"{bundle.config.backbone} / {bundle.config.profile}")
    table.add_row("input size", str(bundle.config.input_size))
    table.add_row("classes", ", ".join(bundle.config.class_names))
    table.add_row("branches", ", ".join(bundle.branches))
    for name, mu, sigma in zip(cal.branches, cal.mu, cal.sigma, strict=True):
        table.add_row(f"  {name}", f"μ={mu:.4g} σ={sigma:.4g}")
    table.add_row(
        "fusion",
        f"{cal.method}, {cal.combine}, threshold {cal.threshold:.4g} (target FRR {cal.target_frr})",
    )
    table.add_row("files", ", ".join(bundle.manifest["files"]))
    table.add_row("created", str(bundle.manifest.get("created")))
    console.print(table)
    console.print("[green]verified[/green]: schema, files and sha256 hashes match the manifest")


if __name__ == "__main__":
    app()
