"""Prefix cache: what a worker's cache of prompt-prefix KV blocks saves when prompts share a prefix,
and what it costs when they share nothing, with `MMSERVE_PREFIX_CACHE=on` against `off`.

    .venv/bin/python -m bench.prefix_cache --help

`mmserve serve` with one worker, `--max-batch-size 8` and the threads `mmserve serve` gives one
worker; the setting goes to it as the environment variable MMSERVE_PREFIX_CACHE (and
--prefix-cache-bytes, if given, as MMSERVE_PREFIX_CACHE_BYTES), which a server without the setting
ignores. Each round starts one server per setting and model, never two at once, the settings' order
flipped from round to round (on, off, then off, on...), and compares the settings within the
round. Four scenarios:

1. `image`: one request to /image_generate_stream asking --image-questions different questions
   (chat template on) about one 640x480 picture, served by a tiny random vision-language model of
   bench/tiny_vlms.py (--image-family; by default a Qwen2-VL whose language model has the bundled
   model's shapes and 30 layers behind the tiny vision tower, with --image-max-pixels 401408, about
   390 image tokens, the most of any family) or --image-model DIR. Every request has its own
   picture, so the cache can only help within a request. Time to the first token of any row and
   to the end: medians over --image-requests requests. Then the same rows' prefill alone,
   in-process (`image_prefill`: Engine.add of the request's rows on an idle engine, the model
   loaded as a worker loads it). Target: prefill off/on >= 3.
2. `chat`: a --chat-turns conversation with the bundled model on the OpenAI-compatible port
   (streamed, usage included, temperature 0), each turn the whole transcript so far plus a new
   user message of a few sentences. Time to the first content of each turn. Target: the last
   turn's TTFT off/on >= 3.
3. `system_prompt`: a fixed ~500-token system message (a rules document) and short different
   questions, --concurrency clients each sending --system-requests chat requests one after the
   other. Tokens/s overall and TTFT p50. Targets: TTFT p50 off/on >= 3, tokens/s on/off >= 1.3.
4. `unshared`: random words (50-400 tokens, nothing shared, no chat template) on /generate_stream,
   --concurrency clients each sending --unshared-requests requests, exactly --unshared-new-tokens
   tokens. Target: tokens/s on/off >= 0.97.

Every request is greedy, so both settings should give the same answers: each scenario reports how
many answers agree between the settings of a round. The cached prompt tokens the server reports
(metadata `cached_prompt_tokens`, usage `prompt_tokens_details.cached_tokens`) are summed and
averaged per run; null where the server does not report them.

Prints one JSON document; progress on stderr."""

from __future__ import annotations

import concurrent.futures
import contextlib
import io
import json
import os
import random
import statistics
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.common import add_model_flags, bench_parser, percentile
from bench.determinism import WORDS, interruptible, log
from bench.sse import SseEvent

SETTINGS = ("on", "off")
SCENARIOS = ("image", "chat", "system_prompt", "unshared")
ENV_SETTING = "MMSERVE_PREFIX_CACHE"
ENV_BYTES = "MMSERVE_PREFIX_CACHE_BYTES"
OPENAI_MODEL = "primary"  # the consumer group
WARM_UP_PROMPT = "Name three colours."
QWEN_IMAGE_MAX_PIXELS = 401408  # 512 merged 28x28 patches: a 640x480 picture keeps its size

IMAGE_QUESTIONS = [
    "What is in this picture?",
    "Which colours dominate the image?",
    "Is this photo taken indoors or outdoors?",
    "Describe the lighting in one sentence.",
    "How many distinct objects can you see?",
    "What mood does this picture convey?",
    "Is there any text visible in the image?",
    "What would be a good title for this picture?",
]

CHAT_MESSAGES = [
    "I am planning a small vegetable garden behind my house. The plot gets sun in the morning "
    "and shade after three in the afternoon. What should I plant first?",
    "That sounds good. The soil is quite heavy and holds water after rain. "
    "How should I prepare it before planting anything?",
    "I also have two young children who want to help. Which tasks are safe and fun for them, "
    "and which should I keep for myself?",
    "We get a lot of slugs in the spring. Is there a way to keep them away without chemicals?",
    "Thank you. How often should I water the beds during a dry summer week? I would rather not waste water.",
    "My neighbour suggested planting marigolds between the rows. Does that actually help, "
    "or is it just a tradition?",
    "Let us talk about harvest. How do I know when carrots and beetroot are ready to pull?",
    "If I want to keep some vegetables through the winter, what are my options without a freezer?",
    "Next year I would like to rotate the crops. Can you suggest a simple three-year plan?",
    "Finally, please summarise the most important advice from our conversation in a few lines.",
]

RULE_SUBJECTS = [
    "a refund",
    "a late delivery",
    "a damaged parcel",
    "a forgotten password",
    "an invoice",
    "a change of address",
    "a cancelled order",
    "a gift card",
    "a warranty claim",
    "a price match",
    "a missing item",
]
RULE_ACTIONS = [
    "confirm the order number before anything else",
    "apologise once and then focus on the solution",
    "explain the next step in plain words",
    "never promise a date you cannot check",
    "offer to send a written summary by email",
    "ask one clarifying question at a time",
    "quote the relevant policy section by its number",
]
RULE_REASONS = [
    "customers value clear answers over long ones",
    "mistakes here cost the company money and trust",
    "the records must match what was said",
    "a calm tone prevents most escalations",
    "colleagues may pick up the case tomorrow",
]

