"""kvexp: exact KV-cache compression experiments for Hugging Face LLMs.

import kvexp
model, tokenizer = kvexp.load_model("smollm2_135m")
kvexp.list_methods()
cache = kvexp.make_cache(model, "streaming_llm", budget=256, sink_tokens=4)
cache = kvexp.compress_cache(model, past_key_values, "knorm", budget=256)  # an existing transformers cache
out = model.generate(input_ids, past_key_values=cache, max_new_tokens=64)
cache.stats()
result = kvexp.evaluate_perplexity(model, tokenizer, text, method="knorm", budget=512)

The names load on first use, so `python -m kvexp --help` and the config code import no torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "KVCache": "kvexp.engine",
    "make_cache": "kvexp.methods",
    "compress_cache": "kvexp.methods",
    "build_method": "kvexp.methods",
    "list_methods": "kvexp.methods",
    "load_model": "kvexp.models",
    "evaluate_perplexity": "kvexp.tasks.perplexity",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'kvexp' has no attribute {name!r}")
    module = importlib.import_module(_EXPORTS[name])
    return getattr(module, "load_model_by_name" if name == "load_model" else name)
