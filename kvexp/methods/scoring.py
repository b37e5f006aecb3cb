"""Shared scoring machinery for attention-informed methods (one place, not in each method).

Attention statistics are recomputed from the rotated queries the attention function was given, over the
layer's physical slots, with exactly the mask the engine's attention used (bias, causal among the step's new
tokens), softmax in fp32. Nothing materializes the full L x L matrix: window rows are few, and column sums
are accumulated over blocks of query rows.

Shapes: queries [B, H, q, D]; keys [B, Hkv, n, D]; per-query-head statistics [B, Hkv, G, ..., n] with
G = H / Hkv (query head h = g_kv * G + r, transformers' repeat_kv layout).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from kvexp.engine.cache import ranking_keys, rotate_keys

if TYPE_CHECKING:
    from kvexp.engine.cache import CompressedLayer, Rotary

GQA_REDUCTIONS = ("mean", "max", "sum")
POOLINGS = ("avgpool", "maxpool")
BLOCK = 256  # query rows per block of a multi-token step's attention


def step_queries(layer: CompressedLayer, query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """This step's rotated queries [B, H, q, D] with their token positions [B, q] (-1 for padding)."""
    q = query.shape[2]
    return query, layer.positions[:, 0, layer.length - q :]


def attention_probs(
    layer: CompressedLayer,
    queries: torch.Tensor,
    query_positions: torch.Tensor | None,
    scaling: float,
    newest: bool = False,
    slots: slice = slice(None),
) -> torch.Tensor:
    """Softmax attention [B, Hkv, G, r, n] of queries [B, H, r, D] over the layer's slots (fp32).

    A query at position p sees a slot iff the slot is live and holds a position <= p: the engine's mask
    (bias, causality inside a chunk, padding) for this step's queries, and the right causal view for queries
    remembered from earlier steps. `newest`: the queries are the layer's newest token (a decode step), which sees
    every slot, so the causal comparison is skipped (`query_positions` may be None). `slots`: a range of the slots
    (n its length) that holds every slot the queries see; the softmax is over it alone.
    """
    logits = layer.attention_logits(queries, scaling, slots)  # [B, Hkv, G, r, n], the bias added
    if not newest:
        # [B, Hkv, 1, r, n]: slot position after the query's (indexing inserts the unit dims)
        batch, rows = queries.shape[0], queries.shape[2]
        future = layer.positions[:, :, None, None, slots] > query_positions.view(batch, 1, 1, rows, 1)
        logits = logits.masked_fill(future, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if newest and not layer.has_bias:
        return probs  # no -inf anywhere: every row sees its own slot at least
    return probs.nan_to_num(0.0)  # a query that sees nothing contributes 0


def step_attention_blocks(
    layer: CompressedLayer, query: torch.Tensor, block: int = BLOCK
) -> Iterator[tuple[slice, torch.Tensor]]:
    """This step's attention in blocks of `block` query rows, so a long prefill never holds the L x L matrix:
    yields (rows, probs [B, Hkv, G, r, end]) over the first `end` slots. The step's tokens fill the layer's last q
    slots in step order and a row's positions grow along it, so no query of the block sees a slot after its own
    last token's: the slots past `end` (probability 0) are not computed, about half of a prefill's logits."""
    query, positions = step_queries(layer, query)
    steps = query.shape[2]
    before = layer.length - steps  # slots held before this step
    for first in range(0, steps, block):
        rows = slice(first, min(first + block, steps))
        seen = slice(0, before + rows.stop)
        yield rows, attention_probs(layer, query[:, :, rows], positions[:, rows], layer.scaling, slots=seen)


def column_sums(layer: CompressedLayer, query: torch.Tensor, block: int = BLOCK) -> torch.Tensor:
    """Attention each slot received from this step's queries, summed over them: [B, Hkv, G, n]."""
    if query.shape[2] == 1:  # a decode step: the newest token's row
        return newest_attention(layer, query).sum(dim=3)
    groups = query.shape[1] // layer.kv_heads
    total = query.new_zeros(query.shape[0], layer.kv_heads, groups, layer.length, dtype=torch.float32)
    for _, probs in step_attention_blocks(layer, query, block):
        total[..., : probs.shape[-1]] += probs.sum(dim=3)
    return total


def newest_attention(layer: CompressedLayer, query: torch.Tensor) -> torch.Tensor:
    """The attention row [B, Hkv, G, 1, n] of the step's newest token (the last of `query` [B, H, q, D]), which sees
    every slot: the one the engine's attention computed for a method that `reads_step_attention`, else computed
    here."""
    if layer.step_attention is not None:
        return layer.step_attention
    newest = query if query.shape[2] == 1 else query[:, :, -1:]
    return attention_probs(layer, newest, None, layer.scaling, newest=True)


def remember_queries(layer: CompressedLayer, query: torch.Tensor, window: int) -> None:
    """Keep the last `window` queries seen by this layer (across steps) for window scoring at any step.

    After a multi-token step the queries are ordered by position, padding (-1) first: a batch row whose last chunk
    is right-padded still remembers its newest real queries, as alone (a no-op order otherwise)."""
    query, positions = step_queries(layer, query)
    several = query.shape[2] > 1  # a decode step's one query is the newest: the window stays in order
    if layer.query_window is not None:
        query = torch.cat([layer.query_window[0], query], dim=2)
        positions = torch.cat([layer.query_window[1], positions], dim=1)
    if several:  # the newest `window` by position, in order: only those are gathered, not the whole prompt
        order = positions.argsort(dim=-1, stable=True)[:, -window:]  # [B, w']
        index = order[:, None, :, None].expand(-1, query.shape[1], -1, query.shape[3])
        layer.query_window = (query.gather(2, index), positions.gather(1, order))
    else:
        layer.query_window = (query[:, :, -window:], positions[:, -window:])


def window_attention(layer: CompressedLayer) -> torch.Tensor:
    """Attention of the remembered window queries over the layer: [B, Hkv, G, w, n]."""
    queries, positions = layer.query_window
    return attention_probs(layer, queries, positions, layer.scaling)


def accumulate_attention(layer: CompressedLayer, query: torch.Tensor, state: str, gqa: str) -> None:
    """Add the attention each slot received from this step's queries (reduced over the group) to `state`."""
    layer.state(state).add_(reduce_group(column_sums(layer, query), gqa))


def reduce_group(scores: torch.Tensor, how: str = "mean") -> torch.Tensor:
    """Per-query-head scores [B, Hkv, G, ...] to one score per KV head [B, Hkv, ...]."""
    if how == "mean":
        return scores.mean(dim=2)
    if how == "max":
        return scores.amax(dim=2)
    if how == "sum":
        return scores.sum(dim=2)
    raise ValueError(f"gqa reduction must be one of {GQA_REDUCTIONS}, got {how!r}")


def temporal_pool(
    scores: torch.Tensor,
    positions: torch.Tensor,
    kernel: int,
    how: str = "avgpool",
    live: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pool [B, Hkv, n] scores over temporal neighbours (kernel k, padding k//2, stride 1, length kept).

    Physical slot order is not temporal, so scores are sorted by position, pooled and put back. With `live`
    ([B, Hkv, n] bool), a dead slot (padding, an entry killed by a smaller per-head or per-row budget) is no
    neighbour: the live entries are pooled as if the dead ones were not there, as a row alone pools them (the dead
    slots' own results are meaningless).
    """
    if kernel <= 1:
        return scores
    if kernel % 2 == 0:
        raise ValueError(f"method.kernel_size must be odd (so pooling keeps the length), got {kernel}")
    # Dead slots first, then the live ones in temporal order: a live entry's neighbours are live entries.
    order = (positions if live is None else positions.masked_fill(~live, -1)).argsort(dim=-1, stable=True)
    ordered = scores.gather(-1, order)
    alive = None if live is None else live.gather(-1, order)
    flat = ordered.reshape(-1, 1, ordered.shape[-1])
    if how == "avgpool":
        if alive is None:
            pooled = F.avg_pool1d(flat, kernel, stride=1, padding=kernel // 2, count_include_pad=False)
        else:  # the mean over the live slots in the window: the leading dead ones count as the edge's padding
            weight = alive.reshape(flat.shape).to(flat.dtype)
            total = F.avg_pool1d(flat.masked_fill(weight == 0, 0.0), kernel, stride=1, padding=kernel // 2)
            share = F.avg_pool1d(weight, kernel, stride=1, padding=kernel // 2)
            pooled = total / share.clamp_min(1e-12)
    elif how == "maxpool":
        if alive is not None:
            flat = flat.masked_fill(~alive.reshape(flat.shape), float("-inf"))
        pooled = F.max_pool1d(flat, kernel, stride=1, padding=kernel // 2)
    else:
        raise ValueError(f"method.pooling must be one of {POOLINGS}, got {how!r}")
    return torch.empty_like(scores).scatter_(-1, order, pooled.reshape(ordered.shape))


def protect_recent(scores: torch.Tensor, positions: torch.Tensor, recent: int | torch.Tensor) -> torch.Tensor:
    """Force-keep each row's `recent` most recent tokens (one count, or each row's own [B, 1, 1]): positions
    newest - recent + 1 .. newest, the newest being the largest position the head holds (the step's token, present
    until its compaction), so a left-padded row counts its own tokens, as it would alone. A tensor threshold, not
    the token count: a compiled step's graph does not depend on it."""
    newest = tokens_seen(positions) - 1  # [B, Hkv, 1]
    return scores.masked_fill(positions > newest - recent, float("inf"))


def tokens_seen(positions: torch.Tensor) -> torch.Tensor:
    """[B, Hkv, 1] each row's own tokens seen: its newest position + 1 (the step's token, present until its
    compaction). A left-padded row counts its own tokens, as alone; the layer's `seen` counts the batch's."""
    return positions.amax(dim=-1, keepdim=True) + 1


def row_budget(layer: CompressedLayer) -> int | torch.Tensor:
    """The layer's budget, or under per-row budgets each row's own, [B, 1, 1] long: the size a method cuts its
    windows and shares from (a recent window of half the budget is half of each row's own budget)."""
    return layer.budget if layer.row_budgets is None else layer.row_targets(layer.budget)[:, :, None]


def fraction(budget: int | torch.Tensor, ratio: float) -> int | torch.Tensor:
    """`int(budget * ratio)` for one budget or for each row's (`row_budget`): fp64 and truncation, as Python's."""
    return int(budget * ratio) if isinstance(budget, int) else (budget.double() * ratio).long()


def head_caps(layer: CompressedLayer, target: int) -> torch.Tensor:
    """[B, Hkv] long: the most live entries each KV head may keep at this compression: its per-head budget
    (`budget.per_head`), else `target` (the layer's budget or the scorer's target size), or the row's own budget
    under per-row budgets."""
    if layer.row_budgets is not None:
        return layer.row_targets(target).expand(-1, layer.kv_heads)
    caps = layer.head_budgets if layer.head_budgets is not None else [target] * layer.kv_heads
    return torch.tensor(caps, dtype=torch.long, device=layer.device).expand(layer.batch, -1)


def prerope_queries(query: torch.Tensor, positions: torch.Tensor, rotary: Rotary | None) -> torch.Tensor:
    """Rotated queries [B, H, q, D] at `positions` [B, q] turned back to pre-RoPE (fp32): the first
    `rotary.rotary_dims` dims are rotated by -position, the others were never rotated. This is the query as the
    model computed it before RoPE (after q_norm for Qwen3-like models); without RoPE the query itself."""
    query = query.float()
    if rotary is None:
        return query
    dims = rotary.rotary_dims
    back = -positions[:, None, :].expand(-1, query.shape[1], -1).float()
    return torch.cat([rotate_keys(query[..., :dims], back, rotary.inv_freq), query[..., dims:]], dim=-1)


def prerope_keys(layer: CompressedLayer) -> torch.Tensor:
    """The cached keys turned back to pre-RoPE, fp32 [B, Hkv, L, D]: each slot rotated back by the angle it carries
    (its position, or its re-rotated position under `engine.positions=rerotate`); without RoPE the keys."""
    keys, rotary = layer.keys.float(), layer.options.rotary
    if rotary is None:
        return keys
    angle = layer.state("rope_pos") if layer.options.positions == "rerotate" else layer.positions
    dims = rotary.rotary_dims
    return torch.cat(
        [rotate_keys(keys[..., :dims], -angle.float(), rotary.inv_freq), keys[..., dims:]], dim=-1
    )


def protect_sinks(scores: torch.Tensor, positions: torch.Tensor, sinks: int | torch.Tensor) -> torch.Tensor:
    """Force-keep the first `sinks` tokens of the sequence (positions 0 .. sinks-1; padding is -1); one count or
    each row's own [B, 1, 1]."""
    return scores.masked_fill((positions >= 0) & (positions < sinks), float("inf"))


def lowest_key_norm(
    layer: CompressedLayer, sinks: int | torch.Tensor = 0, recent: int | torch.Tensor = 0
) -> torch.Tensor:
    """The kvcompress study's L2 family: `-||k||` per KV head (low-norm keys draw attention, Devoto et al. 2024), with the
    first `sinks` and the `recent` newest tokens forced in (counts, or each row's own [B, 1, 1]); the rest of the
    budget goes to the lowest norms."""
    scores = protect_sinks(-layer.keys.float().norm(dim=-1), layer.positions, sinks)
    return protect_recent(scores, layer.positions, recent)


def write_slots(
    layer: CompressedLayer,
    slot: torch.Tensor,  # [B, Hkv] physical index, one slot per KV head
    rows: torch.Tensor,  # [B, Hkv] bool: the heads whose slot is written (others are left as they are)
    keys: torch.Tensor,  # [B, Hkv, D]
    values: torch.Tensor,  # [B, Hkv, Dv]
    bias: torch.Tensor,  # [B, Hkv] the slot's logit bias (ln n for a key standing for n tokens)
    positions: torch.Tensor,  # [B, Hkv] the slot's logical position
) -> None:
    """Overwrite one slot per KV head in place: the one way a method writes K/V (a merge such as RazorAttention's
    compensation token). It writes through the layer's views, so the slot then moves with its state like any
    other at later compactions; `has_bias` is set so the attention applies the new bias."""
    index, unchanged = slot[..., None], ~rows[..., None]  # [B, Hkv, 1]
    for buffer, new in ((layer.bias, bias), (layer.positions, positions)):  # [B, Hkv, L]
        old = buffer.gather(2, index)
        buffer.scatter_(2, index, torch.where(unchanged, old, new[..., None].to(buffer.dtype)))
    for buffer, new in ((layer.keys, keys), (layer.values, values)):  # [B, Hkv, L, D]
        wide = index[..., None].expand(-1, -1, -1, buffer.shape[-1])
        old = buffer.gather(2, wide)
        buffer.scatter_(2, wide, torch.where(unchanged[..., None], old, new[:, :, None].to(buffer.dtype)))
    layer.has_bias = True


def rank_within_groups(
    scores: torch.Tensor, positions: torch.Tensor, groups: torch.Tensor, valid: torch.Tensor
) -> torch.Tensor:
    """Each slot's rank inside its group, best first: [B, Hkv, n] long, 0 for the highest score of a group (the newer
    entry first among equal scores, the engine's order), counted over the `valid` slots; scores, positions, groups
    (long) and valid (bool) are [B, Hkv, n], groups and ranks per row (b, h). Invalid slots rank after the valid ones
    of their group (their rank means nothing). A per-group top-k through the engine's one top-k: ChunkPress's
    chunks (`chunk`), a chain's stages (`compose`, one group); LagKV ranks inside its equal chunks alike."""
    n = scores.shape[-1]
    worth = ranking_keys(scores, positions).masked_fill(~valid, torch.iinfo(torch.long).min)
    order = worth.argsort(dim=-1, descending=True, stable=True)  # best first
    by_group = groups.gather(-1, order).argsort(dim=-1, stable=True)
    order = order.gather(-1, by_group)  # by group, best first inside each
    grouped = groups.gather(-1, order)
    index = torch.arange(n, device=scores.device).expand_as(order)
    starts = torch.ones_like(grouped, dtype=torch.bool)
    starts[..., 1:] = grouped[..., 1:] != grouped[..., :-1]
    first = torch.where(starts, index, 0).cummax(dim=-1).values  # where each slot's group starts in `order`
    return torch.empty_like(order).scatter_(-1, order, index - first)
