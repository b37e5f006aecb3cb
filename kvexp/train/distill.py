"""`train=distill`: distillation fine-tuning of a compressed model towards the same model with the full cache
(the attention-guided k-means study's training; docs/training.md#distillation).

Student: the model streamed through a compressed cache in `train.chunk_size`-token chunks, compression between
chunks, in the engine's differentiable mode (`make_cache(..., differentiable=True)`), so gradients flow through
the kept and the merged entries. Teacher: the same model, frozen, with the full cache (one no-grad forward; the
LoRA adapter disabled, or a frozen copy for `trainable=all`). Loss, on the positions whose attention used the
compressed cache (the chunks after the first compression; the earlier tokens saw everything) and not on padding:

    loss = λ · T² · KL(softmax(z_teacher / T) ‖ softmax(z_student / T)) + (1 − λ) · CE(z_student, next token)

with λ = `distillation_weight` and T = `temperature` (per position, averaged over the counted positions).
Trainable: `lora` (a peft adapter on `lora.target_modules`), `all` (every model weight) or `compressor` (the
method's own parameters, `Method.trainable_parameters`: adaptive_kmeans / semantic_cluster `merged_bias`).
Checkpoint (in the run dir's `checkpoint/`): `adapter/` (peft; `load_model` merges it through
`model.checkpoint`), `model.safetensors`, or `compressor.safetensors` (the evaluation gets `method.checkpoint`);
with `trainer_state.pt` (optimizer, scheduler, step) so `train.resume_from=<dir>` continues where it stopped.
`save_every` also writes `checkpoint/step-<n>/`. Loss curves: the run dir's `train_log.csv`, and W&B when a logger
is active.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from kvexp.budgets import resolve_budget
from kvexp.files import write_atomically
from kvexp.methods import make_cache
from kvexp.methods.base import METHODS, Method, load_method_parameters, save_method_parameters
from kvexp.methods.storage import StorageMethod
from kvexp.models import load_model, save_torch
from kvexp.tasks.base import method_from_config
from kvexp.tasks.data import load_documents
from kvexp.tracking import ACTIVE_LOGGER, atomic_write_csv, make_logger
from kvexp.train import Trained
from kvexp.train.data import DATA_SOURCES, check_disjoint, engine_settings, load_training_texts, token_windows
from kvexp.train.evaluation import OBJECTIVE, TrainingEvaluator, check_evaluation

log = logging.getLogger(__name__)

TRAINABLE = ("lora", "all", "compressor")
PRECISIONS = ("fp32", "fp16", "bf16")
AUTOCAST = {"fp16": torch.float16, "bf16": torch.bfloat16}
STATE_FILE = "trainer_state.pt"
LOG_FILE = "train_log.csv"
BEST_DIR = "best"  # checkpoint/best/: the step with the best evaluation objective (train.eval_every)


# Numeric options and their kind: a string there fails naming the option, not as float('abc') does.
_NUMBERS = {
    **dict.fromkeys(
        ("temperature", "distillation_weight", "learning_rate", "weight_decay", "max_grad_norm", "lora.dropout"),
        "a number",
    ),
    **dict.fromkeys(
        ("warmup_steps", "max_steps", "epochs", "batch_size", "gradient_accumulation_steps", "max_length",
         "chunk_size", "save_every", "log_every", "lora.rank", "lora.alpha", "data.max_documents",
         "data.shuffle_seed"),
        "an integer",
    ),
}  # fmt: skip


# -- options ----------------------------------------------------------------------------------------------------------
def check(cfg: DictConfig) -> None:
    """Validate `cfg.train.*` before any model loads; messages name the option and what is allowed."""
    t = cfg.train
    for name, kind in _NUMBERS.items():
        value = OmegaConf.select(t, name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int if kind == "an integer" else int | float):
            raise ValueError(f"train.{name}={value!r} must be {kind}")
    if t.get("trainable") not in TRAINABLE:
        raise ValueError(f"train.trainable={t.get('trainable')!r}: expected one of {TRAINABLE}")
    if t.get("precision") not in PRECISIONS:
        raise ValueError(f"train.precision={t.get('precision')!r}: expected one of {PRECISIONS}")
    _check_precision(t.precision, cfg.hardware.get("device", "cpu"))
    if not 0.0 <= float(t.distillation_weight) <= 1.0:
        raise ValueError(f"train.distillation_weight={t.distillation_weight}: must be in [0, 1]")
    if float(t.temperature) <= 0:
        raise ValueError(f"train.temperature={t.temperature}: must be > 0")
    if float(t.learning_rate) <= 0:
        raise ValueError(f"train.learning_rate={t.learning_rate}: must be > 0")
    for name in ("batch_size", "gradient_accumulation_steps", "chunk_size", "epochs"):
        if int(t.get(name) or 0) < 1:
            raise ValueError(f"train.{name}={t.get(name)}: must be an integer >= 1")
    for name in ("max_steps", "save_every"):
        if t.get(name) is not None and int(t[name]) < 1:
            raise ValueError(f"train.{name}={t[name]}: must be null or >= 1")
    if int(t.warmup_steps) < 0:
        raise ValueError(f"train.warmup_steps={t.warmup_steps}: must be >= 0")
    if not isinstance(t.get("use_compression", True), bool):
        raise ValueError(f"train.use_compression={t.get('use_compression')!r} must be true or false")
    if not t.get("use_compression", True):
        # The control: the same recipe on the plain model (full cache, every position counted); the run then
        # evaluates the fine-tuned model with the configured method (method=full included).
        if t.trainable == "compressor":
            raise ValueError(
                "train.use_compression=false trains without a compressed cache, so the compressor has nothing to "
                "learn; use train.trainable=lora or all"
            )
    else:
        _check_compressed_training(cfg)
    if int(t.max_length) < 2 * int(t.chunk_size):
        raise ValueError(
            f"train.max_length={t.max_length} must be at least 2 * train.chunk_size ({t.chunk_size}): a window "
            "needs positions after a compression"
        )
    _check_lora(t)
    check_evaluation(cfg)
    source = (t.get("data") or {}).get("source")
    if source not in DATA_SOURCES:
        raise ValueError(f"train.data.source={source!r}: expected one of {DATA_SOURCES}")
    if t.get("resume_from") is not None and not (Path(str(t.resume_from)) / STATE_FILE).is_file():
        raise ValueError(
            f"train.resume_from={t.resume_from!r}: no {STATE_FILE} there (a checkpoint dir of train=distill)"
        )


def _check_compressed_training(cfg: DictConfig) -> None:
    """What distillation through a compressed cache needs: a compressing method and budget that compress within a
    window, a dense (trainable-through) method, and parameters when the compressor is what is trained."""
    t = cfg.train
    tokens = cfg.budget.get("tokens") if cfg.get("budget") is not None else None
    if tokens is not None and int(t.max_length) <= int(tokens):
        raise ValueError(
            f"train.max_length={t.max_length} must exceed budget.tokens={tokens}: otherwise nothing is compressed "
            "and there is nothing to distill"
        )
    budget = cfg.get("budget") or {}
    if cfg.method.name == "full" or all(
        budget.get(k) is None for k in ("tokens", "keep_ratio", "per_layer", "per_head")
    ):
        raise ValueError(
            f"train=distill needs a compressing method and a budget (method={cfg.method.name}, budget.tokens="
            f"{budget.get('tokens')}): with nothing compressed there is nothing to distill"
        )
    if cfg.method.name in METHODS and issubclass(METHODS[cfg.method.name], StorageMethod):
        raise ValueError(
            f"train=distill: method={cfg.method.name} stores encoded entries, which the differentiable engine mode "
            "cannot train through; use an eviction or merging method"
        )
    if t.trainable == "compressor":
        trainable = sorted(
            n for n, c in METHODS.items() if c.trainable_parameters is not Method.trainable_parameters
        )
        if cfg.method.name not in trainable:
            raise ValueError(
                f"train.trainable=compressor: method={cfg.method.name} has no trainable parameters; methods with "
                f"some: {trainable} (or use train.trainable=lora | all)"
            )


def _check_lora(t: DictConfig) -> None:
    if t.trainable == "lora":
        lora = t.get("lora") or {}
        if int(lora.get("rank") or 0) < 1:
            raise ValueError(f"train.lora.rank={lora.get('rank')}: must be >= 1")
        if not lora.get("target_modules"):
            raise ValueError("train.lora.target_modules must list module names (e.g. [q_proj, v_proj])")


def _check_precision(precision: str, device: str) -> None:
    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if precision == "fp16" and not cuda:
        raise ValueError(
            "train.precision=fp16 needs a CUDA device (hardware.device=cuda); on CPU use train.precision=fp32 or bf16"
        )
    if precision == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        raise ValueError("train.precision=bf16: this GPU has no bf16; use train.precision=fp16 or fp32")


# -- the loss -----------------------------------------------------------------------------------------------------------
def distillation_loss(
    student: torch.Tensor,  # [B, T, V] logits
    teacher: torch.Tensor,  # [B, T, V] logits
    labels: torch.Tensor,  # [B, T] next tokens
    counted: torch.Tensor,  # [B, T] bool: positions that saw the compressed cache and are not padding
    temperature: float,
    weight: float,
) -> tuple[torch.Tensor, dict[str, float]]:
    """λ·T²·KL(teacher ‖ student at T) + (1 − λ)·CE, averaged over the `counted` positions."""
    s, t = student[counted].float(), teacher[counted].float()  # [N, V]
    log_p_student = F.log_softmax(s / temperature, dim=-1)
    log_p_teacher = F.log_softmax(t / temperature, dim=-1)
    kl = F.kl_div(log_p_student, log_p_teacher, log_target=True, reduction="batchmean") * temperature**2
    ce = F.cross_entropy(s, labels[counted])
    loss = weight * kl + (1 - weight) * ce
    return loss, {"loss": loss.item(), "kl": kl.item(), "ce": ce.item(), "positions": int(counted.sum())}


def student_forward(
    model, method, budget, inputs: torch.Tensor, chunk_size: int, engine: Mapping[str, Any]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stream `inputs` [B, T] through a fresh differentiable compressed cache in chunks: (logits [B, T, V],
    compressed [T] bool: the positions whose step attended to an already compressed cache)."""
    cache = make_cache(model, method, budget, differentiable=True, **engine)
    logits, compressed = [], []
    for start in range(0, inputs.shape[1], chunk_size):
        chunk = inputs[:, start : start + chunk_size]
        was_compressed = any(layer.compressions > 0 for layer in cache.layers)
        logits.append(model(chunk, past_key_values=cache).logits)
        compressed.append(torch.full((chunk.shape[1],), was_compressed, device=inputs.device))
    return torch.cat(logits, dim=1), torch.cat(compressed)


