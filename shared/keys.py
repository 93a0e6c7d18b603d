"""Every Redis key, channel and queue name mmserve uses."""

PREFIX = "mmserve"


def queue_name(consumer_group: str) -> str:
    """RQ queue that feeds one consumer group (RQ adds its own `rq:queue:` prefix)."""
    return f"{PREFIX}.{consumer_group}"


def reader_queue_name(consumer_group: str, reader_id: str) -> str:
    """RQ queue of one reader of a group: jobs routed to it because it likely holds their
    prompt's prefix (the reader takes them before its group's queue)."""
    return f"{PREFIX}.{consumer_group}:reader:{reader_id}"  # ':' is in no group's name


def reader_queues_key(consumer_group: str) -> str:
    """Set of the reader ids of a group that have a queue of their own (its dead readers'
    queues are moved back to the group's queue by the live ones)."""
    return f"{PREFIX}:group:{consumer_group}:reader-queues"


def events_channel(request_id: str) -> str:
    """Pub/sub channel carrying one request's events."""
    return f"{PREFIX}:events:{request_id}"


EVENTS_PATTERN = f"{PREFIX}:events:*"


def request_id_from_channel(channel: str) -> str:
    return channel.rsplit(":", 1)[-1]


def cancel_key(request_id: str) -> str:
    """Set by the API when a client goes away; checked by the worker every step."""
    return f"{PREFIX}:cancel:{request_id}"


def reader_key(reader_id: str) -> str:
    """JSON description of one live reader (worker process); expires without heartbeats."""
    return f"{PREFIX}:reader:{reader_id}"


def reader_calls_inbox(reader_id: str) -> str:
    """List where one reader takes the calls the API addresses to it (tokenize, load LoRA...)."""
    return f"{PREFIX}:reader:{reader_id}:tools"


def supervisor_inbox(supervisor_id: str) -> str:
    """List where `mmserve serve` takes its start/stop-worker commands."""
    return f"{PREFIX}:supervisor:{supervisor_id}:commands"


def rpc_reply_key(call_id: str) -> str:
    """List on which the caller of one request/reply call waits for its answer."""
    return f"{PREFIX}:reply:{call_id}"


def group_readers_key(consumer_group: str) -> str:
    """Set of reader ids that have served a group (dead ones are pruned on read)."""
    return f"{PREFIX}:group:{consumer_group}:readers"


def image_key(image_id: str) -> str:
    """One image, content-addressed: `image_id` is the sha256 (hex) of the
    canonical PNG bytes. A hash: field `data` holds the bytes, field `refs`
    counts the requests using it (the API deletes the key when it drops to 0)."""
    return f"{PREFIX}:image:{image_id}"


IMAGE_DATA_FIELD = "data"
IMAGE_REFS_FIELD = "refs"


GROUPS_KEY = f"{PREFIX}:groups"
"""Sorted set: every consumer group a reader ever registered, scored by the last
time one of its readers sent a heartbeat (404 vs 503, and /readyz)."""
