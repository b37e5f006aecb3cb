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


def make_cache(
    model: Any, method: str | Method = "full", budget: int | list[int] | None = None, **kwargs: Any
):
    """`kvexp.engine.make_cache` with the method given by name: `make_cache(model, "h2o", 256, recent_ratio=0.3,
    slack=8)`; keyword arguments that are not cache options (budget, head_budgets, slack, when, positions,
    recorder, differentiable) are the method's parameters."""
    params = {k: kwargs.pop(k) for k in list(kwargs) if k not in _CACHE_OPTIONS}
    if isinstance(method, str):
        method = build_method(method, **params)
    elif params:
        raise TypeError(
            f"method parameters {sorted(params)} given with a method object; set them on the object"
        )
    return engine.make_cache(model, method, budget, **kwargs)


__all__ = ["METHODS", "Method", "build_method", "list_methods", "make_cache", "register"]
