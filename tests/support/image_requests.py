"""Image requests as a client sends them, and the greedy answers they must get."""

from __future__ import annotations

import io
import json
from pathlib import Path

import requests
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText

from tests.support.tiny_vlms import sample_image
from worker.engine.models.loading import load_processor

IMAGES = {
    "red": sample_image((220, 30, 30)),
    "blue": sample_image((20, 40, 210)),
    "green": sample_image((30, 170, 60), size=(24, 80)),
    "grey": sample_image((128, 128, 128), size=(70, 30)),
    "yellow": sample_image((230, 220, 20)),
}


class Reference:
    """Greedy answers of HF generate, one prompt and its images at a time."""

    def __init__(self, directory: Path) -> None:
        self.processor = load_processor(str(directory))
        self.model = AutoModelForImageTextToText.from_pretrained(directory, dtype=torch.float32).eval()

    def __call__(
        self,
        text: str,
        images: Image.Image | list[Image.Image],
        max_new_tokens: int,
        *,
        chat_template: bool = True,
    ) -> str:
        """The answer to `text` about `images`: in the chat template (images before
        the text), or, without it, `text` as given (its placeholders placing them)."""
        images = images if isinstance(images, list) else [images]
        prompt = text
        if chat_template:
            content = [{"type": "image"} for _ in images] + [{"type": "text", "text": text}]
            prompt = self.processor.apply_chat_template(
                [{"role": "user", "content": content}], add_generation_prompt=True
            )
        inputs = self.processor(text=prompt, images=images, return_tensors="pt")
        with torch.inference_mode():
            output = self.model.generate(
                **inputs, do_sample=False, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens
            )
        new = output[0, inputs["input_ids"].shape[1] :]
        return self.processor.decode(new, skip_special_tokens=True)


def payload(text, max_new_tokens: int = 8, **extra) -> dict:
    return {
        "text": text,
        "max_new_tokens": max_new_tokens,
        "min_new_tokens": max_new_tokens,
        "use_chat_template": True,
        **extra,
    }


def post_image(url: str, image: Image.Image, body: dict, *, stream: bool = False) -> requests.Response:
    """As the Takeoff client sends it: the image as a file part, json_data as application/json."""
    files = {
        "image_data": ("image.png", png(image), "image/png"),
        "json_data": (None, json.dumps(body), "application/json"),
    }
    route = "/image_generate_stream" if stream else "/image_generate"
    return requests.post(url + route, files=files, stream=stream, timeout=60)


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
