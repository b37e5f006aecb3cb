"""expected_attention_stats: Expected Attention with precomputed per-head query statistics.

The scores are recomputed here from the plain model's keys and values and known statistics (the rule of
docs/methods.md#expected_attention written out, the RoPE average from the model's own cos/sin); the calibrated
statistics are recomputed from the plain model's pre-RoPE queries (hooked before RoPE) over the calibration text.
"""

import pytest
import torch
from safetensors.torch import save_file
from transformers import DynamicCache

from kvexp.config import validate
from kvexp.data import HAYSTACK_BOOK
from kvexp.engine import compress_cache
from kvexp.methods import build_method, make_cache
from tests.conftest import load
from tests.test_config import _compose
from tests.test_more_methods import _has_rope, _ids, _plain_prerope, _reference_mean_rotation, _run

BUDGET = 10


def _stats(model, seed=0):
    """Known statistics for the model: a mean [NL, H, D] and a positive definite covariance [NL, H, D, D]."""
    config = model.config
    heads = config.num_attention_heads
    dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    g = torch.Generator().manual_seed(seed)
    mean = 2.0 * torch.randn(config.num_hidden_layers, heads, dim, generator=g)
    a = torch.randn(config.num_hidden_layers, heads, dim, dim, generator=g)
    return mean, a @ a.transpose(-1, -2) / dim + 0.1 * torch.eye(dim)


def _stats_file(tmp_path, mean, cov, name="stats.safetensors"):
    path = tmp_path / name
    save_file({"query_mean": mean.contiguous(), "query_cov": cov.contiguous()}, str(path))
    return str(path)


def _reference_scores(
    model, ids, mean, cov, n_sink=4, n_future=512, use_covariance=True, use_vnorm=True, epsilon=0.0
):
    """The rule on the plain model's keys/values with the statistics (mean, cov): [1, Hkv, T] per layer, sinks +inf."""
    length, out = ids.shape[1], []
    for i, (_, keys, values) in enumerate(_plain_prerope(model, ids)):
        mu, sigma = mean[i].double(), cov[i].double()  # [H, D], [H, D, D]
        heads, dim = mu.shape
        kv_heads = keys.shape[1]
        groups = heads // kv_heads
        if _has_rope(model):
            r = _reference_mean_rotation(model, length, n_future, dim).double()
            mu, sigma = mu @ r.T, r @ sigma @ r.T
        k = keys[0].double().repeat_interleave(groups, dim=0)[:, n_sink:]  # [H, T - n_sink, D]
        z = (k @ mu[:, :, None])[..., 0] / dim**0.5
        if use_covariance:
            z = z + ((k @ sigma) * k).sum(-1) / (2 * dim)
        p = torch.softmax(z, dim=-1).view(kv_heads, groups, -1).mean(dim=1)
        if use_vnorm:
            p = (p + epsilon) * values[0, :, n_sink:].double().norm(dim=-1)
        out.append(torch.cat([torch.full((kv_heads, n_sink), float("inf"), dtype=p.dtype), p], dim=-1)[None])
    return out


CASES = [
    ("tiny_llama", {}),
    ("tiny_llama", {"use_covariance": False}),
    ("tiny_llama", {"use_vnorm": False}),
    ("tiny_llama", {"n_sink": 2, "n_future_positions": 7, "epsilon": 0.01}),
    ("tiny_qwen3", {}),
    ("tiny_gpt_neox", {}),  # partial rotary
    ("tiny_gpt2", {}),  # no RoPE
]


