"""Batch invariance: whether a row's answer, and each operation's output for it, depends on its batch.

    .venv/bin/python -m bench.batch_invariance --help

The bundled model loaded as a worker loads it (`--dtype auto`: bfloat16 on a CPU with AVX512-BF16;
`--pack-weights` and `--fuse-layers` at their defaults), the engine in-process with
`--batch-invariant off` (today's fastest path, which parts 1 and 2 examine), 1 torch thread.
Three parts (issue 24):

1. End to end: N prompts, greedy and forced to the same length, run one at a time, all together in
   one batch, and joining a running batch one by one (in the step's own forward, the joint prefill,
   and by a prefill of their own); how many rows differ from their solo answer and at which token.
2. Operations: the model's own layers (layer 0's linears, norms, rotary, attention, the output head,
   the sampler), one row alone against the same row in batches of 2, 4 and 8 rows of other lengths
   (left-padded as the engine pads them), at prefill and at the first decode step. Every operation
   gets the row's solo input, so a difference is that operation's own: its output for the row is
   compared bit for bit. Then `torch.nn.functional.linear` and oneDNN's packed linear on the
   model's shapes: for which row counts M a row's result changes, in bfloat16 and float32.
3. The engine's `--batch-invariant on` (worker.engine.invariance), over a second copy of the model:
   part 1's comparison again, its solo answers against the mode off, and decode step times at
   batch 1 and 8 against the mode off, the two taking turns step by step (the ratio on / off, the
   median of `--repeats` runs). With `--skip` not naming `candidates`, also the earlier candidate
   fixes, each patched into the running engine, measured the same way.

Prints one JSON document; progress on stderr."""

from __future__ import annotations

import contextlib
import json
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence

from bench.common import PROMPTS, add_model_flags, bench_parser, dtype_name, machine

# -- pure helpers (tests/unit/bench/test_batch_invariance.py) ------------------------------------------


def first_divergence(a: Sequence[int], b: Sequence[int]) -> int | None:
    """The index of the first token where two answers differ (one ending sooner counts as a
    difference at its end); None when they are equal."""
    for index, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return index
    return None if len(a) == len(b) else min(len(a), len(b))


def compare_answers(reference: Sequence[Sequence[int]], answers: Sequence[Sequence[int]]) -> dict:
    """How many answers differ from their reference, and where each first differs (None: equal)."""
    divergences = [first_divergence(r, a) for r, a in zip(reference, answers, strict=True)]
    differing = [d for d in divergences if d is not None]
    return {
        "rows_differing": len(differing),
        "rows": len(divergences),
        "first_divergence": divergences,
        "earliest_divergence": min(differing) if differing else None,
    }


def join_steps(count: int, every: int) -> list[int]:
    """The step at which each of `count` rows joins: the first at step 0, then one every `every` steps."""
    return [index * every for index in range(count)]


def changed_at(equal_by_size: dict[int, bool]) -> list[int]:
    """The sizes (batch sizes, row counts) at which a result was not bitwise equal, in order."""
    return sorted(size for size, equal in equal_by_size.items() if not equal)


def ratio(candidate: Sequence[float], baseline: Sequence[float]) -> float:
    """Median candidate time over median baseline time."""
    return statistics.median(candidate) / statistics.median(baseline)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- part 1: end to end ------------------------------------------------------------------------------


