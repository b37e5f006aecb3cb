"""Compression methods, one per file; importing this package registers them all."""

from kvexp.methods import full, knorm, random, recent_only, streaming_llm  # noqa: F401  (registration)
from kvexp.methods.base import METHODS, Method, build_method, list_methods, register

__all__ = ["METHODS", "Method", "build_method", "list_methods", "register"]
