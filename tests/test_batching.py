"""Batched generation (eval.batch_size): each row of a left-padded batch gets the answer, the kept entries and the
cache figures it gets alone, for every method that batches; the others are refused; timings are shares."""

import csv
import math
import random

import pytest
import torch

from kvexp.methods import METHODS, build_method, make_cache
from kvexp.tasks.generation import (
    GenerationSample,
    PromptEncoder,
    aggregate_generation,
    batch_key,
    run_generation,
)
from tests.conftest import load
from tests.test_config import _compose
from tests.test_engine import SMALL_PARAMS

# At their defaults; d2o with its layer allocation (the test below runs it without).
UNBATCHED = {"dynamickv", "kivi", "zack", "think"}
UNBATCHED |= {"compression_ratio_decoding"}  # its decoding target follows the longest row's length
UNBATCHED |= {"kvzip", "finch"}  # each prompt's probes (and KVzip's allocation) are its own
UNBATCHED |= {"restorekv"}  # KVzip's probes, then its restore pass, per prompt
# block batches as eval.prefill_chunk_size does: only prompts of one length together (batch_key, tested there)
BATCHED = sorted(
    n for n, cls in METHODS.items() if cls.compresses and n not in UNBATCHED | {"learned", "block"}
)
PARAMS = {
    **SMALL_PARAMS,
    "kivi": {"group_size": 16, "residual_length": 16},  # the tiny model's head dim is 16
}
WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta"]


def _samples(n=5, seed=0, questions=("Which word came first?",)):
    rng = random.Random(seed)
    return [
        GenerationSample(
            id=str(i),
            context=" ".join(rng.choice(WORDS) for _ in range(rng.randint(15, 45))),
            question=questions[i % len(questions)],
            answers=["alpha"],
            max_new_tokens=rng.randint(4, 8),
        )
        for i in range(n)
    ]


def _same(alone, together):
    for a, b in zip(alone, together, strict=True):
        assert a.prediction == b.prediction and a.new_tokens == b.new_tokens, a.id
        for key in ("tokens_seen", "tokens_kept", "tokens_kept_per_head", "compression_ratio", "bytes_full"):
            assert a.kv[key] == b.kv[key], (a.id, key)


# LU-KV around its default scorer (Expected Attention: each row's own query moments) as well as the test's SnapKV.
ANSWERING = [pytest.param(n, PARAMS.get(n, {}), id=n) for n in BATCHED]
ANSWERING += [pytest.param("lukv", {"head_cap": 1.0}, id="lukv-expected_attention")]


@pytest.mark.parametrize(("name", "params"), ANSWERING)
@torch.no_grad()
def test_every_batching_method_answers_each_row_as_alone(name, params):
    """Contexts of 15-45 words left-padded into one batch, compressed at prefill and while decoding (query-agnostic,
    one question length): the same tokens, kept counts per head and compression ratio as one sample at a time."""
    model, tok = load("tiny_llama")
    method = build_method(name, **params)
    assert method.batches
    samples = _samples()
    prompts = [PromptEncoder(tok).encode(s) for s in samples]
    alone = run_generation(model, tok, samples, prompts, method, lambda n: 40)
    together = run_generation(model, tok, samples, prompts, method, lambda n: 40, batch_size=4)
    _same(alone, together)
    assert all(r.wall_s is not None for r in together[:4]) and all(r.wall_s is None for r in alone)


