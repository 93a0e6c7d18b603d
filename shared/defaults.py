"""Defaults and fixed limits. The defaults of settings an operator can change are used by their
declarations in shared/settings.py; everything else here is fixed, not configurable."""

# -- Settings' defaults (flags in shared/settings.py) ----------------------------------------------------

INFERENCE_PORT = 3000
MANAGEMENT_PORT = 3001
OPENAI_PORT = 3003
DEFAULT_CONSUMER_GROUP = "primary"
DEFAULT_BODY_SIZE_LIMIT_BYTES = 2 * 1024 * 1024
DEFAULT_DISCARD_BODY_LIMIT_BYTES = 64 * 1024 * 1024  # an over-size body read and dropped before the 413
DEFAULT_MAX_IMAGE_PIXELS = 16_777_216  # 4096 x 4096

DEFAULT_MAX_BATCH_SIZE = 8
DEFAULT_BATCH_DURATION_MILLIS = 20
BATCHING_MODES = ("continuous", "micro")
DEFAULT_BATCHING = "continuous"
# Prompt tokens (padding included where prompts share a prefill) prefilled per decode step when requests
# join a running batch; a longer prompt still runs, alone in its step.
DEFAULT_MAX_PREFILL_TOKENS_PER_STEP = 512
DEFAULT_MAX_LORAS = 4  # LoRA adapters a worker keeps in memory (least recently used evicted)

# The API waits this long for a request's first event (--queue-timeout-seconds), this long between events
# once generation runs (--next-event-timeout-seconds), and sends an SSE comment after this long without
# one (--sse-keepalive-seconds).
FIRST_EVENT_TIMEOUT_SECONDS = 600.0
NEXT_EVENT_TIMEOUT_SECONDS = 120.0
SSE_KEEPALIVE_SECONDS = 10.0

# -- Requests: payload defaults (Takeoff's where Takeoff has one) ----------------------------------------

DEFAULT_MAX_NEW_TOKENS = 128
DEFAULT_MIN_NEW_TOKENS = 0
DEFAULT_TEMPERATURE = 1.0
DEFAULT_TOPK = 1  # 1 = greedy
DEFAULT_TOPP = 1.0
DEFAULT_REPETITION_PENALTY = 1.0
DEFAULT_NO_REPEAT_NGRAM_SIZE = 0
# OpenAI-compatible API: max_tokens when a request gives none. Chat: at most half the model's context
# (the prompt needs room too); text completions: OpenAI's own default.
OPENAI_CHAT_DEFAULT_MAX_TOKENS = 512
OPENAI_COMPLETION_DEFAULT_MAX_TOKENS = 16

# -- Requests: limits (beyond these a request is answered 422 at once) -----------------------------------

MAX_BATCH_TEXTS = 256
MAX_TEXT_CHARS = 200_000
MAX_NEW_TOKENS_LIMIT = 32_768
MAX_TEMPERATURE = 100.0
MAX_REPETITION_PENALTY = 100.0
MAX_SEED = 2**63 - 1
CONSUMER_GROUP_PATTERN = r"^[A-Za-z0-9_.\-]{1,64}$"
LORA_ID_PATTERN = r"^[A-Za-z0-9_.\-]{1,128}$"  # an adapter's folder name under --lora-dir

# -- Images ------------------------------------------------------------------------------------------------
# An upload, a file under --image-dir and a remote image may each hold at most --body-size-limit-bytes;
# decoded, at most --max-image-pixels pixels (read from the header, before any pixel is decoded).

MAX_IMAGES_PER_REQUEST = 8  # the multipart image counts as the first
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")  # what the API decodes; others are 400
MAX_IMAGE_ASPECT_RATIO = 200  # longest side over shortest; a thinner image is 400 (resizing it would explode)
REMOTE_IMAGE_TIMEOUT_SECONDS = 10.0  # whole download, with --allow-remote-images
IMAGE_FEATURE_CACHE_BYTES = 256 * 2**20  # a vision worker's cache of recent images' encodings

# The prefix cache (worker.engine.prefix_cache): prompt prefixes' keys and values kept in
# blocks of this many tokens, which are also the batch-invariant prefill's chunks
# (worker.engine.prefill: 128-token chunks cost nothing measurable against whole prompts
# on a CPU, 64-token ones about a fifth more), and the share of the device's memory the
# cache takes by default (--prefix-cache-bytes auto), at most PREFIX_CACHE_MAX_AUTO_BYTES.
PREFIX_CACHE_BLOCK_TOKENS = 128
# Routing by prefix (api.routing): a request without a conversation or images is sent to
# the reader picked by this many first characters of its prompt.
ROUTING_PREFIX_CHARS = 1024
PREFIX_CACHE_MEMORY_SHARE = 0.05
PREFIX_CACHE_MAX_AUTO_BYTES = 4 * 2**30

