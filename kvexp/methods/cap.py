from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from kvexp.methods.base import Method, check_window, register
from kvexp.methods.expected_attention import check_future_and_sinks, future_rotations
from kvexp.methods.scoring import prerope_queries, protect_sinks, remember_queries, step_queries

if TYPE_CHECKING:
    from kvexp.engine.cache import CompressedLayer


def capacity_scores(
    weights: torch.Tensor, vectors: torch.Tensor, counted: torch.Tensor, epsilon: float
) -> torch.Tensor:
    """CAP's leverage proxy s_i = w_i u_i^T A^{-1} u_i with A = I + sum_j (w_j + epsilon) u_j u_j^T over the counted
    slots j, for weights [B, Hkv, G, L] and capacity vectors u [B, Hkv, L, d] shared by the group (fp64 math, fp32
    out; slots not counted take no part in A)."""
    u = vectors.double().masked_fill(~counted[..., None], 0.0)  # [B, Hkv, L, d]
    mass = (weights.double() + epsilon) * counted[:, :, None].double()  # [B, Hkv, G, L]
    eye = torch.eye(u.shape[-1], dtype=torch.float64, device=u.device)
    capacity = eye + torch.einsum("bhgn,bhnd,bhne->bhgde", mass, u, u)  # [B, Hkv, G, d, d], SPD
    factor = torch.linalg.cholesky(capacity)
    u_all = vectors.double()[:, :, None].expand(-1, -1, weights.shape[2], -1, -1)  # [B, Hkv, G, L, d]
    solved = torch.cholesky_solve(u_all.mT, factor)  # A^{-1} u_i: [B, Hkv, G, d, L]
    return (weights.double() * (u_all.mT * solved).sum(dim=-2)).float()


@register
@dataclass
class CAP(Method):
    """CAP / CapKV (Yang, Tang, Zhen et al., *Rethinking KV Cache Eviction via a Unified Information-Theoretic
    Objective*, arXiv 2604.25975, 2026; kvpress `CapPress`): keep the entries that add the most information capacity,
    `log det(I + sum_i w_i u_i u_i^T)` over the kept set, scored by its leverage proxy.

    Per query head: a historical-query anchor mu (the mean of the pre-RoPE queries seen so far at positions >=
    `n_sink`; with `window_size`, of the last `window_size` queries remembered), turned by RoPE averaged over the
    next `n_future_positions` positions (mu' = R mu, R = mean_t R_t as expected_attention); query relevance
    `w_i = exp(tau cos(k_i, mu'))` (rotated cached keys; shifted by the largest over the head's scored slots);
    capacity vectors `u_i = v_i`; the capacity matrix `A = I + sum_j (w_j + epsilon) v_j v_j^T` over the live
    non-sink slots; the score `s_i = w_i v_i^T A^{-1} v_i` (fp64 Cholesky), averaged over the GQA group. The first
    `n_sink` positions are always kept.

    Sources: the paper's text was not reachable offline; the rule is the one kvpress's press states as the paper's
    (A, s_i, w_i above) with the press's practical choices, which its docstring lists as departures from the paper:
    keys and anchor L2-normalized (the paper's w uses raw dot products), the max shift of the exponent (so the
    identity weighs against weights <= 1), the averaged future RoPE on the anchor, u = v. Deviations from kvpress:
    the anchor's queries are this engine's rotated queries rotated back (kvpress re-projects the hidden states),
    accumulated over every step (prefill, chunks, decoding; per batch row), so it runs at any step; dead slots take
    no part in A or the shift and score -inf; sinks are forced in with +inf (kvpress: max + 1). Defaults are
    kvpress's.
    """

    name = "cap"
    row_budgets = True  # its scores never read the budget
    description = "query-aware capacity (log-det leverage) of the values, anchor-weighted (Yang et al. 2026)"
    observes = True
    row_scratch = (
        "query_sum",
        "query_count",
    )  # per row: sums of the counted pre-RoPE queries [B, H, D], counts [B]
    tau: float = 5.0
    n_future_positions: int = 512
    n_sink: int = 4
    epsilon: float = 1e-6
    window_size: int | None = None

    def validate(self, budget: int | None) -> None:
        if self.tau < 0:
            raise ValueError(f"method.tau must be >= 0, got {self.tau}")
        check_future_and_sinks(self.n_future_positions, self.n_sink, self.epsilon, budget)
        check_window("window_size", self.window_size, minimum=1, nullable=True, null_means="every query seen")

    def observe(self, layer, query: torch.Tensor) -> None:
        if self.window_size is not None:
            remember_queries(layer, query, self.window_size)
            return
        query, positions = step_queries(layer, query)
        counted = (positions >= self.n_sink).double()  # [B, q]: sinks and padding (-1) left out, row by row
        queries = prerope_queries(query, positions, layer.options.rotary).double()
        scratch = layer.scratch(self)
        total = torch.einsum("bhqd,bq->bhd", queries, counted)
        scratch["query_sum"] = total + scratch["query_sum"] if "query_sum" in scratch else total
        scratch["query_count"] = counted.sum(dim=1) + scratch.get("query_count", 0.0)

    def anchor(self, layer: CompressedLayer) -> torch.Tensor:
        """Each row's anchor mu' [B, H, D] fp32: the mean counted pre-RoPE query, turned by the averaged future RoPE."""
        if self.window_size is not None:
            queries, positions = layer.query_window
            counted = (positions >= self.n_sink).double()
            pre = prerope_queries(queries, positions, layer.options.rotary).double()
            total, count = torch.einsum("bhqd,bq->bhd", pre, counted), counted.sum(dim=1)
        else:
            scratch = layer.scratch(self)
            total, count = scratch["query_sum"], scratch["query_count"]
        mean = (
            total / count.clamp_min(1.0)[:, None, None]
        ).float()  # no counted query yet: 0 (uniform weights)
        rotary = layer.options.rotary
        if rotary is None:
            return mean
        rotation = future_rotations(layer, rotary, self.n_future_positions, mean.shape[-1])  # [B, D, D]
        return mean @ rotation.transpose(-1, -2)

    def score(self, layer) -> torch.Tensor:
        live = layer.live()
        sinks = (layer.positions >= 0) & (layer.positions < self.n_sink)
        counted = live & ~sinks
        batch, heads, dim = layer.batch, layer.kv_heads, layer.head_dim
        anchor = F.normalize(self.anchor(layer), dim=-1).view(batch, heads, -1, dim)  # [B, Hkv, G, D]
        keys = F.normalize(layer.keys.float(), dim=-1)
        similarity = torch.einsum("bhgd,bhnd->bhgn", anchor, keys).clamp(-1.0, 1.0)
        logits = (self.tau * similarity).masked_fill(~counted[:, :, None], float("-inf"))
        shift = logits.amax(dim=-1, keepdim=True).clamp_min(-1e30)  # no scored slot: any finite shift
        weights = torch.exp(logits - shift)  # [B, Hkv, G, L]; 0 where not counted
        scores = capacity_scores(weights, layer.values, counted, self.epsilon).mean(dim=2)
        return protect_sinks(scores, layer.positions, self.n_sink).masked_fill(~live, float("-inf"))
