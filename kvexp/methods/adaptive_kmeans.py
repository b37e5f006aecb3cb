from dataclasses import dataclass, field
from typing import Any

import torch

from kvexp.engine import Selection
from kvexp.methods.base import Method, TrainableMergedBias, check_window, register
from kvexp.methods.clustering import (
    farthest_points,
    gather_rows,
    group_targets,
    nearest_center,
    newest,
    top_ranked,
)
from kvexp.methods.merging import fold, reject_rerotate
from kvexp.methods.scoring import GQA_REDUCTIONS, reduce_group, remember_queries, window_attention


def centroid_update_weights(
    target: torch.Tensor,  # [B, Hkv, n] fold targets (a group's slot maps to itself, -1: not merged)
    centroid: torch.Tensor,  # [B, Hkv, n] bool: slots that were centroids before this update
    count: torch.Tensor,  # [B, Hkv, n] tokens each slot stands for
    log_value: torch.Tensor,  # [B, Hkv, n] log value weight: ln Z for a centroid, q.k/sqrt(d) for a token
    rate: float | torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One mini-batch step of online k-means (Sculley 2010) as `fold` weights: (key weights, value weights,
    new ln Z per slot). Plain differentiable tensor ops, so `rate` (eta) can become a trainable tensor.

    A centroid c with m_c tokens and value-weight sum Z_c absorbs the batch S_c of tokens assigned to it:
    `rate=None` (Sculley's per-centroid rate 1/m): mu <- (m_c mu + sum_S c_i k_i) / (m_c + sum_S c_i), the exact
    running mean, and nu <- (Z_c nu + sum_S w_i v_i) / (Z_c + sum_S w_i), Z_c <- Z_c + sum_S w_i (docs/methods.md#adaptive_kmeans).
    A fixed rate eta: mu <- (1 - eta) mu + eta * mean_S(k), nu <- (1 - eta) nu + eta * sum_S w_i v_i / sum_S w_i.
    A group without a previous centroid (a new cluster) is the plain count- / w-weighted mean.
    """
    members = target >= 0
    index = target.clamp_min(0)
    log_value = log_value.masked_fill(~members, float("-inf"))
    # Shift value weights per group so that the largest is 1 (exp of raw logits can over- or underflow).
    shift = torch.full_like(log_value, float("-inf")).scatter_reduce(2, index, log_value, "amax")
    value = (log_value - shift.gather(2, index)).exp().nan_to_num(0.0)  # [B, Hkv, n]
    new_log_z = (shift + torch.zeros_like(value).scatter_add_(2, index, value).log()).gather(2, index)
    count = count.float() * members
    if rate is None:
        return count, value, new_log_z
    old = centroid & members & (target == torch.arange(target.shape[-1], device=target.device))
    has_old = (
        torch.zeros_like(index).scatter_add_(2, index, old.long()).gather(2, index) > 0
    )  # group has a centroid
    batch = ~old & members
    batch_count = torch.zeros_like(count).scatter_add_(2, index, count * batch).gather(2, index)
    batch_value = torch.zeros_like(value).scatter_add_(2, index, value * batch).gather(2, index)
    key_weight = torch.where(old, 1 - rate, rate * count / batch_count.clamp_min(1e-30))
    value_weight = torch.where(old, 1 - rate, rate * value / batch_value.clamp_min(1e-30))
    key_weight = torch.where(has_old, key_weight, count)
    value_weight = torch.where(has_old, value_weight, value)
    return key_weight, value_weight, new_log_z


@register
@dataclass
class AdaptiveKMeans(TrainableMergedBias, Method):
    """The attention-guided k-means study's adaptive attention-guided compression: attention-guided pruning every `pruning_interval` P
    tokens, then online k-means summarization of the retained pairs into `num_clusters` K centroids, within
    `max_cache_size` B (the budget). The distillation fine-tuning of the study is not part of this method.

    A layer holds `sink_tokens` sinks, at most K centroids and exact tokens. When it exceeds the budget B it
    is compressed to `B + 1 - P` entries, so the next compression comes P tokens later and the layer never holds
    more than B: the newest `B + 1 - P - sinks - K` tokens stay exact; the older exact tokens are scored by the
    attention of the last `lookback_window` Δ queries (remembered across steps, summed, reduced over the GQA
    group by `gqa`), the lowest `prune_ratio` of them are pruned and the rest are one mini-batch of online
    k-means per KV head: while fewer than K centroids exist, new ones are opened from the batch by deterministic
    k-means++ seeding (greedy maximin, the first by attention); every other token joins its nearest centroid
    (Euclidean, post-RoPE keys) by `centroid_update_weights` with rate `kmeans_learning_rate` (eta; null:
    Sculley's 1/m_c, the exact running mean). A centroid's bias is ln m_c (its token count), its value is
    attention-weighted: w = exp(q_mean . k / sqrt(d)), q_mean the mean of the lookback queries of the group
    (docs/methods.md#merging-rule). A centroid keeps the position of the token that opened it; it is never part of the exact
    window, which holds only tokens.
    Defaults: the study's max_cache_size 1024, num_clusters 256, pruning_interval 512, lookback_window 256 are
    kept as proportions of the budget (null: K = B // 4, P = B // 2, Δ = B // 4). The study gives no pruning
    share and no eta value: `prune_ratio=0.5` and Sculley's rate are kvexp's choices.
    Trainable (the attention-guided k-means study's distillation, `train=distill trainable=compressor`): `merged_bias` [layers, KV heads], a
    learned logit correction added to every centroid's bias ln m_c in the attention (a refit of the
    centroids' bias, learned end to end instead of by NNLS); 0 is the method above exactly. `checkpoint`: a trained
    parameters file (the run dir's checkpoint/compressor.safetensors); null: untrained.
    """

    name = "adaptive_kmeans"
    description = "every P tokens: attention-guided pruning + online k-means into K calibrated centroids (the attention-guided k-means study)"
    observes = True
    merges = True
    # tokens: how many tokens a slot stands for; centroid: 1 for a centroid; log_z: ln of a centroid's value-weight sum
    state_names = ("tokens", "centroid", "log_z")
    num_clusters: int | None = None
    pruning_interval: int | None = None
    lookback_window: int | None = None
    kmeans_learning_rate: float | None = None
    prune_ratio: float = 0.5
    sink_tokens: int = 0
    gqa: str = "mean"
    checkpoint: str | None = None
    merged_state = "centroid"
    _trained: dict[str, torch.Tensor] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._load_checkpoint()

    def clusters(self, budget: int) -> int:
        return self.num_clusters if self.num_clusters is not None else max(1, budget // 4)

    def interval(self, budget: int) -> int:
        return self.pruning_interval if self.pruning_interval is not None else max(1, budget // 2)

    def lookback(self, budget: int) -> int:
        return self.lookback_window if self.lookback_window is not None else max(1, budget // 4)

    def validate(self, budget: int | None) -> None:
        for name in ("num_clusters", "pruning_interval"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"method.{name} must be null or >= 1, got {value}")
        check_window(
            "lookback_window",
            self.lookback_window,
            minimum=1,
            nullable=True,
            null_means="a quarter of the budget",
        )
        if self.kmeans_learning_rate is not None and not 0.0 < self.kmeans_learning_rate <= 1.0:
            raise ValueError(
                f"method.kmeans_learning_rate must be null or in (0, 1], got {self.kmeans_learning_rate}"
            )
        if not 0.0 <= self.prune_ratio < 1.0:
            raise ValueError(f"method.prune_ratio must be in [0, 1), got {self.prune_ratio}")
        if self.sink_tokens < 0:
            raise ValueError(f"method.sink_tokens must be >= 0, got {self.sink_tokens}")
        if self.gqa not in GQA_REDUCTIONS:
            raise ValueError(f"method.gqa must be one of {GQA_REDUCTIONS}, got {self.gqa!r}")
        if budget is not None:
            self._check_room(budget, budget)

    def _check_room(self, budget: int, head_budget: int) -> None:
        k, p = self.clusters(budget), self.interval(budget)
        if head_budget + 1 - p - self.sink_tokens - k < 1:
            raise ValueError(
                f"adaptive_kmeans needs budget + 1 - pruning_interval - sink_tokens - num_clusters >= 1 so that an "
                f"exact window remains: budget {head_budget}, method.pruning_interval {p}, method.sink_tokens "
                f"{self.sink_tokens}, method.num_clusters {k}"
            )

    def initial_state(self, name: str) -> float:
        return 1.0 if name == "tokens" else 0.0

    def target_size(self, layer) -> int:
        return layer.budget + 1 - self.interval(layer.budget)

    def head_counts(self, layer, scores: torch.Tensor, target: int) -> torch.Tensor | None:
        if layer.head_budgets is None:
            return None
        for head_budget in layer.head_budgets:
            self._check_room(layer.budget, head_budget)
        counts = torch.tensor(layer.head_budgets, device=layer.device) + 1 - self.interval(layer.budget)
        return counts.expand(layer.batch, -1)

    def observe(self, layer, query: torch.Tensor) -> None:
        remember_queries(layer, query, self.lookback(layer.budget))

    def score(self, layer) -> Selection:
        reject_rerotate(layer, self.name)
        live, positions = layer.live(), layer.positions
        clusters = self.clusters(layer.budget)
        centroid = live & (layer.state("centroid") > 0)
        sinks = live & ~centroid & (positions < self.sink_tokens)
        tokens = live & ~centroid & ~sinks
        exact = newest(tokens, positions, layer.keep_counts() - sinks.sum(-1) - clusters)
        old = tokens & ~exact
        attention = reduce_group(window_attention(layer).sum(dim=3), self.gqa)  # [B, Hkv, n]
        # Attention-guided pruning; enough tokens are retained to open every missing cluster.
        free = clusters - centroid.sum(-1)
        retain = torch.maximum(torch.ceil(old.sum(-1) * (1 - self.prune_ratio)).long(), free)
        retained = top_ranked(attention, old, retain)
        keys = layer.keys.float()
        slots = torch.arange(layer.length, device=layer.device)
        existing = centroid.float().topk(min(clusters, layer.length), dim=-1)  # every centroid, then padding
        opened, opened_ok = farthest_points(
            keys,
            layer.state("tokens"),
            retained,
            free,
            first=attention,
            centers=gather_rows(keys, existing.indices),
            centers_valid=existing.values > 0,
        )
        is_open = torch.zeros_like(slots.expand_as(live)).scatter_add_(2, opened, opened_ok.long()) > 0
        center = centroid | is_open
        center_slots = center.float().topk(min(clusters, layer.length), dim=-1)
        choice, _ = nearest_center(keys, gather_rows(keys, center_slots.indices), center_slots.values > 0)
        join = center_slots.indices.gather(2, choice)  # [B, Hkv, n] the slot of each token's nearest centroid
        # Kept: sinks, the exact window and every centroid; the old tokens go (merged or pruned). Should a row
        # have fewer (heavy padding), the engine keeps its highest-attention old tokens as exact tokens.
        scores = torch.where(live & ~old | is_open, float("inf"), attention)
        return Selection(scores, groups=torch.where(center, slots, torch.where(retained, join, -1)))

    def merge(self, layer, kept: torch.Tensor, evicted: torch.Tensor, selection: Selection) -> None:
        target = group_targets(selection.groups, evicted)
        centroid = layer.state("centroid")
        with torch.no_grad():  # the weights are decisions (no gradient); the merged K/V carry it in training
            queries, query_positions = layer.query_window  # [B, H, w, D], [B, w]
            real = (query_positions >= 0).float()  # padding queries do not count
            grouped = queries.float().reshape(
                layer.batch, layer.kv_heads, -1, *queries.shape[2:]
            )  # [B, Hkv, G, w, D]
            total = torch.einsum("bhgwd,bw->bhd", grouped, real)
            mean_query = total / (real.sum(-1) * grouped.shape[2]).clamp_min(1)[:, None, None]  # [B, Hkv, D]
            logit = torch.einsum("bhd,bhnd->bhn", mean_query, layer.keys.float()) * layer.scaling
            log_value = torch.where(centroid > 0, layer.state("log_z"), logit)
            key_weight, value_weight, log_z = centroid_update_weights(
                target, centroid > 0, layer.state("tokens"), log_value, self.kmeans_learning_rate
            )
        fold(layer, target, value_weight=value_weight, key_weight=key_weight)
        heads = target == torch.arange(layer.length, device=layer.device)
        layer.state("log_z").copy_(torch.where(heads, log_z, layer.state("log_z")))
        centroid.masked_fill_(heads, 1.0)

    def statistics(self, layers) -> dict[str, Any]:
        centroids = [layer.state("centroid").sum(-1).float().mean().item() for layer in layers]
        return {"centroids_per_head": sum(centroids) / len(centroids) if centroids else None}
