from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from kvexp.methods.base import check_window, register
from kvexp.methods.scorer_wrapper import ScorerWrapper
from kvexp.methods.scoring import head_caps

if TYPE_CHECKING:
    from kvexp.engine.cache import CompressedLayer

# Per-slot state: 1 once an entry has left the window with a score at or above the threshold.
PASSED = "dms_passed"


@register
@dataclass
class DMS(ScorerWrapper):
    """DMS-style threshold eviction (Łańcucki, Staniszewski, Nawrot, Ponti, NeurIPS 2025, arXiv 2506.05345,
    "Inference-Time Hyper-Scaling with KV Cache Compression"; kvpress's DMSPress): entries scored below
    `threshold` are evicted instead of a top-k, after a delay.

    Delayed eviction (the paper's sliding window): the newest `window_size` tokens of each row are never
    evicted; an entry is judged once, at the first compression after it has left that window: scored below
    `threshold` by the `scorer` it is evicted, otherwise it has passed and is not judged again. So a layer
    keeps a number of entries that depends on the content, per KV head (the engine's per-head counts: a layer
    is as long as its longest head, the others hold dead slots; the kept counts reported are the live ones).
    Every step compresses (`compresses_under_budget`: an entry is evicted the step it leaves the window with a
    failing score, as in DMS), and the budget is the cap: after a compression a layer holds at most the budget
    (per-head budgets too): the window and the passed entries, the highest scores first if more than the budget
    passed. `threshold: -.inf` is a plain top-k at the budget with the window kept. `method_stats` count the
    entries judged, evicted by the threshold and by the cap, and the mean a head keeps right after a compression.

    No paper default: DMS learns its eviction decisions (a trained gate per head) and kvexp has none of its
    checkpoints; any scorer stands in (as in kvpress), SnapKV's window attention by default, whose scores are
    attention mass summed over its 32 window queries (averaged over the GQA group, max-pooled): the default
    `threshold` 0.05 is kvexp's choice for it. window_size 128 is kvpress's default (NVIDIA's released DMS
    checkpoints delay by 512 tokens); it must be smaller than the budget. Deviations: kvpress scores a token once
    when it is written, kvexp scores it when it is judged, with the scorer's view then; under
    `engine.when=prefill` only multi-token steps compress, so decoding keeps every new token.
    """

    name = "dms"
    description = (
        "entries scored below a threshold evicted after a delay window, budget a cap (Łańcucki et al. 2025)"
    )
    compresses_under_budget = True
    threshold: float = 0.05
    window_size: int = 128

    @property
    def state_names(self) -> tuple[str, ...]:
        return (*self._scorer.state_names, PASSED)

    def initial_state(self, name: str) -> float:
        return 0.0 if name == PASSED else self._scorer.initial_state(name)

    def validate(self, budget: int | None) -> None:
        if math.isnan(self.threshold):
            raise ValueError("method.threshold must be a number (-.inf: no threshold eviction), got nan")
        check_window("window_size", self.window_size, budget)
        super().validate(budget)

    def score(self, layer: CompressedLayer) -> torch.Tensor:
        base = self.base_scores(layer)
        live, positions = layer.live(), layer.positions
        newest = positions.amax(dim=-1, keepdim=True)  # the row's newest token (this step's): [B, Hkv, 1]
        window = live & (positions > newest - self.window_size)
        passed = layer.state(PASSED)
        judged = live & ~window & (passed == 0)
        evicted = judged & (base < self.threshold)
        passed.masked_fill_(judged & ~evicted, 1.0)
        tally = layer.cache.scratch(self).setdefault("tally", {})
        tally["judged"] = tally.get("judged", 0) + judged.sum()
        tally["threshold_evicted"] = tally.get("threshold_evicted", 0) + evicted.sum()
        # Kept entries rank by the scorer (the cap's order), above every evicted or dead slot (-inf).
        scores = base.clamp_min(torch.finfo(torch.float32).min).masked_fill(window, float("inf"))
        return scores.masked_fill(evicted | ~live, float("-inf"))

    @property
    def row_budgets(self) -> bool:  # the cap is each row's own budget (head_caps)
        return self._scorer.row_budgets

    def head_counts(
        self, layer: CompressedLayer, scores: torch.Tensor, target: int | torch.Tensor
    ) -> torch.Tensor | None:
        kept = (scores > float("-inf")).sum(dim=-1)
        counts = torch.minimum(kept, head_caps(layer, target))
        tally = layer.cache.scratch(self).setdefault("tally", {})
        tally["cap_evicted"] = tally.get("cap_evicted", 0) + (kept - counts).sum()
        tally["kept"] = tally.get("kept", 0) + counts.sum()
        tally["heads"] = tally.get("heads", 0) + counts.numel()
        return counts

    def statistics(self, layers: list[CompressedLayer]) -> dict[str, Any]:
        """The run's decisions, summed over layers, heads and batch rows: entries judged, evicted by the
        threshold and by the cap, and the mean live entries a head kept right after a compression (the
        end-of-run `tokens_kept` is a point of the sawtooth between that and the budget)."""
        stats = dict(self._scorer.statistics(layers))
        tally = layers[0].cache.scratch(self).get("tally") if layers else None
        if tally:
            stats.update(
                dms_judged=int(tally["judged"]),
                dms_threshold_evicted=int(tally["threshold_evicted"]),
                dms_cap_evicted=int(tally.get("cap_evicted", 0)),
                dms_kept_after_compression=float(tally.get("kept", 0)) / max(tally.get("heads", 0), 1),
            )
        return stats