QUESTION_OPENERS = ["How do I", "Can I", "What happens if I", "Who should I contact to", "When can I"]
QUESTION_TOPICS = [
    "get a refund for shoes",
    "change my delivery address",
    "reset my password",
    "use two gift cards",
    "return a damaged lamp",
    "cancel yesterday's order",
    "claim the warranty on a kettle",
    "get a copy of my invoice",
    "report a missing item",
]


# -- pure helpers (tests/unit/bench/test_prefix_cache.py) --------------------------------------------


@dataclass(frozen=True)
class Comparison:
    """A figure compared between the settings: `lower` is better (the ratio is off/on) or higher
    is (on/off); a target when `at_least` is set (the median ratio must reach it)."""

    figure: str
    better: str  # "lower" or "higher"
    at_least: float | None = None
    says: str = ""

    @property
    def ratio_name(self) -> str:
        return "off/on" if self.better == "lower" else "on/off"


COMPARISONS: dict[str, list[Comparison]] = {
    "image": [
        Comparison("ttft_s", "lower", None, "time to first token over HTTP, off/on"),
        Comparison("total_s", "lower", None, "whole request over HTTP, off/on"),
    ],
    "image_prefill": [
        Comparison("prefill_s", "lower", 3.0, "prefill of the request's rows >= 3x faster with the cache on"),
    ],
    "chat": [
        Comparison("last_turn_ttft_s", "lower", 3.0, "last turn's TTFT with the cache on <= 1/3 of off"),
        Comparison("mean_ttft_s", "lower", None, "TTFT averaged over the turns, off/on"),
    ],
    "system_prompt": [
        Comparison("ttft_p50_s", "lower", 3.0, "TTFT p50 with the cache on <= 1/3 of off"),
        Comparison("tokens_per_s", "higher", 1.3, "tokens/s with the cache on >= 1.3x off"),
    ],
    "unshared": [
        Comparison("tokens_per_s", "higher", 0.97, "tokens/s with the cache on >= 0.97x off"),
        Comparison("ttft_p50_s", "lower", None, "TTFT p50, off/on"),
    ],
}


def ratio(numerator: float | None, denominator: float | None, digits: int = 3) -> float | None:
    """numerator / denominator, rounded; None when either is missing or not a positive number."""
    if numerator is None or denominator is None:
        return None
    if not (numerator == numerator and denominator == denominator) or denominator <= 0:  # NaN
        return None
    return round(numerator / denominator, digits)


def setting_ratio(on: float | None, off: float | None, better: str) -> float | None:
    """The ratio that is above 1 when the cache helps: off/on for a figure where lower is better
    (a time), on/off where higher is (tokens/s)."""
    if better not in ("lower", "higher"):
        raise ValueError(f"better must be lower or higher, not {better!r}")
    return ratio(off, on) if better == "lower" else ratio(on, off)


def median_or_none(values: Iterable[float | None], digits: int = 3) -> float | None:
    """The median of the values that are numbers (not None, not NaN), rounded; None if none is."""
    numbers = [v for v in values if v is not None and v == v]
    return round(statistics.median(numbers), digits) if numbers else None


def mean_or_none(values: Iterable[float | None], digits: int = 3) -> float | None:
    numbers = [v for v in values if v is not None and v == v]
    return round(statistics.fmean(numbers), digits) if numbers else None


def schedule(settings: Sequence[str], rounds: int) -> list[tuple[int, str]]:
    """(round, setting) in the order they run: the settings' order flipped every other round, so
    neither setting always runs first (on, off, off, on, ...)."""
    order = []
    for round_index in range(rounds):
        ordered = list(settings) if round_index % 2 == 0 else list(reversed(settings))
        order.extend((round_index, setting) for setting in ordered)
    return order


def paired_ratios(runs: Sequence[Mapping], comparison: Comparison) -> dict:
    """The comparison's ratio within each round that ran both settings and measured the figure,
    and their median; with a target, whether the median meets it (None: no ratio)."""
    by_round: dict[int, dict[str, Mapping]] = {}
    for run in runs:
        by_round.setdefault(run["round"], {})[run["setting"]] = run
    ratios = []
    for _, pair in sorted(by_round.items()):
        if "on" in pair and "off" in pair:
            value = setting_ratio(
                pair["on"].get(comparison.figure), pair["off"].get(comparison.figure), comparison.better
            )
            if value is not None:
                ratios.append(value)
    median = median_or_none(ratios)
    result: dict = {"ratio": comparison.ratio_name, "ratios": ratios, "median": median}
    if comparison.at_least is not None:
        result["at_least"] = comparison.at_least
        result["met"] = target_met(median, comparison.at_least)
    return result


def target_met(median: float | None, at_least: float) -> bool | None:
    """Whether a median ratio reaches its target; None when there is no ratio to judge."""
    return None if median is None else median >= at_least


