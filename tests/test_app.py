"""End to end: the CLI writes the documented outputs; perplexity is exact; multirun and W&B work."""

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kvexp.app
import kvexp.tasks.base
import kvexp.tasks.full_cache
import kvexp.tasks.registry
import kvexp.tracking
from kvexp.app import train_or_eval
from kvexp.config import validate
from kvexp.data import WIKITEXT2
from kvexp.report import format_table
from kvexp.tasks.perplexity import evaluate_perplexity
from tests.conftest import load
from tests.oracle import Visibility, oracle_logits
from tests.test_config import _compose

ROOT = Path(__file__).resolve().parents[1]
TEXT = "It was the best of times, it was the worst of times, it was the age of wisdom. " * 12

SUMMARY_KEYS = {
    "model", "method", "budget", "dataset", "metrics_before", "metrics_after", "kv_cache", "timing", "memory",
    "config", "versions", "seed",
}  # fmt: skip
SAMPLE_FIELDS = [
    "id", "tokens", "perplexity_before", "perplexity_after", "accuracy_before", "accuracy_after", "kept_tokens",
    "compression_ratio", "first_step_s", "ms_per_step", "compress_s",
]  # fmt: skip


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "doc.txt"
    path.write_text(TEXT)
    return path


def _cli(*args, cwd=ROOT):
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    return subprocess.run(
        [sys.executable, "-m", "kvexp", *args], cwd=cwd, capture_output=True, text=True, env=env
    )


