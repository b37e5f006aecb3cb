"""The storage axis (KIVI, ZACK, ThinK): hand-computed quantization, SVD and channel scores; exactness at full
precision / full rank / no pruning (against the plain model and the masking oracle, composed with an evictor);
the bytes a cache reports are the bytes of the tensors it holds; eviction moves encoded entries consistently."""

import json

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from kvexp.methods import METHODS, build_method, make_cache
from kvexp.methods.kivi import (
    channel_params,
    codes,
    dequantize,
    dequantize_tokens,
    pack,
    quantize_tokens,
    unpack,
)
from kvexp.methods.think import channel_scores
from kvexp.methods.zack import basis_from_gram, energy_rank
from tests.conftest import load
from tests.oracle import max_logprob_error, oracle_logits, streamed_logits
from tests.test_config import _compose

SNAP = {"name": "snapkv", "window_size": 4, "kernel_size": 3}
FULL = {"name": "full"}
TEXT = "It was the best of times, it was the worst of times, it was the age of wisdom. "


@pytest.fixture
def calibration_file(tmp_path):
    path = tmp_path / "books.jsonl"
    path.write_text("\n".join(json.dumps({"text": TEXT * k}) for k in (3, 4)) + "\n")
    return path


def _zack(calibration_file, **params):
    defaults = {
        "calibration_file": str(calibration_file),
        "calibration_tokens": 200,
        "calibration_cache": None,
    }
    return {**defaults, **params}


# Settings at which each storage is exact: nothing quantized, complete bases, no channel pruned.
def _exact(name, calibration_file):
    return {
        "kivi": {"group_size": 8, "residual_length": 64},
        "zack": _zack(calibration_file, energy=1.0),
        "think": {"pruning_ratio": 0.0, "recent_size": 4, "window_size": 4},
    }[name]


def _ids(model, length, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, model.config.vocab_size, (1, length), generator=g)


def _held_tensor_bytes(layer):
    storage = layer.storage
    slots = sum(t[:, :, : layer.length].nbytes for t in storage.slots.values())
    return slots + sum(t.nbytes for t in storage.others())


@torch.no_grad()
def _layer0_queries_keys(model, ids):
    """Llama layer 0's post-RoPE queries [1, H, T, D] and keys [1, Hkv, T, D], computed from the weights."""
    inner = model.model
    attn = inner.layers[0].self_attn
    hidden = inner.layers[0].input_layernorm(inner.embed_tokens(ids))
    q = attn.q_proj(hidden).view(1, ids.shape[1], -1, attn.head_dim).transpose(1, 2)
    k = attn.k_proj(hidden).view(1, ids.shape[1], -1, attn.head_dim).transpose(1, 2)
    cos, sin = inner.rotary_emb(hidden, torch.arange(ids.shape[1])[None])
    return apply_rotary_pos_emb(q, k, cos, sin)


def _full_layer0(model, ids, chunk=None):
    """Layer 0's K/V in a full cache fed like the compressed one (they do not depend on the compression)."""
    _, _, cache = streamed_logits(model, ids, chunk or ids.shape[1], method="full")
    return cache.layers[0].keys, cache.layers[0].values


# -- KIVI ---------------------------------------------------------------------------------------------------------


