"""The engine's proof: masking-oracle equivalence, budget invariants and the exact bias cases."""

import math

import pytest
import torch

from kvexp.engine import sliding_layers
from kvexp.engine.cache import CompressedLayer, rotate_keys
from kvexp.methods import METHODS as REGISTRY
from kvexp.methods import make_cache
from tests.conftest import load
from tests.oracle import Visibility, max_logprob_error, oracle_logits, streamed_logits

TOL = 1e-4
# Every registered method that compresses is proven here; small-model hyperparameters where defaults exceed
# the test budgets.
# Merging methods change kept entries, so masking cannot reproduce them: their own tests check the merge math,
# and the invariants below (budget, budget >= length) cover them too.
# A probing method (KVzip) compresses only once its probes ran after the prompt: tests/test_kvzip.py holds it to
# the oracle with them.
COMPRESSING = sorted(
    name for name, cls in REGISTRY.items() if cls.compresses and not cls.merges and not cls.probes
)
MERGING = sorted(name for name, cls in REGISTRY.items() if cls.merges)
SMALL_PARAMS = {
    "adakv": {"floor_alpha": 1.0, "scorer_params": {"window_size": 4, "kernel_size": 3}},  # uniform heads
    "pyramidkv": {"window_size": 4, "kernel_size": 3, "beta": 1},  # flat pyramid: lengths = the budgets
    "snapkv": {"window_size": 4, "kernel_size": 3},
    "kvcompose": {"layer_allocation": False},  # the budgets as given (allocation: tests/test_kvcompose.py)
    "prefill_decoding": {"prefill": {"name": "snapkv", "window_size": 4, "kernel_size": 3}},
    "fix_size_l2": {"recent_ratio": 0.25, "skip_layers": []},
    "snapkv_lite": {"window_size": 4, "kernel_size": 3},
    "pyramid_kv_decay": {"layer_decay": 1.0, "min_size": 1},
    # No retrieval head (one would keep its layer whole) and eviction, not the merge (masking does not apply to
    # a merge: tests/test_head_methods.py checks the compensation token exactly).
    "razor_attention": {"induction_ratio": 0.0, "echo_ratio": 0.0, "compensation": False},
    "dynamickv": {"window_size": 4, "kernel_size": 3, "ratio_max": 1},  # ratio_max 1: lengths = the budgets
    "uncomp": {"window_size": 4, "kernel_size": 3, "group_weights": [1.0]},  # one group: uniform heads
    "adaptive_kmeans": {"pruning_interval": 1},  # compress every step: lengths equal the budgets
    # The paper's skip_layers (0, 1, last) would leave a two-layer model uncompressed; no layer reallocation.
    "d2o": {"skip_layers": [], "layer_allocation": False},
    "kvmerger": {"skip_layers": []},
    "compactor": {"sink_size_start": 2, "sink_size_end": 2, "chunk_length": 8},  # sinks 8 + 4 fill budget 12
    "lagkv": {"n_sink": 2, "lag_size": 3},  # the budgets (>= 8) hold the sinks and two chunks
    "criticalkv": {"scorer_params": {"window_size": 4, "kernel_size": 3}},
    # floor_alpha 1: uniform heads, lengths = the budgets
    "criticaladakv": {"floor_alpha": 1.0, "scorer_params": {"window_size": 4, "kernel_size": 3}},
    # chunks of one token fill the budget (longer ones leave a remainder: tests/test_selection_methods.py)
    "chunkkv": {"chunk_length": 1, "reuse_layers": 2, "scorer_params": {"window_size": 4, "kernel_size": 1}},
    # threshold -inf: a top-k at the budget (real thresholds: tests/test_selection_methods.py)
    "dms": {"threshold": -math.inf, "window_size": 2, "scorer_params": {"window_size": 4, "kernel_size": 3}},
    "chunk": {"chunk_length": 8, "scorer_params": {"window_size": 4, "kernel_size": 3}},  # 5 chunks of 40
    "block": {"scorer_params": {"window_size": 4, "kernel_size": 3}},
    "compose": {"methods": [{"name": "snapkv", "window_size": 4, "kernel_size": 3}, {"name": "knorm"}]},
    # every 5th decoding step to int(0.3 x seen): token mode ends at 40 x 0.3 = the budget 12
    "compression_ratio_decoding": {"compression_interval": 5, "compression_ratio": 0.7},
    "duo_attention": {"sparsity": 1.0},  # all heads stream (retrieval: tests/test_structural_methods.py)
    "simlayerkv": {"lazy_threshold": 0.0},  # all layers lazy (full ones: tests/test_structural_methods.py)
    "lukv": {"head_cap": 1.0, "scorer": "snapkv", "scorer_params": {"window_size": 4, "kernel_size": 3}},
    "restorekv": {
        "checkpoint": "init"
    },  # the seeded untrained adapter (null: the authors', from the offline hub)
    "kvzap": {"checkpoint": "random"},  # seeded untrained surrogate (trained: tests/test_surrogates.py)
    "fastkvzip": {"checkpoint": "random"},  # as kvzap (tiny models have no published gates)
}
GQA_MODELS = ["tiny_llama", "tiny_qwen3"]


