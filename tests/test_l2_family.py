"""The kvcompress study's key-L2-norm family against hand computations from the plain model's keys, plus invariants.

After one prefill step of T tokens nothing has been evicted yet, so the kept positions are the method's rule
applied to the uncompressed keys (a `full` cache after the same forward). tiny_llama has 2 layers and GQA
(2 KV heads), and every expectation is per KV head.
"""

import pytest
import torch
import torch.nn.functional as F

from kvexp.methods import build_method, make_cache
from tests.conftest import load

T = 24


@pytest.fixture(scope="module")
def setup():
    model, _ = load("tiny_llama")
    ids = torch.randint(3, model.config.vocab_size, (1, T), generator=torch.Generator().manual_seed(3))
    full = make_cache(model, "full")
    with torch.no_grad():
        model(ids, past_key_values=full)
    norms = [layer.keys.float().norm(dim=-1) for layer in full.layers]  # [1, Hkv, T] per layer
    return model, ids, norms


def _prefill(model, ids, method, budget, **params):
    cache = make_cache(model, method, budget=budget, **params)
    with torch.no_grad():
        model(ids, past_key_values=cache)
    return cache


def _kept(model, ids, method, budget, **params):
    """Kept positions per layer after one prefill step, sorted: [1, Hkv, k]."""
    cache = _prefill(model, ids, method, budget, **params)
    return [layer.positions.sort(dim=-1).values for layer in cache.layers]


def _lowest(norms, keep, sinks=0, recent=0):
    """The first `sinks` tokens, the newest `recent` and the lowest norms between them, up to `keep` in all."""
    middle = norms[..., sinks : T - recent]
    chosen = middle.argsort(dim=-1)[..., : keep - sinks - recent] + sinks
    fixed = torch.cat([torch.arange(sinks), torch.arange(T - recent, T)]).expand(*norms.shape[:2], -1)
    return torch.cat([fixed, chosen], dim=-1).sort(dim=-1).values


def test_fix_size_l2_keeps_the_protected_zone_and_the_lowest_norms_before_it(setup):
    model, ids, norms = setup
    kept = _kept(model, ids, "fix_size_l2", 10, recent_ratio=0.3, skip_layers=[])  # 3 protected, 7 chosen
    for layer_norms, layer_kept in zip(norms, kept, strict=True):
        assert torch.equal(layer_kept, _lowest(layer_norms, 10, recent=3))


def test_fix_size_l2_strategies_differ_and_random_is_seeded(setup):
    model, ids, norms = setup
    runs = {
        s: _kept(model, ids, "fix_size_l2", 10, recent_ratio=0.3, strategy=s, skip_layers=[])
        for s in ("keep_low", "keep_high", "random")
    }
    for layer_norms, layer_kept in zip(norms, runs["keep_high"], strict=True):
        assert torch.equal(layer_kept, _lowest(-layer_norms, 10, recent=3))  # the highest norms
    for layer_kept in runs["random"]:
        assert set(range(T - 3, T)) <= set(layer_kept[0, 0].tolist())  # the protected zone stays
    again = _kept(model, ids, "fix_size_l2", 10, recent_ratio=0.3, strategy="random", skip_layers=[])
    assert all(torch.equal(a, b) for a, b in zip(runs["random"], again, strict=True))
    for a, b in [("keep_low", "keep_high"), ("keep_low", "random"), ("keep_high", "random")]:
        assert any(not torch.equal(x, y) for x, y in zip(runs[a], runs[b], strict=True)), (a, b)


def test_fix_size_l2_skips_layers_0_and_1_by_default(setup):
    model, ids, _ = setup
    assert [layer.length for layer in _prefill(model, ids, "fix_size_l2", 10).layers] == [T, T]
    cache = _prefill(model, ids, "fix_size_l2", 10, skip_layers=[0])
    assert cache.layers[0].budget is None and [layer.length for layer in cache.layers] == [T, 10]


