"""Structural methods (duo_attention, simlayerkv, lukv): head types, lazy layers and layer/head budget curves.

Each rule is checked against an independent computation: DuoAttention's mixed probe attention against the masking
oracle, its gate optimization against Adam's closed form when only the regulariser acts, and the kept sets of
streaming and retrieval heads; SimLayerKV's lazy-layer decision against the plain model's eager attention weights;
LU-KV's budget curve recomputed by hand (oracle importance from eager attention, values and the output projection,
knorm scores from the key projection, a naive PAVA, a sort for the greedy) and its online budgets by hand. The
masking oracle covers the variable forms (retrieval heads keeping whole layers, full non-lazy layers, per-head
LU-KV budgets), which the engine matrix runs only in forms that hold a fixed budget per layer.
"""

import itertools
import math

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from kvexp.config import validate
from kvexp.engine import sliding_layers
from kvexp.methods import build_method, make_cache
from kvexp.methods import duo_attention as duo_module
from kvexp.methods import lukv as lukv_module
from kvexp.methods import simlayerkv as simlayerkv_module
from kvexp.methods.calibration import calibration_path, text_ids
from kvexp.methods.duo_attention import (
    PROBE_ATTENTION,
    load_head_patterns,
    optimize_gates,
    passkey_probe,
    select_retrieval,
)
from kvexp.methods.lukv import (
    GRID,
    allocate_tokens,
    apportion,
    greedy_ratios,
    marginal_gains,
    oracle_importance,
    pava_nonincreasing,
    profile_contexts,
    profile_curve,
)
from kvexp.tasks.base import method_from_config
from tests.conftest import load
from tests.oracle import Visibility, oracle_logits
from tests.test_config import _compose
from tests.test_engine import _check_oracle, _ids

SNAP = {"window_size": 4, "kernel_size": 3}


def _run(model, ids, cache, **kwargs):
    with torch.no_grad():
        model(ids, past_key_values=cache, **kwargs)
    return cache


def _kept(layer, row=0) -> list[set[int]]:
    """Each KV head's live positions."""
    live, positions = layer.live()[row], layer.positions[row]
    return [set(positions[h][live[h]].tolist()) for h in range(layer.kv_heads)]


def _streaming(seen: int, sinks: int, budget: int) -> set[int]:
    return set(range(sinks)) | set(range(seen - (budget - sinks), seen))


def _longest_heads(cache) -> list[int]:
    return [int(layer.live().sum(-1).max()) for layer in cache.layers]


def _kv_heads(model) -> int:
    return getattr(model.config, "num_key_value_heads", None) or model.config.num_attention_heads


@torch.no_grad()
def _eager(model, ids, **kwargs):
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        return model(ids, output_attentions=True, use_cache=False, **kwargs)
    finally:
        model.set_attn_implementation(previous)


# -- duo_attention: identification ---------------------------------------------------------------------------


def test_passkey_probe_plants_the_passkeys_at_spread_depths_and_repeats_them_as_the_answer():
    haystack = torch.arange(100, 140)  # 40 tokens of "text"
    ids, answer = passkey_probe(haystack, vocab=50, bos=1, passkeys=3, passkey_length=4, seed=7)
    assert ids.shape == (1, 1 + 40 + 12) and answer == 41 and ids[0, 0] == 1
    keys = ids[0, answer:].view(3, 4)
    starts = [6, 18, 30]  # int((p + 0.5) * (40 - 4) / 3)
    for p, start in enumerate(starts):
        assert torch.equal(ids[0, 1 + start : 1 + start + 4], keys[p])
    text = torch.ones(40, dtype=torch.bool)
    for start in starts:
        text[start : start + 4] = False
    assert torch.equal(ids[0, 1:41][text], haystack[text])  # the rest is the haystack's own tokens, in order
    assert torch.equal(haystack, torch.arange(100, 140))  # not written over in place
    again, _ = passkey_probe(haystack, vocab=50, bos=1, passkeys=3, passkey_length=4, seed=7)
    other, _ = passkey_probe(haystack, vocab=50, bos=1, passkeys=3, passkey_length=4, seed=8)
    assert torch.equal(ids, again) and not torch.equal(ids, other)
    assert passkey_probe(haystack, 50, None, 3, 4, 7)[1] == 40  # no BOS
    led = torch.cat([torch.tensor([1]), haystack[1:]])  # a text the tokenizer began with BOS: no second one
    assert passkey_probe(led, 50, 1, 3, 4, 7)[0][0, :2].tolist() == [1, 101]


@pytest.mark.parametrize("model_name", ["tiny_llama", "tiny_gemma3"])
def test_probe_attention_mixes_full_and_streaming_attention_per_kv_head(model_name):
    """Gates 0 or 1 per KV head: the probe's model is the plain model with the streaming heads masked to sinks +
    recent window (and Gemma-3's local layers to their window), which the masking oracle runs independently."""
    model, _ = load(model_name)
    length, sink, recent = 30, 3, 7
    ids = _ids(model, length, seed=4)
    layers, heads = model.config.num_hidden_layers, _kv_heads(model)
    gates = torch.tensor([[float((i + h) % 2) for h in range(heads)] for i in range(layers)])
    window = getattr(model.config, "sliding_window", None)
    i, j = torch.arange(length)[:, None], torch.arange(length)[None, :]
    vis = Visibility(1, heads, length)
    for layer, local in enumerate(sliding_layers(model)):
        causal = (j <= i) & ((i - j < window) if local else True)
        streaming = causal & ((j < sink) | (i - j < recent))
        vis.masks[layer] = torch.stack([causal if g else streaming for g in gates[layer].tolist()])[None]
    reference = oracle_logits(model, ids, vis)
    previous = model.config._attn_implementation
    model.set_attn_implementation(PROBE_ATTENTION)
    token = duo_module._PROBE.set((gates, sink, recent))
    try:
        with torch.no_grad():
            logits = model(ids, use_cache=False).logits.float()
    finally:
        duo_module._PROBE.reset(token)
        model.set_attn_implementation(previous)
    assert torch.allclose(logits, reference, atol=1e-4)
    half = torch.full_like(gates, 0.5)  # a gate in between mixes the two outputs: not either model
    token = duo_module._PROBE.set((half, sink, recent))
    model.set_attn_implementation(PROBE_ATTENTION)
    try:
        with torch.no_grad():
            mixed = model(ids, use_cache=False).logits.float()
    finally:
        duo_module._PROBE.reset(token)
        model.set_attn_implementation(previous)
    assert not torch.allclose(mixed, reference, atol=1e-3)


