"""Prompts with images, for vision-language models.

`VisionPrompter` turns a request's prompts and images into each row's token ids (the
processor's chat template or the prompt as given, every image placeholder expanded
into the image tokens the model expects) and the images encoded by the vision tower
(`ImageFeatures`), once per request however many prompts ask about them; recent
encodings are kept (`FeatureCache`, by the images' content ids). At prefill every
row's features go to the model together (`prefill_inputs`, as transformers'
`generate` passes them); decode steps are text only, so rows with and without images
share a batch.

Two families need more than the features at prefill: the Qwen2-VL family places
image tokens with multimodal rotary positions (`positions`, computed per row:
worker.engine.positions), and Gemma 3 lets an image's tokens attend to each other
both ways (`prefill_inputs` passes `token_type_ids`, from which transformers builds
that mask).

Easy to get wrong: the model scatters the features, in order, into the image-token
positions of the whole batch, so one row whose image tokens do not match its features
would fail every row (Engine.check refuses it first). The placeholder a prompt holds
per image (processor.image_token) is not always the token the features fill: Gemma 3
expands `<start_of_image>` into `<image_soft_token>`s (the model config's image token)."""

from __future__ import annotations

import inspect
from collections import OrderedDict
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from PIL import Image
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.modeling_outputs import BaseModelOutputWithPooling

from shared import defaults
from worker.engine.positions import (
    multimodal_positions_known,
    multimodal_prompt_positions,
    uses_multimodal_positions,
)

# What the processor returns besides the pixels: the token ids and masks the
# engine builds itself, and bookkeeping the model does not take.
_TEXT_OUTPUTS = frozenset(
    {"input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids", "text_replacement_offsets"}
)


# Model types whose image tokens attend to each other both ways when the forward
# gets `token_type_ids` (1 = image token) at prefill, as their processor builds them.
BIDIRECTIONAL_IMAGE_MODEL_TYPES = frozenset({"gemma3"})


def _image_encoder(model: PreTrainedModel) -> Any:
    return getattr(model.base_model, "get_image_features", None) or getattr(model, "get_image_features", None)


def unservable_reason(model: PreTrainedModel) -> str | None:
    """Why the engine cannot serve this vision-language model, or None if it can.

    Checked when the worker starts, so such a model is refused then rather than
    answering wrongly: the engine's prefill is causal over plain 1-D positions,
    so a model that needs more (multimodal rotary positions, image tokens that
    attend to later image tokens) would run but not give transformers' output."""
    name = type(model).__name__
    forward = inspect.signature(model.forward).parameters
    if _image_encoder(model) is None or "mm_encoder_outputs" not in forward:
        return (
            f"{name} cannot take pre-encoded images (get_image_features and mm_encoder_outputs), "
            "which mmserve's batched prefill needs"
        )
    if uses_multimodal_positions(model) and not multimodal_positions_known(model):
        return (
            f"{name} places image tokens with multimodal rotary positions, which mmserve computes "
            "for the Qwen2-VL and Qwen2.5-VL families only"
        )
    if "token_type_ids" in forward and not _bidirectional_images(model):
        return (
            f"{name} takes token_type_ids, whose meaning mmserve knows for Gemma 3 only "
            "(image tokens attending to each other both ways)"
        )
    return None


def _bidirectional_images(model: PreTrainedModel) -> bool:
    return getattr(model.config, "model_type", None) in BIDIRECTIONAL_IMAGE_MODEL_TYPES


class VisionPromptError(ValueError):
    """A prompt with images that cannot be built; worker.engine.prompts re-raises it as PromptError."""


