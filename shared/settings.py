"""Every setting of mmserve, declared once, as a field of the settings class of the process that reads it.

A field's `setting(...)` gives its flag, environment variable (MMSERVE_<FLAG>), default, range and one-line
help; its annotation gives its type. From these the CLI makes its flags (mmserve/options.py), the API process
reads its settings back from the environment (api/wsgi.py), POST /reader validates the worker settings it may
override (shared/supervision.py) and docs/configuration.md is written (mmserve/configuration.py).

A field declared with no flag is set through its environment variable only. A field's name may differ from
its flag (`first_event_timeout_seconds` is --queue-timeout-seconds): code reads the field, operators the flag.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from shared import defaults
from shared.connection import with_tls_files

TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off")


@dataclass(frozen=True)
class Setting:
    """One declared setting. `attribute`, `kind` and `repeatable` come from the field it is declared on."""

    flag: str | None  # None: an environment variable only
    env: str
    help: str
    default: Any = None
    required: bool = False  # the settings object needs a value, even where the flag may be left unset
    choices: tuple[str, ...] = ()
    ignore_case: bool = False  # choices match in any case (and are passed on as declared)
    minimum: int | float | None = None
    above_minimum: bool = False  # the minimum itself is refused
    maximum: int | float | None = None
    directory: bool = False  # the value is a folder
    must_exist: bool = False  # ... that must exist; the CLI makes it absolute
    metavar: str | None = None
    attribute: str = ""
    kind: type = str  # str, int, float or bool
    repeatable: bool = False  # a tuple of str, the flag given once per value

    def parse(self, text: str) -> Any:
        """The value an environment variable holds; ValueError names the variable."""
        if self.repeatable:
            return tuple(text.split())
        if self.kind is bool:
            word = text.strip().lower()
            if word in TRUE_WORDS or word in FALSE_WORDS:
                return word in TRUE_WORDS
            raise ValueError(f"{self.env} must be true or false, got {text!r}")
        if self.kind in (int, float):
            try:
                value = self.kind(text)
            except ValueError:
                expected = "an integer" if self.kind is int else "a number"
                raise ValueError(f"{self.env} must be {expected}, got {text!r}") from None
            self._check_range(value)
            return value
        if self.choices:
            for choice in self.choices:
                if choice == text or (self.ignore_case and choice.lower() == text.lower()):
                    return choice
            raise ValueError(f"{self.env} must be one of {', '.join(self.choices)}, got {text!r}")
        return text

    def _check_range(self, value: int | float) -> None:
        if self.maximum is not None and value > self.maximum:
            raise ValueError(f"{self.env} must be <= {self.maximum}, got {value}")
        if self.minimum is None:
            return
        if value < self.minimum or (self.above_minimum and value == self.minimum):
            bound = f"> {self.minimum}" if self.above_minimum else f">= {self.minimum}"
            raise ValueError(f"{self.env} must be {bound}, got {value}")

    def format(self, value: Any) -> str | None:
        """The environment variable's text for `value`, which `parse` reads back; None = leave it unset."""
        if value is None or value is False or value == ():
            return None
        if value is True:
            return "1"
        if isinstance(value, tuple | list):
            return " ".join(str(one) for one in value)
        return str(value)


def setting(
    flag: str | None,
    default: Any,
    help: str,
    *,
    env: str | None = None,
    required: bool = False,
    choices: tuple[str, ...] = (),
    ignore_case: bool = False,
    minimum: int | float | None = None,
    above_minimum: bool = False,
    maximum: int | float | None = None,
    directory: bool = False,
    must_exist: bool = False,
    metavar: str | None = None,
) -> Any:
    """Declare a settings field. The environment variable is MMSERVE_<FLAG> unless `env` names another."""
    if env is None:
        if flag is None:
            raise ValueError("a setting without a flag needs its environment variable")
        env = "MMSERVE_" + flag.lstrip("-").replace("-", "_").upper()
    declared = Setting(
        flag=flag,
        env=env,
        help=help,
        default=default,
        required=required,
        choices=choices,
        ignore_case=ignore_case,
        minimum=minimum,
        above_minimum=above_minimum,
        maximum=maximum,
        directory=directory,
        must_exist=must_exist,
        metavar=metavar,
    )
    if required:
        return field(metadata={"setting": declared})
    return field(default=default, metadata={"setting": declared})