def targets(comparisons: Mapping[str, Mapping[str, dict]]) -> list[dict]:
    """Every target of the report, flat: scenario, figure, ratio, at_least, median, met, says."""
    found = []
    for scenario, figures in comparisons.items():
        for comparison in COMPARISONS.get(scenario, []):
            if comparison.at_least is None or comparison.figure not in figures:
                continue
            measured = figures[comparison.figure]
            found.append(
                {
                    "scenario": scenario,
                    "figure": comparison.figure,
                    "ratio": comparison.ratio_name,
                    "at_least": comparison.at_least,
                    "median": measured["median"],
                    "met": measured["met"],
                    "says": comparison.says,
                }
            )
    return found


def answers_agreement(on: Sequence[str], off: Sequence[str]) -> dict:
    """How many answers are equal between the settings, position by position."""
    return {"equal": sum(a == b for a, b in zip(on, off, strict=False)), "of": max(len(on), len(off))}


def cached_summary(values: Sequence[int | None]) -> dict:
    """Sum and mean of the cached prompt tokens the server reported (None where it did not);
    `reported` says how many of the values it reported."""
    reported = [v for v in values if v is not None]
    return {
        "sum": sum(reported) if reported else None,
        "mean": round(statistics.fmean(reported), 1) if reported else None,
        "reported": len(reported),
        "of": len(values),
    }


def cached_tokens_of_usage(usage: Mapping | None) -> int | None:
    """An OpenAI usage's prompt_tokens_details.cached_tokens, None if absent."""
    details = (usage or {}).get("prompt_tokens_details") or {}
    value = details.get("cached_tokens")
    return int(value) if value is not None else None


def rows_metadata(events: Sequence[SseEvent]) -> list[dict]:
    """The per-row metadata of a Takeoff stream (its `metadata` event: an object for one prompt,
    a list for a batch); [] without one."""
    for event in events:
        if event.event == "metadata":
            metadata = event.json()
            return metadata if isinstance(metadata, list) else [metadata]
    return []


def stream_texts(events: Sequence[SseEvent], rows: int) -> list[str]:
    """Each row's text from a Takeoff stream: a batch's token events are {"text", "batch_id"},
    one prompt's are the token itself."""
    texts = [""] * rows
    for event in events:
        if event.event != "message":
            continue
        if rows == 1:
            texts[0] += event.data
        else:
            token = event.json()
            texts[token["batch_id"]] += token["text"]
    return texts


def chat_chunk(data: str) -> dict | None:
    """One OpenAI stream event's JSON; None for `[DONE]`. An error event raises."""
    if data.strip() == "[DONE]":
        return None
    chunk = json.loads(data)
    if "error" in chunk:
        raise RuntimeError(f"error in the stream: {chunk['error']}")
    return chunk


def chunk_content(chunk: Mapping) -> str:
    """The text a chat chunk adds (its first choice's delta content; "" for the role chunk and
    the usage chunk)."""
    choices = chunk.get("choices") or []
    if not choices:
        return ""
    return (choices[0].get("delta") or {}).get("content") or ""


def chat_messages(user_turns: Sequence[str], answers: Sequence[str], system: str | None = None) -> list[dict]:
    """A chat transcript: the system message (if any), then each user turn followed by the
    assistant's answer to it, ending with the last user turn, unanswered."""
    if len(answers) != len(user_turns) - 1:
        raise ValueError(
            f"{len(user_turns)} user turns need {len(user_turns) - 1} answers, not {len(answers)}"
        )
    messages = [{"role": "system", "content": system}] if system is not None else []
    for index, user in enumerate(user_turns):
        messages.append({"role": "user", "content": user})
        if index < len(answers):
            messages.append({"role": "assistant", "content": answers[index]})
    return messages


def chat_user_message(turn: int) -> str:
    """The user's message of a turn (from 0): CHAT_MESSAGES in order, then again, numbered."""
    message = CHAT_MESSAGES[turn % len(CHAT_MESSAGES)]
    return message if turn < len(CHAT_MESSAGES) else f"Question {turn + 1}: {message}"