def _ids(model, length, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, model.config.vocab_size, (1, length), generator=g, device="cpu").to(model.device)


def _kv_heads(model):
    return getattr(model.config, "num_key_value_heads", None) or model.config.num_attention_heads


def _check_oracle(model, ids, chunk, **cache_kwargs):
    logits, vis, cache = streamed_logits(model, ids, chunk, **cache_kwargs)
    ref = oracle_logits(model, ids, vis)
    targets = ids[:, 1:]
    assert max_logprob_error(logits[:, :-1], ref[:, :-1], targets) < TOL
    return cache


@pytest.mark.parametrize("method", COMPRESSING)
@pytest.mark.parametrize("mode", ["token", "chunk", "per_layer", "per_head"])
@pytest.mark.parametrize("model_name", GQA_MODELS)
def test_masking_oracle(model_name, method, mode):
    _masking_oracle(load(model_name)[0], method, mode)


@pytest.mark.parametrize("method", COMPRESSING)
@pytest.mark.parametrize("mode", ["token", "chunk"])
def test_masking_oracle_every_architecture(tiny, method, mode):
    _masking_oracle(tiny[0], method, mode)


def _masking_oracle(model, method, mode):
    kw = SMALL_PARAMS.get(method, {})
    ids = _ids(model, 40)
    n_layers, heads = model.config.num_hidden_layers, _kv_heads(model)
    # Gemma-3's local layers are never compressed: they hold the model's own window (its last window - 1 tokens).
    local = sliding_layers(model)
    window = getattr(model.config, "sliding_window", None)

    def lengths(expected):
        return [window - 1 if slides else n for n, slides in zip(expected, local, strict=True)]

    if mode == "token":
        cache = _check_oracle(model, ids, 1, method=method, budget=12, **kw)
        assert cache.physical_lengths() == lengths([12] * n_layers)
    elif mode == "chunk":
        cache = _check_oracle(model, ids, 7, method=method, budget=12, **kw)
        assert all(layer.peak_length <= 12 + 7 for layer in cache.layers)
        assert cache.physical_lengths() == lengths([12] * n_layers)
    elif mode == "per_layer":
        budgets = [9 + 5 * i for i in range(n_layers)]
        cache = _check_oracle(model, ids, 3, method=method, budget=budgets, **kw)
        assert cache.physical_lengths() == lengths(budgets)
    else:
        head_budgets = [[6 + (3 * h + 5 * i) % 9 for h in range(heads)] for i in range(n_layers)]
        cache = _check_oracle(model, ids, 2, method=method, head_budgets=head_budgets, **kw)
        # Real saving: each layer is as long as its longest head; shorter heads hold dead padding.
        assert cache.physical_lengths() == lengths([max(h) for h in head_budgets])
        kept = cache.stats()["tokens_kept_per_head"]
        expected = [[float(b) for b in hb] for hb in head_budgets]
        assert kept == [
            [float(window - 1)] * heads if slides else e for e, slides in zip(expected, local, strict=True)
        ]


