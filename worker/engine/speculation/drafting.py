"""Which rows draft tokens in a step, and how many: the `--speculative` policy.

`ngram` drafts for every row whose recent tokens occurred before in its own text
(worker.engine.speculation.lookup), as many tokens as `draft_tokens` allows. `auto`
picks, each step, the draft length k that makes the most tokens per unit of time:
every row of the step feeds as many tokens as the longest draft (shorter ones are
filled up), which costs about 1 + SPECULATION_STEP_COST + SPECULATION_TOKEN_COST x
rows x k plain steps (shared.defaults), and yields each row 1 token plus those of its
drafts the model keeps, expected from the rate at which the row's drafts were kept
lately (a row keeps a run of i drafts with probability rate^i). k = 0 (no drafting)
whenever nothing pays: busy batches (past 1 / SPECULATION_TOKEN_COST rows not even a
row's text is looked up), open-ended text whose drafts fail. A row that drafts nothing drifts slowly back to
the prior rate, so it tries again some steps later. `off` never drafts.

A row's drafts never change its tokens: each drafted token is checked against the
token the row would have chosen there (worker.engine.engine), so drafting only
decides how many tokens a step yields."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from shared import defaults
from worker.engine.speculation.lookup import TokenLookup


@dataclass
class RowDrafts:
    """One row's drafting state: its text so far (indexed for lookups once the row
    first drafts: rows of busy batches never do, and the index costs memory), the
    tokens drafted in its last step, and how its drafts have fared."""

    tokens: list[int]  # the row's prompt and the tokens it has yielded
    fed: list[int] = field(default_factory=list)  # drafted tokens fed with the row's last token
    kept_recently: float = 0.0  # drafts kept, recent checks weighing most
    failed_recently: float = 0.0  # checks that stopped at a draft the model did not keep
    drafted: int = 0  # the row's drafted tokens so far
    kept: int = 0  # of which the model kept
    _lookup: TokenLookup | None = None

    def push(self, token: int) -> None:
        """The row yielded `token`."""
        self.tokens.append(token)
        if self._lookup is not None:
            self._lookup.append(token)

    def draft(self, count: int) -> list[int]:
        """Up to `count` tokens that followed the row's latest n-gram earlier in its text."""
        if self._lookup is None:
            shortest, longest = defaults.SPECULATION_MIN_NGRAM, defaults.SPECULATION_MAX_NGRAM
            self._lookup = TokenLookup(self.tokens, min_ngram=shortest, max_ngram=longest)
        return self._lookup.draft(count)

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


@dataclass
class DraftCounters:
    """Totals since the engine started."""

    drafted: int = 0
    kept: int = 0
    checks: int = 0  # row-steps that checked drafts


@dataclass
class Drafting:
    """The `--speculative` policy of one engine."""

    mode: str = defaults.DEFAULT_SPECULATIVE
    draft_tokens: int = defaults.DEFAULT_DRAFT_TOKENS
    counters: DraftCounters = field(default_factory=DraftCounters)

    def __post_init__(self) -> None:
        if self.mode not in defaults.SPECULATIVE_MODES:
            raise ValueError(f"speculative must be one of {defaults.SPECULATIVE_MODES}, not {self.mode!r}")
        if not 1 <= self.draft_tokens <= defaults.MAX_DRAFT_TOKENS:
            raise ValueError(f"draft_tokens must be 1..{defaults.MAX_DRAFT_TOKENS}, not {self.draft_tokens}")

    @property
    def on(self) -> bool:
        return self.mode != "off"

    def row(self, prompt_ids: Sequence[int]) -> RowDrafts | None:
        """A new row's drafting state (None when the engine never drafts)."""
        return RowDrafts(list(prompt_ids)) if self.on else None

    def drafts(self, rows: Sequence[RowDrafts | None], room: Sequence[int]) -> list[list[int]]:
        """Each row's drafted tokens for its next step ([] for none); `room[i]`: the most
        tokens row i may still yield after its next one (its max_new_tokens left)."""
        if self.mode == "auto" and len(rows) * defaults.SPECULATION_TOKEN_COST >= 1:
            return [[] for _ in rows]  # even drafts all kept would not pay for feeding this many rows
        found = [
            state.draft(min(self.draft_tokens, left)) if state is not None and left > 0 else []
            for state, left in zip(rows, room, strict=True)
        ]
        if self.mode != "auto":
            return found
        tokens = self._paying_length(rows, found)
        for state, draft in zip(rows, found, strict=True):
            if state is not None and not draft[:tokens]:
                state.forget(defaults.SPECULATION_IDLE_MEMORY)  # no evidence: slowly back to the prior
        return [draft[:tokens] for draft in found]

    @staticmethod
    def _paying_length(rows: Sequence[RowDrafts | None], found: Sequence[list[int]]) -> int:
        """The draft length that yields the most tokens per unit of time (0: none)."""
        best, best_rate = 0, 1.0
        for tokens in range(1, max((len(d) for d in found), default=0) + 1):
            kept = sum(
                state.expected_kept(min(tokens, len(draft)))
                for state, draft in zip(rows, found, strict=True)
                if state is not None and draft
            )
            cost = 1 + defaults.SPECULATION_STEP_COST + defaults.SPECULATION_TOKEN_COST * len(rows) * tokens
            rate = (len(rows) + kept) / (len(rows) * cost)
            if rate > best_rate:
                best, best_rate = tokens, rate
        return best

    def checked(self, state: RowDrafts, kept: int) -> None:
        """Note that `kept` of the row's fed drafts were kept."""
        drafted = len(state.fed)
        if drafted == 0:
            return
        state.drafted += drafted
        state.kept += kept
        state.forget(defaults.SPECULATION_MEMORY)
        state.kept_recently += kept
        state.failed_recently += 1 if kept < drafted else 0
        self.counters.drafted += drafted
        self.counters.kept += kept
        self.counters.checks += 1
