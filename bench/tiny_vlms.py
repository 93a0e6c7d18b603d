"""Tiny random vision-language models for the tests and the benches, built from configs with
stock transformers classes and the SmolLM2 tokenizer; never downloaded.

- LLaVA: a tiny CLIP vision tower, a tiny Llama, `<image>` added to the tokenizer.
- Idefics3 (the first SmolVLM release's architecture): a tiny SigLIP-style tower
  with image splitting, so differently shaped images give different numbers of
  image tokens.
- SmolVLM (transformers' smolvlm classes, as SmolVLM2 ships): the same shape
  with SmolVLM's processor, saved without a video processor.
- Qwen2-VL and Qwen2.5-VL: their own vision towers over 14x14 patches merged 2x2,
  dynamic resolution (an image gives as many tokens as its size asks, between
  4 and 16 here), multimodal rotary positions; saved without a video processor.
- Gemma 3: a SigLIP tower pooled to 4 tokens an image, a Gemma 3 text model
  whose sliding-window layers see 8 tokens, image tokens attending to each
  other both ways.

`FAMILIES` names every builder, for the tests and benches that cover them all.

Every processor uses a PIL image processor, which needs no torchvision
(torchvision does not work beside this torch build). Weights are drawn with a
large std, as in tiny_models.py, so greedy outputs vary from token to token and
depend on the image.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoTokenizer,
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Gemma3ImageProcessorPil,
    Gemma3Processor,
    GenerationConfig,
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    Idefics3ImageProcessorPil,
    Idefics3Processor,
    Idefics3VisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessorPil,
    Qwen2VLProcessor,
    SmolVLMConfig,
    SmolVLMForConditionalGeneration,
    SmolVLMImageProcessorPil,
    SmolVLMProcessor,
    SmolVLMVisionConfig,
)

from bench.tiny_models import (
    SMOLLM2_SHAPED_STD,
    SMOLLM2_SHAPES,
    WEIGHT_STD,
    default_tokenizer_cache_dir,
    smollm2_tokenizer,
    tiny_llama_settings,
)
from worker.engine.models.loading import without_video_processor

# A ChatML template (SmolLM2's turns) whose user content may hold images.
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>\n"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# SmolVLM's template, shortened.
IDEFICS3_CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}:"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}"
)

# SmolVLM2's template: "User:" before an image, "User: " before text.
SMOLVLM_CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'] is string %}{{ ': ' + message['content'] }}{% else %}"
    "{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}"
)

# Qwen2-VL's template, shortened: each image between vision markers.
QWEN2_VL_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Gemma 3's template, shortened: "model" turns, an image as <start_of_image>.
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<start_of_turn>"
    "{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<start_of_image>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)

IMAGE_SIZE = 32
PATCH_SIZE = 8


def _tokenizer(tokenizer_cache_dir: Path | None, extra_tokens: list[str]) -> PreTrainedTokenizerBase:
    tokenizer = smollm2_tokenizer(tokenizer_cache_dir or default_tokenizer_cache_dir())
    tokenizer.add_special_tokens({"additional_special_tokens": extra_tokens})
    return tokenizer


def _text_config(tokenizer: PreTrainedTokenizerBase) -> LlamaConfig:
    return LlamaConfig(**tiny_llama_settings(tokenizer))


def _random_model(
    model_class: type, config: Any, tokenizer: PreTrainedTokenizerBase, seed: int, std: float = WEIGHT_STD
) -> PreTrainedModel:
    """A model of `model_class` with random weights drawn from `seed` (the caller's RNG left alone)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _randomise(model_class(config), tokenizer, seed, std)


def _saved(directory: Path, model: PreTrainedModel, processor: Any) -> Path:
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


def _randomise(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, seed: int, std: float = WEIGHT_STD
) -> PreTrainedModel:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.ndim >= 2:  # embeddings, projections, patch convolutions
                parameter.normal_(0.0, std, generator=generator)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return model.eval()


# The vision tower every tiny model shares: 2 layers of width 32 over 8x8 patches.
TINY_VISION_TOWER = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "image_size": IMAGE_SIZE,
    "patch_size": PATCH_SIZE,
}


