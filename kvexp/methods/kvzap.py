from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from kvexp.methods.base import register
from kvexp.methods.hidden_state import HiddenStateScorer, PerLayer, model_name, published_file
from kvexp.models import check_safetensors

if TYPE_CHECKING:
    from transformers import PreTrainedModel

MODEL_TYPES = ("linear", "mlp")
CHECKPOINT_FORMAT = "kvexp.kvzap/1"
PUBLISHED_FILES = ("config.json", "model.safetensors")  # kvpress's KVzapModel.save_pretrained


class KVzapSurrogate(PerLayer):
    """Per layer, hidden state h [..., d] -> one score per KV head [..., Hkv]: a linear map (`hidden_size` None) or
    Linear(d, M) -> GELU -> Linear(M, Hkv). Parameter names are kvpress's KVzapModel's (`layers.{i}.weight`, or
    `layers.{i}.0.*` and `layers.{i}.2.*`), so the published safetensors load as they are."""

    def __init__(self, num_layers: int, input_dim: int, kv_heads: int, hidden_size: int | None):
        def one() -> nn.Module:
            if hidden_size is None:
                return nn.Linear(input_dim, kv_heads)
            return nn.Sequential(
                nn.Linear(input_dim, hidden_size), nn.GELU(), nn.Linear(hidden_size, kv_heads)
            )

        super().__init__([one() for _ in range(num_layers)])
        self.shape = (num_layers, input_dim, kv_heads)
        self.hidden_size = hidden_size

    @property
    def model_type(self) -> str:
        return "linear" if self.hidden_size is None else "mlp"


def surrogate_from_state(state: dict[str, torch.Tensor]) -> KVzapSurrogate:
    """A surrogate sized by its own tensors (kvpress's KVzapModel layout)."""
    layers = 1 + max(int(key.split(".")[1]) for key in state)
    mlp = "layers.0.0.weight" in state
    first = state["layers.0.0.weight" if mlp else "layers.0.weight"]
    last = state["layers.0.2.weight" if mlp else "layers.0.weight"]
    surrogate = KVzapSurrogate(layers, first.shape[1], last.shape[0], first.shape[0] if mlp else None)
    surrogate.load_state_dict({k: v.float() for k, v in state.items()})
    return surrogate


def load_kvzap_model(path: Path) -> KVzapSurrogate | None:
    """kvpress's KVzapModel as `save_pretrained` writes it (the `nvidia/KVzap-{linear|mlp}-<model>` repositories):
    a directory (or its model.safetensors) with config.json {input_dim, output_dim, hidden_dim, n_modules} and
    model.safetensors; None when `path` is not one."""
    folder = path if path.is_dir() else path.parent
    config, weights = folder / PUBLISHED_FILES[0], folder / PUBLISHED_FILES[1]
    if not (config.is_file() and weights.is_file()) or (path.is_file() and path != weights):
        return None
    from safetensors.torch import load_file

    try:
        meta = json.loads(config.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"method.checkpoint: {config} is not a readable KVzap config ({err})") from None
    if meta.get("model_type") not in (None, "kvzap"):
        return None
    check_safetensors(weights, "method.checkpoint")
    surrogate = surrogate_from_state(load_file(str(weights)))
    expected = (meta.get("n_modules"), meta.get("input_dim"), meta.get("output_dim"))
    if surrogate.shape != expected or surrogate.hidden_size != meta.get("hidden_dim"):
        raise ValueError(
            f"method.checkpoint: {weights} does not match its config.json (n_modules, input_dim, output_dim, "
            f"hidden_dim) = {(*expected, meta.get('hidden_dim'))}"
        )
    return surrogate


@register
@dataclass
class KVzap(HiddenStateScorer):
    """KVzap (Jégou, Jeblick, NVIDIA, arXiv 2601.07891, "KVzap: Fast, Adaptive, and Faithful KV Cache Pruning";
    kvpress `KVzapPress`, the `nvidia/KVzap-*` weights): a surrogate of KVzip's importance read off each token's
    own hidden state, usable in prefill and decoding alike.

    Per layer, a small model maps the attention-input hidden state h_j (post input_layernorm) of token j to one
    score per KV head: `model_type: linear` (h W + b) or `mlp` (Linear(d, hidden_size) -> GELU -> Linear(.,
    Hkv)), trained to regress log KVzip scores (`train=kvzip_surrogate`). The score is computed once, when the
    entry is written, and kept as per-slot state; a compression keeps the highest predicted scores per KV head
    (top-k to the budget). The paper prunes by threshold instead (scores below tau after a 128-token sliding
    window, DMS's inference): `method=dms method.scorer=kvzap method.threshold=<log score>
    method.window_size=128`, the budget then a cap.

    `checkpoint`: a `train=kvzip_surrogate` checkpoint, kvpress's KVzapModel (a folder with config.json and
    model.safetensors, or its hub id `nvidia/KVzap-mlp-Qwen3-8B`), `random` (the untrained initialization) or
    null: the published `nvidia/KVzap-{model_type}-<model>` for the model (downloaded, or from the hub cache),
    refused without one. Defaults are the paper's (the MLP, 512 wide: kvpress's training script); as the paper,
    kvexp's trainer regresses log KVzip+ (`train.oracle`). Deviations: no sink or recent window is protected by the
    method itself (DMS's window does it); the surrogate runs in fp32.
    """

    name = "kvzap"
    description = "a per-layer linear/MLP surrogate of KVzip's score read off each token's hidden state (Jégou, Jeblick 2026)"
    row_budgets = True  # its scores never read the budget
    state_names = ("kvzap",)
    checkpoint_format = CHECKPOINT_FORMAT
    checkpoint_file = "kvzap.pt"
    model_type: str = "mlp"
    hidden_size: int = 512

    def validate(self, budget: int | None) -> None:
        if self.model_type not in MODEL_TYPES:
            raise ValueError(
                f"method.model_type must be one of {', '.join(MODEL_TYPES)}, got {self.model_type!r}"
            )
        if self.hidden_size < 1:
            raise ValueError(f"method.hidden_size must be >= 1 (the MLP's width), got {self.hidden_size}")
        super().validate(budget)

    def architecture(self, surrogate: nn.Module) -> dict[str, Any]:
        held = {"model_type": surrogate.model_type}
        return held if surrogate.hidden_size is None else {**held, "hidden_size": surrogate.hidden_size}

    def build(self, shape: tuple[int, ...]) -> KVzapSurrogate:
        return KVzapSurrogate(*shape, self.hidden_size if self.model_type == "mlp" else None)

    def from_checkpoint(self, config: dict[str, Any], state: dict[str, torch.Tensor]) -> KVzapSurrogate:
        return surrogate_from_state(state)

    def load_published(self, path: Path) -> KVzapSurrogate | None:
        return load_kvzap_model(path)

    def published_files(self, repo_id: str) -> list[str]:
        return list(PUBLISHED_FILES)

    def published(self, model: PreTrainedModel) -> tuple[KVzapSurrogate, str] | None:
        repo = f"nvidia/KVzap-{self.model_type}-{model_name(model)}"
        files = [published_file(repo, name) for name in PUBLISHED_FILES]
        if any(f is None for f in files):
            return None
        return load_kvzap_model(files[0].parent), repo
