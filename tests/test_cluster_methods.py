"""The clustering / pooling merge methods (pooling_merge, semantic_cluster, adaptive_kmeans) against hand computations.

The shared k-means steps are checked on small hand-made point sets (several heads at once, different data per
head); each method is then run on a hand-built layer (GQA: 4 query heads over 2 KV heads) and its merged
keys, values, biases and counts compared with values computed here independently; exactness (a group of
identical keys is the unmerged cache for every query), budget and mass invariants and determinism are checked
on the tiny models.
"""

import math

import pytest
import torch

from kvexp.budgets import allocate
from kvexp.engine.cache import CacheOptions, CompressedLayer, KVCache
from kvexp.methods import build_method, make_cache
from kvexp.methods.adaptive_kmeans import centroid_update_weights
from kvexp.methods.clustering import farthest_points, silhouette, weighted_kmeans
from kvexp.methods.merging import fold
from kvexp.methods.pooling_merge import log_age_groups
from tests.conftest import load
from tests.test_engine import _ids

METHODS = ["pooling_merge", "semantic_cluster", "adaptive_kmeans"]
HEADS, KV_HEADS, DIM = 4, 2, 4  # GQA groups of 2


def _layer(method, budget, keys, values, head_budgets=None):
    """A cache layer holding `keys`/`values` [1, Hkv, n, D] as one step's tokens (positions 0 .. n-1)."""
    layer = CompressedLayer(0, budget, method, CacheOptions(), head_budgets=head_budgets)
    KVCache([layer])
    layer.update(keys, values)
    return layer


def _attend(query, keys, values, bias, scale):
    """Hand attention: query [H, D] over keys/values [Hkv, n, D] with per-key logit bias [Hkv, n] -> [H, D]."""
    groups = query.shape[0] // keys.shape[0]
    out = []
    for h in range(query.shape[0]):
        g = h // groups
        weight = torch.softmax(keys[g] @ query[h] * scale + bias[g], dim=0)
        out.append(weight @ values[g])
    return torch.stack(out)


def _by_position(layer, head, position):
    return int(((layer.positions[0, head] == position) & layer.live()[0, head]).nonzero()[0, 0])


# -- shared k-means steps ------------------------------------------------------------------------------------


def test_farthest_points_seed_greedily_by_weighted_distance_per_head():
    x = torch.tensor(
        [
            [[0.0, 0.0], [1.0, 0.0], [10.0, 0.0], [0.0, 5.0]],  # head 0: weights 1
            [[0.0, 0.0], [2.0, 0.0], [3.0, 0.0], [0.0, 1.0]],  # head 1: slot 2 weighs 3
            [[1.0, 1.0], [1.0, 1.0], [1.0, 1.0], [4.0, 1.0]],  # head 2: three duplicates
        ]
    )[None]
    weight = torch.tensor([[[1.0, 1, 1, 1], [1, 1, 3, 1], [1, 1, 1, 1]]])
    pool = torch.ones(1, 3, 4, dtype=torch.bool)
    picks, valid = farthest_points(x, weight, pool, torch.full((1, 3), 3), first=weight)
    # Head 0: slot 0 (first of equal weights), then 10 (d^2 100), then (0, 5) (25 beats 1).
    # Head 1: slot 2 (heaviest), then (0, 1) (d^2 10 beats 9 and 1), then slot 0 and 1 tie at 1: the first.
    # Head 2: slot 0, then (4, 1); the duplicates of slot 0 never open a cluster.
    assert picks[0, 0].tolist() == [0, 2, 3] and picks[0, 1].tolist() == [2, 3, 0]
    assert picks[0, 2, :2].tolist() == [0, 3] and valid[0].tolist() == [
        [True] * 3,
        [True] * 3,
        [True, True, False],
    ]


def test_weighted_kmeans_matches_the_hand_computation():
    points = torch.tensor([0.0, 1, 2, 10, 11, 30])
    weight = torch.tensor([1.0, 1, 2, 1, 3, 1])
    # Head 1: the same points scaled by 2 and stored in reverse slot order.
    x = torch.stack([points, 2 * points.flip(0)])[None, :, :, None]  # [1, 2, 6, 1]
    w = torch.stack([weight, weight.flip(0)])[None]
    pool = torch.ones(1, 2, 6, dtype=torch.bool)
    centers, valid = weighted_kmeans(x, w, pool, 3, iterations=5)
    # Seeding: 11 (weight 3), 30 (w d^2 = 361), 2 (2 * 81 = 162); Lloyd: {0, 1, 2x2} -> 5/4, {10, 11x3} -> 43/4.
    assert valid.all()
    assert torch.allclose(centers[0, 0, :, 0], torch.tensor([43 / 4, 30, 5 / 4]))
    assert torch.allclose(centers[0, 1, :, 0], 2 * torch.tensor([43 / 4, 30, 5 / 4]))


