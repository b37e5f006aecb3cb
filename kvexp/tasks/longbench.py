"""LongBench (THUDM/LongBench v1): the 16 English tasks as generation samples, prompted and scored as the
benchmark's own `pred.py` / `eval.py` do.

Per task: the official prompt template (`config/dataset2prompt.json`), generation length
(`dataset2maxlen.json`), metric (`eval.py`'s dataset2metric, as a `kvexp.tasks.metrics` family), and
`pred.py`'s rules: a prompt longer than the limit keeps its first and last `max_length // 2` tokens
(LongBench truncates in the middle because instructions sit at both ends), and the chat template is
skipped for the few-shot and code tasks (trec, triviaqa, samsum, lcc, repobench-p).

Context / question split: every English template has the form `head {context} tail`, where the task's
`{input}` (if any) is in the tail, after the context. A sample's `context` is the prompt up to and
including the context (what the cache compresses under the query-agnostic protocol), its `question` the
rest (the instructions repeated after the context, the question and the answer cue), so
`context + question` is exactly LongBench's prompt. After truncation the tail is still the prompt's end
whenever it is shorter than half the limit; if the cut went into the tail the split falls at the cut.
A chat template, when asked for, wraps the whole prompt: its opening joins `context`, its closing and the
assistant header join `question`.

Data: a local JSONL per task in LongBench's schema (`input`, `context`, `answers`, `length`, `dataset`,
`language`, `all_classes`, `_id`): `dataset.path` (the file, or a folder of `<task>.jsonl` such as the
unpacked `data.zip`), else `$KVEXP_DATA_DIR/<dataset.local_file>`, else the hub, else the embedded stand-in
(one row per task written by kvexp, named in the log; kvexp.tasks.long_context). THUDM/LongBench on the
hub is a loading-script dataset, which `datasets` >= 4 refuses to run, so with `dataset.hub_file` set
(default `data.zip`) the archive is downloaded with `huggingface_hub` and read directly; with
`hub_file: null`, `datasets.load_dataset(hub_id, task, split=...)` loads a Parquet copy in the same schema.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import Any

from kvexp.tasks import long_context
from kvexp.tasks.generation import GenerationSample, PromptEncoder
from kvexp.tasks.long_context import (
    Layout,
    check_options,
    check_rows,
    fit_prompt,
    hub_file_rows,
    hub_split_rows,
    read_rows,
    split_template,
)

log = logging.getLogger(__name__)

# dataset2prompt.json, English tasks, verbatim as released with v1: including the stray spaces (qasper's
# "\n\n Answer", multi_news's "news. \n", the code tasks' "below. \n") and narrativeqa's "asconcisely",
# which SnapKV, PyramidKV and lm-eval's longbench share (a later LongBench commit spells it out).
PROMPTS: dict[str, str] = {
    "narrativeqa": (
        "You are given a story, which can be either a novel or a movie script, and a question. Answer the "
        "question asconcisely as you can, using a single phrase if possible. Do not provide any "
        "explanation.\n\nStory: {context}\n\nNow, answer the question based on the story asconcisely as "
        "you can, using a single phrase if possible. Do not provide any explanation.\n\nQuestion: {input}"
        "\n\nAnswer:"
    ),
    "qasper": (
        "You are given a scientific article and a question. Answer the question as concisely as you can, "
        "using a single phrase or sentence if possible. If the question cannot be answered based on the "
        'information in the article, write "unanswerable". If the question is a yes/no question, answer '
        '"yes", "no", or "unanswerable". Do not provide any explanation.\n\nArticle: {context}\n\n Answer '
        "the question based on the above article as concisely as you can, using a single phrase or "
        "sentence if possible. If the question cannot be answered based on the information in the "
        'article, write "unanswerable". If the question is a yes/no question, answer "yes", "no", or '
        '"unanswerable". Do not provide any explanation.\n\nQuestion: {input}\n\nAnswer:'
    ),
    "multifieldqa_en": (
        "Read the following text and answer briefly.\n\n{context}\n\nNow, answer the following question "
        "based on the above text, only give me the answer and do not output any other words.\n\n"
        "Question: {input}\nAnswer:"
    ),
    **dict.fromkeys(
        ("hotpotqa", "2wikimqa", "musique"),
        "Answer the question based on the given passages. Only give me the answer and do not output any "
        "other words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the "
        "given passages. Only give me the answer and do not output any other words.\n\nQuestion: {input}"
        "\nAnswer:",
    ),
    "gov_report": (
        "You are given a report by a government agency. Write a one-page summary of the report.\n\n"
        "Report:\n{context}\n\nNow, write a one-page summary of the report.\n\nSummary:"
    ),
    "qmsum": (
        "You are given a meeting transcript and a query containing a question or instruction. Answer the "
        "query in one or more sentences.\n\nTranscript:\n{context}\n\nNow, answer the query based on the "
        "above meeting transcript in one or more sentences.\n\nQuery: {input}\nAnswer:"
    ),
    "multi_news": (
        "You are given several news passages. Write a one-page summary of all news. \n\nNews:\n{context}"
        "\n\nNow, write a one-page summary of all the news.\n\nSummary:"
    ),
    "trec": (
        "Please determine the type of the question below. Here are some examples of questions.\n\n"
        "{context}\n{input}"
    ),
    "triviaqa": (
        "Answer the question based on the given passage. Only give me the answer and do not output any "
        "other words. The following are some examples.\n\n{context}\n\n{input}"
    ),
    "samsum": (
        "Summarize the dialogue into a few short sentences. The following are some examples.\n\n"
        "{context}\n\n{input}"
    ),
    "passage_count": (
        "There are some paragraphs below sourced from Wikipedia. Some of them may be duplicates. Please "
        "carefully read these paragraphs and determine how many unique paragraphs there are after "
        "removing duplicates. In other words, how many non-repeating paragraphs are there in total?\n\n"
        "{context}\n\nPlease enter the final count of unique paragraphs after removing duplicates. The "
        "output format should only contain the number, such as 1, 2, 3, and so on.\n\nThe final answer "
        "is: "
    ),
    "passage_retrieval_en": (
        "Here are 30 paragraphs from Wikipedia, along with an abstract. Please determine which paragraph "
        "the abstract is from.\n\n{context}\n\nThe following is an abstract.\n\n{input}\n\nPlease enter "
        'the number of the paragraph that the abstract is from. The answer format must be like "Paragraph '
        '1", "Paragraph 2", etc.\n\nThe answer is: '
    ),
    "lcc": "Please complete the code given below. \n{context}Next line of code:\n",
    "repobench-p": "Please complete the code given below. \n{context}{input}Next line of code:\n",
}
TASKS: tuple[str, ...] = tuple(PROMPTS)

# dataset2maxlen.json: new tokens generated per task.
MAX_NEW_TOKENS: dict[str, int] = {
    "narrativeqa": 128,
    "qasper": 128,
    "multifieldqa_en": 64,
    "hotpotqa": 32,
    "2wikimqa": 32,
    "musique": 32,
    "gov_report": 512,
    "qmsum": 512,
    "multi_news": 512,
    "trec": 64,
    "triviaqa": 32,
    "samsum": 128,
    "passage_count": 32,
    "passage_retrieval_en": 32,
    "lcc": 64,
    "repobench-p": 64,
}

# eval.py's dataset2metric, as kvexp.tasks.metrics families.
METRICS: dict[str, str] = {
    **dict.fromkeys(
        ("narrativeqa", "qasper", "multifieldqa_en", "hotpotqa", "2wikimqa", "musique", "triviaqa"),
        "longbench_qa_f1",
    ),
    **dict.fromkeys(("gov_report", "qmsum", "multi_news", "samsum"), "longbench_rouge"),
    "trec": "longbench_classification",
    "passage_count": "longbench_count",
    "passage_retrieval_en": "longbench_retrieval",
    "lcc": "longbench_code_sim",
    "repobench-p": "longbench_code_sim",
}

# pred.py: chat models do better without their chat template on the few-shot and code tasks.
NO_CHAT_TEMPLATE = frozenset({"trec", "triviaqa", "samsum", "lcc", "repobench-p"})
# eval.py: the few-shot tasks are scored on the prediction's first line (the model goes on with new shots).
FIRST_LINE = frozenset({"trec", "triviaqa", "samsum"})

# LongBench's files: one <task>.jsonl each (data.zip), the embedded stand-in one file naming each row's task.
LAYOUT = Layout("LongBench", "{task}.jsonl", ("input", "context", "answers"), task_field="dataset")


def check_longbench(dataset: Mapping) -> None:
    """Reject a bad LongBench config before a model loads, naming the option to fix."""
    check_options(dataset, TASKS, LAYOUT)
    check_rows(dataset, LAYOUT, dataset["subset"], prepare=partial(_check_classes, dataset["subset"]))


def prompt_limit(dataset: Mapping, model_max_context: int) -> int:
    """Prompt tokens kept (LongBench's model2maxlen): `dataset.max_length`, else the model's context minus
    the task's generation length (kvexp.tasks.long_context.prompt_limit)."""
    return long_context.prompt_limit(dataset, model_max_context, MAX_NEW_TOKENS[dataset["subset"]])


def read_records(dataset: Mapping) -> list[dict[str, Any]]:
    """The task's rows in LongBench's schema, after `dataset.split` (e.g. "test[:50]"); the embedded
    stand-in's row of the task, whatever the split."""
    task = dataset["subset"]
    return read_rows(dataset, LAYOUT, task, lambda: _read_hub(dataset, task), partial(_check_classes, task))


def _check_classes(task: str, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """trec's rows name the task's classes, which its metric needs."""
    unnamed = [i for i, r in enumerate(records) if not r.get("all_classes")] if task == "trec" else []
    if unnamed:
        raise ValueError(f"row {unnamed[0]} of LongBench task 'trec' has no all_classes")
    return records


def _read_hub(dataset: Mapping, task: str) -> list[dict[str, Any]]:
    if dataset.get("hub_file"):
        return hub_file_rows(dataset, task, member=f"{task}.jsonl")
    return hub_split_rows(dataset, task, "test")


def read_archive(archive: Path, task: str) -> list[dict[str, Any]]:
    """The task's rows from LongBench's `data.zip` (members `data/<task>.jsonl`)."""
    return long_context.read_archive(archive, f"{task}.jsonl")


def split_prompt(task: str, record: Mapping[str, Any]) -> tuple[str, str]:
    """LongBench's prompt for `record`, as (everything up to and including the context, the rest)."""
    return split_template(PROMPTS[task], {"context": record["context"], "input": record["input"]})


def build_sample(
    task: str,
    record: Mapping[str, Any],
    index: int,
    tokenizer,
    max_length: int | None,
    chat_template: bool = False,
) -> GenerationSample:
    """One LongBench row as a GenerationSample: official prompt, truncation, chat rule, metric."""
    chat = chat_template and task not in NO_CHAT_TEMPLATE
    context, question, fitted = fit_prompt(*split_prompt(task, record), tokenizer, max_length, chat)
    answers = record["answers"]
    return GenerationSample(
        id=str(record.get("_id") or f"{task}-{index}"),
        context=context,
        question=question,
        answers=[answers] if isinstance(answers, str) else list(answers),
        max_new_tokens=MAX_NEW_TOKENS[task],
        metric=METRICS[task],
        meta={
            "task": task,
            "length": record.get("length"),  # LongBench's length: words of context + input + answers
            **fitted,  # prompt_tokens (before truncation), truncated
            "first_line": task in FIRST_LINE,
            "all_classes": record.get("all_classes"),
        },
    )


def load_longbench(
    dataset: Mapping, tokenizer, max_length: int | None, max_samples: int | None = None
) -> list[GenerationSample]:
    """The samples of LongBench task `dataset.subset`: the first `max_samples` rows (None: all), prompts
    truncated in the middle to `max_length` tokens (None: untouched; see `prompt_limit`)."""
    check_longbench(dataset)
    if max_samples is not None and max_samples < 0:
        raise ValueError(f"max_samples={max_samples} must be >= 0 or null")
    task = dataset["subset"]
    records = read_records(dataset)[:max_samples]
    chat = bool(dataset.get("chat_template"))
    samples = [build_sample(task, r, i, tokenizer, max_length, chat) for i, r in enumerate(records)]
    log.info("LongBench %s: %d sample(s), prompt limit %s tokens", task, len(samples), max_length)
    return samples


def longbench_samples(
    dataset: Mapping, encoder: PromptEncoder, max_samples: int | None, seed: int
) -> list[GenerationSample]:
    """The registry loader: `load_longbench` with prompts cut to fit the model (`prompt_limit`)."""
    return load_longbench(dataset, encoder.tokenizer, prompt_limit(dataset, encoder.max_context), max_samples)
