"""The decode loop on a tiny random Llama, checked against `model.generate`."""

from __future__ import annotations

import itertools
from collections.abc import Hashable
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoTokenizer,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedTokenizerBase,
)

from tests.support.engine_runs import PROMPTS, Completion, collect, hf_greedy, run
from worker.engine.engine import Engine, PromptError
from worker.engine.rows import GenerationParams, RowOutput, RowRequest

SAMPLED = GenerationParams(temperature=1.0, top_k=0, max_new_tokens=16)


def rows_for(engine: Engine, prompts: list[str], params: GenerationParams) -> list[RowRequest]:
    return [
        RowRequest(key=i, prompt_ids=engine.encode_prompt(p), params=params) for i, p in enumerate(prompts)
    ]


def decode(tokenizer: PreTrainedTokenizerBase, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True)


def test_greedy_output_equals_hf_generate_for_prompts_of_different_lengths(engine, tiny_model, tokenizer):
    rows = rows_for(engine, PROMPTS, GenerationParams(max_new_tokens=24))
    assert len({len(r.prompt_ids) for r in rows}) == len(rows)
    completions = run(engine, rows)
    for row in rows:
        expected = hf_greedy(tiny_model, row.prompt_ids, 24)
        assert completions[row.key].tokens == expected
        assert completions[row.key].text == decode(tokenizer, expected)


def test_greedy_output_equals_hf_generate_when_rows_finish_at_different_steps(engine, tiny_model):
    rows = [
        RowRequest(key=i, prompt_ids=engine.encode_prompt(p), params=GenerationParams(max_new_tokens=n))
        for i, (p, n) in enumerate(zip(PROMPTS, [20, 2, 7, 1, 13], strict=True))
    ]
    completions = run(engine, rows)
    for row in rows:
        assert completions[row.key].tokens == hf_greedy(tiny_model, row.prompt_ids, row.params.max_new_tokens)


def test_rows_added_to_a_running_batch_equal_hf_generate(engine, tiny_model):
    params = GenerationParams(max_new_tokens=12)
    first = [RowRequest(key=k, prompt_ids=engine.encode_prompt(PROMPTS[k]), params=params) for k in (0, 1)]
    later = [RowRequest(key=k, prompt_ids=engine.encode_prompt(PROMPTS[k]), params=params) for k in (2, 3)]
    completions: dict[Hashable, Completion] = {}
    engine.add(first)
    for _ in range(5):
        collect(engine.step(), completions)
    engine.add(later)  # one longer, one shorter than what is cached so far
    assert engine.num_rows == 4
    while engine.has_work:
        collect(engine.step(), completions)
    for row in first + later:
        assert completions[row.key].tokens == hf_greedy(tiny_model, row.prompt_ids, 12)


def test_finished_rows_take_their_padding_with_them(engine, tiny_model):
    long_prompt, short_prompt = engine.encode_prompt(PROMPTS[2]), engine.encode_prompt(PROMPTS[0])
    engine.add(
        [
            RowRequest(key="long", prompt_ids=long_prompt, params=GenerationParams(max_new_tokens=1)),
            RowRequest(key="short", prompt_ids=short_prompt, params=GenerationParams(max_new_tokens=6)),
        ]
    )
    completions: dict[Hashable, Completion] = {}
    collect(engine.step(), completions)
    # Columns only the finished row used are gone from the mask and the KV cache.
    batch = engine._batch
    assert batch is not None
    assert batch.attention_mask.shape == (1, len(short_prompt) + 1)
    assert batch.cache.get_seq_length() == len(short_prompt) + 1
    while engine.has_work:
        collect(engine.step(), completions)
    assert completions["short"].tokens == hf_greedy(tiny_model, short_prompt, 6)