def build_tiny_llava(directory: Path, *, seed: int = 0, tokenizer_cache_dir: Path | None = None) -> Path:
    """Save a tiny LlavaForConditionalGeneration and its LlavaProcessor in
    `directory` (AutoModelForImageTextToText / AutoProcessor load it). Each
    image becomes 16 `<image>` tokens (a 32x32 crop in 8x8 patches)."""
    directory = Path(directory)
    tokenizer = _tokenizer(tokenizer_cache_dir, ["<image>"])
    vision = CLIPVisionConfig(
        **TINY_VISION_TOWER,
        projection_dim=32,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=_text_config(tokenizer),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        tie_word_embeddings=True,
    )
    model = _random_model(LlavaForConditionalGeneration, config, tokenizer, seed)
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessorPil(
            size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
        ),
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS, dropped by the "default" strategy
        chat_template=LLAVA_CHAT_TEMPLATE,
    )
    return _saved(directory, model, processor)


def _idefics3_tokens() -> list[str]:
    tokens = ["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>"]
    return tokens + [f"<row_{row}_col_{col}>" for row in range(1, 7) for col in range(1, 7)]


def build_tiny_idefics3(directory: Path, *, seed: int = 0, tokenizer_cache_dir: Path | None = None) -> Path:
    """Save a tiny Idefics3ForConditionalGeneration and its Idefics3Processor
    in `directory`. Images are split into 32x32 tiles (longest edge resized to
    64) plus a global view, 4 `<image>` tokens each, so an image's token count
    depends on its shape."""
    return _build_tiled(
        directory,
        vision_config=Idefics3VisionConfig,
        config=Idefics3Config,
        model_class=Idefics3ForConditionalGeneration,
        processor_class=Idefics3Processor,
        image_processor=Idefics3ImageProcessorPil,
        chat_template=IDEFICS3_CHAT_TEMPLATE,
        seed=seed,
        tokenizer_cache_dir=tokenizer_cache_dir,
    )


def build_tiny_smolvlm(directory: Path, *, seed: int = 0, tokenizer_cache_dir: Path | None = None) -> Path:
    """Save a tiny SmolVLMForConditionalGeneration and its SmolVLMProcessor in
    `directory`, tiled as the Idefics3 one is. No video processor is saved, so
    AutoProcessor.from_pretrained cannot load it: load_model builds the
    processor from its image processor and tokenizer."""
    return _build_tiled(
        directory,
        vision_config=SmolVLMVisionConfig,
        config=SmolVLMConfig,
        model_class=SmolVLMForConditionalGeneration,
        processor_class=without_video_processor(SmolVLMProcessor),
        image_processor=SmolVLMImageProcessorPil,
        chat_template=SMOLVLM_CHAT_TEMPLATE,
        seed=seed,
        tokenizer_cache_dir=tokenizer_cache_dir,
        video_processor=None,
    )


