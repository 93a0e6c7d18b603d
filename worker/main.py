"""Starting one worker process: threads, model, engine, reader registration,
then RQ's work loop until SIGTERM/SIGINT (a running batch finishes first)."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import uuid

import torch

from shared import keys
from shared.connection import connect
from shared.readers import ReaderInfo
from shared.settings import WorkerSettings
from worker.batch_worker import BatchWorker
from worker.engine.engine import Engine
from worker.model_loading import DEFAULT_MODEL_NAME, load_model
from worker.reader import ReaderHeartbeat
from worker.reader_tools import ReaderTools

log = logging.getLogger(__name__)


def default_threads(workers_on_host: int = 1, cores: int | None = None) -> int:
    """Torch threads per worker: share the cores between the workers of this
    host and leave one core for Redis and the API when they run beside them.
    On 2 cores this gives 1 thread, which measured far faster under contention."""
    cores = cores or os.cpu_count() or 1
    spare = cores - 1 if cores > 1 else cores
    return max(1, spare // max(1, workers_on_host))


def configure_threads(threads: int | None) -> int:
    threads = threads or default_threads()
    torch.set_num_threads(threads)
    with contextlib.suppress(RuntimeError):  # already set, or parallel work already started
        torch.set_num_interop_threads(1)
    return threads


def run_worker(settings: WorkerSettings) -> None:
    threads = configure_threads(settings.threads)
    connection = connect(settings.redis_url)
    reader_id = settings.reader_id or f"{settings.consumer_group}-{uuid.uuid4().hex[:8]}"
    heartbeat = ReaderHeartbeat(
        connection,
        ReaderInfo(
            reader_id=reader_id,
            consumer_group=settings.consumer_group,
            model_name=settings.model or DEFAULT_MODEL_NAME,
            pids=[os.getpid()],
            ready=False,
            hostname=socket.gethostname(),
            threads=threads,
            max_batch_size=settings.max_batch_size,
            batch_duration_millis=settings.batch_duration_millis,
        ),
    )
    heartbeat.start()
    try:
        loaded = load_model(
            settings.model, device=settings.device, dtype=settings.dtype, cache_root=settings.cache_dir
        )
        engine = Engine(loaded.model, loaded.tokenizer, device=loaded.device, processor=loaded.processor)
        worker = BatchWorker(
            [keys.queue_name(settings.consumer_group)],
            engine=engine,
            max_batch_size=settings.max_batch_size,
            batch_duration_millis=settings.batch_duration_millis,
            batching=settings.batching,
            max_prefill_tokens_per_step=settings.max_prefill_tokens_per_step,
            connection=connection,
            name=reader_id,
        )
        heartbeat.update(
            model_name=loaded.name,
            model_type=loaded.model_type,
            ready=True,
            device=str(loaded.device),
            dtype=str(loaded.dtype).removeprefix("torch."),
            context_length=engine.context_length,
            has_chat_template=engine.has_chat_template,
        )
        log.info(
            "reader %s serving %s for group %r (%d thread(s), batch <= %d rows, window %d ms)",
            reader_id,
            loaded.name,
            settings.consumer_group,
            threads,
            settings.max_batch_size,
            settings.batch_duration_millis,
        )
        heartbeat.stats = worker.stats.snapshot
        tools = ReaderTools(connection, reader_id, loaded.tokenizer).start()
        try:
            worker.work(logging_level=logging.getLevelName(logging.getLogger().level))
        finally:
            tools.stop()
    finally:
        heartbeat.stop()
