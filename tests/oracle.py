"""The masking oracle (docs/design.md#the-masking-oracle-test): a compressed run must equal the plain model with the evicted keys masked.

`Visibility` records, for every layer and step, which logical positions each KV head could see. `oracle_logits`
then runs the plain model ONCE over the whole sequence with eager attention and, per layer and KV head, an
explicit mask that hides exactly the keys the compressed run did not see.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from kvexp.methods import make_cache

ORACLE = "kvexp_oracle"
_MASKS: dict[int, torch.Tensor] = {}  # layer_idx -> [B, Hkv, T, T] bool (query index, key index)


class Visibility:
    """Recorder for KVCache: which key positions each query of each layer saw ([B, Hkv, T, T] per layer)."""

    def __init__(self, batch: int, kv_heads: int, length: int, offsets: torch.Tensor | None = None):
        self.length = length
        self.offsets = (
            offsets if offsets is not None else torch.zeros(batch, dtype=torch.long)
        )  # left padding
        self.masks: dict[int, torch.Tensor] = {}
        self.shape = (batch, kv_heads, length, length)

    def __call__(self, layer, q: int) -> None:
        # The step's queries are the layer's last q slots (this step wrote them); their positions are read from
        # the layer, so a layer that received only some of the step's tokens (PyramidInfer) records exactly those.
        mask = self.masks.setdefault(layer.layer_idx, torch.zeros(self.shape, dtype=torch.bool))
        live, positions = layer.live().cpu(), layer.positions.cpu()  # [B, Hkv, n]
        index = positions + self.offsets[:, None, None]  # logical position -> sequence index
        for b in range(self.shape[0]):
            for h in range(self.shape[1]):
                keys = index[b, h][live[b, h]]
                for p, i in zip(positions[b, h, -q:].tolist(), index[b, h, -q:].tolist(), strict=True):
                    if p >= 0:  # not padding
                        # A sliding-window layer's query sees its last `window` positions only (the model's rule).
                        reach = (
                            (keys <= i) if layer.window is None else (keys <= i) & (keys > i - layer.window)
                        )
                        mask[b, h, i, keys[reach]] = True


def _oracle_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    groups = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(groups, dim=1).float()
    value = value.repeat_interleave(groups, dim=1).float()
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    scores = (query.float() @ key.transpose(-1, -2)) * scaling
    visible = _MASKS[module.layer_idx].to(query.device).repeat_interleave(groups, dim=1)
    scores = scores.masked_fill(~visible, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # padding rows see nothing
    return (probs @ value).to(query.dtype).transpose(1, 2).contiguous(), None


AttentionInterface.register(ORACLE, _oracle_attention)
AttentionMaskInterface.register(ORACLE, lambda *args, **kwargs: None)


@torch.no_grad()
def oracle_logits(model, input_ids: torch.Tensor, visibility: Visibility, position_ids=None) -> torch.Tensor:
    """The plain model over the whole sequence, each layer masked to what the compressed run saw."""
    _MASKS.clear()
    _MASKS.update(visibility.masks)
    previous = model.config._attn_implementation
    model.set_attn_implementation(ORACLE)
    try:
        return model(input_ids, position_ids=position_ids, use_cache=False).logits.float()
    finally:
        model.set_attn_implementation(previous)


@torch.no_grad()
def streamed_logits(
    model, input_ids: torch.Tensor, chunk_size: int, **cache_kwargs
) -> tuple[torch.Tensor, object]:
    """Feed `input_ids` [1, T] in chunks through a compressed cache; return logits [1, T, V] and the visibility."""
    cfg = model.config
    kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    vis = Visibility(input_ids.shape[0], kv_heads, input_ids.shape[1])
    cache = make_cache(model, recorder=vis, **cache_kwargs)
    logits = [
        model(input_ids[:, s : s + chunk_size], past_key_values=cache).logits.float()
        for s in range(0, input_ids.shape[1], chunk_size)
    ]
    return torch.cat(logits, dim=1), vis, cache


def max_logprob_error(a: torch.Tensor, b: torch.Tensor, targets: torch.Tensor) -> float:
    """Largest absolute difference of the target tokens' log-probabilities."""
    la = torch.log_softmax(a, -1).gather(-1, targets[..., None])
    lb = torch.log_softmax(b, -1).gather(-1, targets[..., None])
    return (la - lb).abs().max().item()
