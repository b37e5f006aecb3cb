from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from kvexp.methods.adakv import adaptive_counts
from kvexp.methods.base import register
from kvexp.methods.criticalkv import CriticalKV, two_stage_scores

if TYPE_CHECKING:
    from kvexp.engine.cache import CompressedLayer


@register
@dataclass
class CriticalAdaKV(CriticalKV):
    """CriticalAdaKV (Feng, Lv, Cao, Xie, Zhou, arXiv 2502.03805, 2025; kvpress's CriticalAdaKVPress):
    CriticalKV's two stages inside Ada-KV's head-wise budgets.

    Each compression first splits the layer's budget over its KV heads from the BASE scores, with Ada-KV's
    global top-k and floor (`floor_alpha`: kvexp's `adakv` split, `adaptive_counts`); then each head runs
    CriticalKV's selection with its own budget b_h: its `int(b_h * first_stage_ratio)` best entries by the
    base scores, the rest by `(score + epsilon) * ||v_j W_o^h||_1`. Defaults are the paper's (floor_alpha 0.2
    = kvpress's alpha_safeguard, first_stage_ratio 0.5, epsilon 1e-4). A layer is as long as its longest head
    (the others hold dead slots); explicit per-head budgets (`budget.per_head`) replace the split.
    `method=adakv method.scorer=criticalkv` differs: there the heads' budgets follow the refined scores.
    """

    name = "criticaladakv"
    description = "CriticalKV's two stages inside Ada-KV's head-wise budgets (Feng et al. 2025)"
    floor_alpha: float = 0.2

    def validate(self, budget: int | None) -> None:
        if not 0.0 <= self.floor_alpha <= 1.0:
            raise ValueError(f"method.floor_alpha must be in [0, 1], got {self.floor_alpha}")
        super().validate(budget)

    def score(self, layer: CompressedLayer) -> torch.Tensor:
        if layer.head_budgets is not None:
            return super().score(layer)
        base = self.base_scores(layer)
        counts = adaptive_counts(base, layer.row_targets(self.target_size(layer)), self.floor_alpha)
        # this compression's head budgets, read by head_counts right after
        layer.scratch(self)["counts"] = counts
        return two_stage_scores(
            layer, base, self.value_norms(layer), counts, self.first_stage_ratio, self.epsilon
        )

    def head_counts(
        self, layer: CompressedLayer, scores: torch.Tensor, target: int | torch.Tensor
    ) -> torch.Tensor | None:
        if layer.head_budgets is not None:
            return None
        return layer.scratch(self).pop("counts")
