"""Where a dataset's data comes from, a dataset's registry entry (`Dataset`), and the perplexity datasets
(WikiText-2, PG-19, text files, Python) with their documents.

Every dataset is looked up in one order (`locate`), and the run's log names the source once:

1. `dataset.path`: the user's own file (or folder), which must exist;
2. `$KVEXP_DATA_DIR/<dataset.local_file>`: a local copy of the real data;
3. the copy embedded in the package when it is exactly the dataset asked for (the WikiText-2 raw test split:
   no network call at all);
4. the Hugging Face hub (`dataset.hub_id`), tried only when a quick probe reaches it, so an offline machine
   loses at most a few seconds;
5. for datasets with an embedded stand-in only (PG-19, CNN/DailyMail, XSum, QA, LongBench), that stand-in;
6. otherwise a ValueError naming the ways to provide the data.
"""

from __future__ import annotations

import json
import logging
import re
import sysconfig
import tokenize
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from kvexp.data import (
    DATA_DIR_ENV,
    EMBEDDED,
    PYTHON_CODE,
    Embedded,
    data_dir,
    hub_reachable,
    hub_token,
    read_records,
    read_text,
)

log = logging.getLogger(__name__)

# The local files hold the test split only; `dataset.split` may still slice it ("test[:100]").
LOCAL_SPLIT = "test"

# A WikiText article title row: " = Title = \n", framed by empty rows. Sub-headings look like
# " = = Sub = = \n"; the frame rule drops the two formula rows of the test split that look like titles
# (" = 1 henry and capacitance C = \n" sits between text rows).
_TITLE_RE = re.compile(r"^ = (?!=)(.*?) = \n$")

T = TypeVar("T")


@dataclass
class Document:
    """One text whose perplexity is measured on its own (a corpus, an article or a book)."""

    id: str
    text: str


@dataclass
class Dataset:
    """A dataset's entry in the registry (kvexp.tasks.registry.DATASETS, by `dataset.name`): the `task` that
    evaluates it, `check(dataset)` before any model loads, and `load`, its samples in its task's terms:
    perplexity `(dataset, max_samples) -> documents`; generation `(dataset, encoder, max_samples, seed) ->
    samples`, where `encoder` tokenizes samples exactly as the runner will (tasks that size their context in
    tokens use it) and `seed` drives generated data.

    `own_template`: the loader applies the chat template itself (LongBench's rule), so the runner never wraps its
    samples again. `run(cfg, setup)`: a loop of the dataset's own over samples (dataset=prompt answers each
    prompt as it is read), returning the task's Results. `inputs(dataset)`: a digest of what the dataset reads
    besides its config (a prompt file's text), part of the config hash; None from it: unknown before the run
    (standard input), never resumed. `summary(samples, before, after)`: fields the dataset adds to summary.json
    (RULER's per-task table), from the samples and both runs' results (`before` None without the full cache).
    """

    task: str
    check: Callable[[Mapping], None]
    load: Callable[..., list]
    own_template: bool = False
    run: Callable[..., Any] | None = None
    inputs: Callable[[Mapping], str | None] | None = None
    summary: Callable[..., dict[str, Any]] | None = None


def registered(datasets: Mapping[str, Dataset], dataset: Mapping, task: str) -> Dataset:
    """The entry of `dataset.name` among the `task` datasets of `datasets`; a ValueError naming them otherwise."""
    entry = datasets.get(dataset.get("name"))
    if entry is None or entry.task != task:
        names = [name for name, d in datasets.items() if d.task == task]
        raise ValueError(
            f"dataset.name={dataset.get('name')!r} is not a {task} dataset; allowed values: {names}"
        )
    return entry


@dataclass(frozen=True)
class Source:
    """Where a dataset's data is read from: `kind` is path | data_dir | embedded | hub | stand_in; `path` is
    the file (None for the hub); `stand_in` is the embedded file to fall back on if the hub fails."""

    kind: str
    path: Path | None
    label: str
    stand_in: Embedded | None = None

    def option(self, dataset: Mapping) -> str:
        """The option that named this file, for messages: `dataset.path=...` or `dataset.local_file=...`."""
        if self.kind == "path":
            return f"dataset.path={str(dataset['path'])!r}"
        return f"dataset.local_file={dataset.get('local_file')!r} ({self.path})"


