"""Each method against a hand computation from the plain model's own eager attention weights.

After one prefill step nothing has been evicted yet, so the compressed run's attention equals the plain
model's: the kept sets must be exactly what the method's rule gives on those weights. tiny_llama has GQA
(4 query heads, 2 KV heads), so per-KV-head reductions are exercised.
"""

import pytest
import torch
import torch.nn.functional as F

from kvexp.methods import make_cache
from tests.conftest import load

T, BUDGET = 24, 10


@pytest.fixture(scope="module")
def setup():
    model, _ = load("tiny_llama")
    ids = torch.randint(3, model.config.vocab_size, (1, T), generator=torch.Generator().manual_seed(3))
    model.set_attn_implementation("eager")
    with torch.no_grad():
        attentions = model(ids, output_attentions=True).attentions  # per layer [1, H, T, T]
    groups = model.config.num_attention_heads // model.config.num_key_value_heads
    grouped = [a.reshape(1, -1, groups, T, T) for a in attentions]  # [1, Hkv, G, T, T]
    return model, ids, grouped


def _kept(model, ids, method, **params):
    cache = make_cache(model, method, budget=BUDGET, **params)
    with torch.no_grad():
        model(ids, past_key_values=cache)
    return [layer.positions.sort(dim=-1).values for layer in cache.layers]


def _top(scores, k=BUDGET):
    return scores.topk(k, dim=-1).indices.sort(dim=-1).values


def _is_top(kept, scores, k=BUDGET):
    """`kept` [1, Hkv, k] positions are a top-k of `scores` [1, Hkv, T]: ties may break either way."""
    assert kept.shape[-1] == k
    inside = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, kept, True)
    lowest_kept = scores.masked_fill(~inside, float("inf")).amin(-1)
    highest_evicted = scores.masked_fill(inside, float("-inf")).amax(-1)
    return bool((lowest_kept >= highest_evicted).all())


def test_h2o_keeps_recent_window_and_heaviest_column_sums(setup):
    model, ids, attn = setup
    recent = 4
    for layer_attn, kept in zip(attn, _kept(model, ids, "h2o", recent_size=recent), strict=True):
        acc = layer_attn.sum(dim=3).mean(dim=2)  # column sums, mean over the group: [1, Hkv, T]
        acc[..., T - recent :] = float("inf")
        assert torch.equal(kept, _top(acc))


def test_h2o_recent_ratio_splits_the_budget_and_accumulates_across_steps(setup):
    model, ids, attn = setup
    cache = make_cache(model, "h2o", budget=T + 1)  # no eviction: the state is observable
    with torch.no_grad():
        model(ids[:, :-1], past_key_values=cache)
        model(ids[:, -1:], past_key_values=cache)
    for layer_attn, layer in zip(attn, cache.layers, strict=True):
        expected = layer_attn.sum(dim=3).mean(dim=2)  # prefill column sums + the decode row = all T rows
        assert torch.allclose(layer.state("acc"), expected, atol=1e-5)
    kept = _kept(model, ids, "h2o", recent_ratio=0.2)  # the H2O study's 80/20: 2 recent, 8 heavy
    assert all(set(range(T - 2, T)) <= set(k[0, 0].tolist()) for k in kept)


def test_h2o_global_mode_keeps_one_ranking_summed_over_layers_and_heads(setup):
    model, ids, attn = setup
    recent = 4
    kept = _kept(model, ids, "h2o", recent_size=recent, per_layer=False)
    ranking = sum(layer_attn.sum(dim=3).mean(dim=2).sum(dim=1) for layer_attn in attn)  # [1, T]
    ranking[..., T - recent :] = float("inf")
    expected = _top(ranking)  # [1, BUDGET]
    for layer_kept in kept:
        for head in range(layer_kept.shape[1]):
            assert torch.equal(layer_kept[:, head], expected)  # the same tokens in every layer and head


def test_h2o_global_mode_stays_one_token_set_while_decoding():
    model, _ = load("tiny_llama")
    ids = torch.randint(3, model.config.vocab_size, (1, 40), generator=torch.Generator().manual_seed(4))
    cache = make_cache(model, "h2o", budget=BUDGET, recent_ratio=0.2, per_layer=False)
    with torch.no_grad():
        model(ids[:, :20], past_key_values=cache)
        for t in range(20, 40):
            model(ids[:, t : t + 1], past_key_values=cache)
            sets = {frozenset(layer.positions[0, h].tolist()) for layer in cache.layers for h in range(2)}
            assert len(sets) == 1 and all(layer.length == BUDGET for layer in cache.layers)
    assert not any(layer.deferred for layer in cache.layers)


