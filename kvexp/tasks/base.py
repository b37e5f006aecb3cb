"""What every task shares: the `Task` interface a run dispatches to (kvexp.tasks.registry.TASKS), the method and
engine options a config gives, and the summary.json keys every task writes (docs/usage.md#outputs)."""

from __future__ import annotations

import dataclasses
import math
import platform
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib.metadata import version
from typing import Any, TypeVar

import torch
import transformers
from omegaconf import DictConfig, OmegaConf

from kvexp.files import Journal
from kvexp.methods import Method, build_method
from kvexp.models import load_model, peak_memory
from kvexp.tasks.metrics import lower_is_better


@dataclass
class Loaded:
    """What a task's `load` prepares: the model, its tokenizer, the method and the samples (none for a dataset
    that reads them as it goes, or for lm-eval, which reads its own)."""

    model: Any
    tokenizer: Any
    method: Method
    samples: list[Any]


@dataclass
class Prepared:
    """A model, its tokenizer and a method that are already in memory (a model being trained, and its method
    with the trained parameters): `Task.evaluate` uses them instead of loading from the config."""

    model: Any
    tokenizer: Any
    method: Method

    def __iter__(
        self,
    ):  # model, tokenizer, method = prepared (not dataclasses.astuple: it deep-copies the model)
        return iter((self.model, self.tokenizer, self.method))


def prepare(cfg: DictConfig, given: Prepared | None = None) -> Prepared:
    """The run's model, tokenizer and method: `given`, else loaded from `cfg.model`, `cfg.hardware`, `cfg.method`."""
    if given is not None:
        return given
    model, tokenizer = load_model(cfg.model, cfg.hardware)  # sets threads, dtype, flush-denormal
    return Prepared(model, tokenizer, method_from_config(cfg.method))


