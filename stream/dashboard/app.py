"""The dashboard's ASGI app: a page, its static assets, a JSON snapshot, an SSE stream, images,
and one write: an operator's mark on a reject.

The bus is only ever read: every route but ``POST /api/mark`` is GET (Starlette answers
anything else with 405), and the mark goes to the verdict history, never to a stream. The
snapshot is built once per tick by the view; each SSE client just gets the newest bytes when
they change, so a slow or stalled browser delays nobody but itself.

``POST /api/mark`` takes ``{"key": "line/camera/seq", "mark": "good"|"defect"}`` as
``application/json`` (a cross-site HTML form cannot send that without the browser asking
first, and a request whose ``Origin`` is another site is refused), at most 1 KiB.

With a token set, every request except the static assets and ``/healthz`` must carry it, as
``?token=`` or in an ``Authorization: Bearer`` or ``X-Lineguard-Token`` header. Tokens are
compared in constant time and never logged (the access log is off; see ``server.py``).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Final
from urllib.parse import parse_qs, urlsplit

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lineguard.engines.errors import ConfigError
from lineguard.stream.dashboard.data import LineView
from lineguard.stream.dashboard.images import IMAGE_KINDS
from lineguard.stream.history.rows import MARKS
from lineguard.stream.history.store import HistoryUnavailable
from lineguard.stream.settings import NAME_PATTERN

STATIC_DIR: Final = Path(__file__).resolve().parent / "static"
PUBLIC_PREFIXES: Final = ("/static/", "/healthz")
_CAMERA_RE: Final = re.compile(NAME_PATTERN)
_KEY_RE: Final = re.compile(
    r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}/[A-Za-z0-9][A-Za-z0-9_.-]{0,63}/\d{9,}$"
)
_MAX_MARK_BODY: Final = 1024
_SECURITY_HEADERS: Final = [
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),  # a token in the URL must not leak to other sites
    (b"x-frame-options", b"DENY"),
    (
        b"content-security-policy",
        b"default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
        b"connect-src 'self'; frame-ancestors 'none'",
    ),
]


class TokenGate:
    """ASGI middleware: the token check (when one is set) and the security headers."""

    def __init__(self, app: ASGIApp, token: str | None) -> None:
        self.app = app
        self.token = token.encode() if token else None

    def _allowed(self, scope: Scope) -> bool:
        if self.token is None or scope["path"].startswith(PUBLIC_PREFIXES):
            return True
        given: list[bytes] = []
        query = scope.get("query_string", b"").decode("latin-1")
        given += [v.encode() for v in parse_qs(query).get("token", [])]
        for name, value in scope.get("headers", ()):
            if name == b"authorization" and value[:7].lower() == b"bearer ":
                given.append(value[7:].strip())
            elif name == b"x-lineguard-token":
                given.append(value.strip())
        return any(hmac.compare_digest(g, self.token) for g in given)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], *_SECURITY_HEADERS]
            await send(message)

        if not self._allowed(scope):
            response = JSONResponse(
                {"error": "this dashboard needs its token: open it as /?token=… "
                 "or send an Authorization: Bearer header"},
                status_code=401,
            )  # fmt: skip
            await response(scope, receive, send_with_headers)
            return
        await self.app(scope, receive, send_with_headers)


class _Streams:
    """Counts open SSE streams (bounded) and tells them when the server shuts down."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.open = 0
        self.closing = False