def test_cli_end_to_end_writes_summary_and_samples(tmp_path, text_file):
    run_dir = tmp_path / "run"
    proc = _cli(
        "model=tiny_llama", "method=streaming_llm", "budget=32", "dataset=text_file", f"dataset.path={text_file}",
        "eval.max_tokens=120", "eval.chunk_size=4", f"hydra.run.dir={run_dir}", f"cache_dir={tmp_path / 'c'}",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "perplexity" in proc.stdout  # the before/after table
    summary = json.loads((run_dir / "summary.json").read_text())
    assert set(summary) >= SUMMARY_KEYS
    import socket
    from datetime import datetime

    assert summary["machine"]["host"] == socket.gethostname() and summary["machine"]["threads"] >= 1
    assert (
        abs(
            datetime.fromisoformat(summary["finished"]).timestamp()
            - (run_dir / "summary.json").stat().st_mtime
        )
        < 5
    )
    assert summary["method"] == {"name": "streaming_llm", "sink_tokens": 4}
    assert summary["metrics_after"]["tokens"] == 119  # first token is context only
    kv = summary["kv_cache"]
    assert kv["tokens_seen"] == 119 and kv["tokens_kept"] == 32
    assert kv["compression_ratio"] == pytest.approx(1 - 32 / 119)
    assert kv["bytes_kept"] * 119 == kv["bytes_full"] * 32
    assert summary["metrics_before"]["perplexity"] != summary["metrics_after"]["perplexity"]
    rows = list(csv.DictReader((run_dir / "samples.csv").open()))
    assert list(rows[0]) == SAMPLE_FIELDS and rows[0]["id"] == "doc.txt"
    assert float(rows[0]["perplexity_after"]) == pytest.approx(summary["metrics_after"]["perplexity"])
    assert (run_dir / ".hydra" / "config.yaml").exists()
    assert not list(run_dir.glob("*.tmp*"))


def test_bad_option_fails_before_the_model_loads(tmp_path):
    proc = _cli("model=tiny_llama", "budget.tokens=0", f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode != 0
    assert "budget.tokens must be a positive number" in proc.stderr
    assert "model tiny_llama" not in proc.stderr  # the loader never logged
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == [
        "kvexp: budget.tokens must be a positive number of tokens, got 0"
    ]  # one line, no traceback
    verbose = _cli(
        "model=tiny_llama", "budget.tokens=0", f"hydra.run.dir={tmp_path / 'run'}", "hydra.verbose=true"
    )
    assert (
        verbose.returncode != 0 and "Traceback" in verbose.stderr + verbose.stdout
    )  # asked for: the traceback
    assert not (tmp_path / "run" / "summary.json").exists()


def test_a_sweep_validates_every_job_before_the_first_runs(tmp_path):
    """A bad value in a sweep's second job, from the command line or with a preset's own axes (the command line's
    axis replacing the preset's): the sweep fails with one line naming the job, before any job runs or a model
    loads; no sweep dir is made."""
    sweep = tmp_path / "sweep"
    axes = _cli("-m", "model=tiny_llama", "method=knorm", "budget.tokens=32,0", f"hydra.sweep.dir={sweep}")
    preset = _cli(
        "experiment=budget_sweep", "model=tiny_llama", "budget.tokens=64,0", f"hydra.sweep.dir={sweep}"
    )
    error = "budget.tokens must be a positive number of tokens, got 0"
    assert axes.returncode == 1 and axes.stderr.strip().splitlines() == [
        f"kvexp: job #1 (model=tiny_llama method=knorm budget.tokens=0): {error}"
    ]
    assert preset.returncode == 1 and preset.stderr.strip().splitlines() == [
        f"kvexp: job #1 (method=streaming_llm budget.tokens=0 experiment=budget_sweep model=tiny_llama): {error}"
    ]
    assert "Launching" not in axes.stdout + preset.stdout and not sweep.exists()


def test_a_sweep_job_logs_the_notes_its_up_front_validation_kept_quiet(tmp_path, text_file):
    """LagKV says once per setting that a small budget cannot score while decoding; the sweep's validation of every
    job before the first runs keeps kvexp's notes quiet, and the job itself still says it, in its log."""
    sweep = tmp_path / "sweep"
    proc = _cli(
        "-m", "model=tiny_llama", "method=lagkv", "budget.tokens=64", "dataset=text_file", f"dataset.path={text_file}",
        "eval.max_tokens=80", "eval.chunk_size=8", f"hydra.sweep.dir={sweep}", "cache_dir=null",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    note = "lagkv: budget 64 < n_sink + 2 x lag_size - 1 = 271"
    assert (sweep / "0" / "kvexp.log").read_text().count(note) == 1
    assert (proc.stdout + proc.stderr).count(note) == 1  # the job's, not the validation's


def test_two_job_multirun_shares_the_full_cache_run(tmp_path, text_file):
    sweep = tmp_path / "sweep"
    proc = _cli(
        "-m", "model=tiny_qwen2", "method=knorm,random", "budget=32", "dataset=text_file",
        f"dataset.path={text_file}", "eval.max_tokens=80", "eval.chunk_size=8", f"hydra.sweep.dir={sweep}",
        f"cache_dir={tmp_path / 'cache'}",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (sweep / "multirun.yaml").exists()
    summaries = [json.loads((sweep / str(i) / "summary.json").read_text()) for i in range(2)]
    assert [s["method"]["name"] for s in summaries] == ["knorm", "random"]
    assert summaries[0]["metrics_before"] == summaries[1]["metrics_before"]
    assert len(list((tmp_path / "cache" / "full").glob("*.json"))) == 1


def test_full_method_gives_the_plain_model_perplexity(text_file, tmp_path):
    cfg = _compose(
        "model=tiny_gpt_neox", "method=full", "dataset=text_file", f"dataset.path={text_file}",
        "eval.max_tokens=150", "eval.chunk_size=1", "cache_dir=null",
    )  # fmt: skip
    summary = train_or_eval(cfg, tmp_path / "out")
    model, tok = load("tiny_gpt_neox")
    ids = tok(TEXT, return_tensors="pt").input_ids[:, :150]
    model.set_attn_implementation("sdpa")
    with torch.no_grad():
        logits = model(ids).logits[0, :-1]
    nll = torch.nn.functional.cross_entropy(logits, ids[0, 1:])
    assert summary["metrics_after"]["perplexity"] == pytest.approx(math.exp(nll.item()), rel=1e-5)
    assert summary["metrics_before"]["perplexity"] == pytest.approx(
        summary["metrics_after"]["perplexity"], rel=1e-9
    )


def test_wandb_offline_writes_a_run(text_file, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_home"))
    cfg = _compose(
        "model=tiny_llama", "method=recent_only", "budget=32", "dataset=text_file", f"dataset.path={text_file}",
        "eval.max_tokens=60", "eval.chunk_size=6", "logger=wandb_offline", "cache_dir=null",
    )  # fmt: skip
    train_or_eval(cfg, tmp_path / "out")
    runs = list((tmp_path / "out" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))


def test_compiled_engine_run_gives_the_eager_runs_perplexity(text_file, tmp_path):
    """engine.compile=true through the app: the same streaming perplexity as the eager run, its decode steps
    compiled, and the option recorded in the summary."""
    base = ("model=tiny_llama", "method=h2o", "budget.tokens=24", "dataset=text_file", f"dataset.path={text_file}",
            "eval.max_tokens=80", "eval.chunk_size=1", "eval.compare_to_full=false", "cache_dir=null")  # fmt: skip
    eager = train_or_eval(_compose(*base), tmp_path / "eager")
    compiled = train_or_eval(_compose(*base, "engine.compile=true"), tmp_path / "compiled")
    assert compiled["metrics_after"]["perplexity"] == pytest.approx(
        eager["metrics_after"]["perplexity"], rel=1e-6
    )
    assert compiled["engine"]["compile"] is True and eager["engine"]["compile"] is False
    assert compiled["timing"]["eviction_ms_mean"] is None  # every eviction ran inside the compiled step


def test_smollm2_streaming_perplexity_equals_the_masked_plain_model(smollm2):
    """The issue's acceptance check at a CI-sized length: perplexity of the compressed stream == oracle's."""
    model, tok = smollm2
    text = WIKITEXT2.path.read_text()[:4000]
    ids = tok(text, return_tensors="pt").input_ids[:, :200]
    vis = Visibility(1, model.config.num_key_value_heads, 199)
    result = evaluate_perplexity(
        model, tok, text, "streaming_llm", 48, chunk_size=1, max_tokens=200, recorder=vis, sink_tokens=4
    )
    ref = oracle_logits(model, ids[:, :-1], vis)[0]
    oracle_ppl = math.exp(torch.nn.functional.cross_entropy(ref, ids[0, 1:]).item())
    assert result["metrics"]["perplexity"] == pytest.approx(oracle_ppl, rel=1e-4)
    assert result["kv_cache"]["tokens_kept"] == 48


# ---- generation tasks ----

GENERATION_SUMMARY_KEYS = SUMMARY_KEYS | {
    "task", "generation", "objective", "avg_memory_saving_MB", "time_before", "time_after", "avg_time_saving_s",
    "throughput_before", "throughput_after", "avg_throughput_improvement_tokens_s",
}  # fmt: skip


def test_cli_passkey_run_reports_accuracy_by_length_and_depth(tmp_path):
    run_dir = tmp_path / "run"
    proc = _cli(
        "model=tiny_llama", "dataset=passkey", "dataset.lengths=[512,640]", "dataset.depths=[0.0,1.0]",
        "method=snapkv", "budget=64", f"hydra.run.dir={run_dir}", f"cache_dir={tmp_path / 'c'}",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "qa accuracy" in proc.stdout and "accuracy length/depth=640/1.0" in proc.stdout
    summary = json.loads((run_dir / "summary.json").read_text())
    assert set(summary) >= GENERATION_SUMMARY_KEYS and summary["task"] == "generation"
    after = summary["metrics_after"]
    assert after["samples"] == 4 and set(after["qa"]) == {"accuracy", "exact_match", "f1"}
    assert set(after["by"]) == {"length", "depth", "length/depth"}
    assert set(after["by"]["length/depth"]) == {"512/0.0", "512/1.0", "640/0.0", "640/1.0"}
    assert summary["budget"]["resolved_tokens"] == [64] * 4
    assert summary["generation"]["protocol"] == "query_agnostic"
    rows = list(csv.DictReader((run_dir / "samples.csv").open()))
    assert [(r["length"], r["depth"]) for r in rows] == [
        ("512", "0.0"),
        ("512", "1.0"),
        ("640", "0.0"),
        ("640", "1.0"),
    ]
    assert {"answers", "prediction_before", "prediction_after", "accuracy_after", "ttft_s_after"} <= set(
        rows[0]
    )
    for row in rows:  # the question is on top of the budget: 64 context entries + question + answer tokens
        assert float(row["kept_tokens"]) <= 64 + int(row["question_tokens"]) + int(row["new_tokens_after"])


def test_qa_jsonl_keep_ratio_run_writes_generation_cost_fields(qa_file, tmp_path):
    cfg = _compose(
        "model=tiny_llama", "dataset=qa_jsonl", f"dataset.path={qa_file}", "method=h2o", "budget=keep_0.5",
        "eval.max_new_tokens=4", "cache_dir=null", "engine.when=prefill",
    )  # fmt: skip
    summary = train_or_eval(cfg, tmp_path / "out")
    assert set(summary) >= GENERATION_SUMMARY_KEYS
    rows = list(csv.DictReader((tmp_path / "out" / "samples.csv").open()))
    assert [r["id"] for r in rows] == ["0", "1", "2"] and [r["answers"] for r in rows] == [
        "apple",
        "river",
        "candle",
    ]
    for row, budget in zip(rows, summary["budget"]["resolved_tokens"], strict=True):
        assert budget == int(row["context_tokens"]) // 2  # keep_ratio of the context (query-agnostic)
    assert summary["metrics_after"]["new_tokens"] == 4 == summary["metrics_before"]["new_tokens"]
    assert summary["avg_memory_saving_MB"] > 0
    assert summary["avg_time_saving_s"] == pytest.approx(summary["time_before"] - summary["time_after"])
    assert summary["objective"] == summary["metrics_after"]["qa"]["accuracy"]
    assert "qa exact_match" in format_table(summary)


def test_summarization_run_reports_a_rouge_dict(tmp_path):
    path = tmp_path / "cnn.jsonl"
    row = {
        "article": "The mayor opened a new bridge on Monday. " * 10,
        "highlights": "Mayor opens bridge .\nIt is new .",
    }
    path.write_text(json.dumps(row) + "\n" + json.dumps(row) + "\n")
    cfg = _compose(
        "model=tiny_gpt2", "dataset=cnn_dailymail", f"dataset.path={path}", "method=streaming_llm", "budget=64",
        "eval.max_new_tokens=6", "cache_dir=null",
    )  # fmt: skip
    summary = train_or_eval(cfg, tmp_path / "out")
    for metrics in (summary["metrics_before"], summary["metrics_after"]):
        assert set(metrics["rouge"]) == {"rouge1", "rouge2", "rougeL", "rougeLsum", "sentence_bleu"}
    assert summary["objective"] == summary["metrics_after"]["rouge"]["rougeL"]


@pytest.mark.parametrize(
    "overrides,template,expected",
    [
        (["dataset=cnn_dailymail"], "{{ x }}", True),  # summarization prefers the template ...
        (["dataset=cnn_dailymail"], None, False),  # ... when the tokenizer has one
        (["dataset=passkey"], "{{ x }}", False),  # retrieval prefers the plain prompt
        (["dataset=passkey", "eval.chat_template=true"], "{{ x }}", True),  # eval.chat_template forces
        (["dataset=cnn_dailymail", "eval.chat_template=false"], "{{ x }}", False),
    ],
)
def test_chat_template_follows_eval_then_the_dataset(overrides, template, expected):
    from types import SimpleNamespace

    from kvexp.tasks.registry import use_chat_template

    assert use_chat_template(_compose(*overrides), SimpleNamespace(chat_template=template)) is expected


def test_a_dataset_that_templates_itself_is_never_wrapped_again(monkeypatch):
    import dataclasses
    from types import SimpleNamespace

    from kvexp.tasks import registry

    entry = dataclasses.replace(registry.DATASETS["qa_jsonl"], own_template=True)
    monkeypatch.setitem(registry.DATASETS, "qa_jsonl", entry)
    cfg = _compose("dataset=qa_jsonl", "eval.chat_template=true")
    assert registry.use_chat_template(cfg, SimpleNamespace(chat_template="{{ x }}")) is False


def test_generation_full_cache_answers_are_shared_across_a_sweep(qa_file, tmp_path):
    summaries = []
    for method in ("knorm", "random"):
        cfg = _compose(
            "model=tiny_qwen2", "dataset=qa_jsonl", f"dataset.path={qa_file}", f"method={method}", "budget=32",
            "eval.max_new_tokens=3", f"cache_dir={tmp_path / 'cache'}",
        )  # fmt: skip
        summaries.append(train_or_eval(cfg, tmp_path / method))
    assert summaries[0]["metrics_before"] == summaries[1]["metrics_before"]
    assert len(list((tmp_path / "cache" / "full").glob("*.json"))) == 1
    before = [r["prediction_before"] for r in csv.DictReader((tmp_path / "random" / "samples.csv").open())]
    assert before == [
        r["prediction_before"] for r in csv.DictReader((tmp_path / "knorm" / "samples.csv").open())
    ]


def test_resume_skips_a_finished_run_of_the_same_config_only(text_file, tmp_path, monkeypatch):
    overrides = (
        "model=tiny_llama", "method=knorm", "budget=32", "dataset=text_file", f"dataset.path={text_file}",
        "eval.max_tokens=60", "eval.chunk_size=8", "cache_dir=null",
    )  # fmt: skip
    out = tmp_path / "run"
    first = train_or_eval(_compose(*overrides), out)
    written = (out / "summary.json").read_text()
    calls = []
    monkeypatch.setattr(
        kvexp.tasks.registry.TASKS["perplexity"],
        "evaluate",
        lambda cfg, journal=None: calls.append(cfg) or (first, []),
    )
    again = train_or_eval(_compose(*overrides, "logger=none", "objective=accuracy"), out)  # bookkeeping only
    assert calls == [] and (out / "summary.json").read_text() == written
    assert again["objective"] == first["metrics_after"]["accuracy"]
    train_or_eval(_compose(*overrides, "resume=false"), out)
    other = (
        *overrides[:-2],
        "eval.chunk_size=4",
        "cache_dir=null",
    )  # another config: refused in this dir ...
    with pytest.raises(ValueError, match=r"run holds the results of another config .*overwrite=true"):
        train_or_eval(_compose(*other), out)
    assert len(calls) == 1
    train_or_eval(_compose(*other, "overwrite=true"), out)  # ... unless asked
    assert len(calls) == 2
    train_or_eval(
        _compose(*overrides, "overwrite=true"), out
    )  # back to the first config (its summary was replaced)
    train_or_eval(_compose(*overrides), out)  # ... now finished: skipped
    assert len(calls) == 3
    monkeypatch.setattr(kvexp.tasks.base, "versions", lambda: {"torch": "0.0-other"})
    train_or_eval(_compose(*overrides), out)  # another torch: the result may differ, so it is redone
    assert len(calls) == 4


def test_objective_names_a_metric_of_the_run(text_file, tmp_path):
    overrides = ("model=tiny_llama", "method=knorm", "budget=32", "dataset=text_file", f"dataset.path={text_file}",
                 "eval.max_tokens=40", "eval.chunk_size=8", "cache_dir=null")  # fmt: skip
    summary = train_or_eval(_compose(*overrides, "objective=accuracy"), tmp_path / "a")
    assert summary["objective"] == summary["metrics_after"]["accuracy"]
    assert (
        train_or_eval(_compose(*overrides), tmp_path / "b")["objective"]
        == summary["metrics_after"]["perplexity"]
    )
    with pytest.raises(
        ValueError,
        match=r"objective='rouge.rouge1' is not a metric of this run; choose one of: \[.*'perplexity'",
    ):
        train_or_eval(_compose(*overrides, "objective=rouge.rouge1"), tmp_path / "c")
    assert (tmp_path / "c" / "summary.json").exists()  # the results were written before the objective failed
    nested = {"metrics_after": {"rouge": {"rouge1": 0.3, "rougeL": 0.2}, "tokens": 5}, "objective": 0.3}
    assert kvexp.tasks.base.objective(_compose(*overrides, "objective=rouge.rougeL"), nested) == 0.2


def test_wandb_run_is_typed_by_method_and_tagged_with_budget_model_dataset(text_file, tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr(
        kvexp.tracking,
        "make_logger",
        lambda cfg, config, out, job, group, tags: seen.update(cfg=cfg, tags=tags),
    )
    cfg = _compose(
        "model=tiny_llama", "method=recent_only", "budget=32", "dataset=text_file", f"dataset.path={text_file}",
        "eval.max_tokens=40", "eval.chunk_size=8", "logger=wandb_offline", "cache_dir=null", "tags=[study]",
    )  # fmt: skip
    train_or_eval(cfg, tmp_path / "out")
    assert seen["cfg"]["job_type"] == "recent_only" and seen["cfg"]["mode"] == "offline"
    assert seen["tags"] == ["recent_only", "budget=32", "model=tiny_llama", "dataset=text_file", "study"]


def test_a_non_finite_metric_fails_the_run_but_keeps_its_results(text_file, tmp_path, monkeypatch):
    """A NaN perplexity (as a float16 overflow gives) fails the run: results written and marked, error raised,
    and the next run of the same config is not skipped as finished."""
    overrides = (
        "model=tiny_llama", "method=knorm", "budget=32", "dataset=text_file", f"dataset.path={text_file}",
        "eval.max_tokens=40", "eval.chunk_size=8", "cache_dir=null",
    )  # fmt: skip
    real = kvexp.tasks.registry.TASKS["perplexity"].evaluate

    def overflowing(cfg, journal=None):
        summary, rows = real(cfg, journal=journal)
        summary["metrics_after"]["perplexity"] = summary["objective"] = float("nan")
        return summary, rows

    monkeypatch.setattr(kvexp.tasks.registry.TASKS["perplexity"], "evaluate", overflowing)
    out = tmp_path / "run"
    with pytest.raises(kvexp.app.NonFiniteMetricError, match=r"metrics_after\.perplexity=nan.*marked failed"):
        train_or_eval(_compose(*overrides), out)
    written = json.loads((out / "summary.json").read_text())
    assert written["metrics_after"]["perplexity"] is None and written["objective"] is None
    assert written["failed"]["metrics"] == {"metrics_after.perplexity": None, "objective": None}
    assert (out / "samples.csv").is_file()
    monkeypatch.setattr(kvexp.tasks.registry.TASKS["perplexity"], "evaluate", real)
    again = train_or_eval(_compose(*overrides), out)  # a failed run is redone, not resumed
    assert math.isfinite(again["objective"]) and "failed" not in json.loads(
        (out / "summary.json").read_text()
    )


def test_perplexity_of_a_huge_nll_is_inf_not_an_overflow_error():
    from kvexp.tasks.perplexity import DocumentResult, aggregate

    kv = {"tokens_seen": 3, "tokens_kept": 3}
    result = DocumentResult(id="d", tokens=2, nll=1500.0, correct=0, first_step_s=0.1, step_s=[0.1], kv=kv)
    assert result.perplexity == math.inf
    assert aggregate([result])["metrics"]["perplexity"] == math.inf
    assert kvexp.app.non_finite_metrics({"metrics_after": aggregate([result])["metrics"]}) == {
        "metrics_after.perplexity": math.inf
    }


def test_a_budget_above_the_length_is_flagged_as_nothing_compressed(text_file, tmp_path, caplog):
    """knorm at budget 512 over 60 tokens keeps everything: warned in the log and the table, marked in reports."""
    base = ("model=tiny_llama", "method=knorm", "dataset=text_file", f"dataset.path={text_file}",
            "eval.max_tokens=60", "eval.chunk_size=8", "cache_dir=null")  # fmt: skip
    with caplog.at_level("WARNING", logger="kvexp.app"):
        idle = train_or_eval(_compose(*base, "budget=512"), tmp_path / "idle")
    assert idle["nothing_compressed"] is True and "NOTHING COMPRESSED" in format_table(idle)
    assert any("NOTHING COMPRESSED: method=knorm" in r.getMessage() for r in caplog.records)
    working = train_or_eval(_compose(*base, "budget=32"), tmp_path / "working")
    assert "nothing_compressed" not in working and "NOTHING COMPRESSED" not in format_table(working)
    full = train_or_eval(_compose(*base, "budget=full", "method=full"), tmp_path / "full")
    assert "nothing_compressed" not in full  # the reference is not a failed compression
    from kvexp.report import collect, rows, tables

    report = tables(collect(tmp_path))
    assert "| knorm [nothing compressed] |" in report and "| knorm |" in report
    assert {r["label"]: r["nothing_compressed"] for r in rows(collect(tmp_path / "idle"))} == {
        "knorm [nothing compressed]": True
    }


def test_context_limits_for_perplexity(tmp_path):
    """At most model.max_context positions, checked before the weights load; a whole document (max_tokens=null)
    longer than that fails naming eval.max_tokens; eval.beyond_context lets a RoPE model go past, knowingly."""
    long_text = tmp_path / "long.txt"
    long_text.write_text("word " * 120)
    base = ("method=knorm", "budget.tokens=16", "dataset=text_file", f"dataset.path={long_text}", "cache_dir=null",
            "eval.chunk_size=16", "model.tiny.max_position_embeddings=64", "model.max_context=64")  # fmt: skip
    assert validate(_compose("model=tiny_llama", *base, "eval.max_tokens=65")) is None  # 64 positions fed
    with pytest.raises(ValueError, match=r"eval.max_tokens <= 65"):
        validate(_compose("model=tiny_llama", *base, "eval.max_tokens=66"))
    with pytest.raises(ValueError, match=r"eval.max_tokens=None: a document has \d+ tokens"):
        train_or_eval(_compose("model=tiny_llama", *base, "eval.max_tokens=null"), tmp_path / "a")
    beyond = train_or_eval(
        _compose("model=tiny_llama", *base, "eval.max_tokens=100", "eval.beyond_context=true"), tmp_path / "b"
    )
    assert beyond["metrics_after"]["tokens"] == 99


def test_reused_full_cache_timings_from_another_process_are_not_compared(text_file, tmp_path, monkeypatch):
    """The full-cache result is reused across invocations for its quality, but its timings were measured by
    another process (other threads, another load): they are marked and never turned into % changes."""
    base = ("model=tiny_llama", "dataset=text_file", f"dataset.path={text_file}", "eval.max_tokens=40",
            "eval.chunk_size=8", "budget=32", f"cache_dir={tmp_path / 'cache'}")  # fmt: skip
    first = train_or_eval(_compose(*base, "method=knorm"), tmp_path / "a")
    same_process = train_or_eval(_compose(*base, "method=h2o"), tmp_path / "b")
    assert first["timing_full"]["comparable"] and same_process["timing_full"]["comparable"]
    assert same_process["metrics_before"] == first["metrics_before"]
    monkeypatch.setattr(kvexp.tasks.full_cache, "_TIMED_IN", "another-host:1:2")  # a later invocation
    later = train_or_eval(_compose(*base, "method=streaming_llm"), tmp_path / "c")
    assert later["timing_full"]["comparable"] is False and later["metrics_before"] == first["metrics_before"]
    table = format_table(later)
    assert "not compared" in table and not any(
        line.startswith(("TTFT", "TPOT", "throughput")) and line.rstrip().endswith("%")
        for line in table.splitlines()
    )
    from kvexp.report import collect, tables

    report = tables(collect(tmp_path / "c"))
    # no -96.9% throughput against another process's full cache
    assert "| streaming_llm | - | - | +0.0% |" in report
    # another torch (or kvexp, transformers) version is another result: nothing reused
    versions = {**kvexp.tasks.base.versions(), "torch": "0.0-other"}
    monkeypatch.setattr(kvexp.tasks.base, "versions", lambda: versions)
    fresh = train_or_eval(_compose(*base, "method=knorm", "resume=false"), tmp_path / "d")
    assert fresh["timing_full"]["comparable"] is True
    assert len(list((tmp_path / "cache" / "full").glob("*.json"))) == 2


@pytest.mark.parametrize("task", ["perplexity", "generation"])
def test_a_warm_up_runs_before_anything_is_timed(task, text_file, tmp_path, monkeypatch):
    """The first timed run of a process, the full cache's, would carry the first-call overhead (9 ms against 1 ms
    TPOT on a tiny model) that the compressed run, timed after it, escapes: an untimed full-cache run comes first."""
    calls = []
    for name in ("score_in_batches", "run_generation", "warm_up_perplexity", "warm_up_generation"):
        real = getattr(kvexp.tasks.registry, name)
        monkeypatch.setattr(
            kvexp.tasks.registry,
            name,
            lambda *a, _name=name, _real=real, **kw: (
                calls.append((_name, a[4] if _name == "run_generation" else a[2])) or _real(*a, **kw)
            ),
        )
    data = (
        ("dataset=text_file", f"dataset.path={text_file}", "eval.max_tokens=60")
        if task == "perplexity"
        else ("dataset=passkey", "dataset.lengths=[400]", "dataset.depths=[0.5]", "dataset.haystack=repeat")
    )
    base = ("model=tiny_llama", "method=h2o", "budget=32", "cache_dir=null", *data)
    train_or_eval(_compose(*base), tmp_path / "a")
    warm = "warm_up_perplexity" if task == "perplexity" else "warm_up_generation"
    timed = "score_in_batches" if task == "perplexity" else "run_generation"
    assert [name for name, _ in calls] == [warm, timed, timed]
    assert [getattr(m, "name", m) for _, m in calls[1:]] == ["full", "h2o"]
    calls.clear()
    train_or_eval(_compose(*base, "eval.warmup=false"), tmp_path / "b")
    assert [name for name, _ in calls] == [timed, timed]


def test_a_run_dir_never_holds_two_configs(text_file, tmp_path):
    """A single run validates before Hydra creates its dir (a bad value leaves none behind), refuses a dir holding
    another config's results (its .hydra record and summary.json stay as they were) unless overwrite=true, which
    deletes them first; the same config into its own dir resumes."""
    run_dir = tmp_path / "run"
    base = ("model=tiny_llama", "budget=32", "dataset=text_file", f"dataset.path={text_file}", "eval.max_tokens=40",
            "eval.chunk_size=8", "cache_dir=null", f"hydra.run.dir={run_dir}")  # fmt: skip
    bad = _cli(*base, "method=knorm", "budget.tokens=0")
    assert bad.returncode == 1 and bad.stderr.strip().startswith("kvexp: budget.tokens must be a positive")
    assert not run_dir.exists()
    assert _cli(*base, "method=knorm").returncode == 0
    written = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file() and p.name != "kvexp.log"}
    other = _cli(*base, "method=h2o")
    assert other.returncode == 1 and len(other.stderr.strip().splitlines()) == 1
    assert (
        f"kvexp: {run_dir} holds the results of another config" in other.stderr
        and "overwrite=true" in other.stderr
    )
    assert {
        p: p.read_bytes() for p in written
    } == written  # .hydra/config.yaml still knorm's, beside its summary
    again = _cli(*base, "method=knorm")
    assert again.returncode == 0 and "already holds this config's results" in again.stdout + again.stderr
    (run_dir / "checkpoint").mkdir()
    (run_dir / "checkpoint" / "adapter.safetensors").write_bytes(
        b"knorm's"
    )  # e.g. a trained run's checkpoint
    assert _cli(*base, "method=h2o", "overwrite=true").returncode == 0
    assert not (run_dir / "checkpoint").exists()  # deleted with the rest, not left beside h2o's results
    assert json.loads((run_dir / "summary.json").read_text())["method"]["name"] == "h2o"
    assert "name: h2o\n" in (run_dir / ".hydra" / "config.yaml").read_text()
    assert not (run_dir / "samples.csv").read_text().count("knorm")


def test_evaluate_perplexity_has_the_clis_length_cap_and_progress(capsys):
    """The Python API ran a 2,084-token text to its end, silently, for minutes: it now takes the CLI's defaults
    (the first 2048 tokens, a progress bar) and refuses more positions than the model has."""
    from tests.conftest import load

    model, tok = load("tiny_llama")
    text = "abcdefghij" * 300  # 3000 byte tokens + <bos>
    result = evaluate_perplexity(model, tok, text, "streaming_llm", 64, chunk_size=256, sink_tokens=4)
    assert result["metrics"]["tokens"] == 2047
    assert "doc0 [streaming_llm]" in capsys.readouterr().err  # tqdm's bar, on stderr
    quiet = evaluate_perplexity(model, tok, text[:100], "full", chunk_size=32, progress=False)
    assert quiet["metrics"]["tokens"] == 100 and capsys.readouterr().err == ""
    with pytest.raises(
        ValueError, match=r"feed 3000 positions, more than the model's 2048; pass max_tokens <= 2049"
    ):
        evaluate_perplexity(model, tok, text, max_tokens=None)


class _RecordingLogger:
    """Stands in for the W&B logger: what train_or_eval does with its run, in order."""

    log_samples = True

    def __init__(self, events, config):
        self.events = events
        events.append(("init", config))

    def log_progress(self, values):
        self.events.append(("progress", dict(values)))

    def log_summary(self, summary):
        self.events.append(("summary", summary))

    def log_table(self, name, rows):
        self.events.append(("table", name))

    def finish(self, exit_code=None):
        self.events.append(("finish", exit_code))


def test_the_wandb_run_exists_while_the_job_goes(text_file, tmp_path, monkeypatch):
    """The run is created before evaluation with the config as config, gets a point per document of each cache,
    the summary at the end, and a crashed job closes it with exit code 1 (it used to be created after the
    evaluation: nothing visible during a long run, nothing at all from a crash)."""
    events = []
    monkeypatch.setattr(
        kvexp.tracking, "make_logger", lambda cfg, config, *a: _RecordingLogger(events, config)
    )
    real = kvexp.tasks.registry.score_in_batches
    monkeypatch.setattr(
        kvexp.tasks.registry,
        "score_in_batches",
        lambda *a, **kw: events.append(("score", a[2])) or real(*a, **kw),
    )
    base = ("model=tiny_llama", "method=knorm", "budget=32", "dataset=text_file", f"dataset.path={text_file}",
            "dataset.split_documents=true", "eval.max_tokens=40", "eval.chunk_size=8", "logger=wandb_offline",
            "cache_dir=null", "eval.warmup=false")  # fmt: skip
    summary = train_or_eval(_compose(*base), tmp_path / "a")
    kinds = [e[0] for e in events]
    assert kinds == ["init", "score", "progress", "score", "progress", "summary", "table", "finish"]
    assert events[0][1]["method"] == {
        "name": "knorm",
        "keep_ratio": None,
        "prune_after": 2048,
        "skip_layers": [],
    }
    full, compressed = events[2][1], events[4][1]
    assert full["full/documents"] == 1 and full["full/perplexity"] == summary["metrics_before"]["perplexity"]
    assert compressed["compressed/perplexity"] == summary["metrics_after"]["perplexity"]
    assert "config" not in events[5][1] and events[5][1]["metrics_after"] == summary["metrics_after"]
    assert events[-1] == ("finish", None)

    events.clear()

    def crashing(cfg, journal=None):
        kvexp.tracking.log_progress({"compressed/documents": 1})
        raise RuntimeError("out of memory")

    monkeypatch.setattr(kvexp.tasks.registry.TASKS["perplexity"], "evaluate", crashing)
    with pytest.raises(RuntimeError, match="out of memory"):
        train_or_eval(_compose(*base, "method=h2o"), tmp_path / "b")
    assert events[1:] == [("progress", {"compressed/documents": 1}), ("finish", 1)]


def test_evaluation_builds_no_autograd_graph():
    """Scoring and answering run under no_grad: with a graph, every step's activations stayed alive (0.87 GB per
    512-token SmolLM2 run in one process, so a sweep in one process ran out of memory)."""
    from kvexp.tasks.generation import Decoding, Prompt, generate_answer
    from kvexp.tasks.perplexity import score_document
    from tests.conftest import load

    model, tok = load("tiny_llama")
    grad_modes = []
    hook = model.model.layers[0].register_forward_hook(lambda *_: grad_modes.append(torch.is_grad_enabled()))
    try:
        ids = tok("It was the best of times, it was the worst of times.", return_tensors="pt").input_ids
        score_document(model, ids, "streaming_llm", 16, 4, sink_tokens=4)
        prompt = Prompt(context=ids, question=ids[:, :4])
        generate_answer(model, tok, prompt, "h2o", 16, max_new_tokens=3, decoding=Decoding())
    finally:
        hook.remove()
    assert grad_modes and not any(grad_modes)


def test_eviction_time_mean_and_std_over_every_compression():
    """The H2O study's per-eviction overhead: mean and standard deviation of one layer compression's time, pooled
    over the samples from their sums, as the single list of times would give."""
    import statistics
    from types import SimpleNamespace

    from kvexp.tasks.base import eviction_times

    times = [[0.001, 0.003], [0.002, 0.002, 0.006]]  # seconds of each compression, per sample
    results = [
        SimpleNamespace(
            kv={
                "compressions": len(t),
                "compress_seconds": sum(t),
                "compress_sq_seconds": sum(x * x for x in t),
            }
        )
        for t in times
    ]
    flat = [x for t in times for x in t]
    got = eviction_times(results)
    assert got["eviction_ms_mean"] == pytest.approx(1000 * statistics.fmean(flat))
    assert got["eviction_ms_std"] == pytest.approx(1000 * statistics.pstdev(flat))
    assert eviction_times([SimpleNamespace(kv={"compressions": 0})]) == {
        "eviction_ms_mean": None,
        "eviction_ms_std": None,
    }

    model, tokenizer = load("tiny_llama")
    result = evaluate_perplexity(model, tokenizer, "word " * 80, method="h2o", budget=16, progress=False)
    kv, timing = result["documents"][0].kv, result["timing"]
    assert kv["compressions"] > 0 and kv["compress_sq_seconds"] > 0
    assert timing["eviction_ms_mean"] == pytest.approx(1000 * kv["compress_seconds"] / kv["compressions"])
    assert timing["eviction_ms_std"] >= 0