@pytest.mark.parametrize("name", ["snapkv", "pyramidinfer", "adakv", "kvmerger"])
@pytest.mark.parametrize("when", ["prefill", "always"])
@torch.no_grad()
def test_rows_with_different_budgets_and_questions_batch_by_what_they_share(name, when):
    """keep_ratio budgets and questions of different lengths: rows are grouped (batch_key) so that each gets its
    own budget and answer; with prefill-only compression the question's length does not split batches."""
    model, tok = load("tiny_llama")
    method = build_method(name, **PARAMS.get(name, {}))
    samples = _samples(8, seed=1, questions=("Which word?", "Which word came first in the list above?"))
    prompts = [PromptEncoder(tok).encode(s) for s in samples]

    def budget(n):
        return max(8, n // 40 * 10)  # a few distinct budgets, keep_ratio-like

    alone = run_generation(model, tok, samples, prompts, method, budget, when=when)
    together = run_generation(model, tok, samples, prompts, method, budget, when=when, batch_size=8)
    _same(alone, together)
    per_row = METHODS[name].row_budgets
    keys = [
        batch_key(
            p,
            budget(p.compressed_tokens("query_agnostic")),
            "query_agnostic",
            None,
            when,
            row_budgets=per_row,
        )
        for p in prompts
    ]
    assert len(set(keys)) < len(samples)  # some rows did share a batch
    shared = [k for k in set(keys) if keys.count(k) > 1]
    assert len({r.wall_s for r in together if r.wall_s is not None}) == len(shared)  # one share per batch


ROW_BUDGETS = [
    pytest.param(n, PARAMS.get(n, {}), id=n)
    for n, cls in sorted(METHODS.items())
    if cls.batches and cls.compresses and cls.row_budgets and build_method(n, **PARAMS.get(n, {})).row_budgets
]
# The head splits at their default floor (the test parameters above make the heads uniform), each row split by its own
# budget; H2O with a recent window that is not half the budget.
SMALL_SNAPKV = {"window_size": 4, "kernel_size": 3}
ROW_BUDGETS += [
    pytest.param("adakv", {"scorer_params": SMALL_SNAPKV}, id="adakv-split"),
    pytest.param("criticaladakv", {"scorer_params": SMALL_SNAPKV}, id="criticaladakv-split"),
    pytest.param(
        "adakv",
        {"scorer": "criticalkv", "scorer_params": {"scorer_params": SMALL_SNAPKV}},
        id="adakv-criticalkv-split",
    ),
    pytest.param("h2o", {"recent_ratio": 0.3}, id="h2o-recent-0.3"),
    # Layer budgets decaying with depth from each row's own budget, each row's sinks and window from its layer's.
    pytest.param("pyramid_kv_decay", {"layer_decay": 0.9, "min_size": 4}, id="pyramid_kv_decay-exponential"),
    # Log-age pooling windows from each row's own ages; the "best" member by its accumulated attention.
    pytest.param("pooling_merge", {"seq_pooling_type": "best", "sink_tokens": 2}, id="pooling_merge-best"),
    # Each row re-clusters on its own schedule (every 8 of its own tokens), its exact window the rest of its budget.
    pytest.param("semantic_cluster", {"num_clusters": 2, "cluster_every": 8}, id="semantic_cluster-every-8"),
    # A chain whose first stage's recent window is each row's share of its own budget.
    pytest.param(
        "compose",
        {"methods": [{"name": "h2o", "recent_ratio": 0.3}, {"name": "knorm"}]},
        id="compose-h2o-knorm",
    ),
    # Streaming heads beside retrieval ones, each row's own budget on the streaming heads (and Razor's compensation
    # token folding what each row evicts); SimLayerKV with lazy and full rows, each row's window its own budget's.
    pytest.param("duo_attention", {"sparsity": 0.5, "gates_cache": None}, id="duo_attention-mixed"),
    pytest.param("razor_attention", {"retrieval_heads": [[0, 0], [1, 1]]}, id="razor_attention-compensation"),
    pytest.param("simlayerkv", {"lazy_threshold": 0.5}, id="simlayerkv-mixed"),
    # UNComp's two entropy groups (the test parameters above make the heads uniform): each row's own head budgets.
    pytest.param("uncomp", {"window_size": 4, "kernel_size": 3}, id="uncomp-groups"),
    # DMS's threshold evicts in rows under their budget too (a row within budget is not left whole), capped per row.
    pytest.param(
        "dms", {"threshold": 0.03, "window_size": 2, "scorer_params": SMALL_SNAPKV}, id="dms-threshold"
    ),
]


@pytest.mark.parametrize(("name", "params"), ROW_BUDGETS)
@pytest.mark.parametrize("when", ["prefill", "always"])
@torch.no_grad()
def test_rows_with_their_own_budgets_share_one_batch_and_answer_as_alone(name, params, when):
    """keep_ratio-like budgets of prompts of different lengths: a method that keeps a budget per row answers them in
    one batch, each row with its own budget, kept counts per head and answer as alone."""
    model, tok = load("tiny_llama")
    method = build_method(name, **params)
    assert method.row_budgets
    samples = _samples(6, seed=2)
    prompts = [PromptEncoder(tok).encode(s) for s in samples]

    def budget(n):  # some prompts within their budget (a short prompt under a token budget), the others over
        return n + 4 if n % 3 == 0 else max(12, n // 2)

    lengths = [p.compressed_tokens("query_agnostic") for p in prompts]
    assert len({budget(n) for n in lengths}) > 2 and any(n < budget(n) for n in lengths)
    alone = run_generation(model, tok, samples, prompts, method, budget, when=when)
    together = run_generation(model, tok, samples, prompts, method, budget, when=when, batch_size=6)
    _same(alone, together)
    assert [r.budget for r in together] == [r.budget for r in alone]
    assert len({r.wall_s for r in together}) == 1  # one batch


@torch.no_grad()
def test_a_cache_keeps_each_rows_own_budget():
    """Two left-padded rows (12 and 40 tokens) at row budgets 8 and 20 under StreamingLLM (2 sinks): each keeps its
    sinks and newest tokens by its own budget; admit raises both; when the longer row leaves, the layer shrinks to
    what the shorter row holds."""
    model, tok = load("tiny_llama")
    with pytest.raises(ValueError, match="method=h2o reads the budget beyond the kept counts"):
        make_cache(model, "h2o", row_budgets=[8, 20], per_layer=False)  # one ranking for every row
    with pytest.raises(ValueError, match="row_budgets replaces budget"):
        make_cache(model, "streaming_llm", 8, row_budgets=[8, 20], sink_tokens=2)
    same = make_cache(model, "streaming_llm", row_budgets=[8, 8], sink_tokens=2)
    assert all(layer.budget == 8 and layer.row_budgets is None for layer in same.layers)
    pyramid = make_cache(model, "pyramidkv", row_budgets=[16, 32], window_size=2)
    by_budget = {
        b: build_method("pyramidkv", window_size=2).layer_budgets([b] * len(pyramid.layers)) for b in (16, 32)
    }
    for i, layer in enumerate(pyramid.layers):  # each row's layer budgets, as its own budget gives them
        assert layer.row_budgets.tolist() == [by_budget[16][i], by_budget[32][i]]
        assert layer.budget == max(by_budget[16][i], by_budget[32][i])

    cache = make_cache(model, "streaming_llm", row_budgets=[8, 20], sink_tokens=2)
    ids = torch.full((2, 40), tok.pad_token_id)
    ids[0, 28:], ids[1] = torch.randint(3, 200, (12,)), torch.randint(3, 200, (40,))
    mask = torch.ones(2, 40, dtype=torch.long)
    mask[0, :28] = 0
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    model(ids, attention_mask=mask, position_ids=positions, past_key_values=cache)
    for layer in cache.layers:
        kept = [
            sorted(layer.positions[r, h][layer.live()[r, h]].tolist())
            for r in range(2)
            for h in range(layer.kv_heads)
        ]
        assert kept[0] == [0, 1, *range(6, 12)] and kept[-1] == [0, 1, *range(22, 40)]
        assert layer.length == 20 and layer.budget == 20
    cache.admit(3)
    assert cache.layers[0].row_budgets.tolist() == [11, 23] and cache.layers[0].budget == 23
    cache.reorder_cache(torch.tensor([0]))
    assert cache.layers[0].row_budgets.tolist() == [11] and cache.layers[0].budget == 11
    step = torch.randint(3, 200, (1, 1))
    model(step, position_ids=torch.tensor([[12]]), past_key_values=cache)
    # The row holds 8 + 1 entries, under its budget of 11: it keeps them all, and the layer drops the other row's slots.
    assert all(layer.length == 9 and bool(layer.live().all()) for layer in cache.layers)


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("uncomp", {"window_size": 4, "kernel_size": 3}),  # two entropy groups
        ("simlayerkv", {"lazy_threshold": 0.5}),
        ("adakv", {"scorer_params": {"window_size": 4, "kernel_size": 3}}),
        (
            "semantic_cluster",
            {"num_clusters": 2, "cluster_every": 8},
        ),  # re-clustering by each row's own count
    ],
)
@torch.no_grad()
def test_rows_within_a_token_budget_keep_everything_and_decide_later_as_alone(name, params):
    """One token budget for prompts of different lengths: the short rows stay within it at the prefill and cross it
    while decoding. A method with its own head counts leaves such a row whole until then, and a method that decides
    once (UNComp's head budgets, SimLayerKV's lazy layers) decides for each row at that row's first compression,
    from that row's own keys: the same answers and kept counts as alone."""
    model, tok = load("tiny_llama")
    method = build_method(name, **params)
    samples = _samples(6, seed=2)
    prompts = [PromptEncoder(tok).encode(s) for s in samples]
    lengths = sorted(p.compressed_tokens("query_agnostic") for p in prompts)
    budget = lengths[1] + 3  # the shortest two within it at the prefill, crossing it after a few new tokens
    alone = run_generation(model, tok, samples, prompts, method, lambda n: budget, max_new_tokens=8)
    together = run_generation(
        model, tok, samples, prompts, method, lambda n: budget, max_new_tokens=8, batch_size=6
    )
    _same(alone, together)


