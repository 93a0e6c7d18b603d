"""A running batch, start to end: turns GenerationJobs into engine rows, prefills
them as worker.scheduler decides, runs the decode loop one step at a time,
publishes every step's events, drops cancelled requests and hands back each
request's outcome as soon as its last row is done. Knows the event protocol, not RQ.

Two ways to drive it: `run()` (micro-batching: every job prefilled at once,
decoded to the end) or `admit()` + `step()` in a loop (continuous batching:
newcomers join between decode steps; see worker.rq_worker).

Easy to get wrong: a step's events are published as soon as its tokens are chosen,
before the model runs on them; cancellations found by that publish apply after
the forward."""

from __future__ import annotations

import json
import logging
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from shared import constraints
from shared.events import DoneEvent, ErrorEvent, FinishReason, TokenEvent, Usage
from shared.payload import GenerationJob
from worker.engine.adapters import AdapterError, AdaptersBusy, UnknownAdapter
from worker.engine.engine import Engine
from worker.engine.grammar import ConstraintError
from worker.engine.prompts import ImagesNotAccepted, PromptError
from worker.engine.rows import Constraint, GenerationParams, RowOutput, RowRequest
from worker.engine.vision import ImageFeatures, VisionPrompt
from worker.images import ImageStore, ImageUnavailable
from worker.publisher import Event, EventPublisher
from worker.scheduler import Load, Scheduler, WaitingRow
from worker.stats import StatsRecorder

log = logging.getLogger(__name__)


@dataclass
class RequestOutcome:
    """What became of one request: its rows' texts, or the error that ended it."""

    job: GenerationJob
    texts: list[list[str]] = field(default_factory=list)
    token_events: list[int] = field(default_factory=list)
    finish_reasons: list[FinishReason | None] = field(default_factory=list)
    usage: list[Usage | None] = field(default_factory=list)
    error: ErrorEvent | None = None

    @property
    def request_id(self) -> str:
        return self.job.request_id

    @property
    def finished(self) -> bool:
        return self.error is not None or all(reason is not None for reason in self.finish_reasons)

    def expect_rows(self, count: int) -> None:
        """Make room for `count` rows' texts, event counts, finish reasons and usage."""
        self.texts = [[] for _ in range(count)]
        self.token_events = [0] * count
        self.finish_reasons = [None] * count
        self.usage = [None] * count

    def result(self) -> dict:
        return {
            "text": ["".join(pieces) for pieces in self.texts],
            "finish_reason": self.finish_reasons,
            "usage": [usage.model_dump() if usage else None for usage in self.usage],
        }


def row_params(job: GenerationJob, row: int) -> GenerationParams:
    request = job.request
    return GenerationParams(
        max_new_tokens=request.max_new_tokens,
        min_new_tokens=request.min_new_tokens,
        temperature=request.sampling_temperature,
        top_k=request.sampling_topk,
        top_p=request.sampling_topp,
        repetition_penalty=request.repetition_penalty,
        no_repeat_ngram_size=request.no_repeat_ngram_size,
        seed=(job.seed + row) % (2**63),
    )


def row_constraint(job: GenerationJob) -> Constraint | None:
    """The constraint every row of `job` decodes under: regex_string wins
    over json_schema. Raises ConstraintError for one that cannot be enforced
    (the API has checked already; a job may still come from elsewhere)."""
    request = job.request
    try:
        backend = constraints.resolve_backend(request.constrained_decoding_backend)
        if request.regex_string is not None:
            return Constraint(constraints.REGEX, constraints.normalize_regex(request.regex_string), backend)
        if request.json_schema is not None:
            schema = constraints.normalize_schema(request.json_schema)
            return Constraint(constraints.JSON_SCHEMA, json.dumps(schema, ensure_ascii=False), backend)
    except ValueError as exc:  # UnknownBackend, InvalidRegex
        raise ConstraintError(str(exc)) from None
    return None


