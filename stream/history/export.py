"""Exporting history rows: CSV, Parquet or JSON lines, chosen by the file's suffix.

Rows stream through in pages (``HistoryStore.iter_rows``), so an export of a month of a line
holds one page in memory. Every format has the columns of ``docs/schemas/history-v2.json`` in
the same order; ``contributions`` is a JSON object in JSON lines and JSON text in CSV and
Parquet (the branches differ between bundles, so it is not a fixed set of columns). Parquet
files carry the schema id in their key-value metadata (``lineguard.schema``).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Final

from lineguard.engines.errors import ConfigError
from lineguard.stream.history.rows import COLUMNS, ROW_SCHEMA, HistoryRow

FORMATS: Final = {".csv": "csv", ".parquet": "parquet", ".jsonl": "jsonl", ".ndjson": "jsonl"}
_PAGE: Final = 5_000


def export_format(path: Path) -> str:
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ConfigError(
            f"cannot tell the export format of {path.name}: name it .csv, .parquet or .jsonl"
        )
    return fmt


def export_rows(rows: Iterable[HistoryRow], path: Path) -> int:
    """Write ``rows`` to ``path`` in the format its suffix names; returns the row count."""
    fmt = export_format(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "csv":
        return _csv(rows, path)
    if fmt == "jsonl":
        return _jsonl(rows, path)
    return _parquet(rows, path)


def _csv(rows: Iterable[HistoryRow], path: Path) -> int:
    n = 0
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(COLUMNS)
        for r in rows:
            writer.writerow(["" if getattr(r, c) is None else getattr(r, c) for c in COLUMNS])
            n += 1
    return n


def _jsonl(rows: Iterable[HistoryRow], path: Path) -> int:
    n = 0
    with path.open("w", encoding="utf-8") as fh:
        for r in rows:
            fh.write(json.dumps(r.to_json(), separators=(",", ":")) + "\n")
            n += 1
    return n


def _arrow_schema() -> Any:
    import pyarrow as pa

    kinds = {
        "seq": pa.int64(),
        "t_capture": pa.float64(),
        "t_event": pa.float64(),
        "score": pa.float64(),
        "threshold": pa.float64(),
        "latency_ms": pa.float64(),
        "t_mark": pa.float64(),
    }
    return pa.schema(
        [pa.field(c, kinds.get(c, pa.string())) for c in COLUMNS],
        metadata={b"lineguard.schema": ROW_SCHEMA.encode()},
    )


def _parquet(rows: Iterable[HistoryRow], path: Path) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = _arrow_schema()
    n = 0
    page: list[HistoryRow] = []
    with pq.ParquetWriter(str(path), schema) as writer:

        def flush() -> None:
            columns = {c: [getattr(r, c) for r in page] for c in COLUMNS}
            writer.write_table(pa.Table.from_pydict(columns, schema=schema))
            page.clear()

        for r in rows:
            page.append(r)
            n += 1
            if len(page) >= _PAGE:
                flush()
        if page or n == 0:
            flush()
    return n
