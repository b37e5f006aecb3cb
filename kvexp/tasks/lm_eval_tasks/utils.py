"""`custom_dataset` hook of kvexp's local lm-eval tasks: a JSONL file as a one-split dataset, fully offline.

lm-eval resolves relative `data_files` against the process's working directory; this hook resolves them
against this folder instead, so the tasks run from anywhere (and from an installed wheel).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import datasets

HERE = Path(__file__).resolve().parent


def load_jsonl(data_file: str, split: str = "test", **_metadata: Any) -> dict[str, datasets.Dataset]:
    """{split: the records of `data_file`} (a path relative to this folder, or absolute).

    lm-eval passes the task's `metadata` as keyword arguments too; they do not concern the data.
    """
    path = Path(data_file).expanduser()
    path = path if path.is_absolute() else HERE / path
    with path.open(encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    return {split: datasets.Dataset.from_list(records)}
