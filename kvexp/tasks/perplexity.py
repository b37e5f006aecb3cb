"""Streaming perplexity (docs/usage.md#perplexity): the document is fed `chunk_size` tokens per step through a compressed
cache, compression runs between steps, and every token after the first is scored.

Tokens are `tokenizer(text).input_ids[:max_tokens]` (the tokenizer's default special tokens); the first token
is context only. The last token is never fed: it has nothing to predict.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from kvexp.methods import Method, make_cache
from kvexp.tasks.base import eviction_times, kv_totals
from kvexp.tracking import log_progress


@dataclass
class DocumentResult:
    id: str
    tokens: int  # scored tokens (document tokens - 1)
    nll: float  # summed negative log-likelihood (nats)
    correct: int  # greedy next-token hits
    first_step_s: float  # first step (prefill of the first chunk + its compression)
    step_s: list[float] = field(default_factory=list)  # every later step
    kv: dict[str, Any] = field(default_factory=dict)  # cache.stats() at the end
    kv_peak_bytes: int = 0  # largest physical KV footprint during the run (tensors, not allocator)

    @property
    def perplexity(self) -> float:
        return perplexity(self.nll / self.tokens)

    @property
    def accuracy(self) -> float:
        return self.correct / self.tokens


def perplexity(mean_nll: float) -> float:
    """exp(mean NLL), inf past the largest finite float (a mean NLL over ~709.78 nats) instead of an
    OverflowError: the run then fails as non-finite, with its results written."""
    try:
        return math.exp(mean_nll)
    except OverflowError:
        return math.inf


def warm_up(model, input_ids: torch.Tensor, chunk_size: int = 1, tokens: int = 32) -> None:
    """The full cache over the first `tokens` tokens, untimed: the process's first-call overhead (kernel and
    allocator set-up, lazy imports) stays out of the first timed run (else the full cache, timed first, looks
    slower than the compressed one for no reason of its own)."""
    score_document(model, input_ids[:, : max(2, tokens)], "full", None, chunk_size)


@torch.no_grad()
def score_document(
    model,
    input_ids: torch.Tensor,  # [1, T]
    method: str | Method,
    budget: int | list[int] | None,
    chunk_size: int = 1,
    doc_id: str = "doc",
    progress: bool = False,
    **cache_kwargs,
) -> DocumentResult:
    """Feed one document through a fresh compressed cache; sum NLL and hits over tokens 1..T-1."""
    cache = make_cache(model, method, budget, **cache_kwargs)
    ids = input_ids.to(model.device)
    inputs, targets = ids[:, :-1], ids[:, 1:]
    n = inputs.shape[1]
    nll = torch.zeros((), dtype=torch.float64, device=ids.device)
    correct = torch.zeros((), dtype=torch.long, device=ids.device)
    steps, peak = [], 0
    bar = tqdm(
        range(0, n, chunk_size), desc=f"{doc_id} [{getattr(method, 'name', method)}]", disable=not progress
    )
    for start in bar:
        t0 = time.perf_counter()
        logits = model(inputs[:, start : start + chunk_size], past_key_values=cache).logits.float()
        target = targets[:, start : start + chunk_size]
        nll += torch.nn.functional.cross_entropy(logits[0], target[0], reduction="sum").double()
        correct += (logits.argmax(-1) == target).sum()
        if ids.is_cuda:
            torch.cuda.synchronize()
        steps.append(time.perf_counter() - t0)
        peak = max(peak, cache.kept_bytes())
    return DocumentResult(
        id=doc_id,
        tokens=n,
        nll=nll.item(),
        correct=int(correct.item()),
        first_step_s=steps[0],
        step_s=steps[1:],
        kv=cache.stats(),
        kv_peak_bytes=peak,
    )


def aggregate(results: list[DocumentResult]) -> dict[str, Any]:
    """Corpus-level metrics (token-weighted perplexity) and cost figures over documents."""
    tokens = sum(r.tokens for r in results)
    nll = sum(r.nll for r in results)
    total_s = sum(r.first_step_s + sum(r.step_s) for r in results)
    later = [s for r in results for s in r.step_s]
    compress_s = sum(r.kv.get("compress_seconds", 0.0) for r in results)
    return {
        "metrics": {
            "perplexity": perplexity(nll / tokens),
            "accuracy": sum(r.correct for r in results) / tokens,
            "nll": nll / tokens,
            "tokens": tokens,
            "documents": len(results),
        },
        "kv_cache": kv_totals(results),
        "timing": {
            "ttft_s": sum(r.first_step_s for r in results) / len(results),
            "tpot_ms": 1000 * sum(later) / len(later) if later else None,
            "throughput_tok_s": tokens / total_s,
            "total_s": total_s,
            "compress_s": compress_s,
            "compress_share": compress_s / total_s if total_s else 0.0,
            **eviction_times(results),
        },
    }


def document_progress(cache: str, results: list[DocumentResult]) -> None:
    """The job's W&B run gets one point per document: `<cache>/documents`, its perplexity, the running one."""
    last = results[-1]
    running = perplexity(sum(r.nll for r in results) / sum(r.tokens for r in results))
    log_progress(
        {
            f"{cache}/documents": len(results),
            f"{cache}/perplexity": last.perplexity,
            f"{cache}/running_perplexity": running,
        }
    )