def test_kivi_quantization_by_hand():
    # Keys of one head: 4 tokens x 2 channels, groups of 2 tokens per channel, token 2 evicted before quantization.
    x = torch.tensor([[0.0, -1.0], [1.0, 0.5], [2.0, 0.2], [3.0, 2.0]])[None, None]
    group = torch.tensor([0, 0, 1, 1])[None, None]
    valid = torch.tensor([True, True, False, True])[None, None]
    scale, zero = channel_params(x, group, valid, 2, bits=2)
    # group 0: channel 0 in [0, 1] -> s = 1/3; channel 1 in [-1, 0.5] -> s = 0.5; group 1 holds token 3 alone.
    assert torch.allclose(scale[0, 0], torch.tensor([[1 / 3, 0.5], [0.0, 0.0]]))
    assert torch.equal(zero[0, 0], torch.tensor([[0.0, -1.0], [3.0, 2.0]]))
    wide = group[..., None].expand(-1, -1, -1, 2)
    code = codes(x, scale.gather(2, wide), zero.gather(2, wide), 2)
    assert code[0, 0, [0, 1, 3]].tolist() == [[0, 0], [3, 3], [0, 0]]
    # One group over all 4 tokens: channel 1 (x + 1) / 1 = [0, 1.5, 1.2, 3] rounds half to even -> [0, 2, 1, 3].
    scale, zero = channel_params(x, torch.zeros_like(group), torch.ones_like(valid), 1, bits=2)
    assert scale[0, 0].tolist() == [[1.0, 1.0]] and zero[0, 0].tolist() == [[0.0, -1.0]]
    code = codes(x, scale, zero, 2)
    assert code[0, 0].tolist() == [[0, 0], [1, 2], [2, 1], [3, 3]]
    error = (dequantize(code, scale, zero) - x).abs()
    assert error.max() == 0.5 and bool((error <= scale / 2).all())  # 1.5 sits exactly half a step away
    # Values: one token in groups of 2 channels, 4 bits: [0, 1] -> s = 1/15, codes 0 15; [4, 2] -> s = 2/15, z = 2.
    packed, scale, zero = quantize_tokens(torch.tensor([[0.0, 1.0, 4.0, 2.0]]), bits=4, group=2)
    assert torch.allclose(scale, torch.tensor([[1 / 15, 2 / 15]])) and zero.tolist() == [[0.0, 2.0]]
    # Codes 0 15 15 0, two per byte, the first in the low bits.
    assert packed.tolist() == [[0 | 15 << 4, 15 | 0 << 4]]
    assert torch.allclose(dequantize_tokens(packed, scale, zero, 4, 2), torch.tensor([[0.0, 1.0, 4.0, 2.0]]))
    assert pack(torch.tensor([1, 2, 3, 0], dtype=torch.uint8), 2).tolist() == [1 + 2 * 4 + 3 * 16]


