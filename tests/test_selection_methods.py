"""Selection methods (criticalkv, criticaladakv, chunkkv, dms) against hand computations.

Each rule is recomputed here from the tiny model itself, not from kvexp's scoring code: the base scorer's
window attention from the eager attention weights of the plain model, ||W_o v||_1 by calling the attention's
output projection module on each head's value alone, key norms from the layer's keys; then the entries a
compressed run keeps are compared with the hand choice. The masking oracle covers what the engine matrix
(uniform settings there) cannot: whole chunks that leave part of the budget unused, reused positions,
thresholds that keep a number of entries that depends on the content.
"""

import copy
import functools
import math

import pytest
import torch
from omegaconf import OmegaConf

from kvexp.config import validate
from kvexp.methods import build_method, make_cache
from kvexp.methods.adakv import adaptive_counts
from kvexp.methods.criticalkv import VALUE_NORM
from kvexp.tasks.base import method_from_config
from kvexp.tasks.generation import PromptEncoder, run_generation
from tests.conftest import load
from tests.oracle import Visibility, max_logprob_error, oracle_logits
from tests.test_batching import _same, _samples
from tests.test_config import _compose
from tests.test_engine import TOL, _check_oracle, _ids, _kv_heads

WINDOW = 4
SNAP = {"window_size": WINDOW, "kernel_size": 1}  # SnapKV's raw window attention (no pooling): easy by hand
EPS = 1e-4


def _run(model, ids, cache):
    with torch.no_grad():
        model(ids, past_key_values=cache)
    return cache


def _kept(layer, head: int, row: int = 0) -> set[int]:
    """The positions a KV head holds live."""
    return set(layer.positions[row, head][layer.live()[row, head]].tolist())


def _ranked(scores: list[float]) -> list[int]:
    """Positions best first: the higher score, the newer position among equals (the engine's tie rule)."""
    return sorted(range(len(scores)), key=lambda j: (scores[j], j), reverse=True)


@functools.cache
def _sharp_llama():
    """tiny_llama with 8x sharper queries: a random model's attention is nearly uniform, so its votes
    nearly tie and a hand top-k would hinge on float noise (as tests/test_head_methods.py does for
    DynamicKV)."""
    model = copy.deepcopy(load("tiny_llama")[0])
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(8.0)
    return model


def _plain(model, ids):
    """The plain model's eager attention per layer [Hkv, G, T, T] and its cache's values per layer [Hkv, T,
    D]."""
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = model(ids, output_attentions=True, use_cache=True)
    finally:
        model.set_attn_implementation(previous)
    kv = _kv_heads(model)
    attentions = [a[0].reshape(kv, -1, *a.shape[-2:]).float() for a in out.attentions]
    values = [layer.values[0].float() for layer in out.past_key_values.layers]
    return attentions, values


def _votes(attention: torch.Tensor, window: int) -> torch.Tensor:
    """SnapKV's window attention by hand: the last `window` queries' attention summed, averaged over the
    group; the window's own keys +inf. [Hkv, T]."""
    length = attention.shape[-1]
    votes = attention[:, :, length - window :, :].sum(dim=2).mean(dim=1)
    votes[:, length - window :] = float("inf")
    return votes


def _out_proj(model, i: int) -> torch.nn.Module:
    if hasattr(model, "transformer"):  # GPT-2: a Conv1D
        return model.transformer.h[i].attn.c_proj
    if hasattr(model, "gpt_neox"):
        return model.gpt_neox.layers[i].attention.dense
    return model.model.layers[i].self_attn.o_proj


