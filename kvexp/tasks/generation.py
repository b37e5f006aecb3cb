"""Generation tasks: a context that is compressed, a question, and reference answers to score the output against.

Protocol (DESIGN.md §4, `eval.protocol`): `query_agnostic` (default, kvpress's) prefills and compresses the
context alone, then appends the question and decodes; `query_aware` (SnapKV's setting) puts the question inside
the prompt that is compressed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class GenerationSample:
    """One generation example, task-independent: every generation dataset yields these."""

    id: str
    context: str  # the long part the cache compresses
    question: (
        str  # appended after compression (query_agnostic) or part of the compressed prompt (query_aware)
    )
    answers: list[str]  # references the prediction is scored against
    answer_prefix: str = ""  # text the model continues from, after the question (e.g. "The pass key is")
    max_new_tokens: int = 32
    metric: str = "qa"  # which scorer applies (the task's metric family, see kvexp.tasks.metrics)
    meta: dict[str, Any] = field(
        default_factory=dict
    )  # depth, length, task name, ... (copied to samples.csv)
