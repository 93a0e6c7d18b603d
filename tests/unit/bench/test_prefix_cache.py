"""The prefix-cache bench's pure helpers (no server started)."""

import math
import os
import random
from pathlib import Path

import pytest

from bench.prefix_cache import (
    COMPARISONS,
    ENV_BYTES,
    ENV_SETTING,
    QWEN_IMAGE_MAX_PIXELS,
    Comparison,
    answers_agreement,
    cached_summary,
    cached_tokens_of_usage,
    chat_chunk,
    chat_messages,
    chat_user_message,
    chunk_content,
    environment,
    image_max_pixels,
    image_questions,
    image_serve_flags,
    median_or_none,
    paired_ratios,
    picture,
    ratio,
    rows_metadata,
    schedule,
    server_environment,
    setting_ratio,
    stream_texts,
    system_prompt_text,
    system_question,
    target_met,
    targets,
    unshared_prompts,
)
from bench.sse import SseEvent


def test_ratio_rounds_and_refuses_missing_or_meaningless_figures():
    assert ratio(3.0, 2.0) == 1.5
    assert ratio(1.0, 3.0) == 0.333
    assert ratio(None, 2.0) is None and ratio(2.0, None) is None
    assert ratio(1.0, 0.0) is None
    assert ratio(math.nan, 1.0) is None and ratio(1.0, math.nan) is None


def test_setting_ratio_is_above_one_when_the_cache_helps():
    assert setting_ratio(on=0.1, off=0.3, better="lower") == 3.0  # a time: off/on
    assert setting_ratio(on=130.0, off=100.0, better="higher") == 1.3  # tokens/s: on/off
    with pytest.raises(ValueError):
        setting_ratio(1.0, 1.0, "faster")


def test_median_skips_missing_values():
    assert median_or_none([3.0, None, 1.0, math.nan, 2.0]) == 2.0
    assert median_or_none([None, math.nan]) is None
    assert median_or_none([]) is None


def test_the_settings_order_flips_every_other_round():
    assert schedule(["on", "off"], 3) == [(0, "on"), (0, "off"), (1, "off"), (1, "on"), (2, "on"), (2, "off")]
    assert schedule(["off"], 2) == [(0, "off"), (1, "off")]


def test_paired_ratios_compare_within_rounds_and_judge_the_median_against_the_target():
    ttft = Comparison("ttft_s", "lower", 3.0)
    runs = [
        {"round": 0, "setting": "on", "ttft_s": 0.1},
        {"round": 0, "setting": "off", "ttft_s": 0.4},
        {"round": 1, "setting": "off", "ttft_s": 0.3},
        {"round": 1, "setting": "on", "ttft_s": 0.15},
        {"round": 2, "setting": "on", "ttft_s": 0.1},  # no pair
        {"round": 3, "setting": "on", "error": "boom"},  # a failed run: no figure
        {"round": 3, "setting": "off", "ttft_s": 0.3},
    ]
    assert paired_ratios(runs, ttft) == {
        "ratio": "off/on",
        "ratios": [4.0, 2.0],
        "median": 3.0,
        "at_least": 3.0,
        "met": True,
    }
    speed = Comparison("tokens_per_s", "higher")
    found = paired_ratios(
        [
            {"round": 0, "setting": "on", "tokens_per_s": 95},
            {"round": 0, "setting": "off", "tokens_per_s": 100},
        ],
        speed,
    )
    assert found == {"ratio": "on/off", "ratios": [0.95], "median": 0.95}  # no target: no "met"
    assert paired_ratios([], ttft)["met"] is None


