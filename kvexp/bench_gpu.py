"""The GPU suite of `make bench` (`python -m kvexp.bench --suite gpu`): decode and prefill at real model shapes.

Models are built in-process from real configs with random weights (Llama-3.1-8B and Qwen3-8B shapes, bf16):
time does not depend on the weights, and nothing is downloaded. Per shape and batch size (`--batches`, 1 and 8):

  decode   median ms per decode step of the plain model (stock SDPA attention, DynamicCache) at `--short` (2k) and
           at `--context` (32k), and of kvexp's cache at `--context` logical tokens with a `--budget` (2k) budget
           for each method, eager and (`--compiled-methods`, the same prefilled cache decoding on) with
           `engine.compile` (the decode step as one torch.compile'd function, mode reduce-overhead; compilation
           falls in the warmup steps). AdaKV and KIVI
           decode eagerly under compile (data-dependent per-head counts; encoded storage), so they run eager only by
           default. Targets: compressed at 32k/2k <= 1.10x plain at 2k, and >= 2x faster than plain at 32k.
  prefill  a `--context` prefill in one forward vs in `--chunk`-token chunks with streaming_llm at `--budget`:
           seconds, peak KV bytes (target: chunked <= 1.2 x (budget + chunk) tokens' worth) and the CUDA
           allocator's peak.

Prefills keep only the last position's logits (a 32k x 128k-vocabulary logits tensor would dominate memory).
Writes `<out>/bench_gpu.json` and `bench_gpu.md`. `--smoke` runs the same code on a tiny shape on the CPU (the
tests do, so the suite cannot rot); its figures mean nothing.

    python -m kvexp.bench --suite gpu [--shapes llama3.1-8b,qwen3-8b] [--batches 1,8] [--out outputs/bench]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache

from kvexp.bench import prefill, sync_device, target_verdict
from kvexp.engine import use_kvexp_attention
from kvexp.files import atomic_write_text
from kvexp.methods import make_cache
from kvexp.tracking import atomic_write_json

# The published configs' shapes (what decode time depends on); rope scaling as released.
SHAPES: dict[str, dict[str, Any]] = {
    "llama3.1-8b": {
        "model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256, "rope_theta": 500000.0,
        "max_position_embeddings": 131072, "rms_norm_eps": 1e-5,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192},
    },
    "qwen3-8b": {
        "model_type": "qwen3", "hidden_size": 4096, "intermediate_size": 12288, "num_hidden_layers": 36,
        "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936,
        "rope_theta": 1000000.0, "max_position_embeddings": 40960, "rms_norm_eps": 1e-6,
    },
    # --smoke: the same code path on the CPU in seconds.
    "tiny": {
        "model_type": "llama", "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256, "max_position_embeddings": 4096,
    },
}  # fmt: skip
METHODS = ("streaming_llm", "knorm", "snapkv", "h2o", "tova", "adakv", "kivi")
COMPILED_METHODS = ("streaming_llm", "knorm", "snapkv", "h2o", "tova")
TARGETS = {"vs_plain_short": 1.10, "speedup_vs_plain_long": 2.0, "chunked_peak_kv": 1.2}


def build_model(shape: str, device: torch.device, dtype: torch.dtype):
    """A random-weight model of a named shape, built on `device` (no download, no checkpoint)."""
    params = dict(SHAPES[shape])
    config = AutoConfig.for_model(params.pop("model_type"), **params)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


@torch.no_grad()
def _decode_ms(model, cache, batch: int, steps: int, warmup: int, vocab: int) -> float:
    """Median ms of a decode step (one random token per row) after `warmup` untimed steps."""
    tokens = torch.randint(0, vocab, (batch, steps + warmup, 1), device=model.device)
    times = []
    for i in range(steps + warmup):
        sync_device(model.device)
        start = time.perf_counter()
        model(tokens[:, i], past_key_values=cache)
        sync_device(model.device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def _peak_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _allocator_peak(device: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def decode_cases(model, batch: int, args) -> dict[str, dict[str, Any]]:
    """Plain decode at the short and the long context, and each method at the long context with the budget."""
    vocab, out = model.config.vocab_size, {}
    ids = torch.randint(0, vocab, (batch, args.context), device=model.device)
    for context in (args.short, args.context):
        model.set_attn_implementation("sdpa")
        cache = DynamicCache(config=model.config)
        prefill(model, ids[:, :context], cache, args.chunk, logits_to_keep=1)
        out[f"plain@{context}"] = {"ms": _decode_ms(model, cache, batch, args.steps, args.warmup, vocab)}
        del cache
    for method in dict.fromkeys([*args.methods, *args.compiled_methods]):
        use_kvexp_attention(model)
        cache = make_cache(model, method, budget=args.budget)
        prefill(
            model, ids, cache, args.chunk, logits_to_keep=1
        )  # once for both modes: the suite's largest cost
        modes = [False] * (method in args.methods) + [True] * (method in args.compiled_methods)
        for compiled in modes:
            # The layers share one options object: the same compressed cache decodes eagerly, then compiled.
            cache.layers[0].options.compile = compiled
            before = cache.stats()["fused_steps"]
            ms = _decode_ms(model, cache, batch, args.steps, args.warmup, vocab)
            name = f"{method}@{args.context}/{args.budget} {'compiled' if compiled else 'eager'}"
            out[name] = {
                "ms": ms,
                "kept": max(cache.physical_lengths()),
                "compiled_steps": cache.stats()["fused_steps"] - before,
            }
        del cache
    short, long = out[f"plain@{args.short}"]["ms"], out[f"plain@{args.context}"]["ms"]
    for r in out.values():
        r["vs_plain_short"] = r["ms"] / short
        r["speedup_vs_plain_long"] = long / r["ms"]
    return out


def prefill_cases(model, batch: int, args) -> dict[str, dict[str, Any]]:
    """A long prefill in one forward vs in chunks with streaming_llm at the budget: time and peak memory."""
    ids = torch.randint(0, model.config.vocab_size, (batch, args.context), device=model.device)
    use_kvexp_attention(model)
    out = {}
    for name, chunk in (("one-shot", None), (f"chunked/{args.chunk}", args.chunk)):
        _peak_reset(model.device)
        cache = make_cache(model, "streaming_llm", budget=args.budget)
        seconds = prefill(model, ids, cache, chunk, logits_to_keep=1)
        peak_kv = sum(layer.peak_bytes for layer in cache.layers)
        window = (args.budget + args.chunk) * cache.layers[0].slot_bytes * len(cache.layers)
        out[name] = {
            "seconds": seconds,
            "peak_kv_bytes": peak_kv,
            "peak_kv_ratio": peak_kv / window,
            "allocator_peak_bytes": _allocator_peak(model.device),
        }
        del cache
    return out


def markdown(results: dict[str, Any]) -> str:
    lines = [f"`{results['machine']}`\n"]
    for key, run in results["runs"].items():
        lines += [
            f"\n**{key}: decode** (median ms per step)\n",
            "| case | ms/step | / plain short | plain long / this | kept | targets |",
            "|---|---|---|---|---|---|",
        ]
        for name, r in run["decode"].items():
            targets = ""
            if not name.startswith("plain"):
                targets = (
                    f"<= {TARGETS['vs_plain_short']}: {target_verdict(r['vs_plain_short'], TARGETS['vs_plain_short'])}; "
                    f">= {TARGETS['speedup_vs_plain_long']}x: "
                    f"{target_verdict(r['speedup_vs_plain_long'], TARGETS['speedup_vs_plain_long'], True)}"
                )
            lines.append(
                f"| {name} | {r['ms']:.2f} | {r['vs_plain_short']:.2f} | {r['speedup_vs_plain_long']:.2f} | "
                f"{r.get('kept', '')} | {targets} |"
            )
        lines += [
            f"\n**{key}: prefill of {results['args']['context']} tokens** (streaming_llm)\n",
            "| case | s | peak KV MiB | / (budget + chunk) | allocator peak MiB | target |",
            "|---|---|---|---|---|---|",
        ]
        for name, r in run["prefill"].items():
            target = TARGETS["chunked_peak_kv"]
            verdict = (
                f"<= {target}: {target_verdict(r['peak_kv_ratio'], target)}"
                if name.startswith("chunked")
                else ""
            )
            peak = r["allocator_peak_bytes"]
            lines.append(
                f"| {name} | {r['seconds']:.2f} | {r['peak_kv_bytes'] / 2**20:.1f} | {r['peak_kv_ratio']:.2f} | "
                f"{'-' if peak is None else f'{peak / 2**20:.0f}'} | {verdict} |"
            )
    return "\n".join(lines) + "\n"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="llama3.1-8b,qwen3-8b")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--context", type=int, default=32768)
    p.add_argument("--short", type=int, default=2048)
    p.add_argument("--budget", type=int, default=2048)
    p.add_argument("--chunk", type=int, default=2048)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--compiled-methods", default=",".join(COMPILED_METHODS))
    p.add_argument(
        "--smoke", action="store_true", help="tiny shape on the CPU: checks the code path, not speed"
    )
    p.add_argument("--out", default="outputs/bench")
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parser().parse_args(argv)
    if args.smoke:
        args.shapes, args.context, args.short, args.budget, args.chunk = "tiny", 128, 48, 48, 16
        args.steps, args.warmup = 3, 1
    device = torch.device("cpu" if args.smoke else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("the GPU suite needs a CUDA device (--smoke runs its code path on the CPU)")
    dtype = torch.float32 if args.smoke else torch.bfloat16
    args.methods = [m for m in args.methods.split(",") if m]
    args.compiled_methods = [m for m in args.compiled_methods.split(",") if m]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    results: dict[str, Any] = {
        "machine": f"{name}, torch {torch.__version__}, {dtype}",
        "args": vars(args),
        "targets": TARGETS,
        "runs": {},
    }
    started = time.perf_counter()
    for shape in args.shapes.split(","):
        model = build_model(shape, device, dtype)
        for batch in (int(b) for b in args.batches.split(",")):
            key = f"{shape}, batch {batch}"
            print(f"kvexp GPU suite: {key}", flush=True)
            results["runs"][key] = {
                "decode": decode_cases(model, batch, args),
                "prefill": prefill_cases(model, batch, args),
            }
        del model
        _peak_reset(device)
    results["seconds"] = time.perf_counter() - started
    out = Path(args.out)
    atomic_write_json(out / "bench_gpu.json", results)
    text = markdown(results)
    atomic_write_text(out / "bench_gpu.md", text)
    print(text)
    return results
