"""KVCompose: its token score recomputed here from the rule (pre-RoPE queries and keys taken from the model's own
projections, RoPE applied in complex form, the queries moved after the context), the running statistics of
token-by-token steps, the composite tokens and the global layer allocation recomputed from the scores, the
invariants (the budgets' total, real lengths, per-head top-k), the options' checks and the yaml."""

import dataclasses
import math
from types import SimpleNamespace

import pytest
import torch
import yaml

from kvexp.config import validate
from kvexp.methods import build_method, make_cache
from kvexp.methods.base import Probing
from kvexp.methods.kvcompose import KVCompose, composite_scores, mean_over_heads
from kvexp.models import _load_tiny
from tests.conftest import ROOT, load
from tests.test_config import _compose
from tests.test_engine import _check_oracle


def _ids(model, length, seed=0, batch=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, model.config.vocab_size, (batch, length), generator=g)


def _deep_llama():
    """A 4-layer tiny llama (GQA 4/2): enough layers for the allocation to matter."""
    spec = {
        "architecture": "llama",
        "tiny": {
            "seed": 3,
            "hidden_size": 64,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 16,
            "intermediate_size": 128,
            "max_position_embeddings": 2048,
        },
    }
    model, _ = _load_tiny(spec, torch.float32)
    return model.eval()


class _Projections:
    """Pre-RoPE queries [H, n, D], keys and values [Hkv, n, D] of one layer, concatenated over the forwards run
    while it is open (row 0), from the model's own q/k/v projections."""

    def __init__(self, model, layer_idx):
        self.attn = model.model.layers[layer_idx].self_attn
        self.d = model.config.head_dim
        self.out = {"q": [], "k": [], "v": []}

    def __enter__(self):
        self.hooks = [
            getattr(self.attn, f"{name}_proj").register_forward_hook(
                lambda _m, _i, out, name=name: self.out[name].append(out[0].detach().double())
            )
            for name in ("q", "k", "v")
        ]
        return self

    def __exit__(self, *exc):
        for hook in self.hooks:
            hook.remove()

    def get(self, name):
        x = torch.cat(self.out[name], dim=0)  # [n, heads * D]
        return x.view(x.shape[0], -1, self.d).transpose(0, 1)  # [heads, n, D]


def _rope(x, positions, inv_freq):
    """RoPE in complex form: dims (d, d + D/2) as the complex number x_d + i x_{d+D/2}, times e^{i pos theta_d}."""
    half = x.shape[-1] // 2
    z = torch.complex(x[..., :half], x[..., half:])
    angle = positions.double()[:, None] * inv_freq.double()[None, :]
    return z * torch.polar(torch.ones_like(angle), angle)


def _attention(q, k, q_pos, k_pos, inv_freq, scale, causal):
    """Softmax attention [H, nq, nk] of pre-RoPE queries [H, nq, D] over pre-RoPE keys [Hkv, nk, D] (GQA: query
    head h reads KV head h // G), each rotated to its position; `causal`: a key after its query is not seen."""
    zq, zk = _rope(q, q_pos, inv_freq), _rope(k, k_pos, inv_freq)
    groups = q.shape[0] // k.shape[0]
    zk = zk.repeat_interleave(groups, dim=0)
    logits = torch.einsum("hid,hjd->hij", zq, zk.conj()).real * scale
    if causal:
        logits = logits.masked_fill(k_pos[None, None, :] > q_pos[None, :, None], -math.inf)
    return logits.softmax(dim=-1)


def _group(x, kv_heads, how):
    """[H, n] per query head to [Hkv, n] (query head h in KV head h // G)."""
    grouped = x.view(kv_heads, -1, x.shape[-1])
    return grouped.mean(dim=1) if how == "mean" else grouped.amax(dim=1)


