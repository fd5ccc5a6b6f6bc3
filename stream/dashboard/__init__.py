"""The operator dashboard: a live page for the line, fed from the bus alone.

``lineguard dashboard`` (or ``run``/``demo`` with ``--dashboard``) serves it. ``data.py``
reads the bus and builds the snapshot, ``images.py`` draws the reject pictures, ``app.py`` is
the ASGI app and ``server.py`` runs it under uvicorn; the page itself is plain HTML, CSS and
a hand-written script in ``static/``.
"""

from lineguard.stream.dashboard.data import DashboardConfig, LineView, discover_prefix
from lineguard.stream.dashboard.server import (
    DEFAULT_HOST,
    DEFAULT_PORT,
    DashboardServer,
    check_binding,
)

__all__ = [
    "DEFAULT_HOST",
    "DEFAULT_PORT",
    "DashboardConfig",
    "DashboardServer",
    "LineView",
    "check_binding",
    "discover_prefix",
]
