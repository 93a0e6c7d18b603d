"""Speculative decoding (--speculative auto against off) on the bundled model, and llama.cpp.

    .venv/bin/python -m bench.speculative --help

`mmserve serve` with one worker, `MMSERVE_SPECULATIVE` auto and off in turn (the order flipped
every round), every request greedy. Three workloads:

1. `grounded`: prompts whose answer repeats much of the prompt (edit a given code snippet,
   extract from or summarise a given text; ~150-330 prompt tokens), one request at a time,
   each answer ending where the model ends it (at most --grounded-tokens): tokens/s over the
   whole requests (prefill included), and the share of the answers' tokens that came as kept
   drafts. llama.cpp (llama-cpp-python, an optional extra: `pip install -e .[llamacpp]`) runs
   the same chat-templated prompts one at a time on the bundled GGUF with the same thread count,
   its answers also ending where its model ends them.
2. `open_c1`: the throughput bench's open-ended prompts, one at a time, --open-tokens each.
3. `open_c8`: the same prompts from 8 clients at once.

Answers are compared between auto and off (greedy: they must be equal). Prints one JSON document."""

from __future__ import annotations

import importlib.util
import json
import statistics
import sys
import time
from collections.abc import Sequence

from bench.common import PROMPTS, add_model_flags, bench_parser, chat_prompt_ids, machine, threads_or_default

SETTINGS = ("auto", "off")
CODE = """def total_price(items, tax_rate):
    total = 0
    for item in items:
        price = item["price"] * item["quantity"]
        if item.get("discount"):
            price = price - price * item["discount"]
        total = total + price
    total = total + total * tax_rate
    return round(total, 2)


def cheapest_item(items):
    best = None
    for item in items:
        if best is None or item["price"] < best["price"]:
            best = item
    return best
"""
REPORT = (
    "Minutes of the garden committee, 14 March. Present: Alice Moreau (chair), Tom Becker, Priya Nair, "
    "Samuel Okafor and Lena Fischer. The committee agreed to move the compost bins to the north corner "
    "before April, because the current spot floods after heavy rain. Tom Becker will ask the council for "
    "two extra water butts. Priya Nair reported that the seed swap raised 140 euros, which will pay for "
    "new tools. Samuel Okafor proposed a children's planting day on 20 May; the committee approved it and "
    "Lena Fischer will prepare the invitations. The next meeting is on 11 April at the community hall."
)
GROUNDED_PROMPTS = [
    "Rename the function total_price to order_total in this code and show the whole code:\n\n" + CODE,
    "Add a docstring to each function of this code and show the whole code:\n\n" + CODE,
    "List every person named in this text, with what they will do:\n\n" + REPORT,
    "Rewrite this text as a bulleted list of decisions, keeping its wording:\n\n" + REPORT,
]


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def serving(args, setting: str):
    """`mmserve serve` with one worker, `--speculative` `setting` (its environment variable)."""
    from bench.prefix_cache import serving as serving_with

    flags = ("--draft-tokens", str(args.draft_tokens))
    environment = {"MMSERVE_SPECULATIVE": setting}
    return serving_with(args, environment, *flags, dtype=args.dtype, name=f"speculative-{setting}")


def generate(url: str, text: str, max_tokens: int, forced: bool) -> dict:
    import requests

    payload = {
        "text": text,
        "use_chat_template": True,
        "max_new_tokens": max_tokens,
        "min_new_tokens": max_tokens if forced else 0,
        "return_metadata": True,
    }
    started = time.perf_counter()
    response = requests.post(url + "/generate", json=payload, timeout=600)
    if not response.ok:
        raise RuntimeError(f"{response.status_code} from /generate: {response.text[:500]}")
    answer = response.json()
    metadata = answer["metadata"]
    return {
        "seconds": time.perf_counter() - started,
        "text": answer["text"],
        "tokens": metadata["completion_tokens"],
        "accepted_draft_tokens": metadata.get("accepted_draft_tokens") or 0,
    }


def figures(results: Sequence[dict], seconds: float) -> dict:
    tokens = sum(r["tokens"] for r in results)
    accepted = sum(r["accepted_draft_tokens"] for r in results)
    return {
        "requests": len(results),
        "tokens": tokens,
        "seconds": round(seconds, 3),
        "tokens_per_s": round(tokens / seconds, 2),
        "accepted_draft_tokens": accepted,
        "accepted_share": round(accepted / tokens, 3) if tokens else None,
    }


def one_at_a_time(url: str, prompts: Sequence[str], max_tokens: int, forced: bool) -> tuple[dict, list[str]]:
    results = [generate(url, prompt, max_tokens, forced) for prompt in prompts]
    return figures(results, sum(r["seconds"] for r in results)), [r["text"] for r in results]


def from_clients(url: str, prompts: Sequence[str], max_tokens: int, clients: int) -> tuple[dict, list[str]]:
    """`clients` clients sending 2 requests each, one after the other, cycling through `prompts`."""
    from bench.prefix_cache import concurrently

    def request(index: int) -> dict:
        return generate(url, prompts[index % len(prompts)], max_tokens, True)

    results, seconds = concurrently(clients, 2, request)
    return figures(results, seconds), [r["text"] for r in results]


