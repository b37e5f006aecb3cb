"""What the scorer trainers share: the minibatch loop (`minibatch_fit`) and the agreement measures between a learned
scorer and its oracle (`spearman`, `top_recall`)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from tqdm.auto import tqdm

OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("cosine", "step")


def step_schedule(step: int, total: int) -> float:
    """Fast KVzip's learning-rate factor (its utils.lr_schedule, as written): 0.01 x step during the first 1% of
    the steps, then 1, 0.5 from half-way, 0.25 from three quarters."""
    if step < 0.01 * total:
        return 0.01 * step
    if step >= 0.75 * total:
        return 0.25
    return 0.5 if step >= 0.5 * total else 1.0


def minibatch_fit(
    parameters: Iterable[torch.nn.Parameter],
    samples: int,
    loss_of: Callable[[torch.Tensor], torch.Tensor],
    *,
    batch_size: int,
    lr: float,
    epochs: int | None = None,
    steps: int | None = None,
    optimizer: str = "adamw",
    weight_decay: float = 0.0,
    momentum: float = 0.9,
    schedule: str = "cosine",
    grad_clip: float | None = None,
    seed: int = 0,
    desc: str = "fit",
) -> list[float]:
    """Minimize `loss_of(batch indices)` over `samples` samples shuffled each epoch: `steps` optimizer steps (the
    epochs cycling), else `epochs` epochs. AdamW or SGD with momentum; a cosine schedule over the steps or Fast
    KVzip's step schedule; optional gradient clipping. Returns the mean training loss of each epoch (of each pass
    over the data)."""
    parameters = [p for p in parameters if p.requires_grad]
    per_epoch = math.ceil(samples / batch_size)
    total = steps if steps is not None else epochs * per_epoch
    if optimizer == "adamw":
        opt = torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay)
    else:
        opt = torch.optim.SGD(parameters, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if schedule == "cosine":
        factor = lambda step: 0.5 * (1.0 + math.cos(math.pi * step / max(total, 1)))  # noqa: E731
    else:
        factor = lambda step: step_schedule(step, total)  # noqa: E731
    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    generator = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    order, position, running, seen = torch.randperm(samples, generator=generator), 0, 0.0, 0
    for _ in tqdm(range(total), desc=desc):
        if position >= samples:
            losses.append(running / seen)
            order, position, running, seen = torch.randperm(samples, generator=generator), 0, 0.0, 0
        batch = order[position : position + batch_size]
        position += batch_size
        loss = loss_of(batch)
        opt.zero_grad()
        loss.backward()
        if grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(parameters, grad_clip)
        opt.step()
        sched.step()
        running += loss.item() * batch.numel()
        seen += batch.numel()
    if seen:
        losses.append(running / seen)
    return losses


def _ranks(x: torch.Tensor) -> torch.Tensor:
    return x.argsort(dim=-1).argsort(dim=-1).float()


def spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Rank correlation along the last axis (ties broken by order)."""
    ra, rb = _ranks(a), _ranks(b)
    ra, rb = ra - ra.mean(dim=-1, keepdim=True), rb - rb.mean(dim=-1, keepdim=True)
    return (ra * rb).sum(-1) / (ra.norm(dim=-1) * rb.norm(dim=-1)).clamp_min(1e-12)


def top_recall(pred: torch.Tensor, oracle: torch.Tensor, k: int) -> torch.Tensor:
    """Share of the oracle's top-k (last axis) among the predicted top-k."""
    mine = torch.zeros_like(pred, dtype=torch.bool).scatter_(-1, pred.topk(k, dim=-1).indices, True)
    theirs = torch.zeros_like(pred, dtype=torch.bool).scatter_(-1, oracle.topk(k, dim=-1).indices, True)
    return (mine & theirs).sum(-1).float() / k
