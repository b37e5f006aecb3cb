"""pyramidinfer: hidden-state pruning between layers, checked against hand computations and the masking oracle.

Pruning a token's hidden state after layer l is the same as hiding its keys from every query of the deeper
layers: the plain model over the whole sequence with a per-layer mask that shows layer l only the tokens layer l
computed gives exactly the retained tokens' attention and outputs. That gives the hand computation of the token
sets (layer by layer, from eager attention weights under those masks) and the oracle for `generate()`, whose
recorder here takes each step's query positions from the layer (a pruned layer's queries are not the last q
positions of the sequence, which tests/oracle.py's recorder assumes).
"""

import functools
import logging

import pytest
import torch
from omegaconf import OmegaConf
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from kvexp.budgets import allocate
from kvexp.methods import build_method, make_cache
from kvexp.models import load_model
from tests.conftest import ROOT, load
from tests.oracle import Visibility, max_logprob_error, oracle_logits, streamed_logits

TOL = 1e-4
MASKED = "pyramidinfer_test_masked"
_LAYER_KEYS: dict[int, torch.Tensor] = {}  # layer -> [T] bool: the tokens that layer computed
_PROBS: dict[int, torch.Tensor] = {}  # layer -> [B, H, T, T] attention weights of the last masked run


@functools.cache
def llama4():
    """tiny_llama (4 query heads, 2 KV heads: GQA G=2) with 4 layers: the pyramid needs depth to show."""
    model = OmegaConf.load(ROOT / "conf" / "model" / "tiny_llama.yaml")
    model.tiny.num_hidden_layers = 4
    return load_model(model, OmegaConf.load(ROOT / "conf" / "hardware" / "cpu.yaml"))


def _ids(model, length, seed=0):
    return torch.randint(
        3, model.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(seed)
    )


