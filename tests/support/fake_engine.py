"""A scripted stand-in for worker.engine.engine.Engine: each row emits
"w<n> " per step until max_new_tokens; prompts are whitespace-split words.
Rows may be added while others run (as the real engine's Batch.concatenate
allows); `add_log` records (step, keys) of every add. LoRA adapters: rows may
name one of `adapters`, and at most `adapter_slots` distinct adapters run at once.
With `joins_in_step`, rows without adapters join a running batch in `step`'s
own forward (as the real engine's joint forward does); `join_log` records
(step, keys) of those. `step` hands its outputs to `before_forward` first,
then calls `on_forward` where the real engine would run the model."""

from __future__ import annotations

from worker.engine.adapters import AdaptersBusy, UnknownAdapter
from worker.engine.prompts import PromptError
from worker.engine.rows import RowOutput, RowRequest


class FakeEngine:
    def __init__(
        self,
        context_length: int | None = 64,
        fail_at_step: int | None = None,
        adapters: frozenset[str] = frozenset(),
        adapter_slots: int = 4,
        joins_in_step: bool = False,
        tokens_per_step: int = 1,
    ):
        self.context_length = context_length
        self.adapters = adapters
        self.adapter_slots = adapter_slots
        self.fail_at_step = fail_at_step
        self.tokens_per_step = tokens_per_step  # > 1: as rows keeping drafted tokens yield
        self.rows: dict = {}
        self.added: list[list[RowRequest]] = []
        self.steps = 0
        self.add_log: list[tuple[int, list]] = []
        self.accepts_rows_mid_batch = True
        self.joins_in_step = joins_in_step
        self.join_log: list[tuple[int, list]] = []
        self.peak_rows = 0  # most rows held between steps (joined rows included)
        self.on_forward = lambda: None  # called where the real engine's step runs the model

    def encode_prompt(
        self, text: str, *, use_chat_template: bool = False, prompt_max_tokens=None, messages=None
    ) -> list[int]:
        if text == "":
            raise PromptError("empty prompt")
        ids = [len(word) for word in text.split()]
        return ids[-prompt_max_tokens:] if prompt_max_tokens else ids

    def prefill_width(self, prompt_length: int) -> int:
        return prompt_length

    def tokens_to_prefill(self, row: RowRequest) -> int:
        return len(row.prompt_ids)  # no prefix cache

    def knows_adapter(self, lora_id: str) -> bool:
        return lora_id in self.adapters

    def adapters_fit(self, wanted) -> bool:
        running = {row.adapter for row, _ in self.rows.values() if row.adapter is not None}
        return len(running | set(wanted)) <= self.adapter_slots

    def can_join(self, rows: list[RowRequest]) -> bool:
        return self.joins_in_step and bool(self.rows) and all(row.adapter is None for row in rows)

    def step(self, joining: list[RowRequest] = (), before_forward=None) -> list[RowOutput]:
        if joining:
            assert self.can_join(joining)
            self.check(joining)
        self.steps += 1
        if self.fail_at_step == self.steps:
            raise RuntimeError("boom")
        outputs = []
        for key, state in list(self.rows.items()):
            row, produced = state
            for _ in range(self.tokens_per_step):
                produced += 1
                state[1] = produced
                done = produced >= row.params.max_new_tokens
                reason = "length" if done else None
                text = f"w{produced} "
                outputs.append(RowOutput(key, produced, text, reason, len(row.prompt_ids), produced))
                if done:
                    del self.rows[key]
                    break
        if before_forward is not None:
            before_forward(outputs)
        self.on_forward()
        if joining:
            self.join_log.append((self.steps, [row.key for row in joining]))
            for row in joining:
                self.rows[row.key] = [row, 0]
        self.peak_rows = max(self.peak_rows, len(self.rows))
        return outputs

    def check(self, rows: list[RowRequest]) -> None:
        for row in rows:
            if row.adapter is not None and not self.knows_adapter(row.adapter):
                raise UnknownAdapter(f"unknown lora_id '{row.adapter}'")
            if row.key in self.rows:
                raise ValueError(f"row key {row.key!r} is already in the batch")

    def add(self, rows: list[RowRequest]) -> None:
        self.check(rows)
        if not self.adapters_fit({row.adapter for row in rows if row.adapter is not None}):
            raise AdaptersBusy("every adapter slot is busy")
        self.added.append(rows)
        self.add_log.append((self.steps, [row.key for row in rows]))
        for row in rows:
            self.rows[row.key] = [row, 0]
        self.peak_rows = max(self.peak_rows, len(self.rows))

    @property
    def rows_ending_by_length(self) -> int:
        return sum(produced + 1 >= row.params.max_new_tokens for row, produced in self.rows.values())

    @property
    def num_rows(self) -> int:
        return len(self.rows)

    @property
    def has_work(self) -> bool:
        return bool(self.rows)

    def clear(self) -> None:
        self.rows.clear()

    def cancel(self, keys) -> list[RowOutput]:
        outputs = []
        for key in keys:
            if key not in self.rows:
                continue
            row, produced = self.rows.pop(key)
            outputs.append(RowOutput(key, None, "", "cancelled", len(row.prompt_ids), produced))
        return outputs
