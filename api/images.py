"""Images of a generation request, for every route family: decoded and
checked (bytes, then the pixel count and aspect ratio from the header, so a
decompression bomb never reaches memory), re-encoded as an upright 8-bit RGB PNG
(transparency on white, the first frame of an animation) whose sha256 is its id,
read from --image-dir or fetched (--allow-remote-images), and stored in Redis
once however many requests hold it (`ImageLease`: the last release deletes it;
a TTL bounds what a dead API process leaves). Workers only decode PNGs this
module wrote."""

from __future__ import annotations

import hashlib
import io
import logging
import os
import stat
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import numpy as np
import redis
import requests
from PIL import Image, ImageOps, UnidentifiedImageError

from api.errors import (
    ImageTooLarge,
    InvalidImage,
    InvalidPayload,
)
from shared import defaults, keys
from shared.settings import ApiSettings

log = logging.getLogger(__name__)
T = TypeVar("T")

REMOTE_SCHEMES = ("http", "https")
# PNG is lossless whatever the settings, so pick the fastest encoding
# (bench/image_throughput.py measures it).
PNG_OPTIONS = {"compress_level": 1, "compress_type": zlib.Z_RLE}
TRANSPARENCY_BACKGROUND = (255, 255, 255, 255)  # white, as transformers' processors composite
SIXTEEN_BIT_GREY_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


@dataclass(frozen=True)
class CanonicalImage:
    """An image as workers receive it: RGB, upright, PNG-encoded; `image_id` is the sha256 of `data`."""

    image_id: str
    data: bytes
    width: int
    height: int


# -- decoding -------------------------------------------------------------------


def canonical_image(data: bytes, *, max_pixels: int, source: str) -> CanonicalImage:
    """Decode untrusted bytes into a CanonicalImage, or raise the ApiError to answer.
    `source` names the image in error messages (e.g. "image_data")."""
    return _off_the_event_loop(_canonicalise, data, max_pixels=max_pixels, source=source)


def _off_the_event_loop(function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run CPU-heavy work (Pillow releases the GIL while it decodes and encodes)
    in gevent's thread pool when the API runs under gevent, so one large upload
    does not stall every other request of the process; else call it directly."""
    try:
        from gevent import get_hub, monkey
    except ImportError:  # gevent is a dependency, but the API does not need it to run
        return function(*args, **kwargs)
    if not monkey.is_module_patched("threading"):
        return function(*args, **kwargs)

    def captured() -> tuple[T | None, Exception | None]:
        # Hand errors back rather than raising in the pool, which gevent would log as a crash.
        try:
            return function(*args, **kwargs), None
        except Exception as exc:
            return None, exc

    result, error = get_hub().threadpool.apply(captured)
    if error is not None:
        raise error
    return result  # type: ignore[return-value]


def _canonicalise(data: bytes, *, max_pixels: int, source: str) -> CanonicalImage:
    if not data:
        raise InvalidImage(f"{source} is empty")
    try:
        with Image.open(io.BytesIO(data), formats=defaults.IMAGE_FORMATS) as opened:
            # Image.open has read the header only: check the size before decoding anything.
            _check_size(*opened.size, max_pixels=max_pixels, source=source)
            upright = ImageOps.exif_transpose(opened)  # decodes the (first) frame, fully
            rgb = _as_rgb(upright)
    except (ImageTooLarge, InvalidImage):
        raise
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(f"{source} is too large to decode: {exc}") from None
    except UnidentifiedImageError:
        raise InvalidImage(
            f"{source} is not an image in a supported format ({', '.join(defaults.IMAGE_FORMATS)})"
        ) from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, KeyError) as exc:
        # Pillow reports truncated and corrupt files with a variety of exceptions.
        raise InvalidImage(f"{source} could not be decoded: {exc}") from None
    buffer = io.BytesIO()
    rgb.save(buffer, format="PNG", **PNG_OPTIONS)
    png = buffer.getvalue()
    return CanonicalImage(
        image_id=hashlib.sha256(png).hexdigest(), data=png, width=rgb.width, height=rgb.height
    )


def _check_size(width: int, height: int, *, max_pixels: int, source: str) -> None:
    """Refuse, from the header alone, an image too large to decode, or so thin that
    a processor resizing its short side up would build a huge image (Qwen2-VL's
    refuses past the same ratio)."""
    if width * height > max_pixels:
        raise ImageTooLarge(
            f"{source} is {width}x{height} = {width * height} pixels; the limit is {max_pixels}"
        )
    ratio = max(width, height) / max(min(width, height), 1)
    limit = defaults.MAX_IMAGE_ASPECT_RATIO
    if ratio > limit:
        ratio_text = f"{ratio:.1f}".removesuffix(".0")
        raise InvalidImage(
            f"{source} is {width}x{height}, an aspect ratio of {ratio_text}:1 "
            f"(longest side over shortest); the limit is {limit}:1"
        )


def _as_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB as the model's processor would see it: 16-bit samples scaled down
    (Pillow's own conversion clips them, so most come out white), and transparent
    pixels composited onto white, as transformers' `convert_to_rgb` does, rather
    than showing whatever colour they hold (often black).

    Pixels only: the PNG encoder would copy a colour profile left in `info` (which
    processors ignore; a CMYK JPEG's does not even fit RGB pixels), so the same
    pixels would get another image id."""
    image = _eight_bit(image)
    if _has_transparency(image):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, TRANSPARENCY_BACKGROUND)
        rgb = Image.alpha_composite(background, rgba).convert("RGB")
    else:
        rgb = image.convert("RGB")
    rgb.info = {}
    return rgb