def test_gate_optimization_with_only_the_regulariser_follows_adam_and_the_schedule():
    """A streaming window that covers the whole probe makes both attentions equal, so the distillation has no
    gradient and only reg_weight x mean|gate| acts: each Adam step then moves every gate by exactly its learning
    rate, lr x f(s) with the warm-up/decay factors f = .5, 1 x 8, .5 over 10 steps (fifth = 2): 1 - 0.02 x 9."""
    model, _ = load("tiny_llama")
    params = [p.requires_grad for p in model.parameters()]
    previous = model.config._attn_implementation
    ids, answer = passkey_probe(
        _ids(model, 32)[0], model.config.vocab_size, model.config.bos_token_id, 2, 4, 0
    )
    gates = optimize_gates(model, ids, answer, sink=2, recent=10**6, steps=10, lr=0.02, reg_weight=0.05)
    assert torch.allclose(gates, torch.full((2, 2), 1 - 0.02 * 9), atol=1e-5)
    assert model.config._attn_implementation == previous
    assert [p.requires_grad for p in model.parameters()] == params  # the weights are left as they were


def test_gate_optimization_is_deterministic_and_without_the_regulariser_keeps_full_attention():
    model, _ = load("tiny_llama")
    ids, answer = passkey_probe(
        _ids(model, 64)[0], model.config.vocab_size, model.config.bos_token_id, 2, 8, 0
    )
    first = optimize_gates(model, ids, answer, sink=2, recent=8, steps=6, lr=0.02, reg_weight=0.05)
    again = optimize_gates(model, ids, answer, sink=2, recent=8, steps=6, lr=0.02, reg_weight=0.05)
    assert torch.equal(first, again) and bool(((first >= 0) & (first < 1)).all())
    # Every gate at 1 is the full model: the distillation is 0 there and has no gradient, so nothing moves.
    no_reg = optimize_gates(model, ids, answer, sink=2, recent=8, steps=6, lr=0.02, reg_weight=0.0)
    assert torch.equal(no_reg, torch.ones(2, 2))


def test_select_retrieval_by_sparsity_and_by_threshold():
    gates = torch.tensor([[0.9, 0.1], [0.5, 0.1], [0.0, 1.0]])
    eligible = torch.tensor([True, True, False])  # a local layer: never compressed, never ranked
    by_share = select_retrieval(gates, eligible, sparsity=0.5, threshold=0.5)
    assert by_share.tolist() == [[True, False], [True, False], [False, False]]  # the two 0.1s stream
    one = select_retrieval(gates, eligible, sparsity=0.25, threshold=0.5)  # round(1.0): the first 0.1 streams
    assert one.tolist() == [[True, False], [True, True], [False, False]]
    assert select_retrieval(gates, eligible, sparsity=0.375, threshold=0.5).tolist() == by_share.tolist()
    assert not select_retrieval(gates, eligible, sparsity=1.0, threshold=0.5).any()
    assert select_retrieval(gates, eligible, sparsity=0.0, threshold=0.5).tolist() == [
        [True, True],
        [True, True],
        [False, False],
    ]
    by_gate = select_retrieval(gates, eligible, sparsity=None, threshold=0.5)
    assert by_gate.tolist() == [[True, False], [True, False], [False, False]]


def _patterns(tmp_path, rows, name="full_attention_heads.tsv"):
    path = tmp_path / name
    np.savetxt(path, np.array(rows, dtype=float), delimiter="\t")
    return path


def test_head_patterns_load_as_the_authors_files_clipped_and_checked(tmp_path):
    path = _patterns(tmp_path, [[1.5, -0.2], [0.3, 0.7]])
    assert torch.allclose(load_head_patterns(path), torch.tensor([[1.0, 0.0], [0.3, 0.7]]))
    assert torch.equal(load_head_patterns(tmp_path), load_head_patterns(path))  # the pattern directory
    np.save(tmp_path / "gates.npy", np.array([[0.2, 0.4], [0.6, 0.8]]))
    assert torch.allclose(load_head_patterns(tmp_path / "gates.npy"), torch.tensor([[0.2, 0.4], [0.6, 0.8]]))
    method = build_method("duo_attention", head_patterns=str(path))
    method.check_model(2, 2)
    with pytest.raises(ValueError, match=r"holds a 2 x 2 table; this model has 3 layers x 2 KV heads"):
        method.check_model(3, 2)
    model, _ = load("tiny_gemma3")  # 3 layers
    with pytest.raises(ValueError, match="method.head_patterns"):
        make_cache(model, method, budget=12)
    (tmp_path / "bad.tsv").write_text("a\tb\n")
    with pytest.raises(ValueError, match="cannot be read as a table of gates"):
        load_head_patterns(tmp_path / "bad.tsv")