def test_silhouette_by_hand():
    x = torch.tensor([[0.0, 2.0, 10.0, 7.0], [0.0, 2.0, 10.0, 50.0]])[None, :, :, None]  # 2 heads
    label = torch.tensor([[[0, 0, 1, 1], [0, 0, 1, 1]]])
    pool = torch.tensor([[[True, True, True, False], [True, True, True, True]]])
    got = silhouette(x, pool, label, 2, sample=8)
    # Head 0 (slot 3 not clustered): s(0) = (10 - 2) / 10, s(2) = (8 - 2) / 8, the lone 10 scores 0.
    # Head 1: s(0) = (30 - 2) / 30, s(2) = (28 - 2) / 28, s(10) = (9 - 40) / 40, s(50) = (49 - 40) / 49.
    assert got[0, 0].item() == pytest.approx((0.8 + 0.75 + 0.0) / 3)
    assert got[0, 1].item() == pytest.approx((28 / 30 + 26 / 28 - 31 / 40 + 9 / 49) / 4)
    one_cluster = silhouette(x, pool, torch.zeros_like(label), 2, sample=8)
    assert one_cluster.isnan().all()


def test_silhouette_matches_scikit_learn_on_all_slots_and_on_a_sample():
    metrics = pytest.importorskip("sklearn.metrics")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 2, 30, 3, generator=g)
    label = torch.randint(0, 4, (1, 2, 30), generator=g)
    pool = torch.rand(1, 2, 30, generator=g) > 0.2
    full = silhouette(x, pool, label, 4, sample=64)
    sampled = silhouette(x, pool, label, 4, sample=7)
    for h in range(2):
        members = pool[0, h].nonzero()[:, 0]
        expected = metrics.silhouette_score(x[0, h, members].numpy(), label[0, h, members].numpy())
        assert full[0, h].item() == pytest.approx(expected, abs=1e-5)
        chosen = members[:: math.ceil(len(members) / 7)]  # every stride-th pool slot in slot order
        expected = metrics.silhouette_score(x[0, h, chosen].numpy(), label[0, h, chosen].numpy())
        assert sampled[0, h].item() == pytest.approx(expected, abs=1e-5)


# -- semantic_cluster ------------------------------------------------------------------------------------------


def _two_cluster_keys(seed=0):
    """14 tokens, 2 KV heads: token 0 a sink, 9..13 the window, 1..8 two tight clusters around A and B (head 0:
    1-4 and 5-8; head 1: odd and even positions)."""
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(1, KV_HEADS, 14, DIM, generator=g)
    a, b = torch.tensor([5.0, 0, 0, 0]), torch.tensor([0.0, 5, 0, 0])
    near_a = {0: [1, 2, 3, 4], 1: [1, 3, 5, 7]}
    for h in range(KV_HEADS):
        for p in range(1, 9):
            keys[0, h, p] = (a if p in near_a[h] else b) + 0.1 * torch.randn(DIM, generator=g)
    values = torch.randn(1, KV_HEADS, 14, DIM, generator=g)
    return keys, values, near_a


def test_semantic_cluster_folds_old_tokens_into_count_weighted_centroids():
    keys, values, near_a = _two_cluster_keys()
    method = build_method("semantic_cluster", num_clusters=2, sink_tokens=1)
    layer = _layer(method, 8, keys, values)
    layer.compress()
    for h in range(KV_HEADS):
        live = layer.live()[0, h]
        for members in (near_a[h], [p for p in range(1, 9) if p not in near_a[h]]):
            centroid, value = keys[0, h, members].mean(0), values[0, h, members].mean(0)
            # The cluster's slot: its member nearest the centroid, at that member's position.
            rep = members[int((keys[0, h, members] - centroid).norm(dim=-1).argmin())]
            s = _by_position(layer, h, rep)
            assert torch.allclose(layer.keys[0, h, s], centroid, atol=1e-5)
            assert torch.allclose(layer.values[0, h, s], value, atol=1e-5)
            assert layer.bias[0, h, s].item() == pytest.approx(math.log(4))
            assert layer.state("tokens")[0, h, s] == 4
        exact = [p for p in layer.positions[0, h][live].tolist() if p == 0 or p >= 9]
        assert sorted(exact) == [0, 9, 10, 11, 12, 13]  # the sink and the window, untouched
        assert live.sum() == 8
    for p in [0, 9, 13]:
        s = _by_position(layer, 1, p)
        assert torch.equal(layer.keys[0, 1, s], keys[0, 1, p]) and layer.bias[0, 1, s] == 0


