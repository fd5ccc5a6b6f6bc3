"""What crosses the bus between the line's stages, and how it is checked.

Four layers, each importing only the ones before it:

- ``errors``: ``ProtocolError`` and its stable machine-readable reasons;
- ``images``: frame images — header sniffing, bounded decoding, encoding, resizing;
- ``messages``: the frame, scores and event dataclasses and the frame key;
- ``wire``: msgpack encoding and the validating decoder for everything read from the bus.

Import from here (``from lineguard.stream.protocol import Frame, decode_frame``); the modules
are how it is organised, this package is the interface.
"""

from __future__ import annotations

from lineguard.stream.protocol.errors import (
    ProtocolError,
    Reason,
)
from lineguard.stream.protocol.images import (
    decode_image,
    encode_image,
    resize_to,
)
from lineguard.stream.protocol.messages import (
    ENCODINGS,
    ENTRY_FIELD,
    MAP_CODECS,
    SCHEMA_VERSION,
    SUPPORTED_VERSIONS,
    VERDICTS,
    Encoding,
    Event,
    Frame,
    LowResMap,
    MapCodec,
    Message,
    Scores,
    Verdict,
    frame_key,
    make_frame,
)
from lineguard.stream.protocol.wire import (
    FrameIdentity,
    decode,
    decode_event,
    decode_frame,
    decode_scores,
    encode,
    frame_identity,
)

__all__ = [
    "ENCODINGS",
    "ENTRY_FIELD",
    "MAP_CODECS",
    "SCHEMA_VERSION",
    "SUPPORTED_VERSIONS",
    "VERDICTS",
    "Encoding",
    "Event",
    "Frame",
    "FrameIdentity",
    "LowResMap",
    "MapCodec",
    "Message",
    "ProtocolError",
    "Reason",
    "Scores",
    "Verdict",
    "decode",
    "decode_event",
    "decode_frame",
    "decode_image",
    "decode_scores",
    "encode",
    "encode_image",
    "frame_identity",
    "frame_key",
    "make_frame",
    "resize_to",
]
