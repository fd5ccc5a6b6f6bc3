"""Check a ``lineguard …`` command line against the real CLI: every subcommand on the way
exists, every ``--help`` on the way exits 0, every option used is one the command declares
(read from the click command tree the help is printed from, not from the help's layout), and
values with a fixed set of choices (runtime, precision, device, rate) are ones the workers
accept."""

from __future__ import annotations

import functools
import importlib.util
import re
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import typer
from typer.testing import CliRunner

from lineguard.engines.runtimes.base import PRECISIONS
from lineguard.stream.cli import app
from lineguard.stream.cli.tools import STAGES  # what health and the probe accept
from lineguard.stream.infer import RUNTIME_CHOICES
from tests.deploy.deploy_files import DEPLOY

DEVICE = re.compile(r"^(cpu|cuda(:\d+)?)$")


# the worker subcommand of a stage whose name is not its command's (``lineguard history``
# queries the history; ``history-worker`` writes it)
_STAGE_COMMANDS = {"history": ("history-worker",)}


def stage_command(stage: str) -> tuple[str, ...]:
    """The subcommand that runs ``stage``'s worker: ``sink-mqtt`` is ``lineguard sink mqtt``."""
    return _STAGE_COMMANDS.get(stage) or tuple(stage.split("-"))


def stage_of(argv: list[str] | tuple[str, ...]) -> str | None:
    """The stage (heartbeat name, ``lineguard health --stage``) a worker command line runs,
    or None for anything else."""
    for stage in STAGES:
        path = stage_command(stage)
        if tuple(argv[: len(path)]) == path:
            return stage
    return None


@dataclass
class HelpInfo:
    exit_code: int
    text: str
    options: dict[str, bool] = field(default_factory=dict)  # name or alias -> takes a value
    commands: set[str] = field(default_factory=set)
    required_arguments: int = 0
    settings_options: set[str] = field(default_factory=set)  # flags that override a setting


@functools.cache
def help_info(path: tuple[str, ...]) -> HelpInfo:
    """What ``lineguard PATH --help`` offers: its options (and whether each takes a value),
    subcommands and required arguments, read from the click command the help is printed
    from; the help itself is run too, so a command whose help breaks is caught."""
    result = CliRunner().invoke(app, [*path, "--help"], env={"COLUMNS": "200"})
    info = HelpInfo(result.exit_code, result.output)
    command: Any = typer.main.get_command(app)
    for name in path:
        group = command if hasattr(command, "commands") else None
        command = None if group is None else group.commands.get(name)
    if command is None:
        info.exit_code = info.exit_code or 2
        return info
    info.options["--help"] = False
    for param in command.params:
        if param.param_type_name == "option":
            for name in (*param.opts, *param.secondary_opts):
                info.options[name] = not (param.is_flag or param.count)
            if "[env var: LINEGUARD_" in (param.help or "") or param.envvar:
                info.settings_options.update(param.opts)
        elif param.param_type_name == "argument" and param.required:
            info.required_arguments += 1
    if hasattr(command, "commands"):
        info.commands = set(command.commands)
    return info


@dataclass
class Parsed:
    path: list[str] = field(default_factory=list)  # subcommand names, e.g. ["bench", "model"]
    options: dict[str, str | None] = field(default_factory=dict)  # --name -> value (None: flag)
    problems: list[str] = field(default_factory=list)


def parse_lineguard(args: tuple[str, ...]) -> Parsed:
    """Walk ``args`` the way the CLI would, one command level at a time."""
    out = Parsed()
    info = help_info(())
    arguments = 0
    i = 0
    while i < len(args):
        where = " ".join(["lineguard", *out.path])
        if info.exit_code != 0:
            out.problems.append(f"`{where} --help` exited {info.exit_code}")
            return out
        tok = args[i]
        if tok.startswith("-") and tok != "-":
            name, eq, inline = tok.partition("=")
            if name not in info.options:
                out.problems.append(f"`{where} --help` lists no option {name}")
                i += 1
            elif not info.options[name]:
                out.options[name] = None
                i += 1
            elif eq:
                out.options[name] = inline
                i += 1
            else:
                if i + 1 >= len(args):
                    out.problems.append(f"option {name} of `{where}` needs a value")
                out.options[name] = args[i + 1] if i + 1 < len(args) else None
                i += 2
            continue
        if info.commands:
            if tok not in info.commands:
                out.problems.append(f"`{where} --help` lists no command {tok!r}")
                return out
            out.path.append(tok)
            info = help_info(tuple(out.path))
            arguments = 0
        else:
            arguments += 1
        i += 1
    where = " ".join(["lineguard", *out.path])
    if info.exit_code != 0:
        out.problems.append(f"`{where} --help` exited {info.exit_code}")
    elif "--help" not in out.options:
        if info.commands:
            out.problems.append(f"`{where}` names no command")
        elif arguments < info.required_arguments:
            out.problems.append(f"`{where}` needs {info.required_arguments} argument(s)")
    return out


def value_problems(options: dict[str, str | None]) -> list[str]:
    """Values the workers would refuse at start-up, caught here instead."""
    problems = []
    checks: dict[str, tuple[str, ...] | re.Pattern[str]] = {
        "--runtime": RUNTIME_CHOICES,
        "--precision": PRECISIONS,
        "--device": DEVICE,
    }
    for name, allowed in checks.items():
        value = options.get(name)
        if value is None:
            continue
        ok = allowed.match(value) if isinstance(allowed, re.Pattern) else value in allowed
        if not ok:
            problems.append(f"{name} {value!r} is not one of the accepted values")
    rate = options.get("--rate")
    if rate is not None and rate != "max":
        try:
            float(rate)
        except ValueError:
            problems.append(f"--rate {rate!r} is neither 'max' nor a number")
    return problems


def check_lineguard(args: tuple[str, ...]) -> list[str]:
    parsed = parse_lineguard(args)
    return parsed.problems + value_problems(parsed.options)


def load_script(name: str) -> ModuleType:
    """Import deploy/bin/<name>.py (it is not a package)."""
    path = DEPLOY / "bin" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"deploy_bin_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def check_prepare(args: tuple[str, ...]) -> list[str]:
    module = load_script("lineguard_prepare")
    try:
        ns: Any = module.parse_args(list(args))
    except SystemExit as exc:
        return [f"lineguard-prepare {' '.join(args)}: argparse exit {exc.code}"]
    return value_problems(
        {"--runtime": ns.runtime, "--device": ns.device, "--precision": ns.precision}
    )


def check_probe(args: tuple[str, ...]) -> list[str]:
    if len(args) > 1 or (args and args[0] not in STAGES):
        return [f"lineguard-probe takes at most one stage of {STAGES}, got {list(args)}"]
    return []


def check_command(program: str, args: tuple[str, ...]) -> list[str]:
    if program == "lineguard":
        return check_lineguard(args)
    if program == "lineguard-prepare":
        return check_prepare(args)
    return check_probe(args)
