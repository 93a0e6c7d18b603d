"""--image-min-pixels / --image-max-pixels: a dynamic-resolution model's images give as
many tokens as their size asks, within the operator's bounds; other models refuse them."""

from __future__ import annotations

import pytest

from tests.support.tiny_vlms import sample_image
from worker.engine.models.image_pixels import PixelBounds, bound_image_pixels, pixel_bounds
from worker.engine.models.loading import load_processor

BIG = sample_image((10, 200, 30), size=(224, 168))
SMALL = sample_image((10, 200, 30), size=(30, 30))


def image_tokens(processor, image) -> int:
    ids = processor(text=["<|image_pad|>"], images=[image], return_tensors="pt")["input_ids"][0]
    return int((ids == processor.image_token_id).sum())


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_the_bounds_default_to_the_models_and_bound_each_images_tokens(tiny_vlm_dir, family):
    from bench.tiny_vlms import QWEN_MAX_PIXELS, QWEN_MIN_PIXELS

    processor = load_processor(str(tiny_vlm_dir(family)))
    assert bound_image_pixels(processor, None, None) == PixelBounds(QWEN_MIN_PIXELS, QWEN_MAX_PIXELS)
    assert image_tokens(processor, BIG) == 12  # scaled down within 16 merged 28x28 patches: 4x3
    assert image_tokens(processor, SMALL) == 4  # scaled up to the fewest

    merged_patch = 28 * 28
    bounds = bound_image_pixels(processor, 9 * merged_patch, 64 * merged_patch)
    assert bounds == pixel_bounds(processor) == PixelBounds(9 * merged_patch, 64 * merged_patch)
    assert image_tokens(processor, BIG) == 48  # 224x168 pixels: 8x6 merged patches, as its size asks
    assert image_tokens(processor, SMALL) == 9


def test_bounds_that_cross_are_refused(tiny_vlm_dir):
    processor = load_processor(str(tiny_vlm_dir("qwen2_vl")))
    with pytest.raises(ValueError, match=r"--image-min-pixels \(20000\) is above --image-max-pixels"):
        bound_image_pixels(processor, 20000, None)


@pytest.mark.parametrize("family", ["llava", "gemma3", "smolvlm"])
def test_models_that_size_images_their_own_way_have_no_bounds_and_refuse_them(tiny_vlm_dir, family):
    processor = load_processor(str(tiny_vlm_dir(family)))
    assert pixel_bounds(processor) is None
    assert bound_image_pixels(processor, None, None) is None
    with pytest.raises(ValueError, match="dynamic-resolution models"):
        bound_image_pixels(processor, None, 100_000)


def test_the_worker_applies_the_flags_and_reports_the_bounds(tiny_vlm_dir):
    from shared.settings import WorkerSettings
    from worker import main as worker_main

    settings = WorkerSettings(
        redis_url="x", model=str(tiny_vlm_dir("qwen2_vl")), dtype="float32", image_max_pixels=32 * 28 * 28
    )
    loaded = worker_main.load_for_serving(settings)
    engine = worker_main.build_engine(settings, loaded, worker_main.lora_catalog(settings))
    facts = worker_main.serving_facts(settings, loaded, engine)
    assert facts["image_max_pixels"] == 32 * 28 * 28 and facts["image_min_pixels"] == 4 * 28 * 28
    with pytest.raises(ValueError, match="above"):
        worker_main.check_image_pixels(
            WorkerSettings(redis_url="x", image_min_pixels=5000, image_max_pixels=4000)
        )
