"""Drafting with a small model (`--draft-model`): a causal language model over the same
tokens as the served one proposes each row's next tokens, its greedy choices, and the
served model checks them in its next step (worker.engine.engine).

A greedy draft is a single token with all the draft's probability, so the check the
engine makes for every draft (keep it when it equals the token the row chooses there,
with the row's own draw) is standard rejection sampling for such a draft: a sampled row
keeps it with the probability the served model gives it, and what the row says is what
it would say without drafting, seeded or not. (Rejection sampling against the draft
model's whole distribution would keep more drafts of sampled rows, but a row's tokens
would then depend on the draft model.)

Each drafting row keeps its own cache in the draft model (`DraftCursor`): the tokens the
draft model has seen, so a step feeds it only what is new (the tokens the served model
kept, and the one it chose) after forgetting its drafts the served model did not keep.
Rows draft one after another, each alone: a draft model pays when it is much smaller
than the served one, and its drafts then cost little beside the served model's step.

Easy to get wrong: the draft model's vocabulary may be padded past the tokenizer's, or
be a part of the served model's (which may add, e.g., an image token): it may only
propose tokens that mean the same to both."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from worker.engine.kv_cache import RecordingCache, drop_last_tokens, growing_cache, takes_back_tokens
from worker.engine.models.model_facts import forward_arguments, logit_columns

log = logging.getLogger(__name__)


class DraftModelMismatch(ValueError):
    """The draft model cannot draft for the served model (its tokens differ)."""


@dataclass
class DraftCursor:
    """One row's state in the draft model: the tokens its cache holds."""

    seen: list[int] = field(default_factory=list)
    cache: RecordingCache | None = None


class DraftModel:
    """A small causal language model proposing rows' next tokens."""

    def __init__(self, model: PreTrainedModel, *, cost: float, vocab_size: int, name: str = "") -> None:
        """`cost`: a drafted token's cost, in plain steps of the served model; `vocab_size`:
        the token ids below it mean the same to both models (drafts stay below it)."""
        if not takes_back_tokens(model.config):
            raise DraftModelMismatch("the draft model's cache must be full attention in every layer")
        self.model = model.eval()
        self.cost = cost
        self.vocab_size = vocab_size
        self.name = name
        self.device = next(model.parameters()).device
        self._cache_argument, self._forward_kwargs = forward_arguments(model)

    @classmethod
    def over(
        cls,
        draft: PreTrainedModel,
        draft_tokenizer: PreTrainedTokenizerBase,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        *,
        name: str = "",
        cost: float | None = None,
    ) -> DraftModel:
        """`draft` drafting for `model`: every token of the draft's tokenizer must be the same
        token of the model's. A drafted token costs `cost` plain steps, or else the draft's
        share of the model's weight bytes (decode steps of small batches are bound by reading
        the weights; `measured_cost` times them instead)."""
        theirs, ours = draft_tokenizer.get_vocab(), tokenizer.get_vocab()
        differing = [token for token, index in theirs.items() if ours.get(token) != index]
        if differing:
            shown = ", ".join(repr(token) for token in sorted(differing)[:5])
            raise DraftModelMismatch(
                f"the draft model's tokenizer differs from the model's in {len(differing)} "
                f"token(s) (e.g. {shown}): a draft model must share the model's tokenizer"
            )
        if cost is None:
            cost = _weight_bytes(draft) / _weight_bytes(model)
        log.info("draft model %s: a drafted token costs %.2f of a plain step", name or "?", cost)
        vocab_size = min(len(theirs), logit_columns(draft), logit_columns(model))
        return cls(draft, cost=cost, vocab_size=vocab_size, name=name)

    @torch.inference_mode()
    def propose(self, cursor: DraftCursor, tokens: Sequence[int], count: int) -> list[int]:
        """The draft model's `count` greedy tokens after `tokens` (a row's prompt and output
        so far), reusing what `cursor` holds of them."""
        if count < 1 or not tokens:
            return []
        common = min(_common_prefix(cursor.seen, tokens), len(tokens) - 1)
        if cursor.cache is None or common == 0:
            cursor.cache, common = growing_cache(self.model.config), 0
        elif common < len(cursor.seen):
            drop_last_tokens(cursor.cache, [len(cursor.seen) - common])
        logits = self._run(cursor.cache, tokens[common:], common)
        proposed: list[int] = []
        while True:
            proposed.append(int(logits[: self.vocab_size].argmax()))
            if len(proposed) == count:
                break
            logits = self._run(cursor.cache, proposed[-1:], len(tokens) + len(proposed) - 1)
        cursor.seen = [*tokens, *proposed[:-1]]
        return proposed

    def _run(self, cache: RecordingCache, fed: Sequence[int], start: int) -> torch.Tensor:
        """The logits after the last of `fed` (tokens at positions `start`...), the cache
        holding the `start` tokens before them."""
        end = start + len(fed)
        out = self.model(
            input_ids=torch.tensor([list(fed)], dtype=torch.long, device=self.device),
            attention_mask=torch.ones((1, end), dtype=torch.long, device=self.device),
            position_ids=torch.arange(start, end, device=self.device)[None],
            use_cache=True,
            **{self._cache_argument: cache},
            **self._forward_kwargs,
        )
        return out.logits[0, -1]


def measured_cost(
    draft: PreTrainedModel, model: PreTrainedModel, *, steps: int = 8, rounds: int = 3
) -> float:
    """A drafted token's cost in plain steps of `model`, timed: each model decodes `steps`
    tokens one at a time after a short prompt, alone (the fastest of `rounds` for each).
    The engine's own steps cost a little more than the model's bare forward, so this errs
    on the side of drafting less."""
    prompt = list(range(100, 132))
    times = []
    for one in (draft, model):
        drafter = DraftModel(one, cost=1.0, vocab_size=logit_columns(one))
        best = float("inf")
        for _ in range(rounds):
            cursor = DraftCursor()
            drafter.propose(cursor, prompt, 1)  # the prompt's prefill, not timed
            started = time.perf_counter()
            drafter.propose(cursor, [*prompt, 7], steps)  # `steps` one-token forwards
            best = min(best, time.perf_counter() - started)
        times.append(best)
    return times[0] / times[1]


def _common_prefix(first: Sequence[int], second: Sequence[int]) -> int:
    """How many leading tokens `first` and `second` share."""
    shared = 0
    for a, b in zip(first, second, strict=False):
        if a != b:
            break
        shared += 1
    return shared


def _weight_bytes(model: PreTrainedModel) -> int:
    """Bytes of the model's parameters and buffers (quantized layers keep weights in buffers)."""
    tensors = [*model.parameters(), *model.buffers()]
    unique = {tensor.data_ptr(): tensor for tensor in tensors}  # tied weights once
    return sum(tensor.numel() * tensor.element_size() for tensor in unique.values())