def _masked_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Eager attention in which layer l's queries see only the tokens layer l computed (causally); its weights
    are kept in _PROBS. Rows of tokens the layer did not compute see themselves (their outputs are unused)."""
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, dim=1).float(), value.repeat_interleave(groups, dim=1).float()
    scores = (query.float() @ key.transpose(-1, -2)) * (scaling or query.shape[-1] ** -0.5)
    t = scores.shape[-1]
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    visible = (causal & _LAYER_KEYS[module.layer_idx][None, :]) | torch.eye(t, dtype=torch.bool)
    probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
    _PROBS[module.layer_idx] = probs
    return (probs @ value).to(query.dtype).transpose(1, 2).contiguous(), None


AttentionInterface.register(MASKED, _masked_attention)
AttentionMaskInterface.register(MASKED, lambda *args, **kwargs: None)


@torch.no_grad()
def _masked_probs(model, ids, computed: list[torch.Tensor]) -> dict[int, torch.Tensor]:
    """Attention weights of every layer when layer l computes only the tokens `computed[l]` ([T] bool)."""
    _LAYER_KEYS.clear()
    _LAYER_KEYS.update(enumerate(computed))
    previous = model.config._attn_implementation
    model.set_attn_implementation(MASKED)
    try:
        model(ids, use_cache=False)
    finally:
        model.set_attn_implementation(previous)
    return dict(_PROBS)


def _hand_votes(probs: torch.Tensor, window: int, sinks: int, distance_weight: float) -> torch.Tensor:
    """PyramidInfer's ranking written out: the last `window` queries' attention [H, w, T] averaged over heads,
    each row weighted by a ramp 1 .. distance_weight (oldest .. newest), averaged over rows; sinks and the
    window forced in. [T]."""
    rows = probs[0, :, -window:, :]  # [H, w, T]
    ramp = torch.linspace(1.0, distance_weight, window)
    votes = (rows.mean(dim=0) * ramp[:, None]).mean(dim=0)
    votes[:sinks] = float("inf")
    votes[-window:] = float("inf")
    return votes


def _top(votes: torch.Tensor, among: torch.Tensor, count: int) -> torch.Tensor:
    """[T] bool: the `count` best of `votes` among the tokens `among` ([T] bool)."""
    ranked = votes.masked_fill(~among, float("-inf"))
    chosen = torch.zeros_like(among)
    chosen[ranked.topk(min(count, int(among.sum()))).indices] = True
    return chosen


# -- the pruned prefill ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "budget,decay_ratio,computed_by_layer",
    [  # budgets [25, 25, 22, 16]: layer 0 keeps the prompt, as in the reference; [11, 11, 10, 8]: it evicts too
        pytest.param(22, 0.3, [24, 24, 22, 16], id="layer0-keeps-all"),
        pytest.param(10, 0.5, [24, 11, 10, 8], id="layer0-evicts"),
    ],
)
def test_prefill_keeps_the_hand_ranked_tokens_layer_by_layer(budget, decay_ratio, computed_by_layer):
    model, _ = llama4()
    ids, t = _ids(model, 24), 24
    budgets = allocate("pyramidinfer", budget, 4, decay_ratio=decay_ratio, recent_ratio=0.2)
    cache = make_cache(model, "pyramidinfer", budget=budget, decay_ratio=decay_ratio)
    assert [layer.budget for layer in cache.layers] == budgets
    with torch.no_grad():
        logits = model(ids, past_key_values=cache, logits_to_keep=1).logits
    assert logits.shape[1] == 1
    window, sinks = int(0.2 * max(budgets)) + 1, 4  # both fit in the smallest budget here
    assert cache.layers[0].method.protected(cache.layers[0]) == (sinks, window)

    computed = [torch.ones(t, dtype=torch.bool)]
    for layer_idx, layer in enumerate(cache.layers):
        probs = _masked_probs(model, ids, computed + [computed[-1]] * (4 - len(computed)))[layer_idx]
        votes = _hand_votes(probs, window, sinks, distance_weight=1.2)
        kept = _top(votes, computed[layer_idx], budgets[layer_idx])
        assert sorted(layer.positions[0, 0].tolist()) == kept.nonzero().flatten().tolist()
        assert torch.equal(layer.positions[0, 0], layer.positions[0, 1])  # one token set per layer
        assert layer.peak_length == int(computed[layer_idx].sum())  # what the layer computed
        if layer_idx + 1 < 4:
            computed.append(_top(votes, computed[layer_idx], min(budgets[layer_idx], budgets[layer_idx + 1])))
    assert [int(c.sum()) for c in computed] == computed_by_layer
    assert all(layer.seen == t for layer in cache.layers)  # dropped tokens count as seen


def test_budget_at_least_the_prompt_reproduces_the_plain_model():
    model, _ = llama4()
    ids = _ids(model, 24, seed=1)
    model.set_attn_implementation("sdpa")
    plain = model(ids).logits
    plain_tokens = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert min(allocate("pyramidinfer", 40, 4)) >= 30  # no layer can drop anything
    cache = make_cache(model, "pyramidinfer", budget=40)
    last = model(ids, past_key_values=cache, logits_to_keep=1).logits
    assert torch.allclose(last, plain[:, -1:], atol=1e-5)
    chunked, _, _ = streamed_logits(model, ids, 5, method="pyramidinfer", budget=40)
    assert torch.allclose(chunked, plain, atol=1e-5)
    tokens = model.generate(
        ids,
        past_key_values=make_cache(model, "pyramidinfer", budget=40),
        max_new_tokens=6,
        do_sample=False,
        pad_token_id=0,
    )
    assert torch.equal(tokens, plain_tokens)


# -- generate(), budgets, decoding ------------------------------------------------------------------------------


def test_generate_with_a_pruned_prompt_matches_the_masking_oracle():
    model, _ = llama4()
    prompt, new = _ids(model, 30, seed=2), 10
    vis = Visibility(1, 2, 30 + new)
    cache = make_cache(model, "pyramidinfer", budget=12, decay_ratio=0.5, recorder=vis)
    out = model.generate(
        prompt,
        past_key_values=cache,
        max_new_tokens=new,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
        pad_token_id=0,
    )
    seq = out.sequences
    assert seq.shape[1] == 30 + new
    budgets = [layer.budget for layer in cache.layers]
    # The prompt was pruned: deeper layers computed only their budget's worth of it (+1 decode token).
    assert [layer.peak_length for layer in cache.layers] == [30] + [b + 1 for b in budgets[1:]]
    assert cache.physical_lengths() == budgets
    ref = oracle_logits(model, seq, vis)[:, 29 : 29 + new]
    assert max_logprob_error(torch.stack(out.logits, dim=1).float(), ref, seq[:, 30:]) < TOL


def test_left_padded_batch_generate_matches_the_masking_oracle():
    model, tok = llama4()
    batch = tok(
        ["a short prompt here", "a noticeably longer prompt than the other one, with more tokens"],
        return_tensors="pt",
        padding=True,
    )
    pads, width, new = (batch.attention_mask == 0).sum(1), batch.input_ids.shape[1], 6
    assert pads[0] > 0
    vis = Visibility(2, 2, width + new, offsets=pads)
    cache = make_cache(model, "pyramidinfer", budget=14, decay_ratio=0.5, recorder=vis)
    out = model.generate(
        **batch,
        past_key_values=cache,
        max_new_tokens=new,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
        pad_token_id=tok.pad_token_id,
    )
    assert cache.layers[-1].peak_length < width  # pruned
    mask = torch.cat([batch.attention_mask, torch.ones(2, new, dtype=torch.long)], dim=1)
    ref = oracle_logits(model, out.sequences, vis, position_ids=(mask.cumsum(-1) - 1).clamp_min(0))
    generated = torch.stack(out.logits, dim=1).float()
    err = max_logprob_error(generated, ref[:, width - 1 : width - 1 + new], out.sequences[:, width:])
    assert err < TOL
    for layer in cache.layers:  # sinks are each row's first real tokens, kept everywhere
        for b in range(2):
            assert {0, 1, 2, 3} <= set(layer.positions[b, 0][layer.live()[b, 0]].tolist())


def test_chunked_prefill_prunes_what_each_layer_evicts_and_matches_the_masking_oracle():
    """A chunk on a filled cache: its tokens compete with the cached ones, and those a layer evicts at once are
    not computed by the deeper layers."""
    model, _ = llama4()
    ids = _ids(model, 36, seed=8)
    vis = Visibility(1, 2, 36)
    cache = make_cache(model, "pyramidinfer", budget=12, decay_ratio=0.5, recorder=vis)
    last = []
    with torch.no_grad():
        for start in (0, 10, 20):
            last.append(model(ids[:, start : start + 10], past_key_values=cache, logits_to_keep=1).logits)
        for t in range(30, 36):
            last.append(model(ids[:, t : t + 1], past_key_values=cache).logits)
    assert cache.layers[-1].peak_length < cache.layers[-1].budget + 10  # chunk tokens were pruned
    assert cache.physical_lengths() == [layer.budget for layer in cache.layers]
    ref = oracle_logits(model, ids, vis)
    at = [9, 19, *range(29, 35)]  # the positions whose logits were asked for
    err = max_logprob_error(torch.cat(last[:-1], dim=1).float(), ref[:, at], ids[:, [p + 1 for p in at]])
    assert err < TOL


def test_a_question_admitted_uncompressed_is_not_pruned():
    """generation's query-agnostic protocol raises every budget by the question's length before feeding it:
    no layer then evicts, so every question token reaches every layer."""
    model, _ = llama4()
    cache = make_cache(model, "pyramidinfer", budget=12, decay_ratio=0.5)
    with torch.no_grad():
        model(_ids(model, 30, seed=9), past_key_values=cache, logits_to_keep=1)
        cache.admit(8)
        model(_ids(model, 8, seed=10), past_key_values=cache, logits_to_keep=1)
    for layer in cache.layers:
        assert layer.new_tokens == 8 and set(range(30, 38)) <= set(layer.positions[0, 0].tolist())


def test_a_forward_asking_for_every_logit_is_not_pruned_and_evicts_instead():
    """Chunked perplexity: full-length logits, every layer computes the whole chunk, the budgets still hold, and
    the result is the masking oracle's (eviction)."""
    model, _ = llama4()
    ids = _ids(model, 30, seed=4)
    vis = Visibility(1, 2, 30)
    cache = make_cache(model, "pyramidinfer", budget=12, decay_ratio=0.5, recorder=vis)
    logits = torch.cat([model(ids[:, s : s + 10], past_key_values=cache).logits for s in (0, 10, 20)], dim=1)
    assert logits.shape[1] == 30
    assert [layer.peak_length for layer in cache.layers] == [layer.budget + 10 for layer in cache.layers]
    assert cache.physical_lengths() == [layer.budget for layer in cache.layers]
    assert max_logprob_error(logits[:, :-1].float(), oracle_logits(model, ids, vis)[:, :-1], ids[:, 1:]) < TOL


