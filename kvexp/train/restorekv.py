"""train=restorekv: learn method=restorekv's restore-token embeddings and LoRA by self-distillation from the full cache.

Data: `texts` windows of `max_tokens` tokens (window i from book i mod n_books, learned_scorer's windows) of
`data_file`: a JSONL of `text` records or a .txt, relative to $KVEXP_DATA_DIR (the default Gutenberg corpus falls
back to the embedded public-domain novel), or `wikitext2` (the embedded WikiText-2 test split). Each window is a
context (its first `max_tokens - continuation` tokens) and a continuation (its last `continuation` tokens).

Per window, the student is the inference path itself, in the engine's differentiable mode: the context prefilled
and held, KVzip's probes (the method's own, no gradient: nothing trainable is in them yet), the restore pass (the
restore embeddings through the model with the LoRA active: the only place the trained tensors act), the discrete
compression to the budget (`budget`, resolved against the context), then the continuation fed over the compressed
cache and the restore entries with the base weights. Gradients reach the embeddings and the LoRA through the
restore entries' keys and values. The teacher is the same frozen model over context + continuation with the full
cache. Loss, averaged over the continuation's positions:

    T² · KL(softmax(z_teacher / T) ‖ softmax(z_student / T))

AdamW on the embeddings and the LoRA only (the base model frozen), `steps` steps of one window each (a prompt's
probes and allocation are its own: no batching), gradient clipping at `grad_clip`. It starts from
`method.checkpoint=init` (`UNTRAINED`: the run's `metrics_untrained` evaluate exactly that point; its LoRA starts at
zero whatever its shape) with the LoRA shape of `lora` (the published adapters': rank 8, alpha 16, every attention
and MLP projection); `seed` orders the windows. The mean loss over the
windows before and after training is reported (`kl_before`, `kl_after`); the checkpoint, in the published layout
(PEFT `adapter_config.json` + `adapter_model.safetensors`, `restore_embeddings.safetensors`), is the run dir's
`checkpoint/`, which the evaluation that follows loads as `method.checkpoint`.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from kvexp.budgets import resolve_budget
from kvexp.methods import make_cache
from kvexp.methods.base import Probing
from kvexp.methods.restorekv import INIT, RestoreKV, init_adapter, lora_modules, save_adapter
from kvexp.models import load_model
from kvexp.tasks.base import method_from_config
from kvexp.tracking import atomic_write_csv
from kvexp.train import Trained
from kvexp.train.data import check_trainer_options, engine_settings, training_books
from kvexp.train.learned_scorer import text_windows

log = logging.getLogger(__name__)

UNTRAINED = {"checkpoint": INIT}  # the evaluation before training: the adapter the training starts from
LOG_FILE = "train_log.csv"
OPTIONS = (
    "name",
    "data_file",
    "texts",
    "max_tokens",
    "continuation",
    "skip_chars",
    "steps",
    "lr",
    "weight_decay",
    "grad_clip",
    "temperature",
    "lora",
    "seed",
    "log_every",
)
LORA_OPTIONS = ("rank", "alpha", "target_modules")


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def check(cfg: DictConfig) -> None:
    """Validate cfg.train.* (and that the method is restorekv with a budget) before any model loads."""
    check_trainer_options(cfg, "restorekv", ("restorekv",), OPTIONS)
    t = cfg.train
    for name in ("texts", "max_tokens", "continuation", "steps", "log_every"):
        if not _positive_int(t[name]):
            raise ValueError(f"train.{name} must be a positive integer, got {t[name]!r}")
    if not _positive_int(t.seed + 1) or not _positive_int(t.skip_chars + 1):
        raise ValueError(
            f"train.seed and train.skip_chars must be integers >= 0, got {t.seed!r}, {t.skip_chars!r}"
        )
    context = t.max_tokens - t.continuation
    if context < 2:
        raise ValueError(
            f"train.continuation={t.continuation} must leave a context of at least 2 tokens in train.max_tokens="
            f"{t.max_tokens}"
        )
    for name in ("lr", "temperature"):
        if not _number(t[name]) or not t[name] > 0:
            raise ValueError(f"train.{name} must be a number > 0, got {t[name]!r}")
    if not _number(t.weight_decay) or t.weight_decay < 0:
        raise ValueError(f"train.weight_decay must be a number >= 0, got {t.weight_decay!r}")
    if t.grad_clip is not None and (not _number(t.grad_clip) or not t.grad_clip > 0):
        raise ValueError(f"train.grad_clip must be a number > 0 or null (no clipping), got {t.grad_clip!r}")
    lora = t.lora
    if not isinstance(lora, DictConfig) or sorted(lora) != sorted(LORA_OPTIONS):
        raise ValueError(f"train.lora must set exactly {list(LORA_OPTIONS)}, got {lora!r}")
    if not _positive_int(lora.rank):
        raise ValueError(f"train.lora.rank must be a positive integer, got {lora.rank!r}")
    if not _number(lora.alpha) or not lora.alpha > 0:
        raise ValueError(f"train.lora.alpha must be a number > 0, got {lora.alpha!r}")
    targets = lora.target_modules
    targets = OmegaConf.to_container(targets) if OmegaConf.is_config(targets) else targets
    if not isinstance(targets, list) or not all(isinstance(x, str) and x for x in targets):
        raise ValueError(
            f"train.lora.target_modules must be a list of module names (e.g. [q_proj, v_proj]), or [] for none; got "
            f"{targets!r}"
        )
    budget = cfg.get("budget") or {}
    if all(budget.get(k) is None for k in ("tokens", "keep_ratio", "per_layer", "per_head")):
        raise ValueError(
            "train=restorekv needs a budget: with nothing compressed there is nothing to restore"
        )
    if budget.get("tokens") is not None and budget.tokens >= context:
        raise ValueError(
            f"train.max_tokens - train.continuation ({context} context tokens) must exceed budget.tokens="
            f"{budget.tokens}: otherwise nothing is evicted"
        )
    training_books(t.data_file)


def kl_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """T² · KL(teacher ‖ student) at temperature T, averaged over the positions of logits [1, c, V]."""
    log_student = F.log_softmax(student[0].float() / temperature, dim=-1)
    log_teacher = F.log_softmax(teacher[0].float() / temperature, dim=-1)
    return F.kl_div(log_student, log_teacher, log_target=True, reduction="batchmean") * temperature**2


def window_loss(
    model,
    tokenizer,
    method: RestoreKV,
    budget: int | list[int] | None,
    ids: torch.Tensor,
    continuation: int,
    temperature: float,
    engine: dict[str, Any],
) -> torch.Tensor:
    """The distillation loss of one window [1, T] (with autograd through the restore pass; see the module docstring)."""
    device = model.device
    ids = ids.to(device)
    context, follow = ids[:, :-continuation], ids[:, -continuation:]
    with torch.no_grad():
        teacher = model(ids, past_key_values=make_cache(model, "full")).logits[:, -continuation:]
    cache = make_cache(model, method, budget, differentiable=True, **engine)

    def encode(text: str) -> torch.Tensor:
        return torch.tensor([tokenizer(text, add_special_tokens=False).input_ids], dtype=torch.long)

    def run(probe: torch.Tensor) -> None:
        model(probe.to(device), past_key_values=cache, logits_to_keep=1)

    def feed(prompt: torch.Tensor) -> torch.Tensor:
        return model(prompt.to(device), past_key_values=cache, logits_to_keep=1).logits[:, -1].float()

    method.prefill(cache, Probing(context, 0, encode("\n"), encode, run, feed))
    student = model(follow, past_key_values=cache).logits
    return kl_loss(student, teacher, temperature)


def mean_loss(model, tokenizer, method, budget, windows, t: DictConfig, engine) -> float:
    """The loss averaged over `windows`, without gradients."""
    with torch.no_grad():
        losses = [
            window_loss(model, tokenizer, method, budget, w, t.continuation, t.temperature, engine).item()
            for w in windows
        ]
    return sum(losses) / len(losses)


def train(cfg: DictConfig, checkpoint_dir: Path) -> Trained:
    t = cfg.train
    run_dir = checkpoint_dir.parent
    model, tokenizer = load_model(cfg.model, cfg.hardware)
    model.eval()
    model.requires_grad_(False)
    method = method_from_config(OmegaConf.merge(cfg.method, {"checkpoint": INIT}))
    targets = list(t.lora.target_modules)
    found = {path.rsplit(".", 1)[-1] for path in lora_modules(model, targets)}
    if set(targets) - found:
        raise ValueError(
            f"train.lora.target_modules {sorted(set(targets) - found)} name no linear module of "
            f"{type(model).__name__}"
        )
    # The untrained adapter of `method.checkpoint=init` (its seed), in the LoRA shape of train.lora: with B = 0 it
    # acts as init's whatever the shape, so the run's metrics_untrained evaluate this very starting point.
    adapter = init_adapter(model, method.restore_tokens, t.lora.rank, float(t.lora.alpha), targets)
    method.use_adapter(adapter, model)
    params = adapter.parameters()
    for p in params.values():
        p.requires_grad_(True)
    books, name = training_books(t.data_file)
    windows = text_windows(books, name, tokenizer, t.texts, t.max_tokens, t.skip_chars)
    budget = resolve_budget(cfg.budget, t.max_tokens - t.continuation, model.config.num_hidden_layers)
    engine = engine_settings(cfg)
    optimizer = torch.optim.AdamW(list(params.values()), lr=float(t.lr), weight_decay=float(t.weight_decay))
    order = torch.randperm(len(windows), generator=torch.Generator().manual_seed(t.seed)).tolist()
    start = time.perf_counter()
    before = mean_loss(model, tokenizer, method, budget, windows, t, engine)
    rows = []
    for step in range(1, t.steps + 1):
        window = windows[order[(step - 1) % len(windows)]]
        loss = window_loss(model, tokenizer, method, budget, window, t.continuation, t.temperature, engine)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        row = {"step": step, "loss": loss.item()}
        if t.grad_clip is not None:
            row["grad_norm"] = float(
                torch.nn.utils.clip_grad_norm_(list(params.values()), float(t.grad_clip))
            )
        optimizer.step()
        rows.append(row)
        if step % t.log_every == 0 or step == t.steps:
            log.info("restorekv step %d/%d: loss %.5f", step, t.steps, row["loss"])
    for p in params.values():
        p.requires_grad_(False)
    after = mean_loss(model, tokenizer, method, budget, windows, t, engine)
    save_adapter(adapter, checkpoint_dir)
    atomic_write_csv(run_dir / LOG_FILE, rows)
    trained = sum(p.numel() for p in params.values())
    metrics = {
        "steps": t.steps,
        "windows": len(windows),
        "trainable_parameters": trained,
        "trainable_share": trained / sum(p.numel() for p in model.parameters()),
        "kl_before": before,
        "kl_after": after,
        "loss_first": rows[0]["loss"],
        "loss_last": rows[-1]["loss"],
        "seconds": time.perf_counter() - start,
        "log": str(run_dir / LOG_FILE),
    }
    log.info("restorekv: KL to the full cache %.5f -> %.5f over %d windows", before, after, len(windows))
    return Trained(method_overrides={"checkpoint": str(checkpoint_dir)}, metrics=metrics)
