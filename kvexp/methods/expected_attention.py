from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from kvexp.engine.cache import Rotary
from kvexp.methods.base import Method, register
from kvexp.methods.scoring import prerope_queries, step_queries

if TYPE_CHECKING:
    from kvexp.engine.cache import CompressedLayer


def add_query_moments(stats: dict, queries: torch.Tensor, counted: torch.Tensor, covariance: bool) -> None:
    """Merge the `counted` [B, n] queries of [B, H, n, D] (fp32) into the running per-row moments in `stats`
    (`count` [B], `mean` [B, H, D], `m2` [B, H, D, D]: the sum of (q - mean)(q - mean)^T, with the covariance term)
    by Chan et al.'s parallel update, row by row: a centred sum of squares stays accurate in fp32 where
    E[qq^T] - mu mu^T would cancel. A row with nothing counted keeps its moments."""
    weight = counted.to(queries.dtype)  # [B, n]
    n = weight.sum(dim=1)  # [B]
    count = stats.get("count", torch.zeros_like(n))
    total = count + n
    batch_mean = torch.einsum("bhnd,bn->bhd", queries, weight) / n.clamp_min(1.0)[:, None, None]
    mean = stats.get("mean", torch.zeros_like(batch_mean))
    delta = batch_mean - mean
    share = n / total.clamp_min(1.0)  # [B]: 0 for a row with nothing counted
    stats["mean"] = mean + delta * share[:, None, None]
    if covariance:
        centred = (queries - batch_mean[:, :, None]) * weight[:, None, :, None]
        outer = delta[..., :, None] * delta[..., None, :]
        m2 = stats.get("m2", torch.zeros_like(outer))
        stats["m2"] = m2 + centred.transpose(-1, -2) @ centred + outer * (count * share)[:, None, None, None]
    stats["count"] = total


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


def check_future_and_sinks(n_future_positions: int, n_sink: int, epsilon: float, budget: int | None) -> None:
    """The options Expected Attention and CAP share: averaged future positions, protected sinks, the score floor."""
    if n_future_positions < 1:
        raise ValueError(f"method.n_future_positions must be >= 1, got {n_future_positions}")
    if n_sink < 0:
        raise ValueError(f"method.n_sink must be >= 0, got {n_sink}")
    if budget is not None and n_sink >= budget:
        raise ValueError(
            f"method.n_sink ({n_sink}) must be smaller than the budget ({budget}) so that keys are scored"
        )
    if epsilon < 0:
        raise ValueError(f"method.epsilon must be >= 0, got {epsilon}")


def future_rotations(layer: CompressedLayer, rotary: Rotary, steps: int, dim: int) -> torch.Tensor:
    """Each row's averaged future rotation [B, D, D]: `mean_rotation` over the `steps` positions after the row's
    newest one (`rows_seen`), so a left-padded row turns as it would alone."""
    starts = layer.rows_seen().tolist()
    rotations = {start: mean_rotation(rotary, start, steps, dim) for start in set(starts)}
    return torch.stack([rotations[start] for start in starts])


def expected_attention_scores(
    layer: CompressedLayer,
    mean: torch.Tensor,
    cov: torch.Tensor | None,
    n_future_positions: int,
    n_sink: int,
    use_vnorm: bool,
    epsilon: float,
    scale: float,
) -> torch.Tensor:
    """Expected Attention's scores [B, Hkv, L_phys] from the future queries' pre-RoPE Gaussian, per query head:
    `mean` [B, H, D] and `cov` [B, H, D, D] (None: the mean term alone), fp32; a leading 1 serves every row.

    Both are turned by each row's averaged future RoPE (`future_rotations`; none without RoPE), a key's expected
    logit is s mu'.k + s^2/2 k^T Sigma' k (s = `scale`, the attention's logit scale), softmaxed over the live non-sink keys,
    averaged over the GQA group, times (p + `epsilon`) ||v|| with `use_vnorm`; the first `n_sink` positions score
    +inf. Each row reads only its own keys, positions and statistics."""
    batch, kv_heads, dim = layer.batch, layer.kv_heads, mean.shape[-1]
    mean = mean.expand(batch, -1, -1)
    cov = None if cov is None else cov.expand(batch, -1, -1, -1)
    rotary = layer.options.rotary
    if rotary is not None:
        rotation = future_rotations(layer, rotary, n_future_positions, dim)  # [B, D, D]
        mean = mean @ rotation.transpose(-1, -2)
        cov = None if cov is None else rotation[:, None] @ cov @ rotation.transpose(-1, -2)[:, None]
    keys = layer.keys.float()  # [B, Hkv, n, D]
    logits = torch.einsum("bhgd,bhnd->bhgn", mean.reshape(batch, kv_heads, -1, dim), keys) * scale
    if cov is not None:
        cov = cov.reshape(batch, kv_heads, -1, dim, dim)
        quadratic = torch.einsum("bhnd,bhgde,bhne->bhgn", keys, cov, keys)
        logits = logits + quadratic * (scale * scale / 2)
    sinks = (layer.positions >= 0) & (layer.positions < n_sink)
    logits = logits.masked_fill((sinks | ~layer.live())[:, :, None], float("-inf"))
    scores = torch.softmax(logits, dim=-1).mean(dim=2)  # mean over the GQA group: [B, Hkv, n]
    if use_vnorm:
        scores = (scores + epsilon) * layer.values.float().norm(dim=-1)
    return scores.masked_fill(sinks, float("inf"))


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
    statistics are per batch row (each row counts only its own non-sink, non-padding queries), in the layer's scratch
    space (`row_scratch`: they follow beam reorders), so a left-padded batch scores each row as alone.
    """

    name = "expected_attention"
    row_budgets = True  # its scores never read the budget
    description = (
        "expected attention of future queries modelled as a Gaussian, times value norms (Devoto et al. 2025)"
    )
    observes = True
    row_scratch = ("count", "mean", "m2")  # each row's query moments: [B], [B, H, D], [B, H, D, D]
    n_future_positions: int = 512
    n_sink: int = 4
    use_covariance: bool = True
    use_vnorm: bool = True
    epsilon: float = 0.0

    def validate(self, budget: int | None) -> None:
        check_future_and_sinks(self.n_future_positions, self.n_sink, self.epsilon, budget)

    def observe(self, layer, query: torch.Tensor) -> None:
        query, positions = step_queries(layer, query)
        queries = prerope_queries(query, positions, layer.options.rotary)  # [B, H, q, D]
        counted = positions >= self.n_sink  # [B, q]: sink positions and padding (-1) left out, row by row
        if counted.any():
            add_query_moments(layer.scratch(self), queries, counted, self.use_covariance)

    def score(self, layer) -> torch.Tensor:
        stats = layer.scratch(self)
        count = stats["count"].clamp_min(1.0)[
            :, None, None, None
        ]  # a row with no query counted yet: 0 moments
        cov = stats["m2"] / count if self.use_covariance else None  # biased, as the reference
        return expected_attention_scores(
            layer,
            stats["mean"],
            cov,
            self.n_future_positions,
            self.n_sink,
            self.use_vnorm,
            self.epsilon,
            layer.scaling,
        )
