"""The worker's side of images: loading a vision-language model, reading a
job's images from Redis, and running image jobs in a batch."""

from __future__ import annotations

import hashlib
import io
import time

import fakeredis
import pytest
from PIL import Image
from transformers import (
    Idefics3Processor,
    LlavaProcessor,
    PaliGemmaConfig,
    PaliGemmaForConditionalGeneration,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
)
from transformers.utils import is_torchvision_available

from shared import defaults, keys
from shared.payload import GenerateRequest, GenerationJob
from tests.support.fake_engine import FakeEngine
from tests.support.tiny_vlms import counting_encoder, sample_image
from worker.batch_run import BatchRun
from worker.engine.engine import Engine
from worker.engine.models.loading import load_model, load_processor
from worker.images import ImageStore, ImageUnavailable
from worker.publisher import EventPublisher


def png(image: Image.Image) -> tuple[str, bytes]:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    data = buffer.getvalue()
    return hashlib.sha256(data).hexdigest(), data


def store(connection, image: Image.Image) -> str:
    image_id, data = png(image)
    connection.hset(keys.image_key(image_id), mapping={keys.IMAGE_DATA_FIELD: data, keys.IMAGE_REFS_FIELD: 1})
    connection.expire(keys.image_key(image_id), 5)
    return image_id


def image_job(request_id: str, image_ids: list[str], **payload) -> GenerationJob:
    return GenerationJob(
        request_id=request_id,
        request=GenerateRequest(**payload),
        seed=3,
        enqueued_at=time.time(),
        image_ids=image_ids,
    )


@pytest.fixture
def connection():
    return fakeredis.FakeRedis()


@pytest.fixture(scope="module")
def llava(tiny_llava_dir):
    return load_model(str(tiny_llava_dir), device="cpu", dtype="float32")


def test_a_vision_language_model_loads_with_its_processor(llava):
    assert llava.model_type == "VISION"
    assert type(llava.model).__name__ == "LlavaForConditionalGeneration"
    assert llava.processor is not None and llava.tokenizer is llava.processor.tokenizer


def test_smolvlm_loads_without_torchvision_with_its_pil_image_processor(tiny_smolvlm_dir):
    assert not is_torchvision_available()  # the case this covers: torchvision breaks beside this torch
    loaded = load_model(str(tiny_smolvlm_dir), device="cpu", dtype="float32")
    assert loaded.model_type == "VISION"
    assert type(loaded.model).__name__ == "SmolVLMForConditionalGeneration"
    processor = loaded.processor
    assert type(processor).__name__ == "SmolVLMProcessor"
    assert type(processor.image_processor).__name__ == "SmolVLMImageProcessorPil"
    assert loaded.tokenizer is processor.tokenizer and loaded.tokenizer.padding_side == "left"
    assert processor.image_seq_len == 4 and processor.chat_template
    with pytest.raises(ValueError, match="no video processor"):
        processor.video_processor([])
    engine = Engine(loaded.model, loaded.tokenizer, processor=processor)
    (prompt,) = engine.encode_image_prompts(["What?"], [sample_image("red")], use_chat_template=True)
    assert engine.vision.count_image_tokens(prompt.prompt_ids) == prompt.image_features.tokens > 4


def test_processors_without_a_video_part_load_as_autoprocessor_loads_them(tiny_idefics3_dir, llava):
    assert type(load_processor(str(tiny_idefics3_dir))) is Idefics3Processor
    assert type(llava.processor) is LlavaProcessor


def _text_settings() -> dict:
    return {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "vocab_size": 128,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }


def test_a_multimodal_rope_family_mmserve_does_not_know_is_refused_at_load_naming_the_reason(tmp_path):
    config = Qwen3VLConfig(
        text_config={
            **_text_settings(),
            "head_dim": 16,
            "rope_parameters": {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0},
        },
        vision_config={
            "depth": 1,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "out_hidden_size": 32,
            "deepstack_visual_indexes": [],
        },
    )
    Qwen3VLForConditionalGeneration(config).save_pretrained(tmp_path)  # no processor: refused before it
    with pytest.raises(NotImplementedError, match=r"cannot serve .*multimodal rotary positions.*Qwen2-VL"):
        load_model(str(tmp_path), device="cpu", dtype="float32")


def test_a_model_whose_token_type_ids_mmserve_does_not_know_is_refused_at_load(tmp_path):
    config = PaliGemmaConfig(
        text_config={**_text_settings(), "head_dim": 16},
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 8,
            "projection_dim": 32,
        },
    )
    PaliGemmaForConditionalGeneration(config).save_pretrained(tmp_path)
    with pytest.raises(NotImplementedError, match=r"cannot serve .*token_type_ids.*Gemma 3 only"):
        load_model(str(tmp_path), device="cpu", dtype="float32")


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "gemma3", "smolvlm"])
def test_the_families_mmserve_serves_load_with_their_processor(tiny_vlm_dir, family):
    loaded = load_model(str(tiny_vlm_dir(family)), device="cpu", dtype="float32")
    assert loaded.model_type == "VISION" and loaded.processor is not None


