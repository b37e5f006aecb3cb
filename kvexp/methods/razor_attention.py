import logging
import math
from dataclasses import dataclass, field

import torch

from kvexp.methods.base import Method, register
from kvexp.methods.scoring import head_caps, write_slots
from kvexp.models import model_fingerprint

log = logging.getLogger(__name__)

# Probe scores per model fingerprint and probe setting: the probe is a pure function of the weights, so every
# cache (and method instance) of a run shares one forward. Values: (induction, echo), each [NL, Hkv].
_PROBED: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}


def copy_task_scores(attentions: list[torch.Tensor], length: int, offset: int, kv_heads: int):
    """Induction and echo scores [NL, Hkv] from one forward over `offset` lead tokens and a random block of
    `length` tokens written twice; `attentions` per layer [1, H, T, T].

    For the second copy's token i (query `offset + length + i`), the induction score is the attention on the
    token after its occurrence in the first copy (`offset + i + 1`: what an induction head copies), the echo
    score the attention on that occurrence itself (`offset + i`), each averaged over the second copy. A KV
    head scores the max over its query heads: its cache is kept whole if any of them retrieves.
    """
    i = torch.arange(length)
    queries = offset + length + i
    scores = []
    for target in (offset + i + 1, offset + i):
        per_layer = []
        for attn in attentions:  # [1, H, T, T]
            heads = attn[0, :, queries, target].float().mean(dim=-1)  # [H]
            per_layer.append(heads.reshape(kv_heads, -1).amax(dim=-1))
        scores.append(torch.stack(per_layer))
    return scores[0], scores[1]