# -- the token score ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "params",
    [
        {},  # kvpress's defaults: max over queries, mean over the group, + the heads' mean
        {"agg_task": "mean", "agg_group": "max", "value_norm": True, "mean_across_heads": False},
    ],
)
@torch.no_grad()
def test_prefill_score_is_the_moved_queries_attention_reduced_by_hand(params):
    """One-shot prefill of L tokens, nothing evicted: query i moved to position L - 1 + i (after every key) attends
    to all L keys; reduced over the queries (max or mean), over each KV head's group (mean or max), x ||v||, plus the
    mean over the KV heads of the same token's score."""
    model, _ = load("tiny_llama")
    length, inv_freq = 24, model.model.rotary_emb.inv_freq
    method = build_method("kvcompose", layer_allocation=False, **params)
    for layer_idx in range(model.config.num_hidden_layers):
        with _Projections(model, layer_idx) as proj:
            cache = make_cache(model, method, 64)
            model(_ids(model, length), past_key_values=cache)
        layer = cache.layers[layer_idx]
        assert torch.equal(layer.positions[0, 0], torch.arange(length))  # nothing moved: slot j holds token j
        q, k, v = proj.get("q"), proj.get("k"), proj.get("v")
        positions = torch.arange(length)
        probs = _attention(q, k, positions + length - 1, positions, inv_freq, layer.scaling, causal=False)
        per_query_head = probs.amax(dim=1) if method.agg_task == "max" else probs.mean(dim=1)  # [H, L]
        expected = _group(per_query_head, layer.kv_heads, method.agg_group)
        if method.value_norm:
            expected = expected * v.norm(dim=-1)
        if method.mean_across_heads:
            expected = expected + expected.mean(dim=0, keepdim=True)
        assert torch.allclose(method.score(layer)[0].double(), expected, atol=1e-6, rtol=1e-4)


@torch.no_grad()
def test_token_by_token_statistic_is_the_running_max_of_each_steps_group_mean():
    """Token by token (nothing evicted), each step's query is the newest and sees every key: a key's statistic is
    the largest, over the queries at or after it, of the group's mean attention (each step's per-head maxima
    reduced over the group, then combined by max across steps), from the model's own causal attention."""
    model, _ = load("tiny_llama")
    length, inv_freq = 20, model.model.rotary_emb.inv_freq
    ids = _ids(model, length, seed=4)
    for layer_idx in range(model.config.num_hidden_layers):
        cache = make_cache(model, "kvcompose", 64, layer_allocation=False)
        with _Projections(model, layer_idx) as proj:
            for t in range(length):
                model(ids[:, t : t + 1], past_key_values=cache)
        layer = cache.layers[layer_idx]
        positions = torch.arange(length)
        probs = _attention(
            proj.get("q"), proj.get("k"), positions, positions, inv_freq, layer.scaling, causal=True
        )
        per_step = probs.view(layer.kv_heads, -1, length, length).mean(dim=1)  # [Hkv, query i, key j]
        expected = per_step.amax(dim=1)  # max over the steps; a query before key j gives it 0
        assert torch.allclose(layer.state("attention")[0].double(), expected, atol=1e-6, rtol=1e-4)


def _probing(model, cache, ids):
    """What the generation task hands a probing method: the prompt and a way to feed ids through the cache."""
    return Probing(
        ids=ids,
        opening=0,
        closing=torch.tensor([[10]]),
        encode=lambda text: torch.tensor([[11]]),
        run=lambda probe: model(probe, past_key_values=cache),
    )


@torch.no_grad()
def test_repeat_scores_the_prompt_by_its_second_pass_reduced_by_hand():
    """`queries=repeat` (kvpress's reading): the prefill's own attention is not recorded; the prompt fed again after
    itself (positions L .. 2L-1) attends causally over the prompt and its own earlier entries, and each prompt
    entry's score is the largest attention a repeated query gives it, averaged over the group, plus the heads'
    mean; the probe's entries are dropped and nothing is evicted under a budget above the prompt."""
    model, _ = load("tiny_llama")
    length, inv_freq = 20, model.model.rotary_emb.inv_freq
    ids = _ids(model, length, seed=3)
    for layer_idx in range(model.config.num_hidden_layers):
        method = build_method("kvcompose", queries="repeat", layer_allocation=False)
        cache = make_cache(model, method, 64)
        with _Projections(model, layer_idx) as proj:
            model(ids, past_key_values=cache)
            layer = cache.layers[layer_idx]
            assert (
                cache.holding and not layer.state("attention").any()
            )  # the prefill's attention: not recorded
            method.probe(cache, _probing(model, cache, ids))
        assert not cache.holding and cache.get_seq_length() == length and layer.length == length
        q, k = proj.get("q")[:, length:], proj.get("k")  # the second pass's queries; every key of both passes
        positions = torch.arange(2 * length)
        probs = _attention(q, k, positions[length:], positions, inv_freq, layer.scaling, causal=True)
        expected = _group(probs[:, :, :length].amax(dim=1), layer.kv_heads, "mean")
        expected = expected + expected.mean(dim=0, keepdim=True)
        assert torch.allclose(method.score(layer)[0].double(), expected, atol=1e-6, rtol=1e-4)


