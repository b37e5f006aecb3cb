"""Head-type and layer-budget methods (razor_attention, dynamickv, uncomp) against hand computations.

Each rule is checked on hand-made numbers (probe scores, allocations, entropies, groupings) and then on a tiny
model against values computed independently from its plain run (full-cache keys, eager attention weights,
pre-RoPE keys from the key projection); the masking oracle covers the head and layer budgets these methods
produce, which the engine matrix (uniform settings there) cannot.
"""

import copy
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM

from kvexp.engine.attention import kvexp_attention
from kvexp.methods import build_method, make_cache
from kvexp.methods import dynamickv as dynamickv_module
from kvexp.methods import razor_attention as razor_module
from kvexp.methods.dynamickv import share_with_caps
from kvexp.methods.razor_attention import copy_task_scores, probe_scores, select_heads
from kvexp.methods.uncomp import elbow, group_budgets, truncated_entropy
from tests.conftest import load
from tests.test_engine import _check_oracle, _ids

NO_PROBE = {"induction_ratio": 0.0, "echo_ratio": 0.0}


def _run(model, ids, cache):
    with torch.no_grad():
        model(ids, past_key_values=cache)
    return cache


def _live_per_head(cache) -> list[list[int]]:
    return [layer.live()[0].sum(-1).tolist() for layer in cache.layers]


# -- razor_attention: the compensation token -----------------------------------------------------------------


@pytest.fixture(scope="module")
def llama_full():
    """tiny_llama's uncompressed keys and values for 26 tokens: [1, Hkv, 26, D] per layer."""
    model, _ = load("tiny_llama")
    ids = _ids(model, 26, seed=3)
    full = _run(model, ids, make_cache(model, "full"))
    return model, ids, [(layer.keys.clone(), layer.values.clone()) for layer in full.layers]


def _slot(layer, head, position):
    return int((layer.positions[0, head] == position).nonzero()[0, 0])


def test_compensation_token_is_the_mean_of_the_evicted_tokens_and_merges_keep_the_count(llama_full):
    model, ids, full = llama_full
    cache = _run(model, ids[:, :24], make_cache(model, "razor_attention", budget=10, **NO_PROBE))
    # Prefill of 24: sinks 0-3, one compensation token for 4..18 (15 tokens), the newest 5 (19..23).
    for step, (first, last, recent) in enumerate([(4, 18, range(19, 24)), (4, 19, range(20, 25))]):
        if step:
            _run(model, ids[:, 24:25], cache)  # token 24 pushes token 19 out of the window: merged in
        count = last - first + 1
        for layer, (keys, values) in zip(cache.layers, full, strict=True):
            for h in range(layer.kv_heads):
                live = layer.positions[0, h][layer.live()[0, h]]
                assert sorted(live.tolist()) == [
                    0,
                    1,
                    2,
                    3,
                    last,
                    *recent,
                ]  # its position: the newest it holds
                s = _slot(layer, h, last)
                assert layer.state("tokens")[0, h, s] == count
                assert layer.bias[0, h, s].item() == pytest.approx(math.log(count))
                assert torch.allclose(layer.keys[0, h, s], keys[0, h, first : last + 1].mean(0), atol=1e-5)
                assert torch.allclose(
                    layer.values[0, h, s], values[0, h, first : last + 1].mean(0), atol=1e-5
                )
                others = layer.live()[0, h].clone()
                others[s] = False
                assert (layer.bias[0, h][others] == 0).all() and (
                    layer.state("tokens")[0, h][others] == 1
                ).all()


