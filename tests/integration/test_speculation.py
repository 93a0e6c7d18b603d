"""Speculative decoding over HTTP: a worker drafting tokens (by lookup, or with a draft
model) answers what a worker that does not draft answers, reports its drafting in
/config, the metadata and /metrics; bad settings stop the worker with a message naming
them. (Random test models never repeat themselves, so their lookup drafts are rarely
kept: the engine tests check keeping. A draft model that is the model itself drafts
what the model says.)"""

from __future__ import annotations

import re
import subprocess
import sys
import time

import pytest
import requests

pytestmark = pytest.mark.integration

PROMPTS = ["one two three one two three one two three one two", "Hello there", "a b a b a b a b"]


def answers(api, group: str) -> list[dict]:
    payload = {"text": PROMPTS, "max_new_tokens": 12, "return_metadata": True, "consumer_group": group}
    response = requests.post(api.url + "/generate", json=payload, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def test_a_drafting_worker_answers_what_a_plain_one_answers(start_api, start_worker):
    start_worker("--speculative", "ngram", "--draft-tokens", "5", group="drafting")
    start_worker("--speculative", "off", group="plain")
    api = start_api()
    drafted, plain = answers(api, "drafting"), answers(api, "plain")
    assert drafted["text"] == plain["text"]
    assert all(isinstance(row["accepted_draft_tokens"], int) for row in drafted["metadata"])
    assert all(row["accepted_draft_tokens"] == 0 for row in plain["metadata"])

    groups = requests.get(api.management_url + "/reader_groups", timeout=10).json()
    configs = {
        group: requests.get(f"{api.management_url}/config/{groups[group][0]['reader_id']}", timeout=10).json()
        for group in ("drafting", "plain")
    }
    assert configs["drafting"]["speculative"] == "ngram" and configs["drafting"]["draft_tokens"] == 5
    assert configs["plain"]["speculative"] == "off"
    text = requests.get(api.url + "/metrics", timeout=10).text
    for family in ("draft_tokens_proposed", "draft_tokens_accepted", "draft_checks"):
        assert re.search(rf'^mmserve_worker_{family}_total{{.*drafter="ngram".*}} \S+$', text, re.M), family


def test_a_worker_drafting_with_a_draft_model_answers_what_a_plain_one_answers(
    start_api, start_worker, tiny_model_dir
):
    start_worker("--speculative", "draft", "--draft-model", str(tiny_model_dir), group="drafting")
    start_worker("--speculative", "off", group="plain")
    api = start_api()
    drafted, plain = answers(api, "drafting"), answers(api, "plain")
    assert drafted["text"] == plain["text"]
    assert sum(row["accepted_draft_tokens"] for row in drafted["metadata"]) > 0

    groups = requests.get(api.management_url + "/reader_groups", timeout=10).json()
    reader = groups["drafting"][0]["reader_id"]
    config = requests.get(f"{api.management_url}/config/{reader}", timeout=10).json()
    assert config["speculative"] == "draft" and config["draft_model"] == str(tiny_model_dir)
    deadline = time.monotonic() + 15  # the worker publishes its counters with its heartbeat
    while model_drafts_kept(api) == 0 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert model_drafts_kept(api) > 0


def model_drafts_kept(api) -> float:
    text = requests.get(api.url + "/metrics", timeout=10).text
    family = "mmserve_worker_draft_tokens_accepted_total"
    found = re.search(rf'^{family}{{.*drafter="model".*}} (\S+)$', text, re.M)
    return float(found.group(1)) if found else 0.0


def refusal(redis_server, *flags: str) -> str:
    """What a worker started with `flags` says on its way out (it must fail)."""
    result = subprocess.run(
        [sys.executable, "-m", "mmserve", "worker", "--redis-url", redis_server.url, *flags],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    return result.stderr


def test_draft_tokens_past_the_limit_are_refused(redis_server):
    stderr = refusal(redis_server, "--draft-tokens", "99")
    assert "--draft-tokens" in stderr and "99" in stderr


def test_drafting_with_a_draft_model_needs_one(redis_server):
    assert "--draft-model" in refusal(redis_server, "--speculative", "draft")
