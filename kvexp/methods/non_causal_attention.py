"""Non-causal chunked attention (Compactor's attention score), kept per slot across steps."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from kvexp.methods.base import Method, register
from kvexp.methods.scoring import step_queries, temporal_pool

if TYPE_CHECKING:
    from kvexp.engine.cache import CompressedLayer


def chunk_attention_sums(
    layer: CompressedLayer, queries: torch.Tensor, positions: torch.Tensor, chunk: int, block: int = 256
) -> torch.Tensor:
    """Attention each slot receives from the queries [B, H, m, D] (positions [B, m], -1: none) of its own chunk,
    summed over them and averaged over the GQA group: [B, Hkv, L] fp32.

    Non-causal: a query at position p attends to every live slot whose position lies in p's chunk
    [c * chunk, (c + 1) * chunk), c = p // chunk, before or after p; logits unscaled (q . k, the reference
    implementations' scale 1), softmax in fp32 over those slots (dead slots excluded by their -inf bias)."""
    slot_chunk = torch.where(layer.positions >= 0, layer.positions // chunk, -2)  # [B, Hkv, L]
    batch, kv_heads, length = slot_chunk.shape
    total = torch.zeros(batch, kv_heads, queries.shape[1] // kv_heads, length, device=queries.device)
    for first in range(0, queries.shape[2], block):
        rows = positions[:, first : first + block]
        query_chunk = torch.where(rows >= 0, rows // chunk, -1)  # -1 meets no slot (-2)
        real = query_chunk[query_chunk >= 0]
        if real.numel() == 0:
            continue
        # Only the slots of these queries' chunks can get attention: the logits need the columns from the first to
        # the last of them, not all L (a one-step prefill's slots are in position order: about a chunk's width).
        seen = ((slot_chunk >= real.min()) & (slot_chunk <= real.max())).any(dim=1).any(dim=0).nonzero()
        if seen.numel() == 0:
            continue
        cols = slice(int(seen[0]), int(seen[-1]) + 1)
        logits = layer.attention_logits(queries[:, :, first : first + block], 1.0, cols)  # [B, Hkv, G, r, n]
        unseen = slot_chunk[:, :, None, None, cols] != query_chunk[:, None, None, :, None]
        probs = torch.softmax(logits.masked_fill(unseen, float("-inf")), dim=-1)
        total[..., cols] += probs.nan_to_num(0.0).sum(dim=3)  # a query that sees nothing adds 0
    return total.mean(dim=2)


@register
@dataclass
class NonCausalAttention(Method):
    """Non-causal chunked attention (Chari & Van Durme, *Compactor: Calibrated Query-Agnostic KV Cache Compression with
    Approximate Leverage Scores*, arXiv 2507.08143, 2025; kvpress `NonCausalAttnPress`): how much attention a key
    draws from the context's own queries, both directions, as a query-agnostic estimate of future attention.

    The sequence is cut into chunks of `chunk_length` positions (position // chunk_length); every query of a chunk
    attends to every live key of the same chunk, before and after it (softmax over the chunk, logits q . k
    unscaled as in both of the authors' implementations, fp32), and a key's score is the attention it receives
    summed over its chunk's queries, averaged over the GQA group; times ||v|| (`value_norm`) and averaged over
    `kernel_size` temporal neighbours (`kernel_size` 1: no pooling). Higher = keep.

    Streaming: once the newest position reaches a chunk's end, the chunk's column sums are added to a per-slot state
    (the chunk's surviving keys, as the paper's prefill would score them); the queries of the open chunk are kept
    (at most `chunk_length` per row) and their sums over the open chunk's keys are recomputed at each compression.
    A one-step prefill thus scores exactly as chunked prefill attention; chunked prefills and decoding work too.
    Deviations: kvpress masks the padded keys of its last partial chunk with -1e-9 (not -inf: they keep softmax mass)
    and averages pooled scores with the zero padding counted; here a partial chunk is its real queries and keys and
    pooling averages the live temporal neighbours. kvpress z-normalizes the scores (the same selection per head).
    The paper's text was not reachable offline: the rule follows the authors' kvpress press. Defaults are kvpress's
    (chunk 256, its `chunk_size`, renamed so as not to read as the feeding chunk `eval.chunk_size`; value norms and
    3-neighbour average pooling, which the official compactor-vllm engine, chunk 128, leaves out).
    """

    name = "non_causal_attention"
    row_budgets = True  # its scores never read the budget
    description = (
        "attention from the context's own queries within chunks, both directions (Chari & Van Durme 2025)"
    )
    observes = True
    state_names = ("attention",)  # column sums of the chunks that closed, per slot
    # The open chunk's queries [B, H, m, D] and positions [B, m] (-1: none), per batch row.
    row_scratch = ("open_queries", "open_positions")
    chunk_length: int = 256
    value_norm: bool = True
    kernel_size: int = 3

    def validate(self, budget: int | None) -> None:
        if self.chunk_length < 1:
            raise ValueError(f"method.chunk_length must be >= 1, got {self.chunk_length}")
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ValueError(f"method.kernel_size must be odd and >= 1, got {self.kernel_size}")

    def observe(self, layer, query: torch.Tensor) -> None:
        query, positions = step_queries(layer, query)
        scratch = layer.scratch(self)
        if "open_queries" in scratch:
            query = torch.cat([scratch["open_queries"], query], dim=2)
            positions = torch.cat([scratch["open_positions"], positions], dim=1)
        newest = layer.positions.amax(
            dim=(1, 2)
        )  # [B]: each row's newest position (the step's tokens are in)
        real = positions >= 0
        closed = real & ((positions // self.chunk_length + 1) * self.chunk_length <= newest[:, None] + 1)
        if bool(closed.any()):
            layer.state("attention").add_(
                chunk_attention_sums(layer, query, positions.masked_fill(~closed, -1), self.chunk_length)
            )
        open_ = real & ~closed
        width = int(open_.sum(dim=1).max())
        order = open_.long().argsort(dim=1, stable=True)[:, open_.shape[1] - width :]  # the open queries last
        scratch["open_positions"] = positions.masked_fill(~open_, -1).gather(1, order)
        scratch["open_queries"] = query.gather(
            2, order[:, None, :, None].expand(-1, query.shape[1], -1, query.shape[3])
        )

    def attention_scores(self, layer) -> torch.Tensor:
        """The unmasked scores [B, Hkv, L] fp32: closed chunks' sums plus the open chunk's, x ||v|, pooled."""
        scores = layer.state("attention").float().clone()
        scratch = layer.scratch(self)
        if scratch.get("open_positions") is not None and scratch["open_positions"].shape[1] > 0:
            scores = scores + chunk_attention_sums(
                layer, scratch["open_queries"], scratch["open_positions"], self.chunk_length
            )
        if self.value_norm:
            scores = scores * layer.values.float().norm(dim=-1)
        if self.kernel_size == 1:
            return scores
        # The mean over k temporal neighbours among the live slots (dead ones are no neighbours).
        return temporal_pool(scores, layer.positions, self.kernel_size, "avgpool", layer.live())

    def score(self, layer) -> torch.Tensor:
        return self.attention_scores(layer).masked_fill(~layer.live(), float("-inf"))
