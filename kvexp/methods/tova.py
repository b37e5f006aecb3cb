from dataclasses import dataclass

import torch

from kvexp.methods.base import Method, register
from kvexp.methods.scoring import newest_attention, protect_recent


@register
@dataclass
class TOVA(Method):
    """TOVA (Oren et al., EMNLP 2024, arXiv 2401.06104): drop the key the current query attends to least.

    Score = attention of the step's last query, averaged over all query heads of the layer, so every KV
    head keeps the same set (the reference's rule; GQA-compatible). No accumulation. The newest token is
    always kept (as kvpress's TOVAPress does).
    """

    name = "tova"
    row_budgets = True  # its scores never read the budget
    description = "keep what the current query attends to, head-averaged (Oren et al. 2024)"
    observes = True
    reads_step_attention = True
    state_names = ("last_attention",)

    def observe(self, layer, query: torch.Tensor) -> None:
        probs = newest_attention(
            layer, query
        )  # [B, Hkv, G, 1, n]: the step's last token, which sees every slot
        layer.state("last_attention").copy_(probs.mean(dim=(1, 2, 3))[:, None, :])  # the same for every head

    def score(self, layer) -> torch.Tensor:
        return protect_recent(layer.state("last_attention"), layer.positions, 1)
