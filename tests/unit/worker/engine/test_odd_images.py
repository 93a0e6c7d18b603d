"""Every odd image the API serves (tests/support/odd_images.py), as a worker
receives it, through every vision-language family's processor and engine: it
runs, or is refused with a PromptError saying why (a 422 for the client), never
another exception; and the processor sees it as it would see the upload itself."""

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image

from api.images import canonical_image
from shared import defaults
from tests.support.odd_images import AT_THE_LIMIT, SERVED, ServedImage
from tests.support.vlm_runs import Vlm, row, run
from worker.engine.prompts import PromptError
from worker.engine.rows import GenerationParams

TWO_TOKENS = GenerationParams(max_new_tokens=2, min_new_tokens=2)


def as_the_worker_receives(odd: ServedImage) -> Image.Image:
    """The API's canonical PNG, decoded as worker.images decodes it."""
    png = canonical_image(odd.data, max_pixels=defaults.DEFAULT_MAX_IMAGE_PIXELS, source="image_data").data
    with Image.open(io.BytesIO(png), formats=["PNG"]) as image:
        return image.convert("RGB")


def pixel_values(vlm: Vlm, image: Image.Image) -> torch.Tensor:
    encoded = vlm.processor(text=vlm.chat_prompt("What?", 1), images=[image], return_tensors="pt")
    return encoded["pixel_values"]


def by_name(images):
    return pytest.mark.parametrize("odd", images, ids=[image.name for image in images])


@by_name(SERVED)
def test_a_served_odd_image_runs_or_is_refused_saying_why(vlm: Vlm, odd: ServedImage):
    engine = vlm.engine()
    try:
        (prompt,) = engine.encode_image_prompts(
            ["What is in the picture?"], [as_the_worker_receives(odd)], use_chat_template=True
        )
        tokens = run(engine, [row("odd", prompt, TWO_TOKENS)])
    except PromptError as refusal:
        assert str(refusal).strip(), "a refusal must say why"
        return
    assert len(tokens["odd"]) == 2
    assert prompt.image_features.tokens == engine.vision.count_image_tokens(prompt.prompt_ids) > 0


@by_name(AT_THE_LIMIT)
def test_an_image_at_the_aspect_ratio_limit_runs(vlm: Vlm, odd: ServedImage):
    """The API's limit is no looser than any family's processor (Qwen2-VL's refuses past 200:1)."""
    engine = vlm.engine()
    (prompt,) = engine.encode_image_prompts(["What?"], [as_the_worker_receives(odd)], use_chat_template=True)
    assert len(run(engine, [row("thin", prompt, TWO_TOKENS)])["thin"]) == 2


@by_name([odd for odd in SERVED if odd.as_processors_see_it])
def test_the_processor_sees_the_served_image_as_it_would_the_upload(vlm: Vlm, odd: ServedImage):
    upload = Image.open(io.BytesIO(odd.data))
    assert torch.equal(pixel_values(vlm, as_the_worker_receives(odd)), pixel_values(vlm, upload))