def _has_transparency(image: Image.Image) -> bool:
    """An alpha band, or a transparent colour or palette index (PNG's tRNS, GIF's)."""
    return "A" in image.getbands() or "a" in image.getbands() or "transparency" in image.info


def _eight_bit(image: Image.Image) -> Image.Image:
    """A 16-bit grayscale image (PNG's, decoded as mode I;16 or I) as 8-bit L, or LA
    when a 16-bit value is marked transparent (matched before scaling, so that only
    that exact value becomes transparent). Other modes are already 8-bit."""
    if image.mode not in SIXTEEN_BIT_GREY_MODES:
        return image
    samples = np.asarray(image).clip(0, 65535).astype(np.uint32)
    grey = Image.fromarray(((samples * 255 + 32767) // 65535).astype(np.uint8))
    transparent = image.info.get("transparency")
    if not isinstance(transparent, int):
        return grey
    alpha = Image.fromarray(np.where(samples == transparent, 0, 255).astype(np.uint8))
    return Image.merge("LA", (grey, alpha))


def check_image_count(count: int) -> None:
    if count > defaults.MAX_IMAGES_PER_REQUEST:
        raise InvalidPayload(
            f"a request may carry at most {defaults.MAX_IMAGES_PER_REQUEST} images "
            f"(image_data parts and image_paths together), got {count}"
        )


# -- image_paths ----------------------------------------------------------------


def is_remote(path: str) -> bool:
    """Whether `path` is a URL (any scheme) rather than a file path."""
    return "://" in path or path.lower().startswith("data:")


def read_local_image(path: str, settings: ApiSettings, *, source: str) -> bytes:
    """The bytes of a file inside --image-dir. Relative paths are taken from the
    image dir; `..`, absolute paths elsewhere and symlinks leading out are 400."""
    if settings.image_dir is None:
        raise InvalidImage(
            f"{source}: this server reads no local image files (start the API with --image-dir DIR)",
            error_type="image_paths_disabled",
        )
    root = Path(settings.image_dir).resolve()
    try:
        candidate = Path(path)
        resolved = (candidate if candidate.is_absolute() else root / candidate).resolve()
    except (OSError, ValueError, RuntimeError) as exc:  # NUL bytes, symlink loops
        raise InvalidImage(f"{source}: {path!r} is not a usable path: {exc}") from None
    if not path or not resolved.is_relative_to(root) or resolved == root:
        raise InvalidImage(f"{source}: {path!r} is not a file inside the server's image dir")
    limit = settings.body_size_limit_bytes
    try:
        # Every symlink is resolved above; O_NOFOLLOW refuses one swapped in since,
        # O_NONBLOCK keeps a FIFO from hanging the request.
        descriptor = os.open(resolved, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        raise InvalidImage(f"{source}: {path!r} does not exist in the server's image dir") from None
    except (OSError, ValueError) as exc:
        raise InvalidImage(f"{source}: {path!r} cannot be read: {exc.__class__.__name__}") from None
    try:
        info = os.fstat(descriptor)
        if not stat.S_ISREG(info.st_mode):
            raise InvalidImage(f"{source}: {path!r} is not a regular file")
        if info.st_size > limit:
            raise ImageTooLarge(f"{source}: {path!r} is {info.st_size} bytes; the limit is {limit}")
        with os.fdopen(descriptor, "rb", closefd=False) as file:
            data = file.read(limit + 1)
    finally:
        os.close(descriptor)
    if len(data) > limit:
        raise ImageTooLarge(f"{source}: {path!r} is over the limit of {limit} bytes")
    return data


def fetch_remote_image(url: str, settings: ApiSettings, *, source: str) -> bytes:
    """GET an http(s) image with --allow-remote-images: at most the body size
    limit, within REMOTE_IMAGE_TIMEOUT_SECONDS for the whole download."""
    scheme = urlsplit(url).scheme.lower()
    if scheme not in REMOTE_SCHEMES:
        raise InvalidImage(f"{source}: only http and https URLs are supported, not {scheme or url[:16]!r}")
    if not settings.allow_remote_images:
        raise InvalidImage(
            f"{source}: remote images are off on this server (start the API with --allow-remote-images)",
            error_type="remote_images_disabled",
        )
    limit = settings.body_size_limit_bytes
    timeout = defaults.REMOTE_IMAGE_TIMEOUT_SECONDS
    deadline = time.monotonic() + timeout
    try:
        with requests.get(url, stream=True, timeout=timeout, headers={"Accept": "image/*"}) as response:
            if response.status_code != 200:
                raise InvalidImage(f"{source}: {url} answered HTTP {response.status_code}")
            declared = response.headers.get("Content-Length", "")
            if declared.isdigit() and int(declared) > limit:
                raise ImageTooLarge(f"{source}: {url} is {declared} bytes; the limit is {limit}")
            chunks, received = [], 0
            for chunk in response.iter_content(chunk_size=64 * 1024):
                received += len(chunk)
                if received > limit:
                    raise ImageTooLarge(f"{source}: {url} is over the limit of {limit} bytes")
                if time.monotonic() > deadline:
                    raise InvalidImage(f"{source}: {url} took longer than {timeout:g} s to download")
                chunks.append(chunk)
    except requests.RequestException as exc:
        raise InvalidImage(f"{source}: could not fetch {url}: {exc.__class__.__name__}") from None
    return b"".join(chunks)


# -- Redis ----------------------------------------------------------------------

# Drop one reference; the last one deletes the image. A key that expired
# meanwhile comes back as refs = -1 and is deleted at once.
_RELEASE = f"""
local refs = redis.call('HINCRBY', KEYS[1], '{keys.IMAGE_REFS_FIELD}', -1)
if refs <= 0 then redis.call('DEL', KEYS[1]) end
return refs
"""


class ImageLease:
    """The images one request holds in Redis, from before its job is queued
    until `release` (idempotent) when the request ends."""

    def __init__(self, connection: redis.Redis, image_ids: Sequence[str]) -> None:
        self._connection = connection
        self.image_ids = list(image_ids)
        self._held = list(dict.fromkeys(image_ids))  # each distinct image is counted once
        self._released = False

    @classmethod
    def take(cls, connection: redis.Redis, images: Sequence[CanonicalImage]) -> ImageLease:
        """Count this request in for each image, writing the bytes of those
        Redis does not hold yet (HSETNX: an image is stored once)."""
        lease = cls(connection, [image.image_id for image in images])
        if not lease._held:
            return lease
        by_id = {image.image_id: image for image in images}
        ttl = defaults.IMAGE_TTL_SECONDS
        with connection.pipeline(transaction=True) as pipe:
            for image_id in lease._held:
                key = keys.image_key(image_id)
                pipe.hincrby(key, keys.IMAGE_REFS_FIELD, 1)
                pipe.expire(key, ttl)
                pipe.hexists(key, keys.IMAGE_DATA_FIELD)
            replies = pipe.execute()
        stored = replies[2::3]
        missing = [image_id for image_id, held in zip(lease._held, stored, strict=True) if not held]
        if missing:
            try:
                with connection.pipeline(transaction=False) as pipe:
                    for image_id in missing:
                        pipe.hsetnx(keys.image_key(image_id), keys.IMAGE_DATA_FIELD, by_id[image_id].data)
                    pipe.execute()
            except BaseException:
                lease.release()
                raise
        return lease

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        if not self._held:
            return
        try:
            release = self._connection.register_script(_RELEASE)
            with self._connection.pipeline(transaction=False) as pipe:
                for image_id in self._held:
                    release(keys=[keys.image_key(image_id)], client=pipe)
                pipe.execute()
        except redis.RedisError as exc:  # the TTL removes them later
            log.warning("could not release images %s: %s", ", ".join(self._held), exc)
