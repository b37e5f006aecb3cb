"""lm-eval through the compressed cache: HF parity at full cache, the scoring boundary against the masking oracle,
budgets, generation, and offline lm-eval runs on kvexp's local tasks."""

import json
import logging
import math

import pytest
import torch
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM
from omegaconf import OmegaConf

from kvexp.files import Journal
from kvexp.methods import build_method
from kvexp.tasks.lm_eval_harness import (
    LOCAL_TASKS_DIR,
    CompressedLM,
    check_lm_eval_dataset,
    evaluate_lm_eval,
    summary_aggregate,
    task_metrics,
)
from tests.conftest import ROOT, load
from tests.oracle import Visibility, oracle_logits

CONTEXT = (
    "Building log. The code of the red locker is 4821. The night shift reported nothing unusual. "
    "The code of the blue locker is 7305. Question: What is the code of the red locker?\nAnswer:"
)
ENGINE = {"slack": 0, "when": "always", "positions": "original", "head_budgets": None}
BUDGET = {"tokens": 32, "keep_ratio": None, "per_layer": None, "per_head": None, "allocation": "uniform"}


def _requests(kind, args):
    return [Instance(kind, {}, a, i, ("t", i, 1)) for i, a in enumerate(args)]


def _dataset(**overrides):
    cfg = OmegaConf.load(ROOT / "conf" / "dataset" / "lm_eval.yaml")
    cfg.merge_with(overrides)
    return cfg


def _budget_bounded(budget):
    """A make_cache recorder asserting every step attends to at most budget cached keys + its own tokens."""

    def record(layer, q):
        assert layer.physical_length() - q <= budget

    return record


def test_full_cache_matches_lm_evals_hf_model():
    model, tok = load("tiny_llama")
    args = [
        (CONTEXT, " 4821"),
        (CONTEXT, " 7305"),  # same context: scored in the same batched step
        (CONTEXT, " 48"),  # shorter continuation in that batch: right padding must not leak
        ("Question: ", "two words"),  # trailing space moves into the continuation (lm-eval's rule)
        ("", "empty context"),  # the prefix token stands in for it
    ]
    text = "The corridor lights were replaced. A cat was seen near the loading bay. " * 3
    hf = HFLM(pretrained=model, tokenizer=tok, batch_size=1)
    want = hf.loglikelihood(_requests("loglikelihood", args), disable_tqdm=True)
    want_rolling = hf.loglikelihood_rolling(_requests("loglikelihood_rolling", [(text,)]), disable_tqdm=True)

    lm = CompressedLM(model, tok, "full", progress=False)
    got = lm.loglikelihood(_requests("loglikelihood", args), disable_tqdm=True)
    for (g, g_greedy), (w, w_greedy) in zip(got, want, strict=True):
        assert g == pytest.approx(w, abs=1e-4)
        assert g_greedy == w_greedy
    rolling = lm.loglikelihood_rolling(_requests("loglikelihood_rolling", [(text,)]), disable_tqdm=True)
    assert rolling[0] == pytest.approx(want_rolling[0], abs=1e-3)
    assert len(lm.records) == len(args) + 1
    assert lm.records[0]["cache_run"] == lm.records[1]["cache_run"] == lm.records[2]["cache_run"]
    assert [r["doc_id"] for r in lm.records[: len(args)]] == list(range(len(args)))


def test_is_greedy_when_the_continuation_is_the_argmax():
    model, tok = load("tiny_llama")
    context = tok.encode(CONTEXT)
    greedy = []
    with torch.no_grad():
        for _ in range(3):
            logits = model(torch.tensor([context + greedy]), use_cache=False).logits
            greedy.append(int(logits[0, -1].argmax()))
    lm = CompressedLM(model, tok, "full", progress=False)
    other = [(greedy[0] + 1) % model.config.vocab_size, *greedy[1:]]
    (_, hit), (_, miss) = lm._loglikelihood_tokens([((), context, greedy), ((), context, other)], True)
    assert hit and not miss


