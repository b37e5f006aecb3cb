"""Compression methods, one per file; importing this package imports (and so registers) every one of them."""

import importlib
import pkgutil

from kvexp.methods.base import METHODS, Method, build_method, list_methods, register

_SUPPORT = {"base", "scoring"}  # shared machinery, not methods
for _module in pkgutil.iter_modules(__path__):
    if _module.name not in _SUPPORT:
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["METHODS", "Method", "build_method", "list_methods", "register"]
