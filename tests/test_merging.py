"""The shared merge math (kvexp/methods/merging.py) against hand computations on small tensors.

Batched GQA layers (B = 2, Hkv = 2, G = 2) built directly, so every group, weight and bias is known by hand; the
exact case runs through kvexp's attention function, so the bias is proven where the model uses it.
"""

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from kvexp.engine.attention import kvexp_attention
from kvexp.engine.cache import CacheOptions, CompressedLayer, KVCache
from kvexp.methods import build_method
from kvexp.methods.base import skip_layers
from kvexp.methods.merging import fold, most_similar, reject_rerotate

B, HKV, G, L, D = 2, 2, 2, 6, 8


def _layer(keys, values, method="full", positions="original", **params):
    layer = CompressedLayer(0, None, build_method(method, **params), CacheOptions(positions=positions))
    KVCache([layer])  # the attention function reaches the cache through its layer
    layer.update(keys, values)
    return layer


def _random(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _attend(layer, query, new_key, new_value, scale=0.3):
    """kvexp's attention of `query` [B, H, 1, D] over the layer plus one new token: [B, H, D]."""
    keys, values = layer.update(new_key, new_value)
    out, _ = kvexp_attention(SimpleNamespace(layer_idx=0, training=False), query, keys, values, None, scale)
    return out[:, 0]


def _target(groups, length=L):
    """[B, Hkv, L] target map from {(b, h): {slot: target}}; unlisted slots -1."""
    target = torch.full((B, HKV, length), -1, dtype=torch.long)
    for (b, h), mapping in groups.items():
        for slot, to in mapping.items():
            target[b, h, slot] = to
    return target


@pytest.mark.parametrize("calibrate", [True, False])
def test_identical_keys_merged_with_ln2_reproduce_the_unmerged_attention_exactly(calibrate):
    keys, values = _random(B, HKV, L, D), _random(B, HKV, L, D, seed=1)
    keys[:, :, 4] = keys[:, :, 1]  # slot 4 is a copy of slot 1's key on every head; the values differ
    query, new_key, new_value = (
        _random(B, HKV * G, 1, D, seed=2),
        _random(B, HKV, 1, D, seed=3),
        _random(B, HKV, 1, D, seed=4),
    )
    plain = _attend(_layer(keys, values), query, new_key, new_value)

    layer = _layer(keys, values)
    fold(layer, _target({(b, h): {1: 1, 4: 1} for b in range(B) for h in range(HKV)}), calibrate=calibrate)
    layer.bias[:, :, 4] = float("-inf")  # the merged-away slot is gone (what the engine's compaction does)
    assert torch.allclose(layer.values[:, :, 1], (values[:, :, 1] + values[:, :, 4]) / 2, atol=1e-6)
    merged = _attend(layer, query, new_key, new_value)
    if calibrate:
        assert torch.allclose(layer.bias[:, :, 1], torch.full((B, HKV), math.log(2.0)))
        assert torch.allclose(merged, plain, atol=1e-6)
    else:  # without the bias the pair counts once: the output moves
        assert (layer.bias[:, :, 1] == 0).all()
        assert (merged - plain).abs().max() > 1e-3


def test_group_with_prior_biases_gets_the_bias_weighted_mean_key_and_the_logsumexp_bias():
    keys, values = _random(B, HKV, L, D), _random(B, HKV, L, D, seed=1)
    layer = _layer(keys, values)
    prior = torch.zeros(B, HKV, L)
    prior[0, 1, [0, 2, 5]] = torch.tensor([math.log(2.0), 0.0, math.log(3.0)])  # stand for 2, 1, 3 tokens
    prior[1, 0, [3, 4]] = torch.tensor([math.log(4.0), math.log(5.0)])
    layer.bias.copy_(prior)
    size = fold(layer, _target({(0, 1): {0: 2, 2: 2, 5: 2}, (1, 0): {3: 4, 4: 4}}))

    expected_key = (2 * keys[0, 1, 0] + keys[0, 1, 2] + 3 * keys[0, 1, 5]) / 6
    assert torch.allclose(layer.keys[0, 1, 2], expected_key, atol=1e-6)
    expected_value = (2 * values[0, 1, 0] + values[0, 1, 2] + 3 * values[0, 1, 5]) / 6  # default weights e^b
    assert torch.allclose(layer.values[0, 1, 2], expected_value, atol=1e-6)
    assert layer.bias[0, 1, 2].item() == pytest.approx(math.log(6.0))
    assert torch.allclose(layer.keys[1, 0, 4], (4 * keys[1, 0, 3] + 5 * keys[1, 0, 4]) / 9, atol=1e-6)
    assert layer.bias[1, 0, 4].item() == pytest.approx(math.log(9.0))
    assert size[0, 1, 2] == 3 and size[1, 0, 4] == 2 and size.sum() == 5
    # Everything but the two targets is untouched (members stay as they were: the engine drops them).
    untouched = torch.ones(B, HKV, L, dtype=torch.bool)
    untouched[0, 1, 2] = untouched[1, 0, 4] = False
    assert torch.equal(layer.keys[untouched], keys[untouched])
    assert torch.equal(layer.values[untouched], values[untouched])
    assert torch.equal(layer.bias[untouched], prior[untouched])


def test_custom_value_and_key_weights():
    keys, values = _random(B, HKV, L, D), _random(B, HKV, L, D, seed=1)
    layer = _layer(keys, values)
    value_weight, key_weight = torch.rand(B, HKV, L) + 0.1, torch.rand(B, HKV, L) + 0.1
    value_weight[1, 1, 0] = float("inf")  # outside every group: must not leak into a sum
    fold(layer, _target({(1, 1): {1: 3, 2: 3, 3: 3}}), value_weight=value_weight, key_weight=key_weight)
    members = [1, 2, 3]
    w = value_weight[1, 1, members]
    assert torch.allclose(
        layer.values[1, 1, 3], (w[:, None] * values[1, 1, members]).sum(0) / w.sum(), atol=1e-6
    )
    k = key_weight[1, 1, members]
    assert torch.allclose(layer.keys[1, 1, 3], (k[:, None] * keys[1, 1, members]).sum(0) / k.sum(), atol=1e-6)
    assert layer.bias[1, 1, 3].item() == pytest.approx(math.log(3.0))  # the bias counts tokens, not weights
    assert torch.isfinite(layer.values).all()


def test_tokens_state_is_summed_over_the_group():
    layer = _layer(
        _random(B, HKV, L, D), _random(B, HKV, L, D), "razor_attention", induction_ratio=0.0, echo_ratio=0.0
    )
    tokens = layer.state("tokens")  # starts at 1 per slot
    tokens[0, 0, 2] = 4.0
    fold(layer, _target({(0, 0): {0: 0, 2: 0, 3: 0}, (1, 1): {5: 5}}))
    assert layer.state("tokens")[0, 0, 0] == 6.0  # 1 + 4 + 1
    assert layer.state("tokens")[1, 1, 5] == 1.0  # a target alone is not a merge
    assert layer.bias[1, 1, 5] == 0.0


def test_most_similar_finds_the_best_target_per_source_and_kv_head():
    angles = torch.tensor(
        [0.0, 0.3, 1.0, 2.0, 2.9, -1.2]
    )  # unit keys in a plane: cos = cos(angle difference)
    keys = torch.zeros(B, HKV, L, D)
    keys[..., 0], keys[..., 1] = angles.cos(), angles.sin()
    keys[1, 1] = keys[1, 1].flip(0)  # another batch row and head: the angles in reverse slot order
    keys = keys * torch.arange(1, L + 1)[:, None]  # norms differ: cosine ignores them
    sources = torch.zeros(B, HKV, L, dtype=torch.bool)
    targets = torch.zeros_like(sources)
    sources[..., [1, 4]] = True
    targets[..., [0, 3]] = True
    targets[0, 1] = False  # a head without targets
    similarity, index = most_similar(keys, sources, targets)
    # slot 1 (0.3 rad) is closest to slot 0 (0 rad), slot 4 (2.9) to slot 3 (2.0)
    assert index[0, 0].tolist() == [-1, 0, -1, -1, 3, -1]
    assert similarity[0, 0, 1].item() == pytest.approx(math.cos(0.3), abs=1e-6)
    assert similarity[0, 0, 4].item() == pytest.approx(math.cos(0.9), abs=1e-6)
    assert index[0, 1].tolist() == [-1] * L and torch.isinf(similarity[0, 1]).all()
    flipped = angles.flip(0)
    for slot in (1, 4):
        best = max((0, 3), key=lambda t: math.cos(flipped[slot] - flipped[t]))
        assert index[1, 1, slot] == best
    assert torch.isinf(similarity[~sources]).all() and (index[~sources] == -1).all()


def test_most_similar_matches_the_full_cosine_matrix_with_uneven_counts():
    keys = _random(3, 4, 20, D, seed=5)
    g = torch.Generator().manual_seed(6)
    sources = (
        torch.rand(3, 4, 20, generator=g) < torch.linspace(0.05, 0.9, 4)[:, None]
    )  # counts differ per head
    targets = ~sources & (torch.rand(3, 4, 20, generator=g) < 0.7)
    similarity, index = most_similar(keys, sources, targets)
    cosine = F.cosine_similarity(keys[:, :, :, None], keys[:, :, None, :], dim=-1)
    cosine = cosine.masked_fill(~targets[:, :, None, :], float("-inf"))
    best, column = cosine.max(dim=-1)
    valid = sources & targets.any(dim=-1, keepdim=True)
    assert torch.allclose(similarity[valid], best[valid], atol=1e-6)
    assert torch.equal(index[valid], column[valid])
    assert (index[~valid] == -1).all() and torch.isinf(similarity[~valid]).all()


def test_reject_rerotate_refuses_merged_keys_under_rerotation():
    keys, values = _random(1, 1, 3, D), _random(1, 1, 3, D)
    reject_rerotate(_layer(keys, values), "simcalkv")  # original positions: fine
    with pytest.raises(ValueError, match="engine.positions"):
        reject_rerotate(_layer(keys, values, positions="rerotate"), "simcalkv")


def test_skip_layers_counts_negative_indices_from_the_end():
    assert skip_layers([8] * 5, [0, 1, -1], "d2o") == [None, None, 8, 8, None]
    assert skip_layers([8, None, 6], [], "d2o") == [8, None, 6]
    with pytest.raises(ValueError, match="skip_layers"):
        skip_layers([8] * 3, [3], "d2o")
