"""KVCompose: attention-guided eviction per KV head (composite tokens) with one global allocation across layers."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from kvexp.engine import Reallocation
from kvexp.engine.cache import rotate_keys
from kvexp.methods.base import LayerAllocation, Method, Probing, allocation_at_last_layer, register
from kvexp.methods.dynamickv import share_with_caps
from kvexp.methods.scoring import newest_attention, step_queries

if TYPE_CHECKING:
    from kvexp.engine.cache import CompressedLayer, KVCache

AGGREGATIONS = ("max", "mean")
QUERIES = ("own", "repeat")


def attention_extremes(
    layer: CompressedLayer,
    queries: torch.Tensor,
    positions: torch.Tensor,
    delta: torch.Tensor | None,
    causal: bool,
    block: int = 256,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per query head, each slot's largest and summed attention [B, Hkv, G, n] over the real queries [B, H, q, D]
    (positions [B, q], -1: padding, which adds nothing), each query moved `delta` [B] positions forward (RoPE;
    None: not moved); softmax over the live slots in fp32; `causal`: a slot after the (moved) query's position is
    not seen; the model's sliding window, if any, counted from the moved position. Blocks of `block` queries: the
    q x n matrix never at once."""
    real = positions >= 0
    moved_positions = positions if delta is None else positions + delta[:, None]
    rotary = layer.options.rotary
    batch, heads, q, _ = queries.shape
    slot_positions = layer.positions.view(batch, layer.kv_heads, 1, 1, -1)
    largest = summed = None
    for start in range(0, q, block):
        rows = slice(start, start + block)
        part = queries[:, :, rows].float()
        if rotary is not None and delta is not None:
            dims = rotary.rotary_dims
            shift = delta[:, None, None].expand(batch, heads, part.shape[2])
            part = torch.cat(
                [rotate_keys(part[..., :dims], shift, rotary.inv_freq), part[..., dims:]], dim=-1
            )
        logits = layer.attention_logits(part, layer.scaling)  # [B, Hkv, G, r, n], dead slots -inf
        moved = moved_positions[:, rows].view(batch, 1, 1, -1, 1)
        if causal:
            logits = logits.masked_fill(slot_positions > moved, float("-inf"))
        if layer.window is not None:
            logits = logits.masked_fill(slot_positions <= moved - layer.window, float("-inf"))
        probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)
        probs = probs * real[:, rows].view(batch, 1, 1, -1, 1)
        top, total = probs.amax(dim=3), probs.sum(dim=3)
        largest = top if largest is None else torch.maximum(largest, top)
        summed = total if summed is None else summed + total
    return largest, summed


