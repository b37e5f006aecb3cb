"""Budget allocations: layer schedules keep the total, PyramidKV and Ada-KV match hand computations, config wiring."""

import json
import math

import pytest
import torch
from omegaconf import OmegaConf

from kvexp.app import train_or_eval
from kvexp.budgets import ALLOCATIONS, allocate, resolve_budget
from kvexp.config import validate
from kvexp.methods import build_method, make_cache
from kvexp.methods.adakv import adaptive_counts
from tests.conftest import load
from tests.test_config import _compose
from tests.test_engine import _check_oracle, _ids

EXACT = [a for a in ALLOCATIONS if a != "pyramid"]  # pyramid's integer formula may stay below the total
INF = float("inf")


@pytest.mark.parametrize("name", ALLOCATIONS)
@pytest.mark.parametrize(
    "budget,num_layers", [(1, 1), (1, 7), (10, 32), (64, 2), (100, 4), (512, 28), (80, 80), (4096, 80)]
)
def test_every_schedule_keeps_the_total_with_at_least_one_per_layer(name, budget, num_layers):
    budgets = allocate(name, budget, num_layers)
    assert len(budgets) == num_layers and all(isinstance(b, int) and b >= 1 for b in budgets)
    total = sum(budgets)
    assert total == budget * num_layers if name in EXACT else total <= budget * num_layers


@pytest.mark.parametrize("name", ["pyramid", "geometric", "linear_ramp", "pyramidinfer"])
@pytest.mark.parametrize("budget,num_layers", [(64, 3), (128, 16), (2048, 32)])  # PyramidInfer: layer 0 = 1
def test_pyramids_fall_with_depth(name, budget, num_layers):
    budgets = allocate(name, budget, num_layers)
    assert all(a >= b for a, b in zip(budgets, budgets[1:], strict=False))
    assert budgets[0] > budget > budgets[-1]


def test_pyramid_is_kvcache_factorys_integer_schedule():
    # budget 128 with an 8-token window, beta 20, 4 layers: base 120, min 120 // 20 = 6, max 240 - 6 = 234,
    # step (234 - 6) // 3 = 76: selected 234, 158, 82, 6 (sum 480 = 4 base), plus the window in every layer.
    assert allocate("pyramid", 128, 4, beta=20, window=8) == [242, 166, 90, 14]
    # budget 100, no window: min 5, max 195, step 190 // 3 = 63 -> 195, 132, 69, 6 = 402, two over the total
    # (the floor of step); kvexp takes them back from the largest layer.
    assert allocate("pyramid", 100, 4) == [193, 132, 69, 6]
    # max - min < num_layers - 1: step 0, every layer would get max = 2 base; trimmed back to uniform.
    assert allocate("pyramid", 10, 32) == [10] * 32
    assert allocate("pyramid", 128, 4, beta=1, window=8) == [128] * 4  # beta 1: min = max = base


def test_pyramid_prompt_length_regimes():
    # Below 2 base = 240 prompt tokens: plain SnapKV, the budget in every layer.
    assert allocate("pyramid", 128, 4, window=8, length=239) == [128] * 4
    # 241 tokens: max 234 >= 241 - 8 is capped to 233, min = 240 - 233 = 7, step 226 // 3 = 75:
    # 233, 158, 83, 8 (482, two over 480, taken from the largest layer) + the window.
    assert allocate("pyramid", 128, 4, window=8, length=241) == [239, 166, 91, 16]
    assert allocate("pyramid", 128, 4, window=8, length=10_000) == allocate("pyramid", 128, 4, window=8)


def test_weighted_schedules_by_hand():
    # geometric, decay 0.5: shares of 30 in 1 : 0.5 : 0.25 = 17.14, 8.57, 4.29; the spare token to 8.57.
    assert allocate("geometric", 10, 3, decay=0.5) == [17, 9, 4]
    # the pooling-merge study, beta 2, m = 4: L_k ~ 1, 0.875, 0.75, 0.625 -> 12.31, 10.77, 9.23, 7.69 of 40.
    assert allocate("linear_ramp", 10, 4, beta=2) == [12, 11, 9, 8]
    assert allocate("linear_ramp", 10, 4, beta=1) == [10] * 4
    # PyramidInfer, 3 layers: rho_0 = 1, rho_1 = 0.1 (cos(pi/3) + 1) / 2 + 0.9 = 0.975; layer l holds
    # 0.2 + 0.8 prod_{i<l} rho_i = 1, 1, 0.98 of the prompt -> 100.67, 100.67, 98.66 of 300.
    assert allocate("pyramidinfer", 100, 3) == [101, 101, 98]
    rho = [0.1 * (math.cos(math.pi * i / 6) + 1) / 2 + 0.9 for i in range(6)]
    weights = [0.2 + 0.8 * math.prod(rho[:i]) for i in range(6)]
    shares = [600 * w / sum(weights) for w in weights]
    assert all(abs(b - s) < 1 for b, s in zip(allocate("pyramidinfer", 100, 6), shares, strict=True))


