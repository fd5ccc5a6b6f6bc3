"""The operators' marks as refit input: the saved pictures of the frames they marked.

``refit --feedback`` learns the frames marked ``good`` (false rejects) into a new bundle's
memory banks and checks that the frames marked ``defect`` are still rejected. Only frames
whose picture the history saved can be used: rejects with their frame still on the bounded
frames stream when the history worker wrote them, inside the retention limit. A missed
defect reported downstream on a *passed* frame has no saved picture; it is listed, not used.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from lineguard.stream.history.archive import ImageArchive
from lineguard.stream.history.store import HistoryStore


@dataclass
class Feedback:
    good: list[Path] = field(default_factory=list)
    defects: list[Path] = field(default_factory=list)
    missing: dict[str, list[str]] = field(default_factory=lambda: {"good": [], "defect": []})
    """Frame keys marked but without a saved picture, per mark."""


def collect_feedback(store: HistoryStore, images_root: Path) -> Feedback:
    """The pictures of every frame marked good or defect (see the module docstring)."""
    archive = ImageArchive(images_root, max_days=1e9, max_bytes=1 << 62)
    out = Feedback()
    for mark, target in (("good", out.good), ("defect", out.defects)):
        for key, rel in store.marked(mark):
            path = None
            if rel:
                try:
                    path = archive.path(rel)
                except ValueError:
                    path = None
            if path is not None and path.is_file():
                target.append(path)
            else:
                out.missing[mark].append(key)
    return out
