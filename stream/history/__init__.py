"""The verdict history: every event kept in SQLite or PostgreSQL, with the operator's marks.

- ``rows``: the row (``docs/schemas/history-v2.json``) and how an event becomes one;
- ``store``: the two tables in either database, written idempotently by frame key;
- ``archive``: rejects' pictures on disk under a retention limit;
- ``worker``: the ``history`` consumer group that fills it, exactly once;
- ``export``: CSV, Parquet and JSON lines for ``lineguard history --export``.
"""

from lineguard.stream.history.rows import MARKS, ROW_SCHEMA, HistoryRow, row_from_event
from lineguard.stream.history.store import HistoryStore, HistoryUnavailable

__all__ = [
    "MARKS",
    "ROW_SCHEMA",
    "HistoryRow",
    "HistoryStore",
    "HistoryUnavailable",
    "row_from_event",
]