def test_attention_with_the_compensation_token_equals_the_hand_computation(llama_full):
    model, ids, full = llama_full
    cache = _run(model, ids[:, :24], make_cache(model, "razor_attention", budget=10, **NO_PROBE))
    layer = cache.layers[0]
    g = torch.Generator().manual_seed(7)
    heads, dim, scale = model.config.num_attention_heads, layer.head_dim, 0.25
    query = torch.randn(1, heads, 1, dim, generator=g)
    new_key, new_value = (
        torch.randn(1, layer.kv_heads, 1, dim, generator=g),
        torch.randn(1, layer.kv_heads, 1, dim),
    )
    keys, values = layer.update(new_key, new_value)
    out, _ = kvexp_attention(SimpleNamespace(layer_idx=0, training=False), query, keys, values, None, scale)
    # By hand from the uncompressed cache: sinks, the window 19..23 and the new token once each, the mean of
    # tokens 4..18 fifteen times (the ln 15 bias).
    full_keys, full_values = full[0]
    groups = heads // layer.kv_heads
    for h in range(heads):
        g_kv = h // groups
        kept = [0, 1, 2, 3, *range(19, 24)]
        k = torch.cat(
            [full_keys[0, g_kv, kept], new_key[0, g_kv], full_keys[0, g_kv, 4:19].mean(0, keepdim=True)]
        )
        v = torch.cat(
            [full_values[0, g_kv, kept], new_value[0, g_kv], full_values[0, g_kv, 4:19].mean(0, keepdim=True)]
        )
        weight = torch.exp(k @ query[0, h, 0] * scale)
        weight[-1] *= 15
        expected = (weight[:, None] * v).sum(0) / weight.sum()
        assert torch.allclose(out[0, 0, h], expected, atol=1e-5)


def test_without_compensation_razor_keeps_sinks_and_the_recent_window(llama_full):
    model, ids, _ = llama_full
    cache = _run(
        model, ids[:, :24], make_cache(model, "razor_attention", budget=10, compensation=False, **NO_PROBE)
    )
    for layer in cache.layers:
        assert (layer.positions.sort(-1).values == torch.tensor([0, 1, 2, 3, *range(18, 24)])).all()
        assert not layer.has_bias


# -- razor_attention: retrieval heads ------------------------------------------------------------------------


def _causal_uniform(length: int, heads: int) -> torch.Tensor:
    mask = torch.ones(length, length).tril()
    return (mask / mask.sum(-1, keepdim=True)).expand(1, heads, length, length).clone()


def test_copy_task_scores_find_planted_induction_and_echo_heads():
    length, lead, heads, kv_heads = 6, 1, 4, 2
    total = lead + 2 * length
    attentions = [_causal_uniform(total, heads), _causal_uniform(total, heads)]
    second = torch.arange(length) + lead + length
    attentions[1][0, 2, second] = 0.0
    attentions[1][0, 2, second, torch.arange(length) + lead + 1] = (
        1.0  # copies: the token after the first copy's
    )
    attentions[0][0, 1, second] = 0.0
    attentions[0][0, 1, second, torch.arange(length) + lead] = 1.0  # echoes: the first copy's same token
    induction, echo = copy_task_scores(attentions, length, lead, kv_heads)
    assert induction.shape == echo.shape == (2, kv_heads)
    assert (
        induction[1, 1] == 1.0 and echo[0, 0] == 1.0
    )  # query head 2 -> KV head 1, query head 1 -> KV head 0
    uniform = (1.0 / (second + 1).float()).mean()  # a uniform causal head's share on any one earlier token
    assert torch.allclose(induction[0], uniform.expand(2)) and torch.allclose(induction[1, 0], uniform)
    assert torch.allclose(echo[1], uniform.expand(2)) and torch.allclose(echo[0, 1], uniform)


def test_select_heads_takes_the_top_induction_then_echo_scores():
    induction = torch.tensor(
        [[0.1, 0.9, 0.2], [0.8, 0.3, 0.0], [0.05, 0.4, 0.7], [0.6, 0.0, 0.1]]
    )  # 12 KV heads
    echo = torch.tensor([[0.0, 0.99, 0.0], [0.0, 0.0, 0.5], [0.0, 0.0, 0.0], [0.0, 0.7, 0.0]])
    chosen = select_heads(induction, echo, induction_ratio=0.25, echo_ratio=0.1)  # 3 by induction, 1 by echo
    expected = torch.zeros(4, 3, dtype=torch.bool)
    expected[0, 1] = expected[1, 0] = expected[2, 2] = True  # 0.9, 0.8, 0.7
    expected[3, 1] = True  # best echo (0.99) is already in; next 0.7
    assert torch.equal(chosen, expected)
    assert not select_heads(induction, echo, 0.0, 0.0).any()


