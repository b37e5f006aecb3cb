"""train_or_eval(cfg): the single entrypoint behind `python -m kvexp`, sweeps and notebooks."""

from __future__ import annotations

import logging
import math
import platform
import socket
import time
from pathlib import Path
from typing import Any

import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict

from kvexp.config import validate
from kvexp.files import Journal
from kvexp.run_dir import JOURNAL, check_run_dir, config_hash, finished_summary, record_sweep_job, sweep_dir
from kvexp.tasks.base import objective, versions
from kvexp.tasks.registry import TASKS, dataset_inputs
from kvexp.tracking import ACTIVE_LOGGER, WandbLogger, atomic_write_csv, atomic_write_json, start_wandb
from kvexp.train import run_trainer, untrained_overrides

log = logging.getLogger(__name__)


def train_or_eval(cfg: DictConfig, output_dir: str | Path | None = None) -> dict[str, Any]:
    """Validate, build model and method, evaluate (compressed and full), write the run dir, log to W&B.

    The task (`dataset.task`: perplexity | generation | lm_eval, kvexp.tasks.registry.TASKS) decides how samples
    are evaluated; returns the summary that `summary.json` holds. With `resume` (the default), a run dir that
    already holds the summary of this very config (same hash) is not redone: an interrupted sweep re-run with the
    same `hydra.sweep.dir` finishes only its missing jobs.
    """
    validate(cfg)  # every user error surfaces here, before any model loads
    out = Path(output_dir) if output_dir is not None else Path(HydraConfig.get().runtime.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    inputs = dataset_inputs(cfg)
    digest = config_hash(cfg, inputs)
    sweep = sweep_dir() if output_dir is None else None
    if sweep is None:
        check_run_dir(cfg, out, inputs)
    summary = finished_summary(out, digest) if cfg.resume and inputs is not None else None
    if summary is not None:
        log.info("resume: %s already holds this config's results (hash %s); skipped", out, digest)
        record_sweep_job(sweep, digest, out)
        return {**summary, "objective": objective(cfg, summary)}
    logger = start_wandb(cfg, out)  # the W&B run exists while the job goes (progress, a crash's exit code)
    token = ACTIVE_LOGGER.set(logger)
    exit_code = 1  # a job that raises (a crash, a failed run) ends its W&B run with 1
    try:
        summary = _evaluate_and_write(cfg, out, sweep, digest, logger)
        exit_code = None
    finally:
        ACTIVE_LOGGER.reset(token)
        if logger is not None:
            logger.finish(exit_code=exit_code)
    return {
        **summary,
        "objective": objective(cfg, summary),
    }  # a bad objective= fails after the results are safe


def _evaluate_and_write(
    cfg: DictConfig, out: Path, sweep: Path | None, digest: str, logger: WandbLogger | None
) -> dict[str, Any]:
    """Evaluate (training first with `train=`), write summary.json and samples.csv, log the summary to W&B."""
    torch.manual_seed(cfg.seed)
    journal = Journal(out / JOURNAL, {"config_hash": digest, "versions": versions()})
    if not cfg.resume:
        journal.remove()  # resume=false: nothing of an earlier attempt is read back
    if cfg.train.name == "none":
        summary, rows = TASKS[cfg.dataset.task].evaluate(cfg, journal=journal)
    else:
        summary, rows = _train_then_evaluate(cfg, out)
    summary["config_hash"] = digest
    summary["machine"] = _machine(cfg)
    summary["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    if nothing_compressed(summary):
        summary["nothing_compressed"] = True
        log.warning(
            "NOTHING COMPRESSED: method=%s kept every token it saw (%s) and every byte: the budget is at or above "
            "the evaluated length, so this run measures the full cache again; lower the budget or raise the length",
            summary["method"]["name"],
            summary["kv_cache"].get("tokens_seen"),
        )
    non_finite = non_finite_metrics(summary)
    if non_finite:  # written (NaN/inf as null) and marked, so the evidence is kept, but the run fails
        summary["failed"] = {"reason": "non-finite metrics", "metrics": non_finite}
    atomic_write_csv(out / "samples.csv", rows)
    atomic_write_json(out / "summary.json", summary)
    journal.remove()  # its batches are in samples.csv and summary.json now
    record_sweep_job(sweep, digest, out)
    if logger is not None:
        logger.log_summary({k: v for k, v in summary.items() if k != "config"})
        if logger.log_samples:
            logger.log_table("samples", rows)
    log.info("results written to %s", out)
    if non_finite:
        raise NonFiniteMetricError(
            f"non-finite metric(s) {', '.join(f'{k}={v}' for k, v in non_finite.items())}: the run failed "
            f"(its results are in {out}, marked failed). Typical causes: float16 overflow (try "
            "hardware.dtype=float32 or bfloat16) or a diverged model."
        )
    return summary


def _train_then_evaluate(cfg: DictConfig, out: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Evaluate the untrained compressor (and the full cache), train, evaluate the trained compressor.

    The summary is the trained run's, with `metrics_before` (full cache) and `metrics_untrained` (the
    compressor before training) beside its `metrics_after`, so the gain from training is one subtraction;
    `train` holds the trainer's own summary and `checkpoint` where the trained parts are.
    """
    task = TASKS[cfg.dataset.task]
    untrained_cfg = cfg.copy()
    with open_dict(untrained_cfg):
        untrained_cfg.method = OmegaConf.merge(untrained_cfg.method, untrained_overrides(cfg))
    untrained, _ = task.evaluate(untrained_cfg)
    trained = run_trainer(cfg, out / "checkpoint")
    trained_cfg = cfg.copy()
    with open_dict(trained_cfg):
        if trained.model_checkpoint is not None:
            trained_cfg.model.checkpoint = trained.model_checkpoint
        trained_cfg.method = OmegaConf.merge(trained_cfg.method, trained.method_overrides)
        trained_cfg.eval.compare_to_full = False  # the full cache was just evaluated
    summary, rows = task.evaluate(trained_cfg)
    summary["metrics_before"] = untrained["metrics_before"]
    summary["metrics_untrained"] = untrained["metrics_after"]
    summary["train"] = {"name": cfg.train.name, **trained.metrics}
    summary["checkpoint"] = {"model": trained.model_checkpoint, "method": trained.method_overrides}
    return summary, rows


def _machine(cfg: DictConfig) -> dict[str, Any]:
    """Where the run was timed: the host, the device (GPU name, else the CPU's) and torch's thread count."""
    cuda = cfg.hardware.device in ("cuda", "auto") and torch.cuda.is_available()
    device = torch.cuda.get_device_name() if cuda else platform.processor() or platform.machine()
    return {"host": socket.gethostname(), "device": device, "threads": torch.get_num_threads()}


def nothing_compressed(summary: dict[str, Any]) -> bool:
    """A compressing method that kept every token it saw and every byte: the run is the full cache again."""
    kv = summary.get("kv_cache") or {}
    if summary["method"]["name"] == "full" or not kv.get("tokens_seen"):
        return False
    return kv.get("tokens_kept", 0) >= kv["tokens_seen"] and kv.get("bytes_kept", 0) >= kv.get(
        "bytes_full", 0
    )


class NonFiniteMetricError(RuntimeError):
    """A metric came out NaN or infinite: the run is written, marked failed, and exits non-zero."""


def non_finite_metrics(summary: dict[str, Any]) -> dict[str, float]:
    """Every NaN / infinite number in the summary's metrics (`metrics_after`, `metrics_before`,
    `metrics_untrained`, nested keys dotted) and its objective."""
    found: dict[str, float] = {}

    def walk(value: Any, key: str) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(v, f"{key}.{k}")
        elif isinstance(value, float) and not math.isfinite(value):
            found[key] = value

    for name in ("metrics_after", "metrics_before", "metrics_untrained", "objective"):
        walk(summary.get(name), name)
    return found