def _requests(engine, prompt_ids: list[list[int]], new_tokens: int, keys: Sequence[int] | None = None):
    from worker.engine.rows import GenerationParams, RowRequest

    params = GenerationParams(max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    keys = range(len(prompt_ids)) if keys is None else keys
    return [RowRequest(key=key, prompt_ids=prompt_ids[key], params=params) for key in keys]


def _collect(outputs, answers: dict[int, list[int]]) -> None:
    for output in outputs:
        if output.token_id is not None:
            answers.setdefault(output.key, []).append(output.token_id)


def run_alone(engine, prompt_ids: list[list[int]], new_tokens: int) -> list[list[int]]:
    answers: dict[int, list[int]] = {}
    for key in range(len(prompt_ids)):
        engine.add(_requests(engine, prompt_ids, new_tokens, [key]))
        while engine.has_work:
            _collect(engine.step(), answers)
    return [answers[key] for key in range(len(prompt_ids))]


def run_together(engine, prompt_ids: list[list[int]], new_tokens: int) -> list[list[int]]:
    answers: dict[int, list[int]] = {}
    engine.add(_requests(engine, prompt_ids, new_tokens))
    while engine.has_work:
        _collect(engine.step(), answers)
    return [answers[key] for key in range(len(prompt_ids))]


def run_joined(
    engine, prompt_ids: list[list[int]], new_tokens: int, every: int, joint: bool
) -> list[list[int]]:
    """Row i joins the running batch at step i * every: inside the step's forward (`joint`, when
    the engine can) or by a prefill of its own merged into the batch."""
    answers: dict[int, list[int]] = {}
    schedule = join_steps(len(prompt_ids), every)
    step = 0
    while step <= schedule[-1] or engine.has_work:
        due = _requests(engine, prompt_ids, new_tokens, [k for k, s in enumerate(schedule) if s == step])
        if due and joint and engine.has_work and engine.can_join(due):
            _collect(engine.step(joining=due), answers)
        else:
            if due:
                engine.add(due)
            _collect(engine.step(), answers)
        step += 1
    return [answers[key] for key in range(len(prompt_ids))]


def end_to_end(engine, prompt_ids: list[list[int]], new_tokens: int, every: int, alone=None) -> dict:
    alone = alone if alone is not None else run_alone(engine, prompt_ids, new_tokens)
    result = {
        "together": compare_answers(alone, run_together(engine, prompt_ids, new_tokens)),
        "joined_in_step": compare_answers(alone, run_joined(engine, prompt_ids, new_tokens, every, True)),
        "joined_by_prefill": compare_answers(alone, run_joined(engine, prompt_ids, new_tokens, every, False)),
    }
    return {"alone": alone, **result}


# -- part 2: operations -------------------------------------------------------------------------------


class Recorder:
    """Records the inputs and outputs of chosen modules and of layer 0's attention call, for the
    first `calls` forwards (a prefill and a decode step), cloned at once (the cache's views change)."""

    def __init__(self, model, calls: int = 2):
        from worker.engine import attention

        self.model, self.calls = model, calls
        self.records: dict[str, list] = {}
        self.hooks = []
        chosen = {
            **_recorded_modules(model),
            "layer0": model.model.layers[0],
            "rotary": model.model.rotary_emb,
        }
        self.modules = chosen
        for name, module in chosen.items():
            self.hooks.append(module.register_forward_hook(self._hook(name), with_kwargs=True))
        self._attention_name = attention.ATTENTION_NAME
        self._original_attention = None

    def _keep(self, name: str, value) -> None:
        entries = self.records.setdefault(name, [])
        if len(entries) < self.calls:
            entries.append(value)

    def _hook(self, name: str):
        def hook(module, args, kwargs, output):
            self._keep(name, (_clone(args), _clone(kwargs), _clone(output)))

        return hook

    @contextlib.contextmanager
    def attention(self) -> Iterator[None]:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        original = ALL_ATTENTION_FUNCTIONS[self._attention_name]
        self._original_attention = original

        def recording(module, query, key, value, attention_mask, **kwargs):
            if getattr(module, "layer_idx", None) == 0:
                self._keep(
                    "attention", (query.clone(), key.clone(), value.clone(), _clone(attention_mask), kwargs)
                )
            return original(module, query, key, value, attention_mask, **kwargs)

        ALL_ATTENTION_FUNCTIONS[self._attention_name] = recording
        try:
            yield
        finally:
            ALL_ATTENTION_FUNCTIONS[self._attention_name] = original

    def remove(self) -> None:
        for hook in self.hooks:
            hook.remove()


def _clone(value):
    import torch

    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, tuple | list):
        return type(value)(_clone(item) for item in value)
    if isinstance(value, dict):
        return {key: _clone(item) for key, item in value.items() if key not in ("cache", "past_key_values")}
    return value


