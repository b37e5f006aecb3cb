import logging
from dataclasses import dataclass

import torch

from kvexp.budgets import allocate
from kvexp.engine import Selection
from kvexp.methods.base import Method, register
from kvexp.methods.clustering import group_targets
from kvexp.methods.merging import fold, reject_rerotate
from kvexp.methods.scoring import GQA_REDUCTIONS, accumulate_attention, tokens_seen

log = logging.getLogger(__name__)

POOLING_TYPES = ("mean", "max", "best")


def log_age_groups(
    positions: torch.Tensor,  # [B, Hkv, n]
    tokens: torch.Tensor,  # [B, Hkv, n] how many consecutive tokens each slot stands for (ending at its position)
    region: torch.Tensor,  # [B, Hkv, n] bool: the slots that may be pooled
    groups: torch.Tensor,  # [B, Hkv] how many slots the region may keep
    seen: int | torch.Tensor,  # tokens seen, or each head's [B, Hkv, 1]
) -> torch.Tensor:
    """Partition each row's region, in temporal order, into `groups` runs of consecutive slots covering equal
    spans of log age: the group slot (the newest of its run, which it folds into) for every region slot, -1
    outside the region.

    A slot standing for the c tokens ending at position p covers ages [seen - p, seen - p + c]; cutting the
    region's log-age range into `groups` equal parts makes a group's token count grow in proportion to its age
    (older tokens pooled more aggressively, the newest exact). Cuts snap to the nearest slot boundary and are
    then made distinct (each at least one boundary after the previous, and leaving one boundary per later cut),
    so a row with more slots than `groups` keeps exactly `groups`. Slots already pooled are never split.
    """
    n = positions.shape[-1]
    slots = torch.arange(n, device=positions.device)
    count = region.sum(-1)  # [B, Hkv]
    if n < 2:
        return torch.where(region, slots, -1)
    order = positions.masked_fill(~region, -2).argsort(dim=-1, descending=True, stable=True)  # newest first
    valid = slots < count[..., None]  # ranks that hold a region slot
    age = seen - positions.gather(2, order).double()
    upper = (age + tokens.gather(2, order).double()).log()  # log age of each rank's older boundary
    lower = age[..., 0].clamp_min(1).log()  # [B, Hkv] log age of the newest slot's younger boundary
    top = upper.gather(2, (count - 1).clamp_min(0)[..., None])[..., 0]
    want = groups.clamp_min(1)
    k = slots[1:]  # cut k = 1 .. n-1 (cuts k < want are used)
    level = lower[..., None] + k.double() * ((top - lower) / want)[..., None]  # [B, Hkv, n-1]
    boundary = upper[..., :-1].masked_fill(~valid[..., 1:], float("inf"))  # between ranks j and j+1
    after = torch.searchsorted(boundary.contiguous(), level.contiguous()).clamp_max(n - 2)
    before = (after - 1).clamp_min(0)
    nearer = (level - boundary.gather(2, before)) < (boundary.gather(2, after) - level)
    at = torch.where(nearer & (after > 0), before, after)
    at = torch.cummax(at - (k - 1), dim=-1).values + (k - 1)  # distinct and increasing
    at = torch.minimum(at, count[..., None] - want[..., None] + k - 1)  # leave a boundary for every later cut
    active = (k < want[..., None]) & (count > want)[..., None]
    cuts = torch.zeros_like(at).scatter_add_(2, at.clamp(0, n - 2), active.long()) > 0  # [B, Hkv, n-1]
    cuts |= (count <= want)[..., None]  # nothing to pool: every slot is its own group
    head = torch.cat([torch.ones_like(cuts[..., :1]), cuts], dim=-1)  # rank j starts a group
    group_rank = torch.cummax(torch.where(head, slots, -1), dim=-1).values
    planned = torch.where(valid, order.gather(2, group_rank), -1)
    return torch.full_like(order, -1).scatter_(2, order, planned)


