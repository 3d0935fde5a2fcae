"""load_image: every source kind, content digests, size limits before decoding, typed errors."""

from __future__ import annotations

import base64
import hashlib
import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from valora.config import ImageConfig
from valora.errors import ImageError
from valora.multimodal.image_io import load_image

LIMITS = ImageConfig()


def _encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def _random_image(width: int, height: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    channels = {"RGB": 3, "RGBA": 4}[mode]
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, channels), dtype=np.uint8)
    return Image.fromarray(pixels, mode)


def _png_claiming(width: int, height: int) -> bytes:
    """A valid small PNG whose IHDR is rewritten to claim ``width x height`` pixels."""
    data = bytearray(_encode(_random_image(8, 8)))
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def test_every_source_kind_gives_the_same_image_and_digest(tmp_path: Path) -> None:
    image = _random_image(23, 17)
    encoded = _encode(image)
    (tmp_path / "x.png").write_bytes(encoded)
    url = "data:image/png;base64," + base64.b64encode(encoded).decode()
    loaded = [load_image(s, LIMITS) for s in
              (tmp_path / "x.png", str(tmp_path / "x.png"), encoded, url, f"file://{tmp_path}/x.png")]
    assert {x.digest for x in loaded} == {hashlib.sha256(encoded).hexdigest()}
    for x in loaded:
        assert (x.width, x.height, x.image.mode) == (23, 17, "RGB")
        assert np.array_equal(np.asarray(x.image), np.asarray(image))


def test_pil_digest_tracks_pixels_and_mode() -> None:
    image = _random_image(9, 7)
    first = load_image(image, LIMITS)
    assert load_image(image.copy(), LIMITS).digest == first.digest
    changed = image.copy()
    changed.putpixel((3, 3), (0, 0, 0) if image.getpixel((3, 3)) != (0, 0, 0) else (1, 1, 1))
    assert load_image(changed, LIMITS).digest != first.digest
    assert load_image(image.convert("RGBA"), LIMITS).digest != first.digest


def test_transparency_is_composited_on_white() -> None:
    rgba = Image.new("RGBA", (4, 4), (10, 20, 30, 0))
    rgba.putpixel((0, 0), (10, 20, 30, 255))
    loaded = load_image(_encode(rgba), LIMITS)
    assert loaded.image.getpixel((1, 1)) == (255, 255, 255)
    assert loaded.image.getpixel((0, 0)) == (10, 20, 30)
    gray = load_image(_encode(Image.new("L", (3, 3), 77)), LIMITS)
    assert gray.image.mode == "RGB" and gray.image.getpixel((2, 2)) == (77, 77, 77)


def test_byte_limit_checked_for_every_source(tmp_path: Path) -> None:
    encoded = _encode(_random_image(32, 32))
    small = ImageConfig(max_image_bytes=len(encoded) - 1)
    (tmp_path / "big.png").write_bytes(encoded)
    url = "data:image/png;base64," + base64.b64encode(encoded).decode()
    for source in (encoded, tmp_path / "big.png", url):
        with pytest.raises(ImageError, match=f"the limit is {len(encoded) - 1}"):
            load_image(source, small)  # type: ignore[arg-type]


def test_pixel_limit_uses_the_header_before_decoding() -> None:
    with pytest.raises(ImageError, match=r"20x20 = 400 pixels; the limit is 399"):
        load_image(_encode(_random_image(20, 20)), ImageConfig(max_image_pixels=399))
    # A header claiming 5000x5000 with only 8x8 worth of data: the pixel limit fires, not a
    # decode error, so nothing was decoded.
    with pytest.raises(ImageError, match="25000000 pixels; the limit is 16000000"):
        load_image(_png_claiming(5000, 5000), LIMITS)
    with pytest.raises(ImageError, match="is 9x9 = 81 pixels; the limit is 80"):
        load_image(_random_image(9, 9), ImageConfig(max_image_pixels=80))


def test_pillow_decompression_bomb_becomes_image_error() -> None:
    with pytest.raises(ImageError, match="decompression bomb"):
        load_image(_png_claiming(20000, 20000), ImageConfig(max_image_pixels=10**9))


def test_truncated_and_corrupt_data() -> None:
    jpeg = _encode(_random_image(64, 64), "JPEG")
    with pytest.raises(ImageError, match="corrupt or truncated"):
        load_image(jpeg[: len(jpeg) // 2], LIMITS)
    png = _encode(_random_image(64, 64))
    with pytest.raises(ImageError, match="corrupt or truncated"):
        load_image(png[: len(png) - 200], LIMITS)
    with pytest.raises(ImageError, match="not in a recognised image format"):
        load_image(b"definitely not an image", LIMITS)
    with pytest.raises(ImageError, match="empty"):
        load_image(b"", LIMITS)


@pytest.mark.parametrize(("url", "message"), [
    ("data:text/plain;base64," + base64.b64encode(b"hello").decode(), "media type 'text/plain'"),
    ("data:image/png,rawpixels", "must be base64"),
    ("data:image/png;base64,@@@not-base64@@@", "not valid base64"),
    ("data:image/png;base64", "malformed data URL"),
    ("data:image/png;base64," + base64.b64encode(b"hello").decode(), "not in a recognised"),
    ("https://example.com/cat.png", "remote image URLs are not fetched"),
    ("/no/such/file.png", "cannot read image file"),
])
def test_bad_string_sources(url: str, message: str) -> None:
    with pytest.raises(ImageError, match=message):
        load_image(url, LIMITS)


def test_unsupported_source_type() -> None:
    with pytest.raises(ImageError, match="unsupported image source of type int"):
        load_image(42, LIMITS)  # type: ignore[arg-type]
