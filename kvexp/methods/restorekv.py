"""RestoreKV (docs/methods.md#restorekv): KVzip, plus a restore cache a few learned tokens write over the full cache.

The learned part (`RestoreAdapter`) is the restore-token embeddings [n, d] and a LoRA adapter (pairs A [r, in],
B [out, r] on the model's linear projections). It is applied without touching the model: during the one restore
pass each adapted projection gets a forward hook adding `scaling * B(A(x))` to its output (computed in fp32), and
the hooks are removed right after it, so every other forward of the model runs its own weights.

Checkpoint layout (the authors' published one, `higokri/RestoreKV-<model>` on the Hugging Face hub, and what
`train=restorekv` writes): a directory holding `adapter_config.json` and `adapter_model.safetensors` (a PEFT LoRA
adapter: keys `base_model.model.<module path>.lora_A.weight` / `lora_B.weight`, the scaling `lora_alpha / r`, or
`/ sqrt(r)` with `use_rslora`) and `restore_embeddings.safetensors` (the tensor `restore_embeddings` [n, d]).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import re
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from kvexp.methods.base import Probing, register
from kvexp.methods.kvzip import KVzip
from kvexp.models import check_safetensors, model_fingerprint

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from kvexp.engine.cache import KVCache

log = logging.getLogger(__name__)

INIT = "init"  # method.checkpoint=init: the untrained adapter (train=restorekv's starting point)
INIT_SEED = 0
RESTORE_FILE = "restore_embeddings.safetensors"
RESTORE_KEY = "restore_embeddings"
ADAPTER_FILE = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
CHECKPOINT_FILES = (ADAPTER_CONFIG, ADAPTER_FILE, RESTORE_FILE)
# + the model's name: the authors' adapters (KVzip scoring; `_plus`: KVzip+ scoring)
HUB_PREFIX = "higokri/RestoreKV-"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# The published adapters' LoRA: rank 8, alpha 16, on every attention and MLP projection.
LORA_RANK, LORA_ALPHA = 8, 16.0
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_PEFT_PREFIX = "base_model.model."
_PEFT_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<part>[AB])(?:\.[^.]+)?\.weight$")


@dataclass
class RestoreAdapter:
    """RestoreKV's learned tensors (fp32): the restore-token embeddings [n, d], and per adapted linear module (its
    path in the model, e.g. `model.layers.0.self_attn.q_proj`) the LoRA pair A [r, in], B [out, r] and its scale."""

    embeddings: nn.Parameter
    lora: dict[str, tuple[nn.Parameter, nn.Parameter]]
    scaling: dict[str, float]
    config: dict[str, Any] = field(default_factory=dict)  # its adapter_config.json

    @property
    def tokens(self) -> int:
        return self.embeddings.shape[0]

    def parameters(self) -> dict[str, nn.Parameter]:
        """Every learned tensor by name: `restore_embeddings`, `<module>.lora_A`, `<module>.lora_B`."""
        named = {RESTORE_KEY: self.embeddings}
        for path, (a, b) in self.lora.items():
            named[f"{path}.lora_A"], named[f"{path}.lora_B"] = a, b
        return named

    def to_(self, device: torch.device) -> None:
        """Move every tensor to `device` in place (the parameters stay the same objects)."""
        for p in self.parameters().values():
            p.data = p.data.to(device)

    def check_fits(self, model: PreTrainedModel, option: str) -> None:
        """ValueError naming `option` unless the embeddings have the model's width and every LoRA pair sits on a
        linear module of the model with its shape."""
        width = model.get_input_embeddings().embedding_dim
        if self.embeddings.shape[1] != width:
            raise ValueError(
                f"{option}: its restore embeddings are {self.embeddings.shape[1]} wide, the model's {width}: an "
                "adapter of another model"
            )
        for path, (a, b) in self.lora.items():
            try:
                module = model.get_submodule(path)
            except AttributeError:
                raise ValueError(
                    f"{option}: its LoRA adapts {path!r}, which the model does not have"
                ) from None
            if not isinstance(module, nn.Linear) or (a.shape[1], b.shape[0]) != (
                module.in_features,
                module.out_features,
            ):
                raise ValueError(
                    f"{option}: its LoRA on {path!r} maps {a.shape[1]} -> {b.shape[0]} features; the model's module "
                    f"is {module}"
                )

    @contextlib.contextmanager
    def active(self, model: PreTrainedModel) -> Iterator[None]:
        """Inside: every adapted module of `model` adds its LoRA term to its output (forward hooks, removed on exit)."""
        handles = []
        try:
            for path, (a, b) in self.lora.items():
                hook = _lora_hook(a, b, self.scaling[path])
                handles.append(model.get_submodule(path).register_forward_hook(hook))
            yield
        finally:
            for handle in handles:
                handle.remove()


def _lora_hook(a: torch.Tensor, b: torch.Tensor, scaling: float):
    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        delta = F.linear(F.linear(args[0].to(a.dtype), a), b) * scaling
        return output + delta.to(output.dtype)

    return hook


def lora_modules(model: nn.Module, targets: list[str] | tuple[str, ...]) -> dict[str, nn.Linear]:
    """The linear modules of `model` whose last name is one of `targets` (PEFT's matching of short names), by path."""
    return {
        path: module
        for path, module in model.named_modules()
        if isinstance(module, nn.Linear) and path.rsplit(".", 1)[-1] in targets
    }


def init_adapter(
    model: PreTrainedModel,
    tokens: int,
    rank: int = LORA_RANK,
    alpha: float = LORA_ALPHA,
    targets: list[str] | tuple[str, ...] = LORA_TARGETS,
    seed: int = INIT_SEED,
) -> RestoreAdapter:
    """The untrained adapter (`method.checkpoint=init`, where `train=restorekv` starts): the restore embeddings are
    the input embeddings of `tokens` vocabulary tokens drawn with `seed` (prompt tuning's vocabulary
    initialization), each LoRA pair PEFT's default (A Kaiming-uniform, B zero: the adapter adds nothing yet) on the
    linear modules named `targets` that the model has. The global random state is left as it was."""
    generator = torch.Generator().manual_seed(seed)
    table = model.get_input_embeddings()
    ids = torch.randint(0, table.num_embeddings, (tokens,), generator=generator)
    with torch.no_grad():
        embeddings = table(ids.to(table.weight.device)).float().cpu()
    lora, scaling = {}, {}
    for path, module in lora_modules(model, targets).items():
        a = torch.empty(rank, module.in_features)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
        b = torch.zeros(module.out_features, rank)
        lora[path] = (nn.Parameter(a, requires_grad=False), nn.Parameter(b, requires_grad=False))
        scaling[path] = alpha / rank
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "bias": "none",
        "target_modules": sorted({p.rsplit(".", 1)[-1] for p in lora}),
        "use_rslora": False,
        "use_dora": False,
        "fan_in_fan_out": False,
        "base_model_name_or_path": str(model.config._name_or_path or ""),
    }
    adapter = RestoreAdapter(nn.Parameter(embeddings, requires_grad=False), lora, scaling, config)
    adapter.to_(model.device)
    return adapter


