"""lru and expected_attention against hand computations from the plain model.

While nothing has been evicted the compressed run's attention equals the plain model's, so the method's state
and scores must be exactly what its rule gives on the plain model's attention weights (lru) or on its pre-RoPE
queries and cached keys/values (expected_attention, docs/methods.md#expected_attention written out independently here).
"""

import sys

import pytest
import torch

from kvexp.engine.cache import Rotary
from kvexp.methods import make_cache
from kvexp.methods.expected_attention import add_query_moments
from kvexp.methods.scoring import prerope_queries
from tests.conftest import load
from tests.test_batching import _left_padded

T, BUDGET = 24, 10


def _ids(model, length=T, seed=3):
    return torch.randint(
        3, model.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(seed)
    )


def _run(model, ids, cache, decode_steps=3):
    """A prefill, then `decode_steps` single tokens."""
    split = ids.shape[1] - decode_steps
    with torch.no_grad():
        model(ids[:, :split], past_key_values=cache)
        for t in range(split, ids.shape[1]):
            model(ids[:, t : t + 1], past_key_values=cache)
    return cache


# -- lru ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama_attention():
    model, _ = load("tiny_llama")
    ids = _ids(model)
    model.set_attn_implementation("eager")
    with torch.no_grad():
        attentions = model(ids, output_attentions=True).attentions  # per layer [1, H, T, T]
    groups = model.config.num_attention_heads // model.config.num_key_value_heads
    return model, ids, [a.reshape(1, -1, groups, T, T) for a in attentions]  # [1, Hkv, G, T, T]


def _last_attended(grouped, threshold, queries=T, gqa="max"):
    """Hand rule: position of the latest of the first `queries` queries whose group-reduced attention to key j
    is >= threshold, at least j itself (arrival). [1, Hkv, queries]."""
    attn = grouped[..., :queries, :queries]
    reduced = attn.amax(dim=2) if gqa == "max" else attn.mean(dim=2)  # [1, Hkv, q, k]
    query_pos = torch.arange(queries).float()[:, None].expand(queries, queries)
    latest = query_pos.masked_fill(reduced < threshold, float("-inf")).amax(dim=2)
    return torch.maximum(latest, torch.arange(queries).float())


def _lru_order(last):
    """Keys sorted best-first by (last attended, position): what LRU keeps."""
    n = last.shape[-1]
    key = last.long() * (n + 1) + torch.arange(n)
    return key.argsort(dim=-1, descending=True)


@pytest.mark.parametrize("gqa,threshold", [("max", 0.06), ("mean", 0.05)])
def test_lru_state_is_the_last_attending_query(llama_attention, gqa, threshold):
    model, ids, attn = llama_attention
    cache = _run(model, ids, make_cache(model, "lru", budget=T + 1, threshold=threshold, gqa=gqa))
    for layer_attn, layer in zip(attn, cache.layers, strict=True):
        expected = _last_attended(layer_attn, threshold, gqa=gqa)
        assert not torch.equal(expected, torch.arange(T).float().expand_as(expected))  # some keys re-attended
        assert (expected < T - 1).any()  # and some not by the last query
        assert torch.equal(layer.state("last_attended"), expected)


def test_lru_keeps_the_most_recently_attended(llama_attention):
    model, ids, attn = llama_attention
    threshold = 0.06
    # One prefill step, one compression: keep the BUDGET best by (last attended, position).
    cache = make_cache(model, "lru", budget=BUDGET, threshold=threshold)
    with torch.no_grad():
        model(ids, past_key_values=cache)
    for layer_attn, layer in zip(attn, cache.layers, strict=True):
        expected = _lru_order(_last_attended(layer_attn, threshold))[..., :BUDGET].sort(dim=-1).values
        assert torch.equal(layer.positions.sort(dim=-1).values, expected)
    # Decoding: budget T-2, the second decode step (T-1 tokens) evicts exactly the least recently attended.
    cache = make_cache(model, "lru", budget=T - 2, threshold=threshold)
    _run(model, ids[:, : T - 1], cache, decode_steps=2)
    for layer_attn, layer in zip(attn, cache.layers, strict=True):
        evicted = _lru_order(_last_attended(layer_attn, threshold, queries=T - 1))[..., -1]  # [1, Hkv]
        kept = layer.positions.sort(dim=-1).values
        for h in range(layer.kv_heads):
            assert kept[0, h].tolist() == [p for p in range(T - 1) if p != evicted[0, h]]


# -- expected_attention ---------------------------------------------------------------------------------------------


def _attention_modules(model):
    if hasattr(model, "transformer"):  # GPT-2
        return [block.attn for block in model.transformer.h]
    if hasattr(model, "gpt_neox"):
        return [block.attention for block in model.gpt_neox.layers]
    return [block.self_attn for block in model.model.layers]


