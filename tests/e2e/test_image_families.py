"""Every vision-language family mmserve serves, behind `mmserve serve --model <tiny model>`
as a user runs it: the published Takeoff client's multipart requests, `image_paths`,
several images in one prompt, streaming, the OpenAI route's image parts and odd uploads,
each answer equal to transformers' greedy `generate` (float32)."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import openai
import pytest
import requests
from PIL import Image
from takeoff_client import TakeoffClient

from bench.serving import ServeProcess
from bench.sse import read_stream
from bench.tiny_vlms import FAMILIES
from tests.support.image_requests import IMAGES, Reference, payload, png, post_image

pytestmark = pytest.mark.e2e

READY_TIMEOUT = 180.0
TOKENS = 6


class Served:
    def __init__(self, family: str, serve: ServeProcess, reference: Reference, image_dir: Path) -> None:
        self.family = family
        self.serve = serve
        self.reference = reference
        self.image_dir = image_dir

    @property
    def takeoff(self) -> TakeoffClient:
        return TakeoffClient(
            base_url="http://127.0.0.1",
            port=urlsplit(self.serve.url).port,
            mgmt_port=urlsplit(self.serve.management_url).port,
        )

    @property
    def placeholder(self) -> str:
        return self.reference.processor.image_token


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def served(request, tiny_vlm_dir, tmp_path_factory) -> Iterator[Served]:
    family = request.param
    directory = tiny_vlm_dir(family)
    root = tmp_path_factory.mktemp(f"serve-{family}")
    image_dir = root / "pictures"
    image_dir.mkdir()
    for name, image in IMAGES.items():
        (image_dir / f"{name}.png").write_bytes(png(image))
    serve = ServeProcess.tiny(
        directory,
        "--image-dir",
        str(image_dir),
        log_path=root / "serve.log",
    )
    try:
        serve.wait_ready(READY_TIMEOUT)
    except RuntimeError as exc:
        serve.stop()
        pytest.fail(f"{family}: {exc}")
    yield Served(family, serve, Reference(directory), image_dir)
    serve.stop()  # Ctrl-C: serve stops its Redis, API and worker with it


def test_the_takeoff_client_gets_hf_greedy_answers_streamed_or_not(served, tmp_path):
    path = tmp_path / "grey.png"
    path.write_bytes(png(IMAGES["grey"]))
    expected = served.reference("What is this?", IMAGES["grey"], TOKENS)
    flags = {"max_new_tokens": TOKENS, "min_new_tokens": TOKENS, "use_chat_template": True}
    assert served.takeoff.generate("What is this?", image_path=path, **flags)["text"] == expected
    streamed = served.takeoff.generate_stream("What is this?", image_path=str(path), **flags)
    assert "".join(event.data for event in streamed if event.event == "message") == expected


def test_several_images_come_in_order_multipart_first_then_image_paths(served):
    images = [IMAGES["red"], IMAGES["green"], IMAGES["blue"]]
    body = payload("Compare them.", TOKENS, image_paths=["green.png", "blue.png"])
    response = post_image(served.serve.url, IMAGES["red"], body)
    assert response.status_code == 200, response.text
    assert response.json()["text"] == served.reference("Compare them.", images, TOKENS)
    with post_image(served.serve.url, IMAGES["red"], body, stream=True) as stream:
        assert "".join(event.data for event in read_stream(stream)) == response.json()["text"]


def test_without_the_chat_template_placeholders_place_each_image(served):
    text = f"First {served.placeholder} then {served.placeholder}: which is red?"
    body = payload(text, TOKENS, use_chat_template=False, image_paths=["yellow.png"])
    response = post_image(served.serve.url, IMAGES["red"], body)
    assert response.status_code == 200, response.text
    expected = served.reference(text, [IMAGES["red"], IMAGES["yellow"]], TOKENS, chat_template=False)
    assert response.json()["text"] == expected

    mismatch = post_image(served.serve.url, IMAGES["red"], payload(text, TOKENS, use_chat_template=False))
    assert mismatch.status_code == 422, mismatch.text
    assert "holds 2" in mismatch.json()["error"] and "has 1 image" in mismatch.json()["error"]


def test_an_openai_image_part_answers_like_image_generate(served):
    client = openai.OpenAI(
        base_url=f"http://127.0.0.1:{served.serve.openai_port}/v1", api_key="unused", max_retries=0
    )
    encoded = base64.b64encode(png(IMAGES["blue"])).decode()
    content = [
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{encoded}"}},
        {"type": "text", "text": "What colour?"},
    ]
    answer = client.chat.completions.create(
        model="primary",
        messages=[{"role": "user", "content": content}],
        max_tokens=TOKENS,
        temperature=0,
    )
    takeoff = post_image(served.serve.url, IMAGES["blue"], payload("What colour?", TOKENS))
    assert takeoff.status_code == 200, takeoff.text
    assert answer.choices[0].message.content == takeoff.json()["text"]


def test_the_config_shows_the_image_pixel_bounds_of_dynamic_resolution_models(served):
    groups = requests.get(served.serve.management_url + "/reader_groups", timeout=10).json()
    (reader,) = groups["primary"]
    config = requests.get(f"{served.serve.management_url}/config/{reader['reader_id']}", timeout=10).json()
    assert reader["model_type"] == "VISION"
    if served.family.startswith("qwen"):
        assert config["image_min_pixels"] > 0 and config["image_max_pixels"] >= config["image_min_pixels"]
    else:
        assert config["image_min_pixels"] is None and config["image_max_pixels"] is None


def test_odd_uploads_are_answered_or_refused_with_the_reason(served):
    """Each odd upload the API serves gets the answer of its canonical image; each
    it refuses is a 400 naming its aspect ratio, never a 5xx."""
    from api.images import canonical_image
    from tests.support.odd_images import REFUSED, SERVED

    body = json.dumps(payload("Describe it.", 2))

    def upload(name: str, data: bytes) -> requests.Response:
        files = {"image_data": (name, data), "json_data": (None, body, "application/json")}
        return requests.post(served.serve.url + "/image_generate", files=files, timeout=60)

    for odd in SERVED:
        response = upload(odd.name, odd.data)
        assert response.status_code == 200, (odd.name, response.text)
        canonical = canonical_image(odd.data, max_pixels=2**24, source=odd.name)
        expected = served.reference("Describe it.", Image.open(io.BytesIO(canonical.data)), 2)
        assert response.json()["text"] == expected, odd.name
    for odd in REFUSED:
        response = upload(odd.name, odd.data)
        assert response.status_code == 400, (odd.name, response.text)
        assert odd.ratio in response.json()["error"], odd.name
