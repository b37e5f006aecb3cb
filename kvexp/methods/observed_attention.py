from dataclasses import dataclass

import torch

from kvexp.methods.base import Method, register
from kvexp.methods.scoring import GQA_REDUCTIONS, accumulate_attention


@register
@dataclass
class ObservedAttention(Method):
    """kvpress's ObservedAttentionPress: H2O's accumulated attention normalized by how many queries saw the key.

    Score = (attention the key received, summed over queries, mean over the GQA group) / (number of queries
    that could attend to it, i.e. tokens seen since it). The normalization removes raw H2O's bias toward old
    tokens; there is no recent window. kvpress applies it once at prefill (`engine.when=prefill`); here it
    also runs on every over-budget step, with the sums accumulated across steps.
    """

    name = "observed_attention"
    row_budgets = True  # its scores never read the budget
    description = "H2O's attention sums normalized by the queries that saw each key (kvpress)"
    observes = True
    reads_step_attention = True
    state_names = ("acc",)
    gqa: str = "mean"

    def validate(self, budget: int | None) -> None:
        if self.gqa not in GQA_REDUCTIONS:
            raise ValueError(f"method.gqa must be one of {GQA_REDUCTIONS}, got {self.gqa!r}")

    def observe(self, layer, query: torch.Tensor) -> None:
        accumulate_attention(layer, query, "acc", self.gqa)

    def score(self, layer) -> torch.Tensor:
        # Tokens seen since each key: the row's newest position (this step's token, present until the compaction)
        # + 1 - its position; per row, so a left-padded row counts its own tokens, as alone.
        seen = layer.positions.amax(dim=-1, keepdim=True) + 1
        observers = (seen - layer.positions).clamp_min(1).float()
        return layer.state("acc") / observers
