"""Attention-pattern analysis: the statistics against hand-built maps, and the files a run writes."""

import json

import pytest
import torch

from kvexp.attention_maps import attention_maps, pattern_stats, write_attention_maps
from tests.conftest import load


def test_pattern_stats_of_a_sink_plus_local_map():
    # Every query puts 0.5 on key 0 (the sink) and 0.5 on itself: all sink, all local, no other heavy hitter mass.
    length = 12
    attention = torch.zeros(1, length, length)
    for q in range(length):
        attention[0, q, 0] += 0.5
        attention[0, q, q] += 0.5
    stats = pattern_stats(attention, sink_tokens=1, heavy_hitters=2)
    assert stats["sink_share"] == pytest.approx([0.5])
    # Queries 3..11; the window q-7..q still holds the sink for q <= 7 (1.0 local), later only itself (0.5).
    assert stats["local_share"] == pytest.approx([(5 * 1.0 + 4 * 0.5) / 9])
    # Every non-sink key accumulates 0.5 (from itself): two hitters, each seen by one query only (itself).
    positions = stats["heavy_hitter_positions"][0]
    assert len(positions) == 2 and all(1 <= p < length for p in positions)
    seen = sum(p >= 3 for p in positions)  # hitters inside the measured queries 3..11 add 0.5 / 9 each
    assert stats["heavy_hitter_share"] == pytest.approx([seen * 0.5 / 9])


def test_a_heavy_hitter_column_is_found_and_its_share_measured():
    length = 10
    attention = torch.zeros(2, length, length)
    attention[:, :, 0] = 1.0  # query 0 can only see key 0
    attention[:, 5:, 0] = 0.2
    attention[:, 5:, 5] = 0.8  # from query 5 on, key 5 takes 80%
    stats = pattern_stats(attention, sink_tokens=1, heavy_hitters=1)
    assert stats["heavy_hitter_positions"] == [[5], [5]]
    queries = range(2, length)  # sink_tokens + heavy_hitters = 2
    expected = sum(0.8 if q >= 5 else 0.0 for q in queries) / len(queries)
    assert stats["heavy_hitter_share"] == pytest.approx([expected, expected])
    assert stats["sink_share"] == pytest.approx(
        [sum(0.2 if q >= 5 else 1.0 for q in queries) / len(queries)] * 2
    )


def test_write_attention_maps_draws_each_layer_and_its_stats(tmp_path):
    model, _ = load("tiny_llama")
    ids = torch.randint(0, model.config.vocab_size, (1, 24))
    maps = attention_maps(model, ids, [0, 1])
    assert maps[0].shape == (model.config.num_attention_heads, 24, 24)
    assert torch.allclose(maps[1].sum(-1), torch.ones(model.config.num_attention_heads, 24), atol=1e-5)
    stats = write_attention_maps(model, ids, [0, -1], tmp_path)
    assert set(stats) == {"0", str(model.config.num_hidden_layers - 1)}
    for layer in stats:
        assert (tmp_path / f"layer_{layer}.png").stat().st_size > 1000
    saved = json.loads((tmp_path / "attention_stats.json").read_text())
    assert saved["tokens"] == 24 and saved["layers"] == json.loads(json.dumps(stats))
    with pytest.raises(ValueError, match=r"--layers \[7\] are not layers of this model"):
        write_attention_maps(model, ids, [7], tmp_path)