@pytest.mark.parametrize(
    "method, params, prefill_chunk_size",
    [
        ("h2o", {}, None),
        ("h2o", {}, 8),  # chunked prefill: compression between chunks
        ("snapkv", {"window_size": 4, "kernel_size": 3}, None),
        ("streaming_llm", {}, None),
    ],
)
def test_continuation_is_scored_against_the_compressed_context(method, params, prefill_chunk_size):
    """The masking oracle: the plain model over (context + continuation)[:-1], hiding the context keys the cache
    evicted, gives the wrapper's log-likelihood; every continuation query, the first included, saw the compressed
    context (all of the continuation step's own tokens stay visible)."""
    model, tok = load("tiny_llama")
    context, continuation = tok.encode(CONTEXT), tok.encode(" 4821", add_special_tokens=False)
    inputs = (context + continuation)[:-1]
    vis = Visibility(1, model.config.num_key_value_heads, len(inputs))
    lm = CompressedLM(
        model, tok, method, 16, prefill_chunk_size=prefill_chunk_size, progress=False, recorder=vis, **params
    )
    ((logprob, _),) = lm._loglikelihood_tokens([((), context, continuation)], True)

    logits = oracle_logits(model, torch.tensor([inputs]), vis)
    logprobs = torch.log_softmax(logits[0, len(context) - 1 :], -1)
    want = logprobs.gather(-1, torch.tensor(continuation)[:, None]).sum().item()
    assert logprob == pytest.approx(want, abs=1e-4)
    first = len(context) - 1  # the last context token's query predicts the first continuation token
    seen = vis.masks[0][0, :, first:, : len(context) - 1].sum(-1)  # [Hkv, continuation queries]
    assert (seen <= 16).all()
    step = vis.masks[0][0, :, first:, first:]
    assert torch.equal(step, torch.ones_like(step).tril())

    full = CompressedLM(model, tok, "full", progress=False)._loglikelihood_tokens(
        [((), context, continuation)], True
    )
    assert abs(full[0][0] - logprob) > 1e-3  # the budget really changed the score


def test_budget_changes_a_one_token_continuation_and_bounds_the_cache():
    model, tok = load("tiny_llama")
    args = [(CONTEXT, " 4"), (CONTEXT, " 7")]
    full = CompressedLM(model, tok, "full", progress=False).loglikelihood(
        _requests("loglikelihood", args), True
    )
    lm = CompressedLM(model, tok, "h2o", BUDGET, progress=False, recorder=_budget_bounded(32), **ENGINE)
    compressed = lm.loglikelihood(_requests("loglikelihood", args), True)
    assert all(abs(a[0] - b[0]) > 1e-3 for a, b in zip(full, compressed, strict=True))
    context_tokens = len(tok.encode(CONTEXT))
    for record in lm.records:
        assert record["kv_tokens_seen"] == context_tokens - 1
        assert record["kv_tokens_kept"] == 32
        assert record["kv_bytes_kept"] < record["kv_bytes_full"]


def test_shared_context_scores_equal_separate_scores():
    model, tok = load("tiny_llama")
    args = [(CONTEXT, " 4821"), (CONTEXT, " 7305 and more")]
    together = CompressedLM(model, tok, "h2o", 24, progress=False).loglikelihood(
        _requests("loglikelihood", args), True
    )
    for arg, (logprob, _) in zip(args, together, strict=True):
        alone = CompressedLM(model, tok, "h2o", 24, progress=False).loglikelihood(
            _requests("loglikelihood", [arg]), True
        )
        assert alone[0][0] == pytest.approx(logprob, abs=1e-4)


def test_keep_ratio_budget_is_resolved_from_each_context():
    model, tok = load("tiny_llama")
    budget = {**BUDGET, "tokens": None, "keep_ratio": 0.25}
    lm = CompressedLM(model, tok, "streaming_llm", budget, progress=False)
    short = "Log: the code is 12."
    lm.loglikelihood(_requests("loglikelihood", [(CONTEXT, " 4821"), (short * 4, " 12")]), True)
    for record in lm.records:
        assert record["kv_tokens_kept"] == max(1, int(0.25 * record["context_tokens"]))


def _greedy_reference(model, ids, steps, eos):
    out = []
    with torch.no_grad():
        for _ in range(steps):
            token = int(model(torch.tensor([ids + out]), use_cache=False).logits[0, -1].argmax())
            if token == eos:
                break
            out.append(token)
    return out


