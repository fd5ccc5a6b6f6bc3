"""Operator tools around a running line: ``replay`` a recording into it, read ``events``,
probe ``health``, serve the ``dashboard``, and the self-contained ``demo``."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from lineguard.stream.cli.common import (
    console,
    err_console,
    event_printer,
    external_client,
    frame_size,
    friendly_errors,
    load_settings,
    print_event,
    report_summary,
    split_list,
    start_dashboard,
    wait_for_ctrl_c,
)
from lineguard.stream.cli.options import (
    DASHBOARD_PORT,
    CameraOpt,
    DashboardPortOpt,
    EncodingOpt,
    FormatOpt,
    JsonOpt,
    LimitOpt,
    LineOpt,
    RateOpt,
    ShowOpt,
    SizeBundleOpt,
    SizeOpt,
    SourceOpt,
    env_help,
)

app = typer.Typer()

# what writes heartbeats: the line's stages, the sinks (lineguard.stream.sinks) and the
# history worker (lineguard.stream.history)
STAGES = ("ingest", "infer", "decide", "sink-mqtt", "sink-opcua", "sink-webhook", "history")


@app.command()
@friendly_errors
def replay(
    source: SourceOpt,
    rate: RateOpt = "max",
    bundle: SizeBundleOpt = None,
    size: SizeOpt = None,
    limit: LimitOpt = None,
    loop: Annotated[bool, typer.Option(help="Loop the source (needs --limit).")] = False,
    timeout: Annotated[
        float, typer.Option(metavar="S", help="Seconds to wait for the events.")
    ] = 120.0,
    encoding: EncodingOpt = None,
    line: LineOpt = None,
    camera: CameraOpt = None,
    show: ShowOpt = "rejects",
    json_path: JsonOpt = None,
) -> None:
    """Send SOURCE into the running pipeline, then exit once every frame has its event."""
    from lineguard.stream.ingest import parse_rate
    from lineguard.stream.tools.replay import replay as do_replay

    settings = load_settings({"line.id": line, "line.camera": camera, "ingest.encoding": encoding})
    summary = do_replay(
        settings,
        source,
        rate=parse_rate(rate),
        size=frame_size(size),
        bundle=bundle,
        loop=loop,
        limit=limit,
        timeout_s=timeout,
        on_event=event_printer(show),
    )
    report_summary("lineguard replay", summary, json_path)
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
    last: Annotated[int, typer.Option(metavar="N", help="Print the last N events first.")] = 20,
    output: FormatOpt = "text",
    line: LineOpt = None,
    camera: Annotated[str | None, typer.Option(help="Only this camera.")] = None,
) -> None:
    """Print verdicts: the last N, then (with --follow) each new one as it arrives.

    --format json prints one JSON object per line (with the stream entry id).
    """
    from lineguard.stream.bus import Bus
    from lineguard.stream.tools.events import event_json, follow_events, last_events
    from lineguard.stream.worker import StopFlag, signals_stop

    settings = load_settings({"line.id": line})
    client = external_client(settings, "events")
    try:
        bus = Bus.from_settings(client, settings)

        def show(entry_id: str, ev: Any) -> None:
            if output == "json":
                typer.echo(event_json(ev, entry_id))
            else:
                print_event(ev)

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
def dead(
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep printing new dead letters.")
    ] = False,
    last: Annotated[
        int, typer.Option(metavar="N", help="Print the last N dead letters first.")
    ] = 20,
    output: FormatOpt = "text",
    line: LineOpt = None,
) -> None:
    """Print the messages the line refused, each with its reason and the frame it names.

    --format json prints one JSON object per line.
    """
    from lineguard.stream.bus import Bus
    from lineguard.stream.tools.dead import dead_json, dead_line, follow_dead, last_dead
    from lineguard.stream.worker import StopFlag, signals_stop

    settings = load_settings({"line.id": line})
    client = external_client(settings, "dead")
    try:
        bus = Bus.from_settings(client, settings)

        def show(dl: Any) -> None:
            if output == "json":
                typer.echo(dead_json(bus, dl))
            else:
                console.print(dead_line(bus, dl), highlight=False, soft_wrap=True)

        rows = last_dead(bus, last)
        for dl in rows:
            show(dl)
        if follow:
            stop = StopFlag()
            with signals_stop(stop):
                since = rows[-1].id if rows else "$"
                for dl in follow_dead(bus, since=since, stop=stop):
                    show(dl)
    finally:
        client.close()


@app.command()
@friendly_errors
def health(
    stage: Annotated[
        str,
        typer.Option(
            metavar="STAGE,…",
            help="Stages that must have a live worker: ingest, infer, decide, sink-mqtt, "
            "sink-opcua, sink-webhook, history.",
        ),
    ] = "infer,decide",
    timeout: Annotated[
        float, typer.Option(metavar="S", help="Give up on an unreachable Redis after S.")
    ] = 3.0,
    output: FormatOpt = "text",
    line: LineOpt = None,
) -> None:
    """Exit 0 if every named stage has a live worker heartbeat, else 1 (for probes).

    --format json prints one JSON object: ok, missing, workers, queues, sinks, dead.
    """
    from lineguard.stream.bus import Bus
    from lineguard.stream.sinks.stage import sink_queues
    from lineguard.stream.worker import health_report

    required = split_list(stage)
    unknown = sorted(set(required) - set(STAGES))
    if unknown:  # an empty --stage "" asks for nothing: reachability and the report
        raise typer.BadParameter(
            f"unknown stage(s) {', '.join(unknown)}; use {', '.join(STAGES)}",
            param_hint="--stage",
        )
    settings = load_settings({"line.id": line})
    client = external_client(settings, "health", wait_s=timeout, quiet=True)
    try:
        bus = Bus.from_settings(client, settings)
        workers = health_report(bus)
        epoch = bus.current_epoch()
        queues = {}
        pairs = [("frames", settings.infer.group), ("scores", settings.decide.group)]
        if bus.group_stats("events", settings.history.group) is not None:
            pairs.append(("events", settings.history.group))  # the history worker's backlog
        for stream, group in pairs:
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
        sinks = sink_queues(bus)
        dead = bus.length("dead")
    finally:
        client.close()
    # a worker holding state of another epoch has not yet noticed that Redis lost the
    # line's data (decide resets on its next step): not live until it has
    stale = [w for w in workers if w.get("epoch") not in (None, epoch)]
    live = {str(w.get("stage")) for w in workers if w not in stale}
    missing = [s for s in required if s not in live]
    if output == "json":
        report = {"ok": not missing, "missing": missing, "workers": workers, "epoch": epoch}
        stale_names = [w.get("consumer") for w in stale]
        typer.echo(
            json.dumps(
                {**report, "stale": stale_names, "queues": queues, "sinks": sinks, "dead": dead},
                default=str,
            )
        )
    else:
        console.print(_workers_table(settings.line.id, workers))
        for stream, q in queues.items():
            text = (
                "no group"
                if q is None
                else f"length {q['length']}, lag {q['lag']}, pending {q['pending']}"
            )
            console.print(f"{stream}: {text}", highlight=False)
        for group, q in sinks.items():
            console.print(
                f"events → {group}: lag {q['lag']}, pending {q['pending']}, "
                f"consumers {q['consumers']}",
                highlight=False,
            )
        console.print(f"dead letters: {dead}", highlight=False)
        for w in stale:
            console.print(
                f"[yellow]stale:[/yellow] {w.get('stage')} {w.get('consumer')} holds state of "
                "a line Redis no longer has (data lost?); it resets on its next step",
                highlight=False,
            )
    if missing:
        err_console.print(f"[red]unhealthy:[/red] no live worker for {', '.join(missing)}")
        raise typer.Exit(code=1)


def _workers_table(line_id: str, workers: list[dict[str, Any]]) -> Table:
    table = Table(title=f"lineguard health: line {line_id}")
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
    return table


@app.command()
@friendly_errors
def dashboard(
    port: Annotated[
        int,
        typer.Option(
            metavar="PORT",
            help="Port to serve on (0: any free port).",
            envvar="LINEGUARD_DASHBOARD__PORT",
        ),
    ] = DASHBOARD_PORT,
    host: Annotated[
        str,
        typer.Option(
            metavar="ADDR",
            help="Address to bind; anything but loopback needs --token.",
            envvar="LINEGUARD_DASHBOARD__HOST",
        ),
    ] = "127.0.0.1",
    token: Annotated[
        str | None,
        typer.Option(
            help="Require this token: open the page as /?token=T (or send "
            "Authorization: Bearer T).",
            envvar="LINEGUARD_DASHBOARD__TOKEN",
            show_default=False,
        ),
    ] = None,
    line: LineOpt = None,
    prefix: Annotated[
        str | None,
        typer.Option(
            help=env_help(
                "Key prefix; a glob such as 'lineguard-demo-*' follows the newest match.",
                "LINEGUARD_REDIS__KEY_PREFIX",
            )
        ),
    ] = None,
    window: Annotated[
        float, typer.Option(metavar="MIN", help="Minutes of history in the charts.")
    ] = 10.0,
    history: Annotated[
        bool | None,
        typer.Option(
            "--history/--no-history",
            help="Shift counts and reject marks from the verdict history (default: when one "
            "is configured).",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Serve a live web page of the line: verdicts, throughput, latency, queues, rejects.

    Reads the bus only (no consumer group), so the page never slows the line down. With a
    verdict history, the shift's counts come from it and operators can mark rejects.
    """
    from lineguard.stream.dashboard import DashboardConfig, DashboardServer, check_binding
    from lineguard.stream.worker import StopFlag, signals_stop

    check_binding(host, token)
    if window <= 0:
        raise typer.BadParameter("--window must be a positive number of minutes")
    settings = load_settings({"line.id": line})
    external_client(settings, "dashboard").close()  # fail now if Redis does not answer
    server = DashboardServer(
        settings,
        host=host,
        port=port,
        token=token,
        prefix=prefix,
        config=DashboardConfig(window_s=window * 60),
        history=history,
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


@app.command()
@friendly_errors
def demo(
    directory: Annotated[
        Path | None,
        typer.Option("--dir", metavar="DIR", help="Cache for the synthetic line, bundle, report."),
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

    settings = load_settings({}, quiet=True)
    with ExitStack() as stack:
        page = None
        if dashboard:
            from lineguard.stream.server import redis_url_for

            # The demo gives each run on a given server its own key prefix; start the server
            # here so the page can follow the newest 'lineguard-demo-*' prefix on it.
            url = stack.enter_context(redis_url_for(settings))
            redis_cfg = settings.redis.model_copy(update={"url": url})
            settings = settings.model_copy(update={"redis": redis_cfg})
            page = start_dashboard(
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
            err_console.print(f"the dashboard stays up at {page.url}; Ctrl-C to stop")
            wait_for_ctrl_c()
    if not result.ok:
        raise typer.Exit(code=1)