@pytest.mark.parametrize("model_name,params", CASES)
def test_scores_are_the_expected_attention_of_the_given_statistics(tmp_path, model_name, params):
    model, _ = load(model_name)
    ids = _ids(model)
    mean, cov = _stats(model)
    expected = _reference_scores(
        model,
        ids,
        mean,
        cov,
        n_sink=params.get("n_sink", 4),
        n_future=params.get("n_future_positions", 512),
        use_covariance=params.get("use_covariance", True),
        use_vnorm=params.get("use_vnorm", True),
        epsilon=params.get("epsilon", 0.0),
    )
    method = build_method("expected_attention_stats", stats_file=_stats_file(tmp_path, mean, cov), **params)
    cache = _run(model, ids, make_cache(model, method, budget=ids.shape[1] + 1))  # prefill + 3 decode steps
    for layer, want in zip(cache.layers, expected, strict=True):
        assert torch.equal(
            layer.positions[0, 0], torch.arange(ids.shape[1])
        )  # nothing evicted, temporal order
        got = method.score(layer).double()
        sinks = torch.isinf(want)
        assert torch.isinf(got[sinks]).all() and torch.isfinite(got[~sinks]).all()
        assert torch.allclose(got[~sinks], want[~sinks], rtol=1e-4, atol=1e-6)
        assert want[~sinks].std() > 1e-3  # the scores discriminate


def test_keeps_the_sinks_and_the_top_expected(tmp_path):
    model, _ = load("tiny_llama")
    ids = _ids(model)
    mean, cov = _stats(model, seed=1)
    method = build_method("expected_attention_stats", stats_file=_stats_file(tmp_path, mean, cov))
    cache = make_cache(model, method, budget=BUDGET)
    with torch.no_grad():
        model(ids, past_key_values=cache)  # one prefill step, one compression
    for layer, want in zip(cache.layers, _reference_scores(model, ids, mean, cov), strict=True):
        kept = layer.positions.sort(dim=-1).values
        assert kept.shape[-1] == BUDGET
        assert torch.equal(kept, want.topk(BUDGET, dim=-1).indices.sort(dim=-1).values)
        assert (kept[..., :4] == torch.arange(4)).all()


