"""The query-free scorers KeyDiff, LagKV and Q-Filters: each score recomputed here from the paper's rule on a tiny
model's cached keys / values / queries, what a compression keeps, Q-Filters' calibration (an SVD computed here, the
cache on disk), the options' checks and their yaml."""

import logging
import math

import pytest
import torch
import torch.nn.functional as F

from kvexp.config import validate
from kvexp.data import HAYSTACK_BOOK
from kvexp.methods import build_method, make_cache
from tests.conftest import load
from tests.test_config import _compose

WINDOW = torch.finfo(torch.float32).max


def _ids(model, length, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, model.config.vocab_size, (1, length), generator=g)


@torch.no_grad()
def _full_layers(model, ids):
    """The uncompressed cache's layers after one forward over `ids` (every key, value and position)."""
    cache = make_cache(model, "full")
    model(ids, past_key_values=cache)
    return cache.layers


def _ranked(scores, positions, keep):
    """The `keep` slots [Hkv] lists an engine keeps: highest score first, ties by the newer position."""
    order = sorted(range(len(scores)), key=lambda i: (float(scores[i]), int(positions[i])), reverse=True)
    return sorted(int(positions[i]) for i in order[:keep])


def _kept_positions(layer):
    """Per KV head of row 0, the sorted positions of its live slots."""
    live = layer.live()[0]
    return [sorted(layer.positions[0, h][live[h]].tolist()) for h in range(layer.kv_heads)]


def _spy(cls):
    """A subclass of a method that records, at every compression, the layer's keys, values, positions, live mask
    and the scores it returned (the class itself stays unregistered)."""

    class Spy(cls):
        def score(self, layer):
            out = super().score(layer)
            self.calls.append(
                (
                    layer.keys.float().clone(),
                    layer.values.float().clone(),
                    layer.positions.clone(),
                    layer.live().clone(),
                    out.clone(),
                )
            )
            return out

    return Spy


@torch.no_grad()
def _stream(model, cache, ids, chunk):
    for start in range(0, ids.shape[1], chunk):
        model(ids[:, start : start + chunk], past_key_values=cache)


# -- KeyDiff ----------------------------------------------------------------------------------------------------------


def _keydiff_by_hand(keys, live):
    """-cos(k_i, mean_j k_j / ||k_j||) over the live keys of each head, written out head by head; dead slots NaN."""
    batch, heads, n, _ = keys.shape
    out = torch.full((batch, heads, n), float("nan"))
    for b in range(batch):
        for h in range(heads):
            index = live[b, h].nonzero().flatten()
            k = keys[b, h, index].double()
            anchor = (k / k.norm(dim=-1, keepdim=True)).mean(dim=0)
            cos = (k @ anchor) / (k.norm(dim=-1) * anchor.norm())
            out[b, h, index] = (-cos).float()
    return out


@pytest.mark.parametrize("model_name", ["tiny_llama", "tiny_qwen3"])
def test_keydiff_scores_are_minus_the_cosine_to_the_mean_unit_key(model_name):
    model, _ = load(model_name)
    for layer in _full_layers(model, _ids(model, 40)):
        keys, live = layer.keys.float(), layer.live()
        scores = build_method("keydiff").score(layer)
        assert torch.allclose(scores, _keydiff_by_hand(keys, live), atol=1e-5)


def test_keydiff_anchor_is_the_mean_of_the_unit_keys_not_of_the_raw_keys():
    """Keys of very different norms, a dead slot holding a huge key: the anchor averages directions over the live
    keys only, so a long key does not pull it (the raw mean would point along it) and the dead slot counts for
    nothing."""
    from kvexp.methods.keydiff import key_anchor

    keys = torch.tensor([[[[100.0, 0.0], [0.0, 1.0], [0.0, 2.0], [0.1, 1.0], [-1000.0, 5.0]]]])
    live = torch.tensor([[[True, True, True, True, False]]])
    anchor = key_anchor(keys, live)[0, 0]
    unit = keys[0, 0, :4] / keys[0, 0, :4].norm(dim=-1, keepdim=True)
    assert torch.allclose(anchor, unit.mean(dim=0))
    scores = -F.cosine_similarity(keys[0, 0, :4], anchor, dim=-1)
    raw = -F.cosine_similarity(keys[0, 0, :4], keys[0, 0, :4].mean(dim=0), dim=-1)
    assert scores.argmax() == 0  # the long x key is the distinctive one among three y keys: kept first
    assert raw.argmin() == 0  # while the raw mean points along it: it would go first


