"""Run-directory files and Weights & Biases logging (the job's W&B run: `start_wandb`).

Results files are written atomically (`kvexp.files`: temp file + ``os.replace``) because sweeps are killed and preempted:
a reader — a resumed sweep, an aggregation notebook — must see either the old file or the new one, never
half a JSON. W&B is optional and imported only when a W&B logger is made.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from contextvars import ContextVar
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from kvexp.files import atomic_write_text

log = logging.getLogger(__name__)

LOGGERS = ("none", "wandb")
WANDB_MODES = ("auto", "online", "offline", "disabled")  # auto: online with an API key, else offline

# The W&B run of the job in progress (set by kvexp.app.train_or_eval for the whole job): evaluation loops report
# progress to it, and a trainer logs its curves into it rather than opening a run of its own.
ACTIVE_LOGGER: ContextVar[WandbLogger | None] = ContextVar("kvexp_active_logger", default=None)


def log_progress(values: Mapping[str, float]) -> None:
    """One history step of the job's W&B run, if it has one (per document, sample or training step)."""
    logger = ACTIVE_LOGGER.get()
    if logger is not None:
        logger.log_progress(values)


def _jsonable(obj: Any) -> Any:
    """Strict-JSON form of ``obj``: NaN/±inf become null, numpy/torch scalars become Python numbers.

    Metrics such as a diverged perplexity are NaN or inf; Python's json would write the non-standard tokens
    NaN/Infinity, which jq, JavaScript and many JSON readers reject, so they are stored as null instead.
    """
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, (str, int, bool)) or obj is None:
        return obj
    if isinstance(obj, Mapping):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)) or (
        isinstance(obj, Sequence) and not isinstance(obj, (bytes, bytearray))
    ):
        return [_jsonable(v) for v in obj]
    if hasattr(obj, "item") and tuple(getattr(obj, "shape", (1,))) == ():  # numpy scalar, 0-d tensor
        return _jsonable(obj.item())
    return obj  # left to json's default=str


def atomic_write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as indented, strict JSON (NaN/inf -> null; other non-JSON types via ``str``).

    Serialization happens before the file is touched, so an object that cannot be serialized (e.g. a dict
    with tuple keys) raises and leaves the old file as it was.
    """
    text = json.dumps(
        _jsonable(obj), indent=2, sort_keys=False, default=str, allow_nan=False, ensure_ascii=False
    )
    atomic_write_text(path, text + "\n")


def atomic_write_csv(path: Path, rows: list[dict], fieldnames: list[str] | None = None) -> None:
    """Write ``rows`` as CSV with a header; columns default to the union of keys in first-seen order.

    Missing values are written as empty cells. With explicit ``fieldnames``, a row with another key raises
    (csv.DictWriter) before anything is written. Every text cell is quoted: with "\n" line ends, Python's minimal
    quoting leaves a lone carriage return (which a model can generate) bare, and readers split the row there.
    """
    if fieldnames is None:
        fieldnames = list(dict.fromkeys(key for row in rows for key in row))
    buf = io.StringIO()
    writer = csv.DictWriter(
        buf, fieldnames=fieldnames, restval="", lineterminator="\n", quoting=csv.QUOTE_NONNUMERIC
    )
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def flatten(d: Mapping, prefix: str = "", sep: str = "/") -> dict:
    """Nested mappings to one level with joined keys ({"a": {"b": 1}} -> {"a/b": 1}).

    W&B summaries and CSV columns are flat; "/" groups the keys into W&B panel sections. An empty nested
    mapping has no leaves and disappears.
    """
    flat: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}{sep}{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            flat.update(flatten(value, name, sep))
        else:
            flat[name] = value
    return flat


def _scalar(value: Any) -> Any | None:
    """``value`` as a W&B-loggable scalar (bool, int, float, str), or None when it is not one."""
    if hasattr(value, "item") and tuple(getattr(value, "shape", (1,))) == ():
        value = value.item()
    return value if isinstance(value, (bool, int, float, str)) else None


def _cell(value: Any) -> Any:
    """A wandb.Table cell: scalars as they are, containers as JSON text (Tables need one type per column)."""
    scalar = _scalar(value)
    if scalar is not None or value is None:
        return scalar
    return json.dumps(_jsonable(value), default=str)


def has_wandb_api_key() -> bool:
    """Whether W&B can upload: WANDB_API_KEY is set or `wandb login` stored a key in ~/.netrc."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    import netrc

    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


