"""Methods built around another method's scores (Ada-KV, CriticalKV, ChunkKV, DMS, LU-KV, ...): the `scorer` +
`scorer_params` pattern. The wrapped method (the scorer) is built from its name and parameters
and keeps doing everything but the final choice: it observes, holds its per-slot state, sets the layer
budgets, learns from the model (`prepare`) and scores; the wrapper turns its scores into the entries that
stay."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from kvexp.engine import Reallocation, Selection
from kvexp.methods.base import METHODS, Method, build_method

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from kvexp.engine.cache import CompressedLayer


@dataclass
class ScorerWrapper(Method):
    """A method around a `scorer` (a registered method that compresses and does not merge, built with
    `scorer_params`); subclasses implement `score` from `base_scores`."""

    scorer: str = "snapkv"
    scorer_params: dict[str, Any] = field(default_factory=dict)
    _scorer: Method = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        allowed = sorted(
            n
            for n, cls in METHODS.items()
            if cls.compresses and not cls.merges and not cls.probes and n != self.name
        )
        if self.scorer not in allowed:
            raise ValueError(f"method.scorer must be one of: {', '.join(allowed)}; got {self.scorer!r}")
        try:
            self._scorer = build_method(self.scorer, **self.scorer_params)
        except ValueError as err:
            raise ValueError(f"method.scorer_params: {err}") from err
        if self._scorer.probes:  # a setting that makes it probe (kvcompose's queries=repeat)
            raise ValueError(
                f"method.scorer={self.scorer} with these scorer_params runs probes after the prompt, which a "
                "wrapper cannot run"
            )

    def parts(self) -> tuple[Method, ...]:
        return (self._scorer,)

    # What the engine asks of the method is the scorer's, but the choice of entries.
    @property
    def observes(self) -> bool:
        return self._scorer.observes

    @property
    def reads_step_attention(self) -> bool:
        return self._scorer.reads_step_attention

    @property
    def state_names(self) -> tuple[str, ...]:
        return self._scorer.state_names

    @property
    def allocates(self) -> bool:
        return self._scorer.allocates

    @property
    def batches(self) -> bool:
        return self._scorer.batches

    def validate(self, budget: int | None) -> None:
        try:
            self._scorer.validate(budget)
        except ValueError as err:  # the scorer's option is method.scorer_params.<option>
            raise ValueError(f"method.scorer_params (scorer {self.scorer}): {err}") from err

    def check_model(self, num_layers: int, kv_heads: int) -> None:
        try:
            self._scorer.check_model(num_layers, kv_heads)
        except ValueError as err:
            raise ValueError(f"method.scorer_params (scorer {self.scorer}): {err}") from err

    def prepare(self, model: PreTrainedModel) -> None:
        self._scorer.prepare(model)

    def layer_budgets(self, budgets: list[int | None]) -> list[int | None]:
        return self._scorer.layer_budgets(budgets)

    def target_size(self, layer: CompressedLayer) -> int:
        return self._scorer.target_size(layer)

    def initial_state(self, name: str) -> float:
        return self._scorer.initial_state(name)

    def observe(self, layer: CompressedLayer, query: torch.Tensor) -> None:
        self._scorer.observe(layer, query)

    def allocate(self, layer: CompressedLayer) -> Reallocation | None:
        return self._scorer.allocate(layer)

    def statistics(self, layers: list[CompressedLayer]) -> dict[str, Any]:
        return self._scorer.statistics(layers)

    def base_scores(self, layer: CompressedLayer) -> torch.Tensor:
        """The scorer's scores [B, Hkv, L_phys] in fp32, dead slots -inf (`+inf`: entries the scorer
        protects)."""
        scores = self._scorer.score(layer)
        if isinstance(scores, Selection):
            scores = scores.scores
        # out of place: a scorer may hand over its own state (accumulated attention) as its scores
        return scores.float().masked_fill(~layer.live(), float("-inf"))
