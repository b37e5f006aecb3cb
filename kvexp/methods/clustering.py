"""The k-means machinery the clustering methods share (semantic_cluster, adaptive_kmeans, pooling_merge).

Shapes: per slot [B, Hkv, n]; keys [B, Hkv, n, D]; per cluster [B, Hkv, K]. Every function works on all
(batch, KV head) rows at once: masks say which slots take part in each row, counts may differ per row.
"""

from __future__ import annotations

import torch


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


def evicting_rows(evicted: torch.Tensor) -> torch.Tensor:
    """[B, 1, 1] bool: the batch rows whose compression evicts something (`evicted` [B, Hkv, n]); a row within its
    budget evicts nothing: alone it would not compress now."""
    return evicted.flatten(1).any(dim=-1)[:, None, None]


def group_targets(pending: torch.Tensor, evicted: torch.Tensor) -> torch.Tensor:
    """The `fold` target of every slot from a method's planned grouping `pending` [B, Hkv, n] (slot index, the
    group's own slot mapping to itself, -1 for none): the engine's evicted slots fold into their group's slot;
    a slot the engine kept although planned for a group stays as it is. A batch row that evicts nothing (within
    its budget: alone it would not compress now) forms no group."""
    slots = torch.arange(pending.shape[-1], device=pending.device)
    joins = (evicted | (pending == slots)) & (pending >= 0) & evicting_rows(evicted)
    return pending.masked_fill(~joins, -1)
