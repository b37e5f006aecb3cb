from __future__ import annotations

from dataclasses import dataclass

import torch

from kvexp.methods.base import Method, check_window, register
from kvexp.methods.leverage import gaussian_sketch
from kvexp.methods.scoring import protect_sinks

LEVERAGE_TYPES = ("key", "value", "kv_avg", "kv_product")


def local_shares(
    scores: torch.Tensor, positions: torch.Tensor, live: torch.Tensor, window: int
) -> torch.Tensor:
    """Each live slot's share of its window's total [B, Hkv, L]: a head's live slots in temporal order, cut into
    windows of `window` consecutive entries from the oldest; dead slots score 0 and belong to no window."""
    order_key = positions.masked_fill(~live, torch.iinfo(positions.dtype).max)  # dead last
    rank = order_key.argsort(dim=-1, stable=True).argsort(dim=-1)  # temporal rank among the live slots
    windows = rank // window
    scores = scores.masked_fill(~live, 0.0)
    totals = torch.zeros_like(scores).scatter_add_(-1, windows, scores)
    return scores / totals.gather(-1, windows).clamp_min(torch.finfo(scores.dtype).tiny)


@register
@dataclass
class CUR(Method):
    """CurDKV (Sengupta, Chaudhary, Chakraborty, *Value-Guided KV Compression for LLMs via Approximated CUR
    Decomposition*, NeurIPS 2025, arXiv 2509.15038; kvpress `CURPress`): keep the tokens whose keys and values carry
    the most leverage in a CUR decomposition of the attention output, approximated from their row norms.

    Per KV head, from the cached keys K and values V (as the press reads them): a Gaussian projection G [d,
    `sketch_dim`] (N(0, 1/sketch_dim) entries; null: no projection), key leverage `k_i = ||(K G)_i||^2` and value
    leverage `v_i = ||(V G)_i||^2` (the same G where the dims agree, as the authors' code); with
    `local_window_size` set, each is divided by its window's total (the head's live entries in temporal order, in
    windows of that many from the oldest: leverage relative to the neighbourhood); combined by `leverage_type`
    (`key`: k, `value`: v, `kv_avg`: (k + v) / 2, `kv_product`: k v) and normalized to sum 1 over the live slots. The
    first `num_sinks` positions are always kept. Both keys and values: the paper's point is that the value side,
    not attention alone, decides what the attention output loses.

    kvpress's options: `use_random_leverage` is `sketch_dim` (null: off), `use_local_approximation` with
    `local_window_size` is `local_window_size` (null: off). The projection is the paper's approximation (fast Gaussian
    random projections; r = 20 in the authors' code), on by default here; the authors' press and kvpress default to
    none (`use_random_leverage=False`): `sketch_dim: null`. It is seeded (`seed`) and drawn once per layer and KV head
    (kvexp/methods/leverage.py), where the references draw an unseeded G at every call. Deviations: the local
    windows follow the temporal order of the held entries, so after evictions a window is `local_window_size` held
    entries (at a prefill, kvpress's windows from position 0; another copy of the press pads at the front, aligning
    them to the end); dead slots are in no window and score -inf; sinks are forced in with +inf (kvpress sets them to
    1, above every normalized score). Post-RoPE keys, as the press reads the cache.
    """

    name = "cur"
    row_budgets = True  # its scores never read the budget
    description = (
        "CUR leverage of keys x values from projected row norms, local windows (Sengupta et al. 2025)"
    )
    num_sinks: int = 4
    leverage_type: str = "kv_product"
    sketch_dim: int | None = 20
    local_window_size: int | None = 16
    seed: int = 0

    def validate(self, budget: int | None) -> None:
        if self.num_sinks < 0:
            raise ValueError(f"method.num_sinks must be >= 0, got {self.num_sinks}")
        if budget is not None and self.num_sinks >= budget:
            raise ValueError(
                f"method.num_sinks ({self.num_sinks}) must be smaller than the budget ({budget}) so that tokens "
                "are scored"
            )
        if self.leverage_type not in LEVERAGE_TYPES:
            raise ValueError(
                f"method.leverage_type must be one of {LEVERAGE_TYPES}, got {self.leverage_type!r}"
            )
        if self.sketch_dim is not None and self.sketch_dim < 1:
            raise ValueError(f"method.sketch_dim must be >= 1 or null (no projection), got {self.sketch_dim}")
        check_window(
            "local_window_size",
            self.local_window_size,
            minimum=1,
            nullable=True,
            null_means="no local windows",
        )
        if self.seed < 0:
            raise ValueError(f"method.seed must be >= 0, got {self.seed}")

    def row_leverage(self, layer, x: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
        """Leverage of the rows of keys or values x [B, Hkv, L, d]: ||x_i G||^2 (||x_i||^2 without projection),
        as a share of its local window's total with `local_window_size`; [B, Hkv, L] fp32, dead slots 0."""
        x = x.float()
        if self.sketch_dim is not None:
            sketch = gaussian_sketch(layer, self, self.seed, x.shape[-1], self.sketch_dim)
            x = torch.einsum("bhnd,hdk->bhnk", x, sketch)
        leverage = x.square().sum(dim=-1).masked_fill(~live, 0.0)
        if self.local_window_size is None:
            return leverage
        return local_shares(leverage, layer.positions, live, self.local_window_size)

    def score(self, layer) -> torch.Tensor:
        live = layer.live()
        kind = self.leverage_type
        keys = self.row_leverage(layer, layer.keys, live) if kind != "value" else None
        values = self.row_leverage(layer, layer.values, live) if kind != "key" else None
        if kind == "key":
            combined = keys
        elif kind == "value":
            combined = values
        elif kind == "kv_avg":
            combined = (keys + values) / 2
        else:
            combined = keys * values
        combined = combined / combined.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(combined.dtype).tiny)
        return protect_sinks(combined, layer.positions, self.num_sinks).masked_fill(~live, float("-inf"))
