from dataclasses import dataclass, field

import torch

from kvexp.methods.base import Method, register, skip_layers
from kvexp.methods.scoring import lowest_key_norm, row_budget

MAX_SINKS = 4  # the study's sinks: min(4, size // 8)
PROFILES = ("exponential", "linear", "constant")


@register
@dataclass
class PyramidKVDecay(Method):
    """The kvcompress study's `pyramid_kv_compress`: per-layer budgets decaying with depth, L2 inside.

    The cache budget is the study's `base_size` (layer 0); deeper layers keep fewer (PyramidKV's funnel, Cai et
    al. 2024, without attention). Layer i of L keeps, per KV head, by `profile` as in the study:
    `exponential` (default) `int(budget * layer_decay ** i)`, `linear` `int(budget - i (budget - min_size) /
    max(L - 1, 1))` (from the budget down to `min_size` at the last layer), `constant` the budget; never fewer
    than `min_size`. `skip_layers` (negative indices from the end) stay uncompressed. Inside a layer of size s,
    as in the study: the first `min(4, s // 8)` tokens, the newest `s // 2` and the lowest key L2 norms for the
    rest, per KV head from its keys (GQA-native). Deviation: `min_size` may not exceed the budget.
    """

    name = "pyramid_kv_decay"
    description = "exponential / linear / constant layer budgets; sinks + recent + lowest key norms (the kvcompress study)"
    # each row's layer budgets from its own budget; its sinks and window from its layer budget
    row_budgets = True
    layer_decay: float = 0.9
    min_size: int = 64
    profile: str = "exponential"
    skip_layers: list[int] = field(default_factory=list)

    def validate(self, budget: int | None) -> None:
        if not 0.0 < self.layer_decay <= 1.0:
            raise ValueError(f"method.layer_decay must be in (0, 1], got {self.layer_decay}")
        if self.min_size < 1:
            raise ValueError(f"method.min_size must be >= 1, got {self.min_size}")
        if self.profile not in PROFILES:
            raise ValueError(f"method.profile must be one of {PROFILES}, got {self.profile!r}")
        if budget is not None and self.min_size > budget:
            raise ValueError(f"method.min_size ({self.min_size}) must not exceed the budget ({budget})")

    def layer_budgets(self, budgets: list[int | None]) -> list[int | None]:
        last = max(len(budgets) - 1, 1)
        sizes = []
        for i, budget in enumerate(skip_layers(budgets, self.skip_layers, self.name)):
            if budget is None:
                sizes.append(None)
            elif self.profile == "exponential":
                sizes.append(max(int(budget * self.layer_decay**i), self.min_size))
            elif self.profile == "linear":
                sizes.append(max(int(budget - i * (budget - self.min_size) / last), self.min_size))
            else:
                sizes.append(budget)
        return sizes

    def score(self, layer) -> torch.Tensor:
        size = row_budget(layer)
        sinks = min(MAX_SINKS, size // 8) if isinstance(size, int) else (size // 8).clamp(max=MAX_SINKS)
        return lowest_key_norm(layer, sinks=sinks, recent=size // 2)
