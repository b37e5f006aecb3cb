from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from kvexp.methods.base import check_window, register
from kvexp.methods.hidden_state import HiddenStateScorer, PerLayer, model_name, published_file
from kvexp.methods.scoring import protect_recent, protect_sinks

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from kvexp.engine.cache import CompressedLayer

CHECKPOINT_FORMAT = "kvexp.fastkvzip/1"
PUBLISHED_REPO = "Jang-Hyun/Fast-KVzip"
NORM_EPS = 1e-6  # the gates' RMSNorm (Qwen3RMSNorm's default)
LONG_CONTEXT = (
    32000  # from this many tokens on, the protected window is window_size tokens (kvpress's switch)
)


def rms_norm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + NORM_EPS) * weight


class RMSNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight)


class Gate(nn.Module):
    """One layer's gate (the authors' parameter names): h [..., d] -> [..., Hkv] in (0, 1).

    q = RMSNorm(q_proj(h)) per KV head and query of its group [H, G, r], k = RMSNorm(k_proj(h)) [H, r];
    self logit l_g = k . q_g / sqrt(r) + b_g, sink logits l_{g,s} = k_base_s . q_g / sqrt(r) (S learned sink keys
    per head); score = mean over the group of 1 / (1 + sum_s exp(l_{g,s} - l_g)): the attention the token's own
    key would get from q_g in a softmax shared with the S sinks."""

    def __init__(self, input_dim: int, kv_heads: int, groups: int, output_dim: int, sink: int):
        super().__init__()
        self.kv_heads, self.groups, self.output_dim, self.sink = kv_heads, groups, output_dim, sink
        self.q_proj = nn.Linear(input_dim, kv_heads * groups * output_dim, bias=True)
        self.k_proj = nn.Linear(input_dim, kv_heads * output_dim, bias=False)
        self.q_norm = RMSNorm(output_dim)
        self.k_norm = RMSNorm(output_dim)
        self.k_base = nn.Parameter(torch.zeros(kv_heads, 1, sink, output_dim))
        self.b = nn.Parameter(torch.zeros(kv_heads, 1, groups))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        lead, (h, g, r) = hidden.shape[:-1], (self.kv_heads, self.groups, self.output_dim)
        q = self.q_norm(self.q_proj(hidden).view(*lead, h, g, r))
        k = self.k_norm(self.k_proj(hidden).view(*lead, h, 1, r))
        scale = math.sqrt(r)
        own = (k * q).sum(-1) / scale + self.b.view(h, g)  # [..., H, G]
        sinks = torch.einsum("...hgr,hsr->...hgs", q, self.k_base.view(h, self.sink, r)) / scale
        score = 1.0 / (1.0 + (sinks - own[..., None]).exp().sum(-1))
        return score.mean(-1)


class FastKVzipGates(PerLayer):
    def __init__(
        self, num_layers: int, input_dim: int, kv_heads: int, groups: int, output_dim: int, sink: int
    ):
        super().__init__([Gate(input_dim, kv_heads, groups, output_dim, sink) for _ in range(num_layers)])
        self.shape = (num_layers, input_dim, kv_heads, groups)
        self.output_dim, self.sink = output_dim, sink


def gates_from_states(states: list[dict[str, torch.Tensor]]) -> FastKVzipGates:
    """Gates sized by their own tensors (the authors' per-layer state dicts)."""
    first = states[0]
    kv_heads, _, sink, output_dim = first["k_base"].shape
    groups = first["q_proj.weight"].shape[0] // (kv_heads * output_dim)
    gates = FastKVzipGates(len(states), first["q_proj.weight"].shape[1], kv_heads, groups, output_dim, sink)
    for gate, state in zip(gates.layers, states, strict=True):
        gate.load_state_dict({k: v.float() for k, v in state.items()})
    return gates


def _read_torch_file(path: Path) -> Any:
    """A torch file read with weights_only, numpy arrays allowed (the authors save their loss curves beside the
    gates); None when it cannot be read."""
    import numpy as np

    core = np._core if hasattr(np, "_core") else np.core
    allowed = [core.multiarray._reconstruct, np.ndarray, np.dtype]
    allowed += [type(np.dtype(t)) for t in (np.float64, np.float32, np.float16, np.int64, np.int32, np.bool_)]
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # corrupt, truncated, or holding objects weights_only refuses: not this format
        return None


def load_gate_file(path: Path) -> FastKVzipGates | None:
    """The authors' gate file (`Jang-Hyun/Fast-KVzip` `<model>/q{G}_dim{r}_sink{S}.pt`, FastKVzip's optim.py):
    a torch file {"module": [one state dict per layer], "loss": ..., ...}; None when `path` is not one."""
    if not path.is_file():
        return None
    blob = _read_torch_file(path)
    if not isinstance(blob, dict) or not isinstance(blob.get("module"), list) or not blob["module"]:
        return None
    return gates_from_states(blob["module"])