def test_semantic_cluster_evicting_form_keeps_each_clusters_representative_unchanged():
    keys, values, near_a = _two_cluster_keys()
    layer = _layer(
        build_method("semantic_cluster", num_clusters=2, sink_tokens=1, fold=False), 8, keys, values
    )
    layer.compress()
    assert bool((layer.bias == 0).all()) and bool((layer.state("tokens") == 1).all())
    for h in range(KV_HEADS):
        reps = []
        for members in (near_a[h], [p for p in range(1, 9) if p not in near_a[h]]):
            centroid = keys[0, h, members].mean(0)
            reps.append(members[int((keys[0, h, members] - centroid).norm(dim=-1).argmin())])
        assert sorted(layer.positions[0, h].tolist()) == sorted([0, *reps, 9, 10, 11, 12, 13])
        for p in layer.positions[0, h].tolist():  # every kept entry is the token's own
            s = _by_position(layer, h, p)
            assert torch.equal(layer.keys[0, h, s], keys[0, h, p]) and torch.equal(
                layer.values[0, h, s], values[0, h, p]
            )
        assert (layer.state("cluster")[0, h] > 0).sum() == 2  # the representatives stand for their clusters


@pytest.mark.parametrize("cluster_every", [128, 2])
def test_semantic_cluster_keeps_running_centroids_and_reports_the_silhouette(cluster_every):
    """Tokens leaving the window join their nearest cluster, or, at a period boundary, everything is re-clustered
    with the clusters weighted by their tokens: the same running centroids here."""
    metrics = pytest.importorskip("sklearn.metrics")
    keys, values, near_a = _two_cluster_keys()
    method = build_method("semantic_cluster", num_clusters=2, sink_tokens=1, cluster_every=cluster_every)
    layer = _layer(method, 8, keys[:, :, :12], values[:, :, :12])  # window 7..11, clusters over 1..6
    layer.compress()
    # Silhouette of that clustering by scikit-learn, per head, averaged.
    expected = []
    for h in range(KV_HEADS):
        labels = [int(p in near_a[h]) for p in range(1, 7)]
        expected.append(metrics.silhouette_score(keys[0, h, 1:7].numpy(), labels))
    stats = method.statistics([layer])
    assert stats["silhouette"] == pytest.approx(sum(expected) / 2, abs=1e-5) and stats["clusterings"] == 1
    layer.update(keys[:, :, 12:], values[:, :, 12:])  # 7 and 8 leave the window; seen 12 -> 14
    layer.compress()
    for h in range(KV_HEADS):
        for members in (near_a[h], [p for p in range(1, 9) if p not in near_a[h]]):
            slot = [
                s
                for s in range(layer.length)
                if layer.state("tokens")[0, h, s] == 4 and layer.live()[0, h, s]
            ]
            match = [
                s for s in slot if torch.allclose(layer.keys[0, h, s], keys[0, h, members].mean(0), atol=1e-5)
            ]
            assert len(match) == 1  # the running centroid is the mean of all its tokens
            assert torch.allclose(layer.values[0, h, match[0]], values[0, h, members].mean(0), atol=1e-5)
    assert method.statistics([layer])["clusterings"] == (2 if cluster_every == 2 else 1)
    assert (layer.state("cluster")[0].sum(-1) == 2).all()


# -- exactness: a group of identical keys is the unmerged cache ---------------------------------------------------


