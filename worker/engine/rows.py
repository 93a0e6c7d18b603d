"""What goes into the engine (one RowRequest per prompt) and what comes out
(RowOutput per row per step)."""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from shared.constraints import DEFAULT_BACKEND
from shared.events import FinishReason

if TYPE_CHECKING:
    from worker.engine.vision import ImageFeatures


@dataclass(frozen=True)
class GenerationParams:
    """Per-row decoding parameters (already validated by shared.payload)."""

    max_new_tokens: int = 128
    min_new_tokens: int = 0
    temperature: float = 1.0
    top_k: int = 1  # 1 = greedy, 0 = no top-k cut
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    seed: int | None = (
        None  # same seed + same prompt + same params = same tokens, whatever else is in the batch
    )

    @property
    def greedy(self) -> bool:
        return self.top_k == 1 or self.temperature == 0.0


@dataclass(frozen=True)
class Constraint:
    """What a constrained row's output must match: a regex (full match) or a
    JSON Schema (as JSON text, so the constraint is hashable), enforced by
    one of shared.constraints.BACKENDS."""

    kind: Literal["regex", "json_schema"]
    value: str
    backend: str = DEFAULT_BACKEND


@dataclass(frozen=True)
class RowRequest:
    key: Hashable  # the caller's id for this row, echoed back in every RowOutput
    prompt_ids: list[int]
    params: GenerationParams
    constraint: Constraint | None = None
    image_features: ImageFeatures | None = None  # the row's images, encoded (vision-language models)
    adapter: str | None = None  # the LoRA adapter the row runs with (None = the base model)


@dataclass(frozen=True)
class RowOutput:
    """What one decode step produced for one row.

    `text` is the newly decodable text (may be "" while a multi-byte character
    is incomplete); the concatenation of a row's texts equals the decoded
    completion. `finish_reason` is set on the row's last output.
    """

    key: Hashable
    token_id: int | None
    text: str
    finish_reason: FinishReason | None
    prompt_tokens: int
    completion_tokens: int
    cached_prompt_tokens: int = 0  # prompt tokens read from the prefix cache, not computed
    accepted_draft_tokens: int = 0  # the row's tokens so far that came as drafts the model kept
    closed_early: bool = False  # the token budget narrowed the row's constrained answer to finish in time
