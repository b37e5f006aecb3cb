"""A run's directory: the config hash that names its results, resuming a finished run (and, from its journal, an
unfinished one), never two configs' results in one dir, and the records by which a sweep's report finds its jobs'
dirs (kvexp.callbacks)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from kvexp.callbacks import SWEEP_ID_ENV, SWEEP_JOBS
from kvexp.config import validate
from kvexp.files import journal_header
from kvexp.tasks import base
from kvexp.tasks.registry import dataset_inputs
from kvexp.tracking import atomic_write_json

log = logging.getLogger(__name__)

# Options that change neither what is computed nor its results: a finished run with other values is reused.
_HASH_EXCLUDED = ("logger", "resume", "objective", "tags", "overwrite")

# The compressed run's finished batches while it runs (kvexp.files.Journal, headed by the config hash and versions):
# a killed job re-run with the same config reads them back; removed once summary.json is written.
JOURNAL = "journal.jsonl"


def config_hash(cfg: DictConfig, inputs: str | None = "", versions: dict[str, str] | None = None) -> str:
    """sha256 (16 hex digits) of the resolved config without the bookkeeping options, with `inputs` and the
    versions of kvexp, torch, transformers and Python (these ones, or `versions`)."""
    content = OmegaConf.to_container(cfg, resolve=True)
    for key in _HASH_EXCLUDED:
        content.pop(key, None)
    if inputs:
        content["dataset_inputs"] = inputs
    content["versions"] = (
        versions or base.versions()
    )  # another kvexp, torch or transformers may give other results
    return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()[:16]


def finished_summary(out: Path, digest: str) -> dict[str, Any] | None:
    """The summary.json in `out` when it was written for the config hash `digest` (else None: the run is (re)done). A sweep
    job already runs in the dir holding its results (`job_subdir`), so its own dir is the only place to look."""
    summary = _held(out)
    if summary is None or summary.get("config_hash") != digest:
        return None
    if summary.get("failed"):
        log.info("resume: %s holds a failed run (%s); running again", out, summary["failed"]["reason"])
        return None
    return summary


def sweep_dir() -> Path | None:
    """The multirun's sweep dir when this job is part of one."""
    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        return Path(HydraConfig.get().sweep.dir)
    return None


def job_subdir(num: str, root: DictConfig) -> str:
    """A sweep job's run dir name (`hydra.sweep.subdir`): the dir of the sweep holding this config's results (the
    job resumes there, so the .hydra/config.yaml Hydra writes agrees with its summary.json; or its unfinished run's
    journal), else the job number, or `<num>-<config hash>` when that dir holds another config's results or
    journal (a job never overwrites them)."""
    try:
        content = OmegaConf.to_container(root, resolve=False)
        content.pop("hydra", None)
        cfg = OmegaConf.create(content)
        inputs = dataset_inputs(cfg)
        sweep = Path(str(root.hydra.sweep.dir))
        dirs = sorted(d for d in sweep.iterdir() if d.is_dir()) if sweep.is_dir() else []
        mine = [d.name for d in dirs if _claim(d) is not None and _other_config(cfg, d, inputs) is None]
    except Exception as err:  # a config that does not even hash fails in validation, with its own message
        log.debug("job dir by config hash unavailable (%s); using the job number", err)
        return str(num)
    if mine:
        return mine[0]
    if _claim(sweep / str(num)) is None:
        return str(num)
    return f"{num}-{config_hash(cfg, inputs)[:8]}"


def _held(run_dir: Path) -> dict[str, Any] | None:
    """The summary a run dir holds (None: none)."""
    try:
        return json.loads((run_dir / "summary.json").read_text())
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
        return None


def _claim(run_dir: Path) -> dict[str, Any] | None:
    """What says which config a run dir is for: its summary, else an unfinished run's journal header (both hold
    `config_hash` and `versions`); None: neither."""
    return _held(run_dir) or journal_header(run_dir / JOURNAL)


def _other_config(cfg: DictConfig, run_dir: Path, inputs: str | None) -> str | None:
    """The config hash of another config's results (or unfinished run) in `run_dir`; None when it holds none, or
    this config's (under any kvexp / torch / transformers versions: a rerun with new software replaces its own)."""
    held = _claim(run_dir)
    if held is None or held.get("config_hash") is None:
        return None
    versions = held.get("versions")
    if held["config_hash"] in (config_hash(cfg, inputs), versions and config_hash(cfg, inputs, versions)):
        return None
    return held["config_hash"]


def prepare_run_dir(cfg: DictConfig, out: Path) -> None:
    """Before a single run's dir is created: validate (a bad value leaves no dir behind), then refuse a dir holding
    another config's results, or, with `overwrite=true`, delete it, so the run never leaves a dir that disagrees
    with itself (Hydra's .hydra/config.yaml of one config beside another's summary.json)."""
    validate(cfg)
    if cfg.overwrite and _other_config(cfg, out, dataset_inputs(cfg)) is not None:
        log.warning("overwrite=true: deleting %s, which held another config's results", out)
        shutil.rmtree(out)
    check_run_dir(cfg, out, dataset_inputs(cfg))


def check_run_dir(cfg: DictConfig, out: Path, inputs: str | None) -> None:
    """A run never writes into a dir holding another config's results, unless `overwrite=true`."""
    other = _other_config(cfg, out, inputs)
    if other is not None and not cfg.overwrite:
        raise ValueError(
            f"{out} holds the results of another config (or other inputs) (summary.json or {JOURNAL}, config hash {other}; this one is "
            f"{config_hash(cfg, inputs)}): choose another hydra.run.dir, or overwrite=true to replace them"
        )


def record_sweep_job(sweep: Path | None, digest: str, run_dir: Path) -> None:
    """Note, for this invocation's report, which run dir holds this job's results."""
    sweep_id = os.environ.get(SWEEP_ID_ENV)
    if sweep is None or not sweep_id:
        return
    job = HydraConfig.get().job.num
    record = {"config_hash": digest, "run_dir": str(run_dir.resolve())}
    atomic_write_json(sweep / SWEEP_JOBS / sweep_id / f"{job}.json", record)
