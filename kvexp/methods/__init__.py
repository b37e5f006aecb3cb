"""Compression methods, one per file; importing this package registers them all."""

from kvexp.methods import (  # noqa: F401  (registration)
    full,
    h2o,
    knorm,
    observed_attention,
    random,
    recent_only,
    snapkv,
    streaming_llm,
    tova,
)
from kvexp.methods.base import METHODS, Method, build_method, list_methods, register

__all__ = ["METHODS", "Method", "build_method", "list_methods", "register"]
