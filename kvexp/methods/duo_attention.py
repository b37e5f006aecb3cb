from __future__ import annotations

import hashlib
import logging
import math
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from kvexp.engine import sliding_layers
from kvexp.methods.base import Method, check_window, register
from kvexp.methods.calibration import (
    DEFAULT_CACHE,
    cache_folder,
    calibration_path,
    load_tensors,
    save_tensors,
    text_ids,
)
from kvexp.methods.scoring import head_caps
from kvexp.models import model_fingerprint

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from kvexp.engine.cache import CompressedLayer

log = logging.getLogger(__name__)

PATTERN_FILE = (
    "full_attention_heads.tsv"  # the authors' published gates, one row per layer, one column per KV head
)
PROBE_ATTENTION = "kvexp_duo_probe"  # the identification's mixed attention, registered with transformers
# The gates the probe attention mixes with, and its streaming window (sinks, recent), while an identification runs.
_PROBE: ContextVar[tuple[torch.Tensor, int, int] | None] = ContextVar("kvexp_duo_probe", default=None)
# Identified gates per model fingerprint and probe setting: [NL, Hkv] on the CPU.
_GATES: dict[str, torch.Tensor] = {}


def _probe_attention(
    module: torch.nn.Module,
    query: torch.Tensor,  # [B, H, q, D], rotated
    key: torch.Tensor,  # [B, Hkv, n, D]
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """DuoAttention's training attention: per KV head, `gate * full + (1 - gate) * streaming` attention outputs,
    streaming = the first `sink` keys and the `recent` newest up to the query (the query itself included). One
    unpadded sequence without a cache (the probe's); the layer's sliding window, if any, applies to both."""
    gates, sink, recent = _PROBE.get()
    heads, rows, dim = query.shape[1], query.shape[2], query.shape[3]
    group, n = heads // key.shape[1], key.shape[2]
    scale = scaling if scaling is not None else dim**-0.5
    i = torch.arange(rows, device=query.device)[:, None] + (n - rows)
    j = torch.arange(n, device=query.device)[None, :]
    visible = j <= i
    window = kwargs.get("sliding_window")
    if window is not None:
        visible = visible & (i - j < window)
    streaming = visible & ((j < sink) | (i - j < recent))
    q, k, v = query.float(), key.float(), value.float()
    full, stream = (
        F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
        for mask in (visible, streaming)
    )
    alpha = gates[module.layer_idx].clamp(0, 1).repeat_interleave(group)[None, :, None, None]
    out = alpha * full + (1 - alpha) * stream
    return out.to(query.dtype).transpose(1, 2).contiguous(), None


AttentionInterface.register(PROBE_ATTENTION, _probe_attention)
AttentionMaskInterface.register(PROBE_ATTENTION, lambda *args, **kwargs: None)  # the function masks itself


def passkey_probe(
    haystack: torch.Tensor, vocab: int, bos: int | None, passkeys: int, passkey_length: int, seed: int
) -> tuple[torch.Tensor, int]:
    """The identification's passkey sequence [1, n] and where its answer starts: [BOS] + the `haystack` tokens
    [length] (a text's) holding `passkeys` seeded random passkeys of `passkey_length` tokens written over it at
    evenly spread depths (the i-th centred at (i + 0.5) / passkeys of the haystack), then the passkeys again in order
    (the answer, whose hidden states the distillation compares). BOS is not added to a haystack that starts with
    it. Seeded: the same arguments give the same sequence."""
    g = torch.Generator().manual_seed(seed)
    haystack = haystack.clone()
    length = haystack.numel()
    keys = torch.randint(0, vocab, (passkeys, passkey_length), generator=g)
    span = length - passkey_length
    for p in range(passkeys):
        start = int((p + 0.5) * span / passkeys)
        haystack[start : start + passkey_length] = keys[p]
    lead = torch.tensor([bos] if bos is not None and int(haystack[0]) != bos else [], dtype=torch.long)
    return torch.cat([lead, haystack, keys.flatten()])[None], lead.numel() + length


def optimize_gates(
    model: PreTrainedModel,
    ids: torch.Tensor,
    answer: int,
    sink: int,
    recent: int,
    steps: int,
    lr: float,
    reg_weight: float,
) -> torch.Tensor:
    """DuoAttention's optimization-based identification on one sequence: a gate per (layer, KV head), initialised
    at 1 and clamped to [0, 1] before every step, mixes full and streaming attention (`_probe_attention`); AdamW
    (no weight decay) minimises the mean over the answer tokens of the mean squared difference between the last
    hidden states of the mixed and the full model, plus `reg_weight` x mean |gate|. The learning rate follows the
    authors' schedule (linear warm-up over the first fifth of the steps from 0.1 x lr, decay over the last fifth
    down to 0.1 x lr). Returns the gates [NL, Hkv] on the CPU; the weights do not change."""
    config = model.config
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    gates = torch.nn.Parameter(torch.ones(config.num_hidden_layers, kv_heads, device=model.device))
    ids = ids.to(model.device)
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    previous = config._attn_implementation
    optimizer = torch.optim.AdamW([gates], lr=lr, weight_decay=0.0)
    fifth = max(1, steps // 5)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, max((s + 1) / fifth, 0.1), max((steps - s) / fifth, 0.1))
    )

    def last_hidden(mix: torch.Tensor) -> torch.Tensor:
        token = _PROBE.set((mix, sink, recent))
        try:
            out = model.base_model(ids, use_cache=False)  # the final hidden states, no vocabulary projection
        finally:
            _PROBE.reset(token)
        return out.last_hidden_state[0, answer:].float()

    model.set_attn_implementation(PROBE_ATTENTION)
    try:
        for p in params:
            p.requires_grad_(False)
        with torch.no_grad():
            target = last_hidden(torch.ones_like(gates))  # every gate 1: the full model
        for _ in range(steps):
            with torch.no_grad():
                gates.clamp_(0, 1)
            with torch.enable_grad():
                distill = (last_hidden(gates) - target).pow(2).mean(dim=-1).mean()
                loss = distill + reg_weight * gates.abs().mean()
                optimizer.zero_grad()
                loss.backward()
            optimizer.step()
            schedule.step()
    finally:
        model.set_attn_implementation(previous)
        for p, flag in zip(params, flags, strict=True):
            p.requires_grad_(flag)
    return gates.detach().clamp(0, 1).cpu()


def load_head_patterns(path: str | Path) -> torch.Tensor:
    """The authors' gates (`full_attention_heads.tsv`: tab-separated, a row per layer, a column per KV head; the
    file, or the pattern directory holding it; or a .npy of that shape), clipped to [0, 1] as they load them."""
    path = Path(path)
    if path.is_dir():
        path = path / PATTERN_FILE
    if not path.is_file():
        raise ValueError(
            f"method.head_patterns={str(path)!r} is not a file (nor a directory holding {PATTERN_FILE})"
        )
    try:
        gates = np.load(path) if path.suffix == ".npy" else np.loadtxt(path, dtype=float, delimiter="\t")
    except (ValueError, OSError) as err:
        raise ValueError(
            f"method.head_patterns={str(path)!r} cannot be read as a table of gates: {err}"
        ) from err
    gates = np.atleast_2d(np.asarray(gates, dtype=np.float64))
    if gates.ndim != 2 or not np.isfinite(gates).all():
        raise ValueError(
            f"method.head_patterns={str(path)!r} must hold a finite [layers, KV heads] table, got shape {gates.shape}"
        )
    return torch.from_numpy(np.clip(gates, 0.0, 1.0)).float()


def select_retrieval(
    gates: torch.Tensor, eligible: torch.Tensor, sparsity: float | None, threshold: float
) -> torch.Tensor:
    """[NL, Hkv] bool, the retrieval heads among the `eligible` layers' KV heads (Gemma-3's local layers are not:
    they are never compressed). `sparsity`: that share of the eligible heads streams, the lowest gates first (rounded
    half up; equal gates in (layer, head) order); None: heads whose gate is at least `threshold` retrieve."""
    retrieval = torch.zeros(gates.shape, dtype=torch.bool)
    if sparsity is None:
        retrieval[eligible] = gates[eligible] >= threshold
        return retrieval
    candidates = gates[eligible].flatten()
    streaming = math.floor(sparsity * candidates.numel() + 0.5)
    keep = torch.ones(candidates.numel(), dtype=torch.bool)
    keep[torch.argsort(candidates, stable=True)[:streaming]] = False
    retrieval[eligible] = keep.view(-1, gates.shape[1])
    return retrieval


@register
@dataclass
class DuoAttention(Method):
    """DuoAttention (Xiao, Tang, Zuo, Guo, Yang, Tang, Fu, Han, ICLR 2025, arXiv 2410.10819): retrieval heads keep
    the whole cache, streaming heads attention sinks and a recent window.

    Each KV head has a gate in [0, 1]. Retrieval heads are the KV heads with the highest gates: all but the
    `sparsity` share with the lowest (the paper's deployment knob; kvpress's `head_compression_ratio`), or with
    `sparsity: null` those whose gate is at least `threshold`. The gates come from `head_patterns`, the authors'
    published `full_attention_heads.tsv` (or its directory; clipped to [0, 1] as they load it), or from the paper's
    optimization run once per model (`optimize_gates`): on a passkey sequence (`passkey_probe`: the first
    `probe_length` tokens of `calibration_file`, the embedded public-domain novel by default, holding
    `probe_passkeys` seeded random passkeys of `passkey_length` tokens, the passkeys repeated at the end), each
    layer's attention output is `gate * full + (1 - gate) * streaming` per KV head (streaming: `sink_size` sinks +
    `recent_size` recent tokens), and `probe_steps` AdamW steps (lr `probe_lr`, the authors'
    warm-up/decay schedule) minimise the squared distance of the answer tokens' last hidden states to the full
    model's plus `reg_weight` x mean |gate|, gates starting at 1 and clamped to [0, 1]. Gemma-3's local layers
    keep the model's window and take no part in the ranking.
    Budget semantics: the budget is a streaming head's cache, `sink_size` sinks + the newest `budget - sink_size`
    tokens (the paper's deployment of 64 sinks + 256 recent tokens is `sink_size=64` at budget 320); a per-head
    budget (`budget.per_head`) is that streaming head's own. A retrieval head keeps every token, so a layer with one
    is as long as the sequence (the engine's rule: a layer is as long as its longest head; its streaming heads'
    evicted slots are dead padding there, so only layers without a retrieval head hold less memory, while the
    live-entry counts show every streaming head's saving); kvpress's reported compression ratio (streaming share x
    (1 - window / length)) is kvexp's live-entry compression ratio.
    Deviations: the paper identifies on 2000 steps over many synthetic passkey samples of 1k-32k tokens of
    BookSum text; kvexp optimises on one sequence of a book's text for `probe_steps` steps; the regularizer is the
    mean |gate| (the authors' `l1_loss`, whose normalisation is not published in the paper). `sink_size` defaults to StreamingLLM's 4, not the paper's 64 (sized for its 128-token attention
    blocks), so that small budgets run; `recent_size` is the identification's window (the paper's 256), the
    deployed recent window being the budget less the sinks. The identified gates are cached per model and setting
    in the process and under `gates_cache`/duo_attention/ (None: not on disk), so a sweep identifies once. The
    identification needs the model: give the method to
    `make_cache` directly (it calls `prepare`), not wrapped in another method.
    """

    name = "duo_attention"
    description = "retrieval heads keep everything, streaming heads sinks + recent window (Xiao et al. 2025)"
    row_budgets = True  # streaming heads keep each row's own budget (head_caps)
    sparsity: float | None = 0.5
    threshold: float = 0.5
    sink_size: int = 4
    recent_size: int = 256
    head_patterns: str | None = None
    probe_length: int = 1024
    probe_passkeys: int = 10
    passkey_length: int = 32
    probe_steps: int = 100
    probe_lr: float = 0.02
    reg_weight: float = 0.05
    probe_seed: int = 0
    calibration_file: str | None = None
    gates_cache: str | None = DEFAULT_CACHE
    # The identification code's version, in the gates' key: raise it with any change to what it computes, so that
    # gates an older kvexp cached are identified again rather than loaded.
    identification_version: ClassVar[int] = 2  # 2: a text haystack (1: random tokens)
    # What `prepare` learns from the model: [NL, Hkv] bool, the retrieval heads.
    _retrieval: torch.Tensor | None = field(default=None, init=False, repr=False, compare=False)

    def _needs_gates(self) -> bool:
        """Whether the selection reads the gates (a sparsity of 0 or 1 does not: every head retrieves or streams)."""
        return self.sparsity is None or 0.0 < self.sparsity < 1.0

    def validate(self, budget: int | None) -> None:
        if self.sparsity is not None and not 0.0 <= self.sparsity <= 1.0:
            raise ValueError(f"method.sparsity must be in [0, 1] or null, got {self.sparsity}")
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"method.threshold must be in [0, 1] (gates are), got {self.threshold}")
        if self.sink_size < 0:
            raise ValueError(f"method.sink_size must be >= 0, got {self.sink_size}")
        if budget is not None and self.sink_size >= budget:
            raise ValueError(
                f"method.sink_size ({self.sink_size}) must be smaller than the budget ({budget}) so that a "
                "streaming head keeps a recent window"
            )
        check_window("recent_size", self.recent_size, minimum=1)
        if self.head_patterns is not None:
            path = Path(self.head_patterns)
            if not (path.is_file() or (path / PATTERN_FILE).is_file()):
                raise ValueError(
                    f"method.head_patterns={self.head_patterns!r} is not a file (nor a directory holding "
                    f"{PATTERN_FILE})"
                )
            return
        if not self._needs_gates():
            return
        calibration_path(self.calibration_file)  # a missing file fails here, before the model loads
        for option in ("probe_passkeys", "passkey_length", "probe_steps"):
            if getattr(self, option) < 1:
                raise ValueError(f"method.{option} must be >= 1, got {getattr(self, option)}")
        fit = (self.probe_passkeys + 1) * self.passkey_length
        if self.probe_length < fit:
            raise ValueError(
                f"method.probe_length ({self.probe_length}) must be at least (probe_passkeys + 1) x "
                f"passkey_length ({fit}) so that the passkeys do not overlap"
            )
        if self.probe_length <= self.sink_size + self.recent_size:
            raise ValueError(
                f"method.probe_length ({self.probe_length}) must exceed sink_size + recent_size "
                f"({self.sink_size + self.recent_size}): a shorter probe never tells streaming from full attention"
            )
        if not self.probe_lr > 0:
            raise ValueError(f"method.probe_lr must be > 0, got {self.probe_lr}")
        if not self.reg_weight >= 0:
            raise ValueError(f"method.reg_weight must be >= 0, got {self.reg_weight}")

    def check_model(self, num_layers: int, kv_heads: int) -> None:
        if self.head_patterns is not None:
            shape = tuple(load_head_patterns(self.head_patterns).shape)
            if shape != (num_layers, kv_heads):
                raise ValueError(
                    f"method.head_patterns={self.head_patterns!r} holds a {shape[0]} x {shape[1]} table; this model "
                    f"has {num_layers} layers x {kv_heads} KV heads"
                )

    def gates(self, model: PreTrainedModel) -> torch.Tensor:
        """[NL, Hkv] gates in [0, 1]: the pattern file's, or the identification's (run once per model and setting)."""
        config = model.config
        kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        if self.head_patterns is not None:
            self.check_model(config.num_hidden_layers, kv_heads)
            return load_head_patterns(self.head_patterns)
        text = calibration_path(self.calibration_file)
        key = ":".join(
            str(v)
            for v in (
                f"v{self.identification_version}",
                model_fingerprint(model),
                self.sink_size,
                self.recent_size,
                self.probe_length,
                self.probe_passkeys,
                self.passkey_length,
                self.probe_steps,
                self.probe_lr,
                self.reg_weight,
                self.probe_seed,
                text.name,
                text.stat().st_size,
            )
        )
        folder = cache_folder(self.gates_cache, "duo_attention")
        cached = None if folder is None else folder / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.pt"
        if key not in _GATES and cached is not None and cached.is_file():
            _GATES[key] = load_tensors(cached)["gates"]
            log.info("duo_attention: gates loaded from %s", cached)
        if key not in _GATES:
            vocab = model.get_input_embeddings().num_embeddings
            ids, answer = passkey_probe(
                text_ids(model, text, self.probe_length, "probe_length")[0],
                vocab,
                config.bos_token_id,
                self.probe_passkeys,
                self.passkey_length,
                self.probe_seed,
            )
            _GATES[key] = optimize_gates(
                model,
                ids,
                answer,
                self.sink_size,
                self.recent_size,
                self.probe_steps,
                self.probe_lr,
                self.reg_weight,
            )
            if cached is not None:
                save_tensors(cached, {"gates": _GATES[key]})
                log.info("duo_attention: gates saved to %s", cached)
        return _GATES[key]

    def prepare(self, model: PreTrainedModel) -> None:
        config = model.config
        kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        shape = (config.num_hidden_layers, kv_heads)
        eligible = ~torch.tensor(sliding_layers(model), dtype=torch.bool)
        gates = self.gates(model) if self._needs_gates() else torch.zeros(shape)
        retrieval = select_retrieval(gates, eligible, self.sparsity, self.threshold)
        unchanged = self._retrieval is not None and torch.equal(self._retrieval, retrieval)
        self._retrieval = retrieval
        log.log(
            logging.DEBUG if unchanged else logging.INFO,
            "duo_attention: %d of %d KV heads are retrieval heads: %s",
            retrieval.sum(),
            int(eligible.sum()) * kv_heads,
            retrieval.nonzero().tolist(),
        )

    def retrieval(self, layer: CompressedLayer) -> torch.Tensor:
        """[Hkv] bool: this layer's retrieval heads."""
        if self._retrieval is None:
            raise RuntimeError(
                "duo_attention has not identified its heads: build the cache with make_cache(model, ...), which "
                "calls method.prepare (wrapper methods do not forward it)"
            )
        return self._retrieval[layer.layer_idx].to(layer.device)

    def head_counts(self, layer: CompressedLayer, scores: torch.Tensor, target: int) -> torch.Tensor | None:
        retrieval = self.retrieval(layer)
        if not bool(retrieval.any()):
            return None  # streaming heads only: the budget, or the per-head budgets
        return torch.where(retrieval, layer.live().sum(dim=-1), head_caps(layer, layer.budget))

    def score(self, layer: CompressedLayer) -> torch.Tensor:
        """Keep order: the sinks, then the newest tokens; dead slots last."""
        positions = layer.positions
        sinks = (positions >= 0) & (positions < self.sink_size)
        order = positions.float() + sinks * 2.0 * (layer.seen + 1)  # sinks above every recent token
        return order.masked_fill(~layer.live(), float("-inf"))
