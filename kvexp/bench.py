"""`make bench`: speed and memory of the compressed cache against the plain model, every ratio from one run.

Cases (issue 8), on the embedded model unless `--model` says otherwise:
  P1  decode ms/token: the plain model (stock SDPA attention, DynamicCache) at `--short-context` and at
      `--context`, and each method's compressed cache at `--context` logical tokens with a `--budget` budget.
      Ratio to plain@short (ideal 1.0; target <= 1.10). Decode rounds are interleaved across the cases and
      repeated `--repeats` times; medians reported. Caches are built by chunked prefill (`--chunk` tokens).
      `--compiled-methods` run again with `engine.compile` (the torch.compile'd decode step; its compilation
      falls in the dropped warmup steps).
  P2  compression overhead: share of a one-shot `--p2-context` prefill spent inside the method (scoring,
      selection, compaction) for the prefill scorers (target <= 3 %), and share of a decode step spent
      inside the method (observe + compress) for the per-step methods (target <= 5 %). The attention-sum scorers
      (`--attention-methods`: H2O, ObservedAttention) get the same one-shot prefill with no target: they sum
      every query's attention weights, which the fused attention does not return, so their method time is a
      second attention pass over the prompt, O(n^2) in its length.
  P3  peak memory of a chunked prefill of `--context` tokens with `--budget` / `--chunk` vs the full cache:
      peak KV bytes (target <= 1.2 x (budget + chunk) tokens' worth) and the process's peak RSS, each case in
      its own process (peak RSS is process-wide and never goes down).
  P4  aten ops dispatched per decode step (a TorchDispatchMode counter, independent of the hardware's speed):
      the plain model at `--short-context` and each P1 method's compressed cache, full at `--budget` so every
      step evicts, amortized over `--op-steps` steps; per step, per layer, and the ratio to plain (target <= 1.15).
      On a GPU most ops are a kernel launch each, so this ratio bounds a compressed step's launch overhead.
  P5  evaluation throughput: streaming perplexity (one token per step, budget `--budget`) in tokens/s vs plain
      decode at `--short-context` (target >= 90 %).
  P6  batched generation: RULER's samples at `--p6-length` tokens (`--p6-samples` per task, the tasks that need no
      download) through `--p6-methods` (query-agnostic, compression at prefill, greedy), answered one at a time and
      `--p6-batch` at a time, at a token budget (`--p6-budget`) and at keep 0.5 (a budget per prompt length: rows
      of different budgets batch together only for a method that keeps a budget per row, `Method.row_budgets`);
      samples/s, their ratio, the batches formed and how many answers equal the one-at-a-time answers (all must).
  P7  padded prefill: `--p7-batch` prompts of `--p7-length` down to half as many tokens, left-padded into one
      forward, through the plain model (stock SDPA attention, DynamicCache) and kvexp's full cache, the same padding
      mask and positions; seconds, best of `--p7-repeats` interleaved rounds, and the ratio to plain (target <= 1.10:
      the engine's masks and buffers cost a batched prefill little).
  P8  batched lm-eval: kvexp's local lm-eval tasks (`--p8-tasks`, `--p8-limit` documents each: multiple-choice
      contexts, greedy generations and rolling documents) through `--p8-methods` at keep 0.5, one request at a time and `--p8-batch` at a
      time (`dataset.batch_size`); tokens run per second (the whole lm-eval call, its own overhead included), their
      ratio, and whether every request's result (log-likelihood to 1e-4, greedy flag, generation) and every task
      metric (to 1e-6 relative) equal the one-at-a-time ones (all must).
Writes `<out>/bench.json` and `<out>/bench.md` and prints the table with each target met or missed by how much.

    python -m kvexp.bench [--model smollm2_135m] [--hardware cpu] [--context 8192] [--budget 512] [--cases P1,...,P8]
    python -m kvexp.bench --suite gpu [...]   # the GPU suite at real model shapes (kvexp.bench_gpu)
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import DynamicCache

from kvexp.engine import use_kvexp_attention
from kvexp.export import build_samples
from kvexp.files import atomic_write_text
from kvexp.methods import build_method, make_cache
from kvexp.models import load_model_by_name, peak_memory
from kvexp.tasks.data import load_documents
from kvexp.tasks.generation import batch_key, run_generation
from kvexp.tasks.lm_eval_harness import evaluate_lm_eval
from kvexp.tasks.perplexity import score_document
from kvexp.tracking import atomic_write_json

P1_METHODS = ("streaming_llm", "knorm", "snapkv", "h2o", "tova")
PREFILL_SCORERS = ("knorm", "snapkv", "pyramidkv", "expected_attention")
ATTENTION_SUM_SCORERS = ("h2o", "observed_attention")
PER_STEP_METHODS = ("streaming_llm", "knorm", "h2o", "tova")
CASES = ("P1", "P2", "P3", "P4", "P5", "P6", "P7", "P8")
TARGETS = {"P1": 1.10, "P2_prefill": 0.03, "P2_decode": 0.05, "P3": 1.2, "P4": 1.15, "P5": 0.90, "P7": 1.10}


def sync_device(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _method_seconds(cache) -> float:
    """Time spent inside the method so far (observe + compress), 0 for a plain DynamicCache."""
    if isinstance(cache, DynamicCache):
        return 0.0
    return sum(layer.compress_seconds + layer.observe_seconds for layer in cache.layers)


@torch.no_grad()
def prefill(model, ids: torch.Tensor, cache, chunk: int | None, **forward: Any) -> float:
    """Feed ids [B, T] into the cache, in chunks of `chunk` tokens (None: one step); returns seconds. `forward`:
    more model arguments (the GPU suite keeps only the last position's logits: `logits_to_keep=1`)."""
    sync_device(model.device)
    start = time.perf_counter()
    step = chunk or ids.shape[1]
    for first in range(0, ids.shape[1], step):
        model(ids[:, first : first + step], past_key_values=cache, **forward)
    sync_device(model.device)
    return time.perf_counter() - start


@torch.no_grad()
def _decode(model, ids: torch.Tensor, cache, steps: int) -> list[float]:
    """Teacher-forced decode of `steps` tokens (one per step); per-step seconds."""
    times = []
    for i in range(steps):
        sync_device(model.device)
        start = time.perf_counter()
        model(ids[:, i : i + 1], past_key_values=cache)
        sync_device(model.device)
        times.append(time.perf_counter() - start)
    return times


def p1_decode(model, ids, args) -> dict[str, dict[str, Any]]:
    """Decode ms/token of every case, rounds interleaved so drifts in machine load hit all cases alike."""
    cases: dict[str, tuple[Any, int]] = {}
    model.set_attn_implementation("sdpa")
    for context in (args.short_context, args.context):
        cache = DynamicCache(config=model.config)
        prefill(model, ids[:, :context], cache, args.chunk)
        cases[f"plain@{context}"] = (cache, context)
    runs = [(m, False) for m in args.methods] + [(m, True) for m in args.compiled_methods]
    for method, compiled in runs:
        cache = make_cache(model, method, budget=args.budget, compile=compiled)
        prefill(model, ids[:, : args.context], cache, args.chunk)
        cases[f"{method}@{args.context}/{args.budget}{' compiled' if compiled else ''}"] = (
            cache,
            args.context,
        )
    samples: dict[str, list[float]] = {name: [] for name in cases}
    method_time: dict[str, float] = dict.fromkeys(cases, 0.0)
    decode_time: dict[str, float] = dict.fromkeys(cases, 0.0)
    for _ in range(args.repeats):
        for name, (cache, context) in cases.items():
            if isinstance(cache, DynamicCache):
                model.set_attn_implementation("sdpa")  # the stock path for the plain model
                cache.crop(context - cache.get_seq_length())  # back to its nominal context every round
            else:
                use_kvexp_attention(model)
            before = _method_seconds(cache)
            times = _decode(model, ids[:, context:], cache, args.steps)
            method_time[name] += _method_seconds(cache) - before
            decode_time[name] += sum(times)
            samples[name] += times[args.warmup :]
    short = statistics.median(samples[f"plain@{args.short_context}"])
    out = {}
    for name, (cache, _) in cases.items():
        median = statistics.median(samples[name])
        out[name] = {
            "ms_per_token": 1000 * median,
            "ratio_to_plain_short": median / short,
            "kept": cache.get_seq_length()
            if isinstance(cache, DynamicCache)
            else max(cache.physical_lengths()),
            "method_share_decode": method_time[name] / decode_time[name],
        }
    return out


def p2_overhead(model, ids, args) -> dict[str, dict[str, float]]:
    """Method share of a one-shot prefill (prefill scorers) and of decode steps (per-step methods)."""
    out: dict[str, dict[str, float]] = {}
    scorers = [(m, False) for m in args.prefill_methods] + [(m, True) for m in args.attention_methods]
    for method, attention_sums in scorers:
        budget = max(args.budget, args.p2_context // 8)
        cache = make_cache(model, method, budget=budget)
        seconds = prefill(model, ids[:, : args.p2_context], cache, None)
        out[f"{method} prefill@{args.p2_context}"] = {
            "share": _method_seconds(cache) / seconds,
            "seconds": seconds,
            "attention_sums": attention_sums,
        }
    for method in args.step_methods:
        cache = make_cache(model, method, budget=args.budget)
        prefill(model, ids[:, : args.short_context], cache, args.chunk)
        before = _method_seconds(cache)
        times = _decode(model, ids[:, args.short_context :], cache, args.steps)
        out[f"{method} decode@{args.short_context}/{args.budget}"] = {
            "share": (_method_seconds(cache) - before) / sum(times),
            "ms_per_token": 1000 * statistics.median(times),
        }
    return out


def p3_memory(args) -> dict[str, dict[str, float]]:
    """Each case in a fresh process: peak KV bytes and the process's peak RSS during a chunked prefill."""
    out = {}
    for name, method, budget in (
        ("full cache", "full", None),
        (f"streaming_llm/{args.budget}", "streaming_llm", args.budget),
    ):
        command = [sys.executable, "-m", "kvexp.bench", "--p3-case", method, "--model", args.model,
                   "--hardware", args.hardware, "--context", str(args.context), "--chunk", str(args.chunk)]  # fmt: skip
        if budget is not None:
            command += ["--budget", str(budget)]
        result = subprocess.run(command, capture_output=True, text=True, check=True)
        out[name] = json.loads(result.stdout.strip().splitlines()[-1])
    return out


@torch.no_grad()
def _p3_case(args) -> None:
    """One P3 measurement (run in its own process by p3_memory); prints one JSON line."""
    import psutil

    model, tokenizer = load_model_by_name(args.model, args.hardware)
    ids = _tokens(tokenizer, args.context).to(model.device)
    budget = args.budget if args.p3_case != "full" else None
    cache = make_cache(model, args.p3_case, budget=budget)
    rss_before = psutil.Process().memory_info().rss
    reset = _reset_peak_rss()  # the model's load (GGUF dequantization) peaks far above what the prefill adds
    prefill(model, ids, cache, args.chunk)
    prefill_peak = _vm_hwm_bytes() if reset else None
    slot_bytes = cache.layers[0].slot_bytes
    peak_kv = sum(layer.peak_bytes for layer in cache.layers)
    window = (args.budget + args.chunk) * slot_bytes * len(cache.layers)
    print(json.dumps({
        "peak_kv_bytes": peak_kv, "kv_bytes_budget_plus_chunk": window, "peak_kv_ratio": peak_kv / window,
        "rss_before_prefill": rss_before, "prefill_peak_rss_bytes": prefill_peak, **peak_memory(model.device),
    }))  # fmt: skip


def _reset_peak_rss() -> bool:
    """Reset the process's peak-RSS mark (Linux: /proc/self/clear_refs "5"); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _vm_hwm_bytes() -> int | None:
    """The peak RSS since the last reset (Linux /proc/self/status VmHWM), or None."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return None


class OpCounter(TorchDispatchMode):
    """Counts the aten ops dispatched while it is active, by name (views included: each is a dispatch)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))


@torch.no_grad()
def count_decode_ops(model, ids: torch.Tensor, cache, steps: int) -> collections.Counter[str]:
    """The aten ops of `steps` teacher-forced decode steps of ids [1, >= steps + 1] (the first step, uncounted,
    warms up lazily built state), summed by op name."""
    model(ids[:, :1], past_key_values=cache)
    with OpCounter() as counter:
        for i in range(1, steps + 1):
            model(ids[:, i : i + 1], past_key_values=cache)
    return counter.ops


def p4_ops(model, ids, args) -> dict[str, dict[str, Any]]:
    """aten ops per decode step: the plain model, then each method with its cache full (every step evicts)."""
    layers, steps = model.config.num_hidden_layers, args.op_steps
    model.set_attn_implementation("sdpa")
    cache = DynamicCache(config=model.config)
    prefill(model, ids[:, : args.short_context], cache, args.chunk)
    plain = count_decode_ops(model, ids[:, args.short_context :], cache, steps)
    plain_step = sum(plain.values()) / steps
    out = {"plain": {"ops_per_step": plain_step, "ops_per_layer": plain_step / layers, "ratio_to_plain": 1.0}}
    use_kvexp_attention(model)
    filled = (
        2 * args.budget
    )  # the budget full after the prefill: each decode step writes one slot, evicts one
    for method in args.methods:
        cache = make_cache(model, method, budget=args.budget)
        prefill(model, ids[:, :filled], cache, args.chunk)
        before = sum(layer.compressions for layer in cache.layers)
        ops = count_decode_ops(model, ids[:, filled:], cache, steps)
        evictions = sum(layer.compressions for layer in cache.layers) - before
        per_step = sum(ops.values()) / steps
        extra = {k: (v - plain.get(k, 0)) / steps / layers for k, v in ops.items()}
        out[method] = {
            "ops_per_step": per_step,
            "ops_per_layer": per_step / layers,
            "extra_per_layer": (per_step - plain_step) / layers,
            "ratio_to_plain": per_step / plain_step,
            "evictions_per_step": evictions / (steps + 1) / layers,  # the uncounted warm-up step included
            "top_extra_per_layer": dict(sorted(extra.items(), key=lambda kv: -kv[1])[:12]),
        }
    return out


def p5_throughput(model, ids, args, plain_short_ms: float) -> dict[str, dict[str, float]]:
    """Streaming perplexity tokens/s (chunk 1) vs plain decode tokens/s at the short context."""
    out = {}
    tokens = ids[:, : args.p5_tokens]
    for method in args.p5_methods:
        start = time.perf_counter()
        result = score_document(model, tokens, method, args.budget, 1, "bench", False)
        seconds = time.perf_counter() - start
        rate = result.tokens / seconds
        out[f"{method} streaming ppl/{args.budget}"] = {
            "tokens_per_s": rate,
            "ratio_to_plain_decode": rate * plain_short_ms / 1000,
        }
    return out


def p6_batched(model, tokenizer, args) -> dict[str, dict[str, Any]]:
    """Samples/s answering RULER's samples one at a time vs `--p6-batch` at a time (rounds interleaved, the best of
    `--p6-repeats` kept), and whether every batched answer is the one-at-a-time answer."""
    overrides = [f"model={args.model}", "dataset=ruler", f"dataset.lengths=[{args.p6_length}]"]
    _, encoder, samples = build_samples(
        [*overrides, f"dataset.samples_per_task={args.p6_samples}"], tokenizer
    )
    prompts = [encoder.encode(s) for s in samples]
    budgets = {
        f"budget={args.p6_budget}": lambda n: args.p6_budget,
        "keep_0.5": lambda n: max(1, int(0.5 * n)),
    }
    out = {}
    for method in args.p6_methods:
        for label, budget_for in budgets.items():
            groups = collections.Counter(
                batch_key(
                    p,
                    budget_for(p.compressed_tokens("query_agnostic")),
                    "query_agnostic",
                    None,
                    "prefill",
                    row_budgets=build_method(method).row_budgets,
                )
                for p in prompts
            )  # rows of one key may share a batch; fmt: skip
            seconds: dict[int, list[float]] = {1: [], args.p6_batch: []}
            answers: dict[int, list[str]] = {}
            for _ in range(args.p6_repeats):
                for size in seconds:
                    start = time.perf_counter()
                    results = run_generation(
                        model,
                        tokenizer,
                        samples,
                        prompts,
                        method,
                        budget_for,
                        when="prefill",
                        batch_size=size,
                    )
                    seconds[size].append(time.perf_counter() - start)
                    answers[size] = [r.prediction for r in results]
            one, batched = len(samples) / min(seconds[1]), len(samples) / min(seconds[args.p6_batch])
            out[f"{method} {label}"] = {
                "samples": len(samples),
                "budgets": len({budget_for(p.compressed_tokens("query_agnostic")) for p in prompts}),
                "batches": sum(-(-n // args.p6_batch) for n in groups.values()),
                "samples_per_s_one": one,
                "samples_per_s_batched": batched,
                "ratio": batched / one,
                "same_answers": sum(a == b for a, b in zip(answers[1], answers[args.p6_batch], strict=True)),
            }
    return out


@torch.no_grad()
def p7_padded_prefill(model, ids: torch.Tensor, args) -> dict[str, dict[str, float]]:
    """One left-padded prefill of `--p7-batch` prompts (lengths from `--p7-length` down to half of it) through the
    plain model and kvexp's full cache: the best seconds of `--p7-repeats` interleaved rounds, and the ratio."""
    length, rows = args.p7_length, args.p7_batch
    lengths = [length - (length // 2) * i // max(1, rows - 1) for i in range(rows)]
    batch = torch.zeros(rows, length, dtype=ids.dtype, device=ids.device)
    mask = torch.zeros(rows, length, dtype=torch.long, device=ids.device)
    for row, n in enumerate(lengths):
        batch[row, length - n :], mask[row, length - n :] = ids[0, :n], 1
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    forward = {"attention_mask": mask, "position_ids": positions, "logits_to_keep": 1}
    seconds: dict[str, list[float]] = {"plain": [], "full cache": []}
    for _ in range(args.p7_repeats):
        model.set_attn_implementation("sdpa")
        seconds["plain"].append(prefill(model, batch, DynamicCache(config=model.config), None, **forward))
        use_kvexp_attention(model)
        seconds["full cache"].append(prefill(model, batch, make_cache(model, "full"), None, **forward))
    plain = min(seconds["plain"])
    return {
        name: {"rows": rows, "tokens": sum(lengths), "seconds": min(t), "ratio_to_plain": min(t) / plain}
        for name, t in seconds.items()
    }


def p8_lm_eval(model, tokenizer, args) -> dict[str, dict[str, Any]]:
    """Tokens/s of lm-eval's requests answered one at a time vs `--p8-batch` at a time (rounds interleaved, the best
    of `--p8-repeats` kept), and whether every batched request's result and every task metric is the one-at-a-time
    one."""
    budget = {"tokens": None, "keep_ratio": 0.5, "per_layer": None, "per_head": None, "allocation": "uniform"}
    out = {}
    for method in args.p8_methods:
        seconds: dict[int, list[float]] = {1: [], args.p8_batch: []}
        runs: dict[int, tuple[dict[str, Any], list[dict[str, Any]]]] = {}
        for _ in range(args.p8_repeats):
            for size in seconds:
                dataset = {
                    "tasks": args.p8_tasks,
                    "limit": args.p8_limit,
                    "batch_size": size,
                    "bootstrap_iters": 0,
                }
                start = time.perf_counter()
                runs[size] = evaluate_lm_eval(
                    dataset, model, tokenizer, method, budget, {}, 0, progress=False
                )
                seconds[size].append(time.perf_counter() - start)
        (one, one_rows), (batched, batched_rows) = runs[1], runs[args.p8_batch]
        quality = [k for k in one if "/" in k]  # lm-eval's task metrics (`task/metric`), not the cost fields
        tokens = one["tokens"]
        out[method] = {
            "requests": one["requests"],
            "tokens": tokens,
            "tokens_per_s_one": tokens / min(seconds[1]),
            "tokens_per_s_batched": tokens / min(seconds[args.p8_batch]),
            "ratio": min(seconds[1]) / min(seconds[args.p8_batch]),
            "same_results": sum(_same_request(a, b) for a, b in zip(one_rows, batched_rows, strict=True)),
            "same_metrics": all(_same_metric(one[k], batched[k]) for k in quality)
            and batched["tokens"] == tokens,
        }
    return out


def _same_metric(one: Any, batched: Any) -> bool:
    """A task metric batched is the one-at-a-time one: equal, or to float rounding (1e-6 relative: perplexities
    exponentiate log-likelihoods that differ by rounding)."""
    if isinstance(one, float) and isinstance(batched, float):
        return math.isclose(one, batched, rel_tol=1e-6)
    return one == batched


def _same_request(one: dict[str, Any], batched: dict[str, Any]) -> bool:
    """A request's result batched is its result alone: the same generation and greedy flag, the log-likelihood to
    float rounding (the rows of a batch sum in another order)."""
    same = one.get("generation") == batched.get("generation") and one.get("is_greedy") == batched.get(
        "is_greedy"
    )
    ll = one.get("loglikelihood"), batched.get("loglikelihood")
    return same and (ll[0] is None) == (ll[1] is None) and (ll[0] is None or abs(ll[0] - ll[1]) <= 1e-4)


def _tokens(tokenizer, count: int) -> torch.Tensor:
    docs = load_documents(
        {"name": "pg19", "path": None, "local_file": "pg19/test_books.jsonl", "hub_id": "emozilla/pg19-test",
         "hub_config": None, "split": "test", "text_field": "text", "split_documents": False},
        max_samples=1,
    )  # fmt: skip
    ids = tokenizer(docs[0].text[: count * 8], return_tensors="pt").input_ids[:, :count]
    if ids.shape[1] < count:
        raise ValueError(f"the benchmark text has {ids.shape[1]} tokens, {count} needed")
    return ids


def target_verdict(value: float, target: float, higher_is_better: bool = False) -> str:
    met = value >= target if higher_is_better else value <= target
    if met:
        return "met"
    return f"missed by {100 * abs(value - target) / target:.0f}%"


def _table(title: str, columns: str) -> list[str]:
    """A markdown section's title and its table's header rows (`columns`: "a | b | ...")."""
    return [title, f"| {columns} |", "|" + "---|" * (columns.count("|") + 1)]


def _all_or_count(same: int, total: int) -> str:
    """How many batched results equal the one-at-a-time ones: "all", or the count in bold."""
    return "all" if same == total else f"**{same} of {total}**"


def markdown(results: dict[str, Any]) -> str:
    """The benchmark's tables with each target's verdict."""
    lines = [f"`{results['machine']}`\n"]
    if results.get("P1"):
        lines += _table(
            "**P1 decode** (median ms/token)\n",
            "case | ms/token | / plain short | kept | target",
        )
    for name, r in results.get("P1", {}).items():
        verdict = (
            ""
            if name.startswith("plain")
            else f"<= {TARGETS['P1']:.2f}: {target_verdict(r['ratio_to_plain_short'], TARGETS['P1'])}"
        )
        lines.append(
            f"| {name} | {r['ms_per_token']:.1f} | {r['ratio_to_plain_short']:.2f} | {r['kept']} | {verdict} |"
        )
    if results.get("P2"):
        lines += _table(
            "\n**P2 method overhead** (share of time inside the method)\n",
            "case | share | target",
        )
    for name, r in results.get("P2", {}).items():
        target = TARGETS["P2_prefill"] if "prefill@" in name else TARGETS["P2_decode"]
        verdict = (
            "none: a second attention pass (its weights' column sums)"
            if r.get("attention_sums")
            else f"<= {100 * target:.0f}%: {target_verdict(r['share'], target)}"
        )
        lines.append(f"| {name} | {100 * r['share']:.1f}% | {verdict} |")
    if results.get("P3"):
        lines += _table(
            "\n**P3 peak memory** (chunked prefill)\n",
            "case | peak KV MiB | / (budget + chunk) | prefill RSS growth MiB | process peak RSS MiB | target",
        )
        for name, r in results["P3"].items():
            verdict = (
                ""
                if name == "full cache"
                else f"<= {TARGETS['P3']}: {target_verdict(r['peak_kv_ratio'], TARGETS['P3'])}"
            )
            rss = r.get("peak_rss_bytes") or r.get("cuda_max_allocated_bytes") or 0
            growth = r.get("prefill_peak_rss_bytes")
            growth = "-" if growth is None else f"{(growth - r['rss_before_prefill']) / 2**20:.0f}"
            lines.append(
                f"| {name} | {r['peak_kv_bytes'] / 2**20:.1f} | {r['peak_kv_ratio']:.2f} | {growth} | {rss / 2**20:.0f} | {verdict} |"
            )
    if results.get("P4"):
        lines += _table(
            "\n**P4 aten ops per decode step** (amortized; hardware-independent)\n",
            "case | ops/step | ops/layer | extra/layer | / plain | evictions/layer/step | target",
        )
        for name, r in results["P4"].items():
            verdict = (
                ""
                if name == "plain"
                else f"<= {TARGETS['P4']:.2f}: {target_verdict(r['ratio_to_plain'], TARGETS['P4'])}"
            )
            extra = "" if name == "plain" else f"{r['extra_per_layer']:.1f}"
            evictions = "" if name == "plain" else f"{r['evictions_per_step']:.2f}"
            lines.append(
                f"| {name} | {r['ops_per_step']:.0f} | {r['ops_per_layer']:.1f} | {extra} | "
                f"{r['ratio_to_plain']:.2f} | {evictions} | {verdict} |"
            )
    if results.get("P5"):
        lines += _table(
            "\n**P5 evaluation throughput**\n",
            "case | tokens/s | / plain decode | target",
        )
    for name, r in results.get("P5", {}).items():
        lines.append(
            f"| {name} | {r['tokens_per_s']:.1f} | {r['ratio_to_plain_decode']:.2f} | >= {TARGETS['P5']}: {target_verdict(r['ratio_to_plain_decode'], TARGETS['P5'], True)} |"
        )
    if results.get("P6"):
        size = results["args"]["p6_batch"]
        lines += _table(
            f"\n**P6 batched generation** (RULER at {results['args']['p6_length']} tokens, batch 1 vs {size})\n",
            "case | samples | budgets | batches | samples/s, one at a time | samples/s, batched | ratio | same answers",
        )
        for name, r in results["P6"].items():
            same = _all_or_count(r["same_answers"], r["samples"])
            lines.append(
                f"| {name} | {r['samples']} | {r['budgets']} | {r['batches']} | {r['samples_per_s_one']:.3f} | "
                f"{r['samples_per_s_batched']:.3f} | {r['ratio']:.2f}x | {same} |"
            )
    if results.get("P7"):
        args = results["args"]
        lines += _table(
            f"\n**P7 padded prefill** ({args['p7_batch']} prompts of {args['p7_length']} down to "
            f"{args['p7_length'] - args['p7_length'] // 2} tokens, left-padded, one forward)\n",
            "case | seconds | / plain | target",
        )
        for name, r in results["P7"].items():
            verdict = (
                ""
                if name == "plain"
                else f"<= {TARGETS['P7']:.2f}: {target_verdict(r['ratio_to_plain'], TARGETS['P7'])}"
            )
            lines.append(f"| {name} | {r['seconds']:.2f} | {r['ratio_to_plain']:.2f} | {verdict} |")
    if results.get("P8"):
        args = results["args"]
        lines += _table(
            f"\n**P8 batched lm-eval** ({', '.join(args['p8_tasks'])}, {args['p8_limit']} documents each, keep 0.5, "
            f"batch 1 vs {args['p8_batch']})\n",
            "method | requests | tokens | tokens/s, one at a time | tokens/s, batched | ratio | same results | same metrics",
        )
        for name, r in results["P8"].items():
            same = _all_or_count(r["same_results"], r["requests"])
            lines.append(
                f"| {name} | {r['requests']} | {r['tokens']} | {r['tokens_per_s_one']:.1f} | "
                f"{r['tokens_per_s_batched']:.1f} | {r['ratio']:.2f}x | {same} | {'yes' if r['same_metrics'] else '**no**'} |"
            )
    return "\n".join(lines) + "\n"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2_135m")
    parser.add_argument("--hardware", default="cpu")
    parser.add_argument("--context", type=int, default=8192)
    parser.add_argument("--short-context", type=int, default=512)
    parser.add_argument("--p2-context", type=int, default=4096)
    parser.add_argument("--p5-tokens", type=int, default=1024)
    parser.add_argument("--budget", type=int, default=512)
    parser.add_argument("--chunk", type=int, default=512)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--op-steps", type=int, default=64, help="P4: decode steps the op counts average over"
    )
    parser.add_argument("--methods", default=",".join(P1_METHODS))
    parser.add_argument(
        "--compiled-methods", default=",".join(P1_METHODS), help="P1 again with engine.compile"
    )
    parser.add_argument("--prefill-methods", default=",".join(PREFILL_SCORERS))
    parser.add_argument(
        "--attention-methods",
        default=",".join(ATTENTION_SUM_SCORERS),
        help="P2: prefill scorers that sum attention weights (no target)",
    )
    parser.add_argument("--step-methods", default=",".join(PER_STEP_METHODS))
    parser.add_argument("--p5-methods", default="streaming_llm,h2o")
    parser.add_argument(
        "--cases", default=",".join(CASES), help="the cases to run (P5 needs P1's plain decode)"
    )
    parser.add_argument("--skip-p3", action="store_true", help="no subprocess memory cases")
    parser.add_argument("--p6-methods", default="snapkv,h2o", help="P6: batched generation ('': skip P6)")
    parser.add_argument("--p6-length", type=int, default=512, help="P6: RULER's length in tokens")
    parser.add_argument("--p6-samples", type=int, default=2, help="P6: samples per RULER task")
    parser.add_argument("--p6-batch", type=int, default=8)
    parser.add_argument("--p6-budget", type=int, default=128, help="P6: the token budget case")
    parser.add_argument("--p6-repeats", type=int, default=1, help="P6: interleaved rounds (the best kept)")
    parser.add_argument("--p7-length", type=int, default=2048, help="P7: the longest padded prompt")
    parser.add_argument("--p7-batch", type=int, default=4, help="P7: prompts in the padded batch")
    parser.add_argument("--p7-repeats", type=int, default=2, help="P7: interleaved rounds (the best kept)")
    parser.add_argument(
        "--p8-methods", default="streaming_llm,snapkv", help="P8: batched lm-eval at keep 0.5 ('': skip P8)"
    )
    parser.add_argument(
        "--p8-tasks", default="kvexp_recall,kvexp_recall_gen,kvexp_recall_ppl", help="P8: lm-eval tasks"
    )
    parser.add_argument("--p8-limit", type=int, default=8, help="P8: documents per task")
    parser.add_argument("--p8-batch", type=int, default=8)
    parser.add_argument("--p8-repeats", type=int, default=1, help="P8: interleaved rounds (the best kept)")
    parser.add_argument("--out", default="outputs/bench")
    parser.add_argument("--p3-case", help=argparse.SUPPRESS)
    parser.add_argument(
        "--suite",
        choices=("cpu", "gpu"),
        default="cpu",
        help="gpu: the GPU suite (kvexp.bench_gpu, its own options)",
    )
    return parser


def _without_suite(argv: list[str]) -> list[str]:
    """argv less its `--suite X` / `--suite=X`."""
    out, skip = [], False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
        elif arg == "--suite":
            skip = i + 1 < len(argv)
        elif not arg.startswith("--suite="):
            out.append(arg)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = sys.argv[1:] if argv is None else list(argv)
    suite, _ = _parser().parse_known_args(argv)
    if suite.suite == "gpu":
        from kvexp import bench_gpu

        return bench_gpu.main(_without_suite(argv))
    args = _parser().parse_args(argv)
    if args.p3_case:
        _p3_case(args)
        return {}
    for name in (
        "methods",
        "compiled_methods",
        "prefill_methods",
        "attention_methods",
        "step_methods",
        "p5_methods",
        "p6_methods",
        "p8_methods",
        "p8_tasks",
        "cases",
    ):
        setattr(args, name, [m for m in getattr(args, name).split(",") if m])
    if not set(args.cases) <= set(CASES):
        raise SystemExit(f"--cases must name some of {', '.join(CASES)}, got {','.join(args.cases)}")
    if "P5" in args.cases and "P1" not in args.cases:
        raise SystemExit("--cases: P5 compares with P1's plain decode; run P1 too")
    model, tokenizer = load_model_by_name(args.model, args.hardware)
    needed = max(args.context, args.p2_context, args.p5_tokens, args.p7_length, 2 * args.budget) + max(
        args.steps, args.op_steps + 1
    )
    ids = _tokens(tokenizer, needed).to(model.device)
    machine = (
        f"{args.model} on {model.device} ({model.dtype}), torch {torch.__version__}, threads={torch.get_num_threads()}, "
        f"{platform.processor() or platform.machine()}"
    )
    if "P1" in args.cases:
        machine += f", P1: {args.repeats} interleaved rounds of {args.steps} steps (first {args.warmup} of each dropped)"
    print(f"kvexp bench: {machine}", flush=True)
    results: dict[str, Any] = {"machine": machine, "args": vars(args), "targets": TARGETS}
    run = set(args.cases)
    results["P1"] = p1_decode(model, ids, args) if "P1" in run else {}
    results["P2"] = p2_overhead(model, ids, args) if "P2" in run else {}
    results["P3"] = p3_memory(args) if "P3" in run and not args.skip_p3 else {}
    results["P4"] = p4_ops(model, ids, args) if "P4" in run else {}
    results["P5"] = (
        p5_throughput(model, ids, args, results["P1"][f"plain@{args.short_context}"]["ms_per_token"])
        if "P5" in run
        else {}
    )
    results["P6"] = p6_batched(model, tokenizer, args) if "P6" in run and args.p6_methods else {}
    results["P7"] = p7_padded_prefill(model, ids, args) if "P7" in run else {}
    results["P8"] = p8_lm_eval(model, tokenizer, args) if "P8" in run and args.p8_methods else {}
    out = Path(args.out)
    atomic_write_json(out / "bench.json", results)
    text = markdown(results)
    atomic_write_text(out / "bench.md", text)
    print(text)
    return results


if __name__ == "__main__":
    main()