def _split_name(split: str | None) -> str:
    return re.split(r"[\[+]", str(split or LOCAL_SPLIT), maxsplit=1)[0].strip()


def locate(dataset: Mapping, local_file: str | None = None, announce: bool = True) -> Source:
    """The source of `dataset`'s data in the module's order; `local_file` replaces `dataset.local_file` (a
    formatted name). Logs the source when `announce`; raises a ValueError when there is none."""
    name = dataset.get("name")
    if dataset.get("path"):
        path = Path(str(dataset["path"])).expanduser()
        if not path.exists():
            raise ValueError(f"dataset.path={str(dataset['path'])!r} does not exist")
        source = Source("path", path, f"dataset.path={path}")
        return _announce(name, source) if announce else source
    local_file = local_file if local_file is not None else dataset.get("local_file")
    embedded = EMBEDDED.get(str(name))
    root = data_dir()
    source: Source | None = None
    if root is not None and local_file and (root / str(local_file)).is_file():
        source = Source("data_dir", root / str(local_file), f"${DATA_DIR_ENV}/{local_file}")
    elif embedded is not None and embedded.exact and _is_exact(embedded, dataset):
        source = Source("embedded", embedded.path, embedded.description)
    elif dataset.get("hub_id") and hub_reachable():
        stand_in = embedded if embedded is not None and not embedded.exact else None
        source = Source("hub", None, f"the hub: {dataset['hub_id']} ({dataset.get('hub_config')})", stand_in)
    elif embedded is not None and not embedded.exact:
        source = Source("stand_in", embedded.path, embedded.description)
    if source is None:
        where = f"{DATA_DIR_ENV}={root}" if root else f"{DATA_DIR_ENV}, which is unset"
        hub = f"{dataset['hub_id']}, not reachable now" if dataset.get("hub_id") else "set dataset.hub_id"
        embedded_note = ""
        if embedded is not None and embedded.hub is not None:
            hub_id, hub_config, split = embedded.hub
            embedded_note = (
                f" (the embedded copy is {hub_id}/{hub_config} split {split!r} only; asked: dataset.hub_id="
                f"{dataset.get('hub_id')}, dataset.hub_config={dataset.get('hub_config')}, dataset.split={dataset.get('split')})"
            )
        raise ValueError(
            f"dataset {name!r}: no data found; provide it with dataset.path=<file>, with "
            f"dataset.local_file={local_file or '<file>'} under ${where}, or from the Hugging Face hub ({hub})"
            + embedded_note
        )
    return _announce(name, source) if announce else source


def _is_exact(embedded: Embedded, dataset: Mapping) -> bool:
    """The embedded copy is the dataset asked for: same hub id, config and split name (slices allowed)."""
    if embedded.hub is None:
        return True
    hub_id, hub_config, split = embedded.hub
    return (
        dataset.get("hub_id") in (None, hub_id)
        and dataset.get("hub_config") in (None, hub_config)
        and _split_name(dataset.get("split")) == split
    )


def _announce(name: Any, source: Source) -> Source:
    if source.kind == "stand_in":
        log.warning("dataset %s: the real data is not reachable; using %s", name, source.label)
    else:
        log.info("dataset %s: reading %s", name, source.label)
    return source


def from_hub(dataset: Mapping, source: Source, load: Callable[[], T], stand_in: Callable[[Path], T]) -> T:
    """`load()` from the hub; if that fails and the dataset has an embedded stand-in, `stand_in(path)`."""
    try:
        return load()
    except (
        Exception
    ) as err:  # the datasets library raises many kinds (ConnectionError, FileNotFoundError, ...)
        if source.stand_in is None:
            raise ValueError(
                f"dataset {dataset.get('name')!r}: loading {dataset.get('hub_id')} from the hub failed ({err}); "
                f"set dataset.path=<file> or put {dataset.get('local_file')} under ${DATA_DIR_ENV}"
            ) from err
        log.warning(
            "dataset %s: the hub failed (%s); using %s", dataset.get("name"), err, source.stand_in.description
        )
        return stand_in(source.stand_in.path)


def check_dataset(dataset: Mapping) -> None:
    """Reject a bad perplexity dataset config before any model is loaded, naming the option to fix."""
    registered(DATASETS, dataset, "perplexity").check(dataset)


