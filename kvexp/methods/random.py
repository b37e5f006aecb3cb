from dataclasses import dataclass

import torch

from kvexp.methods.base import Method, register, seeded_generator


@register
@dataclass
class Random(Method):
    """Evict uniformly at random (a lower bound any informed method must beat); seeded, so runs repeat exactly."""

    name = "random"
    description = "keep a uniformly random subset (seeded lower bound)"
    seed: int = 0

    def score(self, layer) -> torch.Tensor:
        generator = seeded_generator(self, layer, self.seed)
        return torch.rand(layer.positions.shape, generator=generator, device=layer.device)