def test_identified_heads_are_the_optimized_gates_selection_cached_per_model(monkeypatch, tmp_path):
    model, _ = load("tiny_llama")
    probe = dict(probe_length=48, probe_passkeys=2, passkey_length=8, probe_steps=4, probe_seed=3)
    probe["gates_cache"] = str(tmp_path)
    monkeypatch.setattr(duo_module, "_GATES", {})
    method = build_method("duo_attention", sink_size=2, recent_size=8, **probe)
    make_cache(model, method, budget=12)
    (stored,) = (tmp_path / "duo_attention").iterdir()  # the gates on disk, for the next process
    text = text_ids(model, calibration_path(None), 48, "probe_length")[0]  # the novel's first 48 tokens
    ids, answer = passkey_probe(text, model.config.vocab_size, model.config.bos_token_id, 2, 8, 3)
    gates = optimize_gates(model, ids, answer, 2, 8, 4, 0.02, 0.05)
    expected = select_retrieval(gates, torch.ones(2, dtype=torch.bool), 0.5, 0.5)
    assert torch.equal(method._retrieval, expected) and int(expected.sum()) == 2

    def fail(*args, **kwargs):
        raise AssertionError("the identification ran again")

    monkeypatch.setattr(duo_module, "optimize_gates", fail)
    again = build_method("duo_attention", sink_size=2, recent_size=8, **probe)
    make_cache(model, again, budget=16)  # the same model and setting: the cached gates
    assert torch.equal(again._retrieval, expected)
    monkeypatch.setattr(duo_module, "_GATES", {})  # a new process: the gates come from the disk
    fresh = build_method("duo_attention", sink_size=2, recent_size=8, **probe)
    make_cache(model, fresh, budget=16)
    assert torch.equal(fresh._retrieval, expected) and torch.equal(duo_module._GATES.popitem()[1], gates)
    other = build_method("duo_attention", sink_size=2, recent_size=8, **{**probe, "probe_seed": 4})
    with pytest.raises(AssertionError, match="ran again"):  # another setting: its own identification
        make_cache(model, other, budget=16)
    (tmp_path / "other.txt").write_text("Another text entirely, long enough to be a haystack. " * 20)
    other_text = build_method(
        "duo_attention", sink_size=2, recent_size=8, **probe, calibration_file=str(tmp_path / "other.txt")
    )
    with pytest.raises(AssertionError, match="ran again"):  # another haystack text: its own identification
        make_cache(model, other_text, budget=16)
    with pytest.raises(ValueError, match="method.calibration_file"):  # a missing text fails at validation
        build_method("duo_attention", calibration_file=str(tmp_path / "missing.txt")).validate(16)
    assert [p.name for p in (tmp_path / "duo_attention").iterdir()] == [stored.name]
    monkeypatch.setattr(duo_module, "_GATES", {})
    version = duo_module.DuoAttention.identification_version + 1  # a newer identification's code
    monkeypatch.setattr(duo_module.DuoAttention, "identification_version", version)
    with pytest.raises(AssertionError, match="ran again"):  # does not load the gates an older kvexp stored
        make_cache(model, build_method("duo_attention", sink_size=2, recent_size=8, **probe), budget=16)
    make_cache(model, build_method("duo_attention", sparsity=1.0, **probe), budget=16)  # no gates needed


# -- duo_attention: the cache -----------------------------------------------------------------------------


def test_streaming_heads_keep_exactly_sinks_and_recent_retrieval_heads_keep_everything(tmp_path):
    model, _ = load("tiny_llama")
    path = _patterns(tmp_path, [[0.9, 0.1], [0.2, 0.3]])  # threshold 0.5: layer 0's head 0 retrieves
    ids = _ids(model, 33, seed=5)
    cache = make_cache(model, "duo_attention", budget=10, head_patterns=str(path), sparsity=None, sink_size=4)
    _run(model, ids[:, :30], cache)
    for seen in (30, 31, 32, 33):
        if seen > 30:
            _run(model, ids[:, seen - 1 : seen], cache)
        assert _kept(cache.layers[0]) == [set(range(seen)), _streaming(seen, 4, 10)]
        assert _kept(cache.layers[1]) == [_streaming(seen, 4, 10)] * 2
        # Memory: a layer is as long as its longest head; the retrieval head keeps its layer whole.
        assert cache.physical_lengths() == [seen, 10] == _longest_heads(cache)
    assert cache.stats()["tokens_kept_per_head"] == [[33.0, 10.0], [10.0, 10.0]]


def test_streaming_heads_keep_their_own_per_head_budgets(tmp_path):
    model, _ = load("tiny_llama")
    path = _patterns(tmp_path, [[0.9, 0.1], [0.2, 0.3]])
    ids = _ids(model, 30, seed=6)
    cache = make_cache(
        model,
        "duo_attention",
        head_budgets=[[6, 8], [7, 9]],
        head_patterns=str(path),
        sparsity=None,
        sink_size=3,
    )
    _run(model, ids, cache)
    assert _kept(cache.layers[0]) == [set(range(30)), _streaming(30, 3, 8)]
    assert _kept(cache.layers[1]) == [_streaming(30, 3, 7), _streaming(30, 3, 9)]
    assert cache.physical_lengths() == [30, 9]


@pytest.mark.parametrize("chunk", [1, 7])
@pytest.mark.parametrize("model_name", ["tiny_llama", "tiny_qwen3", "tiny_gemma3"])
def test_retrieval_and_streaming_heads_match_the_masking_oracle(tmp_path, model_name, chunk):
    model, _ = load(model_name)
    layers, heads = model.config.num_hidden_layers, _kv_heads(model)
    path = _patterns(
        tmp_path, [[float((i * heads + h) % 3 == 0) for h in range(heads)] for i in range(layers)]
    )
    cache = _check_oracle(
        model,
        _ids(model, 40),
        chunk,
        method="duo_attention",
        budget=12,
        head_patterns=str(path),
        sparsity=None,
    )
    retrieval = cache.layers[0].method._retrieval
    local = sliding_layers(model)
    for i, layer in enumerate(cache.layers):
        if local[i]:
            continue
        assert layer.live()[0].sum(-1).tolist() == [40 if r else 12 for r in retrieval[i].tolist()]
    assert any(r.any() for r, slides in zip(retrieval, local, strict=True) if not slides)


# -- simlayerkv ----------------------------------------------------------------------------------------------


