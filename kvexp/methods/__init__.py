"""Compression methods, one per file; importing this package imports (and so registers) every one of them."""

import importlib
import inspect
import pkgutil
from typing import Any

from kvexp import engine
from kvexp.methods.base import METHODS, Method, build_method, list_methods, register

_SUPPORT = {"base", "scoring", "merging", "storage", "clustering"}  # shared machinery, not methods
for _module in pkgutil.iter_modules(__path__):
    if _module.name not in _SUPPORT:
        importlib.import_module(f"{__name__}.{_module.name}")

_CACHE_OPTIONS = set(inspect.signature(engine.make_cache).parameters) - {"model", "method"}


def method_and_options(method: str | Method, kwargs: dict[str, Any]) -> Method:
    """The method object (built by name from the keyword arguments that are not cache options, which stay in
    `kwargs`)."""
    params = {k: kwargs.pop(k) for k in list(kwargs) if k not in _CACHE_OPTIONS}
    if isinstance(method, str):
        return build_method(method, **params)
    if params:
        raise TypeError(
            f"method parameters {sorted(params)} given with a method object; set them on the object"
        )
    return method


def make_cache(
    model: Any, method: str | Method = "full", budget: int | list[int] | None = None, **kwargs: Any
) -> engine.KVCache:
    """`kvexp.engine.make_cache` with the method given by name: `make_cache(model, "h2o", 256, recent_ratio=0.3,
    slack=8)`; keyword arguments that are not cache options (budget, head_budgets, slack, when, positions,
    recorder, differentiable) are the method's parameters."""
    return engine.make_cache(model, method_and_options(method, kwargs), budget, **kwargs)


def compress_cache(
    model: Any,
    past_key_values: Any,
    method: str | Method,
    budget: int | list[int] | None = None,
    **kwargs: Any,
) -> engine.KVCache:
    """`kvexp.engine.compress_cache` with the method given by name: an existing transformers cache compressed at
    once, e.g. `compress_cache(model, past_key_values, "streaming_llm", 512, sink_tokens=4)` for the kvcompress
    study's `streaming_llm_compress(past_key_values, start_size=4, recent_size=508)`."""
    return engine.compress_cache(model, past_key_values, method_and_options(method, kwargs), budget, **kwargs)


__all__ = [
    "METHODS",
    "Method",
    "build_method",
    "compress_cache",
    "list_methods",
    "make_cache",
    "method_and_options",
    "register",
]
