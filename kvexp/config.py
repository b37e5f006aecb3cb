"""Config schemas (Hydra ConfigStore) and the early validation every run goes through before a model loads.

The dataclasses type every group except `method`, whose parameters differ per method and are checked against
the method's own dataclass by `build_method`. `validate(cfg)` turns every bad value a user can give into a
ValueError naming the option, the value and what is allowed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from kvexp.engine.cache import POSITION_OPTIONS, WHEN_OPTIONS


# OmegaConf 2.3 structured configs need typing.Optional/List/Dict, not PEP 604 unions.
@dataclass
class ModelConfig:
    name: str = MISSING
    source: str = MISSING
    path: str | None = None
    gguf_file: str | None = None
    gguf_package: str | None = None
    architecture: str | None = None
    tiny: dict[str, Any] = field(default_factory=dict)
    max_context: int = 2048
    revision: str | None = None
    trust_remote_code: bool = False
    attn_implementation: str = "sdpa"


@dataclass
class DatasetConfig:
    name: str = MISSING
    task: str = "perplexity"
    path: str | None = None
    local_file: str | None = None
    hub_id: str | None = None
    hub_config: str | None = None
    split: str | None = "test"
    text_field: str | None = "text"
    split_documents: bool = False


@dataclass
class BudgetConfig:
    tokens: int | None = None  # kept entries per KV head and layer
    keep_ratio: float | None = None  # or: kept fraction of each document / prompt
    per_layer: list[int] | None = None  # explicit per-layer budgets (override tokens)
    per_head: list[list[int]] | None = None  # explicit per-layer, per-KV-head budgets
    allocation: str = "uniform"  # split of tokens / keep_ratio over layers (kvexp.budgets.ALLOCATIONS)
    allocation_params: dict[str, Any] = field(default_factory=dict)  # the schedule's parameters


@dataclass
class EngineConfig:
    positions: str = "original"  # original | rerotate
    when: str = "always"  # always | prefill
    slack: int = 0  # amortized compression: compress once a layer exceeds budget + slack


@dataclass
class HardwareConfig:
    name: str = MISSING
    device: str = "cpu"
    dtype: str = "float32"
    num_threads: int | None = None
    flush_denormal: bool = False
    device_map: str | None = None


@dataclass
class LoggerConfig:
    name: str = "none"
    project: str | None = None
    entity: str | None = None
    mode: str | None = None
    job_type: str | None = None
    log_samples: bool = False


@dataclass
class EvalConfig:
    max_samples: int | None = 1  # documents evaluated (null: all)
    max_tokens: int | None = 2048  # tokens per document (null: all)
    chunk_size: int = 1  # tokens fed per step; 1 = exact token-by-token streaming
    compare_to_full: bool = True  # also evaluate the full cache on the same samples (metrics_before)


@dataclass
class KVExpConfig:
    model: ModelConfig = MISSING
    method: dict[str, Any] = MISSING
    dataset: DatasetConfig = MISSING
    budget: BudgetConfig = MISSING
    hardware: HardwareConfig = MISSING
    logger: LoggerConfig = MISSING
    engine: EngineConfig = field(default_factory=EngineConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    task_name: str = "kvexp"
    seed: int = 0
    tags: list[str] = field(default_factory=list)
    cache_dir: str | None = "outputs/.cache"  # full-cache results reused across a sweep (null: off)


ConfigStore.instance().store(name="base_config", node=KVExpConfig)

_NUMERIC_GROUP_CHOICE = re.compile(r"([+~]?budget)=(\d+(?:,\d+)*)")


def normalize_overrides(overrides: list[str]) -> list[str]:
    """Quote numeric choices of the `budget` group (`budget=256`, `budget=256,512`).

    Hydra's override parser reads `256` as an int, and a config group only takes option names (strings);
    quoting keeps `python -m kvexp budget=256` working as the README promises.
    """
    normalized = []
    for override in overrides:
        match = _NUMERIC_GROUP_CHOICE.fullmatch(override)
        if match:
            override = f"{match[1]}=" + ",".join(f"'{v}'" for v in match[2].split(","))
        normalized.append(override)
    return normalized


def _check_choice(option: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{option}={value!r} is not allowed; choose one of: {', '.join(map(str, allowed))}")


def validate(cfg: DictConfig) -> None:
    """Every check that needs no model: run it before loading anything."""
    from kvexp.models import MODEL_SOURCES
    from kvexp.tasks.data import check_dataset
    from kvexp.tracking import LOGGERS, WANDB_MODES

    _check_choice("model.source", cfg.model.source, MODEL_SOURCES)
    check_dataset(cfg.dataset)
    _check_choice("engine.positions", cfg.engine.positions, POSITION_OPTIONS)
    _check_choice("engine.when", cfg.engine.when, WHEN_OPTIONS)
    if cfg.engine.slack < 0:
        raise ValueError(f"engine.slack must be >= 0, got {cfg.engine.slack}")
    _check_choice("logger", cfg.logger.name, LOGGERS)
    if cfg.logger.name == "wandb":
        _check_choice("logger.mode", cfg.logger.mode, WANDB_MODES)
    if cfg.eval.chunk_size < 1:
        raise ValueError(f"eval.chunk_size must be >= 1, got {cfg.eval.chunk_size}")
    for key in ("max_samples", "max_tokens"):
        value = cfg.eval[key]
        if value is not None and value < (2 if key == "max_tokens" else 1):
            raise ValueError(f"eval.{key} must be null or >= {2 if key == 'max_tokens' else 1}, got {value}")

    budget = cfg.budget
    if budget.tokens is not None and budget.tokens <= 0:
        raise ValueError(f"budget.tokens must be a positive number of tokens, got {budget.tokens}")
    if budget.keep_ratio is not None and not 0.0 < budget.keep_ratio <= 1.0:
        raise ValueError(f"budget.keep_ratio must be in (0, 1], got {budget.keep_ratio}")
    if budget.tokens is not None and budget.keep_ratio is not None:
        raise ValueError(
            "set either budget.tokens or budget.keep_ratio, not both (use budget.keep_ratio=null)"
        )
    for name in ("per_layer", "per_head"):
        values = budget[name]
        flat = [] if values is None else OmegaConf.to_container(values)
        flat = [b for row in flat for b in (row if isinstance(row, list) else [row])]
        if any(b <= 0 for b in flat):
            raise ValueError(f"budget.{name} entries must be positive token counts, got {flat}")
    _check_allocation(budget)
    method = method_from_config(cfg.method)
    has_budget = any(budget[k] is not None for k in ("tokens", "keep_ratio", "per_layer", "per_head"))
    if method.compresses and not has_budget and not getattr(method, "keep_ratio", None):
        raise ValueError(
            f"method={method.name} needs a budget: budget=<64..4096|keep_0.5|...>, budget.tokens=N or "
            "budget.keep_ratio=R"
        )
    method.validate(budget.tokens)


def _check_allocation(budget: DictConfig) -> None:
    """budget.allocation names a schedule, has a budget to split, and its parameters work."""
    from kvexp.budgets import ALLOCATIONS, allocate

    _check_choice("budget.allocation", budget.allocation, ALLOCATIONS)
    if budget.allocation != "uniform":
        if budget.per_layer is not None or budget.per_head is not None:
            raise ValueError(
                f"budget.allocation={budget.allocation} splits budget.tokens or budget.keep_ratio over the layers; "
                "explicit budget.per_layer / budget.per_head need budget.allocation=uniform"
            )
        if budget.tokens is None and budget.keep_ratio is None:
            raise ValueError(
                f"budget.allocation={budget.allocation} needs budget.tokens or budget.keep_ratio"
            )
    # A dry run checks the schedule's parameters now; a keep_ratio budget is only known per document.
    probe = budget.tokens if budget.tokens is not None else 4096
    try:
        allocate(budget.allocation, probe, 2, **OmegaConf.to_container(budget.allocation_params))
    except ValueError as err:
        raise ValueError(f"budget.allocation={budget.allocation}, budget.allocation_params: {err}") from err


def method_from_config(method_cfg: DictConfig):
    """The method instance a `method` node describes (its `name` plus the dataclass parameters)."""
    from kvexp.methods import build_method

    params = OmegaConf.to_container(method_cfg, resolve=True)
    return build_method(params.pop("name"), **params)
