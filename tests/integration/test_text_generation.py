"""The text path end to end: HTTP -> API -> Redis/RQ -> worker -> SSE."""

from __future__ import annotations

import concurrent.futures
import re
import threading
import time

import pytest
import requests
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from bench.sse import iter_lines, parse_sse, read_stream

pytestmark = pytest.mark.integration

PROMPTS = ["Hello there", "The quick brown fox jumps over the lazy", "1 2 3"]


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    """Greedy completions by HF generate, one prompt at a time."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()

    def complete(prompt: str, max_new_tokens: int) -> str:
        inputs = tokenizer(prompt, return_tensors="pt")
        with torch.inference_mode():
            output = model.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens)
        return tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)

    return complete


@pytest.fixture
def server(shared_server):
    return shared_server


def test_generate_string_equals_hf_greedy(server, reference):
    response = requests.post(server.url + "/generate", json={"text": PROMPTS[1], "max_new_tokens": 12})
    assert response.status_code == 200, response.text
    assert response.json() == {"text": reference(PROMPTS[1], 12)}


def test_generate_list_returns_list_in_order(server, reference):
    response = requests.post(server.url + "/generate", json={"text": PROMPTS, "max_new_tokens": 10})
    assert response.status_code == 200, response.text
    assert response.json() == {"text": [reference(prompt, 10) for prompt in PROMPTS]}


def test_one_element_list_stays_a_list(server, reference):
    response = requests.post(server.url + "/generate", json={"text": [PROMPTS[0]], "max_new_tokens": 5})
    assert response.json() == {"text": [reference(PROMPTS[0], 5)]}


def test_stream_of_string_concatenates_to_generate_text(server, reference):
    with requests.post(
        server.url + "/generate_stream", json={"text": PROMPTS[2], "max_new_tokens": 16}, stream=True
    ) as response:
        assert response.status_code == 200
        assert response.headers["Content-Type"].startswith("text/event-stream")
        events = read_stream(response)
    assert events, "no events streamed"
    assert all(event.event == "message" for event in events)
    assert "".join(event.data for event in events) == reference(PROMPTS[2], 16)


def test_batch_stream_carries_batch_ids(server, reference):
    with requests.post(
        server.url + "/generate_stream", json={"text": PROMPTS, "max_new_tokens": 8}, stream=True
    ) as response:
        events = read_stream(response)
    texts = ["" for _ in PROMPTS]
    for event in events:
        payload = event.json()
        assert set(payload) == {"text", "batch_id"}
        texts[payload["batch_id"]] += payload["text"]
    assert texts == [reference(prompt, 8) for prompt in PROMPTS]


def test_metadata_reports_tokens_and_finish_reason(server):
    response = requests.post(
        server.url + "/generate", json={"text": "Hi", "max_new_tokens": 4, "return_metadata": True}
    )
    body = response.json()
    metadata = body["metadata"]
    assert metadata["completion_tokens"] <= 4
    assert metadata["prompt_tokens"] >= 1
    assert metadata["finish_reason"] in {"length", "eos"}


def test_seeded_sampling_is_reproducible(server):
    payload = {
        "text": "Once upon",
        "max_new_tokens": 12,
        "sampling_topk": 0,
        "sampling_temperature": 1.5,
        "seed": 1234,
    }
    first = requests.post(server.url + "/generate", json=payload).json()
    second = requests.post(server.url + "/generate", json=payload).json()
    other = requests.post(server.url + "/generate", json={**payload, "seed": 99}).json()
    assert first == second
    assert first != other


def test_concurrent_clients_share_one_batch(server, start_worker, reference):
    worker = start_worker("--batch-duration-millis", "1500", "--max-batch-size", "8", group="batched")

    def ask(prompt: str) -> dict:
        payload = {"text": prompt, "max_new_tokens": 6, "consumer_group": "batched"}
        return requests.post(server.url + "/generate", json=payload).json()

    with concurrent.futures.ThreadPoolExecutor(len(PROMPTS)) as pool:
        answers = list(pool.map(ask, PROMPTS))
    assert answers == [{"text": reference(prompt, 6)} for prompt in PROMPTS]
    batches = [int(n) for n in re.findall(r"running a batch of (\d+) request", worker.log())]
    assert batches == [len(PROMPTS)], worker.log()[-3000:]


def test_a_request_arriving_mid_run_streams_before_the_running_one_ends(server, start_worker, reference):
    start_worker("--batching", "continuous", group="joining")
    long_payload = {
        "text": PROMPTS[1],
        "max_new_tokens": 600,
        "min_new_tokens": 600,
        "consumer_group": "joining",
    }
    short_payload = {"text": PROMPTS[0], "max_new_tokens": 8, "consumer_group": "joining"}

    def timed_stream(payload: dict, started: threading.Event | None = None) -> tuple[str, float, float]:
        """(text, time of the first token, time of the end)."""
        first = None
        pieces = []
        with requests.post(
            server.url + "/generate_stream", json=payload, stream=True, timeout=120
        ) as response:
            for event in parse_sse(iter_lines(response)):
                assert event.event == "message", event
                first = first or time.monotonic()
                pieces.append(event.data)
                if started is not None and len(pieces) == 5:
                    started.set()
        return "".join(pieces), first, time.monotonic()

    started = threading.Event()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        running = pool.submit(timed_stream, long_payload, started)
        assert started.wait(60)
        short_text, short_first, short_end = timed_stream(short_payload)
        long_text, _, long_end = running.result(timeout=120)
    assert short_first < long_end and short_end < long_end
    assert short_text == reference(PROMPTS[0], 8)
    assert timed_stream(long_payload)[0] == long_text  # the same tokens as alone


def test_unknown_group_is_404(server):
    response = requests.post(server.url + "/generate", json={"text": "x", "consumer_group": "nobody"})
    assert response.status_code == 404
    assert "nobody" in response.json()["error"]


def test_group_without_live_workers_is_503(server, redis_client):
    from shared import keys

    redis_client.zadd(keys.GROUPS_KEY, {"ghosts": time.time()})
    response = requests.post(server.url + "/generate", json={"text": "x", "consumer_group": "ghosts"})
    assert response.status_code == 503
    assert "Retry-After" in response.headers


def test_invalid_payload_is_422_naming_the_key(server):
    response = requests.post(server.url + "/generate", json={"text": "x", "bogus": 1, "max_new_tokens": -1})
    assert response.status_code == 422
    assert "bogus" in response.json()["error"]
    assert "max_new_tokens" in response.json()["error"]


def test_management_lists_the_worker(server):
    groups = requests.get(server.management_url + "/reader_groups").json()
    (reader,) = groups["primary"]
    assert reader["ready"] is True
    assert reader["pids"]
    assert reader["fused_layers"] > 0 and reader["joint_prefill"] is True  # the tiny Llama's defaults
    status = requests.get(server.management_url + "/status").json()
    assert status["live_readers"][reader["reader_id"]]["consumer_groups"] == ["primary"]
    assert requests.get(server.url + "/readyz").status_code == 200


@pytest.mark.parametrize(("kind", "dtype"), [("int8", "float32"), ("int4", "bfloat16")])
def test_a_worker_with_quantized_weights_answers_and_says_so(start_worker, start_api, kind, dtype):
    start_worker("--quantize", kind, "--dtype", dtype, group=kind)  # the last --dtype wins
    api = start_api()
    payload = {"text": PROMPTS[1], "max_new_tokens": 6, "consumer_group": kind}
    response = requests.post(api.url + "/generate", json=payload)
    assert response.status_code == 200, response.text
    assert isinstance(response.json()["text"], str)
    (reader,) = requests.get(api.management_url + "/reader_groups", timeout=5).json()[kind]
    assert (reader["quantization"], reader["dtype"]) == (kind, dtype)
