"""Determinism (issue 24): whether the same greedy request gets the same answer whatever else the
worker is doing, with `--batch-invariant on` and `off`, and what the setting costs in tokens/s.

    .venv/bin/python -m bench.determinism --help

`mmserve serve` with one worker, the bundled model, `--dtype auto` (bfloat16 on a CPU with
AVX512-BF16), `--max-batch-size 8` and the threads `mmserve serve` gives one worker, started once
per setting (never two at once). Two parts:

1. Determinism, per setting: one fixed chat prompt sent --requests times to /generate (greedy,
   exactly --new-tokens tokens), by --probe-clients clients one request after the other, while
   --load-clients other clients keep the batch full with random prompts (random words, 5-200 of
   them) and random max_new_tokens (8-96, greedy, ending at end-of-sequence or not), streamed or
   not, so that the probe meets different company, join steps and padding each time. Reported:
   how many distinct completions, the most common one's share, where each other completion first
   differs from it (character, and token of the re-tokenized text), and whether the probe sent
   alone before the load starts gave the most common completion.
2. Speed: streaming clients at concurrency 1 and 8 (fixed prompts, exactly --new-tokens tokens,
   greedy, as bench.throughput), one server per setting and round, the settings in turn (on, off,
   on, off...); tokens/s per run, and the ratio on / off at each concurrency, the median of the
   ratios within each round.

Prints one JSON document; progress on stderr."""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import json
import random
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from bench.batch_invariance import first_divergence
from bench.common import add_model_flags, bench_parser, percentile

PROBE_PROMPT = "Write a short story about a lighthouse keeper."
WARM_UP_PROMPT = "Name three colours."

_WORDS = (
    "river stone window garden letter engine winter morning silver market bridge candle forest "
    "harbour pencil ladder orange rabbit thunder kettle mirror castle meadow feather violin basket "
    "compass lantern island marble needle pocket quiet rapid simple tender yellow ancient bright "
    "careful distant early famous gentle hollow narrow patient rough sudden wooden walk listen build "
    "carry follow gather measure open promise remember travel wander whisper write explain because "
    "although before after during while under over between through across and but or the a of to "
    "in on with for from by about question answer story number reason history science music"
)
WORDS = _WORDS.split()

SETTINGS = ("on", "off")

# -- pure helpers (tests/unit/bench/test_determinism.py) -------------------------------------------


def distinct_completions(texts: Sequence[str]) -> dict:
    """How many completions, how many distinct, the most common one's share, and each distinct
    completion's count (most common first)."""
    counts = collections.Counter(texts)
    ranked = counts.most_common()
    return {
        "completions": len(texts),
        "distinct": len(counts),
        "most_common_share": round(ranked[0][1] / len(texts), 4) if texts else None,
        "counts": [count for _, count in ranked],
    }


def where_it_differs(
    reference: str, text: str, tokenize: Callable[[str], Sequence[int]] | None = None
) -> dict:
    """The first character (and with `tokenize`, token of the re-tokenized texts) where `text`
    differs from `reference`; None where they are equal."""
    found = {"first_differing_char": first_divergence(reference, text)}
    if tokenize is not None:
        found["first_differing_token"] = first_divergence(tokenize(reference), tokenize(text))
    return found


def divergences(
    texts: Sequence[str], tokenize: Callable[[str], Sequence[int]] | None = None, keep: int = 20
) -> dict:
    """Where each distinct completion first differs from the most common one: the character, and
    (with `tokenize`) the token of the re-tokenized texts; the earliest of each; the first `keep`
    variants (most frequent first) with their counts and text."""
    ranked = collections.Counter(texts).most_common()
    if not ranked:
        return {"earliest_char": None, "earliest_token": None, "variants": []}
    reference = ranked[0][0]
    variants = [
        {"count": count, **where_it_differs(reference, text, tokenize), "text": text}
        for text, count in ranked[1:]
    ]
    chars = [v["first_differing_char"] for v in variants if v["first_differing_char"] is not None]
    tokens = [v.get("first_differing_token") for v in variants if v.get("first_differing_token") is not None]
    return {
        "most_common": reference,
        "earliest_char": min(chars) if chars else None,
        "earliest_token": min(tokens) if tokens else None,
        "variants": variants[:keep],
        "variants_left_off": max(0, len(variants) - keep),
    }


