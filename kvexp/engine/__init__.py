"""The engine: a compressed KV cache (cache.py) and the attention implementation that serves it (attention.py)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from transformers import PreTrainedModel
from transformers.cache_utils import Cache

from kvexp.engine import attention  # noqa: F401  (registers the "kvexp" attention implementation)
from kvexp.engine.attention import ATTN_IMPLEMENTATION
from kvexp.engine.cache import (
    ACTIVE_LAYER,
    COMPILE_MODES,
    POSITION_OPTIONS,
    WHEN_OPTIONS,
    CacheOptions,
    CompressedLayer,
    KVCache,
    Reallocation,
    Rotary,
    Selection,
    Storage,
    SupportsStorage,
)

if TYPE_CHECKING:
    from kvexp.methods.base import Method

log = logging.getLogger(__name__)

__all__ = [
    "ATTN_IMPLEMENTATION",
    "CompressedLayer",
    "KVCache",
    "Reallocation",
    "Selection",
    "Storage",
    "SupportsStorage",
    "compress_cache",
    "make_cache",
    "model_rotary",
    "sliding_layers",
    "use_kvexp_attention",
]


def use_kvexp_attention(model: PreTrainedModel) -> None:
    """Switch the model to kvexp's attention: stock implementations mis-mask a compressed cache."""
    if model.config._attn_implementation != ATTN_IMPLEMENTATION:
        log.info("switching %s to the kvexp attention implementation", type(model).__name__)
        model.set_attn_implementation(ATTN_IMPLEMENTATION)


def model_rotary(model: PreTrainedModel) -> Rotary | None:
    """The RoPE of the layers a method compresses: the model's one rotary embedding, or the full-attention layers'
    of a model with one per layer type (Gemma-3's global layers have their own base and scaling)."""
    for module in model.modules():
        inv_freq = getattr(module, "full_attention_inv_freq", None)
        if inv_freq is None:
            inv_freq = getattr(module, "inv_freq", None)
        if inv_freq is not None:
            return Rotary(inv_freq=inv_freq.detach().clone())
    return None


LAYER_TYPES = ("full_attention", "sliding_attention")


def _check_model(model: PreTrainedModel) -> None:
    config = model.config
    layer_types = getattr(config, "layer_types", None) or []
    other = sorted({t for t in layer_types if t not in LAYER_TYPES})
    if other:
        raise ValueError(
            f"{type(model).__name__} has {other} layers; kvexp compresses models whose layers are "
            f"{' or '.join(LAYER_TYPES)}"
        )
    if getattr(config, "attn_logit_softcapping", None) is not None:
        raise ValueError(
            f"{type(model).__name__} soft-caps its attention logits (attn_logit_softcapping="
            f"{config.attn_logit_softcapping}), which kvexp's attention does not do; use a model without it"
        )


def sliding_layers(model: PreTrainedModel) -> list[bool]:
    """Which layers are local sliding-window layers in a model that mixes them with global ones (Gemma-3): a
    method never compresses those (they keep the model's own window); the global layers carry the budget. A model
    whose every layer slides (Mistral's `sliding_window`) is compressed in every layer, the window applied too."""
    layer_types = getattr(model.config, "layer_types", None) or []
    if "full_attention" not in layer_types:
        return [False] * model.config.num_hidden_layers
    return [t == "sliding_attention" for t in layer_types]


_SAID: set[str] = set()  # methods already logged as decoding eagerly under compile


def _say_if_never_compiled(evictor: Method, stored: SupportsStorage | None) -> None:
    """Log once per method when `compile` cannot apply to it at all."""
    why = (
        "it stores encoded entries"
        if stored is not None
        else "it merges entries"
        if evictor.merges
        else "it allocates budgets across layers"
        if evictor.allocates
        else None
    )
    name = stored.name if stored is not None else evictor.name
    if why is not None and name not in _SAID:
        _SAID.add(name)
        log.warning("engine.compile: method=%s decodes eagerly (%s, beyond the compiled step)", name, why)


