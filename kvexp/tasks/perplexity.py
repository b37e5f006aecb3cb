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

from kvexp.files import Journal
from kvexp.methods import Method, make_cache, method_and_options
from kvexp.tasks.base import eviction_times, kv_totals, run_journaled, share_batch_costs
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
    wall_s: float | None = None  # in a batch: its share of the batch's wall time (None: scored alone)

    @property
    def cost_s(self) -> float:
        """The wall time the document cost: its share of its batch's, or its own steps when scored alone."""
        return self.first_step_s + sum(self.step_s) if self.wall_s is None else self.wall_s

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
    return score_documents(
        model, [(doc_id, input_ids)], method, budget, chunk_size, progress, **cache_kwargs
    )[0]


@torch.no_grad()
def score_documents(
    model,
    documents: list[tuple[str, torch.Tensor]],  # (id, [1, T_i])
    method: str | Method,
    budget: int | list[int] | None,
    chunk_size: int = 1,
    progress: bool = False,
    *,
    row_budgets: list[int] | None = None,
    **cache_kwargs,
) -> list[DocumentResult]:
    """Feed several documents at once through one compressed cache, each a batch row from position 0: every step
    takes the next `chunk_size` tokens of each row still going (a row's last chunk, if shorter, is right-padded and
    its padding masked), and a finished row leaves the batch. Each document gets the figures it gets alone (its own
    NLL, hits and kept entries; its share of the batch's bytes, method time and wall time). `row_budgets`: each
    document's own budget instead of `budget`, for a method with `Method.row_budgets`."""
    n_rows = len(documents)
    if row_budgets is not None:
        cache = make_cache(model, method, row_budgets=row_budgets, **cache_kwargs)
    else:
        cache = make_cache(model, method, budget, **cache_kwargs)
    pad = 0
    inputs = [ids.to(model.device)[0, :-1] for _, ids in documents]
    targets = [ids.to(model.device)[0, 1:] for _, ids in documents]
    lengths = [x.shape[0] for x in inputs]
    nll = torch.zeros(n_rows, dtype=torch.float64, device=model.device)
    correct = torch.zeros(n_rows, dtype=torch.long, device=model.device)
    steps, peak, results = [], 0, [None] * n_rows
    active = list(range(n_rows))
    fed = 0  # tokens each active row has fed (they all started together)
    start_wall = time.perf_counter()
    label = documents[0][0] if n_rows == 1 else f"{n_rows} documents"
    bar = tqdm(total=max(lengths), desc=f"{label} [{getattr(method, 'name', method)}]", disable=not progress)
    while active:
        width = min(chunk_size, max(lengths[i] - fed for i in active))
        piece = torch.full((len(active), width), pad, dtype=torch.long, device=model.device)
        real = torch.zeros((len(active), width), dtype=torch.bool, device=model.device)
        for at, i in enumerate(active):
            part = inputs[i][fed : fed + width]
            piece[at, : part.shape[0]], real[at, : part.shape[0]] = part, True
        mask = None
        if not bool(real.all()):  # a row's shorter last chunk: its padding is masked (dead slots)
            mask = torch.cat(
                [torch.ones(len(active), fed, dtype=torch.long, device=model.device), real.long()], 1
            )
        t0 = time.perf_counter()
        logits = model(piece, attention_mask=mask, past_key_values=cache).logits.float()
        for at, i in enumerate(active):
            count = int(real[at].sum())
            target = targets[i][fed : fed + count]
            nll[i] += torch.nn.functional.cross_entropy(logits[at, :count], target, reduction="sum").double()
            correct[i] += (logits[at, :count].argmax(-1) == target).sum()
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        steps.append(time.perf_counter() - t0)
        peak = max(peak, cache.kept_bytes())
        fed += width
        bar.update(width)
        going = []
        for at, i in enumerate(active):
            if fed < lengths[i]:
                going.append(at)
                continue
            kv = cache.stats(row=at, seen=lengths[i]) if n_rows > 1 else cache.stats()
            # NLL and hits are filled in at the end (one transfer from the device).
            results[i] = DocumentResult(documents[i][0], lengths[i], 0.0, 0, steps[0], steps[1:], kv)
        if going and len(going) < len(active):
            cache.reorder_cache(torch.tensor(going, device=model.device))  # finished rows leave the batch
        active = [active[at] for at in going]
    bar.close()
    for i, result in enumerate(results):
        result.nll, result.correct = nll[i].item(), int(correct[i].item())
    share_batch_costs(results, cache, peak, time.perf_counter() - start_wall)
    return results


def budget_batches(budgets: list[int | list[int] | None], batch_size: int, per_row: bool) -> list[list[int]]:
    """The documents' indices, up to `batch_size` at a time among documents of the same budget (a batch's rows share
    the layer budgets) or, with `per_row` (a method that keeps a budget per row, without slack), among all token
    budgets; in the order of each batch's first document."""
    groups: dict[tuple, list[int]] = {}
    for i, budget in enumerate(budgets):
        if per_row and isinstance(budget, int):
            key: tuple = ("a budget per row",)
        else:
            key = tuple(budget) if isinstance(budget, list) else (budget,)
        groups.setdefault(key, []).append(i)
    return sorted(idx[j : j + batch_size] for idx in groups.values() for j in range(0, len(idx), batch_size))


def score_batch(
    model,
    documents: list[tuple[str, torch.Tensor]],
    method: str | Method,
    budgets: list[int | list[int] | None],
    chunk_size: int,
    progress: bool = False,
    **cache_kwargs,
) -> list[DocumentResult]:
    """`score_documents` for one of `budget_batches`' batches, each document with its own budget (`budgets`: one per
    document, shared unless the method keeps a budget per row)."""
    return score_documents(
        model, documents, method, budgets[0], chunk_size, progress,
        row_budgets=budgets if any(b != budgets[0] for b in budgets) else None, **cache_kwargs,
    )  # fmt: skip


def score_in_batches(
    model,
    documents: list[tuple[str, torch.Tensor]],
    method: str | Method,
    budget_for: Callable[[int], int | list[int] | None],
    chunk_size: int,
    batch_size: int,
    on_batch: Callable[[list[DocumentResult]], None] | None = None,
    journal: Journal | None = None,
    **cache_kwargs,
) -> list[DocumentResult]:
    """Every document with the budget `budget_for(its tokens)`, in `budget_batches`; results in document order;
    `on_batch(results so far)` after each batch. `journal`: each batch's results are recorded as they finish, and a
    killed run's recorded batches are read back instead of scored again."""
    built = method_and_options(method, dict(cache_kwargs))  # by name: its parameters are among cache_kwargs
    budgets = [budget_for(ids.shape[1]) for _, ids in documents]
    batches = budget_batches(budgets, batch_size, built.row_budgets and not cache_kwargs.get("slack"))

    def score(batch: list[int]) -> list[DocumentResult]:
        return score_batch(
            model,
            [documents[i] for i in batch],
            method,
            [budgets[i] for i in batch],
            chunk_size,
            **cache_kwargs,
        )

    def progress(done: list[int], results: list[DocumentResult | None]) -> None:
        if on_batch is not None:
            on_batch([r for r in results if r is not None])

    return run_journaled(
        batches, len(documents), score, journal, lambda i, stored: DocumentResult(**stored), progress
    )


def aggregate(results: list[DocumentResult]) -> dict[str, Any]:
    """Corpus-level metrics (token-weighted perplexity) and cost figures over documents."""
    tokens = sum(r.tokens for r in results)
    nll = sum(r.nll for r in results)
    total_s = sum(r.cost_s for r in results)
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
