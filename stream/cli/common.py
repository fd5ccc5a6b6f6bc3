"""What every ``lineguard`` command shares: the consoles, the error handling, settings loading,
the client for commands that join a running pipeline, and writing results as JSON.

Kept free of torch and of the workers' modules, so ``--help`` and the small commands start
fast; anything heavy is imported inside the function that needs it.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from lineguard.engines.errors import LineguardError

# Tables are wider than 80 columns; keep them readable when piped to a file or CI log.
console = Console(width=None if Console().is_terminal else 160)
err_console = Console(stderr=True)
# Global flags of the top-level callback, read by the commands below it.
state: dict[str, Any] = {"verbose": False, "log_level": None, "log_format": None}

F = TypeVar("F", bound=Callable[..., Any])


def friendly_errors(func: F) -> F:
    """Turn a ``LineguardError`` into one red line and exit status 1."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except LineguardError as exc:
            if state["verbose"]:
                raise
            # soft_wrap: the message stays one line however narrow the terminal is
            err_console.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(code=1) from None

    return wrapper  # type: ignore[return-value]


def split_list(value: str, cast: Callable[[str], Any] = str) -> list[Any]:
    """``"1,8,32"`` → ``[1, 8, 32]``; a bad item is a usage error naming the value."""
    try:
        return [cast(v.strip()) for v in value.split(",") if v.strip()]
    except ValueError as exc:
        raise typer.BadParameter(f"cannot parse {value!r}: {exc}") from None


def frame_size(value: str | None) -> tuple[int, int] | None:
    """``--size PX|HxW`` as (height, width); ``None`` leaves the size to the bundle."""
    from lineguard.engines.input_size import parse_input_size

    return None if value is None else parse_input_size(value, multiple=1)


def buckets_for(max_batch: int | None) -> str | None:
    """Batch buckets that fit ``--max-batch`` (powers of two, then the maximum itself)."""
    if max_batch is None or max_batch < 1:
        return None
    sizes, b = [], 1
    while b < max_batch:
        sizes.append(b)
        b *= 2
    sizes.append(max_batch)
    return ",".join(map(str, sizes))


def load_settings(overrides: dict[str, Any], *, quiet: bool = False) -> Any:
    """Validated settings with the flags applied, and logging configured from them.

    ``quiet`` commands (demo, benchmarks) log warnings and worse unless --log-level says
    otherwise, so their own output stays readable."""
    from lineguard.stream.logs import configure_logging
    from lineguard.stream.settings import Settings

    if overrides.get("infer.max_batch") is not None and "infer.batch_buckets" not in overrides:
        overrides["infer.batch_buckets"] = buckets_for(overrides["infer.max_batch"])
    # through the settings, so worker processes started by this one log the same way
    overrides.setdefault("log.level", state["log_level"] or ("warning" if quiet else None))
    overrides.setdefault("log.format", state["log_format"])
    settings = Settings.load(overrides)
    configure_logging(settings.log)
    return settings


def external_client(
    settings: Any, what: str, *, wait_s: float | None = None, quiet: bool = False
) -> Any:
    """A connected client for commands that join an existing pipeline (no embedded server),
    after waiting up to ``wait_s`` (default ``LINEGUARD_REDIS__WAIT_TIMEOUT``) for it."""
    from lineguard.engines.errors import ConfigError
    from lineguard.stream.bus import connect, wait_for_server

    if not settings.redis.url:
        raise ConfigError(
            f"'lineguard {what}' joins a running pipeline: set LINEGUARD_REDIS__URL to its "
            "Redis (e.g. redis://127.0.0.1:6379/0); 'lineguard run' starts everything on "
            "one box with an embedded Valkey"
        )
    client = connect(settings, client_name=f"lineguard-{what}")
    timeout = settings.redis.wait_timeout if wait_s is None else wait_s
    try:
        wait_for_server(client, timeout, quiet=quiet)
    except BaseException:
        client.close()
        raise
    return client


def write_json(path: Path | None, data: Any) -> None:
    """``--json PATH``: the command's result as a file (never on stdout, which has the table)."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=str))
    err_console.print(f"wrote {path}", highlight=False)


def summary_table(title: str, data: dict[str, Any]) -> Table:
    """The frames → verdicts table that ``run`` and ``replay`` end with."""
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


def report_summary(title: str, summary: Any, json_path: Path | None) -> None:
    """The frames → verdicts table of ``run``/``replay``, and ``--json PATH`` if given."""
    data = summary.to_json()
    console.print(summary_table(title, data))
    write_json(json_path, data)


def print_event(ev: Any) -> None:
    from lineguard.stream.tools.events import event_line

    console.print(event_line(ev), highlight=False, soft_wrap=True)


def event_printer(show: str) -> Callable[[Any], None]:
    """``--show none|rejects|all`` as a callback for each event."""

    def on_event(ev: Any) -> None:
        if show == "all" or (show == "rejects" and ev.verdict != "pass"):
            print_event(ev)

    return on_event


def start_dashboard(settings: Any, url: str, port: int, **kwargs: Any) -> Any:
    """Serve the dashboard beside a pipeline on loopback and print where to open it."""
    from lineguard.stream.dashboard import DashboardServer

    server = DashboardServer(settings, url=url, port=port, **kwargs).start()
    err_console.print(f"dashboard: [bold]{server.url}[/bold]", highlight=False)
    return server


def wait_for_ctrl_c() -> None:
    """Block until SIGINT/SIGTERM (for commands that keep a page up)."""
    from lineguard.stream.worker import StopFlag, signals_stop

    stop = StopFlag()
    with signals_stop(stop):
        while not stop.wait(0.5):
            pass