@register
@dataclass
class PoolingMerge(Method):
    """The pooling-merge study (en-jai-neer/kv-cache-compression, "Memory Reduction for LLM Inference via KV-Cache
    Compression"): sequence pooling of older tokens + pyramidal layer budgets.

    Sequence compression: whenever a layer exceeds its budget, its slots after the `sink_tokens` sinks are cut,
    in temporal order, into windows of consecutive tokens covering equal spans of log age (`log_age_groups`),
    as many as the budget leaves: a window's size grows with its age, so the oldest tokens are pooled most and
    the newest stay exact (without a fixed recent window). Each window is pooled into its newest slot, which
    keeps its position: `mean` is the calibrated merge (count-weighted mean key and value, bias ln n: exact for
    identical keys); `max` takes the element-wise max of the keys and of the values; `best` keeps the key and
    value of the window's token with the most accumulated attention (H2O's sum over every query so far, reduced
    over the GQA group by `gqa`; ties averaged). Every pooled slot stands for its n tokens, so all three carry
    bias ln n (logsumexp of the pooled biases); for max and best that is the count prior of a single summary key,
    without mean pooling's first-order exactness.
    Pyramidal layer budgets: `L_k = L0 [1 + k/m (1/beta - 1)]` with beta = `steepness_coefficient` (1.0:
    uniform), normalized to the budget's total (`kvexp.budgets`' linear_ramp), or, with `initial_local_window` set,
    the study's own numbers from that L0 (the budget then only switches compression on; the total is what the
    schedule sums to, logged). The pyramid is built on each layer's cache budget as the mean: give a uniform
    budget. `skip_prefill_compression`: steps of several tokens (prefill, chunks) are not compressed, the next
    single-token step pools the layer down to its budget (the budget holds after decode steps only). The study's
    `compress_context` flag switches its separate context-compression module (`context_compress.py`, "reducing
    the size of the input context", unpublished), not the KV pooling: here it shortens a generation task's context
    before the cache exists by the model's own token surprisal (Selective Context,
    kvexp.tasks.context_compression; `context_compression.keep`, else half the tokens). Deviations: the study does
    not document its window sizes; the log-age windows are kvexp's reading of "the oldest tokens are compressed
    more aggressively"; the ln n bias is kvexp's (the study's HF cache has none).
    """

    name = "pooling_merge"
    description = "older tokens pooled (mean/max/best) in windows growing with age + pyramidal layer budgets (the pooling-merge study)"
    merges = True
    seq_pooling_type: str = "mean"
    sink_tokens: int = 4
    steepness_coefficient: float = 1.0
    initial_local_window: int | None = None
    skip_prefill_compression: bool = False
    gqa: str = "mean"
    compress_context: bool = False

    reads_step_attention = True  # `best` accumulates attention

    @property
    def row_budgets(self) -> bool:
        # its groups fill each row's kept count; skipping the prefill keeps the layer whole instead
        return not self.skip_prefill_compression

    @property
    def observes(self) -> bool:  # only `best` needs attention
        return self.seq_pooling_type == "best"

    @property
    def state_names(self) -> tuple[str, ...]:
        # tokens: how many tokens a slot stands for; acc: the attention it received so far (best only)
        return ("tokens", "acc") if self.observes else ("tokens",)

    def validate(self, budget: int | None) -> None:
        if self.seq_pooling_type not in POOLING_TYPES:
            raise ValueError(
                f"method.seq_pooling_type must be one of {POOLING_TYPES}, got {self.seq_pooling_type!r}"
            )
        if self.sink_tokens < 0:
            raise ValueError(f"method.sink_tokens must be >= 0, got {self.sink_tokens}")
        if self.steepness_coefficient <= 0:
            raise ValueError(f"method.steepness_coefficient must be > 0, got {self.steepness_coefficient}")
        if self.initial_local_window is not None and self.initial_local_window <= self.sink_tokens:
            raise ValueError(
                f"method.initial_local_window ({self.initial_local_window}) must exceed method.sink_tokens "
                f"({self.sink_tokens})"
            )
        if self.gqa not in GQA_REDUCTIONS:
            raise ValueError(f"method.gqa must be one of {GQA_REDUCTIONS}, got {self.gqa!r}")
        if budget is not None and budget <= self.sink_tokens:
            raise ValueError(
                f"method.sink_tokens ({self.sink_tokens}) must be smaller than the budget ({budget})"
            )

    def layer_budgets(self, budgets: list[int | None]) -> list[int | None]:
        m, beta = len(budgets), self.steepness_coefficient
        if self.initial_local_window is not None:
            schedule = [int(self.initial_local_window * (1 + k / m * (1 / beta - 1))) for k in range(m)]
            log.info(
                "pooling_merge: layer budgets from initial_local_window: %s (total %d)",
                schedule,
                sum(schedule),
            )
        result = []
        for k, budget in enumerate(budgets):
            if budget is None:
                result.append(None)
                continue
            share = (
                schedule[k]
                if self.initial_local_window is not None
                else allocate("linear_ramp", budget, m, beta=beta)[k]
            )
            if share <= self.sink_tokens:
                raise ValueError(
                    f"pooling_merge: layer {k} gets a budget of {share} tokens, not more than method.sink_tokens "
                    f"({self.sink_tokens}); lower method.steepness_coefficient or raise the budget"
                )
            result.append(share)
        return result

    def initial_state(self, name: str) -> float:
        return 1.0 if name == "tokens" else 0.0

    def _skipping(self, layer) -> bool:
        return self.skip_prefill_compression and layer.new_tokens > 1

    def target_size(self, layer) -> int:
        return layer.length if self._skipping(layer) else layer.budget

    def head_counts(self, layer, scores: torch.Tensor, target: int) -> torch.Tensor | None:
        return layer.live().sum(-1) if self._skipping(layer) and layer.head_budgets is not None else None

    def observe(self, layer, query: torch.Tensor) -> None:
        accumulate_attention(layer, query, "acc", self.gqa)

    def score(self, layer) -> Selection:
        reject_rerotate(layer, self.name)
        live, positions = layer.live(), layer.positions
        sinks = live & (positions < self.sink_tokens)
        region = live & ~sinks
        groups = layer.keep_counts() - sinks.sum(-1)
        # Ages from each row's own tokens seen: a left-padded row's are its own.
        planned = log_age_groups(positions, layer.state("tokens"), region, groups, tokens_seen(positions))
        slots = torch.arange(layer.length, device=layer.device)
        # Sinks and group slots stay; should the engine keep more, the newest of the rest.
        scores = torch.where(sinks | (planned == slots), float("inf"), positions.float())
        return Selection(scores, groups=planned)

    def merge(self, layer, kept: torch.Tensor, evicted: torch.Tensor, selection: Selection) -> None:
        target = group_targets(selection.groups, evicted)
        if self.seq_pooling_type == "best":
            acc = layer.state("acc")
            members, index = target >= 0, target.clamp_min(0)
            score = acc.masked_fill(~members, float("-inf"))
            best = (
                torch.full_like(score, float("-inf")).scatter_reduce(2, index, score, "amax").gather(2, index)
            )
            chosen = (members & (score == best)).float()
            total = torch.zeros_like(acc).scatter_add_(2, index, acc * members)
            fold(layer, target, value_weight=chosen, key_weight=chosen)
            acc.copy_(torch.where(target == torch.arange(layer.length, device=layer.device), total, acc))
            return
        buffers = (layer.keys, layer.values) if self.seq_pooling_type == "max" else ()
        peaks = [_group_max(buffer, target) for buffer in buffers]  # before fold overwrites the group slots
        merged = (fold(layer, target) > 1)[..., None]  # fold: the mean, the bias and the token counts
        for buffer, peak in zip(buffers, peaks, strict=True):
            buffer.copy_(torch.where(merged, peak, buffer))


def _group_max(x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Element-wise max of x [B, Hkv, n, D] over each group of `fold` targets, at the group's slot."""
    wide = target.clamp_min(0)[..., None].expand_as(x)
    source = x.masked_fill((target < 0)[..., None], float("-inf"))
    return torch.full_like(x, float("-inf")).scatter_reduce(2, wide, source, "amax")
