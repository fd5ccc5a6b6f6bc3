"""The ``lineguard`` commands through Typer's CliRunner, against a real server."""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from lineguard.stream.bus import Bus
from lineguard.stream.cli import app
from lineguard.stream.protocol import Event
from lineguard.stream.worker import Heartbeat
from tests.stream.pipeline_helpers import all_events, split_bundle, write_folder


def _command_paths(command: Any, path: tuple[str, ...] = ()) -> list[list[str]]:
    """Every command and group of the CLI, as the words that reach it."""
    found = [list(path)]
    if hasattr(command, "commands"):
        for name, sub in command.commands.items():
            found += _command_paths(sub, (*path, name))
    return found


COMMANDS = _command_paths(typer.main.get_command(app))


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """No LINEGUARD_* from the developer's shell and no stray .env in the working dir."""
    for name in list(os.environ):
        if name.upper().startswith("LINEGUARD_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    yield


def env_for(bus: Bus, url: str, **extra: str) -> dict[str, str]:
    return {
        "LINEGUARD_REDIS__URL": url,
        "LINEGUARD_REDIS__KEY_PREFIX": bus.prefix,
        "LINEGUARD_LOG__LEVEL": "warning",
        **extra,
    }


def test_the_tree_has_every_command() -> None:
    """The sub-apps joined into one tree: top-level verbs and both groups, nothing nested."""
    names = {" ".join(c) for c in COMMANDS}
    expected = {"run", "ingest", "infer", "decide", "replay", "events", "health", "dashboard"}
    expected |= {"dead"}
    expected |= {"demo", "synth", "train", "evaluate", "refit", "fewshot-curve"}
    expected |= {"bench model", "bench knn", "bench e2e", "bench soak", "bench chaos"}
    expected |= {"bundle info"}
    expected |= {"sink mqtt", "sink opcua", "sink webhook", "bench sinks"}
    assert expected <= names, expected - names
    assert all(len(c) <= 2 for c in COMMANDS)


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "lineguard")
def test_every_help_fits_an_80_column_terminal(command: list[str]) -> None:
    """Tried as a user in an 80-column terminal: help exits 0, no line is cut or overflows,
    no ``<bool>`` type column, and every environment variable a help names is whole."""
    result = CliRunner().invoke(app, [*command, "--help"], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output
    lines = result.output.splitlines()
    assert max(len(line) for line in lines) <= 80, result.output
    assert "<bool>" not in result.output and "…[" not in result.output
    text = " ".join(line.strip() for line in lines)
    for var in re.findall(r"LINEGUARD_\w+", text):
        section = var.split("__")[0].removeprefix("LINEGUARD_").lower()
        depth = 2 if section == "sinks" else 1  # LINEGUARD_SINKS__<KIND>__<FIELD>
        assert var.rstrip("_").count("__") == depth, (var, result.output)  # not cut at a wrap
        assert section in {"line", "infer", "ingest", "metrics", "log", "redis", "dashboard",
                           "sinks", "history"}  # fmt: skip


@pytest.mark.parametrize(
    ("command", "flag"),
    [(["run"], "--limit"), (["replay"], "--source"), (["events"], "--format"),
     (["health"], "--format"), (["ingest"], "--limit")],
)  # fmt: skip
def test_options_are_consistent_across_commands(command: list[str], flag: str) -> None:
    """One spelling per option: --source everywhere, --json always a PATH, --format for
    stdout, --limit and --show (default rejects) on run and replay alike."""
    root = typer.main.get_command(app)
    cmd = root.commands[command[0]]
    opts = {o: p for p in cmd.params if p.param_type_name == "option" for o in p.opts}
    assert flag in opts
    for name in ("run", "replay"):
        show = next(p for p in root.commands[name].params if p.name == "show")
        assert show.default == "rejects"
    for name, sub in root.commands.items():
        for p in sub.params:
            if "--json" in p.opts:
                assert p.param_type_name == "option" and not p.is_flag, name
            assert p.param_type_name == "option" or p.name != "source", name


@pytest.mark.parametrize(
    ("env", "args", "needle"),
    [
        ({"LINEGUARD_INFER__MAX_BATCH": "0"}, ["infer", "-b", "b"], "INFER__MAX_BATCH"),
        ({"LINEGUARD_REDIS__URL": "http://x"}, ["health"], "LINEGUARD_REDIS__URL"),
        ({}, ["infer", "--bundle", "b", "--max-delay-ms", "-3"], "LINEGUARD_INFER__MAX_DELAY_MS"),
        ({}, ["events"], "LINEGUARD_REDIS__URL"),
        ({}, ["replay", "--source", "somewhere"], "LINEGUARD_REDIS__URL"),
        ({}, ["run", "--bundle", "nope", "--source", "x"], "nope"),
        ({}, ["bench", "e2e", "--rate", "fast"], "rate"),
        ({}, ["refit", "nope", "data", "--out", "x"], "nope"),
        ({}, ["fewshot-curve", "data", "--shots", "1,two"], "--shots"),
    ],
)  # fmt: skip
def test_bad_settings_give_one_readable_line(
    env: dict[str, str], args: list[str], needle: str
) -> None:
    result = CliRunner(env=env).invoke(app, args)
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert needle in lines[0]
    assert "Traceback" not in result.output


def test_health_reflects_worker_heartbeats(bus: Bus, redis_url: str) -> None:
    runner = CliRunner(env=env_for(bus, redis_url))
    result = runner.invoke(app, ["health"])
    assert result.exit_code == 1
    assert "no live worker for infer, decide" in result.output

    class Fake:
        def __init__(self, name: str) -> None:
            self.name, self.consumer = name, f"{name}-0"

        def status(self) -> dict[str, object]:
            return {"model": "m-1"}

    beats = [Heartbeat(bus, Fake(s), interval_s=1, ttl_s=5) for s in ("infer", "decide")]  # type: ignore[arg-type]
    for b in beats:
        b.beat(force=True)
    result = runner.invoke(app, ["health", "--format", "json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["ok"] and {w["stage"] for w in data["workers"]} == {"infer", "decide"}
    beats[1].clear()  # decide went away
    assert runner.invoke(app, ["health", "--stage", "infer"]).exit_code == 0
    assert runner.invoke(app, ["health"]).exit_code == 1


def test_health_is_unhealthy_while_decide_holds_state_of_a_lost_epoch(
    bus: Bus, redis_url: str
) -> None:
    """Redis lost the line's data: until decide notices (its next step) its heartbeat still
    names the old epoch, and health says so."""
    runner = CliRunner(env=env_for(bus, redis_url))
    old = bus.ensure_epoch()

    class Decide:
        name, consumer = "decide", "decide-0"
        epoch = old

        def status(self) -> dict[str, object]:
            return {"model": "m-1", "epoch": self.epoch}

    stage = Decide()
    beat = Heartbeat(bus, stage, interval_s=1, ttl_s=5)  # type: ignore[arg-type]
    beat.beat(force=True)
    assert runner.invoke(app, ["health", "--stage", "decide"]).exit_code == 0
    bus.client.delete(bus.epoch_key)  # the data is gone (the heartbeat is rewritten)
    beat.beat(force=True)
    result = runner.invoke(app, ["health", "--stage", "decide", "--format", "json"])
    assert result.exit_code == 1
    assert json.loads(result.output.splitlines()[0])["stale"] == ["decide-0"]
    stage.epoch = bus.ensure_epoch()  # decide reset its state under the new epoch
    beat.beat(force=True)
    assert runner.invoke(app, ["health", "--stage", "decide"]).exit_code == 0


def test_dead_lists_refused_messages_with_reasons_and_the_frame_they_name(
    bus: Bus, redis_url: str
) -> None:
    """Real refusals: an infer stage dead-letters a garbage message and a frame whose PNG
    disagrees with its declared shape; `lineguard dead` shows both, oldest first."""
    import cv2
    import msgpack

    from lineguard.stream.infer import InferStage
    from lineguard.stream.protocol import ENTRY_FIELD, Frame, encode
    from tests.stream.pipeline_helpers import GOOD, settings_for, split_bundle

    bus.client.xadd(bus.key("frames"), {ENTRY_FIELD: b"\xc1"})
    ok, png = cv2.imencode(".png", GOOD)
    assert ok
    frame = Frame(bus.line, "cam0", 7, time.time(), "png", (64, 64, 3), png.tobytes())
    wire = msgpack.unpackb(encode(frame), raw=False)
    wire["shape"] = [64, 32, 3]
    bus.client.xadd(bus.key("frames"), {ENTRY_FIELD: msgpack.packb(wire, use_bin_type=True)})
    stage = InferStage(
        bus, settings_for(bus, redis_url), split_bundle().path, runtime="onnxruntime"
    )
    stage.setup()
    stage.step()
    runner = CliRunner(env=env_for(bus, redis_url, LINEGUARD_LINE__ID=bus.line))
    result = runner.invoke(app, ["dead", "--format", "json"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(x) for x in result.output.splitlines()]
    assert [(r["reason"], r["frame"]) for r in rows] == [
        ("not_msgpack", None),
        ("bad_shape", f"{bus.line}/cam0/000000007"),
    ]
    assert all(r["group"] == "infer" and r["detail"] for r in rows)
    plain = runner.invoke(app, ["dead", "--last", "1"])
    assert (
        plain.exit_code == 0 and "bad_shape" in plain.output and "not_msgpack" not in plain.output
    )


def test_events_prints_the_last_ones_as_json(bus: Bus, redis_url: str) -> None:
    for seq, verdict in enumerate(("pass", "fail", "uninspected")):
        score = None if verdict == "uninspected" else 1.0
        ev = Event(
            "line1", "cam0", seq, verdict, score, None if score is None else 0.5, {}, "m-1",  # type: ignore[arg-type]
            {"total": 0.01}, "" if verdict == "pass" else "why", time.time(), time.time(),
        )  # fmt: skip
        bus.add("events", ev)
    result = CliRunner(env=env_for(bus, redis_url)).invoke(
        app, ["events", "--format", "json", "--last", "2"]
    )
    assert result.exit_code == 0, result.output
    rows = [json.loads(x) for x in result.output.splitlines()]
    assert [(r["seq"], r["verdict"]) for r in rows] == [(1, "fail"), (2, "uninspected")]
    plain = CliRunner(env=env_for(bus, redis_url)).invoke(app, ["events"])
    assert "line1/cam0/000000001" in plain.output and "fail" in plain.output


def test_run_command_end_to_end(bus: Bus, redis_url: str, tmp_path: Path) -> None:
    split = split_bundle()
    labels = write_folder(tmp_path / "frames", lambda i: i % 4 == 0, 12)
    out = tmp_path / "run.json"
    result = CliRunner(env=env_for(bus, redis_url)).invoke(
        app,
        ["run", "--bundle", str(split.path), "--source", str(tmp_path / "frames"),
         "--encoding", "png", "--record", str(tmp_path / "rec"), "--json", str(out)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["sent"] == 12 and data["missing"] == 0 and data["duplicates"] == 0
    assert data["verdicts"]["fail"] == sum(labels) and data["verdicts"]["pass"] == 12 - sum(labels)
    assert "line1/cam0/000000000" in result.output  # rejects are printed as they arrive
    assert len(all_events(bus)) == 12
    assert len((tmp_path / "rec" / "index.jsonl").read_text().splitlines()) == 12


def test_health_with_redis_down_fails_fast_with_one_line(tmp_path: Path) -> None:
    """A probe must answer quickly: no 30-second wait, no retry warning per attempt."""
    import socket

    with socket.socket() as s:  # a loopback port with nothing listening on it
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"LINEGUARD_REDIS__URL": f"redis://127.0.0.1:{port}/0", "LINEGUARD_LOG__FORMAT": "json"}
    t0 = time.monotonic()
    result = CliRunner(env=env).invoke(app, ["health", "--timeout", "1"])
    elapsed = time.monotonic() - t0
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: could not reach Redis"), lines
    assert elapsed < 10, elapsed


def test_health_refuses_a_stage_that_does_not_exist() -> None:
    result = CliRunner().invoke(app, ["health", "--stage", "infer,bogus"])
    assert result.exit_code == 2
    assert "bogus" in result.output and "ingest, infer, decide" in result.output
