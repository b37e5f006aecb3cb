"""Selective Context prompt compression (kvexp.tasks.context_compression) against hand-computed references."""

import math

import pytest
import torch

from kvexp.tasks.context_compression import (
    UNITS,
    ContextCompression,
    lexical_units,
    self_information,
    token_pieces,
    unit_information,
)
from tests.conftest import load

TEXT = (
    "The quick brown fox jumps over the lazy dog. Mr. Smith met Dr. Jones in Paris, e.g. near the river! "
    "Was it raining? Nobody knows.\n\nA new paragraph starts here without a stop\n"
    "and it goes on, line after line. The end."
)
SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Mr. Smith met Dr. Jones in Paris, e.g. near the river!",
    "Was it raining?",
    "Nobody knows.",
    "A new paragraph starts here without a stop\nand it goes on, line after line.",
    "The end.",
]


def context(tokenizer, text: str = TEXT) -> torch.Tensor:
    return torch.tensor([tokenizer(text).input_ids])


def reference_information(model, ids: torch.Tensor) -> list[float]:
    """-log_softmax of one forward's logits, by hand: position t is predicted by the logits at t - 1."""
    with torch.no_grad():
        logp = model(input_ids=ids).logits[0].float().log_softmax(-1)
    row = ids[0].tolist()
    return [math.inf] + [-float(logp[t - 1, row[t]]) for t in range(1, len(row))]


def unit_texts(tokenizer, ids: torch.Tensor, unit: str) -> list[str]:
    pieces = token_pieces(tokenizer, ids)
    texts: dict[int, str] = {}
    for piece, u in zip(pieces, lexical_units(tokenizer, ids, unit).tolist(), strict=True):
        texts[u] = texts.get(u, "") + piece
    return [texts[u] for u in sorted(texts)]


def special_free(tokenizer, texts: list[str]) -> list[str]:
    special = {tokenizer.decode([i]) for i in tokenizer.all_special_ids}
    return [t.strip() for t in texts if t not in special]


def hand_selection(info: list[float], units: list[int], target: int) -> set[int]:
    """The paper's percentile rule over units, sized in tokens: rank units by summed information (highest
    first, earlier first on ties); keep the ranking prefix whose token count is nearest the target (the longer
    on ties), never leaving out a +inf unit."""
    sums: dict[int, float] = {}
    sizes: dict[int, int] = {}
    for value, u in zip(info, units, strict=True):
        sums[u] = sums.get(u, 0.0) + value
        sizes[u] = sizes.get(u, 0) + 1
    ranking = sorted(sums, key=lambda u: (-sums[u], u))
    forced = sum(1 for u in sums if sums[u] == math.inf)
    best, best_gap, count = forced, None, 0
    for k in range(len(ranking) + 1):
        if k >= forced and (best_gap is None or abs(count - target) <= best_gap):
            best, best_gap = k, abs(count - target)
        if k < len(ranking):
            count += sizes[ranking[k]]
    return set(ranking[:best])


