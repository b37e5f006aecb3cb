"""train=kvzip_surrogate: fit method=kvzap's or method=fastkvzip's surrogate to KVzip's own scores of the frozen model.

Data: `texts` windows of `max_tokens` tokens (learned_scorer's windows: window i from book i mod n_books) of
`data_file`: a JSONL of `text` records or a .txt (relative to $KVEXP_DATA_DIR; the default Gutenberg corpus falls
back to the embedded public-domain novel), or `wikitext2` (the embedded WikiText-2 test split). With
`chat_template` each window is the user turn of the model's chat template (KVzap's data), else plain text.

Each window is prefilled through a kvzip cache (allocation uniform, budget = the prompt: nothing is evicted) while
the attention-input hidden state h_j of every token is recorded at every layer; KVzip's probes then run (the repeat
prompt, the turn closing, the window again, in chunks of `chunk_size`: kvexp's `method=kvzip`) and every context
entry's score s_j, per layer and KV head, is read from the cache. The sinks (KVzip scores none) are left out; a
layer without a budget (Gemma-3's sliding layers, never compressed) is not trained. `oracle`: the score trained on,
`kvzip` (the reconstruction's max attention) or `kvzip_plus` (KVzip+: `method=kvzip method.plus=true`); null takes the
method's paper: KVzap trains on KVzip+, Fast KVzip on KVzip (its gate's cross-entropy needs scores in [0, 1]).

The fit follows the method's paper (null options take these values):
* kvzap `model_type: linear`: ridge regression of y = log(s + 1e-6) on h, per layer (closed form, penalty `ridge`;
  KVzap fits sklearn's Ridge, penalty 1).
* kvzap `mlp`: MSE on y over every layer and head, AdamW (lr 5e-3, weight decay 0.01), 15 epochs of batches of
  512, cosine schedule, gradient clipping at 1 (KVzap's train.py). The output bias starts at the training mean of
  each head's y (the ranking does not depend on it; it spares the first epochs).
* fastkvzip: binary cross-entropy between the gate's score and s (in [0, 1]), mean over tokens, summed over heads
  and layers; SGD with momentum 0.9, lr 0.2, 5000 steps of 1000 tokens, the authors' step schedule (FastKVzip's
  optim.py, loss `cnt`).
The surrogate starts from the seeded initialization `method.checkpoint=random` gives (`UNTRAINED`: the run's
`metrics_untrained` evaluate exactly that point).

Held out: `val_fraction` of the windows. Reported on them, per window, layer and KV head, then averaged: Spearman's
rank correlation with KVzip's scores and the recall of KVzip's top-k (k: `budget.keep_ratio` of the window's scored
tokens, or `budget.tokens` of them when fewer, else half) for the surrogate and for a random scorer, and the
validation loss. The checkpoint (`kvzap.pt` / `fastkvzip.pt`) is what `method.checkpoint=` loads.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from kvexp.methods import build_method, make_cache
from kvexp.methods.base import Probing
from kvexp.methods.hidden_state import RANDOM, HiddenStateScorer, recording_attention_inputs, save_checkpoint
from kvexp.models import load_model
from kvexp.tasks.base import method_from_config
from kvexp.tasks.generation import GenerationSample, PromptEncoder
from kvexp.train import Trained
from kvexp.train.data import check_trainer_options, training_books
from kvexp.train.fitting import minibatch_fit, spearman, top_recall
from kvexp.train.learned_scorer import text_windows

log = logging.getLogger(__name__)

METHODS = ("kvzap", "fastkvzip")
LOG_EPS = 1e-6  # inside log(s + eps), kvzap's regression target
UNTRAINED = {
    "checkpoint": RANDOM
}  # the evaluation before training: the surrogate at the fit's starting point
# The paper's fit of each method (null train options take these).
RECIPES: dict[str, dict[str, Any]] = {
    "kvzap": {
        "optimizer": "adamw",
        "schedule": "cosine",
        "lr": 5e-3,
        "weight_decay": 0.01,
        "epochs": 15,
        "steps": None,
        "batch_size": 512,
        "grad_clip": 1.0,
    },
    "fastkvzip": {
        "optimizer": "sgd",
        "schedule": "step",
        "lr": 0.2,
        "weight_decay": 0.0,
        "epochs": None,
        "steps": 5000,
        "batch_size": 1000,
        "grad_clip": None,
    },
}
FIT_OPTIONS = ("epochs", "steps", "batch_size", "lr", "weight_decay", "grad_clip")
OPTIONS = (
    "name",
    "data_file",
    "texts",
    "max_tokens",
    "skip_chars",
    "val_fraction",
    "chat_template",
    "chunk_size",
    "oracle",
    *FIT_OPTIONS,
    "ridge",
    "seed",
)


ORACLES = ("kvzip", "kvzip_plus")
PAPER_ORACLES = {
    "kvzap": "kvzip_plus",
    "fastkvzip": "kvzip",
}  # what each paper trains on (train.oracle: null)


def oracle_of(cfg: DictConfig) -> str:
    """The score the surrogate is trained on: train.oracle, else its paper's."""
    return cfg.train.oracle or PAPER_ORACLES[cfg.method.name]


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def check(cfg: DictConfig) -> None:
    """Validate cfg.train.* (and that the method is kvzap or fastkvzip) before any model loads."""
    check_trainer_options(cfg, "kvzip_surrogate", METHODS, OPTIONS)
    t = cfg.train
    for name in ("texts", "max_tokens", "chunk_size"):
        if not _positive_int(t[name]):
            raise ValueError(f"train.{name} must be a positive integer, got {t[name]!r}")
    if t.texts < 2:
        raise ValueError(
            f"train.texts must be >= 2 (some windows are held out for validation), got {t.texts}"
        )
    if t.max_tokens < 16:
        raise ValueError(f"train.max_tokens must be >= 16 (tokens per window), got {t.max_tokens}")
    for name in ("epochs", "steps", "batch_size"):
        if t[name] is not None and not _positive_int(t[name]):
            raise ValueError(
                f"train.{name} must be a positive integer or null (the method's recipe), got {t[name]!r}"
            )
    for name in ("lr", "grad_clip"):
        if t[name] is not None and not t[name] > 0:
            raise ValueError(f"train.{name} must be > 0 or null (the method's recipe), got {t[name]}")
    if t.weight_decay is not None and t.weight_decay < 0:
        raise ValueError(
            f"train.weight_decay must be >= 0 or null (the method's recipe), got {t.weight_decay}"
        )
    if t.oracle is not None and t.oracle not in ORACLES:
        raise ValueError(
            f"train.oracle must be one of {', '.join(ORACLES)} or null (the method's paper), got {t.oracle!r}"
        )
    if cfg.method.name == "fastkvzip" and t.oracle == "kvzip_plus":
        raise ValueError(
            "train.oracle=kvzip_plus cannot train method=fastkvzip: its gate's cross-entropy needs scores in [0, 1]"
        )
    if not t.ridge >= 0:
        raise ValueError(f"train.ridge must be >= 0 (kvzap linear's ridge penalty), got {t.ridge}")
    if not 0.0 < t.val_fraction < 1.0:
        raise ValueError(f"train.val_fraction must be in (0, 1), got {t.val_fraction}")
    if t.skip_chars < 0:
        raise ValueError(f"train.skip_chars must be >= 0, got {t.skip_chars}")
    if t.chat_template not in (None, True, False):
        raise ValueError(
            f"train.chat_template must be true, false or null (the tokenizer's if it has one), got {t.chat_template!r}"
        )
    training_books(t.data_file)