def test_probe_is_deterministic_cached_per_model_and_selects_the_top_scores(monkeypatch):
    model, _ = load("tiny_llama")
    memo = {}
    monkeypatch.setattr(razor_module, "_PROBED", memo)
    calls = []
    monkeypatch.setattr(razor_module, "copy_task_scores", lambda *a: calls.append(1) or copy_task_scores(*a))
    first = probe_scores(model, 64, 0)
    again = probe_scores(model, 64, 0)
    assert len(calls) == 1 and again is first and len(memo) == 1  # one forward per model and setting
    memo.clear()
    rerun = probe_scores(model, 64, 0)
    assert all(torch.equal(a, b) for a, b in zip(first, rerun, strict=True))  # deterministic
    assert len(calls) == 2 and not torch.equal(probe_scores(model, 64, 1)[0], first[0])  # the seed matters
    cache = make_cache(
        model, "razor_attention", budget=10, induction_ratio=0.25, probe_length=64
    )  # 1 of 4 heads
    method = cache.layers[0].method
    assert torch.equal(method._full, select_heads(*first, 0.25, 0.01))
    assert method._full.sum() == 1 and first[0][method._full] == first[0].max()
    assert model.config._attn_implementation == "kvexp"  # the probe's eager switch is undone
    with pytest.raises(ValueError, match="probe_length"):
        make_cache(model, "razor_attention", budget=10, probe_length=1000)  # 260-token vocabulary


@pytest.mark.parametrize("compensation", [False, True])
def test_retrieval_heads_keep_everything_and_the_others_their_budget(compensation):
    model, _ = load("tiny_llama")
    ids = _ids(model, 40)
    params = {"retrieval_heads": [[0, 1]], "compensation": compensation}
    if not compensation:  # the masking oracle applies to eviction (a merge is checked exactly above)
        _check_oracle(model, ids, 3, method="razor_attention", budget=12, **params)
    cache = make_cache(model, "razor_attention", budget=12, **params)
    for t in range(0, 40, 3):
        _run(model, ids[:, t : t + 3], cache)
        seen = min(t + 3, 40)
        # The documented semantics: a retrieval head holds every token and makes its layer that long, every
        # other head holds at most its budget of live entries, a layer without a retrieval head stays in it.
        assert _live_per_head(cache) == [[min(seen, 12), seen], [min(seen, 12)] * 2]
        assert cache.physical_lengths() == [seen, min(seen, 12)]
    assert (cache.layers[0].bias[0, 1] == 0).all()  # the retrieval head has no compensation token


def test_explicit_head_budgets_apply_to_non_retrieval_heads():
    model, _ = load("tiny_llama")
    ids = _ids(model, 40)
    head_budgets = [[9, 14], [7, 11]]
    cache = make_cache(model, "razor_attention", head_budgets=head_budgets, retrieval_heads=[[1, 1]])
    _run(model, ids, cache)
    assert _live_per_head(cache) == [[9, 14], [7, 40]]


@pytest.mark.parametrize(
    "params,budget,option",
    [
        ({"induction_ratio": 1.5}, 10, "induction_ratio"),
        ({"echo_ratio": -0.1}, 10, "echo_ratio"),
        ({"induction_ratio": 0.7, "echo_ratio": 0.5}, 10, "echo_ratio"),
        ({"sink_tokens": -1}, 10, "sink_tokens"),
        ({"sink_tokens": 9}, 10, "sink_tokens"),
        ({"probe_length": 1}, 10, "probe_length"),
        ({"retrieval_heads": [[0]]}, 10, "retrieval_heads"),
        ({"retrieval_heads": [[2, 0]]}, 10, "retrieval_heads"),
    ],
)
def test_razor_bad_parameters_name_the_option(params, budget, option):
    model, _ = load("tiny_llama")
    with pytest.raises(ValueError, match=f"method.{option}"):
        make_cache(model, "razor_attention", budget=budget, **params)


def test_compensation_rejects_rerotation_and_wrappers_forward_prepare():
    model, _ = load("tiny_llama")
    cache = make_cache(model, "razor_attention", budget=10, positions="rerotate", **NO_PROBE)
    with pytest.raises(ValueError, match="method.compensation"):
        _run(model, _ids(model, 20), cache)
    for wrapper in (
        build_method("prefill_decoding", prefill={"name": "razor_attention"}),
        build_method("adakv", scorer="razor_attention"),
    ):
        _run(
            model, _ids(model, 20), make_cache(model, wrapper, budget=10)
        )  # the probe ran through the wrapper


