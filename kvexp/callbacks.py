"""Hydra callbacks: what runs around a sweep (registered under `hydra.callbacks` in conf/config.yaml)."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from kvexp.report import collect, rows, write_report
from kvexp.tracking import make_logger

log = logging.getLogger(__name__)

# Set at the start of a multirun (inherited by launcher processes): which invocation a job belongs to, so its
# report covers its own jobs, not older ones left in the same sweep dir (kvexp.run_dir records them).
SWEEP_ID_ENV = "KVEXP_SWEEP_ID"
SWEEP_JOBS = ".kvexp_jobs"  # <sweep dir>/.kvexp_jobs/<sweep id>/<job num>.json: {config_hash, run_dir}


def exit_on_user_error(err: BaseException, verbose: bool) -> NoReturn:
    """A user error or a failed run as one line on stderr, exit status 1; the traceback with HYDRA_FULL_ERROR=1 or
    hydra.verbose=true."""
    if verbose or os.environ.get("HYDRA_FULL_ERROR") == "1":
        raise err
    print(f"kvexp: {err}", file=sys.stderr)
    raise SystemExit(1) from None


BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"


def sweep_jobs(config: DictConfig) -> Iterator[tuple[int, list[str], DictConfig]]:
    """The jobs Hydra's basic sweeper launches for a multirun's `config`, in its order: (job number, the job's
    overrides, its config less the hydra node); none for another sweeper (Optuna's draws its jobs as it goes)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    if config.hydra.sweeper.get("_target_") != BASIC_SWEEPER:
        return
    loader = GlobalHydra.instance().config_loader()
    params = config.hydra.sweeper.get("params") or {}
    arguments = [f"{key}={value}" for key, value in params.items()] + list(config.hydra.overrides.task)
    parsed = OverridesParser.create(config_loader=loader).parse_overrides(arguments)
    number = 0
    for batch in BasicSweeper.split_arguments(parsed, None):
        for overrides in batch:
            job = loader.load_sweep_config(master_config=config, sweep_overrides=list(overrides))
            yield number, list(overrides), OmegaConf.masked_copy(job, [k for k in job if k != "hydra"])
            number += 1


class RunDirCallback(Callback):
    """A single run's checks before Hydra creates its dir (kvexp.run_dir.prepare_run_dir): a bad value or a dir
    holding another config's results fails with one line and leaves nothing behind. A sweep's jobs are validated
    (kvexp.config.validate) before the first of them runs: a bad value in any job fails the sweep with one line
    naming the job, before a model loads or an hour of other jobs runs."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from kvexp.config import validate  # torch loads here, not for --help

        notes = logging.getLogger("kvexp")  # each job logs its own notes (a fallback, a default) when it runs
        previous = notes.level
        notes.setLevel(logging.ERROR)  # kvexp's loggers only: a user's and the libraries' stay as they are
        try:
            for number, overrides, task in sweep_jobs(config):
                try:
                    validate(task)
                except ValueError as err:
                    err = ValueError(f"job #{number} ({' '.join(overrides)}): {err}")
                    exit_on_user_error(err, bool(config.hydra.verbose))
        finally:
            notes.setLevel(previous)

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        from kvexp.app import NonFiniteMetricError  # torch loads here, not for --help
        from kvexp.run_dir import prepare_run_dir

        task = OmegaConf.masked_copy(config, [k for k in config if k != "hydra"])
        try:
            prepare_run_dir(task, Path(str(config.hydra.run.dir)))
        except (ValueError, NonFiniteMetricError) as err:
            exit_on_user_error(err, bool(config.hydra.verbose))


class ReportCallback(Callback):
    """At the end of a multirun, write the sweep's report (kvexp.report) into the sweep dir, and log the
    aggregated table and plots to one W&B summary run of the sweep's group when a W&B logger is configured.

    A failing report never fails the sweep: the jobs' results are already on disk and the report can be
    rebuilt with `python -m kvexp.report <sweep dir>`.
    """

    def __init__(self, enabled: bool = True, plots: bool = True) -> None:
        self.enabled = enabled
        self.plots = plots

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        """Name this invocation, so its jobs can say which run dirs hold their results (kvexp.run_dir)."""
        os.environ[SWEEP_ID_ENV] = f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if not self.enabled:
            return
        sweep_dir = Path(config.hydra.sweep.dir)
        dirs = self._own_jobs(sweep_dir)
        try:
            out = write_report(dirs, out_dir=sweep_dir, with_plots=self.plots)
        except Exception:  # the sweep itself succeeded; say why the report did not
            log.exception("the report of %s could not be written", sweep_dir)
            return
        log.info("sweep report: %s", out / "report.html")
        self._log_summary_run(config, sweep_dir, rows(collect(*dirs)))

    @staticmethod
    def _own_jobs(sweep_dir: Path) -> list[Path]:
        """The run dirs holding this invocation's jobs (reused ones included); the whole sweep dir, with a
        note, when the jobs left no record (a launcher that did not pass the environment on)."""
        records = sorted((sweep_dir / SWEEP_JOBS / os.environ.get(SWEEP_ID_ENV, "-")).glob("*.json"))
        if not records:
            log.info("no job records of this invocation: the report covers every run under %s", sweep_dir)
            return [sweep_dir]
        dirs = list(dict.fromkeys(Path(json.loads(r.read_text())["run_dir"]) for r in records))
        others = [
            d for d in sweep_dir.iterdir() if (d / "summary.json").is_file() and d.resolve() not in dirs
        ]
        if others:
            log.info(
                "the report covers this invocation's %d job(s), not %d older run(s) in %s",
                len(dirs),
                len(others),
                sweep_dir,
            )
        return dirs

    def _log_summary_run(self, config: DictConfig, sweep_dir: Path, table: list[dict]) -> None:
        logger_cfg = OmegaConf.to_container(config.logger, resolve=True) if "logger" in config else None
        logger = make_logger(
            logger_cfg, {"sweep_dir": str(sweep_dir)}, sweep_dir, "summary", sweep_dir.name, ["summary"]
        )
        if logger is None:
            return
        try:
            logger.log_table("results", table)
            logger.log_images({p.stem: p for p in sorted((sweep_dir / "plots").glob("*.png"))})
        finally:
            logger.finish()
