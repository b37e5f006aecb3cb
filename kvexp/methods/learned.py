"""Learned eviction (the H2O study's learned policy; docs/methods.md#learned): a small per-layer MLP scores every cached entry.

Features of cached token j, per KV head, when a layer of a cache that has seen tokens 0 .. t compresses
(`entry_features`; the trainer computes exactly the same ones from full-cache runs):

* `key_norm`   log ||k_j||  (post-RoPE key of the head; RoPE preserves norms)
* `value_norm` log ||v_j||
* `position`   log(1 + p_j), p_j the token's logical position (sinks, early tokens)
* `age`        log(1 + t - p_j), the recency
* `acc`        log(eps + a_j), a_j = attention the key received from every query since it was cached (H2O's
               accumulated score: column sums, the group's query heads reduced by `gqa`)
* `acc_mean`   log(eps + a_j / (t - p_j + 1)), the same per observing query (observed attention)
* `hidden<i>`  i < P: KVzap's hidden-state path, P learned projections per KV head of the attention-input hidden
               state h_j (the input of the attention module: post input_layernorm), computed once when j is cached
               and kept as per-slot state; P comes from the checkpoint (0 without one).

The scorer of layer l maps [hidden_0 .. hidden_{P-1}, standardized scalar features] -> Linear(P + 6 -> M) -> GELU
-> Linear(M -> 1), separate weights per KV head, to the predicted log importance (`LearnedScorer`).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from weakref import WeakSet

import torch
import torch.nn.functional as F
from torch import nn

from kvexp.methods.base import Method, check_window, register
from kvexp.methods.hidden_state import (  # noqa: F401 (attention_input, attention_modules: criticalkv, the trainer)
    attention_input,
    attention_modules,
    hook_attention_inputs,
    read_checkpoint,
    runs,
    save_checkpoint,
)
from kvexp.methods.scoring import (
    GQA_REDUCTIONS,
    accumulate_attention,
    fraction,
    protect_recent,
    protect_sinks,
    row_budget,
    tokens_seen,
)

log = logging.getLogger(__name__)

FEATURES = ("key_norm", "value_norm", "position", "age", "acc", "acc_mean")
EPS = 1e-6  # inside the logs of attention sums and norms
CHECKPOINT_FORMAT = "kvexp.learned_scorer/1"
CHECKPOINT_FILE = "learned_scorer.pt"


def entry_features(
    keys: torch.Tensor,  # [..., Hkv, n, D]
    values: torch.Tensor,  # [..., Hkv, n, Dv]
    positions: torch.Tensor,  # [..., Hkv, n] logical positions (-1: padding)
    seen: int | torch.Tensor,  # tokens seen, or each row's [..., Hkv, 1]: the decision follows token seen - 1
    acc: torch.Tensor,  # [..., Hkv, n] attention received since cached (group-reduced)
) -> torch.Tensor:
    """The scalar features `FEATURES` of every entry: [..., Hkv, n, 6] (fp32; see the module docstring)."""
    position = positions.clamp_min(0).float()
    age = (seen - 1 - position).clamp_min(0.0)
    acc = acc.float().clamp_min(0.0)
    return torch.stack(
        [
            (keys.float().norm(dim=-1) + EPS).log(),
            (values.float().norm(dim=-1) + EPS).log(),
            position.log1p(),
            age.log1p(),
            (acc + EPS).log(),
            (acc / (age + 1.0) + EPS).log(),
        ],
        dim=-1,
    )


class LearnedScorer(nn.Module):
    """Per-layer, per-KV-head MLPs predicting log importance (KVzap's 2-layer MLP on hidden states, with kvexp's
    scalar features beside the hidden-state projections). `project` runs once per new token (its hidden state),
    `forward` whenever a layer compresses."""

    def __init__(
        self, num_layers: int, hidden_size: int, kv_heads: int, hidden_features: int, mlp_hidden: int
    ):
        super().__init__()
        self.num_layers, self.hidden_size, self.kv_heads = num_layers, hidden_size, kv_heads
        self.hidden_features, self.mlp_hidden = hidden_features, mlp_hidden
        inputs = hidden_features + len(FEATURES)
        width = kv_heads * hidden_features
        self.proj_w = nn.Parameter(torch.randn(num_layers, hidden_size, width) / math.sqrt(hidden_size))
        self.proj_b = nn.Parameter(torch.zeros(num_layers, width))
        self.w1 = nn.Parameter(torch.randn(num_layers, kv_heads, inputs, mlp_hidden) / math.sqrt(inputs))
        self.b1 = nn.Parameter(torch.zeros(num_layers, kv_heads, mlp_hidden))
        self.w2 = nn.Parameter(torch.randn(num_layers, kv_heads, mlp_hidden) / math.sqrt(mlp_hidden))
        self.b2 = nn.Parameter(torch.zeros(num_layers, kv_heads))
        # Standardization of the scalar features (set from the training data).
        self.register_buffer("feature_mean", torch.zeros(num_layers, len(FEATURES)))
        self.register_buffer("feature_std", torch.ones(num_layers, len(FEATURES)))

    def config(self) -> dict[str, int]:
        return {
            "num_layers": self.num_layers,
            "hidden_size": self.hidden_size,
            "kv_heads": self.kv_heads,
            "hidden_features": self.hidden_features,
            "mlp_hidden": self.mlp_hidden,
        }

    def project(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """Hidden states [..., hidden_size] of one layer -> its P hidden features per KV head [..., Hkv, P]."""
        out = hidden.to(self.proj_w.dtype) @ self.proj_w[layer] + self.proj_b[layer]
        return out.reshape(*hidden.shape[:-1], self.kv_heads, self.hidden_features)

    def forward(self, layer: int, hidden: torch.Tensor, scalars: torch.Tensor) -> torch.Tensor:
        """One layer: hidden features [..., Hkv, n, P], scalar features [..., Hkv, n, 6] -> log importance
        [..., Hkv, n]."""
        scalars = (scalars - self.feature_mean[layer]) / self.feature_std[layer]
        x = torch.cat([hidden.to(scalars.dtype), scalars], dim=-1)
        h = F.gelu(torch.einsum("...hnf,hfm->...hnm", x, self.w1[layer]) + self.b1[layer][:, None])
        return torch.einsum("...hnm,hm->...hn", h, self.w2[layer]) + self.b2[layer][:, None]

    def forward_all(self, hidden: torch.Tensor, scalars: torch.Tensor) -> torch.Tensor:
        """Every layer at once (training): hidden states [L, n, hidden_size], scalar features [L, n, Hkv, 6] ->
        log importance [L, n, Hkv]."""
        projected = torch.einsum("lnd,ldk->lnk", hidden, self.proj_w) + self.proj_b[:, None]
        projected = projected.reshape(*hidden.shape[:2], self.kv_heads, self.hidden_features)
        scalars = (scalars - self.feature_mean[:, None, None]) / self.feature_std[:, None, None]
        x = torch.cat([projected, scalars], dim=-1)  # [L, n, Hkv, P + 6]
        h = F.gelu(torch.einsum("lnhf,lhfm->lnhm", x, self.w1) + self.b1[:, None])
        return torch.einsum("lnhm,lhm->lnh", h, self.w2) + self.b2[:, None]


def save_scorer(scorer: LearnedScorer, path: Path, meta: dict[str, Any]) -> None:
    """The checkpoint: {format, config (the scorer's shape, FEATURES, eps), meta (how it was trained), state_dict}."""
    save_checkpoint(
        path, CHECKPOINT_FORMAT, {**scorer.config(), "features": list(FEATURES), "eps": EPS}, meta, scorer
    )


def load_scorer(path: str | Path, option: str = "method.checkpoint") -> tuple[LearnedScorer, dict[str, Any]]:
    """A scorer from `save_scorer`'s file (or a directory holding learned_scorer.pt) and its meta."""
    blob = read_checkpoint(path, CHECKPOINT_FORMAT, CHECKPOINT_FILE, "learned_scorer", option)
    config = blob["config"]
    if list(config["features"]) != list(FEATURES):
        raise ValueError(
            f"{option}={str(path)!r} was trained on features {config['features']}, this kvexp computes {list(FEATURES)}"
        )
    shape = ("num_layers", "hidden_size", "kv_heads", "hidden_features", "mlp_hidden")
    scorer = LearnedScorer(**{k: config[k] for k in shape})
    scorer.load_state_dict(blob["state_dict"])
    return scorer.eval(), dict(blob.get("meta", {}))


@register
@dataclass
class Learned(Method):
    """kvexp's H2O-study-style learned eviction policy: a per-layer MLP trained on an H2O oracle (docs/methods.md#learned).

    The H2O study's `LearnedEvictionCache` is an "MLP-based learned policy trained on H2O oracle labels"; kvexp's is
    built on KVzap's recipe (NVIDIA, arXiv 2601.07891; kvpress `KVzapPress`): a small MLP per layer reads the
    attention-input hidden state of each token and predicts its log importance per KV head, regressed (MSE) on
    log oracle scores. kvexp adds scalar features beside the hidden-state projection (key and value norms,
    position, age, H2O's accumulated attention received so far and its per-query mean; module docstring) and
    trains on an H2O oracle instead of KVzap's KVzip+ repeat-the-context oracle: `train=learned_scorer` with
    `oracle: h2o` (log of the attention a key accumulates over the whole window, H2O's score at its end) or
    `oracle: future` (attention from the next F queries). When a layer exceeds its budget, the first
    `sink_tokens` and the recent window (`recent_size` tokens, else `recent_ratio` of the budget) are kept and
    the rest of the budget goes to the highest predicted scores, per KV head (KVzap thresholds instead; kvexp
    evicts to a token budget like every other method).
    GQA: the hidden-state path predicts one score per KV head; the accumulated-attention features reduce the
    group's query heads with `gqa` (mean by default), which must match the checkpoint's.
    Without a checkpoint (`checkpoint: null`) there is no MLP and the score is the `acc` feature itself:
    H2O's accumulated attention with sinks and the recent window protected (the "untrained" baseline).
    The accumulated attention at inference is over the compressed cache (evicted keys no longer share the
    softmax), at training over the full cache, as for H2O's running score vs its oracle.
    """

    name = "learned"
    description = "per-layer MLP predicting H2O-oracle log importance from hidden state, norms, age, attention (the H2O study)"
    observes = True
    row_budgets = True  # its recent window is each row's share of its own budget; ages are each row's own
    reads_step_attention = True
    checkpoint: str | None = None
    sink_tokens: int = 4
    recent_ratio: float = 0.25
    recent_size: int | None = None
    gqa: str = "mean"
    _hooked: WeakSet = field(default_factory=WeakSet, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.scorer: LearnedScorer | None = None
        self.meta: dict[str, Any] = {}
        if self.checkpoint is not None:
            self.scorer, self.meta = load_scorer(self.checkpoint)
        hidden = self.scorer.hidden_features if self.scorer is not None else 0
        # Instance-level value of the ClassVar the engine reads: the hidden features live as per-slot state.
        self.state_names = ("acc", *(f"hidden{i}" for i in range(hidden)))

    def validate(self, budget: int | None) -> None:
        if self.sink_tokens < 0:
            raise ValueError(f"method.sink_tokens must be >= 0, got {self.sink_tokens}")
        if not 0.0 <= self.recent_ratio <= 1.0:
            raise ValueError(f"method.recent_ratio must be in [0, 1], got {self.recent_ratio}")
        check_window("recent_size", self.recent_size, budget, up_to_budget=True, nullable=True)
        if self.gqa not in GQA_REDUCTIONS:
            raise ValueError(f"method.gqa must be one of {GQA_REDUCTIONS}, got {self.gqa!r}")
        trained_gqa = self.meta.get("gqa")
        if trained_gqa is not None and trained_gqa != self.gqa:
            raise ValueError(
                f"method.gqa={self.gqa!r} but method.checkpoint was trained with gqa={trained_gqa!r}; use the same"
            )

    def recent(self, budget: int | torch.Tensor) -> int | torch.Tensor:
        """The recent window of a budget, or of each row's ([B, 1, 1], `row_budget`)."""
        return self.recent_size if self.recent_size is not None else fraction(budget, self.recent_ratio)

    def prepare(self, model) -> None:
        if self.scorer is None:
            return
        cfg = model.config
        kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        wanted = (cfg.num_hidden_layers, cfg.hidden_size, kv_heads)
        got = (self.scorer.num_layers, self.scorer.hidden_size, self.scorer.kv_heads)
        if wanted != got:
            raise ValueError(
                f"method.checkpoint={self.checkpoint!r} scores (layers, hidden size, KV heads) = {got}, but "
                f"{type(model).__name__} has {wanted}; train it on this model (train=learned_scorer)"
            )
        if self.scorer.hidden_features > 0:
            hook_attention_inputs(model, self, self._hooked)

    def capture(self, layer, hidden: torch.Tensor) -> None:
        """Attention pre-hook's work: project this step's attention-input hidden states [B, q, d] for `layer`."""
        # the evictor is this method, or a wrapper running it (prefill_decoding)
        if layer.budget is None or layer.cache.probing or not runs(layer.evictor, self):
            return
        if "hidden0" not in layer.state_names():
            return
        with torch.no_grad():
            layer.scratch(self)["projected"] = self.scorer.project(layer.layer_idx, hidden.float())

    def observe(self, layer, query: torch.Tensor) -> None:
        accumulate_attention(layer, query, "acc", self.gqa)
        if self.scorer is None or self.scorer.hidden_features == 0:
            return
        projected = layer.scratch(self).pop("projected", None)  # [B, q, Hkv, P]
        q = layer.new_tokens
        if projected is None or projected.shape[1] != q:
            raise RuntimeError(
                f"method=learned: layer {layer.layer_idx} got no hidden states for its {q} new tokens (the model "
                "must call its attention modules with past_key_values; build the cache with make_cache)"
            )
        for i in range(self.scorer.hidden_features):
            layer.state(f"hidden{i}")[:, :, -q:] = projected[..., i].transpose(1, 2).to(torch.float32)

    def predict(self, layer) -> torch.Tensor:
        """The predicted log importance of every slot [B, Hkv, n] (no protection)."""
        seen = tokens_seen(layer.positions)  # each row's own: a left-padded row's ages are its own
        scalars = entry_features(layer.keys, layer.values, layer.positions, seen, layer.state("acc"))
        if self.scorer is None:
            return scalars[..., FEATURES.index("acc")]
        hidden = [layer.state(f"hidden{i}") for i in range(self.scorer.hidden_features)]
        hidden = torch.stack(hidden, dim=-1) if hidden else scalars[..., :0]
        with torch.no_grad():
            return self.scorer(layer.layer_idx, hidden, scalars)

    def score(self, layer) -> torch.Tensor:
        scores = protect_sinks(self.predict(layer), layer.positions, self.sink_tokens)
        return protect_recent(scores, layer.positions, self.recent(row_budget(layer)))
