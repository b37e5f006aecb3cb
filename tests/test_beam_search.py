"""Beam search (`eval.num_beams`): transformers' algorithm over the cache's batch rows, exact with compression.

With the full cache kvexp's beam search gives the tokens `model.generate(num_beams=k)` gives. With a compressed
cache each beam row must hold exactly the cache its own tokens would have built alone: after the rows are copied
and reordered, every row's next logits equal a fresh batch-1 cache fed that row's path.
"""

import json
import time
from types import SimpleNamespace

import pytest
import torch

from kvexp.app import train_or_eval
from kvexp.config import validate
from kvexp.methods import METHODS, build_method, make_cache
from kvexp.tasks.generation import BeamSearch, Decoding, Prompt, generate_answer
from tests.conftest import load
from tests.test_config import _compose
from tests.test_method_state import PARAMS

PROMPT = 30
# Storage methods with an evictor that observes (per-slot state and encodings both follow the rows).
STORAGE = {name: {"evict": {"name": "h2o"}} for name in ("kivi", "think", "zack")}
STORAGE["kivi"].update(group_size=4, residual_length=8)  # the tiny model's head dim is 16
# Random's and CaM's draws are each row's own (`slot_uniforms`): a beam draws what its path draws alone.
PARAMS = {**PARAMS, **STORAGE}
NAMES = sorted(n for n, cls in METHODS.items() if cls.compresses or n in STORAGE)


def _prompt(model, seed: int, length: int = PROMPT) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, model.config.vocab_size, (1, length), generator=g)


@torch.no_grad()
def _beam_tokens(model, tokenizer, ids, method, budget, beams, max_new_tokens, eos, length_penalty=1.0):
    cache = make_cache(model, method, budget)
    logits = model(ids, past_key_values=cache).logits[:, -1].float()
    search = BeamSearch(beams, length_penalty, max_new_tokens, eos, tokenizer, ())
    tokens, _, _ = search.run(model, cache, logits, time.perf_counter())
    return tokens, cache


