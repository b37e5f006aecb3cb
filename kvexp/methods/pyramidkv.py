from dataclasses import dataclass

from kvexp.budgets import allocate
from kvexp.methods.base import register
from kvexp.methods.snapkv import SnapKV


@register
@dataclass
class PyramidKV(SnapKV):
    """PyramidKV (Cai et al., arXiv 2406.02069, 2024): SnapKV's scores with pyramidal layer budgets.

    Attention is broad in lower layers and concentrated in higher ones, so the budget falls linearly with depth
    at the same total: KVCache-Factory's integer schedule (`kvexp.budgets`' `pyramid`: `beta`, the
    observation window on top of every layer's share, the budget including it). Inside a layer, SnapKV's
    window votes + pooling pick the tokens. Defaults are KVCache-Factory's LongBench runs (w=8, k=7, maxpool,
    beta=20; kvpress uses w=64, k=5, avgpool). Streaming has no prompt length, so the pyramid is not capped at
    it as the reference's is, and the paper's once-at-prefill compression is `engine.when=prefill`.
    The pyramid is built on each layer's own cache budget as the mean: give a uniform budget
    (`budget.allocation=uniform`, no `budget.per_layer`), or layers get rows of different pyramids.
    """

    name = "pyramidkv"
    description = "SnapKV scores, linearly decreasing layer budgets at the same total (Cai et al. 2024)"
    window_size: int = 8
    beta: float = 20

    def validate(self, budget: int | None) -> None:
        super().validate(budget)
        if self.beta < 1:
            raise ValueError(f"method.beta must be >= 1, got {self.beta}")

    def layer_budgets(self, budgets: list[int | None]) -> list[int | None]:
        n = len(budgets)
        return [
            None if b is None else allocate("pyramid", b, n, beta=self.beta, window=self.window_size)[i]
            for i, b in enumerate(budgets)
        ]