def load_documents(dataset: Mapping, max_samples: int | None) -> list[Document]:
    """The documents of ``dataset`` in their natural order, keeping the first ``max_samples`` (None: all)."""
    check_dataset(dataset)
    if max_samples is not None and max_samples < 0:
        raise ValueError(f"max_samples={max_samples} must be >= 0 or null")
    return DATASETS[dataset["name"]].load(dataset, max_samples)


def _check_file(dataset: Mapping) -> Source:
    """The dataset's source; a `dataset.path` must be a file."""
    source = locate(dataset, announce=False)  # raises when there is no data at all
    if source.kind == "path" and not source.path.is_file():
        raise ValueError(f"dataset.path={str(dataset['path'])!r} does not exist or is not a file")
    return source


def _check_corpus(dataset: Mapping) -> None:
    """wikitext2, pg19: a source, and a local file that `dataset.split` can slice and that holds something."""
    source = _check_file(dataset)
    if source.kind in ("path", "data_dir", "embedded"):
        check_split(dataset.get("split"))
        if source.path is not None and source.path.is_file() and not _has_content(source.path):
            raise ValueError(
                f"{source.option(dataset)} is empty: dataset {dataset.get('name')} has no documents to evaluate"
            )


def _check_text_file(dataset: Mapping) -> None:
    if not dataset.get("path"):
        raise ValueError("dataset.name='text_file' needs dataset.path=<a utf-8 text file>")
    source = _check_file(dataset)
    if not read_text(source.path).strip():  # a binary or non-UTF-8 file fails here too
        raise ValueError(f"dataset.path={str(dataset['path'])!r} is empty: perplexity needs text")


def _check_python_code(dataset: Mapping) -> None:
    _python_files(dataset)  # raises for a bad folder, a missing file or an empty selection


def _first(dataset: Mapping, docs: list[Document], max_samples: int | None) -> list[Document]:
    """The first `max_samples` documents (None: all), counted in the log."""
    if max_samples is not None:
        docs = docs[:max_samples]
    log.info("dataset %s: %d document(s)", dataset["name"], len(docs))
    return docs


def _text_file_documents(dataset: Mapping, max_samples: int | None) -> list[Document]:
    source = locate(dataset)
    assert source.path is not None  # check_dataset guarantees dataset.path
    return _first(dataset, [Document(id=source.path.name, text=read_text(source.path))], max_samples)


def _wikitext_documents(dataset: Mapping, max_samples: int | None) -> list[Document]:
    """WikiText-2 or WikiText-103: the split as one document named after the dataset, or one per article."""
    rows = _wikitext_rows(dataset, locate(dataset))
    name = str(dataset["name"])
    docs = (
        _wikitext_articles(rows, name)
        if dataset.get("split_documents")
        else [Document(name, "\n\n".join(rows))]
    )
    return _first(dataset, docs, max_samples)


def _pg19_documents(dataset: Mapping, max_samples: int | None) -> list[Document]:
    return _first(dataset, _pg19_books(dataset, locate(dataset)), max_samples)


def _python_code_documents(dataset: Mapping, max_samples: int | None) -> list[Document]:
    docs = _python_documents(dataset, max_samples)
    log.info("dataset python_code: %d file(s) from %s", len(docs), _python_files(dataset)[0])
    return docs


# The perplexity datasets (part of kvexp.tasks.registry.DATASETS), here beside their loaders for load_documents.
DATASETS: dict[str, Dataset] = {
    "wikitext2": Dataset("perplexity", _check_corpus, _wikitext_documents),
    "wikitext103": Dataset("perplexity", _check_corpus, _wikitext_documents),
    "pg19": Dataset("perplexity", _check_corpus, _pg19_documents),
    "text_file": Dataset("perplexity", _check_text_file, _text_file_documents),
    "python_code": Dataset("perplexity", _check_python_code, _python_code_documents),
}


