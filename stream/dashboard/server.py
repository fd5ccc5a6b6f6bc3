"""Serving the dashboard: uvicorn in a thread, beside the pipeline or on its own.

``DashboardServer`` binds its socket itself (so a port in use fails at once with a clear
message, and port 0 picks a free one), runs uvicorn in a daemon thread with the access log
off (query strings can carry the token), and owns the ``LineView`` and its Redis client.

Binding policy: loopback needs nothing; any other address needs a token, because the page
shows production images to whoever can reach the port and takes operators' marks.

The verdict history is used when one is configured (``history_configured``: a
``LINEGUARD_HISTORY__URL``, or the SQLite file already in ``LINEGUARD_HISTORY__DIR``) unless
``history=False``.
"""

from __future__ import annotations

import socket
import threading
import time
from typing import Final

import redis
import structlog

from lineguard.engines.errors import ConfigError, LineguardError
from lineguard.stream.binding import binding_problem
from lineguard.stream.bus import connect
from lineguard.stream.dashboard.app import create_app
from lineguard.stream.dashboard.data import DashboardConfig, LineView
from lineguard.stream.history.store import HistoryStore, history_configured
from lineguard.stream.settings import Settings

log = structlog.get_logger("lineguard.dashboard")

DEFAULT_PORT: Final = 8470
DEFAULT_HOST: Final = "127.0.0.1"


def check_binding(host: str, token: str | None) -> None:
    """Refuse a network-reachable dashboard without a token, and tokens too short to help."""
    problem = binding_problem(
        "dashboard", host, token, "pass --token T (or set LINEGUARD_DASHBOARD__TOKEN) and open "
        "it as /?token=T"
    )  # fmt: skip
    if problem:
        raise ConfigError(problem)


def _bind(host: str, port: int) -> socket.socket:
    try:
        family, kind, proto, _name, addr = socket.getaddrinfo(
            host.strip("[]"), port, type=socket.SOCK_STREAM
        )[0]
    except socket.gaierror as exc:
        raise ConfigError(f"dashboard host {host!r} cannot be resolved ({exc})") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as exc:
        sock.close()
        raise LineguardError(
            f"the dashboard cannot listen on {host}:{port} ({exc.strerror or exc}); pick "
            "another --port (0 = any free port)"
        ) from None
    sock.listen(128)
    sock.set_inheritable(False)
    return sock


class DashboardServer:
    """The dashboard of one line, served from a background thread; a context manager."""

    def __init__(
        self,
        settings: Settings,
        *,
        url: str | None = None,
        host: str = DEFAULT_HOST,
        port: int = DEFAULT_PORT,
        token: str | None = None,
        prefix: str | None = None,
        line: str | None = None,
        config: DashboardConfig | None = None,
        history: bool | None = None,
    ) -> None:
        check_binding(host, token)
        self.history = history_configured(settings) if history is None else history
        self.store: HistoryStore | None = None
        self.settings = settings
        self.redis_url = url
        self.host = host
        self.port = port
        self.token = token
        self.prefix = prefix
        self.line = line
        self.config = config or DashboardConfig()
        self.client: redis.Redis | None = None
        self.view: LineView | None = None
        self._server: object | None = None
        self._thread: threading.Thread | None = None
        self._app: object | None = None

    @property
    def url(self) -> str:
        """Where to open the page (without the token, which is never printed or logged)."""
        host = f"[{self.host}]" if ":" in self.host and not self.host.startswith("[") else self.host
        return f"http://{host}:{self.port}/"

    def start(self, ready_timeout_s: float = 10.0) -> DashboardServer:
        import uvicorn

        sock = _bind(self.host, self.port)
        self.port = int(sock.getsockname()[1])
        self.client = connect(self.settings, self.redis_url, client_name="lineguard-dashboard")
        if self.history:
            self.store = HistoryStore.from_settings(self.settings.history)
        self.view = LineView(
            self.client,
            self.settings,
            prefix=self.prefix,
            line=self.line,
            config=self.config,
            history=self.store,
        ).start()
        app = create_app(self.view, token=self.token)
        self._app = app
        config = uvicorn.Config(
            app,
            log_config=None,
            log_level="warning",
            access_log=False,  # the request line may hold ?token=
            lifespan="off",
            timeout_graceful_shutdown=2,
            ws="none",
        )
        server = uvicorn.Server(config)
        self._server = server
        self._thread = threading.Thread(
            target=server.run, kwargs={"sockets": [sock]}, name="dashboard-http", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + ready_timeout_s
        while not server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise LineguardError(
                    f"the dashboard did not start on {self.host}:{self.port}; see the log above"
                )
            time.sleep(0.02)
        log.info(
            "dashboard.started",
            url=self.url,
            line=self.view.line,
            prefix=self.view.pattern,
            token=self.token is not None,
        )
        return self

    def stop(self) -> None:
        app, server = self._app, self._server
        if app is not None:
            app.state.streams.closing = True  # type: ignore[attr-defined]
        if server is not None:
            server.should_exit = True  # type: ignore[attr-defined]
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        if self.view is not None:
            self.view.stop()
        if self.client is not None:
            self.client.close()
            self.client = None
        if self.store is not None:
            self.store.close()
            self.store = None
        self._server = self._app = None

    def __enter__(self) -> DashboardServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