def test_knorm_prune_after_mode_matches_oracle():
    model, _ = load("tiny_llama")
    ids = _ids(model, 60)
    cache = _check_oracle(model, ids, 1, method="knorm", keep_ratio=0.5, prune_after=20, skip_layers=[0])
    assert cache.layers[0].budget is None and cache.layers[0].length == 60  # skipped layer keeps everything
    assert 10 <= cache.layers[1].length <= 20  # sawtooth between keep_ratio * prune_after and prune_after


@pytest.mark.parametrize("method", COMPRESSING)
def test_generate_matches_oracle(tiny, method):
    model, _ = tiny
    prompt = _ids(model, 20, seed=1)
    vis = Visibility(1, _kv_heads(model), 20 + 12)
    cache = make_cache(model, method, budget=10, recorder=vis, **SMALL_PARAMS.get(method, {}))
    out = model.generate(
        prompt,
        past_key_values=cache,
        max_new_tokens=12,
        min_new_tokens=12,  # a random model may draw its end token; the raw logits (output_logits) stay unmasked
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
        pad_token_id=0,
    )
    seq = out.sequences
    assert seq.shape[1] == 32
    generated = torch.stack(out.logits, dim=1).float()  # logits for positions 19 .. 30
    ref = oracle_logits(model, seq, vis)[:, 19:31]
    assert max_logprob_error(generated, ref, seq[:, 20:32]) < TOL


@pytest.mark.parametrize("model_name", ["tiny_llama", "tiny_gemma3"])
def test_generate_left_padded_batch_matches_oracle(model_name):
    model, tok = load(model_name)
    batch = tok(
        ["a short prompt", "a noticeably longer prompt than the other one"], return_tensors="pt", padding=True
    )
    pads = (batch.attention_mask == 0).sum(1)
    assert pads[0] > 0 and tok.padding_side == "left"
    length = batch.input_ids.shape[1] + 8
    vis = Visibility(2, _kv_heads(model), length, offsets=pads)
    cache = make_cache(model, "streaming_llm", budget=12, sink_tokens=2, recorder=vis)
    out = model.generate(
        **batch,
        past_key_values=cache,
        max_new_tokens=8,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
        pad_token_id=tok.pad_token_id,
    )
    mask = torch.cat([batch.attention_mask, torch.ones(2, 8, dtype=torch.long)], dim=1)
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    ref = oracle_logits(model, out.sequences, vis, position_ids=positions)
    start = batch.input_ids.shape[1] - 1
    generated = torch.stack(out.logits, dim=1).float()
    err = max_logprob_error(generated, ref[:, start : start + 8], out.sequences[:, start + 1 :])
    assert err < TOL
    # The sinks are the first real tokens of each row, not the padding (in the first layer with a budget: Gemma-3's
    # first layer is a local one, which keeps its window).
    compressed = next(layer for layer in cache.layers if layer.budget is not None)
    for b in range(2):
        kept = set(compressed.positions[b, 0].tolist())
        assert {0, 1} <= kept and -1 not in kept


def _tiny_mistral_with_window(window: int):
    from omegaconf import OmegaConf

    from kvexp.models import load_model
    from tests.conftest import ROOT

    cfg = OmegaConf.load(ROOT / "conf" / "model" / "tiny_mistral.yaml")
    cfg.tiny.sliding_window = window
    return load_model(cfg, OmegaConf.load(ROOT / "conf" / "hardware" / "cpu.yaml"))[0]


