"""One history row per verdict: what is kept of an event, and the operator's mark on it.

The row is the event flattened for a table: the frame key and the line epoch it was numbered
in (together the primary key, so writing the same event twice is a no-op, while a frame that
got a used key again after Redis lost its data is a row of its own), identity, times,
verdict, reason, fused score and threshold, each branch's contribution (JSON text: the
branches differ between bundles), the model version, the end-to-end latency and where the
reject's pictures were saved. Its published shape is ``docs/schemas/history-v2.json`` (v2
added ``epoch``; v1 readers refused the new column); ``ROW_SCHEMA`` names it in every
export, and a change that breaks a reader of v2 gets a new file and a new id. Rows written
before epochs existed have epoch ``""``.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Final, Literal, TypeAlias

from lineguard.stream.protocol import Event

ROW_SCHEMA: Final = "lineguard/history-v2"
Mark: TypeAlias = Literal["good", "defect"]
MARKS: Final[tuple[Mark, ...]] = ("good", "defect")
MAX_NOTE: Final = 500


def _finite(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


@dataclass(frozen=True, slots=True)
class HistoryRow:
    """A verdict as the history keeps it (column order = export column order)."""

    frame_key: str
    epoch: str
    line: str
    camera: str
    seq: int
    t_capture: float
    t_event: float
    verdict: str
    reason: str
    score: float | None
    threshold: float | None
    contributions: str
    model: str
    latency_ms: float | None
    image: str | None = None
    map: str | None = None
    mark: str | None = None
    t_mark: float | None = None

    def to_json(self) -> dict[str, Any]:
        """The export shape: ``contributions`` as an object, everything else as stored."""
        data = asdict(self)
        try:
            data["contributions"] = json.loads(self.contributions or "{}")
        except ValueError:
            data["contributions"] = {}
        return data


COLUMNS: Final[tuple[str, ...]] = tuple(f.name for f in fields(HistoryRow))
VERDICT_COLUMNS: Final[tuple[str, ...]] = COLUMNS[: COLUMNS.index("mark")]
"""The columns of the verdicts table (the mark lives in its own table)."""


def row_from_event(
    ev: Event, *, image: str | None = None, map_path: str | None = None
) -> HistoryRow:
    """The row of ``ev``; non-finite numbers become NULL (SQL and JSON have no NaN)."""
    total = ev.latency.get("total")
    contributions = {k: _finite(v) for k, v in ev.contributions.items()}
    return HistoryRow(
        frame_key=ev.key,
        epoch=ev.epoch,
        line=ev.line,
        camera=ev.camera,
        seq=int(ev.seq),
        t_capture=float(ev.t_capture),
        t_event=float(ev.t_event),
        verdict=ev.verdict,
        reason=ev.reason,
        score=_finite(ev.score),
        threshold=_finite(ev.threshold),
        contributions=json.dumps(contributions, separators=(",", ":"), sort_keys=True),
        model=ev.model,
        latency_ms=None if total is None or not math.isfinite(total) else round(total * 1000, 3),
        image=image,
        map=map_path,
    )
