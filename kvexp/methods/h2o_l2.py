from dataclasses import dataclass

import torch

from kvexp.methods.base import Method, register
from kvexp.methods.scoring import fraction, lowest_key_norm, row_budget


@register
@dataclass
class H2OL2(Method):
    """The kvcompress study's `h2o_l2_compress`: attention sinks + "heavy hitters" by lowest key L2 norm + a recent window.

    An approximation of H2O (Zhang et al. 2023, `h2o`) that needs no attention: the heavy hitters, which H2O
    finds by accumulated attention, are taken to be the keys with the lowest L2 norm (low-norm keys draw
    attention, Devoto et al. 2024), scored per KV head from its keys (GQA-native). The budget is split into
    the first `start_size` tokens, `heavy` lowest-norm tokens from the middle and the newest
    `budget - start_size - heavy` tokens. The study gives absolute sizes (4 + 64 + 444 = 512); here the heavy
    part is `heavy_ratio` of the budget (0.125: the study's 64 of 512) or `heavy_size` tokens, the recent
    window the remainder, so one setting serves every budget.
    """

    name = "h2o_l2"
    description = (
        "sinks + lowest-key-norm 'heavy hitters' + recent window, L2 stand-in for H2O (the kvcompress study)"
    )
    row_budgets = True  # its heavy part and recent window are each row's shares of its own budget
    start_size: int = 4
    heavy_ratio: float = 0.125
    heavy_size: int | None = None

    def validate(self, budget: int | None) -> None:
        if self.start_size < 0:
            raise ValueError(f"method.start_size must be >= 0, got {self.start_size}")
        if not 0.0 <= self.heavy_ratio <= 1.0:
            raise ValueError(f"method.heavy_ratio must be in [0, 1], got {self.heavy_ratio}")
        if self.heavy_size is not None and self.heavy_size < 0:
            raise ValueError(f"method.heavy_size must be >= 0 or null, got {self.heavy_size}")
        if budget is not None and self.start_size + self.heavy(budget) > budget:
            raise ValueError(
                f"method.start_size ({self.start_size}) + heavy hitters ({self.heavy(budget)}, from "
                f"method.heavy_size / method.heavy_ratio) must not exceed the budget ({budget})"
            )

    def heavy(self, budget: int | torch.Tensor) -> int | torch.Tensor:
        """The heavy-hitter part of a budget, or of each row's ([B, 1, 1], `row_budget`)."""
        return self.heavy_size if self.heavy_size is not None else fraction(budget, self.heavy_ratio)

    def score(self, layer) -> torch.Tensor:
        budget = row_budget(layer)
        recent = budget - self.start_size - self.heavy(budget)
        return lowest_key_norm(layer, sinks=self.start_size, recent=recent)