@torch.no_grad()
def probe_scores(model, length: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The copy-task probe (`copy_task_scores`) on `model`, run once per model and setting: [BOS] + a block
    of `length` distinct random token ids (seeded) + the same block again, eager attention for the weights."""
    key = f"{model_fingerprint(model)}:{length}:{seed}"
    if key not in _PROBED:
        vocab = model.get_input_embeddings().num_embeddings
        if length > vocab:
            raise ValueError(
                f"method.probe_length ({length}) must not exceed the vocabulary ({vocab} tokens)"
            )
        block = torch.randperm(vocab, generator=torch.Generator().manual_seed(seed))[:length]
        bos = model.config.bos_token_id
        lead = torch.tensor([bos] if bos is not None else [], dtype=torch.long)
        ids = torch.cat([lead, block, block])[None].to(model.device)
        previous = model.config._attn_implementation
        model.set_attn_implementation("eager")  # the only implementation that returns attention weights
        try:
            attentions = model(ids, output_attentions=True, use_cache=False).attentions
        finally:
            model.set_attn_implementation(previous)
        kv_heads = getattr(model.config, "num_key_value_heads", None) or model.config.num_attention_heads
        scores = copy_task_scores([a.cpu() for a in attentions], length, lead.numel(), kv_heads)
        _PROBED[key] = scores
    return _PROBED[key]


def select_heads(
    induction: torch.Tensor, echo: torch.Tensor, induction_ratio: float, echo_ratio: float
) -> torch.Tensor:
    """[NL, Hkv] bool: the top `induction_ratio` of all KV heads by induction score, then the top
    `echo_ratio` of them by echo score among the rest (shares rounded half up)."""
    n = induction.numel()
    chosen = torch.zeros(n, dtype=torch.bool)
    for scores, ratio in ((induction, induction_ratio), (echo, echo_ratio)):
        count = math.floor(ratio * n + 0.5)
        chosen[scores.flatten().masked_fill(chosen, float("-inf")).topk(count).indices] = True
    return chosen.reshape(induction.shape)


def _top(order: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """[B, Hkv, L] bool: each row's `counts` [B, Hkv] highest entries of `order` (live slots never tie)."""
    rank = order.argsort(dim=-1, descending=True, stable=True).argsort(dim=-1)
    return rank < counts[..., None]


@register
@dataclass
class RazorAttention(Method):
    """RazorAttention (Tang et al., ICLR 2025, arXiv 2407.15891): retrieval heads keep the whole cache; every
    other KV head keeps `sink_tokens` sinks, a recent window and one compensation token.

    Retrieval heads come from a data-free probe run once per model (`probe_scores`): random tokens written
    twice; a head's induction score is its attention from the second copy to the token after the same token in
    the first copy, its echo score its attention to that token itself. The top `induction_ratio` of all KV
    heads by induction score, then the top `echo_ratio` by echo score, keep everything (the paper's ~14% +
    ~1%); `retrieval_heads` ([[layer, kv_head], ...]) names them instead. GQA: a KV head scores the max over
    its query heads (its cache can only be kept whole for all of them).
    The other heads keep their budget (the layer's, or their own per-head budget) of live entries: the sinks,
    the compensation token and the newest tokens. Every token they evict is folded into the compensation
    token: its key and value become the count-weighted mean of all the tokens it stands for, its bias
    `ln(count)` (attention counts the mean key `count` times: docs/methods.md#merging-rule), its position the newest of them;
    a head's first eviction turns its newest evicted slot into it. `compensation=False` just evicts.
    Budget semantics: a non-retrieval head never holds more live entries than its budget; a retrieval head
    holds every token, so a layer with one is as long as the sequence (its other heads' evicted slots are dead
    padding: no memory saving there) while layers without one stay at the budget.
    Open in the paper (docs/methods.md#razor_attention), chosen here: the paper's buffer `max(S0, N/C)` is the budget (all
    that is not sinks or the compensation token is the recent window); the probe is BOS + 256 distinct random
    tokens twice, scored on the second copy. A merged key cannot be re-rotated, so `compensation` rejects
    `positions=rerotate`; the probe needs the model, so give the method to `make_cache` directly (it calls
    `prepare`), not wrapped in another method.
    """

    name = "razor_attention"
    description = "retrieval heads full; others sinks + recent + a compensation token (Tang et al. 2024)"
    row_budgets = True  # the other heads keep each row's own budget (head_caps)
    state_names = ("tokens",)  # how many tokens a slot stands for (1, or more for the compensation token)
    induction_ratio: float = 0.14
    echo_ratio: float = 0.01
    sink_tokens: int = 4
    compensation: bool = True
    probe_length: int = 256
    probe_seed: int = 0
    retrieval_heads: list[list[int]] | None = None
    _full: torch.Tensor | None = field(default=None, init=False, repr=False, compare=False)  # [NL, Hkv] bool

    def validate(self, budget: int | None) -> None:
        for name in ("induction_ratio", "echo_ratio"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"method.{name} must be in [0, 1], got {getattr(self, name)}")
        if self.induction_ratio + self.echo_ratio > 1.0:
            raise ValueError(
                f"method.induction_ratio + method.echo_ratio must be at most 1, got "
                f"{self.induction_ratio} + {self.echo_ratio}"
            )
        if self.sink_tokens < 0:
            raise ValueError(f"method.sink_tokens must be >= 0, got {self.sink_tokens}")
        if budget is not None and self.sink_tokens + self.compensation >= budget:
            raise ValueError(
                f"method.sink_tokens ({self.sink_tokens}) plus the compensation token "
                f"({int(self.compensation)}) must be smaller than the budget ({budget}) so that a recent "
                "window remains"
            )
        if self.probe_length < 2:
            raise ValueError(f"method.probe_length must be >= 2, got {self.probe_length}")
        if self.retrieval_heads is not None and any(len(pair) != 2 for pair in self.retrieval_heads):
            raise ValueError(
                f"method.retrieval_heads must list [layer, kv_head] pairs, got {self.retrieval_heads}"
            )

    def prepare(self, model) -> None:
        kv_heads = getattr(model.config, "num_key_value_heads", None) or model.config.num_attention_heads
        shape = (model.config.num_hidden_layers, kv_heads)
        full = torch.zeros(shape, dtype=torch.bool)
        if self.retrieval_heads is not None:
            for layer, head in self.retrieval_heads:
                if not (0 <= layer < shape[0] and 0 <= head < shape[1]):
                    raise ValueError(
                        f"method.retrieval_heads: [{layer}, {head}] is not a (layer, KV head) of this model "
                        f"({shape[0]} layers x {shape[1]} KV heads)"
                    )
                full[layer, head] = True
        elif self.induction_ratio + self.echo_ratio > 0:
            induction, echo = probe_scores(model, self.probe_length, self.probe_seed)
            full = select_heads(induction, echo, self.induction_ratio, self.echo_ratio)
        # make_cache prepares the method once per sequence: name the heads once, not once per sample.
        unchanged = self._full is not None and torch.equal(self._full, full)
        self._full = full
        log.log(
            logging.DEBUG if unchanged else logging.INFO,
            "razor_attention: %d of %d KV heads keep the full cache: %s",
            full.sum(),
            full.numel(),
            full.nonzero().tolist(),
        )

    def _retrieval(self, layer) -> torch.Tensor:
        """[Hkv] bool: this layer's retrieval heads."""
        if self._full is None:
            raise RuntimeError(
                "razor_attention has not probed its model: build the cache with make_cache(model, ...), "
                "which calls method.prepare (wrapper methods do not forward it)"
            )
        return self._full[layer.layer_idx].to(layer.device)

    def _counts(self, layer) -> torch.Tensor:
        """Live entries each KV head keeps [B, Hkv]: its budget, or every live entry for a retrieval head."""
        return torch.where(self._retrieval(layer), layer.live().sum(dim=-1), head_caps(layer, layer.budget))

    def initial_state(self, name: str) -> float:
        return 1.0

    def head_counts(self, layer, scores: torch.Tensor, target: int) -> torch.Tensor | None:
        # Without a retrieval head the engine's own split (the budget, or the per-head budgets) is the same.
        return self._counts(layer) if bool(self._retrieval(layer).any()) else None

    def score(self, layer) -> torch.Tensor:
        """Strict keep order: the compensation token, the sinks, then the newest tokens; dead slots last.

        With `compensation`, the slots this compression evicts are folded into the compensation token here,
        because the engine's selection right after keeps exactly the top of this order."""
        if self.compensation and layer.options.positions == "rerotate":
            raise ValueError(
                "method.compensation=true cannot run with engine.positions=rerotate: the compensation token "
                "is a mean of keys at many positions and has no single position to re-rotate"
            )
        positions = layer.positions
        sinks = (positions >= 0) & (positions < self.sink_tokens)
        order = positions.float() + sinks * 2.0 * (layer.seen + 1)  # sinks above every recent token
        order = order.masked_fill(layer.state("tokens") > 1, float("inf"))
        order = order.masked_fill(~layer.live(), float("-inf"))
        if self.compensation:
            self._fold_evicted(layer, order)
        return order

    def _fold_evicted(self, layer, order: torch.Tensor) -> None:
        """Merge the live slots outside each head's keep set into its compensation token (making the newest
        evicted slot the token on a head's first eviction, which then ranks first in `order`)."""
        live = order > float("-inf")
        counts = layer.spare_rows_within_budget(self._counts(layer))  # the counts the engine applies next
        evicting = live.sum(dim=-1) > counts  # [B, Hkv]
        if not bool(evicting.any()):
            return
        has_token = order.isposinf().any(dim=-1)
        new_token = evicting & ~has_token
        evicted = live & ~_top(order, counts - new_token.long())  # a new token takes one of the kept places
        slot = torch.where(
            has_token, order.argmax(dim=-1), order.masked_fill(~evicted, float("-inf")).argmax(-1)
        )
        members = evicted | (has_token[..., None] & order.isposinf())
        tokens = layer.state("tokens")
        weights = tokens * members  # [B, Hkv, L]: the compensation token counts as the tokens it stands for
        total = weights.sum(dim=-1)  # [B, Hkv]
        denominator = total.clamp_min(1.0)[..., None]
        keys = torch.einsum("bhl,bhld->bhd", weights, layer.keys.float()) / denominator
        values = torch.einsum("bhl,bhld->bhd", weights, layer.values.float()) / denominator
        newest = layer.positions.masked_fill(~members, -1).amax(dim=-1)
        write_slots(layer, slot, evicting, keys, values, total.clamp_min(1.0).log(), newest)
        index, rows = slot[..., None], evicting[..., None]
        tokens.scatter_(2, index, torch.where(rows, total[..., None], tokens.gather(2, index)))
        order.scatter_(2, index, torch.where(rows, float("inf"), order.gather(2, index)))
