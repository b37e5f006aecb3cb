from dataclasses import dataclass

import torch

from kvexp.methods.base import Method, register


@register
@dataclass
class RecentOnly(Method):
    """A pure sliding window: keep the `budget` most recent tokens (the kvcompress study's control group; no sinks)."""

    name = "recent_only"
    description = "sliding window of the most recent tokens, no sinks (control)"

    row_budgets = True  # its scores never read the budget

    def score(self, layer) -> torch.Tensor:
        return layer.positions.float()
