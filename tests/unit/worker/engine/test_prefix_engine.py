"""The engine with a prefix cache: a row that starts from cached keys and values answers
what it answers without the cache (float32: equal to `generate`; bfloat16 in the
batch-invariant mode: equal token for token), and reports the prompt tokens it reused."""

from __future__ import annotations

import random

import pytest
import torch
from peft import PeftModel

from tests.support.engine_runs import hf_greedy, llama, run_with_joins
from tests.support.tiny_vlms import sample_image
from tests.support.vlm_runs import RED, row
from worker.engine.adapters import AdapterCatalog, LoraAdapters
from worker.engine.engine import Engine
from worker.engine.models.fused_layers import fuse_layers
from worker.engine.rows import Constraint, GenerationParams, RowRequest

BLOCK = 16
CACHE_BYTES = 64 * 2**20
GREEDY = GenerationParams(max_new_tokens=10, min_new_tokens=10)
WORDS = [
    "the",
    "a",
    "of",
    "robot",
    "river",
    "quiet",
    "seven",
    "blue",
    "market",
    "under",
    "sings",
    "when",
    "lamp",
    "north",
]


def words(rng: random.Random, count: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(count))


def cached_engine(model, tokenizer, **kwargs) -> Engine:
    return Engine(model, tokenizer, prefix_cache_bytes=CACHE_BYTES, prefix_block_tokens=BLOCK, **kwargs)


def run(engine: Engine, rows: list[RowRequest], join: dict[int, list[RowRequest]] | None = None):
    """Every row's tokens and cached prompt tokens; `join` rows are added at those steps
    (in the step's own forward where the engine can)."""
    completions = run_with_joins(engine, rows, join)
    tokens = {key: c.tokens for key, c in completions.items()}
    cached = {key: c.outputs[-1].cached_prompt_tokens for key, c in completions.items()}
    return tokens, cached


@pytest.fixture(scope="module")
def fused(tiny_model_dir):
    model = llama(tiny_model_dir)
    fuse_layers(model)
    return model


@pytest.mark.parametrize("invariant", [True, False])
def test_a_chats_next_turn_starts_from_the_cached_conversation(tiny_model, tokenizer, invariant):
    engine = cached_engine(tiny_model, tokenizer, batch_invariant=invariant)
    rng = random.Random(1)
    messages = [{"role": "system", "content": words(rng, 40)}]
    previous = 0
    for turn in range(3):
        messages.append({"role": "user", "content": words(rng, 12)})
        ids = engine.encode_prompt("", messages=messages)
        tokens, cached = run(engine, [RowRequest(key=turn, prompt_ids=ids, params=GREEDY)])
        assert tokens[turn] == hf_greedy(tiny_model, ids, 10, min_new_tokens=10)
        if turn == 0:
            assert cached[turn] == 0
        else:
            assert cached[turn] >= previous - BLOCK + 1 and cached[turn] % BLOCK == 0
        previous = len(ids)
        messages.append({"role": "assistant", "content": tokenizer.decode(tokens[turn])})
    assert engine.prefix_cache.counters.hit_tokens > 0


def test_a_shared_system_prompt_is_prefilled_once(tiny_model, tokenizer):
    engine = cached_engine(tiny_model, tokenizer)
    rng = random.Random(2)
    system = words(rng, 60)
    prompts = [engine.encode_prompt(f"{system} Question: {words(rng, 5)}") for _ in range(4)]
    answers = []
    for index, ids in enumerate(prompts):
        answers.append(run(engine, [RowRequest(key=index, prompt_ids=ids, params=GREEDY)]))
    shared = len(engine.encode_prompt(system)) // BLOCK * BLOCK
    assert [cached[i] for i, (_, cached) in enumerate(answers)][1:] == [shared] * 3
    for index, ids in enumerate(prompts):
        assert answers[index][0][index] == hf_greedy(tiny_model, ids, 10, min_new_tokens=10)


@pytest.mark.parametrize("invariant", [True, False])
def test_rows_of_one_request_prefill_their_shared_part_once_on_a_cold_cache(tiny_model, tokenizer, invariant):
    engine = cached_engine(tiny_model, tokenizer, batch_invariant=invariant)
    rng = random.Random(3)
    context = words(rng, 50)
    ids = [engine.encode_prompt(f"{context} {words(rng, 4)}") for _ in range(4)]
    alone = engine.encode_prompt(words(rng, 30))  # shares nothing: prefilled with the others when it can
    rows = [RowRequest(key=i, prompt_ids=p, params=GREEDY) for i, p in enumerate([*ids, alone])]
    tokens, cached = run(engine, rows)
    assert sorted(cached.values()).count(0) == 2  # the first of the four, and the lone one
    assert all(value >= len(engine.encode_prompt(context)) - BLOCK for key, value in cached.items() if value)
    for request in rows:
        assert tokens[request.key] == hf_greedy(tiny_model, request.prompt_ids, 10, min_new_tokens=10)
    counters = engine.prefix_cache.counters  # every prompt token counted once, as read or computed
    assert counters.hit_tokens == sum(cached.values())
    assert counters.hit_tokens + counters.missed_tokens == sum(len(r.prompt_ids) for r in rows)