def test_retrieval_heads_are_logged_once_per_selection_not_once_per_sequence(caplog):
    model, _ = load("tiny_llama")
    method = build_method("razor_attention", retrieval_heads=[[0, 1]])
    with caplog.at_level("INFO", logger=razor_module.__name__):
        for _ in range(3):  # make_cache prepares the method for every sample
            make_cache(model, method, budget=10)
        method.retrieval_heads = [[1, 0]]
        make_cache(model, method, budget=10)
    assert [r.getMessage() for r in caplog.records if r.levelname == "INFO"] == [
        "razor_attention: 1 of 4 KV heads keep the full cache: [[0, 1]]",
        "razor_attention: 1 of 4 KV heads keep the full cache: [[1, 0]]",
    ]


# -- dynamickv -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "total,weights,caps,expected",
    [
        (16, [26, 6], [80, 80], [13, 3]),  # p_l * total
        (10, [1, 1, 1], [9, 9, 9], [3, 3, 4]),  # floors, the remainder to the last layer
        (
            20,
            [1, 1, 2],
            [100, 3, 100],
            [5, 3, 12],
        ),  # a capped layer's excess goes to the others in proportion
        (12, [0, 5], [9, 9], [0, 9]),  # no selected entry: window only; every cap binding: below the total
        (7, [3, 1, 1, 1], [2, 9, 9, 9], [2, 1, 2, 2]),  # 5 left over three: 1.67 each -> 1, 1, 1 + 2
    ],
)
def test_share_with_caps(total, weights, caps, expected):
    assert share_with_caps(total, weights, caps) == expected
    assert sum(expected) <= total and all(s <= c for s, c in zip(expected, caps, strict=True))