@torch.no_grad()
def test_repeat_allocates_after_its_probe_and_runs_as_a_generation_task():
    model = _deep_llama()
    ids = _ids(model, 40, seed=10)
    method = _Spy(queries="repeat")
    assert method.probes and not method.allocates and not method.batches
    cache = make_cache(model, method, 12)
    model(ids, past_key_values=cache)
    assert cache.physical_lengths() == [40] * 4  # held whole until the probe ran
    method.probe(cache, _probing(model, cache, ids))
    budgets = [layer.budget for layer in cache.layers]
    assert budgets == [_expected_budgets(method.seen_at_allocation, 48)[i] for i in range(4)]
    assert sum(budgets) == 48 and cache.physical_lengths() == budgets
    with pytest.raises(ValueError, match="method=kvcompose scores the prompt with probes"):
        validate(_compose("model=tiny_llama", "method=kvcompose", "method.queries=repeat", "budget=32"))
    validate(_compose("model=tiny_llama", "method=kvcompose", "method.queries=repeat", "dataset=passkey",
                      "dataset.lengths=[512]", "budget=keep_0.5"))  # fmt: skip


def test_mean_over_heads_matches_tokens_by_position_not_by_slot():
    """Two heads holding different tokens in their slots (as after a compaction): each slot gets the mean, over both
    heads, of the scores given to its token; a head without the token counts 0; dead slots count nothing."""
    scores = torch.tensor([[[1.0, 2.0, 3.0, 9.0], [10.0, 20.0, 30.0, 7.0]]])
    positions = torch.tensor([[[5, 7, 9, 11], [9, 5, 8, 11]]])
    live = torch.tensor([[[True, True, True, False], [True, True, True, True]]])
    out = mean_over_heads(scores, positions, live)[0]
    # head 0: token 5 (1 + 20), 7 (2 + 0), 9 (3 + 10); head 1: token 9, 5, 8 (0 + 30), 11 (dead in head 0: 0 + 7)
    assert torch.allclose(out[0, :3], torch.tensor([21.0, 2.0, 13.0]) / 2)
    assert torch.allclose(out[1], torch.tensor([13.0, 21.0, 30.0, 7.0]) / 2)


def test_composite_tokens_are_ranks_reduced_over_heads():
    """Composite token r holds each head's r-th best entry: the heads' sorted scores, reduced rank by rank."""
    scores = torch.tensor([[[0.1, 0.9, 0.5], [0.7, 0.2, 0.3]]])
    live = torch.ones_like(scores, dtype=torch.bool)
    assert torch.allclose(composite_scores(scores, live, "mean")[0], torch.tensor([0.8, 0.4, 0.15]))
    assert torch.allclose(composite_scores(scores, live, "max")[0], torch.tensor([0.9, 0.5, 0.2]))
    live[0, 1, 0] = False  # head 1 holds 0.3 and 0.2: no third composite token under mean
    assert torch.allclose(composite_scores(scores, live, "mean")[0], torch.tensor([0.6, 0.35, -math.inf]))
    assert torch.allclose(composite_scores(scores, live, "max")[0], torch.tensor([0.9, 0.5, 0.1]))


# -- the global allocation -------------------------------------------------------------------------------------------


class _Spy(KVCompose):
    """KVCompose that keeps, at its allocation, every member layer's scores, positions and live mask."""

    def global_budgets(self, cache, base):
        self.seen_at_allocation = {
            i: (
                self.score(cache.layers[i]).clone(),
                cache.layers[i].positions.clone(),
                cache.layers[i].live().clone(),
            )
            for i in base
        }
        return super().global_budgets(cache, base)