def test_sliding_window_model_equals_hf_generate_with_rows_joining_and_leaving(tokenizer):
    config = MistralConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        sliding_window=6,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = MistralForCausalLM(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.ndim >= 2:
                parameter.normal_(0.0, 0.5)
    engine = Engine(model, tokenizer)
    rows = [
        RowRequest(key=i, prompt_ids=engine.encode_prompt(p), params=GenerationParams(max_new_tokens=n))
        for i, (p, n) in enumerate(zip(PROMPTS[:3], [12, 3, 16], strict=True))
    ]
    completions = run(engine, rows)
    for row in rows:
        assert completions[row.key].tokens == hf_greedy(model, row.prompt_ids, row.params.max_new_tokens)

    # rows join the running batch (their windows merged in line) and leave it at other steps
    tokens: dict[int, list[int]] = {row.key: [] for row in rows}
    for joining in ([rows[0]], [rows[1]], [rows[2]]):
        engine.add(joining)
        for _ in range(4):
            for output in engine.step():
                tokens[output.key].append(output.token_id)
    while engine.has_work:
        for output in engine.step():
            tokens[output.key].append(output.token_id)
    assert tokens == {row.key: completions[row.key].tokens for row in rows}


def test_repetition_penalty_equals_hf_generate(engine, tiny_model):
    rows = rows_for(engine, PROMPTS[:3], GenerationParams(max_new_tokens=16, repetition_penalty=1.8))
    completions = run(engine, rows)
    for row in rows:
        expected = hf_greedy(tiny_model, row.prompt_ids, 16, repetition_penalty=1.8)
        assert completions[row.key].tokens == expected


def test_no_repeat_ngram_size_equals_hf_generate(engine, tiny_model):
    prompt = engine.encode_prompt("the the the the the the")
    row = RowRequest(
        key="x", prompt_ids=prompt, params=GenerationParams(max_new_tokens=20, no_repeat_ngram_size=2)
    )
    tokens = run(engine, [row])["x"].tokens
    assert tokens == hf_greedy(tiny_model, prompt, 20, no_repeat_ngram_size=2)
    sequence = prompt + tokens
    for end in range(len(prompt), len(sequence)):  # no generated token repeats an earlier bigram
        earlier = set(itertools.pairwise(sequence[:end]))
        assert (sequence[end - 1], sequence[end]) not in earlier


def test_eos_finishes_a_row_with_reason_eos(tiny_model, tokenizer):
    prompt = Engine(tiny_model, tokenizer).encode_prompt(PROMPTS[1])
    greedy = hf_greedy(tiny_model, prompt, 10)
    eos = greedy[3]
    assert eos not in greedy[:3]
    engine = Engine(tiny_model, tokenizer, eos_token_ids=[eos])
    completion = run(
        engine, [RowRequest(key=0, prompt_ids=prompt, params=GenerationParams(max_new_tokens=10))]
    )[0]
    assert completion.tokens == greedy[:4]
    assert completion.finish_reason == "eos"
    assert completion.outputs[-1].completion_tokens == 4
    assert completion.outputs[-1].prompt_tokens == len(prompt)


def test_min_new_tokens_masks_eos_like_hf_generate(tiny_model, tokenizer):
    prompt = Engine(tiny_model, tokenizer).encode_prompt(PROMPTS[1])
    eos = hf_greedy(tiny_model, prompt, 10)[2]
    engine = Engine(tiny_model, tokenizer, eos_token_ids=[eos])
    params = GenerationParams(max_new_tokens=12, min_new_tokens=6)
    completion = run(engine, [RowRequest(key=0, prompt_ids=prompt, params=params)])[0]
    expected = hf_greedy(tiny_model, prompt, 12, min_new_tokens=6, eos_token_id=eos)
    assert completion.tokens == expected
    assert eos not in completion.tokens[:6]


def test_max_new_tokens_finishes_a_row_with_reason_length(tiny_model, tokenizer):
    engine = Engine(tiny_model, tokenizer, eos_token_ids=[])
    rows = rows_for(engine, PROMPTS[:2], GenerationParams(max_new_tokens=5))
    completions = run(engine, rows)
    for completion in completions.values():
        assert len(completion.tokens) == 5
        assert completion.finish_reason == "length"
        assert [o.finish_reason for o in completion.outputs] == [None] * 4 + ["length"]
        assert [o.completion_tokens for o in completion.outputs] == [1, 2, 3, 4, 5]


def test_seeded_row_gives_the_same_tokens_whatever_its_batch_mates_and_their_order(engine):
    mine = RowRequest(
        key="mine",
        prompt_ids=engine.encode_prompt(PROMPTS[1]),
        params=GenerationParams(temperature=0.9, top_k=0, top_p=0.95, max_new_tokens=16, seed=1234),
    )
    alone = run(engine, [mine])["mine"].tokens

    mates = [
        RowRequest(key="long", prompt_ids=engine.encode_prompt(PROMPTS[2]), params=SAMPLED),
        RowRequest(key="greedy", prompt_ids=engine.encode_prompt(PROMPTS[0]), params=GenerationParams()),
        RowRequest(
            key="short", prompt_ids=engine.encode_prompt("x"), params=GenerationParams(max_new_tokens=3)
        ),
    ]
    first = run(engine, [mine, *mates])["mine"].tokens
    last = run(engine, [*reversed(mates), mine])["mine"].tokens
    assert alone == first == last
    other_seed = RowRequest(
        key="mine",
        prompt_ids=mine.prompt_ids,
        params=GenerationParams(temperature=0.9, top_k=0, top_p=0.95, max_new_tokens=16, seed=4321),
    )
    assert run(engine, [other_seed])["mine"].tokens != alone


def test_each_row_decodes_with_its_own_parameters(engine, tiny_model):
    prompt = engine.encode_prompt(PROMPTS[3])
    params = {
        "greedy": GenerationParams(max_new_tokens=10),
        "penalty": GenerationParams(max_new_tokens=10, repetition_penalty=2.0),
        "ngram": GenerationParams(max_new_tokens=10, no_repeat_ngram_size=1),
        "sampled": GenerationParams(max_new_tokens=10, top_k=5, temperature=1.5, seed=7),
    }
    together = run(engine, [RowRequest(key=k, prompt_ids=prompt, params=p) for k, p in params.items()])
    for key, p in params.items():
        assert (
            together[key].tokens
            == run(engine, [RowRequest(key=key, prompt_ids=prompt, params=p)])[key].tokens
        )
    assert together["greedy"].tokens == hf_greedy(tiny_model, prompt, 10)
    assert together["penalty"].tokens == hf_greedy(tiny_model, prompt, 10, repetition_penalty=2.0)
    assert together["ngram"].tokens == hf_greedy(tiny_model, prompt, 10, no_repeat_ngram_size=1)
    assert len({tuple(c.tokens) for c in together.values()}) > 1


def test_cancel_drops_rows_at_once_with_reason_cancelled(engine, tiny_model):
    rows = rows_for(engine, PROMPTS[:3], GenerationParams(max_new_tokens=10))
    engine.add(rows)
    completions: dict[Hashable, Completion] = {}
    for _ in range(3):
        collect(engine.step(), completions)
    cancelled = engine.cancel([1, "not-a-row"])
    assert [(o.key, o.finish_reason, o.token_id, o.completion_tokens) for o in cancelled] == [
        (1, "cancelled", None, 3)
    ]
    collect(cancelled, completions)
    assert engine.num_rows == 2
    while engine.has_work:
        collect(engine.step(), completions)
    for row in rows:
        expected = hf_greedy(tiny_model, row.prompt_ids, 10)
        assert completions[row.key].tokens == (expected[:3] if row.key == 1 else expected)
    assert engine.cancel([0]) == []


def test_before_forward_gets_the_step_outputs_before_the_model_runs_on_them(engine, tiny_model):
    rows = rows_for(engine, PROMPTS[:2], GenerationParams(max_new_tokens=3))
    engine.add(rows)
    forwards = []
    handle = tiny_model.register_forward_pre_hook(lambda module, args: forwards.append(1))
    handed: list[tuple[int, list[RowOutput]]] = []
    try:
        returned = []

        def hand(outputs):
            handed.append((len(forwards), list(outputs)))

        while engine.has_work:
            returned.append(engine.step(before_forward=hand))
    finally:
        handle.remove()
    # step n's outputs were handed over after n - 1 forwards (the decode
    # forward of the step itself had not run), and are what step returned
    assert [count for count, _ in handed] == [0, 1, 2]
    assert [outputs for _, outputs in handed] == returned
    for row in rows:
        assert [o.token_id for outs in returned for o in outs if o.key == row.key] == hf_greedy(
            tiny_model, row.prompt_ids, 3
        )


def test_cancelling_every_row_leaves_no_work(engine):
    engine.add(rows_for(engine, PROMPTS[:2], GenerationParams(max_new_tokens=10)))
    engine.step()
    assert {o.key for o in engine.cancel([0, 1])} == {0, 1}
    assert not engine.has_work and engine.num_rows == 0
    assert engine.step() == []


def test_prompt_max_tokens_keeps_the_last_tokens(engine, tokenizer):
    full = engine.encode_prompt(PROMPTS[2])
    assert engine.encode_prompt(PROMPTS[2], prompt_max_tokens=4) == full[-4:]
    assert engine.encode_prompt(PROMPTS[2], prompt_max_tokens=1000) == full


def test_chat_template_wraps_the_text_as_a_user_turn(engine, tokenizer):
    ids = engine.encode_prompt("What is 2+2?", use_chat_template=True)
    text = tokenizer.decode(ids)
    assert text.endswith("<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n")
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 2+2?"}], add_generation_prompt=True, return_dict=False
    )
    assert ids == list(chat)


