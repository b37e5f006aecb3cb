from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from kvexp.methods.base import register
from kvexp.methods.scorer_wrapper import ScorerWrapper
from kvexp.methods.scoring import rank_within_groups

if TYPE_CHECKING:
    from kvexp.engine.cache import CompressedLayer


def chunk_scores(
    base: torch.Tensor, positions: torch.Tensor, live: torch.Tensor, chunk_length: int
) -> torch.Tensor:
    """ChunkPress's rule as scores for one top-k: base scores [B, Hkv, n] (dead slots -inf, protected +inf) ->
    [B, Hkv, n]. Chunk c holds positions [c L, (c + 1) L); with `size_c` the tokens of it the row has seen (L, or
    fewer for the newest chunk), the entry ranked t-th (0 = best) among its chunk's scored entries scores
    1 - t / size_c. A top-k of these keeps every chunk's best entries in the same share of its size: chunk c keeps
    ceil(theta size_c) or one fewer for one threshold theta, the older chunk giving up first on equal terms.
    Protected (+inf) and dead (-inf) slots keep their scores."""
    scored = base.isfinite()
    chunk = positions.clamp_min(0) // chunk_length
    newest = positions.masked_fill(~live, -1).flatten(1).amax(dim=-1)  # [B]: the row's newest position
    size = (newest[:, None, None] + 1 - chunk * chunk_length).clamp(1, chunk_length)
    rank = rank_within_groups(base, positions, chunk, scored)
    return torch.where(scored, 1.0 - rank.float() / size.float(), base)


@register
@dataclass
class Chunk(ScorerWrapper):
    """ChunkPress (kvpress; after FINCH, Corallo and Papotti, TACL 2024, arXiv 2408.00167): the context compressed chunk by chunk, each
    chunk of `chunk_length` tokens keeping the same share, so the kept entries cover the whole context uniformly.

    Any non-merging `scorer` (a registered method built with `scorer_params`) scores the entries as it does alone
    (its observation, state and layer budgets are its own). At each compression, per KV head, chunk c holds the
    positions [c chunk_length, (c + 1) chunk_length) (its region of the sequence, fixed for the whole run: later
    compressions and decoding keep sharing the budget over the same chunks; the newest chunk is as long as the
    tokens of it seen). Each chunk ranks its entries by the scorer's scores, and the engine's one top-k at the
    budget ranks every entry by its rank in its chunk relative to the chunk's size (`chunk_scores`): each chunk
    keeps its best entries in equal share of its size, every chunk's best one first. The scorer's protected
    entries (+inf: SnapKV's window) stay on top and are not counted in a chunk's share. Per-head counts are the
    scorer's (its `head_counts`, from its own scores) or the cache's per-head budgets.

    Deviations from kvpress: kvpress scores each chunk alone (the scorer sees only the chunk's hidden states and
    keys: SnapKV's window is then each chunk's last tokens) and keeps `max(1, int(size (1 - ratio)))` of each, so
    the total may fall short of the budget; kvexp scores once over the whole layer (the scorer's own scores) and
    keeps exactly the budget, the chunks' counts differing by at most one from their share. kvpress compresses the
    prompt once; here every compression (chunked prefill, decoding) shares the budget over the chunks again
    (`engine.when=prefill` for once). Default chunk_length 1024 (kvpress's); default scorer SnapKV at its defaults.
    """

    name = "chunk"
    description = (
        "each context chunk keeps the same share of its entries by the scorer's ranking (kvpress ChunkPress)"
    )
    chunk_length: int = 1024

    def validate(self, budget: int | None) -> None:
        if self.chunk_length < 1:
            raise ValueError(f"method.chunk_length must be >= 1, got {self.chunk_length}")
        super().validate(budget)

    def score(self, layer: CompressedLayer) -> torch.Tensor:
        base = self.base_scores(layer)
        layer.scratch(self)["base"] = base  # the scorer's per-head counts read its own scores
        return chunk_scores(base, layer.positions, layer.live(), self.chunk_length)

    @property
    def row_budgets(
        self,
    ) -> bool:  # chunks share out the kept counts the scorer (or the engine) gives each row
        return self._scorer.row_budgets

    def head_counts(
        self, layer: CompressedLayer, scores: torch.Tensor, target: int | torch.Tensor
    ) -> torch.Tensor | None:
        base = layer.scratch(self).pop("base", None)
        return self._scorer.head_counts(layer, scores if base is None else base, target)
