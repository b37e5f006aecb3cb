from dataclasses import dataclass
from typing import Any

import torch

from kvexp.engine import Selection
from kvexp.methods.base import register, slot_uniforms
from kvexp.methods.scoring import GQA_REDUCTIONS, accumulate_attention
from kvexp.methods.streaming_llm import StreamingLLM

SAMPLINGS = ("bernoulli", "expectation")


def successors(layer, present: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each present slot's window: the `count` present slots that follow it in temporal order (`layer.positions`).

    Returns (order [B, Hkv, L]: the present slots in temporal order, then the others; start, end [B, Hkv, L]:
    the window is order[start:end], shorter near the newest slot, empty for slots not present)."""
    order = layer.positions.masked_fill(~present, layer.seen).argsort(dim=-1, stable=True)
    places = torch.arange(layer.length, device=layer.device).expand_as(order)
    start = torch.empty_like(order).scatter_(2, order, places) + 1  # just after the slot's own place
    end = torch.maximum((start + count).clamp_max(present.sum(dim=-1, keepdim=True)), start)
    return order, start, end


@register
@dataclass
class CaM(StreamingLLM):
    """CaM (Zhang et al., *CaM: Cache Merging for Memory-efficient LLMs Inference*, ICML 2024): before a token is
    evicted, its value is merged into the tokens that follow it, with a probability from its attention.

    The streaming variant (`generate_task/streaming_llm/kv_cache_cam.py`), which is kvexp's per-step
    compression: eviction is StreamingLLM's (the first `sink_tokens` + the newest), and an evicted token e is
    merged into the `merge_budget` tokens that follow it in temporal order (`layer.positions`) -- the next kept
    tokens when one token is evicted per step, as in the streaming code and kvpress's `CAMPress` -- with
    probability p = clamp(A(e) / mean A(window), 0, 1), A = attention accumulated over every query so far
    (reduced over the GQA group, `gqa`, as kvpress): M ~ Bernoulli(p), v_w += M v_e / |window|. Keys are untouched
    (so `engine.positions=rerotate`, the paper's pos-shift setting, works), no logit bias; the update is
    additive, not a convex combination (values drift as merges accumulate, as in the paper).
    A step that evicts several tokens (a prefill, a chunk) merges them in one pass, each into its own window
    among the step's live tokens; shares landing on tokens evicted in the same step are dropped with them (the
    per-token original would pass them on: no cascade here; kvpress's bulk rule, the next KEPT tokens, would
    pile a whole prompt onto its first kept tokens). `eval.chunk_size=1` is the per-token original.
    `sampling=bernoulli` draws M from `slot_uniforms` seeded with `seed` (reproducible run to run, and a batched
    row draws what it draws alone);
    `sampling=expectation` uses M = p (deterministic, a different method). Defaults: the streaming code's 4 sinks
    and 16 merge targets (kvpress: 32).
    """

    name = "cam"
    description = (
        "evicted values merged into the next kept tokens with attention-ratio probability (Zhang et al. 2024)"
    )
    observes = True
    reads_step_attention = True
    merges = True
    state_names = ("acc",)
    merge_budget: int = 16
    sampling: str = "bernoulli"
    seed: int = 0
    gqa: str = "mean"

    def validate(self, budget: int | None) -> None:
        super().validate(budget)
        if self.merge_budget < 1:
            raise ValueError(f"method.merge_budget must be >= 1, got {self.merge_budget}")
        if self.sampling not in SAMPLINGS:
            raise ValueError(f"method.sampling must be one of {SAMPLINGS}, got {self.sampling!r}")
        if self.gqa not in GQA_REDUCTIONS:
            raise ValueError(f"method.gqa must be one of {GQA_REDUCTIONS}, got {self.gqa!r}")

    def observe(self, layer, query: torch.Tensor) -> None:
        accumulate_attention(layer, query, "acc", self.gqa)

    def merge(self, layer, kept: torch.Tensor, evicted: torch.Tensor, selection: Selection) -> None:
        # The window of an evicted token: the `merge_budget` tokens after it among this step's live ones, i.e.
        # the next kept tokens when it is evicted alone (a step of one token), as in the streaming code. In a
        # step that evicts several, shares landing on tokens evicted in the same step go with them (no cascade),
        # so a long prompt is not piled onto its first kept tokens. Windows are ranges of places in temporal
        # order: sums over them and additions to them are prefix sums, O(L), never [L, merge_budget] copies.
        present = kept | evicted
        order, start, end = successors(layer, present, self.merge_budget)
        size = (end - start).float()  # [B, Hkv, L]; 0 for the newest slot
        acc = layer.state("acc")
        in_order = acc.gather(2, order).masked_fill(~present.gather(2, order), 0.0)
        prefix = torch.nn.functional.pad(in_order.cumsum(dim=-1), (1, 0))  # [B, Hkv, L + 1]
        mean = (prefix.gather(2, end) - prefix.gather(2, start)) / size
        ratio = (acc / mean).nan_to_num(nan=0.0, posinf=1.0).clamp(0.0, 1.0)
        mergeable = evicted & (size > 0)
        probability = ratio.masked_fill(~mergeable, 0.0)
        drawn = (
            (slot_uniforms(layer, self.seed) < probability).float()  # M ~ Bernoulli(p), each row's own draws
            if self.sampling == "bernoulli"
            else probability
        )
        counts = torch.stack((mergeable.sum().float(), probability.sum(), drawn.sum())).detach()
        scratch = layer.scratch(self)  # [evicted tokens with a window, sum of their p, merges drawn]
        scratch["merge_counts"] = scratch.get("merge_counts", 0) + counts
        share = (drawn / size.clamp_min(1.0))[..., None] * layer.values.float()  # [B, Hkv, L, Dv]
        dim = share.shape[-1]
        steps = torch.zeros(*share.shape[:2], layer.length + 1, dim, device=share.device)
        steps.scatter_add_(2, start[..., None].expand(-1, -1, -1, dim), share)
        steps.scatter_add_(2, end[..., None].expand(-1, -1, -1, dim), -share)
        added = steps.cumsum(dim=2)[:, :, :-1]  # per place in temporal order (evicted places: dropped anyway)
        slots = order[..., None].expand(-1, -1, -1, dim)
        layer.values.add_(torch.zeros_like(added).scatter_(2, slots, added).to(layer.values.dtype))

    def statistics(self, layers) -> dict[str, Any]:
        """How often merges fire: evicted tokens that had a window, their mean merge probability p, and the merges
        drawn (under `sampling=expectation`, the sum of p), summed over layers, heads and the run's steps."""
        counted = [
            layer.scratch(self)["merge_counts"] for layer in layers if "merge_counts" in layer.scratch(self)
        ]
        if not counted:
            return {"evicted_tokens": 0, "merge_probability_mean": None, "merges": 0}
        evicted, probability, merges = sum(counted).tolist()
        return {
            "evicted_tokens": int(evicted),
            "merge_probability_mean": probability / evicted if evicted else None,
            "merges": merges,
        }
