"""Atomic file writes, shared by results (text, JSON, CSV) and checkpoints / calibrations (torch, safetensors), and
the journal by which a killed job resumes where it stopped.

Sweeps are killed and preempted: a reader (a resumed sweep, the next run loading a calibration, an aggregation
notebook) must see either the old file or the whole new one, never a torn one. Imports nothing heavy, so the
config layer and `--help` stay torch-free.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any


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


class Journal:
    """An append-only record of finished work, so that a job killed after hours resumes at its last finished batch
    instead of from the start. The first line is the `header` (which work this is: a config hash, a content key);
    each later line one batch's entries by index (`{"3": {...}, "4": {...}}`), written in one `write` and fsynced.
    A line torn by a kill is skipped (its batch is redone); a journal with another header belongs to other work:
    it is read as empty and replaced at the first `append`."""

    def __init__(self, path: str | Path, header: dict[str, Any]):
        self.path = Path(path)
        self.header = header
        self.restored = 0  # entries `entries()` found: the work a resumed job did not redo
        self._started = False

    def entries(self) -> dict[int, Any]:
        """The entries of a journal with this header, by index (empty: none, or another work's)."""
        try:
            lines = self.path.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            return {}
        if not lines or _json_line(lines[0]) != self.header:
            return {}
        held: dict[int, Any] = {}
        for line in lines[1:]:
            entry = _json_line(line)
            if isinstance(entry, dict):
                held.update({int(i): value for i, value in entry.items()})
        self.restored = len(held)
        return held

    def append(self, entries: Mapping[int, Any]) -> None:
        """Record one batch's entries (a new journal, or one of other work, starts with this header)."""
        if not self._started:
            if journal_header(self.path) != self.header:
                atomic_write_text(self.path, json.dumps(self.header, sort_keys=True) + "\n")
            self._started = True
        line = json.dumps({str(i): value for i, value in entries.items()}) + "\n"  # keys in their order
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        try:
            os.write(fd, line.encode("utf-8"))
            os.fsync(fd)
        finally:
            os.close(fd)

    def remove(self) -> None:
        """Delete the journal (its work is finished and stored, or a re-run is forced)."""
        self.path.unlink(missing_ok=True)


def journal_header(path: str | Path) -> dict[str, Any] | None:
    """The header of the journal at `path` (None: no journal there, or an unreadable one)."""
    try:
        with open(path, encoding="utf-8") as f:
            header = _json_line(f.readline())
    except (FileNotFoundError, NotADirectoryError):
        return None
    return header if isinstance(header, dict) else None


def _json_line(line: str) -> Any:
    """A line's JSON value (None: empty, or torn mid-line by a kill)."""
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        return None
