"""The wrapper methods (merging, chunk, compression_ratio_decoding, compose) and block-wise prefill against hand
computations.

Each rule is recomputed here from the plain model's keys and values: after one prefill step every layer's K/V are
the uncompressed cache's (a layer compresses after its attention), and layer 0's keys never depend on the cache, so
block-wise and step-by-step runs can be checked there too. Exact cases go through kvexp's attention function. The
engine matrix (tests/test_engine.py) proves chunk, compose and compression_ratio_decoding against the masking
oracle and merging's budgets; tests/test_batching.py the batched rows.
"""

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from kvexp.engine.attention import kvexp_attention
from kvexp.engine.cache import CacheOptions, CompressedLayer, KVCache
from kvexp.methods import build_method, make_cache
from kvexp.methods.merging_wrapper import merge_share
from kvexp.methods.scoring import rank_within_groups
from tests.conftest import load
from tests.test_config import _compose

HKV, G, D, SCALE = 2, 2, 4, 0.5


def _ids(model, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, model.config.vocab_size, (1, n), generator=g)


@torch.no_grad()
def _full(model, ids):
    """The uncompressed cache's keys and values per layer ([Hkv, n, D] each, batch row 0)."""
    cache = make_cache(model, "full")
    model(ids, past_key_values=cache)
    return [(layer.keys[0].float(), layer.values[0].float()) for layer in cache.layers]


def _slot(layer, head, position):
    return int((layer.positions[0, head] == position).nonzero()[0, 0])


def _kept(layer, head):
    live = layer.live()[0, head]
    return sorted(layer.positions[0, head][live].tolist())


