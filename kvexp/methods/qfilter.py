from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from kvexp.methods.base import Method, check_window, register
from kvexp.methods.calibration import DEFAULT_CACHE, TextCalibration, record_attention_inputs
from kvexp.methods.scoring import prerope_queries, protect_recent
from kvexp.methods.zack import basis_from_gram

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from kvexp.engine.cache import CompressedLayer, Rotary

log = logging.getLogger(__name__)


def query_moments(
    model: PreTrainedModel, input_ids: torch.Tensor, rotary: Rotary | None = None, skip: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward over `input_ids` [1, T] (`record_attention_inputs`: the model's own masks, sliding windows
    included) recording, per layer and query head, the Gram matrix Q^T Q [D, D] and the sum of the rows [D] of its
    queries Q [T - skip, D], the first `skip` positions left out: ([NL, H, D, D], [NL, H, D]), fp64. The queries are
    the attention's post-RoPE ones, or, given the model's `rotary`, turned back to pre-RoPE (`prerope_queries`)."""
    moments: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def record(module, query, key, value):
        if rotary is not None:
            positions = torch.arange(query.shape[2], device=query.device)[None].expand(query.shape[0], -1)
            query = prerope_queries(query, positions, rotary)
        rows = query[:, :, skip:].double()  # [B, H, T - skip, D]
        moments[module.layer_idx] = ((rows.transpose(-1, -2) @ rows).sum(0), rows.sum(dim=(0, 2)))

    record_attention_inputs(model, input_ids, record)
    layers = sorted(moments)
    return (
        torch.stack([moments[i][0] for i in layers]).cpu(),
        torch.stack([moments[i][1] for i in layers]).cpu(),
    )


def query_directions(gram: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """Each query head's Q-Filter direction u+ [..., D] (fp32, unit): the first right singular vector of its query
    matrix Q (the top eigenvector of Q^T Q, `gram` [..., D, D]), signed so that the queries project on it positively
    on average (the paper's E<Q, u> > 0: sum(Q) . u > 0, `total` [..., D] the sum of the rows)."""
    basis, _ = basis_from_gram(gram)
    first = basis[..., :, 0]  # [..., D]
    sign = torch.where((total.double() * first).sum(-1) < 0, -1.0, 1.0).to(first.dtype)
    return (first * sign[..., None]).float()


def group_filters(directions: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """Per-KV-head filters [NL, Hkv, D] from the per-query-head directions [NL, H, D]: the mean over each KV head's
    G = H / Hkv query heads (query head h = kv * G + g, transformers' repeat_kv layout), as the authors'
    make_filters.py and so kvpress's filters: a key's score is the mean of its projections on the group's u+."""
    layers, heads, dim = directions.shape
    return directions.view(layers, kv_heads, heads // kv_heads, dim).mean(dim=2)


@register
@dataclass
class QFilter(TextCalibration, Method):
    """Q-Filters (Godey, Devoto, Zhao, Scardapane, Minervini, de la Clergerie, Sagot, arXiv 2503.02812; kvpress
    QFilterPress): keep the keys with the largest projection on the queries' main direction.

    Calibration (once per model, cached in `calibration_cache`): one forward over the first `calibration_tokens`
    tokens of `calibration_file` records each query head's post-RoPE queries Q (the queries as the attention gets
    them, as the authors' make_filters.py takes them after the rotary embedding); the head's filter u+ is Q's first
    right singular vector, signed so that the queries project on it positively on average (E<Q, u+> > 0). The
    paper's result E_Q<Q, k> ~ kappa <k, u+> with kappa > 0 makes <k, u+> the key's expected logit up to scale: the
    score is <k, u+> on the post-RoPE keys, and the keys with the lowest projection (the lowest predicted
    attention) are dropped. GQA: a KV head's filter is the mean of its query heads' u+ (the authors' filters, which
    kvpress loads, are averaged so), i.e. a key's score is the mean of its projections over the group.
    `window_size` newest tokens are always kept (the authors' QFiltersCache keeps such a window, its
    `window_length`; kvpress and the default 0 score every entry).

    The default calibration text is the public-domain novel shipped in kvexp/data/haystack (the retrieval tasks'
    haystack), so a fresh clone calibrates offline; `calibration_file` names a local file instead (a .txt, or a
    JSONL of `text` records; absolute, or relative to $KVEXP_DATA_DIR). Deviations: the authors take 3,000 query
    vectors drawn at random from 20 sequences of 2,048 tokens of a web corpus and flip the sign by the majority of
    the projections' signs; here every query of one sequence counts (the SVD through the Gram matrix, exact and
    deterministic) and the sign is the mean's (the paper's condition); kvpress downloads the authors' filters from
    the hub, which kvexp cannot reach.
    """

    name = "qfilter"
    row_budgets = True  # its scores never read the budget
    calibration_dir = "qfilter"
    description = (
        "keep keys with the largest projection on the queries' main SVD direction (Godey et al. 2025)"
    )
    window_size: int = 0
    calibration_file: str | None = None
    calibration_tokens: int = 2048
    calibration_cache: str | None = DEFAULT_CACHE
    directions: torch.Tensor | None = field(default=None, init=False, repr=False, compare=False)
    _model_key: str | None = field(default=None, init=False, repr=False, compare=False)

    def validate(self, budget: int | None) -> None:
        check_window("window_size", self.window_size, budget)
        self.check_calibration()

    def prepare(self, model: PreTrainedModel) -> None:
        """Calibrate on the model (or load its cached calibration), once per model."""
        tensors = self.calibrated(
            model,
            lambda: {"directions": query_directions(*query_moments(model, self.calibration_ids(model)))},
        )
        if tensors is not None:
            self.directions = tensors["directions"]

    def filters(self, kv_heads: int) -> torch.Tensor:
        """The per-KV-head filters [NL, Hkv, D] (`group_filters` of the calibrated directions)."""
        if self.directions is None:
            raise RuntimeError(
                "qfilter has not calibrated: build the cache with make_cache, which calls prepare"
            )
        return group_filters(self.directions, kv_heads)

    def score(self, layer: CompressedLayer) -> torch.Tensor:
        direction = self.filters(layer.kv_heads)[layer.layer_idx].to(layer.device)  # [Hkv, D]
        scores = torch.einsum("bhnd,hd->bhn", layer.keys.float(), direction)
        return protect_recent(scores, layer.positions, self.window_size) if self.window_size else scores