def _plain_prerope(model, ids):
    """Pre-RoPE queries [1, H, T, D] per layer (hooked from the plain model), its post-RoPE keys and values."""
    heads, captured, hooks = model.config.num_attention_heads, {}, []
    for i, attn in enumerate(_attention_modules(model)):
        if hasattr(attn, "q_norm"):  # Qwen3: the query is normed before RoPE
            module, take = attn.q_norm, lambda out: out
        elif hasattr(attn, "q_proj"):
            module, take = attn.q_proj, lambda out: out.view(*out.shape[:2], heads, -1)
        elif hasattr(attn, "query_key_value"):  # GPT-NeoX: per head [q | k | v]
            module, take = attn.query_key_value, lambda out: out.view(*out.shape[:2], heads, 3, -1)[..., 0, :]
        else:  # GPT-2: [q | k | v] over the hidden size
            module, take = attn.c_attn, lambda out: out.chunk(3, dim=-1)[0].view(*out.shape[:2], heads, -1)

        def hook(mod, args, out, i=i, take=take):
            captured[i] = take(out).transpose(1, 2).float()

        hooks.append(module.register_forward_hook(hook))
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            cache = model(ids, use_cache=True).past_key_values
    finally:
        for h in hooks:
            h.remove()
    layers = cache.layers
    return [(captured[i], layers[i].keys.float(), layers[i].values.float()) for i in range(len(layers))]


def _rotary_module(model):
    return next(m for m in model.modules() if getattr(m, "inv_freq", None) is not None)


