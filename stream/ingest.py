"""The ingest stage: capture, resize to the model's input size, encode, stamp and send.

Sequence numbers are per camera and dense (0, 1, 2, …): the decide stage finds frames that
were trimmed or lost by looking for holes, so a hole must mean a lost frame and nothing else.
The next number lives in Redis (``<prefix>:{line}:seq:<camera>``) and is advanced by the same
Lua script that appends the frame, so a frame and its number are written together or not at
all; a restarted ingest continues where the last one stopped. The script also compares the
stored number with the one this process expects, so two ingests feeding the same camera id
stop with a clear error instead of interleaving numbers.

A send is idempotent: the script also records which sender (a random token per ``Ingestor``)
last advanced the number. When a reply is lost (the server went down after running the script
but before answering) and the send is retried, the script recognises its own earlier success
and returns that entry id instead of reporting a conflict. ``IngestStage`` retries a capture
that could not be handed over after a Redis outage, so no capture is skipped.

Every frame carries the line's epoch (``Bus.ensure_epoch``), and the script refuses to send
when the epoch in Redis is no longer the one this ingest stamped: a server that lost its data
numbers frames from 0 again, and the epoch is what tells those frames from the ones that had
the same numbers before (the history keys verdicts and pictures on it).
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import redis
import structlog

from lineguard.engines.codec import DEFAULT_JPEG_QUALITY, LOSSLESS, FrameCodec
from lineguard.engines.errors import ConfigError, LineguardError
from lineguard.engines.input_size import parse_input_size
from lineguard.stream.bus import Bus
from lineguard.stream.metrics import get_metrics
from lineguard.stream.protocol import ENTRY_FIELD, Encoding, Frame, encode, make_frame, resize_to
from lineguard.stream.settings import IngestSettings, Settings
from lineguard.stream.sources import Capture, Recorder, Source
from lineguard.stream.worker import StopFlag, line_key

log = structlog.get_logger("lineguard.ingest")

# KEYS[1] frames stream, KEYS[2] next-seq key, KEYS[3] last-send marker, KEYS[4] line epoch.
# ARGV: expected seq, field, payload, maxlen, sender token, epoch stamped on the payload.
_SEND_LUA = """
if redis.call('GET', KEYS[4]) ~= ARGV[6] then return redis.error_reply('SEQLOST') end
local stored = redis.call('GET', KEYS[2])
local cur = tonumber(stored or '0')
local mark = ARGV[5] .. ' ' .. ARGV[1] .. ' '
if cur ~= tonumber(ARGV[1]) then
  if stored and cur == tonumber(ARGV[1]) + 1 then
    local last = redis.call('GET', KEYS[3])
    if last and string.sub(last, 1, #mark) == mark then
      return string.sub(last, #mark + 1)
    end
  end
  if not stored then return redis.error_reply('SEQLOST') end
  return redis.error_reply('SEQCONFLICT ' .. tostring(cur))
end
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[4], '*', ARGV[2], ARGV[3])
redis.call('SET', KEYS[2], cur + 1)
redis.call('SET', KEYS[3], mark .. id)
return id
"""


class SeqConflictError(LineguardError):
    """Another producer advanced this camera's sequence number."""


def _manifest(path: str | Path) -> tuple[Path, dict[str, Any]]:
    manifest = Path(path) / "manifest.json"
    try:
        return manifest, json.loads(manifest.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"cannot read {manifest} ({exc}); pass --bundle pointing at a lineguard bundle, "
            "or the input size with --size"
        ) from None


def bundle_frame_codec(path: str | Path) -> FrameCodec:
    """The frame encoding a bundle was trained and calibrated for (its manifest, no torch);
    bundles from before it was recorded were calibrated on lossless images."""
    manifest, data = _manifest(path)
    spec = (data.get("model") or {}).get("frame_codec", LOSSLESS.spec)
    if not isinstance(spec, str):
        raise ConfigError(f"{manifest}: model.frame_codec must be a string like 'jpeg:90'")
    return FrameCodec.parse(spec)


def frame_codec_for(ingest: IngestSettings, bundle: FrameCodec | None) -> FrameCodec:
    """What ingest sends: the bundle's codec unless the settings name one, with a warning
    when they name one that delivers other pixels than the bundle was calibrated on (its
    scores on the line would then differ from ``evaluate``'s)."""
    default = bundle or FrameCodec()
    encoding = ingest.encoding or default.encoding
    if ingest.jpeg_quality is not None:
        quality = ingest.jpeg_quality
    elif default.encoding == "jpeg":
        quality = default.jpeg_quality
    else:
        quality = DEFAULT_JPEG_QUALITY
    codec = FrameCodec(encoding, quality)
    if bundle is not None and not codec.same_pixels(bundle):
        log.warning(
            "ingest.codec_mismatch",
            sending=codec.spec,
            bundle=bundle.spec,
            hint="the bundle was calibrated on frames sent as "
            f"{bundle.spec}: scores will differ from 'lineguard evaluate'; leave "
            "LINEGUARD_INGEST__ENCODING and __JPEG_QUALITY unset to send as the bundle "
            "expects, or train with --encoding to match the camera",
        )
    return codec


def bundle_input_size(path: str | Path) -> tuple[int, int]:
    """The (height, width) a bundle expects, read from its manifest without loading torch."""
    manifest, data = _manifest(path)
    size: Any = (data.get("model") or {}).get("input_size")
    if size is None:
        size = (data.get("preprocessing") or {}).get("input_size")
    try:
        return parse_input_size(size)
    except (ConfigError, TypeError, ValueError):
        raise ConfigError(f"{manifest} names no valid input size ({size!r}); pass --size") from None


def parse_rate(value: str | float | None) -> float | None:
    """``"max"`` (or None) → no pacing; a number → frames per second."""
    if value is None:
        return None
    if isinstance(value, int | float):
        rate = float(value)
    else:
        text = value.strip().lower()
        if text in ("max", "inf", "unlimited", ""):
            return None
        try:
            rate = float(text)
        except ValueError:
            raise ConfigError(
                f"rate {value!r} must be 'max' or frames per second, e.g. 60"
            ) from None
    if not np.isfinite(rate) or rate <= 0:
        raise ConfigError(f"rate {value!r} must be 'max' or a positive number of frames per second")
    return rate


@dataclass(frozen=True, slots=True)
class Sent:
    frame: Frame
    entry_id: str
    name: str


class Ingestor:
    """Sends images of one camera to the frames stream (see the module docstring)."""

    def __init__(
        self,
        bus: Bus,
        *,
        camera: str,
        size: tuple[int, int] | None = None,
        encoding: Encoding = "jpeg",
        jpeg_quality: int = 90,
        max_len: int = 1000,
        recorder: Recorder | None = None,
    ) -> None:
        self.bus = bus
        self.camera = camera
        self.size = size
        self.encoding: Encoding = encoding
        self.jpeg_quality = jpeg_quality
        self.max_len = max_len
        self.recorder = recorder
        self.seq_key = line_key(bus, "seq", camera)
        self.sent_key = line_key(bus, "sent", camera)
        self.token = uuid.uuid4().hex
        self._script = bus.client.register_script(_SEND_LUA)
        self.epoch = bus.ensure_epoch()  # before the seq: a counter read belongs to it
        self.next_seq = int(bus.client.get(self.seq_key) or 0)
        self.sent = 0
        self._metrics = get_metrics()

    @classmethod
    def from_settings(
        cls,
        bus: Bus,
        settings: Settings,
        *,
        size: tuple[int, int] | None,
        recorder: Recorder | None = None,
        codec: FrameCodec | None = None,
    ) -> Ingestor:
        """An ingestor as the settings say; ``codec`` is the bundle's (see
        :func:`frame_codec_for`)."""
        chosen = frame_codec_for(settings.ingest, codec)
        return cls(
            bus,
            camera=settings.line.camera,
            size=size,
            encoding=chosen.encoding,
            jpeg_quality=chosen.jpeg_quality,
            max_len=settings.ingest.max_len,
            recorder=recorder,
        )

    def _append(self, seq: int, payload: bytes) -> Any:
        """One run of the send script (see the module docstring): the entry id, or a
        ``ResponseError`` naming the conflict."""
        return self._script(
            keys=[self.bus.key("frames"), self.seq_key, self.sent_key, self.bus.epoch_key],
            args=[seq, ENTRY_FIELD, payload, self.max_len, self.token, self.epoch],
        )

    def send(self, image: np.ndarray, *, t_capture: float | None = None, name: str = "") -> Sent:
        """Resize, encode and append one image; returns the frame and its stream entry id."""
        t_cap = time.time() if t_capture is None else t_capture
        pixels = resize_to(image, self.size)
        seq = self.next_seq
        frame = make_frame(
            self.bus.line,
            self.camera,
            seq,
            pixels,
            encoding=self.encoding,
            jpeg_quality=self.jpeg_quality,
            t_capture=t_cap,
            epoch=self.epoch,
        )
        payload = encode(frame, self.bus.limits)
        try:
            entry_id = self._append(seq, payload)
        except redis.ResponseError as exc:
            if "SEQLOST" in str(exc):
                raise SeqConflictError(
                    f"the sequence counter or epoch of camera {self.camera!r} vanished from "
                    f"Redis while this ingest was at seq {seq} (server restarted without "
                    "persistence, or keys deleted); restart the line's workers so all stages "
                    "start afresh, and enable AOF (LINEGUARD_REDIS__EMBEDDED_APPENDONLY or "
                    "appendonly yes)"
                ) from None
            if "SEQCONFLICT" not in str(exc):
                raise
            stored = str(exc).rsplit(" ", 1)[-1]
            raise SeqConflictError(
                f"camera {self.camera!r} of line {self.bus.line!r} is fed by another ingest "
                f"(next seq in Redis is {stored}, this one expected {seq}); give every ingest "
                "its own camera id (--camera / LINEGUARD_LINE__CAMERA)"
            ) from None
        self.next_seq = seq + 1
        self.sent += 1
        if self.recorder is not None:
            self.recorder.write(pixels, camera=self.camera, seq=seq, t_capture=t_cap, source=name)
        self._metrics.frames_out.labels("ingest").inc()
        self._metrics.stage_seconds.labels("ingest").observe(max(0.0, time.time() - t_cap))
        eid = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
        return Sent(frame, eid, name)


class Pacer:
    """Holds a fixed frame rate on an absolute schedule (no drift); None = as fast as possible.

    If the sender falls more than a second behind (a slow disk, a paused process) the schedule
    restarts instead of bursting to catch up, as a camera would.
    """

    def __init__(self, fps: float | None, stop: StopFlag | None = None) -> None:
        if fps is not None and fps <= 0:
            raise ConfigError(f"rate {fps} must be a positive number of frames per second")
        self.period = None if fps is None else 1.0 / fps
        self.stop = stop
        self._t0: float | None = None
        self._n = 0

    def wait(self) -> None:
        if self.period is None:
            return
        now = time.monotonic()
        if self._t0 is None:
            self._t0, self._n = now, 0
        due = self._t0 + self._n * self.period
        if now - due > 1.0:
            self._t0, self._n, due = now, 0, now
        delay = due - now
        if delay > 0:
            if self.stop is not None:
                self.stop.wait(delay)
            else:
                time.sleep(delay)
        self._n += 1


class IngestStage:
    """``run_worker`` stage that sends every capture of ``source`` (a worker of its own)."""

    name = "ingest"

    def __init__(
        self,
        bus: Bus,
        settings: Settings,
        source: Source,
        *,
        size: tuple[int, int] | None,
        fps: float | None = None,
        record: str | Path | None = None,
        limit: int | None = None,
        stop: StopFlag | None = None,
        codec: FrameCodec | None = None,
    ) -> None:
        self.bus = bus
        self.settings = settings
        self.source = source
        self.size = size
        self.consumer = f"{settings.line.camera}"
        self.limit = limit
        self.recorder = Recorder(record) if record is not None else None
        self.ingestor = Ingestor.from_settings(
            bus, settings, size=size, recorder=self.recorder, codec=codec
        )
        self.pacer = Pacer(fps if fps is not None else settings.ingest.fps, stop)
        self._captures = iter(source)
        self._exhausted = False
        self._unsent: tuple[Capture, float] | None = None
        self.first_seq: int | None = None

    def setup(self) -> None:
        log.info(
            "ingest.start",
            source=self.source.describe(),
            camera=self.ingestor.camera,
            next_seq=self.ingestor.next_seq,
            size=self.size,
            encoding=self.ingestor.encoding,
            jpeg_quality=self.ingestor.jpeg_quality if self.ingestor.encoding == "jpeg" else None,
        )

    def step(self) -> int:
        if self._exhausted:
            return 0
        if self.limit is not None and self.ingestor.sent >= self.limit:
            self._exhausted = True
            return 0
        if self._unsent is None:
            self.pacer.wait()
            try:
                capture: Capture = next(self._captures)
            except StopIteration:
                self._exhausted = True
                return 0
            # kept until handed over: a Redis outage makes run_worker call step() again,
            # and the same capture (same capture time) is sent then instead of being skipped
            self._unsent = (capture, time.time())
        capture, t_capture = self._unsent
        sent = self.ingestor.send(capture.image, t_capture=t_capture, name=capture.name)
        self._unsent = None
        if self.first_seq is None:
            self.first_seq = sent.frame.seq
        return 1

    def done(self) -> bool:
        return self._exhausted

    def teardown(self) -> None:
        self.source.close()
        if self.recorder is not None:
            self.recorder.close()

    def status(self) -> dict[str, Any]:
        return {
            "camera": self.ingestor.camera,
            "sent": self.ingestor.sent,
            "next_seq": self.ingestor.next_seq,
        }