def test_the_statistics_of_the_context_give_expected_attentions_scores(tmp_path):
    """One scoring function: given the context's own moments (as expected_attention holds them) as statistics, the
    scores are expected_attention's."""
    model, _ = load("tiny_qwen3")
    ids = _ids(model)
    cache = _run(model, ids, make_cache(model, "expected_attention", budget=ids.shape[1] + 1))
    moments = [layer.scratch(layer.method) for layer in cache.layers]
    mean = torch.stack([m["mean"][0] for m in moments])
    cov = torch.stack([m["m2"][0] / m["count"][0] for m in moments])
    method = build_method("expected_attention_stats", stats_file=_stats_file(tmp_path, mean, cov))
    method.prepare(model)
    for layer in cache.layers:
        torch.testing.assert_close(method.score(layer), layer.method.score(layer), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("model_name", ["tiny_llama", "tiny_qwen3", "tiny_gpt_neox", "tiny_gpt2"])
@pytest.mark.parametrize("n_sink", [0, 4])
def test_calibrated_statistics_are_the_moments_of_the_calibration_queries(model_name, n_sink):
    model, _ = load(model_name)
    method = build_method(
        "expected_attention_stats", n_sink=n_sink, calibration_tokens=96, calibration_cache=None
    )
    assert method._calibration_path() == HAYSTACK_BOOK.path  # the embedded novel, as qfilter
    method.prepare(model)
    ids = method.calibration_ids(model)
    assert ids.shape == (1, 96)
    prerope = _plain_prerope(model, ids)
    assert method.query_mean.shape[0] == method.query_cov.shape[0] == len(prerope)
    for i, (q, _, _) in enumerate(prerope):
        seen = q[0, :, n_sink:].double()  # [H, 96 - n_sink, D]
        mu = seen.mean(dim=1)
        centred = seen - mu[:, None]
        sigma = centred.transpose(1, 2) @ centred / (seen.shape[1] - 1)
        assert sigma.diagonal(dim1=-2, dim2=-1).min() > 0
        assert torch.allclose(method.query_mean[i].double(), mu, rtol=1e-4, atol=1e-5)
        assert torch.allclose(method.query_cov[i].double(), sigma, rtol=1e-4, atol=1e-5)


def test_calibration_is_cached_per_model_and_sinks_and_reloads_as_a_stats_file(tmp_path, monkeypatch):
    import kvexp.methods.expected_attention_stats as module

    model, _ = load("tiny_llama")
    store = tmp_path / "c"
    params = {"calibration_tokens": 96, "calibration_cache": str(store)}
    first = build_method("expected_attention_stats", **params)
    first.prepare(model)
    files = list((store / "expected_attention_stats").glob("*.safetensors"))
    assert len(files) == 1

    def no_forward(*args, **kwargs):
        raise AssertionError("the second prepare must load the cached calibration")

    with monkeypatch.context() as patch:
        patch.setattr(module, "query_moments", no_forward)
        second = build_method("expected_attention_stats", **params)
        second.prepare(model)
        assert torch.equal(first.query_mean, second.query_mean) and torch.equal(
            first.query_cov, second.query_cov
        )
        with pytest.raises(AssertionError, match="cached calibration"):  # the sinks are left out: another key
            build_method("expected_attention_stats", n_sink=2, **params).prepare(model)
        from_file = build_method(
            "expected_attention_stats", stats_file=str(files[0])
        )  # the cache file as stats
        from_file.prepare(model)
        assert torch.equal(first.query_cov, from_file.query_cov)
    other, _ = load("tiny_qwen3")
    second.prepare(other)  # another model: its own calibration
    assert len(list((store / "expected_attention_stats").glob("*.safetensors"))) == 2


def test_a_local_calibration_text_gives_other_statistics(tmp_path):
    model, _ = load("tiny_llama")
    local = tmp_path / "notes.txt"
    local.write_text("A local calibration text, repeated with small changes. " * 20)
    params = {"calibration_tokens": 96, "calibration_cache": None}
    own = build_method("expected_attention_stats", calibration_file=str(local), **params)
    default = build_method("expected_attention_stats", **params)
    own.prepare(model)
    default.prepare(model)
    assert not torch.allclose(own.query_mean, default.query_mean)


@torch.no_grad()
def test_left_padded_rows_score_and_keep_as_alone(tmp_path):
    """Rows of 16 and 30 tokens in one left-padded batch: each row's future rotation starts after its own newest
    token, so its scores and kept entries are the ones it gets alone."""
    model, tok = load("tiny_llama")
    mean, cov = _stats(model, seed=2)
    stats = _stats_file(tmp_path, mean, cov)
    short, long = _ids(model, 16, seed=5), _ids(model, 30, seed=6)
    ids = torch.full((2, 30), tok.pad_token_id)
    ids[0, 14:], ids[1] = short[0], long[0]
    mask = (torch.arange(30) >= 14).long()[None].expand(2, -1).clone()
    mask[1] = 1
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    for budget in (31, BUDGET):  # nothing evicted (the scores), then one compression (what is kept)
        method = build_method("expected_attention_stats", stats_file=stats)
        together = make_cache(model, method, budget)
        model(ids, attention_mask=mask, position_ids=positions, past_key_values=together)
        alone = []
        for row in (short, long):
            alone.append(make_cache(model, method, budget))
            model(row, past_key_values=alone[-1])
        for layer, *single in zip(together.layers, *(c.layers for c in alone), strict=True):
            scores = method.score(layer)
            for row, other in enumerate(single):
                live = layer.positions[row] >= 0
                held = layer.positions[row][live].view(layer.kv_heads, -1)
                assert torch.equal(held.sort(dim=-1).values, other.positions[0].sort(dim=-1).values)
                if budget > 30:
                    want = method.score(other)[0]
                    got = scores[row][live].view(layer.kv_heads, -1)
                    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


@torch.no_grad()
def test_compresses_an_existing_cache(tmp_path):
    """It needs no queries: a transformers cache is compressed at once to the top expected entries."""
    model, _ = load("tiny_llama")
    ids = _ids(model)
    mean, cov = _stats(model, seed=3)
    model.set_attn_implementation("sdpa")
    entries = model(ids, past_key_values=DynamicCache(), use_cache=True).past_key_values
    method = build_method("expected_attention_stats", stats_file=_stats_file(tmp_path, mean, cov))
    cache = compress_cache(model, entries, method, BUDGET)
    for layer, want in zip(cache.layers, _reference_scores(model, ids, mean, cov), strict=True):
        kept = layer.positions.sort(dim=-1).values
        assert torch.equal(kept, want.topk(BUDGET, dim=-1).indices.sort(dim=-1).values)


# -- options, yaml -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "params,budget,message",
    [
        ({"n_future_positions": 0}, 64, "method.n_future_positions must be >= 1"),
        ({"n_sink": -1}, 64, "method.n_sink must be >= 0"),
        ({"n_sink": 8}, 8, r"method.n_sink \(8\) must be smaller than the budget \(8\)"),
        ({"epsilon": -0.1}, 64, "method.epsilon must be >= 0"),
        ({"calibration_tokens": 5}, 64, "method.calibration_tokens must be >= 6"),
        ({"calibration_file": "/no/such/file.txt"}, 64, "method.calibration_file"),
        ({"stats_file": "/no/such/stats.safetensors"}, 64, "method.stats_file"),
    ],
)
def test_bad_options_fail_naming_the_option(params, budget, message):
    with pytest.raises(ValueError, match=message):
        build_method("expected_attention_stats", **params).validate(budget)


