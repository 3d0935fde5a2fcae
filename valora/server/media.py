"""Resolve an OpenAI ``image_url`` into image bytes, under the server's media policy.

Allowed sources, and nothing else:

- ``data:image/<type>;base64,<payload>``: always; the decoded size must not exceed ``max_bytes``.
- ``file:///abs/path``: only when ``allowed_local_media_path`` is set and the path, with symlinks
  resolved, lies under it; the file must not exceed ``max_bytes``.
- ``http://`` / ``https://``: only when ``allow_remote_images`` is set; fetched with an overall
  time limit and stopped as soon as it exceeds ``max_bytes`` (declared or streamed).

The bytes are not decoded here: the engine's image loader checks format, truncation and pixel
limits. Every refusal is an ``ImageError`` (HTTP 400) saying what to change.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
from pathlib import Path
from urllib.parse import unquote, urlparse

from valora.errors import ImageError
from valora.server.settings import ServerSettings

_MAX_REDIRECTS = 3


async def resolve_image_url(url: str, settings: ServerSettings, max_bytes: int) -> bytes:
    """Return the bytes behind ``url`` or raise ``ImageError`` (see the module docstring)."""
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "data":
        return decode_data_url(url, max_bytes)
    if scheme == "file":
        return await asyncio.to_thread(read_local_file, url, settings, max_bytes)
    if scheme in ("http", "https"):
        if not settings.allow_remote_images:
            raise ImageError(f"remote image URLs are disabled on this server ({_short(url)}); "
                             "send the image as a base64 data URL or start the server with "
                             "--allow-remote-images")
        return await fetch_remote(url, settings.remote_image_timeout_s, max_bytes)
    raise ImageError(f"unsupported image URL {_short(url)}: use a data:image/...;base64 URL, "
                     "file:// "
                     "(with --allowed-local-media-path) or http(s) (with --allow-remote-images)")


def decode_data_url(url: str, max_bytes: int) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep:
        raise ImageError("malformed data URL: no ',' between the header and the payload")
    meta = header[len("data:"):].split(";")
    media_type = meta[0].strip().lower()
    if not media_type.startswith("image/"):
        raise ImageError(f"data URL media type {media_type or '(none)'!r} is not an image type "
                         "(expected image/png, image/jpeg, ...)")
    if "base64" not in (part.strip().lower() for part in meta[1:]):
        raise ImageError("image data URLs must be base64-encoded (data:image/png;base64,...)")
    if len(payload) * 3 // 4 > max_bytes + 3:
        raise ImageError(f"image data URL holds more than {max_bytes} bytes (max_image_bytes)")
    try:
        data = base64.b64decode(payload.strip(), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ImageError(f"image data URL payload is not valid base64: {exc}") from None
    if not data:
        raise ImageError("image data URL is empty")
    if len(data) > max_bytes:
        raise ImageError(f"image is {len(data)} bytes; the limit is {max_bytes} (max_image_bytes)")
    return data


def read_local_file(url: str, settings: ServerSettings, max_bytes: int) -> bytes:
    root = settings.allowed_local_media_path
    if root is None:
        raise ImageError("local image files are disabled on this server; start it with "
                         "--allowed-local-media-path DIR to allow file:// URLs under DIR")
    parsed = urlparse(url)
    if parsed.netloc not in ("", "localhost"):
        raise ImageError(f"file URLs must name a local path, got host {parsed.netloc!r}")
    path = Path(unquote(parsed.path))
    if not path.is_absolute():
        raise ImageError(f"file URLs must hold an absolute path, got {parsed.path!r}")
    resolved = path.resolve()
    if not resolved.is_relative_to(root):
        raise ImageError(f"image file {str(path)!r} is outside the allowed media directory")
    if not resolved.is_file():
        raise ImageError(f"image file {str(path)!r} does not exist or is not a regular file")
    size = resolved.stat().st_size
    if size > max_bytes:
        raise ImageError(f"image file is {size} bytes; the limit is {max_bytes} (max_image_bytes)")
    return resolved.read_bytes()


async def fetch_remote(url: str, timeout_s: float, max_bytes: int) -> bytes:
    try:
        return await asyncio.wait_for(_download(url, timeout_s, max_bytes), timeout_s)
    except TimeoutError:
        raise ImageError(f"fetching {_short(url)} took longer than {timeout_s:g} s") from None


async def _download(url: str, timeout_s: float, max_bytes: int) -> bytes:
    import httpx

    try:
        async with httpx.AsyncClient(timeout=timeout_s, follow_redirects=True, trust_env=False,
                                     max_redirects=_MAX_REDIRECTS) as client, \
                client.stream("GET", url) as response:
            if response.status_code != 200:
                raise ImageError(f"fetching {_short(url)} failed: HTTP {response.status_code}")
            declared = response.headers.get("content-length")
            if declared is not None and declared.isdigit() and int(declared) > max_bytes:
                raise ImageError(f"remote image is {declared} bytes; the limit is {max_bytes}")
            chunks: list[bytes] = []
            total = 0
            async for chunk in response.aiter_bytes():
                total += len(chunk)
                if total > max_bytes:
                    raise ImageError(f"remote image exceeds the limit of {max_bytes} bytes")
                chunks.append(chunk)
    except httpx.HTTPError as exc:
        raise ImageError(f"fetching {_short(url)} failed: {type(exc).__name__}: {exc}") from None
    return b"".join(chunks)


def _short(url: str, limit: int = 80) -> str:
    return repr(url if len(url) <= limit else url[:limit] + "...")