@pytest.mark.parametrize("chunk", [40, 7, 1])
@pytest.mark.parametrize("model_name", ["tiny_gemma3", "tiny_phi3", "mistral_window_6"])
def test_an_uncompressed_cache_gives_the_models_own_logits(model_name, chunk):
    """kvexp's attention and cache against the model's own (sdpa, its own masks): Phi-3's fused projections,
    Gemma-3's local layers (window 8) around a global one, a Mistral whose every layer slides (window 6). A local
    layer holds the model's own window - 1 newest tokens, which is also what the full cache counts, so nothing is
    reported compressed."""
    model = _tiny_mistral_with_window(6) if model_name == "mistral_window_6" else load(model_name)[0]
    ids = _ids(model, 40)
    model.set_attn_implementation("sdpa")
    with torch.no_grad():
        reference = model(ids).logits.float()
    cache = make_cache(model, "full")
    with torch.no_grad():
        logits = torch.cat(
            [model(ids[:, s : s + chunk], past_key_values=cache).logits.float() for s in range(0, 40, chunk)],
            1,
        )
    assert (logits - reference).abs().max() < 1e-5
    window = getattr(model.config, "sliding_window", None)
    slides = [t == "sliding_attention" for t in (getattr(model.config, "layer_types", None) or [])]
    if model_name == "mistral_window_6":
        slides = [True] * model.config.num_hidden_layers
    held = [window - 1 if s else 40 for s in slides] if any(slides) else [40] * model.config.num_hidden_layers
    assert cache.physical_lengths() == held
    stats = cache.stats()
    assert stats["tokens_full"] == sum(held) / len(held) and stats["compression_ratio"] == 0.0
    assert stats["bytes_full"] == stats["bytes_kept"]


def test_gemma3_budget_compresses_the_global_layers_only():
    model, _ = load("tiny_gemma3")
    assert sliding_layers(model) == [True, False, True]
    ids = _ids(model, 40)
    cache = _check_oracle(model, ids, 5, method="snapkv", budget=12, window_size=4, kernel_size=3)
    assert [layer.budget for layer in cache.layers] == [None, 12, None]
    assert cache.physical_lengths() == [7, 12, 7]
    stats = cache.stats()
    # 1 - kept / what the model's own cache holds (7 + 40 + 7), not / the tokens seen.
    assert stats["tokens_full"] == 54 / 3 and stats["tokens_kept"] == 26 / 3
    assert stats["compression_ratio"] == pytest.approx(1 - 26 / 54)
    assert stats["bytes_full"] == 54 * cache.layers[1].dense_slot_bytes


def test_a_model_with_soft_capped_attention_is_refused():
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "gemma2",
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        intermediate_size=64,
        pad_token_id=0,
    )
    assert config.attn_logit_softcapping is not None
    with pytest.raises(ValueError, match="attn_logit_softcapping"):
        make_cache(AutoModelForCausalLM.from_config(config), "snapkv", budget=12)


def test_budget_at_least_sequence_reproduces_plain_model(tiny):
    model, _ = tiny
    ids = _ids(model, 30)
    model.set_attn_implementation("sdpa")
    plain = model(ids).logits
    for method in ["full", *COMPRESSING, *MERGING]:
        logits, _, cache = streamed_logits(
            model, ids, 4, method=method, budget=30, **SMALL_PARAMS.get(method, {})
        )
        assert torch.allclose(logits, plain, atol=1e-5), method
        stats = (
            cache.stats()
        )  # all of it kept: 30 tokens, or the model's own window in Gemma-3's local layers
        assert stats["tokens_kept"] == stats["tokens_full"] and stats["compression_ratio"] == 0.0
        assert stats["tokens_full"] == (30 if not any(sliding_layers(model)) else (7 + 30 + 7) / 3)