def _wikitext_rows(dataset: Mapping, source: Source) -> list[str]:
    """The rows of a WikiText split (-2 or -103): from the raw text (`.raw` / `.txt`: one row per line, a line
    of only whitespace an empty row, as the hub's split has them), a JSON list of rows (or {"text": [...]}),
    or the hub."""
    field = dataset.get("text_field") or "text"
    if source.path is None:
        return from_hub(dataset, source, lambda: list(load_hub_split(dataset)[field]), _raw_rows)
    if source.path.suffix in (".raw", ".txt"):
        rows = _raw_rows(source.path)
    else:
        with source.path.open(encoding="utf-8") as f:
            data = json.load(f)
        rows = data[field] if isinstance(data, Mapping) else data
    if not isinstance(rows, list) or not all(isinstance(r, str) for r in rows):
        raise ValueError(
            f"{source.path}: expected a JSON list of strings (or an object with a {field!r} list)"
        )
    start, stop = split_bounds(dataset.get("split"), len(rows))
    return rows[start:stop]


def _raw_rows(path: Path) -> list[str]:
    """WikiText's raw text as the hub's rows: a line each, a line of only whitespace an empty row."""
    with path.open(encoding="utf-8", newline="") as f:
        lines = re.findall(
            r"[^\n]*\n|[^\n]+$", f.read()
        )  # "\n" only: str.splitlines also splits at \x0c, \u2028 ...
    return [line if line.strip() else "" for line in lines]


def _wikitext_articles(rows: Sequence[str], name: str) -> list[Document]:
    """Split WikiText rows at level-1 titles; joining the articles with "\\n\\n" gives back the full text."""
    titles: list[tuple[int, str]] = []  # (row index, title)
    for i, row in enumerate(rows):
        match = _TITLE_RE.match(row)
        framed = (i == 0 or rows[i - 1] == "") and (i + 1 == len(rows) or rows[i + 1] == "")
        if match and framed:
            titles.append((i, match.group(1)))
    if not titles:
        return [Document(name, "\n\n".join(rows))] if rows else []
    # Blank rows before the first title (one in the test split) belong to the first article; text there
    # (a split slice that starts mid-article) is a document of its own.
    first = titles[0][0]
    if any(rows[:first]):
        titles.insert(0, (0, "(untitled)"))
    starts = [0] + [i for i, _ in titles[1:]]
    ends = starts[1:] + [len(rows)]
    return [
        Document(id=title, text="\n\n".join(rows[start:end]))
        for (_, title), start, end in zip(titles, starts, ends, strict=True)
    ]


def _pg19_books(dataset: Mapping, source: Source) -> list[Document]:
    """One document per book, id = PG-19 book id (from ``book_id`` or, on the hub, the Gutenberg url). The
    embedded stand-in is one book, read whole whatever `dataset.split` says."""
    field = dataset.get("text_field") or "text"

    def read(path: Path, split: str | None) -> list[Mapping[str, Any]]:
        records = read_records(path)
        start, stop = split_bounds(split, len(records)) if split is not None else (0, len(records))
        return records[start:stop]

    if source.kind == "hub":
        records = from_hub(
            dataset, source, lambda: list(load_hub_split(dataset)), lambda path: read(path, None)
        )
    else:
        assert source.path is not None
        records = read(
            source.path, None if source.kind == "stand_in" else dataset.get("split") or LOCAL_SPLIT
        )
    return [Document(id=_book_id(rec, i), text=rec[field]) for i, rec in enumerate(records)]


def _book_id(record: Mapping[str, Any], index: int) -> str:
    """emozilla/pg19-test has no book_id column, but its url ends with it (.../ebooks/10321)."""
    if record.get("book_id") is not None:
        return str(record["book_id"])
    url = record.get("url")
    if url:
        return str(url).rstrip("/").rsplit("/", 1)[-1]
    return str(record.get("short_book_title") or index)


def stdlib_dir() -> Path:
    """The running interpreter's standard-library folder: Python source every install carries."""
    return Path(sysconfig.get_paths()["stdlib"])