@dataclass(frozen=True, eq=False)
class ImageFeatures:
    """A row's images as the model's vision encoder outputs them (its
    `pooler_output`: a tensor [images, tokens, hidden] or a list of
    [tokens, hidden]), filling `tokens` image-token positions of the row's
    prompt. The rows of one request share one object."""

    pooler_output: Any
    tokens: int
    grids: torch.Tensor | None = None  # [images, 3] patches (time, height, width), where the model has them
    content_key: Hashable | None = None  # names the images by content (their ids, in order), when known

    @property
    def nbytes(self) -> int:
        return sum(part.nbytes for part in self._parts())

    def _parts(self) -> list[torch.Tensor]:
        pooled = self.pooler_output
        if isinstance(pooled, torch.Tensor):
            return [pooled] if pooled.ndim == 2 else list(pooled)
        return list(pooled)

    def part(self, first: int, count: int) -> ImageFeatures:
        """The features of image tokens [first, first + count) (in prompt order), for a
        prefill that computes only those (worker.engine.prefill)."""
        if first == 0 and count == self.tokens:
            return self
        flat = torch.cat([part.reshape(-1, part.shape[-1]) for part in self._parts()])[first : first + count]
        pooled = self.pooler_output
        if isinstance(pooled, torch.Tensor):  # shaped as the model gave it: 2-D or [images, tokens, hidden]
            return ImageFeatures(pooler_output=flat if pooled.ndim == 2 else flat[None], tokens=count)
        return ImageFeatures(pooler_output=[flat], tokens=count)