@pytest.mark.parametrize("beams,length_penalty", [(2, 1.0), (3, 1.0), (4, 0.0), (3, 2.0)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_full_cache_beam_search_gives_transformers_tokens(beams, length_penalty, seed):
    model, tok = load("tiny_llama")
    ids = _prompt(model, seed)
    # An EOS id the beams produce early, so hypotheses finish at different lengths and the finished-beam rules
    # (length penalty, the early-stop check) decide the answer: a token of transformers' own greedy answer.
    greedy = model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)[0, PROMPT:].tolist()
    for eos in (None, greedy[1]):
        reference = model.generate(
            ids, num_beams=beams, max_new_tokens=10, do_sample=False, early_stopping=False,
            length_penalty=length_penalty, eos_token_id=eos, pad_token_id=0,
        )[0, PROMPT:].tolist()  # fmt: skip
        ours, _ = _beam_tokens(
            model, tok, ids, "full", None, beams, 10, set() if eos is None else {eos}, length_penalty
        )
        assert ours == reference, (eos, ours, reference)


@torch.no_grad()
def _replay(model, method, budget, ids: torch.Tensor, path: list[int]) -> torch.Tensor:
    """The last logits [V] of a fresh batch-1 cache fed the prompt (one forward) and then `path` token by token."""
    cache = make_cache(model, method, budget)
    logits = model(ids, past_key_values=cache).logits
    for token in path:
        logits = model(torch.tensor([[token]]), past_key_values=cache).logits
    return logits[0, -1]


@pytest.mark.parametrize("name", NAMES)
@torch.no_grad()
def test_reordered_rows_continue_as_their_own_paths(name):
    model, _ = load("tiny_llama")
    params, budget = PARAMS.get(name, {}), 12
    method = build_method(name, **params)
    ids = _prompt(model, 3)
    cache = make_cache(model, method, budget)
    model(ids, past_key_values=cache)  # the prompt, once (batch 1), compressed to the budget
    paths: list[list[int]] = [[]]
    g = torch.Generator().manual_seed(5)
    # The rows as beam search moves them: copied from the prompt's row, then reordered every step (a beam dropped,
    # another one duplicated, two swapped).
    for order in ([0, 0, 0], [1, 1, 2], [2, 0, 1], [0, 0, 2], [1, 2, 2], [2, 1, 0], [0, 1, 1]):
        cache.reorder_cache(torch.tensor(order))
        paths = [list(paths[i]) for i in order]
        tokens = torch.randint(3, model.config.vocab_size, (3, 1), generator=g)
        logits = model(tokens, past_key_values=cache).logits[:, -1]
        for row, token in enumerate(tokens[:, 0].tolist()):
            paths[row].append(token)
            alone = _replay(model, build_method(name, **params), budget, ids, paths[row])
            torch.testing.assert_close(
                logits[row], alone, rtol=1e-4, atol=1e-4, msg=f"{name} row {row} {paths}"
            )


class _Replay:
    """A model and its cache in one, for BeamSearch: each row's logits come from a fresh batch-1 cache fed that
    row's own path (the prompt, then its tokens): the beam search a compressed cache must reproduce."""

    device = torch.device("cpu")

    def __init__(self, model, name: str, budget: int, ids: torch.Tensor):
        self.model, self.name, self.budget, self.ids = model, name, budget, ids
        self.paths: list[list[int]] = [[]]

    def logits(self) -> torch.Tensor:  # [rows, 1, V]
        method = lambda: build_method(self.name, **PARAMS.get(self.name, {}))  # noqa: E731
        return torch.stack([_replay(self.model, method(), self.budget, self.ids, p) for p in self.paths])[
            :, None
        ]

    def reorder_cache(self, index: torch.Tensor) -> None:
        self.paths = [list(self.paths[i]) for i in index.tolist()]

    def __call__(self, last: torch.Tensor, past_key_values) -> SimpleNamespace:
        for row, token in enumerate(last[:, 0].tolist()):
            self.paths[row].append(token)
        return SimpleNamespace(logits=self.logits())


@pytest.mark.parametrize("name", ["h2o", "snapkv", "adakv", "d2o", "kivi", "kvmerger"])
def test_compressed_beam_search_is_the_search_over_independent_caches(name):
    model, tok = load("tiny_llama")
    ids = _prompt(model, 4)
    ours, cache = _beam_tokens(model, tok, ids, build_method(name, **PARAMS.get(name, {})), 12, 3, 6, set())
    assert cache.layers[0].batch == 3 and cache.layers[0].compressions > 0
    replay = _Replay(model, name, 12, ids)
    search = BeamSearch(3, 1.0, 6, set(), tok, ())
    with torch.no_grad():
        reference, _, _ = search.run(replay, replay, replay.logits()[:, -1].float(), time.perf_counter())
    assert ours == reference


def test_one_beam_is_greedy_and_peak_bytes_follow_the_batch():
    model, tok = load("tiny_llama")
    ids = _prompt(model, 6, 40)
    prompt = Prompt(ids[:, :34], ids[:, 34:])
    greedy = generate_answer(model, tok, prompt, "h2o", 12, max_new_tokens=6)
    one = generate_answer(model, tok, prompt, "h2o", 12, max_new_tokens=6, decoding=Decoding(num_beams=1))
    assert one.prediction == greedy.prediction and one.kv_peak_bytes == greedy.kv_peak_bytes
    four = generate_answer(model, tok, prompt, "h2o", 12, max_new_tokens=6, decoding=Decoding(num_beams=4))
    kv = model.config
    row_slot = (
        kv.num_hidden_layers * 2 * kv.num_key_value_heads * (kv.hidden_size // kv.num_attention_heads) * 4
    )
    # Greedy: the 34-token context (batch 1, fp32 K and V) before its compression is the peak. Beams: that, or the
    # 4 rows of budget + question (6) + the decode step's token, whichever is larger.
    assert greedy.kv_peak_bytes == 34 * row_slot
    assert four.kv_peak_bytes == max(34, 4 * (12 + 6 + 1)) * row_slot
    per_token = [r.kv["bytes_full"] / r.kv["tokens_seen"] for r in (greedy, four)]
    assert per_token[1] == 4 * per_token[0]  # the full cache of 4 rows


def _cfg(*extra, dataset=("dataset=passkey", "dataset.lengths=[512]", "dataset.depths=[0.5]")):
    return _compose(
        "model=tiny_llama", *dataset, "eval.max_samples=2", "budget.tokens=48", "cache_dir=null",
        "eval.max_new_tokens=6", *extra,
    )  # fmt: skip


def test_num_beams_runs_end_to_end_for_both_caches(tmp_path):
    summary = train_or_eval(
        _cfg("method=snapkv", "eval.num_beams=3", "eval.length_penalty=0.5"), tmp_path / "b"
    )
    written = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert written["generation"]["decoding"]["num_beams"] == 3
    assert written["generation"]["decoding"]["length_penalty"] == 0.5
    assert (
        summary["metrics_before"] is not None and summary["timing_full"] is not None
    )  # the full cache: beams too
    # Beam rows are memory: 3 rows of the compressed cache at its end, against 3 rows of the full one.
    assert 0 < written["kv_cache"]["bytes_kept"] < written["kv_cache"]["bytes_full"]


@pytest.mark.parametrize(
    "override,message",
    [
        ("eval.num_beams=0", "eval.num_beams must be >= 1"),
        ("eval.do_sample=true", "eval.num_beams=3 with eval.do_sample=true"),
        (None, "beam search applies to generation tasks"),
    ],
)
def test_bad_beam_options_fail_before_the_model_loads(override, message):
    if override is None:  # a perplexity dataset
        cfg = _cfg("eval.num_beams=3", dataset=("dataset=wikitext2",))
    else:
        cfg = _cfg(*([] if override == "eval.num_beams=0" else ["eval.num_beams=3"]), override)
    with pytest.raises(ValueError, match=message):
        validate(cfg)
