"""The determinism bench's pure helpers (no server started)."""

import random

from bench.determinism import (
    distinct_completions,
    divergences,
    probe_payload,
    random_load_request,
    setting_flags,
    speed_ratios,
    where_it_differs,
)


def test_distinct_completions_counts_them_most_common_first():
    result = distinct_completions(["a", "b", "a", "c", "a", "b"])
    assert result == {"completions": 6, "distinct": 3, "most_common_share": 0.5, "counts": [3, 2, 1]}
    assert distinct_completions(["x"] * 4)["distinct"] == 1
    assert distinct_completions(["x"] * 4)["most_common_share"] == 1.0
    assert distinct_completions([])["most_common_share"] is None


def test_divergences_are_measured_from_the_most_common_completion():
    texts = ["the cat sat", "the cat sat", "the cat ran", "the dog sat", "the cat sat"]
    result = divergences(texts, tokenize=str.split)
    assert result["most_common"] == "the cat sat"
    assert result["earliest_char"] == 4
    assert result["earliest_token"] == 1
    found = [(v["count"], v["first_differing_char"], v["first_differing_token"]) for v in result["variants"]]
    assert found == [(1, 8, 2), (1, 4, 1)]
    assert result["variants_left_off"] == 0


def test_divergences_of_identical_completions_and_without_a_tokenizer():
    same = divergences(["abc"] * 3)
    assert same["earliest_char"] is None and same["earliest_token"] is None and same["variants"] == []
    prefix = divergences(["abcd", "abcd", "ab"], keep=0)
    assert prefix["earliest_char"] == 2  # one answer ended sooner
    assert "first_differing_token" not in str(prefix["variants"])
    assert prefix["variants_left_off"] == 1
    assert divergences([])["variants"] == []


def test_speed_ratios_pair_settings_within_each_round_and_take_the_median():
    runs = [
        {"round": 0, "setting": "on", "concurrency_1": 18.0, "concurrency_8": 90.0},
        {"round": 0, "setting": "off", "concurrency_1": 20.0, "concurrency_8": 100.0},
        {"round": 1, "setting": "on", "concurrency_1": 30.0, "concurrency_8": 120.0},
        {"round": 1, "setting": "off", "concurrency_1": 30.0, "concurrency_8": 150.0},
        {"round": 2, "setting": "on", "concurrency_1": 10.0, "concurrency_8": 10.0},  # no pair
    ]
    assert speed_ratios(runs) == {
        "concurrency_1": {"ratios": [0.9, 1.0], "median": 0.95},
        "concurrency_8": {"ratios": [0.9, 0.8], "median": 0.85},
    }
    assert speed_ratios(runs[:1]) == {
        "concurrency_1": {"ratios": [], "median": None},
        "concurrency_8": {"ratios": [], "median": None},
    }


def test_load_requests_vary_and_repeat_with_the_seed():
    first = [random_load_request(random.Random(3)) for _ in range(2)]
    assert first[0] == first[1]
    rng = random.Random(0)
    load = [random_load_request(rng) for _ in range(200)]
    assert all(8 <= r["max_new_tokens"] <= 96 for r in load)
    assert all(5 <= len(r["text"].split()) <= 200 for r in load)
    assert len({r["text"] for r in load}) == 200
    assert {r["stream"] for r in load} == {True, False}
    assert {r["use_chat_template"] for r in load} == {True, False}


def test_the_probe_is_greedy_forced_to_its_length_and_the_setting_is_the_worker_flag():
    payload = probe_payload(64)
    assert payload["sampling_topk"] == 1
    assert payload["max_new_tokens"] == payload["min_new_tokens"] == 64
    assert payload["use_chat_template"] is True
    assert setting_flags("off") == ["--batch-invariant", "off"]


def test_where_it_differs_by_character_and_by_token():
    assert where_it_differs("a b c", "a b c", str.split) == {
        "first_differing_char": None,
        "first_differing_token": None,
    }
    assert where_it_differs("a b c", "a x c", str.split) == {
        "first_differing_char": 2,
        "first_differing_token": 1,
    }
    assert where_it_differs("abc", "abd") == {"first_differing_char": 2}
