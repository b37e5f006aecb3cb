from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from kvexp.engine import Reallocation, Selection
from kvexp.methods.base import LayerAllocation, allocation_at_last_layer, register, skip_layers
from kvexp.methods.dynamickv import share_with_caps
from kvexp.methods.h2o import HeavyHitters
from kvexp.methods.merging import fold, most_similar, reject_rerotate
from kvexp.methods.scoring import column_sums, protect_sinks, reduce_group


def attention_variance(columns: torch.Tensor, live: torch.Tensor) -> float:
    """D2O's layer score from the attention each key received from every query so far, per query head
    (`columns` [B, Hkv, G, L], `live` [B, Hkv, L]): the variance over the live keys, averaged over the batch,
    min-max normalised across the heads, then averaged over them."""
    live = live[:, :, None, :].expand_as(columns)
    columns = columns.masked_fill(~live, float("nan"))
    count = live.sum(dim=-1).float()
    deviation = columns - columns.nanmean(dim=-1, keepdim=True)
    variance = deviation.square().nansum(dim=-1) / (count - 1).clamp_min(1)  # unbiased, as torch.var
    heads = variance.mean(dim=0).flatten()  # [H]
    normalised = (heads - heads.min()) / (heads.max() - heads.min() + 1e-6)
    return float(normalised.mean())