def _hand_mass(model, ids, seen, n_last, n_initial, recent) -> list[float]:
    """Each layer's mean attention (over query heads and the last n_last of `seen` tokens) on the first n_initial
    tokens and the `recent` newest, from the plain model's eager attention weights."""
    attentions = _eager(model, ids[:, :seen]).attentions
    kept = [j for j in range(seen) if j < n_initial or j >= seen - recent]
    return [float(a[0, :, seen - n_last :, kept].sum(-1).mean()) for a in attentions]


@pytest.mark.parametrize("chunk,n_last,decided_at", [(40, 1, 40), (40, 3, 40), (7, 1, 14), (7, 4, 14)])
def test_lazy_decision_is_the_attention_on_sinks_and_recent_tokens_of_the_plain_model(
    chunk, n_last, decided_at
):
    """Decided once, at the first step over the budget: the 40-token prefill, or the chunk that brings 14 tokens."""
    model, _ = load("tiny_llama")
    ids = _ids(model, 40, seed=2)
    hand = _hand_mass(model, ids, decided_at, n_last, n_initial=4, recent=12 - 4)
    probe = make_cache(model, "simlayerkv", budget=12, n_last=n_last)
    for s in range(0, 40, chunk):
        _run(model, ids[:, s : s + chunk], probe)
    masses = [float(layer.scratch(layer.method)["mass"]) for layer in probe.layers]
    assert masses == pytest.approx(hand, abs=1e-5)
    # A threshold between the two layers' masses makes exactly the more concentrated one lazy.
    threshold = sum(hand) / 2
    cache = make_cache(model, "simlayerkv", budget=12, n_last=n_last, lazy_threshold=threshold)
    for s in range(0, 40, chunk):
        _run(model, ids[:, s : s + chunk], cache)
    lazy = [bool(layer.scratch(layer.method)["lazy"]) for layer in cache.layers]
    assert lazy == [m > threshold for m in hand] and sum(lazy) == 1
    for layer, is_lazy in zip(cache.layers, lazy, strict=True):
        expected = _streaming(40, 4, 12) if is_lazy else set(range(40))
        assert _kept(layer) == [expected] * layer.kv_heads
    assert cache.physical_lengths() == [12 if is_lazy else 40 for is_lazy in lazy]
    assert cache.stats()["method_stats"] == {"lazy_layer_share": 0.5}


def test_lazy_decision_is_made_once_per_layer_and_run(monkeypatch):
    model, _ = load("tiny_llama")
    ids = _ids(model, 30, seed=1)
    calls = []
    original = simlayerkv_module.lazy_mass

    def counted(*args, **kwargs):
        calls.append(args[0].layer_idx)
        return original(*args, **kwargs)

    monkeypatch.setattr(simlayerkv_module, "lazy_mass", counted)
    cache = make_cache(model, "simlayerkv", budget=10, lazy_threshold=0.0)
    for t in range(30):  # token by token: decided at token 11, then only evicting
        _run(model, ids[:, t : t + 1], cache)
    assert calls == [0, 1]
    assert cache.physical_lengths() == [10, 10]
    fresh = make_cache(model, "simlayerkv", budget=10, lazy_threshold=0.0)  # a new run decides again
    _run(model, ids, fresh)
    assert calls == [0, 1, 0, 1]


@pytest.mark.parametrize("chunk", [1, 7, 40])
@pytest.mark.parametrize("model_name", ["tiny_llama", "tiny_qwen3", "tiny_gemma3"])
def test_lazy_and_full_layers_match_the_masking_oracle(model_name, chunk):
    """A threshold between the compressed layers' masses: some layers stay full, others keep sinks + recent."""
    model, _ = load(model_name)
    ids = _ids(model, 40)
    probe = make_cache(model, "simlayerkv", budget=12)
    for s in range(0, 40, chunk):
        _run(model, ids[:, s : s + chunk], probe)
    masses = sorted(float(layer.scratch(layer.method)["mass"]) for layer in probe.layers if layer.budget)
    threshold = (masses[0] + masses[-1]) / 2 if len(masses) > 1 else masses[0] - 1e-3
    cache = _check_oracle(model, ids, chunk, method="simlayerkv", budget=12, lazy_threshold=threshold)
    for layer in cache.layers:
        if layer.budget is None:
            continue
        lazy = bool(layer.scratch(layer.method)["lazy"])
        assert layer.live()[0].sum(-1).tolist() == [12 if lazy else 40] * layer.kv_heads


@torch.no_grad()
def test_each_row_of_a_left_padded_batch_is_decided_as_alone():
    model, _ = load("tiny_llama")
    rows = [_ids(model, 30, seed=3)[0], _ids(model, 22, seed=4)[0]]
    pad = 30 - 22
    ids = torch.stack([rows[0], torch.cat([torch.zeros(pad, dtype=torch.long), rows[1]])])
    mask = torch.ones(2, 30, dtype=torch.long)
    mask[1, :pad] = 0
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    alone = [_run(model, r[None], make_cache(model, "simlayerkv", budget=10, n_last=2)) for r in rows]
    threshold = sum(float(c.layers[0].scratch(c.layers[0].method)["mass"]) for c in alone) / 2
    alone = [
        _run(model, r[None], make_cache(model, "simlayerkv", budget=10, n_last=2, lazy_threshold=threshold))
        for r in rows
    ]
    together = make_cache(model, "simlayerkv", budget=10, n_last=2, lazy_threshold=threshold)
    model(ids, attention_mask=mask, position_ids=positions, past_key_values=together)
    for b, cache in enumerate(alone):
        for layer, joint in zip(cache.layers, together.layers, strict=True):
            mine, ours = layer.scratch(layer.method), joint.scratch(joint.method)
            assert float(ours["mass"][b]) == pytest.approx(float(mine["mass"][0]), abs=1e-5)
            assert bool(ours["lazy"][b]) == bool(mine["lazy"][0])
            assert _kept(joint, row=b) == _kept(layer)
    assert [bool(c.layers[0].scratch(c.layers[0].method)["lazy"]) for c in alone] in (
        [True, False],
        [False, True],
    )