def test_a_journal_gives_back_a_caches_requests_only_with_the_same_inputs(tmp_path):
    model, tok = load("tiny_llama")

    def lm():
        journal = Journal(tmp_path / "j.jsonl", {"work": 1})
        return CompressedLM(model, tok, "streaming_llm", 16, progress=False, journal=journal)

    args = [(CONTEXT, " 4821"), (CONTEXT, " 7305"), ("Question:", " no")]
    first = lm()
    want = first.loglikelihood(_requests("loglikelihood", args), disable_tqdm=True)
    gen = first.generate_until(
        _requests("generate_until", [(CONTEXT, {"until": [], "max_gen_toks": 3})]), True
    )
    again = lm()
    assert again.loglikelihood(_requests("loglikelihood", args), disable_tqdm=True) == want
    assert (
        again.generate_until(_requests("generate_until", [(CONTEXT, {"until": [], "max_gen_toks": 3})]), True)
        == gen
    )
    assert again.restored == 4 and again.records == first.records  # timings included: nothing was run again

    changed = lm()  # the first context's second continuation differs: its cache's requests run again
    got = changed.loglikelihood(_requests("loglikelihood", [*args[:1], (CONTEXT, " 9999"), *args[2:]]), True)
    assert changed.restored == 1 and got[2] == want[2] and got[1] != want[1]
    assert got[0][0] == pytest.approx(want[0][0], abs=1e-5)
    assert changed.records[0]["seconds"] != first.records[0]["seconds"]


