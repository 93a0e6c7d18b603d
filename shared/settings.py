"""Settings of the two kinds of process. The CLI fills them from flags and
MMSERVE_* environment variables; defaults come from shared.limits."""

from __future__ import annotations

from dataclasses import dataclass

from shared import limits


@dataclass(frozen=True)
class ApiSettings:
    redis_url: str
    port: int = limits.INFERENCE_PORT
    management_port: int = limits.MANAGEMENT_PORT
    openai_port: int = limits.OPENAI_PORT
    body_size_limit_bytes: int = limits.DEFAULT_BODY_SIZE_LIMIT_BYTES
    max_queue_depth: int | None = None
    api_key: str | None = None
    first_event_timeout_seconds: float = limits.FIRST_EVENT_TIMEOUT_SECONDS
    next_event_timeout_seconds: float = limits.NEXT_EVENT_TIMEOUT_SECONDS
    keepalive_seconds: float = limits.SSE_KEEPALIVE_SECONDS
    image_dir: str | None = None  # the only folder image_paths may read; None = local paths rejected
    allow_remote_images: bool = False  # image_paths may be http(s) URLs
    max_image_pixels: int = limits.DEFAULT_MAX_IMAGE_PIXELS
    supervisor_id: str | None = None  # set by `mmserve serve`: POST/DELETE /reader can manage workers


@dataclass(frozen=True)
class WorkerSettings:
    redis_url: str
    model: str | None = None  # None = the bundled SmolLM2-135M-Instruct
    consumer_group: str = limits.DEFAULT_CONSUMER_GROUP
    max_batch_size: int = limits.DEFAULT_MAX_BATCH_SIZE
    batch_duration_millis: int = limits.DEFAULT_BATCH_DURATION_MILLIS
    batching: str = limits.DEFAULT_BATCHING  # "continuous" or "micro"
    max_prefill_tokens_per_step: int = limits.DEFAULT_MAX_PREFILL_TOKENS_PER_STEP
    prefill_width_multiple: int = 1  # >1: prompts left-padded to a multiple of this many tokens
    joint_prefill: str = "auto"  # "auto": newcomers prefilled in the decode step's forward; "off"
    device: str = "auto"
    dtype: str = "auto"
    quantize: str = "none"  # "int8" or "int4" (CPU only), see worker/quantization.py
    pack_weights: str = "auto"  # "auto": bfloat16 linear weights pre-packed for oneDNN on a CPU; "off"
    fuse_layers: str = "auto"  # "auto": Llama decoder layers run fused (worker/fused_layers.py); "off"
    threads: int | None = None  # None = chosen from the core count
    cache_dir: str | None = None  # where converted models are kept
    reader_id: str | None = None  # None = <consumer_group>-<random>
    lora_dir: str | None = None  # one PEFT adapter folder per LoRA id
    lora: tuple[str, ...] = ()  # more adapters, as "name=path"
    max_loras: int = limits.DEFAULT_MAX_LORAS  # adapters in memory at once
