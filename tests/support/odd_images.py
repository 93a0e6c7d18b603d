"""Uploads that trip up image servers (thin, tiny, 16-bit, palette, alpha, CMYK,
animated), each with what the API must make of it: an RGB image of a given size
and colours (`ServedImage`), or a 400 naming its aspect ratio (`RefusedImage`)."""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from shared import defaults

Point = tuple[int, int]
Colour = tuple[int, int, int]

WHITE = (255, 255, 255)
RED = (220, 30, 30)
BLUE = (20, 40, 210)
DUSK = (10, 20, 30)

# PNG colour types (IHDR)
GREY, TRUECOLOUR, GREY_ALPHA, TRUECOLOUR_ALPHA = 0, 2, 4, 6


@dataclass(frozen=True)
class ServedImage:
    """An upload the API serves: its canonical image is `size` and holds `colours`
    at those points, each channel within `tolerance` (lossy formats).
    `as_processors_see_it`: a model's processor given the upload itself sees the
    same pixels; not so for 16-bit grey, which Pillow's conversion (the processors')
    clips to white and the API scales."""

    name: str
    data: bytes
    size: tuple[int, int]
    colours: dict[Point, Colour] = field(default_factory=dict)
    tolerance: int = 0
    as_processors_see_it: bool = True


@dataclass(frozen=True)
class RefusedImage:
    """An upload the API refuses with 400, its message naming the size and `ratio`."""

    name: str
    data: bytes
    width: int
    height: int
    ratio: str


def encoded(image: Image.Image, format: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **options)
    return buffer.getvalue()


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png16(samples: np.ndarray, colour_type: int, transparent: tuple[int, ...] | None = None) -> bytes:
    """A 16-bit PNG written by hand (Pillow writes 16-bit greyscale only):
    `samples` is [height, width] or [height, width, channels] of 16-bit values;
    `transparent` the tRNS value (one sample per channel) marking a colour transparent."""
    height, width = samples.shape[:2]
    rows = samples.astype(">u2").reshape(height, -1)
    scanlines = b"".join(b"\0" + row.tobytes() for row in rows)  # filter type 0 on every row
    header = struct.pack(">IIBBBBB", width, height, 16, colour_type, 0, 0, 0)
    chunks = [_chunk(b"IHDR", header)]
    if transparent is not None:
        chunks.append(_chunk(b"tRNS", struct.pack(f">{len(transparent)}H", *transparent)))
    chunks += [_chunk(b"IDAT", zlib.compress(scanlines)), _chunk(b"IEND", b"")]
    return b"\x89PNG\r\n\x1a\n" + b"".join(chunks)


