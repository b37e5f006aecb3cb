"""train=learned_scorer: fit method=learned's per-layer MLPs to an attention oracle of the frozen model.

Data: `texts` windows of `max_tokens` tokens from local Gutenberg books (`data_file`, JSONL `text`, relative to
$KVEXP_DATA_DIR; window i is book i mod n_books, its (i div n_books)-th window after `skip_chars`). Each window
runs once through the frozen model with the full cache and eager attention; per layer this records the
attention-input hidden states, post-RoPE keys and values, and the attention probabilities reduced over each
GQA group with `method.gqa` (A[h, i, j]: query i, key j).

Samples: at `decision_points` times t per window (uniform in [T/4, T-1-F], F = `future_window`), every token
j <= t gives the features `kvexp.methods.learned.entry_features` computes at inference for a cache that has seen
t + 1 tokens (accumulated attention a_j = sum_{i=j..t} A[i, j]) and the oracle target, per KV head:
* `oracle: h2o`    y = log(eps + sum_{i=j..t+F} A[i, j]): the H2O score j holds at the end of the window;
* `oracle: future` y = log(eps + sum_{i=t+1..t+F} A[i, j]): the attention j receives from the next F queries.
Training: MSE on y, AdamW, cosine LR, gradient clipping, every layer at once (KVzap's recipe); validation on
held-out windows (`val_fraction` of them). Agreement with the oracle on the validation windows, over the tokens
the method really ranks (not the sinks, not the recent window): recall of the oracle's top-k with k the budget
left after the protected tokens (`budget.tokens`, `keep_ratio` x (t+1), or half the candidates without a
budget), and Spearman's rank correlation, for the learned scorer, a random scorer and the untrained method's
score (H2O's running accumulated attention a_j).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from kvexp.data import read_corpus, required_data_file
from kvexp.methods.hidden_state import recording_attention_inputs
from kvexp.methods.learned import CHECKPOINT_FILE, EPS, FEATURES, LearnedScorer, entry_features, save_scorer
from kvexp.methods.scoring import reduce_group
from kvexp.models import load_model
from kvexp.tasks.base import method_from_config
from kvexp.train import Trained
from kvexp.train.data import check_trainer_options
from kvexp.train.fitting import minibatch_fit, spearman, top_recall

log = logging.getLogger(__name__)

ORACLES = ("h2o", "future")
OPTIONS = (
    "name",
    "oracle",
    "future_window",
    "data_file",
    "texts",
    "max_tokens",
    "skip_chars",
    "decision_points",
    "val_fraction",
    "hidden_features",
    "mlp_hidden_size",
    "lr",
    "weight_decay",
    "epochs",
    "batch_size",
    "grad_clip",
    "seed",
)


def check(cfg: DictConfig) -> None:
    """Validate cfg.train.* (and that the method is `learned`) before any model loads."""
    check_trainer_options(cfg, "learned_scorer", ("learned",), OPTIONS)
    t = cfg.train
    if t.oracle not in ORACLES:
        raise ValueError(f"train.oracle must be one of {ORACLES}, got {t.oracle!r}")
    positive = (
        "texts",
        "max_tokens",
        "decision_points",
        "future_window",
        "mlp_hidden_size",
        "epochs",
        "batch_size",
    )
    for name in positive:
        if not isinstance(t[name], int) or t[name] < 1:
            raise ValueError(f"train.{name} must be a positive integer, got {t[name]!r}")
    if t.texts < 2:
        raise ValueError(
            f"train.texts must be >= 2 (some windows are held out for validation), got {t.texts}"
        )
    if not 0 < t.future_window < t.max_tokens // 2:
        raise ValueError(
            f"train.future_window must be in [1, max_tokens // 2 = {t.max_tokens // 2}), got {t.future_window}"
        )
    if not isinstance(t.hidden_features, int) or t.hidden_features < 0:
        raise ValueError(f"train.hidden_features must be an integer >= 0, got {t.hidden_features!r}")
    if not 0.0 < t.val_fraction < 1.0:
        raise ValueError(f"train.val_fraction must be in (0, 1), got {t.val_fraction}")
    if not t.lr > 0:
        raise ValueError(f"train.lr must be > 0, got {t.lr}")
    if t.weight_decay < 0:
        raise ValueError(f"train.weight_decay must be >= 0, got {t.weight_decay}")
    if t.grad_clip is not None and not t.grad_clip > 0:
        raise ValueError(f"train.grad_clip must be > 0 or null, got {t.grad_clip}")
    if t.skip_chars < 0:
        raise ValueError(f"train.skip_chars must be >= 0, got {t.skip_chars}")
    _data_path(t.data_file)


def _data_path(name: str) -> Path:
    return required_data_file(name, "train.data_file")


def training_windows(
    path: Path, tokenizer, texts: int, max_tokens: int, skip_chars: int
) -> list[torch.Tensor]:
    """`texts` token windows [1, <= max_tokens] (see the module docstring)."""
    return text_windows(
        [text for _, text in read_corpus(path)], path.name, tokenizer, texts, max_tokens, skip_chars
    )


def text_windows(
    books: list[str], name: str, tokenizer, texts: int, max_tokens: int, skip_chars: int
) -> list[torch.Tensor]:
    """`texts` windows [1, max_tokens] of the books `name` holds: window i from book i mod n_books, its
    (i div n_books)-th stretch of text after `skip_chars`."""
    chars = 8 * max_tokens  # enough characters for max_tokens tokens of any tokenizer kvexp uses
    windows = []
    for i in range(texts):
        book = books[i % len(books)]
        start = skip_chars + (i // len(books)) * chars
        ids = tokenizer(book[start : start + chars], return_tensors="pt").input_ids[:, :max_tokens]
        if ids.shape[1] < max_tokens:
            raise ValueError(
                f"train.texts={texts}: window {i} of {name} has only {ids.shape[1]} of train.max_tokens="
                f"{max_tokens} tokens; use fewer texts or tokens"
            )
        windows.append(ids)
    return windows


@dataclass
class Recording:
    """One window through the full-cache model, per layer: hidden [T, d], keys/values [Hkv, T, D], attention
    received cumulated over queries `cum` [Hkv, T, T] (cum[h, i, j] = sum_{i' <= i} A[h, i', j])."""

    hidden: list[torch.Tensor]
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    cum: list[torch.Tensor]


@torch.no_grad()
def record(model, ids: torch.Tensor, gqa: str) -> Recording:
    """Run `ids` [1, T] through the frozen model (full cache, eager attention) and record what the features need."""
    from transformers import DynamicCache

    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with recording_attention_inputs(model) as captured:
            cache = DynamicCache(config=model.config)
            out = model(ids.to(model.device), past_key_values=cache, use_cache=True, output_attentions=True)
    finally:
        model.set_attn_implementation(previous)
    layers = len(out.attentions)
    kv = [cache.layers[i] for i in range(layers)]
    cums = []
    for attention, layer in zip(out.attentions, kv, strict=True):
        heads, kv_heads = attention.shape[1], layer.keys.shape[1]
        grouped = attention[0].float().reshape(kv_heads, heads // kv_heads, *attention.shape[2:])
        cums.append(reduce_group(grouped[None], gqa)[0].cumsum(dim=1))  # [Hkv, T(query), T(key)]
    return Recording(
        hidden=[captured[i][0].float() for i in range(layers)],
        keys=[layer.keys[0].float() for layer in kv],
        values=[layer.values[0].float() for layer in kv],
        cum=cums,
    )


@dataclass
class Samples:
    """Aligned across layers: scalars [L, N, Hkv, S], target [L, N, Hkv]; rows [N] index hidden [L, Ntok, d];
    groups: (first sample, t) of each decision, its samples being j = 0 .. t in order."""

    hidden: torch.Tensor
    scalars: torch.Tensor
    target: torch.Tensor
    rows: torch.Tensor
    groups: list[tuple[int, int]]


def build_samples(recordings: list[Recording], times: list[list[int]], oracle: str, window: int) -> Samples:
    scalars, targets, rows, groups = [], [], [], []
    hidden = [torch.cat([r.hidden[layer] for r in recordings]) for layer in range(len(recordings[0].hidden))]
    offset = count = 0
    for rec, decisions in zip(recordings, times, strict=True):
        length = rec.cum[0].shape[1]
        for t in decisions:
            end = min(t + window, length - 1)
            n = t + 1
            per_layer_x, per_layer_y = [], []
            for layer in range(len(rec.cum)):
                cum = rec.cum[layer]  # [Hkv, T, T]
                acc = cum[:, t, :n]
                received = cum[:, end, :n] - (acc if oracle == "future" else 0.0)
                positions = torch.arange(n).expand(cum.shape[0], -1)
                x = entry_features(rec.keys[layer][:, :n], rec.values[layer][:, :n], positions, n, acc)
                per_layer_x.append(x.transpose(0, 1))  # [n, Hkv, S]
                per_layer_y.append((received.clamp_min(0.0) + EPS).log().transpose(0, 1))  # [n, Hkv]
            scalars.append(torch.stack(per_layer_x))
            targets.append(torch.stack(per_layer_y))
            rows.append(offset + torch.arange(n))
            groups.append((count, t))
            count += n
        offset += length
    return Samples(
        hidden=torch.stack(hidden),
        scalars=torch.cat(scalars, dim=1),
        target=torch.cat(targets, dim=1),
        rows=torch.cat(rows),
        groups=groups,
    )


def fit(scorer: LearnedScorer, data: Samples, t: DictConfig) -> list[float]:
    """MSE regression of every layer at once; returns the mean training loss of each epoch."""
    scorer.feature_mean.copy_(data.scalars.mean(dim=(1, 2)))
    scorer.feature_std.copy_(data.scalars.std(dim=(1, 2)).clamp_min(1e-3))
    with torch.no_grad():
        scorer.b2.copy_(data.target.mean(dim=1))  # start from the mean log importance of each layer and head

    def loss_of(batch: torch.Tensor) -> torch.Tensor:
        pred = scorer.forward_all(data.hidden[:, data.rows[batch]], data.scalars[:, batch])
        return torch.nn.functional.mse_loss(pred, data.target[:, batch])

    scorer.train()
    losses = minibatch_fit(
        scorer.parameters(),
        data.rows.numel(),
        loss_of,
        epochs=t.epochs,
        batch_size=t.batch_size,
        lr=t.lr,
        weight_decay=t.weight_decay,
        grad_clip=t.grad_clip,
        seed=t.seed,
        desc="learned_scorer [fit]",
    )
    scorer.eval()
    return losses


def keep_count(budget: DictConfig, method, n: int) -> tuple[int, int, int] | None:
    """For a cache that has seen n tokens: (first, last + 1) of the candidates the method ranks and how many of
    them the budget keeps; None when there is nothing to choose."""
    tokens = budget.get("tokens")
    ratio = budget.get("keep_ratio")
    b = tokens if tokens is not None else (int(ratio * n) if ratio is not None else None)
    if b is not None and n <= b:
        return None  # the cache holds everything: no decision
    recent = method.recent(b) if b is not None else (method.recent_size or 0)
    first, end = min(method.sink_tokens, n), max(n - recent, 0)
    candidates = end - first
    if candidates < 2:
        return None
    k = (b - (first + (n - end))) if b is not None else candidates // 2
    return first, end, min(max(k, 1), candidates - 1)


@torch.no_grad()
def agreement(
    scorer: LearnedScorer, data: Samples, budget: DictConfig, method, seed: int
) -> dict[str, float]:
    """Validation: MSE (and a constant predictor's), recall of the oracle's top-k and Spearman over the
    candidates, for the learned scorer, a random scorer and H2O's running accumulated attention."""
    generator = torch.Generator().manual_seed(seed)
    chunks = range(0, data.rows.numel(), 4096)
    pred = [
        scorer.forward_all(data.hidden[:, data.rows[i : i + 4096]], data.scalars[:, i : i + 4096])
        for i in chunks
    ]
    pred = torch.cat(pred, dim=1)  # [L, N, Hkv]
    scores = {"learned": pred, "h2o_running": data.scalars[..., FEATURES.index("acc")]}
    sums: dict[str, float] = {}
    groups = 0
    for start, t in data.groups:
        span = keep_count(budget, method, t + 1)
        if span is None:
            continue
        first, end, k = span
        rows = slice(start + first, start + end)
        oracle = data.target[:, rows].transpose(1, 2)  # [L, Hkv, c]
        named = {name: s[:, rows].transpose(1, 2) for name, s in scores.items()}
        named["random"] = torch.rand(oracle.shape, generator=generator)
        for name, s in named.items():
            sums[f"recall_{name}"] = sums.get(f"recall_{name}", 0.0) + top_recall(s, oracle, k).mean().item()
            sums[f"spearman_{name}"] = sums.get(f"spearman_{name}", 0.0) + spearman(s, oracle).mean().item()
        groups += 1
    metrics = {f"val_{k}": v / max(groups, 1) for k, v in sums.items()}
    metrics["val_loss"] = torch.nn.functional.mse_loss(pred, data.target).item()
    return metrics


def train(cfg: DictConfig, checkpoint_dir: Path) -> Trained:
    t = cfg.train
    method = method_from_config(cfg.method)
    model, tokenizer = load_model(cfg.model, cfg.hardware)
    model.eval()
    windows = training_windows(_data_path(t.data_file), tokenizer, t.texts, t.max_tokens, t.skip_chars)
    generator = torch.Generator().manual_seed(t.seed)
    recordings, times = [], []
    for ids in tqdm(windows, desc="learned_scorer [record]"):
        recordings.append(record(model, ids, method.gqa))
        length = ids.shape[1]
        low, high = length // 4, length - 1 - t.future_window
        picks = torch.randperm(high - low + 1, generator=generator)[: t.decision_points] + low
        times.append(sorted(picks.tolist()))
    val_count = min(max(1, round(t.texts * t.val_fraction)), t.texts - 1)
    split = t.texts - val_count
    train_data = build_samples(recordings[:split], times[:split], t.oracle, t.future_window)
    val_data = build_samples(recordings[split:], times[split:], t.oracle, t.future_window)
    del recordings
    cfg_model = model.config
    kv_heads = train_data.target.shape[-1]
    torch.manual_seed(t.seed)
    shape = (
        cfg_model.num_hidden_layers,
        cfg_model.hidden_size,
        kv_heads,
        t.hidden_features,
        t.mlp_hidden_size,
    )
    scorer = LearnedScorer(*shape)
    losses = fit(scorer, train_data, t)
    metrics: dict[str, Any] = {
        "oracle": t.oracle,
        "train_samples": int(train_data.rows.numel()),
        "val_samples": int(val_data.rows.numel()),
        "train_loss": losses[-1],
        "train_loss_per_epoch": losses,
        "val_loss_constant": torch.nn.functional.mse_loss(
            train_data.target.mean(dim=1, keepdim=True).expand_as(val_data.target), val_data.target
        ).item(),
    }
    metrics.update(agreement(scorer, val_data, cfg.budget, method, t.seed))
    path = checkpoint_dir / CHECKPOINT_FILE
    meta = {"gqa": method.gqa, "model": cfg.model.name, "train": OmegaConf.to_container(t, resolve=True)}
    save_scorer(scorer, path, meta)
    log.info(
        "learned scorer saved to %s: %s", path, {k: v for k, v in metrics.items() if k.startswith("val_")}
    )
    return Trained(method_overrides={"checkpoint": str(path)}, metrics=metrics)