def test_generate_until_decodes_greedily_and_stops_at_the_stop_string():
    model, tok = load("tiny_llama")
    reference = _greedy_reference(model, tok.encode(CONTEXT), 8, tok.eos_token_id)
    full_text = tok.decode(reference, skip_special_tokens=True)
    lm = CompressedLM(model, tok, "full", progress=False)
    (text,) = lm.generate_until(
        _requests("generate_until", [(CONTEXT, {"until": [], "max_gen_toks": 8})]), True
    )
    assert text == full_text

    stop = full_text[len(full_text) // 2]
    (text,) = lm.generate_until(
        _requests("generate_until", [(CONTEXT, {"until": [stop], "max_gen_toks": 8})]), True
    )
    assert text == full_text.split(stop)[0]
    stopped_after = next(
        k for k in range(1, 9) if stop in tok.decode(reference[:k], skip_special_tokens=True)
    )
    assert lm.records[-1]["continuation_tokens"] == stopped_after


def test_generation_decodes_through_the_budget():
    model, tok = load("tiny_llama")
    lm = CompressedLM(model, tok, "streaming_llm", 16, progress=False, recorder=_budget_bounded(16))
    request = _requests("generate_until", [(CONTEXT, {"until": [], "max_gen_toks": 6})])
    lm.generate_until(request, True)
    record = lm.records[-1]
    assert record["kv_tokens_kept"] == 16
    assert record["kv_tokens_seen"] == len(tok.encode(CONTEXT)) - 1 + record["continuation_tokens"]
    assert record["ttft_s"] > 0


def test_lm_eval_run_on_the_local_tasks_offline_limit_2():
    model, tok = load("tiny_llama")
    dataset = _dataset(tasks=["kvexp_recall", "kvexp_recall_gen"], limit=2, bootstrap_iters=0)
    metrics, rows = evaluate_lm_eval(
        dataset, model, tok, "streaming_llm", OmegaConf.create(BUDGET), ENGINE, seed=0, progress=False
    )
    assert 0.0 <= metrics["kvexp_recall/acc"] <= 1.0
    assert "kvexp_recall_gen/exact_match,strip" in metrics
    assert metrics["requests"] == len(rows) == 2 * 4 + 2  # four choices per document, one generation each
    assert metrics["cache_runs"] == 4  # the four choices of a document share one compressed context
    assert metrics["samples"] == 4  # two documents of each task
    contexts = {r["cache_run"]: r["context_tokens"] for r in rows}  # a shared context runs once
    assert metrics["tokens"] == sum(contexts.values()) + sum(r["continuation_tokens"] for r in rows)
    timing = summary_aggregate(metrics)["timing"]
    assert timing["throughput_tok_s"] == pytest.approx(metrics["tokens"] / metrics["total_s"])
    assert "kv_tokens_full" not in summary_aggregate(metrics)["metrics"]  # a cost, not a quality
    assert metrics["kv_tokens_kept"] == 32 and metrics["compression_ratio"] > 0.9

    docs = [json.loads(line) for line in (LOCAL_TASKS_DIR / "kv_recall.jsonl").read_text().splitlines()]
    for doc_id in (0, 1):
        choices = sorted(
            (r for r in rows if r["task"] == "kvexp_recall" and r["doc_id"] == doc_id),
            key=lambda r: r["request"],
        )
        best = max(range(4), key=lambda i: choices[i]["loglikelihood"])
        assert choices[0]["acc"] == float(best == docs[doc_id]["answer"])
    generated = [r for r in rows if r["task"] == "kvexp_recall_gen"]
    assert all(isinstance(r["generation"], str) and "exact_match,strip" in r for r in generated)


def test_the_local_rolling_task_streams_each_log_through_the_budget(caplog):
    """kvexp_recall_ppl, two logs three at a time: each log streamed once through a 32-entry cache, and lm-eval's
    perplexities recomputed from the requests' log-likelihoods (its weighted aggregates: words and UTF-8 bytes); the
    task names each metric's aggregation and direction, so lm-eval warns of no default it had to pick."""
    caplog.set_level(logging.WARNING)
    model, tok = load("tiny_llama")
    dataset = _dataset(tasks=["kvexp_recall_ppl"], limit=2, bootstrap_iters=0, batch_size=3)
    metrics, rows = evaluate_lm_eval(
        dataset, model, tok, "streaming_llm", OmegaConf.create(BUDGET), ENGINE, seed=0, progress=False
    )
    docs = [json.loads(line) for line in (LOCAL_TASKS_DIR / "kv_recall.jsonl").read_text().splitlines()][:2]
    assert [r["doc_id"] for r in rows] == [0, 1] and metrics["cache_runs"] == 2
    for row, doc in zip(rows, docs, strict=True):
        assert row["request_type"] == "loglikelihood_rolling"
        assert row["continuation_tokens"] == len(tok.encode(doc["context"]))  # every token after the prefix
        assert row["kv_tokens_kept"] == 32 < row["kv_tokens_seen"]
    total = sum(r["loglikelihood"] for r in rows)
    words = sum(len(doc["context"].split()) for doc in docs)
    utf8 = sum(len(doc["context"].encode()) for doc in docs)
    assert metrics["kvexp_recall_ppl/word_perplexity"] == pytest.approx(math.exp(-total / words), rel=1e-6)
    assert metrics["kvexp_recall_ppl/byte_perplexity"] == pytest.approx(math.exp(-total / utf8), rel=1e-6)
    assert metrics["kvexp_recall_ppl/bits_per_byte"] == pytest.approx(-total / utf8 / math.log(2), rel=1e-6)
    assert not [r.message for r in caplog.records if "is defined, but" in r.message]


def test_own_task_yaml_through_include_path(tmp_path):
    records = [
        {
            "context": "The code of the red safe is 1234.",
            "question": "Code?",
            "choices": ["1234", "9876"],
            "answer": 0,
        },
        {
            "context": "The code of the blue safe is 5555.",
            "question": "Code?",
            "choices": ["1111", "5555"],
            "answer": 1,
        },
    ]
    data = tmp_path / "mine.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "my_recall.yaml").write_text(
        (LOCAL_TASKS_DIR / "kvexp_recall.yaml")
        .read_text()
        .replace("task: kvexp_recall", "task: my_recall")
        .replace("utils.load_jsonl", "kvexp.tasks.lm_eval_tasks.utils.load_jsonl")
        .replace("data_file: kv_recall.jsonl", f"data_file: {data}")
    )
    model, tok = load("tiny_llama")
    dataset = _dataset(tasks=["my_recall"], include_path=str(tmp_path / "tasks"), bootstrap_iters=0)
    metrics, rows = evaluate_lm_eval(dataset, model, tok, "full", None, {}, seed=0, progress=False)
    assert metrics["my_recall/acc"] in (0.0, 0.5, 1.0)
    assert len(rows) == 4 and metrics["compression_ratio"] == 0.0


def test_default_dataset_config_is_valid():
    cfg = OmegaConf.load(ROOT / "conf" / "dataset" / "lm_eval.yaml")
    assert cfg.name == cfg.task == "lm_eval"
    assert list(cfg.tasks) == ["kvexp_recall"]
    assert cfg.batch_size == 1 and cfg.limit is None and cfg.num_fewshot is None and cfg.include_path is None
    check_lm_eval_dataset(cfg)


@pytest.mark.parametrize(
    "override, message",
    [
        ({"tasks": []}, "dataset.tasks"),
        ({"limit": 0}, "dataset.limit"),
        ({"limit": 1.5}, "dataset.limit"),
        ({"num_fewshot": -1}, "dataset.num_fewshot"),
        ({"batch_size": 0}, "dataset.batch_size"),
        ({"include_path": "/no/such/dir"}, "dataset.include_path"),
    ],
)
def test_bad_config_values_fail_early(override, message):
    with pytest.raises(ValueError, match=message):
        check_lm_eval_dataset(_dataset(**override))


