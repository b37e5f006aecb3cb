"""Shared merge math for the merging and clustering methods (METHODS.md §3.4.2; one place, not in each method).

A group S of cached entries (keys k_i, values v_i, logit biases b_i) is replaced by one entry of the group, its
target slot. The bias-calibrated merge is first-order exact for every query:

    k* = sum_i a_i k_i,  a_i = e^{b_i} / sum_j e^{b_j}        (the count-weighted centroid when b_i = ln n_i)
    b* = ln sum_i e^{b_i}                                      (mass preservation: ln of the tokens it stands for)
    v* = sum_i p_i v_i / sum_i p_i                             (p_i: the method's value weights, default e^{b_i})

The neglected second-order term 1/2 Var_a(q.k/sqrt d) >= 0 is zero when the group's keys are identical, so a
group of identical keys is merged exactly. Merged keys mix rotations of different positions: they are never
re-rotated (`reject_rerotate`), and the target keeps its own position (its place in recency windows).
Shapes: per slot [B, Hkv, L_phys]; keys/values [B, Hkv, L_phys, D].
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from kvexp.engine.cache import CompressedLayer


def reject_rerotate(layer: CompressedLayer, name: str) -> None:
    """Merged keys have no single position to re-rotate to (METHODS.md §3): refuse positions=rerotate."""
    if layer.options.positions == "rerotate":
        raise ValueError(
            f"method={name} merges keys of different positions, which cannot be re-rotated; "
            "engine.positions must be 'original' for it"
        )


def most_similar(
    keys: torch.Tensor, sources: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """For every slot, the cosine similarity to its most similar `targets` slot and that slot's index.

    keys [B, Hkv, L, D]; sources/targets [B, Hkv, L] bool. Returns (similarity [B, Hkv, L], index [B, Hkv, L]);
    rows outside `sources`, or heads without a target, get similarity -inf and index -1.
    """
    unit = F.normalize(keys.float(), dim=-1)
    cosine = unit @ unit.transpose(-1, -2)  # [B, Hkv, L, L]; L is a budget plus one step, never a prompt
    cosine = cosine.masked_fill(~targets[:, :, None, :], float("-inf"))
    similarity, index = cosine.max(dim=-1)
    valid = sources & torch.isfinite(similarity)
    return similarity.masked_fill(~valid, float("-inf")), index.masked_fill(~valid, -1)


def fold(
    layer: CompressedLayer,
    target: torch.Tensor,
    value_weight: torch.Tensor | None = None,
    key_weight: torch.Tensor | None = None,
    calibrate: bool = True,
) -> torch.Tensor:
    """Merge groups of slots into their target slot, in place, by the calibrated rule of the module docstring.

    `target` [B, Hkv, L] long: the slot each slot is merged into (a target maps to itself; -1: not merged).
    `value_weight` / `key_weight` [B, Hkv, L]: each member's weight for the value / key average (default
    e^{bias}, i.e. token counts). `calibrate`: the target's bias becomes ln sum e^{b_i} (False: biases are left
    as they are, for methods whose paper has no mass correction, such as KVMerger and D2O).
    State `tokens` (if the method keeps it) is summed over the group. Returns the group sizes [B, Hkv, L]
    (members per target slot, 0 for non-targets). Only targets that received another member are rewritten.
    """
    members = target >= 0
    index = target.clamp_min(0)
    prior = torch.where(members, layer.bias.float().clamp_min(-80.0).exp(), 0.0)  # e^{b_i}; dead slots 0
    key_weight = prior if key_weight is None else key_weight.float() * members
    value_weight = prior if value_weight is None else value_weight.float() * members
    size = torch.zeros_like(prior).scatter_add_(2, index, members.float())
    merged = size > 1  # targets that absorbed at least one other slot

    def weighted_mean(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        wide = index[..., None].expand(-1, -1, -1, x.shape[-1])
        total = torch.zeros_like(x, dtype=torch.float32).scatter_add_(2, wide, w[..., None] * x.float())
        norm = torch.zeros_like(w).scatter_add_(2, index, w)
        return total / norm.clamp_min(torch.finfo(torch.float32).tiny)[..., None]

    rewrite = merged[..., None]
    layer.keys.copy_(torch.where(rewrite, weighted_mean(layer.keys, key_weight), layer.keys.float()))
    layer.values.copy_(torch.where(rewrite, weighted_mean(layer.values, value_weight), layer.values.float()))
    if calibrate:
        mass = torch.zeros_like(prior).scatter_add_(2, index, prior)
        layer.bias.copy_(torch.where(merged, mass.log(), layer.bias))
        layer.has_bias = True
    if "tokens" in layer.state_names():
        tokens = layer.state("tokens")
        total = torch.zeros_like(tokens).scatter_add_(2, index, tokens * members)
        tokens.copy_(torch.where(merged, total, tokens))
    return size
