"""The method protocol and the registry.

A method is a small dataclass: hyperparameters as typed fields with the reference defaults, and `score` giving
`[B, Hkv, L_phys]` (higher = keep), or a `Selection` that adds the merge plan. The engine owns everything shared:
when compression runs, top-k per KV head (per-head budgets included), the in-place compaction of
K/V/bias/positions/state, dead-slot handling, re-rotation, budget changes (`allocate` returns them, the cache
applies them) and per-run state (`layer.scratch(self)`, `layer.cache.scratch(self)`): a method object holds no
state of a run. Scores are over physical slots, whose order is not temporal; use `layer.positions` for time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import torch

from kvexp.files import write_atomically
from kvexp.models import check_safetensors

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from kvexp.engine.cache import CompressedLayer, KVCache, Reallocation, Selection

METHODS: dict[str, type[Method]] = {}


@dataclass(frozen=True)
class Probing:
    """What a probing method (`Method.probes`) gets from the generation task for one prompt.

    `ids`: the prompt [1, n] (the context; the whole prompt once fed); `opening`: its leading tokens that open the
    chat template (system prompt, user header), 0 without one; `closing` [1, c]: what closes a user turn and opens
    the answer (the template's; "\\n" without one); `encode`: text -> ids [1, m] without special tokens; `run`: a
    probe forward of ids [1, q] after everything fed (inside `cache.probe()`); `feed`: feeds real prompt ids
    [1, q] and returns the last position's logits [1, V] (fp32); `question` [1, q]: the question the query-aware
    protocol compresses with the context (None under the query-agnostic protocol, where the task feeds it after);
    `chunk_size`: the task's prompt chunk (`eval.prefill_chunk_size`; None: the prompt in one forward), for a method
    that compresses between chunks (FINCH).
    """

    ids: torch.Tensor
    opening: int
    closing: torch.Tensor
    encode: Callable[[str], torch.Tensor]
    run: Callable[[torch.Tensor], None]
    feed: Callable[[torch.Tensor], torch.Tensor] | None = None
    question: torch.Tensor | None = None
    chunk_size: int | None = None


@dataclass
class LayerAllocation:
    """One cache's cross-layer allocation (in its scratch), made in the first forward in which a compressing layer
    is over budget (D2O's variance shares, KVCompose's global ranking)."""

    step: int  # `layer.seen` during that forward
    base: dict[int, int]  # every allocated layer's budget before the allocation
    done: bool = False


def allocation_at_last_layer(owner: Method, layer: CompressedLayer) -> LayerAllocation | Reallocation | None:
    """The flow of a once-per-cache layer allocation decided at the last allocated layer's step, for `allocate`:
    the first forward in which a layer (without per-head budgets) is over budget starts it; each earlier layer of
    that forward is deferred (`Reallocation(defer=True)`, returned as is); at the last one the allocation itself is
    returned, for the owner to decide, mark `done` and return its final `Reallocation`. None: nothing to do."""
    from kvexp.engine.cache import Reallocation

    shared = layer.cache.scratch(owner)
    allocation = shared.get("allocation")
    if allocation is None:
        if layer.head_budgets is not None or not layer.over_budget():
            return None
        base = {
            i: other.budget
            for i, other in enumerate(layer.cache.layers)
            if other.budget is not None and other.head_budgets is None
        }
        allocation = shared["allocation"] = LayerAllocation(step=layer.seen, base=base)
    if allocation.done or allocation.step != layer.seen or layer.layer_idx not in allocation.base:
        return None
    if layer.layer_idx != max(allocation.base):
        return Reallocation(
            defer=True
        )  # compressed at the last layer's step, once every layer's statistics are known
    return allocation


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make a method available by its `name`."""
    METHODS[cls.name] = cls
    return cls


@dataclass
class Method:
    name: ClassVar[str] = ""
    description: ClassVar[str] = ""  # one line, shown by list_methods() and the README
    compresses: ClassVar[bool] = True  # False for `full`: no layer gets a budget
    observes: ClassVar[bool] = False  # True: `observe` runs after every attention step (statistics)
    # True: `observe` reads the newest token's attention row at a decode step (`scoring.newest_attention`); the
    # engine's attention then computes it explicitly and hands it over (`layer.step_attention`).
    reads_step_attention: ClassVar[bool] = False
    state_names: ClassVar[tuple[str, ...]] = ()  # per-slot side state the engine moves with K/V
    merges: ClassVar[bool] = False  # True: `merge` folds the entries a compression drops into kept ones
    allocates: ClassVar[bool] = False  # True: `allocate` runs after every observed step (cross-layer budgets)
    row_scratch: ClassVar[tuple[str, ...]] = ()  # layer scratch tensors [B, ...] that follow beam reorders
    # True: each row of a left-padded batch keeps what it keeps alone (its scores read only its own row, by
    # position, not by physical slot). False: the method couples the rows (one allocation for the batch) or counts
    # tokens by slot index (a storage's windows); `eval.batch_size` > 1 is refused for it.
    batches: ClassVar[bool] = True
    # True: the method reads the budget only through the number of entries each head keeps (`target_size`'s default,
    # `keep_counts()`, `head_counts`' target) or per row (`layer.row_targets`): the rows of one batch may keep
    # different numbers (`row_budgets`: a `keep_ratio` budget of prompts of different lengths), each what it keeps
    # alone. False: rows batch only with rows of the same budget.
    row_budgets: ClassVar[bool] = False
    # True: a layer compresses after every step (every multi-token step under engine.when=prefill), not only once it
    # exceeds its budget; the budget stays the cap. DMS's threshold evicts an entry the step it leaves its window.
    compresses_under_budget: ClassVar[bool] = False
    # True: the method scores with probe forwards run after the prompt (`probe`; KVzip's context reconstruction):
    # the cache holds every entry until they ran (`KVCache.holding`). Only the generation tasks run probes.
    probes: ClassVar[bool] = False
    # True: the compression reads the question (eval.protocol=query_aware).
    needs_question: ClassVar[bool] = False
    # Tokens per prompt block the tasks feed (`block`: eval.prefill_chunk_size under a name); None: the tasks' own.
    prompt_block: ClassVar[int | None] = None

    def parts(self) -> tuple[Method, ...]:
        """The methods this one runs inside it (a wrapper's scorer, a chain's stages): their per-row layer scratch
        (`row_scratch`) follows the batch rows too (beam reorders). None by default."""
        return ()

    def validate(self, budget: int | None) -> None:
        """Raise ValueError for hyperparameters that cannot work with this budget (before any model runs)."""

    def check_model(self, num_layers: int, kv_heads: int) -> None:
        """Raise ValueError for hyperparameters that do not fit the model's shape, read from its config before the
        weights load. Layer indices (the `skip_layers` of the methods that have them) must be layers of it."""
        if isinstance(getattr(self, "skip_layers", None), list):
            skip_layers([None] * num_layers, self.skip_layers, self.name)

    def prepare(self, model: PreTrainedModel) -> None:
        """Learn what the method needs from the model itself (RazorAttention's retrieval-head probe).
        `make_cache` calls it once, after `validate` and before the cache is used, if a layer has a budget."""

    def layer_budget(self, layer_idx: int, budget: int | None) -> int | None:
        """The budget this layer gets from the cache's budget (None = never compress the layer)."""
        return budget if self.compresses else None

    def layer_budgets(self, budgets: list[int | None]) -> list[int | None]:
        """Every layer's budget from the cache's per-layer budgets: `layer_budget` layer by layer, unless a
        method allocates across layers (PyramidKV needs the number of layers)."""
        return [self.layer_budget(i, budget) for i, budget in enumerate(budgets)]

    def target_size(self, layer: CompressedLayer) -> int:
        """How many entries a compression keeps; the budget unless the method says otherwise."""
        return layer.budget

    def head_counts(
        self, layer: CompressedLayer, scores: torch.Tensor, target: int | torch.Tensor
    ) -> torch.Tensor | None:
        """Live entries each KV head keeps at this compression, [B, Hkv] long (None: `target` for every head,
        or the cache's static per-head budgets). The layer becomes as long as the largest count. Under per-row
        budgets (methods with `row_budgets`) `target` is each row's budget, [B, 1]."""
        return None

    def initial_state(self, name: str) -> float:
        return 0.0

    def observe(self, layer: CompressedLayer, query: torch.Tensor) -> None:
        """Record statistics from this step's rotated queries [B, H, q, D] after its attention, before any
        compression (methods with `observes`; `layer.scaling` holds the attention's logit scale)."""

    def prefill(self, cache: KVCache, prompt: Probing) -> torch.Tensor:
        """Feed the prompt and compress it (methods with `probes`; the generation task calls this instead of
        feeding the prompt itself): by default the whole prompt (context, and the question under the query-aware
        protocol) is fed and held, then `probe` runs. Returns the prompt's last logits [1, V]."""
        whole = prompt.ids if prompt.question is None else torch.cat([prompt.ids, prompt.question], dim=1)
        logits = prompt.feed(whole)
        self.probe(cache, replace(prompt, ids=whole, question=None))
        return logits

    def probe(self, cache: KVCache, prompt: Probing) -> None:
        """Run the method's probes over the prompt the cache holds: forwards through `prompt.run` inside
        `cache.probe()`, then `cache.end_probes(...)`, which compresses."""
        raise NotImplementedError(f"method {self.name!r} runs no probes")

    def observe_probe(self, layer: CompressedLayer, query: torch.Tensor) -> None:
        """Record what a probe step's rotated queries [B, H, q, D] show (the probe's own entries are the layer's
        last q slots, dropped right after; `layer.scaling` holds the logit scale)."""

    def allocate(self, layer: CompressedLayer) -> Reallocation | None:
        """Budgets for other layers from per-layer statistics, decided at this layer's step after `observe`
        (methods with `allocates`); the cache applies them (`KVCache.reallocate`). None: no change."""
        return None

    def score(self, layer: CompressedLayer) -> torch.Tensor | Selection:
        """Per-slot scores [B, Hkv, L_phys] (higher = keep), or a `Selection` carrying the merge plan too."""
        raise NotImplementedError(f"method {self.name!r} does not score entries")

    def merge(
        self, layer: CompressedLayer, kept: torch.Tensor, evicted: torch.Tensor, selection: Selection
    ) -> None:
        """Fold the `evicted` entries into `kept` ones ([B, Hkv, L_phys] bool masks over live slots), in place
        on `layer.keys` / `values` / `bias` / `state(...)`, before the engine compacts the kept slots (methods
        with `merges`); `selection` is what this compression's `score` returned. A kept slot that comes to stand
        for n tokens carries bias ln n (docs/design.md#storage)."""

    def statistics(self, layers: list[CompressedLayer]) -> dict[str, Any]:
        """Method-specific figures for the run's summary (cluster quality, merge counts); empty by default."""
        return {}

    # -- trainable compressor parameters (train=distill trainable=compressor) ----------------------------------
    def trainable_parameters(self, model: PreTrainedModel) -> dict[str, torch.nn.Parameter]:
        """The method's own trainable tensors, created at their neutral values on the first call (or from its
        `checkpoint`), by name; empty for a method with none."""
        return {}

    def bias_offset(self, layer: CompressedLayer) -> torch.Tensor | None:
        """A correction [B, Hkv, L_phys] the attention adds to `layer.bias` (None: none). The stored bias stays the
        calibrated one (ln n), so merges keep their exact mass arithmetic; gradients reach the method through it."""
        return None


def save_method_parameters(method: Method, path: str | Path) -> None:
    """Write a method's trainable parameters (safetensors, the method's name in the metadata; atomically)."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous() for k, v in method.trainable_parameters(None).items()}
    write_atomically(
        Path(path), lambda partial: save_file(tensors, partial, metadata={"method": method.name})
    )


def load_method_parameters(name: str, path: str | Path) -> dict[str, torch.Tensor]:
    """Read the parameters `save_method_parameters` wrote for method `name` (method.checkpoint)."""
    from safetensors import safe_open

    if not Path(path).is_file():
        raise ValueError(f"method.checkpoint={str(path)!r} does not exist or is not a file")
    check_safetensors(Path(path), "method.checkpoint")
    with safe_open(str(path), framework="pt") as f:
        saved = (f.metadata() or {}).get("method")
        if saved != name:
            raise ValueError(
                f"method.checkpoint={str(path)!r} holds parameters of method {saved!r}, not {name!r}"
            )
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)


class TrainableMergedBias:
    """Mixin for merging methods: a learned per-layer, per-KV-head logit correction `merged_bias` [L, Hkv] added
    to the attention bias of the merged entries (those flagged by the per-slot state `merged_state`), on top of the
    calibrated ln n. Neutral value 0: without a `checkpoint` and before training nothing is added at all (the
    untrained method is bit-identical to one without the mixin). The class declares `checkpoint: str | None` and
    `_trained: dict` fields and calls `_load_checkpoint()` in `__post_init__`."""

    merged_state: ClassVar[str] = ""

    def _load_checkpoint(self) -> None:
        if self.checkpoint is not None:
            self._trained = {
                k: torch.nn.Parameter(v.float())
                for k, v in load_method_parameters(self.name, self.checkpoint).items()
            }

    def trainable_parameters(self, model: PreTrainedModel | None) -> dict[str, torch.nn.Parameter]:
        if "merged_bias" not in self._trained:
            if model is None:
                return {}
            config = model.config
            kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
            shape = (config.num_hidden_layers, kv_heads)
            self._trained["merged_bias"] = torch.nn.Parameter(torch.zeros(shape, device=model.device))
        return dict(self._trained)

    def bias_offset(self, layer: CompressedLayer) -> torch.Tensor | None:
        delta = self._trained.get("merged_bias")
        if delta is None:
            return None
        merged = layer.state(self.merged_state) > 0  # [B, Hkv, L_phys]
        return delta[layer.layer_idx].to(layer.device)[None, :, None] * merged


_MASK32 = 0xFFFFFFFF
T = TypeVar("T", int, torch.Tensor)


def _mix32(x: T) -> T:
    """A 32-bit integer hash (Wellons' lowbias32) of a Python int or, elementwise, an int64 tensor holding [0, 2^32)
    (its products wrap; the mask keeps their low 32 bits, so it is exact on every device)."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)


def slot_uniforms(layer: CompressedLayer, seed: int) -> torch.Tensor:
    """[B, Hkv, L] draws, uniform in [0, 1) with 24 bits, one per slot: a hash of (seed, layer, KV head, the slot's
    position, the tokens its row has seen). Fresh at every compression (a row has seen more tokens by the next
    one), the same for a row whatever shares its batch (padding, other rows, beams) and on every device, and
    seeded, so a run repeats exactly."""
    positions = layer.positions  # [B, Hkv, L]
    base = _mix32(_mix32(seed & _MASK32) ^ layer.layer_idx)
    x = _mix32(base ^ torch.arange(positions.shape[1], device=positions.device))[None, :, None]
    x = _mix32(x ^ (positions & _MASK32))
    x = _mix32(x ^ (layer.rows_seen() & _MASK32)[:, None, None])
    return (x >> 8).float() / 2**24


def check_window(
    option: str,
    window: int | None,
    budget: int | None = None,
    *,
    minimum: int = 0,
    up_to_budget: bool = False,
    nullable: bool = False,
    null_means: str = "",
) -> None:
    """The one check of a window option `method.<option>` (a count of tokens: an observation window, a protected
    recent window), raising a one-line ValueError that names it and the allowed values: `window` >= `minimum`
    (None allowed with `nullable`, `null_means` saying what it means) and, given a `budget`, smaller than the budget
    (at most the budget with `up_to_budget`). No `budget`: no upper bound (a method whose window is not held in
    the budget, or validated without one)."""
    if window is None:
        if not nullable:
            raise ValueError(f"method.{option} must be an integer >= {minimum}, got null")
        return
    if window < minimum:
        null = f" or null ({null_means})" if nullable and null_means else " or null" if nullable else ""
        raise ValueError(f"method.{option} must be >= {minimum}{null}, got {window}")
    if budget is None:
        return
    if up_to_budget and window > budget:
        raise ValueError(f"method.{option} must be in [{minimum}, budget={budget}], got {window}")
    if not up_to_budget and window >= budget:
        raise ValueError(f"method.{option} ({window}) must be smaller than the budget ({budget})")


def skip_layers(budgets: list[int | None], skip: list[int], name: str) -> list[int | None]:
    """Per-layer budgets with the `skip` layers left uncompressed (None); negative indices count from the end.

    KNorm skips layers 0 and 1 in its paper; D2O and KVMerger leave layers 0, 1 and the last whole, where attention
    is nearly uniform (their papers' choice)."""
    n = len(budgets)
    outside = [i for i in skip if not -n <= i < n]
    if outside:
        raise ValueError(
            f"method={name}: method.skip_layers {outside} are not layers of this model ({n} layers: 0..{n - 1}, "
            f"or -{n}..-1 from the end)"
        )
    skipped = {i % n for i in skip}
    return [None if i in skipped else budget for i, budget in enumerate(budgets)]


def list_methods() -> dict[str, str]:
    """Every registered method with its one-line description."""
    return {name: cls.description for name, cls in sorted(METHODS.items())}


def build_method(name: str, **params) -> Method:
    """Instantiate a method by name; unknown names and parameters fail with what is allowed."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; method must be one of: {', '.join(sorted(METHODS))}")
    cls = METHODS[name]
    allowed = {f.name for f in fields(cls) if f.init}
    unknown = set(params) - allowed
    if unknown:
        raise ValueError(
            f"method {name!r} has no parameter(s) {sorted(unknown)}; its parameters are: {sorted(allowed) or 'none'}"
        )
    _check_types(name, cls, params)
    return cls(**params)


_SCALARS = {"int": int, "float": float, "bool": bool, "str": str}


def _check_types(name: str, cls: type, params: dict[str, Any]) -> None:
    """Each parameter against its annotation (`int`, `float`, `bool`, `str`, optionally `| None`): 2.5 for an
    int, "abc" for a float or 1 for a bool fail here, naming the option, instead of acting as something else
    or crashing later. Other annotations (lists, dicts, method nodes) are the method's own to check."""
    annotations = {
        f.name: f.type.__name__ if isinstance(f.type, type) else str(f.type) for f in fields(cls) if f.init
    }
    for key, value in params.items():
        parts = [t.strip() for t in annotations.get(key, "").split("|")]
        optional = "None" in parts
        kinds = [t for t in parts if t != "None"]
        if len(kinds) != 1 or kinds[0] not in _SCALARS or (value is None and optional):
            continue
        kind = kinds[0]
        ok = {
            "int": isinstance(value, int) and not isinstance(value, bool),
            "float": isinstance(value, int | float) and not isinstance(value, bool),
            "bool": isinstance(value, bool),
            "str": isinstance(value, str),
        }[kind]
        if not ok:
            expected = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string"}[
                kind
            ]
            hint = ""
            if kind == "float" and isinstance(value, str) and value.lower().lstrip("+-") == ".inf":
                hint = "; YAML's .inf is written inf / -inf on the command line"
            raise ValueError(
                f"method.{key}={value!r} must be {expected}{' or null' if optional else ''} (method {name!r}){hint}"
            )