def record_run(engine, prompt_ids: list[list[int]], keys: list[int]) -> tuple[dict, list[int]]:
    """Layer 0's (and the head's) inputs and outputs at the prefill and first decode step of the
    rows `keys` run together; the batch's row order (the engine sorts rows longest first)."""
    recorder = Recorder(engine.model)
    try:
        with recorder.attention():
            engine.add(_requests(engine, prompt_ids, 4, keys))
            order = list(engine.keys)
            engine.step()
    finally:
        recorder.remove()
        engine.clear()
    return recorder.records, order


def _substitute(batched, alone, row: int):
    """`batched` with row `row`'s last positions (dim 1, the tokens) replaced by `alone`'s only row."""
    out = batched.clone()
    out[row, -alone.shape[1] :] = alone[0]
    return out


def _same(batched_output, alone_output, row: int, dim: int = 1) -> bool:
    import torch

    real = alone_output.shape[dim]
    piece = batched_output[row : row + 1].narrow(dim, batched_output.shape[dim] - real, real)
    return torch.equal(piece, alone_output)


def operation_checks(
    engine, solo: tuple[dict, list[int]], batched: tuple[dict, list[int]], target: int
) -> dict:
    """For each recorded operation and call (prefill, decode): whether its output for the target
    row, given the solo run's input for that row inside the batched input, equals its solo output."""
    import torch

    from worker.engine.models import fused_layers
    from worker.engine.sampler import Sampler

    solo_records, _ = solo
    records, order = batched
    row = order.index(target)
    model = engine.model
    results: dict[str, dict[str, bool]] = {}

    def put(name: str, call: int, equal: bool) -> None:
        results.setdefault(name, {})[("prefill", "decode")[call]] = bool(equal)

    with torch.inference_mode():
        for call in range(2):
            for name, module in _recorded_modules(model).items():
                if name not in records or name in ("layer0", "rotary"):
                    continue
                (args_b, _, _), (args_1, _, out_1) = records[name][call], solo_records[name][call]
                out_b = module(_substitute(args_b[0], args_1[0], row))
                put(name, call, _same(out_b, out_1, row))
            # the rotary angles (from the batch's position ids) and the rotation itself
            (args_b, kwargs_b, (cos_b, sin_b)) = records["rotary"][call]
            (_, _, (cos_1, sin_1)) = solo_records["rotary"][call]
            put("rotary_angles", call, _same(cos_b, cos_1, row) and _same(sin_b, sin_1, row))
            layer = model.model.layers[0]
            hidden_b, hidden_1 = (
                _layer_input(records["layer0"][call]),
                _layer_input(solo_records["layer0"][call]),
            )
            if isinstance(layer, fused_layers.FusedLlamaLayer):
                mixed = _substitute(hidden_b, hidden_1, row)
                put(
                    "fused_rms_norm",
                    call,
                    _same(
                        fused_layers._rms_norm(mixed, layer.input_norm_weight, layer.input_norm_eps),
                        fused_layers._rms_norm(hidden_1, layer.input_norm_weight, layer.input_norm_eps),
                        row,
                    ),
                )
                q_b = layer._queries_keys_values(mixed, (cos_b, sin_b))
                q_1 = layer._queries_keys_values(hidden_1, (cos_1, sin_1))
                put(
                    "fused_norm_qkv_rotary",
                    call,
                    all(_same(b, a, row) for b, a in zip(q_b, q_1, strict=True)),
                )
            else:
                from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

                heads = model.config.num_attention_heads
                generator = torch.Generator().manual_seed(call)
                shape_1 = (1, heads, cos_1.shape[1], cos_1.shape[-1])
                q_1 = torch.randn(shape_1, generator=generator).to(cos_b.dtype)
                q_b = torch.randn(
                    (cos_b.shape[0], heads, cos_b.shape[1], cos_b.shape[-1]), generator=generator
                )
                q_b = q_b.to(cos_b.dtype)
                q_b[row, :, -q_1.shape[2] :] = q_1[0]
                rot_b, _ = apply_rotary_pos_emb(q_b, q_b, cos_b, sin_b)
                rot_1, _ = apply_rotary_pos_emb(q_1, q_1, cos_1, sin_1)
                put("rotary", call, _same(rot_b, rot_1, row, dim=2))
            # attention: the solo row's queries, keys and values inside the batch's, under the batch's mask
            query_b, key_b, value_b, mask_b, kwargs_b = records["attention"][call]
            query_1, key_1, value_1, mask_1, kwargs_1 = solo_records["attention"][call]
            query, key, value = query_b.clone(), key_b.clone(), value_b.clone()
            query[row, :, -query_1.shape[2] :] = query_1[0]
            key[row, :, -key_1.shape[2] :] = key_1[0]
            value[row, :, -value_1.shape[2] :] = value_1[0]
            attend = _original_attention()
            module = model.model.layers[0].self_attn if hasattr(model.model.layers[0], "self_attn") else layer
            out_b, _ = attend(module, query, key, value, mask_b, **kwargs_b)
            out_1, _ = attend(module, query_1, key_1, value_1, mask_1, **kwargs_1)
            name = "attention_prefill_sdpa" if call == 0 else "attention_decode_windowed"
            put(name, 0, _same(out_b, out_1, row))
            results[name] = results[name]["prefill"]
            if call == 1:
                results["attention_decode_windows_used"] = "row_windows" in kwargs_b
            # sampling: the solo logits inside the batch's
            logits_b = records["lm_head"][call][2][:, -1]
            logits_1 = solo_records["lm_head"][call][2][:, -1]
            mixed_logits = logits_b.clone()
            mixed_logits[row] = logits_1[0]
            put("sampling_greedy", call, _sampled(Sampler, mixed_logits, row, logits_1))
            put("sampling_seeded", call, _sampled(Sampler, mixed_logits, row, logits_1, seed=7))
    return results


