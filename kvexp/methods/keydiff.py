from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from kvexp.methods.base import Method, register

if TYPE_CHECKING:
    from kvexp.engine.cache import CompressedLayer


def key_anchor(keys: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
    """KeyDiff's anchor [B, Hkv, D] (fp32): the mean of the unit-normalized live keys of each head (keys [B, Hkv, n, D],
    live [B, Hkv, n] bool); a head without a live key gets the zero vector."""
    unit = F.normalize(keys.float(), dim=-1) * live[..., None]
    return unit.sum(dim=2) / live.sum(dim=2, keepdim=True).clamp_min(1)


@register
@dataclass
class KeyDiff(Method):
    """KeyDiff (Park, Jones, Morse, Goel, Lee, Lott, arXiv 2504.15364; kvpress KeyDiffPress): keep the keys least
    similar to the others.

    At every compression each KV head's anchor is the mean of its unit-normalized keys (the paper's
    mu(K^) = 1/n sum k_i/||k_i||, not the mean of the raw keys), over the keys the head holds at that moment: the
    live slots only (padding and dead per-head slots excluded, `layer.live()`), the step's new tokens included, so
    it is recomputed at each compression as the paper's block-wise eviction recomputes it over the cache and the new
    block. Score = -cos(k_i, anchor); the least similar (most distinctive) keys stay. Query free, no parameters
    (the paper has no sink or window in its rule). Rows of a batch read only their own slots.
    """

    name = "keydiff"
    row_budgets = True  # its scores never read the budget
    description = "keep the keys least cosine-similar to the mean normalized key (Park et al. 2025)"

    def score(self, layer: CompressedLayer) -> torch.Tensor:
        keys, live = layer.keys.float(), layer.live()
        anchor = key_anchor(keys, live)  # [B, Hkv, D]
        return -F.cosine_similarity(keys, anchor[:, :, None, :], dim=-1)
