from dataclasses import dataclass

import torch

from kvexp.methods.base import Method, register, seeded_generator


@register
@dataclass
class Random(Method):
    """Evict uniformly at random (a lower bound any informed method must beat); seeded, so runs repeat exactly."""

    name = "random"
    description = "keep a uniformly random subset (seeded lower bound)"
    batches = False  # draws one number per physical slot: a padded row's slots differ from its own run's
    seed: int = 0

    def score(self, layer) -> torch.Tensor:
        generator = seeded_generator(self, layer, self.seed)
        return torch.rand(layer.positions.shape, generator=generator, device=layer.device)
