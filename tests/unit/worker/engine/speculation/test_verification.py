"""A step that feeds several tokens per row (checking drafted tokens) computes, for
each of them, exactly what a decode step feeding that token computes: in bfloat16,
in the batch-invariant mode, bit for bit (worker.engine.attention)."""

from __future__ import annotations

import torch

from worker.engine.attention import AlignedKeys
from worker.engine.engine import Engine
from worker.engine.rows import GenerationParams, RowRequest

PROMPTS = ([1000 + 37 * i for i in range(150)], [2000 + 11 * i for i in range(23)])
FED = [[4321, 17, 905, 77, 3], [12, 9000, 456, 31337, 8]]  # each row's next tokens


def prefilled(served) -> Engine:
    engine = Engine(served.model, served.tokenizer)
    assert engine.batch_invariant
    params = GenerationParams(max_new_tokens=50)
    engine.add([RowRequest(key=i, prompt_ids=list(p), params=params) for i, p in enumerate(PROMPTS)])
    return engine


@torch.inference_mode()
def test_tokens_fed_together_get_the_logits_they_get_one_step_at_a_time(served):
    assert served.dtype == torch.bfloat16
    batch = prefilled(served)._batch
    fed = [FED[key] for key in batch.keys]  # rows are sorted longest first
    expected = []
    for position in range(len(FED[0])):
        batch.feed([[tokens[position]] for tokens in fed])
        lengths = tuple(length + position + 1 for length in batch.lengths)
        expected.append(forward(served, batch, lengths)[:, -1])
    expected = torch.stack(expected, dim=1)

    together = prefilled(served)._batch
    together.feed(fed)
    logits = forward(served, together, tuple(length + len(FED[0]) for length in together.lengths))
    assert logits.shape == expected.shape
    assert torch.equal(logits, expected)
    assert torch.equal(together.cache.layers[0].keys, batch.cache.layers[0].keys)


def forward(served, batch, lengths: tuple[int, ...]) -> torch.Tensor:
    """The model over the batch's fed tokens, attention aligned on the rows' `lengths`."""
    out = served.model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        cache=batch.cache,
        use_cache=True,
        aligned_keys=AlignedKeys(lengths),
    )
    return out.logits
