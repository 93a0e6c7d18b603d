"""Images that trip up other servers (tests/support/odd_images.py): each is either
served as an 8-bit RGB image of its own size and sensible colours (16-bit scaled,
transparency on white, the first frame of an animation), or refused with a 400
naming its aspect ratio; never a 5xx."""

from __future__ import annotations

import io
import json

import pytest
import requests
from PIL import Image, ImageCms

from api.errors import InvalidImage
from api.images import canonical_image
from shared import defaults, keys
from tests.support.api_fakes import add_reader, done, token
from tests.support.odd_images import DUSK, REFUSED, SERVED, RefusedImage, ServedImage, encoded, flat

MAX_PIXELS = defaults.DEFAULT_MAX_IMAGE_PIXELS
PAYLOAD = {"text": "What is in the picture?", "max_new_tokens": 2}


@pytest.fixture(autouse=True)
def _vision_reader(connection):
    add_reader(connection, model_type="VISION", model_name="tiny-vlm")


def canonical_png(data: bytes) -> bytes:
    return canonical_image(data, max_pixels=MAX_PIXELS, source="image_data").data


def post_image(client, data: bytes):
    files = {
        "image_data": ("odd", io.BytesIO(data), "application/octet-stream"),
        "json_data": (None, json.dumps(PAYLOAD), "application/json"),
    }
    prepared = requests.Request("POST", "http://localhost/image_generate", files=files).prepare()
    return client.post("/image_generate", data=prepared.body, content_type=prepared.headers["Content-Type"])


def by_name(images):
    return pytest.mark.parametrize("odd", images, ids=[image.name for image in images])


def assert_names_the_ratio(message: str, odd: RefusedImage) -> None:
    assert f"{odd.width}x{odd.height}" in message
    assert f"aspect ratio of {odd.ratio}" in message
    assert f"{defaults.MAX_IMAGE_ASPECT_RATIO}:1" in message


def assert_served_as_expected(png: bytes, odd: ServedImage) -> None:
    image = Image.open(io.BytesIO(png))
    assert (image.format, image.mode, image.size) == ("PNG", "RGB", odd.size)
    for point, expected in odd.colours.items():
        found = image.getpixel(point)
        assert all(abs(a - b) <= odd.tolerance for a, b in zip(found, expected, strict=True)), (
            f"{odd.name} at {point}: {found}, expected {expected}"
        )


@by_name(SERVED)
def test_an_odd_image_becomes_rgb_of_its_size_and_colours(odd: ServedImage):
    assert_served_as_expected(canonical_png(odd.data), odd)


def test_the_canonical_png_holds_pixels_only():
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    with_profile = encoded(Image.new("RGB", (8, 8), DUSK), icc_profile=srgb)
    assert canonical_png(with_profile) == canonical_png(flat((8, 8), DUSK))


@by_name(REFUSED)
def test_a_thin_image_is_refused_naming_its_ratio(odd: RefusedImage):
    with pytest.raises(InvalidImage) as refused:
        canonical_png(odd.data)
    assert_names_the_ratio(refused.value.message, odd)


@by_name(SERVED)
def test_an_odd_upload_is_served(client, worker, connection, odd: ServedImage):
    stored = {}

    def answer(job):
        stored["png"] = connection.hget(keys.image_key(job.image_ids[0]), keys.IMAGE_DATA_FIELD)
        yield token(0, 0, "ok")
        yield done(0, 1)

    worker.serve(answer)
    response = post_image(client, odd.data)
    assert response.status_code == 200, response.get_data(as_text=True)
    worker.join()
    assert_served_as_expected(stored["png"], odd)


@by_name(REFUSED)
def test_a_thin_upload_is_400_naming_its_ratio(client, connection, odd: RefusedImage):
    response = post_image(client, odd.data)
    assert response.status_code == 400, response.get_data(as_text=True)
    body = response.get_json()
    assert body["error_type"] == "invalid_image"
    assert_names_the_ratio(body["error"], odd)
    assert connection.llen(f"rq:queue:{keys.queue_name('primary')}") == 0