class BatchRun:
    def __init__(
        self,
        engine: Engine,
        publisher: EventPublisher,
        jobs: Sequence[GenerationJob] = (),
        on_step: Callable[[], None] = lambda: None,
        images: ImageStore | None = None,
        *,
        max_rows: int | None = None,
        max_prefill_tokens: int | None = None,
        stats: StatsRecorder | None = None,
    ):
        """`jobs` are what `run()` runs; `max_rows` bounds the rows in the
        engine, `max_prefill_tokens` the prompt tokens prefilled per step
        (None = no bound, everything admitted is prefilled at once)."""
        self._engine = engine
        self._publisher = publisher
        self._on_step = on_step
        self._images = images if images is not None else ImageStore(publisher.connection)
        self._jobs = list(jobs)
        self._scheduler = Scheduler(max_rows=max_rows, max_prefill_tokens=max_prefill_tokens)
        self._stats = stats
        self.outcomes: dict[str, RequestOutcome] = {}  # requests not finished yet
        self._waiting: OrderedDict[str, deque[RowRequest]] = OrderedDict()  # not prefilled yet, by request
        self._running: Counter[str] = Counter()  # rows in the engine, by request
        self._finished: list[RequestOutcome] = []
        self._cancelled: set[str] = set()  # found cancelled by a publish, not cancelled yet
        self.steps = 0
        self.peak_rows = 0

    # -- micro-batching ---------------------------------------------------------

    def run(self) -> dict[str, RequestOutcome]:
        """Run the jobs given at construction to the end; every request's outcome."""
        results: dict[str, RequestOutcome] = {}
        for outcome in self.admit(self._jobs):
            results[outcome.request_id] = outcome
        while self.has_work:
            for outcome in self.step():
                results[outcome.request_id] = outcome
        return {job.request_id: results[job.request_id] for job in self._jobs if job.request_id in results}

    # -- continuous batching -------------------------------------------------

    @property
    def has_work(self) -> bool:
        return bool(self._waiting) or self._engine.has_work

    @property
    def running_rows(self) -> int:
        """Rows in the engine."""
        return self._engine.num_rows

    @property
    def rows_leaving(self) -> int:
        """Running rows that surely end in the next step (by max_new_tokens)
        and whose slots rows joining in that step's forward can take; 0 where
        the engine prefills newcomers separately."""
        return self._engine.rows_ending_by_length if self._engine.can_join([]) else 0

    @property
    def waiting_rows(self) -> int:
        """Rows admitted but not prefilled yet."""
        return sum(len(rows) for rows in self._waiting.values())

    @property
    def waiting_requests(self) -> int:
        return len(self._waiting)

    @property
    def entering_request_waits(self) -> bool:
        """A request whose first rows have been prefilled still has rows
        waiting (a batch request bigger than the free slots, entering as rows leave)."""
        return any(
            len(rows) < len(self.outcomes[request_id].finish_reasons)
            for request_id, rows in self._waiting.items()
        )

    @property
    def load(self) -> Load:
        """What this batch holds, for the scheduler's admission decision."""
        return Load(
            running_rows=self.running_rows,
            rows_leaving=self.rows_leaving,
            waiting_rows=self.waiting_rows,
            waiting_requests=self.waiting_requests,
            entering_request_waits=self.entering_request_waits,
        )

    def admit(self, jobs: Sequence[GenerationJob]) -> list[RequestOutcome]:
        """Prepare `jobs`' rows (prompts, images, constraints compiled) and
        queue them for prefill. Returns the requests that ended at once
        (errors, cancelled while queued); the others end in a later `step`."""
        for job in jobs:
            self.outcomes[job.request_id] = RequestOutcome(job)
        self._prepare_rows(jobs)
        return self._take_finished()

    def step(self) -> list[RequestOutcome]:
        """Prefill what the budget allows (in the decode step's own forward where
        the engine can: Engine.can_join), then one decode step. Returns the
        requests whose last row ended in this step."""
        try:
            joining = self._prefill()
            if self._engine.has_work:
                started = time.perf_counter()
                # the step's events go out as soon as its tokens are chosen,
                # while the model runs on them; cancellations apply after it
                outputs = self._engine.step(joining, before_forward=self._publish)
                self.peak_rows = max(self.peak_rows, self._engine.num_rows)
                self.steps += 1
                if self._stats is not None:
                    tokens = sum(1 for output in outputs if output.token_id is not None)
                    rows = len({output.key for output in outputs})  # a row keeping drafts yields several
                    self._stats.record_step(rows, tokens, time.perf_counter() - started)
                self._cancel_requested()
                self._on_step()
        except Exception as exc:  # the model itself failed: every unfinished request fails
            log.exception("batch failed")
            self._engine.clear()
            self._waiting.clear()
            self._running.clear()
            self._fail_unfinished(f"generation failed: {exc}", "generation_error")
        return self._take_finished()

    def _take_finished(self) -> list[RequestOutcome]:
        finished, self._finished = self._finished, []
        for outcome in finished:
            self.outcomes.pop(outcome.request_id, None)
            self._waiting.pop(outcome.request_id, None)
            self._running.pop(outcome.request_id, None)
        return finished

    def _end(self, outcome: RequestOutcome) -> None:
        if outcome not in self._finished:
            self._finished.append(outcome)

    def _prefill(self) -> list[RowRequest]:
        """Prefill the rows the scheduler picks for this step, or return them when
        the engine takes them in the step's own forward (Engine.can_join)."""
        if not self._waiting:
            return []
        if self._engine.has_work and not self._engine.accepts_rows_mid_batch:
            return []  # caches that cannot merge: newcomers wait for the batch to empty
        picks = self._scheduler.plan_prefill(
            self._waiting_rows(),
            self._running,
            running_rows=self._engine.num_rows,
            rows_leaving=self.rows_leaving,
            adapters_fit=self._engine.adapters_fit,
        )
        joining: list[RowRequest] = []  # prefilled in the step's own forward, unpadded
        separate: list[RowRequest] = []  # prefilled together before it, padded to one width
        for pick in picks:
            (joining if pick.joins_step else separate).append(self._take_waiting(pick.request_id))
        if separate:  # only ever in free slots (worker.scheduler), so never more rows than max_rows
            self._add(separate)
            self.peak_rows = max(self.peak_rows, self._engine.num_rows)
        return self._checked(joining)

    def _waiting_rows(self) -> dict[str, list[WaitingRow]]:
        """The waiting rows as the scheduler sees them, in admission order."""
        joins = self._engine.can_join([])
        return {
            request_id: [self._waiting_row(request_id, row, joins) for row in rows]
            for request_id, rows in self._waiting.items()
        }

    def _waiting_row(self, request_id: str, row: RowRequest, joins: bool) -> WaitingRow:
        tokens = self._engine.tokens_to_prefill(row)  # those the prefix cache does not hold
        return WaitingRow(
            request_id=request_id,
            prompt_tokens=tokens,
            prefill_width=self._engine.prefill_width(tokens),
            joins_step=joins and self._engine.can_join([row]),
            adapter=row.adapter,
        )

    def _take_waiting(self, request_id: str) -> RowRequest:
        """The next waiting row of a request, now counted as running."""
        rows = self._waiting[request_id]
        row = rows.popleft()
        if not rows:
            del self._waiting[request_id]
        self._running[request_id] += 1
        return row

    def _checked(self, rows: list[RowRequest]) -> list[RowRequest]:
        """The rows that pass the engine's checks (Engine.check); a request
        with a row that fails ends with that error, its other rows with it."""
        failed: set[str] = set()
        for row in rows:
            request_id = row.key[0]
            if request_id in failed:
                continue
            try:
                self._engine.check([row])
            except Exception as exc:
                failed.add(request_id)
                self._fail_request(request_id, _refusal(request_id, exc))
        return [row for row in rows if row.key[0] not in failed]

    def _add(self, rows: list[RowRequest]) -> None:
        """Prefill `rows`; when that fails, retry request by request so that
        only the request at fault fails (the running batch is untouched)."""
        try:
            self._engine.add(rows)
            return
        except Exception as exc:
            request_ids = list(dict.fromkeys(row.key[0] for row in rows))
            if len(request_ids) > 1:
                for request_id in request_ids:
                    self._add([row for row in rows if row.key[0] == request_id])
                return
            request_id = request_ids[0]
            self._running[request_id] -= len(rows)
            if isinstance(exc, AdaptersBusy):  # an operator's load took the slot: wait for the next one
                self._waiting.setdefault(request_id, deque()).extendleft(reversed(rows))
                self._waiting.move_to_end(request_id, last=False)
                return
            self._fail_request(request_id, _refusal(request_id, exc))

    def _fail_request(self, request_id: str, error: ErrorEvent) -> None:
        """End one request with `error`: its rows leave the engine and the waiting line."""
        outcome = self.outcomes[request_id]
        self._waiting.pop(request_id, None)
        self._engine.cancel([(request_id, row) for row in range(len(outcome.finish_reasons))])
        outcome.error = error
        self._publisher.publish([(request_id, error)])
        self._end(outcome)

    def _prepare_rows(self, jobs: Sequence[GenerationJob]) -> None:
        """Queue each job's rows for prefill. A job cancelled while it was queued, or
        whose rows cannot be built, ends here; the refusals' events go out together."""
        refused: list[tuple[str, Event]] = []
        # A client may have gone away while its job waited in the queue.
        gone = self._publisher.publish([], watch_cancelled=[job.request_id for job in jobs])
        for job in jobs:
            outcome = self.outcomes[job.request_id]
            if job.request_id in gone:
                self._end_cancelled_in_queue(outcome)
                continue
            try:
                prompts, features, constraint = self._encode(job)
            except Exception as exc:
                outcome.error = _refusal(job.request_id, exc)
                refused.append((job.request_id, outcome.error))
                self._end(outcome)
                continue
            outcome.expect_rows(len(prompts))
            self._waiting[job.request_id] = deque(
                RowRequest(
                    key=(job.request_id, row),
                    prompt_ids=prompt,
                    params=row_params(job, row),
                    constraint=constraint,
                    image_features=features[row],
                    adapter=job.request.lora_id,
                )
                for row, prompt in enumerate(prompts)
            )
        self._publisher.publish(refused)

    def _end_cancelled_in_queue(self, outcome: RequestOutcome) -> None:
        count = len(outcome.job.request.texts)
        outcome.expect_rows(count)
        outcome.finish_reasons = ["cancelled"] * count
        outcome.usage = [Usage(prompt_tokens=0, completion_tokens=0)] * count
        self._end(outcome)

    def _encode(
        self, job: GenerationJob
    ) -> tuple[list[list[int]], list[ImageFeatures | None], Constraint | None]:
        """A job's prompts (token ids), their images' features and its constraint,
        compiled now, before the rows join the batch. Raises what `_refusal` explains."""
        request = job.request
        if request.lora_id is not None and not self._engine.knows_adapter(request.lora_id):
            raise UnknownAdapter(f"unknown lora_id '{request.lora_id}': this worker has no such adapter")
        features: list[ImageFeatures | None] = [None] * len(request.texts)
        if job.image_ids:
            encoded = self._encode_image_prompts(job)
            prompts = [prompt.prompt_ids for prompt in encoded]
            features = [prompt.image_features for prompt in encoded]
        else:
            prompts = [
                self._engine.encode_prompt(
                    text,
                    use_chat_template=request.use_chat_template,
                    prompt_max_tokens=request.prompt_max_tokens,
                    messages=job.template_messages(),
                )
                for text in request.texts
            ]
        self._check_context(prompts, request.max_new_tokens)
        constraint = row_constraint(job)
        if constraint is not None:
            self._engine.prepare_constraint(constraint)
        return prompts, features, constraint

    def _check_context(self, prompts: list[list[int]], max_new_tokens: int) -> None:
        context = self._engine.context_length
        for prompt in prompts:
            if context is not None and len(prompt) + max_new_tokens > context:
                raise PromptError(
                    f"prompt ({len(prompt)} tokens) + max_new_tokens ({max_new_tokens}) "
                    f"exceeds the model's context of {context} tokens; "
                    "shorten the prompt, lower max_new_tokens or set prompt_max_tokens"
                )

    def _encode_image_prompts(self, job: GenerationJob) -> list[VisionPrompt]:
        """The rows of a job with images: its images read once, encoded once for all its prompts."""
        request = job.request
        images = self._images.load(job.image_ids)
        return self._engine.encode_image_prompts(
            request.texts,
            images,
            use_chat_template=request.use_chat_template,
            prompt_max_tokens=request.prompt_max_tokens,
            messages=job.template_messages(),
            images_key=tuple(job.image_ids),
        )

    def _deliver(self, outputs: list[RowOutput]) -> None:
        self._publish(outputs)
        self._cancel_requested()

    def _cancel_requested(self) -> None:
        """Cancel the requests whose cancel key the last publish found set."""
        cancelled, self._cancelled = self._cancelled, set()
        if cancelled:
            self._cancel(cancelled)

    def _publish(self, outputs: list[RowOutput]) -> None:
        """Record `outputs` in their requests' outcomes and publish their events;
        requests found cancelled meanwhile are noted for `_cancel_requested`."""
        batch: list[tuple[str, Event]] = []
        for output in outputs:
            request_id, row = output.key
            outcome = self.outcomes[request_id]
            if output.text:
                outcome.texts[row].append(output.text)
                batch.append(
                    (request_id, TokenEvent(row=row, seq=outcome.token_events[row], text=output.text))
                )
                outcome.token_events[row] += 1
            if output.finish_reason is not None:
                usage = Usage(
                    prompt_tokens=output.prompt_tokens,
                    completion_tokens=output.completion_tokens,
                    cached_prompt_tokens=output.cached_prompt_tokens,
                    accepted_draft_tokens=output.accepted_draft_tokens,
                )
                outcome.finish_reasons[row] = output.finish_reason
                outcome.usage[row] = usage
                batch.append(
                    (
                        request_id,
                        DoneEvent(
                            row=row,
                            finish_reason=output.finish_reason,
                            usage=usage,
                            token_events=outcome.token_events[row],
                            closed_early=output.closed_early,
                        ),
                    )
                )
                self._running[request_id] -= 1
                if outcome.finished:
                    self._end(outcome)
        running = [request_id for request_id, outcome in self.outcomes.items() if not outcome.finished]
        self._cancelled |= self._publisher.publish(batch, watch_cancelled=running)

    def _cancel(self, request_ids: set[str]) -> None:
        keys = [
            (request_id, row)
            for request_id in request_ids
            for row, reason in enumerate(self.outcomes[request_id].finish_reasons)
            if reason is None
        ]
        log.info("cancelling %d row(s) of %d request(s)", len(keys), len(request_ids))
        never_started = [
            RowOutput(row.key, None, "", "cancelled", len(row.prompt_ids), 0)
            for request_id in request_ids
            for row in self._waiting.pop(request_id, ())
        ]
        self._deliver([*self._engine.cancel(keys), *never_started])

    def _fail_unfinished(self, message: str, error_type: str) -> None:
        pending: list[tuple[str, Event]] = []
        for outcome in self.outcomes.values():
            if not outcome.finished:
                outcome.error = ErrorEvent(error=message, error_type=error_type, status=500)
                pending.append((outcome.request_id, outcome.error))
                self._end(outcome)
        try:
            self._publisher.publish(pending)
        except Exception:  # Redis may be what failed; the jobs still fail through RQ
            log.exception("could not publish error events")


def _refusal(request_id: str, exc: Exception) -> ErrorEvent:
    """The error event that ends a request whose rows could not be prepared or prefilled."""
    if isinstance(exc, ImagesNotAccepted):
        return ErrorEvent(error=str(exc), error_type="model_does_not_accept_images", status=400)
    if isinstance(exc, PromptError):
        return ErrorEvent(error=str(exc), error_type="invalid_prompt", status=422)
    if isinstance(exc, ImageUnavailable):
        return ErrorEvent(error=str(exc), error_type="image_unavailable", status=500)
    if isinstance(exc, ConstraintError):
        return ErrorEvent(error=str(exc), error_type="invalid_constraint", status=exc.status)
    if isinstance(exc, AdapterError):
        return ErrorEvent(error=str(exc), error_type=exc.error_type, status=exc.status)
    # e.g. the vision tower or the model failed on this request: only this request fails
    log.error("request %s failed", request_id, exc_info=exc)
    return ErrorEvent(error=f"generation failed: {exc}", error_type="generation_error", status=500)
