from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from kvexp.methods.base import Method, Probing, register
from kvexp.methods.chunk import chunk_scores
from kvexp.methods.scoring import attention_probs, step_queries

if TYPE_CHECKING:
    from kvexp.engine.cache import CompressedLayer, KVCache


@register
@dataclass
class Finch(Method):
    """FINCH (Corallo, Papotti, TACL 2024, arXiv 2408.00167, "FINCH: Prompt-guided Key-Value Cache Compression";
    kvpress FinchPress): the context keeps the entries the question attends to most.

    The context is prefilled and held; the question then runs as a probe over it (`KVCache.probe`: attended, then
    dropped) and each context entry scores the attention it gets from the question's queries, each query's
    weights multiplied by the number of keys it sees (`normalize_scores`: the paper's normalization by the non-zero
    weights, so a longer row's diluted softmax counts alike), averaged over the question's tokens and the KV head's
    query group. Every layer keeps its budget minus the question's length of context entries, then the question is
    fed again over the compressed cache and kept whole: the question-guided cache plus the question hold the
    budget, and the answer is generated from it, as in the paper. `chunk_length`: each context chunk of that many
    tokens keeps the same share of its entries (kvpress's `chunk_length`, ranked as kvexp's `chunk`). Prompt-guided
    by definition: it runs under `eval.protocol=query_aware` only (the query-agnostic protocol never shows the
    question to the compression). One prompt at a time.

    Chunk by chunk (the paper's processing of a document longer than the model's window), under
    `eval.prefill_chunk_size`: the context is fed a chunk at a time, each chunk attending to the cache compressed so
    far; after each chunk the question probes the cache (the kept entries and the chunk), every context entry is
    scored anew and the context is compressed to the budget minus the question before the next chunk. Without
    it the whole context is one chunk.

    Deviations: the paper re-positions the kept keys (kvpress's
    `rerotate_keys=True`): that is kvexp's engine option `engine.positions=rerotate`, off by default for every
    method. kvpress's normalization multiplies query i's weights by (context + i) rather than the keys it sees
    (context + i + 1).
    """

    name = "finch"
    description = "context entries the question attends to most, the question kept (Corallo & Papotti 2024)"
    probes = True
    needs_question = True
    batches = False
    state_names = ("finch",)
    normalize_scores: bool = True
    chunk_length: int | None = None

    def validate(self, budget: int | None) -> None:
        if self.chunk_length is not None and self.chunk_length < 1:
            raise ValueError(f"method.chunk_length must be null or >= 1, got {self.chunk_length}")

    def initial_state(self, name: str) -> float:
        return math.inf  # the question and the answer: never evicted by score

    def score(self, layer: CompressedLayer) -> torch.Tensor:
        scores = layer.state("finch")
        if self.chunk_length is None:
            return scores
        return chunk_scores(scores, layer.positions, layer.live(), self.chunk_length)

    def prefill(self, cache: KVCache, prompt: Probing) -> torch.Tensor:
        if prompt.question is None:
            raise ValueError(
                "method=finch selects the context by the question's attention: run it with eval.protocol=query_aware"
            )
        question = prompt.question.shape[1]
        for layer in cache.layers:
            if layer.budget is not None and layer.budget <= question:
                raise ValueError(
                    f"method=finch keeps the question ({question} tokens) within the budget; layer {layer.layer_idx}'s "
                    f"budget {layer.budget} leaves no room for the context"
                )
        budgets = {
            layer.layer_idx: layer.budget - question for layer in cache.layers if layer.budget is not None
        }
        n = prompt.ids.shape[1]
        step = prompt.chunk_size or max(n, 1)
        for start in range(0, n, step):
            prompt.feed(prompt.ids[:, start : start + step])  # held with what was kept before
            with cache.probe():
                prompt.run(prompt.question)
            cache.end_probes(budgets, hold=start + step < n)  # down to budget - question; the next chunk held
        if not n:
            cache.end_probes(budgets)
        cache.admit(question)  # the question stays whole, the budgets back to what they were
        return prompt.feed(prompt.question)

    def observe_probe(self, layer: CompressedLayer, query: torch.Tensor) -> None:
        queries, positions = step_queries(layer, query)
        probs = attention_probs(layer, queries, positions, layer.scaling)  # [B, Hkv, G, q, n]
        if self.normalize_scores:
            # the keys each query sees: live, at or before its position [B, Hkv, 1, q, 1]
            sees = (layer.positions[:, :, None, :] <= positions[:, None, :, None]) & layer.live()[
                :, :, None, :
            ]
            probs = probs * sees.sum(dim=-1)[:, :, None, :, None]
        q = query.shape[2]
        context = layer.length - q
        layer.state("finch")[:, :, :context] = probs[..., :context].mean(dim=(2, 3))
