"""Rejects' pictures on disk, under a retention limit in days and in bytes.

The history worker saves a reject's frame (the bytes ingest put on the bus: the line's own
JPEG or PNG, or a PNG of a raw frame) and, when infer sent one, its anomaly map as a grey PNG,
as ``<camera>/<YYYYMMDD>/<seq>-<epoch>.<ext>`` under ``dir/images`` (``<seq>.<ext>`` for a
frame without an epoch, as before epochs existed). The epoch is in the name because the seq
is not unique: a Redis server that lost its data numbers frames from 0 again, and the same
day's new frame 42 overwrote the picture of the old one. The database stores the path
relative to that folder, so the folder can move with the volume. Saving the same frame
again writes the same file, so a redelivered event costs a rewrite, never a second copy.

``prune()`` deletes pictures older than ``max_days`` and then the oldest ones until the
folder holds at most ``max_bytes``; the worker calls it every minute, and at once when the
bytes written since the last prune could have crossed the limit.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import structlog

from lineguard.stream.protocol import Frame, LowResMap, ProtocolError, decode_image

log = structlog.get_logger("lineguard.history")

_EXT = {"jpeg": ".jpg", "png": ".png"}


@dataclass(frozen=True)
class PruneResult:
    removed: int
    removed_bytes: int
    kept: int
    kept_bytes: int


class ImageArchive:
    """The pictures folder of the history (see the module docstring)."""

    def __init__(self, root: Path | str, *, max_days: float, max_bytes: int) -> None:
        self.root = Path(root)
        self.max_days = max_days
        self.max_bytes = max_bytes
        self._written_since_prune = 0
        self._bytes_at_prune = 0

    def _relpath(self, camera: str, seq: int, t_capture: float, epoch: str, suffix: str) -> str:
        day = time.strftime("%Y%m%d", time.gmtime(t_capture))
        tag = f"-{epoch}" if epoch else ""
        return f"{camera}/{day}/{seq:09d}{tag}{suffix}"

    def _write(self, rel: str, data: bytes) -> str:
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)  # a reader never sees half a file
        self._written_since_prune += len(data)
        return rel

    def save_frame(self, frame: Frame, limits: object | None = None) -> str | None:
        """Save ``frame``'s image; returns its relative path (None if it cannot be read)."""
        ext = _EXT.get(frame.encoding)
        if ext is not None:
            data = frame.payload
        else:
            try:
                rgb = decode_image(frame, limits)  # type: ignore[arg-type]
            except ProtocolError:
                return None
            ok, buf = cv2.imencode(
                ".png", cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2BGR)
            )
            if not ok:
                return None
            ext, data = ".png", buf.tobytes()
        rel = self._relpath(frame.camera, frame.seq, frame.t_capture, frame.epoch, ext)
        return self._write(rel, data)

    def save_map(
        self, camera: str, seq: int, t_capture: float, amap: LowResMap, *, epoch: str = ""
    ) -> str | None:
        """Save an anomaly map as a grey PNG of its quantised values (None if unreadable)."""
        try:
            plane = amap.to_uint8()
        except ProtocolError:
            return None
        ok, buf = cv2.imencode(".png", plane)
        if not ok:
            return None
        rel = self._relpath(camera, seq, t_capture, epoch, ".map.png")
        return self._write(rel, buf.tobytes())

    def path(self, rel: str) -> Path:
        """The file of a stored relative path, refusing anything outside the folder."""
        full = (self.root / rel).resolve()
        if self.root.resolve() not in full.parents:
            raise ValueError(f"{rel!r} is not inside the image folder {self.root}")
        return full

    def due(self) -> bool:
        """True when the bytes written since the last prune may have crossed the limit."""
        return self._bytes_at_prune + self._written_since_prune > self.max_bytes

    def prune(self, now: float | None = None) -> PruneResult:
        now = time.time() if now is None else now
        cutoff = now - self.max_days * 86_400
        files: list[tuple[float, int, Path]] = []
        removed = removed_bytes = 0
        if self.root.is_dir():
            for dirpath, _dirs, names in os.walk(self.root):
                for name in names:
                    p = Path(dirpath) / name
                    try:
                        st = p.stat()
                    except OSError:
                        continue
                    if st.st_mtime < cutoff:
                        p.unlink(missing_ok=True)
                        removed += 1
                        removed_bytes += st.st_size
                    else:
                        files.append((st.st_mtime, st.st_size, p))
        total = sum(size for _t, size, _p in files)
        files.sort()
        i = 0
        while total > self.max_bytes and i < len(files):
            _t, size, p = files[i]
            p.unlink(missing_ok=True)
            total -= size
            removed += 1
            removed_bytes += size
            i += 1
        for dirpath, dirs, names in os.walk(self.root, topdown=False):
            if not dirs and not names and Path(dirpath) != self.root:
                with contextlib.suppress(OSError):  # a file landed meanwhile: keep it
                    os.rmdir(dirpath)
        self._written_since_prune = 0
        self._bytes_at_prune = total
        if removed:
            log.info("history.images_pruned", removed=removed, removed_bytes=removed_bytes)
        return PruneResult(removed, removed_bytes, len(files) - i, total)
