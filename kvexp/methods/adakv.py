from dataclasses import dataclass

import torch

from kvexp.engine import Selection
from kvexp.methods.base import register
from kvexp.methods.scorer_wrapper import ScorerWrapper


def adaptive_counts(scores: torch.Tensor, target: int | torch.Tensor, floor_alpha: float) -> torch.Tensor:
    """Ada-KV's live entries per head for one layer (docs/methods.md#adakv): scores [B, Hkv, n] -> [B, Hkv];
    `target` per head, or per row [B, 1].

    `+inf` scores are protected (SnapKV's window: kept on top, as the reference adds the window to every head),
    `-inf` are dead slots. Head h has `b_h = target - protected_h` free entries and a floor `int(b_h alpha)`.
    First `c_h` = head h's entries among the global top `sum_h b_h` of the layer's other live scores;
    then `n_h = round(c_h (1 - alpha) + floor_h)`, capped at the head's live entries. Rounding and the cap
    leave the layer a few tokens off its total (`Hkv * target`, or every live entry if fewer): kvexp settles the
    difference on the same global ranking (the best entries left out join, the worst kept above a floor
    leave), so the layer's live total is exact while heads differ.
    """
    candidate = scores.isfinite()
    protected = scores.isposinf().sum(-1)
    live = candidate.sum(-1)
    free = (target - protected).clamp_min(0)  # b_h
    floor = torch.minimum((free.double() * floor_alpha).long(), live)  # fp64: int(b alpha) as the reference
    ranked = scores.masked_fill(~candidate, float("-inf")).sort(dim=-1, descending=True).values  # best first
    total = torch.minimum(free.sum(-1), live.sum(-1))  # [B]
    chosen = _global_count(ranked, total)
    counts = torch.minimum((chosen.double() * (1 - floor_alpha) + floor).round().long(), live)
    rank = torch.arange(ranked.shape[-1], device=scores.device)
    excess = counts.sum(-1) - total
    joining = ranked.masked_fill(rank < counts[..., None], float("-inf"))
    counts = counts + _global_count(joining, (-excess).clamp_min(0))
    above_floor = (rank >= floor[..., None]) & (rank < counts[..., None])
    leaving = ranked.masked_fill(~above_floor, float("inf"))
    counts = counts - _global_count(leaving, excess.clamp_min(0), largest=False)
    return protected + counts


def _global_count(values: torch.Tensor, k: torch.Tensor, largest: bool = True) -> torch.Tensor:
    """[B, H]: how many of each head's entries are among row b's `k[b]` largest (or smallest) over all heads."""
    batch, heads, n = values.shape
    counts = torch.zeros(batch, heads, dtype=torch.long, device=values.device)
    most = int(k.max())
    if most == 0:
        return counts
    picked = values.reshape(batch, heads * n).topk(most, dim=-1, largest=largest).indices  # [B, most]
    taken = torch.arange(most, device=values.device)[None, :] < k[:, None]
    return counts.scatter_add_(1, picked // n, taken.long())


@register
@dataclass
class AdaKV(ScorerWrapper):
    """Ada-KV (Feng et al., arXiv 2407.11550, 2024): head-wise adaptive budgets around any scorer.

    A layer's budget `Hkv * budget` is split over its KV heads by a global top-k over all heads' scores with a
    per-head floor (`floor_alpha`, `adaptive_counts`): concentrated heads give entries to dispersed ones.
    Everything else is the `scorer`'s (a registered method built with `scorer_params`): scores, observation,
    state and layer budgets (`scorer=pyramidkv` is the reference's Ada-PyramidKV). The default scorer,
    SnapKV at its defaults (w=32, k=7, maxpool, mean over the GQA group), is the reference's `pred.py`
    setting. Scores are per KV head, i.e. the reference's GQA mode (`gqa_support=True`), not its per-query-head
    cache. Real memory: a layer is as long as its longest head, shorter heads hold dead slots. Explicit
    per-head budgets (`budget.per_head`) take precedence over the dynamic split.
    """

    name = "adakv"
    description = "head-wise budgets: global top-k over a layer's heads with a floor (Feng et al. 2024)"
    floor_alpha: float = 0.2

    def validate(self, budget: int | None) -> None:
        if not 0.0 <= self.floor_alpha <= 1.0:
            raise ValueError(f"method.floor_alpha must be in [0, 1], got {self.floor_alpha}")
        super().validate(budget)

    @property
    def row_budgets(self) -> bool:  # the split reads each row's own budget (head_counts' target)
        return self._scorer.row_budgets

    def head_counts(self, layer, scores: torch.Tensor, target: int | torch.Tensor) -> torch.Tensor | None:
        if layer.head_budgets is not None:
            return None
        return adaptive_counts(scores, target, self.floor_alpha)

    def score(self, layer) -> torch.Tensor | Selection:
        return self._scorer.score(layer)
