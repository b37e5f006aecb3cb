from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from kvexp.data import required_data_file
from kvexp.engine import model_rotary
from kvexp.methods.base import Method, register
from kvexp.methods.calibration import DEFAULT_CACHE, TextCalibration, load_tensors
from kvexp.methods.expected_attention import check_future_and_sinks, expected_attention_scores
from kvexp.methods.qfilter import query_moments
from kvexp.models import check_safetensors

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from kvexp.engine.cache import CompressedLayer

STATS_SUFFIXES = (".safetensors", ".pt")


def query_statistics(model: PreTrainedModel, input_ids: torch.Tensor, n_sink: int) -> dict[str, torch.Tensor]:
    """Per layer and query head, the mean [NL, H, D] and the covariance [NL, H, D, D] (unbiased, 1 / (N - 1)) of
    the model's pre-RoPE queries over `input_ids` [1, T], its first `n_sink` positions left out, fp32: one forward
    (`query_moments`), the moments reduced in fp64."""
    count = input_ids.shape[1] - n_sink
    if count < 2:
        raise ValueError(
            f"method.calibration_tokens: {input_ids.shape[1]} calibration tokens leave {count} queries after the "
            f"n_sink={n_sink} sinks; the covariance needs at least 2"
        )
    gram, total = query_moments(model, input_ids, rotary=model_rotary(model), skip=n_sink)
    mean = total / count
    cov = (gram - count * mean[..., :, None] * mean[..., None, :]) / (count - 1)
    return {"query_mean": mean.float(), "query_cov": cov.float()}


def attention_scales(model: PreTrainedModel) -> dict[int, float]:
    """Each layer's attention logit scale, as its attention module hands it to the attention (`module.scaling`)."""
    return {
        module.layer_idx: float(module.scaling)
        for module in model.modules()
        if isinstance(getattr(module, "layer_idx", None), int)
        and isinstance(getattr(module, "scaling", None), int | float)
    }