@functools.cache
def declared(settings_class: type) -> tuple[Setting, ...]:
    """The settings declared on a settings class (its base's first), with their attribute and type."""
    hints = typing.get_type_hints(settings_class)
    found = []
    for one in dataclasses.fields(settings_class):
        if "setting" not in one.metadata:
            continue
        kind = hints[one.name]
        if isinstance(kind, types.UnionType):  # X | None
            kind = next(arg for arg in typing.get_args(kind) if arg is not type(None))
        repeatable = typing.get_origin(kind) is tuple
        found.append(
            dataclasses.replace(
                one.metadata["setting"],
                attribute=one.name,
                kind=str if repeatable else kind,
                repeatable=repeatable,
            )
        )
    return tuple(found)


def from_environment(settings_class: type, environ: Mapping[str, str]) -> Any:
    """A settings object from its environment variables; unset or empty ones keep their default."""
    values = {}
    for one in declared(settings_class):
        text = environ.get(one.env)
        if text:
            values[one.attribute] = one.parse(text)
        elif one.required:
            raise ValueError(f"{one.env} is not set")
    return settings_class(**values)


def environment_of(settings_class: type, values: Mapping[str, Any]) -> dict[str, str | None]:
    """The environment variables that carry `values` (by attribute) to `from_environment`; None = unset."""
    by_attribute = {one.attribute: one for one in declared(settings_class)}
    return {by_attribute[name].env: by_attribute[name].format(value) for name, value in values.items()}


# -- the declarations --------------------------------------------------------------------------------------

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
LOG_FORMATS = ("text", "json")
DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "float32", "bfloat16", "float16")
QUANTIZATIONS = ("none", "int8", "int4")
AUTO_OR_OFF = ("auto", "off")
ON_OR_OFF = ("on", "off")


@dataclass(frozen=True)
class ProcessSettings:
    """What every process reads: `mmserve serve`, `api` and `worker` all take these."""

    redis_url: str = setting(
        "--redis-url",
        None,
        "Redis to use: redis://, rediss:// (TLS), unix://, or redis+sentinel://host:port[,host:port...]/"
        "<master-name>[/db] (the master named by Redis Sentinel, followed through failovers). `serve` starts "
        "a private redis-server when unset; `api` and `worker` need it.",
        required=True,
    )
    redis_ca_file: str | None = setting(
        "--redis-ca-file",
        None,
        "rediss://: the CA certificate (PEM) the Redis server's certificate is checked against (unset = "
        "the system's CAs). Also `?ssl_ca_certs=` in the URL.",
    )
    redis_cert_file: str | None = setting(
        "--redis-cert-file",
        None,
        "rediss://: this process's client certificate (PEM), for a server that asks for one. Also "
        "`?ssl_certfile=` in the URL.",
    )
    redis_key_file: str | None = setting(
        "--redis-key-file",
        None,
        "rediss://: the private key of --redis-cert-file, when that file does not hold it. Also "
        "`?ssl_keyfile=` in the URL.",
    )
    log_level: str = setting("--log-level", "INFO", "Lowest level of log line written.", choices=LOG_LEVELS)
    log_format: str = setting(
        "--log-format", "text", "text, or json: one JSON object per line.", choices=LOG_FORMATS
    )

    @property
    def redis_connection_url(self) -> str:
        """--redis-url with the TLS files in its query (shared.connection.with_tls_files)."""
        return with_tls_files(self.redis_url, self.redis_ca_file, self.redis_cert_file, self.redis_key_file)


@dataclass(frozen=True)
class ServeSettings:
    """What `mmserve serve` alone reads."""

    workers: int = setting(
        "--workers", 1, "Worker processes to start on this machine (with --config: per reader).", minimum=1
    )
    config: str | None = setting(
        "--config",
        None,
        "A Takeoff manifest (config.yaml: takeoff.server_config and readers_config): each reader's workers "
        "and the API's ports and limits, where flags leave them at their defaults (docs: Configuration). "
        "Unset: TAKEOFF_* variables, if any, make one.",
    )


