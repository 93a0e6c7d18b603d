"""The prefix cache over HTTP: a prompt that starts like an earlier one reports the prompt
tokens its worker reused (Takeoff metadata, OpenAI usage), answers as before, and the
worker's prefix-cache metrics move; `--prefix-cache off` reuses nothing."""

from __future__ import annotations

import re
import time

import pytest
import requests

pytestmark = pytest.mark.integration

BLOCK = 16
SYSTEM = " ".join(f"Rule {n}: answer briefly and politely, in plain words." for n in range(12))


def generate(api, text: str) -> dict:
    payload = {"text": text, "max_new_tokens": 6, "return_metadata": True}
    response = requests.post(api.url + "/generate", json=payload, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def metric(api, name: str) -> float:
    text = requests.get(api.url + "/metrics", timeout=10).text
    values = [float(m.group(1)) for m in re.finditer(rf"^{name}{{[^}}]*}} (\S+)$", text, re.M)]
    return sum(values)


def test_a_repeated_prefix_is_reported_reused_and_answers_do_not_change(start_api, start_worker):
    start_worker("--prefix-cache-block-tokens", str(BLOCK))
    api = start_api()
    first = generate(api, f"{SYSTEM} Question: what is rule 3?")
    second = generate(api, f"{SYSTEM} Question: what is rule 3?")
    third = generate(api, f"{SYSTEM} Question: and rule 5?")
    assert first["metadata"]["cached_prompt_tokens"] == 0
    prompt_tokens = second["metadata"]["prompt_tokens"]
    assert second["metadata"]["cached_prompt_tokens"] == (prompt_tokens - 1) // BLOCK * BLOCK
    assert third["metadata"]["cached_prompt_tokens"] >= BLOCK
    assert second["text"] == first["text"]

    chat = {
        "model": "primary",
        "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Rule 1?"}],
        "max_tokens": 4,
    }
    for _ in range(2):
        response = requests.post(api.openai_url + "/v1/chat/completions", json=chat, timeout=60)
        assert response.status_code == 200, response.text
    usage = response.json()["usage"]
    assert usage["prompt_tokens_details"]["cached_tokens"] >= usage["prompt_tokens"] - BLOCK

    deadline = time.monotonic() + 15  # the worker publishes its counters with its heartbeat
    while metric(api, "mmserve_worker_prefix_cache_hit_tokens_total") == 0 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert metric(api, "mmserve_worker_prefix_cache_hit_tokens_total") > 0
    assert metric(api, "mmserve_worker_prefix_cache_missed_tokens_total") > 0
    assert metric(api, "mmserve_worker_prefix_cache_bytes") > 0
    (reader,) = requests.get(api.management_url + "/reader_groups", timeout=10).json()["primary"]
    config = requests.get(f"{api.management_url}/config/{reader['reader_id']}", timeout=10).json()
    assert reader["prefix_cache_bytes"] > 0
    assert config["prefix_cache"] == "on" and config["prefix_cache_block_tokens"] == BLOCK


def test_with_the_cache_off_nothing_is_reused(start_api, start_worker):
    start_worker("--prefix-cache", "off")
    api = start_api()
    generate(api, f"{SYSTEM} Question: what is rule 3?")
    again = generate(api, f"{SYSTEM} Question: what is rule 3?")
    assert again["metadata"]["cached_prompt_tokens"] == 0
    (reader,) = requests.get(api.management_url + "/reader_groups", timeout=10).json()["primary"]
    config = requests.get(f"{api.management_url}/config/{reader['reader_id']}", timeout=10).json()
    assert reader["prefix_cache_bytes"] == 0 and config["prefix_cache"] == "off"
