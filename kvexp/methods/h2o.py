from dataclasses import dataclass

import torch

from kvexp.engine import Reallocation
from kvexp.methods.base import Method, check_window, register
from kvexp.methods.scoring import GQA_REDUCTIONS, accumulate_attention, fraction, protect_recent, row_budget


@dataclass
class HeavyHitters(Method):
    """H2O's selection, shared by `h2o` and `d2o`: each cached key's accumulated attention, plus a recent window.

    Every step adds the attention each cached key receives from the step's queries (a prefill adds the full
    prompt's column sums, block-accumulated) to its score; a compression keeps the `recent` most recent tokens
    plus the top accumulated scores among the rest. Evicted keys' scores go with them. GQA: the per-query-head
    attention is reduced over the group (`gqa`, mean by default) to one score per KV head. The split follows the
    H2O study's heavy/recent ratios: `recent_ratio` of the budget is the recent window (0.2 = its 80/20), or
    `recent_size` tokens.
    """

    observes = True
    reads_step_attention = True
    state_names = ("acc",)
    recent_ratio: float = 0.5
    recent_size: int | None = None
    gqa: str = "mean"

    def validate(self, budget: int | None) -> None:
        if not 0.0 <= self.recent_ratio <= 1.0:
            raise ValueError(f"method.recent_ratio must be in [0, 1], got {self.recent_ratio}")
        if budget is not None:  # without a budget the recent window is never used
            check_window("recent_size", self.recent_size, budget, up_to_budget=True, nullable=True)
        if self.gqa not in GQA_REDUCTIONS:
            raise ValueError(f"method.gqa must be one of {GQA_REDUCTIONS}, got {self.gqa!r}")

    def recent(self, budget: int | torch.Tensor) -> int | torch.Tensor:
        """The recent window of a budget, or of each row's ([B, 1, 1], `row_budget`)."""
        return self.recent_size if self.recent_size is not None else fraction(budget, self.recent_ratio)

    def observe(self, layer, query: torch.Tensor) -> None:
        accumulate_attention(layer, query, "acc", self.gqa)

    def score(self, layer) -> torch.Tensor:
        return protect_recent(layer.state("acc"), layer.positions, self.recent(row_budget(layer)))


@register
@dataclass
class H2O(HeavyHitters):
    """H2O (Zhang et al., NeurIPS 2023, arXiv 2306.14048): heavy hitters by accumulated attention + recent window,
    per KV head and per layer (the original is MHA-only, per head; see `HeavyHitters` for the rule).

    The H2O study's two switches:
    * `per_layer=false` (its global mode): one ranking for the whole cache. A token's score is its accumulated
      attention summed over every layer and KV head that holds it; in a step that compresses, every layer waits
      for the last one (the cache defers them), which ranks the tokens once, and then each layer keeps its budget
      of them by that ranking (the same tokens in every layer and head, up to ties), recent window included.
    * `track_attention=false` (the tracking ablation): no attention is computed or accumulated (its cost is gone
      too) and the heavy-hitter part is dropped: the budget is the recency part alone, the newest tokens.
    """

    name = "h2o"
    description = "heavy hitters by accumulated attention + recent window (Zhang et al. 2023)"
    per_layer: bool = True
    track_attention: bool = True

    row_budgets = True  # per layer, its recent window is each row's share of its own budget (`row_budget`)

    def __post_init__(self) -> None:
        # Instance-level values of the ClassVars the engine reads.
        self.observes = self.track_attention
        self.allocates = not self.per_layer
        self.row_budgets = self.per_layer  # the global mode ranks once for the whole batch's budget

    def validate(self, budget: int | None) -> None:
        super().validate(budget)
        if not self.per_layer and not self.track_attention:
            raise ValueError(
                "method.per_layer=false ranks tokens by their attention across layers; it needs "
                "method.track_attention=true"
            )

    def allocate(self, layer) -> Reallocation | None:
        """Global mode: defer each layer's compression to the last budgeted layer, which ranks every token once
        (accumulated attention summed over layers and heads, by position) and has the deferred layers compress."""
        layers = layer.cache.layers
        last = max(i for i, other in enumerate(layers) if other.budget is not None)
        if layer.layer_idx != last:
            return Reallocation(defer=True) if layer.over_budget() else None
        deferred = [i for i, other in enumerate(layers) if other.deferred]
        if not deferred and not layer.over_budget():
            return None
        ranking = torch.zeros(layer.batch, layer.seen, device=layer.device)  # [B, positions]
        for other in layers:
            if other.budget is not None:
                acc = other.state("acc").masked_fill(~other.live(), 0.0)  # [B, Hkv, L]
                ranking.scatter_add_(1, other.positions.clamp_min(0).flatten(1), acc.flatten(1))
        layer.cache.scratch(self)["ranking"] = ranking
        return Reallocation({i: layers[i].budget for i in deferred})

    def score(self, layer) -> torch.Tensor:
        if not self.track_attention:
            return layer.positions.float()  # the recency part alone: newest first
        if self.per_layer:
            return super().score(layer)
        ranking = layer.cache.scratch(self)["ranking"]
        scores = ranking.gather(1, layer.positions.clamp_min(0).flatten(1)).view_as(layer.positions)
        return protect_recent(scores, layer.positions, self.recent(layer.budget))
