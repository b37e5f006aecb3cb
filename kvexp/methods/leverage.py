"""Approximate statistical leverage of the cached keys (Compactor's geometric score), and the shared leverage math:
the seeded Gaussian sketch (also CurDKV's projection, kvexp/methods/cur.py) and exact leverage
scores of a sketched matrix (also Compactor's blend, kvexp/methods/compactor.py)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from kvexp.methods.base import Method, register
from kvexp.methods.scoring import prerope_keys

if TYPE_CHECKING:
    from kvexp.engine.cache import CompressedLayer

# Eigenvalues of a Gram matrix below this fraction of its largest are treated as 0 (the pseudo-inverse): its
# eigenvalues are the squared singular values, so directions below ~1e-5 of the largest singular value drop out.
RANK_RTOL = 1e-10


def gaussian_sketch(layer: CompressedLayer, owner: Method, seed: int, dim: int, width: int) -> torch.Tensor:
    """A Gaussian sketch [Hkv, dim, width] with N(0, 1/width) entries, one per KV head, fp32 on the layer's device.

    Drawn on the CPU from (`seed`, layer index, `dim`, `width`) alone, so a run repeats exactly on any device and
    every batch row is sketched alike whatever ran before: the rows of a left-padded batch stay independent. Kept in
    the layer's scratch space for the run (the draw is made once)."""
    sketches = layer.scratch(owner).setdefault("sketches", {})
    if (seed, dim, width) not in sketches:
        words = np.random.SeedSequence([seed, layer.layer_idx, dim, width]).generate_state(2, dtype=np.uint32)
        generator = torch.Generator().manual_seed((int(words[0]) << 32) | int(words[1]))
        draw = torch.randn(layer.kv_heads, dim, width, generator=generator, dtype=torch.float64)
        sketches[(seed, dim, width)] = (draw / math.sqrt(width)).to(device=layer.device, dtype=torch.float32)
    return sketches[(seed, dim, width)]


def leverage_scores(x: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
    """Statistical leverage of the live rows of each matrix x [..., n, k] among themselves (fp64 math, fp32 out).

    `l_i = x_i^T (X^T X)^+ x_i` with X the live rows (dead rows are left out of X and score 0): the squared row norms
    of an orthonormal basis of X's column space, which sum to its rank. From the eigendecomposition of the k x k Gram
    matrix; eigenvalues below `RANK_RTOL` x the largest count as 0 (a pseudo-inverse, no ridge)."""
    x = x.double().masked_fill(~live[..., None], 0.0)
    evals, evecs = torch.linalg.eigh(x.mT @ x)  # ascending: the largest last
    kept = evals > RANK_RTOL * evals[..., -1:]
    inverse = torch.where(kept, 1.0 / evals.clamp_min(torch.finfo(torch.float64).tiny), 0.0)
    return ((x @ evecs).square() * inverse[..., None, :]).sum(dim=-1).float()


def approximate_leverage(layer: CompressedLayer, owner: Method, sketch_dim: int, seed: int) -> torch.Tensor:
    """Compactor's approximate key leverage [B, Hkv, L] (dead slots 0): per KV head, the pre-RoPE keys centred on
    their live mean, right-multiplied by the Gaussian sketch [D, sketch_dim], and the exact leverage of that
    n x sketch_dim matrix. With sketch_dim >= D the sketch keeps the column space: the keys' own leverage."""
    live = layer.live()
    keys = prerope_keys(layer).double().masked_fill(~live[..., None], 0.0)
    mean = keys.sum(dim=2, keepdim=True) / live.sum(dim=2).clamp_min(1)[..., None, None]
    sketch = gaussian_sketch(layer, owner, seed, keys.shape[-1], sketch_dim).double()
    return leverage_scores(torch.einsum("bhnd,hdk->bhnk", keys - mean, sketch), live)


@register
@dataclass
class Leverage(Method):
    """Approximate leverage scores (Chari & Van Durme, *Compactor: Calibrated Query-Agnostic KV Cache Compression with
    Approximate Leverage Scores*, arXiv 2507.08143, 2025; kvpress `LeverageScorePress`): keep the keys that are
    outliers of the key matrix, those a rare future query could single out.

    Per KV head: the pre-RoPE keys K (the cached keys rotated back), centred on their mean over the live slots,
    times a right Gaussian sketch Phi [D, `sketch_dim`] (N(0, 1/sketch_dim) entries), X = (K - mean) Phi; the score of
    key i is its statistical leverage in X, `x_i^T (X^T X)^+ x_i` (fp64; a pseudo-inverse for rank-deficient X, e.g.
    fewer live keys than sketch columns). Query-agnostic: no statistics from queries.

    The sketch is a method parameter (`seed`) and reproducible: drawn once per layer and KV head from the seed and
    the layer index (not a shared stream), so every batch row is scored with the same sketch, as alone.
    Deviations: the leverage is exact for the sketch (an eigendecomposition of the sketch_dim x sketch_dim Gram with a
    relative rank cut-off) where kvpress factors the Gram by Cholesky with an absolute jitter 1e-2 (a ridge); kvpress
    draws a fresh unseeded sketch per call and per batch row; kvpress z-normalizes the scores (monotone per head, so
    the same selection). Dead slots take no part in the mean or the Gram and score -inf. Defaults are kvpress's.
    """

    name = "leverage"
    row_budgets = True  # its scores never read the budget
    description = (
        "approximate statistical leverage of the pre-RoPE keys, Gaussian sketch (Chari & Van Durme 2025)"
    )
    sketch_dim: int = 48
    seed: int = 0

    def validate(self, budget: int | None) -> None:
        if self.sketch_dim < 1:
            raise ValueError(f"method.sketch_dim must be >= 1, got {self.sketch_dim}")
        if self.seed < 0:
            raise ValueError(f"method.seed must be >= 0, got {self.seed}")

    def score(self, layer) -> torch.Tensor:
        scores = approximate_leverage(layer, self, self.sketch_dim, self.seed)
        return scores.masked_fill(~layer.live(), float("-inf"))
