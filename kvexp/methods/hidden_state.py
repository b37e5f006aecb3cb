"""Methods whose score is a learned function of the entry's own attention-input hidden state (KVzap, Fast KVzip;
the hidden-state path of `learned`): the machinery they share.

* Where the hidden state is: `attention_modules` (layer index -> the module the attention function is handed) and
  `attention_input` (its input: the attention-input hidden state h_j, post input_layernorm / ln_1).
* `hook_attention_inputs`: forward pre-hooks handing each step's h [B, q, d] at every layer of a kvexp cache to the
  method (`capture(layer, hidden)`), removed when the method goes; `recording_attention_inputs`: the same for a
  trainer's forward (any cache).
* Checkpoints: `save_checkpoint` / `read_checkpoint`, a torch file {format, config, meta, state_dict} read with
  `weights_only`; `published_file`: a file of the authors' published weights from the Hugging Face hub (its local
  cache when the hub cannot be reached).
* `HiddenStateScorer`: the base of a method whose per-slot score is its surrogate applied once to h_j when the entry
  is written (the step's `observe`, before any compression), kept as per-slot state; `score` returns it. The score
  of a row's entry reads only that row's token, so a left-padded batch keeps what each row keeps alone.
"""

from __future__ import annotations

import contextlib
import re
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar
from weakref import WeakSet

import torch
from torch import nn

from kvexp.data import hub_reachable, hub_token
from kvexp.engine.cache import KVCache
from kvexp.methods.base import Method
from kvexp.models import save_torch

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from kvexp.engine.cache import CompressedLayer

# `method.checkpoint: random`: the surrogate at its seeded initialization (no training): the point a trainer starts
# from and its `metrics_untrained`, a control, and what the masking-oracle tests run.
RANDOM = "random"
RANDOM_SEED = 0
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def attention_modules(model: nn.Module) -> dict[int, nn.Module]:
    """layer_idx -> the module the attention function is handed (the innermost module with that layer_idx):
    its input is the attention-input hidden state (post input_layernorm / ln_1)."""
    found = {}
    for module in model.modules():
        idx = getattr(module, "layer_idx", None)
        if isinstance(idx, int) and not any(
            getattr(sub, "layer_idx", None) == idx for sub in module.modules() if sub is not module
        ):
            found[idx] = module
    return found


def attention_input(args: tuple, kwargs: dict) -> torch.Tensor:
    """The hidden states [B, q, hidden] an attention module's forward pre-hook is given."""
    return args[0] if args else kwargs["hidden_states"]


def runs(owner: Method, method: Method) -> bool:
    """Whether `owner` is `method` or runs it inside (a wrapper's scorer, a chain's stage, at any depth)."""
    return owner is method or any(runs(part, method) for part in owner.parts())


def _capture(
    method: weakref.ref, idx: int, module: nn.Module, args: tuple, kwargs: dict | None = None
) -> None:
    """Forward pre-hook of attention module `idx`: hand the step's hidden states to the method, for a kvexp cache.
    Without `kwargs`: torch calls a hook whose removal (the method collected, mid-forward) it saw half-done: the
    method is gone, nothing to do."""
    if kwargs is None:
        return
    owner, cache = method(), kwargs.get("past_key_values", kwargs.get("layer_past"))
    if owner is not None and isinstance(cache, KVCache):
        owner.capture(cache.layers[idx], attention_input(args, kwargs))


def _remove_hooks(handles: list) -> None:
    for handle in handles:
        handle.remove()


def hook_attention_inputs(model: PreTrainedModel, method: Method, hooked: WeakSet) -> None:
    """Hook every attention module of `model` (once per model: `hooked` holds the models done) so that each step
    through a kvexp cache calls `method.capture(layer, hidden [B, q, d])` before the layer's attention. The hooks
    hold the method weakly and go when it goes."""
    if model in hooked:
        return
    modules = attention_modules(model)
    if sorted(modules) != list(range(model.config.num_hidden_layers)):
        raise ValueError(f"method={method.name} cannot find the attention modules of {type(model).__name__}")
    me = weakref.ref(method)
    handles = [
        module.register_forward_pre_hook(partial(_capture, me, idx), with_kwargs=True)
        for idx, module in modules.items()
    ]
    weakref.finalize(method, _remove_hooks, handles)
    hooked.add(model)


@contextlib.contextmanager
def recording_attention_inputs(model: nn.Module) -> Iterator[dict[int, torch.Tensor]]:
    """Inside: every forward records each layer's attention-input hidden states [B, q, d] (the last forward's
    stay) in the dict yielded, layer index -> tensor."""
    captured: dict[int, torch.Tensor] = {}

    def record(idx: int, module: nn.Module, args: tuple, kwargs: dict) -> None:
        captured[idx] = attention_input(args, kwargs).detach()

    handles = [
        module.register_forward_pre_hook(partial(record, idx), with_kwargs=True)
        for idx, module in attention_modules(model).items()
    ]
    try:
        yield captured
    finally:
        _remove_hooks(handles)