def save_adapter(adapter: RestoreAdapter, directory: str | Path) -> Path:
    """Write `adapter` in the published layout (adapter_config.json, adapter_model.safetensors,
    restore_embeddings.safetensors) into `directory`; returns it."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for path, (a, b) in adapter.lora.items():
        tensors[f"{_PEFT_PREFIX}{path}.lora_A.weight"] = a.detach().float().cpu().contiguous()
        tensors[f"{_PEFT_PREFIX}{path}.lora_B.weight"] = b.detach().float().cpu().contiguous()
    save_file(tensors, str(directory / ADAPTER_FILE), metadata={"format": "pt"})
    save_file(
        {RESTORE_KEY: adapter.embeddings.detach().float().cpu().contiguous()}, str(directory / RESTORE_FILE)
    )
    (directory / ADAPTER_CONFIG).write_text(json.dumps(adapter.config, indent=2, sort_keys=True) + "\n")
    return directory


def load_adapter(directory: str | Path, option: str = "method.checkpoint") -> RestoreAdapter:
    """An adapter in the published layout (`save_adapter`'s); a one-line ValueError naming `option` otherwise."""
    from safetensors.torch import load_file

    directory = Path(directory).expanduser()
    missing = [name for name in CHECKPOINT_FILES if not (directory / name).is_file()]
    if not directory.is_dir() or missing:
        raise ValueError(
            f"{option}={str(directory)!r} is not a RestoreKV checkpoint directory (it lacks {missing or 'everything'}; "
            f"expected {list(CHECKPOINT_FILES)}, as train=restorekv writes them)"
        )
    try:
        config = json.loads((directory / ADAPTER_CONFIG).read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"{option}: {directory / ADAPTER_CONFIG} cannot be read as JSON ({err})") from None
    unsupported = [key for key in ("use_dora", "fan_in_fan_out") if config.get(key)]
    unsupported += [key for key in ("alpha_pattern",) if config.get(key)]
    if config.get("peft_type", "LORA") != "LORA" or unsupported:
        raise ValueError(
            f"{option}: {directory / ADAPTER_CONFIG} is a {config.get('peft_type')} adapter with {unsupported}; "
            "RestoreKV loads plain LoRA adapters"
        )
    for name in (ADAPTER_FILE, RESTORE_FILE):
        check_safetensors(directory / name, option)
    restore = load_file(str(directory / RESTORE_FILE))
    embeddings = restore.get(RESTORE_KEY)
    if embeddings is None or embeddings.dim() != 2:
        raise ValueError(f"{option}: {directory / RESTORE_FILE} holds no 2-D tensor {RESTORE_KEY!r}")
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in load_file(str(directory / ADAPTER_FILE)).items():
        match = _PEFT_KEY.match(key.removeprefix(_PEFT_PREFIX))
        if match is None:
            raise ValueError(f"{option}: {directory / ADAPTER_FILE} holds {key!r}, not a LoRA A/B weight")
        pairs.setdefault(match["module"], {})[match["part"]] = tensor
    alpha = float(config.get("lora_alpha", LORA_ALPHA))
    lora, scaling = {}, {}
    for path, pair in sorted(pairs.items()):
        if set(pair) != {"A", "B"} or pair["A"].shape[0] != pair["B"].shape[1]:
            raise ValueError(f"{option}: the LoRA of {path!r} is not a pair A [r, in], B [out, r]")
        rank = pair["A"].shape[0]
        lora[path] = tuple(nn.Parameter(pair[p].float(), requires_grad=False) for p in "AB")
        scaling[path] = alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)
    return RestoreAdapter(nn.Parameter(embeddings.float(), requires_grad=False), lora, scaling, config)