def system_prompt_text(rules: int = 15) -> str:
    """A fixed rules document for a support assistant, the same text for the same `rules`, every
    rule different (about 32 tokens a rule: 15 rules make about 500 tokens)."""
    lines = [
        "You are the support assistant of Northwind Household Goods. Follow these rules in every "
        "answer, in order of priority.",
    ]
    for index in range(rules):
        subject = RULE_SUBJECTS[index % len(RULE_SUBJECTS)]
        action = RULE_ACTIONS[(index * 3) % len(RULE_ACTIONS)]
        reason = RULE_REASONS[(index * 2 + index // len(RULE_REASONS)) % len(RULE_REASONS)]
        lines.append(f"Rule {index + 1}. When a customer asks about {subject}, {action}, because {reason}.")
    lines.append("Answer briefly and politely.")
    return "\n".join(lines)


def system_question(index: int) -> str:
    """A short customer question, different for every index below 45."""
    opener = QUESTION_OPENERS[index % len(QUESTION_OPENERS)]
    topic = QUESTION_TOPICS[index % len(QUESTION_TOPICS)]  # 5 and 9 coprime: 45 different pairs
    question = f"{opener} {topic}?"
    turns = index // (len(QUESTION_OPENERS) * len(QUESTION_TOPICS))
    return question if turns == 0 else f"{question} (case {turns + 1})"


def image_questions(count: int) -> list[str]:
    """`count` different questions about a picture: IMAGE_QUESTIONS, then numbered again."""
    return [
        IMAGE_QUESTIONS[i % len(IMAGE_QUESTIONS)]
        + ("" if i < len(IMAGE_QUESTIONS) else f" (answer {i // len(IMAGE_QUESTIONS) + 1})")
        for i in range(count)
    ]


def unshared_prompt(rng: random.Random, min_tokens: int = 50, max_tokens: int = 400) -> str:
    """Random words, `min_tokens` to `max_tokens` of them (each about one token of the bundled model)."""
    return " ".join(rng.choice(WORDS) for _ in range(max(1, rng.randint(min_tokens, max_tokens))))


def unshared_prompts(seed: int, count: int, min_tokens: int, max_tokens: int) -> list[str]:
    """The unshared scenario's prompts, the same for both settings of a seed."""
    rng = random.Random(seed)
    return [unshared_prompt(rng, min_tokens, max_tokens) for _ in range(count)]


def server_environment(setting: str, cache_bytes: int | None = None) -> dict[str, str]:
    """The environment variables that give `mmserve serve` the setting."""
    if setting not in SETTINGS:
        raise ValueError(f"setting must be on or off, not {setting!r}")
    env = {ENV_SETTING: setting}
    if cache_bytes is not None:
        env[ENV_BYTES] = str(cache_bytes)
    return env


def image_max_pixels(family: str | None, asked: int | None) -> int | None:
    """The vision server's --image-max-pixels: as asked (0: unset), or by default
    QWEN_IMAGE_MAX_PIXELS for a tiny Qwen2-VL-family model (`family` None: a model of one's own,
    left unset; other families size images their own way and refuse the flag)."""
    if asked is not None:
        return asked or None
    return QWEN_IMAGE_MAX_PIXELS if family is not None and family.startswith("qwen") else None


def image_serve_flags(model: Path, max_pixels: int | None) -> list[str]:
    """`mmserve serve`'s flags for the vision model."""
    flags = ["--model", str(model)]
    return flags + (["--image-max-pixels", str(max_pixels)] if max_pixels else [])


def picture(index: int, width: int = 640, height: int = 480) -> bytes:
    """A photo-like JPEG, different for every index (gradients in colours and directions drawn from
    the index, a little noise), small enough that the upload costs little."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(index)
    x = np.linspace(0, 1, width)[None, :, None]
    y = np.linspace(0, 1, height)[:, None, None]
    weights = rng.uniform(-1, 1, (3, 3))
    phases = rng.uniform(0, 6.3, 3)
    channels = [
        128 + 90 * np.sin(weights[c, 0] * 6 * x + weights[c, 1] * 6 * y + phases[c]) + 30 * weights[c, 2]
        for c in range(3)
    ]
    base = np.concatenate(channels, axis=2)
    pixels = np.clip(base + rng.normal(0, 3, base.shape), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()


# -- the servers ----------------------------------------------------------------------------------


@contextlib.contextmanager
def environment(values: Mapping[str, str]) -> Iterator[None]:
    """os.environ with `values` set (so a child process started meanwhile inherits them), restored after."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextlib.contextmanager
def serving(args, settings: Mapping[str, str], *flags: str, dtype: str, name: str) -> Iterator:
    """`mmserve serve` with `settings` in its environment, one worker (unless `flags` say more),
    stopped on the way out."""
    from bench.serving import ServeProcess

    with tempfile.TemporaryDirectory(prefix=f"mmserve-{name}-") as folder:
        started = time.perf_counter()
        with environment(settings):
            server = ServeProcess.for_benchmark(
                *flags,
                max_batch_size=args.max_batch_size,
                dtype=dtype,
                threads=args.threads,
                pack_weights=args.pack_weights,
                log_path=Path(folder) / "serve.log",
            )
        log(f"  {name} server ready in {time.perf_counter() - started:.1f} s")
        try:
            yield server
        finally:
            server.stop()


def openai_url(server) -> str:
    return f"http://127.0.0.1:{server.openai_port}/v1"


# -- the clients ----------------------------------------------------------------------------------


def stream_chat(url: str, messages: list[dict], max_tokens: int) -> dict:
    """One streamed chat completion, greedy, usage included: time to the first content, total
    time, the text and the usage."""
    import requests

    from bench.sse import iter_lines, parse_sse

    payload = {
        "model": OPENAI_MODEL,
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    started = time.perf_counter()
    first, pieces, usage = None, [], None
    with requests.post(url + "/chat/completions", json=payload, stream=True, timeout=600) as response:
        if not response.ok:
            raise RuntimeError(f"{response.status_code} from /v1/chat/completions: {response.text[:500]}")
        for event in parse_sse(iter_lines(response)):
            chunk = chat_chunk(event.data)
            if chunk is None:
                continue
            content = chunk_content(chunk)
            if content and first is None:
                first = time.perf_counter() - started
            pieces.append(content)
            usage = chunk.get("usage") or usage
    usage = usage or {}
    return {
        "ttft_s": first if first is not None else float("nan"),
        "seconds": time.perf_counter() - started,
        "text": "".join(pieces),
        "prompt_tokens": usage.get("prompt_tokens"),
        "completion_tokens": usage.get("completion_tokens"),
        "cached_tokens": cached_tokens_of_usage(usage),
    }


def stream_generate(url: str, payload: dict) -> dict:
    """One /generate_stream request (return_metadata on): TTFT, total time, texts, row metadata."""
    import requests

    from bench.serving import read_answer

    started = time.perf_counter()
    with requests.post(url + "/generate_stream", json=payload, stream=True, timeout=600) as response:
        if not response.ok:
            raise RuntimeError(f"{response.status_code} from /generate_stream: {response.text[:500]}")
        first, events = read_answer(response, started)
    rows = len(payload["text"]) if isinstance(payload["text"], list) else 1
    return {
        "ttft_s": first,
        "seconds": time.perf_counter() - started,
        "texts": stream_texts(events, rows),
        "metadata": rows_metadata(events),
    }


def stream_image(url: str, image: bytes, payload: dict) -> dict:
    """One /image_generate_stream request: TTFT (first token of any row), total time, texts and
    the rows' metadata."""
    from bench.image_throughput import checked, post
    from bench.serving import read_answer

    started = time.perf_counter()
    with post(url, image, payload, stream=True) as response:
        first, events = read_answer(checked(response), started)
    return {
        "ttft_s": first,
        "seconds": time.perf_counter() - started,
        "texts": stream_texts(events, len(payload["text"])),
        "metadata": rows_metadata(events),
    }


def concurrently(clients: int, per_client: int, request) -> tuple[list, float]:
    """`clients` threads, client c sending request(c * per_client + i) for i in range(per_client)
    one after the other: the results in index order, and the wall time."""

    def client(c: int) -> list:
        return [request(c * per_client + i) for i in range(per_client)]

    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        results = [result for batch in pool.map(client, range(clients)) for result in batch]
    return results, time.perf_counter() - started


# -- the scenarios ----------------------------------------------------------------------------------


def image_scenario(args, server, setting: str) -> tuple[dict, list[str]]:
    questions = image_questions(args.image_questions)
    payload = {
        "text": questions,
        "use_chat_template": True,
        "max_new_tokens": args.image_new_tokens,
        "min_new_tokens": args.image_new_tokens,
        "return_metadata": True,
    }
    width, height = args.image_size
    stream_image(server.url, picture(10_000, width, height), {**payload, "text": questions[:1]})  # warm-up
    results = []
    for index in range(args.image_requests):
        result = stream_image(server.url, picture(index, width, height), payload)
        results.append(result)
        log(
            f"    image {setting}: request {index + 1}: "
            f"TTFT {result['ttft_s']:.3f} s, {result['seconds']:.3f} s"
        )
    rows = [row for result in results for row in result["metadata"]]
    cached = [row.get("cached_prompt_tokens") for row in rows]
    figures = {
        "ttft_s": median_or_none(r["ttft_s"] for r in results),
        "total_s": median_or_none(r["seconds"] for r in results),
        "ttft_by_request_s": [round(r["ttft_s"], 3) for r in results],
        "total_by_request_s": [round(r["seconds"], 3) for r in results],
        "rows_per_request": len(questions),
        "prompt_tokens_per_row": median_or_none(row.get("prompt_tokens") for row in rows),
        "server_ttft_ms_p50": median_or_none(row.get("time_to_first_token_ms") for row in rows),
        "cached_prompt_tokens": cached_summary(cached),
        "cached_prompt_tokens_by_row": cached[: len(questions)],
    }
    return figures, [text for result in results for text in result["texts"]]


def chat_scenario(args, server, setting: str) -> tuple[dict, list[str]]:
    url = openai_url(server)
    users, answers, turns = [], [], []
    for turn in range(args.chat_turns):
        users.append(chat_user_message(turn))
        result = stream_chat(url, chat_messages(users, answers), args.chat_max_tokens)
        answers.append(result["text"])
        turns.append(result)
        log(
            f"    chat {setting}: turn {turn + 1}: TTFT {result['ttft_s']:.3f} s, "
            f"{result['prompt_tokens']} prompt tokens, {result['cached_tokens']} cached"
        )
    figures = {
        "last_turn_ttft_s": round(turns[-1]["ttft_s"], 3),
        "mean_ttft_s": mean_or_none(t["ttft_s"] for t in turns),
        "ttft_by_turn_s": [round(t["ttft_s"], 3) for t in turns],
        "seconds_by_turn": [round(t["seconds"], 3) for t in turns],
        "prompt_tokens_by_turn": [t["prompt_tokens"] for t in turns],
        "completion_tokens_by_turn": [t["completion_tokens"] for t in turns],
        "cached_tokens_by_turn": [t["cached_tokens"] for t in turns],
        "cached_tokens": cached_summary([t["cached_tokens"] for t in turns]),
    }
    return figures, answers


def system_prompt_scenario(args, server, setting: str) -> tuple[dict, list[str]]:
    url = openai_url(server)
    system = system_prompt_text(args.system_rules)

    def request(index: int) -> dict:
        messages = [
            {"role": "system", "content": system},
            {"role": "user", "content": system_question(index)},
        ]
        return stream_chat(url, messages, args.system_max_tokens)

    results, seconds = concurrently(args.concurrency, args.system_requests, request)
    tokens = sum(r["completion_tokens"] or 0 for r in results)
    figures = {
        **load_figures(args, results, tokens, seconds),
        "prompt_tokens_p50": percentile([r["prompt_tokens"] or 0 for r in results], 50),
        "cached_tokens": cached_summary([r["cached_tokens"] for r in results]),
    }
    log(f"    system_prompt {setting}: {figures['tokens_per_s']} tok/s, TTFT p50 {figures['ttft_p50_s']} s")
    return figures, [r["text"] for r in results]


def load_figures(args, results: Sequence[dict], tokens: int, seconds: float) -> dict:
    """Requests, tokens/s and TTFT of clients sending requests at once."""
    ttfts = [r["ttft_s"] for r in results]
    return {
        "requests": len(results),
        "concurrency": args.concurrency,
        "tokens": tokens,
        "seconds": round(seconds, 3),
        "tokens_per_s": round(tokens / seconds, 2),
        "ttft_p50_s": round(percentile(ttfts, 50), 3),
        "ttft_p95_s": round(percentile(ttfts, 95), 3),
    }


def unshared_scenario(args, server, setting: str) -> tuple[dict, list[str]]:
    count = args.concurrency * args.unshared_requests
    prompts = unshared_prompts(args.seed, count, *args.unshared_prompt_tokens)

    def request(index: int) -> dict:
        payload = {
            "text": prompts[index],
            "use_chat_template": False,
            "max_new_tokens": args.unshared_new_tokens,
            "min_new_tokens": args.unshared_new_tokens,
            "return_metadata": True,
        }
        return stream_generate(server.url, payload)

    results, seconds = concurrently(args.concurrency, args.unshared_requests, request)
    rows = [row for r in results for row in r["metadata"]]
    tokens = sum(row.get("completion_tokens", 0) for row in rows)
    prompt_tokens = [row.get("prompt_tokens", 0) for row in rows]
    figures = {
        **load_figures(args, results, tokens, seconds),
        "prompt_tokens_min_max": [min(prompt_tokens), max(prompt_tokens)] if prompt_tokens else None,
        "cached_prompt_tokens": cached_summary([row.get("cached_prompt_tokens") for row in rows]),
    }
    log(f"    unshared {setting}: {figures['tokens_per_s']} tok/s, TTFT p50 {figures['ttft_p50_s']} s")
    return figures, [text for r in results for text in r["texts"]]


def image_prefill_runs(args, image_model: Path) -> list[dict]:
    """The image scenario's prefill alone, in-process: the vision model loaded as a worker serves
    it, --image-questions rows about one picture added to an idle engine (Engine.add: every row's
    prefill, nothing else), with the cache on and off in turn, a new picture per request (after
    one untimed request per setting)."""
    from PIL import Image

    from shared.settings import WorkerSettings
    from worker import main as worker_main
    from worker.engine.rows import GenerationParams, RowRequest

    width, height = args.image_size
    questions = image_questions(args.image_questions)
    engines = {}
    for setting in args.settings:
        settings = WorkerSettings(
            redis_url="redis://unused",
            model=str(image_model),
            dtype=args.image_dtype,
            threads=args.threads,
            image_max_pixels=args.image_max_pixels,
            prefix_cache=setting,
        )
        worker_main.configure_threads(args.threads)
        loaded = worker_main.load_for_serving(settings)
        engines[setting] = worker_main.build_engine(settings, loaded, worker_main.lora_catalog(settings))
    runs = []
    for round_index, setting in schedule(args.settings, args.rounds):
        engine, seconds, cached = engines[setting], [], []
        for index in range(-1 if round_index < 2 else 0, args.image_requests):  # -1: warm-up
            image = Image.open(io.BytesIO(picture(20_000 + 100 * round_index + index, width, height)))
            prompts = engine.encode_image_prompts(
                questions,
                [image.convert("RGB")],
                use_chat_template=True,
                images_key=(f"{round_index}-{index}",),
            )
            rows = [
                RowRequest(
                    key=i,
                    prompt_ids=p.prompt_ids,
                    params=GenerationParams(max_new_tokens=1),
                    image_features=p.image_features,
                )
                for i, p in enumerate(prompts)
            ]
            started = time.perf_counter()
            engine.add(rows)
            if index >= 0:
                seconds.append(time.perf_counter() - started)
                cached.extend(row.cached_tokens for row in engine._batch.rows)
            engine.clear()
        runs.append(
            {
                "round": round_index,
                "setting": setting,
                "prefill_s": median_or_none(seconds),
                "prefill_by_request_s": [round(s, 3) for s in seconds],
                "prompt_tokens_per_row": len(prompts[0].prompt_ids),
                "cached_prompt_tokens": cached_summary(cached),
            }
        )
        log(f"    image prefill {setting}: {runs[-1]['prefill_s']} s for {len(rows)} rows")
    return runs


TEXT_SCENARIOS = {
    "chat": chat_scenario,
    "system_prompt": system_prompt_scenario,
    "unshared": unshared_scenario,
}


def warm_up_text(server) -> None:
    """A short request on each route, with nothing the scenarios' prompts start with."""
    import requests

    stream_generate(server.url, {"text": WARM_UP_PROMPT, "max_new_tokens": 4, "use_chat_template": False})
    response = requests.post(
        openai_url(server) + "/completions",
        json={"model": OPENAI_MODEL, "prompt": WARM_UP_PROMPT, "max_tokens": 4, "temperature": 0},
        timeout=600,
    )
    if not response.ok:
        raise RuntimeError(f"{response.status_code} from /v1/completions: {response.text[:500]}")


def guarded(scenario, args, server, setting: str) -> tuple[dict, list[str]]:
    """A scenario's figures, or its error and the server's log lines when it fails, so one
    failing scenario leaves the others' figures."""
    import requests

    from bench.image_throughput import log_lines

    try:
        return scenario(args, server, setting)
    except (requests.RequestException, RuntimeError, ValueError, KeyError, TypeError) as error:
        log(f"    failed: {type(error).__name__}: {error}")
        return {"error": f"{type(error).__name__}: {error}"[:2000], "server_log": log_lines(server.log())}, []


def run_round(
    args, round_index: int, setting: str, image_model: Path | None
) -> dict[str, tuple[dict, list[str]]]:
    """Every scenario not skipped, with one setting: the text ones on one server of the bundled
    model, the image one on another of the vision model."""
    found: dict[str, tuple[dict, list[str]]] = {}
    text = [name for name in TEXT_SCENARIOS if name not in args.skip]
    if text:
        log(f"round {round_index + 1}, prefix cache {setting}: bundled model")
        settings = server_environment(setting, args.prefix_cache_bytes)
        with serving(args, settings, dtype=args.dtype, name="prefix-cache-text") as server:
            warm_up_text(server)
            for name in text:
                found[name] = guarded(TEXT_SCENARIOS[name], args, server, setting)
    if image_model is not None:
        log(f"round {round_index + 1}, prefix cache {setting}: vision model")
        flags = image_serve_flags(image_model, args.image_max_pixels)
        settings = server_environment(setting, args.prefix_cache_bytes)
        with serving(args, settings, *flags, dtype=args.image_dtype, name="prefix-cache-image") as server:
            found["image"] = guarded(image_scenario, args, server, setting)
    return found


# -- the report ---------------------------------------------------------------------------------------


def scenario_report(name: str, runs: list[dict], answers: dict[tuple[int, str], list[str]]) -> dict:
    """A scenario's runs, the comparisons of its figures between the settings, and how many answers
    agree between the settings of each round."""
    rounds = sorted({run["round"] for run in runs})
    agreement = [
        {"round": r, **answers_agreement(answers[(r, "on")], answers[(r, "off")])}
        for r in rounds
        if (r, "on") in answers and (r, "off") in answers
    ]
    return {
        "comparisons": {c.figure: paired_ratios(runs, c) for c in COMPARISONS[name]},
        "answers_equal_on_vs_off": agreement,
        "runs": runs,
    }


def scenario_settings(args) -> dict:
    return {
        "image": {
            "model": str(args.image_model)
            if args.image_model
            else f"random {args.image_family} (bench/tiny_vlms.py)",
            "dtype": args.image_dtype,
            "image_max_pixels": args.image_max_pixels,
            "image_size": args.image_size,
            "requests": args.image_requests,
            "questions": args.image_questions,
            "new_tokens": args.image_new_tokens,
        },
        "chat": {"turns": args.chat_turns, "max_tokens": args.chat_max_tokens},
        "system_prompt": {
            "rules": args.system_rules,
            "system_prompt_chars": len(system_prompt_text(args.system_rules)),
            "requests_per_client": args.system_requests,
            "max_tokens": args.system_max_tokens,
            "concurrency": args.concurrency,
        },
        "unshared": {
            "requests_per_client": args.unshared_requests,
            "new_tokens": args.unshared_new_tokens,
            "prompt_tokens_range": args.unshared_prompt_tokens,
            "concurrency": args.concurrency,
            "seed": args.seed,
        },
    }


QUICK = {
    "rounds": 1,
    "image_requests": 1,
    "image_new_tokens": 4,
    "chat_turns": 3,
    "chat_max_tokens": 12,
    "system_requests": 1,
    "system_max_tokens": 8,
    "unshared_requests": 1,
    "unshared_new_tokens": 8,
}


def parse_args():
    parser = bench_parser(__doc__)
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=SETTINGS)
    parser.add_argument(
        "--rounds", type=int, default=2, help="rounds, each running every setting (default 2)"
    )
    parser.add_argument("--skip", nargs="*", default=[], choices=SCENARIOS, help="scenarios not to run")
    parser.add_argument("--quick", action="store_true", help="a smoke test: 1 round, tiny sizes")
    parser.add_argument(
        "--max-batch-size", type=int, default=8, help="mmserve's --max-batch-size (default 8)"
    )
    parser.add_argument(
        "--prefix-cache-bytes",
        type=int,
        default=None,
        help="MMSERVE_PREFIX_CACHE_BYTES (default: the server's)",
    )
    parser.add_argument(
        "--concurrency", type=int, default=8, help="clients of system_prompt and unshared (8)"
    )
    image = parser.add_argument_group("image")
    image.add_argument(
        "--image-family",
        default="qwen2_vl_smollm2",
        help="a bench/tiny_vlms.py family or bench model (default qwen2_vl_smollm2: a Qwen2-VL whose "
        "language model has the bundled model's shapes and depth, so prefills cost what they cost there)",
    )
    image.add_argument(
        "--image-model", type=Path, default=None, help="a vision-language model folder instead"
    )
    image.add_argument(
        "--image-max-pixels",
        type=int,
        default=None,
        help=f"mmserve's --image-max-pixels (default: {QWEN_IMAGE_MAX_PIXELS} for a tiny Qwen family, "
        "else unset; 0: unset)",
    )
    image.add_argument("--image-dtype", default="auto", help="the vision model's --dtype (default auto)")
    image.add_argument("--image-size", type=int, nargs=2, default=[640, 480], metavar=("W", "H"))
    image.add_argument("--image-requests", type=int, default=3, help="requests per run, each its own picture")
    image.add_argument("--image-questions", type=int, default=8, help="questions (rows) per request (8)")
    image.add_argument("--image-new-tokens", type=int, default=8, help="tokens per row, forced (8)")
    chat = parser.add_argument_group("chat")
    chat.add_argument("--chat-turns", type=int, default=10)
    chat.add_argument("--chat-max-tokens", type=int, default=48)
    system = parser.add_argument_group("system_prompt")
    system.add_argument("--system-requests", type=int, default=4, help="requests per client (4)")
    system.add_argument(
        "--system-rules", type=int, default=15, help="rules in the system prompt (15: ~500 tokens)"
    )
    system.add_argument("--system-max-tokens", type=int, default=32)
    unshared = parser.add_argument_group("unshared")
    unshared.add_argument("--unshared-requests", type=int, default=4, help="requests per client (4)")
    unshared.add_argument(
        "--unshared-new-tokens", type=int, default=32, help="tokens per request, forced (32)"
    )
    unshared.add_argument(
        "--unshared-prompt-tokens", type=int, nargs=2, default=[50, 400], metavar=("MIN", "MAX")
    )
    unshared.add_argument("--seed", type=int, default=0, help="the unshared prompts' seed (0)")
    add_model_flags(parser)
    args = parser.parse_args()
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    if "image" not in args.skip and args.image_model is None:
        from bench.tiny_vlms import BENCH_FAMILIES, FAMILIES

        if args.image_family not in {**FAMILIES, **BENCH_FAMILIES}:
            known = ", ".join([*FAMILIES, *BENCH_FAMILIES])
            parser.error(f"unknown --image-family {args.image_family}: choose from {known}")
    args.image_max_pixels = image_max_pixels(
        None if args.image_model else args.image_family, args.image_max_pixels
    )
    return args


def main() -> None:
    args = parse_args()
    interruptible()

    from bench.common import served_facts, threads_or_default

    args.threads = threads_or_default(args.threads)
    report: dict = {
        **served_facts(args),
        "settings": args.settings,
        "setting_env": ENV_SETTING,
        "prefix_cache_bytes": args.prefix_cache_bytes,
        "rounds": args.rounds,
        "quick": args.quick,
        "scenario_settings": {k: v for k, v in scenario_settings(args).items() if k not in args.skip},
    }
    started = time.perf_counter()
    runs: dict[str, list[dict]] = {name: [] for name in SCENARIOS if name not in args.skip}
    answers: dict[str, dict[tuple[int, str], list[str]]] = {name: {} for name in runs}
    with tempfile.TemporaryDirectory(prefix="mmserve-prefix-cache-") as scratch:
        image_model = None
        if "image" not in args.skip:
            image_model = args.image_model
            if image_model is None:
                from bench.tiny_vlms import BENCH_FAMILIES, FAMILIES

                log(f"building the {args.image_family} model")
                build = {**FAMILIES, **BENCH_FAMILIES}[args.image_family]
                image_model = build(Path(scratch) / args.image_family)
        for round_index, setting in schedule(args.settings, args.rounds):
            for name, (figures, texts) in run_round(args, round_index, setting, image_model).items():
                runs[name].append({"round": round_index, "setting": setting, **figures})
                if "error" not in figures:
                    answers[name][(round_index, setting)] = texts
        if image_model is not None:
            log("image prefill, in-process")
            runs["image_prefill"] = image_prefill_runs(args, image_model)
            answers["image_prefill"] = {}
    report["scenarios"] = {name: scenario_report(name, runs[name], answers[name]) for name in runs}
    if "chat" in answers:
        report["scenarios"]["chat"]["answers"] = {
            f"{r}/{s}": texts for (r, s), texts in answers["chat"].items()
        }
    report["targets"] = targets({name: s["comparisons"] for name, s in report["scenarios"].items()})
    report["seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