@dataclass(frozen=True)
class ApiSettings(ProcessSettings):
    """What the API process reads (`mmserve serve` and `mmserve api`). The CLI reads `host` and
    `api_processes` to start gunicorn; the app reads the rest."""

    host: str = setting("--host", "0.0.0.0", "Address the API listens on.")
    port: int = setting("--port", defaults.INFERENCE_PORT, "Inference port.")
    management_port: int = setting("--management-port", defaults.MANAGEMENT_PORT, "Management port.")
    openai_port: int = setting(
        "--openai-port",
        defaults.OPENAI_PORT,
        "Port of the OpenAI-compatible API (/v1/chat/completions, /v1/completions, /v1/models).",
    )
    body_size_limit_bytes: int = setting(
        "--body-size-limit-bytes",
        defaults.DEFAULT_BODY_SIZE_LIMIT_BYTES,
        "Largest request body accepted (413 beyond).",
        minimum=1,
    )
    discard_body_limit_bytes: int = setting(
        "--discard-body-limit-bytes",
        defaults.DEFAULT_DISCARD_BODY_LIMIT_BYTES,
        "A body over --body-size-limit-bytes is read and thrown away up to this many bytes before the 413 "
        "goes out (clients that send a whole body before reading the answer then get it); past this, the "
        "connection is closed at once.",
        minimum=0,
    )
    max_queue_depth: int | None = setting(
        "--max-queue-depth",
        None,
        "Jobs waiting per consumer group before new requests get 429 (unset = no limit).",
        minimum=1,
    )
    prefix_routing: str = setting(
        "--prefix-routing",
        "on",
        "on = with several workers in a group, a request goes to the worker most likely to hold its "
        "prompt's prefix in its prefix cache (a chat's turns to one worker), unless that worker has a "
        "batch's worth waiting; off = every request on the group's queue, for any worker.",
        choices=ON_OR_OFF,
    )
    scale_from_zero: str = setting(
        "--scale-from-zero",
        "off",
        "on = a request for a consumer group whose workers are all gone (scaled to zero) or still "
        "loading is queued and waits up to --queue-timeout-seconds for one (an autoscaler such as "
        "KEDA starts it on the queue's length), and such a group does not make /readyz fail; off = "
        "it is answered 503 with Retry-After.",
        choices=ON_OR_OFF,
    )
    api_key: str | None = setting(
        "--api-key",
        None,
        "If set, every route but /healthz and the playground's page (GET /, which asks for the key) needs "
        "this key (Authorization: Bearer KEY or X-API-Key: KEY).",
    )
    first_event_timeout_seconds: float = setting(
        "--queue-timeout-seconds",
        defaults.FIRST_EVENT_TIMEOUT_SECONDS,
        "A request no worker has started within this time is ended (504) and taken off the queue.",
        minimum=0,
        above_minimum=True,
    )
    next_event_timeout_seconds: float = setting(
        "--next-event-timeout-seconds",
        defaults.NEXT_EVENT_TIMEOUT_SECONDS,
        "A running request whose worker sends nothing for this long is ended (504).",
        minimum=0,
        above_minimum=True,
    )
    keepalive_seconds: float = setting(
        "--sse-keepalive-seconds",
        defaults.SSE_KEEPALIVE_SECONDS,
        "A stream quiet for this long gets an SSE comment line, so proxies keep it open.",
        minimum=0,
        above_minimum=True,
    )
    image_dir: str | None = setting(
        "--image-dir",
        None,
        "The only folder image_paths may read images from (unset = local image_paths are rejected).",
        directory=True,
        must_exist=True,
    )
    allow_remote_images: bool = setting(
        "--allow-remote-images",
        False,
        "Let image_paths hold http(s) URLs, fetched by the API (size-capped, with a timeout).",
    )
    max_image_pixels: int = setting(
        "--max-image-pixels",
        defaults.DEFAULT_MAX_IMAGE_PIXELS,
        "Largest image accepted, in pixels (width x height; 413 beyond, checked before decoding).",
        minimum=1,
    )
    api_processes: int = setting(
        "--api-processes", 1, "gunicorn worker processes (each serves many streams with gevent).", minimum=1
    )
    supervisor_id: str | None = setting(
        None,
        None,
        "Set by `mmserve serve` for its API, so that POST /reader and DELETE /reader/{id} can start "
        "and stop its workers. Not meant to be set by hand.",
        env="MMSERVE_SUPERVISOR_ID",
    )