@pytest.mark.parametrize(
    "name,params,match",
    [
        ("cone", {}, "allocation must be one of: uniform, pyramid, geometric, linear_ramp, pyramidinfer"),
        ("uniform", {"beta": 2}, "has no parameter"),
        ("pyramid", {"beta": 0.5}, "beta"),
        ("pyramid", {"window": 64}, "window"),
        ("geometric", {"decay": 0}, "decay"),
        ("linear_ramp", {"beta": -1}, "beta"),
        ("pyramidinfer", {"recent_ratio": 1.0}, "recent_ratio"),
    ],
)
def test_bad_allocations_fail_naming_what_is_allowed(name, params, match):
    with pytest.raises(ValueError, match=match):
        allocate(name, 64, 4, **params)


# -- Ada-KV ------------------------------------------------------------------------------------------------------


def test_adakv_counts_floor_and_global_top_k_by_hand():
    # target 11 with one protected (window) slot per head: b = 10 free entries each, floor int(0.2 b) = 2.
    # Head 0's 15 candidates all beat head 1's: the global top-20 holds c = (15, 5);
    # n = round(0.8 c + 2) = (14, 6), plus the protected slot: (15, 7), 22 = 2 x 11 in all.
    head0 = torch.arange(100.0, 85.0, -1.0)
    head1 = torch.arange(15.0, 0.0, -1.0) / 100
    scores = torch.stack([torch.cat([head0, torch.tensor([INF])]), torch.cat([head1, torch.tensor([INF])])])
    assert adaptive_counts(scores[None], 11, 0.2).tolist() == [[15, 7]]
    assert adaptive_counts(scores[None], 11, 0.0).tolist() == [[16, 6]]  # no floor: the global top-k alone
    assert adaptive_counts(scores[None], 11, 1.0).tolist() == [[11, 11]]  # all floor: uniform


def test_adakv_rounding_excess_leaves_the_worst_kept_entry():
    # target 10, no protected slots, floor 2; c = (7, 7, 16) -> round(0.8 c + 2) = (8, 8, 15) = 31 > 30: the
    # globally worst kept entry above a floor (head 1's 0.7) leaves.
    small = torch.tensor([0.9, 0.8, 0.5, 0.4])
    head0 = torch.cat([torch.arange(50.0, 43.0, -1.0), small, torch.zeros(9)])
    head1 = torch.cat([torch.arange(43.0, 36.0, -1.0), small - 0.2, torch.zeros(9)])
    head2 = torch.cat([torch.arange(36.0, 20.0, -1.0), small / 10])
    counts = adaptive_counts(torch.stack([head0, head1, head2])[None], 10, 0.2)
    assert counts.tolist() == [[8, 7, 15]]


def test_adakv_caps_heads_at_their_live_entries_and_refills_from_the_best():
    # Head 1 has only 2 live slots: floor int(0.5 x 4) = 2, c = (6, 2) -> (5, 3) capped to (5, 2), and the
    # missing entry goes to head 0's next best, so the layer keeps 8 = 2 x 4 live entries.
    scores = torch.tensor([[[6.0, 5, 4, 3, 2, 1], [10, 9, -INF, -INF, -INF, -INF]]])
    assert adaptive_counts(scores, 4, 0.5).tolist() == [[6, 2]]


def test_adakv_rows_of_a_batch_are_allocated_independently():
    rows = torch.tensor([[[9.0, 8, 7, 6], [1, 1, 1, 1]], [[1.0, 1, 1, 1], [9, 8, 7, 6]]])
    assert adaptive_counts(rows, 2, 0.0).tolist() == [[4, 0], [0, 4]]


@pytest.mark.parametrize("chunk", [1, 5])
def test_adakv_heads_differ_with_the_layer_total_kept_and_outputs_exact(chunk):
    model, _ = load("tiny_llama")
    heads = model.config.num_key_value_heads
    cache = _check_oracle(
        model,
        _ids(model, 40, seed=1),  # a sequence whose last step leaves the heads unequal (seed 0's does not)
        chunk,
        method="adakv",
        budget=12,
        scorer_params={"window_size": 4, "kernel_size": 3},
    )
    per_head = cache.stats()["tokens_kept_per_head"]
    assert all(sum(layer) == heads * 12 for layer in per_head)
    assert any(len(set(layer)) > 1 for layer in per_head)  # the heads' budgets differ
    # Real memory: each layer is as long as its longest head.
    assert cache.physical_lengths() == [int(max(layer)) for layer in per_head]


def test_adakv_delegates_to_its_scorer():
    model, _ = load("tiny_llama")
    cache = make_cache(model, "adakv", budget=12, scorer="pyramidkv", scorer_params={"window_size": 4})
    assert [layer.budget for layer in cache.layers] == allocate("pyramid", 12, 2, window=4)  # Ada-PyramidKV
    assert not build_method("adakv", scorer="knorm").observes  # no window queries to remember
    assert build_method("adakv", scorer="h2o").state_names == (
        "acc",
    )  # the scorer's side state moves with K/V
    with pytest.raises(ValueError, match="method.scorer must be one of"):
        make_cache(model, "adakv", budget=12, scorer="full")
    with pytest.raises(ValueError, match="method.scorer_params"):
        make_cache(model, "adakv", budget=12, scorer_params={"window": 4})