def _window_votes(attn, window, kernel):
    """SnapKV votes by hand from eager attention [1, Hkv, G, T, T]: the last `window` rows summed, mean over
    the group, average-pooled (k, padding k//2, pads not counted), the window itself +inf. [1, Hkv, T]."""
    length = attn.shape[-1]
    votes = attn[:, :, :, length - window :, :].sum(dim=3).mean(dim=2)
    pooled = F.avg_pool1d(votes.reshape(-1, 1, length), kernel, 1, kernel // 2, count_include_pad=False)
    pooled = pooled.reshape(votes.shape)
    pooled[..., length - window :] = float("inf")
    return pooled


def test_dynamickv_budgets_follow_the_global_top_k_of_the_prefill_votes():
    # A random model's attention is nearly uniform, so its votes nearly tie; sharper queries separate them
    # (relative gaps > 5e-4 at every top-k boundary here), so the hand top-k does not hinge on float noise.
    model = copy.deepcopy(load("tiny_llama")[0])
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(8.0)
    length, budget, window, kernel = 200, 12, 4, 3
    ids = _ids(model, length, seed=10)
    model.set_attn_implementation("eager")
    with torch.no_grad():
        attentions = model(ids, output_attentions=True).attentions
    groups = model.config.num_attention_heads // model.config.num_key_value_heads
    votes = [_window_votes(a.reshape(1, -1, groups, length, length), window, kernel) for a in attentions]
    # By hand (docs/methods.md#dynamickv): global top-(b * Hkv * NL) over both layers' candidates, p_l = a layer's share,
    # n_l = p_l * b * NL under the cap T = min(ratio_max * b, L - w). Two layers: one, final, round.
    b, kv_heads = budget - window, model.config.num_key_value_heads
    candidates = torch.stack([v[..., : length - window] for v in votes])  # [NL, 1, Hkv, L - w]
    top = candidates.flatten().topk(b * kv_heads * 2).indices
    counts = torch.bincount(top // candidates[0].numel(), minlength=2).tolist()
    assert counts[0] != counts[1]  # the layers differ: a real reallocation
    sizes = share_with_caps(2 * b, counts, [min(10 * b, length - window)] * 2)
    cache = _run(
        model, ids, make_cache(model, "dynamickv", budget=budget, window_size=window, kernel_size=kernel)
    )
    assert [layer.budget for layer in cache.layers] == [s + window for s in sizes]
    assert sum(layer.budget for layer in cache.layers) == 2 * budget
    for layer, layer_votes, size in zip(cache.layers, votes, sizes, strict=True):
        kept = layer.positions.sort(-1).values
        expected = (
            layer_votes.topk(size + window, dim=-1).indices.sort(-1).values
        )  # window + top-n_l per head
        assert torch.equal(kept, expected)
    # Later steps keep each layer at its size: the allocation is the prefill's, once.
    for t in range(4):
        _run(model, _ids(model, 1, seed=t), cache)
        assert cache.physical_lengths() == [s + window for s in sizes]


def _deep_llama(layers: int):
    cfg = AutoConfig.for_model(
        "llama",
        hidden_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        intermediate_size=128,
        vocab_size=260,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")


def test_dynamickv_rebudgets_every_interval_layers_and_at_the_last_layer(monkeypatch):
    model = _deep_llama(6)  # 6 mod 4 != 0: the reference would never re-budget layers 4 and 5
    rounds = []

    def spy(total, weights, caps):
        sizes = share_with_caps(total, weights, caps)
        rounds.append((total, len(weights), caps, sizes))
        return sizes

    monkeypatch.setattr(dynamickv_module, "share_with_caps", spy)
    budget, window, length = 12, 4, 120
    cache = make_cache(model, "dynamickv", budget=budget, window_size=window, kernel_size=3, ratio_max=2)
    _run(model, _ids(model, length), cache)
    b = budget - window
    assert [(total, n) for total, n, _, _ in rounds] == [(6 * b, 4), (6 * b, 6)]  # after layers 3 and 5
    assert rounds[0][2] == [2 * b] * 4  # tentative caps T = min(ratio_max * b, L - w)
    assert rounds[1][2] == [*rounds[0][3], 2 * b, 2 * b]  # truncation is irreversible
    final = rounds[1][3]
    assert sum(final) == 6 * b and [layer.budget for layer in cache.layers] == [s + window for s in final]
    assert cache.physical_lengths() == [s + window for s in final]


def test_dynamickv_per_layer_budgets_and_the_oracle():
    model, _ = load("tiny_llama")
    ids = _ids(model, 40)
    # Chunks of 7: the second one makes both layers compress; ratio_max 2 lets them trade.
    cache = _check_oracle(
        model, ids, 7, method="dynamickv", budget=12, window_size=4, kernel_size=3, ratio_max=2
    )
    assert sum(layer.budget for layer in cache.layers) == 24
    assert cache.physical_lengths() == [layer.budget for layer in cache.layers]
    # Per-layer budgets: only the layers over budget in the allocating forward take part (here layer 0 alone).
    cache = _check_oracle(model, ids, 3, method="dynamickv", budget=[9, 14], window_size=4, kernel_size=3)
    assert [layer.budget for layer in cache.layers] == [9, 14] and cache.physical_lengths() == [9, 14]


@pytest.mark.parametrize(
    "params,option",
    [({"ratio_max": 0.5}, "ratio_max"), ({"interval": 0}, "interval"), ({"window_size": 12}, "window_size")],
)
def test_dynamickv_bad_parameters_name_the_option(params, option):
    model, _ = load("tiny_llama")
    with pytest.raises(ValueError, match=f"method.{option}"):
        make_cache(model, "dynamickv", budget=12, **params)


# -- uncomp --------------------------------------------------------------------------------------------------


def test_truncated_matrix_entropy_on_hand_made_matrices():
    three = torch.zeros(3, 4)
    three[0, 0], three[1, 1], three[2, 2] = 2.0, -2.0, 2.0  # spectrum [1/3, 1/3, 1/3, 0]
    assert truncated_entropy(three, top=3).item() == pytest.approx(math.log(3))
    assert truncated_entropy(three, top=1).item() == pytest.approx(math.log(3) / 3)
    assert truncated_entropy(three).item() == pytest.approx(math.log(3))  # elbow after the third
    rank_one = torch.outer(torch.arange(1.0, 6.0), torch.tensor([1.0, -2.0, 0.5]))
    assert truncated_entropy(rank_one).item() == pytest.approx(0.0, abs=1e-12)
    spectrum = torch.tensor([0.5, 0.3, 0.1, 0.05, 0.05], dtype=torch.float64)
    # Scaled to [0, 1]: x = i/4, y = (l - 0.05)/0.45; distances 1 - x - y = [0, .19, .39, .25, 0] -> K = 3.
    assert elbow(spectrum).item() == 3
    assert elbow(torch.full((4,), 0.25, dtype=torch.float64)).item() == 4  # flat: no elbow
    x = torch.diag(spectrum.sqrt()) * 3.0  # Gram spectrum = `spectrum` (any scale)
    expected = -sum(p * math.log(p) for p in (0.5, 0.3, 0.1))
    assert truncated_entropy(x).item() == pytest.approx(expected)
    padded = torch.cat([three, torch.zeros(2, 4)])  # dead slots are zeroed: they change nothing
    batched = truncated_entropy(torch.stack([padded, padded.flip(0)]), top=3)
    assert torch.allclose(batched, torch.tensor([math.log(3)] * 2, dtype=torch.float64))


def test_group_budgets_split_the_layer_total_by_entropy():
    entropy = torch.tensor([3.0, 1.0, 2.0, 0.0])
    # Two groups: heads 3, 1 (low) get 0.5 / (2 * 0.5 + 2 * 1.5) of 4 * (10 - 2) = 4 each, heads 2, 0 get 12.
    assert group_budgets(entropy, [0.5, 1.5], budget=10, window=2).tolist() == [14, 6, 14, 6]
    # Three heads in two groups (2 + 1): shares 18 * [2, 1, 1] / 4 = [9, 4.5, 4.5]; the remainder to head 1.
    assert group_budgets(torch.tensor([5.0, 1.0, 3.0]), [1, 2], budget=7, window=1).tolist() == [10, 6, 5]
    assert group_budgets(torch.tensor([1.0, 2.0]), [1.0], budget=9, window=3).tolist() == [9, 9]


def test_uncomp_groups_heads_by_the_entropy_of_their_pre_rope_keys():
    model, _ = load("tiny_llama")
    length, budget, window = 40, 12, 4
    ids = _ids(model, length)
    captured = []  # pre-RoPE keys straight from the key projection: [1, T, Hkv * D] per layer
    hooks = [
        layer.self_attn.k_proj.register_forward_hook(lambda m, i, o: captured.append(o.detach()))
        for layer in model.model.layers
    ]
    try:
        cache = make_cache(
            model,
            "uncomp",
            budget=budget,
            window_size=window,
            kernel_size=3,
            group_weights=[1.0, 3.0],
            top_eigen=4,
        )
        _run(model, ids, cache)
    finally:
        for hook in hooks:
            hook.remove()
    kv_heads = model.config.num_key_value_heads
    for layer, keys in zip(cache.layers, captured, strict=True):
        heads = keys.reshape(length, kv_heads, -1).transpose(0, 1).double()  # [Hkv, T, D]
        power = torch.linalg.svdvals(heads) ** 2  # the Gram spectrum, independently of eigvalsh
        p = power / power.sum(-1, keepdim=True)
        entropy = -(p[:, :4] * p[:, :4].log()).sum(-1)
        low, high = entropy.argsort().tolist()
        expected = [0, 0]
        expected[low], expected[high] = window + 4, window + 12  # 2 * 8 selected split 1:3
        assert _live_per_head(cache)[layer.layer_idx] == expected
        assert layer.length == window + 12  # as long as its longest head; the total is Hkv * budget


def test_uncomp_budgets_hold_while_streaming_and_match_the_oracle():
    model, _ = load("tiny_qwen3")
    ids = _ids(model, 40)
    params = {"window_size": 4, "kernel_size": 3, "group_weights": [0.5, 1.5]}
    cache = _check_oracle(model, ids, 1, method="uncomp", budget=12, **params)
    heads = cache.layers[0].kv_heads
    for layer, live in zip(cache.layers, _live_per_head(cache), strict=True):
        assert sum(live) == heads * 12 and sorted(live) == sorted(
            group_budgets(torch.arange(heads), [0.5, 1.5], 12, 4).tolist()
        )
        assert layer.length == max(live)
    # Explicit per-head budgets take precedence over the grouping.
    head_budgets = [[6 + 3 * h for h in range(heads)] for _ in cache.layers]
    cache = _check_oracle(model, ids, 2, method="uncomp", head_budgets=head_budgets, **params)
    assert _live_per_head(cache) == head_budgets


@pytest.mark.parametrize(
    "params,option",
    [
        ({"group_weights": []}, "group_weights"),
        ({"group_weights": [1.0, 0.0]}, "group_weights"),
        ({"top_eigen": 0}, "top_eigen"),
        ({"window_size": 16}, "window_size"),
    ],
)
def test_uncomp_bad_parameters_name_the_option(params, option):
    model, _ = load("tiny_llama")
    with pytest.raises(ValueError, match=f"method.{option}"):
        make_cache(model, "uncomp", budget=12, **params)