def shifted_attention(
    layer: CompressedLayer, queries: torch.Tensor, positions: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """`attention_extremes` of a multi-token step's own queries [B, H, q, D] (positions [B, q]) over every live
    slot, each query moved `last - first` positions forward (its row's real queries in this step: the first lands
    on the step's last position, the others after it), so that it comes after every entry the layer holds, as the
    context's queries do when the context is fed a second time after itself; no causal mask (nothing is after)."""
    real = positions >= 0
    first = positions.masked_fill(~real, torch.iinfo(torch.long).max).amin(dim=1)
    delta = (positions.amax(dim=1) - first).clamp_min(0)  # [B]: a row without real queries moves by 0
    return attention_extremes(layer, queries, positions, delta, causal=False)


def mean_over_heads(scores: torch.Tensor, positions: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
    """For each slot [B, Hkv, n], the mean over the layer's KV heads of the score each gives the same token (matched
    by position, not by slot: after a compaction slot i of two heads holds different tokens); a head that no longer
    holds the token counts 0. Dead slots get a meaningless value. Sort-based: O(Hkv n log), whatever the length."""
    batch, heads, n = scores.shape
    pos = positions.masked_fill(~live, -1).reshape(batch, heads * n)
    values = scores.float().masked_fill(~live, 0.0).reshape(batch, heads * n)
    order = pos.argsort(dim=-1, stable=True)
    ordered = pos.gather(-1, order)
    starts = torch.ones_like(ordered, dtype=torch.bool)
    starts[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    segment = starts.long().cumsum(dim=-1) - 1  # one segment per distinct position
    sums = torch.zeros_like(values).scatter_add_(-1, segment, values.gather(-1, order))
    total = torch.empty_like(values).scatter_(-1, order, sums.gather(-1, segment))
    return (total / heads).reshape(batch, heads, n)


def composite_scores(scores: torch.Tensor, live: torch.Tensor, how: str) -> torch.Tensor:
    """The layer's composite-token scores [B, n]: each KV head's scores [B, Hkv, n] sorted best first, then rank r
    reduced over the heads (`how`: mean or max); composite token r holds each head's r-th best entry. A rank some
    head cannot fill (dead slots) is -inf under mean (no such composite token), the others' best under max."""
    ranked = scores.float().masked_fill(~live, -math.inf).sort(dim=-1, descending=True).values
    return ranked.mean(dim=1) if how == "mean" else ranked.amax(dim=1)


@register
@dataclass
class KVCompose(Method):
    """KVCompose (Akulov, Sana, De Domenico, Si Salem, Piovesan, Ayed, *KVCompose: Efficient Structured KV Cache
    Compression with Composite Tokens*, arXiv 2509.05165, 2025; kvpress `KVComposePress`, written by the first
    author): attention-guided eviction in which every KV head chooses its own entries, aligned slot by slot into
    "composite tokens" (so each layer stays one tensor of equal-length heads), with one global ranking of the
    composite tokens across layers that sets each layer's budget.

    Token score, per layer and KV head: the attention each entry receives, reduced over the queries (`agg_task`:
    max, the largest attention any query gave it, or mean), then over the KV head's query group (`agg_group`); times
    the value norm ||v|| if `value_norm`; plus the mean of that score over the layer's KV heads for the same token if
    `mean_across_heads`. Each KV head keeps its top-budget entries by this score: the engine's per-head top-k, whose
    compaction puts different tokens in slot i of different heads, which is what a composite token is.
    Global allocation (`layer_allocation`), once: each layer's composite scores (each head's scores sorted best
    first, rank r reduced over the heads by `agg_head`) are ranked together, the first `keep_token_lower_bound`
    composite tokens of every layer forced in and the first compressed layer's composite scores raised to the
    largest any layer has at the same rank (it keeps at least as many as any layer); each layer's new budget is the
    number of its composite tokens among the best `sum of the budgets` (the total is kept exactly; a layer may get
    0). Layers with per-head budgets keep them and take no part. Later compressions (decoding, streaming) keep each
    layer at its budget by the same score, the statistics still accumulating.

    Which queries (`queries`). `repeat`: kvpress's reading, the whole prompt fed a second time right after itself
    as a probe (`Method.probe`: its entries attended, then dropped; the prefill's own attention is not recorded);
    each entry's statistic is over the probe's queries, every entry in their past, the softmax over the prompt and
    the probe's own keys (causal), as kvpress slices its eager attention weights. The cache holds the whole prompt
    until the probe ran; only the generation tasks run probes, one prompt at a time. `own` (default, every task):
    no extra forward, each step's own queries score the entries, every query moved forward by its step's length - 1
    (a prefill query at position i lands at L - 1 + i, the repeat's query at L + i) and attending to every entry
    the layer holds, the step's later ones included: the repeat's geometry with the first pass's query vectors
    (softmax over the prompt only). A decode step's query is its own attention row. With `own` the allocation runs
    in the first forward in which a layer is over budget (the prefill, or step budget+1 when streaming), every
    layer's compression deferred to the last layer's step; with `repeat`, after the probe. A layer's count is at
    most what it holds then: streamed token by token, every layer holds budget + 1 entries at the allocation, so
    the budgets stay near uniform (the allocation is made for a prompt longer than the budget, as in the paper).
    Statistics accumulate per slot over steps (a running max, or sums and query counts for the mean); inside a
    step `agg_task` is applied per query head, then `agg_group`, then steps combine: exact for a one-step prefill
    and for the probe; across several steps (chunked prefill, decoding) the group's mean of each step's per-head
    maxima is combined by max (kvpress's per-head max over every query, then the group's mean, would need
    per-query-head state). Deviations: kvpress holds every head's score of every context token for the cross-head
    mean; after evictions a head that no longer holds a token counts 0 in it. One allocation for a whole batch
    (`batches` is False with it: the rows' composite tokens are pooled). kvpress's unstructured variant (per-head
    budgets from a per-head ranking) is not here (kvexp's `adakv` does per-head budgets). The paper's method
    section was not reachable offline: the rule and the defaults follow the first author's kvpress press (max,
    mean, mean, no value norm, the cross-head mean, lower bound 0, the first layer raised).
    """

    name = "kvcompose"
    description = "per-head max-attention eviction aligned into composite tokens, global layer budgets (Akulov et al. 2025)"
    observes = True
    reads_step_attention = True
    state_names = ("attention", "count")  # per slot: running max (or sum); queries that saw it (for the mean)
    agg_task: str = "max"
    agg_group: str = "mean"
    agg_head: str = "mean"
    value_norm: bool = False
    mean_across_heads: bool = True
    keep_token_lower_bound: int = 0
    first_layer_max: bool = True
    layer_allocation: bool = True
    queries: str = "own"
    row_budgets = True  # without the layer allocation and the probe (`__post_init__`)

    def __post_init__(self) -> None:
        # Instance-level values of the ClassVars the engine reads: the allocation pools the rows' composite tokens;
        # with `repeat` the probe allocates.
        repeat = self.queries == "repeat"
        self.probes = repeat
        self.allocates = self.layer_allocation and not repeat
        self.batches = not self.layer_allocation and not repeat
        self.row_budgets = self.batches  # its scores never read the budget; the allocation sets it

    def validate(self, budget: int | None) -> None:
        for option in ("agg_task", "agg_group", "agg_head"):
            if getattr(self, option) not in AGGREGATIONS:
                raise ValueError(
                    f"method.{option} must be one of {', '.join(AGGREGATIONS)}, got {getattr(self, option)!r}"
                )
        if self.queries not in QUERIES:
            raise ValueError(f"method.queries must be one of {', '.join(QUERIES)}, got {self.queries!r}")
        if self.keep_token_lower_bound < 0 or (budget is not None and self.keep_token_lower_bound > budget):
            raise ValueError(
                f"method.keep_token_lower_bound must be in [0, budget={budget}], got {self.keep_token_lower_bound}"
            )

    def observe(self, layer: CompressedLayer, query: torch.Tensor) -> None:
        if layer.cache.holding:
            return  # `repeat`: the prompt's own attention is not recorded (kvpress skips it); its probe scores it
        query, positions = step_queries(layer, query)
        if query.shape[2] == 1:
            row = newest_attention(layer, query)[:, :, :, 0] * (positions >= 0).view(-1, 1, 1, 1)
            self._record(layer, row, row, positions)
        else:
            self._record(layer, *shifted_attention(layer, query, positions), positions)

    def observe_probe(self, layer: CompressedLayer, query: torch.Tensor) -> None:
        """The repeated prompt's queries [B, H, q, D] (its entries are the layer's last q slots): their attention
        over the prompt's entries, causal over their own."""
        q, held = query.shape[2], layer.length - query.shape[2]
        positions = layer.positions[:, 0, held:]
        largest, summed = attention_extremes(layer, query, positions, None, causal=True)
        pad = (0, q)  # the probe's own slots: dropped after this step, nothing to record
        self._record(
            layer,
            torch.nn.functional.pad(largest[..., :held], pad),
            torch.nn.functional.pad(summed[..., :held], pad),
            positions,
        )

    def _record(
        self, layer: CompressedLayer, largest: torch.Tensor, summed: torch.Tensor, positions: torch.Tensor
    ) -> None:
        """Fold one step's per-query-head statistics [B, Hkv, G, n] into the per-slot state."""
        per_head = largest if self.agg_task == "max" else summed
        grouped = per_head.mean(dim=2) if self.agg_group == "mean" else per_head.amax(dim=2)  # [B, Hkv, n]
        state = layer.state("attention")
        if self.agg_task == "max":
            state.copy_(torch.maximum(state, grouped.float()))
        else:
            state.add_(grouped.float())
            layer.state("count").add_((positions >= 0).sum(dim=1).view(-1, 1, 1).float())

    def score(self, layer: CompressedLayer) -> torch.Tensor:
        scores = layer.state("attention").float()
        if self.agg_task == "mean":
            scores = scores / layer.state("count").clamp_min(1.0)
        if self.value_norm:
            scores = scores * layer.values.float().norm(dim=-1)
        if self.mean_across_heads:
            scores = scores + mean_over_heads(scores, layer.positions, layer.live())
        return scores

    def probe(self, cache: KVCache, prompt: Probing) -> None:
        """`repeat`: the prompt fed again after itself (one probe forward), then the allocation and compression."""
        with cache.probe():
            prompt.run(prompt.ids)
        budgets = None
        if self.layer_allocation:
            base = {
                i: layer.budget
                for i, layer in enumerate(cache.layers)
                if layer.budget is not None and layer.head_budgets is None and layer.is_initialized
            }
            budgets = self.global_budgets(cache, base) if base else None
        cache.end_probes(budgets)

    def allocate(self, layer: CompressedLayer) -> Reallocation | None:
        """Defer each layer's compression in the allocating forward; at its last allocated layer, rank every layer's
        composite tokens together: each layer gets the number of its own among the best, and compresses."""
        allocation = allocation_at_last_layer(self, layer)
        if not isinstance(allocation, LayerAllocation):
            return allocation  # nothing to do, or an earlier layer deferred
        allocation.done = True
        return Reallocation(self.global_budgets(layer.cache, allocation.base), final=True)

    def global_budgets(self, cache: KVCache, base: dict[int, int]) -> dict[int, int]:
        """Each layer's budget: how many of its composite tokens are among the best `sum(base)` of all layers' (per
        batch row: the rows' composite tokens are pooled and the counts shared out over the same total)."""
        members = sorted(base)
        ranked = []
        for i in members:
            layer = cache.layers[i]
            composite = composite_scores(self.score(layer), layer.live(), self.agg_head)  # [B, n_l]
            forced = composite[:, : self.keep_token_lower_bound]
            forced.masked_fill_(forced > -math.inf, math.inf)
            ranked.append(composite)
        width = max(c.shape[1] for c in ranked)
        stacked = torch.stack(
            [torch.nn.functional.pad(c, (0, width - c.shape[1]), value=-math.inf) for c in ranked], dim=1
        )  # [B, layers, width]
        if self.first_layer_max:
            exists = stacked[:, 0] > -math.inf
            stacked[:, 0] = torch.where(exists, stacked.amax(dim=1), -math.inf)
        total = sum(base.values())
        flat = stacked.flatten()
        best = flat.topk(min(total * stacked.shape[0], int((flat > -math.inf).sum()))).indices
        counts = torch.bincount((best // width) % len(members), minlength=len(members))
        # The pooled counts over the rows, back to per-row budgets that total `total` (exact for one row).
        sizes = share_with_caps(total, counts.tolist(), [total] * len(members))
        return dict(zip(members, sizes, strict=True))