def _python_files(dataset: Mapping) -> tuple[Path, list[Path]]:
    """The folder and the selected .py files in it: `dataset.files` in the order given, else the
    `dataset.glob` matches of at least `dataset.min_bytes` bytes sorted by path, under `dataset.path`
    (default: the stdlib folder; when it holds no sources, the embedded stand-in module). Installed
    third-party packages (site-packages / dist-packages) are never part of a glob selection.
    """
    root = Path(str(dataset["path"])).expanduser() if dataset.get("path") else stdlib_dir()
    if not root.is_dir():
        raise ValueError(f"dataset.path={str(root)!r} is not a folder of Python files")
    files = dataset.get("files")
    if files:
        paths = [root / str(f) for f in files]
        missing = [str(f) for f, p in zip(files, paths, strict=True) if not p.is_file()]
        if missing:
            raise ValueError(f"dataset.files: {missing} not found under {root}")
        return root, paths
    pattern, min_bytes = dataset.get("glob") or "*.py", int(dataset.get("min_bytes") or 0)
    paths = sorted(
        p
        for p in root.glob(pattern)
        if p.is_file()
        and p.stat().st_size >= min_bytes
        and not {"site-packages", "dist-packages"} & set(p.relative_to(root).parts)
    )
    if not paths and not dataset.get("path"):  # an interpreter installed without its Python sources
        log.warning(
            "dataset python_code: no Python sources under %s; using %s", root, PYTHON_CODE.description
        )
        return PYTHON_CODE.path, sorted(PYTHON_CODE.path.glob("*.py"))
    if not paths:
        raise ValueError(
            f"dataset.glob={pattern!r} with dataset.min_bytes={min_bytes} selects no file under {root}"
        )
    return root, paths


def _python_documents(dataset: Mapping, max_samples: int | None) -> list[Document]:
    """One document per selected file, id = its path relative to the folder, decoded as Python does
    (PEP 263 coding cookie, else UTF-8). A globbed file that does not decode (the stdlib's tests of
    bad encodings) is skipped; an explicitly listed one is an error."""
    root, paths = _python_files(dataset)
    docs: list[Document] = []
    for path in paths:
        if max_samples is not None and len(docs) == max_samples:
            break  # read no more files than asked for
        try:
            with tokenize.open(path) as f:
                text = f.read()
        except (SyntaxError, UnicodeDecodeError) as err:
            if dataset.get("files"):
                raise ValueError(f"dataset.files: {path} is not decodable Python source ({err})") from err
            log.info("skipping %s: not decodable Python source (%s)", path, err)
            continue
        docs.append(Document(id=path.relative_to(root).as_posix(), text=text))
    return docs


def load_hub_split(dataset: Mapping):
    """The split from the Hugging Face hub; imported lazily since the local path never needs it."""
    from datasets import load_dataset

    log.info(
        "loading %s (%s) split %s from the hub",
        dataset["hub_id"],
        dataset.get("hub_config"),
        dataset.get("split"),
    )
    return load_dataset(
        dataset["hub_id"],
        dataset.get("hub_config"),
        split=dataset.get("split") or LOCAL_SPLIT,
        token=hub_token(),
    )


def check_split(split: str | None, name: str = LOCAL_SPLIT) -> None:
    """The split spec parses and selects rows (before any file is read): `test[50%:10%]` or `test[:0]` do not.
    `name`: the split the local files hold (`split_bounds`)."""
    start, stop = split_bounds(split, n_rows=1_000_000, name=name)
    if stop <= start:
        raise ValueError(f"dataset.split={split!r} selects no rows: its start is not before its end")


def _has_content(path: Path) -> bool:
    """Whether the file holds anything but whitespace (reads up to the first such byte)."""
    with open(path, "rb") as f:
        while chunk := f.read(1 << 16):
            if chunk.strip():
                return True
    return False


def split_bounds(split: str | None, n_rows: int, name: str = LOCAL_SPLIT) -> tuple[int, int]:
    """Row range of an HF split spec ("test", "test[:100]", "test[10%:50%]") applied to a local file of the
    split `name` (the test split, unless a benchmark's local files hold another, e.g. ZeroSCROLLS's validation)."""
    from datasets import ReadInstruction

    spec = str(split or name)
    try:
        parts = ReadInstruction.from_spec(spec).to_absolute({name: n_rows})
    except (ValueError, AssertionError) as err:
        raise ValueError(
            f"dataset.split={spec!r} cannot be applied to the local {name!r} file ({err}); use e.g. "
            f"'{name}' or '{name}[:100]', or set dataset.local_file=null to load other splits from the hub"
        ) from err
    if len(parts) != 1:
        raise ValueError(f"dataset.split={spec!r}: only one contiguous slice is supported for local files")
    return parts[0].from_, parts[0].to
