"""Atomic run-dir files and the W&B logger (offline and disabled; no network)."""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path

import pytest
import yaml

from kvexp.files import atomic_write_text
from kvexp.tracking import (
    WandbLogger,
    atomic_write_csv,
    atomic_write_json,
    flatten,
    has_wandb_api_key,
    make_logger,
)

CONF = Path(__file__).parents[1] / "conf" / "logger"


@pytest.fixture(autouse=True)
def _env(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_env_dir"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb_cache"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb_data"))


def logger_cfg(config: str, **overrides) -> dict:
    with (CONF / f"{config}.yaml").open() as f:
        return {**yaml.safe_load(f), **overrides}


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


def test_atomic_write_text_creates_parents(tmp_path):
    path = tmp_path / "a" / "b" / "out.txt"
    atomic_write_text(path, "héllo\n")
    assert path.read_text(encoding="utf-8") == "héllo\n"
    assert oct(path.stat().st_mode & 0o777) == oct(0o644)
    assert leftovers(path.parent) == []


def test_failed_serialization_keeps_old_file(tmp_path):
    path = tmp_path / "results.json"
    atomic_write_json(path, {"ppl": 12.5})
    old = path.read_text()
    with pytest.raises(TypeError):
        atomic_write_json(path, {("tuple", "key"): 1})  # json only takes str/int/float/bool/None keys
    with pytest.raises(ValueError):
        atomic_write_csv(path, [{"a": 1, "b": 2}], fieldnames=["a"])  # extra key
    assert path.read_text() == old
    assert json.loads(old) == {"ppl": 12.5}
    assert leftovers(tmp_path) == []


def test_failed_replace_keeps_old_file_and_removes_temp(tmp_path, monkeypatch):
    path = tmp_path / "results.json"
    atomic_write_json(path, {"step": 1})

    def boom(src, dst):
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk gone"):
        atomic_write_json(path, {"step": 2})
    assert json.loads(path.read_text()) == {"step": 1}
    assert leftovers(tmp_path) == []


def test_json_strict_nan_inf_and_odd_types(tmp_path):
    import numpy as np
    import torch

    path = tmp_path / "m.json"
    obj = {
        "z": math.nan,
        "a": [math.inf, -math.inf, 1.5],
        "np": np.float32(0.5),
        "i": np.int64(3),
        "t": torch.tensor(2.0),
        "p": Path("x/y"),
        "nested": {"ok": True, "none": None},
    }
    atomic_write_json(path, obj)
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert text.endswith("\n") and '\n  "z"' in text  # indent=2
    assert list(json.loads(text)) == ["z", "a", "np", "i", "t", "p", "nested"]  # insertion order kept
    assert json.loads(text) == {
        "z": None,
        "a": [None, None, 1.5],
        "np": 0.5,
        "i": 3,
        "t": 2.0,
        "p": "x/y",
        "nested": {"ok": True, "none": None},
    }


def test_csv_round_trip(tmp_path):
    path = tmp_path / "rows.csv"
    rows = [{"method": "full", "ppl": 10.25}, {"method": "streaming_llm", "budget": 256, "ppl": 11.5}]
    atomic_write_csv(path, rows)
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == ["method", "ppl", "budget"]
        back = list(reader)
    assert back == [
        {"method": "full", "ppl": "10.25", "budget": ""},
        {"method": "streaming_llm", "ppl": "11.5", "budget": "256"},
    ]
    atomic_write_csv(path, rows, fieldnames=["ppl", "method", "budget"])
    with path.open(newline="") as f:
        assert csv.DictReader(f).fieldnames == ["ppl", "method", "budget"]
    assert leftovers(tmp_path) == []
    # generated text may hold any character: a carriage return, a newline, quotes, commas
    texts = [
        {"generation": "a\rb", "n": 1},
        {"generation": 'c\n"d", e\r\n', "n": 2},
        {"generation": None, "n": 3},
    ]
    atomic_write_csv(path, texts)
    with path.open(newline="") as f:
        assert list(csv.DictReader(f)) == [
            {"generation": "a\rb", "n": "1"},
            {"generation": 'c\n"d", e\r\n', "n": "2"},
            {"generation": "", "n": "3"},
        ]


def test_flatten():
    nested = {"a": {"b": {"c": 1}, "d": 2}, "e": 3, "f": {}, 4: {"x": [1, 2]}}
    assert flatten(nested) == {"a/b/c": 1, "a/d": 2, "e": 3, "4/x": [1, 2]}
    assert flatten({"a": {"b": 1}}, prefix="eval", sep=".") == {"eval.a.b": 1}
    assert flatten({}) == {}


def test_logger_configs():
    assert make_logger(logger_cfg("none"), {}, Path("unused"), None, None, []) is None
    assert make_logger(None, {}, Path("unused"), None, None, []) is None
    assert logger_cfg("wandb")["mode"] == "auto"
    assert logger_cfg("wandb_offline")["mode"] == "offline"
    keys = {"name", "project", "entity", "mode", "job_type", "log_samples"}
    for p in CONF.glob("*.yaml"):
        assert set(logger_cfg(p.stem)) == keys, p


def test_unknown_logger_and_mode(tmp_path):
    with pytest.raises(ValueError, match=r"logger=.*mlflow.*\['none', 'wandb'\]"):
        make_logger({"name": "mlflow"}, {}, tmp_path, None, None, [])
    with pytest.raises(ValueError, match=r"logger\.mode.*auto.*online.*offline.*disabled"):
        make_logger(logger_cfg("wandb", mode="shared"), {}, tmp_path, None, None, [])


def test_wandb_offline_run_dir(tmp_path):
    out = tmp_path / "run"
    logger = make_logger(
        logger_cfg("wandb_offline"),
        {"method": {"name": "streaming_llm"}, "budget": 256},
        out,
        job_name="streaming_llm-256",
        group="sweep-1",
        tags=["test"],
    )
    assert isinstance(logger, WandbLogger) and logger.log_samples
    logger.log_summary({"ppl": {"full": 10.0, "compressed": math.nan}, "tokens": 1000, "skip": [1, 2]})
    logger.log_table("per_document", [{"id": "a", "ppl": 1.0}, {"id": "b", "ppl": 2.0, "extra": {"k": 1}}])
    assert logger.run.summary["ppl/full"] == 10.0
    logger.finish()
    logger.finish()  # idempotent
    logger.log_summary({"late": 1})  # after finish: a warning, not a crash
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and runs[0].is_dir()
    assert any(runs[0].glob("*.wandb"))
    assert not (tmp_path / "wandb_env_dir").exists() or not any(
        (tmp_path / "wandb_env_dir").rglob("offline-run-*")
    )


def test_wandb_disabled(tmp_path):
    with WandbLogger(logger_cfg("wandb", mode="disabled"), {"a": 1}, tmp_path, None, None, []) as logger:
        logger.log_summary({"ppl": 1.0})
        logger.log_table("t", [{"x": 1}])
    assert logger.run is None
    assert not list(tmp_path.rglob("offline-run-*"))


def test_auto_mode_is_online_only_with_an_api_key(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    assert not has_wandb_api_key()
    (tmp_path / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password abc\n")
    (tmp_path / ".netrc").chmod(0o600)
    assert has_wandb_api_key()
    (tmp_path / ".netrc").unlink()
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert has_wandb_api_key()


def test_summary_goes_to_the_run_summary_and_progress_to_its_history(tmp_path):
    """Strings and config-like values logged as history made one-point charts: the summary (strings included)
    goes to run.summary only; progress points are the history."""

    class Run:
        def __init__(self):
            self.summary, self.history = {}, []

        def log(self, values):
            self.history.append(values)

        def finish(self, exit_code=None):
            self.exit_code = exit_code

    logger = WandbLogger(logger_cfg("wandb", mode="disabled"), {"a": 1}, tmp_path, None, None, [])
    logger.run.finish()
    run = logger.run = Run()
    logger.log_summary(
        {"metrics_after": {"perplexity": 12.5}, "method": {"name": "h2o"}, "budget": {"tokens": None}}
    )
    assert run.summary == {"metrics_after/perplexity": 12.5, "method/name": "h2o"} and run.history == []
    logger.log_progress({"compressed/documents": 1, "compressed/perplexity": 12.0})
    assert run.history == [{"compressed/documents": 1, "compressed/perplexity": 12.0}]