@register
@dataclass
class D2O(HeavyHitters):
    """D2O (Wan et al., *D2O: Dynamic Discriminative Operations for Efficient Long-Context Inference of LLMs*,
    ICLR 2025, arXiv 2406.13035; code AIoT-MLSys-Lab/D2O): H2O eviction with layer budgets from attention density,
    and evicted tokens merged into their most similar kept token instead of being discarded.

    Layer level (`layer_allocation`), once, in the first forward where a compressing layer is over budget (the
    prefill, or step budget+1 when streaming): each layer's score sigma_l comes from the variance of the attention
    its keys received from every query so far, per query head as in the reference (`attention_variance`), and the
    layers' total budget is shared in proportion to softmax_l(-sigma_l): dense, low-variance layers keep more.
    Layers compress at the end of that forward, once every layer has been scored (the reference: at the first
    decode step).
    Token level, at every compression: H2O's accumulated attention (reduced over the GQA group, `gqa`) with the
    first `sink_tokens` forced in (the code's 4) and the `recent_ratio` newest (the paper's hh 0.1 + recent 0.1
    = an even split); per KV head, each evicted token e finds its most similar kept key by cosine, u_e = that
    similarity; an EMA threshold per layer and sequence, tau = mean(u) at the first compression, then
    tau <- alpha tau + beta mean(u), decides: e is merged if u_e >= tau, else dropped. The merge is the released
    code's u-weighted scatter mean, k_c <- (k_c + sum_e u_e k_e) / (1 + n_c), likewise v_c (it shrinks norms when
    u < 1; the paper's normalised weights are not in the code); no logit bias. `skip_layers` (0, 1 and the last,
    negative indices from the end) are never compressed, as in the paper.
    Deviations: the reference is MHA, per query head; here tokens are scored, selected and merged per KV head
    with group-reduced scores (the variance stays per query head). The reference filters with u averaged over
    heads at the same rank of each head's evicted list (different tokens per head), one decision for all heads;
    here each KV head decides for its own tokens (the paper's rule). The reference clamps layer ratios to
    [0.01, 1] of the prompt without redistributing what the clamp cuts; here the total is kept exactly (at least
    one token per layer) and not capped at the current length, because a streamed sequence outgrows it.
    """

    name = "d2o"
    description = "H2O + variance-based layer budgets; evicted tokens merged by cosine above an EMA threshold (Wan et al. 2025)"
    merges = True
    allocates = True
    # Per row: the attention columns until the allocation, and the EMA threshold tau [B].
    row_scratch = ("columns", "threshold")
    row_budgets = True  # without the layer allocation (`__post_init__`): H2O's per-row recent window
    sink_tokens: int = 4
    alpha: float = 0.5
    beta: float = 0.5
    layer_allocation: bool = True
    skip_layers: list[int] = field(default_factory=lambda: [0, 1, -1])

    def __post_init__(self) -> None:
        # One layer allocation for the whole batch (pooled variances); without it each row keeps its own budget.
        self.batches = self.row_budgets = not self.layer_allocation

    def validate(self, budget: int | None) -> None:
        super().validate(budget)
        if self.sink_tokens < 0:
            raise ValueError(f"method.sink_tokens must be >= 0, got {self.sink_tokens}")
        if budget is not None and self.sink_tokens + self.recent(budget) > budget:
            raise ValueError(
                f"method.sink_tokens ({self.sink_tokens}) plus the recent window ({self.recent(budget)}) must fit "
                f"the budget ({budget})"
            )

    def layer_budgets(self, budgets: list[int | None]) -> list[int | None]:
        return super().layer_budgets(skip_layers(budgets, self.skip_layers, self.name))

    def observe(self, layer, query: torch.Tensor) -> None:
        sums = column_sums(layer, query)  # [B, Hkv, G, L]
        layer.state("acc").add_(reduce_group(sums, self.gqa))
        allocation = layer.cache.scratch(self).get("allocation")
        if not self.layer_allocation or (allocation is not None and allocation.done):
            return
        # Until its first compression a layer only appends slots, so per-query-head sums line up by slot: the
        # attention each key received [B, Hkv, G, L], kept until the allocation.
        previous = layer.scratch(self).get("columns")
        if previous is not None:
            sums = sums + F.pad(previous, (0, sums.shape[-1] - previous.shape[-1]))
        layer.scratch(self)["columns"] = sums

    def allocate(self, layer) -> Reallocation | None:
        """Defer each layer's compression in the allocating forward; at its last allocated layer, share the total
        by softmax(-sigma_l): every allocated layer gets its budget and compresses."""
        if not self.layer_allocation:
            return None
        allocation = allocation_at_last_layer(self, layer)
        if not isinstance(allocation, LayerAllocation):
            return allocation  # nothing to do, or an earlier layer deferred
        members = sorted(allocation.base)
        layers = [layer.cache.layers[i] for i in members]
        sigma = torch.tensor([attention_variance(m.scratch(self).pop("columns"), m.live()) for m in layers])
        weights = torch.softmax(-sigma, dim=0).tolist()
        total = sum(allocation.base.values())
        # One token each, then the rest in proportion (share_with_caps floors; no cap: a streamed layer grows).
        sizes = share_with_caps(total - len(members), weights, [total] * len(members))
        allocation.done = True
        return Reallocation({i: size + 1 for i, size in zip(members, sizes, strict=True)}, final=True)

    def score(self, layer) -> torch.Tensor:
        reject_rerotate(layer, self.name)
        return protect_sinks(super().score(layer), layer.positions, self.sink_tokens)

    def merge(self, layer, kept: torch.Tensor, evicted: torch.Tensor, selection: Selection) -> None:
        similarity, nearest = most_similar(layer.keys, evicted, kept)
        found = evicted & (nearest >= 0)
        if not bool(found.any()):
            return
        mean = torch.where(found, similarity, 0.0).sum(dim=(1, 2)) / found.sum(dim=(1, 2)).clamp_min(1)  # [B]
        # tau moves only in the rows that evicted something (a row within its budget in a batch does not compress
        # now, as alone); NaN: a row's first compression is still to come.
        tau = layer.scratch(self).get("threshold")
        if tau is None:
            tau = torch.full_like(mean, float("nan"))
        moved = torch.where(tau.isnan(), mean, self.alpha * tau + self.beta * mean)
        tau = torch.where(found.flatten(1).any(-1), moved, tau)
        layer.scratch(self)["threshold"] = tau
        merged = found & (similarity >= tau[:, None, None])
        # The reference's scatter mean of {k_c} and {u_e k_e}: scale the evicted rows (dropped after this merge)
        # by u, then an unweighted mean over each kept token and its members; no bias (calibrate=False).
        scale = torch.where(merged, similarity, 1.0)[..., None]
        layer.keys.mul_(scale.to(layer.keys.dtype))
        layer.values.mul_(scale.to(layer.values.dtype))
        slots = torch.arange(layer.length, device=layer.device).expand_as(nearest)
        target = torch.where(kept, slots, torch.where(merged, nearest, -1))
        ones = torch.ones_like(layer.bias)
        fold(layer, target, value_weight=ones, key_weight=ones, calibrate=False)

    def statistics(self, layers) -> dict:
        return {
            "merge_threshold_per_layer": [
                float(tau.nanmean())
                if (tau := layer.scratch(self).get("threshold")) is not None and not tau.isnan().all()
                else None
                for layer in layers
            ]
        }