@pytest.mark.slow  # an unknown name is looked up among lm-eval's ~15k stock task YAMLs: indexing them takes 10-30 s
def test_unknown_task_names_the_available_ones():
    with pytest.raises(ValueError) as err:
        check_lm_eval_dataset(_dataset(tasks=["kvexp_recall", "hellaswg"]))
    message = str(err.value)
    assert "['hellaswg']" in message
    assert "kvexp_recall_gen" in message  # the local tasks are listed
    assert "hellaswag" in message  # and the close stock names


def test_task_metrics_flatten_names_with_filters():
    results = {"t": {"alias": "t", "acc,none": 0.5, "acc_stderr,none": "N/A", "exact_match,strip": 1}}
    assert task_metrics(results) == {"t/acc": 0.5, "t/exact_match,strip": 1}


def test_dataset_lm_eval_runs_through_train_or_eval(tmp_path):
    """`python -m kvexp dataset=lm_eval` end to end: metrics before (full cache) and after, objective, rows."""
    from kvexp.app import train_or_eval
    from tests.test_config import _compose

    config = _compose(
        "model=tiny_llama", "dataset=lm_eval", "dataset.limit=2", "dataset.bootstrap_iters=0", "method=streaming_llm",
        "budget.tokens=16", "cache_dir=null",
    )  # fmt: skip
    summary = train_or_eval(config, tmp_path / "out")
    assert summary["task"] == "lm_eval"
    assert "kvexp_recall/acc" in summary["metrics_after"] and "kvexp_recall/acc" in summary["metrics_before"]
    assert summary["objective"] == summary["metrics_after"]["kvexp_recall/acc"]
    assert summary["kv_cache"]["tokens_kept"] <= 16
    assert (tmp_path / "out" / "samples.csv").read_text().count("\n") >= 2


# A batched row's time and bytes held are its shares of the batch's (padding slots are memory too).
SHARED = ("seconds", "ttft_s", "tpot_ms", "compress_s", "kv_bytes_kept")


BATCHED = [
    ("full", None),
    ("streaming_llm", {**BUDGET, "tokens": None, "keep_ratio": 0.25}),  # a budget per row, rows of any length
    (build_method("snapkv", window_size=4), {**BUDGET, "tokens": None, "keep_ratio": 0.5}),
    ("h2o", 24),  # one budget: every row over it
]
FILLER = " The corridor lights were replaced on the night shift."


@pytest.mark.parametrize(("method", "budget"), BATCHED)
def test_batched_generation_gives_each_request_what_it_gets_alone(method, budget, monkeypatch):
    """generate_until, three requests at a time: contexts of different lengths (left-padded, so dead slots and
    per-row positions), stops and lengths; the same texts and cache figures as one at a time, in lm-eval's order."""
    model, tok = load("tiny_llama")
    asks = [
        (CONTEXT, {"until": [], "max_gen_toks": 6}),
        (FILLER * 3 + CONTEXT, {"until": ["\n"], "max_gen_toks": 4}),
        (FILLER + CONTEXT, {"until": ["."], "max_gen_toks": 8}),
        ("Question: " + FILLER, {"until": [], "max_gen_toks": 1}),
        (FILLER * 2 + CONTEXT, {"until": [], "max_gen_toks": 5}),
    ]
    calls = []
    real = CompressedLM._generate

    def recording(self, asked, runs):
        calls.append(len(asked))
        return real(self, asked, runs)

    monkeypatch.setattr(CompressedLM, "_generate", recording)
    alone = CompressedLM(model, tok, method, budget, progress=False, when="always")
    want = alone.generate_until(_requests("generate_until", asks), True)
    together = CompressedLM(model, tok, method, budget, progress=False, when="always", batch_size=3)
    got = together.generate_until(_requests("generate_until", asks), True)
    assert got == want and calls[:5] == [1] * 5 and max(calls[5:]) > 1  # some requests did share a batch
    for a, b in zip(alone.records, together.records, strict=True):
        assert {k: v for k, v in a.items() if k not in SHARED} == {
            k: v for k, v in b.items() if k not in SHARED
        }
    assert [r["continuation_tokens"] for r in together.records][3] == 1


