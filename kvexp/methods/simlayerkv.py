from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from kvexp.methods.base import Method, register
from kvexp.methods.scoring import head_caps

if TYPE_CHECKING:
    from kvexp.engine.cache import CompressedLayer


def lazy_mass(
    layer: CompressedLayer, query: torch.Tensor, n_last: int, n_initial: int, recent: int | torch.Tensor
) -> torch.Tensor:
    """[B] fp32: each row's attention mass from its last `n_last` queries (of this step, [B, H, q, D]) on its first
    `n_initial` tokens and its `recent` newest (one count, or each row's own [B, 1]), averaged over the query heads
    and those queries. Causal by position, over the live slots (the step's attention, recomputed in fp32); a row's
    padding queries are left out."""
    rows = min(n_last, query.shape[2])
    logits = layer.attention_logits(query[:, :, -rows:], layer.scaling)  # [B, Hkv, G, r, n]
    positions = layer.positions  # [B, Hkv, n]
    asked = positions[:, 0, -rows:]  # [B, r]: the queries' positions (-1: padding)
    future = positions[:, :, None, None, :] > asked[:, None, None, :, None]
    probs = torch.softmax(logits.masked_fill(future, float("-inf")), dim=-1).nan_to_num(0.0)
    newest = positions.amax(dim=(1, 2))  # [B]: the row's last position
    initial = (positions >= 0) & (positions < n_initial)
    window = positions > (newest[:, None] - recent)[:, :, None]
    kept = (initial | window) & layer.live()  # what a lazy layer keeps
    mass = (probs * kept[:, :, None, None, :]).sum(dim=-1)  # [B, Hkv, G, r]
    real = (asked >= 0).float()[:, None, None, :]
    return (mass * real).sum(dim=(1, 2, 3)) / (real.sum(dim=(1, 2, 3)) * mass.shape[1] * mass.shape[2])


@register
@dataclass
class SimLayerKV(Method):
    """SimLayerKV (Zhang, Du, Du, Pang, Gao, Lin, arXiv 2410.13846, 2024): lazy layers keep StreamingLLM's cache,
    the others everything.

    Once per layer and run, at the first step that takes the layer over its budget (the prefill, or the first
    chunk or token past the budget when streaming), each batch row's last `n_last` queries of that step score the
    layer: their attention on the row's first `n_initial` tokens and its newest `budget - n_initial` (the tokens a
    lazy layer keeps; kvpress's `n_recent`), averaged over the query heads and those queries. Above
    `lazy_threshold` the layer is lazy for that row: it keeps its budget from then on, `n_initial` sinks and the
    newest tokens (per-head budgets: each head its own); otherwise it keeps every token and never evicts, so it
    is as long as the sequence (memory per layer = its longest head: a batch with one non-lazy row holds the
    whole sequence in that layer, the lazy rows' evicted slots as dead padding). The decision lives in the
    cache's per-layer scratch (`lazy`, [B] bool) and follows beam reorders; each batch row decides at its own first
    compression, as alone.
    Defaults: `n_last=1` is SimLayerKV-decode, the reference's LongBench setting (the first generated token;
    kvpress takes the prompt's last token), `n_initial=4`, and `lazy_threshold=0.9`, the paper's Llama-3 value
    (Llama-2 0.65, Mistral 0.8, Qwen 0.85; kvpress defaults to 1.0, which disables it). Deviations: the decision
    is per batch row (kvpress averages over the batch too); the initial and recent tokens are a union, counted
    once (the reference adds the two sums, which overlap on short inputs); the recent window is the lazy
    layer's own (budget - n_initial), not a separate 1024.
    """

    name = "simlayerkv"
    description = "lazy layers keep sinks + a recent window, the others every token (Zhang et al. 2024)"
    row_budgets = True  # a lazy layer keeps each row's own budget, its window detected by it
    observes = True
    # [B]: the layer is lazy for that row, the mass that decided it, and whether the row has decided yet
    row_scratch = ("lazy", "mass", "decided")
    lazy_threshold: float = 0.9
    n_last: int = 1
    n_initial: int = 4

    def validate(self, budget: int | None) -> None:
        if not 0.0 <= self.lazy_threshold <= 1.0:
            raise ValueError(f"method.lazy_threshold must be in [0, 1], got {self.lazy_threshold}")
        if self.n_last < 1:
            raise ValueError(f"method.n_last must be >= 1, got {self.n_last}")
        if self.n_initial < 0:
            raise ValueError(f"method.n_initial must be >= 0, got {self.n_initial}")
        if budget is not None and self.n_initial >= budget:
            raise ValueError(
                f"method.n_initial ({self.n_initial}) must be smaller than the budget ({budget}) so that a lazy "
                "layer keeps a recent window"
            )

    def observe(self, layer: CompressedLayer, query: torch.Tensor) -> None:
        if not layer.over_budget():
            return
        deciding = layer.deciding_rows(self)  # each row decides once, at its own first compression
        if not bool(deciding.any()):
            return
        # the window a lazy layer keeps: under per-row budgets, each row's own
        recent = layer.row_targets(layer.budget) - self.n_initial
        layer.decide(self, deciding, mass=lazy_mass(layer, query, self.n_last, self.n_initial, recent))
        # a row not decided yet keeps everything
        scratch = layer.scratch(self)
        scratch["lazy"] = (scratch["mass"] > self.lazy_threshold) & scratch["decided"]

    def head_counts(self, layer: CompressedLayer, scores: torch.Tensor, target: int) -> torch.Tensor | None:
        lazy = layer.scratch(self).get("lazy")
        if lazy is None or bool(lazy.all()):
            return None  # lazy for every row: the budget (or the per-head budgets)
        return torch.where(lazy[:, None], head_caps(layer, layer.budget), layer.live().sum(dim=-1))

    def score(self, layer: CompressedLayer) -> torch.Tensor:
        """StreamingLLM's keep order: the sinks, then the newest tokens; dead slots last."""
        positions = layer.positions
        sinks = (positions >= 0) & (positions < self.n_initial)
        order = positions.float() + sinks * 2.0 * (layer.seen + 1)
        return order.masked_fill(~layer.live(), float("-inf"))

    def statistics(self, layers: list[CompressedLayer]) -> dict[str, Any]:
        scratches = [layer.scratch(self) for layer in layers if "decided" in layer.scratch(self)]
        if not scratches:
            return {}
        shares = [s["lazy"][s["decided"]].float().mean() for s in scratches]  # over the rows that decided
        return {"lazy_layer_share": float(torch.stack(shares).mean())}