def save_checkpoint(
    path: Path, fmt: str, config: dict[str, Any], meta: dict[str, Any], module: nn.Module
) -> None:
    """A checkpoint: {format, config (the module's shape), meta (how it was trained), state_dict}; written atomically
    (a run killed while saving leaves the previous checkpoint, not a torn one)."""
    state = {k: v.detach().cpu() for k, v in module.state_dict().items()}
    save_torch(path, {"format": fmt, "config": config, "meta": meta, "state_dict": state})


def read_checkpoint(
    path: str | Path, fmt: str, file: str, trainer: str, option: str = "method.checkpoint"
) -> dict:
    """The {format, config, meta, state_dict} of a `save_checkpoint` file (or of the directory holding `file`),
    read with weights_only; a one-line ValueError naming `option` and `train=<trainer>` otherwise."""
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / file
    if not path.is_file():
        raise ValueError(f"{option}={str(path)!r}: no such file (a {file} from train={trainer})")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except (
        Exception
    ) as err:  # pickle, zip and OS errors alike; their text may advise unsafe loading: not shown
        raise ValueError(
            f"{option}={str(path)!r} cannot be read ({type(err).__name__}): it is corrupt or truncated, or not a "
            f"{fmt} checkpoint; train one with train={trainer}"
        ) from None
    if not isinstance(blob, dict) or blob.get("format") != fmt:
        raise ValueError(f"{option}={str(path)!r} is not a {fmt} checkpoint")
    return blob


def published_file(repo_id: str, filename: str) -> Path | None:
    """`filename` of the hub repository `repo_id` (downloaded, or from the local hub cache when the hub cannot be
    reached); None when neither has it."""
    from huggingface_hub import hf_hub_download

    try:
        local = hf_hub_download(repo_id, filename, token=hub_token(), local_files_only=not hub_reachable())
    except (OSError, ValueError):  # not found, offline, gated: every hub error is one of them
        return None
    return Path(local)


def model_name(model: PreTrainedModel) -> str:
    """The last part of the hub id or directory the model came from ("Qwen3-8B"), as the published weights name it."""
    return str(model.config._name_or_path or "").rstrip("/").split("/")[-1]