def test_a_method_that_cannot_batch_is_refused_a_batch_size():
    from kvexp.config import validate
    from tests.test_config import _compose

    model, tok = load("tiny_llama")
    with pytest.raises(ValueError, match="method=dynamickv cannot answer a batch"):
        CompressedLM(model, tok, "dynamickv", 16, batch_size=2)
    with pytest.raises(ValueError, match=r"dataset.batch_size=2: method=dynamickv cannot answer a batch"):
        validate(_compose("model=tiny_llama", "dataset=lm_eval", "dataset.batch_size=2", "method=dynamickv"))
    validate(_compose("model=tiny_llama", "dataset=lm_eval", "dataset.batch_size=2", "method=snapkv"))


@pytest.mark.parametrize(("method", "budget"), BATCHED)
def test_batched_loglikelihoods_score_each_context_as_alone(method, budget):
    """Log-likelihood contexts three at a time, of different lengths and with 1-4 choices each (a row per choice,
    a copy of its context's compressed row): the same scores (to float rounding), greedy flags and cache figures
    as one context at a time."""
    model, tok = load("tiny_llama")
    args = [
        (CONTEXT, " 4821"), (CONTEXT, " 7305"), (CONTEXT, " 48"),  # three choices of one context
        (FILLER * 3 + CONTEXT, " 7305"), (FILLER * 3 + CONTEXT, " red locker"),
        ("Question: " + FILLER, " yes"),
        (FILLER + CONTEXT, " 4821"), (FILLER + CONTEXT, " 1"), (FILLER + CONTEXT, " 7305"), (FILLER + CONTEXT, " 9"),
    ]  # fmt: skip
    alone = CompressedLM(model, tok, method, budget, progress=False, when="always")
    want = alone.loglikelihood(_requests("loglikelihood", args), disable_tqdm=True)
    together = CompressedLM(model, tok, method, budget, progress=False, when="always", batch_size=3)
    got = together.loglikelihood(_requests("loglikelihood", args), disable_tqdm=True)
    for (g, g_greedy), (w, w_greedy) in zip(got, want, strict=True):
        assert g == pytest.approx(w, abs=1e-4) and g_greedy == w_greedy
    assert len({r["cache_run"] for r in together.records}) == 4  # a cache per context, whatever the batch
    for a, b in zip(alone.records, together.records, strict=True):
        same = (*SHARED, "loglikelihood")
        assert {k: v for k, v in a.items() if k not in same} == {k: v for k, v in b.items() if k not in same}


@pytest.mark.parametrize(("method", "budget"), BATCHED)
def test_batched_rolling_documents_score_each_document_as_alone(method, budget, monkeypatch):
    """Rolling documents three at a time, of different lengths (a row leaves when its document ends, each row its
    own budget): the same log-likelihoods (to float rounding), greedy flags and cache figures as one at a time, in
    lm-eval's order."""
    import kvexp.tasks.lm_eval_harness as harness

    model, tok = load("tiny_llama")
    texts = [FILLER * 2, FILLER * 5 + CONTEXT, FILLER * 4, CONTEXT, FILLER * 2 + CONTEXT, FILLER * 3]
    sizes = []
    real = harness.score_batch

    def recording(model, documents, *args, **kwargs):
        sizes.append(len(documents))
        return real(model, documents, *args, **kwargs)

    monkeypatch.setattr(harness, "score_batch", recording)
    alone = CompressedLM(model, tok, method, budget, progress=False, chunk_size=3, when="always")
    want = alone.loglikelihood_rolling(_requests("loglikelihood_rolling", [(t,) for t in texts]), True)
    together = CompressedLM(
        model, tok, method, budget, progress=False, chunk_size=3, when="always", batch_size=3
    )
    got = together.loglikelihood_rolling(_requests("loglikelihood_rolling", [(t,) for t in texts]), True)
    assert sizes[:5] == [1] * 5 and max(sizes[5:]) > 1  # some documents did share a batch
    assert got == pytest.approx(want, abs=1e-4)
    assert [r["doc_id"] for r in together.records] == list(range(len(texts)))
    for a, b in zip(alone.records, together.records, strict=True):
        same = (*SHARED, "loglikelihood")
        assert {k: v for k, v in a.items() if k not in same} == {k: v for k, v in b.items() if k not in same}
    if budget is not None:  # the budget bounds the long documents' caches
        assert together.records[1]["kv_tokens_kept"] < together.records[1]["kv_tokens_seen"]