def test_keydiff_anchor_is_recomputed_over_the_live_keys_at_every_compression():
    """Token by token with per-head budgets (shorter heads hold dead slots): each compression's scores are the rule
    over the keys live at that moment, so the anchor moves as the cache changes and ignores dead slots."""
    model, _ = load("tiny_llama")
    method = _spy(type(build_method("keydiff")))()
    method.calls = []
    cache = make_cache(model, method, head_budgets=[[6, 11], [9, 7]])
    _stream(model, cache, _ids(model, 30, seed=1), 1)
    assert len(method.calls) == 19 + 21  # layer 0 compresses from token 12 on, layer 1 from token 10
    anchors = set()
    dead_seen = False
    for keys, _, _, live, scores in method.calls:
        dead_seen |= bool((~live).any())
        assert torch.allclose(scores[live], _keydiff_by_hand(keys, live)[live], atol=1e-5)
        anchors.add(round(float(F.normalize(keys[0, 0][live[0, 0]], dim=-1).mean(0)[0]), 6))
    assert dead_seen and len(anchors) > 10


# -- LagKV ------------------------------------------------------------------------------------------------------------


def _lag_scores_by_hand(keys, values, n_sink, lag, v_ratio=1.0):
    """LagKV's rule for one head's live entries in temporal order (keys / values [m, D]): sinks +inf, chunks of
    `lag` after them, each chunk min-max normalized per channel by the next chunk, std over the channels, softmax
    over the chunk, key + v_ratio x value; the last full chunk and the rest (the lag window) WINDOW. Returns the
    softmax sums and the in-chunk ranks / lag (None for sinks and the window)."""
    m = keys.shape[0]
    rest = m - n_sink
    full = rest // lag
    total, ranked = [None] * m, [None] * m
    for c in range(full - 1):
        chunk = range(n_sink + c * lag, n_sink + (c + 1) * lag)
        ref = range(n_sink + (c + 1) * lag, n_sink + (c + 2) * lag)
        t = torch.zeros(lag, dtype=torch.float64)
        for states, weight in ((keys, 1.0), (values, v_ratio)):
            x, r = states[list(chunk)].double(), states[list(ref)].double()
            low, high = r.min(dim=0).values, r.max(dim=0).values
            assert (high > low).all()
            normalized = (x - low) / (high - low)
            t += weight * torch.softmax(normalized.std(dim=1), dim=0)
        for j, i in enumerate(chunk):
            total[i] = float(t[j])
            smaller = int((t < t[j]).sum()) + int((t[:j] == t[j]).sum())
            ranked[i] = smaller / lag
    return total, ranked


def _check_lag_call(keys, values, positions, live, scores, n_sink, lag, cross=False, v_ratio=1.0):
    """One compression's scores against the rule, head by head, over the live entries sorted by position."""
    batch, heads = positions.shape[:2]
    scored = 0
    for b in range(batch):
        for h in range(heads):
            index = live[b, h].nonzero().flatten()
            index = index[positions[b, h, index].argsort()]  # temporal order
            pos = positions[b, h, index]
            sinks = int((pos < n_sink).sum())
            total, ranked = _lag_scores_by_hand(keys[b, h, index], values[b, h, index], sinks, lag, v_ratio)
            got = scores[b, h, index]
            assert torch.all(got[:sinks] == math.inf)
            for i in range(sinks, len(index)):
                expected = total[i] if cross else ranked[i]
                if expected is None:
                    assert got[i] == WINDOW
                else:
                    assert got[i] == pytest.approx(expected, abs=1e-5)
                    scored += 1
    return scored