def _random(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _layer(method, budget, keys, values, positions="original", **params):
    """A one-layer cache holding keys/values [1, Hkv, L, D], run by `method` at `budget`."""
    layer = CompressedLayer(0, budget, build_method(method, **params), CacheOptions(positions=positions))
    KVCache([layer])
    layer.update(keys, values)
    layer.scaling = SCALE
    return layer


def _attend(layer, query, new_key, new_value):
    """kvexp's attention of `query` [1, H, 1, D] over the layer plus one new token: [H, D]."""
    keys, values = layer.update(new_key, new_value)
    out, _ = kvexp_attention(SimpleNamespace(layer_idx=0, training=False), query, keys, values, None, SCALE)
    return out[0, 0]


# -- merging ---------------------------------------------------------------------------------------------------------


@torch.no_grad()
def test_merging_folds_each_evicted_entry_into_its_most_similar_kept_key_by_the_calibrated_rule():
    """KnormPress keeps the lowest-norm keys; each evicted key joins the kept key of its head with the highest
    cosine (if >= 0); a kept key and its group become their mean key and mean value with bias ln(size)."""
    model, _ = load("tiny_llama")
    ids, budget = _ids(model, 24), 10
    full = _full(model, ids)
    cache = make_cache(model, "merging", budget=budget)
    model(ids, past_key_values=cache)
    merged_somewhere = False
    for (keys, values), layer in zip(full, cache.layers, strict=True):
        for h in range(layer.kv_heads):
            norms = keys[h].norm(dim=-1)
            kept = norms.argsort()[:budget].tolist()
            groups = {t: [t] for t in kept}
            for e in range(keys.shape[1]):
                if e in groups:
                    continue
                cosine = [float(F.cosine_similarity(keys[h, e], keys[h, t], dim=0)) for t in kept]
                best = max(range(budget), key=lambda i: cosine[i])
                if cosine[best] >= 0.0:
                    groups[kept[best]].append(e)
            assert _kept(layer, h) == sorted(kept)
            for t, members in groups.items():
                s = _slot(layer, h, t)
                merged_somewhere |= len(members) > 1
                assert torch.allclose(layer.keys[0, h, s].float(), keys[h, members].mean(0), atol=1e-5)
                assert torch.allclose(layer.values[0, h, s].float(), values[h, members].mean(0), atol=1e-5)
                assert layer.bias[0, h, s].item() == pytest.approx(math.log(len(members)), abs=1e-6)
    assert merged_somewhere
    stats = cache.stats()["method_stats"]
    evicted = (24 - budget) * cache.layers[0].kv_heads * len(cache.layers)
    assert stats["merged"] + stats["dropped"] == evicted and stats["merged"] > 0


def _copies():
    """Keys [1, Hkv, 7, D] whose evicted entries (positions 1, 2, 3 under streaming_llm with one sink at budget 4)
    are copies of kept keys: 1 and 3 of 4, 2 of 5; the values all differ."""
    keys, values = _random(1, HKV, 7, D), _random(1, HKV, 7, D, seed=1)
    keys[:, :, [1, 2, 3]] = keys[:, :, [4, 5, 4]]
    return keys, values


def test_merging_identical_keys_keeps_the_attention_exact_with_the_calibrated_rule_only():
    keys, values = _copies()
    query, new_key, new_value = (
        _random(1, HKV * G, 1, D, seed=3),
        _random(1, HKV, 1, D, seed=4),
        _random(1, HKV, 1, D, seed=5),
    )
    plain = _attend(_layer("full", None, keys, values), query, new_key, new_value)
    params = {"scorer": "streaming_llm", "scorer_params": {"sink_tokens": 1}}

    layer = _layer("merging", 4, keys, values, **params)
    layer.compress()
    for h in range(HKV):
        assert _kept(layer, h) == [0, 4, 5, 6]
        four, five = _slot(layer, h, 4), _slot(layer, h, 5)
        assert layer.bias[0, h, four].item() == pytest.approx(math.log(3.0))
        assert layer.bias[0, h, five].item() == pytest.approx(math.log(2.0))
        assert torch.allclose(layer.values[0, h, four], values[0, h, [1, 3, 4]].mean(0), atol=1e-6)
        assert torch.allclose(layer.keys[0, h, four], keys[0, h, 4], atol=1e-6)
    assert torch.allclose(_attend(layer, query, new_key, new_value), plain, atol=1e-5)

    # kvpress's blend: keys and biases stay, v* = (v_t + sum w_i v_i) / (1 + sum w_i),
    # w_i = max(cos, 0) |v_i| / (|v_i| + |v_t| + 1e-6): the group's mass is not kept.
    layer = _layer("merging", 4, keys, values, variant="kvpress", **params)
    layer.compress()
    for h in range(HKV):
        four = _slot(layer, h, 4)
        v_t = values[0, h, 4]
        total, weight = v_t.clone(), 1.0
        for i in (1, 3):
            cos = float(F.cosine_similarity(keys[0, h, i], keys[0, h, 4], dim=0))
            w = max(cos, 0.0) * values[0, h, i].norm() / (values[0, h, i].norm() + v_t.norm() + 1e-6)
            total, weight = total + w * values[0, h, i], weight + w
        assert torch.allclose(layer.values[0, h, four], total / weight, atol=1e-6)
        assert torch.equal(layer.keys[0, h, four], keys[0, h, 4])
    assert (layer.bias == 0).all()
    assert (_attend(layer, query, new_key, new_value) - plain).abs().max() > 1e-3


def test_merging_threshold_above_every_similarity_is_the_scorer_alone():
    model, _ = load("tiny_llama")
    ids = _ids(model, 30, seed=2)
    caches = []
    for method, params in (("knorm", {}), ("merging", {"similarity_threshold": 1.0})):
        cache = make_cache(model, method, budget=9, **params)
        with torch.no_grad():
            for t in range(0, 30, 5):
                model(ids[:, t : t + 5], past_key_values=cache)
        caches.append(cache)
    for alone, merged in zip(caches[0].layers, caches[1].layers, strict=True):
        assert torch.equal(alone.positions, merged.positions)
        assert torch.equal(alone.keys, merged.keys) and torch.equal(alone.values, merged.values)
        assert (merged.bias == 0).all()
    assert caches[1].stats()["method_stats"]["merged"] == 0


@pytest.mark.parametrize("fraction", [0.25, 0.5, 0.75, 0.9])
def test_merge_fraction_merges_the_count_of_kvpress_quantile(fraction):
    """kvpress merges the evicted entries whose similarity is >= the linear quantile at 1 - fraction of all
    evicted similarities (failed ones at -inf); kvexp merges the same count, the most similar."""
    g = torch.Generator().manual_seed(7)
    similarity = torch.rand(2, 3, 11, generator=g) * 2 - 1
    evicted = torch.rand(2, 3, 11, generator=g) < 0.7
    evicted[0, 0] = False
    evicted[0, 0, 4] = True  # a head with one evicted entry
    similarity = similarity.masked_fill(~evicted, float("-inf"))
    mergeable = similarity >= 0.0
    chosen = merge_share(similarity, mergeable, evicted, fraction)
    for b in range(2):
        for h in range(3):
            sims = similarity[b, h][evicted[b, h]]
            ok = mergeable[b, h][evicted[b, h]]
            if not ok.any():
                assert not chosen[b, h].any()
                continue
            threshold = sims.masked_fill(~ok, float("-inf")).quantile(1.0 - fraction)
            mine = chosen[b, h][evicted[b, h]]
            if threshold.isnan():  # the quantile fell among the failed entries: kvpress merges nothing there
                m = len(sims)
                count = min(m - math.ceil((1 - fraction) * (m - 1)), int(ok.sum()))
                assert mine.tolist() == (sims >= sims[ok].sort(descending=True).values[count - 1]).tolist()
                continue
            assert mine.tolist() == (ok & (sims >= threshold)).tolist()
            assert not chosen[b, h][~evicted[b, h]].any()


def test_merging_options_fail_naming_the_option():
    with pytest.raises(ValueError, match="method.variant"):
        build_method("merging", variant="average").validate(8)
    with pytest.raises(ValueError, match="method.similarity_threshold"):
        build_method("merging", similarity_threshold=1.5).validate(8)
    with pytest.raises(ValueError, match="method.merge_fraction"):
        build_method("merging", merge_fraction=0.0).validate(8)
    with pytest.raises(ValueError, match="method.scorer must be one of"):
        build_method("merging", scorer="simcalkv")  # a merging scorer: one merge per compression
    with pytest.raises(ValueError, match="method.scorer_params"):
        build_method("merging", scorer="snapkv", scorer_params={"window": 4})
    with pytest.raises(ValueError, match="method.scorer_params.*window_size"):
        build_method("merging", scorer="snapkv", scorer_params={"window_size": 0}).validate(8)
    keys, values = _copies()
    layer = _layer("merging", 4, keys, values, positions="rerotate", scorer="streaming_llm")
    with pytest.raises(ValueError, match="re-rotated"):
        layer.compress()


# -- chunk -----------------------------------------------------------------------------------------------------------


def test_rank_within_groups_ranks_each_group_best_first_newer_first_on_ties():
    scores = torch.tensor([[[0.5, 2.0, 0.5, -1.0, 3.0, 0.5, float("-inf")]]])
    positions = torch.tensor([[[0, 1, 2, 3, 4, 5, 6]]])
    groups = torch.tensor([[[0, 0, 0, 1, 1, 0, 1]]])
    valid = scores.isfinite()
    rank = rank_within_groups(scores, positions, groups, valid)
    # group 0: 2.0 (pos 1), then the 0.5s newest first (pos 5, 2, 0); group 1: 3.0, -1.0
    assert rank[0, 0, [1, 5, 2, 0]].tolist() == [0, 1, 2, 3]
    assert rank[0, 0, [4, 3]].tolist() == [0, 1]


def _chunk_choice(norms, budget, chunk_length):
    """Hand ChunkPress with KnormPress over positions 0 .. n-1 of one head: the entry t-th best (lowest norm) in its
    chunk of `size` positions scores 1 - t / size; the budget's best by (score, position) stay."""
    n = len(norms)
    entries = []
    for start in range(0, n, chunk_length):
        members = list(range(start, min(start + chunk_length, n)))
        for t, p in enumerate(sorted(members, key=lambda p: norms[p])):
            entries.append((1.0 - t / len(members), p))
    return sorted(p for _, p in sorted(entries, reverse=True)[:budget])


@pytest.mark.parametrize("n,budget", [(40, 15), (37, 10), (37, 25), (35, 21)])
@torch.no_grad()
def test_chunk_keeps_an_equal_share_of_every_chunk_by_the_scorers_ranking(n, budget):
    model, _ = load("tiny_llama")
    ids = _ids(model, n, seed=3)
    full = _full(model, ids)
    cache = make_cache(model, "chunk", budget=budget, scorer="knorm", chunk_length=8)
    model(ids, past_key_values=cache)
    for (keys, _), layer in zip(full, cache.layers, strict=True):
        for h in range(layer.kv_heads):
            norms = keys[h].norm(dim=-1).tolist()
            kept = _kept(layer, h)
            assert kept == _chunk_choice(norms, budget, 8)
            for start in range(0, n, 8):
                size = min(8, n - start)
                count = sum(start <= p < start + 8 for p in kept)
                assert abs(count - budget * size / n) < 1  # every chunk its share, rounded
                # its kept entries are its lowest norms
                mine = sorted(range(start, start + size), key=lambda p: norms[p])[:count]
                assert sorted(mine) == [p for p in kept if start <= p < start + 8]


@torch.no_grad()
def test_chunk_shares_stay_balanced_while_streaming():
    """Token by token at budget 12, chunks of 8: at every step no chunk could give an entry to another and be
    closer to its share: (k_c - 1) / size_c <= k_c' / size_c' for every pair of chunks of a head."""
    model, _ = load("tiny_qwen3")
    ids = _ids(model, 40, seed=4)
    cache = make_cache(model, "chunk", budget=12, scorer="knorm", chunk_length=8)
    for t in range(40):
        model(ids[:, t : t + 1], past_key_values=cache)
        if t < 12:
            continue
        for layer in cache.layers:
            assert layer.length == 12
            for h in range(layer.kv_heads):
                kept = _kept(layer, h)
                sizes = [min(8, t + 1 - s) for s in range(0, t + 1, 8)]
                counts = [sum(8 * c <= p < 8 * c + 8 for p in kept) for c in range(len(sizes))]
                for c, (k, size) in enumerate(zip(counts, sizes, strict=True)):
                    for k2, size2 in zip(
                        counts[:c] + counts[c + 1 :], sizes[:c] + sizes[c + 1 :], strict=True
                    ):
                        assert (k - 1) / size <= k2 / size2 + 1e-9, (t, counts, sizes)
    assert all(
        min(c) >= 2 and max(c) <= 3
        for c in [
            [sum(8 * i <= p < 8 * i + 8 for p in _kept(layer, h)) for i in range(5)]
            for layer in cache.layers
            for h in range(layer.kv_heads)
        ]
    )


@torch.no_grad()
def test_chunk_keeps_the_scorers_protected_window_and_its_per_head_counts():
    model, _ = load("tiny_llama")
    ids = _ids(model, 36, seed=5)
    cache = make_cache(
        model, "chunk", budget=14, chunk_length=8, scorer_params={"window_size": 4, "kernel_size": 3}
    )
    model(ids, past_key_values=cache)
    for layer in cache.layers:
        for h in range(layer.kv_heads):
            assert {32, 33, 34, 35} <= set(_kept(layer, h))  # SnapKV's observation window
    # AdaKV as the scorer: the per-head counts are its own (from its scores), the choice inside them the chunks'.
    params = {"floor_alpha": 0.2, "scorer_params": {"window_size": 4, "kernel_size": 3}}
    alone = make_cache(model, "adakv", budget=10, **params)
    chunked = make_cache(model, "chunk", budget=10, chunk_length=8, scorer="adakv", scorer_params=params)
    model(ids, past_key_values=alone)
    model(ids, past_key_values=chunked)
    per_head = alone.stats()["tokens_kept_per_head"]
    assert chunked.stats()["tokens_kept_per_head"] == per_head
    assert any(len(set(heads)) > 1 for heads in per_head)  # the heads do differ


def test_chunk_options_fail_naming_the_option():
    with pytest.raises(ValueError, match="method.chunk_length"):
        build_method("chunk", chunk_length=0).validate(8)
    with pytest.raises(ValueError, match="method.scorer must be one of"):
        build_method("chunk", scorer="kvmerger")
    with pytest.raises(ValueError, match="method.scorer must be one of"):
        build_method("chunk", scorer="full")


# -- compression_ratio_decoding --------------------------------------------------------------------------------------


def test_compression_ratio_target_is_kvpress_int_of_seen_times_one_minus_ratio():
    method = build_method("compression_ratio_decoding", compression_ratio=0.5)
    # kvpress's own example: position_ids.max() = 107 -> 54 tokens
    assert method.target(SimpleNamespace(positions=torch.tensor([[[3, 107, -1]]]))) == 54
    assert build_method("compression_ratio_decoding", compression_ratio=0.7).target(
        SimpleNamespace(positions=torch.tensor([[[0, 9]]]))
    ) == max(1, int(10 * (1 - 0.7)))
    assert method.target(SimpleNamespace(positions=torch.tensor([[[0]]]))) == 1  # never below one entry


@pytest.mark.parametrize("budget", [64, 18])
@torch.no_grad()
def test_compression_ratio_decoding_keeps_int_ratio_of_seen_at_every_interval(budget):
    """A 20-token prompt, then 30 decoding steps, recompressed every 4th to max(1, int(0.6 seen)) under the cap
    (the budget): the lengths by hand, `layer.budget` what the layer holds, and at layer 0 (whose keys do not
    depend on the cache) the kept entries the `target` lowest key norms of what the layer held plus the new token."""
    model, _ = load("tiny_llama")
    prompt, steps, interval, ratio = 20, 30, 4, 0.4
    ids = _ids(model, prompt + steps, seed=6)
    norms = _full(model, ids)[0][0].norm(dim=-1)  # layer 0 [Hkv, n]
    cache = make_cache(
        model,
        "compression_ratio_decoding",
        budget=budget,
        compression_ratio=ratio,
        compression_interval=interval,
    )
    model(ids[:, :prompt], past_key_values=cache)
    length = min(prompt, budget)
    assert cache.physical_lengths() == [length] * 2
    recompressed = 0
    for s in range(1, steps + 1):
        before = [_kept(cache.layers[0], h) for h in range(cache.layers[0].kv_heads)]
        model(ids[:, prompt + s - 1 : prompt + s], past_key_values=cache)
        seen = prompt + s
        length += 1
        if s % interval == 0:
            length = min(length, budget, max(1, int(seen * (1 - ratio))))
            recompressed += 1
            layer = cache.layers[0]
            for h in range(layer.kv_heads):
                held = [*before[h], seen - 1]
                expected = sorted(held, key=lambda p: float(norms[h, p]))[:length]
                kept = _kept(layer, h)
                # The same key norms: a repeated token's keys tie (RoPE keeps norms) up to rounding, either may stay.
                assert len(kept) == length and set(kept) <= set(held)
                assert torch.allclose(
                    norms[h, kept].sort().values, norms[h, expected].sort().values, atol=1e-6
                )
        else:
            length = min(length, budget)
        for layer in cache.layers:
            assert layer.length == length, (s, layer.length, length)
            assert layer.budget == length  # the layer's budget is what it may hold now
    assert recompressed == steps // interval


@torch.no_grad()
def test_compression_ratio_decoding_cap_follows_the_caches_admit():
    """A query-agnostic question: `admit` raises the budget before the question step; decoding keeps that cap."""
    model, _ = load("tiny_llama")
    ids = _ids(model, 40, seed=8)
    cache = make_cache(model, "compression_ratio_decoding", budget=12, compression_interval=1000)
    model(ids[:, :20], past_key_values=cache)
    cache.admit(5)
    model(ids[:, 20:25], past_key_values=cache)
    assert cache.physical_lengths() == [17, 17]
    for t in range(25, 40):
        model(ids[:, t : t + 1], past_key_values=cache)
        assert cache.physical_lengths() == [17, 17]


def test_compression_ratio_decoding_options_fail_naming_the_option():
    with pytest.raises(ValueError, match="method.compression_ratio"):
        build_method("compression_ratio_decoding", compression_ratio=1.0).validate(8)
    with pytest.raises(ValueError, match="method.compression_interval"):
        build_method("compression_ratio_decoding", compression_interval=0).validate(8)
    with pytest.raises(ValueError, match="allocates budgets across layers"):
        build_method("compression_ratio_decoding", scorer="h2o", scorer_params={"per_layer": False})
    with pytest.raises(ValueError, match="method.scorer must be one of"):
        build_method("compression_ratio_decoding", scorer="d2o_typo")
    assert not build_method("compression_ratio_decoding").batches
    model, _ = load("tiny_llama")
    ids = _ids(model, 12)
    cache = make_cache(model, "compression_ratio_decoding", head_budgets=[[6, 8]] * 2)
    model(ids[:, :10], past_key_values=cache)
    with pytest.raises(ValueError, match="per-head budgets"):
        model(ids[:, 10:11], past_key_values=cache)
    cache = make_cache(model, "compression_ratio_decoding", budget=8, when="prefill")
    model(ids[:, :10], past_key_values=cache)
    with pytest.raises(ValueError, match="engine.when=prefill"):
        model(ids[:, 10:11], past_key_values=cache)


# -- compose ---------------------------------------------------------------------------------------------------------


@torch.no_grad()
def test_compose_chains_three_stages_each_choosing_among_the_last_ones_kept():
    """streaming_llm (no sinks) keeps 0.75 of 32 = the newest 24, knorm the 12 lowest norms among them (0.5 of 24),
    keydiff the budget's 6 least similar to the mean unit key, that mean over all 32 live keys."""
    model, _ = load("tiny_llama")
    ids = _ids(model, 32, seed=9)
    full = _full(model, ids)
    methods = [{"name": "streaming_llm", "sink_tokens": 0}, {"name": "knorm"}, {"name": "keydiff"}]
    cache = make_cache(model, "compose", budget=6, methods=methods, keep_ratios=[0.75, 0.5])
    model(ids, past_key_values=cache)
    for (keys, _), layer in zip(full, cache.layers, strict=True):
        for h in range(layer.kv_heads):
            first = list(range(8, 32))
            second = sorted(first, key=lambda p: float(keys[h, p].norm()))[:12]
            anchor = F.normalize(keys[h], dim=-1).mean(0)
            similarity = F.cosine_similarity(keys[h], anchor[None], dim=-1)
            third = sorted(second, key=lambda p: float(similarity[p]))[:6]
            assert _kept(layer, h) == sorted(third)


@torch.no_grad()
def test_compose_stage_keeps_at_least_the_budget_so_a_small_ratio_leaves_the_choice_to_the_first():
    model, _ = load("tiny_llama")
    ids = _ids(model, 32, seed=10)
    methods = [{"name": "knorm"}, {"name": "streaming_llm"}]
    composed = make_cache(model, "compose", budget=7, methods=methods, keep_ratios=[0.1])  # int(3.2) < 7
    alone = make_cache(model, "knorm", budget=7)
    model(ids, past_key_values=composed)
    model(ids, past_key_values=alone)
    for a, b in zip(alone.layers, composed.layers, strict=True):
        assert [_kept(a, h) for h in range(a.kv_heads)] == [_kept(b, h) for h in range(b.kv_heads)]


@torch.no_grad()
def test_compose_stages_remember_their_own_query_windows():
    """Two SnapKV stages with windows 4 and 8, the first keeping everything (ratio 1): the chain is SnapKV(w=8)
    alone at every step, which needs each stage's remembered queries to be its own."""
    model, _ = load("tiny_qwen3")
    ids = _ids(model, 30, seed=11)
    stages = [
        {"name": "snapkv", "window_size": 4, "kernel_size": 3},
        {"name": "snapkv", "window_size": 8, "kernel_size": 3},
    ]
    composed = make_cache(model, "compose", budget=12, methods=stages, keep_ratios=[1.0])
    alone = make_cache(model, "snapkv", budget=12, window_size=8, kernel_size=3)
    for t in range(0, 30, 3):
        model(ids[:, t : t + 3], past_key_values=composed)
        model(ids[:, t : t + 3], past_key_values=alone)
        for a, b in zip(alone.layers, composed.layers, strict=True):
            assert torch.equal(a.positions, b.positions)
            assert b.query_window is None  # the layer's own window is not the stages'
    scratch = composed.layers[0].scratch(composed.layers[0].method)
    assert scratch["queries0"].shape[2] == 4 and scratch["queries1"].shape[2] == 8


def test_compose_refuses_what_a_chain_cannot_run():
    for node, why in [
        ({"name": "simcalkv"}, "merges entries"),
        ({"name": "dynamickv"}, "allocates budgets across layers"),
        ({"name": "adakv"}, "sets per-head counts of its own"),
        ({"name": "full"}, "does not compress"),
        ({"name": "kivi"}, "does not compress"),
    ]:
        with pytest.raises(ValueError, match=f"method.methods\\[1\\]={node['name']} {why}"):
            build_method("compose", methods=[{"name": "knorm"}, node])
    with pytest.raises(ValueError, match="both keep the per-slot state 'acc'"):
        build_method("compose", methods=[{"name": "h2o"}, {"name": "observed_attention"}])
    with pytest.raises(ValueError, match="method.methods must be a non-empty list"):
        build_method("compose", methods=[])
    with pytest.raises(ValueError, match="method.methods\\[0\\] must be a method node"):
        build_method("compose", methods=["snapkv", {"name": "knorm"}])
    with pytest.raises(ValueError, match="method.methods\\[0\\]: unknown method"):
        build_method("compose", methods=[{"name": "snap"}, {"name": "knorm"}])
    with pytest.raises(ValueError, match="method.keep_ratios needs one ratio per stage"):
        build_method("compose", keep_ratios=[0.5, 0.5]).validate(8)
    with pytest.raises(ValueError, match="method.keep_ratios must be in"):
        build_method("compose", keep_ratios=[0.0]).validate(8)
    with pytest.raises(ValueError, match="method.methods\\[0\\] \\(snapkv\\):.*window_size"):
        build_method("compose", methods=[{"name": "snapkv", "window_size": 0}, {"name": "knorm"}]).validate(8)


# -- what every wrapper shares ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,params",
    [
        ("merging", {"scorer": "expected_attention"}),
        ("chunk", {"scorer": "expected_attention", "chunk_length": 4}),
        ("compose", {"methods": [{"name": "expected_attention"}, {"name": "knorm"}]}),
    ],
)
@torch.no_grad()
def test_the_wrapped_methods_row_scratch_follows_the_batch_rows(name, params):
    """ExpectedAttention keeps per-row query moments in its scratch; inside a wrapper they follow a beam reorder."""
    model, _ = load("tiny_llama")
    ids = torch.cat([_ids(model, 16, seed=12), _ids(model, 16, seed=13)])
    method = build_method(name, **params)
    cache = make_cache(model, method, budget=8)
    model(ids, past_key_values=cache)
    inner = method.parts()[0]
    assert inner.name == "expected_attention"
    layer = cache.layers[0]
    before = layer.scratch(inner)["mean"].clone()
    assert not torch.equal(before[0], before[1])
    cache.reorder_cache(torch.tensor([1, 0]))
    assert torch.equal(layer.scratch(inner)["mean"], before.flip(0))


