"""Atomic file writes, shared by results (text, JSON, CSV) and checkpoints / calibrations (torch, safetensors).

Sweeps are killed and preempted: a reader (a resumed sweep, the next run loading a calibration, an aggregation
notebook) must see either the old file or the whole new one, never a torn one. Imports nothing heavy, so the
config layer and `--help` stay torch-free.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def write_atomically(path: Path, write: Callable[[str], None]) -> None:
    """`write(partial)` a temporary file beside `path`, fsync it, then rename it to `path` (an atomic rename on one
    file system): a reader sees the old file or the whole new one, even after a crash; the temporary file is
    removed if writing fails. An existing file keeps its permissions; a new one gets 0o644 (mkstemp's 0o600
    would hide results from co-workers)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = path.stat().st_mode & 0o777 if path.exists() else 0o644
    fd, partial = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(partial)
        with open(partial, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(partial, mode)
        os.replace(partial, path)
    finally:
        Path(partial).unlink(missing_ok=True)


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` (utf-8, newlines as given) to `path` so that it holds either its old content or all of `text`."""
    write_atomically(path, lambda partial: Path(partial).write_text(text, encoding="utf-8", newline=""))