def make_cache(
    model: PreTrainedModel,
    method: Method,
    budget: int | list[int] | None = None,
    *,
    head_budgets: list[list[int]] | None = None,
    row_budgets: list[int] | None = None,
    slack: int = 0,
    when: str = "always",
    positions: str = "original",
    recorder: Callable | None = None,
    differentiable: bool = False,
    compile: bool = False,
    compile_mode: str | None = None,
) -> KVCache:
    """A fresh compressed cache for `model` (which is switched to kvexp attention), run by the `method` object
    (`kvexp.make_cache` / `kvexp.methods.make_cache` also take a method's name and parameters).

    `budget`: kept entries per KV head, one int for every layer or a list with one per layer (None: no budget).
    `head_budgets`: per layer, one budget per KV head (real memory saving: the layer is as long as its longest
    head). `row_budgets`: one budget per batch row instead of `budget` (each row keeps what it keeps alone with its
    own; the layer is as long as the largest), for a method with `row_budgets`. `slack`: compress only once a layer exceeds budget + slack. `when`: "always" or "prefill" (only
    multi-token steps compress). `positions`: "original" or "rerotate". `differentiable`: training mode (copy-on-write
    buffers, no-grad scoring; see kvexp/engine/cache.py), dense K/V methods only. `compile`: decode steps that evict
    one entry run as one `torch.compile`d step (attention, observation, eviction), in `compile_mode` (None:
    "reduce-overhead" on CUDA, "default" elsewhere); a method it cannot capture decodes eagerly (logged once).
    A storage method (`SupportsStorage`: KIVI, ZACK, ThinK) stores every layer's entries encoded and hands token
    selection to its `evictor` (`layer.evictor`).
    """
    _check_model(model)
    if when not in WHEN_OPTIONS:
        raise ValueError(f"when must be one of {WHEN_OPTIONS}, got {when!r}")
    if positions not in POSITION_OPTIONS:
        raise ValueError(f"positions must be one of {POSITION_OPTIONS}, got {positions!r}")
    if slack < 0:
        raise ValueError(f"slack must be >= 0, got {slack}")
    if compile_mode is not None and compile_mode not in COMPILE_MODES:
        raise ValueError(f"compile_mode must be one of {COMPILE_MODES}, got {compile_mode!r}")
    if compile and differentiable:
        raise ValueError("compile is an inference path; the differentiable (training) mode runs eagerly")
    if isinstance(method, str):
        raise TypeError(
            f"kvexp.engine.make_cache takes a method object, got {method!r}; kvexp.make_cache builds one by name"
        )
    stored = method if isinstance(method, SupportsStorage) else None
    evictor = stored.evictor if stored is not None else method
    if stored is not None and positions == "rerotate":
        raise ValueError(
            f"positions=rerotate cannot run with method={method.name}: re-rotating would rewrite stored entries"
        )
    if stored is not None and differentiable:
        raise ValueError(
            f"method={method.name} stores encoded entries, which the differentiable (training) mode cannot hold"
        )
    n_layers = model.config.num_hidden_layers
    if row_budgets is not None and len(set(row_budgets)) == 1:
        budget, row_budgets = row_budgets[0], None  # one budget for every row
    if row_budgets is not None and (budget is not None or head_budgets is not None):
        raise ValueError("row_budgets replaces budget and head_budgets: give one of them")
    if head_budgets is not None:
        if len(head_budgets) != n_layers:
            raise ValueError(f"head_budgets needs one list per layer ({n_layers}), got {len(head_budgets)}")
        budget = [max(h) for h in head_budgets]
    budgets = budget if isinstance(budget, list) else [budget] * n_layers
    if len(budgets) != n_layers:
        raise ValueError(f"a per-layer budget needs {n_layers} entries, got {len(budgets)}")
    for b in budgets if row_budgets is None else row_budgets:
        if b is not None and b < 1:
            raise ValueError(f"budget must be a positive number of tokens, got {b}")
        method.validate(b)
    rotary = model_rotary(model)
    if positions == "rerotate" and rotary is None:
        raise ValueError(
            f"positions=rerotate needs a RoPE model; {type(model).__name__} has no rotary embedding"
        )
    if compile_mode is None:
        compile_mode = "reduce-overhead" if model.device.type == "cuda" else "default"
    if compile:
        _say_if_never_compiled(evictor, stored)
    options = CacheOptions(
        slack=slack,
        when=when,
        positions=positions,
        rotary=rotary,
        differentiable=differentiable,
        compile=compile,
        compile_mode=compile_mode,
    )
    sliding = sliding_layers(model)
    budgets = [None if local else b for b, local in zip(budgets, sliding, strict=True)]
    # Per row, the layers' budgets as the method sets them from that row's budget; a layer's rows side by side.
    by_row = [evictor.layer_budgets([None if local else b for local in sliding]) for b in row_budgets or ()]
    layers = []
    for i, layer_budget in enumerate(evictor.layer_budgets(budgets)):
        layer_budget = None if sliding[i] else layer_budget
        heads = head_budgets[i] if head_budgets is not None and layer_budget is not None else None
        rows = [row[i] for row in by_row] if by_row and by_row[0][i] is not None and not sliding[i] else None
        if rows is not None:
            layer_budget = max(rows)
        layers.append(CompressedLayer(i, layer_budget, method, options, head_budgets=heads, row_budgets=rows))
    if any(layer.budget is not None for layer in layers):
        evictor.prepare(model)
    if stored is not None:
        stored.prepare(model)  # e.g. ZACK's calibration: the storage works with or without a budget
    use_kvexp_attention(model)
    holding = evictor.probes and any(layer.budget is not None for layer in layers)
    return KVCache(layers, recorder=recorder, holding=holding)


