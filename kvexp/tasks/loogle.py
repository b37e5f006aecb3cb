"""LooGLE (bigainlco/LooGLE): long-dependency and short-dependency QA, cloze and summarization over documents
of 24k+ tokens, prompted as the benchmark's `Prediction/pred_opensource_models.py` prompts and scored with the
automatic metrics of its `Evaluation/` that run offline (github.com/bigai-nlco/LooGLE).

Per task: the prompt template (`config/task2prompt.json`), the generation length (`config/task2maxlen.json`) and
the metric: `loogle_similarity` for shortdep_qa, longdep_qa and longdep_summarization (BLEU-1, BLEU-4, ROUGE-1/2/L
recall), `loogle_cloze` for shortdep_cloze (exact and partial match of the masked entities); see
kvexp.tasks.metrics. A prompt over the limit keeps its first and last `max_length // 2` tokens, decoded apart and
joined (LooGLE's code is LongBench's); no chat template by default.

Context / question split (kvexp.tasks.long_context): `context` is the instruction and the document; `question`
the question (with the cloze's "What are the masked entities?") and the answer cue.

Data: `<task>.jsonl` as the hub holds it now, one row per question (`context`, `question`, `answer`; `id`,
`doc_id`, `title`, `evidence`, ... kept as meta when present; a cloze answer lists the entities of <mask-0>,
<mask-1>, ...), or in the first release's schema (one row per document: `input`, `title`, `qa_pairs` as a Python
literal of {Q, A, S} or "none" for summarization, `output`), as the repository's LooGLE-testdata/ has it:
`dataset.path` (the file, or a folder of them), else `$KVEXP_DATA_DIR/<dataset.local_file>`, else the hub (config
`summarization` for longdep_summarization), else the embedded stand-in (one question per task, written by kvexp).

Not reproduced: LooGLE's generation uses repetition_penalty=2.0 (kvexp's decoding has none); METEOR, BERTScore
and the GPT-4 judge (they need WordNet data, a RoBERTa-large download and the OpenAI API); the cloze micro
average (see `loogle_cloze`).
"""

from __future__ import annotations

import ast
import json
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
    hub_split_rows,
    read_rows,
    split_template,
    task_samples,
)

log = logging.getLogger(__name__)

# config/task2prompt.json, verbatim ("Organiocation" included): {input} is the document, {Q} the question.
_QA = "Please answer the question based on the long texts below. \n{input}\nQuestion: {Q}\nAnswer: "
PROMPTS: dict[str, str] = {
    "shortdep_qa": _QA,
    "longdep_qa": _QA,
    "shortdep_cloze": (
        "Please fill in the clozes based on the given long texts below. Each of the placeholder '<mask-n>' in "
        "the question could be an entity of Person, Location or Organiocation. The same masks represent the "
        "same entity. Output a json format answer, for example: {{'<mask-0>': 'Bob', '<mask-1>': 'Gorrosion "
        "Magazine','<mask-2>': 'Bethel Horizon'}}\n{input}\n Question: {Q} What are the masked entities? \nAnswer:"
    ),
    "longdep_summarization": "Please generate a summary of the below paper. \n{input}\n Summarization: ",
}
TASKS: tuple[str, ...] = tuple(PROMPTS)
# config/task2maxlen.json
MAX_NEW_TOKENS = {"shortdep_qa": 300, "longdep_qa": 500, "shortdep_cloze": 50, "longdep_summarization": 500}
METRICS = {task: "loogle_cloze" if task == "shortdep_cloze" else "loogle_similarity" for task in TASKS}
# The hub's configs since it holds one JSONL per task (the first release named them as the tasks).
HUB_CONFIGS = {"longdep_summarization": "summarization"}
META_FIELDS = ("title", "doc_id", "type")
LAYOUT = Layout("LooGLE", "{task}.jsonl", ("context", "question", "answer"))


def check_loogle(dataset: Mapping) -> None:
    """Reject a bad LooGLE config before a model loads, naming the option to fix."""
    check_options(dataset, TASKS, LAYOUT)
    check_rows(dataset, LAYOUT, dataset["subset"], prepare=partial(questions, dataset["subset"]))


def questions(task: str, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per question: rows of the hub's current schema as they are; a first-release row (a document
    with its `qa_pairs`) as one row per pair, or one summarization row (`qa_pairs` "none", the `output`)."""
    found: list[dict[str, Any]] = []
    for row in rows:
        if "qa_pairs" not in row:
            found.append(row)
            continue
        document = {"context": row.get("input"), "title": row.get("title")}
        if row["qa_pairs"] == "none":
            found.append({**document, "id": row.get("title"), "question": "", "answer": row.get("output")})
            continue
        pairs = row["qa_pairs"]
        try:
            pairs = ast.literal_eval(pairs) if isinstance(pairs, str) else pairs
        except (ValueError, SyntaxError) as err:
            raise ValueError(
                f"LooGLE {task}: qa_pairs of {row.get('title')!r} is not a list literal ({err})"
            ) from err
        found += [
            {
                **document,
                "id": f"{row.get('title')}-{j}",
                "question": p["Q"],
                "answer": p["A"],
                "type": p.get("type"),
            }
            for j, p in enumerate(pairs)
        ]
    return found


def cloze_reference(answer: Any) -> str:
    """A cloze's entities as a JSON object {"<mask-0>": entity, ...}: the hub lists them in mask order, the
    first release maps the masks."""
    if isinstance(answer, dict):
        masks = answer
    elif isinstance(answer, list):
        masks = {f"<mask-{i}>": entity for i, entity in enumerate(answer)}
    else:
        raise ValueError(f"a LooGLE cloze answer lists or maps its masks' entities, got {answer!r}")
    return json.dumps(masks, ensure_ascii=False)


def read_questions(dataset: Mapping) -> list[dict[str, Any]]:
    """The questions of task `dataset.subset`, after `dataset.split`."""
    task = dataset["subset"]
    hub_rows = partial(hub_split_rows, dataset, HUB_CONFIGS.get(task, task), LAYOUT.split)
    return read_rows(dataset, LAYOUT, task, hub_rows, partial(questions, task))


def build_sample(
    task: str, record: Mapping[str, Any], index: int, tokenizer, max_length: int | None, chat_template: bool
) -> GenerationSample:
    """One LooGLE question as a GenerationSample: the official prompt, truncation, length and metric."""
    halves = split_template(
        PROMPTS[task], {"input": record["context"], "Q": record["question"]}, slot="input"
    )
    context, question, fitted = fit_prompt(*halves, tokenizer, max_length, chat_template)
    answer = record["answer"]
    return GenerationSample(
        id=str(record.get("id") or f"{task}-{index}"),
        context=context,
        question=question,
        answers=[cloze_reference(answer) if task == "shortdep_cloze" else str(answer)],
        max_new_tokens=MAX_NEW_TOKENS[task],
        metric=METRICS[task],
        meta={"task": task, **{key: record.get(key) for key in META_FIELDS}, **fitted},
    )


def loogle_samples(
    dataset: Mapping, encoder: PromptEncoder, max_samples: int | None, seed: int
) -> list[GenerationSample]:
    """The registry loader: the task's first `max_samples` questions, prompts cut to fit the model."""
    return task_samples(dataset, encoder, max_samples, MAX_NEW_TOKENS, read_questions, build_sample, "LooGLE")
