from dataclasses import dataclass, field

import torch

from kvexp.methods.base import register
from kvexp.methods.scoring import prerope_keys
from kvexp.methods.snapkv import SnapKV


def elbow(spectrum: torch.Tensor) -> torch.Tensor:
    """How many eigenvalues [..., d] (descending) lie up to the elbow, [...] long: the kneedle rule, the point
    farthest from the chord joining the first and the last eigenvalue once both axes are scaled to [0, 1]. A
    flat spectrum has no elbow: all d."""
    d = spectrum.shape[-1]
    first, last = spectrum[..., :1], spectrum[..., -1:]
    drop = first - last
    height = (spectrum - last) / drop.clamp_min(torch.finfo(spectrum.dtype).tiny)
    off_chord = (1 - torch.linspace(0, 1, d, dtype=spectrum.dtype, device=spectrum.device) - height).abs()
    knee = off_chord.argmax(dim=-1) + 1
    return torch.where(drop[..., 0] > 1e-12, knee, d)


def truncated_entropy(x: torch.Tensor, top: int | None = None) -> torch.Tensor:
    """UNComp's truncated matrix entropy of token matrices x [..., s, d] -> [...] (fp64).

    `Sigma = X X^T / tr(X X^T)` (its non-zero spectrum is that of the d x d `X^T X`, which is what is
    decomposed), eigenvalues `lambda_1 >= lambda_2 >= ...`, `E = -sum_{i <= K} lambda_i ln lambda_i` over the
    top `K` (`top`, or the `elbow` of each spectrum). Zero rows (dead slots) do not change it.
    """
    x = x.double()
    gram = x.transpose(-1, -2) @ x  # [..., d, d]
    spectrum = torch.linalg.eigvalsh(gram).flip(-1).clamp_min(0)  # descending
    spectrum = spectrum / spectrum.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
    k = elbow(spectrum) if top is None else torch.full(spectrum.shape[:-1], top, device=x.device)
    terms = -torch.special.xlogy(spectrum, spectrum)  # 0 ln 0 = 0
    inside = torch.arange(spectrum.shape[-1], device=x.device) < k[..., None]
    return (terms * inside).sum(dim=-1)


def group_budgets(
    entropy: torch.Tensor, weights: list[float], budget: int | torch.Tensor, window: int
) -> torch.Tensor:
    """Per-head budgets [..., Hkv] from head entropies [..., Hkv] (one layer, or each batch row's; `budget` one, or
    each row's [B, 1]): heads sorted by entropy fall into `len(weights)` groups of (nearly) equal size, lowest
    entropy first; head h keeps the window plus a share of the layer's `Hkv * (budget - window)` selected tokens
    proportional to its group's weight (largest remainder, ties to the lower head), so the layer's total stays
    `Hkv * budget`."""
    heads = entropy.shape[-1]
    rank = entropy.argsort(dim=-1, stable=True).argsort(dim=-1)  # 0 = lowest entropy
    weight = torch.tensor(weights, dtype=torch.float64, device=entropy.device)[rank * len(weights) // heads]
    selected = heads * (budget - window)
    share = selected * weight / weight.sum(dim=-1, keepdim=True)
    counts = share.floor()
    left = selected - counts.sum(dim=-1, keepdim=True).long()  # the remainders' tokens
    extra = (counts - share).argsort(dim=-1, stable=True).argsort(dim=-1) < left
    return counts.long() + extra.long() + window


@register
@dataclass
class UNComp(SnapKV):
    """UNComp (Xiong et al., arXiv 2410.03090, 2024) in its KV-only variant ("Ours-group"): per-head budgets
    by the truncated matrix entropy of the heads' keys, SnapKV votes inside each head.

    Truncated matrix entropy (`truncated_entropy`: the trace-normalized Gram spectrum's top-K eigenvalues, K
    up to the elbow or `top_eigen`) measures how much a head's token representations spread; heads with
    higher entropy keep more of the cache. At a layer's first compression each KV head's entropy is computed
    from the pre-RoPE keys the cache holds (the prompt at prefill; each batch row from its own, at its own first
    compression), the layer's heads are split by entropy into `len(group_weights)` equal groups, lowest first, and
    share `Hkv * budget` in proportion to their group's weight, window included (`group_budgets`). The budgets hold
    for the rest of the sequence; inside a head SnapKV's window votes pick the tokens. A layer is as long as its
    longest head (shorter heads hold dead slots); per-head budgets (`budget.per_head`) take precedence. GQA: entropy and
    budget are per KV head, shared by its query heads (the model's native grouping, not the paper's unverified
    "training-free GQA" regrouping).
    Open in the paper (docs/methods.md#uncomp), chosen here: the keys (the paper finds Q and K alike), pre-RoPE (the
    rotation would add position-driven rank), the Gram not centered, the kneedle elbow, two groups weighted
    1:3, SnapKV with KVCache-Factory's defaults (w=8, k=7, maxpool) inside heads, and the prompt instead of an
    offline WikiText-2 calibration (a cache has no tokenizer or corpus; the groups become task-aware). Not
    implemented: "Ours-group-stage"'s hidden-state pruning by layer entropy at prefill, which changes the
    forward pass rather than the cache and needs the unspecified stage threshold.
    """

    name = "uncomp"
    row_budgets = True  # each row's head budgets split its own budget
    row_scratch = ("budgets", "decided")  # [B, Hkv] head budgets, [B] whether the row has them yet
    description = "head budgets by truncated matrix entropy of the keys, SnapKV inside (Xiong et al. 2024)"
    window_size: int = 8
    group_weights: list[float] = field(default_factory=lambda: [0.5, 1.5])
    top_eigen: int | None = None

    def validate(self, budget: int | None) -> None:
        super().validate(budget)
        if not self.group_weights or any(w <= 0 for w in self.group_weights):
            raise ValueError(
                f"method.group_weights must be a non-empty list of weights > 0, got {self.group_weights}"
            )
        if self.top_eigen is not None and self.top_eigen < 1:
            raise ValueError(f"method.top_eigen must be >= 1 or null (the elbow), got {self.top_eigen}")

    def head_counts(self, layer, scores: torch.Tensor, target: int | torch.Tensor) -> torch.Tensor | None:
        if layer.head_budgets is not None:
            return None
        # Each row's head budgets [B, Hkv], from its own keys at its first compression.
        deciding = layer.deciding_rows(self)
        if bool(deciding.any()):
            keys = prerope_keys(layer).masked_fill(~layer.live()[..., None], 0.0)
            entropy = truncated_entropy(keys, self.top_eigen)  # [B, Hkv]
            budgets = group_budgets(entropy, self.group_weights, target, self.window_size)
            layer.decide(self, deciding, budgets=budgets)
        return layer.scratch(self)["budgets"].clamp_max(layer.length)
