from dataclasses import dataclass

import torch

from kvexp.methods.base import Method, check_window, register
from kvexp.methods.scoring import (
    GQA_REDUCTIONS,
    POOLINGS,
    reduce_group,
    remember_queries,
    temporal_pool,
    window_attention,
)


@register
@dataclass
class SnapKV(Method):
    """SnapKV (Li et al., NeurIPS 2024, arXiv 2404.14469): observation-window voting with pooling.

    The last `window_size` queries (remembered across steps, so it works at prefill, in chunks and token by
    token: kvpress's DecodingPress buffering) vote: each key's attention from them is summed, reduced over the
    GQA group (`gqa`, before pooling as KVCache-Factory's KV-head path), pooled over temporal neighbours
    (`pooling`, `kernel_size`, padding k//2), and the window's own keys are always kept; the budget includes
    the window. Defaults are the paper's LongBench setting (w=32, k=7, maxpool). The paper compresses once
    at the end of prefill: `engine.when=prefill`. Per KV head (kvpress's layout), not per query head.
    """

    name = "snapkv"
    row_budgets = True  # its scores never read the budget
    description = "observation-window attention votes + pooling (Li et al. 2024)"
    observes = True
    window_size: int = 32
    kernel_size: int = 7
    pooling: str = "maxpool"
    gqa: str = "mean"

    def validate(self, budget: int | None) -> None:
        check_window("window_size", self.window_size, budget, minimum=1)
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ValueError(f"method.kernel_size must be odd and >= 1, got {self.kernel_size}")
        if self.pooling not in POOLINGS:
            raise ValueError(f"method.pooling must be one of {POOLINGS}, got {self.pooling!r}")
        if self.gqa not in GQA_REDUCTIONS:
            raise ValueError(f"method.gqa must be one of {GQA_REDUCTIONS}, got {self.gqa!r}")

    def observe(self, layer, query: torch.Tensor) -> None:
        remember_queries(layer, query, self.window_size)

    def score(self, layer) -> torch.Tensor:
        votes = reduce_group(window_attention(layer).sum(dim=3), self.gqa)  # [B, Hkv, n]
        live = layer.live() if layer.has_bias else None
        pooled = temporal_pool(votes, layer.positions, self.kernel_size, self.pooling, live)
        window_start = layer.query_window[1][:, :1, None]  # oldest remembered query position, [B, 1, 1]
        return pooled.masked_fill(layer.positions >= window_start, float("inf"))
