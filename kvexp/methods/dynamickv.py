import math
from dataclasses import dataclass, field

import torch

from kvexp.engine import Reallocation
from kvexp.methods.base import register
from kvexp.methods.snapkv import SnapKV


def share_with_caps(total: int, weights: list[float], caps: list[int]) -> list[int]:
    """`total` split in proportion to `weights`, no share above its cap (water-filling: a capped layer's
    excess goes to the others in proportion). Shares are floored and the rounding remainder goes one token
    each to the last layers with room (the reference gives it to the last layer). Zero weight: zero share."""
    sizes = [0] * len(weights)
    open_ = [i for i, w in enumerate(weights) if w > 0 and caps[i] > 0]
    left = total
    while open_:
        mass = sum(weights[i] for i in open_)
        full = [i for i in open_ if left * weights[i] / mass >= caps[i]]
        if not full:
            break
        for i in full:
            sizes[i] = caps[i]
            left -= caps[i]
        open_ = [i for i in open_ if i not in full]
    if open_:
        mass = sum(weights[i] for i in open_)
        for i in open_:
            sizes[i] = math.floor(left * weights[i] / mass)
        remainder = left - sum(sizes[i] for i in open_)
        # Each of these has room: its share was below its cap.
        for i in reversed(open_[len(open_) - remainder :]):
            sizes[i] += 1
    return sizes


@dataclass
class _Allocation:
    """One cache's layer allocation (in its scratch), run during the first multi-token forward in which a layer
    compresses."""

    step: int  # `layer.seen` during that forward
    last: int  # the layer of the final round: the last layer with a budget
    base: dict[int, int]  # every budgeted layer's selected-token budget (budget - window)
    votes: dict[int, torch.Tensor] = field(default_factory=dict)  # participant -> candidate votes, flattened
    cap: dict[int, int] = field(default_factory=dict)  # participant -> most selected tokens it can keep now
    done: bool = False