def compress_cache(
    model: PreTrainedModel,
    past_key_values: Cache | tuple | list,
    method: Method,
    budget: int | list[int] | None = None,
    **options: Any,
) -> KVCache:
    """A kvexp cache holding the entries of an existing transformers cache (a `DynamicCache`, or the legacy tuple
    of one `(keys, values)` pair [B, Hkv, n, D] per layer), compressed at once by `method` to `budget`
    (`make_cache`'s options apply); decoding continues with it as with any kvexp cache (`model` is switched to
    kvexp attention). The entries are taken as one prefill at positions 0 .. n-1, without padding. Only methods
    that score from the cached keys and values can do this: one that observes queries (attention statistics)
    never saw them, and is refused.
    """
    if isinstance(past_key_values, KVCache):
        raise ValueError("past_key_values is already a kvexp cache")
    if isinstance(past_key_values, Cache):
        entries = [(layer.keys, layer.values) for layer in past_key_values.layers]
    else:
        entries = [(keys, values) for keys, values in past_key_values]
    cache = make_cache(model, method, budget, **options)
    if len(entries) != len(cache.layers):
        raise ValueError(f"past_key_values has {len(entries)} layers; the model has {len(cache.layers)}")
    for layer, (keys, values) in zip(cache.layers, entries, strict=True):
        if layer.budget is not None and layer.evictor.observes:
            raise ValueError(
                f"method={layer.evictor.name} scores with the queries' attention, which an existing cache does not "
                "hold; compress while the model runs (make_cache) or use a method that scores keys and values"
            )
        layer.update(keys, values)
        ACTIVE_LAYER.set(None)  # no attention follows this update
        if layer.storage is not None and type(layer.storage).observe is not Storage.observe:
            raise ValueError(
                f"method={method.name} encodes with the queries, which an existing cache does not hold"
            )
        layer.compress()
        layer.end_step()
    return cache
