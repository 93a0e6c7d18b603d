"""Which rows draft tokens in a step, how many, and from what: the `--speculative` policy.

Two drafters: prompt lookup (worker.engine.speculation.lookup: what followed the row's
latest n-gram earlier in its own text; free) and a draft model (`--draft-model`,
worker.engine.speculation.draft_model: a small model's greedy tokens; each costs a share
of a plain step). `ngram` drafts for every row whose recent tokens occurred before in
its own text, `draft` drafts with the draft model for every row (but rows with images,
which it cannot read), as many tokens as `draft_tokens` allows. `auto` picks, each step,
the draft length k that makes the most tokens per unit of time: every row of the step
feeds as many tokens as the longest draft (shorter ones are filled up), which costs about
1 + SPECULATION_STEP_COST + SPECULATION_TOKEN_COST x rows x k plain steps
(shared.defaults), plus the draft model's cost per token it drafts; a row yields 1 token
plus those of its drafts the model keeps, expected from the rate at which that drafter's
drafts were kept lately (a row keeps a run of i drafts with probability rate^i). A row
drafts by lookup where the lookup finds something, else with the draft model where that
pays. k = 0 (no drafting) whenever nothing pays: busy batches (past 1 /
SPECULATION_TOKEN_COST rows not even a row's text is looked up), open-ended text whose
drafts fail, a draft model too big to gain. A row that drafts nothing drifts slowly back
to the prior rate, so it tries again some steps later. `off` never drafts.

A row's drafts never change its tokens: each drafted token is checked against the
token the row would have chosen there (worker.engine.engine), so drafting only
decides how many tokens a step yields."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from shared import defaults
from worker.engine.speculation.draft_model import DraftCursor, DraftModel
from worker.engine.speculation.lookup import TokenLookup

NGRAM, MODEL = defaults.DRAFTERS


@dataclass
class Evidence:
    """How one drafter's drafts for a row have fared, recent checks weighing most."""

    kept_recently: float = 0.0  # drafts kept
    failed_recently: float = 0.0  # checks that stopped at a draft the model did not keep

    @property
    def keep_rate(self) -> float:
        """The chance the model keeps the row's next draft token, given the one before
        was kept (1/2 with no evidence)."""
        return (self.kept_recently + 1) / (self.kept_recently + self.failed_recently + 2)

    def expected_kept(self, tokens: int) -> float:
        """Tokens the model is expected to keep of a `tokens`-token draft."""
        rate = self.keep_rate
        return sum(rate**run for run in range(1, tokens + 1))

    def forget(self, memory: float) -> None:
        """Keep `memory` of the evidence so far."""
        self.kept_recently *= memory
        self.failed_recently *= memory

    def record(self, kept: int, drafted: int) -> None:
        self.forget(defaults.SPECULATION_MEMORY)
        self.kept_recently += kept
        self.failed_recently += 1 if kept < drafted else 0


@dataclass
class RowDrafts:
    """One row's drafting state: its text so far (indexed for lookups once the row
    first looks one up: rows of busy batches never do, and the index costs memory; held
    in the draft model's cache once the model first drafts for it), the tokens drafted
    in its last step and by whom, and how each drafter's drafts have fared."""

    tokens: list[int]  # the row's prompt and the tokens it has yielded
    images: bool = False  # the prompt holds images, which the draft model cannot read
    fed: list[int] = field(default_factory=list)  # drafted tokens fed with the row's last token
    fed_by: str = NGRAM  # the drafter of `fed`
    evidence: dict[str, Evidence] = field(default_factory=lambda: {d: Evidence() for d in defaults.DRAFTERS})
    drafted: int = 0  # the row's drafted tokens so far
    kept: int = 0  # of which the model kept
    _lookup: TokenLookup | None = None
    _cursor: DraftCursor = field(default_factory=DraftCursor)

    def push(self, token: int) -> None:
        """The row yielded `token`."""
        self.tokens.append(token)
        if self._lookup is not None:
            self._lookup.append(token)

    def look_up(self, count: int) -> list[int]:
        """Up to `count` tokens that followed the row's latest n-gram earlier in its text."""
        if self._lookup is None:
            shortest, longest = defaults.SPECULATION_MIN_NGRAM, defaults.SPECULATION_MAX_NGRAM
            self._lookup = TokenLookup(self.tokens, min_ngram=shortest, max_ngram=longest)
        return self._lookup.draft(count)

    def ask(self, model: DraftModel, count: int) -> list[int]:
        """The draft model's `count` next tokens for the row."""
        return model.propose(self._cursor, self.tokens, count)

    def forget(self, memory: float) -> None:
        for evidence in self.evidence.values():
            evidence.forget(memory)


@dataclass
class DraftCounters:
    """Totals since the engine started."""

    drafted: int = 0
    kept: int = 0
    checks: int = 0  # row-steps that checked drafts

    def add(self, drafted: int, kept: int) -> None:
        self.drafted += drafted
        self.kept += kept
        self.checks += 1


