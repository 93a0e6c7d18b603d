"""Image-to-text end to end: multipart HTTP -> API -> Redis -> worker serving a
tiny random vision-language model (LLaVA, Idefics3, SmolVLM) -> JSON / SSE."""

from __future__ import annotations

import concurrent.futures
import json
import re
from urllib.parse import urlsplit

import pytest
import requests
from takeoff_client import TakeoffClient

from bench.sse import read_stream
from shared import keys
from tests.support.image_requests import IMAGES, Reference, payload, png, post_image

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def llava_reference(tiny_llava_dir) -> Reference:
    return Reference(tiny_llava_dir)


def assert_no_images_left(redis_client) -> None:
    assert list(redis_client.scan_iter(keys.image_key("*"))) == []


def test_llava_answers_equal_hf_greedy_streamed_or_not(
    start_api, start_worker, tiny_llava_dir, llava_reference, redis_client
):
    start_worker(model=tiny_llava_dir)
    api = start_api()
    groups = requests.get(api.management_url + "/reader_groups").json()
    assert [reader["model_type"] for reader in groups["primary"]] == ["VISION"]

    red = IMAGES["red"]
    response = post_image(api.url, red, payload("What is in the picture?", return_metadata=True))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["text"] == llava_reference("What is in the picture?", red, 8)
    assert body["metadata"]["prompt_tokens"] > 16  # the image's 16 tokens are part of the prompt

    with post_image(api.url, red, payload("What is in the picture?"), stream=True) as stream:
        events = read_stream(stream)
    assert "".join(event.data for event in events) == body["text"]

    questions = ["Describe it.", "Which colour?", "How big?"]
    whole = post_image(api.url, red, payload(questions, 6)).json()
    assert whole == {"text": [llava_reference(question, red, 6) for question in questions]}
    with post_image(api.url, red, payload(questions, 6), stream=True) as stream:
        texts = ["", "", ""]
        for event in read_stream(stream):
            texts[event.json()["batch_id"]] += event.json()["text"]
    assert texts == whole["text"]
    assert_no_images_left(redis_client)


def test_concurrent_requests_with_different_images_share_a_batch(
    start_api, start_worker, tiny_llava_dir, llava_reference, redis_client
):
    worker = start_worker("--batch-duration-millis", "1500", "--max-batch-size", "8", model=tiny_llava_dir)
    api = start_api()
    question = "What do you see?"

    def ask_all(names: list[str]) -> list[str]:
        def ask(name: str) -> str:
            response = post_image(api.url, IMAGES[name], payload(question, 6))
            assert response.status_code == 200, response.text
            return response.json()["text"]

        with concurrent.futures.ThreadPoolExecutor(len(names)) as pool:
            return list(pool.map(ask, names))

    first = ask_all(["red", "blue", "green", "grey"])
    assert first == [llava_reference(question, IMAGES[name], 6) for name in ("red", "blue", "green", "grey")]
    assert len(set(first)) == 4, "each image should get its own answer"
    second = ask_all(["red", "yellow", "green", "grey"])  # one image changed
    assert [a == b for a, b in zip(first, second, strict=True)] == [True, False, True, True]
    batches = [int(n) for n in re.findall(r"running a batch of (\d+) request", worker.log())]
    assert batches == [4, 4], worker.log()[-3000:]
    assert_no_images_left(redis_client)


def test_idefics3_and_smolvlm_answer_equal_hf_greedy(
    start_api, start_worker, tiny_idefics3_dir, tiny_smolvlm_dir, redis_client
):
    start_worker(model=tiny_idefics3_dir, group="idefics3")
    start_worker(model=tiny_smolvlm_dir, group="smolvlm")  # SmolVLM's processor, without torchvision
    api = start_api()
    for group, directory in (("idefics3", tiny_idefics3_dir), ("smolvlm", tiny_smolvlm_dir)):
        reference = Reference(directory)
        for name in ("green", "grey"):  # split into different numbers of tiles
            body = payload(["Describe it.", "Anything else?"], 6, consumer_group=group)
            response = post_image(api.url, IMAGES[name], body)
            assert response.status_code == 200, (group, response.text)
            expected = [reference(text, IMAGES[name], 6) for text in body["text"]]
            assert response.json() == {"text": expected}, group
        with post_image(
            api.url, IMAGES["grey"], payload("Describe it.", 6, consumer_group=group), stream=True
        ) as s:
            assert "".join(event.data for event in read_stream(s)) == expected[0], group
    assert_no_images_left(redis_client)


def test_text_groups_refuse_images_and_image_paths_read_the_image_dir(
    start_api, start_worker, tiny_llava_dir, llava_reference, tmp_path, redis_client
):
    start_worker(group="text")  # the tiny text-only Llama
    start_worker(model=tiny_llava_dir)
    image_dir = tmp_path / "pictures"
    image_dir.mkdir()
    (image_dir / "blue.png").write_bytes(png(IMAGES["blue"]))
    (tmp_path / "private.png").write_bytes(png(IMAGES["red"]))
    api = start_api("--image-dir", str(image_dir))

    refused = post_image(api.url, IMAGES["red"], payload("Hi", consumer_group="text"))
    assert refused.status_code == 400
    assert refused.json()["error_type"] == "model_does_not_accept_images"

    response = requests.post(api.url + "/generate", json=payload("What?", image_paths=["blue.png"]))
    assert response.status_code == 200, response.text
    assert response.json() == {"text": llava_reference("What?", IMAGES["blue"], 8)}
    for path in ("../private.png", str(tmp_path / "private.png"), "http://127.0.0.1:9/x.png"):
        response = requests.post(api.url + "/generate", json=payload("What?", image_paths=[path]))
        assert response.status_code == 400, (path, response.text)

    garbage = requests.post(
        api.url + "/image_generate",
        files={"image_data": ("x.png", b"\x89PNG garbage"), "json_data": (None, json.dumps(payload("x")))},
    )
    assert garbage.status_code == 400 and garbage.json()["error_type"] == "invalid_image"
    assert_no_images_left(redis_client)


def test_the_takeoff_client_sends_images(
    start_api, start_worker, tiny_llava_dir, llava_reference, tmp_path, redis_client
):
    start_worker(model=tiny_llava_dir)
    api = start_api()
    client = TakeoffClient(
        base_url="http://127.0.0.1",
        port=urlsplit(api.url).port,
        mgmt_port=urlsplit(api.management_url).port,
    )
    path = tmp_path / "grey.png"
    path.write_bytes(png(IMAGES["grey"]))
    expected = llava_reference("What is this?", IMAGES["grey"], 7)
    answer = client.generate(
        "What is this?", image_path=path, max_new_tokens=7, min_new_tokens=7, use_chat_template=True
    )
    assert answer["text"] == expected
    streamed = client.generate_stream(
        "What is this?", image_path=str(path), max_new_tokens=7, min_new_tokens=7, use_chat_template=True
    )
    assert "".join(event.data for event in streamed if event.event == "message") == expected
    assert_no_images_left(redis_client)