def _expected_budgets(snapshot, total, first_layer_max=True, lower_bound=0):
    """Each layer's count among the best `total` composite tokens (row 0), written out rank by rank."""
    members = sorted(snapshot)
    composite = {}
    for i in members:
        scores, _, live = snapshot[i]
        ranked = [sorted(scores[0, h][live[0, h]].tolist(), reverse=True) for h in range(scores.shape[1])]
        composite[i] = [sum(r[n] for r in ranked) / len(ranked) for n in range(len(ranked[0]))]
        composite[i][:lower_bound] = [math.inf] * min(lower_bound, len(composite[i]))
    if first_layer_max:
        first = members[0]
        composite[first] = [max(composite[i][n] for i in members) for n in range(len(composite[first]))]
    pool = sorted(((c, i) for i in members for c in composite[i]), key=lambda x: x[0], reverse=True)[:total]
    return {i: sum(1 for _, owner in pool if owner == i) for i in members}


class _Given(KVCompose):
    """KVCompose scoring each layer with the scores it is given (stand-in layers for the allocation alone)."""

    def score(self, layer):
        return layer.scores


def _stand_ins(*per_layer):
    """A stand-in cache whose layers hold the given scores [B, Hkv, n], every slot live."""
    return SimpleNamespace(
        layers=[
            SimpleNamespace(scores=s, live=lambda s=s: torch.ones_like(s, dtype=torch.bool))
            for s in per_layer
        ]
    )


@pytest.mark.parametrize(
    "params,expected",
    [
        # composites: layer 0 [.15 .1 .025 0], layer 1 [.8 .7 .225 .05], layer 2 [.5 .4 .3 .25]; the best 6
        ({"first_layer_max": False}, {0: 0, 1: 2, 2: 4}),  # a layer may get nothing
        ({}, {0: 2, 1: 2, 2: 2}),  # layer 0 raised to [.8 .7 .3 .25]: ties with layer 1, ahead of layer 2
        ({"first_layer_max": False, "keep_token_lower_bound": 1}, {0: 1, 1: 2, 2: 3}),  # every rank 0 forced
        ({"first_layer_max": False, "agg_head": "max"}, {0: 0, 1: 3, 2: 3}),  # layer 1 [.9 .8 .35 .1]
    ],
)
def test_allocation_rule_on_given_scores(params, expected):
    layers = (
        torch.tensor([[[0.1, 0.2, 0.05, 0.0], [0.1, 0.1, 0.0, 0.0]]]),
        torch.tensor([[[0.9, 0.8, 0.1, 0.1], [0.7, 0.6, 0.35, 0.0]]]),
        torch.tensor([[[0.5, 0.4, 0.3, 0.25], [0.25, 0.4, 0.3, 0.5]]]),
    )
    method = _Given(**params)
    base = {0: 2, 1: 2, 2: 2}
    assert method.global_budgets(_stand_ins(*layers), base) == expected
    # Two rows alike allocate as one: the pooled counts are shared out over the same total.
    assert method.global_budgets(_stand_ins(*(s.repeat(2, 1, 1) for s in layers)), base) == expected


@torch.no_grad()
def test_global_allocation_counts_each_layers_composite_tokens_among_the_best():
    """Prefill of 40 tokens at budget 12 over 4 layers: each layer's budget is the number of its composite tokens
    (heads' sorted scores averaged rank by rank, the first layer raised to the largest at each rank) among the best
    48 of all layers'; the total is kept, the layers really shrink to their budgets, and each KV head keeps its own
    top entries by its own score (composite tokens: slot i of two heads holds different tokens)."""
    model = _deep_llama()
    method = _Spy()
    cache = make_cache(model, method, 12)
    model(_ids(model, 40, seed=1), past_key_values=cache)
    expected = _expected_budgets(method.seen_at_allocation, 48)
    budgets = {i: layer.budget for i, layer in enumerate(cache.layers)}
    assert budgets == expected
    assert sum(budgets.values()) == 48 and len(set(budgets.values())) > 1  # not the uniform split
    assert budgets[0] == max(budgets.values())  # the first layer's raised composite scores
    assert cache.physical_lengths() == [min(b, 40) for b in budgets.values()]
    differ = False
    for i, layer in enumerate(cache.layers):
        scores, positions, live = method.seen_at_allocation[i]
        for h in range(layer.kv_heads):
            order = sorted(
                range(40), key=lambda j: (float(scores[0, h, j]), int(positions[0, h, j])), reverse=True
            )
            top = sorted(int(positions[0, h, j]) for j in order[: budgets[i]])
            assert sorted(layer.positions[0, h].tolist()) == top
        differ |= not torch.equal(layer.positions[0, 0], layer.positions[0, 1])
    assert differ