@pytest.mark.parametrize("name", ["tiny_llama", "tiny_gpt2", "tiny_qwen3", "tiny_gemma3"])
def test_self_information_is_the_models_surprisal(name):
    model, tokenizer = load(name)
    ids = context(tokenizer)[:, :60]
    reference = torch.tensor(reference_information(model, ids), device="cpu")
    for chunk_size in (60, 61, 1024):  # the chunk covers the context: one forward
        info = self_information(model, ids, chunk_size)
        assert info.shape == (60,) and info.dtype == torch.float32
        assert info[0] == math.inf
        torch.testing.assert_close(info[1:], reference[1:], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(self_information(model, ids[0], 1024), info)  # [n] ids as well


def test_sliding_window_is_bounded_and_scores_each_token_once():
    model, tokenizer = load("tiny_llama")
    ids = context(tokenizer)[:, :50]
    row = ids[0].tolist()
    chunk, stride = 8, 4
    lengths = []
    hook = model.register_forward_pre_hook(
        lambda m, args, kwargs: lengths.append(kwargs["input_ids"].shape[1]), with_kwargs=True
    )
    try:
        info = self_information(model, ids, chunk)
    finally:
        hook.remove()
    assert max(lengths) == chunk  # memory does not grow with the context
    assert len(lengths) == 1 + math.ceil((50 - chunk) / stride)
    full = reference_information(model, ids)
    torch.testing.assert_close(
        info[1:chunk], torch.tensor(full[1:chunk], device="cpu"), atol=1e-4, rtol=1e-4
    )  # the first window
    # Later tokens, by the documented rule: t's window ends at `stop` (the first chunk + whole strides past
    # t) and starts with the sink (token 0) then the chunk - 1 tokens before `stop`; causality lets us cut it
    # at t.
    for t in range(chunk, 50):
        stop = min(chunk + ((t - chunk) // stride + 1) * stride, 50)
        start = stop - (chunk - 1)
        assert t - start >= chunk - stride - 1  # real context before t besides the sink
        prefix = torch.tensor([[row[0]] + row[start:t]])
        with torch.no_grad():
            logp = model(input_ids=prefix).logits[0, -1].float().log_softmax(-1)
        assert info[t].item() == pytest.approx(-logp[row[t]].item(), abs=1e-4, rel=1e-4)


@pytest.mark.parametrize("name", ["tiny_llama", "smollm2_135m"])
def test_lexical_units(name):
    _, tokenizer = load(name)
    ids = context(tokenizer)
    assert "".join(token_pieces(tokenizer, ids)) == tokenizer.decode(
        ids[0], skip_special_tokens=False, clean_up_tokenization_spaces=False
    )
    assert lexical_units(tokenizer, ids, "token").tolist() == list(range(ids.shape[1]))
    for unit in ("word", "sentence"):
        units = lexical_units(tokenizer, ids, unit)
        steps = units.diff()
        assert units[0] == 0 and bool(((steps == 0) | (steps == 1)).all())  # runs of consecutive tokens
    assert special_free(tokenizer, unit_texts(tokenizer, ids, "word")) == TEXT.split()
    assert special_free(tokenizer, unit_texts(tokenizer, ids, "sentence")) == SENTENCES
    # A unit never straddles the kept prefix's end, even inside a word.
    units = lexical_units(tokenizer, ids, "word", keep_prefix=3)
    assert units[3] == units[2] + 1


@pytest.mark.parametrize("unit", UNITS)
def test_units_sum_their_tokens_information(unit):
    model, tokenizer = load("tiny_llama")
    ids = context(tokenizer)
    info = self_information(model, ids)
    units = lexical_units(tokenizer, ids, unit).tolist()
    sums: dict[int, float] = {}
    for value, u in zip(info.tolist(), units, strict=True):
        sums[u] = sums.get(u, 0.0) + value
    got = unit_information(info, torch.tensor(units))
    assert got[0] == math.inf  # the first token's unit
    torch.testing.assert_close(
        got[1:], torch.tensor([sums[u] for u in sorted(sums)][1:], device="cpu"), atol=1e-3, rtol=1e-5
    )


@pytest.mark.parametrize("unit", UNITS)
@pytest.mark.parametrize("keep", [0.1, 0.3, 0.5, 0.77, 1.0])
def test_the_most_informative_units_survive_in_order(unit, keep):
    model, tokenizer = load("tiny_llama")
    ids = context(tokenizer)
    n = ids.shape[1]
    info = reference_information(model, ids)  # by hand
    units = lexical_units(tokenizer, ids, unit).tolist()
    target = round(keep * n)
    chosen = hand_selection(info, units, target)
    kept, stats = ContextCompression(keep=keep, unit=unit).compress(model, tokenizer, ids)
    positions = [t for t in range(n) if units[t] in chosen]
    assert kept.shape == (1, len(positions)) and kept.dtype == torch.long
    assert kept[0].tolist() == [
        ids[0, t].item() for t in positions
    ]  # the chosen units, in the original order
    sums = {u: sum(v for v, w in zip(info, units, strict=True) if w == u) for u in set(units)}
    assert min(sums[u] for u in chosen) >= max((sums[u] for u in sums if u not in chosen), default=-math.inf)
    sizes = [units.count(u) for u in set(units)]
    if unit == "token":
        assert len(positions) == target  # the token fraction exactly
    assert abs(len(positions) - target) <= max(sizes) / 2  # coarser units: within half a unit
    assert stats["tokens_before"] == n and stats["tokens_after"] == len(positions)
    assert stats["tokens_dropped"] == n - len(positions) and stats["target_tokens"] == target
    assert stats["units_before"] == len(sums) and stats["units_after"] == len(chosen)
    assert stats["units_dropped"] == len(sums) - len(chosen)
    finite = [sums[u] for u in chosen if sums[u] < math.inf]
    assert stats["threshold"] == (pytest.approx(min(finite), rel=1e-4) if finite else None)
    if keep == 1.0:
        assert torch.equal(kept, ids)


def test_keep_prefix_is_kept_verbatim_and_outside_the_fraction():
    model, tokenizer = load("tiny_qwen2")
    ids = context(tokenizer)
    n, prefix = ids.shape[1], 20
    kept, stats = ContextCompression(keep=0.25, unit="token").compress(
        model, tokenizer, ids, keep_prefix=prefix
    )
    assert torch.equal(kept[:, :prefix], ids[:, :prefix])
    assert stats["tokens_after"] == prefix + round(0.25 * (n - prefix))
    # The rest is the highest-information tokens after the prefix, still scored with the prefix as context.
    info = reference_information(model, ids)
    rest = sorted(range(prefix, n), key=lambda t: (-info[t], t))[: round(0.25 * (n - prefix))]
    assert kept[0, prefix:].tolist() == [ids[0, t].item() for t in sorted(rest)]


def test_deterministic_on_the_input_device_and_one_context_only():
    model, tokenizer = load("tiny_mistral")
    ids = context(tokenizer)
    method = ContextCompression(keep=0.4, unit="word", chunk_size=16)  # sliding window too
    first, stats = method.compress(model, tokenizer, ids)
    again, stats_again = method.compress(model, tokenizer, ids[0])
    assert torch.equal(first, again) and stats == stats_again
    assert first.device == ids.device and first.shape[0] == 1
    with pytest.raises(ValueError, match="one context"):
        method.compress(model, tokenizer, ids.repeat(2, 1))


@pytest.mark.slow
def test_chat_template_markers_and_header_survive():
    model, tokenizer = load("smollm2_135m")
    text = tokenizer.apply_chat_template([{"role": "user", "content": TEXT}], tokenize=False)
    ids = torch.tensor([tokenizer(text, add_special_tokens=False).input_ids])
    header = tokenizer(text[: text.index(TEXT)], add_special_tokens=False).input_ids
    assert ids[0, : len(header)].tolist() == header
    kept, stats = ContextCompression(keep=0.2, unit="word").compress(
        model, tokenizer, ids, keep_prefix=len(header)
    )
    assert kept[0, : len(header)].tolist() == header
    special = [i for i in ids[0].tolist() if i in tokenizer.all_special_ids]
    assert special and [i for i in kept[0].tolist() if i in tokenizer.all_special_ids] == special
    assert stats["tokens_after"] < len(header) + 0.3 * (ids.shape[1] - len(header))


def test_a_one_token_context_is_kept():
    model, tokenizer = load("tiny_llama")
    ids = context(tokenizer)[:, :1]
    kept, stats = ContextCompression(keep=0.1).compress(model, tokenizer, ids)
    assert torch.equal(kept, ids) and stats["tokens_dropped"] == 0 and stats["threshold"] is None


@pytest.mark.slow
def test_a_repeated_sentence_is_the_least_informative():
    """With a real model, the second copy of a sentence is predictable: Selective Context drops it, not its
    first copy nor a new sentence of similar length."""
    model, tokenizer = load("smollm2_135m")
    first = "The violinist from Reykjavik adopted seventeen orange cats last winter."
    other = "A storm in the harbour sank two fishing boats before the ferry arrived."
    text = f"Notes:\n\n{first} {other} {first}"
    ids = context(tokenizer, text)
    units = lexical_units(tokenizer, ids, "sentence")
    assert int(units.max()) == 3  # the heading, the sentence, the other one, the copy
    copy = int((units == 3).sum())
    info = unit_information(self_information(model, ids), units)
    assert info[3] < min(info[1], info[2])
    kept, stats = ContextCompression(keep=1 - copy / ids.shape[1], unit="sentence").compress(
        model, tokenizer, ids
    )
    assert stats["units_dropped"] == 1 and stats["tokens_dropped"] == copy
    assert tokenizer.decode(kept[0]) == f"Notes:\n\n{first} {other}"


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("keep", 0.0),
        ("keep", 1.5),
        ("keep", -0.2),
        ("keep", True),
        ("keep", "0.5"),
        ("unit", "phrase"),
        ("unit", None),
        ("chunk_size", 3),
        ("chunk_size", 64.0),
        ("chunk_size", True),
    ],
)
def test_validation(option, value):
    with pytest.raises(ValueError, match=rf"^context_compression\.{option} must ") as error:
        ContextCompression(**{option: value}).validate()
    assert "\n" not in str(error.value)
    ContextCompression().validate()
    ContextCompression(keep=1, unit="sentence", chunk_size=4).validate()


# -- in a run: the config block, pooling_merge's flag, the report --------------------------------------------------


def test_the_config_block_and_pooling_merges_flag_ask_for_it():
    from kvexp.methods import build_method
    from kvexp.tasks.context_compression import DEFAULT_KEEP, requested_compression

    off = {"keep": None, "unit": "word", "chunk_size": 1024}
    assert requested_compression(off, build_method("snapkv")) is None
    assert requested_compression(off, build_method("pooling_merge")) is None
    flagged = requested_compression(off, build_method("pooling_merge", compress_context=True))
    assert (flagged.keep, flagged.unit) == (DEFAULT_KEEP, "word")
    general = requested_compression({**off, "keep": 0.3, "unit": "sentence"}, build_method("snapkv"))
    assert (general.keep, general.unit, general.chunk_size) == (0.3, "sentence", 1024)


def test_bad_options_and_tasks_without_a_context_fail_before_the_model_loads():
    from kvexp.config import validate
    from tests.test_config import _compose

    with pytest.raises(ValueError, match="context_compression.keep must be a number in"):
        validate(_compose("dataset=passkey", "context_compression.keep=1.5"))
    with pytest.raises(ValueError, match="dataset.task=perplexity has none"):
        validate(_compose("context_compression.keep=0.5"))
    with pytest.raises(ValueError, match="dataset.task=perplexity has none"):
        validate(_compose("method=pooling_merge", "method.compress_context=true"))


def _run(tmp_path, name, model, *extra):
    from kvexp.app import train_or_eval
    from tests.test_config import _compose

    cfg = _compose(
        f"model={model}", "dataset=passkey", "dataset.lengths=[512]", "eval.max_samples=2", "method=snapkv",
        "method.window_size=4", "budget=64", "cache_dir=null", *extra,
    )  # fmt: skip
    return train_or_eval(cfg, tmp_path / name)


@pytest.mark.parametrize("model", ["tiny_llama", "tiny_qwen3"])
def test_a_run_reports_the_whole_saving_against_the_original_prompt(tmp_path, model):
    import csv

    plain = _run(tmp_path, "plain", model)
    shortened = _run(tmp_path, "cc", model, "context_compression.keep=0.5", "context_compression.unit=token")
    block = shortened["context_compression"]
    assert block["context_tokens_after"] == pytest.approx(
        block["context_tokens_before"] * 0.5, abs=1
    )  # token units: round(0.5 n) each
    # The full cache the saving is measured against is the original prompt's, as in the uncompressed run: the
    # tokens it held are the original ones (the answers are as long: 8 new tokens each, max_new_tokens).
    assert shortened["kv_cache"]["tokens_seen"] == plain["kv_cache"]["tokens_seen"]
    assert shortened["kv_cache"]["bytes_full"] == plain["kv_cache"]["bytes_full"]
    kv = shortened["kv_cache"]
    assert kv["compression_ratio"] == pytest.approx(1 - kv["tokens_kept"] / kv["tokens_full"])
    assert shortened["metrics_before"] == plain["metrics_before"]  # the baseline answers the original prompts
    with open(tmp_path / "cc" / "samples.csv") as f:
        rows = list(csv.DictReader(f))
    assert [float(r["context_tokens"]) for r in rows] == pytest.approx(
        [block["context_tokens_after"]] * 2, abs=1
    )
