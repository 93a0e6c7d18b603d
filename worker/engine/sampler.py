"""Next-token choice for a whole batch at once.

A `Sampler` holds one row's decoding parameters per entry of its vectors and turns a
batch of logits into one token per row with tensor operations over the whole batch
(rows grouped by how many candidates they need, one vectorised pass per group):

    repetition penalty -> banned tokens (-inf) -> greedy argmax
                       -> temperature -> top-k -> top-p -> inverse-CDF draw

The order and the meaning of each knob follow Hugging Face `generate`.

Easy to get wrong: each row owns a `torch.Generator` and draws exactly one uniform
number per sampled step, so a seeded row picks the same tokens whatever rows share
its batch and in whatever order."""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from worker.engine.bans import TokenBans
from worker.engine.rows import GenerationParams

# Width of the column blocks `greedy_tokens` takes each row's maximum over.
GREEDY_BLOCK = 1024

Bans = torch.Tensor | TokenBans | None  # a [B, V] bool mask, (row, token) pairs, or nothing

# Candidates a nucleus-only row (top_k 0, top_p < 1) looks at before falling
# back to sorting the whole vocabulary.
NUCLEUS_CANDIDATES = 1024


def random_seed() -> int:
    """A fresh seed for a row that did not ask for one."""
    return secrets.randbits(63)


