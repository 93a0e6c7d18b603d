"""lora_id end to end: real API and workers serving the tiny Llama with two
random LoRA adapters from --lora-dir, checked against PEFT's own generation."""

from __future__ import annotations

import concurrent.futures
import time
from collections.abc import Iterator
from urllib.parse import urlsplit

import openai
import pytest
import requests
import torch
from peft import PeftModel
from takeoff_client import TakeoffClient
from transformers import AutoModelForCausalLM, AutoTokenizer

from bench.sse import read_stream
from shared import defaults
from tests.integration.conftest import Api, Launcher
from tests.support.image_requests import IMAGES, Reference, payload, post_image

pytestmark = pytest.mark.integration

PROMPT = "The quick brown fox jumps over the lazy"
TOKENS = 24


@pytest.fixture(scope="module")
def reference(tiny_model_dir, tiny_lora_dir) -> dict[str | None, str]:
    """PEFT's greedy completion of PROMPT with each adapter active (None = the base model)."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    inputs = tokenizer(PROMPT, return_tensors="pt")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()

    def complete(model) -> str:
        with torch.inference_mode():
            output = model.generate(**inputs, do_sample=False, max_new_tokens=TOKENS, min_new_tokens=TOKENS)
        return tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)

    texts: dict[str | None, str] = {None: complete(base)}
    model = PeftModel.from_pretrained(base, tiny_lora_dir / "alpha", adapter_name="alpha")
    model.load_adapter(tiny_lora_dir / "beta", adapter_name="beta")
    for name in ("alpha", "beta"):
        model.set_adapter(name)
        texts[name] = complete(model.eval())
    assert len(set(texts.values())) == 3, "the adapters must change the output"
    return texts


@pytest.fixture(scope="module")
def server(
    redis_server, tiny_model_dir, tiny_lora_dir, tiny_llava_dir, tiny_llava_lora_dir, tmp_path_factory
) -> Iterator[Api]:
    """Group "primary": one worker, both adapters fit in memory, a 300 ms
    batching window so that concurrent requests share a batch. "tight": one
    worker that keeps a single adapter in memory. "vision": the tiny LLaVA and its adapters."""
    launched = Launcher(redis_server.url, tiny_model_dir, tmp_path_factory.mktemp("lora-server"))
    lora_dir = str(tiny_lora_dir)
    launched.worker("--lora-dir", lora_dir, "--batching", "micro", "--batch-duration-millis", "300")
    launched.worker("--lora-dir", lora_dir, "--max-loras", "1", group="tight")
    launched.worker("--lora-dir", str(tiny_llava_lora_dir), group="vision", model=tiny_llava_dir)
    yield launched.api()
    launched.stop_all()


def generate(
    server: Api, lora_id: str | None, group: str = "primary", min_new_tokens: int = TOKENS
) -> requests.Response:
    payload = {
        "text": PROMPT,
        "max_new_tokens": TOKENS,
        "min_new_tokens": min_new_tokens,
        "consumer_group": group,
    }
    if lora_id is not None:
        payload["lora_id"] = lora_id
    return requests.post(server.url + "/generate", json=payload, timeout=60)


def reader_of(server: Api, group: str) -> dict:
    (reader,) = requests.get(server.management_url + "/reader_groups", timeout=5).json()[group]
    return reader


def stats_of(server: Api, reader_id: str) -> dict:
    return requests.get(f"{server.management_url}/config/{reader_id}", timeout=5).json()["stats"]


@pytest.mark.parametrize("lora_id", [None, "alpha", "beta"])
def test_each_request_equals_peft_generation_with_its_adapter(server, reference, lora_id):
    response = generate(server, lora_id)
    assert response.status_code == 200, response.text
    assert response.json() == {"text": reference[lora_id]}


def test_a_mixed_batch_gives_what_each_request_gives_alone(server, reference):
    reader_id = reader_of(server, "primary")["reader_id"]
    time.sleep(defaults.READER_HEARTBEAT_SECONDS + 0.5)  # the registry has caught up with earlier requests
    before = stats_of(server, reader_id)
    lora_ids = ["alpha", "beta", None, "alpha"]
    with concurrent.futures.ThreadPoolExecutor(len(lora_ids)) as pool:
        answers = list(pool.map(lambda lora_id: generate(server, lora_id), lora_ids))
    assert [answer.json()["text"] for answer in answers] == [reference[lora_id] for lora_id in lora_ids]

    # The four requests ran together: about TOKENS decode steps for all of them, not 4 x TOKENS.
    deadline = time.monotonic() + 10
    while (after := stats_of(server, reader_id))["requests_finished"] < before["requests_finished"] + 4:
        assert time.monotonic() < deadline, "the worker's stats did not catch up"
        time.sleep(0.5)
    steps = after["decode_steps"] - before["decode_steps"]
    assert steps < 2 * TOKENS, f"{steps} decode steps: the requests did not share a batch"


def test_a_streamed_adapter_request_equals_its_answer(server, reference):
    payload = {"text": PROMPT, "max_new_tokens": TOKENS, "min_new_tokens": TOKENS, "lora_id": "beta"}
    with requests.post(server.url + "/generate_stream", json=payload, stream=True, timeout=60) as response:
        assert response.status_code == 200
        events = read_stream(response)
    assert "".join(event.data for event in events) == reference["beta"]


def test_an_unknown_lora_id_is_404(server):
    response = generate(server, "gamma")
    assert response.status_code == 404
    assert response.json()["error_type"] == "unknown_lora"


def test_the_management_port_shows_and_loads_adapters(server):
    reader = reader_of(server, "tight")
    assert reader["loras"]["available"] == ["alpha", "beta"]
    assert reader["loras"]["max_loaded"] == 1
    url = f"{server.management_url}/loras/{reader['reader_id']}"
    answer = requests.post(url, json={"lora_id": "beta"}, timeout=15)
    assert answer.status_code == 200, answer.text
    assert answer.json()["loaded"] == ["beta"]
    assert requests.post(url, json={"lora_id": "gamma"}, timeout=15).status_code == 404
    deadline = time.monotonic() + 10
    while requests.get(server.management_url + "/loras", timeout=5).json()["tight"][reader["reader_id"]][
        "loaded"
    ] != ["beta"]:
        assert time.monotonic() < deadline, "the registry never showed the loaded adapter"
        time.sleep(0.5)
    status = requests.get(server.management_url + "/status", timeout=5).json()["live_readers"]
    assert status[reader["reader_id"]]["loras"]["available"] == ["alpha", "beta"]


def test_eviction_and_reload_give_the_same_output(server, reference):
    for lora_id in ("alpha", "beta", "alpha", None, "beta"):
        response = generate(server, lora_id, group="tight")
        assert response.status_code == 200, response.text
        assert response.json()["text"] == reference[lora_id], lora_id


def test_requests_for_two_adapters_with_one_slot_both_finish(server, reference):
    lora_ids = ["alpha", "beta", "alpha", "beta"]
    with concurrent.futures.ThreadPoolExecutor(len(lora_ids)) as pool:
        answers = list(pool.map(lambda lora_id: generate(server, lora_id, group="tight"), lora_ids))
    assert [answer.json()["text"] for answer in answers] == [reference[lora_id] for lora_id in lora_ids]


def test_the_openai_api_takes_an_adapter_as_model(server, reference):
    client = openai.OpenAI(base_url=f"{server.openai_url}/v1", api_key="unused", max_retries=0)
    ids = [model.id for model in client.models.list()]
    assert {"primary", "primary/alpha", "primary/beta", "tight", "tight/alpha"} <= set(ids)
    texts = {}
    for model in ("primary/alpha", "tight/beta", "primary"):
        completion = client.completions.create(model=model, prompt=PROMPT, max_tokens=TOKENS, temperature=0)
        texts[model] = completion.choices[0].text
    plain = {
        lora_id: generate(server, lora_id, min_new_tokens=0).json()["text"]
        for lora_id in ("alpha", "beta", None)
    }
    assert texts == {"primary/alpha": plain["alpha"], "tight/beta": plain["beta"], "primary": plain[None]}
    assert len(set(texts.values())) == 3
    with pytest.raises(openai.BadRequestError, match="primary/beta"):  # both groups have "beta"
        client.completions.create(model="beta", prompt=PROMPT, max_tokens=2)


# -- a vision-language model -------------------------------------------------------


def test_image_requests_with_and_without_an_adapter_equal_peft(server, tiny_llava_dir, tiny_llava_lora_dir):
    base = Reference(tiny_llava_dir)
    adapted = Reference(tiny_llava_dir)
    adapted.model = PeftModel.from_pretrained(adapted.model, tiny_llava_lora_dir / "text").eval()
    image = IMAGES["red"]
    bodies = [
        payload("What is this?", consumer_group="vision", **extra) for extra in ({"lora_id": "text"}, {})
    ]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(lambda body: post_image(server.url, image, body), bodies))
    assert [answer.status_code for answer in answers] == [200, 200], answers[0].text
    expected = [adapted("What is this?", image, 8), base("What is this?", image, 8)]
    assert expected[0] != expected[1]
    assert [answer.json()["text"] for answer in answers] == expected


def test_an_adapter_that_changes_the_vision_tower_is_refused_with_422(server):
    body = payload("What is this?", consumer_group="vision", lora_id="vision")
    response = post_image(server.url, IMAGES["blue"], body)
    assert response.status_code == 422
    assert response.json()["error_type"] == "invalid_lora"
    assert "language model only" in response.json()["error"]


def test_the_takeoff_client_sends_lora_id_unchanged(server, reference):
    client = TakeoffClient(
        base_url="http://127.0.0.1",
        port=urlsplit(server.url).port,
        mgmt_port=urlsplit(server.management_url).port,
    )
    answer = client.generate(PROMPT, lora_id="beta", max_new_tokens=TOKENS, min_new_tokens=TOKENS)
    assert answer["text"] == reference["beta"]
