"""One micro-batch, start to end: turns GenerationJobs into engine rows, runs
the decode loop, publishes every step's events, drops cancelled requests, and
hands back each request's outcome. Knows the event protocol, not RQ."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from shared import constraints
from shared.events import DoneEvent, ErrorEvent, FinishReason, TokenEvent, Usage
from shared.payload import GenerationJob
from worker.engine.engine import Engine, ImagesNotAccepted, PromptError
from worker.engine.grammar import ConstraintError
from worker.engine.rows import Constraint, GenerationParams, RowOutput, RowRequest
from worker.engine.vision import ImageFeatures, VisionPrompt
from worker.images import ImageStore, ImageUnavailable
from worker.publisher import Event, EventPublisher

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
        jobs: list[GenerationJob],
        on_step: Callable[[], None] = lambda: None,
        images: ImageStore | None = None,
    ):
        self._engine = engine
        self._publisher = publisher
        self._on_step = on_step
        self._images = images if images is not None else ImageStore(publisher.connection)
        self.outcomes = {job.request_id: RequestOutcome(job) for job in jobs}
        self.steps = 0
        self.peak_rows = 0

    def run(self) -> dict[str, RequestOutcome]:
        rows = self._prepare_rows()
        try:
            if rows:
                self._engine.add(rows)
                self.peak_rows = self._engine.num_rows
            while self._engine.has_work:
                outputs = self._engine.step()
                self.steps += 1
                self._deliver(outputs)
                self._on_step()
        except Exception as exc:  # the model itself failed: every unfinished request fails
            log.exception("batch failed")
            self._fail_unfinished(f"generation failed: {exc}", "generation_error")
        return self.outcomes

    def _prepare_rows(self) -> list[RowRequest]:
        rows: list[RowRequest] = []
        pending: list[tuple[str, Event]] = []
        context = self._engine.context_length
        # A client may have gone away while its job waited in the queue.
        gone = self._publisher.publish([], watch_cancelled=list(self.outcomes))
        for outcome in self.outcomes.values():
            job = outcome.job
            request = job.request
            if job.request_id in gone:
                count = len(request.texts)
                outcome.texts = [[] for _ in range(count)]
                outcome.token_events = [0] * count
                outcome.finish_reasons = ["cancelled"] * count
                outcome.usage = [Usage(prompt_tokens=0, completion_tokens=0)] * count
                continue
            features: list[ImageFeatures | None] = [None] * len(request.texts)
            try:
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
                        )
                        for text in request.texts
                    ]
                for prompt in prompts:
                    if context is not None and len(prompt) + request.max_new_tokens > context:
                        raise PromptError(
                            f"prompt ({len(prompt)} tokens) + max_new_tokens ({request.max_new_tokens}) "
                            f"exceeds the model's context of {context} tokens; "
                            "shorten the prompt, lower max_new_tokens or set prompt_max_tokens"
                        )
            except ImagesNotAccepted as exc:
                outcome.error = ErrorEvent(
                    error=str(exc), error_type="model_does_not_accept_images", status=400
                )
                pending.append((job.request_id, outcome.error))
                continue
            except PromptError as exc:
                outcome.error = ErrorEvent(error=str(exc), error_type="invalid_prompt", status=422)
                pending.append((job.request_id, outcome.error))
                continue
            except ImageUnavailable as exc:
                outcome.error = ErrorEvent(error=str(exc), error_type="image_unavailable", status=500)
                pending.append((job.request_id, outcome.error))
                continue
            except Exception as exc:  # e.g. the vision tower failed: only this request fails
                log.exception("request %s: its prompts could not be prepared", job.request_id)
                outcome.error = ErrorEvent(
                    error=f"generation failed: {exc}", error_type="generation_error", status=500
                )
                pending.append((job.request_id, outcome.error))
                continue
            try:
                constraint = row_constraint(job)
                if constraint is not None:  # compiled now, before the rows join the batch
                    self._engine.prepare_constraint(constraint)
            except ConstraintError as exc:
                outcome.error = ErrorEvent(error=str(exc), error_type="invalid_constraint", status=exc.status)
                pending.append((job.request_id, outcome.error))
                continue
            count = len(prompts)
            outcome.texts = [[] for _ in range(count)]
            outcome.token_events = [0] * count
            outcome.finish_reasons = [None] * count
            outcome.usage = [None] * count
            rows.extend(
                RowRequest(
                    key=(job.request_id, row),
                    prompt_ids=prompt,
                    params=row_params(job, row),
                    constraint=constraint,
                    image_features=features[row],
                )
                for row, prompt in enumerate(prompts)
            )
        self._publisher.publish(pending)
        return rows

    def _encode_image_prompts(self, job: GenerationJob) -> list[VisionPrompt]:
        """The rows of a job with images: its images read once, encoded once for all its prompts."""
        request = job.request
        images = self._images.load(job.image_ids)
        return self._engine.encode_image_prompts(
            request.texts,
            images,
            use_chat_template=request.use_chat_template,
            prompt_max_tokens=request.prompt_max_tokens,
        )

    def _deliver(self, outputs: list[RowOutput]) -> None:
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
                usage = Usage(prompt_tokens=output.prompt_tokens, completion_tokens=output.completion_tokens)
                outcome.finish_reasons[row] = output.finish_reason
                outcome.usage[row] = usage
                batch.append(
                    (request_id, DoneEvent(row=row, finish_reason=output.finish_reason, usage=usage))
                )
        running = [request_id for request_id, outcome in self.outcomes.items() if not outcome.finished]
        cancelled = self._publisher.publish(batch, watch_cancelled=running)
        if cancelled:
            self._cancel(cancelled)

    def _cancel(self, request_ids: set[str]) -> None:
        keys = [
            (request_id, row)
            for request_id in request_ids
            for row, reason in enumerate(self.outcomes[request_id].finish_reasons)
            if reason is None
        ]
        log.info("cancelling %d row(s) of %d request(s)", len(keys), len(request_ids))
        self._deliver(self._engine.cancel(keys))

    def _fail_unfinished(self, message: str, error_type: str) -> None:
        pending: list[tuple[str, Event]] = []
        for outcome in self.outcomes.values():
            if not outcome.finished:
                outcome.error = ErrorEvent(error=message, error_type=error_type, status=500)
                pending.append((outcome.request_id, outcome.error))
        try:
            self._publisher.publish(pending)
        except Exception:  # Redis may be what failed; the jobs still fail through RQ
            log.exception("could not publish error events")
