from dataclasses import dataclass

import torch

from kvexp.methods.base import Method, check_window, register
from kvexp.methods.scoring import lowest_key_norm, protect_recent, temporal_pool


@register
@dataclass
class SnapKVLite(Method):
    """The kvcompress study's `snapkv_lite_compress`: inverted key L2 norm, average-pooled over neighbours, window kept.

    An approximation of SnapKV (Li et al. 2024, `snapkv`) that needs no attention: instead of the observation
    window's attention votes, each key's importance is its inverted L2 norm (`-||k||`, per KV head from its
    keys, GQA-native), average-pooled over `kernel_size` temporal neighbours as SnapKV pools its votes; the
    last `window_size` tokens (the observation window) are always kept and the rest of the budget goes to the
    best pooled scores. Deviations: pooling runs over every cached token in temporal order, window included,
    and averages over the real neighbours at the edges (the study pools the prefix only, zero-padded, so its
    first and last prefix tokens lose score); the study's `observation_window` / `pooling_kernel` are named
    `window_size` / `kernel_size` as in `snapkv`.
    """

    name = "snapkv_lite"
    description = "pooled inverted key norm + kept window, L2 stand-in for SnapKV (the kvcompress study)"
    row_budgets = True  # its scores never read the budget
    window_size: int = 32
    kernel_size: int = 5

    def validate(self, budget: int | None) -> None:
        check_window("window_size", self.window_size, budget)
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ValueError(f"method.kernel_size must be odd and >= 1, got {self.kernel_size}")

    def score(self, layer) -> torch.Tensor:
        live = layer.live() if layer.has_bias else None
        pooled = temporal_pool(lowest_key_norm(layer), layer.positions, self.kernel_size, "avgpool", live)
        return protect_recent(pooled, layer.positions, self.window_size)