class WandbLogger:
    """One W&B run for one experiment job; a thin layer so the rest of kvexp never imports wandb.

    ``log_samples`` mirrors the config flag: callers check it before logging per-sample tables.
    """

    def __init__(
        self,
        logger_cfg: Mapping,
        run_config: dict,
        output_dir: Path,
        job_name: str | None,
        group: str | None,
        tags: list[str],
    ) -> None:
        mode = logger_cfg.get("mode") or "auto"
        if mode not in WANDB_MODES:
            raise ValueError(f"logger.mode={mode!r} is not supported; allowed values: {list(WANDB_MODES)}")
        if mode == "auto":
            mode = "online" if has_wandb_api_key() else "offline"
        import wandb

        self._wandb = wandb
        self.log_samples = bool(logger_cfg.get("log_samples", True))
        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=logger_cfg.get("project") or "kvexp",
            entity=logger_cfg.get("entity"),
            mode=mode,
            dir=str(output_dir),  # runs land in <output_dir>/wandb/, next to the job's results
            group=group,
            name=job_name,
            job_type=logger_cfg.get("job_type"),
            tags=list(tags or []),
            config=_plain(run_config),
            reinit="finish_previous",  # a multirun job in the same process starts a fresh run
        )
        log.info("W&B run %s (%s) in %s", getattr(self.run, "id", "?"), mode, output_dir / "wandb")

    def log_summary(self, summary: Mapping) -> None:
        """Flattened scalars (numbers, strings, booleans) into the run summary: what run tables, sweeps and
        parallel-coordinates plots read; no history step, so no one-point charts."""
        if self.run is None:
            log.warning("W&B run already finished; summary not logged")
            return
        self.run.summary.update({k: s for k, v in flatten(summary).items() if (s := _scalar(v)) is not None})

    def log_progress(self, values: Mapping[str, float]) -> None:
        """One history step while the run goes (per document or sample): the live curves."""
        if self.run is not None:
            self.run.log(dict(values))

    def log_table(self, name: str, rows: list[dict]) -> None:
        """``rows`` (e.g. per-document results) as a wandb.Table; columns are the union of keys."""
        if self.run is None:
            log.warning("W&B run already finished; table %s not logged", name)
            return
        if not rows:
            log.debug("table %s is empty; not logged", name)
            return
        columns = list(dict.fromkeys(str(k) for row in rows for k in row))
        data = [[_cell(row.get(c)) for c in columns] for row in rows]
        self.run.log({name: self._wandb.Table(columns=columns, data=data)})

    def log_images(self, images: Mapping[str, Path]) -> None:
        """Image files (report plots) as wandb.Image entries, keyed by name."""
        if self.run is None:
            log.warning("W&B run already finished; images not logged")
            return
        if images:
            self.run.log({name: self._wandb.Image(str(path)) for name, path in images.items()})

    def finish(self, exit_code: int | None = None) -> None:
        """End the run (uploads or closes the offline files); safe to call more than once."""
        if self.run is None:
            return
        run, self.run = self.run, None
        run.finish(exit_code=exit_code)

    def __enter__(self) -> WandbLogger:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.finish(exit_code=1 if exc_type is not None else None)


def _plain(config: Any) -> dict:
    """A plain dict for wandb.init(config=...); OmegaConf containers are resolved first."""
    if isinstance(config, DictConfig):
        return OmegaConf.to_container(config, resolve=True)  # type: ignore[return-value]
    return dict(config or {})


def make_logger(
    logger_cfg: Mapping | None,
    run_config: dict,
    output_dir: Path,
    job_name: str | None,
    group: str | None,
    tags: list[str],
) -> WandbLogger | None:
    """The tracker selected by ``logger.name``: None for "none", a WandbLogger for "wandb"."""
    name = (logger_cfg or {}).get("name", "none")
    if name == "none":
        return None
    if name == "wandb":
        return WandbLogger(logger_cfg, run_config, output_dir, job_name, group, tags)
    raise ValueError(f"logger={name!r} is not supported; allowed values: {list(LOGGERS)}")


def start_wandb(cfg: DictConfig, out: Path) -> WandbLogger | None:
    """The job's W&B run (None for logger=none), created before evaluation: the resolved config as its config,
    typed by method, tagged with method, budget, model, dataset and the run's tags; one group per sweep."""
    job_name, group = None, None
    if HydraConfig.initialized():
        hc = HydraConfig.get()
        job_name = hc.job.override_dirname or None
        if hc.mode == RunMode.MULTIRUN:
            group = Path(hc.sweep.dir).name
    budget = cfg.budget
    budget_tag = f"budget={budget.tokens}" if budget.tokens else f"keep_ratio={budget.keep_ratio}"
    tags = [cfg.method.name, budget_tag, f"model={cfg.model.name}", f"dataset={cfg.dataset.name}", *cfg.tags]
    logger_cfg = {
        **OmegaConf.to_container(cfg.logger),
        "job_type": cfg.logger.get("job_type") or cfg.method.name,
    }
    return make_logger(logger_cfg, OmegaConf.to_container(cfg, resolve=True), out, job_name, group, tags)