def fit_recipe(method: str, t: DictConfig) -> dict[str, Any]:
    """The fit's settings: the method's recipe, with the train options that are set. `epochs` set without
    `steps` counts in epochs."""
    recipe = dict(RECIPES[method])
    recipe.update({k: t[k] for k in FIT_OPTIONS if t[k] is not None})
    if t.epochs is not None and t.steps is None:
        recipe["steps"] = None
    return recipe


@dataclass
class Window:
    """One window's training data over the trained layers: hidden states [L_t, m, d] and KVzip scores [L_t, m, Hkv]
    of its m scored tokens."""

    hidden: torch.Tensor
    scores: torch.Tensor


@torch.no_grad()
def kvzip_window(
    model, tokenizer, encoder: PromptEncoder, text: str, chunk_size: int, plus: bool = False
) -> tuple[Window, list[int]]:
    """KVzip's scores (KVzip+'s with `plus`) of one window and the hidden states of its tokens, and the layers that
    have them."""
    prompt = encoder.encode(GenerationSample("window", text, "", []), max_new_tokens=1)
    device = model.device
    ids = prompt.context.to(device)
    n = ids.shape[1]
    method = build_method("kvzip", chunk_size=chunk_size, allocation="uniform", plus=plus)
    cache = make_cache(model, method, n)  # the budget holds the prompt: nothing is evicted

    def encode(words: str) -> torch.Tensor:
        return torch.tensor([tokenizer(words, add_special_tokens=False).input_ids], dtype=torch.long)

    def run(probe: torch.Tensor) -> None:
        model(probe.to(device), past_key_values=cache, logits_to_keep=1)

    with recording_attention_inputs(model) as hidden:
        model(ids, past_key_values=cache, logits_to_keep=1)
    closing = prompt.closing if prompt.closing is not None else encode("\n")
    method.probe(cache, Probing(ids=ids, opening=prompt.opening, closing=closing, encode=encode, run=run))
    layers = [layer for layer in cache.layers if layer.budget is not None]
    scores = []
    for layer in layers:
        full = torch.full((layer.kv_heads, n), float("inf"), device=layer.device)
        live = layer.live()[0]
        for h in range(layer.kv_heads):
            full[h, layer.positions[0, h][live[h]]] = layer.state("kvzip")[0, h][live[h]]
        scores.append(full)
    scores = torch.stack(scores)  # [L_t, Hkv, n]
    scored = torch.isfinite(scores).all(dim=(0, 1))  # the sinks (and anything a layer does not hold) left out
    trained = [layer.layer_idx for layer in layers]
    states = torch.stack([hidden[i][0, scored].float() for i in trained])
    return Window(states.cpu(), scores[:, :, scored].transpose(1, 2).cpu()), trained


