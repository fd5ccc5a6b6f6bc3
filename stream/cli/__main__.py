"""``python -m lineguard.stream.cli``: how ``lineguard run`` starts its worker processes."""

from lineguard.stream.cli import app

app()