@pytest.mark.parametrize("cross", [False, True])
@pytest.mark.parametrize("model_name", ["tiny_llama", "tiny_qwen3"])
def test_lagkv_prefill_scores_each_chunk_against_the_next(model_name, cross):
    model, _ = load(model_name)
    method = build_method("lagkv", n_sink=3, lag_size=5, score_v_ratio=0.5, cross_scoring=cross)
    for layer in _full_layers(model, _ids(model, 41)):
        scores = method.score(layer)
        scored = _check_lag_call(
            layer.keys.float(), layer.values.float(), layer.positions, layer.live(), scores, 3, 5, cross, 0.5
        )
        assert scored == 2 * 6 * 5  # 38 entries after the sinks: 7 chunks, the last one and 3 more the window


def test_lagkv_prefill_keeps_a_share_of_every_chunk():
    """One compression of 40 tokens to 20 (2 sinks, lag 4): 2 sinks, the window of 6 and 12 of the 8 scored chunks'
    32 entries: the chunks lose their lowest-ranked entries in turn, oldest chunk first, so chunks 0-3 keep one
    entry, chunks 4-7 two, each its best by the rule."""
    model, _ = load("tiny_llama")
    ids = _ids(model, 40, seed=5)
    full = _full_layers(model, ids)
    cache = make_cache(model, "lagkv", 20, n_sink=2, lag_size=4)
    _stream(model, cache, ids, 40)
    for layer, ref in zip(cache.layers, full, strict=True):
        for h, kept in enumerate(_kept_positions(layer)):
            _, ranked = _lag_scores_by_hand(ref.keys[0, h].float(), ref.values[0, h].float(), 2, 4)
            chunks = [[p for p in kept if 2 + 4 * c <= p < 6 + 4 * c] for c in range(8)]
            assert [len(c) for c in chunks] == [1] * 4 + [2] * 4
            for c, held in enumerate(chunks):
                best = sorted(range(2 + 4 * c, 6 + 4 * c), key=lambda p: ranked[p], reverse=True)
                assert held == sorted(best[: len(held)])
            assert kept[:2] == [0, 1] and kept[-6:] == list(range(34, 40))


@pytest.mark.parametrize("chunk", [1, 5])
def test_lagkv_rechunks_the_held_entries_in_temporal_order_at_every_compression(chunk):
    """Token by token (and in chunks) with per-head budgets: the slots are out of temporal order and shorter heads
    hold dead slots; each compression's scores are the rule over the live entries sorted by position."""
    model, _ = load("tiny_llama")
    method = _spy(type(build_method("lagkv")))(n_sink=2, lag_size=3)
    method.calls = []
    cache = make_cache(model, method, head_budgets=[[9, 14], [12, 10]])
    _stream(model, cache, _ids(model, 45, seed=2), chunk)
    scored = 0
    shuffled = False
    for keys, values, positions, live, scores in method.calls:
        shuffled |= bool((positions[0, 0].diff() < 0).any())
        scored += _check_lag_call(keys, values, positions, live, scores, 2, 3)
    assert shuffled and scored > 100


def test_lagkv_holds_the_sinks_and_the_newest_when_fewer_than_two_chunks_are_held():
    model, _ = load("tiny_llama")
    layer = _full_layers(model, _ids(model, 12))[0]
    scores = build_method("lagkv", n_sink=2, lag_size=6).score(layer)  # 10 entries after the sinks: one chunk
    assert torch.all(scores[..., :2] == math.inf) and torch.all(scores[..., 2:] == WINDOW)
    cache = make_cache(model, "lagkv", 5, n_sink=2, lag_size=6)
    _stream(model, cache, _ids(model, 12), 1)
    assert _kept_positions(cache.layers[0]) == [[0, 1, 9, 10, 11]] * 2


