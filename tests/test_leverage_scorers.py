"""Leverage-family scorers: leverage, non_causal_attention, compactor (Compactor, arXiv 2507.08143), cur (CurDKV,
arXiv 2509.15038) and cap (CapKV, arXiv 2604.25975).

Each rule is recomputed here from the model's own projections (pre-RoPE queries, keys and values taken by hooks on
q_proj / k_proj / v_proj, RoPE applied with transformers' function) and compared with `method.score(layer)` or with
the entries a compression kept; then padding, dead slots, reproducibility, validation and the yaml."""

import math

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, rotate_half

from kvexp.config import validate
from kvexp.methods import build_method, make_cache
from kvexp.methods.leverage import gaussian_sketch
from kvexp.tasks.base import method_from_config
from tests.conftest import load
from tests.test_config import _compose

NAMES = ["leverage", "non_causal_attention", "compactor", "cur", "cap"]
SMALL = {"compactor": {"sink_size_start": 2, "sink_size_end": 2, "chunk_length": 8}}
BIG = 1000  # a budget no test sequence reaches: the layers observe but never compress


def _ids(length: int, seed: int = 0) -> torch.Tensor:
    ids = torch.randint(3, 250, (1, length), generator=torch.Generator().manual_seed(seed), device="cpu")
    return ids.to(torch.get_default_device())  # KVEXP_TEST_DEVICE=cuda builds the models there


@torch.no_grad()
def _run(model, method, ids, budget=BIG, chunk=None, **kwargs):
    """Feed ids [1, T] (in chunks of `chunk`) through a fresh cache; return the cache and, per layer, the model's own
    pre-RoPE queries [1, H, T, D], keys and values [1, Hkv, T, D] (hooks on the projections)."""
    cache = make_cache(model, method, budget, **kwargs)
    captured: dict = {}
    hooks = []
    for i, layer in enumerate(model.model.layers):
        attn = layer.self_attn
        for name in ("q_proj", "k_proj", "v_proj"):

            def hook(_module, _inputs, output, key=(i, name)):
                captured.setdefault(key, []).append(output)

            hooks.append(getattr(attn, name).register_forward_hook(hook))
    try:
        step = chunk or ids.shape[1]
        for start in range(0, ids.shape[1], step):
            model(ids[:, start : start + step], past_key_values=cache)
    finally:
        for h in hooks:
            h.remove()
    dim = model.config.head_dim
    projections = []
    for i in range(model.config.num_hidden_layers):
        q, k, v = (torch.cat(captured[(i, n)], dim=1) for n in ("q_proj", "k_proj", "v_proj"))
        projections.append(tuple(x.view(1, x.shape[1], -1, dim).transpose(1, 2).float() for x in (q, k, v)))
    return cache, projections


def _rotate(model, x: torch.Tensor) -> torch.Tensor:
    """Apply the model's RoPE to [1, heads, T, D] at positions 0 .. T-1 (transformers' own function)."""
    positions = torch.arange(x.shape[2])[None]
    cos, sin = model.model.rotary_emb(x, positions)
    rotated, _ = apply_rotary_pos_emb(x, x, cos, sin)
    return rotated


