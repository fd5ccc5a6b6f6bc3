"""``lineguard sink mqtt|opcua|webhook``: one worker per sink, fed from the events stream.

Secrets (MQTT and OPC UA passwords, the webhook secret) are read from the environment or
``.env`` only, never from flags: a flag shows in ``ps`` and in shell history.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import typer

from lineguard.stream.cli.common import err_console, external_client, friendly_errors, load_settings
from lineguard.stream.cli.options import BurstOpt, LineOpt, MetricsPortOpt, env_help

app = typer.Typer(
    help="Send verdicts where the plant listens (one consumer group per sink).",
    no_args_is_help=True,
)

NameOpt = Annotated[
    str | None,
    typer.Option(
        metavar="NAME", help="Sink name: its consumer group is sink:KIND:NAME (default 'default')."
    ),
]
StartOpt = Annotated[
    Literal["new", "all"] | None,
    typer.Option(help="A new group starts at new events or at all kept ones."),
]
ConsumerOpt = Annotated[
    str | None,
    typer.Option(metavar="NAME", help="Stable consumer name (default NAME@host)."),
]
HostOpt = Annotated[str | None, typer.Option(metavar="HOST", help="Broker or bind address.")]
PortOpt = Annotated[int | None, typer.Option(metavar="PORT", help="TCP port.")]


def _run(kind: str, overrides: dict[str, Any], consumer: str | None, burst: bool) -> None:
    from lineguard.stream.bus import Bus
    from lineguard.stream.metrics import serve_metrics
    from lineguard.stream.sinks import sink_stage
    from lineguard.stream.worker import StopFlag, run_worker

    settings = load_settings(overrides)
    client = external_client(settings, f"sink-{kind}")
    stop_metrics = serve_metrics(
        settings.metrics.port, settings.metrics.addr, settings.metrics.token_value
    )
    try:
        bus = Bus.from_settings(client, settings)
        stop = StopFlag()
        stage = sink_stage(kind, settings, bus, consumer=consumer, stop=stop)
        err_console.print(f"[dim]sink {stage.label}: consumer group {stage.group}[/dim]")
        run_worker(stage, bus, stop=stop, burst=burst)
        err_console.print(
            f"sink {stage.label}: delivered {stage.counts['delivered']}, "
            f"refused {stage.counts['refused']}, dead {stage.counts['dead']}",
            highlight=False,
        )
    finally:
        stop_metrics()
        client.close()


def _common(kind: str, line: str | None, metrics_port: int | None, name: str | None,
            start: str | None) -> dict[str, Any]:  # fmt: skip
    return {
        "line.id": line,
        "metrics.port": metrics_port,
        f"sinks.{kind}.name": name,
        f"sinks.{kind}.start": start,
    }


@app.command("mqtt")
@friendly_errors
def mqtt_cmd(
    host: HostOpt = None,
    port: PortOpt = None,
    topic: Annotated[
        str | None,
        typer.Option(
            metavar="TEMPLATE",
            help=env_help("With {line} {camera} {verdict}.", "LINEGUARD_SINKS__MQTT__TOPIC"),
        ),
    ] = None,
    retain: Annotated[
        bool | None, typer.Option("--retain/--no-retain", help="Keep each topic's last verdict.")
    ] = None,
    tls: Annotated[bool | None, typer.Option("--tls/--no-tls", help="Connect with TLS.")] = None,
    name: NameOpt = None,
    start: StartOpt = None,
    consumer: ConsumerOpt = None,
    burst: BurstOpt = False,
    line: LineOpt = None,
    metrics_port: MetricsPortOpt = None,
) -> None:
    """Publish one QoS 1 JSON message per verdict to an MQTT broker.

    Credentials: LINEGUARD_SINKS__MQTT__USERNAME and __PASSWORD; TLS files:
    LINEGUARD_SINKS__MQTT__CA_FILE, __CERT_FILE, __KEY_FILE.
    """
    overrides = _common("mqtt", line, metrics_port, name, start)
    overrides.update(
        {
            "sinks.mqtt.host": host,
            "sinks.mqtt.port": port,
            "sinks.mqtt.topic": topic,
            "sinks.mqtt.retain": retain,
            "sinks.mqtt.tls": tls,
        }
    )
    _run("mqtt", overrides, consumer, burst)


@app.command("opcua")
@friendly_errors
def opcua_cmd(
    host: HostOpt = None,
    port: PortOpt = None,
    name: NameOpt = None,
    start: StartOpt = None,
    consumer: ConsumerOpt = None,
    burst: BurstOpt = False,
    line: LineOpt = None,
    metrics_port: MetricsPortOpt = None,
) -> None:
    """Serve each camera's last verdict and counters over OPC UA (default 127.0.0.1:4840).

    Another address needs LINEGUARD_SINKS__OPCUA__USERNAME and __PASSWORD.
    """
    overrides = _common("opcua", line, metrics_port, name, start)
    overrides.update({"sinks.opcua.host": host, "sinks.opcua.port": port})
    _run("opcua", overrides, consumer, burst)


@app.command("webhook")
@friendly_errors
def webhook_cmd(
    url: Annotated[
        str | None,
        typer.Option(metavar="URL", help=env_help("POST here.", "LINEGUARD_SINKS__WEBHOOK__URL")),
    ] = None,
    name: NameOpt = None,
    start: StartOpt = None,
    consumer: ConsumerOpt = None,
    burst: BurstOpt = False,
    line: LineOpt = None,
    metrics_port: MetricsPortOpt = None,
) -> None:
    """POST each verdict as signed JSON, retried with backoff while the receiver fails.

    The HMAC-SHA256 key comes from LINEGUARD_SINKS__WEBHOOK__SECRET.
    """
    overrides = _common("webhook", line, metrics_port, name, start)
    overrides["sinks.webhook.url"] = url
    _run("webhook", overrides, consumer, burst)
