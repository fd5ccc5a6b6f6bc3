"""Readers for the files under deploy/: YAML, the Dockerfile, systemd units, env files, and
the ``lineguard`` command lines inside them. Shared by the deploy tests."""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, SecretStr

from lineguard.stream.settings import ENV_NESTED_DELIMITER, ENV_PREFIX, Settings
from lineguard.stream.sinks import SINK_KINDS

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
SYSTEMD = DEPLOY / "systemd"
DOCKERFILE = DEPLOY / "Dockerfile"
COMPOSE = DEPLOY / "compose.yaml"
# What deploy/.env holds for compose: METRICS_TOKEN and the values passed through by name.
ENV_EXAMPLE = DEPLOY / "env.example"

# "LINEGUARD_" followed by a name; a bare "LINEGUARD_" or "LINEGUARD_*" in prose is not one.
ENV_TOKEN = re.compile(r"\bLINEGUARD_[A-Z0-9_]*[A-Z0-9]")
# ${VAR}, ${VAR:-default}, ${VAR:?message} as compose interpolates them
INTERPOLATION = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")


def yaml_module() -> Any:
    """PyYAML, or a skip that says how to get it (it is not a lineguard dependency yet)."""
    return pytest.importorskip(
        "yaml", reason="PyYAML is needed to read deploy/*.yaml: add pyyaml to the dev extra"
    )


def load_yaml_docs(path: Path) -> list[Any]:
    yaml = yaml_module()
    with path.open(encoding="utf-8") as fh:
        return [doc for doc in yaml.safe_load_all(fh) if doc is not None]


def yaml_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml"))


def deploy_text_files() -> list[Path]:
    """Every file under deploy/ (all are text)."""
    return sorted(p for p in DEPLOY.rglob("*") if p.is_file() and "__pycache__" not in p.parts)


# ------------------------------------------------------------------------------- settings


def settings_env_names(model: type[BaseModel] = Settings, prefix: str = ENV_PREFIX) -> set[str]:
    """Every environment variable the settings tree reads: a leaf field is
    ``LINEGUARD_<SECTION>__<FIELD>``; a nested model is also settable as a whole (JSON)."""
    names: set[str] = set()
    for field_name, info in model.model_fields.items():
        name = f"{prefix}{field_name.upper()}"
        names.add(name)
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            names |= settings_env_names(annotation, name + ENV_NESTED_DELIMITER)
    return names


def settings_secret_names(model: type[BaseModel] = Settings, prefix: str = ENV_PREFIX) -> set[str]:
    """The variables of settings typed ``SecretStr`` (passwords, tokens, the webhook key):
    the ones no deploy file may give a value."""
    names: set[str] = set()
    for field_name, info in model.model_fields.items():
        name = f"{prefix}{field_name.upper()}"
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            names |= settings_secret_names(annotation, name + ENV_NESTED_DELIMITER)
        elif SecretStr in getattr(annotation, "__args__", (annotation,)):
            names.add(name)
    return names


def stand_in_secret(name: str) -> str:
    """A value for secret ``name`` where the operator supplies it (long enough for every
    length rule: 8 characters for passwords and tokens, 16 for the webhook key)."""
    return f"stand-in-{name.lower()}"


def compose_environment(svc: dict[str, Any]) -> dict[str, str]:
    """What a compose service's container sees, set up as documented: interpolations
    resolved; a key without a value (compose passes it through from the shell or
    deploy/.env) takes its value from deploy/env.example (a stand-in for a secret left
    empty there), and one the example lacks stays unset, as compose leaves it."""
    example = parse_env_file(ENV_EXAMPLE)
    secrets = settings_secret_names()
    env: dict[str, str] = {}
    for key, value in (svc.get("environment") or {}).items():
        if value is not None:
            env[key] = resolve_interpolation(str(value))
        elif key in example:
            filled = not example[key] and key in secrets
            env[key] = stand_in_secret(key) if filled else example[key]
    return env


def resolve_interpolation(value: str) -> str:
    """Compose-style ``${VAR:-default}`` → the default (or empty): what an unset VAR gives;
    ``${VAR:?message}`` → a stand-in value, since compose refuses to start without VAR."""
    return INTERPOLATION.sub(
        lambda m: f"stand-in-{m.group(1).lower()}" if m.group(2) == ":?" else m.group(3) or "",
        value,
    )


# ------------------------------------------------------------------------------- Dockerfile


@dataclass(frozen=True)
class Stage:
    name: str
    base: str
    lines: tuple[str, ...]  # instructions, continuation lines joined


