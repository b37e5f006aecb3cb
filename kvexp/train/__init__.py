"""Training inside train_or_eval: `train=<name>` picks a trainer that fits the model and/or the compressor.

A trainer is `train(cfg, checkpoint_dir) -> Trained`: it loads what it needs from `cfg` (model, method,
budget, hardware, `cfg.train.*`), writes its checkpoint under `checkpoint_dir` (inside the run dir), and says
how the evaluation that follows picks the trained parts up: `model_checkpoint` (read by `load_model` through
`model.checkpoint`) and `method_overrides` (merged into `cfg.method`, e.g. `{"checkpoint": <path>}`).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig


@dataclass
class Trained:
    """What a trainer produced: where the evaluation finds it, and its training summary (summary["train"])."""

    model_checkpoint: str | None = None
    method_overrides: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)


# `train.name` -> the module holding its `check(cfg)` and `train(cfg, checkpoint_dir) -> Trained` (imported on
# use: evaluation-only runs never import the training stack).
TRAINERS: dict[str, str] = {
    "distill": "kvexp.train.distill",
    "kvzip_surrogate": "kvexp.train.kvzip_surrogate",
    "learned_scorer": "kvexp.train.learned_scorer",
    "restorekv": "kvexp.train.restorekv",
}
TRAIN_CHOICES = ("none", *TRAINERS)
# Trainers that run a probing method's probes themselves (the config refuses probing methods with the others).
PROBING_TRAINERS = ("restorekv",)


def check_train(cfg: DictConfig) -> None:
    """The trainer's own option checks (names the bad `train.*` option and its allowed values)."""
    importlib.import_module(TRAINERS[cfg.train.name]).check(cfg)


def untrained_overrides(cfg: DictConfig) -> dict[str, Any]:
    """What `cfg.method` takes for the evaluation before training (`metrics_untrained`): the trainer module's
    `UNTRAINED` (kvzip_surrogate: the surrogate at its seeded initialization, `checkpoint: random`); none by
    default (the method as configured)."""
    return dict(getattr(importlib.import_module(TRAINERS[cfg.train.name]), "UNTRAINED", {}))


def run_trainer(cfg: DictConfig, checkpoint_dir: Path) -> Trained:
    """Train as `cfg.train` says; the checkpoint goes under `checkpoint_dir`."""
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    return importlib.import_module(TRAINERS[cfg.train.name]).train(cfg, checkpoint_dir)
