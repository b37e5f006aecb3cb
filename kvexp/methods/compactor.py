from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from kvexp.methods.base import register
from kvexp.methods.leverage import approximate_leverage
from kvexp.methods.non_causal_attention import NonCausalAttention
from kvexp.methods.scoring import protect_recent, protect_sinks

if TYPE_CHECKING:
    from kvexp.engine.cache import CompressedLayer


def row_zscore(scores: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
    """Scores [B, Hkv, L] z-normalized per batch row over its live slots of every KV head (population std, floored at
    1e-6); the dead slots' values take no part (their output is meaningless)."""
    weight = live.float()
    count = weight.sum(dim=(1, 2), keepdim=True).clamp_min(1.0)
    scores = scores.masked_fill(~live, 0.0)
    mean = scores.sum(dim=(1, 2), keepdim=True) / count
    var = ((scores - mean).square() * weight).sum(dim=(1, 2), keepdim=True) / count
    return (scores - mean) / var.sqrt().clamp_min(1e-6)


def compression_ratio(layer: CompressedLayer) -> torch.Tensor:
    """[B, Hkv, 1]: the fraction of each row's tokens a head does not keep at this compression, 1 - kept / seen,
    seen = the row's newest position + 1 (its own tokens, padding not counted)."""
    seen = layer.rows_seen().float()  # [B]
    kept = layer.keep_counts().float()  # [B, Hkv]
    return (1.0 - kept / seen[:, None].clamp_min(1.0)).clamp(0.0, 1.0)[..., None]


@register
@dataclass
class Compactor(NonCausalAttention):
    """Compactor (Chari & Van Durme, *Compactor: Calibrated Query-Agnostic KV Cache Compression with Approximate
    Leverage Scores*, arXiv 2507.08143, 2025; kvpress `CompactorPress`): a blend of the keys' approximate leverage
    (geometric outliers, kvexp/methods/leverage.py) and non-causal chunked attention (kvexp/methods/
    non_causal_attention.py), both query-agnostic.

    Each score is z-normalized per batch row over the live slots of all KV heads, then
    `score = z(attention) + lambda * z(leverage)`, with `lambda = blending`, or, when `blending` is null, the
    compression ratio of this compression, `1 - kept / seen` (per row and head: the tokens it keeps over the row's
    tokens so far): the more is evicted, the more the outliers count. The first `sink_size_start` positions and the
    `sink_size_end` newest are always kept. The attention part's parameters are `non_causal_attention`'s
    (`chunk_length`, `value_norm`, `kernel_size`), the leverage part's are `leverage`'s (`sketch_dim`, `seed`).

    Sources: the paper's text was not reachable offline; the blend follows the authors' kvpress press (lambda =
    compression ratio by default, which its docstring calls a heuristic that differs from the paper's tuned
    blending) and the z-scores per sequence over all heads follow the authors' compactor-vllm engine (kvpress
    normalizes over the whole batch, which would couple the rows). Deviations: the statistics include the protected
    tokens (compactor-vllm; kvpress scores only the unprotected middle, its chunks then start at sink_size_start);
    leverage and attention deviations as in those two methods. Defaults are kvpress's (sinks 8 and 4, chunk 256,
    sketch 48; compactor-vllm protects 16 and 64, chunk 128, and blends with lambda 0.5).
    """

    name = "compactor"
    description = "z-scored non-causal attention + ratio-weighted key leverage (Chari & Van Durme 2025)"
    sketch_dim: int = 48
    seed: int = 0
    blending: float | None = None
    sink_size_start: int = 8
    sink_size_end: int = 4

    def validate(self, budget: int | None) -> None:
        super().validate(budget)
        if self.sketch_dim < 1:
            raise ValueError(f"method.sketch_dim must be >= 1, got {self.sketch_dim}")
        if self.seed < 0:
            raise ValueError(f"method.seed must be >= 0, got {self.seed}")
        if self.blending is not None and self.blending < 0:
            raise ValueError(
                f"method.blending must be >= 0 or null (the compression ratio), got {self.blending}"
            )
        if self.sink_size_start < 0 or self.sink_size_end < 0:
            raise ValueError(
                f"method.sink_size_start and method.sink_size_end must be >= 0, got "
                f"{self.sink_size_start} and {self.sink_size_end}"
            )
        if budget is not None and self.sink_size_start + self.sink_size_end >= budget:
            raise ValueError(
                f"method.sink_size_start + method.sink_size_end ({self.sink_size_start + self.sink_size_end}) must "
                f"be smaller than the budget ({budget}) so that tokens are scored"
            )

    def blend_weight(self, layer) -> torch.Tensor:
        """lambda: `blending`, or the compression ratio [B, Hkv, 1]."""
        if self.blending is not None:
            return torch.tensor(self.blending, device=layer.device)
        return compression_ratio(layer)

    def score(self, layer) -> torch.Tensor:
        live = layer.live()
        attention = row_zscore(self.attention_scores(layer), live)
        leverage = row_zscore(approximate_leverage(layer, self, self.sketch_dim, self.seed), live)
        scores = attention + self.blend_weight(layer) * leverage
        scores = protect_recent(
            protect_sinks(scores, layer.positions, self.sink_size_start), layer.positions, self.sink_size_end
        )
        return scores.masked_fill(~live, float("-inf"))
