"""Tiny vision-language models in the engine and in Hugging Face's generate, side by side."""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from transformers import AutoModelForImageTextToText

from tests.support.tiny_vlms import sample_image
from worker.engine.engine import Engine
from worker.engine.models.loading import load_processor
from worker.engine.rows import GenerationParams, RowRequest
from worker.engine.vision import VisionPrompt

GREEDY = GenerationParams(max_new_tokens=10, min_new_tokens=10)


RED = sample_image((220, 30, 30))


@dataclass
class Vlm:
    name: str
    model: Any
    processor: Any

    def engine(self, batch_invariant: bool = True, **kwargs) -> Engine:
        return Engine(
            self.model,
            self.processor.tokenizer,
            processor=self.processor,
            batch_invariant=batch_invariant,
            **kwargs,
        )

    def chat_prompt(self, text: str, images: int) -> str:
        content: list[dict[str, Any]] = [{"type": "image"} for _ in range(images)]
        content.append({"type": "text", "text": text})
        return self.processor.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True
        )

    def generate(self, prompt: str, images: list[Image.Image], max_new_tokens: int = 10) -> list[int]:
        """HF greedy generation of one prompt, as a user of transformers would run it."""
        inputs = self.processor(text=prompt, images=images or None, return_tensors="pt")
        with torch.inference_mode():
            output = self.model.generate(
                **inputs, do_sample=False, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens
            )
        return output[0, inputs["input_ids"].shape[1] :].tolist()


def load(directory) -> Vlm:
    return Vlm(
        directory.name,
        AutoModelForImageTextToText.from_pretrained(directory).eval(),
        load_processor(str(directory)),  # as the worker loads it (SmolVLM's without torchvision)
    )


def row(key: Hashable, prompt: VisionPrompt, params: GenerationParams = GREEDY) -> RowRequest:
    return RowRequest(
        key=key, prompt_ids=prompt.prompt_ids, params=params, image_features=prompt.image_features
    )


def run(engine: Engine, rows: list[RowRequest]) -> dict[Hashable, list[int]]:
    engine.add(rows)
    tokens: dict[Hashable, list[int]] = {r.key: [] for r in rows}
    while engine.has_work:
        for output in engine.step():
            if output.token_id is not None:
                tokens[output.key].append(output.token_id)
        if engine._batch is not None:  # the host's row lengths (attention groups) match the mask
            assert engine._batch.lengths == engine._batch.attention_mask.sum(dim=1).tolist()
    return tokens
