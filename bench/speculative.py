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

Answers are compared between auto and off (greedy: they must be equal). Prints one JSON document.

`--draft-model SPEC` (repeatable; default none) adds, for each draft model, two settings to
every round: `auto` and `draft` with it (`MMSERVE_DRAFT_MODEL`), beside plain auto (lookup
only) and off; every setting's answers are compared with off's. SPEC is `self` (the bundled
model drafting for itself: every draft kept, each drafted token costing about a plain step) or
`layers:N` (the bundled model's first N of its 30 decoder layers, its final norm and head, saved
once in the mmserve cache dir under bench/draft-models). Each run then also reports, per
workload, what each drafter proposed and the model kept (the worker's /status counters), and
the cost per drafted token the worker timed at its start (its log). `--workloads` picks
workloads. `--probe` starts no server: in-process, for each draft model, the share of its greedy
tokens equal to the model's along the model's greedy answers to the grounded prompts, what
always drafting --draft-tokens would keep, and the drafted token's cost (`measured_cost`)."""

from __future__ import annotations

import importlib.util
import json
import re
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from bench.common import PROMPTS, add_model_flags, bench_parser, chat_prompt_ids, machine, threads_or_default

SETTINGS = ("auto", "off")
WORKLOADS = ("grounded", "open_c1", "open_c8")
BUNDLED_LAYERS = 30
COST_LINE = re.compile(r"draft model (\S+): a drafted token costs ([0-9.]+) of a plain step")
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


def settings_of(draft_models: Sequence[str]) -> tuple[str, ...]:
    """The settings a round runs: auto and off, then `auto+SPEC` and `draft+SPEC` per draft model."""
    return (*SETTINGS, *(f"{mode}+{spec}" for spec in draft_models for mode in ("auto", "draft")))


def split_setting(setting: str) -> tuple[str, str | None]:
    """("auto", "layers:8") from "auto+layers:8"; ("off", None) from "off"."""
    mode, _, spec = setting.partition("+")
    return mode, spec or None


def layers_of(spec: str) -> int | None:
    """N of a `layers:N` draft model; None for `self`; ValueError for anything else."""
    if spec == "self":
        return None
    match = re.fullmatch(r"layers:(\d+)", spec)
    if match is None or not 1 <= int(match.group(1)) < BUNDLED_LAYERS:
        raise ValueError(f"a draft model is self or layers:N (N in 1..{BUNDLED_LAYERS - 1}), not {spec!r}")
    return int(match.group(1))


def draft_model_path(spec: str) -> Path:
    """The folder of draft model `spec`, built once (in the mmserve cache dir) if need be."""
    from worker.engine.models.loading import cache_dir, converted_default_model

    model = converted_default_model(cache_dir())
    layers = layers_of(spec)
    if layers is None:
        return model
    target = cache_dir() / "bench" / "draft-models" / f"{model.name}-layers{layers}"
    if not (target / "config.json").is_file():
        truncated_copy(model, layers, target)
    return target


def truncated_copy(source: Path, layers: int, target: Path) -> None:
    """`source`'s first `layers` decoder layers, final norm and head, with its tokenizer, in
    `target` (written in a staging folder and renamed)."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log(f"  building a {layers}-layer draft model in {target}")
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    model.model.layers = model.model.layers[:layers]
    model.config.num_hidden_layers = layers
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = model.config.layer_types[:layers]
    staging = target.with_name(target.name + ".staging")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    AutoTokenizer.from_pretrained(source).save_pretrained(staging)
    staging.rename(target)


def serving(args, setting: str):
    """`mmserve serve` with one worker, `--speculative` `setting` (its environment variable),
    and the draft model the setting names (`MMSERVE_DRAFT_MODEL`). With draft models in the
    run, every server logs at INFO (the worker logs the draft model's cost)."""
    from bench.prefix_cache import serving as serving_with

    mode, spec = split_setting(setting)
    flags = ["--draft-tokens", str(args.draft_tokens)]
    if args.draft_model:
        flags += ["--log-level", "INFO"]
    environment = {"MMSERVE_SPECULATIVE": mode}
    if spec is not None:
        environment["MMSERVE_DRAFT_MODEL"] = str(draft_model_path(spec))
    name = f"speculative-{setting.replace('+', '-').replace(':', '')}"
    return serving_with(args, environment, *flags, dtype=args.dtype, name=name)


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


def run_workload(args, url: str, workload: str) -> tuple[dict, list[str]]:
    if workload == "grounded":
        return one_at_a_time(url, GROUNDED_PROMPTS, args.grounded_tokens, forced=False)
    if workload == "open_c1":
        return one_at_a_time(url, PROMPTS[:4], args.open_tokens, forced=True)
    return from_clients(url, PROMPTS, args.open_tokens, clients=8)


def drafter_counts(server) -> dict[str, dict[str, int]]:
    """The worker's drafters' counters ({drafter: {proposed, accepted, checks}}), as its latest
    heartbeat published them (wait a heartbeat after a workload before reading them)."""
    import requests

    readers = requests.get(server.management_url + "/status", timeout=5).json()["live_readers"]
    (reader,) = readers.values()
    return reader["stats"].get("drafters", {})


def counts_between(before: dict, after: dict) -> dict[str, dict[str, int]]:
    """What each drafter did between two drafter_counts readings."""
    empty = {"proposed": 0, "accepted": 0, "checks": 0}
    return {
        drafter: {key: counts[key] - before.get(drafter, empty)[key] for key in empty}
        for drafter, counts in after.items()
    }


def logged_costs(text: str) -> dict[str, float]:
    """The cost per drafted token each draft model's worker logged, by draft model path."""
    return {name: float(cost) for name, cost in COST_LINE.findall(text)}


def run_setting(args, setting: str) -> tuple[dict, dict[str, list[str]]]:
    from shared.defaults import READER_HEARTBEAT_SECONDS

    counting = bool(args.draft_model) and setting != "off"
    with serving(args, setting) as server:
        generate(server.url, "Say hello.", 8, True)  # warm-up
        runs, texts = {}, {}
        for workload in args.workloads:
            if counting:
                time.sleep(READER_HEARTBEAT_SECONDS + 1)
                before = drafter_counts(server)
            runs[workload], texts[workload] = run_workload(args, server.url, workload)
            if counting:
                time.sleep(READER_HEARTBEAT_SECONDS + 1)
                runs[workload]["drafters"] = counts_between(before, drafter_counts(server))
        costs = logged_costs(server.log())
    if split_setting(setting)[1] is not None:
        runs["draft_model_cost"] = next(iter(costs.values()), None)
        log(f"    {setting}: the worker timed a drafted token at {runs['draft_model_cost']} of a plain step")
    for name in args.workloads:
        run = runs[name]
        drafted = run.get("drafters", "")
        log(f"    {setting} {name}: {run['tokens_per_s']} tok/s, accepted {run['accepted_share']} {drafted}")
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


def simulated_drafting(matches: Sequence[bool], tokens: int) -> dict:
    """Always drafting up to `tokens` tokens along an answer whose token i the draft model
    guesses right (given the answer before it) where matches[i]: a step keeps the drafts up
    to the first wrong one, and yields them and the model's own token; the first token comes
    from the prefill."""
    position, steps, drafted, kept = 1, 0, 0, 0
    while position < len(matches):
        count = min(tokens, len(matches) - position - 1)
        run = 0
        while run < count and matches[position + run]:
            run += 1
        steps, drafted, kept, position = steps + 1, drafted + count, kept + run, position + run + 1
    return {"steps": steps, "drafted": drafted, "kept": kept, "yielded": len(matches) - 1}


def probe(args) -> dict:
    """In-process, no server: each draft model's greedy tokens against the model's along
    the model's greedy answers to the grounded prompts, and its drafted token's cost timed
    as a worker times it at its start."""
    import torch

    from bench.common import served_model
    from shared import defaults
    from shared.settings import WorkerSettings
    from worker.engine.kv_cache import growing_cache
    from worker.engine.models.model_facts import logit_columns
    from worker.engine.speculation.draft_model import DraftCursor, DraftModel
    from worker.main import load_draft_model

    torch.set_num_threads(args.threads)
    settings = {"dtype": args.dtype, "pack_weights": args.pack_weights}
    loaded = served_model(**settings)
    ends = {loaded.tokenizer.eos_token_id, *[loaded.model.generation_config.eos_token_id or []]}
    ends = {end for one in ends for end in (one if isinstance(one, list) else [one])}
    prompts = [chat_prompt_ids(loaded.tokenizer, text) for text in GROUNDED_PROMPTS]
    model = DraftModel(loaded.model, cost=1.0, vocab_size=logit_columns(loaded.model))
    answers = []
    for prompt in prompts:
        tokens = model.propose(DraftCursor(), prompt, args.grounded_tokens)
        end = next((i for i, token in enumerate(tokens) if token in ends), len(tokens) - 1)
        answers.append(tokens[: end + 1])
    log(f"  the model's greedy answers: {[len(a) for a in answers]} tokens")
    report = {}
    for spec in args.draft_model:
        worker = WorkerSettings(
            redis_url="", speculative="draft", draft_model=str(draft_model_path(spec)), **settings
        )
        draft = load_draft_model(worker, loaded)
        assert draft is not None
        matches = []
        with torch.inference_mode():
            for prompt, answer in zip(prompts, answers, strict=True):
                sequence = [*prompt, *answer]
                out = draft.model(
                    input_ids=torch.tensor([sequence], device=draft.device),
                    attention_mask=torch.ones((1, len(sequence)), dtype=torch.long, device=draft.device),
                    position_ids=torch.arange(len(sequence), device=draft.device)[None],
                    use_cache=True,
                    past_key_values=growing_cache(draft.model.config),
                )
                guessed = out.logits[0, len(prompt) - 1 : -1, : draft.vocab_size].argmax(-1).tolist()
                matches.append([g == a for g, a in zip(guessed, answer, strict=True)])
        agreed = sum(sum(m) for m in matches)
        total = sum(len(m) for m in matches)
        by_length = {}
        for tokens in range(1, args.draft_tokens + 1):
            runs = [simulated_drafting(m, tokens) for m in matches]
            steps, drafted, kept = (sum(r[key] for r in runs) for key in ("steps", "drafted", "kept"))
            yielded = sum(r["yielded"] for r in runs)
            step_cost = 1 + defaults.SPECULATION_STEP_COST + defaults.SPECULATION_TOKEN_COST * tokens
            by_length[tokens] = {
                "kept_share_of_drafts": round(kept / drafted, 3),
                "tokens_per_step": round(yielded / steps, 3),
                "estimated_over_off": round(yielded / steps / (step_cost + draft.cost * tokens), 3),
            }
        report[spec] = {
            "path": str(draft_model_path(spec)),
            "parameters": sum(p.numel() for p in draft.model.parameters()),
            "cost_per_drafted_token": round(draft.cost, 3),
            "agreement": round(agreed / total, 3),
            "answer_tokens": total,
            "always_drafting": by_length,
        }
        log(f"  {spec}: agreement {report[spec]['agreement']}, cost {report[spec]['cost_per_drafted_token']}")
        del draft
    return {
        "model": "SmolLM2-135M-Instruct (bundled)",
        "dtype": args.dtype,
        "threads": args.threads,
        **machine(),
        "grounded_tokens": args.grounded_tokens,
        "probe": report,
    }


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


def main() -> None:
    parser = bench_parser(__doc__)
    add_model_flags(parser)
    parser.add_argument("--rounds", type=int, default=2, help="rounds of every setting (default 2)")
    parser.add_argument("--draft-tokens", type=int, default=6, help="mmserve's --draft-tokens (default 6)")
    parser.add_argument("--grounded-tokens", type=int, default=256, help="most tokens per grounded answer")
    parser.add_argument("--open-tokens", type=int, default=64, help="tokens per open-ended answer (forced)")
    parser.add_argument("--skip-llamacpp", action="store_true", help="leave llama.cpp out")
    parser.add_argument(
        "--draft-model",
        action="append",
        default=[],
        metavar="SPEC",
        help="also run auto and draft with a draft model: none (default), self or layers:N (repeatable)",
    )
    parser.add_argument(
        "--workloads",
        default=",".join(WORKLOADS),
        help=f"comma-separated, of {', '.join(WORKLOADS)} (default all)",
    )
    parser.add_argument(
        "--probe", action="store_true", help="no server: each draft model's agreement with the model and cost"
    )
    args = parser.parse_args()
    args.threads = threads_or_default(args.threads)
    args.max_batch_size = 8
    args.draft_model = [spec for spec in args.draft_model if spec != "none"]
    for spec in args.draft_model:
        try:
            layers_of(spec)
        except ValueError as error:
            parser.error(str(error))
    args.workloads = [w for w in args.workloads.split(",") if w]
    if not args.workloads or set(args.workloads) - set(WORKLOADS):
        parser.error(f"--workloads: a comma-separated list of {', '.join(WORKLOADS)}")
    if args.probe:
        if not args.draft_model:
            parser.error("--probe needs --draft-model")
        print(json.dumps(probe(args), indent=2))
        return

    settings = settings_of(args.draft_model)
    runs, answers_equal, equal_by_setting = [], [], []
    llama = []
    for round_index in range(args.rounds):
        order = settings if round_index % 2 == 0 else tuple(reversed(settings))
        log(f"round {round_index + 1}")
        texts = {}
        for setting in order:
            figures_by_workload, texts[setting] = run_setting(args, setting)
            runs.append({"round": round_index, "setting": setting, **figures_by_workload})
        equal = {
            setting: {
                workload: sum(a == b for a, b in zip(texts[setting][workload], off, strict=True))
                for workload, off in texts["off"].items()
            }
            for setting in settings
            if setting != "off"
        }
        for setting, counts in equal.items():
            for workload, count in counts.items():
                if count != len(texts["off"][workload]):
                    shown = f"{count} of {len(texts['off'][workload])}"
                    log(f"    ANSWERS DIFFER: {setting} {workload}: {shown} as off")
        answers_equal.append(equal["auto"])
        equal_by_setting.append(equal)
        if not args.skip_llamacpp:
            llama.append(llama_cpp_grounded(args))
            log(f"    llama.cpp grounded: {llama[-1].get('tokens_per_s', llama[-1].get('skipped'))}")

    comparisons = {}
    for setting in (s for s in settings if s != "off"):
        for workload in args.workloads:
            pairs = []
            for round_index in range(args.rounds):
                by_setting = {r["setting"]: r[workload] for r in runs if r["round"] == round_index}
                pairs.append(ratio(by_setting[setting]["tokens_per_s"], by_setting["off"]["tokens_per_s"]))
            known = [p for p in pairs if p is not None]
            comparisons[f"{workload}_{setting}_over_off"] = {
                "ratios": pairs,
                "median": round(statistics.median(known), 3) if known else None,
            }
    if llama and "tokens_per_s" in llama[0] and "grounded" in args.workloads:
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
    if args.draft_model:
        report["workloads"] = args.workloads
        report["grounded_tokens"] = args.grounded_tokens
        report["open_tokens"] = args.open_tokens
        report["draft_models"] = {spec: str(draft_model_path(spec)) for spec in args.draft_model}
        report["answers_equal_vs_off"] = equal_by_setting
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
