"""The method protocol and the registry.

A method is a small dataclass: hyperparameters as typed fields with the reference defaults, and `score` giving
`[B, Hkv, L_phys]` (higher = keep). The engine owns everything shared: when compression runs, top-k per KV head
(per-head budgets included), the in-place compaction of K/V/bias/positions/state, dead-slot handling and
re-rotation. Scores are over physical slots, whose order is not temporal; use `layer.positions` for time.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, ClassVar

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from kvexp.engine.cache import CompressedLayer

METHODS: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make a method available by its `name`."""
    METHODS[cls.name] = cls
    return cls


@dataclass
class Method:
    name: ClassVar[str] = ""
    description: ClassVar[str] = ""  # one line, shown by list_methods() and the README
    compresses: ClassVar[bool] = True  # False for `full`: no layer gets a budget
    observes: ClassVar[bool] = False  # True: `observe` runs after every attention step (statistics)
    state_names: ClassVar[tuple[str, ...]] = ()  # per-slot side state the engine moves with K/V
    merges: ClassVar[bool] = False  # True: `merge` folds the entries a compression drops into kept ones

    def validate(self, budget: int | None) -> None:
        """Raise ValueError for hyperparameters that cannot work with this budget (before any model runs)."""

    def prepare(self, model: PreTrainedModel) -> None:
        """Learn what the method needs from the model itself (RazorAttention's retrieval-head probe).
        `make_cache` calls it once, after `validate` and before the cache is used, if a layer has a budget."""

    def layer_budget(self, layer_idx: int, budget: int | None) -> int | None:
        """The budget this layer gets from the cache's budget (None = never compress the layer)."""
        return budget if self.compresses else None

    def layer_budgets(self, budgets: list[int | None]) -> list[int | None]:
        """Every layer's budget from the cache's per-layer budgets: `layer_budget` layer by layer, unless a
        method allocates across layers (PyramidKV needs the number of layers)."""
        return [self.layer_budget(i, budget) for i, budget in enumerate(budgets)]

    def target_size(self, layer: CompressedLayer) -> int:
        """How many entries a compression keeps; the budget unless the method says otherwise."""
        return layer.budget

    def head_counts(self, layer: CompressedLayer, scores: torch.Tensor, target: int) -> torch.Tensor | None:
        """Live entries each KV head keeps at this compression, [B, Hkv] long (None: `target` for every head,
        or the cache's static per-head budgets). The layer becomes as long as the largest count."""
        return None

    def initial_state(self, name: str) -> float:
        return 0.0

    def observe(self, layer: CompressedLayer, query: torch.Tensor) -> None:
        """Record statistics from this step's rotated queries [B, H, q, D] after its attention, before any
        compression (methods with `observes`; `layer.scaling` holds the attention's logit scale)."""

    def score(self, layer: CompressedLayer) -> torch.Tensor:
        raise NotImplementedError(f"method {self.name!r} does not score entries")

    def merge(self, layer: CompressedLayer, kept: torch.Tensor, evicted: torch.Tensor) -> None:
        """Fold the `evicted` entries into `kept` ones ([B, Hkv, L_phys] bool masks over live slots), in place
        on `layer.keys` / `values` / `bias` / `state(...)`, before the engine compacts the kept slots (methods
        with `merges`). A kept slot that comes to stand for n tokens carries bias ln n (DESIGN §2.1)."""

    def statistics(self, layers: list[CompressedLayer]) -> dict[str, Any]:
        """Method-specific figures for the run's summary (cluster quality, merge counts); empty by default."""
        return {}


def list_methods() -> dict[str, str]:
    """Every registered method with its one-line description."""
    return {name: cls.description for name, cls in sorted(METHODS.items())}


def build_method(name: str, **params) -> Method:
    """Instantiate a method by name; unknown names and parameters fail with what is allowed."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; method must be one of: {', '.join(sorted(METHODS))}")
    cls = METHODS[name]
    allowed = {f.name for f in fields(cls) if f.init}
    unknown = set(params) - allowed
    if unknown:
        raise ValueError(
            f"method {name!r} has no parameter(s) {sorted(unknown)}; its parameters are: {sorted(allowed) or 'none'}"
        )
    return cls(**params)
