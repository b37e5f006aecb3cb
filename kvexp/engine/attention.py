"""kvexp's attention implementation ("kvexp"), registered with transformers' AttentionInterface.

Position and mask contracts:

* Queries and the step's new keys arrive already rotated by the model with their true logical positions
  (the cache reports the logical length, so transformers' `arange + get_seq_length()` is right). Cached keys
  keep the rotation of their original position (or a re-rotated one with `positions="rerotate"`).
* The mask is built here, per layer, from the layer's state, never by transformers: cached keys get their
  `bias` (0 / -inf / +ln n); the step's new tokens, which are the layer's last `new_tokens` slots, get a causal
  triangle among themselves; padding comes from the per-forward token mask that `kvexp_mask` passes through.
  transformers' own mask builders mix the logical offset with the physical length and must not be used.
* Queries are grouped by KV head (`[B, Hkv, G*q, D]`, rows g*q + i), so per-KV-head biases apply to the G
  query heads of a group without repeating K/V. A multi-token step whose bias is the same for every KV head (a
  left-padded prefill: padding is every head's) keeps the query heads as they are and masks with one
  `[B, 1, q, n]` mask (`enable_gqa`): the same outputs, bit for bit on SmolLM2, without the grouped mask's
  `[B, Hkv, G*q, n]` (1.2 GB in fp32 for 8 prompts of 2,048 tokens on SmolLM2, per layer).
* -inf biases are clamped to the dtype's minimum: a fully masked row (a padding query) gives a uniform
  softmax instead of NaN.
* Cached keys get `layer.attention_bias()`: the stored bias plus the method's trainable offset, if any.
* After attention the layer is compressed if it is over budget, so eviction never affects the step that
  triggered it. A layer with a storage (KIVI, ZACK, ThinK) hands this function the step's dense decoding of its
  entries as `key` / `value`, sees the step's queries (`storage.observe`) and encodes after the compression
  (`layer.end_step`).
* With `engine.compile` a decode step that takes a layer one entry over its target runs the attention, the
  method's observation and the one-entry eviction as one `torch.compile`d function (`_decode_step`), the same
  code as the eager path, traced: the same slots, the same order, the same victim.
"""

from __future__ import annotations

import logging
import time
import types
from collections.abc import Callable
from contextvars import ContextVar

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from kvexp.engine.cache import ACTIVE_LAYER, CompressedLayer

log = logging.getLogger(__name__)

ATTN_IMPLEMENTATION = "kvexp"
FORWARD_MASK: ContextVar[torch.Tensor | None] = ContextVar("kvexp_forward_mask", default=None)


def kvexp_mask(
    batch_size: int, q_length: int, kv_length: int, attention_mask=None, **kwargs
) -> torch.Tensor | None:
    """Per-forward facts only: which of this step's tokens are real ([B, q] bool), or None when all are.

    transformers calls this once per forward, sized for one layer and without the cache, so it cannot build
    per-layer masks; the attention function does that.
    """
    FORWARD_MASK.set(attention_mask)  # the whole [B, kv] mask, for a forward through another cache
    if attention_mask is None:
        return None
    new = attention_mask[:, -q_length:].bool()
    return None if bool(new.all()) else new


def _take_layer(module: torch.nn.Module) -> CompressedLayer | None:
    layer = ACTIVE_LAYER.get()
    ACTIVE_LAYER.set(None)  # consumed: a later forward without a kvexp cache must not find a stale layer
    if layer is not None and layer.layer_idx != getattr(module, "layer_idx", layer.layer_idx):
        raise RuntimeError(
            f"kvexp attention of layer {module.layer_idx} got the cache layer {layer.layer_idx}: "
            "the model called attention in an unexpected order"
        )
    return layer


def _future(q: int, n: int, device: torch.device) -> torch.Tensor:
    """[q, n] bool, True where key j is one of this step's tokens later than query i (the last q slots are new)."""
    i = torch.arange(q, device=device)[:, None]
    j = torch.arange(n, device=device)[None, :] - (n - q)
    return j > i


def _beyond_window(q: int, n: int, window: int, device: torch.device) -> torch.Tensor:
    """[q, n] bool, True where key j lies `window` or more slots before query i (the last q slots are new): a
    sliding-window layer of consecutive slots."""
    i = torch.arange(q, device=device)[:, None] + (n - q)
    j = torch.arange(n, device=device)[None, :]
    return i - j >= window


