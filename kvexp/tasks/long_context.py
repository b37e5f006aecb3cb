"""What the long-context benchmarks share (LongBench, LongBench-v2, InfiniteBench, LooGLE, ZeroSCROLLS): each runs
one task per run (`dataset.subset`) from the benchmark's own files, with the benchmark's own prompt, truncation and
metric; this module finds and reads the rows, checks the common options, and fits a prompt to the model.

Data: a task's rows come from `dataset.path` (the file, or a folder laid out as the benchmark releases it: the
`Layout.file` of the task), else `$KVEXP_DATA_DIR/<dataset.local_file>` (`{task}` replaced by the task), else the
hub, else the embedded stand-in (rows written by kvexp in the benchmark's schema, named in the log;
kvexp.tasks.data.locate). The dataset's `check` reads a local file and checks its rows before any model loads;
the hub is read only when the samples are loaded. `dataset.split` slices the rows ("test[:50]"); the stand-in is
read whole.

Context / question split: a sample's `context` is the benchmark's prompt up to and including the long document
(with the instructions before it): what the cache compresses under the query-agnostic protocol. Its `question` is
the rest (instructions repeated after the document, the question, the options, the answer cue), so
`context + question` is exactly the benchmark's prompt. A prompt over the limit (`prompt_limit`) is truncated as
the benchmark does it (`middle_truncate`, or a rule of its own); the split then falls where the question starts
when the question survived the cut, else at the cut. A chat template, when asked for, wraps the truncated prompt:
its opening joins `context`, its closing and the assistant header join `question` (`chat_frame`).
"""

from __future__ import annotations

import logging
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvexp.data import hub_token, read_jsonl, read_records
from kvexp.tasks.data import LOCAL_SPLIT, Source, check_split, from_hub, locate, split_bounds

log = logging.getLogger(__name__)

Rows = list[dict[str, Any]]
# (context, question, tokenizer, max_length) -> (context, question, prompt tokens before truncation)
Truncate = Callable[[str, str, Any, int], tuple[str, str, int]]

_CHAT_SLOT = "\x00kvexp-long-context-prompt\x00"  # a placeholder no template or text contains


@dataclass(frozen=True)
class Layout:
    """How a benchmark releases a task's rows."""

    benchmark: str  # its name, in messages
    file: str  # a task's file in a folder (dataset.path, the stand-in folder): "{task}.jsonl"
    required: tuple[str, ...]  # the fields every row has
    split: str = LOCAL_SPLIT  # the split the local files hold: the name dataset.split slices ("test[:50]")
    task_field: str | None = None  # a one-file stand-in: the field that names each row's task (LongBench's)


def _as_is(rows: Rows) -> Rows:
    return rows


def check_options(dataset: Mapping, tasks: Sequence[str | None], layout: Layout) -> None:
    """The options all long-context benchmarks have: the task, the prompt limit and the split."""
    task = dataset.get("subset")
    if task not in tasks:
        raise ValueError(
            f"dataset.subset={task!r} is not a {layout.benchmark} task; allowed values: {list(tasks)}"
        )
    if dataset.get("max_length") is not None and int(dataset["max_length"]) < 2:
        raise ValueError(f"dataset.max_length={dataset['max_length']} must be null or >= 2 tokens")
    check_split(dataset.get("split"), layout.split)


def check_rows(
    dataset: Mapping, layout: Layout, task: str | None, prepare: Callable[[Rows], Rows] = _as_is
) -> None:
    """Some source has the task's rows; a local file of them is read and its rows checked now, before a model
    loads (the hub is read only when the samples are)."""
    source = task_source(dataset, layout, task)
    if source.kind != "hub" and not read_rows(dataset, layout, task, prepare=prepare, announce=False):
        raise ValueError(
            f"{source.label} has no {layout.benchmark} rows for dataset.subset={dataset.get('subset')!r} "
            f"and dataset.split={dataset.get('split')!r}"
        )


def task_source(dataset: Mapping, layout: Layout, task: str | None, announce: bool = False) -> Source:
    """Where the task's rows come from (see the module docstring); `dataset.path` may be the file or a folder
    holding `layout.file`."""
    if dataset.get("path"):
        path = Path(str(dataset["path"])).expanduser()
        path = path / layout.file.format(task=task) if path.is_dir() else path
        if not path.is_file():
            raise ValueError(f"dataset.path={str(dataset['path'])!r}: {path} does not exist or is not a file")
        return locate({**dataset, "path": str(path)}, announce=announce)
    local_file = dataset.get("local_file")
    return locate(dataset, str(local_file).format(task=task) if local_file else None, announce=announce)