def test_wrappers_compose_from_the_config():
    from kvexp.tasks.base import method_from_config

    cfg = _compose(
        "method=compose",
        "method.methods=[{name:snapkv,window_size:16},{name:tova},{name:knorm}]",
        "method.keep_ratios=[0.5,0.25]",
    )
    method = method_from_config(cfg.method)
    assert [stage.name for stage in method.parts()] == ["snapkv", "tova", "knorm"]
    assert method.parts()[0].window_size == 16 and method.keep_ratios == [0.5, 0.25]
    cfg = _compose("method=merging", "method.scorer=snapkv", "+method.scorer_params.window_size=16")
    assert method_from_config(cfg.method).parts()[0].window_size == 16
    cfg = _compose("method=compression_ratio_decoding", "method.compression_ratio=0.25")
    assert method_from_config(cfg.method).compression_ratio == 0.25
    cfg = _compose("method=chunk", "method.chunk_length=64", "method.scorer=keydiff")
    assert method_from_config(cfg.method).parts()[0].name == "keydiff"


# -- block (kvpress BlockPress): eval.prefill_chunk_size -------------------------------------------------------------


@torch.no_grad()
def test_block_wise_prefill_is_blockpress_when_the_budget_is_a_multiple_of_the_block():
    """kvpress's BlockPress keeps the first `budget` tokens, then adds each block of `block_size` and keeps the
    budget's best of the kept and the block. kvexp's chunked prefill (`eval.prefill_chunk_size`) compresses after
    each chunk once the layer is over budget: with the budget a multiple of the block size the compressions fall
    at the same boundaries, so at layer 0 (keys independent of the cache) KeyDiff keeps the same entries as the
    hand-run BlockPress on the plain model's keys (deeper layers differ: kvexp's blocks are a true block-wise
    prefill, whose later blocks attend the compressed cache, as in the KeyDiff paper)."""
    model, _ = load("tiny_llama")
    n, budget, block = 30, 8, 4
    ids = _ids(model, n, seed=14)
    keys = _full(model, ids)[0][0]  # layer 0 [Hkv, n, D]
    cache = make_cache(model, "keydiff", budget=budget)
    for start in range(0, n, block):
        model(ids[:, start : start + block], past_key_values=cache)
    layer = cache.layers[0]
    for h in range(layer.kv_heads):
        kept = list(range(budget))
        for start in range(budget, n, block):
            current = kept + list(range(start, min(start + block, n)))
            anchor = F.normalize(keys[h, current], dim=-1).mean(0)
            score = {p: -float(F.cosine_similarity(keys[h, p], anchor, dim=0)) for p in current}
            kept = sorted(current, key=lambda p: (score[p], p), reverse=True)[:budget]
        assert _kept(layer, h) == sorted(kept)