def test_chat_template_request_without_a_template_raises_prompt_error(tiny_model, tiny_model_dir: Path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.chat_template = None
    with pytest.raises(PromptError, match="no chat template"):
        Engine(tiny_model, tokenizer).encode_prompt("hi", use_chat_template=True)


def test_empty_prompt_raises_prompt_error(engine):
    with pytest.raises(PromptError, match="empty"):
        engine.encode_prompt("")
    with pytest.raises(PromptError, match="empty"):
        engine.add([RowRequest(key=0, prompt_ids=[], params=GenerationParams())])


def test_prompt_beyond_the_context_raises_prompt_error_and_adds_nothing(engine):
    assert engine.context_length == 1024
    fits = RowRequest(key=0, prompt_ids=[5] * 1000, params=GenerationParams(max_new_tokens=24))
    too_long = RowRequest(key=1, prompt_ids=[5] * 1000, params=GenerationParams(max_new_tokens=25))
    with pytest.raises(PromptError, match="context of 1024"):
        engine.add([fits, too_long])
    assert not engine.has_work


def test_token_ids_outside_the_vocabulary_raise_prompt_error(engine):
    with pytest.raises(PromptError, match="token ids"):
        engine.add([RowRequest(key=0, prompt_ids=[engine.vocab_size], params=GenerationParams())])


def test_a_key_already_running_is_refused(engine):
    rows = rows_for(engine, PROMPTS[:1], GenerationParams(max_new_tokens=5))
    engine.add(rows)
    with pytest.raises(ValueError, match="already"):
        engine.add(rows)


def test_step_without_rows_returns_nothing(engine):
    assert not engine.has_work
    assert engine.step() == []
    assert engine.cancel([0]) == []
