"""Decode request images safely: size limits before decoding, typed errors, content digests.

Order of checks (each failure is an :class:`ImageError` naming the limit or the defect):

1. encoded size ``<= max_image_bytes`` — from ``stat`` for files and from the base64 length
   for data URLs, so oversized inputs are never read or decoded whole;
2. pixel count ``<= max_image_pixels`` — from the header, before any pixel is decoded
   (decompression bombs; Pillow's own ``DecompressionBombError`` is turned into ``ImageError``);
3. a full ``load()`` so truncated or corrupt data fails here and not later in preprocessing.

The digest is sha256 of the encoded bytes (for a PIL image given directly: of its mode, size and
raw pixels), so the same file always has the same identity whatever name or URL carried it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import re
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from valora.config import ImageConfig
from valora.errors import ImageError

ImageSource = str | bytes | Path | Image.Image
"""A file path, raw encoded bytes, a ``data:image/...;base64,`` URL, or a PIL image."""

_DATA_URL = re.compile(r"^data:(?P<media>[^;,]*)(?P<params>(;[^;,]*)*),(?P<payload>.*)$", re.DOTALL)


@dataclass(frozen=True)
class LoadedImage:
    """A decoded RGB image with its content digest (sha256 hex)."""

    image: Image.Image
    digest: str
    width: int
    height: int


def load_image(source: ImageSource, limits: ImageConfig) -> LoadedImage:
    """Decode ``source`` into an RGB image within ``limits`` (see the module docstring)."""
    if isinstance(source, Image.Image):
        return _from_pil(source, limits)
    if isinstance(source, bytes | bytearray | memoryview):
        return _decode(bytes(source), limits, "image bytes")
    if isinstance(source, str) and source.startswith("data:"):
        return _decode(_data_url_bytes(source, limits), limits, "data URL")
    if isinstance(source, str) and source.startswith(("http://", "https://")):
        raise ImageError("remote image URLs are not fetched; send the image as a "
                         "data:image/...;base64 URL or raw bytes")
    if isinstance(source, str | Path):
        return _decode(_file_bytes(Path(str(source).removeprefix("file://")), limits), limits,
                       f"image file {source}")
    raise ImageError(f"unsupported image source of type {type(source).__name__}")


def convert_to_rgb(image: Image.Image) -> Image.Image:
    """RGB view of ``image``; transparency is composited onto white (as transformers does)."""
    if image.mode == "RGB":
        return image
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")


def _file_bytes(path: Path, limits: ImageConfig) -> bytes:
    try:
        size = path.stat().st_size
        if not path.is_file():
            raise ImageError(f"image path {path} is not a file")
        _check_bytes(size, limits, f"image file {path}")
        return path.read_bytes()
    except OSError as exc:
        raise ImageError(f"cannot read image file {path}: {exc.strerror or exc}") from exc


def _data_url_bytes(url: str, limits: ImageConfig) -> bytes:
    match = _DATA_URL.match(url)
    if match is None:
        raise ImageError("malformed data URL: expected data:image/<type>;base64,<payload>")
    media = match["media"].strip().lower()
    if not media.startswith("image/"):
        raise ImageError(f"data URL has media type {media or 'text/plain'!r}; expected image/*")
    if ";base64" not in match["params"].lower():
        raise ImageError("data URL must be base64-encoded (data:image/<type>;base64,...)")
    payload = re.sub(r"\s+", "", match["payload"])
    _check_bytes(len(payload) * 3 // 4, limits, "data URL image")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ImageError(f"data URL payload is not valid base64: {exc}") from exc


def _check_bytes(num_bytes: int, limits: ImageConfig, what: str) -> None:
    if num_bytes > limits.max_image_bytes:
        raise ImageError(f"{what} is {num_bytes} bytes; the limit is {limits.max_image_bytes}")


def _check_pixels(width: int, height: int, limits: ImageConfig, what: str) -> None:
    if width <= 0 or height <= 0:
        raise ImageError(f"{what} has an empty size {width}x{height}")
    if width * height > limits.max_image_pixels:
        raise ImageError(f"{what} is {width}x{height} = {width * height} pixels; the limit is "
                         f"{limits.max_image_pixels}")


def _decode(data: bytes, limits: ImageConfig, what: str) -> LoadedImage:
    _check_bytes(len(data), limits, what)
    if not data:
        raise ImageError(f"{what} is empty")
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise ImageError(f"{what} is a decompression bomb: {exc}") from exc
    except UnidentifiedImageError as exc:
        raise ImageError(f"{what} is not in a recognised image format") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"{what} has a corrupt header: {exc}") from exc
    _check_pixels(image.width, image.height, limits, what)
    try:
        image.load()
        rgb = convert_to_rgb(image)
    except Image.DecompressionBombError as exc:
        raise ImageError(f"{what} is a decompression bomb: {exc}") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageError(f"{what} is corrupt or truncated ({image.format}): {exc}") from exc
    digest = hashlib.sha256(data).hexdigest()
    return LoadedImage(image=rgb, digest=digest, width=rgb.width, height=rgb.height)


def _from_pil(image: Image.Image, limits: ImageConfig) -> LoadedImage:
    _check_pixels(image.width, image.height, limits, "PIL image")
    try:
        image.load()
        raw = image.tobytes()
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageError(f"PIL image cannot be read (corrupt or truncated): {exc}") from exc
    h = hashlib.sha256(f"{image.mode}|{image.width}x{image.height}|".encode())
    h.update(raw)
    if image.mode in ("P", "PA"):  # the same indices under another palette are another image
        h.update(bytes(image.getpalette() or []))
    rgb = convert_to_rgb(image)
    return LoadedImage(image=rgb, digest=h.hexdigest(), width=rgb.width, height=rgb.height)