def speed_ratios(runs: Sequence[dict], numerator: str = "on", denominator: str = "off") -> dict:
    """Per concurrency, the tokens/s ratio numerator / denominator within each round (runs carry
    "round", "setting" and "concurrency_<c>" tokens/s), and its median over the rounds that ran both."""
    by_round: dict[int, dict[str, dict]] = collections.defaultdict(dict)
    for run in runs:
        by_round[run["round"]][run["setting"]] = run
    concurrencies = sorted(
        {
            int(key.removeprefix("concurrency_"))
            for run in runs
            for key in run
            if key.startswith("concurrency_")
        }
    )
    result = {}
    for concurrency in concurrencies:
        key = f"concurrency_{concurrency}"
        ratios = [
            round(pair[numerator][key] / pair[denominator][key], 3)
            for _, pair in sorted(by_round.items())
            if numerator in pair and denominator in pair and pair[denominator][key]
        ]
        result[key] = {
            "ratios": ratios,
            "median": round(statistics.median(ratios), 3) if ratios else None,
        }
    return result


def random_load_request(rng: random.Random, min_words: int = 5, max_words: int = 200) -> dict:
    """A load client's request: random words (a random count), a random max_new_tokens (8-96),
    greedy, the chat template or not, streamed or not (the "stream" key, not part of the payload)."""
    words = rng.randint(min_words, max_words)
    return {
        "text": " ".join(rng.choice(WORDS) for _ in range(words)),
        "max_new_tokens": rng.randint(8, 96),
        "use_chat_template": rng.random() < 0.8,
        "stream": rng.random() < 0.5,
    }


def probe_payload(new_tokens: int, text: str = PROBE_PROMPT) -> dict:
    """The probe request: one chat prompt, greedy, exactly `new_tokens` tokens."""
    return {
        "text": text,
        "use_chat_template": True,
        "max_new_tokens": new_tokens,
        "min_new_tokens": new_tokens,
        "sampling_topk": 1,
        "return_metadata": True,
    }


def setting_flags(setting: str) -> list[str]:
    """`mmserve serve`'s flags for a setting."""
    return ["--batch-invariant", setting]


def interruptible() -> None:
    """SIGINT and SIGTERM raise KeyboardInterrupt, so the servers are stopped on the way out,
    even when the bench was started in the background (which inherits SIGINT ignored)."""
    for number in (signal.SIGINT, signal.SIGTERM):
        signal.signal(number, signal.default_int_handler)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- the server --------------------------------------------------------------------------------------


@contextlib.contextmanager
def serving(args, setting: str) -> Iterator:
    """`mmserve serve` with `setting`, stopped with Ctrl-C on the way out, whatever happens."""
    from bench.serving import ServeProcess

    with tempfile.TemporaryDirectory(prefix="mmserve-determinism-") as folder:
        server = ServeProcess.for_benchmark(
            *setting_flags(setting),
            max_batch_size=args.max_batch_size,
            dtype=args.dtype,
            threads=args.threads,
            pack_weights=args.pack_weights,
            log_path=Path(folder) / "serve.log",
        )
        try:
            yield server
        finally:
            server.stop()


def generate(url: str, payload: dict) -> dict:
    import requests

    response = requests.post(url + "/generate", json=payload, timeout=600)
    if not response.ok:
        raise RuntimeError(f"{response.status_code} from /generate: {response.text[:500]}")
    return response.json()


def load_client(url: str, seed: int, stop: threading.Event, tally: dict, lock: threading.Lock) -> None:
    """Random requests one after the other until `stop`."""
    import requests

    from bench.serving import read_answer

    rng = random.Random(seed)
    while not stop.is_set():
        request = random_load_request(rng)
        stream = request.pop("stream")
        try:
            if stream:
                with requests.post(
                    url + "/generate_stream", json=request, stream=True, timeout=600
                ) as response:
                    _, events = read_answer(response, time.perf_counter())
                tokens = sum(1 for event in events if event.event == "message")
            else:
                answer = generate(url, {**request, "return_metadata": True})
                tokens = answer["metadata"]["completion_tokens"]
        except Exception as error:  # the server stopping at the end, or a real error: counted
            if stop.is_set():
                return
            with lock:
                tally["errors"] += 1
                tally["last_error"] = repr(error)[:300]
            time.sleep(0.5)
            continue
        with lock:
            tally["requests"] += 1
            tally["tokens"] += tokens


