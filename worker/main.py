"""Starting one worker process: threads, model, engine, its registry entry, then
RQ's work loop until SIGTERM/SIGINT (a running batch finishes first).

Easy to get wrong: the worker registers as a reader (not ready) before the model
loads, so that a slow load shows in the registry rather than as a missing worker."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import uuid
from pathlib import Path
from typing import Any

import redis
import torch

from shared import defaults, jobs, keys, registry
from shared.connection import connect
from shared.registry import LoraStatus, ReaderInfo
from shared.settings import WorkerSettings
from worker.engine.adapters import ADAPTER_CONFIG, AdapterCatalog, LoraAdapters, parse_named
from worker.engine.engine import Engine
from worker.engine.models.fused_layers import FusedLlamaLayer, fuse_layers
from worker.engine.models.image_pixels import bound_image_pixels, pixel_bounds
from worker.engine.models.loading import DEFAULT_MODEL_NAME, LoadedModel, load_model
from worker.engine.models.quantization import quantize
from worker.engine.models.weight_packing import pack_weights
from worker.engine.speculation.draft_model import DraftModel, measured_cost
from worker.heartbeat import Heartbeat
from worker.reader_calls import ReaderCallServer
from worker.rq_worker import BatchWorker

log = logging.getLogger(__name__)


def default_threads(workers_on_host: int = 1, cores: int | None = None) -> int:
    """Torch threads per worker: share the cores between the workers of this
    host and leave one core for Redis and the API when they run beside them
    (on 2 cores: 1 thread)."""
    cores = cores or os.cpu_count() or 1
    spare = cores - 1 if cores > 1 else cores
    return max(1, spare // max(1, workers_on_host))


def configure_threads(threads: int | None) -> int:
    threads = threads or default_threads()
    torch.set_num_threads(threads)
    with contextlib.suppress(RuntimeError):  # already set, or parallel work already started
        torch.set_num_interop_threads(1)
    return threads


def lora_catalog(settings: WorkerSettings) -> AdapterCatalog:
    """Where the worker's LoRA adapters live (--lora-dir, --lora); checked before the model loads."""
    catalog = AdapterCatalog(
        directory=Path(settings.lora_dir) if settings.lora_dir else None, named=parse_named(settings.lora)
    )
    if catalog.directory is not None and not catalog.directory.is_dir():
        log.warning("--lora-dir %s is not a folder (yet): no adapters from it until it is", catalog.directory)
    for name, path in catalog.named.items():
        if not (path / ADAPTER_CONFIG).is_file():
            raise ValueError(f"--lora {name}={path}: no {ADAPTER_CONFIG} in that folder")
    return catalog


def compute_dtype(settings: WorkerSettings, catalog: AdapterCatalog) -> str:
    """The --dtype to load the model in, checked against --quantize before the model loads."""
    if settings.quantize == "none":
        return settings.dtype
    if not catalog.empty:
        raise ValueError("LoRA adapters need the unquantized model: drop --quantize or the --lora flags")
    if settings.quantize == "int4":
        if settings.dtype not in ("auto", "bfloat16"):
            raise ValueError(
                f"--quantize int4 computes in bfloat16: leave --dtype auto, not {settings.dtype}"
            )
        return "bfloat16"  # the int4 kernel's dtype, whatever --dtype auto would pick
    if settings.dtype not in ("auto", "float32"):
        raise ValueError(
            f"--quantize {settings.quantize} computes in float32: leave --dtype auto, not {settings.dtype}"
        )
    return "float32"  # quantized from full-precision weights, not from bfloat16-rounded ones


def check_speculation(settings: WorkerSettings) -> None:
    """Refuse --speculative draft without a draft model before anything loads."""
    if settings.speculative == "draft" and settings.draft_model is None:
        raise ValueError("--speculative draft drafts with a draft model: give --draft-model too")


def load_draft_model(settings: WorkerSettings, loaded: LoadedModel) -> DraftModel | None:
    """The draft model (--draft-model), in the model's dtype and on its device, its layers
    fused like the model's; None without one, or when --speculative never asks it."""
    if settings.draft_model is None:
        return None
    if settings.speculative not in ("auto", "draft"):
        log.warning("--draft-model is not used with --speculative %s", settings.speculative)
        return None
    dtype = str(loaded.dtype).removeprefix("torch.")
    name = settings.draft_model
    draft = load_model(name, device=str(loaded.device), dtype=dtype, cache_root=settings.cache_dir)
    if draft.model_type != "CAUSAL":
        raise ValueError(f"--draft-model {name} is a {draft.model_type} model: it must be a text model")
    fuse_layers(draft.model, settings.fuse_layers)
    cost = measured_cost(draft.model, loaded.model)
    return DraftModel.over(draft.model, draft.tokenizer, loaded.model, loaded.tokenizer, name=name, cost=cost)