def document_rows(before: list[DocumentResult] | None, after: list[DocumentResult]) -> list[dict[str, Any]]:
    """samples.csv: one row per document, its perplexity and accuracy before/after, its cache and its time."""
    rows = []
    for i, a in enumerate(after):
        b = before[i] if before is not None else None
        rows.append(
            {
                "id": a.id,
                "tokens": a.tokens,
                "perplexity_before": b.perplexity if b else None,
                "perplexity_after": a.perplexity,
                "accuracy_before": b.accuracy if b else None,
                "accuracy_after": a.accuracy,
                "kept_tokens": a.kv["tokens_kept"],
                "compression_ratio": a.kv["compression_ratio"],
                "first_step_s": a.first_step_s,
                "ms_per_step": 1000 * sum(a.step_s) / len(a.step_s) if a.step_s else None,
                "compress_s": a.kv.get("compress_seconds", 0.0),
            }
        )
    return rows


def evaluate_perplexity(
    model,
    tokenizer,
    text: str | list[str],
    method: str | Method = "full",
    budget: int | list[int] | None = None,
    *,
    chunk_size: int = 1,
    max_tokens: int | None = 2048,
    progress: bool = True,
    on_document: Callable[[DocumentResult], None] | None = None,
    **cache_kwargs,
) -> dict[str, Any]:
    """Python API: streaming perplexity of `text` (one document or several) under `method` at `budget`.

    The CLI's defaults: the first `max_tokens` tokens of each document (2048; None: all of it, within the model's
    positions) and a progress bar per document (`progress=False` hides it)."""
    texts = [text] if isinstance(text, str) else text
    positions = getattr(model.config, "max_position_embeddings", None)
    results = []
    for i, t in enumerate(texts):
        ids = tokenizer(t, return_tensors="pt").input_ids[:, :max_tokens]
        if ids.shape[1] < 2:
            raise ValueError(f"document {i} has {ids.shape[1]} token(s); perplexity needs at least 2")
        if positions is not None and ids.shape[1] - 1 > positions:
            raise ValueError(
                f"document {i}: {ids.shape[1]} tokens feed {ids.shape[1] - 1} positions, more than the model's "
                f"{positions}; pass max_tokens <= {positions + 1}"
            )
        result = score_document(model, ids, method, budget, chunk_size, f"doc{i}", progress, **cache_kwargs)
        results.append(result)
        if on_document is not None:
            on_document(result)
    summary = aggregate(results)
    summary["documents"] = results
    return summary