# -- lukv: the offline curve ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "values,expected",
    [
        ([3.0, 1.0, 2.0], [3.0, 1.5, 1.5]),
        ([1.0, 2.0, 3.0], [2.0, 2.0, 2.0]),
        ([4.0, 3.0, 3.0, 1.0], [4.0, 3.0, 3.0, 1.0]),  # already non-increasing
        ([1.0, 5.0, 0.0, 2.0], [3.0, 3.0, 1.0, 1.0]),
        ([-1.0, -3.0, 2.0], [0.0, 0.0, 0.0]),  # the fit -2/3 everywhere, clipped at 0
    ],
)
def test_pava_fits_the_nearest_non_increasing_sequence(values, expected):
    assert pava_nonincreasing(torch.tensor(values)).tolist() == pytest.approx(expected)


def test_marginal_gains_are_the_importance_in_the_metrics_keep_order():
    scores = torch.tensor([[0.1, 0.9, 0.5, float("inf")]])
    positions = torch.tensor([[0, 1, 2, 3]])
    importance = torch.tensor([[4.0, 1.0, 3.0, 2.0]])  # in keep order (3, 1, 2, 0): 2, 1, 3, 4
    assert marginal_gains(importance, scores, positions).tolist() == [[2.5, 2.5, 2.5, 2.5]]
    importance = torch.tensor([[1.0, 3.0, 2.0, 5.0]])  # 5, 3, 2, 1: already decreasing
    assert marginal_gains(importance, scores, positions).tolist() == [[5.0, 3.0, 2.0, 1.0]]


def test_the_greedy_on_relaxed_gains_is_the_optimal_allocation():
    """On non-increasing gains, the K largest over all heads maximise the kept utility among all ways of giving
    K tokens to the heads (the paper: greedy = DP after the convex-hull relaxation)."""
    g = torch.Generator().manual_seed(0)
    gains = torch.stack([pava_nonincreasing(torch.rand(5, generator=g)) for _ in range(3)])
    ratios = greedy_ratios(gains)
    assert ratios.shape == (GRID, 3)
    for k in range(16):
        sigma = 1 - k / 15
        if not 0.01 <= sigma <= 0.99:
            continue
        row = round(sigma * 100) - 1
        spent = math.floor((1 - (row + 1) / 100) * 15 + 0.5)
        counts = ((1 - ratios[row]) * 5).round().long()
        assert int(counts.sum()) == spent
        best = max(
            sum(float(gains[h, :c].sum()) for h, c in enumerate(split))
            for split in itertools.product(range(6), repeat=3)
            if sum(split) == spent
        )
        assert sum(float(gains[h, :c].sum()) for h, c in enumerate(counts.tolist())) == pytest.approx(best)


def _naive_pava(values: list[float]) -> list[float]:
    """Pool the first adjacent pair of blocks that rises until none does (quadratic, but plainly the definition)."""
    blocks = [[v] for v in values]
    while True:
        means = [sum(b) / len(b) for b in blocks]
        rise = next((i for i in range(len(blocks) - 1) if means[i] < means[i + 1]), None)
        if rise is None:
            return [max(m, 0.0) for m, b in zip(means, blocks, strict=True) for _ in b]
        blocks[rise : rise + 2] = [blocks[rise] + blocks[rise + 1]]


@torch.no_grad()
def test_profiled_curve_equals_the_hand_computation_with_knorm():
    """The whole offline profile by hand on tiny_llama with knorm (-||k||: from the key projection, RoPE keeps
    norms): greedy continuation without a cache, eager attention weights, values from the value projection and
    the output projection's head slices, a naive PAVA, and a sort for the global greedy."""
    model, _ = load("tiny_llama")
    length, horizon, sink, window = 24, 4, 2, 1
    ids = _ids(model, length, seed=9)
    curve = profile_curve(model, build_method("knorm"), sink, window, [ids], horizon)
    assert curve.shape == (GRID, 2, 2)

    seq = ids
    for _ in range(horizon):
        seq = torch.cat([seq, model(seq, use_cache=False).logits[:, -1:].argmax(-1)], dim=1)
    captured = {}
    hooks = [
        module.register_forward_hook(lambda m, a, out, key=(i, name): captured.__setitem__(key, out))
        for i, block in enumerate(model.model.layers)
        for name, module in (("k", block.self_attn.k_proj), ("v", block.self_attn.v_proj))
    ]
    try:
        attentions = _eager(model, seq).attentions
    finally:
        for hook in hooks:
            hook.remove()
    heads, dim = model.config.num_attention_heads, model.config.head_dim
    gains, group = [], heads // 2
    for i, block in enumerate(model.model.layers):
        keys = captured[(i, "k")][0, :length].view(length, 2, dim)
        values = captured[(i, "v")][0, :length].view(length, 2, dim)
        w_o = block.self_attn.o_proj.weight
        for g in range(2):
            importance = [
                max(
                    float(attentions[i][0, h, t, j])
                    * float((w_o[:, h * dim : (h + 1) * dim] @ values[j, g]).norm())
                    for h in range(g * group, (g + 1) * group)
                    for t in range(length, length + horizon)
                )
                for j in range(length)
            ]
            norms = keys[:, g].norm(dim=-1).tolist()
            protected = [j < sink or j >= length - window for j in range(length)]
            # Keep order: protected first (newest first among them), then the lowest key norm.
            order = sorted(range(length), key=lambda j: (not protected[j], -j if protected[j] else norms[j]))
            gains.append(_naive_pava([importance[j] for j in order]))
    flat = sorted(((-v, h, r) for h, row in enumerate(gains) for r, v in enumerate(row)))
    for percent in (10, 35, 50, 80, 99):
        spent = math.floor((1 - percent / 100) * 4 * length + 0.5)
        counts = [0] * 4
        for _, h, _ in flat[:spent]:
            counts[h] += 1
        expected = [1 - c / length for c in counts]
        assert curve[percent - 1].flatten().tolist() == pytest.approx(expected), percent