@pytest.mark.parametrize("bits", [2, 4])
def test_kivi_round_trip_error_is_within_half_a_step(bits):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 40, 16, generator=g) * torch.linspace(0.1, 5, 16)  # channels of different ranges
    x[:, :, :, 3] = 1.25  # a constant channel: scale 0, exact
    packed, scale, zero = quantize_tokens(x, bits, group=8)
    assert packed.shape == (2, 3, 40, 16 * bits // 8) and packed.dtype == torch.uint8
    steps, zeros = scale.repeat_interleave(8, dim=-1), zero.repeat_interleave(8, dim=-1)
    assert bool(((dequantize_tokens(packed, scale, zero, bits, 8) - x).abs() <= steps / 2 + 1e-6).all())
    assert torch.equal(unpack(pack(codes(x, steps, zeros, bits), bits), bits), codes(x, steps, zeros, bits))
    # Keys: per channel over groups of 8 tokens.
    group = torch.arange(40).div(8, rounding_mode="floor")[None, None].expand(2, 3, -1)
    scale, zero = channel_params(x, group, torch.ones_like(group, dtype=torch.bool), 5, bits)
    wide = group[..., None].expand_as(x)
    s, z = scale.gather(2, wide), zero.gather(2, wide)
    assert bool(((dequantize(codes(x, s, z, bits), s, z) - x).abs() <= s / 2 + 1e-6).all())
    assert bool((dequantize(codes(x, s, z, bits), s, z)[..., 3] == 1.25).all())


def test_kivi_cache_layout_bytes_and_error_bound():
    model, _ = load("tiny_llama")  # 2 layers, 2 KV heads, head dim 16
    ids = _ids(model, 45)
    params = {"evict": FULL, "group_size": 8, "residual_length": 16}
    logits, _, cache = streamed_logits(model, ids, 1, method="kivi", **params)
    assert torch.isfinite(logits).all()
    full_keys, full_values = _full_layer0(model, ids, chunk=1)
    layer, storage = cache.layers[0], cache.layers[0].storage
    # Keys: 16 * floor(45 / 16) = 32 quantized in 4 groups of 8 tokens, 13 in full precision; values: the last 16.
    assert (storage.key_window.start, storage.key_window.end) == (32, 45)
    assert (storage.value_window.start, storage.value_window.end) == (29, 45)
    assert storage.groups.tolist() == [0, 1, 2, 3]
    order = storage.slot(layer, "index")[0, 0].long()  # slot -> token (no eviction: the same for every head)
    keys, values = layer.keys[:, :, order.argsort()], layer.values[:, :, order.argsort()]
    assert torch.equal(keys[:, :, 32:], full_keys[:, :, 32:])
    assert torch.equal(values[:, :, 29:], full_values[:, :, 29:])
    # By hand: a quantized key is within half a step of its group's (max - min) / 3, per channel ...
    groups = full_keys[:, :, :32].unflatten(2, (4, 8))  # [1, Hkv, 4 groups, 8 tokens, D]
    step = ((groups.amax(3) - groups.amin(3)) / 3).repeat_interleave(8, dim=2)
    assert bool(((keys[:, :, :32] - full_keys[:, :, :32]).abs() <= step / 2 + 1e-6).all())
    # ... a value within half a step of its token's 8-channel group.
    channels = full_values[:, :, :29].unflatten(-1, (2, 8))
    step = ((channels.amax(-1) - channels.amin(-1)) / 3).repeat_interleave(8, dim=-1)
    assert bool(((values[:, :, :29] - full_values[:, :, :29]).abs() <= step / 2 + 1e-6).all())
    # Bytes by hand, per layer: per slot and head an int32 index, 16 2-bit key codes and 16 value codes (4 bytes
    # each), 2 value groups' fp32 scale and zero point; plus the windows and the 4 groups' key scales and zeros.
    per_slot = 2 * (4 + 4 + 4 + 2 * 2 * 4)
    windows = (13 + 16) * 2 * 16 * 4
    groups = 4 * 4 + 4 * 2 * 2 * 16 * 4  # int32 group ids; per group, head and channel a scale and a zero
    assert layer.slot_bytes == per_slot
    for each in cache.layers:
        assert each.held_bytes() == 45 * per_slot + windows + groups == _held_tensor_bytes(each)
    stats = cache.stats()
    assert stats["bytes_kept"] == cache.kept_bytes() == 2 * (45 * per_slot + windows + groups)
    assert stats["bytes_full"] == 2 * 45 * 2 * (16 + 16) * 4


def test_kivi_eviction_never_requantizes_and_releases_empty_groups():
    """With SnapKV evicting every step: a kept quantized key decodes to the same bits at every later step (its codes
    move with its slot, its group's scale stays), and the held groups are exactly those with a live quantized key."""
    model, _ = load("tiny_qwen3")
    ids = _ids(model, 60)
    cache = make_cache(model, "kivi", budget=16, evict=SNAP, group_size=4, residual_length=8)
    seen: dict[tuple[int, int, int], torch.Tensor] = {}  # (layer, head, token) -> decoded quantized key
    checked = 0
    with torch.no_grad():
        for t in range(60):
            model(ids[:, t : t + 1], past_key_values=cache)
            for layer in cache.layers:
                storage, keys = layer.storage, layer.keys
                index = storage.slot(layer, "index").long()
                assert layer.length == min(t + 1, 16)
                quantized = layer.live() & (index < storage.key_window.start)
                assert set(storage.groups.tolist()) == set((index[quantized] // 4).tolist())
                for h, slot in quantized[0].nonzero().tolist():
                    key = (layer.layer_idx, h, int(index[0, h, slot]))
                    if key in seen:
                        assert torch.equal(seen[key], keys[0, h, slot])
                        checked += 1
                    seen[key] = keys[0, h, slot].clone()
                assert layer.held_bytes() == _held_tensor_bytes(layer)
    assert checked > 500  # keys survived many evictions and compactions
    assert cache.stats()["method_stats"]["kivi_keys_per_group"] < 4  # eviction thinned the groups


# -- ZACK ----------------------------------------------------------------------------------------------------------


def test_energy_rank_by_hand():
    singular = torch.tensor([3.0, 2.0, 1.0, 0.0])  # squared 9 4 1 0 of 14: 64%, 93%, 100%, 100%
    assert [int(energy_rank(singular, e)) for e in (0.6, 0.9, 0.95, 1.0)] == [1, 2, 3, 4]


def test_svd_basis_truncation_error_is_the_discarded_energy():
    g = torch.Generator().manual_seed(0)
    mix = torch.randn(12, 12, generator=g, dtype=torch.float64)
    x = torch.randn(300, 12, generator=g, dtype=torch.float64) @ mix
    basis, singular = basis_from_gram(x.T @ x)
    assert torch.allclose(singular, torch.linalg.svdvals(x))
    assert torch.allclose(basis.T @ basis, torch.eye(12, dtype=torch.float64), atol=1e-10)
    for r in (1, 5, 11):
        residual = x - x @ basis[:, :r] @ basis[:, :r].T
        assert torch.allclose(residual.pow(2).sum(), singular[r:].pow(2).sum())


@pytest.mark.parametrize("model_name", ["tiny_llama", "tiny_qwen3", "tiny_gpt2"])
def test_zack_full_rank_gives_the_plain_logits(model_name, calibration_file):
    model, _ = load(model_name)
    ids = _ids(model, 30)
    model.set_attn_implementation("sdpa")
    plain = model(ids).logits
    params = _zack(calibration_file, energy=1)
    logits, _, cache = streamed_logits(model, ids, 5, method="zack", evict=FULL, **params)
    assert torch.allclose(logits, plain, atol=1e-4)
    ranks = cache.stats()["method_stats"]["zack_key_rank_per_layer"]
    assert ranks == [cache.layers[0].head_dim] * model.config.num_hidden_layers


def test_zack_bases_stack_group_queries_with_keys_and_truncation_loses_the_discarded_energy(calibration_file):
    model, _ = load("tiny_llama")  # 4 query heads on 2 KV heads: G = 2
    method = build_method("zack", evict=FULL, **_zack(calibration_file, energy=0.8))
    ids = method.calibration_ids(model)
    cache = make_cache(model, method)
    with torch.no_grad():
        model(ids, past_key_values=cache)  # one prefill over the calibration tokens themselves
    cal = method.calibration
    queries, keys = _layer0_queries_keys(model, ids)
    full_keys, full_values = _full_layer0(model, ids)
    assert torch.allclose(keys, full_keys, atol=1e-5)  # the hand computation is the model's
    for h in range(2):  # KV head h serves query heads 2h, 2h + 1
        stack = torch.cat([queries[0, 2 * h], queries[0, 2 * h + 1], keys[0, h]]).double()
        assert torch.allclose(cal.key_singular[0, h].double(), torch.linalg.svdvals(stack), rtol=1e-4)
    # Stored values: rank r_v coefficients; the error is the energy of the discarded singular values (same data).
    rank = int(energy_rank(cal.value_singular[0], 0.8).max())
    assert cache.layers[0].storage.slots["values"].shape[-1] == rank < 16
    error = (cache.layers[0].values - full_values).double().pow(2).sum(dim=(0, 2, 3))
    discarded = cal.value_singular[0, :, rank:].double().pow(2).sum(-1)
    assert torch.allclose(error, discarded, rtol=1e-3)
    key_rank = cache.layers[0].storage.slots["keys"].shape[-1]
    expected = ids.shape[1] * 2 * 4 * (key_rank + rank)  # fp32 coefficients per token and KV head
    assert cache.layers[0].held_bytes() == _held_tensor_bytes(cache.layers[0]) == expected


def test_zack_calibration_is_cached_per_model(calibration_file, tmp_path):
    model, _ = load("tiny_llama")
    first = build_method("zack", **_zack(calibration_file, calibration_cache=str(tmp_path / "c")))
    first.prepare(model)
    files = list((tmp_path / "c" / "zack").glob("*.pt"))
    assert len(files) == 1
    second = build_method("zack", **_zack(calibration_file, calibration_cache=str(tmp_path / "c")))
    second.prepare(model)
    assert torch.equal(first.calibration.key_basis, second.calibration.key_basis)
    other, _ = load("tiny_qwen3")
    second.prepare(other)  # another model: its own calibration
    assert len(list((tmp_path / "c" / "zack").glob("*.pt"))) == 2


# -- ThinK ---------------------------------------------------------------------------------------------------------


def test_think_channel_scores_by_hand():
    g = torch.Generator().manual_seed(0)
    queries = torch.randn(1, 4, 3, 4, generator=g)  # H = 4, Hkv = 2, G = 2, window 3, D = 4
    keys = torch.randn(1, 2, 5, 4, generator=g)
    live = torch.ones(1, 2, 5, dtype=torch.bool)
    live[0, 1, 2] = False  # a dead slot does not count
    scores = channel_scores(queries, keys, live)
    for h in range(2):
        for i in range(4):
            q_energy = sum(float((queries[0, r, :, i] ** 2).mean()) for r in (2 * h, 2 * h + 1)) / 2
            kept = [j for j in range(5) if live[0, h, j]]
            k_energy = sum(float(keys[0, h, j, i] ** 2) for j in kept) / len(kept)
            assert scores[0, h, i].item() == pytest.approx(q_energy * k_energy, rel=1e-5)


def test_think_keeps_the_top_channels_and_attends_over_them_only():
    model, _ = load("tiny_llama")
    ids = _ids(model, 30)
    cache = make_cache(model, "think", evict=FULL, pruning_ratio=0.5, recent_size=8, window_size=4)
    with torch.no_grad():
        model(ids, past_key_values=cache)  # one prefill: channels from its last 4 queries and its 30 keys
    layer, storage = cache.layers[0], cache.layers[0].storage
    queries, keys = _layer0_queries_keys(model, ids)
    scores = channel_scores(queries[:, :, -4:], keys, torch.ones(1, 2, 30, dtype=torch.bool))
    assert torch.equal(storage.channels, scores.topk(8).indices.sort(-1).values)
    assert storage.slots["keys"].shape[-1] == 8 and storage.window.start == 22
    kept = torch.zeros_like(keys).scatter_(3, storage.channels[:, :, None].expand(-1, -1, 30, -1), 1.0)
    zeroed = kept * keys
    assert torch.allclose(layer.keys[:, :, :22], zeroed[:, :, :22], atol=1e-6)  # old keys: kept channels only
    assert torch.allclose(layer.keys[:, :, 22:], keys[:, :, 22:], atol=1e-6)  # the recent 8 in full
    # q . k over the stored keys = q restricted to the kept channels . the kept channels of k.
    q = queries[0, ::2, -1]  # one query per KV head, [Hkv, D]
    stored = storage.slot(layer, "keys")[0, :, :22]  # [Hkv, 22, 8]
    logits = torch.einsum("hd,hnd->hn", q, layer.keys[0, :, :22])
    kept_logits = torch.einsum("hc,hnc->hn", q.gather(1, storage.channels[0]), stored)
    assert torch.allclose(logits, kept_logits, atol=1e-5)
    # Per slot and head: int32 index, 8 fp32 key channels, 16 fp32 value channels; 8 full recent keys; channels.
    expected = 30 * 2 * (4 + 8 * 4 + 16 * 4) + 8 * 2 * 16 * 4 + 2 * 8 * 8
    assert layer.held_bytes() == _held_tensor_bytes(layer) == expected


# -- every storage method -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["kivi", "zack", "think"])
@pytest.mark.parametrize("mode", ["token", "chunk", "per_head"])
def test_exact_storage_with_an_evictor_matches_the_masking_oracle(name, mode, calibration_file):
    """Lossless settings: what remains is the engine's plumbing (windows, index, compaction, dead slots), which must
    reproduce the evictor's masking oracle exactly."""
    model, _ = load("tiny_qwen3")
    ids = _ids(model, 40)
    params = {"method": name, "evict": SNAP, **_exact(name, calibration_file)}
    if mode == "per_head":
        params["head_budgets"] = [[7, 12], [12, 9]]
    else:
        params["budget"] = 12
    logits, vis, cache = streamed_logits(model, ids, {"token": 1, "chunk": 7, "per_head": 2}[mode], **params)
    reference = oracle_logits(model, ids, vis)
    assert max_logprob_error(logits[:, :-1], reference[:, :-1], ids[:, 1:]) < 1e-4
    assert cache.physical_lengths() == [12, 12]


@pytest.mark.parametrize("name", ["kivi", "zack", "think"])
@pytest.mark.parametrize("chunk", [1, 5])
def test_storage_with_an_evictor_keeps_the_budget_and_the_bytes_it_holds(name, chunk, calibration_file):
    model, _ = load("tiny_llama")
    ids = _ids(model, 50)
    params = {
        "kivi": {"group_size": 8, "residual_length": 8},
        "zack": _zack(calibration_file, energy=0.9),
        "think": {"recent_size": 4, "window_size": 4, "pruning_ratio": 0.5},
    }[name]
    cache = make_cache(model, name, budget=16, evict=SNAP, **params)
    with torch.no_grad():
        for start in range(0, 50, chunk):
            logits = model(ids[:, start : start + chunk], past_key_values=cache).logits
            assert torch.isfinite(logits).all()
            assert cache.physical_lengths() == [min(start + chunk, 16)] * 2
            assert cache.kept_bytes() == sum(_held_tensor_bytes(layer) for layer in cache.layers)
    assert all(layer.peak_length <= 16 + chunk for layer in cache.layers)
    stats = cache.stats()
    assert stats["tokens_kept"] == 16
    assert stats["bytes_kept"] < 16 * sum(layer.dense_slot_bytes for layer in cache.layers)


@pytest.mark.parametrize("name", ["kivi", "zack", "think"])
def test_exact_storage_follows_beam_search(name, calibration_file):
    model, _ = load("tiny_llama")
    prompt = _ids(model, 12, seed=3)
    kwargs = {"max_new_tokens": 6, "num_beams": 2, "do_sample": False, "pad_token_id": 0}
    expected = model.generate(prompt, past_key_values=make_cache(model, "full"), **kwargs)
    cache = make_cache(model, name, evict=FULL, **_exact(name, calibration_file))
    assert torch.equal(model.generate(prompt, past_key_values=cache, **kwargs), expected)


def test_storage_methods_reject_what_they_cannot_hold(calibration_file):
    model, _ = load("tiny_llama")
    merging = next(name for name, cls in sorted(METHODS.items()) if cls.merges)
    with pytest.raises(ValueError, match="merges entries"):
        build_method("kivi", evict={"name": merging})
    with pytest.raises(ValueError, match="storage method"):
        build_method("think", evict={"name": "kivi"})
    with pytest.raises(ValueError, match="method.evict: unknown method"):
        build_method("kivi", evict={"name": "nope"})
    with pytest.raises(ValueError, match="rerotate"):
        make_cache(model, "kivi", budget=8, evict={"name": "streaming_llm"}, positions="rerotate")
    with pytest.raises(ValueError, match="k_bits"):
        make_cache(model, "kivi", k_bits=3)
    with pytest.raises(ValueError, match="multiple of method.group_size"):
        make_cache(model, "kivi", group_size=8, residual_length=12)
    with pytest.raises(ValueError, match="divide the head dim"):
        make_cache(model, "kivi", group_size=32, residual_length=32)  # head dim 16
    with pytest.raises(ValueError, match="method.evict: method.window_size"):
        make_cache(model, "kivi", budget=32, group_size=8)  # SnapKV's default window needs a larger budget
    with pytest.raises(ValueError, match="energy"):
        make_cache(model, "zack", **_zack(calibration_file, energy=0.0))
    # RazorAttention's compensation token is a merge written into the step's decoded copy: caught at the step.
    razor = {"name": "razor_attention", "induction_ratio": 0.0, "echo_ratio": 0.0}
    cache = make_cache(model, "think", budget=8, evict=razor)
    with pytest.raises(RuntimeError, match="merged entries"):
        model(_ids(model, 20), past_key_values=cache)


@pytest.mark.parametrize("name", ["kivi", "zack", "think"])
def test_storage_methods_need_no_budget_and_validate_with_one(name):
    from kvexp.config import validate

    validate(_compose(f"method={name}", "budget=full"))
    validate(_compose(f"method={name}", "budget=256"))
    with pytest.raises(ValueError, match="method.evict"):
        validate(_compose(f"method={name}", "budget=32"))  # SnapKV's window of 32 needs more than 32


@pytest.mark.slow
def test_zack_calibration_of_smollm2_truncates_its_heads(smollm2):
    model, _ = smollm2
    method = build_method("zack", energy=0.95, calibration_cache=None)
    method.prepare(model)  # one 2048-token forward over local Gutenberg text
    key_rank, value_rank = method.ranks()
    assert key_rank.shape == value_rank.shape == (30,)
    # 95% of the energy: SmolLM2's post-RoPE keys and values are far from isotropic in their 64 dims.
    assert bool((key_rank < 64).all()) and bool((value_rank < 64).all())
    assert float(key_rank.float().mean()) < 56
