"""The full-cache results a task compares with, reused across a sweep: every job of a sweep over methods and
budgets evaluates the same samples with the full cache, so the first one stores its results under `cache_dir`
and the others read them (keyed by model, hardware, settings, sample hashes and versions).

Quality is reused as is; timings only count as comparable within the process that measured them (same
machine, threads and load), which `reuse_or_run` reports beside the results.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
from omegaconf import DictConfig, OmegaConf

from kvexp.files import Journal
from kvexp.tasks import base
from kvexp.tracking import atomic_write_json

log = logging.getLogger(__name__)

T = TypeVar("T")

# Who timed a full-cache result: timings are comparable only within one process (same machine, threads, load).
_TIMED_IN = f"{socket.gethostname()}:{os.getpid()}:{time.time_ns()}"


def ids_hash(*ids: torch.Tensor) -> str:
    """A digest of token ids, for the key of the samples they are."""
    return hashlib.sha256(b"".join(t.numpy().tobytes() for t in ids)).hexdigest()


def reuse_or_run(
    cfg: DictConfig,
    content: dict[str, Any],
    run: Callable[[Journal | None], list[T]],
    restore: Callable[[list[dict[str, Any]]], list[T]],
) -> tuple[list[T], bool]:
    """The full-cache results of this model, hardware and `content` (settings, sample hashes): stored ones
    (`restore`d from their dicts) when `cfg.cache_dir` holds them, else `run(journal)`'s, stored there; and whether
    their timings are comparable with this run's (timed in this very process). The journal beside the stored
    results (`<key>.partial.jsonl`) lets a full-cache run killed midway resume, in any job of any sweep; results
    partly read back from it were timed in two processes and are never comparable."""
    path = _path(cfg, content)
    if path is not None and path.exists():
        stored = json.loads(path.read_text())
        comparable = stored["timed_in"] == _TIMED_IN
        log.info(
            "full-cache results reused from %s%s",
            path,
            "" if comparable else " (timed in another process: its timings are not compared with this run's)",
        )
        return restore(stored["results"]), comparable
    journal = None if path is None else Journal(path.with_suffix(".partial.jsonl"), {"full_cache": path.stem})
    results = run(journal)
    timed_in = _TIMED_IN if journal is None or journal.restored == 0 else None
    if path is not None:
        atomic_write_json(path, {"timed_in": timed_in, "results": [dataclasses.asdict(r) for r in results]})
        journal.remove()
    return results, timed_in is not None


def kept_journal(cfg: DictConfig, content: dict[str, Any]) -> Journal | None:
    """Where a task that runs its own loop (lm-eval) keeps its full-cache results: a journal under `cache_dir`
    (`<key>.jsonl`), never deleted, which every later job's loop reads back instead of running again (None:
    `cache_dir=null`). Results read back were timed in another process: comparable only when none were."""
    path = _path(cfg, content)
    return None if path is None else Journal(path.with_suffix(".jsonl"), {"full_cache": path.stem})


def _path(cfg: DictConfig, content: dict[str, Any]) -> Path | None:
    """Where the full-cache results of this model, hardware and `content` live (None: `cache_dir=null`)."""
    if not cfg.cache_dir:
        return None
    key = hashlib.sha256(
        json.dumps(
            {
                "model": OmegaConf.to_container(cfg.model, resolve=True),
                "dtype": cfg.hardware.dtype,
                "device": cfg.hardware.device,
                "versions": base.versions(),
                **content,
            },
            sort_keys=True,
        ).encode()
    ).hexdigest()[:24]
    return Path(cfg.cache_dir) / "full" / f"{key}.json"
