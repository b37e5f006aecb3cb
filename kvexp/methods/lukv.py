from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from kvexp.engine import Reallocation, Selection
from kvexp.engine import make_cache as engine_make_cache
from kvexp.engine.cache import ranking_keys
from kvexp.methods.base import Method, check_window, register
from kvexp.methods.calibration import DEFAULT_CACHE, TextCalibration
from kvexp.methods.criticalkv import output_projections
from kvexp.methods.scorer_wrapper import ScorerWrapper

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from kvexp.engine.cache import CompressedLayer

GRID = 99  # global compression ratios 1%, 2%, ..., 99%: the rows of a budget curve [99, NL, Hkv]


def grid_index(sigma: float) -> int:
    """The curve row of a global compression ratio: round(100 sigma) - 1 (half up), clamped to [0, 98]."""
    return min(GRID - 1, max(0, math.floor(sigma * 100 + 0.5) - 1))


def pava_nonincreasing(values: torch.Tensor) -> torch.Tensor:
    """The least-squares non-increasing fit of a sequence (pool adjacent violators, unit weights), clipped at 0: the
    convex-hull relaxation of a head's eviction loss, whose marginal decreases must not increase."""
    blocks: list[list[float]] = []  # [sum, count] of each pooled block
    for v in values.tolist():
        blocks.append([v, 1])
        while len(blocks) > 1 and blocks[-2][0] * blocks[-1][1] < blocks[-1][0] * blocks[-2][1]:
            total, count = blocks.pop()
            blocks[-1][0] += total
            blocks[-1][1] += count
    out = [total / count for total, count in blocks for _ in range(count)]
    return torch.tensor(out, dtype=torch.float64).clamp_min(0.0)


