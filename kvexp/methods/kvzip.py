from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING
from weakref import WeakSet

import torch

from kvexp.methods.adakv import adaptive_counts
from kvexp.methods.base import Method, Probing, register
from kvexp.methods.criticalkv import output_projections
from kvexp.methods.hidden_state import hook_attention_inputs

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from kvexp.engine.cache import CompressedLayer, KVCache

ALLOCATIONS = ("global", "layer", "uniform")
FIRST_PROMPT = "\n\nRepeat the previous context exactly."
NEXT_PROMPT = "\n\nRepeat the part of the previous context exactly, starting with "


def largest_remainder(shares: list[float], total: int, caps: list[int]) -> list[int]:
    """Whole numbers summing to `total` (at most), each at most its cap, closest to `shares` (the floors, then one
    more for the largest remainders)."""
    whole = [min(math.floor(s), c) for s, c in zip(shares, caps, strict=True)]
    order = sorted(range(len(shares)), key=lambda i: whole[i] - shares[i])  # largest remainder first
    left = total - sum(whole)
    for i in order:
        if left <= 0:
            break
        if whole[i] < caps[i]:
            whole[i] += 1
            left -= 1
    return whole


@register
@dataclass
class KVzip(Method):
    """KVzip (Kim, Kim, Kwon, Lee, Yun, Song, NeurIPS 2025, arXiv 2505.23416; the authors' snu-mllab/KVzip; kvpress
    KVzipPress): an entry's importance is the largest attention it receives while the model reconstructs the
    context from the cache.

    After the prompt is prefilled (and held whole), the context is cut into chunks of `chunk_size` tokens after the
    sinks; for each chunk one probe forward runs over the full cache: the repeat prompt ("Repeat the previous
    context exactly." for the first chunk, "Repeat the part of the previous context exactly, starting with " and
    the previous chunk's last `prev_postfix_size` tokens for the others), the chat template's turn closing and
    answer opening, then the chunk itself (teacher-forced reconstruction). The probe's entries are dropped
    afterwards (`KVCache.probe`). At each layer the score of an entry of the chunk is the maximum, over the probe's
    queries and the KV head's query group, of a softmax taken over the sinks, the chunk and the probe's own keys
    (causal): the authors' chunked scoring, whose cost is quadratic in the chunk, not in the context. The first
    max(`n_sink`, chat-template opening) tokens are the sinks: never evicted, and the softmax's sink keys (the
    authors keep the whole system prompt, kvpress the first 4 tokens). Entries after the prompt (the question, the
    answer) are never evicted by score: under `engine.when=always` decoding evicts the lowest-scored context
    entries to hold the budget.

    `allocation`: `global` (the paper's default, non-uniform heads and layers): the cache keeps the best of all
    scores across layers and heads, as many as the budgets allow in total; each layer's budget becomes its share
    (rounded to whole entries per KV head, the shares summing to the cache's total), its heads sharing it by
    score. `layer`: each layer keeps its budget x KV heads entries, split over heads by score (kvpress's
    `layerwise`). `uniform`: every head keeps its budget (the paper's uniform head budgets). Heads of different
    lengths are real per-head budgets (dead-slot padding; the layer as long as its longest head). A run of one
    prompt at a time (`batches = False`): each prompt's chunks and allocation are its own. Deviations: the softmax
    is in fp32; the paper's head-level eviction (whole heads by their maximum score) is left to `duo_attention`.

    `plus`: KVzip+ (Jegou & Jeblick, KVzap, arXiv 2601.07891; kvpress `kvzip_plus_normalization`): each attention
    weight of the reconstruction, query t of query head h on entry j, is divided by ||h_t|| (the probe token's
    attention-input hidden state) and multiplied by ||v_j W_o^h||_2 (the entry's value through the head's slice of
    the output projection) before the maximum: an entry counts by what it adds to the residual stream, relative to
    the stream it is added to.
    """

    name = "kvzip"
    description = "max attention an entry gets while the model repeats the context (Kim et al. 2025)"
    probes = True
    batches = False
    state_names = ("kvzip",)
    chunk_size: int = 2000
    n_sink: int = 4
    prev_postfix_size: int = 8
    allocation: str = "global"
    plus: bool = False
    # Read from the model by `prepare` (plus only): each layer's output projection [H, D, hidden] (views of the
    # weights), and the attention-input hooks that hand each probe step's hidden states to `capture`.
    _w_o: list[torch.Tensor] | None = field(default=None, init=False, repr=False, compare=False)
    _hooked: WeakSet = field(default_factory=WeakSet, init=False, repr=False, compare=False)

    def validate(self, budget: int | None) -> None:
        if self.chunk_size < 1:
            raise ValueError(f"method.chunk_size must be >= 1, got {self.chunk_size}")
        if self.n_sink < 0:
            raise ValueError(f"method.n_sink must be >= 0, got {self.n_sink}")
        if self.prev_postfix_size < 0:
            raise ValueError(f"method.prev_postfix_size must be >= 0, got {self.prev_postfix_size}")
        if not isinstance(self.plus, bool):
            raise ValueError(f"method.plus must be true or false, got {self.plus!r}")
        if self.allocation not in ALLOCATIONS:
            raise ValueError(
                f"method.allocation must be one of {', '.join(ALLOCATIONS)}, got {self.allocation!r}"
            )

    def initial_state(self, name: str) -> float:
        return math.inf  # sinks and entries after the prompt; the probes score the context's

    def prepare(self, model: PreTrainedModel) -> None:
        if self.plus:
            self._w_o = output_projections(model)
            hook_attention_inputs(model, self, self._hooked)

    def capture(self, layer: CompressedLayer, hidden: torch.Tensor) -> None:
        """A step's attention-input hidden states [1, q, d]: during a probe, their norms ||h_t|| [q] (KVzip+)."""
        if layer.cache.probing:
            layer.scratch(self)["hidden_norms"] = hidden[0].float().norm(dim=-1)

    def score(self, layer: CompressedLayer) -> torch.Tensor:
        return layer.state("kvzip")

    def head_counts(self, layer: CompressedLayer, scores: torch.Tensor, target: int) -> torch.Tensor | None:
        if self.allocation == "uniform" or layer.head_budgets is not None:
            return None
        return adaptive_counts(scores, target, 0.0)

    def probe(self, cache: KVCache, prompt: Probing) -> None:
        self.reconstruct(cache, prompt)
        cache.end_probes(self._global_budgets(cache) if self.allocation == "global" else None)

    def reconstruct(self, cache: KVCache, prompt: Probing) -> None:
        """The reconstruction probes, chunk by chunk: every held context entry gets its score (not compressed)."""
        n = prompt.ids.shape[1]
        sinks = min(n, max(self.n_sink, prompt.opening))
        chunks = prompt.ids[:, sinks:].split(self.chunk_size, dim=1)
        first, later = prompt.encode(FIRST_PROMPT), prompt.encode(NEXT_PROMPT)
        scratch = cache.scratch(self)
        start = sinks
        with cache.probe():
            for i, chunk in enumerate(chunks):
                if i == 0:
                    head = first
                else:
                    previous = chunks[i - 1]
                    tail = previous[:, previous.shape[1] - min(self.prev_postfix_size, previous.shape[1]) :]
                    head = torch.cat([later, tail], dim=1)
                scratch["target"] = (sinks, start, start + chunk.shape[1])
                prompt.run(torch.cat([head, prompt.closing, chunk], dim=1))
                start += chunk.shape[1]

    def observe_probe(self, layer: CompressedLayer, query: torch.Tensor) -> None:
        sinks, start, end = layer.cache.scratch(self)["target"]
        batch, heads, q, dim = query.shape
        n = layer.length
        positions, live = (
            layer.positions[0, 0],
            layer.live()[0, 0],
        )  # one prompt: every head holds the same slots
        chosen = live & ((positions < sinks) | ((positions >= start) & (positions < end)))
        chosen[n - q :] = True  # the probe's own entries
        slots = chosen.nonzero().squeeze(-1)
        keys = layer.keys[:, :, slots].float()  # [1, Hkv, m, D]
        key_pos, query_pos = positions[slots], positions[n - q :]
        grouped = query.float().view(batch, layer.kv_heads, heads // layer.kv_heads, q, dim)
        logits = torch.einsum("bhgqd,bhkd->bhgqk", grouped, keys) * layer.scaling
        seen = key_pos[None, :] <= query_pos[:, None]  # [q, m] causal over the probe's own keys
        if layer.window is not None:
            seen &= key_pos[None, :] > query_pos[:, None] - layer.window
        probs = logits.masked_fill(~seen, float("-inf")).softmax(dim=-1).nan_to_num(0.0)
        target = (key_pos >= start) & (key_pos < end)
        probs = probs[..., target]  # [1, Hkv, G, q, t]
        if self.plus:
            probs = self._plus_weights(layer, probs, slots[target])
        layer.state("kvzip")[:, :, slots[target]] = probs.amax(dim=(2, 3))

    def _plus_weights(self, layer: CompressedLayer, probs: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """KVzip+: the probe's attention [1, Hkv, G, q, t] on the entries at `slots` [t], / ||h_q|| x ||v W_o^h||."""
        if self._w_o is None:
            raise RuntimeError(
                "kvzip plus=true has not read its model: build the cache with make_cache(model, ...), which calls "
                "method.prepare"
            )
        hidden = layer.scratch(self).pop("hidden_norms")  # [q]
        w_o = self._w_o[layer.layer_idx]  # [H, D, hidden]
        group = w_o.shape[0] // layer.kv_heads
        values = layer.values[0, :, slots].float()  # [Hkv, t, D]
        out = torch.stack(
            [
                (values[h // group] @ w_o[h].to(device=values.device, dtype=torch.float32)).norm(dim=-1)
                for h in range(w_o.shape[0])
            ]
        ).view(
            1, layer.kv_heads, group, 1, -1
        )  # ||v_j W_o^h|| [1, Hkv, G, 1, t]: query head h reads KV head h // G
        return probs / hidden.view(1, 1, 1, -1, 1) * out

    def _global_budgets(self, cache: KVCache) -> dict[int, int]:
        """Each compressed layer's budget from one ranking of every layer's and head's scores: its share of the
        best `sum(budget x heads)` entries, per KV head, rounded so the budgets keep their total."""
        layers = [layer for layer in cache.layers if layer.budget is not None and layer.is_initialized]
        if not layers:
            return {}
        scores = [
            layer.state("kvzip")[0].masked_fill(~layer.live()[0], -math.inf).flatten() for layer in layers
        ]
        total = sum(layer.budget for layer in layers)
        heads = layers[0].kv_heads
        ranked = torch.cat(scores)
        best = ranked.topk(min(total * heads, ranked.numel())).indices
        owner = torch.repeat_interleave(
            torch.arange(len(layers), device=ranked.device),
            torch.tensor([s.numel() for s in scores], device=ranked.device),
        )
        taken = torch.bincount(owner[best], minlength=len(layers)).tolist()
        budgets = largest_remainder([t / heads for t in taken], total, [layer.length for layer in layers])
        return {layer.layer_idx: b for layer, b in zip(layers, budgets, strict=True)}