@dataclass
class HiddenStateScorer(Method):
    """Base: per-slot score = the surrogate of the entry's layer applied to its attention-input hidden state, set
    once when the entry is written; `score` returns it (see the module docstring).

    `checkpoint`: a kvexp checkpoint (`train=kvzip_surrogate`; its file or directory), a file or directory of the
    authors' published format, a hub id of one, `random` (the seeded initialization, untrained) or null (the
    authors' published weights for the model, downloaded or from the hub cache; refused when there are none).
    A subclass gives the surrogate: `build` (a fresh one for a model shape), `from_checkpoint` (kvexp's format),
    `load_published` (the authors' format at a local path), `published` (their hub files for a model),
    `architecture` (its options as a checkpoint records them) and `shape` (what of the model it is sized by)."""

    observes: ClassVar[bool] = True
    checkpoint_format: ClassVar[str] = ""
    checkpoint_file: ClassVar[str] = ""
    shape_names: ClassVar[str] = "(layers, hidden size, KV heads)"
    checkpoint: str | None = None
    _hooked: WeakSet = field(default_factory=WeakSet, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.surrogate: nn.Module | None = None
        self.meta: dict[str, Any] = {}
        self._built_for: tuple | None = (
            None  # the model (shape, name) a random or published surrogate was made for
        )
        if self.checkpoint is not None and self.checkpoint != RANDOM:
            self.surrogate, self.meta = self.load(self.checkpoint)

    # -- what a subclass gives ---------------------------------------------------------------------------------
    def build(self, shape: tuple[int, ...]) -> nn.Module:
        raise NotImplementedError

    def from_checkpoint(self, config: dict[str, Any], state: dict[str, torch.Tensor]) -> nn.Module:
        raise NotImplementedError

    def load_published(self, path: Path) -> nn.Module | None:
        """The authors' published format at a local path; None when `path` is not in it."""
        raise NotImplementedError

    def published(self, model: PreTrainedModel) -> tuple[nn.Module, str] | None:
        """The authors' published surrogate for `model` and where it came from; None when there is none."""
        raise NotImplementedError

    def published_files(self, repo_id: str) -> list[str] | None:
        """The files a published hub repository that `checkpoint` names holds (downloaded into one folder); None
        when a checkpoint cannot be a hub id."""
        return None

    def architecture(self, surrogate: nn.Module) -> dict[str, Any]:
        """The method options a surrogate fixes (model_type, hidden_size, ...), as they must be set to load it."""
        raise NotImplementedError

    def shape(self, config: Any) -> tuple[int, ...]:
        """What a surrogate is sized by, from a model config (`shape_names`)."""
        kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        return (config.num_hidden_layers, config.hidden_size, kv_heads)

    def initialize(self, shape: tuple[int, ...]) -> nn.Module:
        """A fresh surrogate for a model of `shape` at the seeded initialization (`checkpoint: random`, where a
        trainer starts), the global random state left as it was."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_SEED)
            return self.build(shape)

    # -- loading -------------------------------------------------------------------------------------------------
    def load(self, checkpoint: str) -> tuple[nn.Module, dict[str, Any]]:
        """The surrogate `checkpoint` names (kvexp's format, the authors' local format, or a hub id of theirs)."""
        path = Path(checkpoint).expanduser()
        names = self.published_files(checkpoint)
        if not path.exists() and names is not None and HUB_ID.match(checkpoint):
            files = [published_file(checkpoint, name) for name in names]
            if any(f is None for f in files):
                raise ValueError(
                    f"method.checkpoint={checkpoint!r} is neither a local path nor a hub repository that can be had "
                    f"(its files {names}: the hub is unreachable or lacks them, and so does its local cache)"
                )
            path = files[0] if len(files) == 1 else files[0].parent
        if path.exists() and not (path.is_dir() and (path / self.checkpoint_file).is_file()):
            published = self.load_published(path)
            if published is not None:
                return published, {"source": str(checkpoint)}
        blob = read_checkpoint(path, self.checkpoint_format, self.checkpoint_file, "kvzip_surrogate")
        return self.from_checkpoint(blob["config"], blob["state_dict"]), dict(blob.get("meta", {}))

    def validate(self, budget: int | None) -> None:
        if self.surrogate is None:
            return
        held = self.architecture(self.surrogate)
        wanted = {key: getattr(self, key) for key in held}
        if held != wanted:
            settings = " ".join(f"method.{k}={v}" for k, v in held.items())
            raise ValueError(
                f"method.checkpoint={self.checkpoint!r} holds a surrogate with {held}, but the method is set to "
                f"{wanted}; set {settings}"
            )

    def refusal(self, model: PreTrainedModel) -> str:
        """The one line refusing a model without a checkpoint."""
        return (
            f"method={self.name} needs method.checkpoint: no published {self.name} weights for "
            f"{model_name(model) or type(model).__name__!r} are available (the hub is unreachable or has none); train "
            f"one with `python -m kvexp train=kvzip_surrogate method={self.name} model=<this model>` (then "
            f"method.checkpoint=<run dir>/checkpoint), or method.checkpoint=random for its untrained initialization"
        )

    def prepare(self, model: PreTrainedModel) -> None:
        shape = self.shape(model.config)
        key = (shape, model_name(model))
        if self.checkpoint is None and self._built_for != key:
            found = self.published(model) if model_name(model) else None
            if found is None:
                raise ValueError(self.refusal(model))
            self.surrogate, source = found
            self.meta = {"source": source}
            self.validate(None)
            self._built_for = key
        elif self.checkpoint == RANDOM and self._built_for != key:
            self.surrogate = self.initialize(shape)
            self._built_for = key
        held = self.surrogate.shape
        if held != shape:
            raise ValueError(
                f"method.checkpoint={self.checkpoint!r} scores {self.shape_names} = {held}, but "
                f"{type(model).__name__} has {shape}; train it on this model (train=kvzip_surrogate)"
            )
        self.surrogate.to(device=model.device, dtype=torch.float32).eval()
        hook_attention_inputs(model, self, self._hooked)

    # -- the per-slot score ---------------------------------------------------------------------------------------
    def capture(self, layer: CompressedLayer, hidden: torch.Tensor) -> None:
        """Attention pre-hook's work: keep this step's attention-input hidden states [B, q, d] for `observe`, at a
        compressed layer whose evictor runs this method (not during probes: nothing is written for good then)."""
        if layer.budget is None or layer.cache.probing or not runs(layer.evictor, self):
            return
        layer.scratch(self)["hidden"] = hidden

    def predict(self, layer_idx: int, hidden: torch.Tensor) -> torch.Tensor:
        """The surrogate of layer `layer_idx` on hidden states [..., d]: scores [..., Hkv] (fp32)."""
        with torch.no_grad():
            return self.surrogate(layer_idx, hidden.float())

    def observe(self, layer: CompressedLayer, query: torch.Tensor) -> None:
        hidden = layer.scratch(self).pop("hidden", None)
        q = layer.new_tokens
        if hidden is None or hidden.shape[1] != q:
            raise RuntimeError(
                f"method={self.name}: layer {layer.layer_idx} got no hidden states for its {q} new tokens (the model "
                "must call its attention modules with past_key_values; build the cache with make_cache)"
            )
        layer.state(self.state_names[0])[:, :, -q:] = self.predict(layer.layer_idx, hidden).transpose(1, 2)

    def score(self, layer: CompressedLayer) -> torch.Tensor:
        return layer.state(self.state_names[0])


class PerLayer(nn.Module):
    """One module per layer (`layers[i]`), applied by layer index; `shape` is what the subclass is sized by.

    Equal when their parameters are (two methods prepared alike hold equal surrogates: a method keeps no state of a
    run); hashed by identity, as every module."""

    shape: tuple[int, ...]

    def __init__(self, layers: list[nn.Module]):
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        return self.layers[layer](hidden)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PerLayer) or type(other) is not type(self) or other.shape != self.shape:
            return False
        mine, theirs = self.state_dict(), other.state_dict()
        return mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k].to(mine[k])) for k in mine)

    __hash__ = nn.Module.__hash__
