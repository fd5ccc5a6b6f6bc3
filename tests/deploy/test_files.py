"""The deploy files, read and cross-checked without Docker, Kubernetes or systemd.

Docker cannot build here and no cluster is reachable, so these tests hold the files to what
can be checked offline: they parse; every ``LINEGUARD_*`` variable is a real setting and every
set of them validates as a whole; every image target exists in the Dockerfile; every
``lineguard`` command line is accepted by the real CLI; the pieces agree with each other
(stream keys, consumer groups, ports, volumes, probes, GPU requests).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import redis

from lineguard.engines.errors import ConfigError
from lineguard.stream.binding import is_loopback
from lineguard.stream.bus import Bus
from lineguard.stream.settings import ENV_PREFIX, Settings
from lineguard.stream.sinks import SINK_KINDS, build_sink
from tests.deploy import deploy_files as df
from tests.deploy.cli_check import STAGES, check_command, help_info, stage_command, stage_of

# ------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    (doc,) = df.load_yaml_docs(df.COMPOSE)
    return doc


@pytest.fixture(scope="module")
def k8s_docs() -> list[tuple[Path, dict[str, Any]]]:
    return [
        (path, doc)
        for path in sorted(df.K8S.glob("*.yaml"))
        if path.name != "kustomization.yaml"
        for doc in df.load_yaml_docs(path)
    ]


def by_kind(docs: list[tuple[Path, dict[str, Any]]], kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for _p, d in docs if d["kind"] == kind}


def our_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        name: svc
        for name, svc in compose["services"].items()
        if str(svc.get("image", "")).startswith("lineguard:")
    }


def flag_values(argv: list[str], flags: tuple[str, ...]) -> dict[str, str]:
    return {a: argv[i + 1] for i, a in enumerate(argv[:-1]) if a in flags}


def secret_stand_ins(*names: str) -> dict[str, str]:
    return {name: df.stand_in_secret(name) for name in names}


# What the Secrets the manifests require hold (created by the operator, never shipped; each
# file says how). lineguard-redis and lineguard-sink-mqtt are optional and left out.
K8S_SECRETS = {
    "lineguard-metrics": secret_stand_ins("LINEGUARD_METRICS__TOKEN"),
    "lineguard-sink-opcua": {
        "LINEGUARD_SINKS__OPCUA__USERNAME": "plc",
        **secret_stand_ins("LINEGUARD_SINKS__OPCUA__PASSWORD"),
    },
    "lineguard-sink-webhook": secret_stand_ins("LINEGUARD_SINKS__WEBHOOK__SECRET"),
}


def validate_settings(
    env: dict[str, str], where: str, monkeypatch: pytest.MonkeyPatch, stage: str | None = None
) -> None:
    """``env`` (plus nothing else from this process) must make valid lineguard settings, and
    for a sink stage also a sink that accepts them (the webhook's needs a URL and a key)."""
    with monkeypatch.context() as m:
        for key in [k for k in os.environ if k.startswith(ENV_PREFIX)]:
            m.delenv(key)
        for key, value in env.items():
            m.setenv(key, value)
        try:
            settings = Settings.load(env_file=None)
            if stage is not None and stage.startswith("sink-"):
                build_sink(stage.removeprefix("sink-"), settings)
        except ConfigError as exc:
            pytest.fail(f"{where}: {exc}")


# ---------------------------------------------------------------------------- parse, names


def test_the_deploy_tree_has_what_issue_6_asks_for() -> None:
    for rel in (
        "Dockerfile",
        "compose.yaml",
        "prometheus.yml",
        "k8s/kustomization.yaml",
        "systemd/lineguard.target",
        "systemd/lineguard.env",
        "systemd/lineguard-sink@.service",
        "systemd/lineguard-history.service",
        "k8s/history.yaml",
        "env.example",
        "bin/lineguard_probe.py",
        "bin/lineguard_prepare.py",
    ):
        assert (df.DEPLOY / rel).is_file(), f"deploy/{rel} is missing"


@pytest.mark.parametrize("path", df.yaml_files(), ids=lambda p: str(p.relative_to(df.DEPLOY)))
def test_every_yaml_file_parses_into_mappings(path: Path) -> None:
    docs = df.load_yaml_docs(path)
    assert docs, f"{path.name} holds no document"
    assert all(isinstance(d, dict) for d in docs), f"{path.name}: a document is not a mapping"


def test_the_settings_walk_finds_nested_names() -> None:
    names = df.settings_env_names()
    assert {"LINEGUARD_REDIS__URL", "LINEGUARD_INFER__MAX_BATCH", "LINEGUARD_LOG__FORMAT"} <= names
    assert "LINEGUARD_INFER" in names  # a whole section, as JSON
    assert "LINEGUARD_INFER__MAX_BACH" not in names


@pytest.mark.parametrize(
    "path", df.deploy_text_files(), ids=lambda p: str(p.relative_to(df.DEPLOY))
)
def test_every_lineguard_variable_in_deploy_files_is_a_setting(path: Path) -> None:
    valid = df.settings_env_names()
    used = set(df.ENV_TOKEN.findall(path.read_text(encoding="utf-8")))
    unknown = sorted(used - valid)
    assert not unknown, (
        f"{path.relative_to(df.ROOT)} names {unknown}, which stream/settings.py does not read "
        "(a typo is ignored at run time, so it would silently not apply)"
    )


def test_compose_settings_validate_per_service(
    compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, svc in our_services(compose).items():
        env = svc.get("environment")
        assert isinstance(env, dict), f"compose {name}: settings go in `environment:` (a map)"
        assert "env_file" not in svc, f"compose {name}: settings through environment only"
        stage = stage_of([str(a) for a in svc.get("command") or []])
        validate_settings(df.compose_environment(svc), f"compose {name}", monkeypatch, stage)


def test_k8s_settings_validate(
    k8s_docs: list[tuple[Path, dict[str, Any]]], monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = {
        **by_kind(k8s_docs, "ConfigMap")["lineguard-settings"]["data"],
        **K8S_SECRETS["lineguard-metrics"],
    }
    validate_settings(settings, "ConfigMap lineguard-settings", monkeypatch)
    for _path, doc in k8s_docs:
        for key, c in df.k8s_containers(doc):
            refs = [s["secretRef"] for s in c.get("envFrom") or [] if "secretRef" in s]
            if any(r.get("configMapRef") for r in c.get("envFrom") or []):
                # the metrics endpoint listens off loopback: its token must always be there
                assert {"name": "lineguard-metrics"} in refs, f"{c['name']}: no metrics token"
            secrets: dict[str, str] = {}
            for ref in refs:
                assert ref.get("optional") or ref["name"] in K8S_SECRETS, (
                    f"{c['name']}: required Secret {ref['name']} is not known to this test"
                )
                secrets.update(K8S_SECRETS.get(ref["name"], {}))
            extra = {e["name"]: str(e["value"]) for e in c.get("env") or [] if "value" in e}
            stage = stage_of(c.get("args") or []) if key == "containers" else None
            where = f"{doc['metadata']['name']}/{c['name']}"
            validate_settings({**settings, **secrets, **extra}, where, monkeypatch, stage)


def test_systemd_settings_validate(monkeypatch: pytest.MonkeyPatch) -> None:
    for path in sorted(df.SYSTEMD.glob("*.service")):
        for instance in df.systemd_instances(path):
            env = df.systemd_environment(path, instance)
            settings = {k: v for k, v in env.items() if k.startswith(ENV_PREFIX)}
            # the units name no stage; a sink's lacks its secrets file, which has no example
            validate_settings(settings, f"{path.name} {instance}", monkeypatch)


# -------------------------------------------------------------------------------- secrets

# a compose value that only names a variable (no default): the operator's, never the file's
_NO_DEFAULT = re.compile(r"^\$\{[A-Za-z_][A-Za-z0-9_]*(:?\?[^}]*)?\}$")


def test_the_secret_walk_finds_the_secret_settings() -> None:
    secrets = df.settings_secret_names()
    assert {
        "LINEGUARD_METRICS__TOKEN",
        "LINEGUARD_REDIS__PASSWORD",
        "LINEGUARD_SINKS__MQTT__PASSWORD",
        "LINEGUARD_SINKS__OPCUA__PASSWORD",
        "LINEGUARD_SINKS__WEBHOOK__SECRET",
    } <= secrets
    assert "LINEGUARD_SINKS__OPCUA__USERNAME" not in secrets  # a plain str: a login name
    assert "LINEGUARD_SINKS__WEBHOOK__URL" not in secrets


def test_no_deploy_file_gives_a_secret_a_value(
    compose: dict[str, Any], k8s_docs: list[tuple[Path, dict[str, Any]]]
) -> None:
    """Passwords, tokens and the webhook key come from the operator's deploy/.env, Secrets
    or a mode-0600 file, never from a file in the repository."""
    secrets = df.settings_secret_names()
    for name, svc in our_services(compose).items():
        for key, value in (svc.get("environment") or {}).items():
            if key in secrets:
                assert value is None or _NO_DEFAULT.match(str(value)), (
                    f"compose {name}: {key} has a value in the file"
                )
    assert not by_kind(k8s_docs, "Secret"), "a Secret with its values is committed"
    for key in by_kind(k8s_docs, "ConfigMap")["lineguard-settings"]["data"]:
        assert key not in secrets, f"ConfigMap lineguard-settings holds {key}"
    for _path, doc in k8s_docs:
        for _key, c in df.k8s_containers(doc):
            for e in c.get("env") or []:
                assert e["name"] not in secrets or "value" not in e, f"{c['name']}: {e['name']}"
    for path in [df.ENV_EXAMPLE, *sorted(df.SYSTEMD.glob("*.env"))]:
        for key, value in df.parse_env_file(path).items():
            assert key not in secrets or value == "", f"{path.name}: {key} has a value"


def test_every_required_k8s_secret_says_how_to_create_it(
    k8s_docs: list[tuple[Path, dict[str, Any]]],
) -> None:
    text = "\n".join(p.read_text(encoding="utf-8") for p in sorted(df.K8S.glob("*.yaml")))
    created = set(re.findall(r"create secret generic ([a-z0-9-]+)", text))
    for _path, doc in k8s_docs:
        for _key, c in df.k8s_containers(doc):
            for src in c.get("envFrom") or []:
                ref = src.get("secretRef")
                if ref and not ref.get("optional"):
                    assert ref["name"] in created, f"{c['name']}: how is {ref['name']} made?"
                if ref:
                    # what the test validated with is what the comment creates
                    for key in K8S_SECRETS.get(ref["name"], {}):
                        assert f"--from-literal={key}=" in text, (ref["name"], key)


def test_compose_takes_its_operator_values_from_deploy_env(compose: dict[str, Any]) -> None:
    """What compose reads from deploy/.env (the variables it interpolates, the keys it passes
    through by name) is in deploy/env.example, with every one it requires, and each line
    there is used."""
    example = df.parse_env_file(df.ENV_EXAMPLE)
    documented = set(example) | set(df.ENV_TOKEN.findall(df.ENV_EXAMPLE.read_text("utf-8")))
    text = df.COMPOSE.read_text(encoding="utf-8")
    required = {m.group(1) for m in df.INTERPOLATION.finditer(text) if m.group(2) == ":?"}
    assert required and required <= set(example), f"required {sorted(required - set(example))}"
    used = {m.group(1) for m in df.INTERPOLATION.finditer(text)}
    for name, svc in our_services(compose).items():
        through = {k for k, v in (svc.get("environment") or {}).items() if v is None}
        assert through <= documented, f"compose {name}: {sorted(through - documented)}"
        used |= through
    unused = set(example) - used
    assert not unused, f"env.example sets {sorted(unused)}, which compose never reads"


# -------------------------------------------------------------------------------- images


def test_dockerfile_has_the_stages_and_image_rules() -> None:
    stages = df.dockerfile_stages()
    assert {"wheel", "cpu", "gpu"} <= set(stages), f"stages: {list(stages)}"
    args = df.dockerfile_args()
    base = {
        name: re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], stage.base)
        for name, stage in stages.items()
    }
    assert base["cpu"].startswith("python:3.11-slim"), base["cpu"]
    assert re.match(r"nvcr\.io/nvidia/tensorrt:\d\d\.\d\d-py3$", base["gpu"]), base["gpu"]
    for name in ("cpu", "gpu"):
        lines = stages[name].lines
        users = [ln.split()[1] for ln in lines if ln.upper().startswith("USER ")]
        assert users and users[-1] not in ("root", "0"), f"{name}: runs as root"
        assert any(ln.startswith("HEALTHCHECK") and "lineguard-probe" in ln for ln in lines)
        assert any(ln.startswith("VOLUME") and "/var/lib/lineguard" in ln for ln in lines)
        assert 'ENTRYPOINT ["lineguard"]' in lines, f"{name}: entry point is not lineguard"
    everything = "\n".join(df.dockerfile_instructions())
    assert "download.pytorch.org/whl/cpu" in args["TORCH_CPU_INDEX"]
    assert "TORCH_CPU_INDEX" in "\n".join(stages["cpu-build"].lines)
    assert "[gpu]" in "\n".join(stages["gpu"].lines), "the GPU image must install the gpu extra"
    # every --from= / from= names an earlier stage, and every COPY source exists in the repo
    for ref in re.findall(r"\bfrom=([\w.-]+)", everything, re.I):
        assert ref in stages, f"COPY/mount from unknown stage {ref!r}"
    for ins in df.dockerfile_instructions():
        if ins.startswith("COPY") and "--from" not in ins:
            *sources, _dest = [t for t in ins.split()[1:] if not t.startswith("--")]
            for src in sources:
                assert (df.ROOT / src).exists(), f"COPY source {src} does not exist"


def test_image_targets_referenced_exist_in_the_dockerfile(
    compose: dict[str, Any], k8s_docs: list[tuple[Path, dict[str, Any]]]
) -> None:
    stages = set(df.dockerfile_stages())
    seen = 0
    for name, svc in our_services(compose).items():
        build = svc.get("build") or {}
        target = build.get("target")
        assert target in stages, f"compose {name}: build target {target!r} not in {stages}"
        assert (df.DEPLOY / build["context"] / build["dockerfile"]).resolve() == df.DOCKERFILE
        assert svc["image"].endswith(f"-{target}"), f"compose {name}: tag/target mismatch"
        seen += 1
    for _path, doc in k8s_docs:
        for _key, c in df.k8s_containers(doc):
            image = str(c["image"])
            if "lineguard:" not in image:
                continue
            tag = image.rsplit(":", 1)[1]
            assert tag.rsplit("-", 1)[-1] in stages, f"{image}: tag names no Dockerfile target"
            seen += 1
    assert seen >= 6


# -------------------------------------------------------------------------------- commands


def all_commands(
    compose: dict[str, Any], k8s_docs: list[tuple[Path, dict[str, Any]]]
) -> list[df.Command]:
    return [
        *df.compose_commands(compose),
        *df.k8s_commands(k8s_docs),
        *df.systemd_commands(),
        *df.dockerfile_commands(),
    ]


def test_the_help_reader_sees_commands_and_options() -> None:
    assert {"ingest", "infer", "decide", "health", "bench", "bundle"} <= help_info(()).commands
    infer = help_info(("infer",))
    assert infer.exit_code == 0
    assert infer.options["--bundle"] and infer.options["-b"] and not infer.options["--maps"]


def test_every_command_in_the_deploy_files_is_accepted_by_the_cli(
    compose: dict[str, Any], k8s_docs: list[tuple[Path, dict[str, Any]]]
) -> None:
    commands = all_commands(compose, k8s_docs)
    programs = Counter(c.program for c in commands)
    assert programs["lineguard"] >= 10 and programs["lineguard-prepare"] >= 3, programs
    problems = [f"{c.where}: {p}" for c in commands for p in check_command(c.program, c.args)]
    assert not problems, "\n".join(problems)


def test_the_probe_asks_a_real_health_command() -> None:
    from tests.deploy.cli_check import check_lineguard, load_script

    probe = load_script("lineguard_probe")
    for stage in ("", *STAGES):
        cmd = probe.health_command(stage)
        assert cmd[0] == "lineguard"
        assert check_lineguard(tuple(cmd[1:])) == [], cmd


def test_the_console_script_answers_help() -> None:
    exe = shutil.which("lineguard")
    if exe is None:
        pytest.skip("the lineguard console script is not on PATH (pip install -e .)")
    out = subprocess.run([exe, "health", "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "--stage" in out.stdout


def test_worker_commands_carry_no_settings_flags(
    compose: dict[str, Any], k8s_docs: list[tuple[Path, dict[str, Any]]]
) -> None:
    """Settings come from the environment only; a flag would hide what the env file says."""
    settings_flags = {
        name for stage in STAGES for name in help_info(stage_command(stage)).settings_options
    }
    assert {"--topic", "--url"} <= settings_flags, "the sink commands' settings flags"
    assert {"--line", "--max-batch", "--metrics-port"} <= settings_flags
    for c in all_commands(compose, k8s_docs):
        used = settings_flags.intersection(c.args)
        assert not used, f"{c.where}: {sorted(used)} set settings on the command line"


def test_every_worker_probe_checks_its_own_stage(
    compose: dict[str, Any], k8s_docs: list[tuple[Path, dict[str, Any]]]
) -> None:
    probed = set()
    for name, svc in our_services(compose).items():
        stage = stage_of(svc.get("command") or [])
        if stage is None:
            continue
        test = svc["healthcheck"]["test"]
        assert test == ["CMD", "lineguard-probe", stage], f"compose {name}: {test}"
        probed.add(stage)
    assert probed == set(STAGES), f"compose runs no worker of {set(STAGES) - probed}"
    for _path, doc in k8s_docs:
        for key, c in df.k8s_containers(doc):
            if key != "containers" or "lineguard" not in str(c.get("image")):
                continue
            stage = stage_of(c["args"])
            assert stage is not None, f"{c['name']}: {c['args']} runs no worker"
            for probe in ("readinessProbe", "livenessProbe"):
                assert c[probe]["exec"]["command"] == ["lineguard-probe", stage], (c["name"], probe)


# ---------------------------------------------------------------------------------- compose


def test_compose_valkey_persists_and_never_evicts(compose: dict[str, Any]) -> None:
    valkey = compose["services"]["valkey"]
    cmd = " ".join(df.resolve_interpolation(str(a)) for a in valkey["command"])
    for flag in ("--appendonly yes", "--appendfsync everysec", "--maxmemory-policy noeviction"):
        assert flag in cmd, f"valkey command lacks {flag}"
    assert any(str(v).endswith(":/data") for v in valkey["volumes"])
    for name, svc in our_services(compose).items():
        if name != "infer-prepare" and "profiles" not in svc:
            assert svc["depends_on"]["valkey"]["condition"] == "service_healthy", name


def test_compose_infer_reserves_a_gpu_and_waits_for_its_engine(compose: dict[str, Any]) -> None:
    services = compose["services"]
    gpu_services = [n for n, s in our_services(compose).items() if s["image"].endswith("-gpu")]
    assert {"infer", "infer-prepare"} <= set(gpu_services)
    for name in gpu_services:
        devices = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert devices and devices[0]["driver"] == "nvidia", name
        assert "gpu" in devices[0]["capabilities"], name
    infer = services["infer"]
    assert infer["depends_on"]["infer-prepare"]["condition"] == "service_completed_successfully"
    prepare = services["infer-prepare"]
    assert prepare["entrypoint"] == ["lineguard-prepare"] and prepare["restart"] == "no"

    flags = ("--bundle", "--runtime", "--precision")
    built = flag_values([df.resolve_interpolation(str(a)) for a in prepare["command"]], flags)
    used = flag_values([df.resolve_interpolation(str(a)) for a in infer["command"]], flags)
    assert built == used, "infer-prepare would build an engine infer does not open"


def test_compose_gives_each_gpu_worker_its_own_consumer(compose: dict[str, Any]) -> None:
    names: dict[tuple[str, str], str] = {}
    for name, svc in our_services(compose).items():
        cmd = [str(a) for a in svc.get("command") or []]
        if "--consumer" in cmd:
            line = svc["environment"].get("LINEGUARD_LINE__ID", "")
            key = (df.resolve_interpolation(line), cmd[cmd.index("--consumer") + 1])
            assert key not in names, f"{name} and {names[key]} share consumer {key}"
            names[key] = name


def test_prometheus_scrapes_every_worker_service_on_the_metrics_port(
    compose: dict[str, Any],
) -> None:
    (prom,) = df.load_yaml_docs(df.DEPLOY / "prometheus.yml")
    (job,) = prom["scrape_configs"]
    (sd,) = job["dns_sd_configs"]
    workers = {n for n, s in our_services(compose).items() if stage_of(s.get("command") or [])}
    assert set(sd["names"]) == workers
    ports = {s["environment"]["LINEGUARD_METRICS__PORT"] for s in our_services(compose).values()}
    assert ports == {str(sd["port"])}
    assert compose["services"]["prometheus"]["profiles"] == ["metrics"]
    mounted = compose["services"]["prometheus"]["volumes"][0].split(":")[0]
    assert (df.DEPLOY / mounted).resolve() == (df.DEPLOY / "prometheus.yml").resolve()


def test_compose_runs_each_sink_once_on_the_plant_profile(compose: dict[str, Any]) -> None:
    sinks: dict[str, tuple[str, dict[str, Any]]] = {}
    for name, svc in our_services(compose).items():
        stage = stage_of(svc.get("command") or [])
        if stage and stage.startswith("sink-"):
            assert stage not in sinks, f"{name} and {sinks[stage][0]} run {stage}"
            sinks[stage] = (name, svc)
    assert sorted(sinks) == [f"sink-{k}" for k in SINK_KINDS]
    for name, svc in sinks.values():
        assert svc["profiles"] == ["plant"], f"{name}: only with --profile plant"
        assert svc["restart"] == "unless-stopped" and svc["stop_signal"] == "SIGTERM", name
        assert svc["image"].endswith("-cpu"), f"{name} needs no GPU"
        cmd = [str(a) for a in svc["command"]]
        assert "--consumer" in cmd, f"{name}: a stable consumer name"
        assert "deploy" not in svc, f"{name}: one container per sink group (no replicas)"
    _name, opcua = sinks["sink-opcua"]
    env = df.compose_environment(opcua)
    assert not is_loopback(env["LINEGUARD_SINKS__OPCUA__HOST"]), "unreachable from the host"
    # the credentials come from deploy/.env, so the bind's rule is met there, not in the file
    for key in ("LINEGUARD_SINKS__OPCUA__USERNAME", "LINEGUARD_SINKS__OPCUA__PASSWORD"):
        assert opcua["environment"][key] is None, key
    (published,) = opcua["ports"]
    target = df.resolve_interpolation(str(published)).rsplit(":", 1)[1]
    assert target == env["LINEGUARD_SINKS__OPCUA__PORT"], "the port published is not served"


# ---------------------------------------------------------------------------------- kubernetes


def _mount_of(mounts: list[dict[str, Any]], path: str) -> dict[str, Any] | None:
    """The mount ``path`` lies under (the deepest one), if any."""
    under = [m for m in mounts if Path(path).is_relative_to(m["mountPath"])]
    return max(under, key=lambda m: len(m["mountPath"]), default=None)


def test_the_history_is_kept_on_a_volume_everywhere(compose: dict[str, Any]) -> None:
    """The history's SQLite file and pictures outlive the worker: compose keeps its dir on
    a named volume, systemd in a path the unit may write (Kubernetes: see the test below)."""
    (svc,) = [s for s in our_services(compose).values() if stage_of(s["command"]) == "history"]
    where = df.compose_environment(svc)["LINEGUARD_HISTORY__DIR"]
    volumes = [str(v).split(":") for v in svc["volumes"]]
    mount = _mount_of([{"name": v[0], "mountPath": v[1]} for v in volumes], where)
    assert mount is not None and mount["name"] in compose["volumes"], f"compose: {where}"
    unit = df.SYSTEMD / "lineguard-history.service"
    env = df.systemd_environment(unit, "")
    (writable,) = df.unit_values(df.parse_unit(unit), "Service", "ReadWritePaths")
    assert Path(env["LINEGUARD_HISTORY__DIR"]).is_relative_to(writable), "systemd: read-only"


def test_kustomization_lists_every_manifest() -> None:
    (kust,) = df.load_yaml_docs(df.K8S / "kustomization.yaml")
    files = {p.name for p in df.K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kust["resources"]) == files


def test_kubectl_kustomize_builds_the_manifests() -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed; the YAML checks above still ran")
    out = subprocess.run(
        [kubectl, "kustomize", str(df.K8S)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    kinds = Counter(d["kind"] for d in df.yaml_module().safe_load_all(out.stdout) if d)
    assert kinds["Deployment"] == 4 + len(SINK_KINDS), kinds
    assert kinds["StatefulSet"] == 1 and kinds["ScaledObject"] == 1 and kinds["Service"] == 2


def test_k8s_objects_are_well_formed_and_refer_to_each_other(
    k8s_docs: list[tuple[Path, dict[str, Any]]],
) -> None:
    configmaps = by_kind(k8s_docs, "ConfigMap")
    pvcs = by_kind(k8s_docs, "PersistentVolumeClaim")
    for path, doc in k8s_docs:
        assert doc.get("apiVersion") and doc.get("kind") and doc["metadata"].get("name"), path
        if doc["kind"] not in ("Deployment", "StatefulSet"):
            continue
        name = doc["metadata"]["name"]
        spec = doc["spec"]
        labels = spec["template"]["metadata"]["labels"]
        assert spec["selector"]["matchLabels"].items() <= labels.items(), name
        pod = spec["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        volumes = {v["name"]: v for v in pod.get("volumes") or []}
        claims = {t["metadata"]["name"] for t in spec.get("volumeClaimTemplates") or []}
        for _key, c in df.k8s_containers(doc):
            for m in c.get("volumeMounts") or []:
                assert m["name"] in volumes or m["name"] in claims, f"{name}: {m['name']}"
            for src in c.get("envFrom") or []:
                ref = src.get("configMapRef") or {}
                if ref:
                    assert ref["name"] in configmaps, f"{name}: ConfigMap {ref['name']}"
            assert "limits" in c.get("resources", {}), f"{name}/{c['name']}: no limits"
        for v in volumes.values():
            pvc = v.get("persistentVolumeClaim")
            if pvc:
                assert pvc["claimName"] in pvcs, f"{name}: no PVC {pvc['claimName']}"
            cm = v.get("configMap")
            if cm:
                assert cm["name"] in configmaps, f"{name}: no ConfigMap {cm['name']}"


def test_k8s_workers_gpu_volume_and_drain(k8s_docs: list[tuple[Path, dict[str, Any]]]) -> None:
    deployments = by_kind(k8s_docs, "Deployment")
    by_stage = {
        stage_of(d["spec"]["template"]["spec"]["containers"][0]["args"]): d
        for d in deployments.values()
    }
    assert set(by_stage) == set(STAGES)
    for stage, dep in by_stage.items():
        pod = dep["spec"]["template"]["spec"]
        (main,) = pod["containers"]
        gpu = main["resources"]["limits"].get("nvidia.com/gpu")
        if stage and stage.startswith("sink-"):
            # one consumer per sink group: never a second pod, not even during an update
            assert dep["spec"]["replicas"] == 1 and dep["spec"]["strategy"]["type"] == "Recreate"
            assert "--consumer" in main["args"], f"{stage}: a stable consumer name"
            assert gpu is None, f"{stage} needs no GPU"
            assert "/var/lib/lineguard" not in {m["mountPath"] for m in main["volumeMounts"]}
            continue
        if stage == "history":
            # one writer to SQLite, on a volume of its own with working file locks
            assert dep["spec"]["replicas"] == 1 and dep["spec"]["strategy"]["type"] == "Recreate"
            assert "--consumer" in main["args"] and gpu is None
            env = {e["name"]: e["value"] for e in main["env"] if "value" in e}
            mount = _mount_of(main["volumeMounts"], env["LINEGUARD_HISTORY__DIR"])
            assert mount is not None and not mount.get("readOnly"), "the history dir is written"
            (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
            pvc = by_kind(k8s_docs, "PersistentVolumeClaim")[
                volume["persistentVolumeClaim"]["claimName"]
            ]
            assert pvc["spec"]["accessModes"] == ["ReadWriteOnce"], "SQLite on a shared volume"
            continue
        data = next(m for m in main["volumeMounts"] if m["mountPath"] == "/var/lib/lineguard")
        if stage == "infer":
            assert gpu == 1, "one GPU per infer pod"
            assert not data.get("readOnly"), "infer writes TensorRT engines into the bundle"
            assert pod["terminationGracePeriodSeconds"] >= 30
            assert dep["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
            (prep,) = pod["initContainers"]
            assert prep["command"][0] == "lineguard-prepare"
            assert prep["resources"]["limits"]["nvidia.com/gpu"] == 1
            assert prep["image"] == main["image"]
            flags = ("--bundle", "--runtime", "--device", "--precision")
            built = flag_values(prep["command"], flags)
            assert built == flag_values(main["args"], flags), "prepare builds another engine"
        else:
            assert gpu is None, f"{stage} needs no GPU"
            assert data.get("readOnly") is True, f"{stage} only reads bundles"
        if stage == "ingest":
            assert dep["spec"]["replicas"] == 1 and dep["spec"]["strategy"]["type"] == "Recreate"


def test_keda_scales_infer_on_the_lag_of_its_own_stream_and_group(
    k8s_docs: list[tuple[Path, dict[str, Any]]],
) -> None:
    (so,) = by_kind(k8s_docs, "ScaledObject").values()
    assert so["apiVersion"] == "keda.sh/v1alpha1"
    assert so["spec"]["scaleTargetRef"]["name"] in by_kind(k8s_docs, "Deployment")
    target = by_kind(k8s_docs, "Deployment")[so["spec"]["scaleTargetRef"]["name"]]
    assert target["spec"]["template"]["spec"]["containers"][0]["args"][0] == "infer"
    assert so["spec"]["minReplicaCount"] >= 1
    (trigger,) = so["spec"]["triggers"]
    assert trigger["type"] == "redis-streams"
    meta = trigger["metadata"]
    # the field names KEDA's redis-streams scaler reads (lag-based mode needs Redis 7+)
    assert {"address", "stream", "consumerGroup", "lagCount", "activationLagCount"} <= set(meta)
    assert all(isinstance(v, str) for v in meta.values()), "KEDA metadata values are strings"
    settings_env = {
        **by_kind(k8s_docs, "ConfigMap")["lineguard-settings"]["data"],
        **K8S_SECRETS["lineguard-metrics"],
    }
    settings = Settings.load(_nested(settings_env), env_file=None)
    bus = Bus(redis.Redis(), line=settings.line.id, prefix=settings.redis.key_prefix)
    assert meta["stream"] == bus.key("frames")
    assert meta["consumerGroup"] == settings.infer.group
    host = meta["address"].split(":")[0].split(".")[0]
    assert host in by_kind(k8s_docs, "Service"), f"no Service {host}"
    assert int(meta["lagCount"]) * so["spec"]["maxReplicaCount"] < settings.ingest.max_len


def _nested(env: dict[str, str]) -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = {}
    for key, value in env.items():
        section, field = key.removeprefix(ENV_PREFIX).lower().split("__", 1)
        out.setdefault(section, {})[field] = value
    return out


def test_the_opc_ua_service_reaches_the_opc_ua_sink(
    k8s_docs: list[tuple[Path, dict[str, Any]]],
) -> None:
    service = by_kind(k8s_docs, "Service")["lineguard-sink-opcua"]
    pods = [
        d
        for d in by_kind(k8s_docs, "Deployment").values()
        if service["spec"]["selector"].items()
        <= d["spec"]["template"]["metadata"]["labels"].items()
    ]
    (dep,) = pods
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    assert stage_of(c["args"]) == "sink-opcua"
    env = {e["name"]: str(e["value"]) for e in c["env"] if "value" in e}
    assert not is_loopback(env["LINEGUARD_SINKS__OPCUA__HOST"]), "the Service could not reach it"
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    (port,) = service["spec"]["ports"]
    assert str(ports[port["targetPort"]]) == env["LINEGUARD_SINKS__OPCUA__PORT"]


def test_valkey_statefulset_persists_with_aof(k8s_docs: list[tuple[Path, dict[str, Any]]]) -> None:
    conf = by_kind(k8s_docs, "ConfigMap")["lineguard-valkey-config"]["data"]["valkey.conf"]
    for line in ("appendonly yes", "appendfsync everysec", "maxmemory-policy noeviction"):
        assert line in conf.splitlines(), line
    (sts,) = by_kind(k8s_docs, "StatefulSet").values()
    assert sts["spec"]["volumeClaimTemplates"], "Valkey data must be on a volume"
    url = by_kind(k8s_docs, "ConfigMap")["lineguard-settings"]["data"]["LINEGUARD_REDIS__URL"]
    assert url.split("//")[1].split(":")[0] in by_kind(k8s_docs, "Service")


# ------------------------------------------------------------------------------------ systemd


def _seconds(value: str) -> float:
    units = {"": 1, "s": 1, "sec": 1, "min": 60, "m": 60, "h": 3600, "ms": 0.001}
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", value):
        total += float(number) * units[unit]
    return total


@pytest.mark.parametrize(
    "path", sorted(df.SYSTEMD.glob("*.service")), ids=lambda p: p.name.replace("@", "_at_")
)
def test_systemd_service_has_the_required_keys(path: Path) -> None:
    unit = df.parse_unit(path)
    assert {"Unit", "Service", "Install"} <= set(unit), f"{path.name}: sections {list(unit)}"

    def one(key: str) -> str:
        values = df.unit_values(unit, "Service", key)
        assert len(values) == 1, f"{path.name}: {key}= given {len(values)} times"
        return values[0]

    assert one("User") not in ("root", "0") and one("Group")
    assert one("Restart") == "on-failure"
    assert _seconds(one("RestartSec")) >= 1
    assert one("KillSignal") == "SIGTERM"
    # long enough to finish and acknowledge the batch in flight (block_ms ≤ 2.5 s + a batch)
    assert _seconds(one("TimeoutStopSec")) >= 10
    assert "/etc/lineguard/lineguard.env" in df.unit_values(unit, "Service", "EnvironmentFile")
    assert one("ExecStart").startswith("/opt/lineguard/bin/lineguard ")
    assert df.unit_values(unit, "Install", "WantedBy") == ["lineguard.target"]
    assert df.unit_values(unit, "Unit", "PartOf") == ["lineguard.target"]
    assert (df.SYSTEMD / "lineguard.target").is_file()
    if path.name.startswith("lineguard-infer@"):
        (pre,) = df.unit_values(unit, "Service", "ExecStartPre")
        assert pre.startswith("/opt/lineguard/bin/lineguard-prepare ")
        assert _seconds(one("TimeoutStartSec")) >= 600, "a TensorRT build takes minutes"


def test_systemd_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    """systemd's own parser, where installed; only the missing /opt/lineguard is forgiven."""
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed; the key checks above still ran")
    names = []
    for path in [*sorted(df.SYSTEMD.glob("*.service")), df.SYSTEMD / "lineguard.target"]:
        for instance in df.systemd_instances(path):
            name = path.name.replace("@.", f"@{instance}.")
            (tmp_path / name).write_text(path.read_text(encoding="utf-8"), encoding="utf-8")
            names.append(name)
    for name in names:
        out = subprocess.run(
            [tool, "verify", "--man=no", str(tmp_path / name)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        complaints = [
            line
            for line in (out.stdout + out.stderr).splitlines()
            if line.strip() and "/opt/lineguard/bin/" not in line
        ]
        assert not complaints, f"{name}: " + "\n".join(complaints)