def _left_padded(model, cache, rows: list[torch.Tensor]) -> torch.Tensor:
    """Feed `rows` ([1, n] ids of different lengths) as one left-padded batch through `cache`; its attention mask."""
    n = max(row.shape[1] for row in rows)
    ids = torch.zeros(len(rows), n, dtype=torch.long)
    mask = torch.zeros(len(rows), n, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, n - row.shape[1] :], mask[i, n - row.shape[1] :] = row[0], 1
    model(ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp_min(0), past_key_values=cache)
    return mask


def _decode_step(model, cache, mask: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """One decode step of a left-padded batch (`tokens` [B, 1], each row at its own next position); the new mask."""
    mask = torch.cat([mask, torch.ones(len(mask), 1, dtype=torch.long)], dim=1)
    model(tokens, attention_mask=mask, position_ids=mask.sum(-1, keepdim=True) - 1, past_key_values=cache)
    return mask


@torch.no_grad()
def test_simlayerkv_decides_for_each_row_at_its_own_first_compression():
    """A 40-token row over a 24-token budget at the prefill and a 20-token row within it: only the first decides at
    the prefill; the second decides at the decode step that takes it over its budget, from that step's query, with
    the mass it gets alone."""
    model, _ = load("tiny_llama")
    g = torch.Generator().manual_seed(4)
    long, short = torch.randint(3, 200, (1, 40), generator=g), torch.randint(3, 200, (1, 20), generator=g)
    steps = torch.randint(3, 200, (2, 6), generator=g)  # each row's next six tokens

    alone = make_cache(model, "simlayerkv", 24)
    model(short, past_key_values=alone)
    for t in range(6):
        model(steps[1:, t : t + 1], position_ids=torch.tensor([[20 + t]]), past_key_values=alone)
    cache = make_cache(model, "simlayerkv", 24)
    mask = _left_padded(model, cache, [long, short])
    assert all(layer.scratch(layer.method)["decided"].tolist() == [True, False] for layer in cache.layers)
    for t in range(6):
        mask = _decode_step(model, cache, mask, steps[:, t : t + 1])
        decided = [layer.scratch(layer.method)["decided"].tolist() for layer in cache.layers]
        assert all(d == [True, 20 + t + 1 > 24] for d in decided)  # the short row crosses at its 25th token
    for layer, own in zip(cache.layers, alone.layers, strict=True):
        ours, mine = layer.scratch(layer.method), own.scratch(own.method)
        assert float(ours["mass"][1]) == pytest.approx(float(mine["mass"][0]), rel=1e-5)
        assert bool(ours["lazy"][1]) == bool(mine["lazy"][0])


def _entries(layer, row):
    """Each KV head's live entries of one batch row, by position: (positions, keys, values)."""
    out = []
    for h in range(layer.kv_heads):
        live = layer.live()[row, h]
        order = layer.positions[row, h][live].argsort()
        out.append(tuple(t[row, h][live][order] for t in (layer.positions, layer.keys, layer.values)))
    return out


# Whose scores may tie to within float rounding (a random-weight surrogate's, sketched leverage's): an entry a row
# evicts in a batch may differ from alone when the padded batch's sums round otherwise (their answers are tested).
NEAR_TIES = {"leverage", "kvzap", "fastkvzip"}
ENTRIES = [pytest.param(n, PARAMS.get(n, {}), id=n) for n in BATCHED if n not in NEAR_TIES] + [
    # Merging methods where a row's own ages, schedule or threshold matter.
    pytest.param("semantic_cluster", {"num_clusters": 2, "cluster_every": 3}, id="semantic_cluster-every-3"),
    pytest.param("pooling_merge", {"seq_pooling_type": "best", "sink_tokens": 2}, id="pooling_merge-best"),
    pytest.param("d2o", {"skip_layers": [], "layer_allocation": False, "sink_tokens": 1}, id="d2o-sink-1"),
]


@pytest.mark.parametrize(("name", "params"), ENTRIES)
@torch.no_grad()
def test_every_batching_method_holds_each_rows_own_entries_as_alone(name, params):
    """A 40-token row and a 20-token row (left-padded) under one 24-token budget, then ten decode steps (the short row
    crosses its budget at the fifth): each row's live entries, positions, merged keys and values, are the ones it holds
    alone (its ages, schedules and thresholds are its own, not the batch's)."""
    model, _ = load("tiny_llama")
    # Distinct tokens: a repeated token's keys differ by RoPE's rotation only, so their norms tie exactly and rounding
    # would pick between them (KNorm's choice, as fix_size_l2 and merging make it).
    tokens = torch.randperm(197, generator=torch.Generator().manual_seed(7)) + 3
    rows = [tokens[None, :40], tokens[None, 40:60]]
    steps = tokens[60:80].view(2, 10)
    alone = []
    for r, ids in enumerate(rows):
        cache = make_cache(model, name, 24, **params)
        model(ids, past_key_values=cache)
        for t in range(10):
            model(
                steps[r : r + 1, t : t + 1],
                position_ids=torch.tensor([[ids.shape[1] + t]]),
                past_key_values=cache,
            )
        alone.append(cache)
    cache = make_cache(model, name, 24, **params)
    mask = _left_padded(model, cache, [rows[0], rows[1]])
    for t in range(10):
        mask = _decode_step(model, cache, mask, steps[:, t : t + 1])
    for r in range(2):
        for layer, own in zip(cache.layers, alone[r].layers, strict=True):
            for ours, mine in zip(_entries(layer, r), _entries(own, 0), strict=True):
                assert torch.equal(ours[0], mine[0]), (layer.layer_idx, r)
                assert torch.allclose(ours[1], mine[1], atol=1e-5) and torch.allclose(
                    ours[2], mine[2], atol=1e-5
                )


@torch.no_grad()
def test_chunkkv_reuses_the_leaders_positions_beside_a_row_within_its_budget():
    """ChunkKV's layer-wise index reuse in a batch of a 40-token row over a 30-token budget and a 29-token row within
    it (whose 25 candidates, 3 whole chunks of 8 and one more, the chunk rule alone would cut to 3 chunks): the second
    layer keeps exactly the first layer's positions in the long row, as alone, and the short row keeps all 29."""
    model, _ = load("tiny_llama")
    params = {"chunk_length": 8, "reuse_layers": 2, "scorer_params": {"window_size": 4, "kernel_size": 1}}
    g = torch.Generator().manual_seed(6)
    long, short = torch.randint(3, 200, (1, 40), generator=g), torch.randint(3, 200, (1, 29), generator=g)

    def kept(layer, row):
        return [sorted(layer.positions[row, h][layer.live()[row, h]].tolist()) for h in range(layer.kv_heads)]

    alone = make_cache(model, "chunkkv", 30, **params)
    model(long, past_key_values=alone)
    assert kept(alone.layers[1], 0) == kept(alone.layers[0], 0)
    cache = make_cache(model, "chunkkv", 30, **params)
    _left_padded(model, cache, [long, short])
    for layer, own in zip(cache.layers, alone.layers, strict=True):
        assert kept(layer, 0) == kept(own, 0)
        assert kept(layer, 1) == [list(range(29))] * layer.kv_heads


@torch.no_grad()
def test_d2o_moves_each_rows_merge_threshold_only_when_that_row_compresses():
    """D2O's EMA threshold tau is per row and starts at the row's first compression: a 20-token row within a
    24-token budget at the prefill keeps no threshold while the 40-token row sets its own; the short row sets its own
    at the decode step that takes it over its budget, the value it has alone."""
    model, _ = load("tiny_llama")
    params = {"skip_layers": [], "layer_allocation": False, "sink_tokens": 1}
    g = torch.Generator().manual_seed(5)
    long, short = torch.randint(3, 200, (1, 40), generator=g), torch.randint(3, 200, (1, 20), generator=g)
    steps = torch.randint(3, 200, (2, 6), generator=g)

    def thresholds(cache):
        return [layer.scratch(layer.method)["threshold"].tolist() for layer in cache.layers]

    long_alone = make_cache(model, "d2o", 24, **params)
    model(long, past_key_values=long_alone)
    short_alone = make_cache(model, "d2o", 24, **params)
    model(short, past_key_values=short_alone)
    assert all("threshold" not in layer.scratch(layer.method) for layer in short_alone.layers)
    for t in range(6):
        model(steps[1:, t : t + 1], position_ids=torch.tensor([[20 + t]]), past_key_values=short_alone)
    cache = make_cache(model, "d2o", 24, **params)
    mask = _left_padded(model, cache, [long, short])
    for (tau_long, tau_short), (own,) in zip(thresholds(cache), thresholds(long_alone), strict=True):
        assert tau_long == pytest.approx(own, rel=1e-5) and math.isnan(tau_short)
    for t in range(6):
        mask = _decode_step(model, cache, mask, steps[:, t : t + 1])
    for (_, tau_short), (own,) in zip(thresholds(cache), thresholds(short_alone), strict=True):
        assert tau_short == pytest.approx(own, rel=1e-5)


@torch.no_grad()
def test_simlayerkv_judges_each_row_by_its_own_budgets_window():
    """SimLayerKV's lazy test measures the attention on the sinks and the window a lazy layer would keep: under per-row
    budgets, each row's own window (budget - sinks), so each row's mass is the one it gets alone."""
    model, _ = load("tiny_llama")
    g = torch.Generator().manual_seed(3)
    rows = [torch.randint(3, 200, (1, n), generator=g) for n in (30, 40)]
    budgets = [10, 24]
    alone = []
    for ids, budget in zip(rows, budgets, strict=True):
        cache = make_cache(model, "simlayerkv", budget, when="prefill")
        model(ids, past_key_values=cache)
        alone.append([float(layer.scratch(layer.method)["mass"][0]) for layer in cache.layers])
    cache = make_cache(model, "simlayerkv", row_budgets=budgets, when="prefill")
    _left_padded(model, cache, rows)
    together = [layer.scratch(layer.method)["mass"].tolist() for layer in cache.layers]
    for i in range(2):
        assert [t[i] for t in together] == pytest.approx(alone[i], rel=1e-5)


def test_batch_keys_name_what_rows_must_share():
    ids = torch.zeros(1, 30, dtype=torch.long)
    from kvexp.tasks.generation import Prompt

    prompt = Prompt(ids, torch.zeros(1, 5, dtype=torch.long))
    assert batch_key(prompt, 16, "query_agnostic", None, "always") == (
        16,
        5,
    )  # the question grows every budget
    assert batch_key(prompt, 16, "query_agnostic", None, "prefill") == (16,)
    assert batch_key(prompt, 16, "query_aware", None, "always") == (16,)
    assert batch_key(prompt, 16, "query_aware", 8, "always") == (
        16,
        35,
    )  # chunk boundaries: the prompt's length
    assert batch_key(prompt, 16, "query_agnostic", None, "prefill", slack=4) == (16, 30)
    assert batch_key(prompt, [8, 16], "query_aware", None) == ((8, 16),)
    assert batch_key(prompt, None, "query_agnostic", 8, "always") == (None,)  # the full cache: anything goes
    # A method that keeps a budget per row: any budgets together, unless chunks or slack tie them to the length.
    assert batch_key(prompt, 16, "query_agnostic", None, "always", row_budgets=True) == (
        "a budget per row",
        5,
    )
    assert batch_key(prompt, 16, "query_aware", 8, "always", row_budgets=True) == (16, 35)
    assert batch_key(prompt, [8, 16], "query_aware", None, row_budgets=True) == ((8, 16),)


@torch.no_grad()
def test_sampled_rows_draw_what_they_draw_alone():
    model, tok = load("tiny_llama")
    samples = _samples(4)
    prompts = [PromptEncoder(tok).encode(s) for s in samples]
    from kvexp.tasks.generation import Decoding

    decoding = Decoding(do_sample=True, temperature=1.5, top_p=0.9, seed=3)
    alone = run_generation(
        model, tok, samples, prompts, "snapkv", lambda n: 40, decoding=decoding, window_size=4
    )
    together = run_generation(
        model, tok, samples, prompts, "snapkv", lambda n: 40, decoding=decoding, batch_size=4, window_size=4
    )
    _same(alone, together)


@torch.no_grad()
def test_a_rows_cache_figures_are_its_own():
    """stats(row): the row's live entries and its full-cache bytes; its share of the bytes held."""
    model, tok = load("tiny_llama")
    cache = make_cache(model, "streaming_llm", 20, sink_tokens=2)
    short, long = torch.randint(3, 200, (1, 12)), torch.randint(3, 200, (1, 40))
    ids = torch.full((2, 40), tok.pad_token_id)
    ids[0, 28:], ids[1] = short[0], long[0]
    mask = (torch.arange(40) >= 28).long()[None].expand(2, -1).clone()
    mask[1] = 1
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    model(ids, attention_mask=mask, position_ids=positions, past_key_values=cache)
    whole, row0, row1 = cache.stats(), cache.stats(row=0, seen=12), cache.stats(row=1, seen=40)
    assert row0["tokens_kept"] == 12 and row1["tokens_kept"] == 20  # the short row kept all of its 12
    assert row0["tokens_seen"] == 12 and row0["compression_ratio"] == 0.0
    assert row1["compression_ratio"] == pytest.approx(0.5)
    per_token = cache.layers[0].dense_slot_bytes // 2  # one row's K and V per token, summed below over layers
    assert row1["bytes_full"] == 40 * per_token * len(cache.layers)
    assert row0["bytes_kept"] == row1["bytes_kept"] == whole["bytes_kept"] / 2
    assert whole["tokens_kept"] == 16  # the batch mean


def test_batch_timings_are_shares_of_the_wall_time():
    model, tok = load("tiny_llama")
    samples = _samples(6)
    prompts = [PromptEncoder(tok).encode(s) for s in samples]
    results = run_generation(model, tok, samples, prompts, "streaming_llm", lambda n: 40, batch_size=3)
    assert len({r.wall_s for r in results[:3]}) == 1 and len({r.wall_s for r in results[3:]}) == 1
    summary = aggregate_generation(samples, results)
    total = sum(r.wall_s for r in results)
    assert summary["timing"]["total_s"] == pytest.approx(total)
    assert summary["timing"]["throughput_tok_s"] == pytest.approx(sum(r.new_tokens for r in results) / total)
    assert summary["timing"]["sample_s"] == pytest.approx(total / 6)
    for r in results:  # latency: the batch's TTFT, the row's own steps of the batch's
        assert r.total_s >= r.wall_s * 0 and len(r.step_s) == r.new_tokens - 1


@pytest.mark.parametrize("name", sorted(UNBATCHED | {"d2o"}))
def test_methods_that_cannot_batch_are_refused_before_the_model_loads(name):
    from kvexp.config import validate

    budget = ["budget=64"]
    base = ["model=tiny_llama", "dataset=passkey", "dataset.lengths=[256]", f"method={name}", *budget]
    base += ["eval.protocol=query_aware"] if METHODS[name].needs_question else []
    cfg = _compose(*base, "eval.batch_size=4")
    with pytest.raises(ValueError, match=f"eval.batch_size=4: method={name} cannot answer a batch"):
        validate(cfg)
    validate(_compose(*base, "eval.batch_size=1"))


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["eval.batch_size=0"], "eval.batch_size must be an integer >= 1"),
        (["eval.batch_size=2", "eval.num_beams=2"], "beam search uses the batch"),
        (["dataset=lm_eval", "eval.batch_size=2"], "batched evaluation applies to generation and perplexity"),
    ],
)
def test_bad_batch_options_fail_before_the_model_loads(overrides, message):
    from kvexp.config import validate

    base = ["model=tiny_llama", "dataset=passkey", "method=snapkv", "budget=64"]
    if "dataset=lm_eval" not in overrides:
        base.append("dataset.lengths=[256]")
    with pytest.raises(ValueError, match=message):
        validate(_compose(*base, *overrides))