def dockerfile_instructions(path: Path = DOCKERFILE) -> list[str]:
    """Instructions with ``\\`` continuations joined and comments dropped."""
    out: list[str] = []
    buf = ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if buf and line.startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        out.append(buf + line)
        buf = ""
    if buf:
        out.append(buf)
    return out


def dockerfile_stages(path: Path = DOCKERFILE) -> dict[str, Stage]:
    stages: dict[str, Stage] = {}
    current: list[str] | None = None
    name = base = ""
    for ins in dockerfile_instructions(path):
        m = re.match(r"FROM\s+(?:--platform=\S+\s+)?(\S+)(?:\s+AS\s+(\S+))?$", ins, re.I)
        if m:
            if current is not None:
                stages[name] = Stage(name, base, tuple(current))
            base, name = m.group(1), (m.group(2) or f"stage{len(stages)}").lower()
            current = []
        elif current is not None:
            current.append(ins)
    if current is not None:
        stages[name] = Stage(name, base, tuple(current))
    return stages


def dockerfile_args(path: Path = DOCKERFILE) -> dict[str, str]:
    """Global and stage ``ARG NAME=default`` values."""
    out: dict[str, str] = {}
    for ins in dockerfile_instructions(path):
        m = re.match(r"ARG\s+([A-Za-z_][A-Za-z0-9_]*)(?:=(\S*))?", ins)
        if m and m.group(2) is not None:
            out[m.group(1)] = m.group(2)
    return out


# ---------------------------------------------------------------------------------- systemd


def parse_unit(path: Path) -> dict[str, list[tuple[str, str]]]:
    """A systemd unit as {section: [(key, value), ...]}; keys may repeat (ExecStartPre=...)."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    buf = ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not buf and (not line or line[0] in "#;"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        line, buf = buf + line, ""
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        assert current is not None, f"{path.name}: {line!r} comes before any [Section]"
        key, sep, value = line.partition("=")
        assert sep, f"{path.name}: {line!r} is not Key=Value"
        current.append((key.strip(), value.strip()))
    return sections


def unit_values(unit: dict[str, list[tuple[str, str]]], section: str, key: str) -> list[str]:
    return [v for k, v in unit.get(section, []) if k == key]


def parse_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines of an EnvironmentFile (comments and blank lines skipped)."""
    out: dict[str, str] = {}
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        assert sep, f"{path.name}: {line!r} is not KEY=VALUE"
        out[key.strip()] = value.strip().strip('"')
    return out


# --------------------------------------------------------------------------- command lines


@dataclass(frozen=True)
class Command:
    """One invocation of our programs found in a deploy file, variables resolved where the
    file defines them (compose defaults, systemd environment files, container env)."""

    where: str
    program: str  # lineguard, lineguard-prepare or lineguard-probe
    args: tuple[str, ...]


PROGRAMS = ("lineguard", "lineguard-prepare", "lineguard-probe")
_SHELL_STOP = ("|", "||", "&&", ";", ">", ">/dev/null", "2>&1", "2>/dev/null")


def commands_in_argv(argv: list[str], where: str) -> Iterator[Command]:
    """Invocations of our programs inside one argv, in command position (first word, or
    after a shell separator: a shell line may hold several commands)."""
    for i, token in enumerate(argv):
        program = token.rsplit("/", 1)[-1]
        if program not in PROGRAMS or (i > 0 and argv[i - 1] not in _SHELL_STOP):
            continue
        args: list[str] = []
        for arg in argv[i + 1 :]:
            if arg in _SHELL_STOP:
                break
            args.append(arg)
        yield Command(where, program, tuple(args))


def _argv(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, list):
        return [str(v) for v in value]
    return shlex.split(str(value))


def compose_commands(compose: dict[str, Any]) -> Iterator[Command]:
    """Commands of the services that run our image (entrypoint ``lineguard`` unless set)."""
    for name, svc in compose.get("services", {}).items():
        if not str(svc.get("image", "")).startswith("lineguard:"):
            continue
        entry = _argv(svc.get("entrypoint")) or ["lineguard"]
        argv = [resolve_interpolation(a) for a in [*entry, *_argv(svc.get("command"))]]
        yield from commands_in_argv(argv, f"compose {name}")
        test = (svc.get("healthcheck") or {}).get("test")
        if isinstance(test, list) and test and test[0] in ("CMD", "CMD-SHELL"):
            argv = test[1:] if test[0] == "CMD" else shlex.split(" ".join(test[1:]))
            yield from commands_in_argv([str(a) for a in argv], f"compose {name} healthcheck")