def marginal_gains(importance: torch.Tensor, scores: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """[N, T] per head: the oracle importance of its tokens in the metric's keep order (best first; equal scores
    newest first, the engine's order), made non-increasing by PAVA. Keeping the i best tokens of a head loses the
    importance of the others, so the i-th entry is the loss decrease the i-th kept token buys."""
    order = ranking_keys(scores, positions).argsort(dim=-1, descending=True)
    ranked = importance.double().gather(-1, order)
    return torch.stack([pava_nonincreasing(row) for row in ranked])


def greedy_ratios(gains: torch.Tensor) -> torch.Tensor:
    """[GRID, N] local prune ratios: at global ratio sigma = g / 100, the global greedy spends K = round((1 - sigma)
    N T) tokens one at a time on the head whose next token gains most; on non-increasing gains that is the K
    largest gains over all heads (equal gains: lower head, then earlier rank, first), and each head keeps its
    share of them."""
    heads, length = gains.shape
    order = torch.sort(gains.flatten(), descending=True, stable=True).indices
    owner = order // length
    ratios = []
    for g in range(1, GRID + 1):
        spent = math.floor((1 - g / 100) * heads * length + 0.5)
        kept = torch.bincount(owner[:spent], minlength=heads).double()
        ratios.append(1.0 - kept / length)
    return torch.stack(ratios)


def apportion(total: int, weights: torch.Tensor, caps: torch.Tensor) -> torch.Tensor:
    """`total` tokens [N] long split in proportion to `weights`, none above its cap (water-filling: a capped head's
    excess goes to the others in proportion; all-zero weights split evenly), floored, the remainder one token each
    by the largest fractional part (equal parts: the lower index). Never above sum(caps)."""
    weights, caps = weights.double().clamp_min(0.0), caps.long()
    shares = torch.zeros_like(weights)
    open_ = caps > 0
    left = float(min(total, int(caps.sum())))
    while bool(open_.any()) and left > 0:
        w = torch.where(open_, weights, 0.0)
        if float(w.sum()) <= 0.0:
            w = open_.double()
        share = left * w / w.sum()
        full = open_ & (share >= caps)
        if not bool(full.any()):
            shares = torch.where(open_, share, shares)
            break
        shares = torch.where(full, caps.double(), shares)
        left -= float(caps[full].sum())
        open_ = open_ & ~full
    counts = shares.floor().long().clamp(max=caps)
    remainder = min(total, int(caps.sum())) - int(counts.sum())
    if remainder > 0:
        fraction = torch.where(counts < caps, shares - counts, -1.0)
        counts[torch.sort(fraction, descending=True, stable=True).indices[:remainder]] += 1
    return counts


def allocate_tokens(
    curve: torch.Tensor, layers: list[int], budgets: list[int], seen: int, head_cap: float | None
) -> torch.Tensor:
    """LU-KV's online budgets [len(layers), Hkv] for a row that has seen `seen` tokens: the uniform allocation's
    total (every KV head of every compressed layer `min(budget, seen)`) spent by the curve's local keep rates
    (1 - prune ratio) at the global ratio `sigma = 1 - total / (N seen)`, each head at most `seen` (and
    `head_cap` x its layer's budget)."""
    kv_heads = curve.shape[2]
    total = kv_heads * sum(min(b, seen) for b in budgets)
    sigma = 1.0 - total / (len(layers) * kv_heads * seen)
    keep = 1.0 - curve[grid_index(sigma), layers].double()  # [L, Hkv]
    caps = torch.tensor([[seen] * kv_heads for _ in layers], dtype=torch.long)
    if head_cap is not None:
        caps = torch.minimum(caps, torch.tensor(budgets)[:, None].mul(head_cap).floor().long())
    return apportion(total, keep.flatten(), caps.flatten()).view(len(layers), kv_heads)


def protect(scores: torch.Tensor, positions: torch.Tensor, sink: int, window: int) -> torch.Tensor:
    """Scores with the first `sink` tokens and each row's `window` newest set to +inf (kept first)."""
    newest = positions.amax(dim=(1, 2))[:, None, None]
    protected = ((positions >= 0) & (positions < sink)) | (positions > newest - window)
    return scores.masked_fill(protected, float("inf"))


@torch.no_grad()
def oracle_importance(
    model: PreTrainedModel, ids: torch.Tensor, horizon: int, layers: list[int]
) -> dict[int, torch.Tensor]:
    """The oracle importance [Hkv, T] of each context token in `layers` (ids [1, T]): the model decodes `horizon`
    tokens greedily with the full cache, and token j of KV head g scores the largest
    `A[h, t, j] ||v_j W_o^h||_2` over the decoded tokens t and the query heads h of its group (its largest
    contribution to a future attention output, eager attention weights)."""
    length, w_o = ids.shape[1], output_projections(model)
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")  # the implementation that returns attention weights
    try:
        out = model(ids, use_cache=True)
        cache, tokens = out.past_key_values, [ids]
        for step in range(horizon):
            tokens.append(out.logits[:, -1:].argmax(dim=-1))
            if step + 1 < horizon:
                out = model(tokens[-1], past_key_values=cache, use_cache=True)
        full = model(torch.cat(tokens, dim=1), output_attentions=True, use_cache=True)
    finally:
        model.set_attn_implementation(previous)
    importance = {}
    for i in layers:
        attention = full.attentions[i][0, :, length:, :length].float()  # [H, K, T]
        values = full.past_key_values.layers[i].values[0, :, :length].float()  # [Hkv, T, D]
        heads, kv_heads = attention.shape[0], values.shape[0]
        group = heads // kv_heads
        norms = torch.stack(
            [(values[h // group] @ w_o[i][h].float().to(values.device)).norm(dim=-1) for h in range(heads)]
        )  # [H, T]
        contribution = attention.amax(dim=1) * norms  # norms >= 0: max over t of A * norm
        importance[i] = contribution.view(kv_heads, group, length).amax(dim=1).cpu()
    return importance


@torch.no_grad()
def metric_scores(
    model: PreTrainedModel, scorer: Method, ids: torch.Tensor, sink: int, window: int
) -> dict[int, tuple[torch.Tensor, ...]]:
    """The scorer's scores [Hkv, T] and positions of the context `ids` [1, T] in each layer it compresses, as at a
    compression right after a prefill of them (a kvexp cache that keeps everything), sinks and window protected."""
    cache = engine_make_cache(model, scorer, ids.shape[1])
    cache.admit(ids.shape[1])  # the context is observed, never compressed
    model(ids, past_key_values=cache)
    out = {}
    for layer in cache.layers:
        if layer.budget is None:
            continue
        scores = scorer.score(layer)
        scores = scores.scores if isinstance(scores, Selection) else scores
        scores = protect(
            scores.float().masked_fill(~layer.live(), float("-inf")), layer.positions, sink, window
        )
        out[layer.layer_idx] = (scores[0].cpu(), layer.positions[0].cpu())
    return out


def profile_contexts(ids: torch.Tensor, length: int) -> list[torch.Tensor]:
    """The profiling contexts: the text's tokens `ids` [1, T] cut into consecutive windows [1, length] (a shorter
    tail is dropped)."""
    if ids.shape[1] < length:
        raise ValueError(
            f"method.probe_length ({length}) is longer than the profiling text's {ids.shape[1]} tokens (its first "
            "calibration_tokens, at most the model's maximum positions)"
        )
    return [ids[:, start : start + length] for start in range(0, ids.shape[1] - length + 1, length)]


def profile_curve(
    model: PreTrainedModel, scorer: Method, sink: int, window: int, contexts: list[torch.Tensor], horizon: int
) -> torch.Tensor:
    """LU-KV's offline profile [GRID, NL, Hkv] of local prune ratios, averaged over the `contexts` ([1, T] each):
    per context, each compressed head's gains (`marginal_gains`: oracle importance over `horizon` decoded tokens in
    the scorer's keep order, PAVA) and the global greedy at every grid ratio (`greedy_ratios`). Layers the method
    never compresses (Gemma-3's local ones, a scorer's skipped layers) get the global ratio itself (unused)."""
    config = model.config
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    previous = config._attn_implementation
    total, layers = None, []
    try:
        for ids in contexts:
            scores = metric_scores(model, scorer, ids, sink, window)
            layers = sorted(scores)
            importance = oracle_importance(model, ids, horizon, layers)
            gains = torch.cat(
                [marginal_gains(importance[i], scores[i][0], scores[i][1]) for i in layers]
            )  # [len(layers) * Hkv, T]
            ratios = greedy_ratios(gains)
            total = ratios if total is None else total + ratios
    finally:
        model.set_attn_implementation(previous)
    sigma = torch.arange(1, GRID + 1, dtype=torch.float64) / 100
    curve = sigma[:, None, None].repeat(1, config.num_hidden_layers, kv_heads)
    if layers:
        curve[:, layers] = (total / len(contexts)).view(GRID, len(layers), kv_heads)
    return curve


def load_curve(path: str | Path) -> torch.Tensor:
    """A budget curve file: a .npy [99, NL, Hkv] of local prune ratios in [0, 1] (the authors' format)."""
    path = Path(path)
    if not path.is_file() or path.suffix != ".npy":
        raise ValueError(f"method.curve={str(path)!r} must be an existing .npy file")
    try:
        curve = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as err:
        raise ValueError(f"method.curve={str(path)!r} cannot be read: {err}") from err
    if curve.ndim != 3 or curve.shape[0] != GRID:
        raise ValueError(
            f"method.curve={str(path)!r} must have shape [{GRID}, layers, KV heads], got {curve.shape}"
        )
    if not np.isfinite(curve).all() or curve.min() < 0 or curve.max() > 1:
        raise ValueError(f"method.curve={str(path)!r} must hold prune ratios in [0, 1]")
    return torch.from_numpy(curve.astype(np.float64))


@register
@dataclass
class LUKV(TextCalibration, ScorerWrapper):
    """LU-KV (Tang, Jiao, Chen, Liu, Li, Chen, ICML 2026, arXiv 2602.08585: "Predicting Future Utility: Global
    Combinatorial Optimization for Task-Agnostic KV Cache Eviction"): layer and head budgets around any scorer, from
    each head's long-horizon marginal utility.

    Offline, once per model and setting (or the authors' `curve` file): a token's oracle importance is its largest
    contribution `A ||v W_o^h||_2` to the attention output over a future decoding window (`oracle_importance`: the
    max over the decoded tokens and the query heads of the KV head's group); keeping a head's i best tokens by the
    scorer loses the importance of the others, a discrete loss curve that PAVA relaxes to its convex hull
    (`marginal_gains`: non-increasing gains); a global greedy over every KV head of every compressed layer spends
    the total where the next token gains most (optimal on the relaxed curves: layer-wise and head-wise at once), at
    each global compression ratio 1%..99% (`greedy_ratios`), and the local prune ratios are averaged over the
    profiling contexts: the curve [99, NL, Hkv] (`profile_curve`). Online, at every compression, for a row that has
    seen T tokens: the uniform allocation's total (each KV head of each compressed layer `min(budget, T)`) sets the
    global ratio, its curve row (rounded half up to a percent) gives each head's keep rate, and the total is split
    in those proportions (`apportion`, largest remainder: the totals equal the uniform allocation's; no head above
    T, nor `head_cap` x its layer's budget). Inside a head the scorer's scores choose, the first `sink_tokens` and
    newest `window` tokens first. Defaults: the authors' released curve setting, expected attention with epsilon
    0.02, sink 4, window 1 (kvpress's LUKVPress); another scorer takes its own `scorer_params` (the default's
    `epsilon` is expected attention's).
    Each layer's engine budget follows its longest head at every step (`allocate`: a `Reallocation` of the layer
    itself), so a layer compresses whenever one of its heads holds more than its LU-KV budget: memory per layer =
    its longest head, and the live entries total the uniform allocation's after every compression. The uniform
    budgets are recorded at the first step (and raised by the cache's `admit`, whose step does not compress).
    Explicit per-head budgets (`budget.per_head`) take precedence. A head keeps at most what it still holds (evicted
    tokens do not return). The scorer's own layer allocation (pyramidkv's pyramid) is not used, scorers that
    allocate across layers are refused (LU-KV allocates), and a scorer that reads the layer's budget (criticalkv's
    two stages) reads that per-step budget.
    Profiling text: the first `calibration_tokens` tokens of `calibration_file` (None: the embedded public-domain
    novel, as ZACK's and Q-Filters' calibrations; the paper profiles on a ~4k-token text), cut into consecutive
    contexts of `probe_length` tokens, each followed by `probe_horizon` greedily decoded tokens as its future (the
    paper: 30 decoded queries); the curve is cached per model and setting in `calibration_cache`.
    Deviations: the contexts are `probe_length` windows of the text, not the whole text in one pass (eager attention
    weights over 4k tokens do not fit a small machine's memory); the budgets apply at every compression (streaming,
    decoding), not once after the prefill (`engine.when=prefill` for that). kvpress (which needs a curve file per
    model and scorer) rounds each layer's keep total on its own and keeps at least one token per head; here the
    whole cache's total is exact.
    """

    name = "lukv"
    calibration_dir = "lukv"
    description = (
        "layer and head budgets from offline long-horizon utility curves around a scorer (Tang et al. 2026)"
    )
    scorer: str = "expected_attention"
    scorer_params: dict[str, Any] = field(default_factory=lambda: {"epsilon": 0.02})
    sink_tokens: int = 4
    window: int = 1
    head_cap: float | None = None
    curve: str | None = None
    calibration_file: str | None = None
    calibration_tokens: int = 4096
    calibration_cache: str | None = DEFAULT_CACHE
    probe_length: int = 512
    probe_horizon: int = 32
    # What `prepare` learns from the model: the budget curve [GRID, NL, Hkv] of local prune ratios.
    _curve: torch.Tensor | None = field(default=None, init=False, repr=False, compare=False)
    _model_key: str | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self._scorer.allocates:
            raise ValueError(
                f"method.scorer={self.scorer} allocates budgets across layers, which lukv does itself; use a scorer "
                "that does not"
            )

    @property
    def allocates(self) -> bool:
        return True  # each layer's budget follows its longest head (`allocate`)

    def validate(self, budget: int | None) -> None:
        if self.sink_tokens < 0:
            raise ValueError(f"method.sink_tokens must be >= 0, got {self.sink_tokens}")
        check_window("window", self.window)  # with the sinks, smaller than the budget (below)
        if budget is not None and self.sink_tokens + self.window >= budget:
            raise ValueError(
                f"method.sink_tokens + method.window ({self.sink_tokens + self.window}) must be smaller than the "
                f"budget ({budget}) so that the scorer chooses some tokens"
            )
        if self.head_cap is not None and not self.head_cap >= 1.0:
            raise ValueError(
                f"method.head_cap must be >= 1 (a head's share of the total is its layer's budget on average) or "
                f"null, got {self.head_cap}"
            )
        if self.curve is not None:
            path = Path(self.curve)
            if not path.is_file() or path.suffix != ".npy":
                raise ValueError(f"method.curve={self.curve!r} must be an existing .npy file")
        else:
            if self.probe_horizon < 1:
                raise ValueError(f"method.probe_horizon must be >= 1, got {self.probe_horizon}")
            if self.probe_length <= self.sink_tokens + self.window + 1:
                raise ValueError(
                    f"method.probe_length ({self.probe_length}) must exceed sink_tokens + window + 1 "
                    f"({self.sink_tokens + self.window + 1})"
                )
            try:
                self._scorer.validate(self.probe_length)
            except ValueError as err:
                raise ValueError(
                    f"method.probe_length ({self.probe_length}) does not suit the scorer: {err}"
                ) from err
            self.check_calibration(min_tokens=self.probe_length)  # at least one context
        super().validate(budget)

    def check_model(self, num_layers: int, kv_heads: int) -> None:
        super().check_model(num_layers, kv_heads)
        if self.curve is not None:
            shape = tuple(load_curve(self.curve).shape[1:])
            if shape != (num_layers, kv_heads):
                raise ValueError(
                    f"method.curve={self.curve!r} is for {shape[0]} layers x {shape[1]} KV heads; this model has "
                    f"{num_layers} x {kv_heads}"
                )

    def prepare(self, model: PreTrainedModel) -> None:
        super().prepare(model)
        config = model.config
        kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        if self.curve is not None:
            self.check_model(config.num_hidden_layers, kv_heads)
            self._curve = load_curve(self.curve)
            return
        tensors = self.calibrated(
            model,
            lambda: {
                "curve": profile_curve(
                    model,
                    self._scorer,
                    self.sink_tokens,
                    self.window,
                    profile_contexts(self.calibration_ids(model).to(model.device), self.probe_length),
                    self.probe_horizon,
                )
            },
        )
        if tensors is not None:
            self._curve = tensors["curve"]

    def calibration_tag(self) -> str:
        return f":{self._scorer!r}:{self.sink_tokens}:{self.window}:{self.probe_length}:{self.probe_horizon}"

    def layer_budgets(self, budgets: list[int | None]) -> list[int | None]:
        # The scorer's skipped layers stay uncompressed; its layer allocation (a pyramid) is not used.
        return [
            None if s is None else b
            for b, s in zip(budgets, self._scorer.layer_budgets(budgets), strict=True)
        ]

    def _shared(self, layer: CompressedLayer) -> dict[str, Any]:
        """The cache's LU-KV state: each allocated layer's uniform budget (recorded at the first step, raised with
        the cache's `admit`), the step an admission was made for, and the allocation of the current step."""
        shared, cache = layer.cache.scratch(self), layer.cache
        if "base" not in shared:
            shared["base"] = {
                i: other.budget
                for i, other in enumerate(cache.layers)
                if other.budget is not None and other.head_budgets is None
            }
            shared["allocated"], shared["admitted_at"] = cache.allocated, None
        elif cache.allocated != shared["allocated"]:
            # `admit(n)` raised every budget by n (and the cache's total by n per layer with a budget).
            raised = (cache.allocated - shared["allocated"]) // sum(
                o.budget is not None for o in cache.layers
            )
            shared["base"] = {i: b + raised for i, b in shared["base"].items()}
            shared["allocated"], shared["admitted_at"] = cache.allocated, layer.seen
        return shared

    def head_budgets_now(self, layer: CompressedLayer) -> torch.Tensor:
        """[B, Hkv] long: every row's LU-KV budgets for this layer at its current length (the allocation of all
        allocated layers, computed once per step and shared by them in the cache's scratch)."""
        if self._curve is None:
            raise RuntimeError(
                "lukv has no budget curve: build the cache with make_cache(model, ...), which calls method.prepare"
            )
        shared = self._shared(layer)
        layers = sorted(shared["base"])
        budgets = [shared["base"][i] for i in layers]
        seen = layer.rows_seen().tolist()  # each row's real tokens
        key = (tuple(seen), tuple(budgets))
        if shared.get("key") != key:
            shared["key"] = key
            shared["counts"] = [allocate_tokens(self._curve, layers, budgets, t, self.head_cap) for t in seen]
        row = layers.index(layer.layer_idx)
        return torch.stack([counts[row] for counts in shared["counts"]]).to(layer.device)

    def head_counts(self, layer: CompressedLayer, scores: torch.Tensor, target: int) -> torch.Tensor | None:
        if layer.head_budgets is not None:
            return None  # explicit per-head budgets take precedence
        return torch.minimum(self.head_budgets_now(layer), layer.live().sum(dim=-1))

    def allocate(self, layer: CompressedLayer) -> Reallocation | None:
        """The layer's budget for this step: its longest head's LU-KV budget, or just below its length when a head
        holds more than its budget while the layer is no longer than that (the engine compresses a layer that is
        longer than its budget + slack); unchanged in a step the cache admitted (`admit`: it must not compress)."""
        if layer.head_budgets is not None:
            return None
        shared = self._shared(layer)
        if shared["admitted_at"] == layer.seen:
            return None
        counts, slack = self.head_counts(layer, None, 0), layer.options.slack
        longest = int(counts.max())
        budget = longest
        if bool((layer.live().sum(dim=-1) > counts + slack).any()) and layer.length <= longest + slack:
            budget = max(0, layer.length - 1 - slack)
        return None if budget == layer.budget else Reallocation({layer.layer_idx: budget})

    def score(self, layer: CompressedLayer) -> torch.Tensor:
        return protect(self.base_scores(layer), layer.positions, self.sink_tokens, self.window)