@pytest.mark.parametrize(
    "params,budget,heavy",
    [({"heavy_size": 3}, 12, 3), ({}, 16, 2)],  # default heavy_ratio 0.125: int(16 * 0.125) = 2
)
def test_h2o_l2_keeps_sinks_lowest_norm_heavy_hitters_and_the_rest_recent(setup, params, budget, heavy):
    model, ids, norms = setup
    kept = _kept(model, ids, "h2o_l2", budget, **params)
    for layer_norms, layer_kept in zip(norms, kept, strict=True):
        assert torch.equal(layer_kept, _lowest(layer_norms, budget, sinks=4, recent=budget - 4 - heavy))


def test_snapkv_lite_pools_the_inverted_norm_and_keeps_the_window(setup):
    model, ids, norms = setup
    w, k, budget = 4, 3, 10
    kept = _kept(model, ids, "snapkv_lite", budget, window_size=w, kernel_size=k)
    for layer_norms, layer_kept in zip(norms, kept, strict=True):
        flat = -layer_norms.reshape(-1, 1, T)
        pooled = F.avg_pool1d(flat, k, stride=1, padding=k // 2, count_include_pad=False)
        pooled = pooled.reshape(layer_norms.shape)
        chosen = pooled[..., : T - w].topk(budget - w, dim=-1).indices
        window = torch.arange(T - w, T).expand(1, pooled.shape[1], -1)
        assert torch.equal(layer_kept, torch.cat([chosen, window], dim=-1).sort(dim=-1).values)


def test_adaptive_l2_progressive_regime(setup):
    model, ids, norms = setup
    # budget 16: soft 8, hard 40; L = 24: progress (24 - 8) / 32 = 0.5, keep ratio 0.9 - 0.5 * 0.6 = 0.6,
    # keep max(int(24 * 0.6), 8) = 14, the newest int(14 * 0.2) = 2 protected, 12 lowest norms.
    cache = _prefill(model, ids, "adaptive_l2", 16, hard_ratio=2.5)
    for layer_norms, layer in zip(norms, cache.layers, strict=True):
        assert torch.equal(layer.positions.sort(dim=-1).values, _lowest(layer_norms, 14, recent=2))


# Past the hard limit (2 x budget < 24). Budget 8 leaves no middle part: the seed keeps the newest tokens.
@pytest.mark.parametrize("budget,sinks,recent", [(10, 4, 5), (8, 0, 8)])
def test_adaptive_l2_past_the_hard_limit_keeps_sinks_recent_half_lowest_norms(setup, budget, sinks, recent):
    model, ids, norms = setup
    kept = _kept(model, ids, "adaptive_l2", budget)
    for layer_norms, layer_kept in zip(norms, kept, strict=True):
        assert torch.equal(layer_kept, _lowest(layer_norms, budget, sinks=sinks, recent=recent))


def test_adaptive_l2_sawtooths_below_the_budget_then_holds_it():
    model, _ = load("tiny_llama")
    ids = torch.randint(3, model.config.vocab_size, (1, 60), generator=torch.Generator().manual_seed(4))
    cache = make_cache(model, "adaptive_l2", budget=12)  # soft 6, hard 24
    lengths = []
    for t in range(60):
        with torch.no_grad():
            model(ids[:, t : t + 1], past_key_values=cache)
        lengths.append(cache.layers[0].length)
    assert max(lengths) <= 12
    # First compression at L = 13: ratio 0.9 - 0.6 * 7 / 18, keep max(int(13 * 0.667), 6) = 8.
    assert lengths[12] == 8
    assert lengths[-10:] == [12] * 10  # past the hard limit: the full budget


@pytest.mark.parametrize("decay,min_size,budgets", [(0.5, 6, [20, 10]), (0.25, 6, [20, 6])])
def test_pyramid_kv_decay_budgets_per_layer_and_selection(setup, decay, min_size, budgets):
    model, ids, norms = setup
    cache = _prefill(model, ids, "pyramid_kv_decay", 20, layer_decay=decay, min_size=min_size)
    assert [layer.budget for layer in cache.layers] == [max(int(20 * decay**i), min_size) for i in range(2)]
    assert [layer.budget for layer in cache.layers] == budgets
    for layer_norms, layer, size in zip(norms, cache.layers, budgets, strict=True):
        expected = _lowest(layer_norms, size, sinks=min(4, size // 8), recent=size // 2)
        assert torch.equal(layer.positions.sort(dim=-1).values, expected)


def test_pyramid_kv_decay_profiles_follow_the_kvcompress_formulas():
    build = lambda **p: build_method("pyramid_kv_decay", **p)  # noqa: E731
    # 6 layers, base 512, floor 128: linear steps (512 - 128) / 5 = 76.8 per layer, floored by int().
    assert build(profile="linear", min_size=128).layer_budgets([512] * 6) == [512, 435, 358, 281, 204, 128]
    assert build(profile="exponential", min_size=64).layer_budgets([512] * 4) == [512, 460, 414, 373]
    assert build(profile="constant", min_size=64).layer_budgets([512] * 3) == [512] * 3
    assert build(profile="linear", min_size=100, skip_layers=[-1]).layer_budgets([200] * 3) == [
        200,
        150,
        None,
    ]
    with pytest.raises(ValueError, match="method.profile must be one of"):
        build(profile="cosine").validate(512)


CONFIGS = [
    ("fix_size_l2", {"recent_ratio": 0.25, "skip_layers": []}),
    ("fix_size_l2", {"strategy": "random", "skip_layers": [1]}),
    ("h2o_l2", {}),
    ("snapkv_lite", {"window_size": 4, "kernel_size": 3}),
    ("adaptive_l2", {}),
    ("pyramid_kv_decay", {"layer_decay": 0.8, "min_size": 4}),
    ("pyramid_kv_decay", {"profile": "linear", "min_size": 4}),
]


@pytest.mark.parametrize("method,params", CONFIGS)
def test_budget_never_exceeded_token_by_token(method, params):
    model, _ = load("tiny_llama")
    ids = torch.randint(3, model.config.vocab_size, (1, 40), generator=torch.Generator().manual_seed(5))
    cache = make_cache(model, method, budget=12, **params)
    for t in range(40):
        with torch.no_grad():
            model(ids[:, t : t + 1], past_key_values=cache)
        for layer in cache.layers:
            assert layer.length <= (t + 1 if layer.budget is None else layer.budget), (t, layer.layer_idx)


@pytest.mark.parametrize("method,params", [c for c in CONFIGS if c[1].get("strategy") != "random"])
def test_kv_heads_choose_from_their_own_keys(setup, method, params):
    model, ids, _ = setup
    kept = _kept(model, ids, method, 12, **params)
    assert any(not torch.equal(k[:, 0], k[:, 1]) for k in kept)


@pytest.mark.parametrize(
    "method,params,option",
    [
        ("fix_size_l2", {"recent_ratio": 1.5}, "recent_ratio"),
        ("fix_size_l2", {"strategy": "keep_middle"}, "strategy"),
        ("h2o_l2", {"start_size": -1}, "start_size"),
        ("h2o_l2", {"start_size": 8, "heavy_size": 5}, "start_size"),  # 8 + 5 > budget 12
        ("h2o_l2", {"heavy_ratio": 1.5}, "heavy_ratio"),
        ("h2o_l2", {"heavy_size": -1}, "heavy_size"),
        ("snapkv_lite", {"window_size": 12}, "window_size"),
        ("snapkv_lite", {"window_size": 4, "kernel_size": 4}, "kernel_size"),
        ("adaptive_l2", {"soft_ratio": 1.0}, "soft_ratio"),
        ("adaptive_l2", {"hard_ratio": 0.4}, "hard_ratio"),
        ("adaptive_l2", {"keep_ratio_min": 0.95}, "keep_ratio_min"),
        ("pyramid_kv_decay", {"layer_decay": 0.0, "min_size": 4}, "layer_decay"),
        ("pyramid_kv_decay", {"layer_decay": 1.5, "min_size": 4}, "layer_decay"),
        ("pyramid_kv_decay", {}, "min_size"),  # default 64 > budget 12
        ("pyramid_kv_decay", {"min_size": 0}, "min_size"),
    ],
)
def test_bad_parameters_name_the_option(method, params, option):
    model, _ = load("tiny_llama")
    with pytest.raises(ValueError, match=f"method.{option}"):
        make_cache(model, method, budget=12, **params)
