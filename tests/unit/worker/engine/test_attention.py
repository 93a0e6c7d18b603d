"""Decode attention by row groups skips the padding of a mixed-length batch
and still gives every row what it gets alone."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from bench.tiny_models import tiny_llama_settings
from tests.support.engine_runs import hf_greedy, run, windows_used
from worker.engine import attention
from worker.engine.attention import ATTENTION_NAME, MAX_GROUPS, plan_windows, windowed_sdpa
from worker.engine.engine import Engine
from worker.engine.rows import GenerationParams, RowRequest


def test_a_batch_without_padding_is_one_plain_call():
    assert plan_windows([40, 40, 40], width=40) is None


def test_a_long_row_among_short_ones_gets_its_own_window():
    windows = plan_windows([400, 40, 38, 35], width=400)
    assert windows == ((0, 1, 400), (1, 4, 40))


@pytest.mark.parametrize(
    "lengths",
    [[500, 420, 300, 290, 120, 60, 50, 3], [9, 200, 7, 300, 1, 1], [64] * 5 + [2] * 11],
)
def test_windows_cover_every_row_once_and_every_real_token(lengths):
    width = max(lengths) + 3
    windows = plan_windows(lengths, width)
    assert windows is not None and len(windows) <= MAX_GROUPS
    assert [w[0] for w in windows] == [0, *[w[1] for w in windows[:-1]]] and windows[-1][1] == len(lengths)
    for first, end, tokens in windows:
        assert tokens >= max(lengths[first:end])


def test_windowed_attention_equals_attention_over_the_padded_width():
    generator = torch.Generator().manual_seed(0)
    lengths, width = [12, 7, 3, 3], 12
    rows, heads, kv_heads, dim = len(lengths), 4, 2, 8
    query = torch.randn(rows, heads, 1, dim, generator=generator)
    key = torch.randn(rows, kv_heads, width, dim, generator=generator)
    value = torch.randn(rows, kv_heads, width, dim, generator=generator)
    mask = torch.zeros(rows, 1, 1, width, dtype=torch.bool)
    for row, length in enumerate(lengths):
        mask[row, ..., width - length :] = True
    module = SimpleNamespace(num_key_value_groups=heads // kv_heads, is_causal=True)
    expected, _ = sdpa_attention_forward(module, query, key, value, mask)
    windows = ((0, 1, 12), (1, 2, 7), (2, 4, 3))
    got, _ = windowed_sdpa(module, query, key, value, mask, row_windows=windows)
    torch.testing.assert_close(got, expected)


def test_mixed_length_rows_joining_a_running_batch_equal_generate_alone(tiny_model, tokenizer, monkeypatch):
    engine = Engine(tiny_model, tokenizer, batch_invariant=False)  # (the mode groups rows its own way)
    used = windows_used(monkeypatch)
    params = GenerationParams(max_new_tokens=12, min_new_tokens=12)
    long_prompt = engine.encode_prompt("word " * 150)
    short = [engine.encode_prompt(p) for p in ("Hello", "a b c", "The capital of France is")]
    engine.add([RowRequest(key="long", prompt_ids=long_prompt, params=params)])
    engine.step()
    rows = [RowRequest(key=i, prompt_ids=ids, params=params) for i, ids in enumerate(short)]
    completions = run(engine, rows)
    assert any(used)
    for row in rows:
        assert completions[row.key].tokens == hf_greedy(tiny_model, row.prompt_ids, 12, min_new_tokens=12)


def test_the_running_batch_stays_sorted_longest_first(engine):
    params = GenerationParams(max_new_tokens=8, min_new_tokens=8)
    for key, text in enumerate(["a b", "word " * 30, "Hello there friend", "word " * 60]):
        engine.add([RowRequest(key=key, prompt_ids=engine.encode_prompt(text), params=params)])
        engine.step()
        lengths = engine._batch.lengths
        assert lengths == sorted(lengths, reverse=True)
        assert lengths == engine._batch.attention_mask.sum(dim=1).tolist()


def test_only_sdpa_models_switch_and_plain_calls_stay_plain(tokenizer):
    def tiny_llama() -> LlamaForCausalLM:  # each with a config of its own: switching mutates it
        return LlamaForCausalLM(LlamaConfig(**tiny_llama_settings(tokenizer))).eval()

    sdpa = tiny_llama()
    assert attention.install(sdpa) and sdpa.config._attn_implementation == ATTENTION_NAME
    eager = tiny_llama()
    eager.set_attn_implementation("eager")
    assert not attention.install(eager) and eager.config._attn_implementation == "eager"
    reference = tiny_llama()
    assert reference.config._attn_implementation == "sdpa"
    reference.load_state_dict(sdpa.state_dict())
    ids = torch.tensor([[0, 5, 9, 2], [3, 3, 7, 1]])
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    with torch.inference_mode():
        expected = reference(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(sdpa(input_ids=ids, attention_mask=mask).logits, expected)