@torch.no_grad()
def _hand_norms(model, i: int, values: torch.Tensor) -> torch.Tensor:
    """||v_j W_o^h||_1 by calling layer i's output projection on head h's value alone (the bias taken off),
    averaged over the query heads h reading each KV head (h // G, transformers' repeat_kv): [Hkv, T]."""
    proj = _out_proj(model, i)
    heads, (kv, length, dim) = model.config.num_attention_heads, values.shape
    group = heads // kv
    zero = proj(torch.zeros(1, heads * dim))
    norms = torch.zeros(kv, length)
    for h in range(heads):
        alone = torch.zeros(length, heads * dim)
        alone[:, h * dim : (h + 1) * dim] = values[h // group]
        norms[h // group] += (proj(alone) - zero).abs().sum(dim=-1)
    return norms / group


def _two_stage(votes: torch.Tensor, norms: torch.Tensor, budget: int, ratio: float) -> set[int]:
    """CriticalKV by hand for one head: int(budget * ratio) best by the votes, the rest by (votes + eps) *
    norms."""
    first = _ranked(votes.tolist())[: int(budget * ratio)]
    refined = ((votes + EPS) * norms).tolist()
    rest = [j for j in _ranked(refined) if j not in first][: budget - len(first)]
    return set(first) | set(rest)


def _spy_counts(method) -> list[tuple[torch.Tensor, list[int] | None]]:
    """Record the per-head live counts the method hands the engine at each compression, with the layer's
    per-head budgets (between compressions every head takes the step's new entries, up to the layer's
    budget)."""
    seen = []
    counts = method.head_counts

    def spy(layer, scores, target):
        result = counts(layer, scores, target)
        seen.append((result, layer.head_budgets))
        return result

    method.head_counts = spy
    return seen


# -- criticalkv ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["tiny_llama", "tiny_qwen3", "tiny_gpt2", "tiny_gpt_neox"])
def test_criticalkv_value_norms_are_each_heads_output_projection_of_the_value(name):
    model = load(name)[0]
    method = build_method("criticalkv", scorer_params=SNAP)
    cache = _run(model, _ids(model, 20), make_cache(model, method, budget=100))
    for i, layer in enumerate(cache.layers):
        hand = _hand_norms(model, i, layer.values[0].float())
        assert torch.allclose(method.value_norms(layer)[0], hand, rtol=1e-5, atol=1e-6), (name, i)


@pytest.mark.parametrize("chunk,slack", [(1, 0), (1, 3), (3, 0), (7, 2)])
def test_criticalkv_value_norms_computed_once_move_with_their_slots(chunk, slack):
    """Each slot's norm is computed at the first compression after its step and kept as per-slot state:
    after a stream of compressions (prefill chunks, decode steps) every live slot holds its own value's
    norm."""
    model = load("tiny_llama")[0]
    method = build_method("criticalkv", scorer_params={"window_size": WINDOW, "kernel_size": 3})
    cache = make_cache(model, method, budget=12, slack=slack)  # slack: several steps between compressions
    ids = _ids(model, 40, seed=9)
    checked = 0
    for start in range(0, 40, chunk):
        before = [layer.compressions for layer in cache.layers]
        _run(model, ids[:, start : start + chunk], cache)
        for i, layer in enumerate(cache.layers):
            if layer.compressions > before[i]:  # this step's compression read every slot's norm
                live = layer.live()[0]
                hand = _hand_norms(model, i, layer.values[0].float())
                stored = layer.state(VALUE_NORM)[0]
                assert torch.allclose(stored[live], hand[live], rtol=1e-5, atol=1e-6), (start, i)
                checked += 1
    assert checked >= 4


@pytest.mark.parametrize("ratio", [0.5, 0.75])
def test_criticalkv_keeps_a_share_by_attention_then_the_rest_by_attention_times_value_norm(ratio):
    model = _sharp_llama()
    length, budget = 40, 16
    ids = _ids(model, length, seed=5)
    attentions, values = _plain(model, ids)
    cache = _run(
        model,
        ids,
        make_cache(
            model, "criticalkv", budget=budget, scorer_params=SNAP, first_stage_ratio=ratio, epsilon=EPS
        ),
    )
    differs_from_votes = differs_from_refined = False
    for i, layer in enumerate(cache.layers):
        votes, norms = _votes(attentions[i], WINDOW), _hand_norms(model, i, values[i])
        for h in range(layer.kv_heads):
            expected = _two_stage(votes[h], norms[h], budget, ratio)
            assert _kept(layer, h) == expected, (i, h)
            differs_from_votes |= expected != set(_ranked(votes[h].tolist())[:budget])
            differs_from_refined |= expected != set(_ranked(((votes[h] + EPS) * norms[h]).tolist())[:budget])
    assert cache.physical_lengths() == [budget] * len(cache.layers)
    # Both stages decide something here: neither the votes nor the refined scores alone give this choice.
    assert differs_from_votes and differs_from_refined


def test_criticaladakv_splits_head_budgets_by_the_votes_then_runs_both_stages_in_each():
    model = _sharp_llama()
    length, budget, alpha = 40, 12, 0.2
    ids = _ids(model, length, seed=6)
    attentions, values = _plain(model, ids)
    cache = _run(
        model,
        ids,
        make_cache(model, "criticaladakv", budget=budget, scorer_params=SNAP, floor_alpha=alpha, epsilon=EPS),
    )
    uneven = False
    for i, layer in enumerate(cache.layers):
        votes, norms = _votes(attentions[i], WINDOW), _hand_norms(model, i, values[i])
        counts = adaptive_counts(votes[None], budget, alpha)[0].tolist()  # kvexp's Ada-KV split
        assert sum(counts) == layer.kv_heads * budget
        uneven |= len(set(counts)) > 1
        assert layer.live()[0].sum(-1).tolist() == counts
        assert layer.length == max(counts)  # the longest head; the others hold dead slots
        for h in range(layer.kv_heads):
            assert _kept(layer, h) == _two_stage(votes[h], norms[h], counts[h], 0.5), (i, h)
    assert uneven  # the heads got different budgets: a real head-wise split


def test_adakv_runs_criticalkv_as_its_scorer_and_forwards_prepare():
    model = load("tiny_llama")[0]
    inner = {"scorer_params": {"window_size": WINDOW, "kernel_size": 3}}
    cache = _check_oracle(
        model, _ids(model, 40), 3, method="adakv", budget=12, scorer="criticalkv", scorer_params=inner
    )
    assert all(layer.live().sum() == layer.kv_heads * 12 for layer in cache.layers)
    assert cache.layers[0].method._scorer._w_o is not None


def test_criticalkv_without_its_models_output_projection_says_how_to_build_the_cache():
    model = load("tiny_llama")[0]
    cache = _run(
        model, _ids(model, 8), make_cache(model, build_method("criticalkv", scorer_params=SNAP), 100)
    )
    with pytest.raises(RuntimeError, match=r"make_cache\(model"):
        build_method("criticalkv").value_norms(cache.layers[0])


# -- chunkkv -------------------------------------------------------------------------------------------------


def _chunk_choice(votes: torch.Tensor, budget: int, chunk: int, window: int) -> set[int]:
    """ChunkKV by hand for one head: the window, then floor((budget - window) / chunk) chunks of consecutive
    positions (oldest first, the newest one partial), best sums first, the newer chunk first among equals."""
    length = votes.shape[0]
    chunks = [list(range(s, min(s + chunk, length - window))) for s in range(0, length - window, chunk)]
    sums = [votes[c].sum().item() for c in chunks]
    best = _ranked(sums)[: (budget - window) // chunk]
    return set(range(length - window, length)) | {j for b in best for j in chunks[b]}


@pytest.mark.parametrize("chunk", [5, 3])
def test_chunkkv_keeps_the_window_and_whole_chunks_by_summed_attention(chunk):
    model = _sharp_llama()
    length, budget = 40, 15  # 36 entries outside the window: chunks of 5 end in a partial one of 1
    ids = _ids(model, length, seed=7)
    attentions, _ = _plain(model, ids)
    cache = _run(
        model, ids, make_cache(model, "chunkkv", budget=budget, scorer_params=SNAP, chunk_length=chunk)
    )
    for i, layer in enumerate(cache.layers):
        votes = _votes(attentions[i], WINDOW)
        for h in range(layer.kv_heads):
            kept = _kept(layer, h)
            assert kept == _chunk_choice(votes[h], budget, chunk, WINDOW), (i, h)
            # Whole chunks: a chunk outside the window is kept entirely or not at all.
            for start in range(0, length - WINDOW, chunk):
                members = set(range(start, min(start + chunk, length - WINDOW)))
                assert members <= kept or not members & kept
            # The budget's remainder short of a chunk stays unused (the paper's floor((L - w) / c) chunks).
            assert len(kept) <= WINDOW + (budget - WINDOW) // chunk * chunk < budget


def test_chunkkv_reused_layers_keep_their_leaders_positions_without_scoring(monkeypatch):
    model = load("tiny_llama")[0]
    ids = _ids(model, 40, seed=2)
    params = {"chunk_length": 3, "scorer_params": {"window_size": WINDOW, "kernel_size": 1}}
    for reuse in (2, 1):
        method = build_method("chunkkv", reuse_layers=reuse, **params)
        scored = []
        inner = method._scorer.score
        monkeypatch.setattr(
            method._scorer, "score", lambda layer, f=inner, s=scored: s.append(layer.layer_idx) or f(layer)
        )
        cache = make_cache(model, method, budget=12)
        same = []
        for start in range(0, 40, 5):  # a prefill in chunks of 5, every one compressing
            _run(model, ids[:, start : start + 5], cache)
            first, second = cache.layers
            same.append(all(_kept(first, h) == _kept(second, h) for h in range(first.kv_heads)))
        if reuse == 2:
            assert all(same) and set(scored) == {0}  # layer 1 never ran its scorer
        else:
            assert not all(same) and set(scored) == {0, 1}  # the test can tell reuse apart


def test_chunkkv_layers_with_other_budgets_select_by_themselves():
    model = load("tiny_llama")[0]
    params = {
        "chunk_length": 3,
        "reuse_layers": 2,
        "scorer_params": {"window_size": WINDOW, "kernel_size": 1},
    }
    cache = _check_oracle(model, _ids(model, 40, seed=2), 5, method="chunkkv", budget=[12, 17], **params)
    first, second = cache.layers
    assert first.length <= 12 and second.length <= 17 and second.length > 12


@pytest.mark.parametrize("chunk", [1, 7])
@pytest.mark.parametrize("model_name", ["tiny_llama", "tiny_qwen3"])
def test_chunkkv_with_real_chunks_matches_the_masking_oracle(model_name, chunk):
    model = load(model_name)[0]
    params = {
        "chunk_length": 3,
        "reuse_layers": 2,
        "scorer_params": {"window_size": WINDOW, "kernel_size": 3},
    }
    cache = _check_oracle(model, _ids(model, 40), chunk, method="chunkkv", budget=12, **params)
    assert all(layer.length <= 12 for layer in cache.layers) and cache.stats()["compressions"] > 0
    heads = _kv_heads(model)
    head_budgets = [
        [9 + (4 * h + 5 * i) % 7 for h in range(heads)] for i in range(model.config.num_hidden_layers)
    ]
    method = build_method("chunkkv", **params)
    seen = _spy_counts(method)
    cache = _check_oracle(model, _ids(model, 40), chunk, method=method, head_budgets=head_budgets)
    assert seen and all(layer.length <= max(b) for layer, b in zip(cache.layers, head_budgets, strict=True))
    # At each compression a head keeps the window and whole chunks of 3: 4 + floor((b - 4) / 3) x 3 at most.
    for counts, budgets in seen:
        assert all(
            k <= WINDOW + (b - WINDOW) // 3 * 3 for k, b in zip(counts[0].tolist(), budgets, strict=True)
        )


# -- dms -----------------------------------------------------------------------------------------------------


def _full_keys(model, ids) -> list[torch.Tensor]:
    """Every layer's keys [Hkv, T, D] from a kvexp run that keeps everything (the compressed run's keys at
    the same step, bit for bit: the same attention over the same entries)."""
    cache = _run(model, ids, make_cache(model, "full"))
    return [layer.keys[0].float() for layer in cache.layers]


def _dms_choice(scores: torch.Tensor, budget: int, window: int, threshold: float) -> set[int]:
    """DMS by hand for one head at one compression of T entries: the newest `window` stay; an older entry
    stays if its score is at least the threshold; over the budget, the window and the best of the rest."""
    length = scores.shape[0]
    recent = set(range(length - window, length))
    passed = [j for j in _ranked(scores.tolist()) if j not in recent and scores[j] >= threshold]
    return recent | set(passed[: budget - window])


@pytest.mark.parametrize("budget,quantile", [(24, 0.5), (12, 0.2)])  # the threshold alone; then the cap too
def test_dms_evicts_entries_below_the_threshold_outside_the_window_up_to_the_budget(budget, quantile):
    model = load("tiny_llama")[0]
    length, window = 30, 5
    ids = _ids(model, length, seed=4)
    scores = [-k.norm(dim=-1) for k in _full_keys(model, ids)]  # knorm: -||k||
    threshold = scores[0][:, : length - window].quantile(quantile).item()
    params = {"scorer": "knorm", "threshold": threshold, "window_size": window}
    cache = _run(model, ids, make_cache(model, "dms", budget=budget, **params))
    stats, capped, below, over = cache.stats(), False, 0, 0
    for i, layer in enumerate(cache.layers):
        counts = []
        for h in range(layer.kv_heads):
            expected = _dms_choice(scores[i][h], budget, window, threshold)
            assert _kept(layer, h) == expected, (i, h)
            counts.append(len(expected))
            above = sum(s >= threshold for s in scores[i][h, : length - window].tolist())
            capped |= window + above > budget
            below += length - window - above
            over += max(window + above - budget, 0)
        # What the run reports is what each head holds: the live entries; the layer is its longest head.
        assert stats["tokens_kept_per_head"][i] == [float(c) for c in counts]
        assert stats["physical_length_per_layer"][i] == layer.length == max(counts)
    kept = [c for row in stats["tokens_kept_per_head"] for c in row]
    assert stats["tokens_kept"] == pytest.approx(sum(kept) / len(kept))
    # The method's own tally of its one compression per layer: who was judged, evicted by what, kept.
    assert stats["method_stats"] == {
        "dms_judged": len(kept) * (length - window),
        "dms_threshold_evicted": below,
        "dms_cap_evicted": over,
        "dms_kept_after_compression": pytest.approx(sum(kept) / len(kept)),
    }
    assert stats["compression_ratio"] == pytest.approx(1 - stats["tokens_kept"] / length)
    assert capped == (budget == 12)  # the second case reaches the cap, the first is the threshold's alone
    assert capped or max(kept) < budget  # fewer than the budget: the threshold, not a top-k, decided


def test_dms_judges_an_entry_once_when_it_leaves_the_window():
    model = load("tiny_llama")[0]
    length, budget, window = 30, 24, 5
    ids = _ids(model, length + 8, seed=4)
    scores = [-k.norm(dim=-1) for k in _full_keys(model, ids[:, :length])]
    threshold = scores[0][:, : length - window].median().item()
    method = build_method("dms", scorer="knorm", threshold=threshold, window_size=window)
    cache = _run(model, ids[:, :length], make_cache(model, method, budget=budget))
    passed = [
        [_kept(layer, h) - set(range(length - window, length)) for h in range(2)] for layer in cache.layers
    ]
    assert all(p for row in passed for p in row)
    # Every score is -||k|| <= 0: from now on every judged entry is below the threshold. The entries that
    # passed stay (judged once); those that left the window since are evicted at the next compression.
    method.threshold = 1.0
    checked = set()
    for t in range(length, length + 8):  # decode; check each layer right after its second compression
        _run(model, ids[:, t : t + 1], cache)
        for i, layer in enumerate(cache.layers):
            if layer.compressions == 2 and i not in checked:
                checked.add(i)
                for h in range(layer.kv_heads):
                    assert _kept(layer, h) == passed[i][h] | set(range(t + 1 - window, t + 1)), (i, h)
    assert checked == {0, 1}


def test_dms_evicts_an_entry_the_step_it_leaves_the_window_below_the_budget():
    """DMS's delayed eviction: far under its budget, a layer still compresses every step, so an entry that fails
    the threshold leaves the step it leaves the window (the engine's `compresses_under_budget`)."""
    model = load("tiny_llama")[0]
    window, ids = 3, _ids(model, 16, seed=4)
    # knorm scores -||k|| <= 0 < 1: every judged entry fails; only the newest `window` tokens ever stay.
    cache = make_cache(model, "dms", budget=64, scorer="knorm", threshold=1.0, window_size=window)
    _run(model, ids[:, :10], cache)
    for t in range(10, 16):
        for layer in cache.layers:
            assert [_kept(layer, h) for h in range(layer.kv_heads)] == [set(range(t - window, t))] * 2
        _run(model, ids[:, t : t + 1], cache)
    assert all(layer.compressions == 7 for layer in cache.layers)  # the prefill and every decode step


def test_dms_without_a_threshold_is_the_scorers_top_k():
    model = load("tiny_llama")[0]
    ids = _ids(model, 40, seed=3)
    dms = make_cache(model, "dms", budget=12, scorer="knorm", threshold=-math.inf, window_size=0)
    knorm = make_cache(model, "knorm", budget=12)
    for t in range(40):
        _run(model, ids[:, t : t + 1], dms)
        _run(model, ids[:, t : t + 1], knorm)
    for a, b in zip(dms.layers, knorm.layers, strict=True):
        assert [_kept(a, h) for h in range(2)] == [_kept(b, h) for h in range(2)]


DMS_CASES = {
    "tiny_llama": {"scorer": "knorm", "threshold": -0.6},  # about the median of -||k||
    "tiny_qwen3": {"threshold": 0.5, "scorer_params": {"window_size": WINDOW, "kernel_size": 3}},  # SnapKV
}


@pytest.mark.parametrize("mode", ["token", "chunk", "per_head", "generate"])
@pytest.mark.parametrize("model_name", ["tiny_llama", "tiny_qwen3"])
def test_dms_with_a_real_threshold_matches_the_masking_oracle(model_name, mode):
    model = load(model_name)[0]
    params = {"window_size": 3, **DMS_CASES[model_name]}
    ids, heads, n_layers = _ids(model, 40), _kv_heads(model), model.config.num_hidden_layers
    longest = [16] * n_layers  # each layer's budget
    if mode == "generate":
        vis = Visibility(1, heads, 32)
        cache = make_cache(model, "dms", budget=16, recorder=vis, **params)
        out = model.generate(
            _ids(model, 20, seed=1),
            past_key_values=cache,
            max_new_tokens=12,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=0,
        )
        seq = out.sequences
        ref = oracle_logits(model, seq, vis)[:, 19:31]
        assert max_logprob_error(torch.stack(out.logits, dim=1).float(), ref, seq[:, 20:32]) < TOL
    elif mode == "per_head":
        budgets = [[10 + (3 * h + 5 * i) % 9 for h in range(heads)] for i in range(n_layers)]
        longest = [max(b) for b in budgets]
        method = build_method("dms", **params)
        seen = _spy_counts(method)
        cache = _check_oracle(model, ids, 2, method=method, head_budgets=budgets)
        # Each head's per-head budget caps what it keeps at each compression.
        assert seen and all(bool((c[0] <= torch.tensor(b)).all()) for c, b in seen)
    else:
        cache = _check_oracle(model, ids, 1 if mode == "token" else 7, method="dms", budget=16, **params)
    assert cache.stats()["compressions"] > 0
    assert all(layer.length <= budget for layer, budget in zip(cache.layers, longest, strict=True))
    assert cache.physical_lengths() == [int(max(row)) for row in cache.stats()["tokens_kept_per_head"]]


def test_dms_lengths_vary_with_the_content():
    """Per-head counts at each compression: the threshold keeps a number of entries that depends on the
    entries."""
    model = load("tiny_llama")[0]
    method = build_method("dms", window_size=3, **DMS_CASES["tiny_llama"])
    seen = _spy_counts(method)
    _check_oracle(model, _ids(model, 40), 1, method=method, budget=16)
    flat = torch.cat([c.flatten() for c, _ in seen])
    assert flat.max() <= 16 and flat.min() < 16 and len(set(flat.tolist())) > 2


# -- batches, validation, configs ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,params",
    [
        (
            "chunkkv",
            {"chunk_length": 3, "reuse_layers": 2, "scorer_params": {"window_size": 4, "kernel_size": 1}},
        ),
        ("criticaladakv", {"scorer_params": {"window_size": 4, "kernel_size": 3}}),
        ("dms", {"window_size": 3, **DMS_CASES["tiny_llama"]}),
        ("dms", {"window_size": 3, "threshold": 0.5, "scorer_params": {"window_size": 4, "kernel_size": 3}}),
    ],
)
@torch.no_grad()
def test_selection_methods_batch_each_row_as_alone(name, params):
    """Left-padded rows with their variable per-head counts, chunks and reused positions: what each row
    gets alone."""
    model, tok = load("tiny_llama")
    method = build_method(name, **params)
    assert method.batches
    samples = _samples()
    prompts = [PromptEncoder(tok).encode(s) for s in samples]
    alone = run_generation(model, tok, samples, prompts, method, lambda n: 24)
    together = run_generation(model, tok, samples, prompts, method, lambda n: 24, batch_size=4)
    _same(alone, together)


@pytest.mark.parametrize(
    "name,params,budget,match",
    [
        ("criticalkv", {"first_stage_ratio": 1.5}, 64, r"method.first_stage_ratio must be in \[0, 1\]"),
        ("criticalkv", {"epsilon": -1.0}, 64, "method.epsilon must be a finite number >= 0"),
        ("criticalkv", {}, 32, r"method.scorer_params \(scorer snapkv\): method.window_size \(32\)"),
        ("criticaladakv", {"floor_alpha": 2.0}, 64, r"method.floor_alpha must be in \[0, 1\]"),
        ("chunkkv", {"chunk_length": 0}, 64, "method.chunk_length must be >= 1"),
        (
            "chunkkv",
            {"chunk_length": 80},
            64,
            r"method.chunk_length \(80\) must not exceed the budget \(64\)",
        ),
        ("chunkkv", {"reuse_layers": 0}, 64, "method.reuse_layers must be >= 1"),
        ("dms", {"window_size": -1}, 64, "method.window_size must be >= 0"),
        ("dms", {"window_size": 64}, 64, r"method.window_size \(64\) must be smaller than the budget \(64\)"),
        ("dms", {"threshold": math.nan}, 64, "method.threshold must be a number"),
    ],
)
def test_bad_selection_parameters_name_the_option(name, params, budget, match):
    with pytest.raises(ValueError, match=match):
        build_method(name, **params).validate(budget)


@pytest.mark.parametrize(
    "name,params,match",
    [
        # kvmerger merges: not a scorer
        ("criticalkv", {"scorer": "kvmerger"}, "method.scorer must be one of: .*snapkv"),
        ("chunkkv", {"scorer": "chunkkv"}, "method.scorer must be one of"),
        ("dms", {"scorer_params": {"window": 3}}, r"method.scorer_params: method 'snapkv' has no parameter"),
        ("dms", {"threshold": "high"}, r"method.threshold='high' must be a number"),
        ("chunkkv", {"chunk_length": 2.5}, r"method.chunk_length=2.5 must be an integer"),
    ],
)
def test_bad_selection_scorers_and_types_fail_when_built(name, params, match):
    with pytest.raises(ValueError, match=match):
        build_method(name, **params)


@pytest.mark.parametrize(
    "overrides,expected",
    [
        (
            ["method=criticalkv", "method.first_stage_ratio=0.25"],
            {"first_stage_ratio": 0.25, "scorer": "snapkv"},
        ),
        (["method=criticaladakv", "method.floor_alpha=0.5"], {"floor_alpha": 0.5, "epsilon": 1e-4}),
        (
            ["method=chunkkv", "method.chunk_length=4", "method.reuse_layers=2"],
            {"chunk_length": 4, "reuse_layers": 2},
        ),
        (
            ["method=chunkkv", "method.scorer=knorm", "~method.scorer_params.kernel_size"],
            {"scorer_params": {}},
        ),
        (["method=dms", "method.threshold=-inf", "method.scorer=knorm"], {"threshold": -math.inf}),
        (["method=dms", "method.window_size=64", "budget=128"], {"window_size": 64, "threshold": 0.05}),
    ],
)
def test_selection_method_overrides_compose_and_validate(overrides, expected):
    cfg = _compose(*overrides)
    validate(cfg)
    method = method_from_config(cfg.method)
    assert {k: getattr(method, k) for k in expected} == expected
    assert OmegaConf.to_container(cfg.method)["name"] == method.name


def test_selection_methods_at_their_defaults_refuse_a_budget_their_windows_fill():
    with pytest.raises(
        ValueError, match=r"method.window_size \(128\) must be smaller than the budget \(128\)"
    ):
        validate(_compose("method=dms", "budget=128"))
    with pytest.raises(
        ValueError, match=r"method.scorer_params \(scorer snapkv\): method.window_size \(32\)"
    ):
        validate(_compose("method=chunkkv", "budget=32"))
