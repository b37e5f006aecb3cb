from __future__ import annotations

from dataclasses import dataclass

import torch

from kvexp.engine.cache import Rotary
from kvexp.methods.base import Method, register
from kvexp.methods.scoring import prerope_queries, step_queries


@dataclass
class QueryStats:
    """Running moments of one layer's pre-RoPE queries per query head, merged step by step with Chan et al.'s
    parallel update: a centred sum of squares in fp32 stays accurate where E[qq^T] - mu mu^T would cancel."""

    count: int
    mean: torch.Tensor  # [H, D]
    m2: torch.Tensor | None  # [H, D, D] sum of (q - mean)(q - mean)^T; None without the covariance term

    @classmethod
    def empty(cls, heads: int, dim: int, device: torch.device, covariance: bool) -> QueryStats:
        m2 = torch.zeros(heads, dim, dim, device=device) if covariance else None
        return cls(0, torch.zeros(heads, dim, device=device), m2)

    def add(self, queries: torch.Tensor) -> None:
        """Merge queries [H, n, D] (fp32) into the moments."""
        n = queries.shape[1]
        total = self.count + n
        batch_mean = queries.mean(dim=1)
        delta = batch_mean - self.mean
        self.mean = self.mean + delta * (n / total)
        if self.m2 is not None:
            centred = queries - batch_mean[:, None]
            outer = delta[:, :, None] * delta[:, None, :]
            self.m2 = self.m2 + centred.transpose(1, 2) @ centred + outer * (self.count * n / total)
        self.count = total

    def covariance(self) -> torch.Tensor | None:
        return None if self.m2 is None else self.m2 / self.count  # biased, as the reference


def mean_rotation(rotary: Rotary, start: int, steps: int, dim: int) -> torch.Tensor:
    """R = mean over positions t in [start, start + steps) of RoPE's rotation R_t, as a [dim, dim] fp32 matrix.

    rotate_half layout: R_t q = cos_t * q + sin_t * rotate_half(q) on the first `rotary.rotary_dims` dims, the
    identity on the rest (partial rotary).
    """
    t = torch.arange(start, start + steps, dtype=torch.float64, device=rotary.inv_freq.device)
    angle = t[:, None] * rotary.inv_freq.double()[None, :]  # fp64: positions can be large
    cos, sin = angle.cos().mean(dim=0), angle.sin().mean(dim=0)  # [D_rot / 2]
    half = cos.numel()
    rotation = torch.eye(dim, dtype=torch.float64, device=cos.device)
    rotation[:half, :half] = torch.diag(cos)
    rotation[half : 2 * half, half : 2 * half] = torch.diag(cos)
    rotation[:half, half : 2 * half] = -torch.diag(sin)  # rotate_half: first half takes -x2 ...
    rotation[half : 2 * half, :half] = torch.diag(sin)  # ... second half takes x1
    return rotation.float()


@register
@dataclass
class ExpectedAttention(Method):
    """Expected Attention (Devoto, Jeblick, Jégou, arXiv 2510.00636; kvpress ExpectedAttentionPress).

    Future queries are modelled as a Gaussian: mu and Sigma (biased) of the layer's pre-RoPE queries seen so
    far, per query head, positions < `n_sink` excluded. RoPE is averaged over the next `n_future_positions`
    positions after the last token seen (R = mean_t R_t; mu' = R mu, Sigma' = R Sigma R^T; R = I without
    RoPE). A key's expected logit is log E[exp(s q.k)] for q ~ N(mu', Sigma'):
    z_j = s mu'.k_j + s^2/2 k_j^T Sigma' k_j (`use_covariance`), with s the attention's own logit scale
    (1/sqrt(d) in the paper), softmaxed over the non-sink keys, averaged over the GQA group, and weighted
    (p_j + `epsilon`) * ||v_j|| (`use_vnorm`). The first `n_sink` tokens are always kept.

    The pre-RoPE queries are this engine's rotated queries rotated back by -position (after q_norm where the
    model has one, as kvpress's `get_prerope_query_states`). Deviations: the statistics are running sums over
    every step (prefill, chunks, decode), so the method runs at any step, not once per prefill (kvpress's
    DecodingPress recomputes them from buffered hidden states); the softmax also excludes dead slots. The
    statistics live on the layer (`layer.query_stats`), not in per-slot state, and are not moved by batch or
    beam operations: batch size 1 only.
    """

    name = "expected_attention"
    description = (
        "expected attention of future queries modelled as a Gaussian, times value norms (Devoto et al. 2025)"
    )
    observes = True
    n_future_positions: int = 512
    n_sink: int = 4
    use_covariance: bool = True
    use_vnorm: bool = True
    epsilon: float = 0.0

    def validate(self, budget: int | None) -> None:
        if self.n_future_positions < 1:
            raise ValueError(f"method.n_future_positions must be >= 1, got {self.n_future_positions}")
        if self.n_sink < 0:
            raise ValueError(f"method.n_sink must be >= 0, got {self.n_sink}")
        if budget is not None and self.n_sink >= budget:
            raise ValueError(
                f"method.n_sink ({self.n_sink}) must be smaller than the budget ({budget}) so that keys are scored"
            )
        if self.epsilon < 0:
            raise ValueError(f"method.epsilon must be >= 0, got {self.epsilon}")

    def observe(self, layer, query: torch.Tensor) -> None:
        if query.shape[0] != 1:
            raise NotImplementedError(
                f"method {self.name}: batch size 1 only (got {query.shape[0]}); its per-layer query statistics "
                "are not moved by batch or beam operations"
            )
        if layer.seen == layer.new_tokens:  # the sequence's first step (a reset cache starts over too)
            layer.query_stats = QueryStats.empty(
                query.shape[1], query.shape[3], query.device, self.use_covariance
            )
        query, positions = step_queries(layer, query)
        queries = prerope_queries(query, positions, layer.options.rotary)[0]  # [H, q, D]
        counted = positions[0] >= self.n_sink  # sink positions and padding (-1) left out
        if counted.any():
            layer.query_stats.add(queries[:, counted])

    def score(self, layer) -> torch.Tensor:
        stats = layer.query_stats
        mean, cov = stats.mean, stats.covariance()
        rotary = layer.options.rotary
        if rotary is not None:
            start = int(layer.positions.max()) + 1  # the next token's position
            rotation = mean_rotation(rotary, start, self.n_future_positions, mean.shape[-1])
            mean = mean @ rotation.T
            cov = None if cov is None else rotation @ cov @ rotation.T
        kv_heads, dim = layer.kv_heads, mean.shape[-1]
        keys = layer.keys.float()  # [B, Hkv, n, D]
        scale = layer.scaling
        logits = torch.einsum("hgd,bhnd->bhgn", mean.view(kv_heads, -1, dim), keys) * scale
        if self.use_covariance:
            cov = cov.view(kv_heads, -1, dim, dim)
            quadratic = torch.einsum("bhnd,hgde,bhne->bhgn", keys, cov, keys)
            logits = logits + quadratic * (scale * scale / 2)
        sinks = (layer.positions >= 0) & (layer.positions < self.n_sink)
        logits = logits.masked_fill((sinks | ~layer.live())[:, :, None], float("-inf"))
        scores = torch.softmax(logits, dim=-1).mean(dim=2)  # mean over the GQA group: [B, Hkv, n]
        if self.use_vnorm:
            scores = (scores + self.epsilon) * layer.values.float().norm(dim=-1)
        return scores.masked_fill(sinks, float("inf"))