@register
@dataclass
class DynamicKV(SnapKV):
    """DynamicKV (Zhou et al., EMNLP 2025, arXiv 2412.14838): task-aware layer budgets from the prefill's
    attention, SnapKV votes inside each layer.

    In the first multi-token forward in which layers compress (the prefill), each layer scores its tokens by
    SnapKV's window votes (`window_size`, `pooling` over `kernel_size`, `gqa` over the group) and tentatively
    keeps `T = min(ratio_max * b, candidates)` of them plus the window (`b` = budget - window). Every
    `interval` layers (layers 3, 7, ... for 4) a global top-`b * Hkv * l'` over the votes of the `l'` layers
    so far gives each the share `p_l` of the selected entries it holds, and its size becomes `p_l * b * NL`,
    capped at what it still holds (truncation keeps its top and is irreversible): intermediate rounds spread
    the whole cache's total over fewer layers and are loose, the last one enforces it. The layers' budgets
    are then rewritten to size + window, once: every later compression (decoding, streaming) keeps each layer
    at its size with SnapKV votes. With a uniform budget every layer takes part; with per-layer budgets, the
    layers that compress in that forward, each with its own `b` (the others keep their budget); layers with
    per-head budgets (`budget.per_head`) keep those. Defaults: the reference's Llama-3 script (w=8, k=7,
    avgpool, radio_max=10; m=4 is hard-coded there). GQA: votes are reduced over the group before the global
    top-k and budgets count KV heads (the reference caches per query head).
    Decided where the reference is quirky (docs/methods.md#dynamickv): a last round always runs at the last layer
    (the reference never re-budgets trailing layers when NL mod 4 != 0, exceeding the total); shares are
    water-filled under the caps (`share_with_caps`), so the layers spend exactly `b * NL` when the caps allow
    (the reference loses what its caps cut, and rounds through `int(T p_l)` and a `// l'` on the counts); a
    batch shares one allocation (the reference assumes batch 1).
    """

    name = "dynamickv"
    row_budgets = False  # its allocation pools the rows
    batches = False  # one allocation for the whole batch (the global top-k pools the rows' votes)
    description = "task-aware layer budgets: global top-k over the prefill's window votes (Zhou et al. 2025)"
    state_names = ("votes",)  # the allocating forward's votes, for truncating a layer again later in it
    allocates = True
    window_size: int = 8
    kernel_size: int = 7
    pooling: str = "avgpool"
    ratio_max: float = 10
    interval: int = 4

    def validate(self, budget: int | None) -> None:
        super().validate(budget)
        if self.ratio_max < 1:
            raise ValueError(
                f"method.ratio_max must be >= 1 (a layer can keep its own share), got {self.ratio_max}"
            )
        if self.interval < 1:
            raise ValueError(f"method.interval must be >= 1, got {self.interval}")

    def allocate(self, layer) -> Reallocation | None:
        """In the allocating forward: this layer's tentative size, and every `interval` layers a round that
        re-budgets the layers so far (the cache truncates the earlier ones)."""
        allocation = self._allocating(layer)
        if allocation is None:
            return None
        budgets = {}
        if layer.head_budgets is None and layer.over_budget():
            budgets[layer.layer_idx] = self._join(layer, allocation)
        if layer.layer_idx == allocation.last or (layer.layer_idx + 1) % self.interval == 0:
            budgets.update(self._round(layer, allocation))
        return Reallocation(budgets, final=allocation.done) if budgets or allocation.done else None

    def score(self, layer) -> torch.Tensor:
        allocation = layer.cache.scratch(self).get("allocation")
        if allocation is not None and allocation.step == layer.seen and layer.layer_idx in allocation.cap:
            return layer.state("votes")  # the prefill's votes, also when a later round truncates this layer
        return super().score(layer)

    def _allocating(self, layer):
        """The allocation this forward runs (started by its first compressing layer), or None."""
        shared = layer.cache.scratch(self)
        allocation = shared.get("allocation")
        if allocation is None and layer.new_tokens > 1 and layer.head_budgets is None and layer.over_budget():
            budgeted = [
                (i, other.budget) for i, other in enumerate(layer.cache.layers) if other.budget is not None
            ]
            allocation = _Allocation(
                step=layer.seen,
                last=budgeted[-1][0],
                base={i: budget - self.window_size for i, budget in budgeted},
            )
            shared["allocation"] = allocation
        if allocation is None or allocation.done or allocation.step != layer.seen:
            return None
        return allocation

    def _join(self, layer, allocation: _Allocation) -> int:
        """Score the layer; its tentative budget T + window (the engine compresses it right after)."""
        votes = super().score(layer)  # [B, Hkv, n], the window +inf
        layer.state("votes").copy_(votes)
        candidates = votes.masked_fill(~(layer.live() & votes.isfinite()), float("-inf"))
        allocation.votes[layer.layer_idx] = candidates.flatten()
        per_head = int(candidates.isfinite().sum(dim=-1).max())
        allocation.cap[layer.layer_idx] = min(
            int(self.ratio_max * allocation.base[layer.layer_idx]), per_head
        )
        return allocation.cap[layer.layer_idx] + self.window_size

    def _round(self, layer, allocation: _Allocation) -> dict[int, int]:
        """New budgets of the participants so far from a global top-k over their votes."""
        members, budgets = sorted(allocation.votes), {}
        if members:
            votes = torch.cat([allocation.votes[i] for i in members])
            rows = layer.batch * layer.kv_heads
            selected = min(sum(allocation.base[i] for i in members) * rows, int(votes.isfinite().sum()))
            owner = torch.repeat_interleave(
                torch.arange(len(members), device=votes.device),
                torch.tensor([allocation.votes[i].numel() for i in members], device=votes.device),
            )
            counts = torch.bincount(owner[votes.topk(selected).indices], minlength=len(members))
            # The whole cache's total (the reference's b * NL) over the layers so far: loose until the last.
            total = sum(b for i, b in allocation.base.items() if i in allocation.votes or i > layer.layer_idx)
            sizes = share_with_caps(total, counts.tolist(), [allocation.cap[i] for i in members])
            for i, size in zip(members, sizes, strict=True):
                allocation.cap[i] = size
                budgets[i] = size + self.window_size
        if layer.layer_idx == allocation.last:
            allocation.done = True
            allocation.votes.clear()
        return budgets
