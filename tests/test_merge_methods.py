"""The merging methods (simcalkv, cam, d2o, kvmerger) against hand computations.

Each rule runs on layers built directly (B = 1, Hkv = 2, G = 2: every score, group, weight and threshold is set
by hand, the physical order shuffled where time matters), then on tiny models against values computed
independently from the plain model's eager attention. Exact cases go through kvexp's attention function: a
calibrated merge of identical keys must give the uncompressed output. The engine matrix (tests/test_engine.py)
checks the budgets at prefill, in chunks and token by token.
"""

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from kvexp.engine.attention import kvexp_attention
from kvexp.engine.cache import CacheOptions, CompressedLayer, KVCache
from kvexp.methods import build_method, make_cache
from kvexp.methods.cam import successors
from kvexp.tasks.data import load_documents
from tests.conftest import load
from tests.test_head_methods import _deep_llama

HKV, G, D, SCALE = 2, 2, 4, 0.5


def _layer(method, budget, keys, values, positions="original", head_budgets=None, **params):
    layer = CompressedLayer(
        0,
        budget,
        build_method(method, **params),
        CacheOptions(positions=positions),
        head_budgets=head_budgets,
    )
    KVCache([layer])
    layer.update(keys, values)
    layer.scaling = SCALE
    return layer