def test_target_met_and_the_flat_list_of_targets():
    assert target_met(0.97, 0.97) is True
    assert target_met(0.96, 0.97) is False
    assert target_met(None, 3.0) is None
    comparisons = {
        "system_prompt": {
            "ttft_p50_s": {"median": 3.5, "met": True},
            "tokens_per_s": {"median": 1.1, "met": False},
        },
        "unshared": {"tokens_per_s": {"median": None, "met": None}, "ttft_p50_s": {"median": 1.0}},
    }
    found = targets(comparisons)
    assert [(t["scenario"], t["figure"], t["ratio"], t["at_least"], t["met"]) for t in found] == [
        ("system_prompt", "ttft_p50_s", "off/on", 3.0, True),
        ("system_prompt", "tokens_per_s", "on/off", 1.3, False),
        ("unshared", "tokens_per_s", "on/off", 0.97, None),
    ]


def test_every_scenario_states_its_targets():
    stated = {
        (scenario, c.figure, c.ratio_name, c.at_least)
        for scenario, comparisons in COMPARISONS.items()
        for c in comparisons
        if c.at_least is not None
    }
    assert stated == {
        ("image_prefill", "prefill_s", "off/on", 3.0),
        ("chat", "last_turn_ttft_s", "off/on", 3.0),
        ("system_prompt", "ttft_p50_s", "off/on", 3.0),
        ("system_prompt", "tokens_per_s", "on/off", 1.3),
        ("unshared", "tokens_per_s", "on/off", 0.97),
    }


def test_answers_agreement_counts_equal_positions():
    assert answers_agreement(["a", "b", "c"], ["a", "x", "c"]) == {"equal": 2, "of": 3}
    assert answers_agreement(["a"], ["a", "b"]) == {"equal": 1, "of": 2}
    assert answers_agreement([], []) == {"equal": 0, "of": 0}


def test_cached_tokens_are_summed_where_the_server_reports_them():
    assert cached_summary([0, 448, 448, None]) == {"sum": 896, "mean": 298.7, "reported": 3, "of": 4}
    assert cached_summary([None, None]) == {"sum": None, "mean": None, "reported": 0, "of": 2}
    assert cached_tokens_of_usage({"prompt_tokens": 9, "prompt_tokens_details": {"cached_tokens": 5}}) == 5
    assert cached_tokens_of_usage({"prompt_tokens": 9}) is None  # before the server reports them
    assert cached_tokens_of_usage({"prompt_tokens_details": None}) is None
    assert cached_tokens_of_usage(None) is None


def test_a_takeoff_streams_rows_and_metadata():
    batch = [
        SseEvent("message", '{"text": "He", "batch_id": 1}'),
        SseEvent("message", '{"text": "Hi", "batch_id": 0}'),
        SseEvent("message", '{"text": "y", "batch_id": 1}'),
        SseEvent("metadata", '[{"prompt_tokens": 5, "cached_prompt_tokens": 3}, {"prompt_tokens": 6}]'),
    ]
    assert stream_texts(batch, 2) == ["Hi", "Hey"]
    assert rows_metadata(batch) == [{"prompt_tokens": 5, "cached_prompt_tokens": 3}, {"prompt_tokens": 6}]
    one = [
        SseEvent("message", "a\nb"),
        SseEvent("message", "c"),
        SseEvent("metadata", '{"prompt_tokens": 4}'),
    ]
    assert stream_texts(one, 1) == ["a\nbc"]
    assert rows_metadata(one) == [{"prompt_tokens": 4}]
    assert rows_metadata(one[:2]) == []


def test_openai_chunks_give_their_content_and_raise_on_an_error():
    assert chat_chunk("[DONE]") is None
    role = chat_chunk('{"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}')
    assert chunk_content(role) == ""
    assert chunk_content({"choices": [{"index": 0, "delta": {"content": "Hello"}}]}) == "Hello"
    assert chunk_content({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}) == ""
    assert chunk_content({"choices": [], "usage": {"prompt_tokens": 3}}) == ""
    with pytest.raises(RuntimeError, match="overloaded"):
        chat_chunk('{"error": {"message": "overloaded"}}')


