from dataclasses import dataclass, field

import torch

from kvexp.methods.base import Method, register, skip_layers


@register
@dataclass
class Knorm(Method):
    """KnormPress / l2compress (Devoto et al., EMNLP 2024, arXiv 2406.11430): keep the keys with the lowest L2 norm.

    Score `-||k||_2` per KV head (RoPE preserves norms). Two budget modes:
    * token budget (default, `keep_ratio: null`): whenever a layer exceeds the budget, keep the `budget`
      lowest-norm keys;
    * the kvcompress study's `l2_compress` (`keep_ratio` set): whenever a layer exceeds `prune_after` entries, keep
      `int(keep_ratio * length)` of them (the cache budget is then `prune_after`).
    `skip_layers` stay uncompressed (the paper skips layers 0 and 1, where the norm-attention link is weak).
    """

    name = "knorm"
    description = "keep the keys with the lowest L2 norm (Devoto et al. 2024)"
    keep_ratio: float | None = None
    prune_after: int = 2048
    skip_layers: list[int] = field(default_factory=list)

    row_budgets = True  # with a token budget its scores never read it

    def __post_init__(self) -> None:
        self.row_budgets = (
            self.keep_ratio is None
        )  # l2_compress keeps a share of the length, not of a row budget

    def validate(self, budget: int | None) -> None:
        if self.keep_ratio is not None and not 0.0 < self.keep_ratio < 1.0:
            raise ValueError(f"method.keep_ratio must be in (0, 1) or null, got {self.keep_ratio}")
        if self.prune_after < 1:
            raise ValueError(f"method.prune_after must be >= 1, got {self.prune_after}")

    def layer_budgets(self, budgets: list[int | None]) -> list[int | None]:
        budgets = [self.prune_after if self.keep_ratio is not None else b for b in budgets]
        return skip_layers(budgets, self.skip_layers, self.name)

    def target_size(self, layer) -> int:
        if self.keep_ratio is None:
            return layer.budget
        return max(1, int(layer.length * self.keep_ratio))

    def score(self, layer) -> torch.Tensor:
        return -layer.keys.float().norm(dim=-1)
