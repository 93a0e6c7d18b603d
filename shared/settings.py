"""Settings of the two kinds of process. The CLI fills them from flags and
MMSERVE_* environment variables; defaults come from shared.defaults."""

from __future__ import annotations

from dataclasses import dataclass

from shared import defaults


@dataclass(frozen=True)
class ApiSettings:
    redis_url: str
    port: int = defaults.INFERENCE_PORT
    management_port: int = defaults.MANAGEMENT_PORT
    openai_port: int = defaults.OPENAI_PORT
    body_size_limit_bytes: int = defaults.DEFAULT_BODY_SIZE_LIMIT_BYTES
    max_queue_depth: int | None = None
    api_key: str | None = None
    first_event_timeout_seconds: float = defaults.FIRST_EVENT_TIMEOUT_SECONDS
    next_event_timeout_seconds: float = defaults.NEXT_EVENT_TIMEOUT_SECONDS
    keepalive_seconds: float = defaults.SSE_KEEPALIVE_SECONDS
    image_dir: str | None = None  # the only folder image_paths may read; None = local paths rejected
    allow_remote_images: bool = False  # image_paths may be http(s) URLs
    max_image_pixels: int = defaults.DEFAULT_MAX_IMAGE_PIXELS
    supervisor_id: str | None = None  # set by `mmserve serve`: POST/DELETE /reader can manage workers


@dataclass(frozen=True)
class WorkerSettings:
    redis_url: str
    model: str | None = None  # None = the bundled SmolLM2-135M-Instruct
    consumer_group: str = defaults.DEFAULT_CONSUMER_GROUP
    max_batch_size: int = defaults.DEFAULT_MAX_BATCH_SIZE
    batch_duration_millis: int = defaults.DEFAULT_BATCH_DURATION_MILLIS
    batching: str = defaults.DEFAULT_BATCHING  # "continuous" or "micro"
    max_prefill_tokens_per_step: int = defaults.DEFAULT_MAX_PREFILL_TOKENS_PER_STEP
    prefill_width_multiple: int = 1  # >1: prompts left-padded to a multiple of this many tokens
    joint_prefill: str = "auto"  # "auto": newcomers prefilled in the decode step's forward; "off"
    device: str = "auto"
    dtype: str = "auto"
    quantize: str = "none"  # "int8" or "int4" (CPU only), see worker/engine/models/quantization.py
    pack_weights: str = "auto"  # "auto": bfloat16 linear weights pre-packed for oneDNN on a CPU; "off"
    fuse_layers: str = (
        "auto"  # "auto": Llama decoder layers run fused (worker/engine/models/fused_layers.py); "off"
    )
    threads: int | None = None  # None = chosen from the core count
    cache_dir: str | None = None  # where converted models are kept
    reader_id: str | None = None  # None = <consumer_group>-<random>
    lora_dir: str | None = None  # one PEFT adapter folder per LoRA id
    lora: tuple[str, ...] = ()  # more adapters, as "name=path"
    max_loras: int = defaults.DEFAULT_MAX_LORAS  # adapters in memory at once
