from dataclasses import dataclass, field

import torch

from kvexp.methods.base import Method, register, skip_layers
from kvexp.methods.random import Random
from kvexp.methods.scoring import fraction, lowest_key_norm, protect_recent, row_budget

STRATEGIES = ("keep_low", "keep_high", "random")


@register
@dataclass
class FixSizeL2(Method):
    """The kvcompress study's `fix_size_l2_compress`: a fixed-size cache, a protected recent zone, L2 eviction in the rest.

    The cache budget is the study's `fix_kv_size`. The `int(budget * recent_ratio)` most recent tokens are never
    evicted; the rest of the budget is chosen from the older eviction zone by `strategy`: `keep_low` the lowest
    key L2 norms (KnormPress's rule), `keep_high` the highest (its ablation), `random` uniformly (seeded).
    Per KV head from that head's keys (GQA-native). `skip_layers` stay uncompressed (the study's default: 0 and 1).
    Deviation: the study calls the protected fraction `keep_ratio`; here it is `recent_ratio` (as in `h2o`),
    because kvexp's `keep_ratio` means the kept fraction of the sequence (budget.keep_ratio, knorm).
    """

    name = "fix_size_l2"
    description = (
        "fixed size: protected recent zone + low/high/random key-norm eviction (the kvcompress study)"
    )
    row_budgets = True  # its recent zone is each row's share of its own budget
    recent_ratio: float = 0.0
    strategy: str = "keep_low"
    skip_layers: list[int] = field(default_factory=lambda: [0, 1])
    seed: int = 0
    _random: Random = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._random = Random(seed=self.seed)  # its seeded draws make `random` repeatable

    def validate(self, budget: int | None) -> None:
        if not 0.0 <= self.recent_ratio <= 1.0:
            raise ValueError(f"method.recent_ratio must be in [0, 1], got {self.recent_ratio}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"method.strategy must be one of {STRATEGIES}, got {self.strategy!r}")

    def layer_budgets(self, budgets: list[int | None]) -> list[int | None]:
        return skip_layers(budgets, self.skip_layers, self.name)

    def score(self, layer) -> torch.Tensor:
        recent = fraction(row_budget(layer), self.recent_ratio)
        if self.strategy == "keep_low":
            return lowest_key_norm(layer, recent=recent)
        if self.strategy == "keep_high":
            return protect_recent(layer.keys.float().norm(dim=-1), layer.positions, recent)
        return protect_recent(self._random.score(layer), layer.positions, recent)
