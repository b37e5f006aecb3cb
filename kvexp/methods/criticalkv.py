from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from kvexp.engine.cache import ranking_keys
from kvexp.methods.base import register
from kvexp.methods.learned import attention_modules
from kvexp.methods.scorer_wrapper import ScorerWrapper
from kvexp.methods.scoring import head_caps

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from kvexp.engine.cache import CompressedLayer

# The attention output projection under the names transformers' architectures give it (Llama, Qwen, Mistral,
# Gemma, Phi-3: o_proj; GPT-NeoX: dense; GPT-2: c_proj, a Conv1D; others: out_proj).
OUTPUT_PROJECTIONS = ("o_proj", "dense", "c_proj", "out_proj")
VALUE_NORM = "criticalkv_value_norm"  # per-slot state: ||v W_o||_1 of the slot's value, computed once


def output_projections(model: PreTrainedModel) -> list[torch.Tensor]:
    """Per layer, the attention output projection as [H, D, hidden] (a view of the model's weight, no
    copy): query head h contributes `o_h W[h]` to the attention output, `o_h` [.., D] being its
    attention-weighted values."""
    modules = attention_modules(model)
    heads = model.config.num_attention_heads
    weights = []
    for i in range(model.config.num_hidden_layers):
        attention = modules.get(i)
        proj = next(
            (
                getattr(attention, n)
                for n in OUTPUT_PROJECTIONS
                if isinstance(getattr(attention, n, None), nn.Module)
            ),
            None,
        )
        if proj is None or getattr(proj, "weight", None) is None:
            raise ValueError(
                f"criticalkv: layer {i} of {type(model).__name__} has no attention output projection "
                f"({' / '.join(OUTPUT_PROJECTIONS)}) to weight the values with"
            )
        weight = proj.weight.detach()
        if isinstance(proj, Conv1D):  # y = x W + b, W [H*D, hidden]
            weights.append(weight.view(heads, -1, weight.shape[1]))
        else:  # nn.Linear: y = x W^T + b, W [hidden, H*D]
            weights.append(weight.view(weight.shape[0], heads, -1).permute(1, 2, 0))
    return weights


def projected_value_norms(values: torch.Tensor, w_o: torch.Tensor) -> torch.Tensor:
    """||v_j W_o^h||_1 for values [B, Hkv, n, D] and the layer's output projection `w_o` [H, D, hidden],
    averaged over the query heads h of each KV head's group: [B, Hkv, n] fp32 (one query head at a time:
    never [n, H, hidden])."""
    heads, kv_heads = w_o.shape[0], values.shape[1]
    group = heads // kv_heads
    v = values.float()
    norms = torch.zeros(values.shape[:3], dtype=torch.float32, device=values.device)
    for h in range(heads):
        g = h // group  # transformers' repeat_kv layout: query head h reads KV head h // G
        norms[:, g] += (v[:, g] @ w_o[h].to(device=v.device, dtype=torch.float32)).abs().sum(dim=-1)
    return norms / group


def two_stage_scores(
    layer: CompressedLayer,
    base: torch.Tensor,
    norms: torch.Tensor,
    budgets: torch.Tensor,
    first_stage_ratio: float,
    epsilon: float,
) -> torch.Tensor:
    """CriticalKV's selection as scores [B, Hkv, n]: each head's `int(budget_h * first_stage_ratio)` best
    entries by the base scores are kept first (+inf); the others are ranked by `(base + epsilon) * norms`.
    Dead slots -inf."""
    live = base > float("-inf")
    first = (budgets.double() * first_stage_ratio).long()  # int(b * ratio), the reference's rounding
    rank = ranking_keys(base, layer.positions).argsort(dim=-1, descending=True).argsort(dim=-1)  # 0: best
    stage_one = (rank < first[..., None]) & live
    refined = torch.where(live, (base + epsilon) * norms, float("-inf"))
    return refined.masked_fill(stage_one, float("inf"))


