"""The compiled decode step (`engine.compile`): the masking oracle holds, tokens equal the eager path's, the graph
is reused from step to step, and methods it cannot capture decode eagerly, saying so once."""

import logging

import pytest
import torch
from torch._dynamo.utils import counters

from kvexp.engine import attention
from kvexp.methods import make_cache
from tests.conftest import load
from tests.test_engine import SMALL_PARAMS, TOL, _check_oracle, _ids

CAPTURED = ["streaming_llm", "knorm", "h2o", "tova", "snapkv"]


@pytest.mark.parametrize("method", CAPTURED)
def test_compiled_step_matches_the_masking_oracle(method):
    model, _ = load("tiny_llama")
    ids = _ids(model, 40)
    cache = _check_oracle(
        model, ids, 1, method=method, budget=12, compile=True, **SMALL_PARAMS.get(method, {})
    )
    layers = model.config.num_hidden_layers
    # Every token after the 12th takes each layer one over its budget: each such step ran compiled.
    assert cache.stats()["fused_steps"] == (40 - 12) * layers
    assert cache.stats()["compressions"] == 0  # none ran eagerly (and untimed ones are not counted as timed)
    assert cache.physical_lengths() == [12] * layers


def test_compiled_step_after_a_chunked_prefill_with_rerotation_equals_the_eager_step():
    model, _ = load("tiny_qwen3")
    ids = _ids(model, 40)
    # The prefill compresses eagerly, the token-by-token tail compiled; kept keys re-rotated at every step.
    compiled = make_cache(model, "streaming_llm", 10, compile=True, positions="rerotate", sink_tokens=2)
    eager = make_cache(model, "streaming_llm", 10, positions="rerotate", sink_tokens=2)
    with torch.no_grad():
        for cache in (compiled, eager):
            model(ids[:, :24], past_key_values=cache)
        for t in range(24, 40):
            a = model(ids[:, t : t + 1], past_key_values=compiled).logits
            b = model(ids[:, t : t + 1], past_key_values=eager).logits
            assert torch.allclose(a, b, atol=TOL, rtol=0)
    layers = model.config.num_hidden_layers
    assert compiled.stats()["fused_steps"] == 16 * layers
    assert compiled.stats()["compressions"] == layers  # the prefill's, eager
    for a, b in zip(compiled.layers, eager.layers, strict=True):
        assert torch.equal(a.positions, b.positions)
        assert torch.allclose(a.keys, b.keys, atol=1e-5)


@pytest.mark.parametrize("method", ["h2o", "snapkv"])
@torch.no_grad()
def test_compiled_generation_gives_the_eager_tokens_without_recompiling_per_step(method):
    model, _ = load("tiny_llama")
    prompt = _ids(model, 16, seed=3).repeat(2, 1)  # batch 2
    prompt[1, :4] = 7  # rows differ
    outputs = {}
    for compiled in (False, True):
        cache = make_cache(model, method, 10, compile=compiled, **SMALL_PARAMS.get(method, {}))
        graphs = counters["stats"]["unique_graphs"]
        outputs[compiled] = model.generate(
            prompt, past_key_values=cache, max_new_tokens=24, do_sample=False, pad_token_id=0
        )
        if compiled:
            # At most two graphs for 24 steps x 2 layers (none if an earlier test compiled this layout): nothing in
            # the traced code changes from step to step, but SnapKV's first window is a slice of the prompt's
            # queries (another stride) before it becomes the remembered window's.
            assert counters["stats"]["unique_graphs"] - graphs <= (2 if method == "snapkv" else 1)
            assert (
                cache.stats()["fused_steps"] == 23 * model.config.num_hidden_layers
            )  # every step but the prompt
    assert torch.equal(outputs[False], outputs[True])


@torch.no_grad()
def test_smollm2_compiled_decoding_gives_the_eager_tokens(smollm2):
    model, tokenizer = smollm2
    prompt = tokenizer("The history of the printing press begins", return_tensors="pt").input_ids
    outputs = []
    for compiled in (False, True):
        cache = make_cache(model, "h2o", 8, compile=compiled)
        outputs.append(model.generate(prompt, past_key_values=cache, max_new_tokens=16, do_sample=False))
    assert cache.stats()["fused_steps"] > 0
    assert torch.equal(outputs[0], outputs[1])


