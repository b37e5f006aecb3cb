from dataclasses import dataclass, field
from typing import Any

import torch

from kvexp.engine import Reallocation, Selection
from kvexp.methods.base import Method, build_method, register


@register
@dataclass
class PrefillDecoding(Method):
    """One method for multi-token steps (prefill, chunks) and another for decode steps (kvpress's
    PrefillDecodingPress), e.g. SnapKV on the prompt and H2O while generating.

    Both sub-methods observe every step, so the decoding method's statistics (H2O's accumulated attention)
    include the prompt. `prefill` and `decoding` are method nodes: `{name: ..., <parameters>}`; replace a
    whole node to change its method (`method.prefill={name:knorm}`).
    """

    name = "prefill_decoding"
    description = "one method at prefill, another while decoding (kvpress PrefillDecodingPress)"
    prefill: dict[str, Any] = field(default_factory=lambda: {"name": "snapkv"})
    decoding: dict[str, Any] = field(default_factory=lambda: {"name": "h2o"})

    def __post_init__(self) -> None:
        self._methods = {
            phase: build_method(**dict(node))
            for phase, node in (("prefill", self.prefill), ("decoding", self.decoding))
        }
        # Instance-level values of the ClassVars the engine reads: the union of both sub-methods'.
        self.observes = any(m.observes for m in self._methods.values())
        self.allocates = any(m.allocates for m in self._methods.values())
        self.batches = all(m.batches for m in self._methods.values())
        self.state_names = tuple(dict.fromkeys(n for m in self._methods.values() for n in m.state_names))
        if any(m.probes for m in self._methods.values()):
            raise ValueError("method.prefill and method.decoding cannot be a method that runs probes (kvzip)")
        if any(not m.compresses for m in self._methods.values()):
            raise ValueError(
                "method.prefill and method.decoding must both compress (use method=full instead)"
            )

    def parts(self) -> tuple[Method, ...]:
        return tuple(self._methods.values())

    def _active(self, layer) -> Method:
        return self._methods["prefill" if layer.new_tokens > 1 else "decoding"]

    def validate(self, budget: int | None) -> None:
        for method in self._methods.values():
            method.validate(budget)

    def prepare(self, model) -> None:
        for method in self._methods.values():
            method.prepare(model)

    def initial_state(self, name: str) -> float:
        owner = next(m for m in self._methods.values() if name in m.state_names)
        return owner.initial_state(name)

    def observe(self, layer, query: torch.Tensor) -> None:
        for method in self._methods.values():
            if method.observes:
                method.observe(layer, query)

    def allocate(self, layer) -> Reallocation | None:
        plans = [m.allocate(layer) for m in self._methods.values() if m.allocates]
        plans = [plan for plan in plans if plan is not None]
        if len(plans) > 1:
            raise RuntimeError("method.prefill and method.decoding both reallocated budgets in the same step")
        return plans[0] if plans else None

    @property
    def row_budgets(self) -> bool:  # each phase's method keeps a budget per row
        return all(method.row_budgets for method in self._methods.values())

    def target_size(self, layer) -> int:
        return self._active(layer).target_size(layer)

    def head_counts(self, layer, scores: torch.Tensor, target: int | torch.Tensor) -> torch.Tensor | None:
        return self._active(layer).head_counts(layer, scores, target)

    def score(self, layer) -> torch.Tensor | Selection:
        return self._active(layer).score(layer)
