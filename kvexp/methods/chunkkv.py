from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from kvexp.engine.cache import ranking_keys
from kvexp.methods.base import register
from kvexp.methods.scorer_wrapper import ScorerWrapper
from kvexp.methods.scoring import head_caps

if TYPE_CHECKING:
    from kvexp.engine.cache import CompressedLayer

_AFTER_ALL = torch.iinfo(torch.long).max  # sorts after every real position


def chunk_selection(
    base: torch.Tensor, positions: torch.Tensor, caps: torch.Tensor, chunk_length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """ChunkKV's choice from base scores [B, Hkv, n] (dead slots -inf, protected entries +inf): (scores [B,
    Hkv, n], live counts [B, Hkv]) such that each head's top `count` by (score, position) is its protected
    entries plus its `(cap - protected) // chunk_length` best chunks, whole.

    A head's other live entries, in temporal order (by position), form chunks of `chunk_length` (the newest
    one partial if they do not divide); a chunk scores the sum of its entries' base scores and every entry
    takes its chunk's score. Equal chunk scores rank the newer chunk first, as the engine ranks equal entry
    scores."""
    live = base > float("-inf")
    protected = base.isposinf()
    candidate = live & ~protected
    n = base.shape[-1]
    # candidates oldest first, the rest after
    order = positions.masked_fill(~candidate, _AFTER_ALL).argsort(dim=-1)
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(n, device=base.device).expand_as(order))
    chunk = rank // chunk_length  # [B, Hkv, n]: candidates' chunk index (others point past the last chunk)
    n_chunks = -(-n // chunk_length)
    chunk = chunk.clamp_max(n_chunks - 1)
    zeros = base.new_zeros(*base.shape[:2], n_chunks)
    sums = zeros.scatter_add(-1, chunk, base.masked_fill(~candidate, 0.0))
    sizes = zeros.scatter_add(-1, chunk, candidate.float()).long()
    index = torch.arange(n_chunks, device=base.device).expand_as(sums)
    sums = sums.masked_fill(sizes == 0, float("-inf"))
    chunk_rank = ranking_keys(sums, index).argsort(dim=-1, descending=True).argsort(dim=-1)  # 0: best chunk
    kept_protected = protected.sum(dim=-1)
    k = (caps - kept_protected).clamp_min(0) // chunk_length
    chosen = (chunk_rank < k[..., None]) & (sums > float("-inf"))
    counts = torch.minimum(kept_protected + (sizes * chosen).sum(dim=-1), caps)
    scores = torch.where(candidate, sums.gather(-1, chunk), base)  # protected +inf and dead -inf stay
    return scores, counts


@register
@dataclass
class ChunkKV(ScorerWrapper):
    """ChunkKV (Liu, Tang, Dong, Li, Liu, Li, Hu, Chu, NeurIPS 2025, arXiv 2502.00299): whole chunks of
    consecutive tokens kept, chosen by their summed scores, with layer-wise index reuse.

    At each compression, per KV head: the entries the `scorer` protects (+inf: SnapKV's observation window)
    stay; the other live entries, in temporal order, are grouped into chunks of `chunk_length`; a chunk scores
    the sum of its entries' base scores (the paper's Algorithm 1: the observation window's attention summed
    over the chunk, i.e. SnapKV with `kernel_size: 1`, no pooling, by default); the head keeps its best
    `(budget - window) // chunk_length` chunks whole. The remainder of the budget that is not a whole chunk
    stays unused (the paper's `k = floor((L_max - w) / c)`; kvpress's ChunkKVPress keeps `int(chunks * (1 -
    ratio))` chunks, rounding down as well), so a layer holds at most its budget, usually a few entries less;
    the newest chunk may be partial and is kept whole when chosen. Layer-wise index reuse (the paper's
    Algorithm 2): the compressing layers are grouped `reuse_layers` at a time in order; the first of a group
    selects, the others keep exactly the positions it kept (their own scorer is not run), which they can
    whenever they hold the same entries (same budgets, per-head budgets included); otherwise a layer selects
    by itself. Defaults: chunk_length 10 (the paper's; kvpress: 20), reuse_layers 1 (every layer selects: the
    paper's main results; reuse is its efficiency option). Per KV head; kvpress sums the chunk scores over the
    heads (one selection per layer) and keeps no separate window. Deviation: compressions repeat whenever a
    layer exceeds its budget (decoding too), each regrouping the live entries into chunks; the paper
    compresses the prompt once (`engine.when=prefill`).
    """

    name = "chunkkv"
    description = (
        "whole chunks of consecutive tokens by summed scores, layer-wise index reuse (Liu et al. 2025)"
    )
    scorer_params: dict[str, Any] = field(default_factory=lambda: {"kernel_size": 1})
    chunk_length: int = 10
    reuse_layers: int = 1

    @property
    def row_budgets(self) -> bool:  # the chunks fill each row's own budget (`head_caps`)
        return self._scorer.row_budgets

    def validate(self, budget: int | None) -> None:
        if self.chunk_length < 1:
            raise ValueError(f"method.chunk_length must be >= 1, got {self.chunk_length}")
        if budget is not None and self.chunk_length > budget:
            raise ValueError(
                f"method.chunk_length ({self.chunk_length}) must not exceed the budget ({budget})"
            )
        if self.reuse_layers < 1:
            raise ValueError(
                f"method.reuse_layers must be >= 1 (1: every layer selects), got {self.reuse_layers}"
            )
        super().validate(budget)

    def _leader(self, layer: CompressedLayer) -> int:
        """The layer whose kept positions this one reuses (itself when it selects)."""
        compressing = [other.layer_idx for other in layer.cache.layers if other.budget is not None]
        ordinal = compressing.index(layer.layer_idx)
        return compressing[ordinal - ordinal % self.reuse_layers]

    def score(self, layer: CompressedLayer) -> torch.Tensor:
        # leader layer -> what it kept at its compression
        kept = layer.cache.scratch(self).setdefault("kept", {})
        leader = self._leader(layer) if self.reuse_layers > 1 else layer.layer_idx
        if leader != layer.layer_idx:
            reused = self._reuse(layer, kept.get(leader))
            if reused is not None:
                scores, layer.scratch(self)["counts"] = reused
                return scores
        caps = head_caps(layer, self.target_size(layer))
        scores, counts = chunk_selection(self.base_scores(layer), layer.positions, caps, self.chunk_length)
        layer.scratch(self)["counts"] = counts
        if leader == layer.layer_idx and self.reuse_layers > 1:
            kept[leader] = self._record(layer, scores, counts)
        return scores

    def head_counts(self, layer: CompressedLayer, scores: torch.Tensor, target: int) -> torch.Tensor | None:
        return layer.scratch(self).pop("counts")

    @staticmethod
    def _record(layer: CompressedLayer, scores: torch.Tensor, counts: torch.Tensor) -> dict[str, Any]:
        """What a leader keeps at this compression, as the engine will choose it: each head's top `count` by
        (score, position); its positions sorted ([B, Hkv, max count], padded above every position). A batch row
        within its budget: the engine spares it in the leader and in the layers that reuse these counts alike."""
        rank = ranking_keys(scores, layer.positions).argsort(dim=-1, descending=True).argsort(dim=-1)
        stays = rank < counts[..., None]
        positions = (
            layer.positions.masked_fill(~stays, _AFTER_ALL).sort(dim=-1).values[..., : int(counts.max())]
        )
        return {
            "seen": layer.seen,
            "budget": layer.budget,
            "head_budgets": layer.head_budgets,
            "row_budgets": None if layer.row_budgets is None else layer.row_budgets.tolist(),
            "positions": positions.contiguous(),
            "counts": counts,
        }

    @staticmethod
    def _reuse(
        layer: CompressedLayer, record: dict[str, Any] | None
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(scores, counts) that keep exactly the leader's positions, if this layer holds them all at this
        step with the leader's budgets; None otherwise (the layer selects by itself)."""
        if (
            record is None
            or record["seen"] != layer.seen
            or record["budget"] != layer.budget
            or record["head_budgets"] != layer.head_budgets
            or record["row_budgets"] != (None if layer.row_budgets is None else layer.row_budgets.tolist())
            or record["counts"].shape != (layer.batch, layer.kv_heads)
        ):
            return None
        kept = record["positions"]
        positions = layer.positions.contiguous()
        if kept.shape[-1] == 0:
            found = torch.zeros_like(positions, dtype=torch.bool)
        else:
            index = torch.searchsorted(kept, positions).clamp_max(kept.shape[-1] - 1)
            found = (kept.gather(-1, index) == positions) & layer.live()
        if not torch.equal(found.sum(dim=-1), record["counts"]):
            return None
        return found.float(), record["counts"]
