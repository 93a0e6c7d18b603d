"""How many pixels a dynamic-resolution image processor (the Qwen2-VL family) resizes
an image to, and the operator's bounds on it (--image-min-pixels / --image-max-pixels).

Such a processor keeps an image's aspect ratio and scales it so its pixel count lies
between two bounds, rounded to whole merged patches (28x28 pixels for Qwen2-VL): the
image then gives one token per merged patch, so the bounds bound its tokens. Other
processors resize every image to a fixed size or tile it, and have no such bounds."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from transformers.image_utils import SizeDict

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PixelBounds:
    min_pixels: int
    max_pixels: int


def _dynamic_image_processor(processor: Any) -> Any | None:
    """The processor's image processor if it resizes by pixel count (it reports
    each image's patch grid and merges patches), else None."""
    image_processor = getattr(processor, "image_processor", None)
    if image_processor is None or "image_grid_thw" not in getattr(image_processor, "model_input_names", ()):
        return None
    size = getattr(image_processor, "size", None)
    if getattr(size, "shortest_edge", None) is None or getattr(size, "longest_edge", None) is None:
        return None
    return image_processor


def pixel_bounds(processor: Any) -> PixelBounds | None:
    """The bounds the processor resizes images within, None for other processors."""
    image_processor = _dynamic_image_processor(processor)
    if image_processor is None:
        return None
    return PixelBounds(int(image_processor.size.shortest_edge), int(image_processor.size.longest_edge))


def bound_image_pixels(processor: Any, min_pixels: int | None, max_pixels: int | None) -> PixelBounds | None:
    """Set the bounds the operator gave (None keeps the model's own); the bounds
    in force. ValueError when bounds are given for a processor without them,
    or when they cross."""
    if min_pixels is None and max_pixels is None:
        return pixel_bounds(processor)
    image_processor = _dynamic_image_processor(processor)
    if image_processor is None:
        kind = type(getattr(processor, "image_processor", processor)).__name__
        raise ValueError(
            f"--image-min-pixels / --image-max-pixels apply to dynamic-resolution models (the Qwen2-VL "
            f"family); this model's {kind} resizes images to a size of its own"
        )
    size = image_processor.size
    bounds = PixelBounds(
        min_pixels if min_pixels is not None else int(size.shortest_edge),
        max_pixels if max_pixels is not None else int(size.longest_edge),
    )
    if bounds.min_pixels > bounds.max_pixels:
        raise ValueError(
            f"--image-min-pixels ({bounds.min_pixels}) is above --image-max-pixels ({bounds.max_pixels})"
        )
    image_processor.size = SizeDict(shortest_edge=bounds.min_pixels, longest_edge=bounds.max_pixels)
    log.info("images resized to between %d and %d pixels", bounds.min_pixels, bounds.max_pixels)
    return bounds