@torch.no_grad()
def test_allocation_without_first_layer_max_and_with_a_lower_bound():
    model = _deep_llama()
    ids = _ids(model, 40, seed=1)
    plain = _Spy(first_layer_max=False)
    cache = make_cache(model, plain, 12)
    model(ids, past_key_values=cache)
    expected = _expected_budgets(plain.seen_at_allocation, 48, first_layer_max=False)
    assert [layer.budget for layer in cache.layers] == [expected[i] for i in range(4)]
    assert min(expected.values()) < 10
    bounded = _Spy(keep_token_lower_bound=10)
    cache = make_cache(model, bounded, 12)
    model(ids, past_key_values=cache)
    budgets = [layer.budget for layer in cache.layers]
    assert budgets == [_expected_budgets(bounded.seen_at_allocation, 48, lower_bound=10)[i] for i in range(4)]
    assert min(budgets) >= 10 and sum(budgets) == 48
    full_bound = make_cache(model, "kvcompose", 12, keep_token_lower_bound=12)  # every composite token forced
    model(ids, past_key_values=full_bound)
    assert [layer.budget for layer in full_bound.layers] == [12] * 4


@pytest.mark.parametrize("chunk", [1, 7, 40])
@torch.no_grad()
def test_allocation_keeps_the_total_in_streaming_chunks_and_decoding(chunk):
    """Token by token, in chunks or at once: one allocation, at the first step a layer is over budget, keeping the
    budgets' total; every later step holds each layer at its budget (real lengths)."""
    model = _deep_llama()
    ids = _ids(model, 60, seed=2)
    method = build_method("kvcompose")
    cache = make_cache(model, method, 12)
    for start in range(0, 40, chunk):
        model(ids[:, start : min(start + chunk, 40)], past_key_values=cache)
    for t in range(40, 60):
        model(ids[:, t : t + 1], past_key_values=cache)
    budgets = [layer.budget for layer in cache.layers]
    assert sum(budgets) == 48 and cache.scratch(method)["allocation"].done
    assert cache.physical_lengths() == budgets


@pytest.mark.parametrize("positions", ["original", "rerotate"])
@torch.no_grad()
def test_every_architecture_allocates_and_decodes(tiny, positions):
    """Every tiny architecture (RoPE or not, GQA or not, Gemma-3's uncompressed local layers): a prefill then
    decoding, the compressed layers' budgets keeping their total and the layers their budgets."""
    model, _ = tiny
    if positions == "rerotate" and model.config.model_type in ("gpt2",):
        pytest.skip("no RoPE to re-rotate")
    ids = _ids(model, 36, seed=11)
    cache = make_cache(model, "kvcompose", 10, positions=positions)
    model(ids[:, :28], past_key_values=cache)
    for t in range(28, 36):
        logits = model(ids[:, t : t + 1], past_key_values=cache).logits
    assert logits.isfinite().all()
    compressed = [layer for layer in cache.layers if layer.budget is not None]
    assert compressed and sum(layer.budget for layer in compressed) == 10 * len(compressed)
    assert [layer.length for layer in compressed] == [layer.budget for layer in compressed]


@pytest.mark.parametrize(
    "model_name,chunk", [("deep_llama", 1), ("deep_llama", 7), ("deep_llama", 40), ("tiny_qwen3", 40)]
)
def test_the_allocated_cache_matches_the_masking_oracle(model_name, chunk):
    """With the global allocation on (the engine matrix runs without it): the deferred compressions and the new
    budgets leave every step's attention equal to the plain model's with exactly the unseen keys masked. Token by
    token the allocation comes when every layer holds budget + 1 entries, so no layer can get more: near uniform."""
    model = _deep_llama() if model_name == "deep_llama" else load(model_name)[0]
    cache = _check_oracle(model, _ids(model, 40, seed=12), chunk, method="kvcompose", budget=12)
    budgets = [layer.budget for layer in cache.layers]
    assert sum(budgets) == 12 * len(budgets) and cache.physical_lengths() == budgets
    assert max(budgets) <= 12 + chunk and (chunk == 1 or len(set(budgets)) > 1)


