"""Reading a job's images from Redis (stored by api.images: PNG bytes under
shared.keys.image_key(sha256), so each is checked against its own id)."""

from __future__ import annotations

import hashlib
import io
from collections.abc import Sequence

import redis
from PIL import Image

from shared import defaults, keys


class ImageUnavailable(Exception):
    """An image a job names is no longer in Redis (its request ended, or it expired) or is damaged."""


class ImageStore:
    """The images of jobs, as RGB PIL images."""

    def __init__(self, connection: redis.Redis) -> None:
        self._connection = connection

    def load(self, image_ids: Sequence[str]) -> list[Image.Image]:
        """The images, in order (one read per distinct id). Each read renews the
        image's TTL, so a job re-run after a worker crash still finds it."""
        distinct = list(dict.fromkeys(image_ids))
        if not distinct:
            return []
        with self._connection.pipeline(transaction=False) as pipe:
            for image_id in distinct:
                key = keys.image_key(image_id)
                pipe.hget(key, keys.IMAGE_DATA_FIELD)
                pipe.expire(key, defaults.IMAGE_TTL_SECONDS)
            replies = pipe.execute()
        decoded = {
            image_id: _decode(image_id, data) for image_id, data in zip(distinct, replies[::2], strict=True)
        }
        return [decoded[image_id] for image_id in image_ids]


def _decode(image_id: str, data: bytes | None) -> Image.Image:
    if data is None:
        raise ImageUnavailable(f"image {image_id} is no longer stored (its request ended or it expired)")
    if hashlib.sha256(data).hexdigest() != image_id:
        raise ImageUnavailable(f"image {image_id} is damaged: its bytes do not match its id")
    try:
        with Image.open(io.BytesIO(data), formats=["PNG"]) as image:
            return image.convert("RGB")
    except (OSError, ValueError, SyntaxError) as exc:
        raise ImageUnavailable(f"image {image_id} cannot be decoded: {exc}") from None
