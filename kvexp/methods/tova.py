from dataclasses import dataclass

import torch

from kvexp.methods.base import Method, register
from kvexp.methods.scoring import attention_probs, protect_recent


@register
@dataclass
class TOVA(Method):
    """TOVA (Oren et al., EMNLP 2024, arXiv 2401.06104): drop the key the current query attends to least.

    Score = attention of the step's last query, averaged over all query heads of the layer, so every KV
    head keeps the same set (the reference's rule; GQA-compatible). No accumulation. The newest token is
    always kept (as kvpress's TOVAPress does).
    """

    name = "tova"
    description = "keep what the current query attends to, head-averaged (Oren et al. 2024)"
    observes = True
    state_names = ("last_attention",)

    def observe(self, layer, query: torch.Tensor) -> None:
        if query.shape[2] > 1:
            query = query[:, :, -1:]
        # The step's last token sees every slot: no causal mask to apply.
        probs = attention_probs(layer, query, None, layer.scaling, newest=True)  # [B, Hkv, G, 1, n]
        layer.state("last_attention").copy_(probs.mean(dim=(1, 2, 3))[:, None, :])  # the same for every head

    def score(self, layer) -> torch.Tensor:
        return protect_recent(layer.state("last_attention"), layer.positions, layer.seen, 1)