class FeatureCache:
    """The most recently used image encodings, at most `max_bytes` of them
    (least recently used dropped first; one larger than the whole budget is
    not kept). Keys name the images by content, so an entry is never stale."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self._entries: OrderedDict[Hashable, ImageFeatures] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: Hashable) -> ImageFeatures | None:
        features = self._entries.get(key)
        if features is not None:
            self._entries.move_to_end(key)
        return features

    def put(self, key: Hashable, features: ImageFeatures) -> None:
        size = features.nbytes
        if size > self.max_bytes or key in self._entries:
            return
        while self._entries and self.bytes + size > self.max_bytes:
            _, dropped = self._entries.popitem(last=False)
            self.bytes -= dropped.nbytes
        self._entries[key] = features
        self.bytes += size


@dataclass(frozen=True)
class VisionPrompt:
    prompt_ids: list[int]
    image_features: ImageFeatures | None


@dataclass(frozen=True)
class _Processed:
    ids: list[int]
    image_start: int  # index of the first token that belongs to an image
    pixel_inputs: dict[str, Any]


class VisionPrompter:
    """Prompt building and image encoding for one vision-language model."""

    def __init__(
        self,
        model: PreTrainedModel,
        processor: Any,
        tokenizer: PreTrainedTokenizerBase,
        feature_cache_bytes: int = defaults.IMAGE_FEATURE_CACHE_BYTES,
    ) -> None:
        self.model = model
        self.feature_cache = FeatureCache(feature_cache_bytes)
        self.processor = processor
        self.tokenizer = tokenizer
        self.image_token: str = getattr(processor, "image_token", None) or "<image>"
        self.placeholder_id = int(tokenizer.convert_tokens_to_ids(self.image_token))
        self.image_token_id = _image_token_id(model, processor, self.placeholder_id)
        self.multimodal_positions = uses_multimodal_positions(model)
        self.bidirectional_images = _bidirectional_images(model)
        self._raw_marker = self._raw_image_marker()
        reason = unservable_reason(model)
        if reason is not None:
            raise NotImplementedError(reason)
        encoder = _image_encoder(model)
        assert encoder is not None  # unservable_reason checked it
        self._encoder = encoder
        self._encoder_arguments = {
            name for name in inspect.signature(encoder).parameters if name not in ("self", "kwargs")
        }

    # -- facts ----------------------------------------------------------------

    @property
    def chat_template(self) -> str | None:
        return getattr(self.processor, "chat_template", None) or getattr(
            self.tokenizer, "chat_template", None
        )

    # -- prompts --------------------------------------------------------------

    def text_prompt_ids(self, text: str, *, messages: Sequence[Mapping[str, Any]] | None = None) -> list[int]:
        """A prompt without images in the chat template (`text` as the user turn, or the
        conversation `messages`), assistant turn opened."""
        return self._processed(self._chat_prompt(text, 0, messages), []).ids

    def prompts(
        self,
        texts: Sequence[str],
        images: Sequence[Image.Image],
        *,
        use_chat_template: bool,
        prompt_max_tokens: int | None,
        messages: Sequence[Mapping[str, Any]] | None = None,
        images_key: Hashable | None = None,
    ) -> list[VisionPrompt]:
        """One VisionPrompt per text, every one asking about all of `images`.

        With `use_chat_template` the images are placed as the chat template
        places them (before the text, in one user turn). Without it the text
        is used as given: it may hold one placeholder (processor.image_token,
        e.g. `<image>`) per image to say where each goes, or none, in which
        case the placeholders go before the text. `prompt_max_tokens` keeps
        the last n tokens but never cuts into an image. `messages` (a
        conversation whose {"type": "image"} parts stand for `images`, in order)
        replaces every text and implies the chat template. `images_key` names
        `images` by content (their ids, in order): their encoding is then
        looked up in, and kept in, the feature cache.
        """
        if not images:
            raise VisionPromptError("no images given")
        strings = [
            self._chat_prompt(text, len(images), messages)
            if use_chat_template or messages is not None
            else self._raw_prompt(text, len(images))
            for text in texts
        ]
        first = self._processed(strings[0], images)
        features = self.feature_cache.get(images_key) if images_key is not None else None
        if features is None:
            features = replace(self._encode(first.pixel_inputs), content_key=images_key)
            if images_key is not None:
                self.feature_cache.put(images_key, features)
        splice = _Splice.of(self._plain_ids(strings[0]), first.ids, self.placeholder_id)
        prompts = []
        for index, string in enumerate(strings):
            spliced = None if index == 0 or splice is None else splice.apply(self._plain_ids(string))
            if index == 0:
                ids, image_start = first.ids, first.image_start
            elif spliced is not None:
                ids, image_start = spliced
            else:
                processed = self._processed(string, images)
                ids, image_start = processed.ids, processed.image_start
            prompts.append(VisionPrompt(self._truncate(ids, image_start, prompt_max_tokens), features))
        return prompts

    def _chat_prompt(
        self, text: str, image_count: int, messages: Sequence[Mapping[str, Any]] | None = None
    ) -> str:
        if not self.chat_template:
            raise VisionPromptError("use_chat_template is set but this model has no chat template")
        if messages is not None:
            return self._conversation_prompt(messages, image_count)
        try:
            if getattr(self.processor, "chat_template", None):
                content = [{"type": "image"} for _ in range(image_count)]
                content.append({"type": "text", "text": text})
                prompt = self.processor.apply_chat_template(
                    [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
                )
            else:  # only the tokenizer has a template: placeholders lead the text
                prompt = self.tokenizer.apply_chat_template(
                    [{"role": "user", "content": self.image_token * image_count + text}],
                    add_generation_prompt=True,
                    tokenize=False,
                )
        except Exception as exc:  # jinja2 errors, templates that raise on purpose
            raise VisionPromptError(f"the chat template could not be applied: {exc}") from exc
        return prompt if isinstance(prompt, str) else prompt[0]

    def _conversation_prompt(self, messages: Sequence[Mapping[str, Any]], image_count: int) -> str:
        """A whole conversation in the chat template: the processor's takes content as a
        list of parts, a tokenizer's as a string (each image part becomes a placeholder)."""
        parts = [
            part
            for message in messages
            if not isinstance(message["content"], str)
            for part in message["content"]
        ]
        images_asked = sum(part.get("type") == "image" for part in parts)
        if images_asked != image_count:
            raise VisionPromptError(
                f"the messages hold {images_asked} image part(s) but the request has {image_count} image(s)"
            )
        by_processor = bool(getattr(self.processor, "chat_template", None))
        conversation = []
        for message in messages:
            content = message["content"]
            if by_processor and isinstance(content, str):
                content = [{"type": "text", "text": content}]
            elif not by_processor and not isinstance(content, str):
                content = "".join(
                    self.image_token if part.get("type") == "image" else part.get("text", "")
                    for part in content
                )
            conversation.append({**message, "content": content})
        template = self.processor if by_processor else self.tokenizer
        try:
            prompt = template.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
        except Exception as exc:  # jinja2 errors, templates that raise on purpose
            raise VisionPromptError(f"the chat template could not be applied: {exc}") from exc
        return prompt if isinstance(prompt, str) else prompt[0]

    def _raw_image_marker(self) -> str:
        """What goes before a raw prompt's text per image when it places none: the
        placeholder, between the model's vision markers where it has them (Qwen2-VL)."""
        start = getattr(self.model.config, "vision_start_token_id", None)
        end = getattr(self.model.config, "vision_end_token_id", None)
        if start is None or end is None:
            return self.image_token
        start_token, end_token = self.tokenizer.convert_ids_to_tokens([start, end])
        return f"{start_token}{self.image_token}{end_token}"

    def _raw_prompt(self, text: str, image_count: int) -> str:
        placeholders = text.count(self.image_token)
        if placeholders == 0:
            return self._raw_marker * image_count + text
        if placeholders != image_count:
            raise VisionPromptError(
                f"the prompt holds {placeholders} {self.image_token} placeholder(s) but the request "
                f"has {image_count} image(s): use one per image, or none to put the images first"
            )
        return text

    def _add_special_tokens(self, prompt: str) -> bool:
        # As transformers' processors do: a prompt that already starts with BOS
        # (a rendered chat template) gets no second one.
        bos = self.tokenizer.bos_token
        return not (bos is not None and prompt.startswith(bos))

    def _plain_ids(self, prompt: str) -> list[int]:
        """Token ids of `prompt` with its placeholders not expanded."""
        return list(self.tokenizer(prompt, add_special_tokens=self._add_special_tokens(prompt))["input_ids"])

    def _processed(self, prompt: str, images: Sequence[Image.Image]) -> _Processed:
        kwargs: dict[str, Any] = {"add_special_tokens": self._add_special_tokens(prompt)}
        if images:
            kwargs.update(images=[list(images)], return_mm_token_type_ids=True)
        try:
            encoded = self.processor(text=[prompt], return_tensors="pt", **kwargs)
        except Exception as exc:
            raise VisionPromptError(f"the processor could not build the prompt: {exc}") from exc
        ids = [int(token) for token in encoded["input_ids"][0]]
        image_start = len(ids)
        if images:
            marks = encoded.get("mm_token_type_ids")
            image_tokens = {self.image_token_id, self.placeholder_id}
            flagged = (
                torch.as_tensor(marks[0]).nonzero().flatten().tolist()
                if marks is not None
                else [i for i, token in enumerate(ids) if token in image_tokens]
            )
            image_start = flagged[0] if flagged else len(ids)
        pixel_inputs = {key: value for key, value in encoded.items() if key not in _TEXT_OUTPUTS}
        return _Processed(ids=ids, image_start=image_start, pixel_inputs=pixel_inputs)

    @staticmethod
    def _truncate(ids: list[int], image_start: int, prompt_max_tokens: int | None) -> list[int]:
        if prompt_max_tokens is None or len(ids) <= prompt_max_tokens:
            return ids
        if prompt_max_tokens < 1:
            raise VisionPromptError("prompt_max_tokens must be at least 1")
        cut = len(ids) - prompt_max_tokens
        if cut > image_start:
            raise VisionPromptError(
                f"prompt_max_tokens ({prompt_max_tokens}) would cut into the image: the image(s) and "
                f"the text after them take {len(ids) - image_start} tokens"
            )
        return ids[cut:]

    # -- images ---------------------------------------------------------------

    @torch.inference_mode()
    def _encode(self, pixel_inputs: Mapping[str, Any]) -> ImageFeatures:
        """Run the vision tower once over a request's images."""
        arguments = {}
        for name, value in pixel_inputs.items():
            if name not in self._encoder_arguments:
                continue
            if isinstance(value, torch.Tensor):
                dtype = self.model.dtype if value.is_floating_point() else None
                value = value.to(self.model.device, dtype)
            arguments[name] = value
        output = self._encoder(**arguments, return_dict=True)
        pooled = output.pooler_output
        parts = [pooled] if isinstance(pooled, torch.Tensor) and pooled.ndim == 2 else list(pooled)
        return ImageFeatures(
            pooler_output=pooled,
            tokens=sum(int(part.shape[-2]) for part in parts),
            grids=pixel_inputs.get("image_grid_thw"),
        )

    def count_image_tokens(self, prompt_ids: Sequence[int]) -> int:
        return sum(1 for token in prompt_ids if token == self.image_token_id)

    def positions(self, prompt_ids: Sequence[int], features: ImageFeatures | None) -> torch.Tensor | None:
        """A row's own position ids ([axes, prompt length]) where the model needs
        more than 0, 1, 2... (multimodal rotary positions of a prompt with images)."""
        if not self.multimodal_positions or features is None:
            return None
        if features.grids is None:
            raise VisionPromptError("the processor gave no image grids, which this model's positions need")
        return multimodal_prompt_positions(self.model, prompt_ids, self.image_token_id, features.grids)

    def chunk_inputs(
        self, features: ImageFeatures | None, prompt_ids: Sequence[int], start: int, end: int
    ) -> dict[str, Any]:
        """Model inputs for a prefill of one row's prompt tokens [start, end): the
        features of the image tokens among them."""
        if features is None:
            return {}
        first = self.count_image_tokens(prompt_ids[:start])
        count = self.count_image_tokens(prompt_ids[start:end])
        if not count:
            return {}
        inputs = self._features_input([features.part(first, count)])
        if self.bidirectional_images:  # over the cached tokens too: the mask reads them by position
            seen = torch.tensor([list(prompt_ids[:end])], dtype=torch.long, device=self.model.device)
            inputs["token_type_ids"] = (seen == self.image_token_id).long()
        return inputs

    def prefill_inputs(
        self, features: Sequence[ImageFeatures | None], input_ids: torch.Tensor
    ) -> dict[str, Any]:
        """Model inputs for a prefill of `input_ids` whose rows (in batch order)
        carry these features."""
        inputs = self._features_input(features)
        if inputs and self.bidirectional_images:
            inputs["token_type_ids"] = (input_ids == self.image_token_id).long()
        return inputs

    @staticmethod
    def _features_input(features: Sequence[ImageFeatures | None]) -> dict[str, Any]:
        present = [f.pooler_output for f in features if f is not None]
        if not present:
            return {}
        if all(isinstance(p, torch.Tensor) for p in present) and len({p.shape[1:] for p in present}) == 1:
            merged: Any = torch.cat(present, dim=0) if len(present) > 1 else present[0]
        else:
            merged = []
            for pooled in present:
                if isinstance(pooled, torch.Tensor) and pooled.ndim == 2:
                    merged.append(pooled)
                else:
                    merged.extend(pooled)
        return {"mm_encoder_outputs": {"image": BaseModelOutputWithPooling(pooler_output=merged)}}