def _layer_input(record):
    args, kwargs, _ = record
    return args[0] if args else kwargs["hidden_states"]


def _sampled(sampler_class, mixed_logits, row: int, logits_1, seed: int | None = None) -> bool:
    from worker.engine.rows import GenerationParams

    params = (
        GenerationParams(top_k=1) if seed is None else GenerationParams(top_k=0, temperature=0.8, seed=seed)
    )
    vocab = logits_1.shape[-1]
    batch = sampler_class.from_params(
        [params] * mixed_logits.shape[0], [[1]] * mixed_logits.shape[0], vocab, "cpu"
    )
    solo = sampler_class.from_params([params], [[1]], vocab, "cpu")
    return int(batch(mixed_logits)[row]) == int(solo(logits_1)[0])


def _recorded_modules(model) -> dict:
    import torch

    layer = model.model.layers[0]
    modules = {
        "embedding": model.model.embed_tokens,
        "final_norm": model.model.norm,
        "lm_head": model.lm_head,
    }
    for name, module in layer.named_modules():
        if isinstance(module, torch.nn.Linear) or type(module).__name__ == "LlamaRMSNorm":
            modules[f"layer0.{name}"] = module
    return modules


def _original_attention():
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from worker.engine import attention

    return ALL_ATTENTION_FUNCTIONS[attention.ATTENTION_NAME]


def operations(engine, prompt_ids: list[list[int]], sizes: Sequence[int]) -> dict:
    """`operation_checks` for every row of batches of each size (rows: prompts 0, 1, ...), each row
    against its solo run: per operation and call, the batch sizes at which some row changed and
    how many rows changed in the largest batch."""
    solos = {key: record_run(engine, prompt_ids, [key]) for key in range(max(sizes))}
    checks: dict[int, list[dict]] = {}
    for size in sizes:
        batched = record_run(engine, prompt_ids, list(range(size)))
        checks[size] = [operation_checks(engine, solos[key], batched, key) for key in range(size)]
    largest = max(sizes)
    table: dict = {}
    for name, value in checks[sizes[0]][0].items():
        if name == "attention_decode_windows_used":
            table[name] = {size: checks[size][0][name] for size in sizes}
            continue
        calls = list(value) if isinstance(value, dict) else [None]
        entry = {}
        for call in calls:

            def equal(check, call=call, name=name):
                return check[name] if call is None else check[name][call]

            summary = {
                "changed_at_batch": changed_at({size: all(equal(c) for c in checks[size]) for size in sizes}),
                f"rows_changed_at_batch_{largest}": sum(not equal(c) for c in checks[largest]),
            }
            if call is None:
                entry = summary
            else:
                entry[call] = summary
        table[name] = entry
    return table