def test_streaming_evicts_the_hand_ranked_token_from_the_remembered_window():
    """Token by token nothing can be pruned: at the first step over budget (nothing evicted before, so the
    attention is the plain model's) each layer drops the lowest of the hand votes of the last `window` queries."""
    model, _ = llama4()
    ids, budget = _ids(model, 17, seed=5), 16
    cache = make_cache(model, "pyramidinfer", budget=budget, decay_ratio=1.0)  # uniform: every layer at 16
    with torch.no_grad():
        for t in range(17):
            model(ids[:, t : t + 1], past_key_values=cache)
    window = int(0.2 * budget) + 1  # 4
    probs = _masked_probs(model, ids, [torch.ones(17, dtype=torch.bool)] * 4)
    for layer_idx, layer in enumerate(cache.layers):
        votes = _hand_votes(probs[layer_idx], window, 4, distance_weight=1.2)
        expected = sorted(set(range(17)) - {int(votes.argmin())})
        assert sorted(layer.positions[0, 0].tolist()) == expected
        assert layer.peak_length == budget + 1


def test_budgets_hold_through_prefill_and_decoding():
    model, _ = llama4()
    cache = make_cache(model, "pyramidinfer", budget=10, decay_ratio=0.5)
    budgets = [layer.budget for layer in cache.layers]
    assert sum(budgets) <= 4 * 10 and budgets == sorted(budgets, reverse=True)
    with torch.no_grad():
        model(_ids(model, 40, seed=6), past_key_values=cache, logits_to_keep=1)
        assert all(layer.peak_length <= layer.budget for layer in cache.layers[1:])  # computed within budget
        for t in range(8):
            model(_ids(model, 1, seed=t), past_key_values=cache)
            assert cache.physical_lengths() == budgets
    assert cache.get_seq_length() == 48 and all(layer.seen == 48 for layer in cache.layers)
    stats = cache.stats()
    assert stats["tokens_kept_per_layer"] == [float(b) for b in budgets]
    assert stats["method_stats"] == {
        "sink_tokens": 4,
        "recent_window": int(0.2 * budgets[0]) + 1,
        "peak_length_per_layer": [40] + [b + 1 for b in budgets[1:]],  # the prompt's pyramid, + 1 decode step
    }