# -- block ------------------------------------------------------------------------------------------------------


@torch.no_grad()
def test_block_is_its_scorer_fed_in_blocks():
    from kvexp.tasks.generation import GenerationSample, PromptEncoder, run_generation

    model, tok = load("tiny_llama")
    text = " ".join(["the quick brown fox jumps over the lazy dog"] * 12)
    samples = [
        GenerationSample(f"s{i}", text[i:], "What jumps?", ["fox"], max_new_tokens=5) for i in range(2)
    ]
    prompts = [PromptEncoder(tok).encode(s) for s in samples]
    scorer = {"window_size": 4, "kernel_size": 3}
    block = build_method("block", block_size=16, scorer_params=scorer)
    blocked = run_generation(model, tok, samples, prompts, block, lambda n: 24)
    chunked = run_generation(
        model, tok, samples, prompts, build_method("snapkv", **scorer), lambda n: 24, prefill_chunk_size=16
    )
    whole = run_generation(model, tok, samples, prompts, build_method("snapkv", **scorer), lambda n: 24)
    for b, c, w in zip(blocked, chunked, whole, strict=True):
        assert b.prediction == c.prediction
        assert b.kv["tokens_kept_per_head"] == c.kv["tokens_kept_per_head"]
        assert (
            b.kv["compressions"] == c.kv["compressions"] > w.kv["compressions"]
        )  # one per block over budget


def test_block_options_and_tasks_fail_before_the_model_loads():
    from kvexp.config import validate

    with pytest.raises(ValueError, match="method.block_size must be >= 1"):
        build_method("block", block_size=0).validate(64)
    validate(_compose("method=block", "dataset=passkey"))
    with pytest.raises(ValueError, match="use the scorer itself with eval.chunk_size=N"):
        validate(_compose("method=block"))
    with pytest.raises(ValueError, match="disagree: set one"):
        validate(_compose("method=block", "dataset=passkey", "eval.prefill_chunk_size=64"))
