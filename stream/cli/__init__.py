"""The ``lineguard`` command line: one Typer app joined from sub-apps, one command per verb.

- :mod:`.line` — ``run`` and the workers ``ingest``, ``infer``, ``decide``;
- :mod:`.tools` — ``replay``, ``events``, ``health``, ``dashboard``, ``demo``;
- :mod:`.history` — ``history-worker``, ``history``, ``feedback``;
- :mod:`.offline` — ``synth``, ``train``, ``evaluate``, ``refit``, ``fewshot-curve``;
- :mod:`.bench` — ``bench model|knn|e2e|soak|sinks``; :mod:`.bundle` — ``bundle info``;
- :mod:`.sinks` — ``sink mqtt|opcua|webhook``.

Commands only parse arguments and hand off to plain functions; options shared by several
commands are defined once in :mod:`.options`, and :mod:`.common` turns a ``LineguardError``
into one line and exit status 1 (``--verbose`` shows the traceback). Heavy modules (torch,
the workers, training code) are imported inside the commands, so ``--help`` and ``health``
stay fast. Help is click's plain layout (``rich_markup_mode=None``): it wraps to the
terminal, so an 80-column terminal shows every option, metavar and environment variable.
"""

from __future__ import annotations

from typing import Annotated, Literal

import typer

from lineguard.stream.cli import bench, bundle, history, line, offline, sinks, tools
from lineguard.stream.cli.common import state
from lineguard.stream.cli.options import env_help

app = typer.Typer(
    name="lineguard",
    help="Streaming inspection for production lines (CSAD over Redis Streams).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode=None,
)


@app.callback()
def main(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show tracebacks.")] = False,
    log_level: Annotated[
        Literal["debug", "info", "warning", "error"] | None,
        typer.Option(help=env_help("Log level.", "LINEGUARD_LOG__LEVEL")),
    ] = None,
    log_format: Annotated[
        Literal["auto", "json", "console"] | None,
        typer.Option(help=env_help("Log format.", "LINEGUARD_LOG__FORMAT")),
    ] = None,
) -> None:
    """lineguard: pass/fail for every part, with the reason."""
    state["verbose"] = verbose
    state["log_level"] = log_level
    state["log_format"] = log_format


# Sub-apps without a name add their commands at the top level (`lineguard run`, not
# `lineguard line run`); the ones with a name are command groups.
app.add_typer(line.app)
app.add_typer(tools.app)
app.add_typer(history.app)
app.add_typer(offline.app)
app.add_typer(bench.app, name="bench")
app.add_typer(bundle.app, name="bundle")
app.add_typer(sinks.app, name="sink")

__all__ = ["app"]
