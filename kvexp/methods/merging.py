"""Shared merge math for the merging and clustering methods (docs/methods.md#merging-rule; one place, not in each method).

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
    """Merged keys have no single position to re-rotate to (docs/design.md#re-rotation): refuse positions=rerotate."""
    if layer.options.positions == "rerotate":
        raise ValueError(
            f"method={name} merges keys of different positions, which cannot be re-rotated; "
            "engine.positions must be 'original' for it"
        )


@torch.no_grad()  # a choice of partners (and weights derived from it), never a path for gradients in training
def most_similar(
    keys: torch.Tensor, sources: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """For every slot, the cosine similarity to its most similar `targets` slot and that slot's index.

    keys [B, Hkv, L, D]; sources/targets [B, Hkv, L] bool. Returns (similarity [B, Hkv, L], index [B, Hkv, L]);
    rows outside `sources`, or heads without a target, get similarity -inf and index -1.
    Only source rows are compared with target columns ([B, Hkv, sources, targets]): a decode step has one
    source, and a compressed prompt never builds its L x L matrix.
    """
    similarity = torch.full(sources.shape, float("-inf"), device=keys.device)
    index = torch.full(sources.shape, -1, dtype=torch.long, device=keys.device)
    rows, cols = int(sources.sum(dim=-1).max()), int(targets.sum(dim=-1).max())
    if rows == 0 or cols == 0:
        return similarity, index
    # Each head's real sources / targets first; heads with fewer are padded with other slots, flagged 0.
    source_flag, source = sources.float().topk(rows, dim=-1)
    target_flag, target = targets.float().topk(cols, dim=-1)
    unit = F.normalize(keys.float(), dim=-1)
    dim = unit.shape[-1]
    rows_unit = unit.gather(2, source[..., None].expand(-1, -1, -1, dim))
    cols_unit = unit.gather(2, target[..., None].expand(-1, -1, -1, dim))
    cosine = rows_unit @ cols_unit.transpose(-1, -2)  # [B, Hkv, rows, cols]
    cosine = cosine.masked_fill(target_flag[:, :, None, :] == 0, float("-inf"))
    best, column = cosine.max(dim=-1)
    valid = (source_flag > 0) & torch.isfinite(best)
    # Padding rows hold slots that are not sources (topk indices are distinct): they write -inf / -1 there.
    similarity.scatter_(2, source, best.masked_fill(~valid, float("-inf")))
    index.scatter_(2, source, target.gather(2, column).masked_fill(~valid, -1))
    return similarity, index


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
    # where, not a product: a weight that is inf or nan outside the members must not leak into a sum
    key_weight = prior if key_weight is None else torch.where(members, key_weight.float(), 0.0)
    value_weight = prior if value_weight is None else torch.where(members, value_weight.float(), 0.0)
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
        total = torch.zeros_like(tokens).scatter_add_(2, index, torch.where(members, tokens, 0.0))
        tokens.copy_(torch.where(merged, total, tokens))
    return size