def test_methods_the_step_cannot_hold_decode_eagerly_and_say_so_once(caplog):
    model, _ = load("tiny_llama")
    ids = _ids(model, 24)
    attention._UNCAPTURED.pop("adakv", None)
    cases = {
        "adakv": {**SMALL_PARAMS["adakv"]},  # per-head counts decided from the scores: data-dependent shapes
        "kivi": {"group_size": 8, "residual_length": 8, "evict": {"name": "h2o"}},  # stores encoded entries
        "d2o": {**SMALL_PARAMS["d2o"]},  # merges evicted entries
    }
    for method, params in cases.items():
        for _ in range(2):  # the second cache says nothing more
            with caplog.at_level(logging.WARNING):
                compiled = make_cache(model, method, 12, compile=True, **params)
                eager = make_cache(model, method, 12, **params)
                with torch.no_grad():
                    a = [model(ids[:, t : t + 1], past_key_values=compiled).logits for t in range(24)]
                    b = [model(ids[:, t : t + 1], past_key_values=eager).logits for t in range(24)]
            assert torch.equal(torch.cat(a), torch.cat(b))
            assert compiled.stats()["fused_steps"] == 0
        said = [r.getMessage() for r in caplog.records if f"method={method}" in r.getMessage()]
        assert len(said) == 1 and "eagerly" in said[0], said


def test_compile_refuses_the_training_mode_and_unknown_modes():
    model, _ = load("tiny_llama")
    with pytest.raises(ValueError, match="inference path"):
        make_cache(model, "h2o", 12, compile=True, differentiable=True)
    with pytest.raises(ValueError, match="compile_mode must be one of"):
        make_cache(model, "h2o", 12, compile=True, compile_mode="fast")


@pytest.mark.parametrize("method", ["h2o", "tova", "d2o"])
@torch.no_grad()
def test_a_decode_steps_shared_attention_row_equals_the_recomputed_one(method, monkeypatch):
    """Methods that read the newest token's attention row get it from the engine's explicit attention; the
    statistics, the kept slots and the logits equal those of the method recomputing the row itself."""
    model, _ = load("tiny_llama")
    ids = _ids(model, 36)
    params = SMALL_PARAMS.get(method, {})
    shared = make_cache(model, method, 12, **params)
    logits = [model(ids[:, t : t + 1], past_key_values=shared).logits for t in range(36)]
    assert all(layer.step_attention is None for layer in shared.layers)  # dropped after each step
    monkeypatch.setattr(type(shared.layers[0]), "shares_attention_row", lambda self, mask: False)
    own = make_cache(model, method, 12, **params)
    reference = [model(ids[:, t : t + 1], past_key_values=own).logits for t in range(36)]
    assert torch.allclose(torch.cat(logits), torch.cat(reference), atol=1e-5, rtol=0)
    for a, b in zip(shared.layers, own.layers, strict=True):
        assert torch.equal(a.positions, b.positions)  # the same entries kept, in the same slots
        for name in a.state_names():
            assert torch.allclose(a.state(name), b.state(name), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("method", ["h2o", "tova", "streaming_llm"])
@pytest.mark.parametrize("compiled", [False, True])
@torch.no_grad()
def test_a_left_padded_batch_row_keeps_and_generates_what_the_row_alone_does(method, compiled):
    """Recent windows count each row's own tokens (the newest position a head holds), padding slots are dead and
    evicted first: every row of a left-padded batch generates the tokens it generates alone."""
    model, tok = load("tiny_llama")
    texts = ["a short prompt", "a noticeably longer prompt than the other one, with more words"]
    batch = tok(texts, return_tensors="pt", padding=True)
    assert (batch.attention_mask == 0).any() and tok.padding_side == "left"
    params = {"sink_tokens": 2} if method == "streaming_llm" else {}
    cache = make_cache(model, method, 10, compile=compiled, **params)
    together = model.generate(**batch, past_key_values=cache, max_new_tokens=12, do_sample=False,
                              pad_token_id=tok.pad_token_id)[:, batch.input_ids.shape[1] :]  # fmt: skip
    for row, text in enumerate(texts):
        alone = tok(text, return_tensors="pt")
        single = make_cache(model, method, 10, compile=compiled, **params)
        out = model.generate(**alone, past_key_values=single, max_new_tokens=12, do_sample=False,
                             pad_token_id=tok.pad_token_id)[:, alone.input_ids.shape[1] :]  # fmt: skip
        assert torch.equal(out[0], together[row])


@torch.no_grad()
def test_prompts_of_different_lengths_share_the_compiled_step():
    """The buffers are resized to the step's budget + 1 slots before the compiled step, so a prompt's length (which
    leaves its own capacity) does not make a new layout, nor a new compilation."""
    model, _ = load("tiny_llama")
    layouts = []
    for length in (14, 23):
        cache = make_cache(model, "knorm", 10, compile=True)
        ids = _ids(model, length + 3, seed=length)
        model(ids[:, :length], past_key_values=cache)
        for t in range(length, length + 3):
            model(ids[:, t : t + 1], past_key_values=cache)
        assert [layer.capacity for layer in cache.layers] == [11] * model.config.num_hidden_layers
        layouts.append(len(attention._COMPILED))
    assert layouts[1] == layouts[0]
