from dataclasses import dataclass

import torch

from kvexp.methods.base import Method, register


@register
@dataclass
class StreamingLLM(Method):
    """StreamingLLM (Xiao et al., ICLR 2024, arXiv 2309.17453): attention sinks plus a recent window.

    Keeps the first `sink_tokens` tokens of the sequence and the most recent `budget - sink_tokens`; the same set
    for every layer and head, no scores from attention. The paper re-positions cached keys (pos-shift): run with
    `positions=rerotate` for that; the default keeps original positions (kvpress's StreamingLLMPress).
    """

    name = "streaming_llm"
    row_budgets = True  # its scores never read the budget
    description = "attention sinks + recent window (Xiao et al. 2024)"
    sink_tokens: int = 4

    def validate(self, budget: int | None) -> None:
        if self.sink_tokens < 0:
            raise ValueError(f"method.sink_tokens must be >= 0, got {self.sink_tokens}")
        if budget is not None and self.sink_tokens >= budget:
            raise ValueError(
                f"method.sink_tokens ({self.sink_tokens}) must be smaller than the budget ({budget}) "
                "so that a recent window remains"
            )

    def score(self, layer) -> torch.Tensor:
        positions = layer.positions  # padding is -1 and dead anyway
        sink = (positions >= 0) & (positions < self.sink_tokens)
        return positions.float().masked_fill(sink, float("inf"))
