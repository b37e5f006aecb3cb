"""The H2O study's semantic clustering as a calibrated merge (the k-means machinery is kvexp/methods/clustering.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from kvexp.engine import Selection
from kvexp.methods.base import Method, TrainableMergedBias, register
from kvexp.methods.clustering import (
    evicting_rows,
    gather_rows,
    group_targets,
    nearest_center,
    newest,
    silhouette,
    weighted_kmeans,
)
from kvexp.methods.merging import fold, reject_rerotate
from kvexp.methods.scoring import tokens_seen


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
    `fold=false` is the study's evicting form: the same clusters, but each keeps its representative token as it
    is (its own key and value, bias 0) and the other members are evicted; every entry then weighs 1 at the next
    re-clustering.
    Deviations: the study clusters the head-mean keys of the whole cache (one token set for all heads); here
    each KV head clusters its own keys, and only the tokens older than the exact window are clustered. The
    silhouette of every re-clustering (scikit-learn's, of the clustered slots' keys: at a prefill the tokens'
    own keys, later the clusters and the tokens that joined them; on a strided sample of `silhouette_sample`
    slots when larger) is averaged per layer into `statistics`, over the re-clusterings of the cache.
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
    fold: bool = True
    checkpoint: str | None = None
    merged_state = "cluster"
    _trained: dict[str, torch.Tensor] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._load_checkpoint()

    @property
    def row_budgets(self) -> bool:  # a set K: each row's exact window is the rest of its own kept count
        return self.num_clusters is not None

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

    def score(self, layer) -> Selection:
        reject_rerotate(layer, self.name)
        live, positions = layer.live(), layer.positions
        clusters = self.clusters(layer.budget)
        sinks = live & (positions < self.sink_tokens)
        exact = layer.keep_counts() - sinks.sum(-1) - clusters
        pool = live & ~sinks & ~newest(live & ~sinks, positions, exact)
        keys, tokens = layer.keys.float(), layer.state("tokens")
        held = pool & (layer.state("cluster") > 0)
        # Each batch row re-clusters on its own schedule: its own tokens seen (a left-padded row's are fewer).
        seen = tokens_seen(positions)[:, 0, 0]  # [B]
        before = (seen - layer.new_tokens).clamp_min(0)
        period = seen // self.cluster_every != before // self.cluster_every
        recluster = period | (held.sum(-1) < clusters).any(-1)  # [B]
        if bool(recluster.any()):
            centers, valid = weighted_kmeans(keys, tokens, pool, clusters, self.iterations)
            label, d2 = nearest_center(keys, centers, valid)
            # The representative of a cluster: its member nearest the centroid.
            members = pool[..., None] & (label[..., None] == torch.arange(clusters, device=label.device))
            rep_d2, rep = d2.masked_fill(~members, float("inf")).min(dim=2)  # [B, Hkv, K]
            valid = rep_d2.isfinite()
            self._record(layer, silhouette(keys, pool, label, clusters, self.silhouette_sample)[recluster])
            fresh = (rep, valid, label, d2)
        if not bool(recluster.all()):  # the clusters stay; the new old tokens join their nearest one
            rep = held.float().topk(clusters, dim=-1).indices  # [B, Hkv, K]: the cluster slots
            valid = torch.ones_like(rep, dtype=torch.bool)
            label, d2 = nearest_center(keys, gather_rows(keys, rep), valid)
            own_cluster = torch.full_like(label, -1).scatter_(
                2, rep, torch.arange(clusters, device=rep.device).expand_as(rep)
            )
            label = torch.where(held, own_cluster, label)
            if bool(recluster.any()):  # rows of both kinds in one batch
                rows = recluster.view(-1, 1, 1)
                rep, valid = torch.where(rows, fresh[0], rep), torch.where(rows, fresh[1], valid)
                label, d2 = torch.where(rows, fresh[2], label), torch.where(rows[..., None], fresh[3], d2)
        own = d2.gather(3, label[..., None])[..., 0]  # [B, Hkv, n]
        is_rep = torch.zeros_like(label).scatter_add_(2, rep, valid.long()) > 0
        # Sinks, the window and one representative per cluster stay; if a cluster came out empty (fewer distinct
        # keys than K) the engine keeps the pool slots nearest their centroid instead, unmerged.
        scores = torch.where(live & ~pool | is_rep, float("inf"), -own)
        return Selection(scores, groups=torch.where(pool, rep.gather(2, label), -1))

    def merge(self, layer, kept: torch.Tensor, evicted: torch.Tensor, selection: Selection) -> None:
        target = group_targets(selection.groups, evicted)
        if self.fold:
            fold(layer, target)
        clustered = target == torch.arange(layer.length, device=layer.device)
        # A batch row that evicts nothing (within its budget, `group_targets`) keeps its clusters as they were.
        layer.state("cluster").copy_(
            torch.where(evicting_rows(evicted), clustered, layer.state("cluster") > 0)
        )

    def _record(self, layer, scores: torch.Tensor) -> None:
        """Add one clustering's mean silhouette to the layer's running [sum, count]."""
        scores = scores[scores.isfinite()]
        if scores.numel():
            total = layer.scratch(self).setdefault("silhouette", [0.0, 0])
            total[0] += scores.mean().item()
            total[1] += 1

    def statistics(self, layers) -> dict[str, Any]:
        quality = [layer.scratch(self).get("silhouette") for layer in layers]
        per_layer = [q[0] / q[1] if q is not None else None for q in quality]
        measured = [s for s in per_layer if s is not None]
        return {
            "silhouette": sum(measured) / len(measured) if measured else None,
            "silhouette_per_layer": per_layer,
            "clusterings": sum(q[1] for q in quality if q is not None),
        }
