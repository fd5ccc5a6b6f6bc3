"""OPC UA sink: a server that shows each camera's last verdict and counters to a PLC or SCADA.

Address space, under ``Objects/<line>`` in namespace ``LINEGUARD_SINKS__OPCUA__NAMESPACE``,
one object per camera (created when its first verdict arrives), with string NodeIds that a
PLC program can name directly: ``ns=<idx>;s=<line>.<camera>.<Variable>``:

==================  ========  ===================================================
Variable            Type      Meaning
==================  ========  ===================================================
Verdict             String    pass, fail, uninspected or error (last verdict)
FrameKey            String    its frame key (line/camera/seq)
Score, Threshold    Double    fused score and threshold (NaN when not scored)
Reason, Model       String    why, and which model version
CaptureTime         DateTime  when the frame was captured (UTC)
EventId             String    its entry id in the events stream
PassCount …         UInt64    PassCount, FailCount, UninspectedCount, ErrorCount,
                              TotalCount: verdicts since the sink group was created
==================  ========  ===================================================

The counters and the last verdict are kept in Redis and updated by the same script that
acknowledges the stream entry, only when that acknowledgement took effect, so they count
each event exactly once across restarts, crashes and retried calls, and a restarted server
shows the same values at once. Nodes are read-only for clients.

Binding follows ``lineguard.stream.binding``: 127.0.0.1 by default; any other address needs
``LINEGUARD_SINKS__OPCUA__USERNAME``/``PASSWORD``, and with a password set anonymous
sessions are refused. The server offers security policy None only, so on a plant network
the password is protected by the network, not by OPC UA encryption: keep it on a cell VLAN
or loopback.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import math
import threading
from collections.abc import Coroutine
from datetime import datetime, timezone
from typing import Any, TypeVar, cast

import structlog

from lineguard.engines.errors import ConfigError
from lineguard.stream.bus import Bus
from lineguard.stream.protocol import VERDICTS
from lineguard.stream.settings import OpcuaSinkSettings
from lineguard.stream.sinks.stage import Delivery, Outcome
from lineguard.stream.worker import line_key

log = structlog.get_logger("lineguard.sinks.opcua")

T = TypeVar("T")

MAX_CAMERAS = 1024  # forged camera names in the stream must not grow the address space forever
COUNTERS = {v: f"{v.capitalize()}Count" for v in VERDICTS}
_START_TIMEOUT_S = 30.0

# KEYS: events stream, state hash; ARGV: group, then (entry id, camera, verdict, payload)...
_ACK_AND_COUNT = """
local group = ARGV[1]
for i = 2, #ARGV, 4 do
  if redis.call('XACK', KEYS[1], group, ARGV[i]) == 1 then
    redis.call('HINCRBY', KEYS[2], ARGV[i + 1] .. '|' .. ARGV[i + 2], 1)
    redis.call('HSET', KEYS[2], ARGV[i + 1] .. '|last', ARGV[i + 3])
  end
