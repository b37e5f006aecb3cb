from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from kvexp.methods.base import register
from kvexp.methods.scorer_wrapper import ScorerWrapper

if TYPE_CHECKING:
    from kvexp.engine.cache import CompressedLayer


@register
@dataclass
class Block(ScorerWrapper):
    """Block-wise prompt processing (kvpress BlockPress; the block-wise eviction of KeyDiff, Park et al., arXiv
    2504.15364): the prompt is fed `block_size` tokens at a time and, once a layer is over budget, each block is
    compressed with the cache kept so far, by any non-merging `scorer` (built with `scorer_params`, scoring as it
    does alone). It is `eval.prefill_chunk_size=block_size` under a name: the generation tasks and lm-eval feed
    their prompts in those blocks (a block's queries attend the compressed cache, as in the KeyDiff paper;
    kvpress simulates the blocks in one forward from the uncompressed prompt's hidden states, docs/methods.md#block
    compares the two). Streaming perplexity already feeds `eval.chunk_size`-token blocks:
    there the config refuses it. Default block_size 128 (kvpress's); default scorer SnapKV at its defaults.
    """

    name = "block"
    description = "the prompt fed and compressed block by block, any scorer (kvpress BlockPress)"
    block_size: int = 128

    @property
    def prompt_block(self) -> int:
        return self.block_size

    def validate(self, budget: int | None) -> None:
        if self.block_size < 1:
            raise ValueError(f"method.block_size must be >= 1, got {self.block_size}")
        super().validate(budget)

    def score(self, layer: CompressedLayer) -> torch.Tensor:
        return self.base_scores(layer)

    def head_counts(self, layer: CompressedLayer, scores: torch.Tensor, target: int) -> torch.Tensor | None:
        return self._scorer.head_counts(layer, scores, target)