@pytest.mark.parametrize("method", MERGING)
@pytest.mark.parametrize("chunk", [1, 7])
def test_merging_methods_stay_within_budget(method, chunk):
    """A merge rewrites kept entries but never keeps more of them: budget + the step's tokens at most."""
    model, _ = load("tiny_llama")
    ids = _ids(model, 40)
    logits, _, cache = streamed_logits(
        model, ids, chunk, method=method, budget=12, **SMALL_PARAMS.get(method, {})
    )
    assert torch.isfinite(logits).all()
    assert cache.physical_lengths() == [12] * model.config.num_hidden_layers
    assert all(layer.peak_length <= 12 + chunk for layer in cache.layers)


def test_knorm_keeps_exactly_the_lowest_norm_keys():
    model, _ = load("tiny_llama")
    ids = _ids(model, 32)
    full = make_cache(model, "full")
    model(ids, past_key_values=full)
    cache = make_cache(model, "knorm", budget=10)
    model(ids, past_key_values=cache)  # one prefill step, one compression
    for full_layer, layer in zip(full.layers, cache.layers, strict=True):
        norms = full_layer.keys.norm(dim=-1)  # [1, Hkv, 32] hand computation from the uncompressed keys
        expected = norms.argsort(dim=-1)[..., :10].sort(dim=-1).values
        assert torch.equal(layer.positions.sort(dim=-1).values, expected)


def test_streaming_llm_keeps_sinks_and_recent_window():
    model, _ = load("tiny_qwen3")
    ids = _ids(model, 50)
    cache = make_cache(model, "streaming_llm", budget=16, sink_tokens=4)
    for t in range(50):
        model(ids[:, t : t + 1], past_key_values=cache)
        for layer in cache.layers:
            assert layer.length <= 16
    expected = list(range(4)) + list(range(50 - 12, 50))
    for layer in cache.layers:
        for h in range(layer.kv_heads):
            assert sorted(layer.positions[0, h].tolist()) == expected


def _prefilled(model, ids, method="full"):
    cache = make_cache(model, method)
    model(ids, past_key_values=cache)
    return cache


def test_minus_inf_bias_equals_removing_the_entry():
    model, _ = load("tiny_llama")
    ids, nxt = _ids(model, 20), _ids(model, 1, seed=5)
    masked, removed = _prefilled(model, ids), _prefilled(model, ids)
    for a, b in zip(masked.layers, removed.layers, strict=True):
        a._bias[:, :, 7] = float("-inf")
        a.has_bias = True
        kept = torch.ones(1, b.kv_heads, 20, dtype=torch.bool)
        kept[:, :, 7] = False
        b._compact(kept, 19)
    la = model(nxt, past_key_values=masked).logits
    lb = model(nxt, past_key_values=removed).logits
    assert torch.allclose(la, lb, atol=1e-5)


def test_ln2_bias_equals_the_key_stored_twice():
    model, _ = load("tiny_llama")
    ids, nxt = _ids(model, 20), _ids(model, 1, seed=5)
    biased, doubled = _prefilled(model, ids), _prefilled(model, ids)
    for a, b in zip(biased.layers, doubled.layers, strict=True):
        a._bias[:, :, 7] = math.log(2.0)
        a.has_bias = True
        b._resize(b.length + 2)
        for buf in b._buffers():
            buf[:, :, b.length] = buf[:, :, 7]
        b.length += 1
        b._refresh_views()
    la = model(nxt, past_key_values=biased).logits
    lb = model(nxt, past_key_values=doubled).logits
    assert not torch.allclose(la, model(nxt, past_key_values=_prefilled(model, ids)).logits, atol=1e-4)
    assert torch.allclose(la, lb, atol=1e-5)


def test_rerotation_equals_rotating_at_the_new_position():
    model, _ = load("tiny_llama")
    rotary = model.model.rotary_emb
    raw = torch.randn(1, 2, 5, 16)
    pos = torch.tensor([[3, 9, 40, 41, 100]])
    new = torch.tensor([[0, 1, 2, 3, 4]])

    def rope(x, p):
        cos, sin = rotary(x, p)
        half = torch.cat([-x[..., 8:], x[..., :8]], dim=-1)
        return x * cos[:, None] + half * sin[:, None]

    moved = rotate_keys(rope(raw, pos), (new - pos).float()[:, None].expand(1, 2, 5), rotary.inv_freq)
    assert torch.allclose(moved, rope(raw, new), atol=1e-5)


