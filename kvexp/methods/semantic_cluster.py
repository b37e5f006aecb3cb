"""The H2O study's semantic clustering as a calibrated merge, plus the k-means machinery the clustering methods share.

Shapes: per slot [B, Hkv, n]; keys [B, Hkv, n, D]; per cluster [B, Hkv, K]. Every function works on all
(batch, KV head) rows at once: masks say which slots take part in each row, counts may differ per row.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from kvexp.methods.base import Method, TrainableMergedBias, register
from kvexp.methods.merging import fold, reject_rerotate


def keep_counts(layer, method: Method) -> torch.Tensor:
    """Live entries each KV head keeps at this compression [B, Hkv], as the engine's selection decides it: the
    method's own per-head counts, else the per-head budgets, else the method's target size."""
    target = method.target_size(layer)
    counts = method.head_counts(layer, None, target)
    if counts is None:
        counts = torch.tensor(
            layer.head_budgets if layer.head_budgets is not None else target, device=layer.device
        )
    return counts.expand(layer.batch, layer.kv_heads)


def newest(mask: torch.Tensor, positions: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """[B, Hkv, n] bool: per row, the `count` [B, Hkv] slots of `mask` holding the latest positions."""
    order = positions.masked_fill(~mask, -2).argsort(dim=-1, descending=True, stable=True)
    rank = order.argsort(dim=-1)
    return mask & (rank < count[..., None])


def top_ranked(score: torch.Tensor, mask: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """[B, Hkv, n] bool: per row, the `count` slots of `mask` with the highest `score` (ties: physical order)."""
    order = score.masked_fill(~mask, float("-inf")).argsort(dim=-1, descending=True, stable=True)
    return mask & (order.argsort(dim=-1) < count[..., None])


def squared_distances(x: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    """||x_i - c_k||^2: x [B, Hkv, n, D], centers [B, Hkv, K, D] -> [B, Hkv, n, K] (fp32, clamped at 0)."""
    x, centers = x.float(), centers.float()
    cross = x @ centers.transpose(-1, -2)
    return (x.square().sum(-1)[..., None] + centers.square().sum(-1)[..., None, :] - 2 * cross).clamp_min(0.0)


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x [B, Hkv, n, D] at index [B, Hkv, K] -> [B, Hkv, K, D]."""
    return x.gather(2, index[..., None].expand(-1, -1, -1, x.shape[-1]))