@torch.no_grad()
def test_oracle_importance_is_the_largest_output_contribution_over_the_decoded_tokens():
    model, _ = load("tiny_qwen3")
    length, horizon = 16, 3
    ids = _ids(model, length, seed=2)
    importance = oracle_importance(model, ids, horizon, [0, 1])
    seq = ids
    for _ in range(horizon):
        seq = torch.cat([seq, model(seq, use_cache=False).logits[:, -1:].argmax(-1)], dim=1)
    values = {}
    hooks = [
        block.self_attn.v_proj.register_forward_hook(lambda m, a, out, i=i: values.__setitem__(i, out))
        for i, block in enumerate(model.model.layers)
    ]
    try:
        attentions = _eager(model, seq).attentions
    finally:
        for hook in hooks:
            hook.remove()
    heads, kv_heads, dim = model.config.num_attention_heads, _kv_heads(model), model.config.head_dim
    for i in (0, 1):
        w_o = model.model.layers[i].self_attn.o_proj.weight
        v = values[i][0].view(-1, kv_heads, dim)
        for g in range(kv_heads):
            for j in (0, 5, 15):
                hand = max(
                    float(attentions[i][0, h, t, j])
                    * float((w_o[:, h * dim : (h + 1) * dim] @ v[j, g]).norm())
                    for h in range(g * heads // kv_heads, (g + 1) * heads // kv_heads)
                    for t in range(length, length + horizon)
                )
                assert float(importance[i][g, j]) == pytest.approx(hand, rel=1e-4, abs=1e-7)


def test_profiled_curves_spend_each_global_ratio_and_are_cached(monkeypatch):
    model, _ = load("tiny_gemma3")  # local layers 0 and 2: never compressed, the global ratio as filler
    method = build_method(
        "lukv", scorer="snapkv", scorer_params=SNAP, calibration_tokens=80, probe_length=40, probe_horizon=4
    )
    make_cache(model, method, budget=12)
    curve = method._curve
    sigma = torch.arange(1, GRID + 1, dtype=torch.float64) / 100
    assert torch.equal(curve[:, [0, 2]], sigma[:, None, None].expand(-1, 2, 2))
    spent = torch.floor((1 - sigma) * 2 * 40 + 0.5)  # one compressed layer of 2 KV heads
    assert torch.allclose((1 - curve[:, 1]).sum(-1) * 40, spent)  # each context's greedy spends K exactly
    assert bool(((curve >= 0) & (curve <= 1)).all())
    monkeypatch.setattr(lukv_module, "profile_curve", lambda *a, **k: pytest.fail("profiled again"))
    again = build_method(
        "lukv", scorer="snapkv", scorer_params=SNAP, calibration_tokens=80, probe_length=40, probe_horizon=4
    )
    make_cache(model, again, budget=20)
    assert torch.equal(again._curve, curve)


def test_profiling_contexts_are_consecutive_windows_of_the_text():
    ids = torch.arange(10)[None]
    assert [c.tolist() for c in profile_contexts(ids, 4)] == [
        [[0, 1, 2, 3]],
        [[4, 5, 6, 7]],
    ]  # tail 8, 9 dropped
    with pytest.raises(
        ValueError, match=r"method.probe_length \(11\) is longer than the profiling text's 10"
    ):
        profile_contexts(ids, 11)


# -- lukv: online budgets ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "total,weights,caps,expected",
    [
        (10, [1, 1, 2], [10, 10, 10], [3, 2, 5]),  # 2.5, 2.5, 5: the remainder to the lower index
        (10, [1, 1, 2], [10, 10, 4], [3, 3, 4]),  # the capped head's excess goes to the others
        (7, [0, 0, 0], [5, 5, 5], [3, 2, 2]),  # no weight: an even split
        (20, [1, 2, 3], [4, 5, 6], [4, 5, 6]),  # more than the caps hold: every cap
        (48, [0.5, 0.1, 0.3, 0.3], [15, 15, 15, 15], [15, 5, 14, 14]),  # 20 -> 15; 33 as 4.7, 14.1, 14.1
        (48, [0.9, 0.1, 0.5, 0.5], [15, 15, 15, 15], [15, 3, 15, 15]),  # 21.6 -> 15; 33 as 3, 15, 15
    ],
)
def test_apportion_splits_by_weight_under_caps_by_largest_remainder(total, weights, caps, expected):
    assert apportion(total, torch.tensor(weights), torch.tensor(caps)).tolist() == expected


def _curve_file(tmp_path, keep, layers=2) -> str:
    """A budget curve whose every row has these keep rates [L, Hkv] (prune ratio 1 - keep)."""
    curve = np.broadcast_to(1.0 - np.array(keep, dtype=float), (GRID, layers, len(keep[0]))).copy()
    path = tmp_path / "curve.npy"
    np.save(path, curve)
    return str(path)


def test_online_budgets_follow_the_curve_row_of_the_global_ratio():
    """T = 40 tokens, two layers of budget 12: sigma = 1 - 48 / 160 = 0.7, row 69; its keep rates (.5, .1 | .3,
    .3) split the 48 as 20, 4 | 12, 12. At T = 15 (sigma 0.2, row 19, keep .9, .1 | .5, .5) the first head is
    capped at 15 and the others share the remaining 33 in proportion .1 : .5 : .5, 3, 15, 15."""
    curve = torch.full((GRID, 2, 2), 0.5, dtype=torch.float64)
    curve[69] = torch.tensor([[0.5, 0.9], [0.7, 0.7]])
    curve[19] = torch.tensor([[0.1, 0.9], [0.5, 0.5]])
    assert allocate_tokens(curve, [0, 1], [12, 12], 40, None).tolist() == [[20, 4], [12, 12]]
    assert allocate_tokens(curve, [0, 1], [12, 12], 15, None).tolist() == [[15, 3], [15, 15]]
    # head_cap 1: no head above its layer's budget, so a uniform allocation
    assert allocate_tokens(curve, [0, 1], [12, 12], 40, 1.0).tolist() == [[12, 12], [12, 12]]
    # Per-layer budgets 9 and 14 at T = 10: the uniform allocation keeps 9 + 10 per head, 38 in all.
    counts = allocate_tokens(curve, [0, 1], [9, 14], 10, None)
    assert int(counts.sum()) == 38 and int(counts.max()) <= 10