def test_the_chat_transcript_alternates_turns_and_ends_with_the_new_user_message():
    assert chat_messages(["hi"], []) == [{"role": "user", "content": "hi"}]
    assert chat_messages(["hi", "more"], ["hello"], system="Be brief.") == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "more"},
    ]
    with pytest.raises(ValueError):
        chat_messages(["hi", "more"], [])
    turns = [chat_user_message(turn) for turn in range(25)]
    assert len(set(turns)) == 25
    assert all(len(turn.split()) >= 10 for turn in turns)  # a few sentences, not a word


def test_the_system_prompt_is_fixed_long_and_its_questions_differ():
    text = system_prompt_text()
    assert text == system_prompt_text()
    assert 350 <= len(text.split()) <= 550  # about 500 tokens of the bundled model
    rules = [line for line in text.splitlines() if line.startswith("Rule ")]
    assert len(rules) == 15 and len(set(line.split(". ", 1)[1] for line in rules)) == 15
    assert len(system_prompt_text(30).splitlines()) == 32
    questions = [system_question(i) for i in range(90)]
    assert len(set(questions)) == 90
    assert all(len(q.split()) <= 14 for q in questions)  # short


def test_image_questions_differ():
    assert len(set(image_questions(8))) == 8
    assert len(set(image_questions(20))) == 20
    assert image_questions(3) == image_questions(8)[:3]


def test_unshared_prompts_repeat_with_the_seed_and_share_nothing():
    prompts = unshared_prompts(0, 64, 50, 400)
    assert prompts == unshared_prompts(0, 64, 50, 400)
    assert prompts != unshared_prompts(1, 64, 50, 400)
    assert all(50 <= len(p.split()) <= 400 for p in prompts)
    assert len({tuple(p.split()[:4]) for p in prompts}) == 64  # no two start alike
    rng = random.Random(0)
    assert len({len(p.split()) for p in unshared_prompts(rng.randint(0, 99), 32, 50, 400)}) > 20


def test_the_setting_goes_to_the_server_as_environment_variables():
    assert server_environment("on") == {ENV_SETTING: "on"}
    assert server_environment("off", 1 << 20) == {ENV_SETTING: "off", ENV_BYTES: "1048576"}
    with pytest.raises(ValueError):
        server_environment("maybe")


def test_environment_sets_and_restores(monkeypatch):
    monkeypatch.setenv("MMSERVE_BENCH_TEST_A", "before")
    monkeypatch.delenv("MMSERVE_BENCH_TEST_B", raising=False)
    with environment({"MMSERVE_BENCH_TEST_A": "x", "MMSERVE_BENCH_TEST_B": "y"}):
        assert os.environ["MMSERVE_BENCH_TEST_A"] == "x" and os.environ["MMSERVE_BENCH_TEST_B"] == "y"
    assert os.environ["MMSERVE_BENCH_TEST_A"] == "before"
    assert "MMSERVE_BENCH_TEST_B" not in os.environ


def test_the_pixel_bound_applies_to_the_qwen_families_unless_told():
    assert image_max_pixels("qwen2_vl", None) == QWEN_IMAGE_MAX_PIXELS
    assert image_max_pixels("qwen2_5_vl", None) == QWEN_IMAGE_MAX_PIXELS
    assert image_max_pixels("idefics3", None) is None
    assert image_max_pixels(None, None) is None  # a model of one's own
    assert image_max_pixels("qwen2_vl", 0) is None
    assert image_max_pixels(None, 1000) == 1000
    assert QWEN_IMAGE_MAX_PIXELS >= 640 * 480
    assert image_serve_flags(Path("/m"), None) == ["--model", "/m"]
    assert image_serve_flags(Path("/m"), 5) == ["--model", "/m", "--image-max-pixels", "5"]


def test_pictures_are_small_jpegs_different_for_every_index():
    import io

    from PIL import Image

    first = picture(0)
    assert first == picture(0)
    assert len({picture(i, 64, 48) for i in range(5)}) == 5
    assert first[:2] == b"\xff\xd8" and len(first) < 200_000
    assert Image.open(io.BytesIO(first)).size == (640, 480)