def farthest_points(
    x: torch.Tensor,  # [B, Hkv, n, D] fp32
    weight: torch.Tensor,  # [B, Hkv, n] how many tokens a slot stands for
    pool: torch.Tensor,  # [B, Hkv, n] bool: slots that may be picked
    count: torch.Tensor,  # [B, Hkv] how many to pick per row
    first: torch.Tensor,  # [B, Hkv, n] priority of the first pick in a row without `centers`
    centers: torch.Tensor | None = None,  # [B, Hkv, C, D] centers that already exist
    centers_valid: torch.Tensor | None = None,  # [B, Hkv, C] bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic k-means++ seeding (greedy maximin): each pick is the pool slot with the largest
    `weight * d^2` to its nearest center so far (existing `centers` included), so outliers become their own
    clusters. Only slots at a positive distance are picked: duplicates of a center never open a second cluster.
    Returns the picked slots [B, Hkv, count.max()] and which picks are real (rows may run out of distinct
    points)."""
    inf = float("inf")
    nearest = torch.full_like(weight, inf, dtype=torch.float32)
    if centers is not None and centers.shape[2] > 0:
        d2 = squared_distances(x, centers).masked_fill(~centers_valid[:, :, None, :], inf)
        nearest = d2.amin(dim=-1)
    available = pool.clone()
    picks, valid = [], []
    for step in range(int(count.max()) if count.numel() else 0):
        gain = torch.where(nearest.isinf(), first.float(), weight.float() * nearest)
        gain = gain.masked_fill(~available, -inf).masked_fill(nearest <= 0, -inf)
        best, index = gain.max(dim=-1)  # [B, Hkv]
        real = (step < count) & (best > -inf)
        picks.append(index)
        valid.append(real)
        available.scatter_(2, index[..., None], False)
        distance = squared_distances(x, gather_rows(x, index[..., None]))[..., 0]
        nearest = torch.where(real[..., None], torch.minimum(nearest, distance), nearest)
    if not picks:
        empty = count.new_zeros(*count.shape, 0)
        return empty, empty.bool()
    return torch.stack(picks, dim=-1), torch.stack(valid, dim=-1)


def nearest_center(x: torch.Tensor, centers: torch.Tensor, valid: torch.Tensor):
    """Each slot's nearest valid center: (index [B, Hkv, n], squared distances [B, Hkv, n, K])."""
    d2 = squared_distances(x, centers).masked_fill(~valid[:, :, None, :], float("inf"))
    return d2.argmin(dim=-1), d2


def weighted_kmeans(
    x: torch.Tensor, weight: torch.Tensor, pool: torch.Tensor, clusters: int, iterations: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted k-means (Lloyd) of the `pool` slots of every row into at most `clusters` centers: seeded by
    `farthest_points` (the heaviest slot first), then `iterations` rounds of assign / weighted mean (an empty
    cluster keeps its center). A slot's weight is the number of tokens it stands for, so re-clustering merged
    slots is k-means of the tokens they summarize. Returns centers [B, Hkv, K, D] and their validity."""
    count = torch.full(pool.shape[:2], clusters, device=pool.device)
    picks, valid = farthest_points(x, weight, pool, count, first=weight)
    centers = gather_rows(x, picks)
    w = (weight * pool).float()
    for _ in range(iterations):
        label, _ = nearest_center(x, centers, valid)
        member = torch.nn.functional.one_hot(label, centers.shape[2]).float() * w[..., None]  # [B, Hkv, n, K]
        mass = member.sum(dim=2)  # [B, Hkv, K]
        means = (member.transpose(-1, -2) @ x) / mass.clamp_min(1e-30)[..., None]
        centers = torch.where((mass > 0)[..., None], means, centers)
    return centers, valid


def silhouette(
    x: torch.Tensor, pool: torch.Tensor, label: torch.Tensor, clusters: int, sample: int
) -> torch.Tensor:
    """Mean silhouette (Euclidean) of each row's clustering of its `pool` slots [B, Hkv] (NaN where fewer than 2
    clusters): scikit-learn's `silhouette_score` of the clustered keys, one point per slot (a slot alone in its
    cluster scores 0). Rows with more than `sample` pool slots are scored on an evenly strided deterministic
    sample of them (the sample's own silhouette, as scikit-learn's `sample_size`).
    """
    n = pool.sum(dim=-1, keepdim=True)  # [B, Hkv, 1]
    stride = (n + sample - 1) // sample
    rank = pool.long().cumsum(dim=-1) - 1
    chosen = pool & (rank % stride.clamp_min(1) == 0)
    keep, index = chosen.float().topk(min(sample, x.shape[2]), dim=-1)  # chosen slots first
    xs, ws, own = gather_rows(x.float(), index), keep, label.gather(2, index)  # ws: 1 sampled, 0 padding
    member = torch.nn.functional.one_hot(own, clusters).float() * ws[..., None]  # [B, Hkv, S, K]
    dist = torch.cdist(xs, xs, compute_mode="donot_use_mm_for_euclid_dist")  # [B, Hkv, S, S], exact zeros
    to_cluster = dist @ member  # [B, Hkv, S, K]: summed distance to each cluster's members
    size = member.sum(dim=2)  # [B, Hkv, K]
    own_size = size.gather(2, own)
    a = to_cluster.gather(3, own[..., None])[..., 0] / (own_size - 1).clamp_min(1)
    other = (size[:, :, None, :] > 0) & (torch.arange(clusters, device=x.device) != own[..., None])
    b = (to_cluster / size[:, :, None, :].clamp_min(1)).masked_fill(~other, float("inf")).amin(dim=-1)
    s = ((b - a) / torch.maximum(a, b)).nan_to_num(0.0)
    s = torch.where((own_size > 1) & b.isfinite(), s, 0.0)
    score = (s * ws).sum(-1) / ws.sum(-1).clamp_min(1)
    return score.masked_fill((size > 0).sum(dim=-1) < 2, float("nan"))


def group_targets(pending: torch.Tensor, evicted: torch.Tensor) -> torch.Tensor:
    """The `fold` target of every slot from a method's planned grouping `pending` [B, Hkv, n] (slot index, the
    group's own slot mapping to itself, -1 for none): the engine's evicted slots fold into their group's slot;
    a slot the engine kept although planned for a group stays as it is."""
    slots = torch.arange(pending.shape[-1], device=pending.device)
    joins = (evicted | (pending == slots)) & (pending >= 0)
    return pending.masked_fill(~joins, -1)


@register
@dataclass
class SemanticCluster(TrainableMergedBias, Method):
    """The H2O study's SemanticClusterCache (k-means of key vectors) made a calibrated merge (docs/methods.md#semantic_cluster).

    A layer keeps `sink_tokens` sinks, the newest `budget - sink_tokens - K` tokens exactly, and K cluster
    entries that summarize everything older. Every `cluster_every` tokens (the study's re-clustering period; also
    at the first compressions, until a head holds K clusters) the slots older than the exact window (the
    clusters, weighted by the tokens they stand for, and the tokens that left the window) are re-clustered per
    KV head by weighted k-means on the post-RoPE keys (Euclidean, as the study's scikit-learn KMeans:
    deterministic k-means++ seeding by greedy maximin, then `iterations` Lloyd rounds, vectorized over heads),
    and each cluster is folded into its member nearest the centroid (the study's representative token). Between
    re-clusterings a token leaving the window joins its nearest cluster (the assignment step of k-means; the
    fold keeps the centroid the running mean). The fold: key = count-weighted centroid, bias = ln(tokens),
    value = count-weighted mean (query-agnostic); a cluster of identical keys is exact. A cluster keeps its
    representative's position, older than the exact window, so it never enters it. K = `num_clusters`, or
    budget // 8 (the study's K32 at budget 256).
    Deviations: the study evicts (keeps one representative per cluster, clustering the head-mean keys of the
    whole cache); here every token is merged into a cluster of its own KV head, and only the tokens older than
    the exact window are clustered. The silhouette of every re-clustering (scikit-learn's, of the clustered
    slots' keys: at a prefill the tokens' own keys, later the clusters and the tokens that joined them; on a
    strided sample of `silhouette_sample` slots when larger) is averaged per layer into `statistics`, over
    every re-clustering this method instance ran.
    Trainable (`train=distill trainable=compressor`): `merged_bias` [layers, KV heads], a learned logit correction
    added to every cluster entry's bias ln(tokens) in the attention (a refit of the merged entries' bias, learned end to
    end); 0 is the method above exactly. `checkpoint`: a trained parameters file; null: untrained.
    """

    name = "semantic_cluster"
    description = "per-head weighted k-means of old keys into K calibrated centroids + exact recent window (the H2O study)"
    merges = True
    # tokens: how many tokens a slot stands for; cluster: 1 for a cluster slot
    state_names = ("tokens", "cluster")
    num_clusters: int | None = None
    cluster_every: int = 128
    iterations: int = 10
    sink_tokens: int = 0
    silhouette_sample: int = 256
    checkpoint: str | None = None
    merged_state = "cluster"
    _pending: dict[int, torch.Tensor] = field(default_factory=dict, init=False, repr=False, compare=False)
    _quality: dict[int, list[float]] = field(default_factory=dict, init=False, repr=False, compare=False)
    _trained: dict[str, torch.Tensor] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._load_checkpoint()

    def clusters(self, budget: int) -> int:
        return self.num_clusters if self.num_clusters is not None else max(1, budget // 8)

    def validate(self, budget: int | None) -> None:
        if self.num_clusters is not None and self.num_clusters < 1:
            raise ValueError(f"method.num_clusters must be null or >= 1, got {self.num_clusters}")
        if self.cluster_every < 1:
            raise ValueError(f"method.cluster_every must be >= 1, got {self.cluster_every}")
        if self.iterations < 0:
            raise ValueError(f"method.iterations must be >= 0, got {self.iterations}")
        if self.sink_tokens < 0:
            raise ValueError(f"method.sink_tokens must be >= 0, got {self.sink_tokens}")
        if self.silhouette_sample < 2:
            raise ValueError(f"method.silhouette_sample must be >= 2, got {self.silhouette_sample}")
        if budget is not None and self.sink_tokens + self.clusters(budget) >= budget:
            raise ValueError(
                f"method.sink_tokens ({self.sink_tokens}) + method.num_clusters ({self.clusters(budget)}) must be "
                f"smaller than the budget ({budget}) so that an exact recent window remains"
            )

    def initial_state(self, name: str) -> float:
        return 1.0 if name == "tokens" else 0.0

    def score(self, layer) -> torch.Tensor:
        reject_rerotate(layer, self.name)
        live, positions = layer.live(), layer.positions
        clusters = self.clusters(layer.budget)
        sinks = live & (positions < self.sink_tokens)
        exact = keep_counts(layer, self) - sinks.sum(-1) - clusters
        pool = live & ~sinks & ~newest(live & ~sinks, positions, exact)
        keys, tokens = layer.keys.float(), layer.state("tokens")
        held = pool & (layer.state("cluster") > 0)
        period = layer.seen // self.cluster_every != (layer.seen - layer.new_tokens) // self.cluster_every
        if period or bool((held.sum(-1) < clusters).any()):
            centers, valid = weighted_kmeans(keys, tokens, pool, clusters, self.iterations)
            label, d2 = nearest_center(keys, centers, valid)
            # The representative of a cluster: its member nearest the centroid.
            members = pool[..., None] & (label[..., None] == torch.arange(clusters, device=label.device))
            rep_d2, rep = d2.masked_fill(~members, float("inf")).min(dim=2)  # [B, Hkv, K]
            valid = rep_d2.isfinite()
            self._record(layer.layer_idx, silhouette(keys, pool, label, clusters, self.silhouette_sample))
        else:  # the clusters stay; the new old tokens join their nearest one
            rep = held.float().topk(clusters, dim=-1).indices  # [B, Hkv, K]: the cluster slots
            valid = torch.ones_like(rep, dtype=torch.bool)
            label, d2 = nearest_center(keys, gather_rows(keys, rep), valid)
            own_cluster = torch.full_like(label, -1).scatter_(
                2, rep, torch.arange(clusters, device=rep.device).expand_as(rep)
            )
            label = torch.where(held, own_cluster, label)
        own = d2.gather(3, label[..., None])[..., 0]  # [B, Hkv, n]
        is_rep = torch.zeros_like(label).scatter_add_(2, rep, valid.long()) > 0
        self._pending[layer.layer_idx] = torch.where(pool, rep.gather(2, label), -1)
        # Sinks, the window and one representative per cluster stay; if a cluster came out empty (fewer distinct
        # keys than K) the engine keeps the pool slots nearest their centroid instead, unmerged.
        return torch.where(live & ~pool | is_rep, float("inf"), -own)

    def merge(self, layer, kept: torch.Tensor, evicted: torch.Tensor) -> None:
        target = group_targets(self._pending.pop(layer.layer_idx), evicted)
        fold(layer, target)
        layer.state("cluster").copy_(target == torch.arange(layer.length, device=layer.device))

    def _record(self, layer_idx: int, scores: torch.Tensor) -> None:
        scores = scores[scores.isfinite()]
        if scores.numel():
            total = self._quality.setdefault(layer_idx, [0.0, 0])
            total[0] += scores.mean().item()
            total[1] += 1

    def statistics(self, layers) -> dict[str, Any]:
        per_layer = [
            self._quality[i][0] / self._quality[i][1] if i in self._quality else None
            for i in (layer.layer_idx for layer in layers)
        ]
        measured = [s for s in per_layer if s is not None]
        return {
            "silhouette": sum(measured) / len(measured) if measured else None,
            "silhouette_per_layer": per_layer,
            "clusterings": sum(q[1] for q in self._quality.values()),
        }