def test_bad_stats_files_fail_naming_the_option(tmp_path):
    model, _ = load("tiny_llama")
    text = tmp_path / "stats.txt"
    text.write_text("not tensors")
    with pytest.raises(ValueError, match=r"method.stats_file .* must be a \.safetensors or \.pt file"):
        build_method("expected_attention_stats", stats_file=str(text)).validate(64)
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x00" * 5)
    with pytest.raises(ValueError, match="method.stats_file: .* is not a readable safetensors file"):
        build_method("expected_attention_stats", stats_file=str(broken)).validate(64)
    mean, cov = _stats(model)
    other = _stats_file(
        tmp_path, mean[:, :, :8], cov[:, :, :8, :8], "small.safetensors"
    )  # head_dim 8, not 16
    with pytest.raises(ValueError, match=r"method.stats_file .* do not fit LlamaForCausalLM"):
        make_cache(model, "expected_attention_stats", BUDGET, stats_file=other)
    renamed = tmp_path / "renamed.safetensors"
    save_file({"mean": mean, "query_cov": cov}, str(renamed))
    with pytest.raises(ValueError, match="method.stats_file .* holds no query_mean tensor"):
        make_cache(model, "expected_attention_stats", BUDGET, stats_file=str(renamed))


def test_unprepared_method_says_how_to_prepare():
    model, _ = load("tiny_llama")
    cache = make_cache(model, "snapkv", 100)
    with torch.no_grad():
        model(_ids(model), past_key_values=cache)
    with pytest.raises(RuntimeError, match="make_cache, which calls prepare"):
        build_method("expected_attention_stats").score(cache.layers[0])


@pytest.mark.parametrize(
    "overrides,expected",
    [
        (
            ["method=expected_attention_stats"],
            {"n_future_positions": 512, "n_sink": 4, "use_covariance": True, "stats_file": None},
        ),
        (
            ["method=expected_attention_stats", "method.n_sink=2", "method.calibration_tokens=512"],
            {"n_sink": 2, "calibration_tokens": 512, "calibration_cache": "default"},
        ),
    ],
)
def test_yaml_composes_with_overrides(overrides, expected):
    from kvexp.tasks.base import method_from_config

    cfg = _compose("model=tiny_llama", "budget=128", *overrides)
    validate(cfg)
    method = method_from_config(cfg.method)
    assert method.name == "expected_attention_stats"
    assert {k: getattr(method, k) for k in expected} == expected


