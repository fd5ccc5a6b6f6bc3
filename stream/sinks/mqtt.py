"""MQTT sink: one QoS 1 (or 2) message per verdict, acknowledged on the stream after PUBACK.

Delivery is at least once. Each verdict is published once per process: while the broker is
away, paho keeps the unacknowledged messages and re-sends them (DUP flag) when it reconnects,
and this sink only waits for their PUBACKs instead of publishing again, so an outage by
itself adds no copies. A receiver can still see a verdict twice when

* a PUBACK was lost with the connection: paho re-sends the message after reconnecting;
* the sink process stopped after a PUBACK but before the stream acknowledgement: the new
  process publishes those verdicts again, oldest first (at most ``queue_size`` of them).

Deduplicate on the payload's ``frame_key`` and ``epoch``. Per camera the copies keep capture
order: a repeated window never reorders what came before it. With ``retain`` the broker keeps
the last message of each topic, i.e. each camera's latest verdict with the default template.

The password goes to paho only; it is never logged, and logs name the broker as host:port.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import structlog

from lineguard.stream.bus import Bus
from lineguard.stream.settings import MqttSinkSettings
from lineguard.stream.sinks.stage import Delivery, Outcome, ack_plain

log = structlog.get_logger("lineguard.sinks.mqtt")

_ACK_WAIT_S = 1.0  # longest wait for PUBACKs in one attempt: keeps a worker step short


class MqttSink:
    """Publishes verdict payloads through one paho client running its own network thread."""

    kind = "mqtt"

    def __init__(self, cfg: MqttSinkSettings, line: str) -> None:
        self.cfg = cfg
        self.line = line
        self.where = f"{cfg.host}:{cfg.port}"
        self.client_id = cfg.client_id or f"lineguard-{line}-{cfg.name}"
        self._client: Any = None
        self._cond = threading.Condition()
        self._acked: set[int] = set()
        self._mids: dict[str, int] = {}  # entry id -> mid of its one publish in this process
        self._connected = False
        self._reconnected = False
        self._refusal: str | None = None
        self._closing = False

    # paho callbacks (network thread) -------------------------------------------------

    def _on_connect(self, _c: Any, _u: Any, _flags: Any, reason: Any, _p: Any) -> None:
        with self._cond:
            if reason.is_failure:
                self._refusal = str(reason)
                log.error("sink.mqtt_refused", broker=self.where, reason=str(reason))
                return
            self._connected = True
            self._reconnected = True
            self._refusal = None
            self._cond.notify_all()
        log.info("sink.mqtt_connected", broker=self.where, client_id=self.client_id)

    def _on_disconnect(self, _c: Any, _u: Any, _flags: Any, reason: Any, _p: Any) -> None:
        with self._cond:
            was = self._connected
            self._connected = False
        if was and not self._closing:
            log.warning("sink.mqtt_disconnected", broker=self.where, reason=str(reason))

    def _on_publish(self, _c: Any, _u: Any, mid: int, _reason: Any, _p: Any) -> None:
        with self._cond:
            self._acked.add(mid)
            self._cond.notify_all()

    # Sink ------------------------------------------------------------------------

    def open(self, bus: Bus, group: str) -> None:
        import paho.mqtt.client as mqtt

        cfg = self.cfg
        client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            clean_session=True,
            protocol=mqtt.MQTTv311,
        )
        if cfg.username is not None:
            client.username_pw_set(
                cfg.username.get_secret_value(),
                None if cfg.password is None else cfg.password.get_secret_value(),
            )
        if cfg.tls:
            client.tls_set(
                ca_certs=None if cfg.ca_file is None else str(cfg.ca_file),
                certfile=None if cfg.cert_file is None else str(cfg.cert_file),
                keyfile=None if cfg.key_file is None else str(cfg.key_file),
            )
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        # paho queues what is published while the broker is away; the stage holds at most
        # queue_size verdicts, so allow that many in flight and nothing beyond
        client.max_inflight_messages_set(cfg.queue_size)
        client.max_queued_messages_set(cfg.queue_size + 1)
        client.reconnect_delay_set(
            min_delay=max(1, int(cfg.retry_base_s)), max_delay=max(1, int(cfg.retry_cap_s))
        )
        client.connect_async(cfg.host, cfg.port, keepalive=cfg.keepalive_s)
        client.loop_start()
        self._client = client
        log.info("sink.mqtt_started", broker=self.where, topic=cfg.topic, qos=cfg.qos, tls=cfg.tls)

    def topic(self, item: Delivery) -> str:
        ev = item.event
        return self.cfg.topic.format(line=ev.line, camera=ev.camera, verdict=ev.verdict)

    def deliver(self, items: list[Delivery]) -> Outcome:
        client = self._client
        for item in items:
            if item.entry_id in self._mids:
                continue  # published already, paho re-sends it: wait for its PUBACK
            info = client.publish(
                self.topic(item), item.body, qos=self.cfg.qos, retain=self.cfg.retain
            )
            if info.rc not in (0, 4):  # MQTT_ERR_SUCCESS, MQTT_ERR_NO_CONN (queued by paho)
                return Outcome(self._collect(items), error=f"publish failed: rc={info.rc}")
            self._mids[item.entry_id] = info.mid
        deadline = time.monotonic() + _ACK_WAIT_S
        with self._cond:
            while True:
                done = self._leading_acked(items)
                left = deadline - time.monotonic()
                if done == len(items) or left <= 0 or not self._connected:
                    break
                self._cond.wait(left)
        n = self._collect(items)
        if n == len(items):
            return Outcome(n)
        state = "connected" if self._connected else "not connected"
        why = f", refused: {self._refusal}" if self._refusal else ""
        return Outcome(n, error=f"no PUBACK from {self.where} ({state}{why})")

    def _leading_acked(self, items: list[Delivery]) -> int:
        n = 0
        for item in items:
            mid = self._mids.get(item.entry_id)
            if mid is None or mid not in self._acked:
                break
            n += 1
        return n

    def _collect(self, items: list[Delivery]) -> int:
        """Forget the publishes of the leading acknowledged items; returns how many."""
        with self._cond:
            n = self._leading_acked(items)
            for item in items[:n]:
                self._acked.discard(self._mids.pop(item.entry_id))
        return n

    def acknowledge(self, bus: Bus, group: str, items: list[Delivery]) -> None:
        ack_plain(bus, group, items)

    def committed(self, items: list[Delivery]) -> None:
        return None

    def wake(self) -> bool:
        """True once after the broker came back: the stage retries at once."""
        with self._cond:
            woke, self._reconnected = self._reconnected, False
        return woke

    def connected(self) -> bool:
        return self._connected

    def status(self) -> dict[str, Any]:
        return {"broker": self.where, "unacked": len(self._mids)}

    def close(self) -> None:
        client = self._client
        if client is None:
            return
        self._closing = True
        try:
            client.disconnect()
        finally:
            client.loop_stop()
            self._client = None
