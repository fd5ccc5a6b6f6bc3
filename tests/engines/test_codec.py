"""The frame codec: specs, and that training's round trip is the bus's, pixel for pixel."""

from __future__ import annotations

import numpy as np
import pytest

from lineguard.engines.codec import FrameCodec
from lineguard.engines.errors import ConfigError
from lineguard.stream.protocol import decode_image, make_frame


@pytest.mark.parametrize(
    ("spec", "encoding", "quality", "canonical"),
    [("raw", "raw", 90, "raw"), ("PNG", "png", 90, "png"), ("jpeg", "jpeg", 90, "jpeg:90"),
     ("jpeg:75", "jpeg", 75, "jpeg:75")],
)  # fmt: skip
def test_specs_parse_and_print(spec: str, encoding: str, quality: int, canonical: str) -> None:
    codec = FrameCodec.parse(spec)
    assert (codec.encoding, codec.jpeg_quality, codec.spec) == (encoding, quality, canonical)
    assert FrameCodec.parse(codec.spec) == codec


@pytest.mark.parametrize("spec", ["gif", "png:90", "jpeg:0", "jpeg:101", "jpeg:high", ""])
def test_bad_specs_say_what_is_accepted(spec: str) -> None:
    with pytest.raises(ConfigError, match=r"jpeg|quality|codec|encoding"):
        FrameCodec.parse(spec)


def test_lossless_codecs_deliver_the_same_pixels_jpeg_only_at_one_quality() -> None:
    raw, png = FrameCodec.parse("raw"), FrameCodec.parse("png")
    assert raw.same_pixels(png) and png.same_pixels(raw)
    assert not raw.same_pixels(FrameCodec.parse("jpeg:90"))
    assert FrameCodec.parse("jpeg:90").same_pixels(FrameCodec.parse("jpeg"))
    assert not FrameCodec.parse("jpeg:90").same_pixels(FrameCodec.parse("jpeg:80"))


@pytest.mark.parametrize("spec", ["raw", "png", "jpeg:90", "jpeg:40"])
def test_round_trip_is_what_infer_decodes_from_the_bus(spec: str) -> None:
    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)
    codec = FrameCodec.parse(spec)
    frame = make_frame(
        "l", "c", 0, image, encoding=codec.encoding, jpeg_quality=codec.jpeg_quality, t_capture=0
    )
    on_the_bus = decode_image(frame)
    offline = codec.round_trip(image)
    np.testing.assert_array_equal(offline, on_the_bus)
    if codec.lossless:
        np.testing.assert_array_equal(offline, image)
    else:
        assert np.abs(offline.astype(int) - image).mean() > 1  # JPEG really changed it