def _build_tiled(
    directory: Path,
    *,
    vision_config: type,
    config: type,
    model_class: type,
    processor_class: type,
    image_processor: type,
    chat_template: str,
    seed: int,
    tokenizer_cache_dir: Path | None,
    **processor_parts: Any,
) -> Path:
    """An Idefics3-architecture model (Idefics3, SmolVLM) and its processor, saved:
    32x32 tiles plus a global view, 4 `<image>` tokens per tile."""
    directory = Path(directory)
    tokenizer = _tokenizer(tokenizer_cache_dir, _idefics3_tokens())
    vision = vision_config(
        **TINY_VISION_TOWER,
    )
    model_config = config(
        vision_config=vision,
        text_config=_text_config(tokenizer),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        scale_factor=2,
        tie_word_embeddings=True,
    )
    model = _random_model(model_class, model_config, tokenizer, seed)
    processor = processor_class(
        image_processor=image_processor(
            size={"longest_edge": 2 * IMAGE_SIZE}, max_image_size={"longest_edge": IMAGE_SIZE}
        ),
        tokenizer=tokenizer,
        image_seq_len=((IMAGE_SIZE // PATCH_SIZE) ** 2) // 4,  # scale_factor 2 merges 2x2 patches
        chat_template=chat_template,
        **processor_parts,
    )
    return _saved(directory, model, processor)


QWEN_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
QWEN_PATCH_SIZE = 14
QWEN_MERGE_SIZE = 2
# Pixels of an image after resizing, in merged 28x28 patches: 4 to 16 image tokens.
QWEN_MIN_PIXELS = 4 * (QWEN_PATCH_SIZE * QWEN_MERGE_SIZE) ** 2
QWEN_MAX_PIXELS = 16 * (QWEN_PATCH_SIZE * QWEN_MERGE_SIZE) ** 2


def build_tiny_qwen2_vl(directory: Path, *, seed: int = 0, tokenizer_cache_dir: Path | None = None) -> Path:
    """Save a tiny Qwen2VLForConditionalGeneration and its processor (PIL image
    processor, no video processor) in `directory`."""
    return _build_qwen(
        directory,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLProcessor,
        {},
        seed,
        tokenizer_cache_dir,
    )


def build_qwen2_vl_with_smollm2_text(
    directory: Path, *, seed: int = 0, tokenizer_cache_dir: Path | None = None
) -> Path:
    """Save a Qwen2-VL whose language model has the bundled SmolLM2-135M's shapes and depth (30
    layers, random weights) behind the tiny vision tower: prefills cost what they cost on the model
    users serve, for benchmarks (too slow for the tests)."""
    text = {
        **SMOLLM2_SHAPES,
        "num_hidden_layers": 30,
        # the head's 64 dimensions hold 32 rotary frequencies: 8 for time, 12 for height, 12 for width
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [8, 12, 12]},
    }
    return _build_qwen(
        directory,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLProcessor,
        {"hidden_size": SMOLLM2_SHAPES["hidden_size"], "mlp_ratio": 2},  # the merger's output: text width
        seed,
        tokenizer_cache_dir,
        text_settings=text,
        std=SMOLLM2_SHAPED_STD,
    )


def build_tiny_qwen2_5_vl(directory: Path, *, seed: int = 0, tokenizer_cache_dir: Path | None = None) -> Path:
    """Save a tiny Qwen2_5_VLForConditionalGeneration (windowed vision attention
    over 2x2 merged windows) and its processor in `directory`."""
    vision = {"out_hidden_size": 64, "intermediate_size": 64, "window_size": 56, "fullatt_block_indexes": [1]}
    return _build_qwen(
        directory,
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        vision,
        seed,
        tokenizer_cache_dir,
    )


def _build_qwen(
    directory: Path,
    config_class: type,
    model_class: type,
    processor_class: type,
    vision_settings: dict[str, Any],
    seed: int,
    tokenizer_cache_dir: Path | None,
    text_settings: dict[str, Any] | None = None,
    std: float = WEIGHT_STD,
) -> Path:
    directory = Path(directory)
    tokenizer = _tokenizer(tokenizer_cache_dir, QWEN_TOKENS)
    text = {
        **tiny_llama_settings(tokenizer),
        # the head's 16 dimensions hold 8 rotary frequencies: 2 for time, 3 for height, 3 for width
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
        **(text_settings or {}),
    }
    vision = {
        "depth": 2,
        "embed_dim": 32,
        "hidden_size": 32 if vision_settings else 64,
        "num_heads": 2,
        "patch_size": QWEN_PATCH_SIZE,
        "spatial_merge_size": QWEN_MERGE_SIZE,
        "temporal_patch_size": 2,
        **vision_settings,
    }
    if not vision_settings:
        vision["mlp_ratio"] = 2
    config = config_class(
        text_config=text,
        vision_config=vision,
        image_token_id=tokenizer.convert_tokens_to_ids("<|image_pad|>"),
        video_token_id=tokenizer.convert_tokens_to_ids("<|video_pad|>"),
        vision_start_token_id=tokenizer.convert_tokens_to_ids("<|vision_start|>"),
        vision_end_token_id=tokenizer.convert_tokens_to_ids("<|vision_end|>"),
        tie_word_embeddings=True,
    )
    model = _random_model(model_class, config, tokenizer, seed, std)
    processor = without_video_processor(processor_class)(
        image_processor=Qwen2VLImageProcessorPil(
            patch_size=QWEN_PATCH_SIZE,
            merge_size=QWEN_MERGE_SIZE,
            min_pixels=QWEN_MIN_PIXELS,
            max_pixels=QWEN_MAX_PIXELS,
        ),
        tokenizer=tokenizer,
        chat_template=QWEN2_VL_CHAT_TEMPLATE,
    )
    return _saved(directory, model, processor)


GEMMA3_TOKENS = {
    "boi_token": "<start_of_image>",
    "image_token": "<image_soft_token>",
    "eoi_token": "<end_of_image>",
}
GEMMA3_IMAGE_TOKENS = 4  # the tower's 4x4 patches pooled 2x2


def build_tiny_gemma3(directory: Path, *, seed: int = 0, tokenizer_cache_dir: Path | None = None) -> Path:
    """Save a tiny Gemma3ForConditionalGeneration and its Gemma3Processor in
    `directory`: every image resized to 32x32, 4 image tokens between
    <start_of_image> and <end_of_image>; 4 text layers, alternating sliding
    window (8 tokens) and full attention. Untied head: Gemma scales its input
    embeddings by sqrt(hidden), so a tied random head would mostly repeat the
    last token."""
    directory = Path(directory)
    source = tokenizer_cache_dir or default_tokenizer_cache_dir()
    smollm2_tokenizer(source)  # converted once
    tokenizer = AutoTokenizer.from_pretrained(
        source, padding_side="left", extra_special_tokens=dict(GEMMA3_TOKENS)
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]})
    text = {
        **tiny_llama_settings(tokenizer),
        "head_dim": 16,
        "num_hidden_layers": 4,
        "sliding_window": 8,
        "layer_types": ["sliding_attention", "full_attention"] * 2,
        "tie_word_embeddings": False,
    }
    config = Gemma3Config(
        text_config=text,
        vision_config=TINY_VISION_TOWER,
        mm_tokens_per_image=GEMMA3_IMAGE_TOKENS,
        boi_token_index=tokenizer.boi_token_id,
        eoi_token_index=tokenizer.eoi_token_id,
        image_token_index=tokenizer.image_token_id,
        tie_word_embeddings=False,
    )
    model = _random_model(Gemma3ForConditionalGeneration, config, tokenizer, seed)
    processor = Gemma3Processor(
        image_processor=Gemma3ImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}),
        tokenizer=tokenizer,
        image_seq_length=GEMMA3_IMAGE_TOKENS,
        chat_template=GEMMA3_CHAT_TEMPLATE,
    )
    return _saved(directory, model, processor)


Builder = Callable[..., Path]

# Every tiny vision-language model, by family name.
FAMILIES: dict[str, Builder] = {
    "llava": build_tiny_llava,
    "idefics3": build_tiny_idefics3,
    "smolvlm": build_tiny_smolvlm,
    "qwen2_vl": build_tiny_qwen2_vl,
    "qwen2_5_vl": build_tiny_qwen2_5_vl,
    "gemma3": build_tiny_gemma3,
}

# Vision-language models for benchmarks only, by name.
BENCH_FAMILIES: dict[str, Builder] = {"qwen2_vl_smollm2": build_qwen2_vl_with_smollm2_text}