@pytest.mark.parametrize(
    "method,params",
    [
        ("semantic_cluster", {"num_clusters": 3, "sink_tokens": 1}),
        ("pooling_merge", {"sink_tokens": 1}),
        ("adaptive_kmeans", {"num_clusters": 3, "sink_tokens": 1, "prune_ratio": 0.0, "pruning_interval": 1}),
    ],
)
def test_a_group_of_identical_keys_is_merged_exactly(method, params):
    g = torch.Generator().manual_seed(1)
    n, budget = 16, 10
    keys = torch.randn(1, KV_HEADS, n, DIM, generator=g)
    values = torch.randn(1, KV_HEADS, n, DIM, generator=g)
    distinct = torch.randn(KV_HEADS, 3, DIM, generator=g) * 3
    old = range(1, n - 6)  # older than every method's exact window here
    for h in range(KV_HEADS):
        if method == "pooling_merge":  # windows of consecutive tokens, the newest included: one key for all
            keys[0, h, 1:] = distinct[h, 0]
        for p in old:  # the clusterings: 3 keys, spread differently over each head's tokens
            keys[0, h, p] = distinct[h, 0] if method == "pooling_merge" else distinct[h, (p * (h + 1)) % 3]
    m = build_method(method, **params)
    layer = _layer(m, budget, keys, values)
    if m.observes:
        m.observe(layer, torch.randn(1, HEADS, 3, DIM, generator=g))
        layer.scaling = 0.5
    layer.compress()
    assert layer.length == m.target_size(layer) and (layer.bias > 0).any()  # something was merged
    query = torch.randn(HEADS, DIM, generator=g)
    merged = _attend(query, layer.keys[0], layer.values[0], layer.bias[0], 0.5)
    reference = _attend(query, keys[0], values[0], torch.zeros(KV_HEADS, n), 0.5)  # nothing pruned or dropped
    assert torch.allclose(merged, reference, atol=1e-5)
    assert (layer.state("tokens")[0] * layer.live()[0]).sum(-1).tolist() == [n] * KV_HEADS


# -- pooling_merge -----------------------------------------------------------------------------------------------


def test_log_age_groups_cut_equal_log_age_spans_by_hand():
    # 10 single tokens (seen 10), 4 groups: log-age levels k ln(11) / 4 snap to the boundaries after ranks 0, 1, 4
    # (ages 2, 3, 6): windows {9}, {8}, {7, 6, 5}, {4 .. 0}, each folded into its newest token.
    positions = torch.stack([torch.arange(10), torch.arange(10).flip(0)])[None]  # head 1: reversed slots
    groups = log_age_groups(
        positions, torch.ones(1, 2, 10), torch.ones(1, 2, 10, dtype=torch.bool), torch.tensor([[4, 4]]), 10
    )
    expected = {9: 9, 8: 8, 7: 7, 6: 7, 5: 7, 4: 4, 3: 4, 2: 4, 1: 4, 0: 4}
    for h in range(2):
        got = {int(positions[0, h, s]): int(positions[0, h, groups[0, h, s]]) for s in range(10)}
        assert got == expected
    # Pooled slots are never split: (11) (10) (9) (8) (7: 3 tokens) (4: 5 tokens) at seen 12 into 3 groups; levels
    # k ln(13) / 3 snap to the boundaries after ranks 0 and 3: {11}, {10, 9, 8}, {7, 4}.
    positions = torch.tensor([[[11, 10, 9, 8, 7, 4, -1, -1]]])
    tokens = torch.tensor([[[1.0, 1, 1, 1, 3, 5, 1, 1]]])
    region = positions >= 0
    groups = log_age_groups(positions, tokens, region, torch.tensor([[3]]), 12)
    assert groups[0, 0].tolist() == [0, 1, 1, 1, 4, 4, -1, -1]


@pytest.mark.parametrize("pooling", ["mean", "max", "best"])
def test_pooling_types_fold_each_window_into_its_newest_token(pooling):
    g = torch.Generator().manual_seed(2)
    keys, values = (
        torch.randn(1, KV_HEADS, 10, DIM, generator=g),
        torch.randn(1, KV_HEADS, 10, DIM, generator=g),
    )
    method = build_method("pooling_merge", sink_tokens=0, seq_pooling_type=pooling)
    layer = _layer(method, 4, keys, values)
    if pooling == "best":
        acc = torch.rand(1, KV_HEADS, 10, generator=g)
        layer.state("acc").copy_(acc)
    layer.compress()  # windows {9}, {8}, {7, 6, 5}, {4 .. 0} (see above)
    for h in range(KV_HEADS):
        assert sorted(layer.positions[0, h].tolist()) == [4, 7, 8, 9]
        for head, members in ((7, [5, 6, 7]), (4, [0, 1, 2, 3, 4]), (9, [9])):
            s = _by_position(layer, h, head)
            k, v = keys[0, h, members], values[0, h, members]
            if pooling == "mean":
                want_k, want_v = k.mean(0), v.mean(0)
            elif pooling == "max":
                want_k, want_v = k.amax(0), v.amax(0)
            else:
                best = members[int(acc[0, h, members].argmax())]
                want_k, want_v = keys[0, h, best], values[0, h, best]
                assert layer.state("acc")[0, h, s] == pytest.approx(acc[0, h, members].sum().item())
            assert torch.allclose(layer.keys[0, h, s], want_k, atol=1e-6)
            assert torch.allclose(layer.values[0, h, s], want_v, atol=1e-6)
            assert layer.bias[0, h, s].item() == pytest.approx(math.log(len(members)))
            assert layer.state("tokens")[0, h, s] == len(members)


