from dataclasses import dataclass

import torch

from kvexp.methods.base import Method, register
from kvexp.methods.scoring import GQA_REDUCTIONS, accumulate_attention, protect_recent


@register
@dataclass
class H2O(Method):
    """H2O (Zhang et al., NeurIPS 2023, arXiv 2306.14048): heavy hitters by accumulated attention + recent window.

    Every step adds the attention each cached key receives from the step's queries (a prefill adds the
    full prompt's column sums, block-accumulated) to its score; when a layer is over budget it keeps the
    `recent` most recent tokens plus the top accumulated scores among the rest. Evicted keys' scores go with
    them. GQA: the per-query-head attention is reduced over the group (`gqa`, mean by default) to one score
    per KV head (the original is MHA-only, per head). The budget split follows the H2O study's heavy/recent
    ratios: `recent_ratio` of the budget is the recent window (0.2 = its 80/20), or `recent_size` tokens.
    """

    name = "h2o"
    description = "heavy hitters by accumulated attention + recent window (Zhang et al. 2023)"
    observes = True
    state_names = ("acc",)
    recent_ratio: float = 0.5
    recent_size: int | None = None
    gqa: str = "mean"

    def validate(self, budget: int | None) -> None:
        if not 0.0 <= self.recent_ratio <= 1.0:
            raise ValueError(f"method.recent_ratio must be in [0, 1], got {self.recent_ratio}")
        if self.recent_size is not None and budget is not None and not 0 <= self.recent_size <= budget:
            raise ValueError(f"method.recent_size must be in [0, budget={budget}], got {self.recent_size}")
        if self.gqa not in GQA_REDUCTIONS:
            raise ValueError(f"method.gqa must be one of {GQA_REDUCTIONS}, got {self.gqa!r}")

    def recent(self, budget: int) -> int:
        return self.recent_size if self.recent_size is not None else int(budget * self.recent_ratio)

    def observe(self, layer, query: torch.Tensor) -> None:
        accumulate_attention(layer, query, "acc", self.gqa)

    def score(self, layer) -> torch.Tensor:
        return protect_recent(layer.state("acc"), layer.positions, layer.seen, self.recent(layer.budget))