def check_image_pixels(settings: WorkerSettings) -> None:
    """Refuse --image-min-pixels above --image-max-pixels before the model loads."""
    low, high = settings.image_min_pixels, settings.image_max_pixels
    if low is not None and high is not None and low > high:
        raise ValueError(f"--image-min-pixels ({low}) is above --image-max-pixels ({high})")


def load_for_serving(settings: WorkerSettings, catalog: AdapterCatalog | None = None) -> LoadedModel:
    """The model as a worker serves it: loaded in the dtype `compute_dtype`
    picks, its decoder layers fused (--fuse-layers, not when it serves LoRA
    adapters from `catalog`: they adapt the separate projections), quantized
    (--quantize) and its weights packed (--pack-weights)."""
    catalog = catalog or AdapterCatalog()
    dtype = compute_dtype(settings, catalog)
    loaded = load_model(settings.model, device=settings.device, dtype=dtype, cache_root=settings.cache_dir)
    if loaded.processor is not None:
        bound_image_pixels(loaded.processor, settings.image_min_pixels, settings.image_max_pixels)
    elif settings.image_min_pixels is not None or settings.image_max_pixels is not None:
        raise ValueError("--image-min-pixels / --image-max-pixels apply to vision-language models only")
    if catalog.empty:
        fuse_layers(loaded.model, settings.fuse_layers)
    elif settings.fuse_layers != "off":
        log.info("decoder layers not fused: LoRA adapters adapt their separate projections")
    quantize(loaded.model, settings.quantize)
    pack_weights(loaded.model, settings.pack_weights)
    return loaded


def lora_status(engine: Engine) -> LoraStatus:
    """What the reader registry says of the worker's adapters (read from the heartbeat thread)."""
    adapters = engine.adapters
    if adapters is None:
        return LoraStatus()
    return LoraStatus(available=adapters.available(), loaded=adapters.loaded, max_loaded=adapters.max_loaded)


def run_worker(settings: WorkerSettings) -> None:
    """Serve the consumer group's queue until SIGTERM/SIGINT; deregisters on the way out."""
    threads = configure_threads(settings.threads)
    catalog = lora_catalog(settings)
    compute_dtype(settings, catalog)  # refuse bad flag combinations before anything starts
    check_image_pixels(settings)
    check_speculation(settings)
    connection = connect(settings.redis_connection_url)
    reader_id = settings.reader_id or f"{settings.consumer_group}-{uuid.uuid4().hex[:8]}"
    heartbeat = Heartbeat(connection, registry_entry(settings, reader_id, threads))
    heartbeat.start()
    try:
        loaded = load_for_serving(settings, catalog)
        engine = build_engine(settings, loaded, catalog, load_draft_model(settings, loaded))
        group = settings.consumer_group
        own_queue = jobs.open_reader_queue(connection, group, reader_id)
        heartbeat.chores.append(
            lambda: jobs.requeue_orphans(
                connection, group, {reader.reader_id for reader in registry.live_readers(connection, group)}
            )
        )
        worker = BatchWorker(
            [own_queue.name, keys.queue_name(group)],  # its own first (jobs routed to it), then the group's
            engine=engine,
            max_batch_size=settings.max_batch_size,
            batch_duration_millis=settings.batch_duration_millis,
            batching=settings.batching,
            max_prefill_tokens_per_step=settings.max_prefill_tokens_per_step,
            connection=connection,
            name=reader_id,
        )
        heartbeat.refresh = lambda: {
            "stats": worker.stats.snapshot(engine.prefix_cache, engine.drafting.counters),
            "loras": lora_status(engine),
        }
        heartbeat.update(**serving_facts(settings, loaded, engine))
        log.info(
            "reader %s serving %s for group %r (%d thread(s), batch <= %d rows, window %d ms)",
            reader_id,
            loaded.name,
            settings.consumer_group,
            threads,
            settings.max_batch_size,
            settings.batch_duration_millis,
        )
        calls = ReaderCallServer(connection, reader_id, loaded.tokenizer, engine=engine).start()
        try:
            worker.work(logging_level=logging.getLevelName(logging.getLogger().level))
        finally:
            calls.stop()
    finally:
        heartbeat.stop()
        with contextlib.suppress(redis.RedisError):
            moved = jobs.close_reader_queue(connection, settings.consumer_group, reader_id)
            if moved:
                log.info("moved %d job(s) waiting on reader %s to its group's queue", moved, reader_id)


