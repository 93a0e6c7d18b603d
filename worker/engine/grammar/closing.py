"""Closing an answer within its token budget, for grammars that are token automata.

A `ClosingTable` knows, for every state of a grammar's token automaton, the
fewest tokens that reach an accepting state, and for each token the state it
leads to. A row with `budget` tokens left (the one about to be picked
included) may pick a token only if the state it leads to can still accept
within `budget - 1` tokens. Rows far from their budget are never narrowed;
near it, only tokens on the shortest ways to an accepting state are left, so
the answer is complete when the budget runs out.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from itertools import chain

import numpy as np

# Distance of a state from which no accepting state can be reached.
UNREACHABLE = np.iinfo(np.int32).max


class ClosingTable:
    """Shortest completions of a token automaton given as `transitions`
    (state -> {token id: next state}), its `accepting` states and its `start`
    state. Tokens in `ignore` (end of sequence) are left out: the engine ends
    rows, not the grammar."""

    def __init__(
        self,
        transitions: Mapping[int, Mapping[int, int]],
        accepting: Iterable[int],
        start: int,
        ignore: Collection[int] = (),
    ):
        sizes = [len(edges) for edges in transitions.values()]
        total = sum(sizes)
        source = np.repeat(np.fromiter(transitions, np.int64, len(transitions)), sizes)
        tokens = np.fromiter(chain.from_iterable(e.keys() for e in transitions.values()), np.int64, total)
        target = np.fromiter(chain.from_iterable(e.values() for e in transitions.values()), np.int64, total)
        kept = ~np.isin(tokens, np.asarray(list(ignore), dtype=np.int64))
        source, tokens, target = source[kept], tokens[kept], target[kept]
        finals = np.fromiter(accepting, np.int64)
        self._states = np.unique(np.concatenate([source, target, finals, [start]]))
        count = len(self._states)
        source = np.searchsorted(self._states, source)
        target = np.searchsorted(self._states, target)
        self._distance = _distances(count, source, target, np.searchsorted(self._states, finals))
        self.start = start

        # Each state's tokens, sorted by how far the state they lead to is from accepting.
        after = self._distance[target]
        order = np.lexsort((after, source))
        self._tokens = tokens[order]
        self._after = after[order]
        self._first = np.searchsorted(source[order], np.arange(count + 1))
        # Above `farthest + 1` tokens left, a state's choices are never narrowed.
        finite = np.where(self._after < UNREACHABLE, self._after, -1)
        self._farthest = np.full(count, -1, dtype=np.int64)
        busy = self._first[:-1] < self._first[1:]
        self._farthest[busy] = np.maximum.reduceat(finite, self._first[:-1][busy]) if len(finite) else []

    def shortest(self, state: int) -> int | None:
        """The fewest tokens that take the automaton's `state` to an accepting
        state; None if none can be reached."""
        distance = int(self._distance[self._row(state)])
        return None if distance == UNREACHABLE else distance

    def within(self, state: int, budget: int) -> np.ndarray | None:
        """The tokens a row in the automaton's `state` may pick with `budget`
        tokens left (this one included) and still accept when they run out;
        None when the budget narrows nothing."""
        row = self._row(state)
        if budget - 1 >= self._farthest[row]:
            return None
        first, end = int(self._first[row]), int(self._first[row + 1])
        keep = first + int(np.searchsorted(self._after[first:end], budget - 1, side="right"))
        return None if keep == end else self._tokens[first:keep]

    def _row(self, state: int) -> int:
        """The table's index of one of the automaton's states."""
        return int(np.searchsorted(self._states, state))


def _distances(count: int, source: np.ndarray, target: np.ndarray, accepting: np.ndarray) -> np.ndarray:
    """Per state, the fewest edges to an accepting state (breadth first,
    backwards over the distinct state pairs)."""
    distance = np.full(count, UNREACHABLE, dtype=np.int64)
    pairs = np.unique(source * count + target) if len(source) else np.zeros(0, dtype=np.int64)
    before: dict[int, list[int]] = {}
    for src, dst in zip((pairs // count).tolist(), (pairs % count).tolist(), strict=True):
        before.setdefault(dst, []).append(src)
    frontier = sorted(set(accepting.tolist()))
    distance[frontier] = 0
    steps = 0
    while frontier:
        steps += 1
        reached = []
        for state in frontier:
            for previous in before.get(state, ()):
                if distance[previous] == UNREACHABLE:
                    distance[previous] = steps
                    reached.append(previous)
        frontier = reached
    return distance