def test_bad_yaml_override_fails_validation():
    cfg = _compose("model=tiny_llama", "budget=128", "method=expected_attention_stats", "method.n_sink=200")
    with pytest.raises(ValueError, match=r"method.n_sink \(200\) must be smaller than the budget"):
        validate(cfg)


# -- the shared window check (kvexp.methods.base.check_window) ----------------------------------------------------------


@pytest.mark.parametrize(
    "args,kwargs,message",
    [
        (("window_size", -1, 8), {}, r"^method.window_size must be >= 0, got -1$"),
        (("window_size", 0, 8), {"minimum": 1}, r"^method.window_size must be >= 1, got 0$"),
        (("window_size", 8, 8), {}, r"^method.window_size \(8\) must be smaller than the budget \(8\)$"),
        (
            ("recent_size", 9, 8),
            {"up_to_budget": True},
            r"^method.recent_size must be in \[0, budget=8\], got 9$",
        ),
        (("window_size", None, 8), {}, r"^method.window_size must be an integer >= 0, got null$"),
        (
            ("window_size", 0, None),
            {"minimum": 1, "nullable": True, "null_means": "every query seen"},
            r"^method.window_size must be >= 1 or null \(every query seen\), got 0$",
        ),
        (("recent_size", -2, None), {"nullable": True}, r"^method.recent_size must be >= 0 or null, got -2$"),
    ],
)
def test_check_window_names_the_option_and_the_allowed_values(args, kwargs, message):
    from kvexp.methods.base import check_window

    with pytest.raises(ValueError, match=message):
        check_window(*args, **kwargs)


def test_check_window_accepts_the_edges_of_its_range():
    from kvexp.methods.base import check_window

    check_window("window_size", 0, 8)
    check_window("window_size", 7, 8)
    check_window("recent_size", 8, 8, up_to_budget=True)
    check_window("window_size", 1000, None, minimum=1)  # no budget: no upper bound
    check_window("window_size", None, 8, nullable=True)


@pytest.mark.parametrize(
    "name,params,budget,message",
    [
        ("snapkv", {"window_size": 0}, 64, "method.window_size must be >= 1"),  # snapkv needs a query
        (
            "snapkv_lite",
            {"window_size": 64},
            64,
            r"method.window_size \(64\) must be smaller than the budget",
        ),
        ("h2o", {"recent_size": 65}, 64, r"method.recent_size must be in \[0, budget=64\], got 65"),
        ("learned", {"recent_size": -1}, None, "method.recent_size must be >= 0 or null, got -1"),
        ("cap", {"window_size": 0}, 64, r"method.window_size must be >= 1 or null \(every query seen\)"),
        (
            "cur",
            {"local_window_size": 0},
            64,
            r"method.local_window_size must be >= 1 or null \(no local windows\)",
        ),
        ("think", {"recent_size": -1}, 64, "method.recent_size must be >= 0, got -1"),
        ("simcalkv", {"value_window": 0}, 64, "method.value_window must be >= 1, got 0"),
        ("adaptive_kmeans", {"lookback_window": 0}, 64, "method.lookback_window must be >= 1 or null"),
    ],
)
def test_methods_check_their_windows_with_the_shared_check(name, params, budget, message):
    with pytest.raises(ValueError, match=message):
        build_method(name, **params).validate(budget)


@pytest.mark.parametrize(
    "name,params,budget",
    [
        ("snapkv_lite", {"window_size": 0}, 64),  # 0: no window
        ("h2o", {"recent_size": 64}, 64),  # h2o and learned: the window may fill the budget
        ("learned", {"recent_size": 64}, 64),
        ("think", {"window_size": 128}, 64),  # think's query window is not held in the budget
        ("cap", {"window_size": None}, 64),
    ],
)
def test_windows_keep_their_methods_ranges(name, params, budget):
    build_method(name, **params).validate(budget)
