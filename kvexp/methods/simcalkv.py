import math
from dataclasses import dataclass

import torch

from kvexp.engine import Selection
from kvexp.methods.base import Method, check_window, register
from kvexp.methods.merging import fold, most_similar, reject_rerotate
from kvexp.methods.scoring import (
    GQA_REDUCTIONS,
    accumulate_attention,
    protect_recent,
    protect_sinks,
    reduce_group,
    remember_queries,
    window_attention,
)

VARIANTS = ("derived", "reference_code")
KEY_WEIGHTINGS = ("count", "attention")


@register
@dataclass
class SimCalKV(Method):
    """SimCalKV (Cheng et al., *Efficient LLMs Inference via Similarity-Aware KV Cache Merging with Bias
    Calibration*; code William-kaihhu/SimCalKV): the least-attended tokens are merged into their most similar kept
    token instead of being dropped.

    Importance is the attention each key has received, summed over every query so far (the paper's column sums
    of the prompt attention, block-accumulated; then each step's rows), reduced over the GQA group (`gqa`). The
    lowest are evicted (optionally `sink_tokens` and the `recent_size` newest are protected; the paper has
    neither). Each evicted token goes to the kept token of its KV head with the highest cosine similarity if it
    is above `similarity_threshold` (tau, 0 in the paper), else it is dropped. Per KV head; GQA queries are
    pooled over the group. Runs at every compression: prefill, chunks, token by token.

    `variant=derived` (default, docs/methods.md#simcalkv): the calibrated merge of `merging.fold`: key = count-weighted
    mean of the group, logit bias = log-sum-exp of its members' biases (ln of the tokens it stands for), value =
    attention-weighted mean with weights e^{b_i} E_q[e^{q.k_i/sqrt d}], the attention the remembered queries
    give each member (their softmax weights averaged over the `value_window` last queries and the group's query
    heads). `value_window=1` (default) is the paper's choice, the last query: the query that just attended the
    whole cache; a longer window estimates the expectation over future queries better (docs/methods.md#merging-rule).
    `key_weighting=attention` (kvexp's own option, not in the paper) weights the keys like the
    values instead of by counts: the tangent of log sum_i e^{b_i + q.k_i} in q at the reference queries, so a kept
    token that draws attention keeps its key when many weakly attended tokens join it; the count-weighted mean
    drags it towards them (on SmolLM2, a 256-token prompt kept at 64 lost less with it than by dropping).

    `variant=reference_code` reproduces what `merge_ours.py` computes: key = 1/2 (mean of the evicted keys +
    k_c) + ln 2 added to EVERY key coordinate, no logit bias (so the merged token counts once, whatever the
    group size); values weighted by e^{q_t.k/sqrt d} with the last query, kept key included. Remaining
    differences: the released code builds q_t from `q_proj(hidden_states[l])` without the input layer norm and
    without RoPE and dots it with rotated keys; kvexp cannot see hidden states from the cache and uses the true
    rotated query the attention received (the bug is not reproduced). The code folds a group's evicted tokens
    one after the other (order-dependent); this variant uses the mean of the group's evicted keys (identical for a
    group of one); with G > 1 the weights are the group's mean softmax weights.
    """

    name = "simcalkv"
    description = (
        "least-attended tokens merged into their most similar kept key, bias-calibrated (Cheng et al.)"
    )
    row_budgets = True  # its scores never read the budget
    observes = True
    reads_step_attention = True
    merges = True
    state_names = ("acc",)
    variant: str = "derived"
    key_weighting: str = "count"
    similarity_threshold: float = 0.0
    value_window: int = 1
    sink_tokens: int = 0
    recent_size: int = 0
    gqa: str = "mean"

    def validate(self, budget: int | None) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"method.variant must be one of {VARIANTS}, got {self.variant!r}")
        if self.key_weighting not in KEY_WEIGHTINGS:
            raise ValueError(
                f"method.key_weighting must be one of {KEY_WEIGHTINGS}, got {self.key_weighting!r}"
            )
        if not -1.0 <= self.similarity_threshold <= 1.0:
            raise ValueError(
                f"method.similarity_threshold must be a cosine in [-1, 1], got {self.similarity_threshold}"
            )
        check_window("value_window", self.value_window, minimum=1)
        if self.sink_tokens < 0 or self.recent_size < 0:
            raise ValueError(
                f"method.sink_tokens and method.recent_size must be >= 0, got {self.sink_tokens}, "
                f"{self.recent_size}"
            )
        if budget is not None and self.sink_tokens + self.recent_size >= budget:
            raise ValueError(
                f"method.sink_tokens + method.recent_size ({self.sink_tokens + self.recent_size}) must be smaller "
                f"than the budget ({budget}) so that tokens can be chosen"
            )
        if self.gqa not in GQA_REDUCTIONS:
            raise ValueError(f"method.gqa must be one of {GQA_REDUCTIONS}, got {self.gqa!r}")

    def observe(self, layer, query: torch.Tensor) -> None:
        accumulate_attention(layer, query, "acc", self.gqa)
        remember_queries(layer, query, self.value_window)

    def score(self, layer) -> torch.Tensor:
        reject_rerotate(layer, self.name)
        scores = protect_sinks(layer.state("acc"), layer.positions, self.sink_tokens)
        return protect_recent(scores, layer.positions, self.recent_size)

    def merge(self, layer, kept: torch.Tensor, evicted: torch.Tensor, selection: Selection) -> None:
        similarity, nearest = most_similar(layer.keys, evicted, kept)
        slots = torch.arange(layer.length, device=layer.device).expand_as(nearest)
        target = torch.where(kept, slots, torch.where(similarity > self.similarity_threshold, nearest, -1))
        # e^{b_i} E_q[e^{q.k_i/sqrt d}] up to a constant per query: the softmax weights, averaged over the
        # window and the group; floored so that a group whose weights all underflow still gets a mean.
        # Weights are constants of the merge (as its choice of members): no gradient through the keys they read,
        # which the fold then rewrites (training's differentiable mode).
        with torch.no_grad():
            weights = reduce_group(window_attention(layer).mean(dim=3), "mean").clamp_min(1e-30)
        if self.variant == "derived":
            fold(
                layer,
                target,
                value_weight=weights,
                key_weight=weights if self.key_weighting == "attention" else None,
            )
            return
        # 1/2 (mean of the n evicted keys) + 1/2 k_c: weight n for the kept key, 1 for each evicted one.
        joined = torch.zeros_like(weights).scatter_add_(2, target.clamp_min(0), (target >= 0).float())
        key_weight = torch.where(kept, (joined - 1).clamp_min(1), 1.0)
        size = fold(layer, target, value_weight=weights, key_weight=key_weight, calibrate=False)
        layer.keys.add_(torch.where(size > 1, math.log(2.0), 0.0)[..., None].to(layer.keys.dtype))
