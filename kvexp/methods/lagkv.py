from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from kvexp.methods.base import Method, register

if TYPE_CHECKING:
    from kvexp.engine.cache import CompressedLayer

log = logging.getLogger(__name__)

# The lag window's score: above every chunk score, below the sinks' +inf, so that a head whose budget cannot hold
# the sinks and the window (a small per-head budget) drops the window's oldest entries first, never a sink.
WINDOW = torch.finfo(torch.float32).max


_WARNED: set[tuple[int, int, int]] = set()


def _warn_small_budget(budget: int, n_sink: int, lag_size: int) -> None:
    """Say once per setting that a budget below n_sink + 2 lag_size - 1 leaves decoding steps without two chunks;
    not while kvexp's notes are silenced (a sweep validating its jobs up front), so that the job itself says it."""
    if (budget, n_sink, lag_size) in _WARNED or not log.isEnabledFor(logging.WARNING):
        return
    _WARNED.add((budget, n_sink, lag_size))
    log.warning(
        "lagkv: budget %d < n_sink + 2 x lag_size - 1 = %d: a step that adds one token then holds fewer than two "
        "chunks and keeps the sinks and the newest entries (kvpress's fallback); only long steps (a prefill) score "
        "chunks. Lower method.lag_size to score while decoding.",
        budget,
        n_sink + 2 * lag_size - 1,
    )