def test_pooling_merge_layer_budgets_follow_the_linear_ramp():
    method = build_method("pooling_merge", steepness_coefficient=1.5)
    assert method.layer_budgets([64] * 6) == allocate("linear_ramp", 64, 6, beta=1.5)
    assert build_method("pooling_merge").layer_budgets([64] * 6) == [64] * 6  # beta 1: uniform
    # The seed's own numbers from L0: 100 [1 + k/4 (1/2 - 1)].
    fixed = build_method("pooling_merge", initial_local_window=100, steepness_coefficient=2.0)
    assert fixed.layer_budgets([64, 64, 64, None]) == [100, 87, 75, None]
    with pytest.raises(ValueError, match="steepness_coefficient"):
        build_method("pooling_merge", steepness_coefficient=20.0).layer_budgets([8] * 8)


def test_skip_prefill_compression_pools_the_prompt_at_the_first_decode_step():
    model, _ = load("tiny_llama")
    ids = _ids(model, 21)
    cache = make_cache(model, "pooling_merge", budget=8, skip_prefill_compression=True)
    with torch.no_grad():
        model(ids[:, :20], past_key_values=cache)
        assert cache.physical_lengths() == [20, 20]
        model(ids[:, 20:], past_key_values=cache)
    assert cache.physical_lengths() == [8, 8]
    assert all((layer.state("tokens")[0].sum(-1) == 21).all() for layer in cache.layers)


# -- adaptive_kmeans ----------------------------------------------------------------------------------------------


def test_centroid_update_weights_are_sculleys_step_or_a_fixed_rate():
    g = torch.Generator().manual_seed(3)
    keys, values = (
        torch.randn(1, KV_HEADS, 6, DIM, generator=g),
        torch.randn(1, KV_HEADS, 6, DIM, generator=g),
    )
    # Slot 0: a centroid of 3 tokens (ln Z = z); 1, 2 join it; 3 opens a cluster that 4 joins; 5 stays alone.
    target = torch.tensor([0, 0, 0, 3, 3, -1]).expand(1, KV_HEADS, 6)
    centroid = torch.tensor([True, False, False, False, False, False]).expand(1, KV_HEADS, 6)
    count = torch.tensor([3.0, 1, 1, 1, 1, 1]).expand(1, KV_HEADS, 6)
    log_value = torch.randn(1, KV_HEADS, 6, generator=g)
    for rate in (None, 0.25):
        layer = _layer(build_method("adaptive_kmeans"), 4, keys, values)
        layer.bias.copy_(count.log())
        layer.state("tokens").copy_(count)
        key_w, value_w, log_z = centroid_update_weights(target, centroid, count, log_value, rate)
        fold(layer, target, value_weight=value_w, key_weight=key_w)
        w = log_value.exp()
        for h in range(KV_HEADS):
            k, v, wh = keys[0, h], values[0, h], w[0, h]
            if rate is None:  # the exact running mean; values weighted by w with the centroid's Z
                want_k = (3 * k[0] + k[1] + k[2]) / 5
                want_v = (wh[0] * v[0] + wh[1] * v[1] + wh[2] * v[2]) / wh[:3].sum()
            else:
                want_k = 0.75 * k[0] + 0.25 * (k[1] + k[2]) / 2
                want_v = 0.75 * v[0] + 0.25 * (wh[1] * v[1] + wh[2] * v[2]) / wh[1:3].sum()
            assert torch.allclose(layer.keys[0, h, 0], want_k, atol=1e-5)
            assert torch.allclose(layer.values[0, h, 0], want_v, atol=1e-5)
            assert torch.allclose(
                layer.keys[0, h, 3], (k[3] + k[4]) / 2, atol=1e-5
            )  # a new cluster: plain mean
            assert torch.allclose(
                layer.values[0, h, 3], (wh[3] * v[3] + wh[4] * v[4]) / wh[3:5].sum(), atol=1e-5
            )
            assert log_z[0, h, 0].item() == pytest.approx(wh[:3].sum().log().item(), abs=1e-5)
            assert layer.bias[0, h, 0].item() == pytest.approx(math.log(5))
            assert torch.equal(layer.keys[0, h, 5], k[5])


