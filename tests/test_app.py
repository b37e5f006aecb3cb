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

from kvexp.app import train_or_eval
from kvexp.tasks.data import data_dir
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
    assert not (tmp_path / "run" / "summary.json").exists()


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


def test_smollm2_streaming_perplexity_equals_the_masked_plain_model(smollm2):
    """The issue's acceptance check at a CI-sized length: perplexity of the compressed stream == oracle's."""
    model, tok = smollm2
    text = (data_dir() / "wikitext2" / "wiki.test.raw").read_text()[:4000]
    ids = tok(text, return_tensors="pt").input_ids[:, :200]
    vis = Visibility(1, model.config.num_key_value_heads, 199)
    result = evaluate_perplexity(
        model, tok, text, "streaming_llm", 48, chunk_size=1, max_tokens=200, recorder=vis, sink_tokens=4
    )
    ref = oracle_logits(model, ids[:, :-1], vis)[0]
    oracle_ppl = math.exp(torch.nn.functional.cross_entropy(ref, ids[0, 1:]).item())
    assert result["metrics"]["perplexity"] == pytest.approx(oracle_ppl, rel=1e-4)
    assert result["kv_cache"]["tokens_kept"] == 48