def _random(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _slot(layer, head, position):
    return int((layer.positions[0, head] == position).nonzero()[0, 0])


def _attend(layer, query, new_key, new_value):
    """kvexp's attention of `query` [1, H, 1, D] over the layer plus one new token: [H, D]."""
    keys, values = layer.update(new_key, new_value)
    out, _ = kvexp_attention(SimpleNamespace(layer_idx=0, training=False), query, keys, values, None, SCALE)
    return out[0, 0]


def _softmax_weights(keys, queries, query_positions, key_positions):
    """Hand value weights: softmax of q.k * SCALE over the keys a query can see, averaged over queries and the
    group's heads. keys [L, D] of one KV head, queries [G, w, D]."""
    logits = torch.einsum("gwd,ld->gwl", queries, keys) * SCALE
    hidden = key_positions[None, None, :] > query_positions[None, :, None]
    return torch.softmax(logits.masked_fill(hidden, float("-inf")), dim=-1).mean(dim=(0, 1))


# -- simcalkv --------------------------------------------------------------------------------------------------


def _simcalkv_layer(variant, value_window=1, threshold=0.0, budget=4, key_weighting="count"):
    """Seven positive-orthant keys per head, one evicted key flipped negative (cos < 0 with every kept key:
    dropped at tau = 0), accumulated attention set by hand, `value_window` queries remembered."""
    keys = _random(1, HKV, 7, D).abs() + 0.1
    keys[0, 0, 3] = -keys[0, 0, 3]
    keys[0, 1, 6] = -keys[0, 1, 6]
    values = _random(1, HKV, 7, D, seed=1)
    layer = _layer(
        "simcalkv",
        budget,
        keys,
        values,
        variant=variant,
        value_window=value_window,
        similarity_threshold=threshold,
        key_weighting=key_weighting,
    )
    layer.state("acc").copy_(
        torch.tensor([[[5.0, 1.0, 4.0, 0.5, 3.0, 2.0, 6.0], [0.2, 3.0, 2.0, 5.0, 0.1, 4.0, 0.3]]])
    )
    queries = _random(1, HKV * G, value_window, D, seed=2)
    layer.query_window = (queries, torch.arange(7 - value_window, 7)[None])
    return layer, keys, values, queries


def _simcalkv_groups(keys, acc, evict, threshold):
    """Per head: {kept position: [evicted positions merged into it]} by the rule, by hand."""
    groups = []
    for h in range(HKV):
        order = acc[h].argsort().tolist()
        evicted, kept = order[:evict], sorted(order[evict:])
        group = {c: [] for c in kept}
        for e in evicted:
            cos = [F.cosine_similarity(keys[h, e], keys[h, c], dim=0).item() for c in kept]
            if max(cos) > threshold:
                group[kept[max(range(len(kept)), key=cos.__getitem__)]].append(e)
        groups.append(group)
    return groups


@pytest.mark.parametrize("value_window, key_weighting", [(1, "count"), (2, "count"), (2, "attention")])
def test_simcalkv_derived_merges_into_the_most_similar_kept_key_with_count_bias_and_attention_values(
    value_window, key_weighting
):
    layer, keys, values, queries = _simcalkv_layer("derived", value_window, key_weighting=key_weighting)
    groups = _simcalkv_groups(keys[0], layer.state("acc")[0].clone(), 3, 0.0)
    assert groups[0][6] == [] and sum(len(g) for g in groups[0].values()) == 2  # position 3 dropped
    layer.compress()
    window_positions = torch.arange(7 - value_window, 7)
    for h in range(HKV):
        weights = _softmax_weights(
            keys[0, h], queries[0, h * G : (h + 1) * G], window_positions, torch.arange(7)
        )
        assert sorted(layer.positions[0, h].tolist()) == sorted(groups[h])
        for c, members in groups[h].items():
            s, group = _slot(layer, h, c), [c, *members]
            w = weights[group]
            k = torch.ones(len(group)) if key_weighting == "count" else w
            assert torch.allclose(
                layer.keys[0, h, s], (k[:, None] * keys[0, h, group]).sum(0) / k.sum(), atol=1e-6
            )
            assert layer.bias[0, h, s].item() == pytest.approx(math.log(len(group)), abs=1e-6)
            assert torch.allclose(
                layer.values[0, h, s], (w[:, None] * values[0, h, group]).sum(0) / w.sum(), atol=1e-5
            )


def test_simcalkv_reference_code_adds_ln2_to_every_key_coordinate_without_bias():
    layer, keys, values, queries = _simcalkv_layer("reference_code")
    groups = _simcalkv_groups(keys[0], layer.state("acc")[0].clone(), 3, 0.0)
    layer.compress()
    merged = 0
    for h in range(HKV):
        weights = _softmax_weights(
            keys[0, h], queries[0, h * G : (h + 1) * G], torch.tensor([6]), torch.arange(7)
        )
        for c, members in groups[h].items():
            s = _slot(layer, h, c)
            assert layer.bias[0, h, s] == 0.0
            if not members:
                assert torch.equal(layer.keys[0, h, s], keys[0, h, c])
                continue
            merged += 1
            expected = (keys[0, h, members].mean(0) + keys[0, h, c]) / 2 + math.log(2.0)
            assert torch.allclose(layer.keys[0, h, s], expected, atol=1e-6)
            w = weights[[c, *members]]
            assert torch.allclose(
                layer.values[0, h, s], (w[:, None] * values[0, h, [c, *members]]).sum(0) / w.sum(), atol=1e-5
            )
    assert merged >= 2


def test_simcalkv_threshold_above_every_similarity_only_drops():
    layer, keys, values, _ = _simcalkv_layer("derived", threshold=0.9999)
    layer.compress()
    for h in range(HKV):
        for s, p in enumerate(layer.positions[0, h].tolist()):
            assert torch.equal(layer.keys[0, h, s], keys[0, h, p]) and torch.equal(
                layer.values[0, h, s], values[0, h, p]
            )
    assert (layer.bias == 0).all()


@pytest.mark.parametrize("variant", ["derived", "reference_code"])
def test_simcalkv_merging_identical_keys_is_exact_only_with_the_derived_math(variant):
    keys, values = _random(1, HKV, 7, D), _random(1, HKV, 7, D, seed=1)
    keys[:, :, [4, 5, 6]] = keys[:, :, [1, 2, 1]]  # the evicted tokens are copies of kept keys
    query, new_key, new_value = (
        _random(1, HKV * G, 1, D, seed=3),
        _random(1, HKV, 1, D, seed=4),
        _random(1, HKV, 1, D, seed=5),
    )
    plain = _attend(_layer("full", None, keys, values), query, new_key, new_value)
    layer = _layer("simcalkv", 4, keys, values, variant=variant)
    layer.state("acc").copy_(torch.tensor([5.0, 4.0, 3.0, 2.0, 0.1, 0.2, 0.3]).expand(1, HKV, 7))
    layer.query_window = (_random(1, HKV * G, 1, D, seed=6), torch.tensor([[6]]))
    layer.compress()
    assert sorted(layer.positions[0, 0].tolist()) == [0, 1, 2, 3]
    merged = _attend(layer, query, new_key, new_value)
    if variant == "derived":
        assert layer.bias[0, 0, _slot(layer, 0, 1)].item() == pytest.approx(math.log(3.0))
        assert torch.allclose(merged, plain, atol=1e-5)
    else:
        assert (merged - plain).abs().max() > 1e-2


def test_simcalkv_on_a_prefill_merges_the_least_attended_tokens_of_the_plain_model():
    model, _ = load("tiny_llama")
    ids = torch.randint(3, model.config.vocab_size, (1, 24), generator=torch.Generator().manual_seed(3))
    full = make_cache(model, "full")
    model.set_attn_implementation("eager")
    with torch.no_grad():
        attentions = model(ids, past_key_values=full, output_attentions=True).attentions
        cache = make_cache(model, "simcalkv", budget=10)
        model(ids, past_key_values=cache)
    for layer, full_layer, attn in zip(cache.layers, full.layers, attentions, strict=True):
        acc = attn[0].reshape(HKV, G, 24, 24).sum(dim=2).mean(dim=1)  # column sums, group mean: [Hkv, 24]
        groups = _simcalkv_groups(full_layer.keys[0], acc, 14, 0.0)
        for h in range(HKV):
            assert sorted(layer.positions[0, h].tolist()) == sorted(groups[h])
            for c, members in groups[h].items():
                s = _slot(layer, h, c)
                assert torch.allclose(
                    layer.keys[0, h, s], full_layer.keys[0, h, [c, *members]].mean(0), atol=1e-5
                )
                assert layer.bias[0, h, s].item() == pytest.approx(math.log(1 + len(members)), abs=1e-5)


@pytest.mark.parametrize(
    "method, params", [("simcalkv", {}), ("d2o", {"skip_layers": []}), ("kvmerger", {"skip_layers": []})]
)
def test_key_merging_methods_refuse_rerotation(method, params):
    keys = _random(1, HKV, 7, D)
    layer = _layer(method, 4, keys, keys, positions="rerotate", **params)
    layer.query_window = (_random(1, HKV * G, 1, D), torch.tensor([[6]]))
    with pytest.raises(ValueError, match="engine.positions"):
        layer.compress()


# -- cam ---------------------------------------------------------------------------------------------------------

PERMUTATION = [[4, 0, 7, 2, 9, 1, 6, 3, 5, 8], [9, 5, 0, 3, 1, 8, 2, 6, 4, 7]]  # slot -> position, per head


def _shuffled(method, budget, length=10, **params):
    """A layer whose physical order is not temporal: slot s of head h holds position PERMUTATION[h][s]."""
    keys, values = _random(1, HKV, length, D), _random(1, HKV, length, D, seed=1)
    layer = _layer(method, budget, keys, values, **params)
    layer.positions.copy_(torch.tensor(PERMUTATION)[None, :, :length])
    return layer, keys, values


def _by_position(layer, tensor, head):
    """A per-slot tensor of one head reordered by position."""
    return tensor[0, head][layer.positions[0, head].argsort()]


def test_cam_windows_are_the_next_present_tokens_in_temporal_order():
    layer, _, _ = _shuffled("cam", None)
    present_positions = [{0, 2, 3, 6, 8, 9}, {1, 4, 5, 9}]
    present = torch.tensor([[[p in present_positions[h] for p in PERMUTATION[h]] for h in range(HKV)]])
    order, start, end = successors(layer, present, 2)
    for h in range(HKV):
        for s, p in enumerate(PERMUTATION[h]):
            window = [PERMUTATION[h][i] for i in order[0, h, start[0, h, s] : end[0, h, s]].tolist()]
            expected = (
                sorted(q for q in present_positions[h] if q > p)[:2] if p in present_positions[h] else []
            )
            assert window == expected


def _cam_expected(values, acc, kept, evicted, merge_budget, p_override=None):
    """Hand CaM on one head, by position: each evicted e adds p_e v_e / |w| to the kept tokens of its window w
    (the next `merge_budget` present tokens), p_e = clamp(acc_e / mean acc_w, 0, 1)."""
    present = sorted(kept + evicted)
    out = values.clone()
    for e in evicted:
        window = [q for q in present if q > e][:merge_budget]
        mean = acc[window].mean()
        p = (
            (acc[e] / mean).nan_to_num(nan=0.0, posinf=1.0).clamp(0, 1)
            if p_override is None
            else p_override[e]
        )
        for w in window:
            if w in kept:
                out[w] += p * values[e] / len(window)
    return out[kept]


@pytest.mark.parametrize("merge_budget", [3, 10])
def test_cam_adds_p_times_the_value_share_to_the_following_tokens(merge_budget):
    layer, keys, values = _shuffled(
        "cam", 6, sink_tokens=1, merge_budget=merge_budget, sampling="expectation"
    )
    # By position; head 1 has zero windows (x / 0 merges surely, 0 / 0 not) and clamped ratios.
    acc = torch.tensor(
        [
            [3.0, 2.0, 8.0, 0.0, 1.0, 2.0, 4.0, 6.0, 9.0, 9.0],
            [1.0, 3.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0],
        ]
    )
    layer.state("acc").copy_(torch.stack([acc[h][PERMUTATION[h]] for h in range(HKV)])[None])
    layer.compress()
    kept, evicted = [0, 5, 6, 7, 8, 9], [1, 2, 3, 4]  # StreamingLLM's choice
    for h in range(HKV):
        assert sorted(layer.positions[0, h].tolist()) == kept
        by_position = torch.tensor(PERMUTATION[h]).argsort()
        expected = _cam_expected(values[0, h][by_position], acc[h], kept, evicted, merge_budget)
        assert torch.allclose(_by_position(layer, layer.values, h), expected, atol=1e-6)
        assert torch.equal(_by_position(layer, layer.keys, h), keys[0, h][by_position][kept])
    assert (layer.bias == 0).all()
    assert not torch.allclose(
        _by_position(layer, layer.values, 0), values[0, 0][torch.tensor(PERMUTATION[0]).argsort()][kept]
    )


def _cam_run(seed, sampling="bernoulli"):
    layer, _, values = _shuffled("cam", 6, sink_tokens=1, merge_budget=3, seed=seed, sampling=sampling)
    # Windows of the evicted 2, 3, 4: (3, 4, 5), (4, 5, 6), (5, 6, 7): p = 1, 0, 0.5; token 1's, (2, 3, 4) with
    # p = 1 / (10 / 3) = 0.3, lands on evicted tokens only. Position 5 receives from all three.
    acc = torch.tensor([3.0, 1.0, 8.0, 0.0, 2.0, 2.0, 4.0, 6.0, 9.0, 9.0])
    layer.state("acc").copy_(torch.stack([acc[PERMUTATION[h]] for h in range(HKV)])[None])
    layer.compress()
    return layer, values


def test_cam_bernoulli_merges_are_seeded_and_follow_p():
    merged_half = 0
    for seed in range(40):
        layer, values = _cam_run(seed)
        again, _ = _cam_run(seed)
        assert torch.equal(layer.values, again.values)  # same seed, same draws
        for h in range(HKV):
            original = values[0, h][torch.tensor(PERMUTATION[h]).argsort()]
            added = (_by_position(layer, layer.values, h)[1] - original[5]) * 3  # position 5's share
            hit = [torch.allclose(added, original[2] + b * original[4], atol=1e-5) for b in (0, 1)]
            assert sum(hit) == 1  # p = 1: always; p = 0: never; p = 0.5: one or the other
            merged_half += hit[1]
    assert 15 <= merged_half <= 65  # 80 draws with p = 0.5


def test_cam_statistics_count_evictions_probabilities_and_merges():
    layer, _ = _cam_run(0, sampling="expectation")
    stats = layer.method.statistics([layer])
    assert stats["evicted_tokens"] == 4 * HKV  # tokens 1-4 of each head had a window
    assert stats["merge_probability_mean"] == pytest.approx((0.3 + 1 + 0 + 0.5) / 4)
    assert stats["merges"] == pytest.approx(1.8 * HKV)  # expectation: the sum of p
    drawn = [_cam_run(seed)[0] for seed in range(20)]
    merges = [layer.method.statistics([layer])["merges"] for layer in drawn]
    assert all(m == int(m) and 1 * HKV <= m <= 3 * HKV for m in merges)  # p = 1 always, p = 0 never
    assert len(set(merges)) > 1


def test_cam_keeps_streaming_llm_keys_and_runs_with_rerotation():
    model, _ = load("tiny_llama")
    ids = torch.randint(3, model.config.vocab_size, (1, 30), generator=torch.Generator().manual_seed(1))
    caches = {}
    for method in ("streaming_llm", "cam"):
        caches[method] = make_cache(model, method, budget=10, sink_tokens=2, positions="rerotate")
        with torch.no_grad():
            for t in range(30):
                model(ids[:, t : t + 1], past_key_values=caches[method])
    for plain, cam in zip(caches["streaming_llm"].layers, caches["cam"].layers, strict=True):
        for h in range(HKV):
            assert torch.equal(plain.positions[0, h].sort().values, cam.positions[0, h].sort().values)
        assert not torch.allclose(plain.values, cam.values)  # merges happened
    # Layer 0's keys come from the embeddings alone: keys are never merged and are re-rotated alike. (Later
    # layers' keys differ: merged values change the hidden states.)
    plain, cam = caches["streaming_llm"].layers[0], caches["cam"].layers[0]
    for h in range(HKV):
        assert torch.allclose(_by_position(plain, plain.keys, h), _by_position(cam, cam.keys, h), atol=1e-5)


# -- d2o ---------------------------------------------------------------------------------------------------------

D2O_BARE = {"skip_layers": [], "layer_allocation": False, "sink_tokens": 1}


def _d2o_expected(keys, values, kept_positions, tau=None, alpha=0.5, beta=0.5):
    """Hand D2O merge of the other tokens into `kept_positions` (per head, indices into keys [1, Hkv, n, D]);
    returns (tau, {h: {c: (key, value)}})."""
    pairs = []
    for h in range(HKV):
        evicted = [p for p in range(keys.shape[2]) if p not in kept_positions[h]]
        for e in evicted:
            cos = {
                c: F.cosine_similarity(keys[0, h, e], keys[0, h, c], dim=0).item() for c in kept_positions[h]
            }
            best = max(cos, key=cos.get)
            pairs.append((h, e, best, cos[best]))
    mean = sum(u for *_, u in pairs) / len(pairs)
    tau = mean if tau is None else alpha * tau + beta * mean
    merged = {h: {c: ([keys[0, h, c]], [values[0, h, c]]) for c in kept_positions[h]} for h in range(HKV)}
    for h, e, c, u in pairs:
        if u >= tau:
            merged[h][c][0].append(u * keys[0, h, e])
            merged[h][c][1].append(u * values[0, h, e])
    return tau, {
        h: {c: (torch.stack(k).mean(0), torch.stack(v).mean(0)) for c, (k, v) in m.items()}
        for h, m in merged.items()
    }


def test_d2o_merges_by_the_reference_scatter_mean_above_an_ema_threshold():
    keys, values = _random(1, HKV, 10, D), _random(1, HKV, 10, D, seed=1)
    layer = _layer("d2o", 6, keys, values, **D2O_BARE)  # recent 3 + sink 1 + 2 heavy hitters
    acc = torch.tensor(
        [
            [0.0, 5.0, 1.0, 2.0, 0.5, 4.0, 0.0, 0.0, 0.0, 0.0],
            [0.0, 0.1, 3.0, 0.2, 6.0, 0.3, 0.4, 0.0, 0.0, 0.0],
        ]
    )
    layer.state("acc").copy_(acc[None])
    kept = [[0, 1, 5, 7, 8, 9], [0, 2, 4, 7, 8, 9]]
    tau, expected = _d2o_expected(keys, values, kept)
    layer.compress()
    assert build_method("d2o").statistics([layer]) == {"merge_threshold_per_layer": [None]}  # per instance
    assert layer.method.statistics([layer])["merge_threshold_per_layer"][0] == pytest.approx(tau)
    for h in range(HKV):
        assert sorted(layer.positions[0, h].tolist()) == kept[h]
        for c, (k, v) in expected[h].items():
            s = _slot(layer, h, c)
            assert torch.allclose(layer.keys[0, h, s], k, atol=1e-6) and torch.allclose(
                layer.values[0, h, s], v, atol=1e-6
            )
    assert (layer.bias == 0).all()
    # The next token: the sink (0) and the newest three (8, 9, 10) are protected; the lowest of the rest (by
    # position as the score) is evicted: rank 1 in temporal order on both heads. The threshold moves by the EMA.
    layer.update(_random(1, HKV, 1, D, seed=7), _random(1, HKV, 1, D, seed=8))
    layer.state("acc").copy_(layer.positions.float())
    order = layer.positions.argsort(dim=-1)  # [1, Hkv, 7]
    positions = layer.positions.gather(2, order)
    by_time = [t.gather(2, order[..., None].expand(-1, -1, -1, D)) for t in (layer.keys, layer.values)]
    kept = [[0, 2, 3, 4, 5, 6]] * HKV
    tau2, expected = _d2o_expected(*by_time, kept, tau=tau)
    layer.compress()
    assert tau2 != pytest.approx(tau)
    assert layer.method.statistics([layer])["merge_threshold_per_layer"][0] == pytest.approx(tau2)
    for h in range(HKV):
        for c, (k, v) in expected[h].items():
            s = _slot(layer, h, int(positions[0, h, c]))
            assert torch.allclose(layer.keys[0, h, s], k, atol=1e-6)
            assert torch.allclose(layer.values[0, h, s], v, atol=1e-6)


def _variance_score(attention):
    """Hand sigma_l: per query head, the unbiased variance of the column sums, min-max over heads, mean."""
    variance = attention[0].sum(dim=1).var(dim=-1)  # [H]
    return ((variance - variance.min()) / (variance.max() - variance.min() + 1e-6)).mean().item()


@pytest.fixture(scope="module")
def deep_llama():
    """A 5-layer GQA llama whose layers attend differently (query weights scaled per layer and head)."""
    model = _deep_llama(5)
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            layer.self_attn.q_proj.weight.mul_(1.0 + 6.0 * i)
            layer.self_attn.q_proj.weight[:16].mul_(0.2)  # one query head far flatter than the others
    return model


@pytest.mark.parametrize("chunk", [30, 1])
def test_d2o_shares_the_layers_total_by_softmax_of_minus_attention_variance(deep_llama, chunk):
    model, budget, length = deep_llama, 10, 30
    ids = torch.randint(3, 260, (1, length), generator=torch.Generator().manual_seed(2))
    # The allocation happens when the layers first exceed the budget: the prefill, or token budget + 1.
    seen = length if chunk == length else budget + 1
    model.set_attn_implementation("eager")
    with torch.no_grad():
        attentions = model(ids[:, :seen], output_attentions=True).attentions
    sigma = torch.tensor([_variance_score(attentions[i]) for i in (1, 2, 3)])
    weights = torch.softmax(-sigma, dim=0)
    cache = make_cache(model, "d2o", budget=budget, skip_layers=[0, -1])
    with torch.no_grad():
        for t in range(0, length, chunk):
            model(ids[:, t : t + chunk], past_key_values=cache)
    budgets = [layer.budget for layer in cache.layers]
    assert budgets[0] is None and budgets[4] is None and sum(budgets[1:4]) == 3 * budget
    assert cache.physical_lengths() == [length, *budgets[1:4], length]
    for size, w in zip(budgets[1:4], weights.tolist(), strict=True):
        assert abs(size - 1 - w * (3 * budget - 3)) < 1  # one token each, then floor shares (+ remainder)
    assert len(set(budgets[1:4])) > 1  # the layers do differ


# -- kvmerger ----------------------------------------------------------------------------------------------------


def _planar_keys(angles, norms):
    keys = torch.zeros(len(angles), D)
    keys[:, 0], keys[:, 1] = torch.tensor(angles).cos(), torch.tensor(angles).sin()
    return keys * torch.tensor(norms)[:, None]


KVM_ANGLES = [[0.0, 1.0, 1.05, 1.5, 3.0, 2.0, 2.02, 2.04], [0.0, 0.01, 0.5, 0.52, 1.5, 2.5, 2.9, 2.95]]
KVM_ACC = [[9.0, 1.0, 2.0, 3.0, 8.0, 4.0, 5.0, 6.0], [1.0, 2.0, 3.0, 7.0, 0.5, 9.0, 0.2, 0.1]]
# Head 0: protected 0, 4 (most attended); links among the rest by similarity: (5,6) = (6,7) > (1,2) > (2,3): the
# three joined make sets {1, 2} -> pivot 2 and {5, 6, 7} -> pivot 7. Head 1: protected 5, 3; free links
# (0,1) > (6,7) > (1,2): sets {0, 1, 2} -> pivot 2 and {6, 7} -> pivot 6.
KVM_SETS = [{2: [1, 2], 7: [5, 6, 7]}, {2: [0, 1, 2], 6: [6, 7]}]
KVM_KEPT = [[0, 2, 3, 4, 7], [2, 3, 4, 5, 6]]


@pytest.mark.parametrize("calibrate", [False, True])
def test_kvmerger_merges_runs_of_similar_neighbours_around_the_most_attended(calibrate):
    norms = [1.0, 2.0, 1.5, 1.0, 3.0, 1.2, 0.8, 1.1]
    keys = torch.stack([_planar_keys(a, norms) for a in KVM_ANGLES])[None]
    values = _random(1, HKV, 8, D, seed=1)
    permutation = torch.tensor([[3, 7, 0, 5, 1, 6, 2, 4], [6, 0, 4, 1, 7, 2, 5, 3]])  # slot -> position
    shuffled = [t.gather(2, permutation[None, :, :, None].expand(-1, -1, -1, D)) for t in (keys, values)]
    layer = _layer("kvmerger", 5, *shuffled, protect_ratio=0.4, skip_layers=[], calibrate=calibrate)
    layer.positions.copy_(permutation[None])
    layer.state("acc").copy_(torch.tensor(KVM_ACC).gather(1, permutation)[None])
    layer.compress()
    for h in range(HKV):
        assert sorted(layer.positions[0, h].tolist()) == KVM_KEPT[h]
        for pivot, members in KVM_SETS[h].items():
            distance = (keys[0, h, members] - keys[0, h, pivot]).norm(dim=-1)
            sigma = distance.sum() / (math.sqrt(2.0) * len(members))
            g = torch.exp(-distance.square() / (2 * sigma**2))
            s = _slot(layer, h, pivot)
            assert torch.allclose(
                layer.keys[0, h, s], (g[:, None] * keys[0, h, members]).sum(0) / g.sum(), atol=1e-6
            )
            assert torch.allclose(
                layer.values[0, h, s], (g[:, None] * values[0, h, members]).sum(0) / g.sum(), atol=1e-6
            )
            assert layer.bias[0, h, s].item() == pytest.approx(math.log(len(members)) if calibrate else 0.0)
        for position in set(KVM_KEPT[h]) - set(KVM_SETS[h]):  # protected and singletons: untouched
            assert torch.equal(layer.keys[0, h, _slot(layer, h, position)], keys[0, h, position])


def test_kvmerger_meets_each_head_budget_exactly_and_keeps_the_most_attended():
    keys, values = _random(1, HKV, 40, D, seed=3), _random(1, HKV, 40, D, seed=4)
    layer = _layer("kvmerger", 12, keys, values, head_budgets=[7, 12], skip_layers=[])
    acc = torch.rand(1, HKV, 40, generator=torch.Generator().manual_seed(5))
    layer.state("acc").copy_(acc)
    layer.compress()
    assert layer.live()[0].sum(-1).tolist() == [7, 12] and layer.length == 12
    for h, protected in enumerate((3, 5)):  # min(int(0.5 count), (count - 1) // 2)
        for position in acc[0, h].argsort(descending=True)[:protected].tolist():
            s = _slot(layer, h, position)
            assert torch.equal(layer.keys[0, h, s], keys[0, h, position])


@pytest.mark.parametrize("calibrate", [True, False])
def test_kvmerger_calibrated_merge_of_identical_neighbours_is_exact(calibrate):
    keys, values = _random(1, HKV, 8, D), _random(1, HKV, 8, D, seed=1)
    keys[:, :, 2:5] = keys[:, :, 2:3]  # positions 2, 3, 4 share a key: the only similarity-1 links
    query, new_key, new_value = (
        _random(1, HKV * G, 1, D, seed=3),
        _random(1, HKV, 1, D, seed=4),
        _random(1, HKV, 1, D, seed=5),
    )
    plain = _attend(_layer("full", None, keys, values), query, new_key, new_value)
    layer = _layer("kvmerger", 6, keys, values, skip_layers=[], calibrate=calibrate, protect_ratio=0.0)
    layer.compress()
    assert sorted(layer.positions[0, 0].tolist()) in (
        [0, 1, 2, 5, 6, 7],
        [0, 1, 3, 5, 6, 7],
        [0, 1, 4, 5, 6, 7],
    )
    merged = _attend(layer, query, new_key, new_value)
    if calibrate:
        assert torch.allclose(merged, plain, atol=1e-5)
    else:  # three tokens counted once
        assert (merged - plain).abs().max() > 1e-3


# -- every merging method on a tiny model ------------------------------------------------------------------------

TINY = {"simcalkv": {}, "cam": {}, "d2o": {"skip_layers": []}, "kvmerger": {"skip_layers": []}}


@pytest.mark.parametrize("method", sorted(TINY))
@pytest.mark.parametrize("model_name", ["tiny_qwen3", "tiny_gpt2"])  # GQA with q_norm; MHA without RoPE
def test_merging_methods_compress_a_prefill_then_every_decode_step(model_name, method):
    model, _ = load(model_name)
    layers = model.config.num_hidden_layers
    ids = torch.randint(3, model.config.vocab_size, (1, 36), generator=torch.Generator().manual_seed(4))
    cache = make_cache(model, method, budget=8, **TINY[method])
    with torch.no_grad():
        model(ids[:, :30], past_key_values=cache)
        budgets = [layer.budget for layer in cache.layers]  # d2o: its layer allocation, same total
        assert sum(budgets) == 8 * layers and cache.physical_lengths() == budgets
        for t in range(30, 36):
            logits = model(ids[:, t : t + 1], past_key_values=cache).logits
            assert torch.isfinite(logits).all()
            assert cache.physical_lengths() == budgets
    assert cache.stats()["tokens_seen"] == 36


# -- real behaviour on SmolLM2 -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_merges_on_smollm2_help_where_they_should_and_never_pile_up(smollm2):
    """A 256-token WikiText prompt kept at 64 per head, then 64 tokens scored against the full cache (KL of the
    next-token distributions): merging with attention-weighted keys beats dropping the very same tokens, and
    CaM's one-pass merge of a prefill stays near StreamingLLM's eviction (no pile-up onto the first kept)."""
    model, tokenizer = smollm2
    (doc,) = load_documents({"name": "wikitext2", "split": "test[:200]", "hub_id": "wikitext"}, None)
    ids = tokenizer(doc.text, return_tensors="pt").input_ids[:, :320]

    def log_probs(method, **params):
        cache = make_cache(model, method, budget=64, when="prefill", **params)
        with torch.no_grad():
            model(ids[:, :256], past_key_values=cache)
            return model(ids[:, 256:], past_key_values=cache).logits.float().log_softmax(-1)

    full = log_probs("full")

    def kl(method, **params):
        return (full.exp() * (full - log_probs(method, **params))).sum(-1).mean().item()

    dropped = kl("simcalkv", similarity_threshold=1.0)  # the same selection, nothing merged
    assert kl("simcalkv", key_weighting="attention") < 0.8 * dropped
    assert kl("cam") < 1.3 * kl("streaming_llm")
