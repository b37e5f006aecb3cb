from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from kvexp.engine import Reallocation
from kvexp.methods.base import register
from kvexp.methods.scorer_wrapper import ScorerWrapper

if TYPE_CHECKING:
    import torch

    from kvexp.engine.cache import CompressedLayer


@register
@dataclass
class CompressionRatioDecoding(ScorerWrapper):
    """CompressionRatioDecodingPress (kvpress): while decoding, keep a fixed fraction of all the tokens seen, the
    cache recompressed every `compression_interval` decoding steps by any scoring method.

    The `scorer` (a registered method that compresses, does not merge and does not allocate across layers, built
    with `scorer_params`) observes, scores and chooses as it does alone. The rule: a decoding step is a step of one
    new token; each layer counts them, and at every `compression_interval`-th one it is compressed to
    `max(1, int(seen x (1 - compression_ratio)))` entries, `seen` being the number of tokens seen (the newest
    position + 1, kvpress's `position_ids.max() + 1`); in between it grows by one entry per step. Multi-token steps
    (the prompt, its chunks, a question) are not decoding steps.

    Budget: the cache's budget stays what it is everywhere in kvexp, the most entries a layer may hold after a step:
    a multi-token step compresses to it as the scorer alone would (kvpress compresses no prompt: give a budget
    above the prompt for that), and decoding never holds more (the ratio's target is capped by it; a budget above
    every length leaves kvpress's rule alone). The layer's budget itself follows the rule, set through the cache
    (a `Reallocation` of the layer's own budget at each decoding step, before its compression): the ratio's target
    at a recompression step, the layer's length in between (the cap when that is exceeded), so `layer.budget` is at
    every step what the layer may hold; what the cache's `admit` adds (a query-agnostic question) raises the cap.

    Refused at run time: per-head budgets (`budget.per_head`: the layer budget changes while decoding) and
    `engine.when=prefill` (no decoding step would compress). Deviations: kvpress passes the scorer the hidden states
    buffered since the last compression (`hidden_states_buffer_size`); kvexp's scorers read the queries they
    observed themselves. One target per layer from the longest row (kvpress's definition), so a left-padded batch
    couples its rows: `batches` is False. Defaults are kvpress's (ratio 0.5, interval 512; KnormPress, as in its
    tests).
    """

    name = "compression_ratio_decoding"
    description = "while decoding, keep a fixed fraction of the tokens seen, every N steps (kvpress)"
    scorer: str = "knorm"
    compression_ratio: float = 0.5
    compression_interval: int = 512

    def __post_init__(self) -> None:
        super().__post_init__()
        if self._scorer.allocates:
            raise ValueError(
                f"method.scorer={self.scorer} allocates budgets across layers; method=compression_ratio_decoding sets "
                "each layer's budget itself while decoding: use a per-layer scorer"
            )

    @property
    def allocates(self) -> bool:
        return True  # `allocate` sets the layer's own budget at each decoding step

    @property
    def batches(self) -> bool:
        return False

    def validate(self, budget: int | None) -> None:
        if not 0.0 <= self.compression_ratio < 1.0:
            raise ValueError(f"method.compression_ratio must be in [0, 1), got {self.compression_ratio}")
        if self.compression_interval < 1:
            raise ValueError(f"method.compression_interval must be >= 1, got {self.compression_interval}")
        super().validate(budget)

    def target(self, layer: CompressedLayer) -> int:
        """The ratio's kept count at a recompression step: max(1, int(seen (1 - compression_ratio)))."""
        seen = int(layer.positions.max()) + 1
        return max(1, int(seen * (1 - self.compression_ratio)))

    def allocate(self, layer: CompressedLayer) -> Reallocation | None:
        scratch = layer.scratch(self)
        if "granted" in scratch:  # any change since this method last set the budget is the cache's (admit)
            scratch["cap"] += layer.budget - scratch["granted"]
        else:
            scratch["cap"] = layer.budget
        cap = scratch["cap"]
        if layer.new_tokens != 1:
            budget = cap  # a multi-token step compresses to the cap, as the scorer alone
        else:
            if layer.head_budgets is not None:
                raise ValueError(
                    "method=compression_ratio_decoding sets each layer's budget while decoding, which per-head "
                    "budgets (budget.per_head) cannot follow; use a token budget"
                )
            if layer.options.when == "prefill":
                raise ValueError(
                    "method=compression_ratio_decoding compresses while decoding, which engine.when=prefill never "
                    "does; use engine.when=always"
                )
            steps = scratch.get("steps", 0) + 1
            if steps >= self.compression_interval:
                budget, steps = min(cap, self.target(layer)), 0
            else:
                budget = min(cap, layer.length)
            scratch["steps"] = steps
        scratch["granted"] = budget
        return None if budget == layer.budget else Reallocation(budgets={layer.layer_idx: budget})

    def target_size(self, layer: CompressedLayer) -> int:
        if layer.new_tokens == 1:
            return layer.budget  # the rule's budget, set for this step by `allocate`
        return self._scorer.target_size(layer)

    def head_counts(self, layer: CompressedLayer, scores: torch.Tensor, target: int) -> torch.Tensor | None:
        return self._scorer.head_counts(layer, scores, target)

    def score(self, layer: CompressedLayer) -> torch.Tensor:
        return self.base_scores(layer)