def _group_mean(x: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """[1, H, ...] per query head -> [1, Hkv, ...], mean over each group (query head h -> KV head h // G)."""
    return x.view(1, kv_heads, -1, *x.shape[2:]).mean(dim=2)


def _zscore(x: torch.Tensor) -> torch.Tensor:
    return (x - x.mean()) / x.std(unbiased=False)


def _nca_reference(model, q, k, chunk):
    """Non-causal chunked attention column sums [1, Hkv, T]: unscaled RoPE'd logits, softmax within each chunk."""
    q, k = _rotate(model, q), _rotate(model, k)
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1)
    sums = torch.zeros(q.shape[:3])
    for start in range(0, q.shape[2], chunk):
        part = slice(start, start + chunk)
        probs = torch.softmax(q[:, :, part] @ k[:, :, part].transpose(-1, -2), dim=-1)
        sums[:, :, part] = probs.sum(dim=2)
    return _group_mean(sums, k.shape[1] // groups)


def _nca_pooled_reference(model, q, k, v, chunk):
    """kvpress's defaults: the column sums x ||v||, averaged with the temporal neighbours (one at each end)."""
    weighted = _nca_reference(model, q, k, chunk) * v.norm(dim=-1)
    padded = torch.nn.functional.pad(weighted, (1, 1))
    counts = torch.full((weighted.shape[-1],), 3.0)
    counts[0] = counts[-1] = 2.0
    return (padded[..., :-2] + padded[..., 1:-1] + padded[..., 2:]) / counts


def _exact_leverage(x: torch.Tensor) -> torch.Tensor:
    """Leverage of the rows of x [n, k] by its SVD (fp64): squared row norms of the left singular vectors kept."""
    u, s, _ = torch.linalg.svd(x.double(), full_matrices=False)
    rank = int((s > s[0] * 1e-5).sum())
    return u[:, :rank].square().sum(dim=1)


# -- leverage ------------------------------------------------------------------------------------------------------
def test_leverage_is_the_exact_leverage_of_the_centred_prerope_keys():
    """Sketch 48 >= head dim 16: the sketch keeps the keys' column space, so the scores are the exact leverage of
    the centred pre-RoPE keys (SVD here), which sum to their rank (16 for 40 tokens)."""
    model, _ = load("tiny_llama")
    cache, proj = _run(model, build_method("leverage"), _ids(40))
    for layer, (_, k, _) in zip(cache.layers, proj, strict=True):
        scores = build_method("leverage").score(layer)
        for h in range(k.shape[1]):
            keys = k[0, h] - k[0, h].mean(dim=0)
            expected = _exact_leverage(keys)
            assert torch.allclose(scores[0, h].double(), expected, atol=1e-5)
            assert math.isclose(float(scores[0, h].sum()), 16.0, abs_tol=1e-3)


def test_leverage_of_fewer_keys_than_dimensions_is_one_minus_one_over_n():
    """10 keys in 16 dims, centred: rank 9, the column space is the complement of the ones vector, so every key's
    leverage is 1 - 1/10 (a pseudo-inverse, not a ridge)."""
    model, _ = load("tiny_llama")
    method = build_method("leverage")
    cache, _ = _run(model, method, _ids(10))
    for layer in cache.layers:
        assert torch.allclose(method.score(layer), torch.full((1, 2, 10), 0.9), atol=1e-5)


@pytest.mark.parametrize("positions", ["original", "rerotate"])
def test_leverage_reads_the_pre_rope_keys_of_the_held_entries(positions):
    """Token by token into budget 20 (re-rotated keys or not): the scores are the exact leverage of the held
    entries' pre-RoPE keys (k_proj's outputs at their positions), whatever rotation the cache holds them at. (20 >
    head dim 16 + 1: with fewer keys every leverage is 1 - 1/n and the oldest go first.)"""
    model, _ = load("tiny_llama")
    method = build_method("leverage")
    cache, proj = _run(model, method, _ids(40), budget=20, chunk=1, positions=positions)
    for layer, (_, k, _) in zip(cache.layers, proj, strict=True):
        if positions == "rerotate":  # the held entries are not contiguous: their rotations were changed
            assert not torch.equal(layer.state("rope_pos"), layer.positions.float())
        scores = method.score(layer)
        for h in range(2):
            held = k[0, h, layer.positions[0, h]]
            expected = _exact_leverage(held - held.mean(dim=0))
            assert torch.allclose(scores[0, h].double(), expected, atol=1e-5)


def test_a_narrow_sketch_scores_the_leverage_of_the_sketched_keys():
    """Sketch 8 < 16: the leverage of (K - mean) Phi, by QR here, on the same seeded sketch Phi; sums to 8."""
    model, _ = load("tiny_llama")
    method = build_method("leverage", sketch_dim=8, seed=3)
    cache, proj = _run(model, method, _ids(40))
    for layer, (_, k, _) in zip(cache.layers, proj, strict=True):
        sketch = gaussian_sketch(layer, method, 3, 16, 8)
        scores = method.score(layer)
        for h in range(k.shape[1]):
            sketched = ((k[0, h] - k[0, h].mean(dim=0)) @ sketch[h]).double()
            q, _ = torch.linalg.qr(sketched)
            assert torch.allclose(scores[0, h].double(), q.square().sum(dim=1), atol=1e-5)
            assert math.isclose(float(scores[0, h].sum()), 8.0, abs_tol=1e-3)


def test_the_sketch_is_seeded_reproducible_and_drawn_per_layer():
    model, _ = load("tiny_llama")
    method = build_method("leverage", sketch_dim=8)
    first, _ = _run(model, method, _ids(12))
    torch.manual_seed(123)  # the global stream plays no part
    second, _ = _run(model, method, _ids(12, seed=1))
    a, b = (gaussian_sketch(c.layers[0], method, 0, 16, 8) for c in (first, second))
    assert torch.equal(a, b)
    assert not torch.equal(a, gaussian_sketch(first.layers[1], method, 0, 16, 8))  # another layer
    assert not torch.equal(a, gaussian_sketch(first.layers[0], method, 1, 16, 8))  # another seed
    wide = gaussian_sketch(first.layers[0], method, 0, 16, 400)  # N(0, 1/k) entries
    assert abs(float(wide.std()) * math.sqrt(400) - 1.0) < 0.05 and abs(float(wide.mean())) < 0.01
    other = build_method("leverage", sketch_dim=8, seed=5)
    assert not torch.equal(method.score(first.layers[0]), other.score(first.layers[0]))


# -- non_causal_attention -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("chunk", [None, 7, 1])
def test_non_causal_attention_is_the_chunked_bidirectional_column_sum(chunk):
    """Chunks of 8 positions over 30 tokens (the last one partial): each query attends to every key of its chunk,
    before and after it; fed at once, in chunks of 7 or token by token (closed chunks folded into the state,
    the open one recomputed), the scores are the same."""
    model, _ = load("tiny_llama")
    method = build_method("non_causal_attention", chunk_length=8, value_norm=False, kernel_size=1)
    cache, proj = _run(model, method, _ids(30), chunk=chunk)
    for layer, (q, k, _) in zip(cache.layers, proj, strict=True):
        assert torch.allclose(method.score(layer), _nca_reference(model, q, k, 8), atol=1e-5)


@pytest.mark.parametrize("block", [3, 8, 256])
def test_chunk_sums_in_query_blocks_see_only_their_chunks_columns(block):
    """Queries in blocks of 3 or 8 (each block's logits over the columns of its chunks only) or in one block, over
    slots held out of position order: the reference column sums, slot for slot."""
    from types import SimpleNamespace

    from kvexp.methods.non_causal_attention import chunk_attention_sums

    model, _ = load("tiny_llama")
    method = build_method("non_causal_attention", chunk_length=8, value_norm=False, kernel_size=1)
    cache, proj = _run(model, method, _ids(30))
    layer, (q, k, _) = cache.layers[0], proj[0]
    order = torch.randperm(30, generator=torch.Generator().manual_seed(1)).to(layer.positions.device)
    shuffled = SimpleNamespace(  # the same slots, stored in a shuffled order
        positions=layer.positions[..., order],
        attention_logits=lambda queries, scaling, slots: layer.attention_logits(queries, scaling)[..., order][
            ..., slots
        ],
    )
    queries = _rotate(model, q)
    positions = torch.arange(30, device=queries.device)[None]
    sums = chunk_attention_sums(shuffled, queries, positions, 8, block=block)
    assert torch.allclose(sums, _nca_reference(model, q, k, 8)[..., order], atol=1e-5)


def test_non_causal_attention_weights_by_value_norms_and_pools_neighbours():
    model, _ = load("tiny_llama")
    method = build_method("non_causal_attention", chunk_length=8)  # value_norm, kernel 3 (kvpress)
    cache, proj = _run(model, method, _ids(30))
    for layer, (q, k, v) in zip(cache.layers, proj, strict=True):
        assert torch.allclose(method.score(layer), _nca_pooled_reference(model, q, k, v, 8), atol=1e-5)


def test_an_open_chunk_scores_over_its_held_keys_and_closed_chunks_keep_their_sums():
    """Token by token, budget 10, chunks of 4, 22 tokens: the open chunk (positions 20, 21) is recomputed over its
    keys still held, from its two queries; a closed chunk's four queries gave one unit each over its keys held when
    it closed, so its survivors now hold at most 4."""
    model, _ = load("tiny_llama")
    method = build_method("non_causal_attention", chunk_length=4, value_norm=False, kernel_size=1)
    cache, proj = _run(model, method, _ids(22), budget=10, chunk=1)
    for layer, (q, k, _) in zip(cache.layers, proj, strict=True):
        assert layer.length == 10
        scores = method.score(layer)
        q, k = _rotate(model, q)[0, :, 20:22], _rotate(model, k)[0]  # [H, 2, D], [Hkv, T, D]
        for h in range(2):
            held = [p for p in layer.positions[0, h].tolist() if p >= 20]
            assert held, "the open chunk kept none of its keys"
            logits = q[2 * h : 2 * h + 2] @ k[h, held].T  # [G, 2, held]
            expected = torch.softmax(logits, dim=-1).sum(dim=1).mean(dim=0)
            slots = [layer.positions[0, h].tolist().index(p) for p in held]
            assert torch.allclose(scores[0, h, slots], expected, atol=1e-5)
            for chunk in range(5):
                members = (layer.positions[0, h] // 4 == chunk) & (layer.positions[0, h] >= 0)
                assert float(scores[0, h][members].sum()) <= 4.0 + 1e-5


def test_a_chunk_is_folded_over_the_keys_held_when_its_last_token_arrives():
    """Chunks of 4, budget 10, token by token over 24 tokens: chunk 5 (positions 20..23) closes at token 23, before
    that step's compression, over its keys held then (those a 23-token run holds, plus 23); its survivors keep
    those sums."""
    model, _ = load("tiny_llama")
    method = build_method("non_causal_attention", chunk_length=4, value_norm=False, kernel_size=1)
    ids = _ids(24, seed=6)
    before, _ = _run(model, method, ids[:, :23], budget=10, chunk=1)
    cache, proj = _run(model, method, ids, budget=10, chunk=1)
    for layer, earlier, (q, k, _) in zip(cache.layers, before.layers, proj, strict=True):
        scores = method.score(layer)
        q, k = _rotate(model, q)[0, :, 20:24], _rotate(model, k)[0]
        for h in range(2):
            at_close = sorted({p for p in earlier.positions[0, h].tolist() if p >= 20} | {23})
            logits = q[2 * h : 2 * h + 2] @ k[h, at_close].T  # [G, 4, held]
            sums = dict(
                zip(at_close, torch.softmax(logits, dim=-1).sum(dim=1).mean(dim=0).tolist(), strict=True)
            )
            positions = layer.positions[0, h].tolist()
            for slot, p in enumerate(positions):
                if p >= 20:
                    assert math.isclose(float(scores[0, h, slot]), sums[p], abs_tol=1e-5)


# -- compactor ------------------------------------------------------------------------------------------------------
def test_compactor_blends_the_z_scores_with_a_given_weight():
    """score = z(attention) + blending z(leverage), z over the row's slots of all heads; first 2 and newest 2 kept."""
    model, _ = load("tiny_llama")
    method = build_method("compactor", blending=0.7, **SMALL["compactor"])
    cache, proj = _run(model, method, _ids(30))
    for layer, (q, k, v) in zip(cache.layers, proj, strict=True):
        attention = _nca_pooled_reference(model, q, k, v, 8)
        leverage = torch.stack([_exact_leverage(k[0, h] - k[0, h].mean(dim=0)) for h in range(2)])[
            None
        ].float()
        expected = _zscore(attention) + 0.7 * _zscore(leverage)
        scores = method.score(layer)
        middle = slice(2, 28)
        assert torch.allclose(scores[..., middle], expected[..., middle], atol=1e-4)
        assert bool(torch.isinf(scores[..., :2]).all()) and bool(torch.isinf(scores[..., 28:]).all())


def test_compactor_weights_leverage_by_the_compression_ratio():
    """blending null: lambda = 1 - 12 / 30 at a one-step prefill of 30 tokens into budget 12; the kept entries are
    the protected ones and the top of z(attention) + 0.6 z(leverage) computed here."""
    model, _ = load("tiny_llama")
    method = build_method("compactor", **SMALL["compactor"])
    cache, proj = _run(model, method, _ids(30), budget=12)
    for layer, (q, k, v) in zip(cache.layers, proj, strict=True):
        leverage = torch.stack([_exact_leverage(k[0, h] - k[0, h].mean(dim=0)) for h in range(2)])[
            None
        ].float()
        expected = _zscore(_nca_pooled_reference(model, q, k, v, 8)) + (1 - 12 / 30) * _zscore(leverage)
        expected[..., :2] = expected[..., 28:] = float("inf")
        top = expected.topk(12, dim=-1).indices.sort(dim=-1).values
        assert torch.equal(layer.positions.sort(dim=-1).values, top)
        other = _zscore(_nca_pooled_reference(model, q, k, v, 8)) + 5.0 * _zscore(leverage)
        other[..., :2] = other[..., 28:] = float("inf")
        assert not torch.equal(other.topk(12, dim=-1).indices.sort(dim=-1).values, top)  # lambda matters here


@torch.no_grad()
def test_compression_ratio_is_per_row_and_head():
    """lambda at the prefill's compression of a left-padded batch (20 and 30 tokens) into per-head budgets:
    1 - budget / the row's own tokens, per row and head."""
    model, _ = load("tiny_llama")
    method = build_method("compactor", **SMALL["compactor"])
    weights = []
    blend = method.blend_weight
    method.blend_weight = lambda layer: weights.append(blend(layer)) or weights[-1]
    ids = torch.cat([torch.cat([torch.zeros(1, 10, dtype=torch.long), _ids(20, seed=2)], dim=1), _ids(30)])
    mask = torch.ones_like(ids)
    mask[0, :10] = 0
    budgets = [[10, 15], [12, 14]]
    cache = make_cache(model, method, head_budgets=budgets)
    model(ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp_min(0), past_key_values=cache)
    assert len(weights) == 2  # one compression per layer
    for weight, heads in zip(weights, budgets, strict=True):
        expected = torch.tensor([[1 - b / 20 for b in heads], [1 - b / 30 for b in heads]])[..., None]
        assert torch.allclose(weight, expected)


# -- cur ------------------------------------------------------------------------------------------------------------
def _window_shares(x: torch.Tensor, window: int) -> torch.Tensor:
    """x [..., T] as shares of consecutive windows of `window` positions from position 0."""
    out = torch.empty_like(x)
    for start in range(0, x.shape[-1], window):
        part = x[..., start : start + window]
        out[..., start : start + window] = part / part.sum(dim=-1, keepdim=True)
    return out


@pytest.mark.parametrize("kind", ["key", "value", "kv_avg", "kv_product"])
def test_cur_scores_are_local_shares_of_row_norms_combined(kind):
    """Without projection: ||k||^2 of the RoPE'd keys and ||v||^2, shares of windows of 16 positions, combined,
    normalized to sum 1; the first 4 positions kept."""
    model, _ = load("tiny_llama")
    method = build_method("cur", leverage_type=kind, sketch_dim=None)
    cache, proj = _run(model, method, _ids(40))
    for layer, (_, k, v) in zip(cache.layers, proj, strict=True):
        k2 = _window_shares(_rotate(model, k).square().sum(-1), 16)
        v2 = _window_shares(v.square().sum(-1), 16)
        combined = {"key": k2, "value": v2, "kv_avg": (k2 + v2) / 2, "kv_product": k2 * v2}[kind]
        expected = combined / combined.sum(dim=-1, keepdim=True)
        scores = method.score(layer)
        assert torch.allclose(scores[..., 4:], expected[..., 4:], atol=1e-6)
        assert bool(torch.isinf(scores[..., :4]).all())


def test_cur_projects_keys_and_values_with_one_seeded_gaussian_and_can_skip_windows():
    """sketch_dim 20 (the paper's approximation): ||(K G)_i||^2 x ||(V G)_i||^2 with the same G (head dims equal),
    here without local windows: global shares."""
    model, _ = load("tiny_llama")
    method = build_method("cur", local_window_size=None, seed=7)
    cache, proj = _run(model, method, _ids(40))
    for layer, (_, k, v) in zip(cache.layers, proj, strict=True):
        g = gaussian_sketch(layer, method, 7, 16, 20)  # [Hkv, 16, 20]
        k2 = torch.einsum("bhnd,hdk->bhnk", _rotate(model, k), g).square().sum(-1)
        v2 = torch.einsum("bhnd,hdk->bhnk", v, g).square().sum(-1)
        expected = k2 * v2 / (k2 * v2).sum(dim=-1, keepdim=True)
        assert torch.allclose(method.score(layer)[..., 4:], expected[..., 4:], rtol=1e-4, atol=1e-7)


def test_cur_windows_follow_the_held_entries_in_temporal_order():
    """After evictions the windows are the held entries, 16 at a time from the oldest: with budget 20 two windows
    (16 + 4) whose shares each sum to 1 before the product."""
    model, _ = load("tiny_llama")
    method = build_method("cur", leverage_type="key", sketch_dim=None, num_sinks=0)
    cache, _ = _run(model, method, _ids(40), budget=20, chunk=1)
    for layer in cache.layers:
        scores = method.score(layer)  # key shares / 2 windows
        order = layer.positions.argsort(dim=-1)
        ranked = scores.gather(-1, order)
        assert torch.allclose(ranked[..., :16].sum(-1), torch.full((1, 2), 0.5), atol=1e-6)
        assert torch.allclose(ranked[..., 16:].sum(-1), torch.full((1, 2), 0.5), atol=1e-6)


# -- cap ------------------------------------------------------------------------------------------------------------
def _cap_reference(model, q, k, v, window=None, tau=5.0, n_sink=4, eps=1e-6, future=512):
    """CAP's s_i = w_i v_i^T (I + sum_j (w_j + eps) v_j v_j^T)^-1 v_i, w_i = exp(tau cos(k_i, R mu) - max), per query
    head, mean over the group; mu the mean pre-RoPE query at positions >= n_sink (or of the last `window`)."""
    length = q.shape[2]
    first = n_sink if window is None else max(n_sink, length - window)
    mu = q[0, :, first:].mean(dim=1)  # [H, D]
    positions = torch.arange(length, length + future)[None]
    cos, sin = model.model.rotary_emb(q, positions)
    mu = mu * cos[0].mean(dim=0) + rotate_half(mu) * sin[0].mean(dim=0)  # mean_t R_t mu: linear in cos, sin
    keys = torch.nn.functional.normalize(_rotate(model, k)[0], dim=-1)  # [Hkv, T, D]
    groups = q.shape[1] // k.shape[1]
    scores = torch.zeros(q.shape[1], length, dtype=torch.float64)
    for h in range(q.shape[1]):
        kv = h // groups
        cosine = keys[kv, n_sink:] @ torch.nn.functional.normalize(mu[h], dim=0)
        w = torch.exp(tau * (cosine - cosine.max())).double()
        values = v[0, kv, n_sink:].double()
        capacity = torch.eye(values.shape[1], dtype=torch.float64) + values.T @ ((w + eps)[:, None] * values)
        solved = torch.linalg.solve(capacity, values.T)  # [D, T']
        scores[h, n_sink:] = w * (values.T * solved).sum(dim=0)
    return _group_mean(scores[None], k.shape[1]).float()


@pytest.mark.parametrize(
    "window,chunk,params",
    [
        (None, None, {}),
        (None, 1, {}),
        (10, None, {}),
        (10, 1, {}),
        (None, 7, {"tau": 2.0, "epsilon": 0.5, "n_sink": 2, "n_future_positions": 64}),
    ],
)
def test_cap_scores_are_the_anchor_weighted_capacity_leverage_of_the_values(window, chunk, params):
    model, _ = load("tiny_llama")
    method = build_method("cap", window_size=window, **params)
    cache, proj = _run(model, method, _ids(30), chunk=chunk)
    sinks = params.get("n_sink", 4)
    for layer, (q, k, v) in zip(cache.layers, proj, strict=True):
        scores = method.score(layer)
        expected = _cap_reference(
            model,
            q,
            k,
            v,
            window=window,
            tau=params.get("tau", 5.0),
            n_sink=sinks,
            eps=params.get("epsilon", 1e-6),
            future=params.get("n_future_positions", 512),
        )
        assert torch.allclose(scores[..., sinks:], expected[..., sinks:], rtol=1e-4, atol=1e-6)
        assert bool(torch.isinf(scores[..., :sinks]).all())


def test_cap_weights_by_tau_and_the_anchor():
    """tau 0: uniform weights, the scores are the values' own ridge leverage, whatever the queries."""
    model, _ = load("tiny_llama")
    method = build_method("cap", tau=0.0, epsilon=0.0)
    cache, proj = _run(model, method, _ids(30))
    for layer, (_, _, v) in zip(cache.layers, proj, strict=True):
        values = v[0, :, 4:].double()  # [Hkv, T', D]
        capacity = torch.eye(16, dtype=torch.float64) + values.mT @ values
        expected = (values * torch.linalg.solve(capacity, values.mT).mT).sum(-1)
        assert torch.allclose(method.score(layer)[0, :, 4:].double(), expected, atol=1e-6)


# -- every method: padding, dead slots, budgets --------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
@torch.no_grad()
def test_padding_takes_no_part_in_any_statistic(name):
    """A left-padded batch of two rows, uncompressed: each row's live scores are the ones it gets alone, padding
    slots score -inf."""
    model, _ = load("tiny_llama")
    method = build_method(name, **SMALL.get(name, {}))
    short, long = _ids(18, seed=4), _ids(30, seed=5)
    ids = torch.cat([torch.cat([torch.zeros(1, 12, dtype=torch.long), short], dim=1), long])
    mask = torch.ones_like(ids)
    mask[0, :12] = 0
    batch = make_cache(model, method, BIG)
    model(ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp_min(0), past_key_values=batch)
    for row, alone_ids, pad in ((0, short, 12), (1, long, 0)):
        alone, _ = _run(model, method, alone_ids)
        for together, single in zip(batch.layers, alone.layers, strict=True):
            scores = method.score(together)[row]
            assert bool(torch.isneginf(scores[:, :pad]).all())
            expected = method.score(single)[0]
            finite = torch.isfinite(expected)
            assert torch.equal(torch.isfinite(scores[:, pad:]), finite)
            assert torch.allclose(scores[:, pad:][finite], expected[finite], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_per_head_budgets_hold_and_dead_slots_score_minus_inf(name):
    """Per-head budgets: every head keeps its own count, shorter heads hold dead slots, which score -inf; the
    protected first tokens are among those kept."""
    model, _ = load("tiny_llama")
    method = build_method(name, **SMALL.get(name, {}))
    budgets = [[7, 13], [13, 9]]
    cache, _ = _run(model, method, _ids(40), chunk=3, head_budgets=budgets)
    for layer, heads in zip(cache.layers, budgets, strict=True):
        live = layer.live()
        assert live.sum(dim=-1).tolist() == [heads]
        scores = method.score(layer)
        assert bool(torch.isneginf(scores[~live]).all()) and not bool(scores[live].isnan().any())
        assert bool((scores[live] > float("-inf")).all())
        sinks = {"compactor": 2, "cur": 4, "cap": 4}.get(name, 0)
        for h in range(2):
            held = set(layer.positions[0, h][live[0, h]].tolist())
            assert set(range(sinks)) <= held


# -- validation and configuration -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name,params,budget,message",
    [
        ("leverage", {"sketch_dim": 0}, 16, "method.sketch_dim"),
        ("leverage", {"seed": -1}, 16, "method.seed"),
        ("non_causal_attention", {"chunk_length": 0}, 16, "method.chunk_length"),
        ("non_causal_attention", {"kernel_size": 2}, 16, "method.kernel_size"),
        ("compactor", {"blending": -0.5}, 32, "method.blending"),
        ("compactor", {"sink_size_start": 8, "sink_size_end": 4}, 12, "method.sink_size_start"),
        ("compactor", {"sink_size_end": -1}, 32, "method.sink_size_end"),
        ("compactor", {"sketch_dim": 0}, 32, "method.sketch_dim"),
        ("cur", {"leverage_type": "both"}, 16, "method.leverage_type"),
        ("cur", {"num_sinks": 16}, 16, "method.num_sinks"),
        ("cur", {"sketch_dim": 0}, 16, "method.sketch_dim"),
        ("cur", {"local_window_size": 0}, 16, "method.local_window_size"),
        ("cap", {"tau": -1.0}, 16, "method.tau"),
        ("cap", {"n_sink": 16}, 16, "method.n_sink"),
        ("cap", {"n_future_positions": 0}, 16, "method.n_future_positions"),
        ("cap", {"epsilon": -1e-3}, 16, "method.epsilon"),
        ("cap", {"window_size": 0}, 16, "method.window_size"),
    ],
)
def test_bad_options_are_refused_naming_them(name, params, budget, message):
    with pytest.raises(ValueError, match=message):
        build_method(name, **params).validate(budget)


@pytest.mark.parametrize("name", NAMES)
def test_the_yaml_composes_to_the_defaults_and_validates(name):
    cfg = _compose(f"method={name}", "model=tiny_llama", "budget=32")
    validate(cfg)
    assert method_from_config(cfg.method) == build_method(name)


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["method=cur", "method.leverage_type=rows"], "method.leverage_type"),
        (["method=compactor", "method.blending=-1"], "method.blending"),
        (["method=cap", "method.window_size=1.5"], "method.window_size"),
        (["method=leverage", "method.sketch_dim=abc"], "method.sketch_dim"),
    ],
)
def test_bad_yaml_overrides_fail_validation(overrides, message):
    with pytest.raises(ValueError, match=message):
        validate(_compose(*overrides, "model=tiny_llama", "budget=32"))