def run_setting(args, setting: str) -> tuple[dict, dict[str, list[str]]]:
    with serving(args, setting) as server:
        generate(server.url, "Say hello.", 8, True)  # warm-up
        runs, texts = {}, {}
        runs["grounded"], texts["grounded"] = one_at_a_time(
            server.url, GROUNDED_PROMPTS, args.grounded_tokens, forced=False
        )
        runs["open_c1"], texts["open_c1"] = one_at_a_time(
            server.url, PROMPTS[:4], args.open_tokens, forced=True
        )
        runs["open_c8"], texts["open_c8"] = from_clients(server.url, PROMPTS, args.open_tokens, clients=8)
    for name, run in runs.items():
        log(f"    {setting} {name}: {run['tokens_per_s']} tok/s, accepted share {run['accepted_share']}")
    return runs, texts


def llama_cpp_grounded(args) -> dict:
    """llama.cpp, one prompt at a time, on the grounded prompts (answers end where its model ends them)."""
    if importlib.util.find_spec("llama_cpp") is None:
        return {"skipped": "llama-cpp-python is not installed (pip install -e .[llamacpp])"}
    from transformers import AutoTokenizer

    from bench.vs_llamacpp import load_llama
    from worker.engine.models.loading import cache_dir, converted_default_model

    tokenizer = AutoTokenizer.from_pretrained(converted_default_model(cache_dir()))
    prompts = [chat_prompt_ids(tokenizer, text) for text in GROUNDED_PROMPTS]
    llm = load_llama(args)
    llm(prompts[0], max_tokens=8, temperature=0, repeat_penalty=1.0)  # warm-up
    tokens, seconds = 0, 0.0
    for prompt in prompts:
        llm.reset()
        started = time.perf_counter()
        result = llm(prompt, max_tokens=args.grounded_tokens, temperature=0, repeat_penalty=1.0)
        seconds += time.perf_counter() - started
        tokens += result["usage"]["completion_tokens"]
    return {
        "requests": len(prompts),
        "tokens": tokens,
        "seconds": round(seconds, 3),
        "tokens_per_s": round(tokens / seconds, 2),
    }


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


def main() -> None:
    parser = bench_parser(__doc__)
    add_model_flags(parser)
    parser.add_argument("--rounds", type=int, default=2, help="rounds, each running auto and off (default 2)")
    parser.add_argument("--draft-tokens", type=int, default=6, help="mmserve's --draft-tokens (default 6)")
    parser.add_argument("--grounded-tokens", type=int, default=256, help="most tokens per grounded answer")
    parser.add_argument("--open-tokens", type=int, default=64, help="tokens per open-ended answer (forced)")
    parser.add_argument("--skip-llamacpp", action="store_true", help="leave llama.cpp out")
    args = parser.parse_args()
    args.threads = threads_or_default(args.threads)
    args.max_batch_size = 8

    runs, answers_equal = [], []
    llama = []
    for round_index in range(args.rounds):
        order = SETTINGS if round_index % 2 == 0 else tuple(reversed(SETTINGS))
        log(f"round {round_index + 1}")
        texts = {}
        for setting in order:
            figures_by_workload, texts[setting] = run_setting(args, setting)
            runs.append({"round": round_index, "setting": setting, **figures_by_workload})
        answers_equal.append(
            {
                workload: sum(
                    a == b for a, b in zip(texts["auto"][workload], texts["off"][workload], strict=True)
                )
                for workload in texts["auto"]
            }
        )
        if not args.skip_llamacpp:
            llama.append(llama_cpp_grounded(args))
            log(f"    llama.cpp grounded: {llama[-1].get('tokens_per_s', llama[-1].get('skipped'))}")

    comparisons = {}
    for workload in ("grounded", "open_c1", "open_c8"):
        pairs = []
        for round_index in range(args.rounds):
            by_setting = {r["setting"]: r[workload] for r in runs if r["round"] == round_index}
            pairs.append(ratio(by_setting["auto"]["tokens_per_s"], by_setting["off"]["tokens_per_s"]))
        comparisons[f"{workload}_auto_over_off"] = {
            "ratios": pairs,
            "median": round(statistics.median(p for p in pairs if p is not None), 3) if any(pairs) else None,
        }
    if llama and "tokens_per_s" in llama[0]:
        pairs = []
        for round_index, reference in enumerate(llama):
            auto = next(r for r in runs if r["round"] == round_index and r["setting"] == "auto")
            pairs.append(ratio(auto["grounded"]["tokens_per_s"], reference["tokens_per_s"]))
        comparisons["grounded_auto_over_llama_cpp_batch1"] = {
            "ratios": pairs,
            "median": statistics.median(pairs),
        }
    report = {
        "model": "SmolLM2-135M-Instruct (bundled)",
        "dtype": args.dtype,
        "threads": args.threads,
        "draft_tokens": args.draft_tokens,
        **machine(),
        "rounds": args.rounds,
        "targets": {
            "grounded_auto_over_off": 2.0,
            "grounded_auto_over_llama_cpp_batch1": 1.0,
            "open_c1_auto_over_off": 0.97,
            "open_c8_auto_over_off": 0.97,
        },
        "comparisons": comparisons,
        "answers_equal_auto_vs_off": answers_equal,
        "runs": runs,
        "llama_cpp": llama,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