def registry_entry(settings: WorkerSettings, reader_id: str, threads: int) -> ReaderInfo:
    """What the registry says of this worker before its model has loaded (not ready)."""
    return ReaderInfo(
        reader_id=reader_id,
        consumer_group=settings.consumer_group,
        model_name=settings.model or DEFAULT_MODEL_NAME,
        pids=[os.getpid()],
        ready=False,
        hostname=socket.gethostname(),
        threads=threads,
        max_batch_size=settings.max_batch_size,
        batch_duration_millis=settings.batch_duration_millis,
    )


def build_engine(
    settings: WorkerSettings,
    loaded: LoadedModel,
    catalog: AdapterCatalog,
    draft_model: DraftModel | None = None,
) -> Engine:
    """The engine over the loaded model, with the LoRA adapters of `catalog` if it has any
    and the draft model (`load_draft_model`) if given."""
    adapters = (
        LoraAdapters(loaded.model, catalog, max_loaded=settings.max_loras) if not catalog.empty else None
    )
    if adapters is not None:
        log.info("LoRA adapters: %s (at most %d in memory)", adapters.available(), settings.max_loras)
    return Engine(
        loaded.model,
        loaded.tokenizer,
        device=loaded.device,
        processor=loaded.processor,
        adapters=adapters,
        prefill_width_multiple=settings.prefill_width_multiple,
        joint_prefill=settings.joint_prefill == "auto",
        batch_invariant=settings.batch_invariant == "on",
        prefix_cache_bytes=prefix_cache_bytes(settings, loaded.device),
        prefix_block_tokens=settings.prefix_cache_block_tokens,
        speculative=settings.speculative,
        draft_tokens=settings.draft_tokens,
        draft_model=draft_model,
    )


def prefix_cache_bytes(settings: WorkerSettings, device: torch.device) -> int:
    """The prefix cache's bound: --prefix-cache-bytes, or a share of the device's memory; 0 when off."""
    if settings.prefix_cache == "off":
        return 0
    if settings.prefix_cache_bytes is not None:
        return settings.prefix_cache_bytes
    device = torch.device(device)
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
    else:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return min(int(total * defaults.PREFIX_CACHE_MEMORY_SHARE), defaults.PREFIX_CACHE_MAX_AUTO_BYTES)


def serving_facts(settings: WorkerSettings, loaded: LoadedModel, engine: Engine) -> dict[str, Any]:
    """The ReaderInfo fields that become known once the model has loaded; ready=True."""
    return {
        "model_name": loaded.name,
        "model_type": loaded.model_type,
        "ready": True,
        "device": str(loaded.device),
        "dtype": str(loaded.dtype).removeprefix("torch."),  # float32 under --quantize (compute_dtype)
        "quantization": settings.quantize,
        "fused_layers": sum(isinstance(module, FusedLlamaLayer) for module in loaded.model.modules()),
        "joint_prefill": engine.joint_prefill,
        "batch_invariant": engine.invariance is not None and engine.invariance.covered,
        "batch_invariance": engine.invariance.describe() if engine.invariance is not None else "off",
        "prefix_cache": "on" if engine.prefix_cache is not None else engine.prefix_cache_off_reason,
        "prefix_cache_bytes": engine.prefix_cache.max_bytes if engine.prefix_cache is not None else 0,
        "prefix_cache_block_tokens": engine.prefix_block_tokens,
        "speculative": engine.drafting.mode
        if engine.speculation_off_reason is None
        else engine.speculation_off_reason,
        "draft_tokens": engine.drafting.draft_tokens,
        "draft_model": engine.drafting.model.name if engine.drafting.model is not None else None,
        "context_length": engine.context_length,
        "has_chat_template": engine.has_chat_template,
        **_pixel_facts(loaded),
    }


def _pixel_facts(loaded: LoadedModel) -> dict[str, int]:
    bounds = pixel_bounds(loaded.processor) if loaded.processor is not None else None
    if bounds is None:
        return {}
    return {"image_min_pixels": bounds.min_pixels, "image_max_pixels": bounds.max_pixels}