def published_adapter(repo_id: str) -> Path | None:
    """The directory of hub repository `repo_id`'s checkpoint files (downloaded, or from the local hub cache when
    the hub cannot be reached); None when neither has them."""
    from huggingface_hub import snapshot_download

    from kvexp.data import hub_reachable, hub_token

    try:
        path = Path(
            snapshot_download(
                repo_id,
                allow_patterns=list(CHECKPOINT_FILES),
                token=hub_token(),
                local_files_only=not hub_reachable(),
            )
        )
    except (OSError, ValueError):  # not found, offline, gated: every hub error is one of them
        return None
    return path if all((path / name).is_file() for name in CHECKPOINT_FILES) else None


def published_id(model: PreTrainedModel, plus: bool = False) -> str:
    """The hub repository of the authors' adapter for `model` (kvpress's naming: the model's last path part; `plus`:
    the adapter trained with KVzip+ scoring)."""
    return (
        HUB_PREFIX
        + str(model.config._name_or_path or "").rstrip("/").split("/")[-1]
        + ("_plus" if plus else "")
    )


@register
@dataclass
class RestoreKV(KVzip):
    """RestoreKV (arXiv 2608.01247, "budget-matched learned restoration" on KVzip; the authors' adapters
    `higokri/RestoreKV-<model>`; kvpress RestoreKVPress): before KVzip evicts, n learned restore tokens read the
    full cache once and their entries stay, in place of as many evicted ones.

    The prompt is prefilled and held, and KVzip's reconstruction probes score it (`kvzip`, whose parameters these
    are). Then ONE real forward: the n restore-token embeddings (`inputs_embeds`, at the positions after the prompt)
    through the model over the whole held cache, with the method's LoRA adapter active for this pass only. Their
    K/V, n entries per layer and KV head (the restore cache), stay: they score +inf, so no compression evicts them.
    The cache then compresses as KVzip does, the restore entries inside each layer's budget: restore + kept context
    entries = the budget per KV head (budget-matched; kvpress raises the compression ratio by n / context for the
    same count). Under `allocation=global` the best entries of every layer and head are ranked with the restore
    entries in, so each layer's share covers its n restore entries and the context shares the rest, as kvpress's
    global pruning of the context alone. What follows the prompt (the question, the answer) attends to the kept
    entries and the restore cache with the base weights; the model is never modified (the adapter's forward hooks
    exist during the restore pass only). Positions continue after the restore tokens, as in kvpress.

    `checkpoint`: a directory in the published layout (PEFT LoRA `adapter_config.json` + `adapter_model.safetensors`
    and `restore_embeddings.safetensors`; what `train=restorekv` writes), a hub id of one, `init` (the untrained
    adapter: vocabulary-token embeddings and a zero LoRA; train=restorekv's starting point) or null (the authors'
    adapter for the model, `higokri/RestoreKV-<model name>`, downloaded or from the hub cache; refused when there is
    none; with `plus`, KVzip+ scoring, the authors' `_plus` adapter, trained with it).
    `restore_tokens`: n (the paper's 8); a checkpoint must hold as many. Only the embeddings and the LoRA are
    learned (`train=restorekv`: self-distillation from the full-cache model); the base model is frozen.
    One prompt at a time (KVzip's probes and allocation are per prompt).
    """

    name = "restorekv"
    description = "KVzip plus learned restore tokens that read the full cache before eviction (RestoreKV)"
    restore_tokens: int = 8
    checkpoint: str | None = None
    _adapter: RestoreAdapter | None = field(default=None, init=False, repr=False, compare=False)
    _adapter_for: str | None = field(default=None, init=False, repr=False, compare=False)
    _model: Any = field(default=None, init=False, repr=False, compare=False)  # weakref to the prepared model

    def __post_init__(self) -> None:
        if self.checkpoint not in (None, INIT):
            self._adapter = self._load(self.checkpoint)

    @staticmethod
    def _load(checkpoint: str) -> RestoreAdapter:
        """A local checkpoint directory, else a hub repository's."""
        path = Path(checkpoint).expanduser()
        if not path.exists() and HUB_ID.match(checkpoint):
            found = published_adapter(checkpoint)
            if found is None:
                raise ValueError(
                    f"method.checkpoint={checkpoint!r} is neither a local directory nor a hub repository that can be "
                    f"had (files {list(CHECKPOINT_FILES)}; the hub is unreachable and its cache lacks them)"
                )
            path = found
        return load_adapter(path)

    def validate(self, budget: int | None) -> None:
        super().validate(budget)
        if isinstance(self.restore_tokens, bool) or self.restore_tokens < 1:
            raise ValueError(f"method.restore_tokens must be an integer >= 1, got {self.restore_tokens}")
        if budget is not None and budget <= self.restore_tokens:
            raise ValueError(
                f"method.restore_tokens ({self.restore_tokens}) must be smaller than the budget ({budget}): the "
                "restore entries take that many of every layer's budget"
            )
        if self._adapter is not None and self._adapter.tokens != self.restore_tokens:
            raise ValueError(
                f"method.checkpoint={self.checkpoint!r} holds {self._adapter.tokens} restore tokens; set "
                f"method.restore_tokens={self._adapter.tokens}"
            )

    def prepare(self, model: PreTrainedModel) -> None:
        """The adapter for `model` (`init`: built from it; null: the authors' for it), checked against its shape and
        moved to its device; the model is remembered (weakly) for the restore pass."""
        super().prepare(model)  # KVzip+ (`plus`) reads the model's output projections
        self._model = weakref.ref(model)
        key = model_fingerprint(model)
        if self._adapter is None or (self.checkpoint in (None, INIT) and self._adapter_for != key):
            self._adapter = self._adapter_for_model(model)
        if self._adapter_for != key:
            option = f"method.checkpoint={self.checkpoint!r}"
            self._adapter.check_fits(model, option)
            if self._adapter.tokens != self.restore_tokens:
                raise ValueError(
                    f"{option} holds {self._adapter.tokens} restore tokens; set "
                    f"method.restore_tokens={self._adapter.tokens}"
                )
            self._adapter.to_(model.device)
            self._adapter_for = key

    def _adapter_for_model(self, model: PreTrainedModel) -> RestoreAdapter:
        if self.checkpoint == INIT:
            return init_adapter(model, self.restore_tokens)
        repo = published_id(model, self.plus)
        path = published_adapter(repo)
        if path is None:
            raise ValueError(
                f"method=restorekv needs method.checkpoint: no published adapter {repo} can be had (the hub is "
                "unreachable and its cache lacks it, or there is none for this model); train one with "
                "train=restorekv, or set method.checkpoint to a checkpoint directory, a hub id or init (untrained)"
            )
        log.info("restorekv: the authors' adapter %s", repo)
        return load_adapter(path)

    def use_adapter(self, adapter: RestoreAdapter, model: PreTrainedModel) -> None:
        """Run with `adapter` on `model` (the trainer's, whose parameters it optimizes) instead of the checkpoint's."""
        adapter.check_fits(model, "the adapter")
        if adapter.tokens != self.restore_tokens:
            raise ValueError(
                f"the adapter has {adapter.tokens} restore tokens, method.restore_tokens={self.restore_tokens}"
            )
        self._adapter, self._adapter_for, self._model = adapter, model_fingerprint(model), weakref.ref(model)

    @property
    def adapter(self) -> RestoreAdapter | None:
        """The adapter the restore pass uses (after `prepare`)."""
        return self._adapter

    def trainable_parameters(self, model: PreTrainedModel | None) -> dict[str, nn.Parameter]:
        if self._adapter is None and model is not None:
            self.prepare(model)
        return {} if self._adapter is None else self._adapter.parameters()

    def probe(self, cache: KVCache, prompt: Probing) -> None:
        """KVzip's probes (its scores), the restore pass over the held cache, then the compression."""
        self.reconstruct(cache, prompt)
        if any(layer.budget is not None for layer in cache.layers):
            self.restore(cache)
        cache.end_probes(self._global_budgets(cache) if self.allocation == "global" else None)

    def restore(self, cache: KVCache) -> None:
        """The restore pass: the restore embeddings [1, n, d] through the model over `cache` (positions after what it
        has seen), the LoRA active; their entries stay in the cache."""
        model = self._model() if self._model is not None else None
        if model is None or self._adapter is None:
            raise RuntimeError(
                "method=restorekv runs its restore pass with the model make_cache prepared it for"
            )
        embeddings = self._adapter.embeddings.to(model.dtype)[None]
        with self._adapter.active(model):
            model.base_model(inputs_embeds=embeddings, past_key_values=cache, use_cache=True)