def test_a_batched_run_writes_the_answers_of_a_one_at_a_time_run(tmp_path):
    """The app with eval.batch_size=4: samples.csv holds the batch-1 run's predictions and scores, before and after."""
    from kvexp.app import train_or_eval

    def run(batch, out):
        cfg = _compose(
            "model=tiny_llama", "dataset=passkey", "dataset.lengths=[1024]", "dataset.depths=[0.1,0.5,0.9]",
            "dataset.repeats=2", "method=snapkv", "method.window_size=4", "budget=keep_0.5", "eval.max_new_tokens=4",
            "cache_dir=null", f"eval.batch_size={batch}",
        )  # fmt: skip
        summary = train_or_eval(cfg, tmp_path / out)
        with open(tmp_path / out / "samples.csv") as f:
            return summary, list(csv.DictReader(f))

    one, rows_one = run(1, "one")
    four, rows_four = run(4, "four")
    keys = ("id", "prediction_before", "prediction_after", "accuracy_before", "accuracy_after", "kept_tokens")
    assert [[r[k] for k in keys] for r in rows_one] == [[r[k] for k in keys] for r in rows_four]
    assert one["metrics_after"]["qa"] == four["metrics_after"]["qa"] and one["objective"] == four["objective"]
    assert four["config"]["eval"]["batch_size"] == 4


