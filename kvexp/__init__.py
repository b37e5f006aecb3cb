"""kvexp: exact KV-cache compression experiments for Hugging Face LLMs.

import kvexp
model, tokenizer = kvexp.load_model("smollm2_135m")
kvexp.list_methods()
cache = kvexp.make_cache(model, "streaming_llm", budget=256, sink_tokens=4)
out = model.generate(input_ids, past_key_values=cache, max_new_tokens=64)
cache.stats()
result = kvexp.evaluate_perplexity(model, tokenizer, text, method="knorm", budget=512)
"""

from kvexp.engine import KVCache, make_cache
from kvexp.methods import build_method, list_methods
from kvexp.models import load_model_by_name as load_model
from kvexp.tasks.perplexity import evaluate_perplexity

__all__ = ["KVCache", "build_method", "evaluate_perplexity", "list_methods", "load_model", "make_cache"]