@register
@dataclass
class ExpectedAttentionStats(TextCalibration, Method):
    """Expected Attention with precomputed query statistics (Devoto, Jeblick, Jégou, arXiv 2510.00636; kvpress
    ExpectedAttentionStatsPress).

    The rule is `expected_attention`'s (the same scoring function): the future queries are a Gaussian whose
    pre-RoPE mean mu and covariance Sigma, per layer and query head, are turned by RoPE averaged over the
    `n_future_positions` positions after each row's newest token; a key scores its expected softmax attention
    s mu'.k + s^2/2 k^T Sigma' k (`use_covariance`), softmaxed over the non-sink keys, averaged over the GQA group,
    times (p + `epsilon`) ||v|| (`use_vnorm`); the first `n_sink` tokens are kept. Only the statistics differ: they
    are not the context's own queries but constants of the model, computed once offline.

    Calibration (once per model, cached in `calibration_cache`/expected_attention_stats/ as safetensors): one
    forward over the first `calibration_tokens` tokens of `calibration_file` (None: the embedded public-domain novel,
    as qfilter) records every layer's pre-RoPE queries (the attention's queries rotated back, after q_norm where the
    model has one), positions < `n_sink` left out; mu is their mean, Sigma their covariance (1 / (N - 1), as
    kvpress). `stats_file` loads them instead: a .safetensors (or .pt) file holding `query_mean` [layers, heads,
    head_dim] and `query_cov` [layers, heads, head_dim, head_dim] (kvpress's names; the model.safetensors of its saved
    statistics folder is such a file, and so is this method's cache file); absolute or relative to $KVEXP_DATA_DIR.
    The logit scale s is each attention module's own (`scaling`), read in `prepare`.

    Since nothing depends on the row, rows batch (each row's rotation starts after its own newest position), and the
    method needs no queries: it compresses an existing cache too. Deviations: kvpress computes its statistics on 100
    booksum chapters cut to 1,000 characters each (hub data kvexp cannot reach) and loads them from the hub; here one
    local sequence of `calibration_tokens` tokens. The paper estimates the statistics from the context itself
    (`expected_attention`); the precomputed form is kvpress's.
    """

    name = "expected_attention_stats"
    calibration_dir = "expected_attention_stats"
    calibration_suffix = ".safetensors"
    description = (
        "expected attention of future queries from precomputed per-head query statistics, times value norms "
        "(Devoto et al. 2025)"
    )
    row_budgets = True  # its scores never read the budget
    n_future_positions: int = 512
    n_sink: int = 4
    use_covariance: bool = True
    use_vnorm: bool = True
    epsilon: float = 0.0
    stats_file: str | None = None
    calibration_file: str | None = None
    calibration_tokens: int = 2048
    calibration_cache: str | None = DEFAULT_CACHE
    query_mean: torch.Tensor | None = field(default=None, init=False, repr=False, compare=False)  # [NL, H, D]
    query_cov: torch.Tensor | None = field(
        default=None, init=False, repr=False, compare=False
    )  # [NL, H, D, D]
    _scales: dict[int, float] = field(default_factory=dict, init=False, repr=False, compare=False)
    _model_key: str | None = field(default=None, init=False, repr=False, compare=False)

    def validate(self, budget: int | None) -> None:
        check_future_and_sinks(self.n_future_positions, self.n_sink, self.epsilon, budget)
        if self.stats_file is not None:
            self._stats_path()
        else:
            self.check_calibration(min_tokens=self.n_sink + 2)

    def _stats_path(self) -> Path:
        path = required_data_file(self.stats_file, "method.stats_file")
        if path.suffix not in STATS_SUFFIXES:
            raise ValueError(f"method.stats_file {path} must be a {' or '.join(STATS_SUFFIXES)} file")
        if path.suffix == ".safetensors":
            check_safetensors(path, "method.stats_file")
        return path

    def calibration_tag(self) -> str:
        return f":expected_attention_stats:sink{self.n_sink}"  # the sinks are left out of the statistics

    def prepare(self, model: PreTrainedModel) -> None:
        """Load `stats_file`, or calibrate on the model (or load its cached calibration), once per model; check that
        the statistics fit the model and read its attention scales."""
        if self.stats_file is not None:
            path, tensors = self._stats_path(), None
            if self._model_key != f"file:{path}":
                tensors, self._model_key = load_tensors(path), f"file:{path}"
            where = f"method.stats_file {path}"
        else:
            tensors = self.calibrated(
                model, lambda: query_statistics(model, self.calibration_ids(model), self.n_sink)
            )
            where = "the calibration"
        if tensors is not None:
            missing = sorted({"query_mean", "query_cov"} - set(tensors))
            if missing:
                self._model_key = None
                raise ValueError(f"{where} holds no {' or '.join(missing)} tensor (it has {sorted(tensors)})")
            self.query_mean, self.query_cov = tensors["query_mean"].float(), tensors["query_cov"].float()
        self._check_fits(model, where)
        self._scales = attention_scales(model)

    def _check_fits(self, model: PreTrainedModel, where: str) -> None:
        config = model.config.get_text_config()
        heads = config.num_attention_heads
        dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        shape = (config.num_hidden_layers, heads, dim)
        if tuple(self.query_mean.shape) != shape or tuple(self.query_cov.shape) != (*shape, dim):
            raise ValueError(
                f"{where}: query_mean {list(self.query_mean.shape)} and query_cov {list(self.query_cov.shape)} do "
                f"not fit {type(model).__name__} ([layers, heads, head_dim] = {list(shape)}, and head_dim twice)"
            )

    def statistics_of(self, layer: CompressedLayer) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's query mean [1, H, D] and covariance [1, H, D, D] on its device (one for every row)."""
        if self.query_mean is None:
            raise RuntimeError(
                "expected_attention_stats has no statistics: build the cache with make_cache, which calls prepare"
            )
        i = layer.layer_idx
        return self.query_mean[i][None].to(layer.device), self.query_cov[i][None].to(layer.device)

    def score(self, layer: CompressedLayer) -> torch.Tensor:
        mean, cov = self.statistics_of(layer)
        scale = self._scales.get(layer.layer_idx, mean.shape[-1] ** -0.5)
        return expected_attention_scores(
            layer,
            mean,
            cov if self.use_covariance else None,
            self.n_future_positions,
            self.n_sink,
            self.use_vnorm,
            self.epsilon,
            scale,
        )
