"""The decode loop over one causal language model.

`Engine.add` prefills rows (merging them into the running batch), `step` samples
one token for every row, reports it, drops finished rows and runs the model on the
new tokens of the others, `cancel` drops rows at once. Rows may join inside a step's
own forward (worker.engine.joint) and carry images (worker.engine.vision), a LoRA
adapter (worker.engine.adapters) or a constraint (worker.engine.grammar). The engine
knows nothing of Redis, RQ or HTTP; worker.batch_run drives it.

Easy to get wrong: greedy rows equal `model.generate(do_sample=False)` on the same
prompt alone token for token in float32. In bfloat16, a row's tokens equal its solo
run's only in the batch-invariant mode (worker.engine.invariance, the default), whose
solo runs round a little otherwise than `generate`'s; without it the padding of a batch
changes rounding enough that a row can drift from its solo run after a while."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from typing import Any

import torch
from PIL import Image
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from shared import constraints, defaults
from shared.events import FinishReason
from worker.engine import attention
from worker.engine.adapters import LoraAdapters, UnknownAdapter
from worker.engine.attention import AlignedKeys, plan_windows
from worker.engine.batch import Batch, Row, padded_width
from worker.engine.grammar import (
    ConstraintError,
    Grammar,
    GrammarCompiler,
    compiler_for,
    grammar_mask,
    merge_bans,
)
from worker.engine.invariance import Coverage, other_limits, pad_single_rows, unpadded
from worker.engine.joint import JointForward
from worker.engine.kv_cache import RecordingCache, growing_cache, holds_prefixes, takes_back_tokens
from worker.engine.models.model_facts import forward_arguments, logit_columns
from worker.engine.prefill import cached_blocks_allowed, chunks
from worker.engine.prefix_cache import LayerStates, PrefixCache, block_keys
from worker.engine.prompts import ImagesNotAccepted, PromptError, image_prompts, text_prompt_ids
from worker.engine.rows import Constraint, RowOutput, RowRequest
from worker.engine.speculation.draft_model import DraftModel
from worker.engine.speculation.drafting import Drafting
from worker.engine.stopping import banned_tokens
from worker.engine.vision import VisionPrompt, VisionPrompter

log = logging.getLogger(__name__)


class Engine:
    """A batched decode loop over one causal language model (or the language
    model of a vision-language model)."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        device: torch.device | str = "cpu",
        *,
        eos_token_ids: Iterable[int] | None = None,
        processor: Any = None,
        adapters: LoraAdapters | None = None,
        prefill_width_multiple: int = 1,
        joint_prefill: bool = True,
        batch_invariant: bool = True,
        prefix_cache_bytes: int = 0,
        prefix_block_tokens: int = defaults.PREFIX_CACHE_BLOCK_TOKENS,
        close_in_time: bool = True,
        speculative: str = "off",
        draft_tokens: int = defaults.DEFAULT_DRAFT_TOKENS,
        draft_model: DraftModel | None = None,
    ):
        """`eos_token_ids` overrides the end-of-sequence ids read from the
        model's generation config and the tokenizer. `processor` (the
        model's transformers processor) makes a vision-language model take images.
        `adapters` (over this same model) lets rows name a LoRA adapter.
        `prefill_width_multiple` > 1 left-pads every prefill to a multiple of
        that many tokens (see worker.engine.batch.padded_width). `joint_prefill`
        lets rows join a running batch in its decode step's forward where the
        model allows (see `can_join`). `batch_invariant` makes each row's tokens
        independent of its batch (worker.engine.invariance; `invariance` says
        what it covers for this model). `prefix_cache_bytes` > 0 keeps that many bytes
        of prompt prefixes' keys and values, in blocks of `prefix_block_tokens`
        tokens (worker.engine.prefix_cache); the batch-invariant mode prefills in chunks
        of that many tokens, cache or not (worker.engine.prefill). `close_in_time`
        makes a constrained row whose grammar can tell its shortest completion
        finish its answer within max_new_tokens (worker.engine.grammar.closing);
        such a row whose shortest answer is longer is refused. `speculative` (auto, ngram,
        draft, off) lets rows draft up to `draft_tokens` tokens from their own text or
        with `draft_model`, checked in the next step (worker.engine.speculation); a row's
        tokens stay what they are without it."""
        self.device = torch.device(device)
        model = _on_device(model, self.device)
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.vision = VisionPrompter(self.model, processor, tokenizer) if processor is not None else None
        self.eos_token_ids = (
            frozenset(int(t) for t in eos_token_ids)
            if eos_token_ids is not None
            else _eos_token_ids(model, tokenizer)
        )
        self.vocab_size = logit_columns(model)
        self.pad_token_id = _pad_token_id(tokenizer, self.eos_token_ids)
        self._cache_argument, self._forward_kwargs = forward_arguments(model)
        self.adapters = adapters
        if adapters is not None and adapters.base is not model:
            raise ValueError("the LoRA adapters must be built over the engine's model")
        # Held while the model runs or changes (an operator may load an adapter from another thread).
        self._model_lock = adapters.lock if adapters is not None else contextlib.nullcontext()
        self._batch: Batch | None = None
        self._windowed_attention = attention.install(self.model)
        if not batch_invariant:
            unpadded(self.model)  # another engine over this model may have made it invariant
        self.invariance = self._make_invariant() if batch_invariant else None
        joint = joint_prefill and self._windowed_attention
        self._joint = JointForward.for_model(self.model) if joint else None
        if prefill_width_multiple < 1:
            raise ValueError("prefill_width_multiple must be at least 1")
        self.prefill_width_multiple = prefill_width_multiple
        if prefix_block_tokens < 1:
            raise ValueError("prefix_block_tokens must be at least 1")
        self.prefix_block_tokens = prefix_block_tokens
        self.close_in_time = close_in_time
        self.prefix_cache_off_reason = self._prefix_cache_off_reason(prefix_cache_bytes)
        self.prefix_cache = None
        if self.prefix_cache_off_reason is None:
            self.prefix_cache = PrefixCache(prefix_cache_bytes, prefix_block_tokens)
        self.speculation_off_reason = self._speculation_off_reason(speculative)
        on = self.speculation_off_reason is None
        self.drafting = Drafting(
            speculative if on else "off", draft_tokens, model=draft_model if on else None
        )

    def _speculation_off_reason(self, mode: str) -> str | None:
        if mode == "off":
            return "off"
        if not takes_back_tokens(self.model.config):
            return "this model's cache has layers other than full attention"
        return None

    def _prefix_cache_off_reason(self, max_bytes: int) -> str | None:
        if max_bytes <= 0:
            return "off"
        if self.prefill_width_multiple > 1:
            return "prompts are left-padded (--prefill-width-multiple > 1)"
        if not holds_prefixes(self.model.config):
            return "this model's cache has layers other than full attention and sliding windows"
        return None

    def _make_invariant(self) -> Coverage:
        """Prefill and attention are made invariant by the engine's own calls; the linear
        layers are probed and padded here (not under LoRA adapters, whose wrappers own them)."""
        if self.adapters is not None:
            coverage = Coverage(reasons=["LoRA adapters' products are not made batch invariant"])
        else:
            coverage = pad_single_rows(self.model)
        quantized = [type(m).__name__ for m in self.model.modules() if _is_quantized(m)]
        coverage.reasons.extend(other_limits(self.model, self._windowed_attention, quantized))
        log.info("batch-invariant mode: %s", coverage.describe())
        return coverage

    @property
    def batch_invariant(self) -> bool:
        return self.invariance is not None

    # -- facts about the model ------------------------------------------------

    @property
    def context_length(self) -> int | None:
        """The model's maximum sequence length (prompt + completion), if it has one."""
        config = self.model.config
        if hasattr(config, "get_text_config"):
            config = config.get_text_config()
        value = getattr(config, "max_position_embeddings", None)
        return int(value) if value else None

    def prefill_width(self, prompt_length: int) -> int:
        """Tokens a prompt of this length takes in a prefill, left padding included."""
        return padded_width(prompt_length, self.prefill_width_multiple)

    @property
    def num_rows(self) -> int:
        return len(self._batch) if self._batch is not None else 0

    @property
    def has_work(self) -> bool:
        return self.num_rows > 0

    @property
    def accepts_rows_mid_batch(self) -> bool:
        """Whether `add` can merge rows into the running batch now (False for
        KV caches `Batch.concatenate` cannot pad: layer kinds other than full
        attention and sliding windows, see worker.engine.kv_cache)."""
        return self._batch is None or self._batch.can_concatenate

    @property
    def joint_prefill(self) -> bool:
        """Whether rows of this model can join a running batch inside a step (see `can_join`)."""
        return self._joint is not None and self.prefill_width_multiple == 1 and self.adapters is None

    def can_join(self, rows: Sequence[RowRequest]) -> bool:
        """Whether `step(joining=rows)` prefills these rows in the step's own
        forward (worker.engine.joint): a running batch of a model that has a
        joint forward, rows without images or adapters, prompts not padded."""
        return (
            self.joint_prefill
            and self._batch is not None
            and self._batch.can_concatenate
            and all(self._joinable(row) for row in rows)
        )

    def tokens_to_prefill(self, row: RowRequest, keys: list[bytes] | None = None) -> int:
        """The row's prompt tokens a prefill would compute now (those not in the prefix
        cache); `keys` are the row's block keys, if already computed."""
        keys = self._block_keys(row) if keys is None else keys
        return len(row.prompt_ids) - self._cached_blocks(row, keys) * self.prefix_block_tokens

    @property
    def rows_ending_by_length(self) -> int:
        """Running rows whose next token is their last (max_new_tokens): the
        next `step` ends them whatever it samples, before its forward."""
        if self._batch is None:
            return 0
        return sum(row.stopping.generated + 1 >= row.stopping.max_new_tokens for row in self._batch.rows)

    @property
    def keys(self) -> list[Hashable]:
        """The keys of the running rows, in batch order."""
        return self._batch.keys if self._batch is not None else []

    @property
    def accepts_images(self) -> bool:
        return self.vision is not None

    @property
    def adapters_in_use(self) -> set[str]:
        """The LoRA adapters of the running rows."""
        if self._batch is None:
            return set()
        return {adapter for adapter in self._batch.adapters if adapter is not None}

    def knows_adapter(self, lora_id: str) -> bool:
        return self.adapters is not None and self.adapters.knows(lora_id)

    def adapters_fit(self, wanted: Iterable[str]) -> bool:
        """Whether rows with these adapters can join the running batch now
        (False while every adapter slot is held by running rows)."""
        wanted = set(wanted)
        if not wanted:
            return True
        return self.adapters is not None and self.adapters.fits(wanted, self.adapters_in_use)

    def load_adapter(self, lora_id: str) -> float:
        """Load an adapter now (safe from another thread: waits for the running
        step); its load time in seconds, 0 when it was loaded already."""
        if self.adapters is None:
            raise UnknownAdapter("this worker serves no LoRA adapters (start it with --lora-dir or --lora)")
        with self._model_lock:
            return self.adapters.load(lora_id, self.adapters_in_use)

    @property
    def has_chat_template(self) -> bool:
        if self.vision is not None:
            return bool(self.vision.chat_template)
        return bool(getattr(self.tokenizer, "chat_template", None))

    # -- prompts ------------------------------------------------------------

    def encode_prompt(
        self,
        text: str,
        *,
        use_chat_template: bool = False,
        prompt_max_tokens: int | None = None,
        messages: Sequence[Mapping[str, Any]] | None = None,
    ) -> list[int]:
        """Token ids for `text` (see worker.engine.prompts.text_prompt_ids)."""
        return text_prompt_ids(
            self.tokenizer,
            text,
            vision=self.vision,
            use_chat_template=use_chat_template,
            prompt_max_tokens=prompt_max_tokens,
            messages=messages,
        )

    def encode_image_prompts(
        self,
        texts: Sequence[str],
        images: Sequence[Image.Image],
        *,
        use_chat_template: bool = False,
        prompt_max_tokens: int | None = None,
        messages: Sequence[Mapping[str, Any]] | None = None,
        images_key: Hashable | None = None,
    ) -> list[VisionPrompt]:
        """Rows asking about `images`, their images encoded once (see
        worker.engine.prompts.image_prompts); ImagesNotAccepted for a text-only model."""
        return image_prompts(
            self.vision,
            texts,
            images,
            use_chat_template=use_chat_template,
            prompt_max_tokens=prompt_max_tokens,
            messages=messages,
            images_key=images_key,
        )

    def _check(self, request: RowRequest) -> None:
        prompt = request.prompt_ids
        if not prompt:
            raise PromptError(f"row {request.key!r}: the prompt is empty")
        if min(prompt) < 0 or max(prompt) >= self.vocab_size:
            raise PromptError(f"row {request.key!r}: token ids must lie in [0, {self.vocab_size})")
        features = request.image_features
        if self.vision is not None:
            # The model fills image-token positions with image features, in
            # order, across the whole batch: one row's mismatch would fail them all.
            expected = features.tokens if features is not None else 0
            found = self.vision.count_image_tokens(prompt)
            if found != expected:
                raise PromptError(
                    f"row {request.key!r}: the prompt holds {found} image token(s) "
                    f"({self.vision.image_token}) where its images fill {expected}"
                )
        elif features is not None:
            raise ImagesNotAccepted("this worker's model is text-only: it does not accept images")
        if request.adapter is not None and not self.knows_adapter(request.adapter):
            raise UnknownAdapter(f"unknown lora_id '{request.adapter}': this worker has no such adapter")
        max_new = request.params.max_new_tokens
        if max_new < 1:
            raise PromptError(f"row {request.key!r}: max_new_tokens must be at least 1")
        context = self.context_length
        if context is not None and len(prompt) + max_new > context:
            raise PromptError(
                f"prompt ({len(prompt)} tokens) + max_new_tokens ({max_new}) exceeds the model's "
                f"context of {context} tokens"
            )

    # -- constraints ----------------------------------------------------------

    @property
    def grammars(self) -> GrammarCompiler:
        """The grammar compiler (and cache) shared by every engine over this tokenizer."""
        return compiler_for(self.tokenizer, self.eos_token_ids, self.vocab_size)

    def prepare_constraint(self, constraint: Constraint) -> Grammar:
        """Compile `constraint` (or find it in the cache). Call it before `add`
        so that compiling never holds up the rows already decoding. Raises
        grammar.ConstraintError (its message is meant for the client)."""
        return self.grammars.compile(constraint)

    # -- the loop -------------------------------------------------------------

    @torch.inference_mode()
    def add(self, rows: list[RowRequest]) -> None:
        """Prefill `rows` and add them to the running batch. Every row is
        checked first and its adapter loaded; on PromptError or AdapterError
        nothing is added."""
        if not rows:
            return
        with self._model_lock:
            self._add(rows)

    def _add(self, rows: list[RowRequest]) -> None:
        rows = sorted(rows, key=lambda r: -len(r.prompt_ids))  # longest first, see worker.engine.attention
        if self._batch is not None and not self._batch.can_concatenate:
            raise NotImplementedError(
                "this model's KV cache layers cannot take rows into a running batch; "
                "add rows when the engine has no work"
            )
        grammars = self.check(rows)
        wanted = [r.adapter for r in rows if r.adapter is not None]
        if wanted:
            assert self.adapters is not None  # _check refused adapters otherwise
            self.adapters.ensure(wanted, self.adapters_in_use)
        running = [self._batch] if self._batch is not None else []
        self._batch = Batch.concatenate([*running, *self._prefilled(rows, grammars)])

    def _prefilled(self, rows: Sequence[RowRequest], grammars: Sequence[Grammar | None]) -> list[Batch]:
        """`rows` prefilled. Each alone, one after another (each then finds what the
        ones before it left in the prefix cache), when the mode is batch invariant or
        the row may start from a cached prefix; the others together, left-padded. A
        model whose cache cannot merge rows (worker.engine.kv_cache) prefills them all
        together."""
        keys = [self._block_keys(row) for row in rows]
        alone = [i for i in range(len(rows)) if self.batch_invariant or self._may_reuse(keys, i)]
        together = [i for i in range(len(rows)) if i not in alone]
        batches = []
        if together:
            batches.append(
                self._prefill(
                    [rows[i] for i in together], [grammars[i] for i in together], [keys[i] for i in together]
                )
            )
        packed = [i for i in alone if self._packs(rows[i], keys, i)] if self.batch_invariant else []
        if len(packed) > 1:
            batches.extend(
                self._prefill_packed(
                    [rows[i] for i in packed], [grammars[i] for i in packed], [keys[i] for i in packed]
                )
            )
            alone = [i for i in alone if i not in packed]
        for i in alone:
            batch = self._prefill_alone(rows[i], grammars[i], keys[i])
            if not batch.can_concatenate and len(rows) > 1:
                return [self._prefill(rows, grammars)]
            batches.append(batch)
        return batches

    def _packs(self, row: RowRequest, keys: Sequence[list[bytes]], index: int) -> bool:
        """Whether row `index` (`row`, of rows whose block keys are `keys`) may be prefilled
        in one packed forward with other rows (as rows joining a step are,
        worker.engine.joint) in the batch-invariant mode: what it computes fits one chunk.
        Such a row already finds every block the cache may give it (at least one token
        is left to compute, and at most one chunk is), so no other row prefilled before
        it would leave it more: rows sharing a cached system prompt pack together."""
        return self._joinable(row, keys[index])

    def _joinable(self, row: RowRequest, keys: list[bytes] | None = None) -> bool:
        """Whether the joint forward takes this row (see `can_join`), with running rows or
        without: in the batch-invariant mode, what it computes must fit one chunk."""
        return (
            self.joint_prefill
            and row.image_features is None
            and row.adapter is None
            and (not self.batch_invariant or self.tokens_to_prefill(row, keys) <= self.prefix_block_tokens)
        )

    def _prefill_packed(
        self, rows: Sequence[RowRequest], grammars: Sequence[Grammar | None], keys: Sequence[list[bytes]]
    ) -> list[Batch]:
        """`rows` prefilled in one forward, each over its own cache (worker.engine.joint)."""
        assert self._joint is not None
        newcomers = [
            self._joining_batch(row, grammar, row_keys)
            for row, grammar, row_keys in zip(rows, grammars, keys, strict=True)
        ]
        self._joint(None, newcomers)
        for newcomer in newcomers:
            self._store_prefixes(newcomer)
        return newcomers

    def _may_reuse(self, keys: Sequence[list[bytes]], index: int) -> bool:
        """Whether row `index` (of rows whose block keys are `keys`) may start from a
        cached prefix: the cache holds its first block, or another row has that block."""
        if self.prefix_cache is None or not keys[index]:
            return False
        return _shares_first_block(keys, index) or keys[index][0] in self.prefix_cache

    def _prefill(
        self,
        rows: Sequence[RowRequest],
        grammars: Sequence[Grammar | None],
        keys: Sequence[list[bytes]] | None = None,
    ) -> Batch:
        """`rows` prefilled together, left-padded, in one forward (`keys`: their block keys,
        if already computed)."""
        batch = self._new_batch(rows, grammars, keys=keys)
        self._forward(batch, self._image_inputs(rows, batch.input_ids))
        if self.prefix_cache is not None:
            self.prefix_cache.count(0, sum(len(row.prompt_ids) for row in rows))
        self._store_prefixes(batch)
        return batch

    def _prefill_alone(self, row: RowRequest, grammar: Grammar | None, keys: list[bytes]) -> Batch:
        """One row prefilled: from its longest cached prefix on, in the chunks of
        worker.engine.prefill."""
        cached, prefix = self._cached_prefix(row, keys)
        batch = self._new_batch([row], [grammar], prefix=prefix, keys=[keys], cached=cached)
        if self.prefill_width_multiple > 1:  # left-padded, in one forward (and no prefix cache)
            self._forward(batch, self._image_inputs([row], batch.input_ids))
            return batch
        full = batch.input_ids, batch.attention_mask, batch.position_ids
        chunk_tokens = self.prefix_block_tokens if self.batch_invariant else None
        for start, end in chunks(cached, len(row.prompt_ids), chunk_tokens):
            _narrow(batch, full, start, end)
            inputs = (
                self.vision.chunk_inputs(row.image_features, row.prompt_ids, start, end)
                if self.vision is not None
                else {}
            )
            self._forward(batch, inputs)
        self._store_prefixes(batch)
        return batch

    def _joining_batch(
        self, row: RowRequest, grammar: Grammar | None, keys: list[bytes] | None = None
    ) -> Batch:
        """A one-row batch ready to be prefilled in a step's own forward, from its
        cached prefix on (see `can_join`); `keys`: its block keys, if already computed."""
        keys = self._block_keys(row) if keys is None else keys
        cached, prefix = self._cached_prefix(row, keys)
        batch = self._new_batch([row], [grammar], prefix=prefix, keys=[keys], cached=cached)
        full = batch.input_ids, batch.attention_mask, batch.position_ids
        _narrow(batch, full, cached, len(row.prompt_ids))
        return batch

    def _image_inputs(self, rows: Sequence[RowRequest], input_ids: torch.Tensor) -> dict[str, Any]:
        if self.vision is None:
            return {}
        return self.vision.prefill_inputs([r.image_features for r in rows], input_ids)

    # -- the prefix cache ------------------------------------------------------

    def _block_keys(self, row: RowRequest) -> list[bytes]:
        """The prefix-cache keys of the row's full blocks ([] without a cache)."""
        if self.prefix_cache is None:
            return []
        features = row.image_features
        return block_keys(
            row.prompt_ids,
            self.prefix_block_tokens,
            namespace=self.adapters.cache_namespace(row.adapter) if self.adapters is not None else None,
            image_token_id=self.vision.image_token_id if self.vision is not None else None,
            image_ids=_image_ids(features.content_key) if features is not None else None,
        )

    def _cached_blocks(self, row: RowRequest, keys: list[bytes]) -> int:
        """How many blocks the row would take from the prefix cache now."""
        if self.prefix_cache is None or not keys:
            return 0
        available = self.prefix_cache.cached_blocks(keys)
        return cached_blocks_allowed(len(row.prompt_ids), self.prefix_block_tokens, available)

    def _cached_prefix(self, row: RowRequest, keys: list[bytes]) -> tuple[int, list[LayerStates]]:
        """The row's cached prefix: its tokens, and each layer's keys and values over them."""
        cache = self.prefix_cache
        if cache is None:
            return 0, []
        blocks = self._cached_blocks(row, keys)
        hit = cache.lookup(keys, blocks) if blocks else None
        try:
            states = hit.layer_states() if hit is not None else []
        finally:
            cache.release(hit)
        cached = blocks * self.prefix_block_tokens
        cache.count(cached, len(row.prompt_ids) - cached)
        return cached, states

    def _store_prefixes(self, batch: Batch) -> None:
        """Keep the full blocks the batch's prefill computed in the prefix cache."""
        cache = self.prefix_cache
        if cache is None or not isinstance(batch.cache, RecordingCache) or batch.cache.recorded is None:
            return
        states = batch.cache.take_recorded()
        if not states:
            return
        columns = states[0][0].shape[-2]  # the forwards' tokens, left padding included
        size = self.prefix_block_tokens
        for index, row in enumerate(batch.rows):
            keys, row.block_keys = row.block_keys or [], None
            computed = row.prompt_length - row.cached_tokens  # the row's last `computed` columns
            for block in range(row.cached_tokens // size, min(len(keys), row.prompt_length // size)):
                first = columns - computed + block * size - row.cached_tokens
                span = slice(first, first + size)
                cache.store(keys[block], [(k[index, :, span], v[index, :, span]) for k, v in states])

    def check(self, rows: Sequence[RowRequest]) -> list[Grammar | None]:
        """Check that `rows` can join the batch (PromptError, AdapterError,
        ValueError for a key already running) and compile their constraints
        (ConstraintError); their grammars. Changes nothing."""
        for request in rows:
            self._check(request)
        known = set(self.keys)
        for request in rows:
            if request.key in known:
                raise ValueError(f"row key {request.key!r} is already in the batch")
            known.add(request.key)
        grammars = [self.prepare_constraint(r.constraint) if r.constraint is not None else None for r in rows]
        if self.close_in_time:
            for request, grammar in zip(rows, grammars, strict=True):
                self._check_budget(request, grammar)
        return grammars

    @staticmethod
    def _check_budget(request: RowRequest, grammar: Grammar | None) -> None:
        """ConstraintError when no complete answer fits in the row's max_new_tokens."""
        shortest = grammar.shortest_answer() if grammar is not None else None
        if shortest is not None and shortest > request.params.max_new_tokens:
            assert request.constraint is not None
            kind = "regex_string" if request.constraint.kind == constraints.REGEX else "json_schema"
            raise ConstraintError(
                f"max_new_tokens {request.params.max_new_tokens} is too few for this {kind}: "
                f"its shortest complete answer takes {shortest} tokens"
            )

    def _new_batch(
        self,
        rows: Sequence[RowRequest],
        grammars: Sequence[Grammar | None],
        *,
        prefix: Sequence[LayerStates] = (),
        keys: Sequence[list[bytes]] | None = None,
        cached: int = 0,
    ) -> Batch:
        """A batch ready to prefill `rows` (left-padded, on a fresh cache holding
        `prefix`, the keys and values of a single row's first `cached` tokens); `keys`
        are the rows' block keys, if already computed. With a prefix cache, the
        forwards' keys and values are recorded for it."""
        batch = Batch.from_rows(
            rows,
            tokenizer=self.tokenizer,
            eos_token_ids=self.eos_token_ids,
            vocab_size=self.vocab_size,
            pad_token_id=self.pad_token_id,
            device=self.device,
            cache=growing_cache(self.model.config, prefix),
            width_multiple=self.prefill_width_multiple,
            positions=[self.vision.positions(r.prompt_ids, r.image_features) for r in rows]
            if self.vision is not None
            else None,
        )
        if keys is None:
            keys = [self._block_keys(request) for request in rows]
        for row, request, grammar, row_keys in zip(batch.rows, rows, grammars, keys, strict=True):
            budget = row.stopping.max_new_tokens if self.close_in_time else None
            row.grammar = grammar.start(budget) if grammar is not None else None
            row.block_keys = row_keys
            row.drafts = self.drafting.row(request.prompt_ids, images=request.image_features is not None)
        batch.rows[0].cached_tokens = cached
        if self.prefix_cache is not None and isinstance(batch.cache, RecordingCache):
            batch.cache.recorded = {}
        return batch

    @torch.inference_mode()
    def step(
        self,
        joining: Sequence[RowRequest] = (),
        before_forward: Callable[[list[RowOutput]], None] | None = None,
    ) -> list[RowOutput]:
        """One token for every running row, or more for a row that drafted tokens
        the model keeps (one output each, in order; worker.engine.speculation).
        Finished rows report their finish reason and leave the batch; the model
        then runs on the new tokens of the rows still running (and their drafts).
        `joining` rows (only rows `can_join` accepts) are prefilled in that same
        forward and join the batch: their first token comes with the next step.
        They are checked first, as `add` checks, and nothing changes when a
        check fails. `before_forward`, if given, gets the step's outputs (the
        list returned) once its tokens are chosen and before the model runs on
        them: a caller that publishes them there sends every token one forward
        sooner. If it raises, the
        step stops there; the engine is then to be `clear`ed."""
        if self._batch is None:
            if joining:
                raise RuntimeError("rows join a running batch; add them when the engine has no work")
            return []
        if joining and not self.can_join(joining):
            raise ValueError("these rows cannot join in a step (see can_join); add them instead")
        with self._model_lock:
            newcomers = []
            if joining:
                rows = sorted(joining, key=lambda r: -len(r.prompt_ids))
                grammars = self.check(rows)
                pairs = zip(rows, grammars, strict=True)
                newcomers = [self._joining_batch(row, grammar) for row, grammar in pairs]
            return self._step(self._batch, newcomers, before_forward)

    def _step(
        self,
        batch: Batch,
        newcomers: Sequence[Batch] = (),
        before_forward: Callable[[list[RowOutput]], None] | None = None,
    ) -> list[RowOutput]:
        assert batch.logits is not None
        outputs, keep, last_tokens, dropped = self._choose(batch)
        if before_forward is not None:
            before_forward(outputs)

        running: Batch | None = None
        if keep:
            running = batch.filter(keep)
            running.retract([dropped[i] for i in keep])
            drafts = self._drafts(running) if not newcomers else [[] for _ in keep]
            for row, draft in zip(running.rows, drafts, strict=True):
                if row.drafts is not None:
                    row.drafts.fed = draft
            running.feed([[last_tokens[i], *draft] for i, draft in zip(keep, drafts, strict=True)])
        if newcomers:
            assert self._joint is not None
            self._joint(running, newcomers, self._decode_kwargs(running) if running is not None else None)
            for newcomer in newcomers:
                self._store_prefixes(newcomer)
            self._batch = Batch.concatenate([*([running] if running is not None else []), *newcomers])
        elif running is not None:
            self._forward(running, positions=running.input_ids.shape[1])
            self._batch = running
        else:
            self._batch = None
        return outputs

    def _choose(self, batch: Batch) -> tuple[list[RowOutput], list[int], dict[int, int], list[int]]:
        """Each row's tokens from the last forward's logits: one, or, for a row that fed
        drafted tokens, one per position while the token chosen there equals the draft
        fed after it (the same choice, the same random draw, as steps without drafts
        would make, so drafting never changes what a row says). The outputs (in order
        per row), the rows still running, each row's last token, and each row's fed
        tokens to forget (its drafts not kept, and fillers)."""
        assert batch.logits is not None
        logits = batch.logits if batch.logits.ndim == 3 else batch.logits[:, None]
        positions = logits.shape[1]
        fed = [row.drafts.fed if row.drafts is not None else [] for row in batch.rows]
        outputs: list[RowOutput] = []
        last_tokens: dict[int, int] = {}
        kept = [0] * len(batch)
        finished: set[int] = set()
        choosing = list(range(len(batch)))
        for position in range(positions):
            here = [i for i in choosing if position <= len(fed[i])]
            if not here:
                break
            rows = [batch.rows[i] for i in here]
            banned = merge_bans(
                banned_tokens([row.stopping for row in rows], self.vocab_size, self.device),
                grammar_mask([row.grammar for row in rows], self.vocab_size, self.eos_token_ids, self.device),
            )
            tokens = batch.sampler.choose(here, logits[here, position], banned).tolist()
            choosing = []
            for index, row, token in zip(here, rows, tokens, strict=True):
                finish_reason = row.stopping.update(token)
                if row.grammar is not None:
                    finish_reason = _follow_grammar(row, token, finish_reason)
                text = row.detokenizer.push(token)
                if row.drafts is not None:
                    row.drafts.push(token)
                last_tokens[index] = token
                if finish_reason is not None:
                    text += row.detokenizer.flush()
                    finished.add(index)
                elif position < len(fed[index]) and token == fed[index][position]:
                    kept[index] += 1
                    choosing.append(index)
                outputs.append(self._output(row, token, text, finish_reason))
        for index, row in enumerate(batch.rows):
            if row.drafts is not None:
                self.drafting.checked(row.drafts, kept[index])
        keep = [i for i in range(len(batch)) if i not in finished]
        dropped = [row.fed_tokens - 1 - kept[i] for i, row in enumerate(batch.rows)]
        return outputs, keep, last_tokens, dropped

    def _drafts(self, batch: Batch) -> list[list[int]]:
        """Each running row's drafted tokens for the next forward."""
        room = [row.stopping.max_new_tokens - row.completion_tokens - 1 for row in batch.rows]
        return self.drafting.drafts([row.drafts for row in batch.rows], room)

    @torch.inference_mode()
    def cancel(self, keys: Iterable[Hashable]) -> list[RowOutput]:
        """Drop the rows with these keys at once; each reports finish_reason
        "cancelled" (with any text still held back). Unknown keys are ignored."""
        with self._model_lock:
            return self._cancel(set(keys))

    def _cancel(self, wanted: set[Hashable]) -> list[RowOutput]:
        batch = self._batch
        if batch is None:
            return []
        outputs: list[RowOutput] = []
        keep: list[int] = []
        for index, row in enumerate(batch.rows):
            if row.key in wanted:
                outputs.append(self._output(row, None, row.detokenizer.flush(), row.stopping.cancel()))
            else:
                keep.append(index)
        if outputs:
            self._batch = batch.filter(keep) if keep else None
        return outputs

    def clear(self) -> None:
        """Drop every row without a word (after a failed forward left the batch unusable)."""
        self._batch = None

    def _forward(
        self, batch: Batch, prefill_inputs: Mapping[str, Any] | None = None, *, positions: int = 1
    ) -> None:
        """Run the model on the batch's pending tokens: a prefill with `prefill_inputs`
        (images; empty without), a decode step without (None). The logits after the last
        token ([B, V]), or after each of the last `positions` > 1 (a step checking
        drafts: [B, positions, V])."""
        applied = (
            self.adapters.applied(batch.adapters) if self.adapters is not None else contextlib.nullcontext()
        )
        with applied:
            out = self._run_model(batch, prefill_inputs, positions=positions)
        cache = getattr(out, "cache", None)
        batch.cache = cache if cache is not None else out.past_key_values
        batch.logits = out.logits[:, -positions:, :] if positions > 1 else out.logits[:, -1, :]

    def _decode_kwargs(self, batch: Batch) -> dict[str, Any]:
        """What a decode step's attention takes beyond transformers' arguments: the
        rows' lengths for the batch-invariant attention (each row's last fed token
        counted, drafts too), or else the rows' windows (worker.engine.attention), when
        they save anything."""
        if not self._windowed_attention:
            return {}
        fed = batch.input_ids.shape[1]
        if self.batch_invariant:
            return {"aligned_keys": AlignedKeys(tuple(length + fed - 1 for length in batch.lengths))}
        if fed != 1:
            return {}
        windows = plan_windows(batch.lengths, batch.attention_mask.shape[1])
        return {"row_windows": windows} if windows is not None else {}

    def _run_model(self, batch: Batch, prefill_inputs: Mapping[str, Any] | None, positions: int = 1) -> Any:
        kept = {"logits_to_keep": positions} if "logits_to_keep" in self._forward_kwargs else {}
        decode = {} if prefill_inputs is not None else self._decode_kwargs(batch)
        return self.model(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,
            use_cache=True,
            **{self._cache_argument: batch.cache},
            **{**self._forward_kwargs, **kept},
            **(prefill_inputs or {}),
            **decode,
        )

    @staticmethod
    def _output(row: Row, token_id: int | None, text: str, finish_reason: FinishReason | None) -> RowOutput:
        return RowOutput(
            key=row.key,
            token_id=token_id,
            text=text,
            finish_reason=finish_reason,
            prompt_tokens=row.prompt_length,
            completion_tokens=row.completion_tokens,
            cached_prompt_tokens=row.cached_tokens,
            accepted_draft_tokens=row.drafts.kept if row.drafts is not None else 0,
            closed_early=row.grammar is not None and row.grammar.closed_early,
        )


def _shares_first_block(keys: Sequence[list[bytes]], index: int) -> bool:
    """Whether another row of rows whose block keys are `keys` starts with row `index`'s
    first block (so one of them would find it in the prefix cache after the other)."""
    own = keys[index][:1]
    return bool(own) and any(other[:1] == own for i, other in enumerate(keys) if i != index)


def _narrow(batch: Batch, full: tuple[torch.Tensor, ...], start: int, end: int) -> None:
    """Make a one-row batch ready to run its prompt's tokens [start, end) (the cache
    holding those before): `full` are its whole prompt's ids, mask and positions."""
    input_ids, attention_mask, position_ids = full
    batch.input_ids = input_ids[:, start:end]
    batch.attention_mask = attention_mask[:, :end]
    batch.position_ids = position_ids[..., start:end]


def _image_ids(content_key: Hashable | None) -> list[str] | None:
    """The images' content ids from the key that names them (a tuple of ids, or one)."""
    if content_key is None:
        return None
    return [str(part) for part in (content_key if isinstance(content_key, tuple) else (content_key,))]


def _follow_grammar(row: Row, token: int, finish_reason: FinishReason | None) -> FinishReason | None:
    """Advance a constrained row's grammar by its new token. The row stops
    ("stop") once the grammar is complete, or on EOS, which the mask only
    allowed because the grammar accepted; at max_new_tokens it stays "length".
    A row whose budget closed its answer early ends as "length" however it ends."""
    assert row.grammar is not None
    if finish_reason != "eos":
        row.grammar.advance(token)
    if finish_reason == "eos" or row.grammar.complete:
        finish_reason = row.stopping.stop()
    if finish_reason is not None and row.grammar.closed_early:
        return row.stopping.closed_by_budget()
    return finish_reason


def _on_device(model: PreTrainedModel, device: torch.device) -> PreTrainedModel:
    """The model on `device`, unless accelerate placed it already (`hf_device_map`)."""
    if getattr(model, "hf_device_map", None) is None and model.device != device:
        return model.to(device)
    return model


def _is_quantized(module: torch.nn.Module) -> bool:
    """A layer of --quantize (worker.engine.models.quantization, torch's dynamic int8)."""
    kind = type(module)
    return kind.__name__ == "Int4Linear" or kind.__module__.startswith("torch.ao.nn.quantized")


def _pad_token_id(tokenizer: PreTrainedTokenizerBase, eos_token_ids: frozenset[int]) -> int:
    """The tokenizer's pad id, else the smallest end-of-sequence id (left padding is masked anyway)."""
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = next(iter(sorted(eos_token_ids)), 0)
    return pad


def _eos_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> frozenset[int]:
    """Every end-of-sequence id the model's generation config or the tokenizer names."""
    ids: set[int] = set()
    sources = [getattr(model, "generation_config", None), tokenizer]
    if sources[0] is None:
        sources[0] = model.config
    for source in sources:
        value = getattr(source, "eos_token_id", None)
        if value is None:
            continue
        ids.update(int(v) for v in (value if isinstance(value, list | tuple) else [value]))
    return frozenset(ids)