def test_rows_joining_a_running_batch_hit_the_cache(fused, tokenizer):
    engine = cached_engine(fused, tokenizer)
    assert engine.joint_prefill
    rng = random.Random(4)
    system = words(rng, 40)
    first = engine.encode_prompt(f"{system} {words(rng, 3)}")
    near = engine.encode_prompt(f"{system} {words(rng, 3)}")  # the rest fits one chunk: joins in the step
    far = engine.encode_prompt(f"{system} {words(rng, 40)}")  # more than a chunk left: added
    rows = [RowRequest(key="first", prompt_ids=first, params=GenerationParams(max_new_tokens=20))]
    join = {
        3: [RowRequest(key="near", prompt_ids=near, params=GREEDY)],
        5: [RowRequest(key="far", prompt_ids=far, params=GREEDY)],
    }
    assert not engine.can_join(join[5])
    tokens, cached = run(engine, rows, join)
    assert cached["near"] > 0 and cached["far"] > 0
    for key, ids in (("near", near), ("far", far)):
        assert tokens[key] == hf_greedy(fused, ids, 10, min_new_tokens=10)


def test_rows_sharing_a_cached_system_prompt_are_prefilled_in_one_packed_forward(
    fused, tokenizer, monkeypatch
):
    engine = cached_engine(fused, tokenizer)
    rng = random.Random(9)
    system = words(rng, 40)

    def asking(key) -> RowRequest:
        ids = engine.encode_prompt(f"{system} {words(rng, 3)}")
        return RowRequest(key=key, prompt_ids=ids, params=GREEDY)

    run(engine, [asking("first")])
    burst = [asking(i) for i in range(4)]
    forwards = []
    joint = engine._joint
    monkeypatch.setattr(engine, "_joint", lambda *args, **kw: forwards.append(1) or joint(*args, **kw))
    tokens, cached = run(engine, burst)
    assert len(forwards) == 1  # the four prefills, in one forward
    assert all(cached[request.key] >= len(engine.encode_prompt(system)) - BLOCK for request in burst)
    for request in burst:
        assert tokens[request.key] == hf_greedy(fused, request.prompt_ids, 10, min_new_tokens=10)


def test_constrained_rows_use_the_cache_too(tiny_model, tokenizer):
    engine = cached_engine(tiny_model, tokenizer)
    plain = Engine(tiny_model, tokenizer)
    rng = random.Random(5)
    system = words(rng, 40)
    constraint = Constraint("regex", "(yes|no)[a-z ]{0,12}")
    answers = {}
    for name, current in (("cached", engine), ("plain", plain)):
        for index in range(2):
            ids = current.encode_prompt(f"{system} Answer {index}:")
            request = RowRequest(key=index, prompt_ids=ids, params=GREEDY, constraint=constraint)
            answers[name, index] = run(current, [request])
    assert answers["cached", 1][1][1] > 0
    assert [answers["cached", i][0] for i in range(2)] == [answers["plain", i][0] for i in range(2)]


def test_an_adapters_prefix_is_cached_apart_from_the_base_models(tiny_model_dir, tokenizer, tiny_lora_dir):
    base = llama(tiny_model_dir)
    adapters = LoraAdapters(base, AdapterCatalog(directory=tiny_lora_dir), max_loaded=2)
    engine = cached_engine(base, tokenizer, adapters=adapters)
    ids = engine.encode_prompt(words(random.Random(6), 50))
    _, cached = run(engine, [RowRequest(key="base", prompt_ids=ids, params=GREEDY)])
    tokens, cached = run(engine, [RowRequest(key="alpha", prompt_ids=ids, params=GREEDY, adapter="alpha")])
    assert cached["alpha"] == 0  # the base model's blocks are not the adapter's
    again, cached = run(engine, [RowRequest(key="alpha", prompt_ids=ids, params=GREEDY, adapter="alpha")])
    assert cached["alpha"] > 0 and again == tokens
    reference = PeftModel.from_pretrained(llama(tiny_model_dir), tiny_lora_dir / "alpha").eval()
    assert tokens["alpha"] == hf_greedy(reference, ids, 10, min_new_tokens=10)


def test_the_cache_stays_within_its_bytes(tiny_model, tokenizer):
    engine = Engine(tiny_model, tokenizer, prefix_cache_bytes=200_000, prefix_block_tokens=BLOCK)
    rng = random.Random(7)
    for index in range(6):
        run(engine, [RowRequest(key=index, prompt_ids=engine.encode_prompt(words(rng, 80)), params=GREEDY)])
        assert engine.prefix_cache.bytes <= 200_000
    assert engine.prefix_cache.counters.evicted_blocks > 0


