"""The running batch: the rows generated together and the tensors the model needs.

A `Batch` is either ready to run (`input_ids` / `position_ids` are the tokens the
next forward consumes, `attention_mask` covers the cache plus those tokens) or ready
to sample (the forward ran, `logits` holds each row's next-token logits, after each
fed token when rows fed drafts too, `attention_mask` covers exactly the cache).
`filter` drops finished rows; `concatenate` merges batches that are ready to sample,
rows sorted longest first (see worker.engine.attention); `feed` gives each row its
next token and the drafted tokens to check after it (worker.engine.speculation);
`retract` forgets the fed tokens the rows did not keep.

Easy to get wrong: rows are left-padded (every row's last token in the last column)
and each row's position ids count only its real tokens (cumsum of the mask - 1, or
the row's own multimodal positions: worker.engine.positions), which is what makes a
padded row compute what it would compute alone."""

from __future__ import annotations

from collections.abc import Collection, Hashable, Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache, PreTrainedTokenizerBase

from worker.engine.detokenizer import Detokenizer
from worker.engine.grammar import GrammarState
from worker.engine.kv_cache import drop_last_tokens, is_plain, merge_caches, select_rows
from worker.engine.positions import merged_position_ids, next_position_ids, prompt_position_ids
from worker.engine.rows import RowRequest
from worker.engine.sampler import Sampler
from worker.engine.speculation.drafting import RowDrafts
from worker.engine.stopping import Stopping


