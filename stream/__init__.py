"""On the line: ingest, infer and decide workers over Redis Streams, and the ``lineguard`` CLI.

Imports ``engines`` only; training code in ``offline`` is loaded lazily by the CLI commands
that need it, so a GPU worker starts without it."""
