from dataclasses import dataclass

import torch

from kvexp.methods.base import Method, register
from kvexp.methods.scoring import GQA_REDUCTIONS, reduce_group, step_attention_blocks, step_queries


@register
@dataclass
class LRU(Method):
    """Least-recently-attended eviction (the H2O study's LRUCache, "least-recently-used eviction with hash table").

    A query attends a key when its attention probability, reduced over the query heads of the key's GQA group
    (`gqa`, default max: some head of the group used it), is at least `threshold`. Each slot stores the
    position of the latest query that attended it; a new token counts as attended by its own query on arrival,
    so the time does not depend on how the sequence was chunked. Over budget, each KV head evicts the smallest
    time; equal times evict the older token first (insertion order, as a classic LRU list), so the selection is
    deterministic. There are no protected sinks (the H2O study's LRU has none): keys that keep receiving attention,
    sinks included, stay recent by the rule itself. The H2O study does not say what "used" means for a softmax
    that gives every key some weight; the threshold is this implementation's definition.
    """

    name = "lru"
    description = "evict the least recently attended key (the H2O study's LRU)"
    row_budgets = True  # its scores never read the budget
    observes = True
    state_names = ("last_attended",)
    threshold: float = 0.01
    gqa: str = "max"

    def validate(self, budget: int | None) -> None:
        # 0 would count keys the query cannot see (probability 0) as attended.
        if not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"method.threshold must be in (0, 1], got {self.threshold}")
        if self.gqa not in GQA_REDUCTIONS:
            raise ValueError(f"method.gqa must be one of {GQA_REDUCTIONS}, got {self.gqa!r}")

    def observe(self, layer, query: torch.Tensor) -> None:
        _, positions = step_queries(layer, query)
        last = layer.state("last_attended")
        new = slice(layer.length - query.shape[2], layer.length)
        last[:, :, new] = layer.positions[:, :, new].float()  # arrival: attended by its own query
        for rows, probs in step_attention_blocks(layer, query):
            attended = reduce_group(probs, self.gqa) >= self.threshold  # [B, Hkv, r, end]
            when = positions[:, None, rows, None].float().expand_as(attended)
            latest = when.masked_fill(~attended, float("-inf")).amax(dim=2)
            seen = last[..., : latest.shape[-1]]
            seen.copy_(torch.maximum(seen, latest))

    def score(self, layer) -> torch.Tensor:
        # Lexicographic (time last attended, position) in int64 (exact), returned as ranks (exact in fp32).
        key = layer.state("last_attended").long() * (layer.seen + 1) + layer.positions
        return key.argsort(dim=-1).argsort(dim=-1).float()