def _uncached_attention(query, key, value, token_mask, scaling, dropout, window=None):
    """A forward without a kvexp cache: no cache (use_cache=False), or another cache such as the DynamicCache a
    plain `model.generate(ids)` makes after `make_cache` switched the model to kvexp attention. Plain causal
    attention over the `n` keys it is handed (the last `q` are this step's), with the forward's padding mask and
    the layer's sliding `window` (keys in consecutive slots, as the model's own cache holds them)."""
    q, n = query.shape[2], key.shape[2]
    full = FORWARD_MASK.get()  # [B, n]: the cached tokens' padding too (token_mask holds the new ones only)
    if full is not None and full.shape[-1] != n:
        raise RuntimeError(
            f"kvexp attention without a kvexp cache: the attention mask covers {full.shape[-1]} keys, the cache "
            f"holds {n}; pass a kvexp cache (kvexp.make_cache) or use the model's own attention"
        )
    windowed = window is not None and n > window
    if token_mask is None and n == q and not windowed:
        return F.scaled_dot_product_attention(
            query, key, value, is_causal=True, scale=scaling, dropout_p=dropout, enable_gqa=True
        )
    allowed = ~_future(q, n, query.device)[None, None]  # [1, 1, q, n]
    if windowed:
        allowed = allowed & ~_beyond_window(q, n, window, query.device)
    if full is not None:
        allowed = allowed & full.bool()[:, None, None, :]  # [B, 1, q, n]
        steps = torch.arange(q, device=query.device)
        allowed[..., steps, n - q + steps] = True  # a padding query sees its own slot: no NaN row
    return F.scaled_dot_product_attention(
        query, key, value, attn_mask=allowed, scale=scaling, dropout_p=dropout, enable_gqa=True
    )