def test_h2o_without_attention_tracking_is_the_recency_part_alone(setup):
    model, ids, _ = setup
    cache = make_cache(model, "h2o", budget=BUDGET, recent_ratio=0.2, track_attention=False)
    with torch.no_grad():
        model(ids, past_key_values=cache)
    for layer in cache.layers:
        assert sorted(layer.positions[0, 0].tolist()) == list(range(T - BUDGET, T))
        assert layer.observe_seconds == 0.0 and bool((layer.state("acc") == 0).all())  # nothing was tracked
    with pytest.raises(ValueError, match="per_layer=false ranks tokens by their attention"):
        make_cache(model, "h2o", budget=BUDGET, per_layer=False, track_attention=False)


def test_observed_attention_normalizes_by_observers(setup):
    model, ids, attn = setup
    observers = torch.arange(T, 0, -1).float()  # key j is seen by queries j .. T-1
    for layer_attn, kept in zip(attn, _kept(model, ids, "observed_attention"), strict=True):
        assert torch.equal(kept, _top(layer_attn.sum(dim=3).mean(dim=2) / observers))


def test_tova_uses_the_last_query_averaged_over_all_heads(setup):
    model, ids, attn = setup
    for layer_attn, kept in zip(attn, _kept(model, ids, "tova"), strict=True):
        last = layer_attn[:, :, :, -1, :].mean(dim=(1, 2))  # [1, T]
        last[..., -1] = float("inf")  # the newest token always stays
        expected = _top(last)
        assert all(torch.equal(kept[:, h], expected) for h in range(kept.shape[1]))  # one set for every head


