"""The `merging` method (kvpress MergingPress) around any scoring method. Its module is not `merging.py`: that name
holds the shared merge math (`fold`, `most_similar`) that this method, like every merging method, uses."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from kvexp.methods.base import register
from kvexp.methods.merging import fold, most_similar, reject_rerotate
from kvexp.methods.scorer_wrapper import ScorerWrapper

if TYPE_CHECKING:
    from kvexp.engine.cache import CompressedLayer, Selection

VARIANTS = ("calibrated", "kvpress")
_EPS = 1e-6  # kvpress's epsilon in the value-norm ratio


def merge_share(
    similarity: torch.Tensor, mergeable: torch.Tensor, evicted: torch.Tensor, fraction: float
) -> torch.Tensor:
    """Which `mergeable` evicted slots are among each head's `fraction` most similar evicted ones ([B, Hkv, n] bool):
    of a head's m evicted entries the top m - ceil((1 - fraction)(m - 1)) by similarity (the ones that do not
    pass the threshold rank last), the entries kvpress's linear quantile at 1 - fraction keeps when similarities
    do not tie."""
    m = evicted.sum(dim=-1, keepdim=True)  # [B, Hkv, 1]
    count = m - torch.ceil((1.0 - fraction) * (m - 1).clamp_min(0).double()).long()
    ranked = similarity.masked_fill(~mergeable, float("-inf"))
    order = ranked.argsort(dim=-1, descending=True, stable=True)
    index = torch.arange(ranked.shape[-1], device=ranked.device).expand_as(order)
    rank = torch.empty_like(order).scatter_(-1, order, index)
    return mergeable & (rank < count)


@register
@dataclass
class Merging(ScorerWrapper):
    """MergingPress (kvpress; inspired by Token Merging, Bolya et al., ICLR 2023, arXiv 2210.09461, and D2O, Wan et
    al., arXiv 2406.13035): around any eviction method, each evicted entry is folded into the kept entry of its KV
    head whose key is most cosine-similar, instead of being dropped.

    The `scorer` (a registered method that compresses and does not merge, built with `scorer_params`) does
    everything but the merge: it observes, keeps its state, sets the layer and per-head budgets and chooses which
    entries stay (its scores, the engine's top-k). Then each evicted entry goes to the kept entry of its head with
    the highest key cosine similarity if that similarity is >= `similarity_threshold`, and (`merge_fraction` < 1)
    only the `merge_fraction` most similar of the evicted entries merge (`merge_share`); the others are dropped.

    `variant=calibrated` (default): kvexp's merging rule (docs/methods.md#merging-rule, `merging.fold`): a kept
    entry and the n entries folded into it become one entry with the count-weighted mean key, the count-weighted
    mean value and the logit bias ln of the tokens it stands for (log-sum-exp of the members' biases), so it
    carries the group's attention mass for every query (exactly when the keys are identical; to first order
    otherwise). Merged keys mix rotations: `engine.positions=rerotate` is refused.
    `variant=kvpress`: MergingPress's own blend: keys and biases stay as they are and the kept value becomes
    (v_t + sum_i w_i v_i) / (1 + sum_i w_i), w_i = max(cos_i, 0) |v_i| / (|v_i| + |v_t| + 1e-6) (|v_t| the kept
    value's norm before the merge). The kept entry keeps the softmax weight of one token, so the group's mass is
    not preserved: its value moves towards the evicted ones while its weight stays that of one entry.

    Defaults are kvpress's (threshold 0, fraction 1; KnormPress as in its tests and `merging_knorm`). Deviations:
    kvpress merges after a prompt's one compression; here every compression merges (chunks, decoding);
    `merge_fraction` takes the quantile's count per head (kvpress's `torch.quantile` threshold, which gives no
    count when it lands among the entries that fail the similarity threshold).
    """

    name = "merging"
    description = (
        "evicted entries folded into their most similar kept key, mass-preserving (kvpress MergingPress)"
    )
    merges = True
    scorer: str = "knorm"
    variant: str = "calibrated"
    similarity_threshold: float = 0.0
    merge_fraction: float = 1.0

    def validate(self, budget: int | None) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"method.variant must be one of {VARIANTS}, got {self.variant!r}")
        if not -1.0 <= self.similarity_threshold <= 1.0:
            raise ValueError(
                f"method.similarity_threshold must be a cosine in [-1, 1], got {self.similarity_threshold}"
            )
        if not 0.0 < self.merge_fraction <= 1.0:
            raise ValueError(f"method.merge_fraction must be in (0, 1], got {self.merge_fraction}")
        super().validate(budget)

    @property
    def row_budgets(self) -> bool:  # the merge folds into the survivors the engine chose
        return self._scorer.row_budgets

    def head_counts(
        self, layer: CompressedLayer, scores: torch.Tensor, target: int | torch.Tensor
    ) -> torch.Tensor | None:
        return self._scorer.head_counts(layer, scores, target)

    def score(self, layer: CompressedLayer) -> torch.Tensor:
        if self.variant == "calibrated":
            reject_rerotate(layer, self.name)
        return self.base_scores(layer)

    def merge(
        self, layer: CompressedLayer, kept: torch.Tensor, evicted: torch.Tensor, selection: Selection
    ) -> None:
        similarity, nearest = most_similar(layer.keys, evicted, kept)
        mergeable = similarity >= self.similarity_threshold  # -inf (not evicted, or no kept entry) fails
        if self.merge_fraction < 1.0:
            mergeable = merge_share(similarity, mergeable, evicted, self.merge_fraction)
        slots = torch.arange(layer.length, device=layer.device).expand_as(nearest)
        target = torch.where(kept, slots, torch.where(mergeable, nearest, -1))
        if self.variant == "calibrated":
            fold(layer, target)
        else:
            with torch.no_grad():  # weights are constants of the merge, as its choice of members
                norms = layer.values.float().norm(dim=-1)
                target_norm = norms.gather(-1, nearest.clamp_min(0))
                share = similarity.clamp_min(0.0) * norms / (norms + target_norm + _EPS)
                weight = torch.where(kept, 1.0, torch.where(mergeable, share, 0.0))
            fold(layer, target, value_weight=weight, key_weight=kept.float(), calibrate=False)
        scratch = layer.scratch(self)
        scratch["merged"] = scratch.get("merged", 0) + mergeable.sum()
        scratch["dropped"] = scratch.get("dropped", 0) + (evicted & ~mergeable).sum()

    def statistics(self, layers: list[CompressedLayer]) -> dict[str, Any]:
        counts = {"merged": 0, "dropped": 0}
        for layer in layers:
            scratch = layer.scratch(self)
            for key in counts:
                counts[key] += int(scratch.get(key, 0))
        return {**self._scorer.statistics(layers), **counts}
