"""A row's prompt as token ids: plain tokenisation or the chat template (one user
turn, or a whole conversation), cut to its last `prompt_max_tokens` tokens; prompts
with images go through the model's processor (worker.engine.vision).

Easy to get wrong: an empty prompt is refused rather than replaced by a lone BOS.
For chat models BOS is often a turn marker (SmolLM2's is <|im_start|>), so the model
would generate text the client did not ask for."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

from PIL import Image
from transformers import PreTrainedTokenizerBase

from worker.engine.vision import VisionPrompt, VisionPrompter, VisionPromptError


class PromptError(ValueError):
    """A prompt the engine cannot run (empty, too long for the model, no chat
    template...). The message is meant for the API's client."""


class ImagesNotAccepted(PromptError):
    """Images sent to a text-only model."""


def text_prompt_ids(
    tokenizer: PreTrainedTokenizerBase,
    text: str,
    *,
    vision: VisionPrompter | None = None,
    use_chat_template: bool = False,
    prompt_max_tokens: int | None = None,
    messages: Sequence[Mapping[str, Any]] | None = None,
) -> list[int]:
    """Token ids for `text`: plain tokenisation (with the tokenizer's usual special
    tokens, e.g. BOS), or the chat template with `text` as one user turn and the
    assistant's turn opened (a vision-language model's own template when `vision` is
    given). `messages` (a whole conversation, as apply_chat_template takes it)
    replaces `text` and implies the chat template."""
    if (use_chat_template or messages is not None) and vision is not None:
        try:
            ids = vision.text_prompt_ids(text, messages=messages)
        except VisionPromptError as exc:
            raise PromptError(str(exc)) from exc
    elif use_chat_template or messages is not None:
        ids = _chat_template_ids(tokenizer, text, messages)
    else:
        ids = [int(token) for token in tokenizer(text)["input_ids"]]
    if prompt_max_tokens is not None:
        if prompt_max_tokens < 1:
            raise PromptError("prompt_max_tokens must be at least 1")
        ids = ids[-prompt_max_tokens:]
    if not ids:
        raise PromptError("the prompt is empty after tokenisation")
    return ids


def _chat_template_ids(
    tokenizer: PreTrainedTokenizerBase, text: str, messages: Sequence[Mapping[str, Any]] | None
) -> list[int]:
    if not getattr(tokenizer, "chat_template", None):
        raise PromptError("use_chat_template is set but this model's tokenizer has no chat template")
    try:
        encoded = tokenizer.apply_chat_template(
            list(messages) if messages is not None else [{"role": "user", "content": text}],
            add_generation_prompt=True,
            tokenize=True,
            return_dict=False,
        )
    except Exception as exc:  # jinja2 errors, templates that raise on purpose
        raise PromptError(f"the chat template could not be applied: {exc}") from exc
    if isinstance(encoded, Mapping):
        encoded = encoded["input_ids"]
    return [int(token) for token in encoded]


def image_prompts(
    vision: VisionPrompter | None,
    texts: Sequence[str],
    images: Sequence[Image.Image],
    *,
    use_chat_template: bool = False,
    prompt_max_tokens: int | None = None,
    messages: Sequence[Mapping[str, Any]] | None = None,
    images_key: Hashable | None = None,
) -> list[VisionPrompt]:
    """Rows asking about `images` (RGB PIL images), one per text: their token ids
    with the image tokens in place, and the images encoded once for all of them
    (worker.engine.vision.VisionPrompter.prompts). `messages` replaces every text with
    that conversation; `images_key` (the images' content ids) lets a recent encoding
    of them be reused. `vision` is None for a text-only model, which refuses."""
    if vision is None:
        raise ImagesNotAccepted("this worker's model is text-only: it does not accept images")
    try:
        return vision.prompts(
            texts,
            images,
            use_chat_template=use_chat_template,
            prompt_max_tokens=prompt_max_tokens,
            messages=messages,
            images_key=images_key,
        )
    except VisionPromptError as exc:
        raise PromptError(str(exc)) from exc