def _ridge(x: torch.Tensor, y: torch.Tensor, penalty: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Ridge regression with an unpenalized intercept (sklearn's Ridge): weight [H, d], bias [H]."""
    x, y = x.double(), y.double()
    mean_x, mean_y = x.mean(0), y.mean(0)
    xc, yc = x - mean_x, y - mean_y
    gram = xc.T @ xc + penalty * torch.eye(x.shape[1], dtype=x.dtype)
    weight = torch.linalg.solve(gram, xc.T @ yc).T
    return weight.float(), (mean_y - weight @ mean_x).float()


def predict(method: HiddenStateScorer, trained: list[int], hidden: torch.Tensor) -> torch.Tensor:
    """The surrogate on hidden states [L_t, m, d] of the trained layers: [L_t, m, Hkv]."""
    return torch.stack([method.surrogate(layer, hidden[i]) for i, layer in enumerate(trained)])


def loss(method: HiddenStateScorer, pred: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """The training loss of predictions [L_t, m, Hkv] against KVzip's scores: kvzap MSE on log(s + eps); fastkvzip
    binary cross-entropy, mean over tokens, summed over heads and layers."""
    if method.name == "kvzap":
        return F.mse_loss(pred, (scores + LOG_EPS).log())
    bce = F.binary_cross_entropy(pred, scores.clamp(0.0, 1.0), reduction="none")
    return bce.mean(dim=1).sum()


def fit(method: HiddenStateScorer, trained: list[int], data: Window, t: DictConfig) -> dict[str, Any]:
    """Fit the surrogate's trained layers to `data`; the fit's settings and per-epoch training losses."""
    surrogate = method.surrogate
    if method.name == "kvzap" and method.model_type == "linear":
        target = (data.scores + LOG_EPS).log()
        for i, layer in enumerate(trained):
            weight, bias = _ridge(data.hidden[i], target[i], t.ridge)
            surrogate.layers[layer].weight.data.copy_(weight)
            surrogate.layers[layer].bias.data.copy_(bias)
        return {"fit": "ridge", "ridge": t.ridge}
    if method.name == "kvzap":
        with torch.no_grad():
            mean = (data.scores + LOG_EPS).log().mean(dim=1)  # [L_t, Hkv]
            for i, layer in enumerate(trained):
                surrogate.layers[layer][2].bias.copy_(mean[i])
    recipe = fit_recipe(method.name, t)
    surrogate.train()
    losses = minibatch_fit(
        [p for layer in trained for p in surrogate.layers[layer].parameters()],
        data.hidden.shape[1],
        lambda batch: loss(method, predict(method, trained, data.hidden[:, batch]), data.scores[:, batch]),
        seed=t.seed,
        desc=f"kvzip_surrogate [{method.name}]",
        **recipe,
    )
    surrogate.eval()
    return {"fit": recipe, "train_loss": losses[-1], "train_loss_per_epoch": losses}


def keep_fraction(budget: DictConfig, tokens: int) -> float:
    """The share of a window's scored tokens the budget keeps: budget.keep_ratio, budget.tokens of them when fewer,
    else half."""
    if budget.get("keep_ratio") is not None:
        return float(budget.keep_ratio)
    if budget.get("tokens") is not None and budget.tokens < tokens:
        return budget.tokens / tokens
    return 0.5


@torch.no_grad()
def agreement(
    method: HiddenStateScorer, trained: list[int], windows: list[Window], budget: DictConfig, seed: int
) -> dict[str, Any]:
    """Validation: Spearman and top-k recall against KVzip's scores, per window, layer and KV head, averaged, for
    the surrogate and a random scorer; the validation loss; Spearman per layer."""
    generator = torch.Generator().manual_seed(seed)
    sums: dict[str, float] = {}
    per_layer = torch.zeros(len(trained))
    losses = []
    for window in windows:
        pred = predict(method, trained, window.hidden)  # [L_t, m, Hkv]
        losses.append(loss(method, pred, window.scores).item())
        m = window.scores.shape[1]
        k = min(max(round(keep_fraction(budget, m) * m), 1), m - 1)
        oracle = window.scores.transpose(1, 2)  # [L_t, Hkv, m]
        named = {"surrogate": pred.transpose(1, 2), "random": torch.rand(oracle.shape, generator=generator)}
        for name, s in named.items():
            rho = spearman(s, oracle)  # [L_t, Hkv]
            sums[f"val_spearman_{name}"] = sums.get(f"val_spearman_{name}", 0.0) + rho.mean().item()
            recall = top_recall(s, oracle, k).mean().item()
            sums[f"val_recall_{name}"] = sums.get(f"val_recall_{name}", 0.0) + recall
            if name == "surrogate":
                per_layer += rho.mean(dim=1)
    metrics: dict[str, Any] = {k: v / len(windows) for k, v in sums.items()}
    metrics["val_loss"] = sum(losses) / len(losses)
    metrics["val_spearman_per_layer"] = {
        layer: round(float(v) / len(windows), 4) for layer, v in zip(trained, per_layer, strict=True)
    }
    return metrics


def train(cfg: DictConfig, checkpoint_dir: Path) -> Trained:
    t = cfg.train
    method = method_from_config(OmegaConf.merge(cfg.method, {"checkpoint": None}))
    model, tokenizer = load_model(cfg.model, cfg.hardware)
    model.eval()
    start = time.perf_counter()
    books, name = training_books(t.data_file)
    windows = text_windows(books, name, tokenizer, t.texts, t.max_tokens, t.skip_chars)
    template = bool(getattr(tokenizer, "chat_template", None)) if t.chat_template is None else t.chat_template
    encoder = PromptEncoder(tokenizer, chat_template=template)
    data, trained, oracle = [], None, oracle_of(cfg)
    for ids in tqdm(windows, desc=f"kvzip_surrogate [{oracle} scores]"):
        text = tokenizer.decode(ids[0], skip_special_tokens=True)
        window, layers = kvzip_window(model, tokenizer, encoder, text, t.chunk_size, oracle == "kvzip_plus")
        if trained is not None and layers != trained:
            raise RuntimeError(f"the compressed layers changed between windows: {trained} then {layers}")
        data.append(window)
        trained = layers
    collect_s = time.perf_counter() - start
    val_count = min(max(1, round(t.texts * t.val_fraction)), t.texts - 1)
    train_windows, val_windows = data[: t.texts - val_count], data[t.texts - val_count :]
    train_data = Window(
        torch.cat([w.hidden for w in train_windows], dim=1),
        torch.cat([w.scores for w in train_windows], dim=1),
    )
    method.surrogate = method.initialize(method.shape(model.config))  # as `checkpoint: random` (`UNTRAINED`)
    start = time.perf_counter()
    metrics: dict[str, Any] = {
        "method": method.name,
        "oracle": oracle,
        "trained_layers": trained,
        "train_samples": int(train_data.hidden.shape[1]),
        "val_samples": int(sum(w.hidden.shape[1] for w in val_windows)),
        "chat_template": template,
        **fit(method, trained, train_data, t),
    }
    metrics["fit_s"] = time.perf_counter() - start
    metrics["collect_s"] = collect_s
    metrics.update(agreement(method, trained, val_windows, cfg.budget, t.seed))
    path = checkpoint_dir / method.checkpoint_file
    config = {"shape": list(method.surrogate.shape), **method.architecture(method.surrogate)}
    meta = {
        "model": cfg.model.name,
        "train": OmegaConf.to_container(t, resolve=True),
        "oracle": oracle,
        "trained_layers": trained,
    }
    save_checkpoint(path, method.checkpoint_format, config, meta, method.surrogate)
    log.info(
        "%s surrogate saved to %s: %s",
        method.name,
        path,
        {k: v for k, v in metrics.items() if k.startswith("val_") and k != "val_spearman_per_layer"},
    )
    return Trained(method_overrides={"checkpoint": str(path)}, metrics=metrics)