def test_adaptive_kmeans_compression_event_by_hand():
    g = torch.Generator().manual_seed(4)
    n, scale = 13, 0.5
    keys, values = (
        torch.randn(1, KV_HEADS, n, DIM, generator=g),
        torch.randn(1, KV_HEADS, n, DIM, generator=g),
    )
    queries = torch.randn(1, HEADS, 3, DIM, generator=g)  # positions 10, 11, 12: the lookback window
    method = build_method(
        "adaptive_kmeans",
        num_clusters=2,
        pruning_interval=5,
        lookback_window=3,
        sink_tokens=1,
        prune_ratio=0.5,
    )
    layer = _layer(method, 12, keys, values)
    method.observe(layer, queries)
    layer.scaling = scale
    layer.compress()
    # Kept: 12 + 1 - 5 = 8 slots: the sink, the newest 8 - 1 - 2 = 5 tokens (8 .. 12) and 2 centroids.
    assert layer.length == 8
    for h in range(KV_HEADS):
        group = queries[0, 2 * h : 2 * h + 2]  # [G, 3, D]
        attention = torch.zeros(n)
        for r in range(2):
            for i, p in enumerate((10, 11, 12)):
                attention[: p + 1] += torch.softmax(keys[0, h, : p + 1] @ group[r, i] * scale, 0) / 2
        old = list(range(1, 8))
        retained = sorted(old, key=lambda p: -attention[p])[:4]  # ceil(7 * 0.5)
        first = retained[0]  # the highest attention opens the first cluster
        second = max(
            (p for p in retained if p != first), key=lambda p: (keys[0, h, p] - keys[0, h, first]).norm()
        )
        clusters = {first: [first], second: [second]}
        for p in retained:
            if p not in clusters:
                near = min(clusters, key=lambda c: (keys[0, h, p] - keys[0, h, c]).norm())
                clusters[near].append(p)
        mean_query = group.reshape(-1, DIM).mean(0)
        assert sorted(layer.positions[0, h].tolist()) == sorted([0, 8, 9, 10, 11, 12, first, second])
        for opener, members in clusters.items():
            s = _by_position(layer, h, opener)
            w = torch.exp(keys[0, h, members] @ mean_query * scale)
            assert torch.allclose(layer.keys[0, h, s], keys[0, h, members].mean(0), atol=1e-5)
            assert torch.allclose(
                layer.values[0, h, s], (w[:, None] * values[0, h, members]).sum(0) / w.sum(), atol=1e-5
            )
            assert layer.bias[0, h, s].item() == pytest.approx(math.log(len(members)))
            assert layer.state("centroid")[0, h, s] == 1
            assert layer.state("log_z")[0, h, s].item() == pytest.approx(w.sum().log().item(), abs=1e-5)
        assert layer.state("centroid")[0, h].sum() == 2


def test_adaptive_kmeans_compresses_every_pruning_interval_within_the_budget():
    model, _ = load("tiny_qwen3")
    ids = _ids(model, 40)
    cache = make_cache(
        model, "adaptive_kmeans", budget=12, num_clusters=2, pruning_interval=4, lookback_window=4
    )
    lengths = []
    with torch.no_grad():
        for t in range(40):
            model(ids[:, t : t + 1], past_key_values=cache)
            lengths.append(cache.layers[0].length)
    assert max(lengths) == 12
    # 13 tokens -> 9 (12 + 1 - 4); then every 4 tokens: at tokens 13, 17, ..., 37.
    assert [t + 1 for t in range(12, 40) if lengths[t] == 9] == [13, 17, 21, 25, 29, 33, 37]
    assert all(layer.compressions == 7 for layer in cache.layers)
    for layer in cache.layers:
        assert (layer.state("centroid")[0].sum(-1) == 2).all()
        assert (layer.state("tokens")[0].sum(-1) < 40).all()  # pruned tokens are gone