def create_app(
    view: LineView,
    *,
    token: str | None = None,
    max_streams: int = 32,
    push_interval_s: float = 0.25,
    keepalive_s: float = 15.0,
) -> Starlette:
    """The dashboard for ``view``; ``app.state.streams.closing = True`` ends SSE streams."""
    streams = _Streams(max_streams)
    no_store = {"Cache-Control": "no-store"}

    async def index(_request: Request) -> Response:
        return FileResponse(STATIC_DIR / "index.html", headers=no_store)

    async def healthz(_request: Request) -> Response:
        return JSONResponse({"ok": True}, headers=no_store)

    async def state(_request: Request) -> Response:
        return Response(view.snapshot_json(), media_type="application/json", headers=no_store)

    async def stream(request: Request) -> Response:
        if streams.open >= streams.limit or streams.closing:
            return JSONResponse(
                {"error": f"too many live pages ({streams.limit}); poll /api/state instead"},
                status_code=503,
                headers=no_store,
            )
        streams.open += 1

        async def events() -> AsyncIterator[bytes]:
            try:
                yield b"retry: 2000\n\n"
                sent_version = -1
                last_send = 0.0
                loop = asyncio.get_running_loop()
                while not streams.closing:
                    version = view.version
                    now = loop.time()
                    if version != sent_version:
                        sent_version = version
                        last_send = now
                        yield b"event: state\ndata: " + view.snapshot_json() + b"\n\n"
                    elif now - last_send > keepalive_s:
                        last_send = now
                        yield b": keep-alive\n\n"
                    if await request.is_disconnected():
                        break
                    await asyncio.sleep(push_interval_s)
            finally:
                streams.open -= 1

        headers = {**no_store, "X-Accel-Buffering": "no"}
        return StreamingResponse(events(), media_type="text/event-stream", headers=headers)

    async def image(request: Request) -> Response:
        camera = request.path_params["camera"]
        seq = request.path_params["seq"]
        kind = request.path_params["kind"]
        if kind not in IMAGE_KINDS or not _CAMERA_RE.match(camera):
            return JSONResponse({"error": "unknown image"}, status_code=404, headers=no_store)
        pic = view.image(camera, seq, kind)
        if pic is None:
            what = "frame no longer available" if kind in ("frame", "thumb") else "not available"
            return JSONResponse({"error": what}, status_code=404, headers=no_store)
        # a frame key names one capture forever, so its pictures never change
        headers = {"Cache-Control": "private, max-age=3600, immutable"}
        return Response(pic.data, media_type=pic.media_type, headers=headers)

    async def mark(request: Request) -> Response:
        def refuse(status: int, why: str) -> Response:
            return JSONResponse({"error": why}, status_code=status, headers=no_store)

        origin = request.headers.get("origin")
        if origin is not None and urlsplit(origin).netloc != request.headers.get("host"):
            return refuse(403, "marks are accepted from this dashboard's own page only")
        if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
            return refuse(415, "send the mark as application/json")
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > _MAX_MARK_BODY:
                return refuse(413, f"a mark is at most {_MAX_MARK_BODY} bytes")
        try:
            data = json.loads(body)
        except ValueError:
            return refuse(400, "the body is not JSON")
        key = data.get("key") if isinstance(data, dict) else None
        what = data.get("mark") if isinstance(data, dict) else None
        if not isinstance(key, str) or not _KEY_RE.match(key):
            return refuse(400, "key must be a frame key, line/camera/seq")
        if key.split("/", 1)[0] != view.line:
            return refuse(400, f"{key} is not a frame of line {view.line}")
        if what not in MARKS:
            return refuse(400, f"mark must be one of {', '.join(MARKS)}")
        try:
            await run_in_threadpool(view.mark, key, what)
        except ConfigError as exc:
            return refuse(409, str(exc))
        except HistoryUnavailable as exc:
            return refuse(503, str(exc))
        return JSONResponse({"ok": True, "key": key, "mark": what}, headers=no_store)

    async def not_found(_request: Request, _exc: Any) -> Response:
        return JSONResponse({"error": "not found"}, status_code=404, headers=no_store)

    routes = [
        Route("/", index),
        Route("/healthz", healthz),
        Route("/api/state", state),
        Route("/api/stream", stream),
        Route("/api/image/{camera}/{seq:int}/{kind}", image),
        Route("/api/mark", mark, methods=["POST"]),
        Mount("/static", app=StaticFiles(directory=STATIC_DIR), name="static"),
    ]
    app = Starlette(routes=routes, exception_handlers={404: not_found})
    app.state.streams = streams
    app.state.view = view
    app.add_middleware(TokenGate, token=token)
    return app
