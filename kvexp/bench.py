"""`make bench`: decode speed of the compressed cache against the plain model, measured in one run.

Prints decode ms/token of the plain model (stock attention, DynamicCache) at 512 and 4096 context, of kvexp's
cache without compression at 4096, and of compressed caches at 4096 logical context with a 512 budget, with
their ratios and the share of time spent inside the compression method during prefill and decode.
Target: a compressed step costs what the plain model costs at the compressed length (ratio ~1 to plain@512).

    python -m kvexp.bench [--model smollm2_135m] [--hardware cpu] [--context 4096] [--budget 512] [--steps 32]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import DynamicCache

from kvexp.engine import make_cache
from kvexp.models import load_model_by_name
from kvexp.tasks.data import load_documents


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def _measure(model, ids: torch.Tensor, context: int, steps: int, cache) -> dict[str, float]:
    """Prefill `context` tokens, then decode `steps` tokens one by one (teacher-forced from `ids`)."""
    device = model.device
    _sync(device)
    t0 = time.perf_counter()
    model(ids[:, :context], past_key_values=cache)
    _sync(device)
    prefill = time.perf_counter() - t0
    compress_prefill = _compress_seconds(cache)
    times = []
    for i in range(steps):
        t0 = time.perf_counter()
        model(ids[:, context + i : context + i + 1], past_key_values=cache)
        _sync(device)
        times.append(time.perf_counter() - t0)
    decode_total = sum(times)
    times = times[3:]  # warm-up steps
    return {
        "prefill_s": prefill,
        "ms_per_token": 1000 * statistics.median(times),
        "ms_mean": 1000 * statistics.mean(times),
        "compress_share_prefill": compress_prefill / prefill,
        "compress_share_decode": (_compress_seconds(cache) - compress_prefill) / decode_total,
        "kept": cache.get_seq_length() if isinstance(cache, DynamicCache) else cache.physical_lengths()[0],
    }


def _compress_seconds(cache) -> float:
    return 0.0 if isinstance(cache, DynamicCache) else sum(layer.compress_seconds for layer in cache.layers)


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


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2_135m")
    parser.add_argument("--hardware", default="cpu")
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--short-context", type=int, default=512)
    parser.add_argument("--budget", type=int, default=512)
    parser.add_argument("--steps", type=int, default=64)
    args = parser.parse_args()

    model, tokenizer = load_model_by_name(args.model, args.hardware)
    ids = _tokens(tokenizer, args.context + args.steps).to(model.device)
    print(
        f"kvexp bench: {args.model} on {model.device} ({model.dtype}), torch threads={torch.get_num_threads()}, "
        f"{args.steps} decode steps (median after 3 warm-up)"
    )

    def plain(context):
        model.set_attn_implementation("sdpa")
        return _measure(model, ids, context, args.steps, DynamicCache(config=model.config))

    def kvexp(method, **kwargs):
        return _measure(model, ids, args.context, args.steps, make_cache(model, method, **kwargs))

    rows = {
        f"plain @{args.short_context}": plain(args.short_context),
        f"plain @{args.context}": plain(args.context),
        f"kvexp full @{args.context}": kvexp("full"),
        f"streaming_llm @{args.context}, budget {args.budget}": kvexp("streaming_llm", budget=args.budget),
        f"knorm @{args.context}, budget {args.budget}": kvexp("knorm", budget=args.budget),
        f"knorm @{args.context}, budget {args.budget}, slack 16": kvexp(
            "knorm", budget=args.budget, slack=16
        ),
    }
    short, long_ = rows[f"plain @{args.short_context}"], rows[f"plain @{args.context}"]
    print(f"{'':44}{'ms/token':>9}{'/plain short':>13}{'/plain long':>12}{'kept':>6}{'prefill s':>10}"
          f"{'method% pre':>12}{'method% dec':>12}")  # fmt: skip
    for name, r in rows.items():
        print(
            f"{name:44}{r['ms_per_token']:9.1f}{r['ms_per_token'] / short['ms_per_token']:13.2f}"
            f"{r['ms_per_token'] / long_['ms_per_token']:12.2f}{r['kept']:6d}{r['prefill_s']:10.2f}"
            f"{100 * r['compress_share_prefill']:12.1f}{100 * r['compress_share_decode']:12.1f}"
        )


if __name__ == "__main__":
    main()