@pytest.mark.parametrize("pooling", ["maxpool", "avgpool"])
def test_snapkv_window_votes_pooled_with_the_window_kept(setup, pooling):
    model, ids, attn = setup
    w, k = 4, 3
    kept_all = _kept(model, ids, "snapkv", window_size=w, kernel_size=k, pooling=pooling)
    for layer_attn, kept in zip(attn, kept_all, strict=True):
        votes = layer_attn[:, :, :, T - w :, :].sum(dim=3).mean(dim=2)  # [1, Hkv, T]
        flat = votes.reshape(-1, 1, T)
        if pooling == "maxpool":
            pooled = F.max_pool1d(flat, k, stride=1, padding=k // 2)
        else:
            pooled = F.avg_pool1d(flat, k, stride=1, padding=k // 2, count_include_pad=False)
        pooled = pooled.reshape(votes.shape)
        pooled[..., T - w :] = float("inf")
        assert _is_top(kept, pooled)  # max pooling makes exact ties between neighbours


def test_temporal_pooling_skips_dead_slots_as_a_row_alone_has_none():
    """Scores of four live entries at positions 0..3 stored out of order, with a left-padding slot (-1) and an entry
    killed by a smaller budget (position 2 of an older, evicted token) among them: pooled over live neighbours only."""
    from kvexp.methods.scoring import temporal_pool

    scores = torch.tensor([[[9.0, 4.0, 1.0, 7.0, 2.0, 5.0]]])
    positions = torch.tensor(
        [[[-1, 3, 0, 5, 1, 2]]]
    )  # slot 3: a killed entry; the live ones in time: 1, 2, 5, 4
    live = torch.tensor([[[False, True, True, False, True, True]]])
    avg = temporal_pool(scores, positions, 3, "avgpool", live)
    # time order of the live slots: pos 0 -> 1.0, pos 1 -> 2.0, pos 2 -> 5.0, pos 3 -> 4.0
    assert avg[0, 0, [2, 4, 5, 1]].tolist() == pytest.approx([1.5, 8 / 3, 11 / 3, 4.5])
    top = temporal_pool(scores, positions, 3, "maxpool", live)
    assert top[0, 0, [2, 4, 5, 1]].tolist() == [2.0, 5.0, 5.0, 5.0]
    plain = temporal_pool(scores[..., [2, 4, 5, 1]], torch.tensor([[[0, 1, 2, 3]]]), 3, "avgpool")
    assert plain[0, 0].tolist() == pytest.approx([1.5, 8 / 3, 11 / 3, 4.5])  # the same row without dead slots


@pytest.mark.parametrize("method,params", [("knorm", {}), ("snapkv", {"window_size": 4, "kernel_size": 3})])
def test_scorers_select_per_kv_head(setup, method, params):
    model, ids, _ = setup
    kept = _kept(model, ids, method, **params)
    assert any(not torch.equal(k[:, 0], k[:, 1]) for k in kept)  # the two KV heads choose differently


def test_snapkv_window_must_fit_the_budget():
    model, _ = load("tiny_llama")
    with pytest.raises(ValueError, match="window_size"):
        make_cache(model, "snapkv", budget=16)  # default window 32


def test_prefill_decoding_uses_each_method_in_its_phase(setup):
    model, ids, _ = setup
    keys = make_cache(model, "full")
    with torch.no_grad():
        model(ids, past_key_values=keys)
    cache = make_cache(
        model, "prefill_decoding", budget=BUDGET, prefill={"name": "knorm"}, decoding={"name": "recent_only"}
    )
    extra = torch.randint(3, model.config.vocab_size, (1, 5), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        model(ids, past_key_values=cache)  # prefill: the lowest-norm keys
        after_prefill = [layer.positions.clone() for layer in cache.layers]
        for t in range(5):
            model(extra[:, t : t + 1], past_key_values=cache)  # decode: evict the oldest kept
    for full_layer, layer, prefilled in zip(keys.layers, cache.layers, after_prefill, strict=True):
        assert torch.equal(
            prefilled.sort(-1).values, full_layer.keys.norm(dim=-1).argsort(-1)[..., :BUDGET].sort(-1).values
        )
        candidates = torch.cat([prefilled, torch.arange(T, T + 5).expand(1, layer.kv_heads, -1)], dim=-1)
        expected = candidates.sort(-1).values[..., -BUDGET:]
        assert torch.equal(layer.positions.sort(-1).values, expected)


def test_prefill_decoding_rejects_non_compressing_parts():
    with pytest.raises(ValueError, match="must both compress"):
        from kvexp.methods import build_method

        build_method("prefill_decoding", decoding={"name": "full"})


def test_random_keeps_each_position_equally_often_and_redraws_at_every_compression(setup):
    """Random's draws (`slot_uniforms`): over 300 seeds every position of a 24-token prompt is kept about
    BUDGET / T of the time, in every layer and KV head; one seed repeats exactly; the next compression (one more
    token seen) draws anew, so it is not a fixed ranking of the positions."""
    from kvexp.methods.base import slot_uniforms

    model, ids, _ = setup
    counts = torch.zeros(len(_kept(model, ids, "random")), 2, T)
    for seed in range(300):
        for layer, kept in enumerate(_kept(model, ids, "random", seed=seed)):
            counts[layer].scatter_add_(-1, kept[0], torch.ones_like(kept[0], dtype=torch.float))
    expected = 300 * BUDGET / T  # 125 of 300
    assert counts.sum(-1).eq(300 * BUDGET).all()
    assert counts.min() > 0.6 * expected and counts.max() < 1.4 * expected  # binomial sd ~8.5
    assert [k.tolist() for k in _kept(model, ids, "random", seed=7)] == [
        k.tolist() for k in _kept(model, ids, "random", seed=7)
    ]
    cache = make_cache(model, "random", budget=30)  # nothing evicted: the draws of all 24, then of 25
    with torch.no_grad():
        model(ids, past_key_values=cache)
        first = slot_uniforms(cache.layers[0], 0)
        model(ids[:, :1], past_key_values=cache)
        second = slot_uniforms(cache.layers[0], 0)[..., :T]
    assert float(first.min()) >= 0.0 and float(first.max()) < 1.0 and abs(float(first.mean()) - 0.5) < 0.1
    assert not torch.equal(first, second) and not torch.equal(first[:, 0], first[:, 1])


@torch.no_grad()
def test_a_steps_attention_blocks_skip_only_slots_no_query_of_theirs_sees():
    """Left-padded prompts of different lengths, 2 at a time, prefilled in chunks of 8 with compression to 12
    between them (a step's first slots hold what earlier compressions kept): each block of 3 queries' attention over
    the first `end` slots equals the attention over every slot there and is all of it (0 past `end`), so the column
    sums (H2O, ObservedAttention, D2O) and LRU's times are those of the whole matrix."""
    from kvexp.methods.observed_attention import ObservedAttention
    from kvexp.methods.scoring import attention_probs, column_sums, step_attention_blocks, step_queries
    from kvexp.tasks.generation import PromptEncoder, run_generation
    from tests.test_batching import _samples

    class CheckedBlocks(ObservedAttention):
        def observe(self, layer, query):
            if query.shape[2] > 1:
                queries, positions = step_queries(layer, query)
                every = attention_probs(layer, queries, positions, layer.scaling)  # [B, Hkv, G, q, n]
                ends = []
                for rows, probs in step_attention_blocks(layer, query, block=3):
                    end = probs.shape[-1]
                    assert torch.allclose(probs, every[:, :, :, rows, :end], atol=1e-6)
                    assert not every[:, :, :, rows, end:].any()
                    ends.append(end)
                assert ends[-1] == layer.length and ends == sorted(ends)
                assert torch.allclose(column_sums(layer, query, block=3), every.sum(dim=3), atol=1e-5)
                seen.append((layer.length - query.shape[2], len(ends)))
            super().observe(layer, query)

    seen = []
    model, tok = load("tiny_llama")
    samples = _samples(4)
    prompts = [PromptEncoder(tok).encode(s) for s in samples]
    run_generation(
        model, tok, samples, prompts, CheckedBlocks(), lambda n: 12, prefill_chunk_size=8, batch_size=2
    )
    assert any(
        before >= 12 and blocks >= 3 for before, blocks in seen
    )  # old slots and several blocks were checked
