"""The line's commands: ``run`` (everything on one box) and one command per worker
(``ingest``, ``infer``, ``decide``) for a line spread over processes or machines."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from lineguard.stream.cli.common import (
    err_console,
    event_printer,
    external_client,
    frame_size,
    friendly_errors,
    load_settings,
    report_summary,
    start_dashboard,
)
from lineguard.stream.cli.options import (
    DASHBOARD_PORT,
    BundleOpt,
    BurstOpt,
    CameraOpt,
    ConsumerOpt,
    DashboardOpt,
    DashboardPortOpt,
    DeviceOpt,
    EncodingOpt,
    JsonOpt,
    LimitOpt,
    LineOpt,
    LoopOpt,
    MapsOpt,
    MaxBatchOpt,
    MaxDelayOpt,
    MetricsPortOpt,
    PrecisionOpt,
    RateOpt,
    RecordOpt,
    RuntimeOpt,
    ShowOpt,
    SizeBundleOpt,
    SizeOpt,
    SourceOpt,
    WorkersOpt,
)

app = typer.Typer()


@app.command("run")
@friendly_errors
def run_cmd(
    bundle: BundleOpt,
    source: SourceOpt,
    rate: RateOpt = "max",
    loop: LoopOpt = False,
    limit: LimitOpt = None,
    size: SizeOpt = None,
    record: RecordOpt = None,
    workers: WorkersOpt = "threads",
    infer_workers: Annotated[int, typer.Option(metavar="N", help="How many infer workers.")] = 1,
    runtime: RuntimeOpt = "auto",
    device: DeviceOpt = "cpu",
    precision: PrecisionOpt = "fp32",
    max_batch: MaxBatchOpt = None,
    max_delay_ms: MaxDelayOpt = None,
    maps: MapsOpt = False,
    encoding: EncodingOpt = None,
    line: LineOpt = None,
    camera: CameraOpt = None,
    metrics_port: MetricsPortOpt = None,
    drain_timeout: Annotated[
        float,
        typer.Option(
            metavar="S", help="Seconds to wait for the last events after the source ends."
        ),
    ] = 60.0,
    show: ShowOpt = "rejects",
    json_path: JsonOpt = None,
    dashboard: DashboardOpt = False,
    dashboard_port: DashboardPortOpt = DASHBOARD_PORT,
) -> None:
    """Run ingest, infer and decide on this box and feed SOURCE through them.

    Uses an embedded Valkey when LINEGUARD_REDIS__URL is unset. Ends when the source does
    and every frame has its event, or on Ctrl-C/SIGTERM after draining what was sent.
    --dashboard also turns on --maps, so the page can show each reject's anomaly map.
    """
    from lineguard.stream.ingest import parse_rate
    from lineguard.stream.run import run_line
    from lineguard.stream.settings import redacted_url

    settings = load_settings(
        {
            "line.id": line,
            "line.camera": camera,
            "ingest.encoding": encoding,
            "infer.max_batch": max_batch,
            "infer.max_delay_ms": max_delay_ms,
            "metrics.port": metrics_port,
        }
    )
    pages: list[Any] = []

    def on_ready(url: str) -> None:
        err_console.print(f"[dim]workers ready on {redacted_url(url)}[/dim]")
        if dashboard:
            pages.append(start_dashboard(settings, url, dashboard_port))

    try:
        summary = run_line(
            settings,
            bundle,
            source,
            rate=parse_rate(rate),
            loop=loop,
            limit=limit,
            size=frame_size(size),
            record=record,
            mode=workers,
            runtime=runtime,
            device=device,
            precision=precision,
            maps=maps or dashboard,
            infer_workers=infer_workers,
            metrics_port=settings.metrics.port,
            drain_timeout_s=drain_timeout,
            on_event=event_printer(show),
            on_ready=on_ready,
        )
    finally:
        for page in pages:
            page.stop()
    report_summary("lineguard run", summary, json_path)
    if not summary.ok:
        raise typer.Exit(code=1)


@app.command()
@friendly_errors
def ingest(
    source: SourceOpt,
    bundle: SizeBundleOpt = None,
    size: SizeOpt = None,
    rate: RateOpt = "max",
    loop: LoopOpt = False,
    limit: LimitOpt = None,
    record: RecordOpt = None,
    encoding: EncodingOpt = None,
    line: LineOpt = None,
    camera: CameraOpt = None,
    metrics_port: MetricsPortOpt = None,
) -> None:
    """Capture frames from SOURCE and append them to the frames stream (one camera)."""
    from lineguard.stream.bus import Bus
    from lineguard.stream.ingest import (
        IngestStage,
        bundle_frame_codec,
        bundle_input_size,
        parse_rate,
    )
    from lineguard.stream.metrics import serve_metrics
    from lineguard.stream.sources import open_source
    from lineguard.stream.worker import StopFlag, run_worker

    settings = load_settings(
        {
            "line.id": line,
            "line.camera": camera,
            "ingest.encoding": encoding,
            "metrics.port": metrics_port,
        }
    )
    frame_hw = frame_size(size)
    if frame_hw is None and bundle is not None:
        frame_hw = bundle_input_size(bundle)
    codec = None if bundle is None else bundle_frame_codec(bundle)
    client = external_client(settings, "ingest")
    stop_metrics = serve_metrics(
        settings.metrics.port, settings.metrics.addr, settings.metrics.token_value
    )
    try:
        bus = Bus.from_settings(client, settings)
        stop = StopFlag()
        src = open_source(source, loop=loop)
        stage = IngestStage(
            bus,
            settings,
            src,
            size=frame_hw,
            fps=parse_rate(rate),
            record=record,
            limit=limit,
            stop=stop,
            codec=codec,
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
    consumer: ConsumerOpt = None,
    maps: MapsOpt = False,
    burst: BurstOpt = False,
    line: LineOpt = None,
    metrics_port: MetricsPortOpt = None,
) -> None:
    """Score frames in dynamic batches (consumer group 'infer'); hot-reloads the bundle."""
    from lineguard.stream.bus import Bus
    from lineguard.stream.infer import InferStage
    from lineguard.stream.metrics import serve_metrics
    from lineguard.stream.worker import run_worker

    settings = load_settings(
        {
            "line.id": line,
            "infer.max_batch": max_batch,
            "infer.max_delay_ms": max_delay_ms,
            "metrics.port": metrics_port,
        }
    )
    client = external_client(settings, "infer")
    stop_metrics = serve_metrics(
        settings.metrics.port, settings.metrics.addr, settings.metrics.token_value
    )
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
    consumer: ConsumerOpt = None,
    gap_grace_s: Annotated[
        float,
        typer.Option(
            metavar="S", help="Declare a missing frame uninspected after this long at the latest."
        ),
    ] = 60.0,
    burst: BurstOpt = False,
    line: LineOpt = None,
    metrics_port: MetricsPortOpt = None,
) -> None:
    """Turn scores into pass/fail/error/uninspected events (consumer group 'decide')."""
    from lineguard.stream.bus import Bus
    from lineguard.stream.decide import DecideStage
    from lineguard.stream.metrics import serve_metrics
    from lineguard.stream.worker import run_worker

    settings = load_settings({"line.id": line, "metrics.port": metrics_port})
    client = external_client(settings, "decide")
    stop_metrics = serve_metrics(
        settings.metrics.port, settings.metrics.addr, settings.metrics.token_value
    )
    try:
        bus = Bus.from_settings(client, settings)
        stage = DecideStage(bus, settings, bundle, consumer=consumer, gap_grace_s=gap_grace_s)
        run_worker(stage, bus, burst=burst)
    finally:
        stop_metrics()
        client.close()