def k8s_containers(doc: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(initContainers|containers, container) of every container of a workload document."""
    spec = ((doc.get("spec") or {}).get("template") or {}).get("spec") or {}
    for key in ("initContainers", "containers"):
        for c in spec.get(key) or []:
            yield key, c


_K8S_VAR = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")
_SYSTEMD_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def expand(pattern: re.Pattern[str], text: str, env: dict[str, str], where: str) -> str:
    """Replace every variable reference in ``text``; one the file never defines fails."""

    def value(m: re.Match[str]) -> str:
        assert m.group(1) in env, f"{where}: {m.group(0)} is used but never defined"
        return env[m.group(1)]

    return pattern.sub(value, text)


def k8s_commands(docs: list[tuple[Path, dict[str, Any]]]) -> Iterator[Command]:
    for path, doc in docs:
        for _key, c in k8s_containers(doc):
            where = f"{path.name} {doc['metadata']['name']}/{c['name']}"
            env = {e["name"]: str(e.get("value", "")) for e in c.get("env") or [] if "value" in e}
            if "lineguard" in str(c.get("image", "")).rsplit("/", 1)[-1]:
                argv = [*(_argv(c.get("command")) or ["lineguard"]), *_argv(c.get("args"))]
                # Kubernetes expands $(VAR) in command and args from the container's env
                argv = [expand(_K8S_VAR, a, env, where) for a in argv]
                yield from commands_in_argv(argv, where)
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                exec_cmd = ((c.get(probe) or {}).get("exec") or {}).get("command")
                if exec_cmd:
                    yield from commands_in_argv(_argv(exec_cmd), f"{where} {probe}")


# Example instances, and the example files deploy/systemd ships for their EnvironmentFile=s.
SYSTEMD_INSTANCES: dict[str, tuple[str, ...]] = {
    "lineguard-ingest@.service": ("cam0",),
    "lineguard-infer@.service": ("0",),
    "lineguard-sink@.service": SINK_KINDS,
}


def systemd_instances(path: Path) -> tuple[str, ...]:
    """The instances to check a unit as: every example of a template, "" for a plain unit."""
    return SYSTEMD_INSTANCES.get(path.name, ("",))


def systemd_environment(path: Path, instance: str) -> dict[str, str]:
    """What a unit's processes see: Environment= first, then EnvironmentFile= files in order
    (files override Environment=, as in systemd), read from deploy/systemd's examples."""
    unit = parse_unit(path)
    env: dict[str, str] = {}
    for value in unit_values(unit, "Service", "Environment"):
        key, _, val = value.replace("%i", instance).partition("=")
        env[key] = val
    for value in unit_values(unit, "Service", "EnvironmentFile"):
        optional = value.startswith("-")
        name = Path(value.lstrip("-").replace("%i", instance)).name
        example = SYSTEMD / name
        if example.is_file():
            env.update(parse_env_file(example))
        else:
            assert optional, f"{path.name}: no example {name} for EnvironmentFile={value}"
    return env


def systemd_commands() -> Iterator[Command]:
    for path in sorted(SYSTEMD.glob("*.service")):
        for instance in systemd_instances(path):
            env = systemd_environment(path, instance)
            unit = parse_unit(path)
            for key in ("ExecStartPre", "ExecStart", "ExecStartPost", "ExecReload", "ExecStop"):
                for value in unit_values(unit, "Service", key):
                    line = value.lstrip("-@+!:").replace("%i", instance).replace("%H", "pc1")
                    where = f"{path.name.replace('@.', f'@{instance}.')} {key}"
                    argv = shlex.split(expand(_SYSTEMD_VAR, line, env, where))
                    yield from commands_in_argv(argv, where)


def dockerfile_commands() -> Iterator[Command]:
    """Programs run by RUN lines and HEALTHCHECK CMDs (ENTRYPOINT is checked on its own)."""
    for ins in dockerfile_instructions():
        word, _, rest = ins.partition(" ")
        word = word.upper()
        if word == "HEALTHCHECK":
            word, rest = "CMD", rest.split(" CMD ", 1)[1] if " CMD " in rest else ""
        elif word != "RUN":
            continue
        rest = rest.strip()
        argv = [str(a) for a in json.loads(rest)] if rest.startswith("[") else shlex.split(rest)
        yield from commands_in_argv(argv, f"Dockerfile {word} {rest[:40]}")