def halves(mode: str, left, right, size: tuple[int, int] = (16, 8)) -> Image.Image:
    """An image of `mode` whose left half is `left` and right half `right`."""
    image = Image.new(mode, size, left)
    image.paste(right, (size[0] // 2, 0, size[0], size[1]))
    return image


def palette_image(transparent_index: int | None = None) -> bytes:
    """A palette PNG: index 0 red (left), index 1 blue (right)."""
    image = halves("P", 0, 1)
    image.putpalette([*RED, *BLUE])
    options = {} if transparent_index is None else {"transparency": transparent_index}
    return encoded(image, "PNG", **options)


def gif(frames: list[Colour], *, transparent_index: int | None = None) -> bytes:
    """A GIF whose frame i is one flat colour frames[i] on its left half and blue on its right."""
    images = []
    for colour in frames:
        frame = halves("P", 0, 1)
        frame.putpalette([*colour, *BLUE])
        images.append(frame)
    options = {"save_all": True, "append_images": images[1:], "duration": 100, "loop": 0}
    if transparent_index is not None:
        options["transparency"] = transparent_index
    return encoded(images[0], "GIF", **options)


def flat(size: tuple[int, int], colour: Colour = DUSK) -> bytes:
    return encoded(Image.new("RGB", size, colour))


def _corners(size: tuple[int, int], colour: Colour) -> dict[Point, Colour]:
    width, height = size
    return {(0, 0): colour, (width - 1, height - 1): colour}


LEFT, RIGHT = (0, 0), (15, 7)  # a pixel of each half of a `halves` image
LIMIT = defaults.MAX_IMAGE_ASPECT_RATIO
MID_GREY_16 = 32896  # 128 * 257: 16-bit mid-grey, exactly 128 in 8 bits

AT_THE_LIMIT = [
    ServedImage("ratio_at_limit_tall", flat((1, LIMIT)), (1, LIMIT), _corners((1, LIMIT), DUSK)),
    ServedImage("ratio_at_limit_wide", flat((LIMIT, 1)), (LIMIT, 1), _corners((LIMIT, 1), DUSK)),
]
SERVED = [
    ServedImage("thin_tall_10x500", flat((10, 500)), (10, 500), _corners((10, 500), DUSK)),
    ServedImage("thin_wide_500x10", flat((500, 10)), (500, 10), _corners((500, 10), DUSK)),
    *AT_THE_LIMIT,
    ServedImage("one_pixel", flat((1, 1)), (1, 1), {(0, 0): DUSK}),
    ServedImage(
        "grey_16_bit",
        png16(np.repeat([[0, MID_GREY_16, 65535]], 8, axis=0).repeat(4, axis=1), GREY),
        (12, 8),
        {(0, 0): (0, 0, 0), (4, 0): (128, 128, 128), (11, 7): WHITE},
        as_processors_see_it=False,
    ),
    ServedImage(
        "grey_16_bit_transparent_value",
        png16(np.array([[1000] * 8 + [1001] * 8] * 8), GREY, transparent=(1000,)),
        (16, 8),
        {LEFT: WHITE, RIGHT: (4, 4, 4)},  # 1001 / 257 rounds to 4
        as_processors_see_it=False,
    ),
    ServedImage(
        "rgb_16_bit",
        png16(np.full((8, 16, 3), [65535, MID_GREY_16, 0]), TRUECOLOUR),
        (16, 8),
        {LEFT: (255, 128, 0), RIGHT: (255, 128, 0)},
    ),
    ServedImage(
        "rgba_16_bit",
        png16(np.array([[[65535, 0, 0, 0]] * 8 + [[0, 0, 65535, 65535]] * 8] * 8), TRUECOLOUR_ALPHA),
        (16, 8),
        {LEFT: WHITE, RIGHT: (0, 0, 255)},  # transparent red, opaque blue
    ),
    ServedImage(
        "grey_alpha_16_bit",
        png16(np.array([[[0, 0]] * 8 + [[MID_GREY_16, 65535]] * 8] * 8), GREY_ALPHA),
        (16, 8),
        {LEFT: WHITE, RIGHT: (128, 128, 128)},  # transparent black, opaque mid-grey
    ),
    ServedImage("palette", palette_image(), (16, 8), {LEFT: RED, RIGHT: BLUE}),
    ServedImage(
        "palette_transparent_index", palette_image(transparent_index=0), (16, 8), {LEFT: WHITE, RIGHT: BLUE}
    ),
    ServedImage(
        "rgba",
        encoded(halves("RGBA", (0, 0, 0, 0), (*BLUE, 255))),
        (16, 8),
        {LEFT: WHITE, RIGHT: BLUE},
    ),
    ServedImage(
        "rgba_half_transparent_black",
        encoded(Image.new("RGBA", (8, 8), (0, 0, 0, 128))),
        (8, 8),
        {(0, 0): (127, 127, 127)},
        tolerance=1,
    ),
    ServedImage(
        "grey_alpha", encoded(halves("LA", (0, 0), (100, 255))), (16, 8), {LEFT: WHITE, RIGHT: (100,) * 3}
    ),
    ServedImage(
        "webp_alpha",
        encoded(halves("RGBA", (0, 0, 0, 0), (*BLUE, 255)), "WEBP", lossless=True),
        (16, 8),
        {LEFT: WHITE, RIGHT: BLUE},
    ),
    ServedImage(
        "cmyk_jpeg",
        encoded(Image.new("CMYK", (16, 8), (0, 255, 255, 0)), "JPEG", quality=95),
        (16, 8),
        {LEFT: (255, 0, 0), RIGHT: (255, 0, 0)},
        tolerance=40,
    ),
    ServedImage("animated_gif_first_frame", gif([RED, (0, 200, 0)]), (16, 8), {LEFT: RED, RIGHT: BLUE}),
    ServedImage(
        "gif_transparent_index", gif([RED], transparent_index=0), (16, 8), {LEFT: WHITE, RIGHT: BLUE}
    ),
    ServedImage("grey", encoded(Image.new("L", (16, 8), 100)), (16, 8), {LEFT: (100,) * 3}),
    ServedImage("bilevel", encoded(halves("1", 0, 1)), (16, 8), {LEFT: (0, 0, 0), RIGHT: WHITE}),
]


def _truncated_png_header(width: int, height: int) -> bytes:
    """A PNG of this size cut short after its IDAT chunk begins: the refusal must come from the header."""
    whole = flat((width, height))
    return whole[: whole.index(b"IDAT") + 8]


REFUSED = [
    RefusedImage("thin_tall_1x500", flat((1, 500)), 1, 500, "500:1"),
    RefusedImage("thin_wide_500x1", flat((500, 1)), 500, 1, "500:1"),
    RefusedImage("just_past_limit", flat((1, LIMIT + 1)), 1, LIMIT + 1, f"{LIMIT + 1}:1"),
    RefusedImage("wide_4000x10", flat((4000, 10)), 4000, 10, "400:1"),
    RefusedImage("wide_1003x4", flat((1003, 4)), 1003, 4, "250.8:1"),
    RefusedImage("header_only_1x20000", _truncated_png_header(1, 20_000), 1, 20_000, "20000:1"),
]