def test_rerotate_positions_keep_the_window_contiguous():
    model, _ = load("tiny_llama")
    ids = _ids(model, 40)
    plain, _, _ = streamed_logits(model, ids, 1, method="streaming_llm", budget=40, positions="rerotate")
    model.set_attn_implementation("sdpa")
    assert torch.allclose(plain, model(ids).logits, atol=1e-5)  # no eviction: nothing re-rotated
    cache = make_cache(model, "streaming_llm", budget=12, positions="rerotate")
    for t in range(40):
        model(ids[:, t : t + 1], past_key_values=cache)
    layer = cache.layers[0]
    assert sorted(layer.state("rope_pos")[0, 0].tolist()) == list(range(40 - 12, 40))
    assert sorted(layer.positions[0, 0].tolist()) == [0, 1, 2, 3, *range(32, 40)]


def test_rerotate_needs_rope():
    model, _ = load("tiny_gpt2")
    with pytest.raises(ValueError, match="rerotate"):
        make_cache(model, "streaming_llm", budget=8, positions="rerotate")


def test_cache_follows_beam_search_and_batch_operations():
    model, _ = load("tiny_llama")
    ids = _ids(model, 16).repeat(2, 1)
    cache = make_cache(model, "knorm", budget=8)
    model(ids, past_key_values=cache)
    layer = cache.layers[0]
    layer._pos[1] += 1000  # make rows distinguishable
    before = layer.positions.clone()
    cache.reorder_cache(torch.tensor([1, 0]))
    assert torch.equal(layer.positions, before.flip(0))
    cache.batch_repeat_interleave(2)
    assert layer.positions.shape[0] == 4 and layer._bias.shape[0] == 4
    beams = model.generate(
        _ids(model, 16),
        past_key_values=make_cache(model, "streaming_llm", budget=8),
        num_beams=3,
        max_new_tokens=6,
        do_sample=False,
        pad_token_id=0,
    )
    assert beams.shape == (1, 22)


def test_slack_amortizes_compression():
    model, _ = load("tiny_llama")
    ids = _ids(model, 40)
    cache = _check_oracle(model, ids, 1, method="streaming_llm", budget=10, slack=5)
    lengths = []
    cache2 = make_cache(model, "streaming_llm", budget=10, slack=5)
    for t in range(40):
        model(ids[:, t : t + 1], past_key_values=cache2)
        lengths.append(cache2.layers[0].length)
    assert max(lengths) == 15 and min(lengths[15:]) == 10
    assert cache2.layers[0].compressions == 5  # every 6th step instead of every step
    assert cache.layers[0].compressions == cache2.layers[0].compressions


def test_prefill_only_compression_lets_decode_grow():
    model, _ = load("tiny_llama")
    cache = make_cache(model, "knorm", budget=8, when="prefill")
    model(_ids(model, 20), past_key_values=cache)
    assert cache.layers[0].length == 8
    for t in range(5):
        model(_ids(model, 1, seed=t), past_key_values=cache)
    assert cache.layers[0].length == 13 and cache.get_seq_length() == 25


def test_smollm2_masking_oracle(smollm2):
    model, tok = smollm2
    text = "The quick brown fox jumps over the lazy dog. " * 4 + "Paris is the capital of France, and it is "
    ids = tok(text * 3, return_tensors="pt").input_ids[:, :160]
    cache = _check_oracle(model, ids, 1, method="streaming_llm", budget=48)
    assert cache.physical_lengths() == [48] * 30
    _check_oracle(model, ids, 16, method="knorm", budget=64)