def lag_relative_score(chunks: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """LagKV's per-token score of each chunk [..., C, L, D] against its reference chunk [..., C, L, D] (the next
    one): the entries min-max normalized per channel by the reference's range, the std over the channels (unbiased,
    as the authors' code), softmaxed over the chunk's L tokens: [..., C, L]. A channel whose reference is constant
    (max = min, where the authors' code divides by zero) counts as 0."""
    low = reference.amin(dim=-2, keepdim=True)
    spread = reference.amax(dim=-2, keepdim=True) - low
    flat = spread == 0
    normalized = torch.where(flat, 0.0, (chunks - low) / torch.where(flat, 1.0, spread))
    return normalized.std(dim=-1).softmax(dim=-1)


@register
@dataclass
class LagKV(Method):
    """LagKV (Liang, Zhang, Li, Li, arXiv 2504.04704; kvpress LagKVPress): each chunk is scored against the next.

    At a compression each KV head's live entries are taken in temporal order (`layer.positions`; padding and dead
    per-head slots excluded). The first `n_sink` tokens of the sequence (positions < n_sink) are always kept; the
    entries after them are cut into chunks of `lag_size` entries, oldest first, and the last full chunk with the
    partial one after it (lag_size .. 2 lag_size - 1 entries) is the lag window, always kept. Every earlier chunk is
    scored against the chunk after it: its keys are min-max normalized per channel by the next chunk's keys, the
    std over the channels is softmaxed over the chunk's tokens, likewise for the values, and the token's score is
    key score + `score_v_ratio` x value score. The paper keeps the top fraction of every chunk; a budget's one top-k
    does the same when the scores are the tokens' ranks inside their chunk (rank / lag_size, the default: chunks
    lose entries in turn, ties by position, so their kept counts differ by at most one); `cross_scoring: true` ranks
    the softmax scores across chunks instead (kvpress's option).

    Chunks when compression runs repeatedly: the chunks are those of the entries the head holds at that
    compression, counted from the oldest non-sink entry. The first compression of a prefill sees every token, so
    it is the paper's (and kvpress's) prefill rule exactly; a later one (chunked prefill, decoding) re-chunks what
    survived, each chunk scored against the survivors after it, and the newest entries are always in the lag
    window. The authors' cache instead freezes what it compressed and scores only the uncompressed tail, one
    chunk at a time at a fixed ratio, so it grows without a budget; kvpress's press scores one prefill only and
    falls back to the newest tokens when fewer than two chunks exist.

    While a head holds fewer than two chunks after its sinks nothing is scored: the sinks and the newest entries
    stay (the window's score ranks above every chunk's and below the sinks', ties by age), kvpress's fallback. A
    budget below n_sink + 2 lag_size - 1 is therefore allowed but logged: its decoding steps keep the newest
    entries, and only long steps (a prefill) score chunks. Defaults are the authors' (16 sinks, lag 128, equal key
    and value weight; kvpress uses 4 sinks). Query free; rows of a batch read only their own live entries, in their
    own temporal order.
    """

    name = "lagkv"
    row_budgets = True  # its scores never read the budget
    description = (
        "min-max normalize each chunk by the next one, keep high-variance tokens (Liang et al. 2025)"
    )
    n_sink: int = 16
    lag_size: int = 128
    score_v_ratio: float = 1.0
    cross_scoring: bool = False

    def validate(self, budget: int | None) -> None:
        if self.n_sink < 0:
            raise ValueError(f"method.n_sink must be >= 0, got {self.n_sink}")
        if self.lag_size < 2:
            raise ValueError(
                f"method.lag_size must be >= 2 (a one-token chunk has no range), got {self.lag_size}"
            )
        if self.score_v_ratio < 0:
            raise ValueError(f"method.score_v_ratio must be >= 0, got {self.score_v_ratio}")
        if budget is not None and budget <= self.n_sink:
            raise ValueError(
                f"method.n_sink ({self.n_sink}) must be smaller than the budget ({budget}) so that entries are scored"
            )
        if budget is not None and budget < self.n_sink + 2 * self.lag_size - 1:
            _warn_small_budget(budget, self.n_sink, self.lag_size)

    def score(self, layer: CompressedLayer) -> torch.Tensor:
        positions, live = layer.positions, layer.live()  # [B, Hkv, n]
        batch, heads, n = positions.shape
        lag = self.lag_size
        # Temporal order of the live entries (dead slots last): the sinks, then the chunks, then the lag window.
        order = torch.where(live, positions, torch.iinfo(torch.long).max).argsort(dim=-1, stable=True)
        sinks = live & (positions < self.n_sink)
        held_sinks = sinks.sum(dim=-1)  # [B, Hkv]
        full_chunks = (live.sum(dim=-1) - held_sinks) // lag
        chunks = n // lag  # static: the most chunks a head can hold
        scores = torch.full((batch, heads, n + 1), WINDOW, device=positions.device)  # slot n: a discard bin
        if chunks >= 2:
            rank = torch.arange(chunks * lag, device=positions.device)  # entry c * lag + j of the chunks
            index = (held_sinks[..., None] + rank).clamp_max(n - 1)  # into `order`
            slots = order.gather(-1, index)  # [B, Hkv, C * lag]
            score = self._chunk_scores(layer, slots, chunks)  # [B, Hkv, (C - 1) * lag]
            scored = rank[: (chunks - 1) * lag] // lag < (full_chunks - 1)[..., None]  # before the lag window
            target = torch.where(scored, slots[..., : (chunks - 1) * lag], n)
            scores.scatter_(-1, target, score)
        return scores[..., :n].masked_fill(sinks, float("inf"))

    def _chunk_scores(self, layer: CompressedLayer, slots: torch.Tensor, chunks: int) -> torch.Tensor:
        """Scores of the entries of chunks 0 .. C-2 (slots [B, Hkv, C * lag] in temporal order), each against the
        chunk after it: [B, Hkv, (C - 1) * lag]."""
        batch, heads, _ = slots.shape
        total = 0.0
        for states, weight in ((layer.keys, 1.0), (layer.values, self.score_v_ratio)):
            dim = states.shape[-1]
            wide = slots[..., None].expand(-1, -1, -1, dim)
            grouped = states.float().gather(2, wide).view(batch, heads, chunks, self.lag_size, dim)
            total = total + weight * lag_relative_score(grouped[:, :, :-1], grouped[:, :, 1:])
        if not self.cross_scoring:
            # Rank inside the chunk (stable: equal scores rank by age), over lag_size: the paper's per-chunk top-k.
            ranks = total.argsort(dim=-1, stable=True).argsort(dim=-1, stable=True)
            total = ranks.float() / self.lag_size
        return total.flatten(2)