@torch.no_grad()
def teacher_forward(model, inputs: torch.Tensor) -> torch.Tensor:
    """The full-cache logits [B, T, V] of `inputs` (one pass through an uncompressed kvexp cache)."""
    return model(inputs, past_key_values=make_cache(model, "full")).logits


# -- the trainer ----------------------------------------------------------------------------------------------------
class Distiller:
    """The model(s), the trainable parameters and the optimizer of one distillation run."""

    def __init__(self, cfg: DictConfig, model, method, budget, device: torch.device):
        t = cfg.train
        self.cfg, self.t, self.method, self.budget, self.device = cfg, t, method, budget, device
        self.engine = engine_settings(cfg)
        self.trainable = t.trainable
        self.teacher = None
        model.requires_grad_(False)
        if self.trainable == "lora":
            from peft import LoraConfig, get_peft_model

            lora = t.lora
            config = LoraConfig(
                r=int(lora.rank),
                lora_alpha=float(lora.alpha),
                lora_dropout=float(lora.dropout),
                target_modules=list(lora.target_modules),
                bias="none",
            )
            self.peft = get_peft_model(model, config)
            self.model = (
                self.peft.get_base_model()
            )  # LoRA layers are injected in place: forward the plain model
            params = [p for p in self.peft.parameters() if p.requires_grad]
        elif self.trainable == "all":
            self.teacher = copy.deepcopy(model).eval()
            self.model = model
            model.requires_grad_(True)
            params = list(model.parameters())
        else:
            self.model = model
            params = list(method.trainable_parameters(model).values())
        self.params = params
        self.optimizer = torch.optim.AdamW(
            params, lr=float(t.learning_rate), weight_decay=float(t.weight_decay)
        )
        self.scaler = torch.amp.GradScaler(device.type) if t.precision == "fp16" else None

    def make_scheduler(self, total_steps: int) -> None:
        from transformers import get_linear_schedule_with_warmup

        self.scheduler = get_linear_schedule_with_warmup(
            self.optimizer, int(self.t.warmup_steps), total_steps
        )

    def _autocast(self):
        if self.t.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=AUTOCAST[self.t.precision])

    def teacher_logits(self, inputs: torch.Tensor) -> torch.Tensor:
        with self._autocast():
            if self.trainable == "lora":
                with self.peft.disable_adapter():
                    return teacher_forward(self.model, inputs)
            return teacher_forward(self.teacher if self.teacher is not None else self.model, inputs)

    def loss(self, batch: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """The distillation loss of one micro-batch of token windows [B, L] (with autograd)."""
        batch = batch.to(self.device)
        inputs, labels = batch[:, :-1], batch[:, 1:]
        teacher = self.teacher_logits(inputs)
        self.model.train()
        compressing = bool(self.t.get("use_compression", True))
        with self._autocast():
            if compressing:
                student, compressed = student_forward(
                    self.model, self.method, self.budget, inputs, int(self.t.chunk_size), self.engine
                )
            else:  # the uncompressed control: the same recipe, every position counted
                student, _ = student_forward(self.model, "full", None, inputs, int(self.t.chunk_size), {})
                compressed = torch.ones(inputs.shape[1], dtype=torch.bool, device=inputs.device)
        self.model.eval()
        counted = compressed[None, :].expand_as(labels) & (labels != _PAD)
        if not bool(counted.any()):
            raise ValueError(
                f"train.max_length={self.t.max_length}: no position saw a compressed cache at this budget; use a "
                "longer train.max_length or a smaller budget"
            )
        return distillation_loss(
            student, teacher, labels, counted, float(self.t.temperature), float(self.t.distillation_weight)
        )

    def step(self, micro_batches: list[torch.Tensor]) -> dict[str, float]:
        """One optimizer step over `micro_batches` (gradient accumulation); the mean of their loss figures."""
        self.optimizer.zero_grad(set_to_none=True)
        figures: dict[str, float] = {}
        for batch in micro_batches:
            loss, parts = self.loss(batch)
            scaled = loss / len(micro_batches)
            try:
                (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
            except RuntimeError as err:
                if "modified by an inplace operation" not in str(err):
                    raise
                raise RuntimeError(
                    f"method={self.method.name}: its merge writes into K/V it also used with autograd (merge weights "
                    "computed from the keys with gradients); compute those weights under torch.no_grad() in the "
                    "method's merge to train through it"
                ) from err
            for k, v in parts.items():
                figures[k] = figures.get(k, 0.0) + v / len(micro_batches)
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if self.t.get("max_grad_norm"):
            figures["grad_norm"] = float(
                torch.nn.utils.clip_grad_norm_(self.params, float(self.t.max_grad_norm))
            )
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        return figures

    # -- checkpoints --------------------------------------------------------------------------------------------
    def save(self, directory: Path, step: int, log_rows: list[dict]) -> dict[str, Any]:
        """Write the trained parts and the trainer state into `directory`; returns where the evaluation finds them."""
        directory.mkdir(parents=True, exist_ok=True)
        found = self.found(directory)
        if self.trainable == "lora":
            self.peft.save_pretrained(str(directory / "adapter"))
        elif self.trainable == "all":
            from safetensors.torch import save_model

            write_atomically(directory / "model.safetensors", lambda partial: save_model(self.model, partial))
        else:
            save_method_parameters(self.method, directory / "compressor.safetensors")
        state = {
            "step": step,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "trainable": self.trainable,
        }
        save_torch(directory / STATE_FILE, state)
        if log_rows:
            atomic_write_csv(directory / LOG_FILE, log_rows)
        return found

    def found(self, directory: Path) -> dict[str, Any]:
        """Where the evaluation finds the trained parts `save` wrote into `directory`."""
        if self.trainable == "compressor":
            return {
                "model_checkpoint": None,
                "method_overrides": {"checkpoint": str(directory / "compressor.safetensors")},
            }
        name = "adapter" if self.trainable == "lora" else "model.safetensors"
        return {"model_checkpoint": str(directory / name), "method_overrides": {}}

    def resume(self, directory: Path) -> tuple[int, list[dict]]:
        """Load the trained parts and the trainer state a `save` wrote; returns (step, loss rows so far)."""
        import csv

        state = torch.load(directory / STATE_FILE, weights_only=False)
        if state["trainable"] != self.trainable:
            raise ValueError(
                f"train.resume_from={str(directory)!r} was trained with trainable={state['trainable']}, not "
                f"train.trainable={self.trainable}"
            )
        if self.trainable == "lora":
            from peft import set_peft_model_state_dict
            from peft.utils import load_peft_weights

            set_peft_model_state_dict(self.peft, load_peft_weights(str(directory / "adapter")))
        elif self.trainable == "all":
            from safetensors.torch import load_model

            load_model(self.model, str(directory / "model.safetensors"))
        else:
            saved = load_method_parameters(self.method.name, directory / "compressor.safetensors")
            with torch.no_grad():
                for name, param in self.method.trainable_parameters(self.model).items():
                    param.copy_(saved[name])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state["scaler"] is not None:
            self.scaler.load_state_dict(state["scaler"])
        rows = []
        if (directory / LOG_FILE).is_file():
            with (directory / LOG_FILE).open() as f:
                rows = [{k: _number(v) for k, v in row.items()} for row in csv.DictReader(f)]
        return int(state["step"]), rows


_PAD = -100  # label value of padding positions (windows are packed, so none today; kept for batched callers)


def _number(text: str) -> Any:
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            return text


def micro_batch(windows: torch.Tensor, index: int, batch_size: int, seed: int) -> torch.Tensor:
    """Micro-batch `index` of a deterministic per-epoch shuffle of the windows [N, L] (so a resumed run sees the
    same batches as an uninterrupted one)."""
    n = windows.shape[0]
    rows = []
    for i in range(index * batch_size, (index + 1) * batch_size):
        epoch, offset = divmod(i, n)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))
        rows.append(windows[order[offset]])
    return torch.stack(rows)