def padded_width(length: int, multiple: int = 1) -> int:
    """The prefill width (prompt tokens plus left padding) of a `length`-token
    prompt padded to a multiple of `multiple` tokens (`--prefill-width-multiple`).

    Why pad: on a CPU, torch's bfloat16 products go to oneDNN, which builds and
    caches a primitive, with scratch memory of its own, per shape: with every
    prompt length its own shape, a worker's memory grows with each new prompt
    length and each new shape takes time to build. Why not by default:
    the padding changes bfloat16 rounding, so a request's greedy tokens no
    longer equal unpadded `generate` token for token."""
    return -(-length // multiple) * multiple


@dataclass
class Row:
    """The bookkeeping of one row that is not a batch tensor."""

    key: Hashable
    prompt_length: int
    stopping: Stopping
    detokenizer: Detokenizer
    grammar: GrammarState | None = None  # constrained rows: where the row is in its grammar
    adapter: str | None = None  # the row's LoRA adapter (None = the base model)
    cached_tokens: int = 0  # prompt tokens whose keys and values came from the prefix cache
    block_keys: list[bytes] | None = None  # the prompt's blocks' prefix-cache keys, while it prefills
    drafts: RowDrafts | None = None  # speculative decoding: the row's text indexed, its drafts
    fed_tokens: int = 1  # tokens the row fed its last forward (its drafts and fillers too)

    @property
    def completion_tokens(self) -> int:
        return self.stopping.generated


@dataclass
class Batch:
    rows: list[Row]
    input_ids: torch.Tensor  # [B, T] long
    attention_mask: torch.Tensor  # [B, S] long, 0 = left padding
    position_ids: torch.Tensor  # [B, T] long, or [axes, B, T] (worker.engine.positions)
    cache: DynamicCache
    sampler: Sampler
    logits: torch.Tensor | None = None  # [B, V] once the forward has run; [B, T, V] after `feed`

    @classmethod
    def from_rows(
        cls,
        requests: Sequence[RowRequest],
        *,
        tokenizer: PreTrainedTokenizerBase,
        eos_token_ids: Collection[int],
        vocab_size: int,
        pad_token_id: int,
        device: torch.device | str = "cpu",
        cache: DynamicCache | None = None,
        width_multiple: int = 1,
        positions: Sequence[torch.Tensor | None] | None = None,
    ) -> Batch:
        """A batch ready to prefill `requests`, prompts left-padded to the longest
        (rounded up to a multiple of `width_multiple`). `positions` gives rows
        their own position ids ([axes, prompt length]; None: 0, 1, 2...)."""
        if not requests:
            raise ValueError("a batch needs at least one row")
        device = torch.device(device)
        width = padded_width(max(len(r.prompt_ids) for r in requests), width_multiple)
        input_ids = torch.full((len(requests), width), pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(requests), width), dtype=torch.long)
        for row, request in enumerate(requests):
            length = len(request.prompt_ids)
            input_ids[row, width - length :] = torch.tensor(request.prompt_ids, dtype=torch.long)
            attention_mask[row, width - length :] = 1
        position_ids = prompt_position_ids(attention_mask, positions or [None] * len(requests))
        rows = [
            Row(
                key=r.key,
                prompt_length=len(r.prompt_ids),
                stopping=Stopping(r.params, r.prompt_ids, eos_token_ids),
                detokenizer=Detokenizer(tokenizer),
                adapter=r.adapter,
            )
            for r in requests
        ]
        sampler = Sampler.from_params(
            [r.params for r in requests], [r.prompt_ids for r in requests], vocab_size, device
        )
        return cls(
            rows=rows,
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            position_ids=position_ids.to(device),
            cache=cache if cache is not None else DynamicCache(),
            sampler=sampler,
        )

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def keys(self) -> list[Hashable]:
        return [row.key for row in self.rows]

    @property
    def adapters(self) -> list[str | None]:
        return [row.adapter for row in self.rows]

    @property
    def lengths(self) -> list[int]:
        """Real (non-padding) tokens per row covered by the attention mask:
        each row's prompt and the tokens it has generated, each fed back once
        sampled (inside `Engine.step`, between sampling and `feed`, a row's
        newest token is counted already). Known on the host, so reading it
        never waits for a GPU."""
        return [row.prompt_length + row.completion_tokens for row in self.rows]

    @property
    def can_concatenate(self) -> bool:
        """Whether `concatenate` supports this batch's KV cache."""
        return is_plain(self.cache)

    @property
    def ready_to_sample(self) -> bool:
        return self.logits is not None

    def feed(self, tokens: Sequence[Sequence[int]]) -> None:
        """Feed each row its chosen token and, after it, tokens to check (drafts) in the
        next forward, which then gives logits after each ([B, T, V]). Rows feeding fewer
        are filled up with their last token (what the model makes of those is unused)."""
        if len(tokens) != len(self) or not all(tokens):
            raise ValueError(f"expected at least one token for each of {len(self)} rows")
        fed = max(len(row) for row in tokens)
        filled = [list(row) + [row[-1]] * (fed - len(row)) for row in tokens]
        self.input_ids = torch.tensor(filled, dtype=torch.long, device=self.input_ids.device)
        for row in self.rows:
            row.fed_tokens = fed
        steps = torch.arange(fed, device=self.position_ids.device)
        self.position_ids = next_position_ids(self.position_ids) + steps
        self.attention_mask = torch.cat(
            [self.attention_mask, self.attention_mask.new_ones((len(self), fed))], dim=1
        )
        self.logits = None

    def retract(self, dropped: Sequence[int]) -> None:
        """Forget each row's last `dropped[row]` fed tokens (drafts the model did not
        keep, and fillers) from the cache, the mask and the positions, keeping every
        row's last kept token in the last column. Call it before `feed`."""
        if len(dropped) != len(self):
            raise ValueError(f"expected {len(self)} counts, got {len(dropped)}")
        if not any(dropped):
            return
        drop_last_tokens(self.cache, dropped)
        device = self.attention_mask.device
        counts = self.attention_mask.sum(dim=1) - torch.tensor(list(dropped), device=device)
        width = self.attention_mask.shape[1] - min(dropped)
        columns = torch.arange(width, device=device)
        self.attention_mask = (columns[None] >= width - counts[:, None]).to(self.attention_mask.dtype)
        last = self.position_ids[..., -1:]
        back = torch.tensor(list(dropped), dtype=last.dtype, device=last.device)[:, None]
        self.position_ids = last - back

    def filter(self, keep: Sequence[int]) -> Batch:
        """The rows `keep` (indices into this batch, in that order) of a batch
        that is ready to sample. Padding columns no kept row uses are trimmed
        from the mask and the KV cache. Reuses (and mutates) the cache."""
        if not self.ready_to_sample:
            raise RuntimeError("filter a batch after its forward, before feeding it tokens")
        keep = list(keep)
        if not keep:
            raise ValueError("filter would leave an empty batch; drop the batch instead")
        if keep == list(range(len(self))):
            return self
        device = self.attention_mask.device
        index = torch.tensor(keep, dtype=torch.long, device=device)
        attention_mask = self.attention_mask[index]
        unused = attention_mask.shape[1] - int(attention_mask.sum(dim=1).max()) if self.can_concatenate else 0
        select_rows(self.cache, keep, drop_left=unused)
        attention_mask = attention_mask[:, unused:]
        assert self.logits is not None
        return Batch(
            rows=[self.rows[i] for i in keep],
            input_ids=self.input_ids[index],
            attention_mask=attention_mask,
            position_ids=self.position_ids[..., index, :],
            cache=self.cache,
            sampler=self.sampler.filter(keep),
            logits=self.logits[index],
        )

    @classmethod
    def concatenate(cls, batches: Sequence[Batch]) -> Batch:
        """One batch holding the rows of `batches` (all ready to sample),
        longest first (ties in the order given: see worker.engine.attention).
        Shorter KV caches and masks are left-padded to the longest, so every
        row's last token stays in the last column. Reuses (and mutates) the
        first batch's cache."""
        if not batches:
            raise ValueError("nothing to concatenate")
        if len(batches) == 1:
            return batches[0]
        if not all(b.ready_to_sample for b in batches):
            raise RuntimeError("concatenate batches after their forward, before feeding them tokens")
        if not all(b.can_concatenate for b in batches):
            raise NotImplementedError("only plain DynamicCache layers can be concatenated")
        width = max(b.attention_mask.shape[1] for b in batches)

        def pad_left(tensor: torch.Tensor, dim: int) -> torch.Tensor:
            missing = width - tensor.shape[dim]
            if missing == 0:
                return tensor
            shape = list(tensor.shape)
            shape[dim] = missing
            return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)

        lengths = [length for b in batches for length in b.lengths]
        # longest first (stable): the rows stay sorted as they all grow by one
        # token a step, so decode attention can skip padding by groups
        order = sorted(range(len(lengths)), key=lambda row: -lengths[row])
        index = torch.tensor(order, dtype=torch.long, device=batches[0].attention_mask.device)
        rows = [row for b in batches for row in b.rows]
        logits = _stacked_logits([b.logits for b in batches if b.logits is not None])
        return cls(
            rows=[rows[i] for i in order],
            input_ids=torch.cat([b.input_ids[:, -1:] for b in batches])[index],
            attention_mask=torch.cat([pad_left(b.attention_mask, 1) for b in batches])[index],
            position_ids=merged_position_ids([b.position_ids[..., -1:] for b in batches])[..., index, :],
            cache=merge_caches([b.cache for b in batches], width, order),
            sampler=Sampler.concatenate([b.sampler for b in batches]).filter(order),
            logits=logits[index],
        )


def _stacked_logits(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """Batches' logits in one tensor: [B, V] when all are, else [B, T, V] with each
    part's positions first (what follows them is never read: those rows fed fewer)."""
    if all(part.ndim == 2 for part in parts):
        return torch.cat(list(parts))
    positions = max(part.shape[1] if part.ndim == 3 else 1 for part in parts)
    stacked = []
    for part in parts:
        part = part[:, None] if part.ndim == 2 else part
        if part.shape[1] < positions:
            missing = part.new_zeros((part.shape[0], positions - part.shape[1], part.shape[2]))
            part = torch.cat([part, missing], dim=1)
        stacked.append(part)
    return torch.cat(stacked)