def kvexp_attention(
    module: torch.nn.Module,
    query: torch.Tensor,  # [B, H, q, D], rotated
    key: torch.Tensor,  # [B, Hkv, n, D]: the layer's physical cache including this step's tokens
    value: torch.Tensor,  # [B, Hkv, n, Dv]
    attention_mask: torch.Tensor | None,  # from kvexp_mask: [B, q] bool token mask, or None
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    dropout = dropout if module.training else 0.0
    q, dim = query.shape[2], query.shape[3]
    layer = _take_layer(module)
    window = kwargs.get(
        "sliding_window"
    )  # the model's own window for this layer (Gemma-3 local layers, Mistral)
    if layer is None:
        out = _uncached_attention(query, key, value, attention_mask, scaling, dropout, window)
        return out.transpose(1, 2).contiguous(), None

    layer.window = window
    layer.record_new_tokens(kwargs.get("position_ids"), attention_mask)
    if layer.cache.recorder is not None and not layer.cache.probing:
        layer.cache.recorder(layer, q)
    scale = scaling if scaling is not None else dim**-0.5
    if layer.fused_step_applies(attention_mask):
        out = _run_fused_step(layer, query, scale)
        if out is not None:
            return out, None
    share = dropout == 0.0 and layer.shares_attention_row(attention_mask)
    out = _attend(layer, query, key, value, scale, dropout, share)
    layer.after_attention(query, scale)
    return out.contiguous(), None


def _attend(
    layer: CompressedLayer,
    query: torch.Tensor,  # [B, H, q, D]
    key: torch.Tensor,  # [B, Hkv, n, D]
    value: torch.Tensor,  # [B, Hkv, n, Dv]
    scaling: float,
    dropout: float,
    share_row: bool = False,
) -> torch.Tensor:
    """The step's attention over every slot of the layer, masked by its bias: [B, q, H, Dv]. `share_row` (a decode
    step, `layer.shares_attention_row`): computed explicitly, softmax in fp32 then the model's dtype as
    transformers' eager attention does, and the row kept in `layer.step_attention` for the method."""
    batch, heads, q, dim = query.shape
    kv_heads, n = key.shape[1], key.shape[2]
    groups = heads // kv_heads
    if share_row:
        probs = torch.softmax(layer.attention_logits(query, scaling), dim=-1)  # [B, Hkv, G, 1, n]
        layer.step_attention = probs
        # [B*Hkv, G, n] x [B*Hkv, n, Dv]: the slots' view flattens without a copy (batch stride = Hkv x head stride)
        out = torch.bmm(probs.view(batch * kv_heads, groups, n).to(value.dtype), value.flatten(0, 1))
        return out.view(batch, heads, 1, -1).transpose(1, 2)
    # A sliding-window layer keeps its `window - 1` newest entries between steps (`CompressedLayer._slide`); keys out
    # of a query's reach (a chunk longer than the window, or positions with gaps where PyramidInfer pruned the
    # hidden states) are hidden by their positions.
    far = None
    if layer.window is not None:
        positions = layer.positions  # [B, Hkv, n]; padding -1 (its bias hides it)
        far = positions[:, :, None, :] <= positions[:, :, -q:, None] - layer.window  # [B, Hkv, q, n]
        far = far.repeat(1, 1, groups, 1)  # rows g*q + i
    if not layer.has_bias and n == q and far is None:
        # First prefill, nothing cached, no padding: the stock causal kernel.
        out = F.scaled_dot_product_attention(
            query, key, value, is_causal=True, scale=scaling, dropout_p=dropout, enable_gqa=True
        )
        return out.transpose(1, 2)
    if layer.has_bias and q > 1 and far is None:
        bias = layer.attention_bias()  # [B, Hkv, n]
        if not bias.requires_grad and bool((bias == bias[:, :1]).all()):
            # One bias for every KV head (a left-padded prefill: padding is every head's): one [B, 1, q, n] mask
            # for the query heads as they are, not one [B, Hkv, G*q, n] for the grouped rows (G*Hkv times the
            # memory; make bench's P7 on SmolLM2: 1.25x the plain model's prefill time with it, 0.99x without).
            minimum = torch.finfo(query.dtype).min
            mask = bias[:, :1, None, :].to(query.dtype).clamp_min(minimum)  # [B, 1, 1, n]
            mask = torch.where(_future(q, n, query.device), minimum, mask)  # [B, 1, q, n]
            out = F.scaled_dot_product_attention(
                query, key, value, attn_mask=mask, scale=scaling, dropout_p=dropout, enable_gqa=True
            )
            return out.transpose(1, 2)
    grouped = query.reshape(batch, kv_heads, groups * q, dim)  # rows g*q + i
    if not layer.has_bias:
        # Every cached key visible: no mask for one token, a causal tail for a chunk.
        mask = None if q == 1 else ~_future(q, n, query.device).repeat(groups, 1)
        if far is not None:
            mask = ~far if mask is None else mask & ~far
    else:
        minimum = torch.finfo(query.dtype).min
        mask = layer.attention_bias().to(query.dtype).clamp_min(minimum)[:, :, None, :]  # [B, Hkv, 1, n]
        if q > 1:
            mask = torch.where(_future(q, n, query.device).repeat(groups, 1), minimum, mask)
        if far is not None:
            mask = torch.where(far, minimum, mask)
    out = F.scaled_dot_product_attention(
        grouped, key, value, attn_mask=mask, scale=scaling, dropout_p=dropout
    )
    return out.reshape(batch, heads, q, -1).transpose(1, 2)


# -- the compiled decode step (engine.compile) --------------------------------------------------------------------
# One function traced by torch.compile: the attention, the method's observation and the one-entry eviction of a
# decode step at a full budget. Static shapes: each layout (method and its parameters, batch, heads, head size, slots,
# dtype, device) gets its own copy of the function, so its own graphs; the buffers are resized to exactly the step's
# slots first, so a prompt's length does not make a layout (a budget does: keep_ratio budgets compile per budget). In steady state the slots keep
# their shapes from step to step (budget + 1 during the step, budget after) and the graph is reused: the traced
# code reads no Python number that changes per step (a CUDA graph could not replay one), except re-rotation's token
# count, which turns symbolic after its first change. Guards re-check the layer's Python state (has_bias, options,
# hyperparameters) at every call.
_COMPILED: dict[tuple, Callable] = {}
_UNCAPTURED: dict[str, str] = {}  # method name -> why torch.compile could not capture its step (logged once)


def _decode_step(layer: CompressedLayer, query: torch.Tensor, scaling: float) -> torch.Tensor:
    out = _attend(layer, query, layer.keys, layer.values, scaling, 0.0, layer.shares_attention_row(None))
    layer.observe_and_evict_one(query, scaling)
    return out.contiguous()


def _compiled_step(layer: CompressedLayer) -> Callable:
    key = (
        layer.options.compile_mode,
        repr(layer.evictor),
        layer.batch,
        layer.kv_heads,
        layer.head_dim,
        layer.value_dim,
        layer.length,  # = the capacity
        layer.dtype,
        layer.device,
    )
    if key not in _COMPILED:
        # A code object of its own: torch.compile keeps graphs and its automatic-dynamic choices per code object,
        # so one layout's sizes never turn another's symbolic.
        code = _decode_step.__code__.replace(co_name=f"_decode_step_{len(_COMPILED)}")
        step = types.FunctionType(code, _decode_step.__globals__, code.co_name)
        _COMPILED[key] = torch.compile(step, fullgraph=True, mode=layer.options.compile_mode)
    return _COMPILED[key]


def _run_fused_step(layer: CompressedLayer, query: torch.Tensor, scaling: float) -> torch.Tensor | None:
    """The compiled decode step [B, 1, H, Dv]; None when the method cannot be captured (logged once; the caller
    runs the step eagerly)."""
    name = layer.evictor.name
    if name in _UNCAPTURED:
        return None
    if layer.capacity != layer.length:
        # Static shapes: buffers of exactly budget + 1 slots, whatever capacity the prompt left (it would otherwise
        # make each prompt length a layout of its own, and a compilation).
        layer._resize(layer.length)
    layer.keys = layer.values = None  # the step builds its own views of the slots
    start = time.perf_counter()
    try:
        out = _compiled_step(layer)(layer, query, scaling)
    except torch._dynamo.exc.TorchDynamoException as error:  # raised while tracing: nothing has run
        lines = str(error).strip().splitlines()
        reason = f"{type(error).__name__}: {lines[0][:160]}" if lines else type(error).__name__
        _UNCAPTURED[name] = reason
        log.warning(
            "engine.compile: method=%s cannot be captured (%s); its decode steps run eagerly", name, reason
        )
        return None
    layer.fused_steps += 1
    layer.fused_seconds += time.perf_counter() - start
    return out


AttentionInterface.register(ATTN_IMPLEMENTATION, kvexp_attention)
AttentionMaskInterface.register(ATTN_IMPLEMENTATION, kvexp_mask)