def test_lagkv_constant_reference_channel_counts_as_zero():
    from kvexp.methods.lagkv import lag_relative_score

    g = torch.Generator().manual_seed(0)
    chunks, reference = torch.randn(1, 4, 3, generator=g), torch.randn(1, 4, 3, generator=g)
    reference[..., 1] = 2.0  # one constant channel
    score = lag_relative_score(chunks, reference)
    low, high = reference.amin(dim=1), reference.amax(dim=1)
    normalized = (chunks - low) / (high - low)
    normalized[..., 1] = 0.0
    assert torch.isfinite(score).all()
    assert torch.allclose(score, normalized.std(dim=-1).softmax(dim=-1))


# -- Q-Filters --------------------------------------------------------------------------------------------------------


def _qfilter(**params):
    return build_method("qfilter", **{"calibration_tokens": 96, "calibration_cache": None, **params})


@torch.no_grad()
def _post_rope_queries(model, ids):
    """Each layer's post-RoPE queries [H, T, D] over `ids`, read from a cache that remembers them (SnapKV's query
    window, as wide as the text), not from Q-Filters' own capture."""
    cache = make_cache(model, "snapkv", 10_000, window_size=ids.shape[1], kernel_size=1)
    model(ids, past_key_values=cache)
    # None for a layer kvexp never compresses (Gemma-3's sliding-window layers): it observes no queries.
    return [
        None if layer.query_window is None else layer.query_window[0][0].float() for layer in cache.layers
    ]


