"""Webhook sink: one signed HTTP POST per verdict, acknowledged on the stream after a 2xx.

Each request carries the verdict payload as its JSON body and

* ``X-Lineguard-Signature: sha256=<hex>``: HMAC-SHA256 of the exact body bytes with the
  shared secret (``LINEGUARD_SINKS__WEBHOOK__SECRET``); check it in constant time before
  trusting the body;
* ``X-Lineguard-Frame-Key`` and ``Idempotency-Key``: the frame key, to deduplicate on;
* ``X-Lineguard-Schema``: the payload's schema (``lineguard.verdict/1``).

A connection error, a timeout, 408, 425, 429 or a 5xx is retried, oldest verdict first, with
exponential backoff; nothing newer is sent meanwhile, so per camera the receiver sees capture
order. Any other status (a 4xx: the receiver says the request itself is wrong) dead-letters
that one verdict with the status in its reason, and the next one goes. Delivery is at least
once: a 2xx lost with the connection, or a stop between the 2xx and the stream
acknowledgement, sends that verdict again.

The secret and any password in the URL are never logged; logs show the URL redacted.
"""

from __future__ import annotations

import hashlib
import hmac
import http.client
import ssl
from typing import Any
from urllib.parse import urlsplit

import structlog

from lineguard.engines.errors import ConfigError
from lineguard.stream.bus import Bus
from lineguard.stream.settings import WebhookSinkSettings, redacted_url
from lineguard.stream.sinks.payload import PAYLOAD_SCHEMA
from lineguard.stream.sinks.stage import Delivery, Outcome, ack_plain

log = structlog.get_logger("lineguard.sinks.webhook")

SIGNATURE_HEADER = "X-Lineguard-Signature"
RETRYABLE_STATUS = frozenset({408, 425, 429})


def sign(secret: bytes, body: bytes) -> str:
    """The signature header's value for ``body``: ``sha256=<hex HMAC-SHA256>``."""
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


class WebhookSink:
    """POSTs verdict payloads over one kept-alive HTTP(S) connection."""

    kind = "webhook"

    def __init__(self, cfg: WebhookSinkSettings) -> None:
        if cfg.url is None:
            raise ConfigError(
                "the webhook sink needs a URL: set LINEGUARD_SINKS__WEBHOOK__URL or pass --url"
            )
        if cfg.secret is None:
            raise ConfigError(
                "the webhook sink signs every request: set LINEGUARD_SINKS__WEBHOOK__SECRET "
                "(16+ characters, shared with the receiver)"
            )
        self.cfg = cfg
        self.url = cfg.url
        self.shown = redacted_url(cfg.url) or "?"
        parts = urlsplit(cfg.url)
        self._https = parts.scheme == "https"
        self._host = parts.hostname or ""
        self._port = parts.port
        self._path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self._auth: str | None = None
        if parts.username is not None:
            import base64

            raw = f"{parts.username}:{parts.password or ''}".encode()
            self._auth = "Basic " + base64.b64encode(raw).decode()
        self._secret = cfg.secret.get_secret_value().encode()
        self._conn: http.client.HTTPConnection | None = None
        self._ok = False

    def open(self, bus: Bus, group: str) -> None:
        log.info("sink.webhook_started", url=self.shown)

    def _connection(self) -> http.client.HTTPConnection:
        if self._conn is None:
            if self._https:
                self._conn = http.client.HTTPSConnection(
                    self._host, self._port, timeout=self.cfg.timeout_s,
                    context=ssl.create_default_context(),
                )  # fmt: skip
            else:
                self._conn = http.client.HTTPConnection(
                    self._host, self._port, timeout=self.cfg.timeout_s
                )
        return self._conn

    def _drop(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def headers(self, item: Delivery) -> dict[str, str]:
        h = {
            "Content-Type": "application/json",
            SIGNATURE_HEADER: sign(self._secret, item.body),
            "X-Lineguard-Frame-Key": item.event.key,
            "Idempotency-Key": item.event.key,
            "X-Lineguard-Schema": PAYLOAD_SCHEMA,
            "User-Agent": "lineguard-webhook/1",
        }
        if self._auth is not None:
            h["Authorization"] = self._auth
        return h

    def deliver(self, items: list[Delivery]) -> Outcome:
        for i, item in enumerate(items):
            try:
                conn = self._connection()
                conn.request("POST", self._path, body=item.body, headers=self.headers(item))
                resp = conn.getresponse()
                resp.read(64 * 1024)  # the body is not used; read a bounded part of it
                status = resp.status
                if resp.will_close or not resp.isclosed():  # closed = fully read: reusable
                    self._drop()
            except (OSError, http.client.HTTPException) as exc:
                self._drop()
                self._ok = False
                return Outcome(i, error=f"POST {self.shown} failed: {type(exc).__name__}: {exc}")
            if 200 <= status < 300:
                self._ok = True
                continue
            if status in RETRYABLE_STATUS or status >= 500:
                self._ok = False
                return Outcome(i, error=f"POST {self.shown} answered HTTP {status}")
            self._ok = True  # the receiver is up; it refuses this one request
            return Outcome(i, refused=f"POST {self.shown} answered HTTP {status}")
        return Outcome(len(items))

    def acknowledge(self, bus: Bus, group: str, items: list[Delivery]) -> None:
        ack_plain(bus, group, items)

    def committed(self, items: list[Delivery]) -> None:
        return None

    def wake(self) -> bool:
        return False  # nothing tells us the receiver is back but trying

    def connected(self) -> bool:
        return self._ok

    def status(self) -> dict[str, Any]:
        return {"url": self.shown}

    def close(self) -> None:
        self._drop()
