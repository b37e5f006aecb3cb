"""Storage methods' shared parts (KIVI, ZACK, ThinK): `StorageMethod`, the method side of the storage axis, and
the full-precision token windows they keep beside their encoded slots. The engine's side is `Storage` (one layer's
encoded K/V) and the `SupportsStorage` protocol (kvexp/engine/cache.py)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from kvexp.engine.cache import Storage
from kvexp.methods.base import build_method

if TYPE_CHECKING:
    from kvexp.engine.cache import CompressedLayer


class TokenWindow:
    """Full-precision rows [B, Hkv, n, D] of the tokens with index start .. start + n - 1 (KIVI's residual, ThinK's
    recent keys). Every batch row and KV head holds every token of the window, so a token one head evicted keeps its
    row until the window moves past it (held memory, counted)."""

    def __init__(self, like: torch.Tensor):
        self.rows = like.new_zeros(*like.shape[:2], 0, like.shape[-1])
        self.start = 0

    @property
    def end(self) -> int:
        return self.start + self.rows.shape[2]

    def append(self, rows: torch.Tensor) -> None:
        self.rows = torch.cat([self.rows, rows], dim=2)

    def lookup(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows of token indices [B, Hkv, n]: ([B, Hkv, n, D], inside [B, Hkv, n]); rows outside are garbage."""
        offset = index.long() - self.start
        inside = (offset >= 0) & (offset < self.rows.shape[2])
        if self.rows.shape[2] == 0:
            return self.rows.new_zeros(*index.shape, self.rows.shape[-1]), inside
        wide = offset.clamp(0, self.rows.shape[2] - 1)[..., None].expand(-1, -1, -1, self.rows.shape[-1])
        return self.rows.gather(2, wide), inside

    def fill(self, dense: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Write the window's rows into `dense` [B, Hkv, n, D] (in place) at the slots whose token index [B, Hkv, n]
        is in the window: a decode overwrites its encoded slots' garbage with the full-precision rows."""
        offset = index - self.start
        b, h, slot = torch.nonzero((offset >= 0) & (offset < self.rows.shape[2]), as_tuple=True)
        dense[b, h, slot] = self.rows[b, h, offset[b, h, slot].long()]
        return dense

    def advance(self, start: int) -> None:
        """Drop the rows of tokens before `start` (a copy, so their memory is released)."""
        self.rows = self.rows[:, :, start - self.start :].clone()
        self.start = start

    def index_batch(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.rows = fn(self.rows)


def token_slots(
    index: torch.Tensor, live: torch.Tensor, first: int, end: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The live slots holding tokens first .. end - 1: slot indices [B, Hkv, m] and a validity mask (each row has at
    most one slot per token; rows with fewer are padded with invalid entries). `index` [B, Hkv, n] token indices."""
    member = (index >= first) & (index < end) & live
    flag, slot = member.float().topk(min(end - first, index.shape[-1]), dim=-1)
    return slot, flag > 0


@dataclass
class StorageMethod:
    """The method side of the storage axis (KIVI, ZACK, ThinK), mixed into a `Method` (`class KIVI(StorageMethod,
    Method)`): it keeps every entry in an encoded form (`make_storage`, one `Storage` per layer) and leaves which
    entries to keep to `evict`, a method node built like any method (`{name: snapkv, window_size: 32}`;
    `{name: full}` keeps everything). The layers select with the evictor (`layer.evictor`), its budgets and its
    `prepare`; this object only stores. It needs no budget (`compresses` is False): without one the storage alone
    compresses, with one the evictor evicts and the storage encodes what is kept.
    """

    compresses: ClassVar[bool] = False
    # Full-precision windows and query windows count tokens by index, a batch's padding included: a padded row's
    # windows and quantization groups would not be its own.
    batches: ClassVar[bool] = False
    evict: dict[str, Any] = field(default_factory=lambda: {"name": "snapkv"})

    def __post_init__(self) -> None:
        node = dict(self.evict)
        if "name" not in node:
            raise ValueError(f"method.evict must name a method ({{name: snapkv, ...}}), got {self.evict}")
        try:
            evictor = build_method(**node)
        except ValueError as err:
            raise ValueError(f"method.evict: {err}") from err
        if isinstance(evictor, StorageMethod):
            raise ValueError(
                f"method.evict={node['name']} is a storage method; it must be an eviction method"
            )
        if evictor.probes:
            raise ValueError(
                f"method.evict={node['name']} runs probes after the prompt, which encoded layers cannot run"
            )
        if evictor.merges:
            raise ValueError(
                f"method.evict={node['name']} merges entries, which a storage method cannot hold (the merge would "
                "rewrite the step's decoded copy, not the stored entries); use an eviction method"
            )
        self.evictor = evictor

    def validate(self, budget: int | None) -> None:
        try:
            self.evictor.validate(budget)
        except ValueError as err:
            raise ValueError(f"method.evict: {err} (set it as method.evict.<parameter>)") from err

    def check_model(self, num_layers: int, kv_heads: int) -> None:
        try:
            self.evictor.check_model(num_layers, kv_heads)
        except ValueError as err:
            raise ValueError(f"method.evict: {err}") from err

    def make_storage(self, layer: CompressedLayer, keys: torch.Tensor, values: torch.Tensor) -> Storage:
        """A fresh storage for `layer`, sized from its first K/V [B, Hkv, q, D] (the layer's dims are set)."""
        raise NotImplementedError

    def statistics(self, layers: list[CompressedLayer]) -> dict[str, Any]:
        return self.evictor.statistics(layers)