def test_a_text_model_loads_as_causal(tiny_model_dir):
    loaded = load_model(str(tiny_model_dir), device="cpu", dtype="float32")
    assert loaded.model_type == "CAUSAL" and loaded.processor is None


def test_images_are_read_in_order_and_their_ttl_renewed(connection):
    red, blue = store(connection, sample_image("red")), store(connection, sample_image("blue"))
    images = ImageStore(connection).load([blue, red, blue])
    assert [image.getpixel((5, 0)) for image in images] == [(0, 0, 255), (255, 0, 0), (0, 0, 255)]
    assert all(image.mode == "RGB" for image in images)
    assert connection.ttl(keys.image_key(red)) > 5


def test_a_missing_or_damaged_image_is_unavailable(connection):
    with pytest.raises(ImageUnavailable, match="no longer stored"):
        ImageStore(connection).load(["0" * 64])
    image_id = store(connection, sample_image("red"))
    connection.hset(keys.image_key(image_id), keys.IMAGE_DATA_FIELD, b"not the same bytes")
    with pytest.raises(ImageUnavailable, match="damaged"):
        ImageStore(connection).load([image_id])


def test_image_jobs_and_text_jobs_run_in_one_batch(connection, llava):
    engine = Engine(llava.model, llava.tokenizer, processor=llava.processor)
    red, blue = store(connection, sample_image("red")), store(connection, sample_image("blue"))
    jobs = [
        image_job("a", [red], text=["What is it?", "Colour?"], max_new_tokens=6, min_new_tokens=6),
        image_job("b", [blue], text="What is it?", max_new_tokens=6, min_new_tokens=6),
        image_job("c", [], text="Plain text", max_new_tokens=6, min_new_tokens=6),
    ]
    outcomes = BatchRun(engine, EventPublisher(connection), jobs).run()
    assert all(outcome.error is None for outcome in outcomes.values())
    texts = {request_id: outcome.result()["text"] for request_id, outcome in outcomes.items()}

    alone = BatchRun(engine, EventPublisher(connection), [jobs[1]]).run()["b"].result()["text"]
    assert texts["b"] == alone
    assert texts["a"][0] != texts["b"][0], "the image should change the answer"
    assert all(usage["prompt_tokens"] > 16 for usage in outcomes["a"].result()["usage"])


def test_a_later_job_with_the_same_image_reuses_its_encoding(connection, llava):
    engine = Engine(llava.model, llava.tokenizer, processor=llava.processor)
    calls = counting_encoder(engine)
    red, blue = store(connection, sample_image("red")), store(connection, sample_image("blue"))
    texts = []
    for request_id, images in (("first", [red]), ("again", [red]), ("other", [blue])):
        job = image_job(request_id, images, text="What is it?", max_new_tokens=4, min_new_tokens=4)
        texts.append(BatchRun(engine, EventPublisher(connection), [job]).run()[request_id].result()["text"])
    assert len(calls) == 2  # red once, blue once
    assert texts[0] == texts[1] != texts[2]


def test_an_expired_image_fails_only_its_request(connection, llava):
    engine = Engine(llava.model, llava.tokenizer, processor=llava.processor)
    jobs = [image_job("gone", ["f" * 64], text="x", max_new_tokens=2), image_job("ok", [], text="y")]
    outcomes = BatchRun(engine, EventPublisher(connection), jobs).run()
    assert outcomes["gone"].error.error_type == "image_unavailable"
    assert outcomes["ok"].error is None and outcomes["ok"].finished


def test_a_text_only_worker_answers_an_image_job_with_400(connection, tiny_model_dir):
    loaded = load_model(str(tiny_model_dir), device="cpu", dtype="float32")
    engine = Engine(loaded.model, loaded.tokenizer)
    image_id = store(connection, sample_image("red"))
    outcomes = BatchRun(engine, EventPublisher(connection), [image_job("a", [image_id], text="x")]).run()
    assert outcomes["a"].error.error_type == "model_does_not_accept_images"
    assert outcomes["a"].error.status == 400


def test_a_failing_prompt_fails_only_its_request(connection):
    class BrokenVision(FakeEngine):
        def encode_image_prompts(self, *args, **kwargs):
            raise RuntimeError("vision tower exploded")

    image_id = store(connection, sample_image("red"))
    jobs = [image_job("bad", [image_id], text="x"), image_job("good", [], text="y", max_new_tokens=2)]
    outcomes = BatchRun(BrokenVision(), EventPublisher(connection), jobs).run()
    assert outcomes["bad"].error.error_type == "generation_error"
    assert outcomes["good"].result()["text"] == ["w1 w2 "]


def test_the_image_ttl_covers_a_queued_job():
    assert defaults.IMAGE_TTL_SECONDS >= defaults.JOB_TTL_SECONDS