@pytest.mark.parametrize("slack", [0, 3])
def test_lukv_holds_the_uniform_total_while_streaming_and_a_layer_is_as_long_as_its_longest_head(
    tmp_path, slack
):
    model, _ = load("tiny_llama")
    curve = _curve_file(tmp_path, [[0.5, 0.1], [0.3, 0.3]])
    ids = _ids(model, 45, seed=3)
    cache = make_cache(
        model, "lukv", budget=12, slack=slack, curve=curve, scorer="snapkv", scorer_params=SNAP
    )
    table = lukv_module.load_curve(curve)
    for t in range(45):
        _run(model, ids[:, t : t + 1], cache)
        seen = t + 1
        live = [layer.live()[0].sum(-1).tolist() for layer in cache.layers]
        expected = allocate_tokens(table, [0, 1], [12, 12], seen, None).tolist()
        assert all(
            h <= e + slack
            for row, exp in zip(live, expected, strict=True)
            for h, e in zip(row, exp, strict=True)
        )
        if slack == 0:
            assert live == [[min(e, seen) for e in row] for row in expected]
            assert sum(map(sum, live)) == 4 * min(12, seen)
        assert cache.physical_lengths() == [max(row) for row in live]  # memory = the longest head
    assert allocate_tokens(table, [0, 1], [12, 12], 40, None).tolist() == [[20, 4], [12, 12]]


@torch.no_grad()
def test_lukv_protects_sinks_and_window_and_keeps_the_scorers_best(tmp_path):
    model, _ = load("tiny_llama")
    curve = _curve_file(tmp_path, [[0.5, 0.1], [0.3, 0.3]])
    ids = _ids(model, 40, seed=8)
    cache = _run(
        model, ids, make_cache(model, "lukv", budget=12, curve=curve, scorer="knorm", scorer_params={})
    )
    full = _run(model, ids, make_cache(model, "full"))
    for layer, plain, counts in zip(cache.layers, full.layers, [[20, 4], [12, 12]], strict=True):
        norms = plain.keys[0].float().norm(dim=-1)  # [Hkv, 40]
        for h, count in enumerate(counts):
            protected = [39, 3, 2, 1, 0]  # the window and the sinks, the newest first among them
            rest = sorted((j for j in range(40) if j not in protected), key=lambda j: float(norms[h, j]))
            assert _kept(layer)[h] == set((protected + rest)[:count])


@pytest.mark.parametrize("chunk", [1, 7])
@pytest.mark.parametrize("model_name", ["tiny_llama", "tiny_gemma3"])
def test_lukv_head_budgets_match_the_masking_oracle(tmp_path, model_name, chunk):
    model, _ = load(model_name)
    layers = model.config.num_hidden_layers
    curve = _curve_file(tmp_path, [[0.8, 0.2], [0.4, 0.6], [0.5, 0.5]][:layers], layers=layers)
    cache = _check_oracle(
        model,
        _ids(model, 40),
        chunk,
        method="lukv",
        budget=12,
        curve=curve,
        scorer="snapkv",
        scorer_params=SNAP,
    )
    compressed = [layer for layer in cache.layers if layer.budget is not None]
    live = [layer.live()[0].sum(-1).tolist() for layer in compressed]
    assert sum(map(sum, live)) == 12 * 2 * len(compressed) and len({h for row in live for h in row}) > 1


@torch.no_grad()
def test_lukv_admitted_steps_do_not_compress_and_later_steps_use_the_raised_budgets(tmp_path):
    model, _ = load("tiny_llama")
    curve = _curve_file(tmp_path, [[0.5, 0.1], [0.3, 0.3]])
    table = lukv_module.load_curve(curve)
    ids = _ids(model, 36, seed=4)
    cache = make_cache(model, "lukv", budget=12, curve=curve, scorer="snapkv", scorer_params=SNAP)
    _run(model, ids[:, :30], cache)
    before = [layer.live()[0].sum(-1) for layer in cache.layers]
    cache.admit(5)  # the query-agnostic protocol's question: it must not compress
    _run(model, ids[:, 30:35], cache)
    assert [layer.live()[0].sum(-1).tolist() for layer in cache.layers] == [(b + 5).tolist() for b in before]
    _run(model, ids[:, 35:36], cache)
    held = torch.stack(before) + 6  # a head keeps at most what it holds
    expected = torch.minimum(allocate_tokens(table, [0, 1], [17, 17], 36, None), held)
    assert [layer.live()[0].sum(-1).tolist() for layer in cache.layers] == expected.tolist()
    assert int(expected.sum()) < 4 * 17 and bool((expected < held).any())


def test_lukv_curve_files_are_checked(tmp_path):
    bad = tmp_path / "bad.npy"
    np.save(bad, np.full((GRID, 2, 2), 1.5))
    with pytest.raises(ValueError, match=r"must hold prune ratios in \[0, 1\]"):
        lukv_module.load_curve(bad)
    np.save(bad, np.zeros((10, 2, 2)))
    with pytest.raises(ValueError, match=r"must have shape \[99, layers, KV heads\]"):
        lukv_module.load_curve(bad)
    curve = _curve_file(tmp_path, [[0.5, 0.5], [0.5, 0.5]])
    method = build_method("lukv", curve=curve, scorer="snapkv", scorer_params=SNAP)
    with pytest.raises(ValueError, match=r"is for 2 layers x 2 KV heads; this model has 3 x 2"):
        method.check_model(3, 2)
    model, _ = load("tiny_gemma3")
    with pytest.raises(ValueError, match="method.curve"):
        make_cache(model, method, budget=12)


