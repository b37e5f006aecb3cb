"""Documents for perplexity evaluation: WikiText-2, PG-19, Python source code and plain text files.

Local copies of the evaluation data are found through ``$KVEXP_DATA_DIR`` so that tests, benchmarks and
offline machines never touch the Hugging Face hub; online users without that folder fall back to
``datasets.load_dataset``. Both paths yield the same documents, so results do not depend on where the
text came from.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sysconfig
import tokenize
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

DATA_DIR_ENV = "KVEXP_DATA_DIR"
DATASETS = ("wikitext2", "pg19", "text_file", "python_code")

# The local files hold the test split only; `dataset.split` may still slice it ("test[:100]").
LOCAL_SPLIT = "test"

# A WikiText article title row: " = Title = \n", framed by empty rows. Sub-headings look like
# " = = Sub = = \n"; the frame rule drops the two formula rows of the test split that look like titles
# (" = 1 henry and capacitance C = \n" sits between text rows).
_TITLE_RE = re.compile(r"^ = (?!=)(.*?) = \n$")


@dataclass
class Document:
    """One text whose perplexity is measured on its own (a corpus, an article or a book)."""

    id: str
    text: str


def data_dir() -> Path | None:
    """The local evaluation-data folder from ``$KVEXP_DATA_DIR``, or None when unset (use the hub)."""
    value = os.environ.get(DATA_DIR_ENV)
    return Path(value).expanduser() if value else None


def required_data_file(name: str, option: str) -> Path:
    """The file `name` (absolute, or relative to $KVEXP_DATA_DIR) that option `option` names; a ValueError
    naming the option when it cannot be found."""
    path = Path(name).expanduser()
    if not path.is_absolute():
        root = data_dir()
        if root is None:
            raise ValueError(
                f"{option}={name!r} is relative to ${DATA_DIR_ENV}, which is not set; set it or give an absolute path"
            )
        path = root / path
    if not path.is_file():
        raise ValueError(f"{option}: {path} does not exist")
    return path


def resolve_local_file(dataset: Mapping) -> Path | None:
    """The local file to read for ``dataset``, or None to load it from the hub.

    A user-given ``dataset.path`` always wins and must exist; otherwise ``dataset.local_file`` is looked up
    under ``$KVEXP_DATA_DIR``, and a missing folder or file means "use the hub" rather than an error, so the
    same config works on- and offline.
    """
    path = dataset.get("path")
    if path:
        resolved = Path(str(path)).expanduser()
        if not resolved.is_file():
            raise ValueError(f"dataset.path={str(path)!r} does not exist or is not a file")
        return resolved
    root = data_dir()
    local_file = dataset.get("local_file")
    if root is None or not local_file:
        return None
    candidate = root / str(local_file)
    if candidate.is_file():
        return candidate
    log.info("%s not found under %s=%s; falling back to the hub", local_file, DATA_DIR_ENV, root)
    return None


def check_dataset(dataset: Mapping) -> None:
    """Reject a bad dataset config before any model is loaded, naming the option to fix."""
    name = dataset.get("name")
    if name not in DATASETS:
        raise ValueError(
            f"dataset.name={name!r} is not a perplexity dataset; allowed values: {list(DATASETS)}"
        )
    if name == "python_code":
        _python_files(dataset)  # raises for a bad folder, a missing file or an empty selection
        return
    if name == "text_file" and not dataset.get("path"):
        raise ValueError("dataset.name='text_file' needs dataset.path=<a utf-8 text file>")
    local = resolve_local_file(dataset)  # raises for a missing dataset.path
    if name == "text_file":
        return
    if local is None and not dataset.get("hub_id"):
        raise ValueError(
            f"dataset {name!r} has no local file (dataset.local_file={dataset.get('local_file')!r} under "
            f"${DATA_DIR_ENV}) and no dataset.hub_id to download it from"
        )
    if local is not None:
        split_bounds(dataset.get("split"), n_rows=1)  # validates the split spec early


def load_documents(dataset: Mapping, max_samples: int | None) -> list[Document]:
    """The documents of ``dataset`` in their natural order, keeping the first ``max_samples`` (None: all)."""
    check_dataset(dataset)
    if max_samples is not None and max_samples < 0:
        raise ValueError(f"max_samples={max_samples} must be >= 0 or null")
    name = dataset["name"]
    if name == "python_code":
        docs = _python_documents(dataset, max_samples)
        log.info("dataset python_code: %d file(s) from %s", len(docs), dataset.get("path") or stdlib_dir())
        return docs
    local = resolve_local_file(dataset)
    if name == "text_file":
        assert local is not None  # check_dataset guarantees dataset.path
        docs = [Document(id=local.name, text=local.read_text(encoding="utf-8"))]
    elif name == "wikitext2":
        rows = _wikitext_rows(dataset, local)
        docs = (
            _wikitext_articles(rows)
            if dataset.get("split_documents")
            else [Document("wikitext2", "\n\n".join(rows))]
        )
    else:  # pg19
        docs = _pg19_books(dataset, local)
    if max_samples is not None:
        docs = docs[:max_samples]
    log.info("dataset %s: %d document(s) from %s", name, len(docs), local or dataset.get("hub_id"))
    return docs


def _wikitext_rows(dataset: Mapping, local: Path | None) -> list[str]:
    """The rows of the WikiText-2 test split, from the local JSON (list or {"text": [...]}) or the hub."""
    field = dataset.get("text_field") or "text"
    if local is None:
        return list(_load_hub(dataset)[field])
    with local.open(encoding="utf-8") as f:
        data = json.load(f)
    rows = data[field] if isinstance(data, Mapping) else data
    if not isinstance(rows, list) or not all(isinstance(r, str) for r in rows):
        raise ValueError(f"{local}: expected a JSON list of strings (or an object with a {field!r} list)")
    start, stop = split_bounds(dataset.get("split"), len(rows))
    return rows[start:stop]


def _wikitext_articles(rows: Sequence[str]) -> list[Document]:
    """Split WikiText rows at level-1 titles; joining the articles with "\\n\\n" gives back the full text."""
    titles: list[tuple[int, str]] = []  # (row index, title)
    for i, row in enumerate(rows):
        match = _TITLE_RE.match(row)
        framed = (i == 0 or rows[i - 1] == "") and (i + 1 == len(rows) or rows[i + 1] == "")
        if match and framed:
            titles.append((i, match.group(1)))
    if not titles:
        return [Document("wikitext2", "\n\n".join(rows))] if rows else []
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


def _pg19_books(dataset: Mapping, local: Path | None) -> list[Document]:
    """One document per book, id = PG-19 book id (from ``book_id`` or, on the hub, the Gutenberg url)."""
    field = dataset.get("text_field") or "text"
    if local is None:
        records: list[Mapping[str, Any]] = list(_load_hub(dataset))
    else:
        with local.open(encoding="utf-8") as f:
            records = [json.loads(line) for line in f if line.strip()]
        start, stop = split_bounds(dataset.get("split"), len(records))
        records = records[start:stop]
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
    (default: the stdlib folder). Installed third-party packages (site-packages / dist-packages) are never
    part of a glob selection.
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


def _load_hub(dataset: Mapping):
    """The split from the Hugging Face hub; imported lazily since the local path never needs it."""
    from datasets import load_dataset

    log.info(
        "loading %s (%s) split %s from the hub",
        dataset["hub_id"],
        dataset.get("hub_config"),
        dataset.get("split"),
    )
    return load_dataset(
        dataset["hub_id"], dataset.get("hub_config"), split=dataset.get("split") or LOCAL_SPLIT
    )


def split_bounds(split: str | None, n_rows: int) -> tuple[int, int]:
    """Row range of an HF split spec ("test", "test[:100]", "test[10%:50%]") applied to a local test file."""
    from datasets import ReadInstruction

    spec = str(split or LOCAL_SPLIT)
    try:
        parts = ReadInstruction.from_spec(spec).to_absolute({LOCAL_SPLIT: n_rows})
    except (ValueError, AssertionError) as err:
        raise ValueError(
            f"dataset.split={spec!r} cannot be applied to the local {LOCAL_SPLIT!r} file ({err}); use e.g. "
            f"'{LOCAL_SPLIT}' or '{LOCAL_SPLIT}[:100]', or set dataset.local_file=null to load other splits from the hub"
        ) from err
    if len(parts) != 1:
        raise ValueError(f"dataset.split={spec!r}: only one contiguous slice is supported for local files")
    return parts[0].from_, parts[0].to