@register
@dataclass
class CriticalKV(ScorerWrapper):
    """CriticalKV (Feng, Lv, Cao, Xie, Zhou, arXiv 2502.03805, 2025: "Identify Critical KV Cache in LLM
    Inference from an Output Perturbation Perspective"): the base scorer's attention refined by what an
    entry's value adds to the attention output, in two stages.

    The output perturbation of dropping entry j is bounded through `A_j ||v_j W_o^h||_1` (its attention times
    the L1 norm of its value projected by the head's slice of the output projection `o_proj`), so: stage 1
    keeps each KV head's `int(budget * first_stage_ratio)` best entries by the base scores (`scorer`, SnapKV's
    window attention at its defaults as the paper builds on it); stage 2 fills the rest of the budget by
    `(score + epsilon) * ||v_j W_o^h||_1`, the norm averaged over the query heads of the KV head's group (the
    reference's GQA form). Defaults are the paper's (first_stage_ratio 0.5, epsilon 1e-4). Per-head budgets
    split the two stages per head. The refinement assumes non-negative base scores (attention); a scorer whose
    scores are negative (knorm's -||k||) would be inverted by it. The output projection is read from the model
    in `prepare` (a view of its weight: `make_cache` must be given the model; `adakv` forwards `prepare`, so
    `method=adakv method.scorer=criticalkv` runs, with head budgets split by the refined scores;
    `criticaladakv` splits them by the base scores first, as the paper and kvpress's CriticalAdaKVPress).
    Deviation: at every compression, not once after the prefill (the engine's trigger; SnapKV's paper setting
    is `engine.when=prefill`).
    """

    name = "criticalkv"
    description = "base scores refined by ||W_o v||_1, two-stage selection (Feng et al. 2025)"
    first_stage_ratio: float = 0.5
    epsilon: float = 1e-4
    # Per layer, a view of the model's attention output projection [H, D, hidden] (what `prepare` reads).
    _w_o: list[torch.Tensor] | None = field(default=None, init=False, repr=False, compare=False)

    def validate(self, budget: int | None) -> None:
        if not 0.0 <= self.first_stage_ratio <= 1.0:
            raise ValueError(f"method.first_stage_ratio must be in [0, 1], got {self.first_stage_ratio}")
        if not self.epsilon >= 0.0 or self.epsilon == float("inf"):
            raise ValueError(f"method.epsilon must be a finite number >= 0, got {self.epsilon}")
        super().validate(budget)

    def prepare(self, model: PreTrainedModel) -> None:
        super().prepare(model)
        self._w_o = output_projections(model)

    @property
    def state_names(self) -> tuple[str, ...]:
        return (*self._scorer.state_names, VALUE_NORM)

    def initial_state(self, name: str) -> float:
        return 0.0 if name == VALUE_NORM else self._scorer.initial_state(name)

    def value_norms(self, layer: CompressedLayer) -> torch.Tensor:
        """||v_j W_o^h||_1 of every slot, averaged over each KV head's query heads: [B, Hkv, L_phys].

        A value and the weights never change, so each slot's norm is computed once, when the first
        compression after its step reads it, and then moves with the slot (per-slot state): a compression
        computes the entries written since the previous one, which occupy the last slots (every compression
        compacts the kept ones in front)."""
        if self._w_o is None:
            raise RuntimeError(
                f"{self.name} has not read its model's output projection: build the cache with "
                "make_cache(model, ...), which calls method.prepare"
            )
        scratch = layer.scratch(self)
        # Tokens written since this layer's last compression read the norms: at most that many slots are new.
        fresh = layer.seen - scratch["seen"] if "seen" in scratch else layer.length
        start = max(layer.length - fresh, 0)
        norms = layer.state(VALUE_NORM)
        if start < layer.length:
            norms[..., start:] = projected_value_norms(layer.values[:, :, start:], self._w_o[layer.layer_idx])
        scratch["seen"] = layer.seen
        return norms

    @property
    def row_budgets(self) -> bool:  # the stages read each row's own budget (head_caps)
        return self._scorer.row_budgets

    def score(self, layer: CompressedLayer) -> torch.Tensor:
        base = self.base_scores(layer)
        budgets = head_caps(layer, self.target_size(layer))
        return two_stage_scores(
            layer, base, self.value_norms(layer), budgets, self.first_stage_ratio, self.epsilon
        )
