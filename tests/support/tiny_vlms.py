"""Test images for the vision-language model tests, and a call counter for a vision tower.
The tiny VLMs themselves are built by bench/tiny_vlms.py."""

from __future__ import annotations

from PIL import Image


def sample_image(colour: tuple[int, int, int] | str, size: tuple[int, int] = (48, 40)) -> Image.Image:
    """A small RGB image with a diagonal stripe, so it is not one flat colour."""
    image = Image.new("RGB", size, colour)
    for offset in range(min(size)):
        image.putpixel((offset, offset), (255, 255, 255))
    return image


def counting_encoder(engine) -> list[int]:
    """Wraps an engine's vision tower: the returned list grows by one per call."""
    calls: list[int] = []
    encoder = engine.vision._encoder
    engine.vision._encoder = lambda **kwargs: calls.append(1) or encoder(**kwargs)
    return calls