@pytest.mark.parametrize("model_name", ["tiny_llama", "tiny_qwen3", "tiny_gpt_neox", "tiny_gemma3"])
def test_qfilter_directions_are_the_queries_first_right_singular_vectors(model_name):
    """Gemma-3: its global layer 1 follows a sliding-window layer (window 8 of the 96 tokens), so it matches only if
    the calibration forward attends as the model does."""
    model, _ = load(model_name)
    method = _qfilter()
    method.prepare(model)
    queries = _post_rope_queries(model, method.calibration_ids(model))
    heads = model.config.num_attention_heads
    kv_heads = getattr(model.config, "num_key_value_heads", None) or heads
    assert method.directions.shape[0] == len(queries) and queries[-2] is not None
    for i, q in enumerate(queries):  # [H, T, D]
        if q is None:
            continue
        _, _, vh = torch.linalg.svd(q.double(), full_matrices=False)
        first = vh[:, 0]  # [H, D]
        sign = torch.sign(
            (q.double() @ first[..., None]).mean(dim=(1, 2))
        )  # queries project positively on average
        expected = first * sign[:, None]
        assert torch.allclose(method.directions[i].double(), expected, atol=1e-4)
        assert ((q.double() @ method.directions[i].double()[..., None]).mean(dim=(1, 2)) > 0).all()
        grouped = expected.view(kv_heads, heads // kv_heads, -1).mean(dim=1)  # GQA: the group's mean
        assert torch.allclose(method.filters(kv_heads)[i].double(), grouped, atol=1e-4)


def test_qfilter_scores_are_the_keys_projections_and_the_lowest_are_dropped():
    model, _ = load("tiny_llama")
    method = _qfilter()
    method.prepare(model)
    queries = _post_rope_queries(model, method.calibration_ids(model))
    ids = _ids(model, 40, seed=4)
    full = _full_layers(model, ids)
    cache = make_cache(model, method, 12)
    _stream(model, cache, ids, 40)
    for i, (layer, ref) in enumerate(zip(cache.layers, full, strict=True)):
        _, _, vh = torch.linalg.svd(queries[i].double(), full_matrices=False)
        u = vh[:, 0] * torch.sign((queries[i].double() @ vh[:, 0][..., None]).mean(dim=(1, 2)))[:, None]
        projections = torch.einsum("hnd,hgd->hgn", ref.keys[0].double(), u.view(2, 2, -1))  # per query head
        expected = projections.mean(dim=1)  # [Hkv, n]: the mean projection over the group
        assert torch.allclose(method.score(ref)[0].double(), expected, atol=1e-4)
        assert _kept_positions(layer) == [_ranked(expected[h], ref.positions[0, h], 12) for h in range(2)]


def test_qfilter_window_keeps_the_newest_tokens():
    model, _ = load("tiny_llama")
    method = _qfilter(window_size=5)
    cache = make_cache(model, method, 12)
    _stream(model, cache, _ids(model, 40), 1)
    for layer in cache.layers:
        for kept in _kept_positions(layer):
            assert kept[-5:] == list(range(35, 40))


def test_qfilter_calibration_is_cached_per_model_and_text(tmp_path, monkeypatch):
    import kvexp.methods.qfilter as qfilter

    model, _ = load("tiny_llama")
    store = tmp_path / "c"
    first = _qfilter(calibration_cache=str(store))
    first.prepare(model)
    files = list((store / "qfilter").glob("*.pt"))
    assert len(files) == 1

    def no_forward(*args, **kwargs):
        raise AssertionError("the second prepare must load the cached calibration")

    with monkeypatch.context() as patch:
        patch.setattr(qfilter, "query_moments", no_forward)
        second = _qfilter(calibration_cache=str(store))
        second.prepare(model)
        assert torch.equal(first.directions, second.directions)
        with pytest.raises(AssertionError, match="cached calibration"):
            _qfilter(calibration_cache=str(store), calibration_tokens=64).prepare(model)  # another key
    other, _ = load("tiny_qwen3")
    second.prepare(other)  # another model: its own calibration
    assert len(list((store / "qfilter").glob("*.pt"))) == 2


def test_default_calibration_cache_is_kvexps_cache_folder(tmp_path, monkeypatch):
    from kvexp.methods.calibration import cache_folder

    monkeypatch.setenv("KVEXP_CACHE_DIR", str(tmp_path / "kvexp"))
    assert cache_folder("default", "qfilter") == tmp_path / "kvexp" / "qfilter"
    assert cache_folder(str(tmp_path / "mine"), "qfilter") == tmp_path / "mine" / "qfilter"
    assert cache_folder(None, "qfilter") is None
    model, _ = load("tiny_llama")
    method = _qfilter(calibration_cache="default")  # the yaml's default
    method.prepare(model)
    assert [p.parent for p in (tmp_path / "kvexp").rglob("*.pt")] == [tmp_path / "kvexp" / "qfilter"]
    key, stored = method.cache_file(model)
    monkeypatch.setattr(type(method), "calibration_version", 2)  # a newer calibration's code
    newer_key, newer = method.cache_file(model)
    assert (
        newer_key != key and newer.parent == stored.parent and newer != stored
    )  # the old file is not loaded
    _qfilter(calibration_cache="default").prepare(model)
    assert sorted((tmp_path / "kvexp" / "qfilter").iterdir()) == sorted([stored, newer])
    monkeypatch.delenv("KVEXP_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_folder("default", "zack") == tmp_path / "xdg" / "kvexp" / "zack"


def test_qfilter_calibrates_offline_on_the_embedded_novel_or_a_local_file(tmp_path, monkeypatch):
    monkeypatch.delenv("KVEXP_DATA_DIR", raising=False)
    model, tok = load("tiny_llama")
    default = _qfilter()
    assert default._calibration_path() == HAYSTACK_BOOK.path and HAYSTACK_BOOK.path.is_file()
    text = HAYSTACK_BOOK.path.read_text(encoding="utf-8")
    assert (
        default.calibration_ids(model).tolist()
        == tok(text[:2000], return_tensors="pt").input_ids[:, :96].tolist()
    )
    local = tmp_path / "notes.txt"
    local.write_text("A local calibration text, repeated. " * 20)
    own = _qfilter(calibration_file=str(local))
    assert (
        own.calibration_ids(model).tolist()
        == tok(local.read_text(), return_tensors="pt").input_ids[:, :96].tolist()
    )
    own.prepare(model)
    default.prepare(model)
    assert not torch.allclose(own.directions, default.directions)


# -- options, yaml ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,params,budget,message",
    [
        ("lagkv", {"lag_size": 1}, 64, "method.lag_size must be >= 2"),
        ("lagkv", {"n_sink": -1}, 64, "method.n_sink must be >= 0"),
        ("lagkv", {"score_v_ratio": -0.5}, 64, "method.score_v_ratio must be >= 0"),
        ("lagkv", {"n_sink": 16}, 16, r"method.n_sink \(16\) must be smaller than the budget \(16\)"),
        ("qfilter", {"window_size": -1}, 64, "method.window_size must be >= 0"),
        ("qfilter", {"window_size": 64}, 64, r"method.window_size \(64\) must be smaller than the budget"),
        ("qfilter", {"calibration_tokens": 1}, 64, "method.calibration_tokens must be >= 2"),
        ("qfilter", {"calibration_file": "/no/such/file.txt"}, 64, "method.calibration_file"),
    ],
)
def test_bad_options_fail_naming_the_option(name, params, budget, message):
    with pytest.raises(ValueError, match=message):
        build_method(name, **params).validate(budget)


def test_lagkv_says_when_the_budget_cannot_score_while_decoding(caplog):
    method = build_method("lagkv", n_sink=4, lag_size=8)
    with caplog.at_level(logging.WARNING, logger="kvexp.methods.lagkv"):
        method.validate(19)  # 4 + 2 x 8 - 1 = 19: every decoding step holds two chunks
    assert not caplog.records
    with caplog.at_level(logging.WARNING, logger="kvexp.methods.lagkv"):
        method.validate(18)
    assert "lagkv: budget 18 < n_sink + 2 x lag_size - 1 = 19" in caplog.text


def test_lagkv_says_it_once_per_setting_and_not_while_silenced(caplog):
    """A validation while kvexp's notes are silenced (a sweep checking its jobs up front) does not use up the note:
    the job's own validation still says it, once however often it validates."""
    method = build_method("lagkv", n_sink=4, lag_size=8)
    notes = logging.getLogger("kvexp")
    notes.setLevel(logging.ERROR)
    try:
        method.validate(17)
    finally:
        notes.setLevel(logging.NOTSET)
    with caplog.at_level(logging.WARNING, logger="kvexp.methods.lagkv"):
        method.validate(17)
        method.validate(17)
    assert caplog.text.count("lagkv: budget 17 <") == 1


def test_qfilter_refuses_a_text_shorter_than_its_calibration(tmp_path):
    model, _ = load("tiny_llama")
    short = tmp_path / "short.txt"
    short.write_text("too short")
    with pytest.raises(ValueError, match="fewer than calibration_tokens=96"):
        _qfilter(calibration_file=str(short)).prepare(model)


@pytest.mark.parametrize(
    "overrides,expected",
    [
        (["method=keydiff"], {}),
        (
            ["method=lagkv", "method.lag_size=32", "method.n_sink=4", "method.cross_scoring=true"],
            {"lag_size": 32, "n_sink": 4, "cross_scoring": True, "score_v_ratio": 1.0},
        ),
        (
            ["method=qfilter", "method.window_size=8", "method.calibration_tokens=512"],
            {"window_size": 8, "calibration_tokens": 512, "calibration_file": None},
        ),
    ],
)
def test_yaml_composes_with_overrides(overrides, expected):
    from kvexp.tasks.base import method_from_config

    cfg = _compose("model=tiny_llama", "budget=128", *overrides)
    validate(cfg)
    method = method_from_config(cfg.method)
    assert {k: getattr(method, k) for k in expected} == expected


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["method=lagkv", "method.lag_size=1"], "method.lag_size must be >= 2"),
        (["method=qfilter", "method.window_size=128"], "method.window_size"),
        (["method=lagkv", "method.cross_scoring=3"], "method.cross_scoring=3 must be true or false"),
    ],
)
def test_bad_yaml_overrides_fail_validation(overrides, message):
    cfg = _compose("model=tiny_llama", "budget=128", *overrides)
    with pytest.raises(ValueError, match=message):
        validate(cfg)
