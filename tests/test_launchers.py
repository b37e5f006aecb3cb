"""Sweeps beyond one process go through Hydra launcher plugins (conf/launcher/): presets compose, and the
submitit code path runs a real two-job sweep locally."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from kvexp.config import normalize_overrides

ROOT = Path(__file__).resolve().parents[1]
LAUNCHERS = {
    "joblib": "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher",
    "submitit_local": "hydra_plugins.hydra_submitit_launcher.submitit_launcher.LocalLauncher",
    "slurm": "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher",
    "ray": "hydra_plugins.hydra_ray_launcher.ray_launcher.RayLauncher",
}


def _hydra_compose(*overrides: str):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=normalize_overrides(list(overrides)), return_hydra_config=True)


def test_every_launcher_preset_has_a_test():
    assert sorted(p.stem for p in (ROOT / "conf" / "launcher").glob("*.yaml")) == sorted(LAUNCHERS)


@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_launcher_preset_composes(launcher):
    cfg = _hydra_compose(f"launcher={launcher}", "method=h2o", "budget=256")
    assert cfg.hydra.launcher._target_ == LAUNCHERS[launcher]
    assert cfg.method.name == "h2o"  # the experiment itself is untouched
    if launcher in ("slurm", "ray"):
        assert cfg.hardware.name == "cuda"  # cluster presets run on GPUs
    if launcher == "slurm":
        assert cfg.hydra.launcher.gpus_per_node == 1 and cfg.hydra.launcher.partition is None


def test_submitit_local_runs_a_two_job_sweep(tmp_path):
    text = tmp_path / "doc.txt"
    text.write_text("It was the best of times, it was the worst of times. " * 10)
    sweep = tmp_path / "sweep"
    proc = subprocess.run(
        [
            sys.executable, "-m", "kvexp", "-m", "launcher=submitit_local", "model=tiny_llama",
            "method=knorm,streaming_llm", "budget=32", "dataset=text_file", f"dataset.path={text}",
            "eval.max_tokens=80", "eval.chunk_size=8", f"hydra.sweep.dir={sweep}", f"cache_dir={tmp_path / 'c'}",
            "hydra.launcher.timeout_min=10", "hardware.num_threads=1",
        ],
        cwd=ROOT, capture_output=True, text=True, env={**os.environ, "HYDRA_FULL_ERROR": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (sweep / "0" / "summary.json").exists() and (sweep / "1" / "summary.json").exists()
    assert list((sweep / ".submitit").rglob("*_result.pkl"))  # the jobs ran as submitit jobs
    with open(sweep / "results.csv") as f:  # and the sweep's report followed
        assert sorted(r["method"] for r in csv.DictReader(f)) == ["knorm", "streaming_llm"]
