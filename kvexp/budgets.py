"""A budget config as make_cache's budget for one document (`resolve_budget`), and per-layer budget allocations:
how a cache's total of `num_layers * budget` entries is split over the layers.

`budget` is the mean per-layer budget (kept entries per KV head, protected tokens included, as everywhere in
kvexp). docs/design.md#budgets: an allocation redistributes that total, is explicit and reported, and never exceeds
it. Every schedule returns one int >= 1 per layer summing to exactly the total, except `pyramid`, whose
integer formula can fall short of it (never above). Weighted schedules are normalized to the total and
rounded by largest remainder (ties to the lower layer), which keeps a monotonic weighting monotonic.

Not here: DynamicKV's task-aware layer budgets (docs/methods.md#dynamickv), which come from attention statistics at
prefill, not from a fixed schedule.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any


def allocate(name: str, budget: int, num_layers: int, **params: float) -> list[int]:
    """The per-layer budgets of schedule `name` for a mean of `budget` over `num_layers` layers."""
    if name not in _SCHEDULES:
        raise ValueError(f"unknown allocation {name!r}; allocation must be one of: {', '.join(ALLOCATIONS)}")
    if budget < 1 or num_layers < 1:
        raise ValueError(
            f"an allocation needs budget >= 1 and num_layers >= 1, got {budget} and {num_layers}"
        )
    schedule = _SCHEDULES[name]
    allowed = list(inspect.signature(schedule).parameters)[2:]
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise ValueError(
            f"allocation {name!r} has no parameter(s) {unknown}; its parameters are: {allowed or 'none'}"
        )
    return schedule(budget, num_layers, **params)


def resolve_budget(budget: Any, document_tokens: int, num_layers: int) -> int | list[int] | None:
    """A budget config (tokens | keep_ratio | per_layer | per_head) as make_cache's budget for one document.

    A non-uniform `allocation` splits the mean budget over the `num_layers` layers.
    """
    if budget is None:
        return None
    if budget.get("per_layer") is not None:
        return list(budget["per_layer"])
    if budget.get("keep_ratio") is not None:
        mean = max(1, int(budget["keep_ratio"] * document_tokens))
    else:
        mean = budget.get("tokens")
    allocation = budget.get("allocation", "uniform")
    if mean is None or allocation == "uniform":
        return mean
    return allocate(allocation, mean, num_layers, **dict(budget.get("allocation_params") or {}))


def _uniform(budget: int, num_layers: int) -> list[int]:
    """Every layer gets the budget."""
    return [budget] * num_layers


def _pyramid(
    budget: int, num_layers: int, beta: float = 20, window: int = 0, length: int | None = None
) -> list[int]:
    """PyramidKV (Cai et al. 2024, arXiv 2406.02069), KVCache-Factory's integer schedule (docs/methods.md#pyramidkv).

    With `base = budget - window` selected tokens per layer: `min = base // beta`, `max = 2 base - min`,
    `step = (max - min) // (num_layers - 1)`; layer l keeps `window + max - l step` (the observation window
    on top of its share, so the budget includes the window as everywhere in kvexp).
    `length` (the prompt length) applies the reference's prompt regimes: below `2 base` tokens every layer
    gets the budget, and `max` is capped at `length - window` (with `min = 2 base - max`). Streaming has no
    prompt length: without `length` the pyramid is not capped (a deviation from the reference).
    The floor division of `step` makes the reference overshoot the total by `num_layers * r / 2` tokens
    (`r = (max - min) mod (num_layers - 1)`; with `max - min < num_layers - 1` every layer gets `max`);
    kvexp takes that excess back from the largest layers, so the schedule never exceeds the total.
    """
    if beta < 1:
        raise ValueError(f"pyramid: beta must be >= 1, got {beta}")
    if not 0 <= window < budget:
        raise ValueError(f"pyramid: window must be in [0, budget={budget}), got {window}")
    base = budget - window
    if num_layers == 1 or (length is not None and length < 2 * base):
        return _uniform(budget, num_layers)
    low = int(base // beta)
    high = 2 * base - low
    if length is not None and high >= length - window:
        high = length - window
        low = 2 * base - high
    step = (high - low) // (num_layers - 1)
    return _fit([window + high - layer * step for layer in range(num_layers)], budget * num_layers)


def _geometric(budget: int, num_layers: int, decay: float = 0.95) -> list[int]:
    """The kvcompress study's `pyramid_kv_compress`: layer i's budget is `base * decay**i`, normalized to the total.

    The study gives no default decay; 0.95 gives the first of 32 layers about twice the mean, like PyramidKV.
    """
    if decay <= 0:
        raise ValueError(f"geometric: decay must be > 0, got {decay}")
    return _proportional([decay**i for i in range(num_layers)], budget * num_layers)


def _linear_ramp(budget: int, num_layers: int, beta: float = 1.5) -> list[int]:
    """The pooling-merge study's pyramidal layer compression `L_k = L0 [1 + k/m (1/beta - 1)]` (m layers), normalized.

    `L0` is whatever makes the total; beta = 1 is uniform. 1.5 is the study's GPU example (its
    `--steepness_coefficient`; the CLI default 1.0 would be uniform).
    """
    if beta <= 0:
        raise ValueError(f"linear_ramp: beta must be > 0, got {beta}")
    return _proportional(
        [1 + k / num_layers * (1 / beta - 1) for k in range(num_layers)], budget * num_layers
    )


def _pyramidinfer(
    budget: int, num_layers: int, decay_ratio: float = 0.9, recent_ratio: float = 0.2
) -> list[int]:
    """PyramidInfer's (Yang et al. 2024, arXiv 2405.12532) prefill cache sizes (docs/methods.md#pyramidinfer), normalized.

    After layer l the reference keeps a `rho_l = (1 - decay_ratio)(cos(pi l / NL) + 1) / 2 + decay_ratio`
    share of the context (the recent `recent_ratio` of the tokens is never pruned), and layer l + 1 only
    computes K/V for what was kept: layer l holds `recent_ratio + (1 - recent_ratio) * prod_{i<l} rho_i` of the
    prompt. Defaults are the reference's `configs/llama3_8b.json`; its absolute `min_context_length` is left
    out (a budget schedule has no prompt length).
    """
    if not 0 < decay_ratio <= 1:
        raise ValueError(f"pyramidinfer: decay_ratio must be in (0, 1], got {decay_ratio}")
    if not 0 <= recent_ratio < 1:
        raise ValueError(f"pyramidinfer: recent_ratio must be in [0, 1), got {recent_ratio}")
    kept, weights = 1.0, []
    for layer in range(num_layers):
        weights.append(recent_ratio + (1 - recent_ratio) * kept)
        kept *= (1 - decay_ratio) * (math.cos(math.pi * layer / num_layers) + 1) / 2 + decay_ratio
    return _proportional(weights, budget * num_layers)


def _proportional(weights: list[float], total: int) -> list[int]:
    """`total` split in proportion to positive `weights`: floors, then the remainder by largest fraction."""
    shares = [total * w / sum(weights) for w in weights]
    counts = [math.floor(s) for s in shares]
    by_fraction = sorted(range(len(shares)), key=lambda i: counts[i] - shares[i])  # stable: lower layer first
    for i in by_fraction[: total - sum(counts)]:
        counts[i] += 1
    return _fit(counts, total)


def _fit(counts: list[int], total: int) -> list[int]:
    """At least 1 per layer and at most `total` in all: excess comes off the largest layer (the last of ties,
    so a non-increasing schedule stays non-increasing)."""
    counts = [max(c, 1) for c in counts]
    for _ in range(sum(counts) - total):
        largest = max(range(len(counts)), key=lambda i: (counts[i], i))
        counts[largest] -= 1
    return counts


_SCHEDULES: dict[str, Callable[..., list[int]]] = {
    "uniform": _uniform,
    "pyramid": _pyramid,
    "geometric": _geometric,
    "linear_ramp": _linear_ramp,
    "pyramidinfer": _pyramidinfer,
}
ALLOCATIONS: tuple[str, ...] = tuple(_SCHEDULES)
