"""The command-line flags, each also an environment variable MMSERVE_<FLAG>.
Defaults come from shared.defaults."""

from __future__ import annotations

from collections.abc import Callable

import click

from shared import defaults

DEVICES = click.Choice(["auto", "cpu", "cuda"], case_sensitive=False)
DTYPES = click.Choice(["auto", "float32", "bfloat16", "float16"], case_sensitive=False)


class _Option:
    """A flag, its MMSERVE_* environment variable, and the python name click gives it."""

    def __init__(self, flag: str, **kwargs):
        self.name = flag.lstrip("-").replace("-", "_")
        self._decorator = click.option(
            flag, envvar="MMSERVE_" + self.name.upper(), show_envvar=True, show_default=True, **kwargs
        )

    def __call__(self, function: Callable) -> Callable:
        return self._decorator(function)


_option = _Option


def _auto_or_off(flag: str, help: str) -> _Option:
    """A flag that is `auto` (on where it applies) unless set to `off`."""
    return _Option(flag, default="auto", type=click.Choice(["auto", "off"]), help=help)


REDIS_URL = _option(
    "--redis-url",
    default=None,
    help="Redis to use (redis://, rediss://, unix://). `serve` starts a private redis-server when unset.",
)
LOG_LEVEL = _option("--log-level", default="INFO", type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"]))
LOG_FORMAT = _option(
    "--log-format",
    default="text",
    type=click.Choice(["text", "json"]),
    help="json: one JSON object per line.",
)

API_OPTIONS = [
    _option("--host", default="0.0.0.0", help="Address the API listens on."),
    _option("--port", default=defaults.INFERENCE_PORT, type=int, help="Inference port."),
    _option("--management-port", default=defaults.MANAGEMENT_PORT, type=int, help="Management port."),
    _option(
        "--openai-port",
        default=defaults.OPENAI_PORT,
        type=int,
        help="Port of the OpenAI-compatible API (/v1/chat/completions, /v1/completions, /v1/models).",
    ),
    _option(
        "--body-size-limit-bytes",
        default=defaults.DEFAULT_BODY_SIZE_LIMIT_BYTES,
        type=click.IntRange(1),
        help="Largest request body accepted (413 beyond).",
    ),
    _option(
        "--max-queue-depth",
        default=None,
        type=click.IntRange(1),
        help="Jobs waiting per consumer group before new requests get 429 (unset = no limit).",
    ),
    _option(
        "--api-key",
        default=None,
        help="If set, every route but /healthz needs this key (Authorization: Bearer KEY or X-API-Key: KEY).",
    ),
    _option(
        "--queue-timeout-seconds",
        default=defaults.FIRST_EVENT_TIMEOUT_SECONDS,
        type=click.FloatRange(min=0, min_open=True),
        help="A request no worker has started within this time is ended (504) and taken off the queue.",
    ),
    _option(
        "--image-dir",
        default=None,
        type=click.Path(exists=True, file_okay=False, resolve_path=True),
        help="The only folder image_paths may read images from (unset = local image_paths are rejected).",
    ),
    _option(
        "--allow-remote-images",
        is_flag=True,
        default=False,
        help="Let image_paths hold http(s) URLs, fetched by the API (size-capped, with a timeout).",
    ),
    _option(
        "--max-image-pixels",
        default=defaults.DEFAULT_MAX_IMAGE_PIXELS,
        type=click.IntRange(1),
        help="Largest image accepted, in pixels (width x height; 413 beyond, checked before decoding).",
    ),
    _option(
        "--api-processes",
        default=1,
        type=click.IntRange(1),
        help="gunicorn worker processes (each serves many streams with gevent).",
    ),
]

WORKER_OPTIONS = [
    _option(
        "--model",
        default=None,
        help="Hugging Face model id or local path. Unset = the bundled SmolLM2-135M-Instruct.",
    ),
    _option(
        "--consumer-group", default=defaults.DEFAULT_CONSUMER_GROUP, help="Group (queue) the worker serves."
    ),
    _option(
        "--max-batch-size",
        default=defaults.DEFAULT_MAX_BATCH_SIZE,
        type=click.IntRange(1),
        help="Most rows decoded together.",
    ),
    _option(
        "--batch-duration-millis",
        default=defaults.DEFAULT_BATCH_DURATION_MILLIS,
        type=click.IntRange(0),
        help="How long a worker keeps collecting jobs after the first one before it starts.",
    ),
    _option(
        "--batching",
        default=defaults.DEFAULT_BATCHING,
        type=click.Choice(defaults.BATCHING_MODES),
        help="continuous = requests join and leave the running batch between decode steps; "
        "micro = a batch runs to the end before the next starts.",
    ),
    _option(
        "--max-prefill-tokens-per-step",
        default=defaults.DEFAULT_MAX_PREFILL_TOKENS_PER_STEP,
        type=click.IntRange(1),
        help="Continuous batching: most prompt tokens prefilled between two decode steps "
        "(a longer prompt runs alone in its step).",
    ),
    _option(
        "--prefill-width-multiple",
        default=1,
        type=click.IntRange(1),
        help="Left-pad every prefill to a multiple of this many tokens. 16 bounds a bfloat16 CPU "
        "worker's memory under prompts of ever new lengths (oneDNN keeps state per shape); "
        "1 keeps greedy answers equal to unpadded generate.",
    ),
    _auto_or_off(
        "--joint-prefill",
        "auto = with continuous batching, newcomers' prompts are prefilled in the running "
        "rows' decode step (one forward instead of two; fused Llama text models, no prefill "
        "padding); off = every prefill in a forward of its own.",
    ),
    _option("--device", default="auto", type=DEVICES, help="auto = cuda when available, else cpu."),
    _option(
        "--dtype",
        default="auto",
        type=DTYPES,
        help="auto = bfloat16 where the CPU/GPU supports it, else float32.",
    ),
    _option(
        "--quantize",
        default="none",
        type=click.Choice(["none", "int8", "int4"]),
        help="int8 = int8 weights in every linear layer but the output head (CPU only; faster, "
        "answers differ from the unquantized model's). int4 = 4-bit weights (groups of 32) in "
        "every linear layer but the head, used for decode steps of <= 4 rows (CPU, bfloat16; "
        "~1.7x faster decode steps at batch 1, 1.25x bfloat16's weight memory).",
    ),
    _auto_or_off(
        "--pack-weights",
        "auto = on a CPU, bfloat16 linear weights are packed once for oneDNN "
        "(same results, faster decode); off = torch's default linear.",
    ),
    _auto_or_off(
        "--fuse-layers",
        "auto = Llama-architecture decoder layers run as one module each, their query/key/value "
        "and gate/up projections stacked (same answers, faster decode; not with LoRA adapters); "
        "off = transformers' own layers.",
    ),
    _option(
        "--threads",
        default=None,
        type=click.IntRange(1),
        help="torch threads per worker (unset = share the cores, leaving one for Redis and the API).",
    ),
    _option(
        "--cache-dir", default=None, help="Where converted models are cached (default ~/.cache/mmserve)."
    ),
    _option(
        "--lora-dir",
        default=None,
        type=click.Path(file_okay=False),
        help="Folder of LoRA adapters: each sub-folder holding a PEFT adapter_config.json is an "
        "adapter, its name the lora_id requests use (read again as adapters are added).",
    ),
    _option(
        "--lora",
        multiple=True,
        metavar="NAME=PATH",
        help="A LoRA adapter by name (repeatable; wins over a --lora-dir folder of the same name).",
    ),
    _option(
        "--max-loras",
        default=defaults.DEFAULT_MAX_LORAS,
        type=click.IntRange(1),
        help="LoRA adapters kept in memory at once; the least recently used one is evicted.",
    ),
    _option(
        "--reader-id",
        default=None,
        help="Name the worker registers under (default <consumer-group>-<random>); `serve` sets it.",
    ),
]


def pick(values: dict, options: list[_Option]) -> dict:
    """The subset of a command's keyword arguments that belong to `options`."""
    return {option.name: values[option.name] for option in options}


def apply(options: list[_Option]) -> Callable:
    def decorate(function: Callable) -> Callable:
        for option in reversed(options):
            function = option(function)
        return function

    return decorate
