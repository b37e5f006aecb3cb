"""The compressed KV cache: a transformers `Cache` whose layers physically hold fewer entries than tokens seen.

Contracts (proved by the masking-oracle tests in tests/test_engine.py):

* Storage, per layer: keys/values `[B, Hkv, L_phys, D]` in the model's native GQA layout, inside preallocated
  buffers of `capacity` slots of which the first `length` are in use (`layer.keys` / `layer.values` are views
  of those). A decode step writes its entry in place: no concatenation, no copy of the cache.
* `bias [B, Hkv, L_phys]` (fp32) is added to the attention logit of that key for every query of its group:
  0 for a normal key, -inf for a dead slot (a padding token, or per-head budget padding), +ln n for a key that
  stands for n merged tokens.
* `positions [B, Hkv, L_phys]` is the original logical position of each slot (-1 for padding). Physical order
  is NOT temporal order: eviction moves the newest kept entries into the holes instead of shifting the cache,
  so a step costs O(evicted) copies. Methods that need temporal order sort by `positions`.
* `get_seq_length()` is the LOGICAL number of tokens seen, so transformers gives new tokens their true RoPE
  position (`arange + get_seq_length()`), inside `model.generate` too. `physical_length()` is what is stored.
* Compression runs after a step's attention (the attention function triggers it), so the step's own queries
  saw the whole pre-eviction cache. After each step a layer holds at most `budget + slack` entries per KV head
  (the step's new tokens included); a step with q new tokens attends to at most `budget + slack + q` keys.
* Per-head budgets: each KV head keeps its own number of live entries; the layer is as long as its longest
  head and the shorter heads are padded with dead (-inf) slots, recompacted at every compression.
* Per-row budgets: the rows of a batch may each keep their own number of entries (`row_budgets`, [B]: prompts of
  different lengths at one `keep_ratio`), the layer's budget their largest, a row below it padded with dead slots
  the same way. Only for a method whose choice reads the budget through the kept counts alone
  (`Method.row_budgets`); the row budgets follow the rows in batch operations.
* Method side state (`state[name]`, `[B, Hkv, L_phys]`) moves with the same indices as K/V.
* A compression asks the method to `score` the slots; it answers scores or a `Selection` (scores plus the merge
  plan it made while scoring). Merging methods (`method.merges`) see the decision before compaction:
  `method.merge(layer, kept, evicted, selection)` may rewrite the kept slots' K/V/bias/state (never their
  number), then the kept slots stay.
* Budgets change only through the cache: a layer's budget is set when the cache is made; `KVCache.admit(n)` raises
  every budget before a step that must not compress (the query-agnostic protocol's question); a method that
  allocates across layers (`method.allocates`: DynamicKV, D2O) returns a `Reallocation` from `allocate` after
  its `observe`, and `KVCache.reallocate` applies it: new budgets for named layers, which it compresses at once
  if their step in this forward already ran, and the current layer's compression deferred if asked. When the
  method calls its allocation final, the cache checks that the budgets total no more than before.
* Per-run method state (an allocation in progress, a threshold, a merge count, a seeded generator) lives in
  scratch space the cache owns, `layer.scratch(method)` / `cache.scratch(method)`, freed with the cache: two
  caches made from one method object share nothing. A method object holds only its hyperparameters (and what it
  learns from the model itself in `prepare`). Layer scratch entries a method names in `row_scratch` are per batch
  row ([B, ...]) and follow the rows in batch operations (beam reorder, repeat, select) like the slots do.
* Per step, per layer (the attention function calls them in this order): the step's new entries are written
  (`update`), their positions and padding recorded, the attention runs over every slot, then `after_attention`:
  the storage sees the queries, the method observes them, allocates across layers, the layer compresses if it is
  over budget, and a storage encodes (`end_step`).
* Shared attention row: at a decode step without padding, a method that `reads_step_attention` (the
  accumulated-attention family: H2O, TOVA, D2O, ...) gets the newest token's attention row from the step's own
  attention (`layer.step_attention`, [B, Hkv, G, 1, n] fp32, dropped after its observation): the attention function
  computes that step explicitly (softmax in fp32, then the model's dtype, as transformers' eager attention)
  instead of the method recomputing q.K and the softmax.
* Who selects: `layer.method` is the method the cache was made with; `layer.evictor` is the one that scores,
  observes, merges and allocates: the method itself, or for a storage method its `evictor`.
* Storage axis (KIVI, ZACK, ThinK): a storage method (`SupportsStorage`; kvexp.methods.storage.StorageMethod)
  gives each layer a `Storage` and leaves token selection to its `evictor` (`layer.evictor`; without a budget
  nothing is evicted and the storage alone compresses). Such a layer holds no dense K/V: the storage's per-slot encodings
  (`storage.slots`, [B, Hkv, capacity, ...]) move with the slots like bias and state (resize, compaction, batch
  operations); what it holds outside the slots (full-precision windows indexed by token, KIVI's per-group key
  scales) it manages itself, by token index, never by physical slot. Each step decodes the layer once into a
  transient dense copy, `layer.keys` / `layer.values`, which the attention and the evictor's scoring read; after
  the compression `storage.commit` encodes what left the full-precision windows and the copy is dropped (between
  steps `layer.keys` decodes on demand). Peak cost: one layer's dense K/V plus decode temporaries at a time.
  Nothing is written back from the copy, so the evictor may not merge (`merges`, or a live bias other than 0 at
  the end of a step: ValueError / RuntimeError) and `positions=rerotate` is rejected. `slot_bytes`,
  `held_bytes()`, `KVCache.kept_bytes()` and `stats()` count the bytes the storage holds (per-slot encodings of
  the slots in use plus its other tensors); `bytes_full` is what the same tokens take as dense K/V.
* Compiled decode (`CacheOptions.compile`): a step with one new token (no padding) that takes a layer exactly one
  entry over its target, with an evictor that needs nothing beyond the layer (no storage, merge or cross-layer
  allocation), runs its attention, the method's `observe` and `score`, and the one-entry eviction as one
  `torch.compile`d function. It is the eager code traced (the same slot layout and victim, so the same tokens);
  the buffers keep their shapes from step to step, so the graph is reused (static shapes per layout; re-rotation's
  token count is the one number that turns symbolic). The eviction writes with `index_put_`, which the compiler
  keeps in place. A method whose step cannot be traced (data-dependent shapes: AdaKV's per-head counts) decodes
  eagerly, logged once. The compiled steps' evictions are not timed apart from their attention: `fused_steps` /
  `fused_seconds`, not `compressions` / `compress_seconds`, count them.
* Differentiable mode (`CacheOptions.differentiable`, `make_cache(..., differentiable=True)`, for training): the
  forward values are the default mode's, but a layer never mutates a tensor an earlier attention may have saved
  for backward. It copies on write: each step's `update` writes into fresh buffers, a compression clones them
  before a merge or a kill writes into them, and compaction gathers into new tensors (the same slot order as the
  in-place compaction). The method's discrete work (`observe`, `score`) runs under no_grad; `merge` runs with
  autograd, so gradients reach the model through the kept and the merged entries' K/V, and a method's trainable
  parameters through `Method.bias_offset` (added to the bias the attention sees, never stored). Dense K/V only (no
  storage method). Each step costs a copy of the cache: a training mode, not an inference one.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch
from transformers.cache_utils import Cache, DynamicLayer

if TYPE_CHECKING:
    from kvexp.methods.base import Method

# The one documented side channel: transformers does not hand the cache to the attention function, and
# `generate()` rejects unknown kwargs, so `update()` publishes its layer here and the attention function of the
# same module takes it (checking `module.layer_idx`).
ACTIVE_LAYER: ContextVar[CompressedLayer | None] = ContextVar("kvexp_active_layer", default=None)

WHEN_OPTIONS = ("always", "prefill")
POSITION_OPTIONS = ("original", "rerotate")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass(frozen=True)
class Rotary:
    """What re-rotation needs from the model: RoPE inverse frequencies and how many leading dims are rotated."""

    inv_freq: torch.Tensor  # [D_rot / 2]

    @property
    def rotary_dims(self) -> int:
        return 2 * self.inv_freq.numel()


@dataclass
class CacheOptions:
    """Engine settings shared by every layer of a cache."""

    slack: int = (
        0  # compress only once a layer exceeds budget + slack (amortized compression), down to budget
    )
    when: str = (
        "always"  # "always": any step that leaves a layer over budget; "prefill": only multi-token steps
    )
    positions: str = (
        "original"  # "rerotate": kept keys are re-rotated to contiguous positions after compression
    )
    rotary: Rotary | None = None  # the model's RoPE (None without RoPE); required for positions="rerotate"
    differentiable: bool = False  # training: copy-on-write buffers and no-grad scoring (module docstring)
    # A decode step that evicts one entry runs as one torch.compile'd step (module docstring).
    compile: bool = False
    compile_mode: str = "default"  # torch.compile's mode for that step ("reduce-overhead": CUDA graphs)


@dataclass
class Selection:
    """A method's answer at one compression: which entries stay and, for a merging method, the plan it made while
    scoring, which the engine hands to its `merge` with the kept / evicted masks."""

    scores: torch.Tensor  # [B, Hkv, L_phys]: higher = keep; each KV head keeps its top entries
    groups: torch.Tensor | None = None  # [B, Hkv, L_phys] long: the slot each slot merges into (-1: none)
    weights: torch.Tensor | None = None  # [B, Hkv, L_phys]: each slot's weight in that merge


@dataclass
class Reallocation:
    """A method's cross-layer budget decision at one layer's step (`Method.allocate`), applied by
    `KVCache.reallocate`."""

    budgets: dict[int, int] = field(default_factory=dict)  # layer index -> its new budget
    defer: bool = (
        False  # the current layer does not compress in this step; a later reallocation naming it does
    )
    final: bool = False  # the allocation is complete: the budgets must total no more than they did before it


def _take_slots(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """A new per-slot buffer [B, Hkv, m, ...] holding the slots `index` [B, Hkv, m] of `t` [B, Hkv, n, ...]."""
    if t.dim() == 3:
        return t.gather(2, index)
    return t.gather(2, index[..., None].expand(-1, -1, -1, *t.shape[3:]))


def _bytes_per_slot(t: torch.Tensor) -> int:
    """Bytes one slot of a per-slot buffer [B, Hkv, capacity, ...] takes across the batch and the KV heads."""
    return t.element_size() * t.shape[0] * t.shape[1] * math.prod(t.shape[3:])


class Storage:
    """One layer's encoded K/V (the storage axis; contracts in the module docstring).

    A subclass allocates its per-slot encodings in `slots` with capacity 0 (the layer resizes, compacts and
    batch-indexes them) and implements `write`, `decode_keys` and `decode_values`; one that holds more than the slots
    (full-precision windows, group tables) lists it in `others` and keeps it in step in `commit` and `index_batch`.
    Anything outside the slots is addressed by token index (`slots["index"]`, see `write_token_index`), never by
    physical slot, because compaction moves slots.
    """

    def __init__(self) -> None:
        self.slots: dict[str, torch.Tensor] = {}

    def slot(self, layer: CompressedLayer, name: str) -> torch.Tensor:
        """The slots in use of one per-slot buffer: [B, Hkv, length, ...]."""
        return self.slots[name][:, :, : layer.length]

    def write(self, layer: CompressedLayer, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Store this step's new entries [B, Hkv, q, D]: slots [length - q, length), tokens [seen - q, seen)."""
        raise NotImplementedError

    def decode_keys(self, layer: CompressedLayer) -> torch.Tensor:
        """Dense keys [B, Hkv, length, D] as the attention sees them (dead slots: anything finite)."""
        raise NotImplementedError

    def decode_values(self, layer: CompressedLayer) -> torch.Tensor:
        """Dense values [B, Hkv, length, Dv] as the attention sees them (dead slots: anything finite)."""
        raise NotImplementedError

    def observe(self, layer: CompressedLayer, query: torch.Tensor) -> None:
        """This step's rotated queries [B, H, q, D], after its attention and before any compression."""

    def commit(self, layer: CompressedLayer) -> None:
        """After the step's compression: encode what left the full-precision windows."""

    def others(self) -> list[torch.Tensor]:
        """Tensors held outside the slots (counted in the layer's held bytes)."""
        return []

    def index_batch(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Apply a batch operation (beam reorder, repeat, select) to what is held outside the slots."""

    def store(
        self, layer: CompressedLayer, name: str, slot: torch.Tensor, valid: torch.Tensor, new: torch.Tensor
    ) -> None:
        """Write encodings `new` [B, Hkv, m, W] into buffer `name` at the `slot`s [B, Hkv, m] flagged `valid`
        (the others keep what they hold: `token_slots` pads rows with invalid entries)."""
        buffer = self.slot(layer, name)
        wide = slot[..., None].expand(-1, -1, -1, buffer.shape[-1])
        buffer.scatter_(2, wide, torch.where(valid[..., None], new.to(buffer.dtype), buffer.gather(2, wide)))

    def write_token_index(self, layer: CompressedLayer) -> None:
        """Record each new slot's token index (the count of tokens before it, the same in every batch row and head;
        unlike `positions` it ignores left padding) in the int32 per-slot buffer `slots["index"]`."""
        start, q = layer.length - layer.new_tokens, layer.new_tokens
        index = torch.arange(layer.seen - q, layer.seen, dtype=torch.int32, device=layer.device)
        self.slots["index"][:, :, start : layer.length] = index


@runtime_checkable
class SupportsStorage(Protocol):
    """What the engine needs of a storage method (kvexp.methods.storage.StoredEntries: KIVI, ZACK, ThinK): the
    token-selection method its layers run (`evictor`) and one `Storage` per layer."""

    evictor: Any

    def make_storage(self, layer: CompressedLayer, keys: torch.Tensor, values: torch.Tensor) -> Storage: ...

    def prepare(self, model: Any) -> None: ...


_NEVER = torch.iinfo(torch.long).max  # a position above every real one


def ranking_keys(scores: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """int64 keys [B, Hkv, n] that order slots as (fp32 score, position): equal scores rank by position, the older
    entry lower. The float's bits mapped to an order-preserving int32 (negative floats reversed; -0.0 as 0.0), then
    the position (>= -1, a dead slot's) in the low 32 bits."""
    bits = (scores.float() + 0.0).view(torch.int32)
    ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).long()
    return (ordered << 32) | (positions.long() + 1)


