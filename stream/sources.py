"""Where frames come from: cameras, video files, image folders and recordings.

``open_source(spec)`` picks the reader from what ``spec`` is:

* an integer (``0``) — an OpenCV camera index; a URL (``rtsp://…``, ``http://…``) — a network
  camera or stream; both are endless;
* a directory with ``index.jsonl`` — a recording made by ``lineguard ingest --record DIR``
  (frames in recorded order, with their capture times);
* any other directory — an image folder, read recursively in sorted path order (so
  ``test/good/000.png`` comes before ``test/logical_anomalies/000.png``), optionally looped;
* a file with a video extension — a video file, optionally looped.

Every source yields ``Capture`` objects holding an RGB uint8 image; decoding errors of single
files are logged and skipped (a camera feed must not die because one file is bad), a source
that cannot be opened at all raises ``SourceError`` saying what to check.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import structlog

from lineguard.engines.errors import LineguardError

log = structlog.get_logger("lineguard.sources")

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"})
VIDEO_EXTENSIONS = frozenset({".mp4", ".avi", ".mkv", ".mov", ".webm", ".m4v", ".mpg", ".mpeg"})
RECORDING_INDEX = "index.jsonl"
RECORDING_FRAMES = "frames"


class SourceError(LineguardError):
    """A frame source cannot be opened or read."""


@dataclass(frozen=True, slots=True)
class Capture:
    """One image from a source. ``t_capture`` is set by recordings; None means "now"."""

    image: np.ndarray
    name: str
    t_capture: float | None = None


class Source:
    """Base of all sources: iterate for captures, ``close()`` when done."""

    kind = "source"
    finite = True

    def __iter__(self) -> Iterator[Capture]:
        raise NotImplementedError

    def __len__(self) -> int:
        raise TypeError(f"a {self.kind} source has no known length")

    def close(self) -> None:
        return None

    def describe(self) -> str:
        return self.kind

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_image(path: str | Path) -> np.ndarray:
    """An image file as RGB uint8 ``(H, W, 3)``; grey and alpha are converted."""
    data = np.fromfile(str(path), dtype=np.uint8)
    img = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    if img is None:
        raise SourceError(f"cannot decode image {path}: not an image or truncated")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def _bgr_to_rgb(frame: np.ndarray) -> np.ndarray:
    if frame.ndim == 2:
        return cv2.cvtColor(frame, cv2.COLOR_GRAY2RGB)
    if frame.shape[2] == 4:
        return cv2.cvtColor(frame, cv2.COLOR_BGRA2RGB)
    return cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)


class ImageFolder(Source):
    """Image files under a directory, recursively, in sorted relative-path order."""

    kind = "folder"

    def __init__(self, path: str | Path, *, loop: bool = False) -> None:
        self.root = Path(path)
        if not self.root.is_dir():
            raise SourceError(f"image folder {self.root} does not exist")
        self.files = sorted(
            (p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS),
            key=lambda p: p.relative_to(self.root).as_posix(),
        )
        if not self.files:
            raise SourceError(
                f"image folder {self.root} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))})"
            )
        self.loop = loop
        self.finite = not loop

    def __len__(self) -> int:
        if self.loop:
            raise TypeError("a looped folder is endless")
        return len(self.files)

    def __iter__(self) -> Iterator[Capture]:
        while True:
            for path in self.files:
                try:
                    image = read_image(path)
                except SourceError as exc:
                    log.warning("source.bad_image", path=str(path), error=str(exc))
                    continue
                yield Capture(image, path.relative_to(self.root).as_posix())
            if not self.loop:
                return

    def describe(self) -> str:
        return f"folder {self.root} ({len(self.files)} images{', looped' if self.loop else ''})"


class VideoCapture(Source):
    """A video file, camera index or stream URL through ``cv2.VideoCapture``."""

    def __init__(self, target: str | int, *, loop: bool = False, kind: str = "video") -> None:
        self.target = target
        self.kind = kind
        self.loop = loop and kind == "video"
        self.finite = kind == "video" and not self.loop
        self._cap = cv2.VideoCapture(target)
        if not self._cap.isOpened():
            hint = (
                "check the camera index and that no other process holds it"
                if kind == "camera"
                else "check the path/URL and that OpenCV was built with a decoder for it"
            )
            raise SourceError(f"cannot open {kind} {target!r}: {hint}")

    def __iter__(self) -> Iterator[Capture]:
        n = 0
        failures = 0
        while True:
            ok, frame = self._cap.read()
            if not ok or frame is None:
                if self.kind == "video":
                    if self.loop and n > 0:
                        self._cap.set(cv2.CAP_PROP_POS_FRAMES, 0)
                        continue
                    return
                failures += 1  # a live camera hiccup: retry a few times, then give up
                if failures > 50:
                    raise SourceError(f"{self.kind} {self.target!r} stopped delivering frames")
                time.sleep(0.02)
                continue
            failures = 0
            yield Capture(_bgr_to_rgb(frame), f"{self.kind}:{n}")
            n += 1

    def __len__(self) -> int:
        count = int(self._cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
        if not self.finite or count <= 0:
            raise TypeError(f"{self.kind} {self.target!r} has no known length")
        return count

    def close(self) -> None:
        self._cap.release()

    def describe(self) -> str:
        return f"{self.kind} {self.target}"


class Recording(Source):
    """A recording made by ``--record DIR``: ``index.jsonl`` plus PNG frames."""

    kind = "recording"

    def __init__(self, path: str | Path, *, loop: bool = False) -> None:
        self.root = Path(path)
        index = self.root / RECORDING_INDEX
        if not index.is_file():
            raise SourceError(f"{self.root} is not a recording (no {RECORDING_INDEX})")
        self.entries: list[dict[str, Any]] = []
        for n, line in enumerate(index.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
                if not isinstance(item, dict) or not isinstance(item.get("file"), str):
                    raise ValueError("needs an object with 'file'")
            except ValueError as exc:
                # A recording cut off mid-write ends in a partial line; keep what is whole.
                log.warning("source.bad_index_line", path=str(index), line=n, error=str(exc))
                continue
            self.entries.append(item)
        if not self.entries:
            raise SourceError(f"recording {self.root} lists no frames")
        self.loop = loop
        self.finite = not loop

    def __len__(self) -> int:
        if self.loop:
            raise TypeError("a looped recording is endless")
        return len(self.entries)

    def __iter__(self) -> Iterator[Capture]:
        while True:
            for item in self.entries:
                rel = Path(item["file"])
                if rel.is_absolute() or ".." in rel.parts:
                    log.warning("source.bad_index_path", file=item["file"])
                    continue
                try:
                    image = read_image(self.root / rel)
                except SourceError as exc:
                    log.warning("source.bad_image", path=str(self.root / rel), error=str(exc))
                    continue
                t = item.get("t_capture")
                t_rec = float(t) if isinstance(t, int | float) and math.isfinite(t) else None
                yield Capture(image, rel.as_posix(), t_rec)
            if not self.loop:
                return

    def describe(self) -> str:
        return f"recording {self.root} ({len(self.entries)} frames)"


class ArraySource(Source):
    """Images already in memory (benchmarks, the demo, tests); cycles up to ``count``."""

    kind = "array"

    def __init__(
        self,
        images: list[np.ndarray] | np.ndarray,
        *,
        names: list[str] | None = None,
        count: int | None = None,
    ) -> None:
        self.images = list(images)
        if not self.images:
            raise SourceError("an array source needs at least one image")
        self.names = names or [f"array:{i}" for i in range(len(self.images))]
        if len(self.names) != len(self.images):
            raise SourceError("an array source needs one name per image")
        self.count = len(self.images) if count is None else count

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator[Capture]:
        n = len(self.images)
        for i in range(self.count):
            yield Capture(self.images[i % n], self.names[i % n])


def open_source(spec: str | int | Path, *, loop: bool = False) -> Source:
    """Open the source ``spec`` names (see the module docstring for the rules)."""
    if isinstance(spec, int):
        return VideoCapture(spec, kind="camera")
    text = str(spec).strip()
    if not text:
        raise SourceError("empty source: pass a folder, video file, recording, camera index or URL")
    if text.isdigit():
        return VideoCapture(int(text), kind="camera")
    if "://" in text:
        return VideoCapture(text, kind="stream")
    path = Path(text).expanduser()
    if path.is_dir():
        if (path / RECORDING_INDEX).is_file():
            return Recording(path, loop=loop)
        return ImageFolder(path, loop=loop)
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix in VIDEO_EXTENSIONS:
            return VideoCapture(str(path), loop=loop, kind="video")
        if suffix in IMAGE_EXTENSIONS:
            raise SourceError(
                f"{path} is a single image; put it in a folder and pass the folder as the source"
            )
        raise SourceError(
            f"{path} is neither a video ({', '.join(sorted(VIDEO_EXTENSIONS))}) nor a folder"
        )
    raise SourceError(
        f"source {text!r} not found: pass an image folder, a video file, a recording "
        "directory, a camera index (0) or a stream URL (rtsp://...)"
    )


class Recorder:
    """Writes what ingest sends: ``frames/<camera>-<seq>.png`` plus one JSON line per frame.

    PNG keeps the recorded pixels exact whatever the bus encoding was, and the index is
    flushed per line, so a recording cut short by a crash is still readable up to that point.
    """

    def __init__(self, path: str | Path) -> None:
        self.root = Path(path)
        try:
            (self.root / RECORDING_FRAMES).mkdir(parents=True, exist_ok=True)
            self._index = (self.root / RECORDING_INDEX).open("a", encoding="utf-8")
        except OSError as exc:
            raise SourceError(f"cannot record into {self.root}: {exc}") from None
        self.count = 0

    def write(
        self, image: np.ndarray, *, camera: str, seq: int, t_capture: float, source: str = ""
    ) -> None:
        rel = f"{RECORDING_FRAMES}/{camera}-{seq:09d}.png"
        ok, buf = cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        if not ok:
            raise SourceError(f"cannot encode frame {camera}/{seq} for the recording")
        buf.tofile(str(self.root / rel))
        record = {
            "file": rel,
            "camera": camera,
            "seq": seq,
            "t_capture": t_capture,
            "source": source,
        }
        self._index.write(json.dumps(record) + "\n")
        self._index.flush()
        self.count += 1

    def close(self) -> None:
        self._index.close()