def read_rows(
    dataset: Mapping,
    layout: Layout,
    task: str | None,
    hub_rows: Callable[[], Rows] | None = None,
    prepare: Callable[[Rows], Rows] = _as_is,
    announce: bool = True,
) -> Rows:
    """The task's rows from their source, `prepare`d (a benchmark's own regrouping), checked for the layout's
    fields and sliced by `dataset.split` (the stand-in is read whole). `hub_rows()` reads them from the hub."""
    source = task_source(dataset, layout, task, announce)
    if source.kind == "hub":
        assert hub_rows is not None, "a hub source needs hub_rows"
        rows = from_hub(dataset, source, hub_rows, lambda path: _stand_in_rows(path, layout, task))
    elif source.kind == "stand_in":
        rows = _stand_in_rows(source.path, layout, task)
    else:
        rows = _read_file(source.path, layout)
    rows = prepare(rows)
    for i, row in enumerate(rows):
        missing = [f for f in layout.required if f not in row]
        if missing:
            raise ValueError(f"{source.label}: row {i} of {layout.benchmark} task {task!r} lacks {missing}")
    if source.kind == "stand_in":
        return rows
    start, stop = split_bounds(dataset.get("split"), len(rows), layout.split)
    return rows[start:stop]


def _read_file(path: Path, layout: Layout) -> Rows:
    """A local file of rows: JSONL, a JSON list (`.json`) or Parquet (`.parquet`)."""
    try:
        return read_records(path)
    except ValueError as err:
        raise ValueError(
            f"{err} ({layout.benchmark}'s rows: JSONL, one object per line, or a JSON list of objects)"
        ) from err


def _stand_in_rows(path: Path, layout: Layout, task: str | None) -> Rows:
    """The embedded stand-in's rows of the task: its file in the stand-in folder, or the rows of a one-file
    stand-in whose `layout.task_field` names the task."""
    if path.is_dir():
        return _read_file(path / layout.file.format(task=task), layout)
    rows = _read_file(path, layout)
    return [r for r in rows if r.get(layout.task_field) == task] if layout.task_field else rows


def read_archive(archive: Path, member: str) -> Rows:
    """The JSONL rows of the zip archive's member named `member` (in any folder of the archive)."""
    with zipfile.ZipFile(archive) as z:
        found = next((n for n in z.namelist() if Path(n).name == member), None)
        if found is None:
            raise ValueError(f"{archive} has no {member}")
        text = z.read(found).decode("utf-8")
    try:
        return read_jsonl(Path(f"{archive}:{found}"), text)
    except ValueError as err:
        raise ValueError(f"{err} (expected JSONL, one object per line)") from err


def hub_file_rows(dataset: Mapping, task: str, member: str | None = None) -> Rows:
    """`dataset.hub_file` (`{task}` replaced) downloaded from the hub dataset `dataset.hub_id`: a file of rows, or
    a zip archive whose `member` holds them (for loading-script datasets, which `datasets` >= 4 refuses to run)."""
    from huggingface_hub import hf_hub_download

    name = str(dataset["hub_file"]).format(task=task)
    log.info("downloading %s from the hub dataset %s", name, dataset["hub_id"])
    path = Path(hf_hub_download(dataset["hub_id"], name, repo_type="dataset", token=hub_token()))
    if path.suffix == ".zip":
        assert member is not None, f"{name} is an archive: name the member to read"
        return read_archive(path, member)
    return read_records(path)


def hub_split_rows(dataset: Mapping, config: str | None, split: str) -> Rows:
    """The rows of a hub dataset's config and split, through `datasets.load_dataset`."""
    from datasets import load_dataset

    return [dict(r) for r in load_dataset(dataset["hub_id"], config, split=split, token=hub_token())]