def _image_token_id(model: PreTrainedModel, processor: Any, placeholder_id: int) -> int:
    """The token the model fills with image features: the model config's image
    token where it names one, else the processor's, else the placeholder's."""
    for source, name in (
        (model.config, "image_token_id"),
        (model.config, "image_token_index"),
        (processor, "image_token_id"),
    ):
        value = getattr(source, name, None)
        if isinstance(value, int):
            return value
    return placeholder_id


@dataclass(frozen=True)
class _Splice:
    """How one image placeholder expands, learnt from a prompt the processor
    expanded, so that more prompts about the same image need only the tokenizer."""

    expansion: list[int]
    placeholder: int

    @classmethod
    def of(cls, plain: list[int], expanded: list[int], placeholder: int) -> _Splice | None:
        positions = [i for i, token in enumerate(plain) if token == placeholder]
        if len(positions) != 1:
            return None  # several images: each prompt goes through the processor
        (at,) = positions
        after = len(plain) - at - 1
        if expanded[:at] != plain[:at] or (after and expanded[-after:] != plain[at + 1 :]):
            return None
        return cls(expansion=expanded[at : len(expanded) - after], placeholder=placeholder)

    def apply(self, plain: list[int]) -> tuple[list[int], int] | None:
        positions = [i for i, token in enumerate(plain) if token == self.placeholder]
        if len(positions) != 1:
            return None
        (at,) = positions
        return plain[:at] + self.expansion + plain[at + 1 :], at
