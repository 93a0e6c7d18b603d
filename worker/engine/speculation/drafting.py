"""Which rows draft tokens in a step, and how many: the `--speculative` policy.

`ngram` drafts for every row whose recent tokens occurred before in its own text
(worker.engine.speculation.lookup). `auto` drafts only where checking the drafts
costs about what one token's step costs: while the step's rows times the tokens
they feed stay small, and for rows whose recent drafts were mostly kept; a row
whose drafts keep failing rests a while, then tries again. `off` never drafts.

A row's drafts never change its tokens: each drafted token is checked against the
token the row would have chosen there (worker.engine.engine), so drafting only
decides how many tokens a step may yield."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from shared import defaults
from worker.engine.speculation.lookup import TokenLookup


@dataclass
class RowDrafts:
    """One row's drafting state: its text so far, indexed for lookups, the tokens
    drafted in its last step, and how well its drafts have done."""

    lookup: TokenLookup
    fed: list[int] = field(default_factory=list)  # drafted tokens fed with the row's last token
    kept_share: float = 1.0  # kept / drafted, averaged over recent checks
    resting: int = 0  # steps left before the row drafts again
    drafted: int = 0  # the row's drafted tokens so far
    kept: int = 0  # of which the model kept


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
        if not self.on:
            return None
        lookup = TokenLookup(
            prompt_ids, min_ngram=defaults.SPECULATION_MIN_NGRAM, max_ngram=defaults.SPECULATION_MAX_NGRAM
        )
        return RowDrafts(lookup)

    def drafts(self, rows: Sequence[RowDrafts | None], room: Sequence[int]) -> list[list[int]]:
        """Each row's drafted tokens for its next step ([] for none); `room[i]`: the most
        tokens row i may still yield after its next one (its max_new_tokens left)."""
        if not self.on:
            return [[] for _ in rows]
        wanted = []
        for state, left in zip(rows, room, strict=True):
            if state is None or left <= 0:
                wanted.append([])
            elif self.mode == "auto" and state.resting > 0:
                state.resting -= 1
                wanted.append([])
            else:
                wanted.append(state.lookup.draft(min(self.draft_tokens, left)))
        if self.mode == "auto":  # every row feeds as many tokens as the longest draft asks
            longest = defaults.SPECULATION_AUTO_MAX_FED_TOKENS // max(len(rows), 1) - 1
            wanted = [draft[: max(longest, 0)] for draft in wanted]
        return wanted

    def checked(self, state: RowDrafts, kept: int) -> None:
        """Note that `kept` of the row's fed drafts were kept."""
        drafted = len(state.fed)
        if drafted == 0:
            return
        state.drafted += drafted
        state.kept += kept
        self.counters.drafted += drafted
        self.counters.kept += kept
        self.counters.checks += 1
        state.kept_share = (state.kept_share + kept / drafted) / 2
        if self.mode == "auto" and state.kept_share < defaults.SPECULATION_AUTO_MIN_KEPT_SHARE:
            state.resting = defaults.SPECULATION_AUTO_REST_STEPS
            state.kept_share = defaults.SPECULATION_AUTO_MIN_KEPT_SHARE  # a fresh chance after resting