class CompressedLayer(DynamicLayer):
    """One layer's compressed KV storage; see the module docstring for the contracts."""

    def __init__(
        self,
        layer_idx: int,
        budget: int | None,
        method: Method,
        options: CacheOptions,
        head_budgets: list[int] | None = None,
        row_budgets: list[int] | None = None,
    ):
        super().__init__()
        self._views: dict[tuple[str, ...], torch.Tensor] = {}
        if head_budgets is not None and (budget is None or max(head_budgets) != budget):
            raise ValueError(f"layer {layer_idx}: the layer budget must equal its longest head budget")
        self.layer_idx = layer_idx
        self.budget = budget
        self.head_budgets = head_budgets
        self.method = method  # the method the cache was made with
        # The token-selection method: the method itself, or a storage method's `evictor` (KIVI, ZACK and ThinK
        # store the entries; their `evict` node chooses which stay).
        self.evictor: Method = method.evictor if isinstance(method, SupportsStorage) else method
        # Each batch row's own budget [B] (CPU, long), the layer's budget their largest; None: one for every row.
        self.row_budgets: torch.Tensor | None = None
        if row_budgets is not None:
            if budget is None or max(row_budgets) != budget or head_budgets is not None:
                raise ValueError(
                    f"layer {layer_idx}: per-row budgets need the layer budget to be their largest, and no per-head budgets"
                )
            if not self.evictor.row_budgets:
                raise ValueError(
                    f"method={self.evictor.name} reads the budget beyond the kept counts: the rows of a batch need one budget"
                )
            self.row_budgets = torch.tensor(row_budgets, dtype=torch.long)
        self.options = options
        self.storage: Storage | None = None  # a storage method's encoded K/V (None: dense K/V buffers)
        self.seen = 0  # logical tokens seen
        self.length = 0  # physical slots in use
        self.new_tokens = 0  # tokens written by the current step (the last `new_tokens` slots)
        self.has_bias = False  # False while every bias is 0: lets attention use the stock fast paths
        self.compress_seconds = 0.0
        self.compress_sq_seconds = 0.0  # sum of squared compression times: their spread without a list
        self.observe_seconds = 0.0  # inside method.observe (statistics of every step): method cost too
        # Compressions timed in compress_seconds (the compiled steps' are not among them).
        self.compressions = 0
        self.fused_steps = 0  # compiled decode steps (engine.compile): attention, observe and eviction in one
        self.fused_seconds = 0.0  # their time, the attention included
        self.peak_length = 0
        # Largest bytes the slots held (peak_length x slot_bytes while the batch does not change).
        self.peak_bytes = 0
        # The last queries this layer saw ([B, H, w, D], positions [B, w]), kept by window-scoring methods.
        self.query_window: tuple[torch.Tensor, torch.Tensor] | None = None
        self.scaling: float | None = None  # the attention's logit scale, set when a method observes
        # This decode step's attention row [B, Hkv, G, 1, n] (fp32), when the attention computed it for a method that
        # reads it (`reads_step_attention`); None otherwise and between steps.
        self.step_attention: torch.Tensor | None = None
        self.deferred = False  # a cross-layer allocation holds this layer's compression until it decides
        # The model's sliding window for this layer (a query sees the keys less than `window` positions back), as
        # its attention passes it (`sliding_window`: Gemma-3's local layers, Mistral); None for full attention.
        self.window: int | None = None
        self._scratch: dict[int, dict[str, Any]] = {}

    def scratch(self, owner: object) -> dict[str, Any]:
        """Per-run state `owner` (a method) keeps for this layer; freed with the cache, cleared by `reset`."""
        return self._scratch.setdefault(id(owner), {})

    # -- storage --------------------------------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.batch, self.kv_heads, _, self.head_dim = key_states.shape
        self.value_dim = value_states.shape[-1]
        self.capacity = 0
        if self.evictor is self.method:
            self._k = key_states.new_empty(self.batch, self.kv_heads, 0, self.head_dim)
            self._v = value_states.new_empty(self.batch, self.kv_heads, 0, self.value_dim)
        else:
            self.storage = self.method.make_storage(self, key_states, value_states)
        self._bias = torch.zeros(self.batch, self.kv_heads, 0, dtype=torch.float32, device=self.device)
        self._pos = torch.zeros(self.batch, self.kv_heads, 0, dtype=torch.long, device=self.device)
        self._state: dict[str, torch.Tensor] = {}
        for name in self.state_names():
            self._state[name] = torch.zeros_like(self._bias)
        self.is_initialized = True
        self._set_rows()
        self._refresh_views()

    def state_names(self) -> tuple[str, ...]:
        names = tuple(self.evictor.state_names)
        return (*names, "rope_pos") if self.options.positions == "rerotate" else names

    def _kv_buffers(self) -> list[torch.Tensor]:
        """The per-slot K/V buffers: dense keys and values, or the storage's encodings."""
        return [self._k, self._v] if self.storage is None else list(self.storage.slots.values())

    def _buffers(self) -> list[torch.Tensor]:
        return [*self._kv_buffers(), self._bias, self._pos, *self._state.values()]

    def _set_buffers(self, tensors: list[torch.Tensor]) -> None:
        kv = len(self._kv_buffers())
        if self.storage is None:
            self._k, self._v = tensors[:kv]
        else:
            self.storage.slots = dict(zip(self.storage.slots, tensors[:kv], strict=True))
        self._bias, self._pos = tensors[kv : kv + 2]
        self._state = dict(zip(self._state, tensors[kv + 2 :], strict=True))
        self._refresh_views()

    def _refresh_views(self) -> None:
        # Dropped, not rebuilt: `keys` / `values` make the views of the slots in use when next read (a compression
        # followed by the next step's write would otherwise build them twice). With a storage, the step's
        # decoded copy is stale once the slots change. Differentiable mode builds them now: a view made under a
        # method's no_grad could not be written with autograd (a merge).
        self.keys = self.values = None
        self._views = {}  # bias / positions / state views of the slots in use, made when first read
        if self.options.differentiable and self.storage is None and self.is_initialized:
            self.keys, self.values = self._k.narrow(2, 0, self.length), self._v.narrow(2, 0, self.length)

    # Dense: views of the first `length` slots. With a storage: the step's dense copy, or a transient decoding
    # between steps.
    @property
    def keys(self) -> torch.Tensor | None:
        if self._keys is None and self.is_initialized:
            if self.storage is not None:
                return self.storage.decode_keys(self)
            self._keys = self._k.narrow(2, 0, self.length)
        return self._keys

    @keys.setter
    def keys(self, value: torch.Tensor | None) -> None:
        self._keys = value

    @property
    def values(self) -> torch.Tensor | None:
        if self._values is None and self.is_initialized:
            if self.storage is not None:
                return self.storage.decode_values(self)
            self._values = self._v.narrow(2, 0, self.length)
        return self._values

    @values.setter
    def values(self, value: torch.Tensor | None) -> None:
        self._values = value

    def _resize(self, capacity: int) -> None:
        """Reallocate every buffer to `capacity` slots, keeping the `length` slots in use."""
        resized = []
        for t in self._buffers():
            new = t.new_zeros(*t.shape[:2], capacity, *t.shape[3:])
            new[:, :, : self.length] = t[:, :, : self.length]
            resized.append(new)
        self.capacity = capacity
        self._set_buffers(resized)

    def update(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        *args,
        positions_follow: bool = False,
        **kwargs,
    ):
        """Write this step's entries [B, Hkv, q, D] into the next slots and return the layer's K/V. Their positions
        are the logical ones (seen .. seen + q - 1) unless `positions_follow`: a model's step (`KVCache.update`),
        whose attention function records the model's own position ids right after (`record_new_tokens`)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        q = key_states.shape[-2]
        needed = self.length + q
        if self.options.differentiable:
            self._resize(needed)  # copy on write: the last attention may have saved the current buffers
        elif needed > self.capacity:
            # With a budget the steady state is budget + one step; without one, grow geometrically.
            floor = needed if self.budget is not None else 2 * self.capacity
            self._resize(max(needed, floor, 16))
        start, end = self.length, self.length + q
        # narrow + copy_/fill_: two dispatched ops per buffer (slice assignment costs up to five).
        if self.storage is None:
            self._k.narrow(2, start, q).copy_(key_states)
            self._v.narrow(2, start, q).copy_(value_states)
        if self.has_bias:  # else every bias is 0 already
            self._bias.narrow(2, start, q).fill_(0.0)
        for name, t in self._state.items():
            t.narrow(2, start, q).fill_(self.evictor.initial_state(name))
        self.length, self.seen, self.new_tokens = end, self.seen + q, q
        if not positions_follow:
            self._record_positions(None)
        self.peak_length = max(self.peak_length, end)
        self.peak_bytes = max(self.peak_bytes, end * self.slot_bytes)
        self._refresh_views()
        if self.storage is not None:
            self.storage.write(self, key_states, value_states)
            self.keys, self.values = self.storage.decode_keys(self), self.storage.decode_values(self)
        ACTIVE_LAYER.set(self)
        return self.keys, self.values

    def record_new_tokens(self, position_ids: torch.Tensor | None, token_mask: torch.Tensor | None) -> None:
        """Store the true positions of this step's tokens and kill padding slots (called by the attention fn)."""
        positions = self._record_positions(position_ids)
        if token_mask is not None:
            start, end = self.length - self.new_tokens, self.length
            pad = ~token_mask.to(self.device)[:, None, :].expand(-1, self.kv_heads, -1)
            self._bias[:, :, start:end].masked_fill_(pad, float("-inf"))
            positions.masked_fill_(pad, -1)
            self.has_bias = True
            if "rope_pos" in self._state:
                self._state["rope_pos"].narrow(2, start, end - start).copy_(positions)

    def _record_positions(self, position_ids: torch.Tensor | None) -> torch.Tensor:
        """Write the step's positions [B, Hkv, q] (the model's position ids, else seen - q .. seen - 1) and return
        them; `rope_pos` (re-rotation) starts there too."""
        q = self.new_tokens
        start = self.length - q
        positions = self._pos.narrow(2, start, q)
        if position_ids is not None:
            ids = position_ids.to(self.device)
            ids = ids if ids.shape[-1] == q else ids[:, -q:]
            positions.copy_(ids[:, None])  # [B, 1, q] broadcast over the heads
        elif q == 1:
            positions.fill_(self.seen - 1)
        else:
            positions.copy_(torch.arange(self.seen - q, self.seen, device=self.device))
        if "rope_pos" in self._state:
            self._state["rope_pos"].narrow(2, start, q).copy_(positions)
        return positions

    # -- views methods read -----------------------------------------------------------------------------------
    @property
    def bias(self) -> torch.Tensor:
        return self._view(("bias",), self._bias)

    @property
    def positions(self) -> torch.Tensor:
        return self._view(("positions",), self._pos)

    def state(self, name: str) -> torch.Tensor:
        return self._view(("state", name), self._state[name])

    def _view(self, key: tuple[str, ...], buffer: torch.Tensor) -> torch.Tensor:
        # One view per buffer between changes of the slots (a step reads positions and state several times). Not
        # in differentiable mode: a view made under a method's no_grad could not be written with autograd.
        view = self._views.get(key)
        if view is None:
            view = buffer.narrow(2, 0, self.length)
            if not self.options.differentiable:
                self._views[key] = view
        return view

    def attention_logits(
        self, queries: torch.Tensor, scaling: float, slots: slice = slice(None)
    ) -> torch.Tensor:
        """Logits [B, Hkv, G, r, n] (fp32) of queries [B, H, r, D] over the layer's slots (`slots`: a range of them),
        the slots' bias added (-inf dead, ln n merged); no causal mask. Query head h = g_kv * G + j (transformers'
        repeat_kv layout)."""
        batch, heads, rows, dim = queries.shape
        groups = heads // self.kv_heads
        grouped = queries.float().reshape(batch * self.kv_heads, groups * rows, dim)  # rows j*r + i
        keys = self.keys[:, :, slots].float().flatten(0, 1)  # [B*Hkv, n, D]
        logits = (
            torch.bmm(grouped, keys.transpose(1, 2)).view(batch, self.kv_heads, groups, rows, -1) * scaling
        )
        if self.has_bias:
            logits = logits + self.bias[:, :, None, None, slots]
        return logits

    def shares_attention_row(self, token_mask: torch.Tensor | None) -> bool:
        """Whether this step's attention is computed explicitly and its row handed to the method
        (`step_attention`): a decode step without padding whose evictor reads that row (`reads_step_attention`:
        H2O, TOVA and the other accumulated-attention methods), which then need not recompute it. Not in training,
        nor with a trainable bias offset (the method's statistics use the stored bias alone)."""
        method = self.evictor
        return (
            self.new_tokens == 1
            and token_mask is None
            and self.budget is not None
            and method.observes
            and method.reads_step_attention
            and not self.options.differentiable
            and method.bias_offset(self) is None
        )

    def live(self) -> torch.Tensor:
        """[B, Hkv, L_phys] bool: slots that hold a real key (not padding, not per-head padding)."""
        return self.bias > float("-inf")

    def rows_seen(self) -> torch.Tensor:
        """[B] long: the tokens each row has seen, its newest position + 1 (a left-padded row's padding not counted,
        unlike `seen`); in a step the newest token is held until the step's compression, so this is exact there."""
        return self.positions.amax(dim=(1, 2)) + 1

    def attention_bias(self) -> torch.Tensor:
        """The bias the attention adds to the logits [B, Hkv, L_phys]: `bias`, plus the method's `bias_offset`
        (trainable corrections of merged entries) when it has one."""
        offset = self.evictor.bias_offset(self)
        return self.bias if offset is None else self.bias + offset

    def no_grad_if_differentiable(self):
        """A no_grad context for the method's discrete work in differentiable mode; a no-op otherwise."""
        return torch.no_grad() if self.options.differentiable else contextlib.nullcontext()

    def _copy_on_write(self) -> None:
        if self.options.differentiable:
            self._set_buffers([t.clone() for t in self._buffers()])

    def physical_length(self) -> int:
        return self.length

    @property
    def slot_bytes(self) -> int:
        """Bytes one slot holds across the batch and the KV heads: its K and V, or a storage's per-slot encodings."""
        return sum(_bytes_per_slot(t) for t in self._kv_buffers())

    @property
    def dense_slot_bytes(self) -> int:
        """Bytes one slot's K and V take uncompressed (what the full cache holds per token)."""
        return self.batch * self.kv_heads * (self.head_dim + self.value_dim) * self.dtype.itemsize

    def other_bytes(self) -> int:
        """Bytes a storage holds outside the slots (full-precision windows, group tables); 0 without one."""
        return sum(t.nbytes for t in self.storage.others()) if self.storage is not None else 0

    def held_bytes(self) -> int:
        """K/V bytes held for the slots in use (dead per-head padding included: it is memory)."""
        return self.length * self.slot_bytes + self.other_bytes()

    # -- compression --------------------------------------------------------------------------------------------
    def over_budget(self, any_step: bool = False) -> bool:
        """Whether this step compresses: the layer exceeds its budget (plus slack), or its method compresses after
        every step (`compresses_under_budget`); under `when=prefill` only multi-token steps (`any_step`: whatever
        the step). Never while the cache holds its entries for a method's probes (`KVCache.holding`)."""
        if self.budget is None or self.deferred or self.cache.holding:
            return False
        if (
            self.length <= self.budget + self.options.slack
            and not self.evictor.compresses_under_budget
            and not self._row_over_budget()
        ):
            return False
        return any_step or self.options.when == "always" or self.new_tokens > 1

    def _row_over_budget(self) -> bool:
        """Whether a row holds more live entries (in its fullest head) than its own budget plus slack."""
        return self.row_budgets is not None and bool(self.rows_over_budget().any())

    def rows_over_budget(self) -> torch.Tensor:
        """[B] bool: the rows a compression now compresses, as each would alone: those holding more live entries (in
        their fullest head) than their own budget plus slack; every row under a method that compresses under its
        budget. A method that decides once per row at its first compression (UNComp's head budgets, SimLayerKV's
        lazy layers) decides for these rows."""
        if self.evictor.compresses_under_budget:
            return torch.ones(self.batch, dtype=torch.bool, device=self.device)
        live = self.live().sum(-1)  # [B, Hkv]
        return (live > self.row_targets(self.budget) + self.options.slack).any(-1)

    def deciding_rows(self, owner: object) -> torch.Tensor:
        """[B] bool: for a method that decides once per row, at the row's own first compression (UNComp's head
        budgets, SimLayerKV's lazy layers), the rows that decide now: over their budget and not decided yet (the
        `decided` row scratch that `decide` keeps)."""
        decided = self.scratch(owner).get("decided")
        deciding = self.rows_over_budget()
        return deciding if decided is None else deciding & ~decided

    def decide(self, owner: object, deciding: torch.Tensor, **values: torch.Tensor) -> None:
        """Keep `values` ([B, ...] row scratch of `owner`) for the `deciding` rows, the earlier ones for the others,
        and mark the deciding rows decided. The names belong in the method's `row_scratch`, with "decided"."""
        scratch = self.scratch(owner)
        decided = scratch.get("decided")
        for name, value in values.items():
            if decided is not None:
                value = torch.where(deciding.view(-1, *[1] * (value.dim() - 1)), value, scratch[name])
            scratch[name] = value
        scratch["decided"] = deciding if decided is None else deciding | decided

    def compress(self, any_step: bool = False) -> None:
        """Evict down to the method's target: score, select (per head), compact in place, re-rotate if asked. A
        sliding-window layer first drops what no later query can see (`_slide`)."""
        if self.window is not None:
            self._slide()
        if not self.over_budget(any_step):
            return
        start = time.perf_counter()
        self._evict()
        self.compressions += 1
        elapsed = time.perf_counter() - start
        self.compress_seconds += elapsed
        self.compress_sq_seconds += elapsed * elapsed

    def _evict(self) -> None:
        """A compression's work (`compress` times it; the compiled decode step traces it)."""
        # Differentiable mode: fresh buffers before anything writes into the slots this step's attention read
        # (a score may fold entries itself, as razor_attention's compensation token; so may merge and kill).
        self._copy_on_write()
        n, target = self.length, self.evictor.target_size(self)
        with self.no_grad_if_differentiable():
            selection = self.evictor.score(self)
        if not isinstance(selection, Selection):
            selection = Selection(selection)
        scores = selection.scores.float()
        if self.has_bias:
            scores = scores.masked_fill(~self.live(), float("-inf"))
        was_live = self.live() if self.evictor.merges else None
        counts = self._head_counts(scores, target)
        # Ranked by score, ties by position (the older entry goes first): the choice never depends on where entries
        # sit physically, so a left-padded batch row, a chunked prefill or a reordered cache choose alike.
        kept = kill = None
        if counts is None and n - target == 1 and was_live is None and not self.options.differentiable:
            # One entry out (a decode step at a full budget): the last slot, this step's token, moves into the
            # lowest-ranked slot of each head (the lowest score, the oldest among equals), the layout the general
            # compaction below gives, in a few ops.
            lowest = scores == scores.amin(dim=-1, keepdim=True)
            oldest = torch.where(lowest, self.positions, _NEVER).argmin(dim=-1, keepdim=True)
            self._move_last_into(oldest)
        elif counts is None:
            # Usually a step evicts a handful of entries: select those (topk with a small k), not the kept set.
            ranks = ranking_keys(scores, self.positions)
            evict = ranks.topk(n - target, dim=-1, largest=False).indices
            kept = torch.ones_like(scores, dtype=torch.bool).scatter_(2, evict, False)
        else:
            # Each head keeps its own count of live entries; the layer is as long as the longest head. The slots
            # a shorter head keeps beyond its count stay physically but are killed (bias -inf).
            target = int(counts.max())
            keep = (
                ranking_keys(scores, self.positions).topk(target, dim=-1).indices
            )  # best first: each head's first count_h stay live
            kept = torch.zeros_like(scores, dtype=torch.bool).scatter_(2, keep, True)
            dead = torch.arange(target, device=self.device)[None, None, :] >= counts[:, :, None]
            kill = torch.zeros_like(kept).scatter_(2, keep, dead)
        if was_live is not None:
            # Merge before killing: a killed slot is an evicted entry to the merge, not a survivor with weight 0.
            survivors = kept & was_live if kill is None else kept & was_live & ~kill
            self.evictor.merge(self, survivors, was_live & ~survivors, selection)
        if kill is not None:
            self._bias[:, :, :n].masked_fill_(kill, float("-inf"))
            self.has_bias = True
        if kept is not None:  # None: the single-entry path above compacted already
            self._compact(kept, target)
        if self.options.positions == "rerotate":
            self._rerotate()

    def _slide(self) -> None:
        """A sliding-window layer keeps each row's `window - 1` newest entries: the next query sees those and
        itself, no older one (the model's own rule, which the attention masks within a step too). Not the method's
        work: it happens with or without a budget, as in the model's own cache."""
        keep = self.window - 1
        if self.length <= keep:
            return
        order = self.positions.masked_fill(~self.live(), -1) if self.has_bias else self.positions
        evict = order.topk(self.length - keep, dim=-1, largest=False).indices  # padding and dead slots first
        self._compact(torch.ones_like(order, dtype=torch.bool).scatter_(2, evict, False), keep)

    def _head_counts(self, scores: torch.Tensor | None, target: int) -> torch.Tensor | None:
        """Live entries each KV head keeps at this compression [B, Hkv]: the method's dynamic per-head counts
        (AdaKV; under per-row budgets from each row's own budget), else the cache's per-head or per-row budgets;
        None: `target` for every head."""
        counts = self.evictor.head_counts(self, scores, self.row_targets(target))
        if counts is None and self.head_budgets is not None:
            counts = torch.tensor(self.head_budgets, device=self.device).expand(self.batch, -1)
        if counts is None and self.row_budgets is not None:
            counts = self.row_budgets.to(self.device)[:, None].expand(self.batch, self.kv_heads)
        return None if counts is None else self.spare_rows_within_budget(counts)

    def spare_rows_within_budget(self, counts: torch.Tensor) -> torch.Tensor:
        """`counts` [B, Hkv], except that a row within its own budget (plus slack) keeps every live entry: alone, it
        would not compress now (one row under per-row budgets: the layer may be longer from rows that left)."""
        if self.batch == 1 and self.row_budgets is None:
            return counts
        return torch.where(self.rows_over_budget()[:, None], counts, self.live().sum(-1))

    def row_targets(self, target: int) -> int | torch.Tensor:
        """What each row keeps at this compression: `target`, or under per-row budgets each row's own budget
        [B, 1] (long, on the layer's device), for a method that splits or shares out the budget itself."""
        return target if self.row_budgets is None else self.row_budgets.to(self.device)[:, None]

    def keep_counts(self) -> torch.Tensor:
        """[B, Hkv] live entries each KV head keeps at the compression running now, for a method that plans its
        merges while scoring (its per-head counts may not depend on its own scores)."""
        target = self.evictor.target_size(self)
        counts = self._head_counts(None, target)
        if counts is None:
            counts = torch.tensor(target, device=self.device)
        return counts.expand(self.batch, self.kv_heads)

    def after_attention(self, query: torch.Tensor, scaling: float) -> None:
        """The rest of the step once its attention ran over every slot (the per-step order): the storage and the
        method see the queries [B, H, q, D], the method may reallocate budgets across layers, the layer compresses
        if it is over budget, and a storage encodes."""
        if self.cache.probing:
            self._end_probe_step(query, scaling)
            return
        if self.storage is not None:
            self.storage.observe(self, query)
        method = self.evictor
        if (method.observes or method.allocates) and self.budget is not None:
            start = time.perf_counter()
            plan = None
            with self.no_grad_if_differentiable():
                if method.observes:
                    self.scaling = scaling
                    method.observe(self, query)
                if method.allocates:
                    plan = method.allocate(self)
            self.observe_seconds += time.perf_counter() - start
            if plan is not None:
                self.cache.reallocate(self, plan)
        self.step_attention = None
        self.compress()
        self.end_step()

    def _end_probe_step(self, query: torch.Tensor, scaling: float) -> None:
        """A probe step (`KVCache.probing`) after its attention: the method observes the probe's queries [B, H, q, D]
        (its own entries are the layer's last q slots), then the step's entries are dropped: the layer holds what it
        held before the probe. Nothing compresses."""
        if self.budget is not None and self.evictor.probes:
            start = time.perf_counter()
            self.scaling = scaling
            self.evictor.observe_probe(self, query)
            self.observe_seconds += time.perf_counter() - start
        self.step_attention = None
        self.length -= self.new_tokens
        self.seen -= self.new_tokens
        self.new_tokens = 0
        self._refresh_views()

    def fused_step_applies(self, token_mask: torch.Tensor | None) -> bool:
        """Whether this step runs as the compiled decode step (`options.compile`): one new token, no padding, that
        takes the layer exactly one entry over its target, and an evictor that needs nothing beyond the layer
        (no storage, merge or cross-layer allocation). Other steps, and every step of other methods, run eagerly."""
        if (
            not self.options.compile
            or self.cache.probing
            or self.new_tokens != 1
            or token_mask is not None
            or self.storage is not None
            or self.row_budgets is not None
        ):
            return False
        method = self.evictor
        if method.merges or method.allocates or not self.over_budget():
            return False
        return self.length - method.target_size(self) == 1

    def observe_and_evict_one(self, query: torch.Tensor, scaling: float) -> None:
        """`after_attention` of a step `fused_step_applies` to, as the compiled step traces it: the method observes
        the queries [B, H, 1, D] and the layer evicts its one entry (untimed: the caller times the whole step)."""
        if self.evictor.observes:
            self.scaling = scaling
            self.evictor.observe(self, query)
        self.step_attention = None
        self._evict()

    def end_step(self) -> None:
        """After the step's attention and compression (called by the attention function): a storage encodes what
        left its full-precision windows, and the step's dense copy is dropped."""
        if self.storage is None:
            return
        if self.has_bias and bool(((self.bias != 0) & self.live()).any()):
            raise RuntimeError(
                f"layer {self.layer_idx}: the evictor {self.evictor.name!r} wrote merged entries (bias ln n), which a "
                "storage method cannot hold; use an eviction method as method.evict"
            )
        self.storage.commit(self)
        self.keys = self.values = None

    def _compact(self, kept: torch.Tensor, k: int) -> None:
        """Keep the `k` slots flagged per row in `kept` [B, Hkv, L_phys]; move them into [0, k)."""
        n = self.length
        pairs = min(k, n - k)
        if pairs > 0:
            # Holes: evicted slots below K. Movers: kept slots at K or above. Each row has as many of one as the
            # other; topk lists the real ones first, and the leftover pairs copy a slot onto itself.
            hole_flag, hole = (~kept[:, :, :k]).float().topk(pairs, dim=-1)
            _, mover = kept[:, :, k:].float().topk(pairs, dim=-1)
            src = torch.where(hole_flag > 0, mover + k, hole)
            if self.options.differentiable:
                # The same moves out of place: slot j < k takes src where j is a hole, else stays.
                order = torch.arange(k, device=self.device).expand(*kept.shape[:2], k).scatter(2, hole, src)
                self.capacity, self.length = k, k
                self._set_buffers([_take_slots(t, order) for t in self._buffers()])
                return
            for t in self._buffers():
                if t.dim() == 4:
                    dst_idx = hole[..., None].expand(-1, -1, -1, t.shape[-1])
                    t.scatter_(2, dst_idx, t.gather(2, src[..., None].expand(-1, -1, -1, t.shape[-1])))
                else:
                    t.scatter_(2, hole, t.gather(2, src))
        self.length = k
        self._shrink_if_oversized()
        self._refresh_views()

    def _move_last_into(self, slot: torch.Tensor) -> None:
        """Drop one entry per row: the last slot's contents move into `slot` [B, Hkv, 1] (itself when it is the
        lowest), every buffer alike."""
        last = self.length - 1
        index = (*self._rows, slot)  # [B, 1, 1], [1, Hkv, 1], [B, Hkv, 1]
        for t in self._buffers():
            if t is self._bias and not self.has_bias:
                continue  # all 0: nothing to move
            # index_put_, not scatter_: torch.compile writes it in place (a scatter_ copies the whole buffer twice)
            t.index_put_(index, t.narrow(2, last, 1))
        self.length = last
        self._shrink_if_oversized()
        self._refresh_views()

    def _set_rows(self) -> None:
        # Batch and head index grids for one-slot-per-head writes: [B, 1, 1] and [1, Hkv, 1].
        self._rows = (
            torch.arange(self.batch, device=self.device)[:, None, None],
            torch.arange(self.kv_heads, device=self.device)[None, :, None],
        )

    def _shrink_if_oversized(self) -> None:
        # After a long prefill was compressed, give the memory back: keep room for one more step at this size.
        if self.capacity > 2 * (self.length + self.new_tokens) + 64:
            self._resize(self.length + self.new_tokens)

    def _rerotate(self) -> None:
        """Re-rotate kept keys to contiguous positions ending at the last token seen (StreamingLLM pos-shift).

        RoPE is relative, so keys at seen-n .. seen-1 with the next token at `seen` give the same logits as the
        paper's in-cache positions 0 .. n-1 with the next token at n. Dead slots sort first and take no place
        among the live keys' distances.
        """
        rotary = self.options.rotary
        order_key = self.positions.masked_fill(~self.live(), -1)
        rank = order_key.argsort(dim=-1).argsort(dim=-1)
        target = (self.seen - self.length + rank).float()
        rope_pos = self.state("rope_pos")
        delta = target - rope_pos  # [B, Hkv, L]
        self.keys[..., : rotary.rotary_dims] = rotate_keys(
            self.keys[..., : rotary.rotary_dims], delta, rotary.inv_freq
        )
        rope_pos.copy_(target)

    # -- batch and beam operations: every buffer follows -----------------------------------------------------------
    def _index_batch(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        if self.row_budgets is not None:
            self.row_budgets = fn(self.row_budgets)
            # The rows left set the layer's length from the next compression on.
            self.budget = int(self.row_budgets.max())
        if self.is_initialized:
            self._set_buffers([fn(t) for t in self._buffers()])
            self.batch = self._bias.shape[0]
            self._set_rows()
            if self.storage is not None:
                self.storage.index_batch(fn)
        if self.query_window is not None:
            self.query_window = tuple(fn(t) for t in self.query_window)
        for owner in _owners(self.method, self.evictor):
            scratch = self._scratch.get(id(owner), {})
            for name in owner.row_scratch:  # per-row scratch tensors [B, ...] follow the rows too
                if isinstance(scratch.get(name), torch.Tensor):
                    scratch[name] = fn(scratch[name])

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._index_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._index_batch(lambda t: t[indices.to(t.device)])

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._index_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def reset(self) -> None:
        self.keys = self.values = None
        self._views = {}
        self.storage = None
        self.is_initialized = False
        self.seen = self.length = self.new_tokens = self.peak_length = self.peak_bytes = 0
        self.has_bias = False
        self.query_window = None
        self.step_attention = None
        self.deferred = False
        self._scratch = {}

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError(
            "a compressed cache cannot be rolled back (evicted entries are gone); assisted decoding is unsupported"
        )

    def offload(self):
        raise NotImplementedError("offloading a compressed cache is not supported")

    # -- what transformers asks ----------------------------------------------------------------------------------
    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # Only kvexp's own mask function sees these; it ignores the size and builds masks from layer state.
        return self.seen + query_length, 0

    def get_max_length(self) -> int:
        return -1


def _owners(*methods: Any) -> list[Any]:
    """The methods whose layer scratch a layer holds: the given ones and, recursively, the methods they run inside
    them (`Method.parts`: a wrapper's scorer, a chain's stages), each once."""
    found: dict[int, Any] = {}
    pending = list(methods)
    while pending:
        owner = pending.pop(0)
        if id(owner) not in found:
            found[id(owner)] = owner
            pending.extend(getattr(owner, "parts", tuple)())
    return list(found.values())


def rotate_keys(keys: torch.Tensor, delta: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotate post-RoPE keys [.., L, D_rot] by `delta` [.., L] positions (R(a)R(b) = R(a+b), rotate_half layout)."""
    angle = delta[..., None].double() * inv_freq.double()  # fp64: positions can be large
    cos = torch.cat([angle.cos(), angle.cos()], dim=-1).float()
    sin = torch.cat([angle.sin(), angle.sin()], dim=-1).float()
    k = keys.float()
    half = k.shape[-1] // 2
    rotated_half = torch.cat([-k[..., half:], k[..., :half]], dim=-1)
    return (k * cos + rotated_half * sin).to(keys.dtype)


class KVCache(Cache):
    """A transformers Cache of `CompressedLayer`s; pass it as `past_key_values` to a model or to `generate()`."""

    def __init__(
        self, layers: list[CompressedLayer], recorder: Callable[..., Any] | None = None, holding: bool = False
    ):
        super().__init__(layers=layers)
        # True until a probing method's probes ran (`Method.probes`, `end_probes`): no layer compresses before.
        self.holding = holding
        self.probing = False  # inside `probe()`: each step is a probe, dropped after its attention
        # Optional observer called by the attention function before each layer's attention with
        # (layer, query_length): for the masking-oracle test, plots and debugging.
        self.recorder = recorder
        self._scratch: dict[int, dict[str, Any]] = {}
        for layer in layers:
            layer.cache = self
        self.allocated = self.budget_total()  # what a final reallocation may spend (admit raises it)

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A model's step at one layer: the attention function that follows records the positions (the model's
        position ids), so the layer leaves them to it."""
        return self.layers[layer_idx].update(key_states, value_states, *args, positions_follow=True, **kwargs)

    def scratch(self, owner: object) -> dict[str, Any]:
        """Per-run state `owner` (a method) keeps for the whole cache (a cross-layer allocation in progress)."""
        return self._scratch.setdefault(id(owner), {})

    def budget_total(self) -> int:
        """The layers' budgets summed (uncompressed layers left out)."""
        return sum(layer.budget for layer in self.layers if layer.budget is not None)

    def reallocate(self, layer: CompressedLayer, plan: Reallocation) -> None:
        """Apply a method's cross-layer decision made at `layer`'s step: set the named layers' budgets, compress
        those other than `layer` (their step in this forward already ran; `layer` compresses right after),
        and defer `layer`'s own compression if asked. A final plan may not raise the budgets' total."""
        for i, budget in plan.budgets.items():
            other = self.layers[i]
            if (
                other.budget is None
                or (other.head_budgets is not None and budget != other.budget)
                or budget < 0
            ):
                raise ValueError(
                    f"{layer.evictor.name}: layer {i} cannot take budget {budget} (it needs a budget of its own; "
                    "per-head budgets stay as they are)"
                )
            other.budget, other.deferred = budget, False
        layer.deferred = plan.defer
        if plan.final:
            total = self.budget_total()
            if total > self.allocated:
                raise RuntimeError(
                    f"{layer.evictor.name}: the allocation raised the budgets' total from {self.allocated} to {total}"
                )
        for i in plan.budgets:
            if i != layer.layer_idx:
                self.layers[i].compress()

    @contextlib.contextmanager
    def probe(self):
        """Run a method's probe forwards inside this (KVzip's context reconstruction, `Method.probes`): at each layer
        a probe step's entries are written and attended as a normal step's (its own queries causally, every entry
        held), the method observes the queries (`observe_probe`), then the entries are dropped, so the cache and its
        token count are as before. A probe neither compresses nor reaches the cache's recorder."""
        if any(layer.storage is not None for layer in self.layers):
            raise ValueError("a storage method's layers encode every step; they cannot run probes")
        self.probing = True
        try:
            yield
        finally:
            self.probing = False

    def end_probes(self, budgets: dict[int, int] | None = None, hold: bool = False) -> None:
        """The probes ran: apply the layer budgets the method allocated from them (`budgets`, layer -> kept entries
        per KV head; their total no more than the cache's) and compress every layer to its budget, whatever the
        step and `engine.when`. `hold`: more of the prompt and probes follow (FINCH's chunks): the layers hold what
        is fed next until the next `end_probes`."""
        self.holding = False
        for i, budget in (budgets or {}).items():
            layer = self.layers[i]
            if layer.budget is None or layer.head_budgets is not None or budget < 0:
                raise ValueError(
                    f"{layer.evictor.name}: layer {i} cannot take budget {budget} from its probes"
                )
            layer.budget = budget
        if self.budget_total() > self.allocated:
            raise RuntimeError(
                f"the probes' allocation raised the budgets' total from {self.allocated} to {self.budget_total()}"
            )
        for layer in self.layers:
            if layer.is_initialized:
                layer.compress(any_step=True)
        self.holding = hold

    def admit(self, tokens: int) -> None:
        """Raise every compressed layer's budget (and per-head budgets) by `tokens` before a step of that many
        tokens, so that step cannot trigger a compression: the layers stay observed (methods see its queries) but
        keep all of it; later steps compress to the raised budget (the query-agnostic protocol's question)."""
        for layer in self.layers:
            if layer.budget is not None:
                layer.budget += tokens
                self.allocated += tokens
                if layer.head_budgets is not None:
                    layer.head_budgets = [b + tokens for b in layer.head_budgets]
                if layer.row_budgets is not None:
                    layer.row_budgets = layer.row_budgets + tokens

    def physical_lengths(self) -> list[int]:
        return [layer.length for layer in self.layers]

    def kept_bytes(self) -> int:
        """Bytes of K and V physically held now (dead per-head padding slots included: they are memory; with a
        storage, the bytes of its encodings and windows)."""
        return sum(layer.held_bytes() for layer in self.layers if layer.is_initialized)

    def stats(self, row: int | None = None, seen: int | None = None) -> dict[str, Any]:
        """Kept tokens per layer (and per head), bytes kept vs the full cache, the compression ratio, method time.
        The full cache is the model's own: a sliding-window layer holds its `window - 1` newest tokens there too, so
        `tokens_full` (mean over layers) may be below `tokens_seen`, and the ratio is 1 - kept / full.

        For one `row` of a batch that has fed `seen` real tokens (its padding left out): its own live entries, the
        full cache's bytes for its tokens, and its share (1 / batch) of the bytes held and allocated; the method's
        time and counts stay the batch's."""
        layers = [layer for layer in self.layers if layer.is_initialized]
        if not layers:
            return {"tokens_seen": 0, "tokens_kept": 0, "compression_ratio": 0.0}
        share = 1 if row is None else layers[0].batch
        seen = layers[0].seen if seen is None else seen
        live = [layer.live().sum(-1).float() for layer in layers]  # [B, Hkv] per layer
        live_per_head = [
            (n.mean(0) if row is None else n[row]).tolist() for n in live
        ]  # batch mean or the row's
        kept_layer = [sum(h) / len(h) for h in live_per_head]
        # What the model's own cache would hold: every token, or a sliding-window layer's `window - 1` newest.
        full_layer = [seen if layer.window is None else min(seen, layer.window - 1) for layer in layers]
        bytes_full = sum(
            full * layer.dense_slot_bytes // share for full, layer in zip(full_layer, layers, strict=True)
        )
        bytes_allocated = (
            sum(layer.capacity * layer.slot_bytes + layer.other_bytes() for layer in layers) / share
        )
        tokens_kept = sum(kept_layer) / len(kept_layer)
        tokens_full = sum(full_layer) / len(full_layer)
        return {
            "tokens_seen": seen,
            "tokens_full": tokens_full,
            "tokens_kept": tokens_kept,
            "tokens_kept_per_layer": kept_layer,
            "tokens_kept_per_head": live_per_head,
            "physical_length_per_layer": [layer.length for layer in layers],
            "compression_ratio": 1.0 - tokens_kept / tokens_full if tokens_full else 0.0,
            "bytes_full": bytes_full,
            "bytes_kept": self.kept_bytes() / share,
            "bytes_allocated": bytes_allocated,
            "compress_seconds": sum(layer.compress_seconds for layer in layers),
            "compress_sq_seconds": sum(layer.compress_sq_seconds for layer in layers),
            "compressions": sum(layer.compressions for layer in layers),
            "fused_steps": sum(layer.fused_steps for layer in layers),
            "fused_seconds": sum(layer.fused_seconds for layer in layers),
            "method_stats": layers[0].method.statistics(layers),
        }