# Speculative decoding (worker.engine.speculation): --speculative modes, the most tokens
# drafted per row and step (--draft-tokens), the n-gram lengths prompt lookup matches, and
# what `auto` weighs: a step feeding each of its B rows k more tokens costs about
# 1 + SPECULATION_STEP_COST + SPECULATION_TOKEN_COST x B x k plain steps (measured on a
# 2-core CPU with the bundled model: 1 row x 1 more token 1.09, x 6 more 1.31, x 12 more
# 1.74; 4 rows x 1 more 1.36; 8 rows x 1 more 1.56), and a row's drafts are kept token by token at a rate
# learnt from its recent checks (each check's evidence weighs SPECULATION_MEMORY times the
# one before's; a step without a check keeps SPECULATION_IDLE_MEMORY of it, so a row whose
# drafts failed tries again some steps later).
#
# A draft model (--draft-model, worker.engine.speculation.draft_model) costs per drafted
# token about its share of the model's parameters of a plain step (a small model's decode
# step is bound by reading its weights, as the model's is); `auto` weighs that too.
SPECULATIVE_MODES = ("auto", "ngram", "draft", "off")
# The drafters, as metrics and stats name them: prompt lookup and the draft model.
DRAFTERS = ("ngram", "model")
DEFAULT_SPECULATIVE = "auto"
DEFAULT_DRAFT_TOKENS = 6
MAX_DRAFT_TOKENS = 16
SPECULATION_MIN_NGRAM = 2
SPECULATION_MAX_NGRAM = 4
SPECULATION_STEP_COST = 0.05
SPECULATION_TOKEN_COST = 0.07
SPECULATION_MEMORY = 0.9
SPECULATION_IDLE_MEMORY = 0.97

# -- Retry-After hints (seconds) ---------------------------------------------------------------------------
# A worker loading its model is usually ready within a few seconds; a full queue drains quickly.

RETRY_AFTER_NO_READER_SECONDS = 5
RETRY_AFTER_QUEUE_FULL_SECONDS = 1
RETRY_AFTER_REDIS_UNAVAILABLE_SECONDS = 2  # a Sentinel failover takes a few seconds

# -- Lifetimes in Redis (seconds) --------------------------------------------------------------------------
# Nothing in Redis lives without a TTL, except the set of group names (a handful of short strings) that
# lets the API tell 404 from 503.

READER_TTL_SECONDS = 10
READER_HEARTBEAT_SECONDS = 2.0
# /readyz fails while a group has no live worker, for this long after its last worker's last heartbeat
# (a restart, a crash); after that the group is idle and only its own requests get 503.
IDLE_GROUP_SECONDS = 300
JOB_TTL_SECONDS = 600  # how long a job may wait in its queue before RQ drops it
JOB_RESULT_TTL_SECONDS = 300
JOB_FAILURE_TTL_SECONDS = 3600
JOB_TIMEOUT_SECONDS = 3600  # RQ's hard limit for one batch
CANCEL_TTL_SECONDS = 600
# An image lives while a request holds it (the API deletes it when the last request using it ends); this
# TTL only bounds what a crashed API leaves behind. It covers a job's wait in its queue, and every read by
# a worker renews it.
IMAGE_TTL_SECONDS = JOB_TTL_SECONDS

# -- Worker crashes ----------------------------------------------------------------------------------------
# A running job's RQ heartbeat is refreshed every JOB_HEARTBEAT_SECONDS from a thread; a job whose heartbeat
# is older than JOB_HEARTBEAT_TTL_SECONDS is abandoned and RQ queues it again (another worker runs it from
# the start, with the same seed), up to JOB_MAX_ATTEMPTS times.

JOB_HEARTBEAT_SECONDS = 2.0
JOB_HEARTBEAT_TTL_SECONDS = 10
ABANDONED_JOB_SWEEP_SECONDS = 2
JOB_MAX_ATTEMPTS = 3

# -- Connections -------------------------------------------------------------------------------------------

SUBSCRIBE_TIMEOUT_SECONDS = 5.0
# After the event relay reconnected, a request whose job has ended waits this long for events
# still on their way before it ends as lost.
MISSED_EVENTS_GRACE_SECONDS = 2.0
# Requests wait through a Redis outage (a Sentinel failover takes a few seconds) up to this long,
# then end with a redis_unavailable error.
EVENT_HUB_OUTAGE_PATIENCE_SECONDS = 30.0
REDIS_MAX_CONNECTIONS = 256  # redis-py's pool
REDIS_SOCKET_TIMEOUT_SECONDS = 10.0
REDIS_CONNECT_TIMEOUT_SECONDS = 1.0
# How long the management port waits for a worker to load a LoRA adapter (it waits for the running decode
# step, then reads the adapter); below the socket timeout.
LORA_LOAD_TIMEOUT_SECONDS = 8.0

# prometheus-client's multiprocess folder (its own variable name): set by api.gunicorn_config when the API
# runs several processes, read by api.metrics. Documented with the settings (shared/settings.py).
METRICS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"
