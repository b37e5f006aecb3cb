from dataclasses import dataclass

import torch

from kvexp.methods.base import Method, register
from kvexp.methods.scoring import lowest_key_norm

LONG_SINKS = 4  # the study's fixed start_size past the hard limit
PROGRESSIVE_RECENT = 0.2  # the study protects the newest 20% of what it keeps below the hard limit


@register
@dataclass
class AdaptiveL2(Method):
    """The kvcompress study's `adaptive_l2_compress`: the kept size depends on the sequence length, lowest key L2 norms kept.

    The study compresses a cache of length L: not at all up to `soft_limit`; for soft < L <= hard to
    `max(int(L * r), soft)` with r falling linearly from `keep_ratio_max` (at soft) to `keep_ratio_min` (at
    hard), protecting the newest 20% and keeping the lowest key norms for the rest; past `hard_limit` to
    `target_size`: 4 sinks + the newest half + the lowest norms in the middle. Mapping onto the engine: the
    budget is the study's `target_size`, the most a layer holds after any step (with the study's defaults its
    progressive sizes stay below it; they are capped at it anyway); `soft_limit = int(soft_ratio * budget)`,
    `hard_limit = int(hard_ratio * budget)` (0.5 and 2.0: the study's 256 and 1024 for 512), and L is the
    logical sequence length seen (the study's cache length, equal to it when the study compresses a prompt once),
    each batch row's own (its padding not counted), so a left-padded batch keeps what each row keeps alone.
    Whenever a layer exceeds its budget (the engine's trigger) it keeps the study's size for L: a sawtooth
    below the budget while soft < L <= hard, the full budget past hard. Per KV head from its keys
    (GQA-native). Deviations: the budget cannot be the study's hard limit, since then nothing would be
    compressed before L > hard and the progressive regime could never run; the study compresses at every step
    above soft (so its streaming cache sits at soft, its "~256" for target 512), kvexp only over budget.
    """

    name = "adaptive_l2"
    row_budgets = True  # each row plans from its own budget and tokens seen
    description = (
        "kept size shrinks progressively with sequence length, lowest key norms kept (the kvcompress study)"
    )
    soft_ratio: float = 0.5
    hard_ratio: float = 2.0
    keep_ratio_min: float = 0.3
    keep_ratio_max: float = 0.9

    def validate(self, budget: int | None) -> None:
        # A sequence that fits the budget is never compressed, so the soft limit must lie below the budget.
        if not 0.0 <= self.soft_ratio < 1.0:
            raise ValueError(f"method.soft_ratio must be in [0, 1), got {self.soft_ratio}")
        if self.hard_ratio <= self.soft_ratio:
            raise ValueError(
                f"method.hard_ratio ({self.hard_ratio}) must be larger than method.soft_ratio ({self.soft_ratio})"
            )
        if not 0.0 < self.keep_ratio_min <= self.keep_ratio_max <= 1.0:
            raise ValueError(
                "method.keep_ratio_min and method.keep_ratio_max must satisfy 0 < min <= max <= 1, got "
                f"{self.keep_ratio_min} and {self.keep_ratio_max}"
            )

    def plan(self, budget: int, seen: int) -> tuple[int, int, int]:
        """(entries kept, sinks, recent tokens protected) at a compression of a row that has seen `seen` tokens."""
        soft, hard = int(self.soft_ratio * budget), int(self.hard_ratio * budget)
        if seen > hard:
            recent = budget // 2
            if budget - recent > LONG_SINKS:
                return budget, LONG_SINKS, recent
            return budget, 0, budget  # the study's fallback when no middle part fits: the newest tokens only
        if seen <= budget:  # a row within its budget is not compressed (the engine spares it)
            return seen, 0, 0
        progress = (seen - soft) / (hard - soft)
        ratio = self.keep_ratio_max - progress * (self.keep_ratio_max - self.keep_ratio_min)
        keep = min(max(int(seen * ratio), soft, 1), budget)
        return keep, 0, int(keep * PROGRESSIVE_RECENT)

    def row_plans(self, layer) -> torch.Tensor:
        """[B, 3] long: each row's plan from its own tokens seen (a left-padded row's padding not counted) and its
        own budget (per-row budgets: a `keep_ratio` of prompts of different lengths)."""
        seen = layer.rows_seen().tolist()
        budgets = [layer.budget] * len(seen) if layer.row_budgets is None else layer.row_budgets.tolist()
        return torch.tensor(
            [self.plan(b, n) for b, n in zip(budgets, seen, strict=True)], device=layer.device
        )

    def target_size(self, layer) -> int:
        return int(self.row_plans(layer)[:, 0].max())

    def head_counts(self, layer, scores: torch.Tensor, target: int | torch.Tensor) -> torch.Tensor | None:
        if layer.head_budgets is not None:
            return None  # explicit per-head budgets take precedence, as for every method
        return self.row_plans(layer)[:, :1].expand(-1, layer.kv_heads)

    def score(self, layer) -> torch.Tensor:
        plans = self.row_plans(layer)[:, :, None, None]  # [B, 3, 1, 1]
        return lowest_key_norm(layer, sinks=plans[:, 1], recent=plans[:, 2])