# -- every method: streaming invariants, determinism, validation -----------------------------------------------


@pytest.mark.parametrize(
    "method,params",
    [
        ("pooling_merge", {}),
        ("pooling_merge", {"seq_pooling_type": "max"}),
        ("pooling_merge", {"seq_pooling_type": "best"}),
        ("semantic_cluster", {"num_clusters": 3}),
        ("semantic_cluster", {"num_clusters": 3, "cluster_every": 4}),
        ("adaptive_kmeans", {"num_clusters": 3, "pruning_interval": 1}),
    ],
)
@pytest.mark.parametrize("chunk", [1, 5])
def test_streaming_keeps_the_budget_and_the_token_counts_deterministically(method, params, chunk):
    model, _ = load("tiny_qwen3")
    ids = _ids(model, 36)
    runs = []
    for _ in range(2):
        cache = make_cache(model, method, budget=12, **params)
        with torch.no_grad():
            logits = [model(ids[:, s : s + chunk], past_key_values=cache).logits for s in range(0, 36, chunk)]
            for layer in cache.layers:
                assert layer.peak_length <= 12 + chunk and layer.length == 12
                live = layer.live()
                # Every slot's bias is ln of the tokens it stands for; nothing is lost unless pruned.
                assert torch.allclose(layer.bias[live], layer.state("tokens")[live].log(), atol=1e-5)
                if method != "adaptive_kmeans":
                    assert (layer.state("tokens")[0].sum(-1) == 36).all()
        runs.append(torch.cat(logits, dim=1))
    assert torch.isfinite(runs[0]).all() and torch.equal(runs[0], runs[1])


@pytest.mark.parametrize(
    "method,params",
    [
        ("pooling_merge", {}),
        ("semantic_cluster", {"num_clusters": 2}),
        ("adaptive_kmeans", {"num_clusters": 2, "pruning_interval": 1}),
    ],
)
def test_per_head_budgets_hold_and_killed_slots_still_count(method, params):
    """The engine drops a short head's surplus by killing slots before `merge`: their tokens still join a group."""
    model, _ = load("tiny_llama")
    head_budgets = [[6, 10], [12, 8]]
    cache = make_cache(model, method, head_budgets=head_budgets, **params)
    with torch.no_grad():
        for s in range(0, 30, 3):
            model(_ids(model, 30)[:, s : s + 3], past_key_values=cache)
    assert cache.stats()["tokens_kept_per_head"] == [[6.0, 10.0], [12.0, 8.0]]
    for layer in cache.layers:
        live = layer.live()
        assert torch.allclose(layer.bias[live], layer.state("tokens")[live].log(), atol=1e-5)
        if method != "adaptive_kmeans":
            assert ((layer.state("tokens") * live)[0].sum(-1) == 30).all()


@pytest.mark.parametrize("method", METHODS)
def test_merges_reject_rerotation(method):
    model, _ = load("tiny_llama")
    cache = make_cache(
        model,
        method,
        budget=10,
        positions="rerotate",
        **({"num_clusters": 2} if method != "pooling_merge" else {}),
    )
    with pytest.raises(ValueError, match="rerotate|re-rotated"), torch.no_grad():
        model(_ids(model, 12), past_key_values=cache)


@pytest.mark.parametrize(
    "method,params,budget,option",
    [
        ("pooling_merge", {"seq_pooling_type": "median"}, 64, "seq_pooling_type"),
        ("pooling_merge", {"sink_tokens": 64}, 64, "sink_tokens"),
        ("pooling_merge", {"initial_local_window": 2}, 64, "initial_local_window"),
        ("semantic_cluster", {"num_clusters": 64}, 64, "num_clusters"),
        ("semantic_cluster", {"silhouette_sample": 1}, 64, "silhouette_sample"),
        ("adaptive_kmeans", {"pruning_interval": 40, "num_clusters": 30}, 64, "pruning_interval"),
        ("adaptive_kmeans", {"prune_ratio": 1.0}, 64, "prune_ratio"),
        ("adaptive_kmeans", {"kmeans_learning_rate": 0.0}, 64, "kmeans_learning_rate"),
    ],
)
def test_bad_parameters_name_the_option(method, params, budget, option):
    model, _ = load("tiny_llama")
    with pytest.raises(ValueError, match=option):
        make_cache(model, method, budget=budget, **params)