@torch.no_grad()
def test_allocation_shares_the_per_layer_total_and_leaves_per_head_budgets_alone():
    model = _deep_llama()
    ids = _ids(model, 40, seed=5)
    cache = make_cache(model, "kvcompose", [6, 10, 14, 18])
    model(ids, past_key_values=cache)
    assert sum(layer.budget for layer in cache.layers) == 48
    heads = make_cache(model, "kvcompose", head_budgets=[[6, 9], [12, 8], [7, 7], [10, 5]])
    model(ids, past_key_values=heads)
    assert [layer.budget for layer in heads.layers] == [9, 12, 7, 10]
    assert heads.stats()["tokens_kept_per_head"] == [[6.0, 9.0], [12.0, 8.0], [7.0, 7.0], [10.0, 5.0]]


@torch.no_grad()
def test_a_batch_pools_its_rows_into_one_allocation():
    """Two identical rows allocate as one row does; the allocation couples rows, so the method does not batch
    with it (and does without it)."""
    model = _deep_llama()
    ids = _ids(model, 40, seed=6)
    one, two = make_cache(model, "kvcompose", 12), make_cache(model, "kvcompose", 12)
    model(ids, past_key_values=one)
    model(ids.repeat(2, 1), past_key_values=two)
    assert [layer.budget for layer in one.layers] == [layer.budget for layer in two.layers]
    assert not build_method("kvcompose").batches and build_method("kvcompose", layer_allocation=False).batches
    assert (
        build_method("kvcompose").allocates
        and not build_method("kvcompose", layer_allocation=False).allocates
    )


@torch.no_grad()
def test_generate_after_the_allocation_holds_the_budgets():
    model = _deep_llama()
    cache = make_cache(model, "kvcompose", 10)
    out = model.generate(_ids(model, 30, seed=7), past_key_values=cache, max_new_tokens=8, do_sample=False)
    assert out.shape[1] == 38
    assert sum(layer.budget for layer in cache.layers) == 40
    assert cache.physical_lengths() == [layer.budget for layer in cache.layers]


@torch.no_grad()
def test_two_caches_from_one_method_share_nothing_with_the_allocation():
    model = _deep_llama()
    first, second = _ids(model, 36, seed=8), _ids(model, 36, seed=9)

    def steps(cache, ids):
        yield model(ids[:, :24], past_key_values=cache).logits
        for t in range(24, 36):
            yield model(ids[:, t : t + 1], past_key_values=cache).logits

    alone = list(steps(make_cache(model, build_method("kvcompose"), 12), first))
    method = build_method("kvcompose")
    a, b = steps(make_cache(model, method, 12), first), steps(make_cache(model, method, 12), second)
    interleaved = [x for x, _ in zip(a, b, strict=True)]
    assert all(torch.equal(x, y) for x, y in zip(alone, interleaved, strict=True))
    assert vars(method) == vars(build_method("kvcompose"))


# -- options and yaml --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "params,match",
    [
        ({"agg_task": "sum"}, "method.agg_task must be one of max, mean"),
        ({"agg_group": "median"}, "method.agg_group"),
        ({"agg_head": "min"}, "method.agg_head"),
        ({"keep_token_lower_bound": -1}, "method.keep_token_lower_bound"),
        ({"keep_token_lower_bound": 33}, r"method.keep_token_lower_bound must be in \[0, budget=32\]"),
        ({"value_norm": 1}, "method.value_norm=1 must be true or false"),
        ({"queries": "question"}, "method.queries must be one of own, repeat"),
    ],
)
def test_bad_options_fail_naming_them(params, match):
    with pytest.raises(ValueError, match=match):
        build_method("kvcompose", **params).validate(32)


def test_yaml_has_the_dataclass_defaults_and_composes():
    conf = yaml.safe_load((ROOT / "conf" / "method" / "kvcompose.yaml").read_text())
    defaults = {f.name: f.default for f in dataclasses.fields(KVCompose) if f.init}
    assert conf == {"name": "kvcompose", **defaults}
    for budget in ("32", "keep_0.5"):
        cfg = _compose("model=tiny_llama", "method=kvcompose", f"budget={budget}", "method.agg_task=mean")
        validate(cfg)
        assert cfg.method.name == "kvcompose" and cfg.method.agg_task == "mean"
    with pytest.raises(ValueError, match="method.agg_head"):
        validate(_compose("model=tiny_llama", "method=kvcompose", "method.agg_head=sum"))