def linear_sweep(shapes: Sequence[tuple[int, int]], sizes: Sequence[int], rows_checked: int = 16) -> dict:
    """For plain `linear` in bfloat16 and float32 and oneDNN's packed bfloat16 linear, on random
    weights of the model's shapes: the row counts M at which the first row's result differs from
    its one-row product, and those at which any of the first `rows_checked` rows differs from its
    own one-row product, or from its product padded to two rows (a zero row beside it)."""
    import torch

    generator = torch.Generator().manual_seed(0)
    result = {}
    for in_features, out_features in shapes:
        weight = torch.randn(out_features, in_features, generator=generator) / in_features**0.5
        inputs = torch.randn(max(sizes), in_features, generator=generator)
        packed = torch.ops.mkldnn._reorder_linear_weight(weight.bfloat16(), 8)
        kinds: dict[str, Callable] = {
            "linear_bfloat16": lambda x, w=weight.bfloat16(): torch.nn.functional.linear(x.bfloat16(), w),
            "linear_float32": lambda x, w=weight: torch.nn.functional.linear(x, w),
            "packed_onednn_bfloat16": lambda x, w=packed: torch.ops.mkldnn._linear_pointwise(
                x.bfloat16(), w, None, "none", [], ""
            ),
        }
        for kind, product in kinds.items():
            singles = [product(inputs[r : r + 1]) for r in range(rows_checked)]
            zero = inputs.new_zeros(1, in_features)
            pairs = [product(torch.cat([inputs[r : r + 1], zero]))[:1] for r in range(rows_checked)]
            first, any_row, any_pair = {}, {}, {}
            for m in sizes:
                out = product(inputs[:m])
                first[m] = torch.equal(out[:1], singles[0])
                rows = range(min(m, rows_checked))
                any_row[m] = all(torch.equal(out[r : r + 1], singles[r]) for r in rows)
                any_pair[m] = all(torch.equal(out[r : r + 1], pairs[r]) for r in rows)
            result.setdefault(kind, {})[f"{in_features}x{out_features}"] = {
                "first_row_changed_at_m": changed_at(first),
                "some_row_differs_from_its_one_row_product_at_m": changed_at(any_row),
                "some_row_differs_from_its_two_row_product_at_m": changed_at(any_pair),
            }
    return result


# -- part 3: candidate fixes --------------------------------------------------------------------------


@contextlib.contextmanager
def _attention_replaced_by(function: Callable) -> Iterator[None]:
    """The engine's attention (worker.engine.attention's registered function) is `function` within."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from worker.engine import attention

    original = ALL_ATTENTION_FUNCTIONS[attention.ATTENTION_NAME]
    ALL_ATTENTION_FUNCTIONS[attention.ATTENTION_NAME] = function
    try:
        yield
    finally:
        ALL_ATTENTION_FUNCTIONS[attention.ATTENTION_NAME] = original


def _attend_per_row(module, query, key, value, attention_mask, row_windows=None, **kwargs):
    """Attention row by row, each row over its own tokens only and without a mask, as it runs
    when its request is alone (prefill: causal; decode: one query over the row's cache)."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if attention_mask is None or (
        query.shape[0] == 1 and bool(_real_keys(attention_mask, 0) == key.shape[2])
    ):
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    output = query.new_zeros(query.shape[0], query.shape[2], query.shape[1], query.shape[3])
    for row in range(query.shape[0]):
        keys = int(_real_keys(attention_mask, row))
        queries = min(query.shape[2], keys)
        if queries == 0:
            continue
        out, _ = sdpa_attention_forward(
            module,
            query[row : row + 1, :, -queries:],
            key[row : row + 1, :, -keys:],
            value[row : row + 1, :, -keys:],
            None,
            **kwargs,
        )
        output[row, -queries:] = out[0]
    return torch.Tensor(output), None


