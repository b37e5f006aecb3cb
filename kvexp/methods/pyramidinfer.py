import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import nn

from kvexp.budgets import allocate
from kvexp.engine.cache import KVCache
from kvexp.methods.base import Method, register
from kvexp.methods.scoring import protect_recent, protect_sinks, remember_queries, window_attention

log = logging.getLogger(__name__)


@dataclass
class _Step:
    """One multi-token forward of a pyramidinfer cache whose hidden states may be pruned between layers."""

    length: int  # tokens the forward was given
    outputs: int  # its last `outputs` tokens' outputs are asked for (logits_to_keep): never pruned
    index: torch.Tensor | None = None  # [B, k] step indices of the tokens in the hidden states (None: all)
    chosen: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [B, k'] of its tokens going on


@register
@dataclass
class PyramidInfer(Method):
    """PyramidInfer (Yang et al., Findings of ACL 2024, arXiv 2405.12532): layer-wise hidden-state pruning.

    After each layer's attention, the last `window` queries (the recent tokens, never pruned) rank the tokens
    the layer holds: their attention, averaged over all query heads (one set per layer, so GQA-compatible),
    is weighted by a ramp from 1 (oldest recent query) to `distance_weight` (newest) and averaged over those
    queries; the first `sink_tokens` are forced in. In a multi-token step (a prompt) only the step's tokens the
    layer keeps go on, at most the next layer's budget of them: the hidden states of the others are dropped,
    so deeper layers compute and cache fewer tokens (each layer's set a subset of the previous one's), with
    their original positions for RoPE. A chunk on a filled cache (chunked prefill) prunes the same way: its
    tokens compete with the cached ones for the layer's budget, and those the layer evicts at once stop there.
    Layer budgets are `kvexp.budgets`' `pyramidinfer` schedule (the reference's compounded cosine keep ratios
    `decay_ratio`, `recent_ratio`) on the cache's budget as the mean; layer l keeps at most its budget.
    Defaults: the reference's `configs/llama3_8b.json`.

    Decided where the reference does not fit a budgeted cache (docs/methods.md#pyramidinfer):
    * The budget, not the fixed ratio `int(ctx * rho_l)`, sets how many tokens a layer keeps (the schedule
      has the reference's shape), so a layer whose budget is below the prompt evicts at its own attention too
      (layer 0 when the budget is below the prompt's share of layer 0; the reference's layer 0 keeps all).
      `min_context_length` (no pruning below 64 context tokens) is left out: the budget is the only size.
    * The recent window is `recent_ratio` of the largest layer budget plus the newest token (the reference's
      `int(L * recent_ratio) + 1`, with layer 0 holding the prompt), capped so that it and the sinks fit in
      the smallest (per-head) budget.
    * Decoding (and token-by-token streaming, where nothing can be pruned) evicts down to each layer's budget
      with the same ranking from the remembered last `window` queries (kvpress's DecodingPress), instead of
      the reference's block compression of new tokens every `exceed_length_to_compress` steps, which never
      recompresses the prompt and so has no budget.
    * A token whose output the forward is asked for (`logits_to_keep`, e.g. 1 in `generate()`) is never
      pruned: the last token always stays, and a forward asking for every position's logits (chunked
      perplexity, a plain `model(ids, past_key_values=cache)`) gets them all, its layers evicting instead.
      The final hidden states exist only for the tokens that reach the last layer.
    Pruning needs the decoder loop to pass `position_embeddings`, `position_ids` and `attention_mask` by
    keyword (RoPE decoders: Llama, Mistral, Qwen2/3, GPT-NeoX); other models are compressed by eviction only.
    """

    name = "pyramidinfer"
    description = (
        "layer-wise hidden-state pruning by recent-query attention, pyramid budgets (Yang et al. 2024)"
    )
    observes = True
    state_names = ("score",)  # this step's ranking, computed before eviction (pruning and eviction share it)
    recent_ratio: float = 0.2
    decay_ratio: float = 0.9
    sink_tokens: int = 4
    distance_weight: float = 1.2

    def validate(self, budget: int | None) -> None:
        if not 0 <= self.recent_ratio < 1:
            raise ValueError(f"method.recent_ratio must be in [0, 1), got {self.recent_ratio}")
        if not 0 < self.decay_ratio <= 1:
            raise ValueError(f"method.decay_ratio must be in (0, 1], got {self.decay_ratio}")
        if self.sink_tokens < 0:
            raise ValueError(f"method.sink_tokens must be >= 0, got {self.sink_tokens}")
        if self.distance_weight <= 0:
            raise ValueError(f"method.distance_weight must be > 0, got {self.distance_weight}")

    def layer_budgets(self, budgets: list[int | None]) -> list[int | None]:
        n = len(budgets)
        params = {"decay_ratio": self.decay_ratio, "recent_ratio": self.recent_ratio}
        return [
            None if b is None else allocate("pyramidinfer", b, n, **params)[i] for i, b in enumerate(budgets)
        ]

    def prepare(self, model) -> None:
        layers = _decoder_layers(model)
        if layers is None or "position_embeddings" not in inspect.signature(layers[0].forward).parameters:
            log.warning(
                "pyramidinfer: %s does not pass RoPE position embeddings to its decoder layers; its hidden "
                "states cannot be pruned, so its cache is compressed by eviction only",
                type(model).__name__,
            )
            return
        _hook_once(model, _note_outputs)
        for i, layer in enumerate(layers):
            _hook_once(layer, partial(_enter_layer, i))

    def protected(self, layer) -> tuple[int, int]:
        """(sinks, window): the forced-in first tokens and the recent window (the scoring queries) of the cache.

        The window is `recent_ratio` of the largest layer budget + 1 (the reference's recent tokens and the
        newest one); both are capped so that they fit in the smallest budget of the cache, layers and heads."""
        budgets = [
            b
            for other in layer.cache.layers
            if other.budget is not None
            for b in (other.head_budgets or [other.budget])
        ]
        smallest = min(budgets)
        sinks = min(self.sink_tokens, smallest - 1)
        return sinks, min(int(self.recent_ratio * max(budgets)) + 1, smallest - sinks)

    def observe(self, layer, query: torch.Tensor) -> None:
        sinks, window = self.protected(layer)
        remember_queries(layer, query, window)
        step = layer.cache.scratch(self).get("step")
        prunes = step is not None and layer.new_tokens > 1 and layer.layer_idx + 1 < len(layer.cache.layers)
        if prunes or layer.over_budget():
            layer.state("score").copy_(self._rank(layer, sinks, window))
        if prunes:
            self._choose(layer, step)

    def score(self, layer) -> torch.Tensor:
        return layer.state("score")  # ranked by `observe` just before this compression

    def statistics(self, layers) -> dict[str, Any]:
        """The protected tokens, and the most tokens each layer held at once: after a pruned prompt, what
        each layer computed (the pyramid of the prefill's compute), else its budget + one step."""
        sinks, window = self.protected(layers[0])
        return {
            "sink_tokens": sinks,
            "recent_window": window,
            "peak_length_per_layer": [layer.peak_length for layer in layers],
        }

    def _rank(self, layer, sinks: int, window: int) -> torch.Tensor:
        """[B, Hkv, n]: the distance-weighted, head-averaged attention of the window queries; sinks and the
        window +inf, dead slots -inf. The same for every KV head (one token set per layer)."""
        attention = window_attention(layer).mean(dim=(1, 2))  # [B, w, n]: mean over all query heads
        ramp = torch.linspace(1.0, self.distance_weight, attention.shape[1], device=attention.device)
        votes = (attention * ramp[:, None]).mean(dim=1)  # [B, n]
        scores = votes[:, None, :].expand(-1, layer.kv_heads, -1)
        scores = protect_recent(protect_sinks(scores, layer.positions, sinks), layer.positions, window)
        return scores.masked_fill(~layer.live(), float("-inf"))

    def _choose(self, layer, step: _Step) -> None:
        """Which of this step's tokens at `layer` go on to the next layer: those this layer keeps (all, unless
        it compresses now), at most the next layer's budget of them by rank, and those whose outputs are asked
        for. Rows of a batch forward the same number (a rectangular hidden state): a row with fewer forwards
        its next best too, which the next layer may evict."""
        n, new = layer.length, layer.new_tokens
        scores = layer.state("score").amax(dim=1)  # [B, n]; heads differ only where a slot is dead
        kept = scores > float("-inf")
        if layer.over_budget():  # what the engine's compression right after keeps
            kept &= _top(scores, self.target_size(layer))
        ranked = scores[:, n - new :].masked_fill(~kept[:, n - new :], float("-inf"))  # [B, new]
        following = layer.cache.layers[layer.layer_idx + 1].budget
        goes = _top(ranked, following if following is not None else new) & (ranked > float("-inf"))
        index = step.index if step.index is not None else torch.arange(new, device=scores.device)
        goes |= index >= step.length - step.outputs
        count = int(goes.sum(dim=1).max())
        if count < new:
            order = scores[:, n - new :].masked_fill(goes, float("inf"))
            step.chosen[layer.layer_idx] = order.topk(count, dim=1).indices.sort(dim=1).values


def _top(scores: torch.Tensor, count: int) -> torch.Tensor:
    """[B, n] bool: each row's `count` highest `scores` [B, n]."""
    best = scores.topk(min(count, scores.shape[1]), dim=1).indices
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(1, best, True)


def _decoder_layers(model: nn.Module) -> nn.ModuleList | None:
    """The model's decoder layers: the ModuleList with one entry per layer, entry i holding attention layer i."""
    n = model.config.num_hidden_layers
    for module in model.modules():
        if (
            isinstance(module, nn.ModuleList)
            and len(module) == n
            and all(
                any(getattr(m, "layer_idx", None) == i for m in entry.modules())
                for i, entry in enumerate(module)
            )
        ):
            return module
    return None


def _hook_once(module: nn.Module, hook: Callable) -> None:
    """Register `hook` as a forward pre-hook (with kwargs) unless the same hook already is one."""
    target = getattr(hook, "func", hook)
    key = getattr(hook, "args", ())
    for existing in module._forward_pre_hooks.values():
        if getattr(existing, "func", existing) is target and getattr(existing, "args", ()) == key:
            return
    module.register_forward_pre_hook(hook, with_kwargs=True)


def _method_of(cache) -> PyramidInfer | None:
    """The cache's PyramidInfer method, or None: the hooks do nothing for any other cache or method."""
    if isinstance(cache, KVCache) and cache.layers and isinstance(cache.layers[0].evictor, PyramidInfer):
        return cache.layers[0].evictor
    return None


def _note_outputs(model: nn.Module, args: tuple, kwargs: dict) -> None:
    """Model pre-hook: remember how many of the last tokens' logits this forward returns (0: all)."""
    cache = kwargs.get("past_key_values")
    method = _method_of(cache)
    if method is not None:
        cache.scratch(method)["outputs"] = kwargs.get("logits_to_keep", 0)  # of the forward about to run


def _enter_layer(layer_idx: int, module: nn.Module, args: tuple, kwargs: dict):
    """Decoder-layer pre-hook: drop the hidden states the previous layer did not pass on, and slice the
    per-token inputs the model's loop hands every layer (positions, RoPE cos/sin, token mask) to match."""
    cache = kwargs.get("past_key_values", kwargs.get("layer_past"))
    method = _method_of(cache)
    if method is None:
        return None
    hidden = args[0] if args else kwargs["hidden_states"]
    scratch = cache.scratch(method)
    if layer_idx == 0:  # a new forward
        wanted, length = scratch.pop("outputs", 0), hidden.shape[1]
        outputs = min(wanted, length) if isinstance(wanted, int) and wanted > 0 else length
        if outputs < length:
            scratch["step"] = _Step(length, outputs)  # the forward running now
        else:
            scratch.pop("step", None)
        return None
    step = scratch.get("step")
    if step is None:
        return None
    chosen = step.chosen.pop(layer_idx - 1, None)
    if chosen is not None:
        hidden = hidden.gather(1, chosen[..., None].expand(-1, -1, hidden.shape[-1]))
        step.index = chosen if step.index is None else step.index.gather(1, chosen)
    if step.index is None:
        return None
    if kwargs.get("position_ids") is None:
        raise RuntimeError(
            "pyramidinfer prunes hidden states only where the model passes position_ids to its layers"
        )
    kwargs = dict(kwargs)
    for name in ("position_ids", "attention_mask"):
        kwargs[name] = _take(kwargs.get(name), step.index)
    kwargs["position_embeddings"] = tuple(_take(t, step.index) for t in kwargs["position_embeddings"])
    # The dropped tokens were seen (and evicted at once): the layer's logical length stays the sequence's.
    cache.layers[layer_idx].seen += step.length - step.index.shape[1]
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def _take(tensor: torch.Tensor | None, index: torch.Tensor) -> torch.Tensor | None:
    """The step's per-token tensor ([B or 1, q, ...]) at `index` [B, k] along the token axis."""
    if tensor is None:
        return None
    if tensor.dim() < 2:
        raise RuntimeError(f"pyramidinfer cannot prune a per-token input of shape {tuple(tensor.shape)}")
    tensor = tensor.expand(index.shape[0], *tensor.shape[1:])
    return tensor.gather(
        1, index.view(*index.shape, *([1] * (tensor.dim() - 2))).expand(-1, -1, *tensor.shape[2:])
    )
