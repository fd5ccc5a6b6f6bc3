"""The one exception the bus protocol lets out, and its stable machine-readable reasons.

Every check of a message or of its image raises ``ProtocolError`` with a short ``reason`` (used
in dead-letter entries and metric labels) and a message a person can act on; the text helpers
keep hostile values from flooding a log line.
"""

from __future__ import annotations

from typing import Any, Literal, TypeAlias

from lineguard.engines.errors import InputError

# Machine-readable failure classes. Stable: they appear in dead-letter entries and metrics.
Reason: TypeAlias = Literal[
    "not_bytes",
    "too_large",
    "not_msgpack",
    "not_a_map",
    "bad_version",
    "wrong_kind",
    "missing_field",
    "extra_field",
    "wrong_type",
    "non_finite",
    "string_too_long",
    "too_many_entries",
    "bad_value",
    "negative_seq",
    "bad_shape",
    "image_too_large",
    "payload_size",
    "corrupt_image",
]


class ProtocolError(InputError):
    """A bus message or its image cannot be used; ``reason`` says which class of problem."""

    def __init__(self, reason: Reason, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.reason: Reason = reason
        self.field = field


def clip(text: str, n: int = 120) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def short(value: Any) -> str:
    """A bounded description of a hostile value for an error message."""
    if isinstance(value, bytes | bytearray | memoryview):
        return f"{len(value)} bytes of binary"
    if isinstance(value, dict | list):
        return f"a {type(value).__name__} of {len(value)} items"
    text = repr(value)
    return f"{type(value).__name__} {clip(text, 60)}"