def train(cfg: DictConfig, checkpoint_dir: Path) -> Trained:
    """Distill as `cfg.train` says; the checkpoint goes under `checkpoint_dir` (the run dir's `checkpoint/`)."""
    t = cfg.train
    run_dir = checkpoint_dir.parent
    model, tokenizer = load_model(cfg.model, cfg.hardware)
    method = method_from_config(cfg.method)
    budget = resolve_budget(cfg.budget, int(t.max_length) - 1, model.config.num_hidden_layers)
    accum, batch_size = int(t.gradient_accumulation_steps), int(t.batch_size)

    docs = load_training_texts(t.data)
    if cfg.dataset.get("task", "perplexity") == "perplexity":
        evaluated = load_documents(cfg.dataset, cfg.eval.max_samples)
        check_disjoint(docs, [(d.id, d.text) for d in evaluated])
    needed = None if t.max_steps is None else int(t.max_steps) * accum * batch_size
    windows = token_windows(docs, tokenizer, int(t.max_length), needed)
    per_epoch = math.ceil(windows.shape[0] / (batch_size * accum))
    total = int(t.max_steps) if t.max_steps is not None else int(t.epochs) * per_epoch
    log.info(
        "distilling %s on %d windows of %d tokens: %d steps",
        t.trainable,
        windows.shape[0],
        t.max_length,
        total,
    )

    distiller = Distiller(cfg, model, method, budget, model.device)
    distiller.make_scheduler(total)
    evaluator = TrainingEvaluator(cfg, tokenizer, method) if t.get("eval_every") is not None else None
    step, rows = 0, []
    if t.resume_from is not None:
        step, rows = distiller.resume(Path(str(t.resume_from)))
        log.info("resumed from %s at step %d", t.resume_from, step)
        if evaluator is not None:
            _resume_best(evaluator, distiller, rows, Path(str(t.resume_from)), step, checkpoint_dir)
    job_logger = ACTIVE_LOGGER.get()  # the job's run (train_or_eval), else one of its own
    logger = job_logger or make_logger(cfg.logger, cfg, run_dir, "train", None, ["train", cfg.method.name])
    start_step, started = step, time.perf_counter()
    try:
        while step < total:
            micro = [
                micro_batch(windows, step * accum + i, batch_size, int(t.data.shuffle_seed))
                for i in range(accum)
            ]
            figures = distiller.step(micro)
            step += 1
            row = {"step": step, "lr": distiller.scheduler.get_last_lr()[0], **figures}
            rows.append(row)
            if evaluator is not None and evaluator.due(step, total):
                scores, improved = evaluator.evaluate(distiller.model, step)
                row.update(scores)
                if improved:
                    distiller.save(checkpoint_dir / BEST_DIR, step, rows)
            atomic_write_csv(run_dir / LOG_FILE, rows)
            if logger is not None:
                logger.log_progress({f"train/{k}": v for k, v in row.items()})
            if step % int(t.get("log_every") or 1) == 0:
                log.info(
                    "step %d/%d loss %.4f (kl %.4f, ce %.4f)", step, total, row["loss"], row["kl"], row["ce"]
                )
            if t.save_every is not None and step % int(t.save_every) == 0 and step < total:
                distiller.save(checkpoint_dir / f"step-{step}", step, rows)
    finally:
        if logger is not None and logger is not job_logger:
            logger.finish()
    found = distiller.save(checkpoint_dir, step, rows)
    trained_steps = [r for r in rows if r["step"] > start_step]
    best = evaluator.best if evaluator is not None else None
    if best is not None and t.get("keep_best", True):
        found = distiller.found(checkpoint_dir / BEST_DIR)  # the evaluation that follows uses the best step
    return Trained(
        model_checkpoint=found["model_checkpoint"],
        method_overrides=found["method_overrides"],
        metrics={
            "trainable": t.trainable,
            "trainable_parameters": sum(p.numel() for p in distiller.params),
            "steps": step,
            "resumed_from_step": start_step if t.resume_from is not None else None,
            "windows": int(windows.shape[0]),
            "loss_first": trained_steps[0]["loss"] if trained_steps else None,
            "loss_last": rows[-1]["loss"] if rows else None,
            "seconds": time.perf_counter() - started,
            "log": str(run_dir / LOG_FILE),
            **(
                {}
                if evaluator is None
                else {
                    "evaluations": sum(isinstance(r.get(OBJECTIVE), int | float) for r in rows),
                    "best_step": best[0] if best else None,
                    "best_objective": best[1] if best else None,
                    "evaluated_checkpoint": "best"
                    if best is not None and t.get("keep_best", True)
                    else "last",
                }
            ),
        },
    )


def _resume_best(
    evaluator: TrainingEvaluator,
    distiller: Distiller,
    rows: list[dict],
    resumed: Path,
    step: int,
    checkpoint_dir: Path,
) -> None:
    """Carry a resumed run's best step on (from its log rows) with its parameters in this run's checkpoint/best/:
    the resumed checkpoint itself when it is the best step, else the resumed run's checkpoint/best/ when that holds
    the same step; otherwise (it was overwritten by a later best) the best is chosen afresh, with a warning."""
    evaluator.restore(rows)
    if evaluator.best is None:
        return
    best_step, target = evaluator.best[0], checkpoint_dir / BEST_DIR
    if best_step == step:
        distiller.save(target, step, rows)
        return
    source = (resumed.parent if resumed.name.startswith("step-") else resumed) / BEST_DIR
    if (source / STATE_FILE).is_file() and torch.load(source / STATE_FILE, weights_only=False)[
        "step"
    ] == best_step:
        if source.resolve() != target.resolve():
            shutil.copytree(source, target, dirs_exist_ok=True)
        return
    log.warning(
        "resume: the best evaluated step (%d) has no checkpoint in %s; the best is chosen among the evaluations "
        "from here on",
        best_step,
        source,
    )
    evaluator.best = None
