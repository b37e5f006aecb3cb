from dataclasses import dataclass

import torch

from kvexp.engine.cache import Storage
from kvexp.methods.base import Method, register
from kvexp.methods.storage import StorageMethod, TokenWindow, token_slots

BITS = (2, 4)


def asymmetric(minimum: torch.Tensor, maximum: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """KIVI's zero-point parameters of a group: scale `(max - min) / (2^b - 1)` and zero point `min`."""
    return (maximum - minimum) / (2**bits - 1), minimum


def codes(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """`round((x - zero) / scale)` clamped to [0, 2^b - 1], uint8 (fp32 arithmetic). A group of equal values has
    scale 0 and codes 0, which decode to its value exactly."""
    scale, zero = scale.float(), zero.float()
    q = (x.float() - zero) / scale.clamp_min(torch.finfo(torch.float32).tiny)
    return q.round().clamp_(0, 2**bits - 1).to(torch.uint8)


def dequantize(code: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return code.to(scale.dtype) * scale + zero


def pack(code: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes [..., D] -> [..., D * bits / 8]: 8 / bits codes per byte, the first in the lowest bits."""
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=code.device)
    return (code.unflatten(-1, (-1, 8 // bits)) << shifts).sum(-1).to(torch.uint8)


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """The inverse of `pack`: [..., D * bits / 8] -> uint8 codes [..., D]."""
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
    return ((packed[..., None] >> shifts) & (2**bits - 1)).flatten(-2)


def quantize_tokens(
    x: torch.Tensor, bits: int, group: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """KIVI's values: each token [..., D] in groups of `group` consecutive channels -> (packed codes [..., D*b/8],
    scale and zero point [..., D / group], in x's dtype)."""
    grouped = x.unflatten(-1, (-1, group))
    scale, zero = asymmetric(grouped.amin(-1), grouped.amax(-1), bits)
    code = codes(grouped, scale[..., None], zero[..., None], bits)
    return pack(code.flatten(-2), bits), scale, zero


def dequantize_tokens(
    packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, group: int
) -> torch.Tensor:
    code = unpack(packed, bits).unflatten(-1, (-1, group)).to(scale.dtype)
    return torch.addcmul(zero[..., None], code, scale[..., None]).flatten(-2)


def take_rows(table: torch.Tensor, row: torch.Tensor) -> torch.Tensor:
    """table [B, Hkv, t, W] and row indices [B, Hkv, n] -> [B, Hkv, n, W] (one index_select: gather with an expanded
    index is several times slower on CPU)."""
    batch, heads, rows, width = table.shape
    flat = row + torch.arange(batch * heads, device=row.device, dtype=row.dtype).view(batch, heads, 1) * rows
    return table.reshape(-1, width).index_select(0, flat.reshape(-1)).view(batch, heads, -1, width)


def channel_params(
    x: torch.Tensor, group: torch.Tensor, valid: torch.Tensor, groups: int, bits: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """KIVI's keys: per channel over token groups. x [B, Hkv, m, D] with each entry's group [B, Hkv, m] in
    [0, groups) and validity -> scale and zero point [B, Hkv, groups, D] over each group's valid entries (a group
    without one gets 0, 0)."""
    spare = group.masked_fill(~valid, groups)[..., None].expand_as(x)  # invalid entries go to an extra group
    shape = (*x.shape[:2], groups + 1, x.shape[-1])
    low = x.new_full(shape, float("inf")).scatter_reduce(2, spare, x, "amin")[:, :, :groups]
    high = x.new_full(shape, float("-inf")).scatter_reduce(2, spare, x, "amax")[:, :, :groups]
    empty = low.isinf()
    return asymmetric(low.masked_fill(empty, 0.0), high.masked_fill(empty, 0.0), bits)


class KIVIStorage(Storage):
    """One layer's KIVI cache. Per slot: its token index, packed key codes, packed value codes and the value's
    per-token scales and zero points. Outside the slots: the full-precision residual windows of keys and values
    (by token index) and the key scales and zero points of every token group that still has a quantized key."""

    def __init__(self, layer, method: "KIVI", keys: torch.Tensor, values: torch.Tensor):
        super().__init__()
        self.method = method
        batch, heads, dim, value_dim = layer.batch, layer.kv_heads, layer.head_dim, layer.value_dim

        def empty(width: int | None, dtype: torch.dtype) -> torch.Tensor:
            shape = (batch, heads, 0) if width is None else (batch, heads, 0, width)
            return torch.zeros(shape, dtype=dtype, device=layer.device)

        self.slots = {
            "index": empty(None, torch.int32),
            "key_codes": empty(dim * method.k_bits // 8, torch.uint8),
            "value_codes": empty(value_dim * method.v_bits // 8, torch.uint8),
            "value_scale": empty(value_dim // method.group_size, layer.dtype),
            "value_zero": empty(value_dim // method.group_size, layer.dtype),
        }
        self.key_window, self.value_window = TokenWindow(keys), TokenWindow(values)
        # Token groups `index // group_size` (ascending) whose key scales and zero points are held, side by side in
        # [B, Hkv, groups, 2 D].
        self.groups = torch.zeros(0, dtype=torch.int32, device=layer.device)
        self.key_params = keys.new_zeros(batch, heads, 0, 2 * dim)
        self.compressions = 0  # the layer's compression count when groups were last released

    def write(self, layer, keys: torch.Tensor, values: torch.Tensor) -> None:
        self.write_token_index(layer)
        self.key_window.append(keys)
        self.value_window.append(values)

    def decode_keys(self, layer) -> torch.Tensor:
        index = self.slot(layer, "index")
        if self.groups.numel() == 0:  # nothing quantized yet
            keys = self.key_window.rows.new_zeros(*index.shape, layer.head_dim)
        else:
            row = torch.searchsorted(self.groups, index // self.method.group_size).clamp_max(
                len(self.groups) - 1
            )
            params = take_rows(self.key_params, row)  # each slot's group: [scale | zero]
            code = unpack(self.slot(layer, "key_codes"), self.method.k_bits).to(params.dtype)
            keys = torch.addcmul(params[..., layer.head_dim :], code, params[..., : layer.head_dim])
        return self.key_window.fill(keys, index)

    def decode_values(self, layer) -> torch.Tensor:
        values = dequantize_tokens(
            self.slot(layer, "value_codes"),
            self.slot(layer, "value_scale"),
            self.slot(layer, "value_zero"),
            self.method.v_bits,
            self.method.group_size,
        )
        return self.value_window.fill(values, self.slot(layer, "index"))

    def commit(self, layer) -> None:
        """Keys leave the residual in blocks of R (`R * floor(seen / R)` are quantized), values one by one (all but
        the last R); then the key groups without a live quantized key are released."""
        residual, index, live = self.method.residual_length, self.slot(layer, "index"), layer.live()
        key_end = residual * (layer.seen // residual)
        quantizing = key_end > self.key_window.start
        if quantizing:
            self._quantize_keys(layer, index, live, key_end)
        value_end = max(0, layer.seen - residual)
        if value_end > self.value_window.start:
            self._quantize_values(layer, index, live, value_end)
        if quantizing or layer.compressions != self.compressions:  # only these can empty a group
            self._release_groups(index, live)
            self.compressions = layer.compressions

    def _leaving(self, window: TokenWindow, index: torch.Tensor, live: torch.Tensor, end: int):
        """The live slots whose tokens leave `window` (token indices window.start .. end - 1) and their rows."""
        slot, valid = token_slots(index, live, window.start, end)
        tokens = index.gather(2, slot)
        return slot, valid, tokens, window.lookup(tokens)[0]

    def _quantize_keys(self, layer, index: torch.Tensor, live: torch.Tensor, end: int) -> None:
        """Quantize the keys of tokens window.start .. end - 1 per channel, in groups of G consecutive tokens over
        the entries each head still holds (a group's scale is over its kept keys)."""
        size, first = self.method.group_size, self.key_window.start
        slot, valid, tokens, x = self._leaving(self.key_window, index, live, end)
        groups = (end - first) // size
        member = (tokens.long() - first) // size
        scale, zero = channel_params(x, member, valid, groups, self.method.k_bits)
        scale, zero = scale.to(layer.dtype), zero.to(layer.dtype)
        wide = member.clamp(0, groups - 1)[..., None].expand_as(x)
        code = codes(x, scale.gather(2, wide), zero.gather(2, wide), self.method.k_bits)
        self.store(layer, "key_codes", slot, valid, pack(code, self.method.k_bits))
        new_groups = torch.arange(first // size, end // size, dtype=torch.int32, device=self.groups.device)
        self.groups = torch.cat([self.groups, new_groups])
        self.key_params = torch.cat([self.key_params, torch.cat([scale, zero], dim=-1)], dim=2)
        self.key_window.advance(end)

    def _quantize_values(self, layer, index: torch.Tensor, live: torch.Tensor, end: int) -> None:
        slot, valid, _, x = self._leaving(self.value_window, index, live, end)
        packed, scale, zero = quantize_tokens(x, self.method.v_bits, self.method.group_size)
        self.store(layer, "value_codes", slot, valid, packed)
        self.store(layer, "value_scale", slot, valid, scale)
        self.store(layer, "value_zero", slot, valid, zero)
        self.value_window.advance(end)

    def _release_groups(self, index: torch.Tensor, live: torch.Tensor) -> None:
        """Drop the scales of token groups no head of any batch row holds a quantized key of any more."""
        if self.groups.numel() == 0:
            return
        quantized = live & (index < self.key_window.start)
        held = torch.isin(self.groups, index[quantized] // self.method.group_size)
        if not bool(held.all()):
            self.groups, self.key_params = self.groups[held], self.key_params[:, :, held]

    def others(self) -> list[torch.Tensor]:
        return [self.key_window.rows, self.value_window.rows, self.groups, self.key_params]

    def index_batch(self, fn) -> None:
        self.key_window.index_batch(fn)
        self.value_window.index_batch(fn)
        self.key_params = fn(self.key_params)


@register
@dataclass
class KIVI(StorageMethod, Method):
    """KIVI (Liu et al., ICML 2024, arXiv 2402.02750): tuning-free asymmetric 2/4-bit KV quantization.

    Uniform min/max (zero-point) quantization `x_hat = round((x - min) / s) s + min`, `s = (max - min) / (2^b - 1)`.
    Keys (post-RoPE) per channel, each group of `group_size` consecutive tokens sharing a channel's min and scale
    (outlier channels stay in their own range); values per token, in groups of `group_size` channels. The last
    tokens stay in full precision: keys leave the residual in blocks of `residual_length` (`R floor(seen / R)` keys
    quantized, R a multiple of G), values one token at a time (all but the last R), as the reference
    (`quant/new_pack.py`, `models/llama_kivi.py`). Codes are packed 8 / b per byte; scales and zero points are in
    the model's dtype. Per KV head (quantization does not depend on queries).
    Eviction (`evict`, default SnapKV at w=32, k=7, maxpool; with a budget): a key group is formed, when its tokens
    leave the residual, over the keys each head still holds; a later eviction removes a key's codes with its slot and
    never requantizes the others (each keeps its codes and its group's scale: no compounding error), and a group's
    scales are released when no head holds one of its keys. Sparse groups cost their scales per surviving key:
    `kivi_keys_per_group` in the run's method statistics says how full they are (G: nothing evicted).
    Reference example defaults (k_bits = v_bits = 2, G = 32, R = 32); the paper mostly uses R = 128.
    """

    name = "kivi"
    description = "2/4-bit asymmetric KV quantization, keys per channel, values per token (Liu et al. 2024)"
    k_bits: int = 2
    v_bits: int = 2
    group_size: int = 32
    residual_length: int = 32

    def validate(self, budget: int | None) -> None:
        for option in ("k_bits", "v_bits"):
            if getattr(self, option) not in BITS:
                raise ValueError(f"method.{option} must be one of {BITS}, got {getattr(self, option)}")
        if self.group_size < 1:
            raise ValueError(f"method.group_size must be >= 1, got {self.group_size}")
        if self.residual_length < self.group_size or self.residual_length % self.group_size:
            raise ValueError(
                f"method.residual_length ({self.residual_length}) must be a positive multiple of method.group_size "
                f"({self.group_size}): keys are quantized in whole groups as they leave the residual"
            )
        super().validate(budget)

    def prepare(self, model) -> None:
        config = model.config
        dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        if dim % self.group_size:
            raise ValueError(
                f"method.group_size ({self.group_size}) must divide the head dim ({dim}): values are quantized in "
                "groups of group_size channels"
            )
        for option in ("k_bits", "v_bits"):
            if dim * getattr(self, option) % 8:
                raise ValueError(f"method.{option}: {dim} channels do not pack into whole bytes")

    def make_storage(self, layer, keys: torch.Tensor, values: torch.Tensor) -> KIVIStorage:
        return KIVIStorage(layer, self, keys, values)

    def statistics(self, layers) -> dict:
        stored = [layer for layer in layers if layer.storage is not None]
        groups = sum(layer.storage.groups.numel() for layer in stored)
        quantized = sum(
            int((layer.live() & (layer.storage.slot(layer, "index") < layer.storage.key_window.start)).sum())
            / (layer.batch * layer.kv_heads)
            for layer in stored
        )
        return {
            **super().statistics(layers),
            "kivi_key_groups": groups,  # held over all layers
            "kivi_keys_per_group": quantized / groups
            if groups
            else None,  # mean kept quantized keys per group
        }