@dataclass
class Drafting:
    """The `--speculative` policy of one engine, with its draft model if it has one."""

    mode: str = defaults.DEFAULT_SPECULATIVE
    draft_tokens: int = defaults.DEFAULT_DRAFT_TOKENS
    model: DraftModel | None = None
    counters: dict[str, DraftCounters] = field(
        default_factory=lambda: {d: DraftCounters() for d in defaults.DRAFTERS}
    )

    def __post_init__(self) -> None:
        if self.mode not in defaults.SPECULATIVE_MODES:
            raise ValueError(f"speculative must be one of {defaults.SPECULATIVE_MODES}, not {self.mode!r}")
        if not 1 <= self.draft_tokens <= defaults.MAX_DRAFT_TOKENS:
            raise ValueError(f"draft_tokens must be 1..{defaults.MAX_DRAFT_TOKENS}, not {self.draft_tokens}")
        if self.mode == "draft" and self.model is None:
            raise ValueError("speculative 'draft' needs a draft model (--draft-model)")

    @property
    def on(self) -> bool:
        return self.mode != "off"

    @property
    def total(self) -> DraftCounters:
        """Every drafter's counters summed."""
        counters = self.counters.values()
        return DraftCounters(
            sum(c.drafted for c in counters), sum(c.kept for c in counters), sum(c.checks for c in counters)
        )

    def row(self, prompt_ids: Sequence[int], *, images: bool = False) -> RowDrafts | None:
        """A new row's drafting state (None when the engine never drafts)."""
        return RowDrafts(list(prompt_ids), images=images) if self.on else None

    def drafts(self, rows: Sequence[RowDrafts | None], room: Sequence[int]) -> list[list[int]]:
        """Each row's drafted tokens for its next step ([] for none); `room[i]`: the most
        tokens row i may still yield after its next one (its max_new_tokens left)."""
        if self.mode == "off" or (self.mode == "auto" and len(rows) * defaults.SPECULATION_TOKEN_COST >= 1):
            return [[] for _ in rows]  # even drafts all kept would not pay for feeding this many rows
        counts = [
            min(self.draft_tokens, left) if state is not None and left > 0 else 0
            for state, left in zip(rows, room, strict=True)
        ]
        if self.mode == "draft":
            asked = [self._asks_model(state, count) for state, count in zip(rows, counts, strict=True)]
            return self._drafted(rows, [[] for _ in rows], asked, counts)
        found = [
            state.look_up(count) if state is not None and count else []
            for state, count in zip(rows, counts, strict=True)
        ]
        if self.mode == "ngram":
            return self._drafted(rows, found, [False] * len(rows), counts)
        tokens, asked = self._paying(rows, found, counts)
        found = [draft[:tokens] for draft in found]
        drafts = self._drafted(rows, found, asked, [min(tokens, count) for count in counts])
        for state, draft in zip(rows, drafts, strict=True):
            if state is not None and not draft:
                state.forget(defaults.SPECULATION_IDLE_MEMORY)  # no evidence: slowly back to the prior
        return drafts

    def _asks_model(self, state: RowDrafts | None, count: int) -> bool:
        return self.model is not None and state is not None and not state.images and count > 0

    def _drafted(
        self,
        rows: Sequence[RowDrafts | None],
        found: list[list[int]],
        asked: Sequence[bool],
        counts: Sequence[int],
    ) -> list[list[int]]:
        """The rows' drafts: what lookups `found`, or the draft model's for the rows `asked`."""
        drafts = []
        for state, draft, ask, count in zip(rows, found, asked, counts, strict=True):
            if ask:
                assert state is not None and self.model is not None
                draft = state.ask(self.model, count)
            if state is not None:
                state.fed_by = MODEL if ask else NGRAM
            drafts.append(draft)
        return drafts

    def _paying(
        self, rows: Sequence[RowDrafts | None], found: Sequence[list[int]], counts: Sequence[int]
    ) -> tuple[int, list[bool]]:
        """The draft length that yields the most tokens per unit of time (0: none), and
        which rows the draft model drafts for then (rows the lookup found nothing for,
        those whose expected kept tokens pay most for what their drafting costs first)."""
        batch = len(rows)
        pairs = zip(rows, found, strict=True)
        lookups = [(state, draft) for state, draft in pairs if state is not None and draft]
        candidates = [
            index
            for index, (state, draft) in enumerate(zip(rows, found, strict=True))
            if not draft and self._asks_model(state, counts[index])
        ]
        longest = max([len(d) for d in found] + [counts[i] for i in candidates], default=0)
        best, best_rate, best_asked = 0, 1.0, [False] * batch
        for tokens in range(1, longest + 1):
            yielded = batch + sum(
                state.evidence[NGRAM].expected_kept(min(tokens, len(draft))) for state, draft in lookups
            )
            cost = 1 + defaults.SPECULATION_STEP_COST + defaults.SPECULATION_TOKEN_COST * batch * tokens
            asked = [False] * batch
            for index, gain, spent in self._model_offers(rows, candidates, counts, tokens):
                if gain / spent <= yielded / cost:
                    break
                yielded, cost, asked[index] = yielded + gain, cost + spent, True
            rate = yielded / (batch * cost)
            if rate > best_rate:
                best, best_rate, best_asked = tokens, rate, asked
        return best, best_asked

    def _model_offers(
        self, rows: Sequence[RowDrafts | None], candidates: Sequence[int], counts: Sequence[int], tokens: int
    ) -> list[tuple[int, float, float]]:
        """(row, expected kept tokens, cost) of each candidate's draft-model draft of up
        to `tokens` tokens, the best buys first."""
        if self.model is None:
            return []
        offers = []
        for index in candidates:
            state = rows[index]
            assert state is not None
            length = min(tokens, counts[index])
            spent = self.model.cost * length
            offers.append((index, state.evidence[MODEL].expected_kept(length), max(spent, 1e-9)))
        return sorted(offers, key=lambda offer: -offer[1] / offer[2])

    def checked(self, state: RowDrafts, kept: int) -> None:
        """Note that `kept` of the row's fed drafts were kept."""
        drafted = len(state.fed)
        if drafted == 0:
            return
        state.drafted += drafted
        state.kept += kept
        state.evidence[state.fed_by].record(kept, drafted)
        self.counters[state.fed_by].add(drafted, kept)
