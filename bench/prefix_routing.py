"""Routing by prefix: how much of a conversation's prompt its worker finds in its prefix cache when
a group has several workers, with the API's `--prefix-routing on` (each conversation's turns go to
one worker) against `off` (every request on the group's queue, for whichever worker is free).

    .venv/bin/python -m bench.prefix_routing --help

`mmserve serve --workers 2` with the bundled model (prefix cache on, one thread per worker), the
setting given as the environment variable MMSERVE_PREFIX_ROUTING. --conversations chats run at
once through the OpenAI-compatible port, each --turns turns (the transcript so far plus a new user
message, streamed, temperature 0, usage included). For every turn after the first: the share of
its prompt tokens read from the prefix cache (the hit rate), and time to first token. The
settings take turns over --rounds rounds, each on a fresh server.

Prints one JSON document; progress on stderr."""

from __future__ import annotations

import concurrent.futures
import json
import statistics
import time
from collections.abc import Sequence

from bench.common import BUNDLED_MODEL, add_model_flags, bench_parser, machine
from bench.determinism import interruptible, log
from bench.prefix_cache import (
    chat_messages,
    chat_user_message,
    openai_url,
    schedule,
    serving,
    stream_chat,
)

SETTINGS = ("on", "off")
ENV_SETTING = "MMSERVE_PREFIX_ROUTING"
TOPICS = ["lighthouses", "rivers", "bread", "owls", "glaciers", "violins", "bees", "maps"]


def opening(topic: str) -> str:
    """A conversation's first message: its own, so conversations share only the chat template."""
    return f"I would like to learn about {topic}. Tell me what makes them interesting."


def topic_of(index: int) -> str:
    topic = TOPICS[index % len(TOPICS)]
    return topic if index < len(TOPICS) else f"{topic}, part {index // len(TOPICS) + 1}"


def hit_rate(turns: Sequence[dict]) -> float | None:
    """Prompt tokens read from the cache over prompt tokens, turns after the first."""
    later = [t for t in turns[1:] if t["prompt_tokens"] and t["cached_tokens"] is not None]
    prompt = sum(t["prompt_tokens"] for t in later)
    return round(sum(t["cached_tokens"] for t in later) / prompt, 3) if prompt else None


def conversation(url: str, topic: str, turns: int, max_tokens: int) -> list[dict]:
    users, answers, results = [], [], []
    for turn in range(turns):
        users.append(opening(topic) if turn == 0 else chat_user_message(turn))
        result = stream_chat(url, chat_messages(users, answers), max_tokens)
        answers.append(result["text"])
        results.append(result)
    return results


def run(args, setting: str) -> dict:
    settings = {ENV_SETTING: setting}
    args.prefix_cache_bytes = None
    with serving(
        args, settings, "--workers", str(args.workers), dtype=args.dtype, name="prefix-routing"
    ) as server:
        url = openai_url(server)
        topics = [topic_of(index) for index in range(args.conversations)]
        started = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(args.conversations) as pool:
            chats = list(pool.map(lambda t: conversation(url, t, args.turns, args.max_tokens), topics))
        seconds = time.perf_counter() - started
    later = [turn for chat in chats for turn in chat[1:]]
    figures = {
        "setting": setting,
        "seconds": round(seconds, 2),
        "hit_rate": hit_rate([chat[0] for chat in chats] + later) if later else None,
        "hit_rate_by_conversation": [hit_rate(chat) for chat in chats],
        "ttft_later_turns_p50_s": round(statistics.median(t["ttft_s"] for t in later), 3),
        "cached_tokens_by_turn": [[t["cached_tokens"] for t in chat] for chat in chats],
        "prompt_tokens_by_turn": [[t["prompt_tokens"] for t in chat] for chat in chats],
    }
    log(
        f"  routing {setting}: hit rate {figures['hit_rate']}, TTFT p50 {figures['ttft_later_turns_p50_s']} s"
    )
    return figures


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=SETTINGS)
    parser.add_argument("--rounds", type=int, default=2, help="rounds, each running every setting (2)")
    parser.add_argument("--workers", type=int, default=2, help="workers in the group (2)")
    parser.add_argument("--conversations", type=int, default=4, help="chats running at once (4)")
    parser.add_argument("--turns", type=int, default=6, help="turns per chat (6)")
    parser.add_argument("--max-tokens", type=int, default=32, help="tokens per answer (32)")
    parser.add_argument("--max-batch-size", type=int, default=8, help="mmserve's --max-batch-size (8)")
    add_model_flags(parser)
    args = parser.parse_args()
    interruptible()
    if args.threads is None:
        from worker.main import default_threads

        args.threads = default_threads(args.workers)
    report: dict = {
        "model": BUNDLED_MODEL,
        "dtype": args.dtype,
        "threads_per_worker": args.threads,
        "workers": args.workers,
        "conversations": args.conversations,
        "turns": args.turns,
        "max_tokens": args.max_tokens,
        **machine(),
        "setting_env": ENV_SETTING,
    }
    started = time.perf_counter()
    runs = []
    for round_index, setting in schedule(args.settings, args.rounds):
        log(f"round {round_index + 1}, prefix routing {setting}")
        runs.append({"round": round_index, **run(args, setting)})
    report["runs"] = runs
    report["hit_rate_median"] = {
        setting: statistics.median(
            r["hit_rate"] for r in runs if r["setting"] == setting and r["hit_rate"] is not None
        )
        for setting in args.settings
    }
    report["seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