@pytest.mark.parametrize("name", ["tiny_llama", "tiny_qwen2", "tiny_gpt2"])
def test_plain_generate_after_make_cache_is_the_models_own(name):
    """make_cache switches the model to kvexp attention; a later plain generate() (transformers' own cache,
    a left-padded batch) must still give exactly what the model gave before the switch."""
    from kvexp.models import load_model_by_name

    model, _ = load_model_by_name(name, "cpu")  # a fresh copy: the shared one may already be switched
    ids = torch.randint(3, model.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    plain = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    single = model.generate(ids[:1], max_new_tokens=5, do_sample=False)
    make_cache(model, "streaming_llm", budget=8)
    assert model.config._attn_implementation == "kvexp"
    assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False), plain)
    assert torch.equal(model.generate(ids[:1], max_new_tokens=5, do_sample=False), single)


# Modes that make a method evict differently (or make a merging method evict) are proven like the methods.
VARIANTS = [
    ("h2o", {"per_layer": False}),  # one ranking for the whole cache, through the cache's reallocation
    ("h2o", {"track_attention": False}),  # the recency part alone
    ("pyramid_kv_decay", {"profile": "linear", "min_size": 4}),
    ("pyramid_kv_decay", {"profile": "constant", "min_size": 4}),
    ("semantic_cluster", {"fold": False, "num_clusters": 2}),  # the evicting form: no entry is rewritten
]


@pytest.mark.parametrize("method,params", VARIANTS)
@pytest.mark.parametrize("chunk", [1, 7])
@pytest.mark.parametrize("model_name", GQA_MODELS)
def test_masking_oracle_of_method_variants(model_name, method, params, chunk):
    model = load(model_name)[0]
    cache = _check_oracle(model, _ids(model, 40), chunk, method=method, budget=12, **params)
    assert cache.stats()["compressions"] > 0 and max(cache.physical_lengths()) <= 12


@pytest.mark.parametrize("method,params", VARIANTS[:2])
def test_masking_oracle_of_h2o_variants_with_per_head_budgets(method, params):
    model = load("tiny_llama")[0]
    heads, n_layers = _kv_heads(model), model.config.num_hidden_layers
    head_budgets = [[6 + (3 * h + 5 * i) % 9 for h in range(heads)] for i in range(n_layers)]
    cache = _check_oracle(model, _ids(model, 40), 2, method=method, head_budgets=head_budgets, **params)
    assert cache.stats()["tokens_kept_per_head"] == [[float(b) for b in hb] for hb in head_budgets]


@pytest.mark.parametrize("method", ["h2o", "streaming_llm", "tova", "knorm", "snapkv"])
@torch.no_grad()
def test_single_eviction_fast_path_gives_the_general_compactions_layout(method, monkeypatch):
    """A decode step at a full budget evicts one entry by moving the last slot into the victim's; the general
    compaction (here: the differentiable mode's out-of-place one) must leave every buffer exactly alike. Both
    caches attend with the same kernel (the differentiable mode never shares the attention row)."""
    monkeypatch.setattr(CompressedLayer, "shares_attention_row", lambda self, mask: False)
    model, _ = load("tiny_llama")
    ids = _ids(model, 40)
    kw = SMALL_PARAMS.get(method, {})
    fast, general = (
        make_cache(model, method, 12, **kw),
        make_cache(model, method, 12, differentiable=True, **kw),
    )
    for cache in (fast, general):
        for t in range(ids.shape[1]):  # token by token: every step after the 12th evicts exactly one entry
            model(ids[:, t : t + 1], past_key_values=cache)
    for a, b in zip(fast.layers, general.layers, strict=True):
        assert a.compressions == b.compressions == ids.shape[1] - 12
        assert torch.equal(a.positions, b.positions)
        for x, y in zip(a._buffers(), b._buffers(), strict=True):
            assert torch.equal(x[:, :, : a.length], y[:, :, : b.length])