# -- part 1: determinism ------------------------------------------------------------------------------


def determinism(args, setting: str, tokenize: Callable[[str], Sequence[int]]) -> dict:
    log(f"determinism, --batch-invariant {setting}: starting mmserve serve")
    with serving(args, setting) as server:
        readers = server.readers()
        generate(server.url, probe_payload(8, WARM_UP_PROMPT))
        alone = generate(server.url, probe_payload(args.new_tokens))["text"]
        stop, lock = threading.Event(), threading.Lock()
        tally = {"requests": 0, "tokens": 0, "errors": 0, "last_error": None}
        loaders = [
            threading.Thread(
                target=load_client,
                args=(server.url, args.seed * 1000 + i, stop, tally, lock),
                daemon=True,
            )
            for i in range(args.load_clients)
        ]
        texts: list[str] = []
        probe_times: list[float] = []
        queue_times: list[float] = []
        try:
            for loader in loaders:
                loader.start()
            time.sleep(args.load_head_start)  # the load fills the batch first
            started = time.perf_counter()
            payload = probe_payload(args.new_tokens)

            def probe(_: int) -> tuple[str, float, float]:
                sent = time.perf_counter()
                answer = generate(server.url, payload)
                metadata = answer["metadata"]
                if metadata["completion_tokens"] != args.new_tokens:
                    raise RuntimeError(f"probe answered {metadata['completion_tokens']} tokens: {metadata}")
                return answer["text"], time.perf_counter() - sent, metadata["queue_time_ms"]

            with concurrent.futures.ThreadPoolExecutor(args.probe_clients) as pool:
                for done, (text, seconds, queued) in enumerate(pool.map(probe, range(args.requests)), 1):
                    texts.append(text)
                    probe_times.append(seconds)
                    queue_times.append(queued)
                    if done % args.progress_every == 0 or done == args.requests:
                        elapsed = time.perf_counter() - started
                        log(
                            f"  {setting}: {done}/{args.requests} probes, "
                            f"{len(set(texts))} distinct, {elapsed:.0f} s "
                            f"({elapsed / done:.2f} s per probe), load: {tally['requests']} requests"
                        )
            elapsed = time.perf_counter() - started
            load = dict(tally)
        finally:
            stop.set()
            for loader in loaders:
                loader.join(timeout=120)
    counted = distinct_completions(texts)
    most_common = collections.Counter(texts).most_common(1)[0][0]
    return {
        "setting": setting,
        **counted,
        "alone_equals_most_common": alone == most_common,
        **{f"alone_{key}": value for key, value in where_it_differs(most_common, alone, tokenize).items()},
        **divergences(texts, tokenize),
        "alone": alone,
        "seconds": round(elapsed, 1),
        "seconds_per_probe": round(elapsed / len(texts), 3),
        "probe_seconds_p50": round(percentile(probe_times, 50), 3),
        "probe_seconds_p95": round(percentile(probe_times, 95), 3),
        "probe_queue_ms_p50": percentile(queue_times, 50),
        "load": {
            **load,
            "clients": args.load_clients,
            "tokens_per_s": round(load["tokens"] / elapsed, 2),
        },
        "worker": readers[0] if readers else None,
    }


# -- part 2: speed -----------------------------------------------------------------------------------