@dataclass
class Results:
    """What a task's `run` measured: the samples, the full cache's results (None: `eval.compare_to_full=false`)
    and the compressed cache's; whether the full cache was timed in this process (None: the task does not say);
    summary keys of the dataset's own, written last (dataset=prompt: the answers, `prompts`)."""

    samples: list[Any]
    before: Any
    after: Any
    comparable: bool | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class Task(ABC):
    """A `dataset.task`. `check` runs in kvexp.config.validate, before any model loads; `evaluate` loads the model,
    the method and the samples, runs them through both caches, and returns the summary and the samples.csv rows."""

    @abstractmethod
    def check(self, cfg: DictConfig) -> None:
        """Reject a bad dataset or task option, naming it."""

    # Whether the task's main metric (its `objective` when `objective=` names none) is better when smaller.
    lower_is_better: bool = False

    @abstractmethod
    def load(self, cfg: DictConfig, given: Prepared | None = None) -> Loaded:
        """The model, the method (`given`, else `prepare`d from the config) and the samples."""

    @abstractmethod
    def run(self, cfg: DictConfig, loaded: Loaded, journal: Journal | None = None) -> Results:
        """The samples through the full cache (unless `eval.compare_to_full=false`), then the compressed one, whose
        finished batches go to `journal` (a killed run's are read back from it)."""

    @abstractmethod
    def aggregate(self, cfg: DictConfig, loaded: Loaded, results: Results) -> dict[str, Any]:
        """The summary: `build_summary`'s keys, then the task's own, its `objective` last."""

    @abstractmethod
    def rows(self, results: Results) -> list[dict[str, Any]]:
        """The samples.csv rows: one per sample (lm-eval: per request)."""

    def objective_lower_is_better(self, cfg: DictConfig, summary: dict[str, Any]) -> bool:
        """Whether a smaller `objective(cfg, summary)` is better: the metric `objective=` names, else the task's."""
        return lower_is_better(cfg.objective) if cfg.objective is not None else self.lower_is_better

    def evaluate(
        self, cfg: DictConfig, given: Prepared | None = None, journal: Journal | None = None
    ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """The summary (full-cache timings from another process marked, the dataset's own keys last) and the rows;
        `given`: evaluate a model and method already in memory (evaluation during training); `journal`: where the
        compressed run records its finished batches. A run that read some back (`resumed`: how many samples) was
        timed in two processes: its timings are not compared with the full cache's."""
        loaded = self.load(cfg, given)
        results = self.run(cfg, loaded, journal)
        resumed = journal.restored if journal is not None else 0
        if resumed:
            results.comparable = False
        summary = self.aggregate(cfg, loaded, results)
        if results.comparable is not None:
            _mark_comparable(summary, results.comparable)
        if resumed:
            summary["resumed"] = resumed
        summary.update(results.extra)
        return summary, self.rows(results)


def objective(cfg: DictConfig, summary: dict[str, Any]) -> Any:
    """The value returned to sweepers: `objective=<metrics_after key>` (dotted into nested metrics, e.g.
    `rouge.rouge1`, `qa.f1`), else the task's main metric (summary.json's `objective`)."""
    if cfg.objective is None:
        return summary["objective"]
    value: Any = summary["metrics_after"]
    for part in cfg.objective.split("."):
        if not isinstance(value, dict) or part not in value:
            raise ValueError(
                f"objective={cfg.objective!r} is not a metric of this run; choose one of: "
                f"{sorted(_metric_paths(summary['metrics_after']))}"
            )
        value = value[part]
    return value


def _metric_paths(metrics: dict[str, Any], prefix: str = "") -> list[str]:
    """Every dotted path to a value in nested metrics ({"rouge": {"rouge1": ..}} -> ["rouge.rouge1"])."""
    paths = []
    for key, value in metrics.items():
        path = f"{prefix}{key}"
        paths += _metric_paths(value, f"{path}.") if isinstance(value, dict) else [path]
    return paths


def method_from_config(method_cfg: DictConfig) -> Method:
    """The method instance a `method` node describes (its `name` plus the dataclass parameters)."""
    params = OmegaConf.to_container(method_cfg, resolve=True)
    return build_method(params.pop("name"), **params)


def engine_options(cfg: DictConfig) -> dict[str, Any]:
    """make_cache's engine settings from the config."""
    return {
        "slack": cfg.engine.slack,
        "when": cfg.engine.when,
        "positions": cfg.engine.positions,
        "compile": cfg.engine.compile,
        "compile_mode": cfg.engine.compile_mode,
        "head_budgets": OmegaConf.to_container(cfg.budget.per_head)
        if cfg.budget.per_head is not None
        else None,
    }


def kv_totals(results: Sequence) -> dict[str, Any]:
    """The cache figures summed over per-sample results (each with a `kv` stats dict and `kv_peak_bytes`)."""
    seen = sum(r.kv["tokens_seen"] for r in results)
    full = sum(r.kv.get("tokens_full", r.kv["tokens_seen"]) for r in results)
    kept = sum(r.kv["tokens_kept"] for r in results)
    return {
        "tokens_seen": seen,
        "tokens_full": full,
        "tokens_kept": kept,
        "compression_ratio": 1.0 - kept / full if full else 0.0,
        "bytes_full": sum(r.kv.get("bytes_full", 0) for r in results),
        "bytes_kept": sum(r.kv.get("bytes_kept", 0) for r in results),
        "bytes_peak": max(r.kv_peak_bytes for r in results),
    }


# cache.stats() figures a batch's rows share: method time and compression counts, split evenly over the rows.
_SHARED_STATS = ("compress_seconds", "compress_sq_seconds", "compressions", "fused_steps", "fused_seconds")


def share_batch_costs(results: Sequence, cache, peak: int, wall: float) -> None:
    """Give each result of one batch (each with `kv`, `kv_peak_bytes`, `wall_s`) its share of what the rows spent
    together: the KV peak, and with several rows the method's time and counts and the batch's wall time."""
    rows = len(results)
    shared = cache.stats()
    for result in results:
        result.kv_peak_bytes = peak // rows
        if rows > 1:
            for key in _SHARED_STATS:
                result.kv[key] = shared.get(key, 0) / rows
            result.wall_s = wall / rows


T = TypeVar("T")


def run_journaled(
    batches: Sequence[Sequence[int]],
    total: int,
    answer: Callable[[list[int]], Sequence[T]],
    journal: Journal | None,
    restore: Callable[[int, dict[str, Any]], T],
    on_batch: Callable[[list[int], list[T | None]], None] | None = None,
) -> list[T]:
    """The results of `total` samples by index: each batch of indices `answer`ed in the given order, recorded in
    `journal` (its results as dicts) as it finishes; a batch a killed job's journal already holds is `restore`d
    from it instead (the same batches as before: batches are formed before any is run). `on_batch(indices done,
    results by index so far)` after each batch."""
    held = journal.entries() if journal is not None else {}
    results: list[Any] = [None] * total
    done: list[int] = []
    for batch in batches:
        if all(i in held for i in batch):
            answers = [restore(i, held[i]) for i in batch]
        else:
            answers = answer(list(batch))
            if journal is not None:
                journal.append({i: dataclasses.asdict(a) for i, a in zip(batch, answers, strict=True)})
        for i, result in zip(batch, answers, strict=True):
            results[i] = result
        done.extend(batch)
        if on_batch is not None:
            on_batch(done, results)
    return results


def eviction_times(results: Sequence) -> dict[str, float | None]:
    """The time of one eviction (one layer's compression) over every compression of every sample (each result
    with a `kv` stats dict): mean and standard deviation in ms, the H2O study's per-eviction overhead; None
    when nothing was compressed."""
    count = sum(r.kv.get("compressions", 0) for r in results)
    if not count:
        return {"eviction_ms_mean": None, "eviction_ms_std": None}
    mean = sum(r.kv.get("compress_seconds", 0.0) for r in results) / count
    squares = sum(r.kv.get("compress_sq_seconds", 0.0) for r in results) / count
    return {
        "eviction_ms_mean": 1000 * mean,
        "eviction_ms_std": 1000 * math.sqrt(max(squares - mean * mean, 0.0)),
    }


def build_summary(
    cfg: DictConfig, loaded: Loaded, before: dict | None, after: dict, last_kv: dict, resolved: list
) -> dict[str, Any]:
    """The summary keys every task writes, from each cache's aggregate (`metrics`, `kv_cache`, `timing`; `before`:
    the full cache's, or None); `last_kv` is the last sample's cache.stats(), `resolved` each sample's budget."""
    method = loaded.method
    return {
        "model": cfg.model.name,
        "method": {"name": method.name, **{f.name: getattr(method, f.name) for f in _init_fields(method)}},
        "budget": {**OmegaConf.to_container(cfg.budget, resolve=True), "resolved_tokens": resolved},
        "dataset": cfg.dataset.name,
        "task": cfg.dataset.task,
        "metrics_before": before["metrics"] if before else None,
        "metrics_after": after["metrics"],
        "kv_cache": {
            **after["kv_cache"],
            # The last sample's kept tokens per layer and per KV head (batch means): allocations made visible.
            "tokens_kept_per_layer": last_kv.get("tokens_kept_per_layer"),
            "tokens_kept_per_head": last_kv.get("tokens_kept_per_head"),
            "method_stats": last_kv.get("method_stats"),  # e.g. cluster quality of a clustering method
        },
        "timing": after["timing"],
        "timing_full": before["timing"] if before else None,
        "memory": {**peak_memory(loaded.model.device), "kv_bytes_peak": after["kv_cache"]["bytes_peak"]},
        "engine": OmegaConf.to_container(cfg.engine, resolve=True),
        "config": OmegaConf.to_container(cfg, resolve=True),
        "versions": versions(),
        "seed": cfg.seed,
    }


def versions() -> dict[str, str]:
    """What can change a result besides the config: kvexp's, torch's, transformers' and Python's versions."""
    return {
        "kvexp": version("kvexp"),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def _init_fields(method: Method) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(method) if f.init]


# The summary fields that compare this run's time with the full cache's.
_TIME_COMPARISONS = (
    "time_before",
    "avg_time_saving_s",
    "throughput_before",
    "avg_throughput_improvement_tokens_s",
)


def _mark_comparable(summary: dict[str, Any], comparable: bool) -> None:
    """Mark full-cache timings reused from another process as not comparable (quality is reused as is):
    `timing_full.comparable` false, and no time comparison fields."""
    if summary.get("timing_full") is not None:
        summary["timing_full"]["comparable"] = comparable
    if not comparable:
        summary.update({k: None for k in _TIME_COMPARISONS if k in summary})
