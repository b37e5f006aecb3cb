import logging
from dataclasses import dataclass, field

import torch

from kvexp.engine.cache import Storage
from kvexp.methods.base import Method, register
from kvexp.methods.calibration import DEFAULT_CACHE, TextCalibration, record_attention_inputs
from kvexp.methods.storage import StorageMethod

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Calibration:
    """Per (layer, KV head) orthonormal bases, columns by decreasing singular value, and the singular values."""

    key_basis: torch.Tensor  # [NL, Hkv, D, D] of the post-RoPE [group queries; keys] stack
    key_singular: torch.Tensor  # [NL, Hkv, D]
    value_basis: torch.Tensor  # [NL, Hkv, Dv, Dv] of the values
    value_singular: torch.Tensor  # [NL, Hkv, Dv]


def basis_from_gram(gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The right singular vectors (columns) and singular values, decreasing, of a row stack X given its Gram
    matrix X^T X [..., D, D]: eigenvectors and the square roots of the eigenvalues (fp64)."""
    eigenvalues, vectors = torch.linalg.eigh(gram.double())
    return vectors.flip(-1), eigenvalues.flip(-1).clamp_min(0).sqrt()


def energy_rank(singular: torch.Tensor, energy: float) -> torch.Tensor:
    """The smallest r [...] whose top singular values [..., D] hold `energy` of the squared total (energy 1: D)."""
    dim = singular.shape[-1]
    if energy >= 1.0:
        return torch.full(singular.shape[:-1], dim, dtype=torch.long)
    squared = singular.double().pow(2)
    held = squared.cumsum(-1) / squared.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
    return ((held < energy).sum(-1) + 1).clamp_max(dim)


def calibrate(model, input_ids: torch.Tensor) -> Calibration:
    """One forward over `input_ids` [1, T] recording, per layer and KV head, the Gram matrices of the post-RoPE rows
    [the G group queries; the keys] and of the values, and their SVD bases (`basis_from_gram`). The queries of a
    group and its KV head's keys share one basis, so the cached r-dim keys serve every query head
    (docs/methods.md#zack)."""
    grams: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def record(module, query, key, value):
        batch, heads, length, dim = query.shape
        kv_heads = key.shape[1]
        queries = query.float().reshape(batch, kv_heads, heads // kv_heads * length, dim)  # rows g*T + t
        rows = torch.cat([queries, key.float()], dim=2)
        values = value.float()
        # fp32 products (the costly part), fp64 sums over the batch and the decomposition.
        grams[module.layer_idx] = (
            (rows.transpose(-1, -2) @ rows).double().sum(0),
            (values.transpose(-1, -2) @ values).double().sum(0),
        )

    record_attention_inputs(model, input_ids, record)
    key_basis, key_singular = basis_from_gram(torch.stack([grams[i][0] for i in sorted(grams)]).cpu())
    value_basis, value_singular = basis_from_gram(torch.stack([grams[i][1] for i in sorted(grams)]).cpu())
    return Calibration(key_basis.float(), key_singular.float(), value_basis.float(), value_singular.float())


class ZACKStorage(Storage):
    """One layer's ZACK cache: per slot, the key's and the value's coefficients in the layer's truncated bases
    ([r_k] and [r_v] per KV head); the bases are per-model constants like the projection weights they would be
    folded into, not cache entries."""

    def __init__(self, layer, key_basis: torch.Tensor, value_basis: torch.Tensor):
        super().__init__()
        self.key_basis = key_basis.to(layer.device, layer.dtype)  # [Hkv, D, r_k]
        self.value_basis = value_basis.to(layer.device, layer.dtype)  # [Hkv, Dv, r_v]
        shape = (layer.batch, layer.kv_heads, 0)
        self.slots = {
            "keys": torch.zeros(*shape, key_basis.shape[-1], dtype=layer.dtype, device=layer.device),
            "values": torch.zeros(*shape, value_basis.shape[-1], dtype=layer.dtype, device=layer.device),
        }

    def write(self, layer, keys: torch.Tensor, values: torch.Tensor) -> None:
        new = slice(layer.length - layer.new_tokens, layer.length)
        self.slots["keys"][:, :, new] = torch.einsum("bhnd,hdr->bhnr", keys, self.key_basis)
        self.slots["values"][:, :, new] = torch.einsum("bhnd,hdr->bhnr", values, self.value_basis)

    def decode_keys(self, layer) -> torch.Tensor:
        """k R_r R_r^T: for any query q, q . (k R_r R_r^T) = (q R_r) . (k R_r), ZACK's projected dot product."""
        return torch.einsum("bhnr,hdr->bhnd", self.slot(layer, "keys"), self.key_basis)

    def decode_values(self, layer) -> torch.Tensor:
        """v R_r R_r^T: the attention output is then sum_j p_j (v_j R_r) R_r^T."""
        return torch.einsum("bhnr,hdr->bhnd", self.slot(layer, "values"), self.value_basis)


@register
@dataclass
class ZACK(TextCalibration, StorageMethod, Method):
    """ZACK (Zhang & Shen, arXiv 2408.04107): KV dimensionality compression with offline SVD bases.

    Calibration (once per model, cached in `calibration_cache`): one forward over the first `calibration_tokens`
    tokens of `calibration_file` (a JSONL of `text`, relative to $KVEXP_DATA_DIR: local Gutenberg books) records,
    per layer and KV head, the post-RoPE rows [the group's queries; its keys] and the values (`calibrate`); their SVD
    gives orthonormal bases. Each head's rank is the smallest r whose singular values hold `energy` of the squared
    total, separately for keys and values; a layer stores max-over-heads-r coefficients per head (rectangular
    tensors: the padding would hold zeros, so every head uses that many basis vectors, which costs nothing and is
    more accurate). Keys (post-RoPE) and values are stored as r-dim coefficients `k R_r`, `v R_r`; the attention
    sees `k R_r R_r^T`, i.e. `q . k ~ (q R_r)(k R_r)^T`, the step's own keys and values included. At energy 1 the
    bases are complete: exact.
    Choices where the paper is open (docs/methods.md#zack): the value basis is the values' own SVD, not the stack of
    values with the W_o slices (a KV head's values serve G query heads with G different slices, and stacking
    activations with weights needs an arbitrary relative scale; the values' SVD is the best rank-r reconstruction
    and its discarded energy is exactly its reconstruction error); rank by an energy fraction of each head's
    spectrum; nothing is folded into the weights (post-RoPE keys cannot be, and the decode is a transient copy).
    Token eviction is `evict`'s (default SnapKV at w=32, k=7, maxpool; with a budget). The paper fixes no energy;
    the default 0.99 is near-lossless: on SmolLM2-135M (64-dim heads) 0.95 saves 21% of the bytes but takes the
    WikiText-2 streaming perplexity from 15.3 to 28.2.
    """

    name = "zack"
    calibration_dir = "zack"
    description = "low-rank K/V from offline SVD bases, r-dim coefficients stored (Zhang & Shen 2024)"
    energy: float = 0.99
    calibration_file: str = "gutenberg/books.jsonl"
    calibration_tokens: int = 2048
    calibration_cache: str | None = DEFAULT_CACHE
    calibration: Calibration | None = field(default=None, init=False, repr=False, compare=False)
    _model_key: str | None = field(default=None, init=False, repr=False, compare=False)

    def validate(self, budget: int | None) -> None:
        if not 0.0 < self.energy <= 1.0:
            raise ValueError(f"method.energy must be in (0, 1], got {self.energy}")
        self.check_calibration()
        super().validate(budget)

    def prepare(self, model) -> None:
        """Calibrate on the model (or load its cached calibration), once per model."""
        tensors = self.calibrated(model, lambda: vars(calibrate(model, self.calibration_ids(model))))
        if tensors is None:
            return
        self.calibration = Calibration(**tensors)
        key_rank, value_rank = self.ranks()
        log.info("zack: key ranks per layer %s, value ranks %s", key_rank.tolist(), value_rank.tolist())

    def ranks(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The stored width per layer [NL] for keys and values: the largest of the layer's head ranks."""
        cal = self.calibration
        return (
            energy_rank(cal.key_singular, self.energy).amax(dim=-1),
            energy_rank(cal.value_singular, self.energy).amax(dim=-1),
        )

    def make_storage(self, layer, keys: torch.Tensor, values: torch.Tensor) -> ZACKStorage:
        if self.calibration is None:
            raise RuntimeError(
                "zack has not calibrated: build the cache with make_cache, which calls prepare"
            )
        key_rank, value_rank = (int(r[layer.layer_idx]) for r in self.ranks())
        cal, i = self.calibration, layer.layer_idx
        return ZACKStorage(layer, cal.key_basis[i, :, :, :key_rank], cal.value_basis[i, :, :, :value_rank])

    def statistics(self, layers) -> dict:
        key_rank, value_rank = self.ranks() if self.calibration is not None else (None, None)
        return {
            **super().statistics(layers),
            "zack_key_rank_per_layer": key_rank.tolist() if key_rank is not None else None,
            "zack_value_rank_per_layer": value_rank.tolist() if value_rank is not None else None,
        }