def speed_run(args, setting: str, round_index: int) -> dict:
    from bench.serving import generate_streams

    log(f"speed round {round_index + 1}, --batch-invariant {setting}: starting mmserve serve")
    with serving(args, setting) as server:
        generate_streams(server.url, 1, 1, 8)  # warm-up
        generate_streams(server.url, 8, 1, 8)
        c1 = generate_streams(server.url, 1, args.speed_requests_c1, args.new_tokens)
        c8 = generate_streams(server.url, 8, args.speed_rounds_c8, args.new_tokens)
    log(f"  {setting}: {c1['tokens_per_s']} tok/s at concurrency 1, {c8['tokens_per_s']} at 8")
    return {
        "round": round_index,
        "setting": setting,
        "concurrency_1": c1["tokens_per_s"],
        "concurrency_8": c8["tokens_per_s"],
        "runs": [c1, c8],
    }


# -- main -----------------------------------------------------------------------------------------------


def tokenizer_of_the_bundled_model() -> Callable[[str], list[int]]:
    from transformers import AutoTokenizer

    from worker.engine.models.loading import cache_dir, converted_default_model

    tokenizer = AutoTokenizer.from_pretrained(str(converted_default_model(cache_dir(None))))
    return lambda text: tokenizer.encode(text, add_special_tokens=False)


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument(
        "--requests", type=int, default=1000, help="probe requests per setting (default 1000)"
    )
    parser.add_argument(
        "--load-clients", type=int, default=7, help="clients sending random requests meanwhile (default 7)"
    )
    parser.add_argument(
        "--probe-clients", type=int, default=1, help="clients sending the probe at once (default 1)"
    )
    parser.add_argument(
        "--new-tokens", type=int, default=64, help="probe and speed tokens, forced (default 64)"
    )
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=SETTINGS)
    parser.add_argument(
        "--speed-rounds", type=int, default=3, help="speed runs per setting, the settings in turn (default 3)"
    )
    parser.add_argument(
        "--speed-requests-c1", type=int, default=6, help="requests at concurrency 1 per speed run (default 6)"
    )
    parser.add_argument(
        "--speed-rounds-c8", type=int, default=3, help="requests per client at concurrency 8 (default 3)"
    )
    parser.add_argument(
        "--max-batch-size", type=int, default=8, help="mmserve's --max-batch-size (default 8)"
    )
    parser.add_argument("--seed", type=int, default=0, help="the load clients' random seed (default 0)")
    parser.add_argument(
        "--load-head-start", type=float, default=3.0, help="seconds of load before the first probe"
    )
    parser.add_argument("--progress-every", type=int, default=50, help="probes between progress lines")
    parser.add_argument("--skip", nargs="*", default=[], choices=["determinism", "speed"])
    add_model_flags(parser)
    args = parser.parse_args()
    interruptible()

    from bench.common import served_facts, threads_or_default

    args.threads = threads_or_default(args.threads)
    report: dict = {
        **served_facts(args),
        "new_tokens": args.new_tokens,
        "settings": args.settings,
    }
    started = time.perf_counter()
    if "determinism" not in args.skip:
        tokenize = tokenizer_of_the_bundled_model()
        report["determinism"] = {
            "probe_prompt": PROBE_PROMPT,
            "requests": args.requests,
            "probe_clients": args.probe_clients,
            "load_clients": args.load_clients,
            "seed": args.seed,
            "by_setting": {setting: determinism(args, setting, tokenize) for setting in args.settings},
        }
        by_setting = report["determinism"]["by_setting"]
        if set(SETTINGS) <= set(by_setting):  # one run each, not in turn: a rough figure
            report["determinism"]["probe_seconds_on_over_off"] = round(
                by_setting["on"]["seconds_per_probe"] / by_setting["off"]["seconds_per_probe"], 3
            )
            report["determinism"]["load_tokens_per_s_on_over_off"] = round(
                by_setting["on"]["load"]["tokens_per_s"] / by_setting["off"]["load"]["tokens_per_s"], 3
            )
    if "speed" not in args.skip:
        runs = [
            speed_run(args, setting, round_index)
            for round_index in range(args.speed_rounds)
            for setting in args.settings
        ]
        report["speed"] = {
            "requests_c1": args.speed_requests_c1,
            "requests_per_client_c8": args.speed_rounds_c8,
            "ratio_on_over_off": speed_ratios(runs) if set(SETTINGS) <= set(args.settings) else None,
            "runs": runs,
        }
    report["seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