@register
@dataclass
class FastKVzip(HiddenStateScorer):
    """Fast KVzip (Kim, Han, Yun, NAVER AI Lab, arXiv 2601.17668, "Fast KVzip: Efficient and Accurate LLM
    Inference with Gated KV Eviction"; the authors' Janghyun1230/FastKVzip; kvpress `FastKVzipPress`, the
    `Jang-Hyun/Fast-KVzip` gates): a per-layer low-rank sink-attention gate predicts KVzip's importance of each
    entry from its own hidden state, in prefill and decoding alike.

    Per layer, from the attention-input hidden state h_j of token j: per KV head a key k = RMSNorm(W_k h_j) and per
    query of its group G a query q_g = RMSNorm(W_q h_j + c) (`output_dim` r = 16 dimensions each), and `sink` = 16
    learned sink keys per head. score_j = mean over g of 1 / (1 + sum_s exp((k_s . q_g - k . q_g) / sqrt(r) - b_g)):
    the share token j's own key would take from the sinks in one softmax, in (0, 1). It is computed once, when the
    entry is written, and kept as per-slot state; the gates are trained on KVzip's scores with a binary
    cross-entropy (`train=kvzip_surrogate`). A compression keeps the first `n_sink` tokens and a recent window
    (`window_ratio` of the tokens a row has seen, `window_size` from 32k tokens on: kvpress's rule) and the highest
    gate scores per KV head, to the budget.

    `checkpoint`: a `train=kvzip_surrogate` checkpoint, the authors' gate file (`q{G}_dim16_sink16.pt`),
    `random` (the untrained initialization) or null: the published `Jang-Hyun/Fast-KVzip`
    `<model>/q{G}_dim{output_dim}_sink{sink}.pt` for the model (downloaded, or from the hub cache), refused without
    one. Defaults are the paper's and kvpress's. Deviations: the budget is per KV head and per layer as the engine
    sets it (the paper and kvpress rank across layers: kvexp's `budget.*` allocations do that part); the gates run
    in fp32; the authors' training script adds the bias b twice to the self logit (their inference code and
    kvpress once): kvexp trains and runs with it once.
    """

    name = "fastkvzip"
    description = "a per-layer sink-attention gate on each token's hidden state, trained on KVzip's scores (Kim et al. 2026)"
    row_budgets = True  # its scores never read the budget
    state_names = ("fastkvzip",)
    checkpoint_format = CHECKPOINT_FORMAT
    checkpoint_file = "fastkvzip.pt"
    shape_names = "(layers, hidden size, KV heads, query group)"
    output_dim: int = 16
    sink: int = 16
    n_sink: int = 4
    window_ratio: float = 0.02
    window_size: int = 4096

    def validate(self, budget: int | None) -> None:
        if self.output_dim < 1:
            raise ValueError(f"method.output_dim must be >= 1, got {self.output_dim}")
        if self.sink < 1:
            raise ValueError(f"method.sink must be >= 1 (learned sink keys per head), got {self.sink}")
        check_window("n_sink", self.n_sink, budget)
        if not 0.0 <= self.window_ratio < 1.0:
            raise ValueError(f"method.window_ratio must be in [0, 1), got {self.window_ratio}")
        check_window("window_size", self.window_size)
        super().validate(budget)

    def shape(self, config: Any) -> tuple[int, ...]:
        layers, hidden, kv_heads = super().shape(config)
        return (layers, hidden, kv_heads, config.num_attention_heads // kv_heads)

    def architecture(self, surrogate: nn.Module) -> dict[str, Any]:
        return {"output_dim": surrogate.output_dim, "sink": surrogate.sink}

    def build(self, shape: tuple[int, ...]) -> FastKVzipGates:
        return FastKVzipGates(*shape, self.output_dim, self.sink)

    def from_checkpoint(self, config: dict[str, Any], state: dict[str, torch.Tensor]) -> FastKVzipGates:
        layers = 1 + max(int(key.split(".")[1]) for key in state)
        prefix = [f"layers.{i}." for i in range(layers)]
        return gates_from_states(
            [{k[len(p) :]: v for k, v in state.items() if k.startswith(p)} for p in prefix]
        )

    def load_published(self, path: Path) -> FastKVzipGates | None:
        return load_gate_file(path)

    def published(self, model: PreTrainedModel) -> tuple[FastKVzipGates, str] | None:
        groups = self.shape(model.config)[3]
        name = f"{model_name(model).lower()}/q{groups}_dim{self.output_dim}_sink{self.sink}.pt"
        found = published_file(PUBLISHED_REPO, name)
        gates = None if found is None else load_gate_file(found)
        return None if gates is None else (gates, f"{PUBLISHED_REPO}/{name}")

    def window(self, positions: torch.Tensor) -> torch.Tensor:
        """The recent tokens each row protects [B, Hkv, 1]: window_ratio of the tokens it has seen (its newest
        position + 1), window_size from LONG_CONTEXT tokens on."""
        seen = positions.amax(dim=-1, keepdim=True) + 1
        short = (seen.double() * self.window_ratio).floor().long()
        return torch.where(seen >= LONG_CONTEXT, torch.full_like(seen, self.window_size), short)

    def score(self, layer: CompressedLayer) -> torch.Tensor:
        scores = protect_sinks(super().score(layer), layer.positions, self.n_sink)
        return protect_recent(scores, layer.positions, self.window(layer.positions))