@dataclass
class Sampler:
    """Per-row sampling parameters as batch vectors, plus the per-row state
    sampling needs (which tokens each row has seen, each row's generator)."""

    temperature: torch.Tensor  # [B] float, 1.0 for greedy rows (never divides by 0)
    top_k: torch.Tensor  # [B] long, 0 = no cut
    top_p: torch.Tensor  # [B] float in (0, 1]
    repetition_penalty: torch.Tensor  # [B] float, 1.0 = off
    greedy: torch.Tensor  # [B] bool
    seen: torch.Tensor  # [B, V] bool: token occurs in the row's prompt or completion so far
    generators: list[torch.Generator | None]  # one per row, None for greedy rows
    seeds: list[int | None]

    @classmethod
    def from_params(
        cls,
        params: Sequence[GenerationParams],
        prompts: Sequence[Sequence[int]],
        vocab_size: int,
        device: torch.device | str = "cpu",
    ) -> Sampler:
        device = torch.device(device)
        greedy = [p.greedy for p in params]
        seeds: list[int | None] = []
        generators: list[torch.Generator | None] = []
        for p, is_greedy in zip(params, greedy, strict=True):
            if is_greedy:
                seeds.append(None)
                generators.append(None)
                continue
            seed = p.seed if p.seed is not None else random_seed()
            # CPU generators whatever the model's device: the same seed draws
            # the same numbers on every machine, and one draw per row is cheap.
            generator = torch.Generator(device="cpu")
            generator.manual_seed(seed)
            seeds.append(seed)
            generators.append(generator)

        seen = torch.zeros((len(params), vocab_size), dtype=torch.bool, device=device)
        for row, prompt in enumerate(prompts):
            if prompt:
                ids = torch.tensor(prompt, dtype=torch.long, device=device).clamp_(0, vocab_size - 1)
                seen[row, ids] = True
        return cls(
            temperature=torch.tensor(
                [1.0 if g else p.temperature for p, g in zip(params, greedy, strict=True)],
                dtype=torch.float32,
                device=device,
            ),
            top_k=torch.tensor([p.top_k for p in params], dtype=torch.long, device=device),
            top_p=torch.tensor([p.top_p for p in params], dtype=torch.float32, device=device),
            repetition_penalty=torch.tensor(
                [p.repetition_penalty for p in params], dtype=torch.float32, device=device
            ),
            greedy=torch.tensor(greedy, dtype=torch.bool, device=device),
            seen=seen,
            generators=generators,
            seeds=seeds,
        )

    def __len__(self) -> int:
        return len(self.generators)

    @property
    def vocab_size(self) -> int:
        return self.seen.shape[1]

    # -- the maths ---------------------------------------------------------

    def process(self, logits: torch.Tensor, banned: Bans = None) -> torch.Tensor:
        """Scores after the logits processors shared by greedy and sampled rows:
        repetition penalty (HF semantics: positive scores divided, negative
        multiplied, for every token already seen) and banned tokens at -inf."""
        scores = logits.float()
        if scores.shape[1] != self.vocab_size:
            raise ValueError(f"logits have {scores.shape[1]} columns, sampler expects {self.vocab_size}")
        penalty = self.repetition_penalty[:, None]
        if bool((self.repetition_penalty != 1.0).any()):
            penalised = torch.where(scores > 0, scores / penalty, scores * penalty)
            scores = torch.where(self.seen, penalised, scores)
        if isinstance(banned, TokenBans):
            if scores.data_ptr() == logits.data_ptr():  # float32 logits: .float() did not copy
                scores = scores.clone()
            return banned.apply(scores)
        if banned is not None:
            # A row with every token banned keeps its scores rather than
            # sampling from nothing (possible with tiny vocabularies).
            banned = banned & ~banned.all(dim=1, keepdim=True)
            scores = scores.masked_fill(banned, float("-inf"))
        return scores

    def _candidates(self, scores: torch.Tensor, rows: torch.Tensor) -> list[_Candidates]:
        """Temperature, top-k and top-p for the sampled `rows` of processed
        `scores`, as groups of rows sharing a candidate width.

        Rows without any cut draw from the whole vocabulary in vocabulary
        order (no sort). Rows with a cut only look at their best candidates
        (torch.topk, far cheaper than sorting the vocabulary): top-k rows need
        k of them; nucleus-only rows try NUCLEUS_CANDIDATES and fall back to
        the whole sorted vocabulary when those do not reach top-p's mass.
        Which group a row lands in depends only on its own parameters and
        logits, so a seeded row's draws do not depend on its batch mates.
        """
        scaled = scores[rows] / self.temperature[rows, None]
        row_max = scaled.max(dim=-1, keepdim=True).values
        row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
        top_k = self.top_k[rows]
        top_p = self.top_p[rows]
        vocab = scaled.shape[1]
        groups: list[_Candidates] = []

        plain = (top_k == 0) & (top_p >= 1.0)
        if bool(plain.any()):
            index = plain.nonzero().flatten()
            weights = torch.exp((scaled[index] - row_max[index]).double())
            groups.append(_Candidates(rows[index], weights, None))

        cut = (~plain).nonzero().flatten()
        if cut.numel():
            width = int(torch.where(top_k[cut] > 0, top_k[cut], NUCLEUS_CANDIDATES).max())
            weights, ids, complete = _truncate(
                scaled[cut], row_max[cut], top_k[cut], top_p[cut], min(width, vocab)
            )
            done = complete.nonzero().flatten()
            if done.numel():
                groups.append(_Candidates(rows[cut[done]], weights[done], ids[done]))
            redo = (~complete).nonzero().flatten()
            if redo.numel():
                again = cut[redo]
                weights, ids, _ = _truncate(scaled[again], row_max[again], top_k[again], top_p[again], vocab)
                groups.append(_Candidates(rows[again], weights, ids))
        return groups

    def probabilities(self, logits: torch.Tensor, banned: Bans = None) -> torch.Tensor:
        """The distribution each row draws from, in vocabulary order ([B, V]);
        a greedy row puts all its mass on its argmax."""
        scores = self.process(logits, banned)
        result = torch.zeros_like(scores)
        result.scatter_(1, greedy_tokens(scores)[:, None], 1.0)
        for group in self._candidates(scores, torch.nonzero(~self.greedy).flatten()):
            probs = (group.weights / group.weights.sum(dim=-1, keepdim=True)).float()
            if group.ids is None:
                result[group.rows] = probs
            else:
                result[group.rows] = torch.zeros_like(result[group.rows]).scatter_(1, group.ids, probs)
        return result

    def __call__(self, logits: torch.Tensor, banned: Bans = None) -> torch.Tensor:
        """One token per row ([B] long) from next-token `logits` ([B, V]).
        `banned` (a [B, V] bool mask, or TokenBans) marks tokens a row may
        not pick this step."""
        scores = self.process(logits, banned)
        tokens = greedy_tokens(scores)
        sampled = torch.nonzero(~self.greedy).flatten()
        if sampled.numel() == 0:
            return tokens
        # One draw per sampled row per step, from the row's own generator.
        uniforms = torch.zeros(len(self), dtype=torch.float64)
        for row in sampled.tolist():
            uniforms[row] = torch.rand((), generator=self.generators[row], dtype=torch.float64)
        uniforms = uniforms.to(scores.device)
        for group in self._candidates(scores, sampled):
            tokens[group.rows] = group.draw(uniforms[group.rows])
        return tokens

    def choose(self, rows: Sequence[int], logits: torch.Tensor, banned: Bans = None) -> torch.Tensor:
        """One token for each of `rows` (indices into this sampler) from their logits
        ([len(rows), V]), recorded as seen: a step choosing for some rows only (a row
        checking drafted tokens chooses once per token it keeps, each choice drawing the
        row's next number, as a step without drafts would)."""
        every_row = list(rows) == list(range(len(self)))
        tokens = (self if every_row else self.filter(rows))(logits, banned)
        self.record(tokens, None if every_row else rows)
        return tokens

    # -- per-row state -----------------------------------------------------

    def record(self, tokens: torch.Tensor, rows: Sequence[int] | None = None) -> None:
        """Mark each row's newly chosen token as seen (for the repetition penalty);
        `rows`: the rows `tokens` are for (None: every row, in order)."""
        index = (
            torch.arange(len(self), device=self.seen.device)
            if rows is None
            else torch.tensor(list(rows), dtype=torch.long, device=self.seen.device)
        )
        self.seen[index, tokens.to(self.seen.device)] = True

    def filter(self, keep: Sequence[int]) -> Sampler:
        """A sampler for the rows `keep` (indices into this one), in that order."""
        index = torch.tensor(list(keep), dtype=torch.long, device=self.seen.device)
        return Sampler(
            temperature=self.temperature[index],
            top_k=self.top_k[index],
            top_p=self.top_p[index],
            repetition_penalty=self.repetition_penalty[index],
            greedy=self.greedy[index],
            seen=self.seen[index],
            generators=[self.generators[i] for i in keep],
            seeds=[self.seeds[i] for i in keep],
        )

    @classmethod
    def concatenate(cls, samplers: Sequence[Sampler]) -> Sampler:
        """One sampler whose rows are those of `samplers`, in order."""
        if len({s.vocab_size for s in samplers}) != 1:
            raise ValueError("cannot concatenate samplers over different vocabularies")
        return cls(
            temperature=torch.cat([s.temperature for s in samplers]),
            top_k=torch.cat([s.top_k for s in samplers]),
            top_p=torch.cat([s.top_p for s in samplers]),
            repetition_penalty=torch.cat([s.repetition_penalty for s in samplers]),
            greedy=torch.cat([s.greedy for s in samplers]),
            seen=torch.cat([s.seen for s in samplers]),
            generators=[g for s in samplers for g in s.generators],
            seeds=[seed for s in samplers for seed in s.seeds],
        )