def test_no_cache_is_made_when_it_is_off(tiny_model, tokenizer):
    assert Engine(tiny_model, tokenizer).prefix_cache is None
    padded = Engine(tiny_model, tokenizer, prefix_cache_bytes=CACHE_BYTES, prefill_width_multiple=8)
    assert padded.prefix_cache is None and "padded" in padded.prefix_cache_off_reason


# -- vision-language models -----------------------------------------------------------


LEAD = "Look closely at the picture and describe the shapes, the colours and the light in it"


def test_questions_about_one_image_share_its_prefill(vlm):
    engine = vlm.engine(prefix_cache_bytes=CACHE_BYTES, prefix_block_tokens=BLOCK)
    questions = [f"{LEAD}, then answer question {n}." for n in range(4)]
    prompts = engine.encode_image_prompts(questions, [RED], use_chat_template=True, images_key=("red-id",))
    tokens, cached = run(engine, [row(i, p) for i, p in enumerate(prompts)])
    last_image = max(i for i, t in enumerate(prompts[0].prompt_ids) if t == engine.vision.image_token_id)
    reused = sorted(cached.values())
    assert reused[0] == 0 and all(value > last_image for value in reused[1:]), (last_image, reused)
    expected, _ = run(vlm.engine(), [row(i, p) for i, p in enumerate(prompts)])
    assert tokens == expected
    assert tokens[0] == vlm.generate(vlm.chat_prompt(questions[0], 1), [RED])


def test_a_cached_prefix_may_end_inside_an_image(vlm):
    probe = vlm.engine()
    questions = ["What is in the picture?", "Which colour is the picture?"]
    prompts = probe.encode_image_prompts(questions, [RED], use_chat_template=True, images_key=("red-id",))
    image = [i for i, t in enumerate(prompts[0].prompt_ids) if t == probe.vision.image_token_id]
    block = image[0] + 2  # the first block ends two tokens into the image
    assert block < image[-1]
    engine = vlm.engine(prefix_cache_bytes=CACHE_BYTES, prefix_block_tokens=block)
    first, cached = run(engine, [row(0, prompts[0])])
    second, cached = run(engine, [row(1, prompts[1])])
    assert cached[1] >= block
    for index, tokens in ((0, first), (1, second)):
        assert tokens[index] == vlm.generate(vlm.chat_prompt(questions[index], 1), [RED])


def test_another_image_never_reuses_the_first_images_blocks(vlm):
    engine = vlm.engine(prefix_cache_bytes=CACHE_BYTES, prefix_block_tokens=BLOCK)
    question = ["What is in the picture, and which colour is it?"]
    blue = sample_image((20, 40, 210))
    (red_prompt,) = engine.encode_image_prompts(question, [RED], use_chat_template=True, images_key=("r",))
    (blue_prompt,) = engine.encode_image_prompts(question, [blue], use_chat_template=True, images_key=("b",))
    run(engine, [row("red", red_prompt)])
    tokens, cached = run(engine, [row("blue", blue_prompt)])
    first_image = blue_prompt.prompt_ids.index(engine.vision.image_token_id)
    assert cached["blue"] <= first_image
    assert tokens["blue"] == vlm.generate(vlm.chat_prompt(question[0], 1), [blue])
    _, cached = run(engine, [row("red again", red_prompt)])
    assert cached["red again"] > first_image


# -- bfloat16, batch invariant --------------------------------------------------------


def test_in_bfloat16_a_hit_answers_exactly_what_a_cold_prefill_answers(served):
    assert served.dtype == torch.bfloat16
    cold = Engine(served.model, served.tokenizer, prefix_block_tokens=BLOCK)
    warm = Engine(served.model, served.tokenizer, prefix_cache_bytes=CACHE_BYTES, prefix_block_tokens=BLOCK)
    rng = random.Random(8)
    system = [rng.randrange(1000, 40000) for _ in range(150)]
    prompts = [system + [rng.randrange(1000, 40000) for _ in range(rng.randint(1, 40))] for _ in range(6)]
    expected = {}
    for index, ids in enumerate(prompts):
        expected.update(run(cold, [RowRequest(key=index, prompt_ids=ids, params=GREEDY)])[0])
    others = [[rng.randrange(1000, 40000) for _ in range(rng.randint(5, 200))] for _ in range(3)]
    company = [RowRequest(key=("other", i), prompt_ids=ids, params=GREEDY) for i, ids in enumerate(others)]
    rows = [RowRequest(key=i, prompt_ids=ids, params=GREEDY) for i, ids in enumerate(prompts)]
    tokens, cached = run(warm, [rows[0], *company], {2: rows[1:3], 4: rows[3:]})
    assert {i: tokens[i] for i in range(len(prompts))} == expected
    assert all(cached[i] > 0 for i in range(1, len(prompts)))
    burst = [RowRequest(key=i, prompt_ids=ids, params=GREEDY) for i, ids in enumerate(prompts)]
    tokens, cached = run(warm, burst)  # added at once to an idle engine: packed in one forward
    assert tokens == expected and all(cached.values())
