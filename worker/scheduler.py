"""Who joins the running batch, and which waiting rows are prefilled in a step.

Decisions from numbers only (rows running and ending, free slots, prompt lengths, the
prefill budget): BatchWorker asks whether to pop another job, BatchRun which waiting
rows to prefill, and each applies the answer. Knows neither RQ, Redis nor the engine.

Easy to get wrong: a slot counts as free in the step its row surely ends (by
max_new_tokens) only for a row that joins inside that step's forward; a row prefilled
before the step needs a slot that is free already."""

from __future__ import annotations

from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from shared import defaults


@dataclass(frozen=True)
class Load:
    """What a running batch holds, as the admission decision sees it."""

    running_rows: int  # rows in the engine
    rows_leaving: int  # running rows that surely end in the next step, for rows joining in it
    waiting_rows: int  # rows admitted but not prefilled yet
    waiting_requests: int  # requests with rows waiting
    entering_request_waits: bool  # a request with rows running still has rows waiting


@dataclass(frozen=True)
class WaitingRow:
    """One admitted row not prefilled yet, as the prefill plan sees it."""

    request_id: str
    prompt_tokens: int
    prefill_width: int  # its tokens in a prefill shared with other prompts, left padding included
    joins_step: bool  # whether it can be prefilled inside the decode step's own forward
    adapter: str | None = None


@dataclass(frozen=True)
class Scheduler:
    """The batching policy of one worker: `max_rows` row slots (None = no bound), at
    most `max_prefill_tokens` prompt tokens prefilled per step (None = no bound), and
    `batching` "continuous" (jobs join the running batch between decode steps) or
    "micro" (the jobs collected at the start run to the end together)."""

    max_rows: int | None = None
    max_prefill_tokens: int | None = None
    batching: str = defaults.DEFAULT_BATCHING

    def __post_init__(self) -> None:
        if self.batching not in defaults.BATCHING_MODES:
            raise ValueError(f"batching must be one of {defaults.BATCHING_MODES}, not {self.batching!r}")

    @property
    def admits_mid_run(self) -> bool:
        """Whether jobs join a running batch (continuous) or wait for the next one (micro)."""
        return self.batching == "continuous"

    # -- collecting a batch's first jobs --------------------------------------

    def is_full(self, rows: int) -> bool:
        """Whether a batch being collected with `rows` rows takes no more jobs."""
        return self.max_rows is not None and rows >= self.max_rows

    def overflows(self, rows: int, job_rows: int) -> bool:
        """Whether a job of `job_rows` rows would take the batch past its slots
        (it then goes back to the front of its queue)."""
        return self.max_rows is not None and rows + job_rows > self.max_rows

    # -- admission into a running batch -------------------------------------

    def room_for_another_job(self, load: Load) -> bool:
        """Whether to pop another job while a batch runs. Admission is FIFO by queue
        order: a job is popped when a row slot is free that no admitted row waits for;
        besides, while a batch request's rows are still entering, one more job may be
        popped so that single requests take turns with it."""
        if self.max_rows is None:
            return True
        running = load.running_rows - load.rows_leaving
        if running + load.waiting_rows < self.max_rows:
            return True
        return running < self.max_rows and load.waiting_requests == 1 and load.entering_request_waits

    # -- prefill --------------------------------------------------------------

    def plan_prefill(
        self,
        waiting: Mapping[str, Sequence[WaitingRow]],
        running: Mapping[str, int],
        *,
        running_rows: int,
        rows_leaving: int,
        adapters_fit: Callable[[set[str]], bool],
    ) -> list[WaitingRow]:
        """The waiting rows to prefill in this step, in order; each is the next row of
        its request. `waiting` holds each request's rows in admission order (requests
        too), `running` each request's rows in the engine, `adapters_fit` whether rows
        with these LoRA adapters find adapter slots now.

        While a slot is free, the request with the fewest rows running goes first
        (ties: admission order), so a batch request takes turns with single ones. The
        budget counts a row joining the step's forward by its prompt's length and rows
        prefilled together before the step by their shared padded width; the first row
        always goes, so a prompt longer than the budget runs alone in its step. A row
        whose adapter finds no slot is passed over; when it belongs to the oldest
        waiting request, no other adapter row goes until a slot frees (base-model rows
        still do), so a stream of requests for the loaded adapters cannot starve it."""
        queues = OrderedDict((request_id, deque(rows)) for request_id, rows in waiting.items())
        running = Counter(running)
        free = self.max_rows - running_rows if self.max_rows is not None else None
        slots = _Slots(free=free, ending=rows_leaving if free is not None else 0)
        cost = _PrefillCost()
        chosen: list[WaitingRow] = []
        adapters: set[str] = set()
        blocked: set[str] = set()  # requests whose next row cannot go this step
        oldest_waits = False
        while slots.left:
            order = [request_id for request_id in queues if request_id not in blocked]
            if not order:
                break
            request_id = min(order, key=lambda r: running[r])  # ties: admission order
            row = queues[request_id][0]
            if not slots.fit(row):
                blocked.add(request_id)
                continue
            if row.adapter is not None and (oldest_waits or not adapters_fit(adapters | {row.adapter})):
                # The oldest request waiting for an adapter slot: no other adapter
                # row goes (it would keep a slot busy); base-model rows still do.
                oldest_waits = oldest_waits or request_id == next(iter(queues))
                blocked.add(request_id)
                continue
            if (
                chosen
                and self.max_prefill_tokens is not None
                and cost.with_row(row) > self.max_prefill_tokens
            ):
                break
            if row.adapter is not None:
                adapters.add(row.adapter)
            queues[request_id].popleft()
            if not queues[request_id]:
                del queues[request_id]
            running[request_id] += 1
            chosen.append(row)
            cost.add(row)
            slots.take()
        return chosen


@dataclass
class _Slots:
    """The row slots left in a step: `free` ones (None = no bound), and `ending` ones,
    of rows that surely end in the step, which only rows joining its forward can take."""

    free: int | None
    ending: int

    @property
    def left(self) -> bool:
        return self.free is None or self.free > 0 or self.ending > 0

    def fit(self, row: WaitingRow) -> bool:
        return self.free is None or self.free > 0 or row.joins_step

    def take(self) -> None:
        """One slot taken: a free one while there is one, else an ending row's."""
        if self.free is not None and self.free > 0:
            self.free -= 1
        elif self.free is not None:
            self.ending -= 1


@dataclass
class _PrefillCost:
    """The prompt tokens a step prefills: rows joining its forward by their own
    lengths, rows prefilled together before it by their shared (widest) padded width."""

    joining_tokens: int = 0
    separate_rows: int = 0
    width: int = 0

    def _width_with(self, row: WaitingRow) -> int:
        return self.width if row.joins_step else max(self.width, row.prefill_width)

    def with_row(self, row: WaitingRow) -> int:
        """The cost once `row` is added too."""
        width = self._width_with(row)
        added = row.prompt_tokens if row.joins_step else width
        return self.joining_tokens + width * self.separate_rows + added

    def add(self, row: WaitingRow) -> None:
        self.width = self._width_with(row)
        if row.joins_step:
            self.joining_tokens += row.prompt_tokens
        else:
            self.separate_rows += 1