# -- hooks ------------------------------------------------------------------------------------------------------


def test_hooks_are_installed_once_and_inert_for_other_methods():
    model, _ = llama4()
    ids = _ids(model, 24, seed=7)

    def others():
        model.set_attn_implementation("sdpa")
        plain = model(ids).logits
        snap, _, _ = streamed_logits(model, ids, 6, method="snapkv", budget=10, window_size=4, kernel_size=3)
        generated = model.generate(
            ids,
            past_key_values=make_cache(model, "h2o", budget=10),
            max_new_tokens=4,
            do_sample=False,
            pad_token_id=0,
        )
        return plain, snap, generated

    before = others()
    for _ in range(2):
        cache = make_cache(model, "pyramidinfer", budget=10)
        model.generate(ids, past_key_values=cache, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert cache.layers[-1].peak_length < 24  # the pyramidinfer runs did prune
    assert all(len(layer._forward_pre_hooks) == 1 for layer in model.model.layers)
    assert len(model._forward_pre_hooks) == 1
    after = others()
    for a, b in zip(before, after, strict=True):
        assert torch.equal(a, b)


def test_models_without_rope_position_inputs_are_compressed_by_eviction_only(caplog):
    model, _ = load("tiny_gpt2")
    with caplog.at_level(logging.WARNING, logger="kvexp.methods.pyramidinfer"):
        cache = make_cache(model, "pyramidinfer", budget=8)
    assert "eviction only" in caplog.text
    model.generate(_ids(model, 20), past_key_values=cache, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert [layer.peak_length for layer in cache.layers] == [20, 20]  # nothing pruned
    assert cache.physical_lengths() == [layer.budget for layer in cache.layers]


@pytest.mark.parametrize(
    "params,match",
    [
        ({"recent_ratio": 1.0}, "method.recent_ratio"),
        ({"decay_ratio": 0.0}, "method.decay_ratio"),
        ({"sink_tokens": -1}, "method.sink_tokens"),
        ({"distance_weight": 0.0}, "method.distance_weight"),
    ],
)
def test_bad_parameters_are_rejected(params, match):
    with pytest.raises(ValueError, match=match):
        build_method("pyramidinfer", **params).validate(256)


# -- the real model ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_pruned_generate_matches_the_masking_oracle(smollm2):
    model, tok = smollm2
    text = (
        "The quick brown fox jumps over the lazy dog. Paris is the capital of France, and it is famous for "
    )
    prompt = tok(text * 4, return_tensors="pt").input_ids[:, :64]
    assert prompt.shape[1] == 64
    vis = Visibility(1, model.config.num_key_value_heads, 64 + 4)
    cache = make_cache(model, "pyramidinfer", budget=32, recorder=vis)
    out = model.generate(
        prompt,
        past_key_values=cache,
        max_new_tokens=4,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
        pad_token_id=tok.pad_token_id,
    )
    budgets = [layer.budget for layer in cache.layers]
    assert budgets[0] > budgets[-1]
    assert [layer.peak_length for layer in cache.layers[1:]] == [b + 1 for b in budgets[1:]]
    ref = oracle_logits(model, out.sequences, vis)[:, 63:67]
    assert max_logprob_error(torch.stack(out.logits, dim=1).float(), ref, out.sequences[:, 64:]) < TOL
