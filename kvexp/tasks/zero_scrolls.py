"""ZeroSCROLLS (tau/zero_scrolls): its 10 zero-shot long-text tasks, prompted, truncated and scored as the
benchmark does (github.com/tau-nlp/zero_scrolls experiments/api, and the metrics/ of its hub dataset).

Each row's `input` is the whole prompt (instruction, document, query, answer cue); `query_start_index` and
`query_end_index` locate the query in it. A prompt over the limit keeps its beginning: the first
`max_length - len(truncation_seperator + query and cue)` tokens, then the row's `truncation_seperator`, then the
query and cue (experiments/api/openai_api.py). With `dataset.chat_template` the prompt is the chat-API one of
the same file, inside the model's chat template: "Do not provide any explanation." appended to the instruction
(not for the summarization tasks) and the answer cue dropped. Generation lengths are api.py's
`dataset_to_leave_tokens_for_generations`. Metrics (kvexp.tasks.metrics): ROUGE-1/2/L and their geometric mean
(gov_report, summ_screen_fd, qmsum, squality), F1 (qasper, narrative_qa, musique), accuracy (quality),
exponential similarity (space_digest), concordance index (book_sum_sort); rows repeating an id are one example
with several references, as the benchmark's evaluator groups them.

Context / question split (kvexp.tasks.long_context): `context` is `input[:query_start_index]` (instruction,
document and what precedes the query; after truncation, the kept beginning and the separator), `question` the
query and answer cue.

Data: the validation split (`dataset.split`, default "validation": the test split's outputs are private, scored
by the leaderboard) in ZeroSCROLLS's schema (`id`, `pid`, `input`, `output`, `document_start_index`,
`document_end_index`, `query_start_index`, `query_end_index`, `truncation_seperator`): `dataset.path` (the file,
or a folder of `<task>/validation.jsonl` as the hub's zips unpack), else `$KVEXP_DATA_DIR/<dataset.local_file>`,
else the hub (`<task>.zip`, `dataset.hub_file`), else the embedded stand-in (one example per task, by kvexp).

Not reproduced: the API runners' token slack (one token; nine more for chat models); Claude's prompt; the
task scores' scale (x 100) and ROUGE's corpus-level geometric mean (see kvexp.tasks.metrics.zero_scrolls_rouge).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from functools import partial
from typing import Any

from kvexp.tasks.generation import GenerationSample, PromptEncoder
from kvexp.tasks.long_context import (
    Layout,
    check_options,
    check_rows,
    fit_prompt,
    hub_file_rows,
    read_rows,
    task_samples,
)

log = logging.getLogger(__name__)

SUMMARIZATION = ("gov_report", "summ_screen_fd", "qmsum", "squality")
METRICS: dict[str, str] = {
    **dict.fromkeys(SUMMARIZATION, "zero_scrolls_rouge"),
    **dict.fromkeys(("qasper", "narrative_qa", "musique"), "zero_scrolls_f1"),
    "quality": "zero_scrolls_accuracy",
    "space_digest": "zero_scrolls_exp_similarity",
    "book_sum_sort": "zero_scrolls_concordance_index",
}
TASKS: tuple[str, ...] = tuple(METRICS)
# experiments/api/api.py's dataset_to_leave_tokens_for_generations.
MAX_NEW_TOKENS: dict[str, int] = {
    "gov_report": 1024,
    "summ_screen_fd": 512,
    "qmsum": 512,
    "squality": 512,
    "qasper": 128,
    "narrative_qa": 64,
    "musique": 32,
    "quality": 10,
    "space_digest": 36,
    "book_sum_sort": 256,
}
# api.py's get_chat_format_request_tag_and_answer_type: what chat models are told beside the instruction.
FORMAT_REQUEST = "Do not provide any explanation."
LAYOUT = Layout(
    "ZeroSCROLLS",
    "{task}/validation.jsonl",
    ("id", "input", "output", "query_start_index", "query_end_index", "truncation_seperator"),
    split="validation",
)


def check_zero_scrolls(dataset: Mapping) -> None:
    """Reject a bad ZeroSCROLLS config before a model loads, naming the option to fix."""
    split = str(dataset.get("split") or LAYOUT.split)
    if split.split("[")[0].strip() == "test":
        raise ValueError(
            f"dataset.split={split!r}: ZeroSCROLLS's test outputs are private (its leaderboard scores them); "
            "use 'validation' or a slice of it"
        )
    check_options(dataset, TASKS, LAYOUT)
    check_rows(dataset, LAYOUT, dataset["subset"], prepare=examples)


def examples(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per example: rows repeating an id are one example whose `outputs` are all their outputs (the
    evaluator's drop_duplicates_in_input)."""
    by_id: dict[Any, dict[str, Any]] = {}
    for i, row in enumerate(rows):
        if row.get("output") is None:
            raise ValueError(f"row {i} of ZeroSCROLLS (id {row.get('id')!r}) has no output to score against")
        by_id.setdefault(row.get("id"), {**row, "outputs": []})["outputs"].append(row["output"])
    return list(by_id.values())