@dataclass
class _Candidates:
    """Rows of a batch sharing a candidate width, with the unnormalised
    weight of each candidate (0 = cut) and its token id."""

    rows: torch.Tensor  # [R] batch indices
    weights: torch.Tensor  # [R, K] float64
    ids: torch.Tensor | None  # [R, K] token ids; None = the whole vocabulary in order

    def draw(self, uniforms: torch.Tensor) -> torch.Tensor:
        """Inverse CDF: for each row the first candidate whose cumulative
        weight exceeds u * total ([R] token ids)."""
        cdf = self.weights.cumsum(dim=-1)
        targets = uniforms[:, None] * cdf[:, -1:]
        picks = torch.searchsorted(cdf, targets, right=True).squeeze(1)
        # Rounding may push u * total onto the total: take the last live candidate.
        width = self.weights.shape[1]
        last_live = width - 1 - (self.weights > 0).flip(-1).int().argmax(dim=-1)
        picks = torch.minimum(picks, last_live)
        if self.ids is None:
            return picks
        return self.ids.gather(1, picks[:, None]).squeeze(1)


def greedy_tokens(scores: torch.Tensor) -> torch.Tensor:
    """`scores.argmax(dim=-1)` ([B, V] -> [B], the first of equal maxima),
    found through each row's block maxima, because torch's CPU argmax does
    not vectorise and its `amax` does. The best block's argmax (first
    best block, first best column in it) is the row's. Rows with NaN scores
    go to argmax itself (NaN counts as the largest there)."""
    batch, vocab = scores.shape
    blocks = vocab // GREEDY_BLOCK
    if blocks < 2 or scores.stride(1) != 1:
        return scores.argmax(dim=-1)
    width = blocks * GREEDY_BLOCK
    blocked = scores[:, :width].view(batch, blocks, GREEDY_BLOCK)
    block_max = blocked.amax(dim=-1)  # [B, blocks]
    best_block = block_max.argmax(dim=-1)  # [B], first best block
    best = block_max.gather(1, best_block[:, None]).squeeze(1)
    rows = torch.arange(batch, device=scores.device)
    tokens = best_block * GREEDY_BLOCK + blocked[rows, best_block].argmax(dim=-1)
    if width < vocab:  # the columns past the last whole block win only when larger
        tail = scores[:, width:]
        tail_best, tail_token = tail.max(dim=-1)
        tokens = torch.where(tail_best > best, width + tail_token, tokens)
        best = torch.maximum(best, tail_best)
    if bool(torch.isnan(best).any()):
        return scores.argmax(dim=-1)
    return tokens


def _truncate(
    scaled: torch.Tensor, row_max: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, width: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """top-k then top-p (Hugging Face semantics) over each row's `width` best
    tokens. Returns weights ([R, width] float64, descending, 0 = cut), token
    ids, and whether the candidates were enough to decide top-p exactly."""
    values, ids = scaled.topk(width, dim=-1, sorted=True)
    weights = torch.exp((values - row_max).double())

    # top-k keeps every token scoring at least the k-th best.
    k = torch.where(top_k > 0, top_k.clamp(max=width), width)
    kth = values.gather(1, (k - 1)[:, None])
    weights = weights.masked_fill(values < kth, 0.0)

    # top-p keeps the smallest prefix whose mass reaches p (the best token
    # always). Mass is relative to what top-k kept, or to the whole
    # vocabulary for rows without top-k.
    cdf = weights.cumsum(dim=-1)
    total = cdf[:, -1]
    no_top_k = top_k <= 0
    if bool(no_top_k.any()) and width < scaled.shape[1]:
        vocabulary_mass = torch.exp((scaled - row_max).double()).sum(dim=-1)
        total = torch.where(no_top_k, vocabulary_mass, total)
    threshold = (top_p.double() * total)[:, None]
    keep = ((cdf - weights) < threshold) | (top_p[:, None] >= 1.0)
    keep[:, 0] = True
    weights = weights * keep
    complete = ~no_top_k | (top_p >= 1.0) | (cdf[:, -1] >= threshold[:, 0]) | (width >= scaled.shape[1])
    return weights, ids, complete
