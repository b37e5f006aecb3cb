"""compress_cache: an existing transformers cache compressed at once (the kvexp form of the kvcompress study's
`l2_compress(past_key_values, ...)` calls), then decoded like any kvexp cache."""

import pytest
import torch
from transformers import DynamicCache

from kvexp.methods import compress_cache, make_cache
from tests.conftest import load

T = 40


def _ids(model, length=T + 4):
    g = torch.Generator().manual_seed(5)
    return torch.randint(3, model.config.vocab_size, (1, length), generator=g)


def _decode(model, cache, ids):
    """Logits of the decode steps ids[T:], one token at a time."""
    with torch.no_grad():
        return torch.cat(
            [model(ids[:, t : t + 1], past_key_values=cache).logits for t in range(T, ids.shape[1])], 1
        )


def _past(model, ids):
    with torch.no_grad():
        return model(
            ids[:, :T], past_key_values=DynamicCache(config=model.config), use_cache=True
        ).past_key_values


@pytest.mark.parametrize("legacy", [False, True])
def test_a_compressed_transformers_cache_decodes_as_if_kvexp_had_compressed_the_prefill(legacy):
    model, _ = load("tiny_llama")
    ids = _ids(model)
    past = _past(model, ids)
    if legacy:
        past = tuple((layer.keys, layer.values) for layer in past.layers)
    cache = compress_cache(model, past, "streaming_llm", 12, sink_tokens=4)
    kept = [sorted(layer.positions[0, 0].tolist()) for layer in cache.layers]
    assert kept == [[0, 1, 2, 3, *range(T - 8, T)]] * len(cache.layers)
    assert cache.get_seq_length() == T  # the next token gets its true position

    reference = make_cache(
        model, "streaming_llm", 12, sink_tokens=4
    )  # compressed after the prefill's attention
    with torch.no_grad():
        model(ids[:, :T], past_key_values=reference)
    torch.testing.assert_close(_decode(model, cache, ids), _decode(model, reference, ids), rtol=0, atol=1e-5)


def test_the_kvcompress_studys_l2_compress_keeps_the_ratio_of_the_lowest_norm_keys_outside_skipped_layers():
    model, _ = load("tiny_llama")
    past = _past(model, _ids(model))
    keys = [layer.keys.clone() for layer in past.layers]
    cache = compress_cache(model, past, "knorm", keep_ratio=0.5, prune_after=16, skip_layers=[0])
    assert cache.layers[0].length == T and cache.layers[1].length == int(0.5 * T)
    norms = keys[1][0].norm(dim=-1)  # [Hkv, T]
    for head in range(norms.shape[0]):
        expected = sorted(norms[head].argsort()[: T // 2].tolist())
        assert sorted(cache.layers[1].positions[0, head].tolist()) == expected


def test_methods_that_need_the_queries_and_mismatched_caches_are_refused():
    model, _ = load("tiny_llama")
    past = _past(model, _ids(model))
    with pytest.raises(ValueError, match="method=h2o scores with the queries' attention"):
        compress_cache(model, past, "h2o", 12)
    with pytest.raises(ValueError, match="past_key_values has 1 layers; the model has 2"):
        compress_cache(model, [(past.layers[0].keys, past.layers[0].values)], "knorm", 12)
    with pytest.raises(ValueError, match="already a kvexp cache"):
        compress_cache(model, make_cache(model, "knorm", 12), "knorm", 12)


def test_every_kvcompress_call_in_the_usage_table_runs():
    from pathlib import Path

    import kvexp

    text = (Path(__file__).resolve().parents[1] / "docs" / "usage.md").read_text()
    section = text[text.index("## Compressing an existing cache") :]
    calls = [
        row.split("|")[2].strip().strip("`")
        for row in section.splitlines()
        if row.startswith("| `") and "compress_cache(model" in row
    ]
    assert len(calls) == 5
    model, _ = load("tiny_llama")
    ids = _ids(model, 600)
    with torch.no_grad():
        prefill = model(
            ids, past_key_values=DynamicCache(config=model.config), use_cache=True
        ).past_key_values
    for call in calls:
        pkv = tuple((layer.keys.clone(), layer.values.clone()) for layer in prefill.layers)
        cache = eval(call, {"compress_cache": kvexp.compress_cache, "model": model, "pkv": pkv})
        assert cache.get_seq_length() == 600 and len(cache.layers) == 2, call  # the call is valid as written