def _reference_mean_rotation(model, start, steps, dim):
    """docs/methods.md#expected_attention step 2 from the model's own cos/sin: mean_t of diag(cos_t) + P diag(sin_t) (identity on
    non-rotary dims)."""
    rotary = _rotary_module(model)
    positions = torch.arange(start, start + steps)[None]
    cos, sin = (x[0].double() for x in rotary(torch.zeros(1, dtype=torch.float32), positions))  # [steps, Dr]
    rot = cos.shape[-1]
    half = torch.eye(rot // 2, dtype=torch.float64)
    p = torch.zeros(rot, rot, dtype=torch.float64)
    p[rot // 2 :, : rot // 2], p[: rot // 2, rot // 2 :] = half, -half
    mean = (torch.diag_embed(cos) + p @ torch.diag_embed(sin)).mean(dim=0)
    full = torch.eye(dim, dtype=torch.float64)
    full[:rot, :rot] = mean
    return full.float()


def _reference_scores(model, ids, n_sink=4, n_future=512, use_covariance=True, use_vnorm=True, epsilon=0.0):
    """docs/methods.md#expected_attention written out: scores [1, Hkv, T] of the non-sink keys (sinks: +inf)."""
    length = ids.shape[1]
    out = []
    for q, keys, values in _plain_prerope(model, ids):
        dim, kv_heads = q.shape[-1], keys.shape[1]
        groups = q.shape[1] // kv_heads
        seen = q[0, :, n_sink:]  # [H, N, D]
        mu = seen.mean(dim=1)
        centred = seen - mu[:, None]
        sigma = centred.transpose(1, 2) @ centred / seen.shape[1]
        if _has_rope(model):
            r = _reference_mean_rotation(model, length, n_future, dim)
            mu, sigma = mu @ r.T, r @ sigma @ r.T
        k = keys[0].repeat_interleave(groups, dim=0)[:, n_sink:]  # [H, L - n_sink, D] per query head
        z = (k @ mu[:, :, None])[..., 0] / dim**0.5
        if use_covariance:
            z = z + ((k @ sigma) * k).sum(-1) / (2 * dim)
        p = torch.softmax(z, dim=-1).view(kv_heads, groups, -1).mean(dim=1)  # [Hkv, L - n_sink]
        if use_vnorm:
            p = (p + epsilon) * values[0, :, n_sink:].norm(dim=-1)
        out.append(torch.cat([torch.full((kv_heads, n_sink), float("inf")), p], dim=-1)[None])
    return out


def _has_rope(model):
    return any(getattr(m, "inv_freq", None) is not None for m in model.modules())


def _method_scores(model, ids, **params):
    """The method's own scores after a prefill and 3 decode steps with nothing evicted."""
    cache = _run(model, ids, make_cache(model, "expected_attention", budget=ids.shape[1] + 1, **params))
    for layer in cache.layers:
        assert torch.equal(layer.positions[0, 0], torch.arange(ids.shape[1]))  # slots still in temporal order
    return [layer.method.score(layer) for layer in cache.layers]


CASES = [
    ("tiny_llama", {}),
    ("tiny_llama", {"use_covariance": False}),
    ("tiny_llama", {"use_vnorm": False}),
    ("tiny_llama", {"n_sink": 2, "n_future_positions": 7, "epsilon": 0.01}),
    ("tiny_qwen3", {}),  # q_norm before RoPE
    ("tiny_gpt_neox", {}),  # partial rotary: only the first 4 of 16 dims rotate
    ("tiny_gpt2", {}),  # no RoPE: no rotation averaging
]


@pytest.mark.parametrize("model_name,params", CASES)
def test_expected_attention_matches_the_reference_math(model_name, params):
    model, _ = load(model_name)
    ids = _ids(model)
    expected = _reference_scores(
        model,
        ids,
        n_sink=params.get("n_sink", 4),
        n_future=params.get("n_future_positions", 512),
        use_covariance=params.get("use_covariance", True),
        use_vnorm=params.get("use_vnorm", True),
        epsilon=params.get("epsilon", 0.0),
    )
    for got, want in zip(_method_scores(model, ids, **params), expected, strict=True):
        sinks = torch.isinf(want)
        assert torch.isinf(got[sinks]).all()
        assert torch.allclose(got[~sinks], want[~sinks], rtol=1e-4, atol=1e-6)


def test_expected_attention_keeps_sinks_and_the_top_expected():
    model, _ = load("tiny_llama")
    ids = _ids(model)
    cache = make_cache(model, "expected_attention", budget=BUDGET)
    with torch.no_grad():
        model(ids, past_key_values=cache)  # one prefill step, one compression
    for layer, want in zip(cache.layers, _reference_scores(model, ids), strict=True):
        kept = layer.positions.sort(dim=-1).values
        assert torch.equal(kept, want.topk(BUDGET, dim=-1).indices.sort(dim=-1).values)
        assert (kept[..., :4] == torch.arange(4)).all()


@pytest.mark.parametrize("model_name", ["tiny_llama", "tiny_gpt_neox"])
def test_prerope_queries_undo_the_models_rope(model_name):
    model, _ = load(model_name)
    heads, dim = (
        model.config.num_attention_heads,
        model.config.hidden_size // model.config.num_attention_heads,
    )
    rotary_module = _rotary_module(model)
    apply_rope = sys.modules[type(rotary_module).__module__].apply_rotary_pos_emb
    raw = torch.randn(1, heads, 6, dim, generator=torch.Generator().manual_seed(0))
    positions = torch.tensor([[0, 3, 9, 40, 41, 1000]])
    cos, sin = rotary_module(raw, positions)
    rotated, _ = apply_rope(raw, raw, cos, sin)
    assert not torch.allclose(rotated, raw, atol=1e-3)
    back = prerope_queries(rotated, positions, Rotary(rotary_module.inv_freq))
    assert torch.allclose(back, raw, atol=1e-4)


def test_expected_attention_keeps_its_statistics_per_batch_row():
    """A 30-token row and an 18-token row left-padded into one batch (nothing evicted): each row's scores of its own
    entries are the ones it gets alone (its moments skip its padding and its own sinks, not the first row's)."""
    model, _ = load("tiny_llama")
    long = _ids(model, 30)
    short = _ids(model, 18, seed=5)
    alone = []
    with torch.no_grad():
        for ids in (long, short):
            cache = make_cache(model, "expected_attention", budget=64)
            model(ids, past_key_values=cache)
            alone.append(cache)
        together = make_cache(model, "expected_attention", budget=64)
        _left_padded(model, together, [long, short])
    for layer, *single in zip(together.layers, *(c.layers for c in alone), strict=True):
        scores = layer.method.score(layer)
        for row, (other, n) in enumerate(zip(single, (30, 18), strict=True)):
            assert torch.equal(layer.positions[row, :, 30 - n :], other.positions[0])
            torch.testing.assert_close(
                scores[row, :, 30 - n :], other.method.score(other)[0], rtol=1e-4, atol=1e-6
            )


def test_query_moments_are_each_rows_mean_and_covariance_of_its_counted_queries():
    """Chan's update over three steps with rows counting different queries (padding, sinks, a step with none for
    one row) gives each row torch's mean and biased covariance of exactly its counted queries."""
    torch.manual_seed(0)
    queries = torch.randn(2, 3, 10, 4) * 3 + 5  # [B, H, n, D], far from zero mean: cancellation would show
    counted = torch.ones(2, 10, dtype=torch.bool)
    counted[0, :3] = False  # row 0: padding / sinks first
    counted[1, 4:7] = False  # row 1: nothing counted in the middle step
    stats: dict = {}
    for step in (slice(0, 4), slice(4, 7), slice(7, 10)):
        add_query_moments(stats, queries[:, :, step], counted[:, step], covariance=True)
    for row in range(2):
        seen = queries[row][:, counted[row]]  # [H, m, D]
        centred = seen - seen.mean(dim=1, keepdim=True)
        assert stats["count"][row] == counted[row].sum()
        torch.testing.assert_close(stats["mean"][row], seen.mean(dim=1))
        torch.testing.assert_close(
            stats["m2"][row] / stats["count"][row], centred.transpose(-1, -2) @ centred / seen.shape[1]
        )


# -- validation ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "method,params,param",
    [
        ("lru", {"threshold": 0.0}, "threshold"),
        ("lru", {"threshold": 1.5}, "threshold"),
        ("lru", {"gqa": "median"}, "gqa"),
        ("expected_attention", {"n_future_positions": 0}, "n_future_positions"),
        ("expected_attention", {"n_sink": -1}, "n_sink"),
        ("expected_attention", {"n_sink": BUDGET}, "n_sink"),
        ("expected_attention", {"epsilon": -0.1}, "epsilon"),
    ],
)
def test_bad_parameters_fail_naming_the_option(method, params, param):
    model, _ = load("tiny_llama")
    with pytest.raises(ValueError, match=f"method.{param}"):
        make_cache(model, method, budget=BUDGET, **params)