@dataclass(frozen=True)
class WorkerSettings(ProcessSettings):
    """What a worker process reads (`mmserve serve` and `mmserve worker`)."""

    model: str | None = setting(
        "--model", None, "Hugging Face model id or local path (unset = the bundled SmolLM2-135M-Instruct)."
    )
    consumer_group: str = setting(
        "--consumer-group", defaults.DEFAULT_CONSUMER_GROUP, "Group (queue) the worker serves."
    )
    max_batch_size: int = setting(
        "--max-batch-size", defaults.DEFAULT_MAX_BATCH_SIZE, "Most rows decoded together.", minimum=1
    )
    batch_duration_millis: int = setting(
        "--batch-duration-millis",
        defaults.DEFAULT_BATCH_DURATION_MILLIS,
        "How long a worker keeps collecting jobs after the first one before it starts.",
        minimum=0,
    )
    batching: str = setting(
        "--batching",
        defaults.DEFAULT_BATCHING,
        "continuous = requests join and leave the running batch between decode steps; "
        "micro = a batch runs to the end before the next starts.",
        choices=defaults.BATCHING_MODES,
    )
    max_prefill_tokens_per_step: int = setting(
        "--max-prefill-tokens-per-step",
        defaults.DEFAULT_MAX_PREFILL_TOKENS_PER_STEP,
        "Continuous batching: most prompt tokens prefilled between two decode steps "
        "(a longer prompt runs alone in its step).",
        minimum=1,
    )
    prefill_width_multiple: int = setting(
        "--prefill-width-multiple",
        1,
        "Left-pad every prefill to a multiple of this many tokens: 16 bounds a bfloat16 CPU worker's memory "
        "under prompts of ever new lengths (oneDNN keeps state per shape); 1 keeps greedy answers equal to "
        "unpadded generate.",
        minimum=1,
    )
    joint_prefill: str = setting(
        "--joint-prefill",
        "auto",
        "auto = with continuous batching, newcomers' prompts are prefilled in the running rows' decode step "
        "(one forward instead of two; fused Llama text models, no prefill padding); off = every prefill in "
        "a forward of its own.",
        choices=AUTO_OR_OFF,
    )
    batch_invariant: str = setting(
        "--batch-invariant",
        "on",
        "on = a request's tokens (greedy, or sampled with a seed) do not depend on the requests batched "
        "with it, on when it joined or on how it was prefilled, at a cost in speed (docs: Tuning workers); "
        "off = the fastest path, whose answers may change with the load. /config says what it covers.",
        choices=ON_OR_OFF,
    )
    prefix_cache: str = setting(
        "--prefix-cache",
        "on",
        "on = the keys and values of recent prompts' prefixes are kept, and a prompt that starts like an "
        "earlier one (a chat's next turn, a shared system prompt, more questions about one image) prefills "
        "only the rest; answers do not change (docs: Tuning workers). off = every prompt prefilled whole.",
        choices=ON_OR_OFF,
    )
    prefix_cache_bytes: int | None = setting(
        "--prefix-cache-bytes",
        None,
        "Most bytes the prefix cache holds; the least recently used blocks go first (unset = 5% of the "
        "device's memory, at most 4 GiB; /config shows the value).",
        minimum=1,
    )
    prefix_cache_block_tokens: int = setting(
        "--prefix-cache-block-tokens",
        defaults.PREFIX_CACHE_BLOCK_TOKENS,
        "Tokens per prefix-cache block: a prompt reuses whole blocks. With --batch-invariant on, prompts are "
        "prefilled in chunks of this many tokens, cache or not (smaller chunks prefill slower on a CPU).",
        minimum=1,
    )
    speculative: str = setting(
        "--speculative",
        defaults.DEFAULT_SPECULATIVE,
        "Speculative decoding: rows draft tokens from their own prompt and output (prompt lookup) or "
        "with --draft-model, and the model checks them in one step; answers do not change (docs: Tuning "
        "workers). auto = draft where it pays (few rows, drafts the model keeps), ngram = always draft by "
        "lookup, draft = always draft with --draft-model, off = never.",
        choices=defaults.SPECULATIVE_MODES,
    )
    draft_tokens: int = setting(
        "--draft-tokens",
        defaults.DEFAULT_DRAFT_TOKENS,
        "Most tokens a row drafts per step (with --speculative auto, ngram or draft).",
        minimum=1,
        maximum=defaults.MAX_DRAFT_TOKENS,
    )
    draft_model: str | None = setting(
        "--draft-model",
        None,
        "A smaller causal language model (Hugging Face id or local path) with the model's tokenizer, whose "
        "greedy tokens rows draft with --speculative auto (where it pays) or draft. Unset = no draft model.",
    )
    device: str = setting(
        "--device", "auto", "auto = cuda when available, else cpu.", choices=DEVICES, ignore_case=True
    )
    dtype: str = setting(
        "--dtype",
        "auto",
        "auto = bfloat16 where the CPU/GPU supports it, else float32.",
        choices=DTYPES,
        ignore_case=True,
    )
    quantize: str = setting(
        "--quantize",
        "none",
        "int8 or int4 (4-bit, groups of 32, computed in bfloat16) weights in every linear layer but the "
        "output head; CPU only; answers differ from the unquantized model's. int4 speeds up decode steps "
        "of up to 4 rows.",
        choices=QUANTIZATIONS,
    )
    pack_weights: str = setting(
        "--pack-weights",
        "auto",
        "auto = on a CPU, bfloat16 linear weights are packed once for oneDNN (same results, faster decode); "
        "off = torch's default linear.",
        choices=AUTO_OR_OFF,
    )
    fuse_layers: str = setting(
        "--fuse-layers",
        "auto",
        "auto = Llama decoder layers run as one module each, query/key/value and gate/up projections "
        "stacked (same answers, faster decode; not with LoRA adapters); off = transformers' own layers.",
        choices=AUTO_OR_OFF,
    )
    threads: int | None = setting(
        "--threads",
        None,
        "torch threads per worker (unset = share the cores, leaving one for Redis and the API).",
        minimum=1,
    )
    image_min_pixels: int | None = setting(
        "--image-min-pixels",
        None,
        "Dynamic-resolution models (the Qwen2-VL family): the fewest pixels an image is scaled up to; "
        "each 28x28 merged patch is one image token (unset = the model's preprocessor config).",
        minimum=1,
    )
    image_max_pixels: int | None = setting(
        "--image-max-pixels",
        None,
        "Dynamic-resolution models: the most pixels an image is scaled down to, so the most image tokens "
        "it gives (unset = the model's preprocessor config).",
        minimum=1,
    )
    cache_dir: str | None = setting(
        "--cache-dir", None, "Where converted models are cached (unset = ~/.cache/mmserve)."
    )
    lora_dir: str | None = setting(
        "--lora-dir",
        None,
        "Folder of LoRA adapters: each sub-folder holding a PEFT adapter_config.json is an adapter, its name "
        "the lora_id requests use (read again as adapters are added).",
        directory=True,
    )
    lora: tuple[str, ...] = setting(
        "--lora",
        (),
        "A LoRA adapter by name (repeatable; wins over a --lora-dir folder of the same name).",
        metavar="NAME=PATH",
    )
    max_loras: int = setting(
        "--max-loras",
        defaults.DEFAULT_MAX_LORAS,
        "LoRA adapters kept in memory at once; the least recently used one is evicted.",
        minimum=1,
    )
    reader_id: str | None = setting(
        "--reader-id",
        None,
        "Name the worker registers under (unset = its consumer group and a random suffix); `serve` "
        "names its workers itself.",
    )


@dataclass(frozen=True)
class EnvironmentVariable:
    """A variable mmserve reads that is no setting of its own."""

    name: str
    help: str


OTHER_ENVIRONMENT = (
    EnvironmentVariable(
        defaults.METRICS_DIR_ENV,
        "prometheus-client's multiprocess folder. With --api-processes above 1 the API makes a temporary "
        "one; set it to choose the folder (its old files are cleared at start, with one process too).",
    ),
)