# -- PyramidKV ---------------------------------------------------------------------------------------------------


def test_pyramidkv_layers_hold_the_pyramid_and_outputs_are_exact():
    model, _ = load("tiny_llama")
    # budget 12, window 4: base 8, min 0, max 16, step 16 -> 20 and 4 entries (24 = 2 x 12).
    cache = _check_oracle(
        model, _ids(model, 40), 3, method="pyramidkv", budget=12, window_size=4, kernel_size=3
    )
    assert cache.physical_lengths() == [20, 4]
    assert cache.stats()["tokens_kept_per_layer"] == [20.0, 4.0]


def test_pyramidkv_scores_are_snapkvs():
    model, _ = load("tiny_llama")
    ids = _ids(model, 30)
    kept = {}
    for method in ("snapkv", "pyramidkv"):
        params = {"beta": 1} if method == "pyramidkv" else {}  # flat pyramid: the same budget in every layer
        cache = make_cache(model, method, budget=12, window_size=4, kernel_size=3, **params)
        with torch.no_grad():
            model(ids, past_key_values=cache)
        kept[method] = [layer.positions.sort(-1).values for layer in cache.layers]
    assert all(torch.equal(a, b) for a, b in zip(kept["snapkv"], kept["pyramidkv"], strict=True))


# -- config --------------------------------------------------------------------------------------------------------


def test_resolve_budget_splits_tokens_and_keep_ratio():
    budget = OmegaConf.create(
        {"tokens": 100, "keep_ratio": None, "per_layer": None, "per_head": None, "allocation": "pyramid"}
    )
    assert resolve_budget(budget, 1000, 4) == [193, 132, 69, 6]
    budget.tokens, budget.keep_ratio = None, 0.1
    budget.allocation_params = {"beta": 1}
    assert resolve_budget(budget, 1000, 4) == [100] * 4
    budget.allocation = "uniform"
    assert resolve_budget(budget, 1000, 4) == 100


def test_pyramid_allocation_runs_end_to_end_and_is_reported(tmp_path):
    text = tmp_path / "doc.txt"
    text.write_text("It was the best of times, it was the worst of times. " * 20)
    cfg = _compose(
        "model=tiny_llama", "method=knorm", "budget=32", "budget.allocation=pyramid", "dataset=text_file",
        f"dataset.path={text}", "eval.max_tokens=100", "eval.chunk_size=4", "cache_dir=null",
    )  # fmt: skip
    summary = train_or_eval(cfg, tmp_path / "out")
    # budget 32, 2 layers, no window: min 1, max 63 -> 63 and 1 (99 tokens seen).
    kv = summary["kv_cache"]
    assert kv["tokens_kept_per_layer"] == [63.0, 1.0]
    assert kv["tokens_kept_per_head"] == [[63.0, 63.0], [1.0, 1.0]]
    assert kv["tokens_kept"] == 32.0
    written = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert written["budget"]["allocation"] == "pyramid" and written["budget"]["allocation_params"] == {}


@pytest.mark.parametrize(
    "overrides,match",
    [
        (
            ["budget.allocation=cone"],
            "budget.allocation='cone' is not allowed; choose one of: uniform, pyramid",
        ),
        (
            ["budget.allocation=pyramid", "+budget.allocation_params.beta=0.5"],
            "budget.allocation=pyramid.*beta",
        ),
        (["budget.allocation=geometric", "+budget.allocation_params.slope=2"], "budget.allocation=geometric"),
        (
            ["budget=full", "method=full", "budget.allocation=linear_ramp"],
            "budget.allocation=linear_ramp needs",
        ),
        (["budget.allocation=pyramid", "budget.per_layer=[8,8]"], "budget.allocation=pyramid splits"),
        (["method=adakv", "method.floor_alpha=1.5"], "method.floor_alpha"),
        (["method=pyramidkv", "method.beta=0.5"], "method.beta"),
    ],
)
def test_bad_allocation_config_fails_early_naming_the_option(overrides, match):
    with pytest.raises(ValueError, match=match):
        validate(_compose(*overrides))


def test_adakv_splits_each_rows_own_budget():
    # The two hand-checked layers above as one batch, each with its own target ([B, 1]): each row gets its own split.
    head0, head1 = torch.arange(100.0, 85.0, -1.0), torch.arange(15.0, 0.0, -1.0) / 100
    first = torch.stack([torch.cat([head0, torch.tensor([INF])]), torch.cat([head1, torch.tensor([INF])])])
    second = torch.tensor(
        [[6.0, 5, 4, 3, 2, 1, -INF, -INF, -INF, -INF, -INF, -INF, -INF, -INF, -INF, -INF]] * 2
    )
    second[1, 2:] = -INF
    second[1, :2] = torch.tensor([10.0, 9])
    rows = torch.stack([first, second])
    assert adaptive_counts(rows, torch.tensor([[11], [4]]), 0.2).tolist() == [[15, 7], [6, 2]]
