from dataclasses import dataclass

import torch

from kvexp.engine.cache import Storage
from kvexp.methods.base import Method, check_window, register
from kvexp.methods.scoring import reduce_group
from kvexp.methods.storage import StorageMethod, TokenWindow, token_slots


def channel_scores(queries: torch.Tensor, keys: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
    """ThinK's channel scores [B, Hkv, D]: `mean_t q_{t,i}^2 * mean_j k_{j,i}^2` (= ||Q[:, i] K[:, i]^T||_F^2 up to
    constants), the query energy over the window queries [B, H, w, D] averaged over the GQA group (kvpress), the key
    energy over each head's live keys [B, Hkv, n, D] (`live` [B, Hkv, n])."""
    batch, heads, _, dim = queries.shape
    kv_heads = keys.shape[1]
    query_energy = queries.float().pow(2).mean(dim=2).reshape(batch, kv_heads, heads // kv_heads, dim)
    weight = live.float()[..., None]
    key_energy = (keys.float().pow(2) * weight).sum(dim=2) / weight.sum(dim=2).clamp_min(1.0)
    return reduce_group(query_energy, "mean") * key_energy


class ThinKStorage(Storage):
    """One layer's ThinK cache. Per slot: its token index, the key's kept channels [kept] and the full value.
    Outside the slots: the full-precision keys of the recent window (by token index) and each KV head's kept
    channels [B, Hkv, kept] once chosen; until then the last window queries."""

    def __init__(self, layer, method: "ThinK", keys: torch.Tensor, values: torch.Tensor):
        super().__init__()
        self.method = method
        self.kept = layer.head_dim - int(layer.head_dim * method.pruning_ratio)
        shape = (layer.batch, layer.kv_heads, 0)
        self.slots = {
            "index": torch.zeros(shape, dtype=torch.int32, device=layer.device),
            "keys": keys.new_zeros(*shape, self.kept),
            "values": values.new_zeros(*shape, layer.value_dim),
        }
        self.window = TokenWindow(keys)
        self.channels: torch.Tensor | None = None  # [B, Hkv, kept] ascending
        self.queries: torch.Tensor | None = None  # the last window_size queries [B, H, w, D] until then

    def write(self, layer, keys: torch.Tensor, values: torch.Tensor) -> None:
        self.write_token_index(layer)
        self.slots["values"][:, :, layer.length - layer.new_tokens : layer.length] = values
        self.window.append(keys)

    def observe(self, layer, query: torch.Tensor) -> None:
        if self.channels is None:
            seen = query if self.queries is None else torch.cat([self.queries, query], dim=2)
            self.queries = seen[:, :, -self.method.window_size :]

    def decode_keys(self, layer) -> torch.Tensor:
        """Pruned keys come back with zeros in the pruned channels, so q . k is q restricted to the kept ones."""
        index = self.slot(layer, "index")
        keys = self.window.rows.new_zeros(*index.shape, layer.head_dim)
        if self.channels is not None:  # else nothing is pruned yet: every key is in the window
            channels = self.channels[:, :, None, :].expand(-1, -1, index.shape[-1], -1)
            keys.scatter_(3, channels, self.slot(layer, "keys"))
        return self.window.fill(keys, index)

    def decode_values(self, layer) -> torch.Tensor:
        return self.slot(layer, "values")

    def commit(self, layer) -> None:
        """Keys older than the recent window lose their pruned channels; the channels are chosen the first time."""
        end = max(0, layer.seen - self.method.recent_size)
        if end <= self.window.start:
            return
        index, live = self.slot(layer, "index"), layer.live()
        if self.channels is None:
            scores = channel_scores(self.queries, self.window.lookup(index)[0], live)
            self.channels = scores.topk(self.kept, dim=-1).indices.sort(dim=-1).values
            self.queries = None
        slot, valid = token_slots(index, live, self.window.start, end)
        rows = self.window.lookup(index.gather(2, slot))[0]  # [B, Hkv, m, D]
        pruned = rows.gather(3, self.channels[:, :, None, :].expand(-1, -1, slot.shape[-1], -1))
        self.store(layer, "keys", slot, valid, pruned)
        self.window.advance(end)

    def others(self) -> list[torch.Tensor]:
        return [self.window.rows] + ([self.channels] if self.channels is not None else [])

    def index_batch(self, fn) -> None:
        self.window.index_batch(fn)
        self.channels = fn(self.channels) if self.channels is not None else None
        self.queries = fn(self.queries) if self.queries is not None else None


@register
@dataclass
class ThinK(StorageMethod, Method):
    """ThinK (Xu et al., ICLR 2025, arXiv 2407.21018): query-driven key channel pruning, stored thinner.

    Each KV head scores its key channels by `mean_t q_{t,i}^2 * mean_j k_{j,i}^2` over the last `window_size`
    post-RoPE queries (averaged over the GQA group, kvpress's ThinKPress) and its live keys (`channel_scores`), and
    keeps the top `D - floor(pruning_ratio D)`. Keys older than the `recent_size` most recent tokens are stored with
    the kept channels only (real saving: the reference re-inflates with zeros, kvpress zeroes and saves nothing);
    recent and new keys are full; values are untouched. The attention sees pruned keys with zeros in the pruned
    channels, i.e. q restricted to the kept channels. Per KV head (kvpress; the reference prunes per query head after
    repeating KV, and its authors report that sharing a mask within a group does as well, ThinK issue #4).
    When: the reference prunes once at prefill, after the token eviction, and keeps every decode key full. Here the
    channels are chosen once per sequence, at the first step that pushes a key out of the recent window (the end
    of the prefill when the prompt is longer than `recent_size`; after `recent_size + 1` tokens when streaming), from
    the keys then held, and every key that later leaves the recent window is pruned to them: the reference's rule
    applied as tokens age, so decoding and streaming save memory too. Token eviction is `evict`'s (default SnapKV at
    w=32, k=7, maxpool, the reference's setting; with a budget). Reference defaults: pruning_ratio 0.4, 32 queries,
    32 recent keys.
    """

    name = "think"
    description = "query-driven key channel pruning, pruned channels not stored (Xu et al. 2024)"
    pruning_ratio: float = 0.4
    window_size: int = 32
    recent_size: int = 32

    def validate(self, budget: int | None) -> None:
        if not 0.0 <= self.pruning_ratio < 1.0:
            raise ValueError(f"method.pruning_ratio must be in [0, 1), got {self.pruning_ratio}")
        check_window("window_size", self.window_size, minimum=1)
        check_window("recent_size", self.recent_size)
        super().validate(budget)

    def make_storage(self, layer, keys: torch.Tensor, values: torch.Tensor) -> ThinKStorage:
        return ThinKStorage(layer, self, keys, values)

    def statistics(self, layers) -> dict:
        stored = [layer.storage for layer in layers if layer.storage is not None]
        return {**super().statistics(layers), "think_kept_channels": stored[0].kept if stored else None}