def prompt_limit(dataset: Mapping, model_max_context: int, max_new_tokens: int) -> int:
    """Prompt tokens kept: `dataset.max_length`, else the model's context minus the task's generation length,
    so that prompt and answer fit the model's window."""
    if dataset.get("max_length") is not None:
        return int(dataset["max_length"])
    limit = model_max_context - max_new_tokens
    if limit < 2:
        raise ValueError(
            f"model.max_context={model_max_context} leaves no room for a prompt before the task's {max_new_tokens} "
            "new tokens; set dataset.max_length=<prompt tokens> and eval.max_new_tokens=<answer tokens>"
        )
    return limit


def task_samples(
    dataset: Mapping,
    encoder: Any,  # kvexp.tasks.generation.PromptEncoder
    max_samples: int | None,
    max_new_tokens: Mapping[str, int],
    read: Callable[[Mapping], Rows],
    build: Callable[..., Any],
    benchmark: str,
) -> list:
    """A one-task-per-run benchmark's samples (`dataset.subset`): its first `max_samples` records read by `read`,
    each built by `build(task, record, index, tokenizer, limit, chat_template)` with prompts cut to fit the model
    (`prompt_limit`)."""
    task = dataset["subset"]
    limit = prompt_limit(dataset, encoder.max_context, max_new_tokens[task])
    records = read(dataset)[:max_samples]
    chat = bool(dataset.get("chat_template"))
    samples = [build(task, r, i, encoder.tokenizer, limit, chat) for i, r in enumerate(records)]
    log.info("%s %s: %d sample(s), prompt limit %s tokens", benchmark, task, len(samples), limit)
    return samples


def split_template(template: str, fields: Mapping[str, Any], slot: str = "context") -> tuple[str, str]:
    """`template.format(**fields)` cut right after its `{slot}` field: (up to and including it, the rest)."""
    cut = template.index("{" + slot + "}") + len(slot) + 2
    return template[:cut].format(**fields), template[cut:].format(**fields)


def middle_truncate(
    context: str, question: str, tokenizer, max_length: int, decode_jointly: bool = False
) -> tuple[str, str, int]:
    """The prompt `context + question` cut in the middle to `max_length` tokens, split again.

    Over the limit the prompt keeps its first and last `max_length // 2` tokens (counted with the tokenizer's
    special tokens, decoded without them), decoded as two texts and joined (LongBench, LooGLE) or as one token
    list (`decode_jointly`: InfiniteBench, LongBench-v2). Returns (context, question, prompt tokens before
    truncation).
    """
    ids = tokenizer(context + question).input_ids
    if len(ids) <= max_length:
        return context, question, len(ids)
    half = max_length // 2
    tail = tokenizer.decode(ids[-half:], skip_special_tokens=True)
    if decode_jointly:
        text = tokenizer.decode(ids[:half] + ids[-half:], skip_special_tokens=True)
    else:
        text = tokenizer.decode(ids[:half], skip_special_tokens=True) + tail
    if len(tail) >= len(question) and tail.endswith(question):
        return text[: len(text) - len(question)], question, len(ids)
    cut = len(text) - len(tail)  # the cut went into the question: split where the benchmark cut
    return text[:cut], text[cut:], len(ids)


def chat_frame(tokenizer) -> tuple[str, str]:
    """The tokenizer's chat template around one user turn, as (opening, closing + assistant header)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "dataset.chat_template=true, but the model's tokenizer has no chat template; set dataset.chat_template=false"
        )
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": _CHAT_SLOT}], tokenize=False, add_generation_prompt=True
    )
    opening, closing = rendered.split(_CHAT_SLOT)
    return opening, closing


def fit_prompt(
    context: str,
    question: str,
    tokenizer,
    max_length: int | None,
    chat: bool,
    truncate: Truncate = middle_truncate,
) -> tuple[str, str, dict[str, Any]]:
    """The prompt cut to `max_length` tokens by the benchmark's `truncate` (None: untouched), then inside the
    chat template when `chat`: (context, question, meta) with meta's `prompt_tokens` (before truncation, None
    when not counted) and `truncated`."""
    prompt_tokens = None
    if max_length is not None:
        context, question, prompt_tokens = truncate(context, question, tokenizer, max_length)
    if chat:
        opening, closing = chat_frame(tokenizer)
        context, question = opening + context, question + closing
    truncated = prompt_tokens is not None and max_length is not None and prompt_tokens > max_length
    return context, question, {"prompt_tokens": prompt_tokens, "truncated": truncated}