def read_examples(dataset: Mapping) -> list[dict[str, Any]]:
    """The examples of task `dataset.subset`, after `dataset.split`."""
    task = dataset["subset"]
    hub_rows = partial(hub_file_rows, dataset, task, member=f"{LAYOUT.split}.jsonl")
    return read_rows(dataset, LAYOUT, task, hub_rows, examples)


def split_prompt(task: str, record: Mapping[str, Any], chat: bool) -> tuple[str, str]:
    """The row's prompt as (up to the query, the query and answer cue); for chat models openai_api.py's prompt:
    the format request after the instruction (but for summarization), the answer cue dropped."""
    text, start, end = record["input"], record["query_start_index"], record["query_end_index"]
    if not chat:
        return text[:start], text[start:]
    if task not in SUMMARIZATION:
        cut = text.find("\n\n")  # the instruction ends at the first blank line
        text = f"{text[:cut].strip()} {FORMAT_REQUEST}{text[cut:]}"
        start, end = start + len(FORMAT_REQUEST) + 1, end + len(FORMAT_REQUEST) + 1
    return text[:start], text[start:end]


def keep_beginning(
    context: str, question: str, tokenizer, max_length: int, separator: str
) -> tuple[str, str, int]:
    """openai_api.py's truncation to `max_length` tokens: the prompt's first tokens, as many as the separator,
    query and cue leave room for, then the separator. Returns (context, question, prompt tokens before)."""
    ids = tokenizer(context + question).input_ids
    if len(ids) <= max_length:
        return context, question, len(ids)
    room = max_length - len(tokenizer(separator + question, add_special_tokens=False).input_ids)
    if room < 1:
        raise ValueError(
            f"the query and answer cue alone exceed the {max_length}-token prompt limit; raise dataset.max_length"
        )
    return tokenizer.decode(ids[:room], skip_special_tokens=True) + separator, question, len(ids)


def build_sample(
    task: str, record: Mapping[str, Any], index: int, tokenizer, max_length: int | None, chat_template: bool
) -> GenerationSample:
    """One ZeroSCROLLS example as a GenerationSample: its prompt, truncation, length and metric."""
    truncate = partial(keep_beginning, separator=record["truncation_seperator"])
    halves = split_prompt(task, record, chat_template)
    context, question, fitted = fit_prompt(*halves, tokenizer, max_length, chat_template, truncate)
    return GenerationSample(
        id=str(record.get("id") or f"{task}-{index}"),
        context=context,
        question=question,
        answers=[str(o) for o in record["outputs"]],
        max_new_tokens=MAX_NEW_TOKENS[task],
        metric=METRICS[task],
        meta={"task": task, **fitted},
    )


def zero_scrolls_samples(
    dataset: Mapping, encoder: PromptEncoder, max_samples: int | None, seed: int
) -> list[GenerationSample]:
    """The registry loader: the task's first `max_samples` examples, prompts cut to fit the model."""
    return task_samples(
        dataset, encoder, max_samples, MAX_NEW_TOKENS, read_examples, build_sample, "ZeroSCROLLS"
    )