end
return 1
"""
_WRITE_TIMEOUT_S = 5.0


class OpcuaSink:
    """Runs an asyncua server on its own event loop thread; ``committed`` writes the nodes."""

    kind = "opcua"

    def __init__(self, cfg: OpcuaSinkSettings, line: str) -> None:
        self.cfg = cfg
        self.line = line
        self.endpoint = f"opc.tcp://{cfg.host}:{cfg.port}/{cfg.path}"
        self.state: dict[str, dict[str, Any]] = {}  # camera -> counters and last payload
        self.state_key = ""
        self._script: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: Any = None
        self._idx = 0
        self._root: Any = None
        self._cameras: dict[str, dict[str, Any]] = {}  # camera -> variable name -> node

    # the server's loop ---------------------------------------------------------------

    def _run(self, coro: Coroutine[Any, Any, T], timeout: float) -> T:
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    async def _start(self) -> None:
        from asyncua import Server, ua

        users = None
        if self.cfg.password is not None:
            users = _Users(self.cfg.username or "", self.cfg.password.get_secret_value())
        server = Server(user_manager=cast(Any, users))
        await server.init()
        server.set_endpoint(self.endpoint)
        server.set_server_name(f"lineguard {self.line}")
        server.set_security_policy([ua.SecurityPolicyType.NoSecurity])
        if users is not None:
            server.set_identity_tokens([ua.UserNameIdentityToken])
        self._idx = await server.register_namespace(self.cfg.namespace)
        self._root = await server.nodes.objects.add_object(
            f"ns={self._idx};s={self.line}", f"{self._idx}:{self.line}"
        )
        await server.start()
        self._server = server
        for camera in list(self.state)[:MAX_CAMERAS]:
            await self._write_camera(camera)

    async def _camera_nodes(self, camera: str) -> dict[str, Any] | None:
        from asyncua import ua

        nodes = self._cameras.get(camera)
        if nodes is not None:
            return nodes
        if len(self._cameras) >= MAX_CAMERAS:
            return None
        idx, base = self._idx, f"{self.line}.{camera}"
        obj = await self._root.add_object(f"ns={idx};s={base}", f"{idx}:{camera}")
        spec: list[tuple[str, Any, Any]] = [
            ("Verdict", "", ua.VariantType.String),
            ("FrameKey", "", ua.VariantType.String),
            ("Score", math.nan, ua.VariantType.Double),
            ("Threshold", math.nan, ua.VariantType.Double),
            ("Reason", "", ua.VariantType.String),
            ("Model", "", ua.VariantType.String),
            ("CaptureTime", datetime.fromtimestamp(0, tz=timezone.utc), ua.VariantType.DateTime),
            ("EventId", "", ua.VariantType.String),
            *((name, 0, ua.VariantType.UInt64) for name in (*COUNTERS.values(), "TotalCount")),
        ]
        made: dict[str, Any] = {}
        for name, value, vtype in spec:
            made[name] = await obj.add_variable(
                f"ns={idx};s={base}.{name}", f"{idx}:{name}", value, vtype
            )
        self._cameras[camera] = made
        return made

    async def _write_camera(self, camera: str) -> None:
        from asyncua import ua

        nodes = await self._camera_nodes(camera)
        if nodes is None:
            return
        st = self.state.get(camera, {})
        last = st.get("last") or {}
        t_capture = last.get("t_capture")
        values: list[tuple[str, Any, Any]] = [
            (COUNTERS[v], int(st.get(v, 0)), ua.VariantType.UInt64) for v in VERDICTS
        ]
        values.append(
            ("TotalCount", sum(int(st.get(v, 0)) for v in VERDICTS), ua.VariantType.UInt64)
        )
        if last:
            score, threshold = last.get("score"), last.get("threshold")
            values += [
                ("Verdict", str(last.get("verdict", "")), ua.VariantType.String),
                ("FrameKey", str(last.get("frame_key", "")), ua.VariantType.String),
                ("Score", math.nan if score is None else float(score), ua.VariantType.Double),
                (
                    "Threshold",
                    math.nan if threshold is None else float(threshold),
                    ua.VariantType.Double,
                ),
                ("Reason", str(last.get("reason", "")), ua.VariantType.String),
                ("Model", str(last.get("model", "")), ua.VariantType.String),
                ("EventId", str(last.get("event_id", "")), ua.VariantType.String),
            ]
            if isinstance(t_capture, int | float):
                when = datetime.fromtimestamp(t_capture, tz=timezone.utc)
                values.append(("CaptureTime", when, ua.VariantType.DateTime))
        for name, value, vtype in values:
            await self._server.write_attribute_value(
                nodes[name].nodeid, ua.DataValue(ua.Variant(value, vtype))
            )

    async def _write_cameras(self, cameras: list[str]) -> None:
        for camera in cameras:
            await self._write_camera(camera)

    # Sink ------------------------------------------------------------------------

    def bind(self, bus: Bus, group: str) -> None:
        """Where this sink's state lives, and the script that moves it (no server yet)."""
        self.state_key = line_key(bus, "sinkstate", group)
        self._script = bus.client.register_script(_ACK_AND_COUNT)

    def open(self, bus: Bus, group: str) -> None:
        self.bind(bus, group)
        self._load(bus)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="opcua", daemon=True)
        self._thread.start()
        try:
            self._run(self._start(), _START_TIMEOUT_S)
        except (OSError, asyncio.TimeoutError, TimeoutError) as exc:
            self.close()
            raise ConfigError(
                f"cannot serve OPC UA at {self.endpoint} ({type(exc).__name__}: {exc}); pick a "
                "free port with LINEGUARD_SINKS__OPCUA__PORT or --port"
            ) from None
        log.info(
            "sink.opcua_serving",
            endpoint=self.endpoint,
            namespace=self.cfg.namespace,
            auth="username" if self.cfg.password is not None else "anonymous",
            cameras=len(self.state),
        )

    def _load(self, bus: Bus) -> None:
        """The counters and last verdicts committed so far (see ``commit``)."""
        for raw_field, raw_value in bus.client.hgetall(self.state_key).items():
            name = raw_field.decode() if isinstance(raw_field, bytes) else str(raw_field)
            camera, _, what = name.rpartition("|")
            if not camera:
                continue
            st = self.state.setdefault(camera, {})
            try:
                if what == "last":
                    st["last"] = json.loads(raw_value)
                elif what in VERDICTS:
                    st[what] = int(raw_value)
            except (ValueError, TypeError):
                log.warning("sink.opcua_bad_state", field=name)

    def deliver(self, items: list[Delivery]) -> Outcome:
        # the nodes are written once the events are committed (exactly-once counters)
        if self._thread is None or not self._thread.is_alive() or self._server is None:
            return Outcome(0, error=f"the OPC UA server at {self.endpoint} is not running")
        return Outcome(len(items))

    def acknowledge(self, bus: Bus, group: str, items: list[Delivery]) -> None:
        """XACK each item and count it in the same script, only if that XACK acknowledged
        it: a retried call (a reply lost with the connection) counts nothing twice."""
        args: list[Any] = [group]
        for item in items:
            ev = item.event
            args += [item.entry_id, ev.camera, ev.verdict, item.body]
        self._script(keys=[bus.key("events"), self.state_key], args=args)

    def committed(self, items: list[Delivery]) -> None:
        touched: list[str] = []
        for item in items:
            ev = item.event
            st = self.state.setdefault(ev.camera, {})
            st[ev.verdict] = int(st.get(ev.verdict, 0)) + 1
            st["last"] = item.payload
            if ev.camera not in touched:
                touched.append(ev.camera)
        try:
            self._run(self._write_cameras(touched), _WRITE_TIMEOUT_S)
        except Exception as exc:  # the state is committed; the nodes catch up next time
            log.warning("sink.opcua_write_failed", error=f"{type(exc).__name__}: {exc}")

    def wake(self) -> bool:
        return False

    def connected(self) -> bool:
        return self._server is not None

    def status(self) -> dict[str, Any]:
        return {"endpoint": self.endpoint, "cameras": len(self.state)}

    def close(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None:
            return
        if self._server is not None:
            try:
                self._run(self._server.stop(), 10.0)
            except Exception as exc:  # stopping is best effort; the thread is a daemon
                log.warning("sink.opcua_stop_failed", error=f"{type(exc).__name__}: {exc}")
            self._server = None
        loop.call_soon_threadsafe(loop.stop)
        if thread is not None:
            thread.join(timeout=5)
        loop.close()
        self._loop = self._thread = None
        self._cameras.clear()


class _Users:
    """One username and password, compared in constant time; everyone else is refused."""

    def __init__(self, username: str, password: str) -> None:
        self._username = username.encode()
        self._password = password.encode()

    def get_user(
        self,
        iserver: Any,
        username: str | None = None,
        password: str | None = None,
        certificate: Any = None,
    ) -> Any:
        from asyncua.crypto.permission_rules import User, UserRole

        ok_user = hmac.compare_digest((username or "").encode(), self._username)
        ok_pass = hmac.compare_digest((password or "").encode(), self._password)
        if ok_user and ok_pass:
            return User(role=UserRole.User, name=username)
        return None
