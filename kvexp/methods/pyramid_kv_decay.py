from dataclasses import dataclass

import torch

from kvexp.methods.base import Method, register
from kvexp.methods.scoring import lowest_key_norm

MAX_SINKS = 4  # the study's sinks: min(4, size // 8)


@register
@dataclass
class PyramidKVDecay(Method):
    """The kvcompress study's `pyramid_kv_compress` (exponential profile): per-layer budgets decaying with depth, L2 inside.

    Layer i keeps `max(int(budget * layer_decay ** i), min_size)` entries per KV head: the cache budget is the
    study's `base_size` (layer 0), deeper layers keep fewer (PyramidKV's funnel, Cai et al. 2024, with the
    study's geometric schedule instead of PyramidKV's linear one and no attention). Inside a layer of size s,
    as in the study: the first `min(4, s // 8)` tokens, the newest `s // 2` and the lowest key L2 norms for the
    rest, per KV head from its keys (GQA-native). Deviations: only the study's default `exponential` profile
    (not its `linear` / `constant` ones, nor `skip_layers`); `min_size` may not exceed the budget.
    """

    name = "pyramid_kv_decay"
    description = (
        "layer budgets budget x layer_decay^i; sinks + recent + lowest key norms (the kvcompress study)"
    )
    layer_decay: float = 0.9
    min_size: int = 64

    def validate(self, budget: int | None) -> None:
        if not 0.0 < self.layer_decay <= 1.0:
            raise ValueError(f"method.layer_decay must be in (0, 1], got {self.layer_decay}")
        if self.min_size < 1:
            raise ValueError(f"method.min_size must be >= 1, got {self.min_size}")
        if budget is not None and self.min_size > budget:
            raise ValueError(f"method.min_size ({self.min_size}) must not exceed the budget ({budget})")

    def layer_budget(self, layer_idx: int, budget: int | None) -> int | None:
        if budget is None:
            return None
        return max(int(budget * self.layer_decay**layer_idx), self.min_size)

    def score(self, layer) -> torch.Tensor:
        size = layer.budget
        return lowest_key_norm(layer, sinks=min(MAX_SINKS, size // 8), recent=size // 2)