@pytest.mark.slow
@pytest.mark.parametrize("name", ["snapkv", "adakv", "kvmerger", "h2o", "expected_attention"])
@torch.no_grad()
def test_smollm2_batch_of_four_answers_as_one_at_a_time(smollm2, name):
    """The embedded SmolLM2 on the QA stand-in's real prompts (chat template, keep_ratio budgets, query-agnostic):
    a per-head method (AdaKV), a merging one (KVMerger) and one with per-row query moments (Expected Attention)."""
    from kvexp.tasks.qa import qa_jsonl_samples

    model, tok = smollm2
    encoder = PromptEncoder(tok, True, 8192)
    cfg = _compose("dataset=qa_jsonl")
    samples = qa_jsonl_samples(cfg.dataset, encoder, None, 0)
    samples = [s for s in samples for _ in range(2)][:4]  # repeats batch with their twin
    prompts = [encoder.encode(s, 12) for s in samples]
    method = build_method(name, **({"skip_layers": []} if name == "kvmerger" else {}))

    def budget(n):
        return max(40, n // 2)

    alone = run_generation(model, tok, samples, prompts, method, budget, max_new_tokens=12, when="prefill")
    together = run_generation(
        model, tok, samples, prompts, method, budget, max_new_tokens=12, when="prefill", batch_size=4
    )
    _same(alone, together)


@pytest.mark.parametrize("name", ["streaming_llm", "snapkv", "h2o", "tova", "adakv", "kvmerger", "pyramidkv"])
@pytest.mark.parametrize("chunk", [1, 7])
@torch.no_grad()
def test_documents_scored_together_score_as_alone(name, chunk):
    """Perplexity: documents of 30-70 tokens streamed as one batch (each from position 0, a shorter one's last chunk
    padded, finished ones leaving): each document's NLL, hits and kept entries are those it gets alone."""
    from kvexp.tasks.perplexity import score_document, score_in_batches

    model, _ = load("tiny_llama")
    g = torch.Generator().manual_seed(0)
    docs = [(f"d{i}", torch.randint(3, 200, (1, n), generator=g)) for i, n in enumerate((30, 70, 45, 58))]
    method = build_method(name, **PARAMS.get(name, {}))
    alone = [score_document(model, ids, method, 16, chunk, i) for i, ids in docs]
    together = score_in_batches(model, docs, method, lambda n: 16, chunk, batch_size=4)
    for a, b in zip(alone, together, strict=True):
        assert a.id == b.id and a.tokens == b.tokens and a.correct == b.correct
        assert b.nll == pytest.approx(a.nll, rel=1e-5)
        assert a.kv["tokens_kept_per_head"] == b.kv["tokens_kept_per_head"]
        assert a.kv["tokens_seen"] == b.kv["tokens_seen"] and len(a.step_s) == len(b.step_s)
    assert len({r.wall_s for r in together}) == 1 and together[0].wall_s is not None


@pytest.mark.parametrize("name", ["streaming_llm", "snapkv", "tova", "pyramidkv"])
@torch.no_grad()
def test_documents_with_their_own_budgets_score_together_as_alone(name):
    """Perplexity with a budget per document (a third of its tokens): one batch, each document's NLL and kept
    entries as alone."""
    from kvexp.tasks.perplexity import score_document, score_in_batches

    model, _ = load("tiny_llama")
    g = torch.Generator().manual_seed(1)
    docs = [(f"d{i}", torch.randint(3, 200, (1, n), generator=g)) for i, n in enumerate((36, 72, 48, 60))]
    method = build_method(name, **PARAMS.get(name, {}))
    alone = [score_document(model, ids, method, ids.shape[1] // 3, 1, i) for i, ids in docs]
    together = score_in_batches(model, docs, method, lambda n: n // 3, 1, batch_size=4)
    for a, b in zip(alone, together, strict=True):
        assert b.nll == pytest.approx(a.nll, rel=1e-5) and a.correct == b.correct
        assert a.kv["tokens_kept_per_head"] == b.kv["tokens_kept_per_head"]
    assert len({r.wall_s for r in together}) == 1  # one batch


def test_a_batched_perplexity_run_gives_the_one_at_a_time_perplexity(tmp_path):
    """The app: WikiText-2 articles (dataset.split_documents) with keep_ratio budgets (grouped by budget) and a token
    budget, eval.batch_size=3: the same per-document perplexities as one at a time."""
    from kvexp.app import train_or_eval

    def run(batch, budget, out):
        cfg = _compose(
            "model=tiny_llama", "dataset=wikitext2", "dataset.split_documents=true", "eval.max_samples=4",
            "eval.max_tokens=96", "eval.chunk_size=8", "method=snapkv", "method.window_size=4", budget,
            "cache_dir=null", f"eval.batch_size={batch}",
        )  # fmt: skip
        summary = train_or_eval(cfg, tmp_path / out)
        with open(tmp_path / out / "samples.csv") as f:
            return summary, list(csv.DictReader(f))

    for budget in ("budget=32", "budget=keep_0.5"):
        one, rows_one = run(1, budget, f"one{budget}")
        three, rows_three = run(3, budget, f"three{budget}")
        assert [r["id"] for r in rows_one] == [r["id"] for r in rows_three]
        for a, b in zip(rows_one, rows_three, strict=True):
            assert float(b["perplexity_after"]) == pytest.approx(float(a["perplexity_after"]), rel=1e-5)
            assert float(b["perplexity_before"]) == pytest.approx(float(a["perplexity_before"]), rel=1e-5)
            assert a["kept_tokens"] == b["kept_tokens"]
        assert three["metrics_after"]["perplexity"] == pytest.approx(
            one["metrics_after"]["perplexity"], rel=1e-5
        )
