"""The history's tables, in SQLite (embedded, the default) or PostgreSQL, behind one class.

Two tables, ``<prefix>_verdicts`` (one row per frame key and line epoch, written once) and
``<prefix>_marks`` (the operator's latest mark per frame key and epoch, which may arrive before
the verdict row does: a missed defect reported downstream while the worker is behind). Both
dialects get the same statements apart from the parameter style and column types; ``ON
CONFLICT (frame_key, epoch) DO NOTHING`` is what makes a re-delivered event harmless, so the
worker can acknowledge the stream only after the commit and still never write a verdict twice.

The epoch is part of the key because the frame key alone repeats: the seq counters live in
Redis, and a server that lost its data numbers frames from 0 again. Keyed on the frame key
alone, every verdict of the new numbering whose key the history already had was dropped as a
duplicate. A bare frame key (``get``, ``mark``, ``marks``, as the CLI and dashboard pass it)
names its newest verdict. A mark made before any row of its frame key exists is kept under
epoch ``*`` and handed to the first row written with that key.

Tables from before the epoch (primary key ``frame_key``) are migrated when a store first
connects, in one transaction: PostgreSQL adds the column and moves the primary key; SQLite,
which cannot change a primary key, copies the table. Their rows get epoch ``""``.

Every database failure that may pass (server down, file locked, connection dropped) is raised
as ``HistoryUnavailable`` and the connection is dropped, so the next call reconnects; what
cannot pass (a bad URL, a schema clash) is a ``ConfigError``. SQLite runs in WAL mode with
``synchronous=FULL``: readers (the dashboard, ``lineguard history``) never block the
writer, and a commit the worker acknowledged survives a power cut as well as a crash.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Final, Literal, TypeAlias
from urllib.parse import urlsplit

import structlog

from lineguard.engines.errors import ConfigError, LineguardError
from lineguard.stream.history.rows import (
    COLUMNS,
    MARKS,
    MAX_NOTE,
    VERDICT_COLUMNS,
    HistoryRow,
)
from lineguard.stream.settings import HistorySettings, Settings, redacted_url

log = structlog.get_logger("lineguard.history")

Dialect: TypeAlias = Literal["sqlite", "postgresql"]
SQLITE_FILE: Final = "history.sqlite"
_TYPES: Final[dict[Dialect, dict[str, str]]] = {
    "sqlite": {"int": "INTEGER", "float": "REAL", "text": "TEXT"},
    "postgresql": {"int": "BIGINT", "float": "DOUBLE PRECISION", "text": "TEXT"},
}
PENDING_EPOCH: Final = "*"
"""The epoch of a mark made before any verdict row of its frame key existed (see above)."""
_KINDS: Final = {
    "frame_key": "text",
    "epoch": "text",
    "line": "text",
    "camera": "text",
    "seq": "int",
    "t_capture": "float",
    "t_event": "float",
    "verdict": "text",
    "reason": "text",
    "score": "float",
    "threshold": "float",
    "contributions": "text",
    "model": "text",
    "latency_ms": "float",
    "image": "text",
    "map": "text",
}


IN_CHUNK: Final = 400  # keys per IN (...) list; pairs take two parameters each, under 999


class HistoryUnavailable(LineguardError):
    """The history database cannot be reached or written right now (it may come back)."""


def _transient_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [sqlite3.OperationalError, OSError]
    try:
        import psycopg
    except ImportError:
        return tuple(errors)
    return (*errors, psycopg.OperationalError, psycopg.InterfaceError)


def describe(url: str | None, directory: Path) -> str:
    """Where the history is, password-free, for logs and messages."""
    if url is None:
        return str(directory / SQLITE_FILE)
    return redacted_url(url) or "?"


class HistoryStore:
    """One connection to the history; reconnects after ``HistoryUnavailable``."""

    def __init__(
        self,
        url: str | None = None,
        *,
        directory: Path | str = Path(".lineguard/history"),
        table_prefix: str = "lineguard",
        connect_timeout_s: float = 5.0,
    ) -> None:
        self.directory = Path(directory)
        self.url = url
        self.where = describe(url, self.directory)
        self.connect_timeout_s = connect_timeout_s
        scheme = urlsplit(url).scheme.lower().split("+")[0] if url else "sqlite"
        if scheme in ("postgresql", "postgres"):
            self.dialect: Dialect = "postgresql"
        elif scheme == "sqlite":
            self.dialect = "sqlite"
        else:
            raise ConfigError(
                f"LINEGUARD_HISTORY__URL={self.where} is neither postgresql:// nor sqlite:///"
            )
        self.path: Path | None = None
        if self.dialect == "sqlite":
            self.path = self._sqlite_path(url)
        self.verdicts = f"{table_prefix}_verdicts"
        self.marks_table = f"{table_prefix}_marks"
        self._ph = "?" if self.dialect == "sqlite" else "%s"
        self._conn: Any = None
        self._transient = _transient_errors()
        self._schema_ready = False

    @classmethod
    def from_settings(cls, settings: HistorySettings) -> HistoryStore:
        return cls(settings.url, directory=settings.dir, table_prefix=settings.table_prefix)

    def _sqlite_path(self, url: str | None) -> Path:
        if url is None:
            return self.directory / SQLITE_FILE
        path = urlsplit(url).path
        if not path or path == "/":
            raise ConfigError(
                f"LINEGUARD_HISTORY__URL={url} names no file; use sqlite:///path/history.sqlite"
            )
        return Path(path)

    # connection ---------------------------------------------------------------------

    def _connect(self) -> Any:
        if self._conn is not None:
            return self._conn
        if self.dialect == "sqlite":
            assert self.path is not None
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn: Any = sqlite3.connect(
                str(self.path), timeout=self.connect_timeout_s, check_same_thread=False
            )
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
        else:
            try:
                import psycopg
            except ImportError:  # pragma: no cover - a dependency of lineguard
                raise ConfigError(
                    "PostgreSQL history needs psycopg 3: pip install 'psycopg[binary]'"
                ) from None
            conn = psycopg.connect(
                self.url or "", connect_timeout=max(1, int(self.connect_timeout_s))
            )
        self._conn = conn
        if not self._schema_ready:
            self._create_schema(conn)
            self._schema_ready = True
        return conn

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):  # a broken connection: nothing left to save
                conn.close()

    def __enter__(self) -> HistoryStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _tx(self) -> Iterator[Any]:
        """One transaction; a transient failure drops the connection and is re-raised as
        ``HistoryUnavailable``, anything else rolls back and propagates."""
        try:
            conn = self._connect()
        except self._transient as exc:
            self.close()
            raise HistoryUnavailable(
                f"the history at {self.where} cannot be reached "
                f"({type(exc).__name__}: {str(exc).strip()[:200]})"
            ) from None
        try:
            cur = conn.cursor()
            yield cur
            conn.commit()
        except self._transient as exc:
            self.close()
            raise HistoryUnavailable(
                f"the history at {self.where} failed a write or read "
                f"({type(exc).__name__}: {str(exc).strip()[:200]})"
            ) from None
        except BaseException:
            try:
                conn.rollback()
            except self._transient:
                self.close()
            raise

    def _table_sql(self, table: str) -> str:
        types = _TYPES[self.dialect]
        text, num = types["text"], types["float"]
        if table == self.verdicts:
            cols = ", ".join(
                f"{c} {types[_KINDS[c]]}" + (" NOT NULL DEFAULT ''" if c == "epoch" else "")
                for c in VERDICT_COLUMNS
            )
            body = f"{cols}, t_stored {num}"
        else:
            body = (
                f"frame_key {text}, epoch {text} NOT NULL DEFAULT '', mark {text} NOT NULL, "
                f"t_mark {num} NOT NULL, source {text}, note {text}"
            )
        return f"CREATE TABLE IF NOT EXISTS {table} ({body}, PRIMARY KEY (frame_key, epoch))"

    def _create_schema(self, conn: Any) -> None:
        self._migrate(conn)
        statements = [
            self._table_sql(self.verdicts),
            f"CREATE INDEX IF NOT EXISTS {self.verdicts}_t "
            f"ON {self.verdicts} (t_capture, frame_key)",
            f"CREATE INDEX IF NOT EXISTS {self.verdicts}_cam_t "
            f"ON {self.verdicts} (camera, t_capture)",
            self._table_sql(self.marks_table),
        ]
        cur = conn.cursor()
        for sql in statements:
            cur.execute(sql)
        conn.commit()

    def _columns(self, cur: Any, table: str) -> list[str]:
        """The columns of ``table`` (empty if it does not exist)."""
        if self.dialect == "sqlite":
            cur.execute(f"PRAGMA table_info({table})")
            return [str(r[1]) for r in cur.fetchall()]
        cur.execute(
            "SELECT column_name FROM information_schema.columns "
            "WHERE table_schema = current_schema() AND table_name = %s",
            (table,),
        )
        return [str(r[0]) for r in cur.fetchall()]

    def _migrate(self, conn: Any) -> None:
        """Give tables from before the epoch the (frame_key, epoch) key (module docstring).

        Checked again under a write lock, so two processes opening an old history at once
        migrate it once; a failure rolls the whole migration back."""
        cur = conn.cursor()
        tables = (self.verdicts, self.marks_table)
        if not any(c and "epoch" not in c for c in (self._columns(cur, t) for t in tables)):
            conn.rollback()  # ends the read: nothing to do
            return
        try:
            if self.dialect == "sqlite":
                conn.rollback()
                cur.execute("BEGIN IMMEDIATE")  # the write lock, before the second look
            for table in tables:
                if self.dialect == "postgresql":
                    cur.execute(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")
                old = self._columns(cur, table)
                if not old or "epoch" in old:
                    continue
                self._migrate_table(cur, table, old)
                log.warning(
                    "history.migrated", table=table, where=self.where, key="frame_key, epoch"
                )
            conn.commit()
        except BaseException:
            with contextlib.suppress(Exception):
                conn.rollback()
            raise

    def _migrate_table(self, cur: Any, table: str, old: list[str]) -> None:
        if self.dialect == "postgresql":
            cur.execute(f"ALTER TABLE {table} ADD COLUMN epoch TEXT NOT NULL DEFAULT ''")
            cur.execute(
                "SELECT conname FROM pg_constraint WHERE conrelid = %s::regclass AND contype = 'p'",
                (table,),
            )
            for (name,) in cur.fetchall():
                cur.execute(f'ALTER TABLE {table} DROP CONSTRAINT "{name}"')
            cur.execute(f"ALTER TABLE {table} ADD PRIMARY KEY (frame_key, epoch)")
            return
        # SQLite cannot change a primary key: copy into a table of the new shape; the old
        # table's indexes go with it and _create_schema makes them again
        legacy = f"{table}__v1"
        cols = ", ".join(old)
        cur.execute(f"ALTER TABLE {table} RENAME TO {legacy}")
        cur.execute(self._table_sql(table))
        cur.execute(f"INSERT INTO {table} ({cols}, epoch) SELECT {cols}, '' FROM {legacy}")
        cur.execute(f"DROP TABLE {legacy}")

    # writing ------------------------------------------------------------------------

    def insert(self, rows: Sequence[HistoryRow]) -> int:
        """Write ``rows`` in one transaction; rows whose (frame key, epoch) is already there
        are skipped. Returns how many were new. Once this returns, they are committed."""
        if not rows:
            return 0
        cols = ", ".join((*VERDICT_COLUMNS, "t_stored"))
        marks = ", ".join([self._ph] * (len(VERDICT_COLUMNS) + 1))
        sql = (
            f"INSERT INTO {self.verdicts} ({cols}) VALUES ({marks}) "
            "ON CONFLICT (frame_key, epoch) DO NOTHING"
        )
        now = time.time()
        values = [(*(getattr(r, c) for c in VERDICT_COLUMNS), now) for r in rows]
        keys = [(r.frame_key, r.epoch) for r in rows]
        with self._tx() as cur:
            before = self._count_keys(cur, keys)
            cur.executemany(sql, values)
            self._claim_pending_marks(cur, rows)
        return len(set(keys)) - before

    def _count_keys(self, cur: Any, keys: list[tuple[str, str]]) -> int:
        """How many of ``keys`` (frame key, epoch) are already stored (inside the insert's
        transaction, so the number of new rows is exact whatever the driver's executemany
        rowcount says)."""
        total = 0
        unique = list(dict.fromkeys(keys))
        pair = f"({self._ph}, {self._ph})"
        for i in range(0, len(unique), IN_CHUNK):
            chunk = unique[i : i + IN_CHUNK]
            cur.execute(
                f"SELECT COUNT(*) FROM {self.verdicts} WHERE (frame_key, epoch) IN "
                f"(VALUES {', '.join([pair] * len(chunk))})",
                [x for k in chunk for x in k],
            )
            total += int(cur.fetchone()[0])
        return total

    def _key_chunks(self, keys: Sequence[str]) -> Iterator[tuple[list[str], str]]:
        """The distinct ``keys`` in chunks an ``IN (...)`` list can hold, each with its
        placeholders (SQLite allows at most 999 parameters per statement)."""
        unique = list(dict.fromkeys(keys))
        for i in range(0, len(unique), IN_CHUNK):
            chunk = unique[i : i + IN_CHUNK]
            yield chunk, ", ".join([self._ph] * len(chunk))

    def _claim_pending_marks(self, cur: Any, rows: Sequence[HistoryRow]) -> None:
        """Hand marks made before their verdict row existed (epoch ``*``) to the row of that
        frame key just written (the newest, if the batch holds several epochs of it)."""
        newest: dict[str, HistoryRow] = {}
        for r in rows:
            if r.frame_key not in newest or r.t_capture > newest[r.frame_key].t_capture:
                newest[r.frame_key] = r
        for chunk, ph in self._key_chunks(list(newest)):
            cur.execute(
                f"SELECT frame_key FROM {self.marks_table} WHERE epoch = {self._ph} "
                f"AND frame_key IN ({ph})",
                [PENDING_EPOCH, *chunk],
            )
            for (key,) in cur.fetchall():
                epoch = newest[str(key)].epoch
                # a mark the row already has (made on it by epoch) wins over the pending one
                cur.execute(
                    f"DELETE FROM {self.marks_table} WHERE frame_key = {self._ph} "
                    f"AND epoch = {self._ph} AND EXISTS (SELECT 1 FROM {self.marks_table} m "
                    f"WHERE m.frame_key = {self._ph} AND m.epoch = {self._ph})",
                    (key, PENDING_EPOCH, key, epoch),
                )
                cur.execute(
                    f"UPDATE {self.marks_table} SET epoch = {self._ph} "
                    f"WHERE frame_key = {self._ph} AND epoch = {self._ph}",
                    (epoch, key, PENDING_EPOCH),
                )

    def _newest_epochs(self, cur: Any, keys: Sequence[str]) -> dict[str, str]:
        """The epoch of each frame key's newest verdict row (keys without a row are left
        out): what a bare frame key names."""
        out: dict[str, tuple[float, str]] = {}
        for chunk, ph in self._key_chunks(keys):
            cur.execute(
                f"SELECT frame_key, epoch, t_capture FROM {self.verdicts} "
                f"WHERE frame_key IN ({ph})",
                chunk,
            )
            for key, epoch, t in cur.fetchall():
                at = (float(t or 0.0), str(epoch))
                if str(key) not in out or at > out[str(key)]:
                    out[str(key)] = at
        return {k: e for k, (_t, e) in out.items()}

    def mark(
        self,
        frame_key: str,
        mark: str,
        *,
        epoch: str | None = None,
        source: str = "cli",
        note: str = "",
    ) -> None:
        """Record the operator's mark on a frame (the latest mark wins); without ``epoch``,
        on the newest verdict of ``frame_key``, or the first one written if none is yet."""
        if mark not in MARKS:
            raise ConfigError(f"mark {mark!r} is not one of {', '.join(MARKS)}")
        sql = (
            f"INSERT INTO {self.marks_table} (frame_key, epoch, mark, t_mark, source, note) "
            f"VALUES ({', '.join([self._ph] * 6)}) ON CONFLICT (frame_key, epoch) DO UPDATE "
            "SET mark = excluded.mark, t_mark = excluded.t_mark, source = excluded.source, "
            "note = excluded.note"
        )
        with self._tx() as cur:
            if epoch is None:
                epoch = self._newest_epochs(cur, [frame_key]).get(frame_key, PENDING_EPOCH)
            row = (frame_key, epoch, mark, time.time(), source[:40], note[:MAX_NOTE])
            cur.execute(sql, row)

    # reading ------------------------------------------------------------------------

    def _where(
        self,
        since: float | None,
        until: float | None,
        camera: str | None,
        verdict: str | None,
        model: str | None,
        mark: str | None,
    ) -> tuple[str, list[Any]]:
        clauses: list[str] = []
        args: list[Any] = []
        for sql, value in (
            ("v.t_capture >= {}", since),
            ("v.t_capture < {}", until),
            ("v.camera = {}", camera),
            ("v.verdict = {}", verdict),
            ("v.model = {}", model),
            ("m.mark = {}", mark),
        ):
            if value is not None:
                clauses.append(sql.format(self._ph))
                args.append(value)
        return (" WHERE " + " AND ".join(clauses)) if clauses else "", args

    def _select_rows(self) -> str:
        """SELECT of the ``HistoryRow`` columns: each verdict row with its mark, if any."""
        cols = ", ".join([f"v.{c}" for c in VERDICT_COLUMNS] + ["m.mark", "m.t_mark"])
        return (
            f"SELECT {cols} FROM {self.verdicts} v LEFT JOIN {self.marks_table} m "
            f"ON m.frame_key = v.frame_key AND m.epoch = v.epoch"
        )

    def query(
        self,
        *,
        since: float | None = None,
        until: float | None = None,
        camera: str | None = None,
        verdict: str | None = None,
        model: str | None = None,
        mark: str | None = None,
        limit: int | None = None,
        newest_first: bool = False,
    ) -> list[HistoryRow]:
        """Rows in capture order (or newest first), with their marks."""
        return list(
            self.iter_rows(
                since=since,
                until=until,
                camera=camera,
                verdict=verdict,
                model=model,
                mark=mark,
                limit=limit,
                newest_first=newest_first,
            )
        )

    def iter_rows(
        self,
        *,
        since: float | None = None,
        until: float | None = None,
        camera: str | None = None,
        verdict: str | None = None,
        model: str | None = None,
        mark: str | None = None,
        limit: int | None = None,
        newest_first: bool = False,
        page: int = 5_000,
    ) -> Iterator[HistoryRow]:
        """Like ``query`` but in pages, so an export of millions of rows holds one page in
        memory at a time. Pages continue after the last row's (capture time, frame key,
        epoch) rather than by OFFSET, so each page costs the same however deep the export
        is (the epoch breaks ties: verdicts of lost frames of two epochs share key and time 0)."""
        where, args = self._where(since, until, camera, verdict, model, mark)
        order, cmp = ("DESC", "<") if newest_first else ("ASC", ">")
        select = self._select_rows()
        tail = f" ORDER BY v.t_capture {order}, v.frame_key {order}, v.epoch {order} LIMIT "
        after = f"(v.t_capture, v.frame_key, v.epoch) {cmp} ({self._ph}, {self._ph}, {self._ph})"
        left = limit
        last: tuple[float, str, str] | None = None
        t_at, key_at = COLUMNS.index("t_capture"), COLUMNS.index("frame_key")
        epoch_at = COLUMNS.index("epoch")
        while left is None or left > 0:
            n = page if left is None else min(page, left)
            if last is None:
                sql, page_args = f"{select}{where}{tail}{int(n)}", args
            else:
                joiner = " AND " if where else " WHERE "
                sql, page_args = f"{select}{where}{joiner}{after}{tail}{int(n)}", [*args, *last]
            with self._tx() as cur:
                cur.execute(sql, page_args)
                batch = cur.fetchall()
            for raw in batch:
                yield HistoryRow(**dict(zip(COLUMNS, raw, strict=True)))
            if len(batch) < n:
                return
            last = (batch[-1][t_at], batch[-1][key_at], batch[-1][epoch_at])
            if left is not None:
                left -= len(batch)

    def get(self, frame_key: str, epoch: str | None = None) -> HistoryRow | None:
        """One frame's row with its mark (without ``epoch``, its newest verdict), or None if
        the history has no verdict for it."""
        sql = f"{self._select_rows()} WHERE v.frame_key = {self._ph}"
        args: list[Any] = [frame_key]
        if epoch is not None:
            sql += f" AND v.epoch = {self._ph}"
            args.append(epoch)
        sql += " ORDER BY v.t_capture DESC, v.epoch DESC LIMIT 1"
        with self._tx() as cur:
            cur.execute(sql, args)
            raw = cur.fetchone()
        return None if raw is None else HistoryRow(**dict(zip(COLUMNS, raw, strict=True)))

    def counts(
        self,
        *,
        since: float | None = None,
        until: float | None = None,
        camera: str | None = None,
    ) -> dict[str, int]:
        """Rows per verdict in a capture-time range (the dashboard's shift counts)."""
        where, args = self._where(since, until, camera, None, None, None)
        sql = f"SELECT v.verdict, COUNT(*) FROM {self.verdicts} v{where} GROUP BY v.verdict"
        with self._tx() as cur:
            cur.execute(sql, args)
            return {str(v): int(n) for v, n in cur.fetchall()}

    def count(self) -> int:
        with self._tx() as cur:
            cur.execute(f"SELECT COUNT(*) FROM {self.verdicts}")
            return int(cur.fetchone()[0])

    def marks(self, keys: Sequence[str]) -> dict[str, str]:
        """The marks of these frame keys (those that have one): each key's newest verdict's
        mark, or its pending mark if it has no verdict row yet."""
        out: dict[str, str] = {}
        for chunk, ph in self._key_chunks(keys):
            with self._tx() as cur:
                newest = self._newest_epochs(cur, chunk)
                cur.execute(
                    f"SELECT frame_key, epoch, mark FROM {self.marks_table} "
                    f"WHERE frame_key IN ({ph})",
                    chunk,
                )
                for k, e, m in cur.fetchall():
                    if str(e) == newest.get(str(k), PENDING_EPOCH):
                        out[str(k)] = str(m)
        return out

    def marked(self, mark: str) -> list[tuple[str, str | None]]:
        """(frame key, saved image or None) of every frame marked ``mark``, including marks
        whose verdict row has not been written yet."""
        sql = (
            f"SELECT m.frame_key, v.image FROM {self.marks_table} m LEFT JOIN {self.verdicts} v "
            f"ON v.frame_key = m.frame_key AND v.epoch = m.epoch WHERE m.mark = {self._ph} "
            "ORDER BY m.t_mark"
        )
        with self._tx() as cur:
            cur.execute(sql, (mark,))
            return [(str(k), None if p is None else str(p)) for k, p in cur.fetchall()]

    def drop(self) -> None:
        """Delete both tables (tests, and a plant starting its history afresh)."""
        with self._tx() as cur:
            for table in (self.verdicts, self.marks_table):
                cur.execute(f"DROP TABLE IF EXISTS {table}")
        self._schema_ready = False
        self.close()  # the next use connects afresh and creates the tables again


def history_configured(settings: Settings) -> bool:
    """True when this machine has a history to read: a URL is set, or the default SQLite
    file exists (the history worker creates it)."""
    h = settings.history
    return h.url is not None or (h.dir / SQLITE_FILE).is_file()


def rows_json(rows: Sequence[HistoryRow]) -> str:
    """Rows as one JSON array (``lineguard history --format json``)."""
    return json.dumps([r.to_json() for r in rows], separators=(",", ":"))