def _attend_right_aligned(module, query, key, value, attention_mask, multiple: int = 64, **kwargs):
    """Prefill as `_attend_per_row`; decode in one call over every row's keys gathered to start
    at column 0 of a buffer a multiple of `multiple` columns wide, so that each row's reductions
    over keys start where they start when it runs alone, whatever the padding of its batch
    (torch's CPU attention reduces over keys in blocks counted from column 0)."""
    import torch

    if query.shape[2] != 1:
        return _attend_per_row(module, query, key, value, attention_mask, **kwargs)
    width = key.shape[2]
    if attention_mask is None:  # no padding (a row alone): every column is the row's
        counts = torch.full((key.shape[0],), width, device=key.device)
    else:
        valid = attention_mask[:, 0, -1]
        counts = (valid if valid.dtype == torch.bool else valid == 0).sum(dim=1)  # the last columns
    aligned_width = -(-int(counts.max()) // multiple) * multiple
    columns = torch.arange(aligned_width, device=key.device)
    index = (width - counts[:, None] + columns[None]).clamp(0, width - 1)  # [B, W']
    gather = index[:, None, :, None].expand(-1, key.shape[1], -1, key.shape[3])
    keys, values = key.gather(2, gather), value.gather(2, gather)
    mask = (columns[None] < counts[:, None])[:, None, None, :]
    output = torch.nn.functional.scaled_dot_product_attention(
        query,
        keys,
        values,
        attn_mask=mask,
        scale=getattr(module, "scaling", None),
        enable_gqa=query.shape[1] != keys.shape[1],
    )
    return output.transpose(1, 2).contiguous(), None


def attention_per_row() -> contextlib.AbstractContextManager:
    return _attention_replaced_by(_attend_per_row)


def attention_right_aligned() -> contextlib.AbstractContextManager:
    return _attention_replaced_by(_attend_right_aligned)


@contextlib.contextmanager
def right_aligned_and_linear() -> Iterator[None]:
    with attention_right_aligned(), linear_min_rows():
        yield


def _real_keys(mask, row: int):
    """The number of key columns the last query of `row` may attend to (its real tokens)."""
    last = mask[row, 0, -1]
    return last.sum() if last.dtype == __import__("torch").bool else (last == 0).sum()


@contextlib.contextmanager
def linear_min_rows(rows: int = 2) -> Iterator[None]:
    """Every linear product of fewer than `rows` rows padded with zero rows to `rows`: a one-row
    product (a decode step alone) then takes the same kernel path as the products of a batch."""
    import torch

    from worker.engine.models.weight_packing import PackedLinear

    originals = {PackedLinear: PackedLinear.forward, torch.nn.Linear: torch.nn.Linear.forward}

    def padded(forward):
        def run(self, hidden):
            flat = hidden.reshape(-1, hidden.shape[-1])
            count = flat.shape[0]
            if count >= rows:
                return forward(self, hidden)
            flat = torch.cat([flat, flat.new_zeros(rows - count, flat.shape[1])])
            return forward(self, flat)[:count].reshape(*hidden.shape[:-1], -1)

        return run

    for cls, forward in originals.items():
        cls.forward = padded(forward)
    try:
        yield
    finally:
        for cls, forward in originals.items():
            cls.forward = forward


@contextlib.contextmanager
def both() -> Iterator[None]:
    with attention_per_row(), linear_min_rows():
        yield


CANDIDATES: dict[str, Callable] = {
    "attention_per_row": attention_per_row,
    "linear_min_rows_2": linear_min_rows,
    "attention_per_row+linear_min_rows_2": both,
    "attention_right_aligned+linear_min_rows_2": right_aligned_and_linear,
}


def step_ratios(baseline, candidate, patch, prompt_ids, rows: int, steps: int) -> dict:
    """Decode step times (ms) of two engines over the same model with `rows` rows running, taking
    turns step by step, the candidate's steps under `patch`."""
    new_tokens = steps + 8
    times: dict[str, list[float]] = {"baseline": [], "candidate": []}
    engines = {"baseline": (baseline, contextlib.nullcontext), "candidate": (candidate, patch)}
    for engine, context in engines.values():
        with context():
            engine.add(_requests(engine, prompt_ids, new_tokens, list(range(rows))))
            for _ in range(3):
                engine.step()
    for _ in range(steps):
        for name, (engine, context) in engines.items():
            with context():
                start = time.perf_counter()
                engine.step()
                times[name].append((time.perf_counter() - start) * 1000)
    for engine, _ in engines.values():
        engine.clear()
    return {
        "baseline_step_ms": round(statistics.median(times["baseline"]), 1),
        "candidate_step_ms": round(statistics.median(times["candidate"]), 1),
        "ratio": round(ratio(times["candidate"], times["baseline"]), 3),
    }


def mode_report(off_engine, prompt_ids: list[list[int]], args) -> dict:
    """The engine's own mode (`batch_invariant=True`, over a second copy of the model): part 1's
    comparison, its solo answers against the mode off, and decode step times against the mode
    off, the two taking turns."""
    on_engine = load_engine(args.dtype, args.pack_weights, args.fuse_layers, batch_invariant=True)
    equality = end_to_end(on_engine, prompt_ids, args.new_tokens, args.join_every)
    equality["alone_vs_mode_off_alone"] = compare_answers(
        run_alone(off_engine, prompt_ids, args.new_tokens), equality.pop("alone")
    )
    speed = {}
    for rows in (1, 8):
        runs = [
            step_ratios(off_engine, on_engine, contextlib.nullcontext, prompt_ids, rows, args.steps)
            for _ in range(args.repeats)
        ]
        speed[f"batch{rows}"] = {
            "ratio_median": round(statistics.median(run["ratio"] for run in runs), 3),
            "runs": runs,
        }
    return {"coverage": on_engine.invariance.describe(), "equality": equality, "speed": speed}


# -- main -----------------------------------------------------------------------------------------------


def load_engine(
    dtype: str, pack_weights: str, fuse_layers: str, quantize: str = "none", batch_invariant: bool = False
):
    """The bundled model as a worker loads it, in an engine with `--batch-invariant` off (what
    parts 1 and 2 examine) or on."""
    from bench.common import engine_for, served_model

    loaded = served_model(dtype=dtype, pack_weights=pack_weights, fuse_layers=fuse_layers, quantize=quantize)
    return engine_for(loaded, batch_invariant=batch_invariant)


def main() -> None:
    parser = bench_parser(__doc__)
    add_model_flags(parser)
    parser.add_argument(
        "--fuse-layers", default="auto", choices=["auto", "off"], help="mmserve's --fuse-layers"
    )
    parser.add_argument("--prompts", type=int, default=8, help="prompts in part 1 (default 8)")
    parser.add_argument(
        "--new-tokens", type=int, default=48, help="greedy tokens per answer, forced (default 48)"
    )
    parser.add_argument(
        "--join-every", type=int, default=3, help="steps between two rows joining (default 3)"
    )
    parser.add_argument(
        "--batch-sizes", type=int, nargs="+", default=[2, 4, 8], help="part 2's batch sizes (default 2 4 8)"
    )
    parser.add_argument(
        "--compare",
        nargs="*",
        default=[],
        help="more settings for part 1, each quantize:dtype:fuse_layers:pack_weights "
        "(e.g. none:float32:auto:auto, none:auto:off:off, int8:auto:auto:auto)",
    )
    parser.add_argument(
        "--candidates", nargs="*", default=list(CANDIDATES), choices=list(CANDIDATES), help="part 3's fixes"
    )
    parser.add_argument("--steps", type=int, default=30, help="timed decode steps per engine and batch size")
    parser.add_argument("--repeats", type=int, default=2, help="speed runs per candidate (median ratio)")
    parser.add_argument(
        "--skip",
        nargs="*",
        default=["candidates"],
        choices=["end_to_end", "operations", "linear", "mode", "candidates"],
        help="parts to skip (default: the candidate patches, which the engine's mode replaced)",
    )
    args = parser.parse_args()

    import torch

    from bench.common import chat_prompt_ids, threads_or_default

    torch.set_num_threads(args.threads or 1)
    engine = load_engine(args.dtype, args.pack_weights, args.fuse_layers)
    prompt_texts = [
        PROMPTS[i % len(PROMPTS)] + (f" ({i // len(PROMPTS)})" if i >= len(PROMPTS) else "")
        for i in range(args.prompts)
    ]
    prompt_ids = [chat_prompt_ids(engine.tokenizer, text) for text in prompt_texts]
    report: dict = {
        "model": "bundled SmolLM2-135M-Instruct",
        "dtype": dtype_name(engine.model.dtype),
        "pack_weights": args.pack_weights,
        "fuse_layers": args.fuse_layers,
        "threads": torch.get_num_threads(),
        "serve_default_threads": threads_or_default(None),
        "torch": torch.__version__,
        **machine(),
        "prompts": len(prompt_ids),
        "prompt_lengths": [len(ids) for ids in prompt_ids],
        "new_tokens": args.new_tokens,
        "join_every": args.join_every,
    }
    started = time.perf_counter()
    alone = None
    if "end_to_end" not in args.skip:
        log("part 1: end to end")
        result = end_to_end(engine, prompt_ids, args.new_tokens, args.join_every)
        alone = result.pop("alone")
        report["end_to_end"] = result
        for setting in args.compare:
            quantize, dtype, fuse, pack = [*setting.split(":"), "", "", "", ""][:4]
            log(f"part 1: end to end, {setting}")
            other = load_engine(dtype or "auto", pack or "auto", fuse or "auto", quantize or "none")
            compared = end_to_end(other, prompt_ids, args.new_tokens, args.join_every)
            compared["alone_vs_default_alone"] = compare_answers(alone, compared.pop("alone"))
            report.setdefault("end_to_end_other_settings", {})[setting] = compared
            del other
    if "operations" not in args.skip:
        log("part 2: operations")
        report["operations"] = operations(engine, prompt_ids, args.batch_sizes)
    if "linear" not in args.skip:
        log("part 2: linear row-count sweep")
        shapes = sorted(
            {
                (m.in_features, m.out_features)
                for m in engine.model.modules()
                if isinstance(m, torch.nn.Linear)
            }
        )
        report["linear_sweep"] = linear_sweep(shapes, [*range(1, 17), 32, 64, 128, 256])
    if "mode" not in args.skip:
        log("part 3: the engine's --batch-invariant on against off")
        report["batch_invariant_mode"] = mode_report(engine, prompt_ids, args)
    if "candidates" not in args.skip:
        report["candidates"] = {}
        second = load_engine(args.dtype, args.pack_weights, args.fuse_layers)
        for name in args.candidates:
            patch = CANDIDATES[name]
            log(f"part 3: {name}")
            with patch():
                equality = end_to_end(engine, prompt_ids, args.new_tokens, args.join_every)
            candidate_alone = equality.pop("alone")
            equality["alone_vs_unpatched_alone"] = (
                compare_answers(alone, candidate_alone) if alone is not None else None
            )
            speed = {}
            for rows in (1, 8):
                runs = [
                    step_ratios(second, engine, patch, prompt_ids, rows, args.steps)
                    for _ in range(args.repeats)
                ]
                speed[f"batch{rows}"] = {
                    "ratio_median": round(statistics.median(run["ratio"] for run in runs), 3),
                    "runs": runs,
                }
            report["candidates"][name] = {"equality": equality, "speed": speed}
    report["seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
