from dataclasses import dataclass, field

import torch

from kvexp.methods.base import Method, register


@register
@dataclass
class Random(Method):
    """Evict uniformly at random (a lower bound any informed method must beat); seeded, so runs repeat exactly."""

    name = "random"
    description = "keep a uniformly random subset (seeded lower bound)"
    seed: int = 0
    _generators: dict = field(default_factory=dict, init=False, repr=False)

    def score(self, layer) -> torch.Tensor:
        if layer.device not in self._generators:
            self._generators[layer.device] = torch.Generator(device=layer.device).manual_seed(self.seed)
        return torch.rand(
            layer.positions.shape, generator=self._generators[layer.device], device=layer.device
        )
