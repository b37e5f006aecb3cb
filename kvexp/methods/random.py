from dataclasses import dataclass

import torch

from kvexp.methods.base import Method, register, slot_uniforms


@register
@dataclass
class Random(Method):
    """Evict uniformly at random (a lower bound any informed method must beat): every compression draws a fresh
    uniform score per entry and KV head (`slot_uniforms`: a hash of the seed, layer, head, the entry's position and
    the tokens its row has seen), so runs repeat exactly and a batched row or a beam draws what it draws alone."""

    name = "random"
    description = "keep a uniformly random subset (seeded lower bound)"
    row_budgets = True  # its scores never read the budget
    seed: int = 0

    def score(self, layer) -> torch.Tensor:
        return slot_uniforms(layer, self.seed)
