"""Evaluation during training (`train.eval_every=N`): every N optimizer steps and after the last, the run's own
evaluation (its dataset and `eval.*` settings, compressed cache only) of the model being trained, in memory.

Its metrics go into that step's row of `train_log.csv` (and W&B) as `eval/<metric>` columns, with
`eval/objective`: the run's objective (`objective=<metric>`, else the task's main metric). The best step by that
objective (lower is better for perplexities, higher for scores) is what the trainer keeps in `checkpoint/best/`.
`train.eval_dataset` overrides dataset keys for these evaluations (e.g. a validation split or file), and
`train.eval_max_samples` caps their samples, so model selection need not look at the test samples.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from kvexp.methods import Method
from kvexp.tasks.base import Prepared, objective
from kvexp.tasks.registry import TASKS
from kvexp.tracking import flatten

log = logging.getLogger(__name__)

OBJECTIVE = "eval/objective"  # the train_log.csv column the best step is chosen by


def evaluation_config(cfg: DictConfig) -> DictConfig:
    """The run's config as evaluations during training use it: `train.eval_dataset` merged into `dataset`,
    `train.eval_max_samples` (when set) as `eval.max_samples`, the compressed cache only, no warm-up."""
    t = cfg.train
    evaluated = cfg.copy()
    with open_dict(evaluated):
        overrides = t.get("eval_dataset") or {}
        evaluated.dataset = OmegaConf.merge(evaluated.dataset, overrides)
        if t.get("eval_max_samples") is not None:
            evaluated.eval.max_samples = int(t.eval_max_samples)
        evaluated.eval.compare_to_full = False
        evaluated.eval.warmup = False
    return evaluated


def check_evaluation(cfg: DictConfig) -> None:
    """`train.eval_every`, `eval_max_samples`, `eval_dataset` (keys the dataset has) and the dataset they make."""
    t = cfg.train
    for name in ("eval_every", "eval_max_samples"):
        value = t.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"train.{name}={value!r}: must be null or an integer >= 1")
    if not isinstance(t.get("keep_best", True), bool):
        raise ValueError(f"train.keep_best={t.get('keep_best')!r} must be true or false")
    overrides = t.get("eval_dataset") or {}
    if not isinstance(overrides, Mapping):
        raise ValueError(
            f"train.eval_dataset={overrides!r} must be a mapping of dataset keys (e.g. {{split: validation}})"
        )
    unknown = sorted(set(overrides) - set(cfg.dataset))
    if unknown:
        raise ValueError(
            f"train.eval_dataset: {unknown} are not keys of dataset={cfg.dataset.name}; its keys: "
            f"{sorted(cfg.dataset)}"
        )
    if "name" in overrides or "task" in overrides:
        raise ValueError(
            "train.eval_dataset overrides the run's dataset (e.g. its split or path), not its name or task"
        )
    if t.get("eval_every") is None:
        return
    if cfg.dataset.name == "prompt":
        raise ValueError(
            "train.eval_every: dataset=prompt has no scores to choose a checkpoint by; evaluate on a scored "
            "dataset (e.g. dataset=wikitext2 or passkey)"
        )
    TASKS[cfg.dataset.task].check(evaluation_config(cfg))


class TrainingEvaluator:
    """Evaluates the model being trained with the run's evaluation and remembers the best step."""

    def __init__(self, cfg: DictConfig, tokenizer, method: Method):
        self.cfg = evaluation_config(cfg)
        self.every = int(cfg.train.eval_every)
        self.task = TASKS[cfg.dataset.task]
        self.tokenizer, self.method = tokenizer, method
        self.best: tuple[int, float] | None = None  # (step, objective)
        self.lower_is_better: bool | None = None  # known from the first evaluation's summary

    def due(self, step: int, total: int) -> bool:
        """An evaluation every `eval_every` steps and after the last step."""
        return step % self.every == 0 or step == total

    def evaluate(self, model, step: int) -> tuple[dict[str, Any], bool]:
        """The `eval/...` figures of `model` at `step`, and whether its objective is the best so far. The global
        random state is left as it was, so training goes on exactly as without the evaluation."""
        devices = [model.device] if model.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            summary, _ = self.task.evaluate(self.cfg, Prepared(model, self.tokenizer, self.method))
        value = objective(self.cfg, summary)
        self.lower_is_better = self.task.objective_lower_is_better(self.cfg, summary)
        metrics = {
            k: v for k, v in summary["metrics_after"].items() if k != "by"
        }  # not the per-cell breakdown
        figures = {f"eval/{k}": v for k, v in flatten(metrics).items() if isinstance(v, int | float)}
        figures[OBJECTIVE] = value
        improved = self._improves(value)
        if improved:
            self.best = (step, float(value))
        log.info("step %d: evaluation objective %s%s", step, value, " (best so far)" if improved else "")
        return figures, improved

    def _improves(self, value: Any) -> bool:
        if not isinstance(value, int | float) or not math.isfinite(value):
            return False  # a non-finite or missing objective never becomes the best
        if self.best is None:
            return True
        return value < self.best[1] if self.lower_is_better else value > self.best[1]

    def restore(self, rows: list[dict[str, Any]]) -> None:
        """The best step among the evaluations in a resumed run's log rows."""
        evaluated = [r for r in rows if isinstance(r.get(OBJECTIVE), int | float)]
        if not evaluated:
            return
        metrics = {
            k.removeprefix("eval/"): v
            for k, v in evaluated[-1].items()
            if k.startswith("eval/") and k != OBJECTIVE
        }
        self.lower_is_better = self.task.objective_lower_is_better(self.cfg, {"metrics_after": metrics})
        for row in evaluated:
            if self._improves(row[OBJECTIVE]):
                self.best = (int(row["step"]), float(row[OBJECTIVE]))