# -- validation and configs ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,params,budget,match",
    [
        ("duo_attention", {"sparsity": 1.5}, 64, r"method.sparsity must be in \[0, 1\] or null"),
        ("duo_attention", {"threshold": -0.1}, 64, r"method.threshold must be in \[0, 1\]"),
        ("duo_attention", {"sink_size": 64}, 64, r"method.sink_size \(64\) must be smaller than the budget"),
        ("duo_attention", {"recent_size": 0}, 64, "method.recent_size must be >= 1"),
        ("duo_attention", {"head_patterns": "/nonexistent/x.tsv"}, 64, "method.head_patterns='/nonexistent"),
        ("duo_attention", {"probe_length": 100}, 64, r"method.probe_length \(100\) must be at least"),
        (
            "duo_attention",
            {"probe_length": 400, "recent_size": 400},
            64,
            r"must exceed sink_size \+ recent_size \(404\)",
        ),
        ("duo_attention", {"probe_steps": 0}, 64, "method.probe_steps must be >= 1"),
        ("duo_attention", {"probe_lr": 0.0}, 64, "method.probe_lr must be > 0"),
        ("duo_attention", {"reg_weight": -1.0}, 64, "method.reg_weight must be >= 0"),
        ("simlayerkv", {"lazy_threshold": 1.5}, 64, r"method.lazy_threshold must be in \[0, 1\]"),
        ("simlayerkv", {"n_last": 0}, 64, "method.n_last must be >= 1"),
        ("simlayerkv", {"n_initial": -1}, 64, "method.n_initial must be >= 0"),
        ("simlayerkv", {"n_initial": 8}, 8, r"method.n_initial \(8\) must be smaller than the budget \(8\)"),
        ("lukv", {"window": -1}, 64, "method.window must be >= 0"),
        ("lukv", {"sink_tokens": 60, "window": 4}, 64, r"method.sink_tokens \+ method.window \(64\)"),
        ("lukv", {"head_cap": 0.5}, 64, "method.head_cap must be >= 1"),
        ("lukv", {"curve": "/nonexistent/curve.npy"}, 64, "method.curve='/nonexistent/curve.npy' must be an"),
        ("lukv", {"probe_horizon": 0}, 64, "method.probe_horizon must be >= 1"),
        ("lukv", {"calibration_tokens": 100}, 64, r"method.calibration_tokens must be >= 512"),
        ("lukv", {"probe_length": 5}, 64, r"method.probe_length \(5\) must exceed"),
        ("lukv", {"scorer": "snapkv", "scorer_params": {}, "probe_length": 20}, 64, r"\(20\) does not suit"),
        (
            "lukv",
            {"scorer": "snapkv", "scorer_params": {}},
            32,
            r"\(scorer snapkv\): method.window_size \(32\)",
        ),
    ],
)
def test_bad_structural_parameters_name_the_option(name, params, budget, match):
    with pytest.raises(ValueError, match=match):
        build_method(name, **params).validate(budget)


@pytest.mark.parametrize(
    "params,match",
    [
        (
            {"scorer": "dynamickv", "scorer_params": {}},
            "method.scorer=dynamickv allocates budgets across layers",
        ),
        ({"scorer": "knorm"}, r"method.scorer_params: method 'knorm' has no parameter\(s\) \['epsilon'\]"),
        ({"scorer": "kvmerger"}, "method.scorer must be one of"),
        (
            {"scorer_params": {"bogus": 1}},
            r"method.scorer_params: method 'expected_attention' has no parameter",
        ),
        ({"head_cap": "big"}, r"method.head_cap='big' must be a number or null"),
    ],
)
def test_bad_lukv_scorers_fail_when_built(params, match):
    with pytest.raises(ValueError, match=match):
        build_method("lukv", **params)


@pytest.mark.parametrize(
    "overrides,expected",
    [
        (["method=duo_attention", "method.sparsity=0.25", "budget=64"], {"sparsity": 0.25, "sink_size": 4}),
        (["method=duo_attention", "method.sparsity=null", "method.threshold=0.7"], {"sparsity": None}),
        (["method=simlayerkv", "method.lazy_threshold=0.65", "method.n_last=4"], {"lazy_threshold": 0.65}),
        (["method=lukv", "method.head_cap=2.0"], {"head_cap": 2.0, "scorer": "expected_attention"}),
        (["method=lukv", "method.scorer=snapkv", "~method.scorer_params.epsilon"], {"scorer_params": {}}),
    ],
)
def test_structural_method_overrides_compose_and_validate(overrides, expected):
    cfg = _compose(*overrides)
    validate(cfg)
    method = method_from_config(cfg.method)
    assert {k: getattr(method, k) for k in expected} == expected
    assert OmegaConf.to_container(cfg.method)["name"] == method.name


def test_structural_defaults_are_the_papers_where_kvexp_can_run_them():
    assert build_method("lukv").scorer_params == {
        "epsilon": 0.02
    }  # the authors' curves: EA(0.02), sink 4, win 1
    lukv = build_method("lukv")
    assert (lukv.sink_tokens, lukv.window, lukv.head_cap) == (4, 1, None)
    sim = build_method("simlayerkv")
    assert (sim.lazy_threshold, sim.n_last, sim.n_initial) == (0.9, 1, 4)
    duo = build_method("duo_attention")
    assert (duo.recent_size, duo.passkey_length, duo.probe_passkeys, duo.probe_lr, duo.reg_weight) == (
        256,
        32,
        10,
        0.02,
        0.05,
    )
    assert build_method("lukv").batches  # as its scorer does: Expected Attention's moments are per row
    assert build_method(
        "lukv", scorer="random", scorer_params={}
    ).batches  # random's draws are each row's own too
    assert build_method("simlayerkv").batches and build_method("duo_attention").batches
    assert build_method("lukv").allocates
