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
(one row per task written by kvexp, named in the log). THUDM/LongBench on the
hub is a loading-script dataset, which `datasets` >= 4 refuses to run, so with `dataset.hub_file` set
(default `data.zip`) the archive is downloaded with `huggingface_hub` and read directly; with
`hub_file: null`, `datasets.load_dataset(hub_id, task, split=...)` loads a Parquet copy in the same schema.
"""

from __future__ import annotations

import logging
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kvexp.data import hub_token, read_jsonl
from kvexp.tasks.data import Source, check_split, from_hub, locate, split_bounds
from kvexp.tasks.generation import GenerationSample, PromptEncoder

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

REQUIRED_FIELDS = ("input", "context", "answers")
_CONTEXT_SLOT = "{context}"
_CHAT_SLOT = "\x00kvexp-longbench-prompt\x00"  # a placeholder no template or text contains


def check_longbench(dataset: Mapping) -> None:
    """Reject a bad LongBench config before a model loads, naming the option to fix."""
    task = dataset.get("subset")
    if task not in PROMPTS:
        raise ValueError(
            f"dataset.subset={task!r} is not a LongBench English task; allowed values: {list(TASKS)}"
        )
    if dataset.get("max_length") is not None and int(dataset["max_length"]) < 2:
        raise ValueError(f"dataset.max_length={dataset['max_length']} must be null or >= 2 tokens")
    resolve_file(dataset)  # raises when no source has the task's data
    check_split(dataset.get("split"))


def prompt_limit(dataset: Mapping, model_max_context: int) -> int:
    """Prompt tokens kept (LongBench's model2maxlen): `dataset.max_length`, else the model's context minus
    the task's generation length, so prompt and answer fit the model's window."""
    if dataset.get("max_length") is not None:
        return int(dataset["max_length"])
    return model_max_context - MAX_NEW_TOKENS[dataset["subset"]]


def resolve_file(dataset: Mapping, announce: bool = False) -> Source:
    """Where task `dataset.subset`'s rows come from (see the module docstring); `dataset.path` may be the
    file or a folder of `<task>.jsonl`."""
    task = dataset["subset"]
    if dataset.get("path"):
        path = Path(str(dataset["path"])).expanduser()
        path = path / f"{task}.jsonl" if path.is_dir() else path
        if not path.is_file():
            raise ValueError(f"dataset.path={str(dataset['path'])!r}: {path} does not exist or is not a file")
        return locate({**dataset, "path": str(path)}, announce=announce)
    local_file = dataset.get("local_file")
    return locate(dataset, str(local_file).format(task=task) if local_file else None, announce=announce)


def read_records(dataset: Mapping) -> list[dict[str, Any]]:
    """The task's rows in LongBench's schema, after `dataset.split` (e.g. "test[:50]"); the embedded
    stand-in's row of the task, whatever the split."""
    task, source = dataset["subset"], resolve_file(dataset, announce=True)
    if source.kind == "hub":
        records = from_hub(
            dataset, source, lambda: _read_hub(dataset, task), lambda path: _stand_in(path, task)
        )
    elif source.kind == "stand_in":
        records = _stand_in(source.path, task)
    else:
        records = _read_jsonl(source.path.read_text(encoding="utf-8"), str(source.path))
    for i, record in enumerate(records):
        missing = [f for f in REQUIRED_FIELDS if f not in record]
        if missing:
            raise ValueError(f"{source.label}: row {i} of LongBench task {task!r} lacks {missing}")
        if task == "trec" and not record.get("all_classes"):
            raise ValueError(f"{source.label}: row {i} of LongBench task 'trec' has no all_classes")
    if source.kind == "stand_in":
        return records
    start, stop = split_bounds(dataset.get("split"), len(records))
    return records[start:stop]


def _read_hub(dataset: Mapping, task: str) -> list[dict[str, Any]]:
    if dataset.get("hub_file"):
        return _read_hub_archive(dataset["hub_id"], dataset["hub_file"], task)
    from datasets import load_dataset

    return [dict(r) for r in load_dataset(dataset["hub_id"], task, split="test", token=hub_token())]


def _stand_in(path: Path, task: str) -> list[dict[str, Any]]:
    """The embedded stand-in's rows of `task` (one per English task)."""
    return [r for r in _read_jsonl(path.read_text(encoding="utf-8"), str(path)) if r.get("dataset") == task]


def _read_jsonl(text: str, source: str) -> list[dict[str, Any]]:
    try:
        return read_jsonl(Path(source), text)
    except ValueError as err:
        raise ValueError(f"{err} (LongBench's schema: JSONL, one object per line)") from err


def read_archive(archive: Path, task: str) -> list[dict[str, Any]]:
    """The task's rows from LongBench's `data.zip` (members `data/<task>.jsonl`)."""
    with zipfile.ZipFile(archive) as z:
        member = next((n for n in z.namelist() if Path(n).name == f"{task}.jsonl"), None)
        if member is None:
            raise ValueError(f"{archive} has no {task}.jsonl")
        return _read_jsonl(z.read(member).decode("utf-8"), f"{archive}:{member}")


def _read_hub_archive(hub_id: str, hub_file: str, task: str) -> list[dict[str, Any]]:
    from huggingface_hub import hf_hub_download

    log.info("downloading %s from the hub dataset %s", hub_file, hub_id)
    return read_archive(Path(hf_hub_download(hub_id, hub_file, repo_type="dataset", token=hub_token())), task)


def split_prompt(task: str, record: Mapping[str, Any]) -> tuple[str, str]:
    """LongBench's prompt for `record`, as (everything up to and including the context, the rest)."""
    template = PROMPTS[task]
    cut = template.index(_CONTEXT_SLOT) + len(_CONTEXT_SLOT)
    fields = {"context": record["context"], "input": record["input"]}
    return template[:cut].format(**fields), template[cut:].format(**fields)


def middle_truncate(context: str, question: str, tokenizer, max_length: int) -> tuple[str, str, int]:
    """pred.py's truncation of the prompt `context + question` to `max_length` tokens, split again.

    Over the limit, the prompt becomes decode(first max_length // 2 tokens) + decode(last max_length // 2
    tokens), counted and decoded as LongBench does (the tokenizer's special tokens counted, then skipped).
    Returns (context, question, prompt tokens before truncation).
    """
    ids = tokenizer(context + question).input_ids
    if len(ids) <= max_length:
        return context, question, len(ids)
    half = max_length // 2
    head = tokenizer.decode(ids[:half], skip_special_tokens=True)
    tail = tokenizer.decode(ids[-half:], skip_special_tokens=True)
    if len(tail) >= len(question) and tail.endswith(question):
        return head + tail[: len(tail) - len(question)], question, len(ids)
    return head, tail, len(ids)  # the cut went into the question: split where LongBench cut


def chat_frame(tokenizer) -> tuple[str, str]:
    """The tokenizer's chat template around one user turn, as (opening, closing + assistant header)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("dataset.chat_template=true, but the model's tokenizer has no chat template")
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": _CHAT_SLOT}], tokenize=False, add_generation_prompt=True
    )
    opening, closing = rendered.split(_CHAT_SLOT)
    return opening, closing


def build_sample(
    task: str,
    record: Mapping[str, Any],
    index: int,
    tokenizer,
    max_length: int | None,
    chat_template: bool = False,
) -> GenerationSample:
    """One LongBench row as a GenerationSample: official prompt, truncation, chat rule, metric."""
    context, question = split_prompt(task, record)
    prompt_tokens = None
    if max_length is not None:
        context, question, prompt_tokens = middle_truncate(context, question, tokenizer, max_length)
    if chat_template and task not in NO_CHAT_TEMPLATE:
        opening, closing = chat_frame(tokenizer)
        context, question = opening + context, question + closing
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
            "prompt_tokens": prompt_tokens,  # before truncation
            "truncated": prompt_tokens is not None and prompt_tokens > max_length,
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
