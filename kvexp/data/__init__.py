"""Data shipped inside the package, so a fresh install runs its default experiment and its tests offline.

Each text sits in its own folder with a LICENSE.md (source, license, attribution):

* `wikitext2/wiki.test.raw`: the WikiText-2 raw test split, byte for byte (CC BY-SA 3.0). It *is* the
  dataset `dataset=wikitext2` asks for, so it is used before the hub and no network call is made.
* `pg19/test_book_10321.jsonl`: one public-domain PG-19 test book, the stand-in for `dataset=pg19` when PG-19
  cannot be had (after the hub).
* `haystack/`: a public-domain Project Gutenberg novel, the default haystack of the retrieval tasks.
* `fixtures/`: a few records written by the project in the real schemas of CNN/DailyMail, XSum, a QA file,
  LongBench, LongBench-v2, InfiniteBench, LooGLE, ZeroSCROLLS, MATH-500 and AIME 2025, and a Python module:
  stand-ins that let every task run end to end without the real data.

`kvexp.tasks.data.locate` decides between these and the user's own data; this module names the files and holds
what every layer uses to read data (JSONL, UTF-8 text, a corpus, a file under $KVEXP_DATA_DIR, the hub probe).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

log = logging.getLogger(__name__)

DATA_DIR_ENV = "KVEXP_DATA_DIR"
HUB_PROBE_SECONDS = 3.0
# The default training and calibration corpus under $KVEXP_DATA_DIR: public-domain Gutenberg books as JSONL.
GUTENBERG_CORPUS = "gutenberg/books.jsonl"

ROOT = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Embedded:
    """A file of this package that can serve a dataset.

    `exact`: the file is the dataset asked for (it is read before the hub is tried) when the dataset's hub id,
    config and split name are `hub` (None: any); otherwise it is a stand-in, read only when nothing else
    provides the data, and the log says so."""

    file: str  # relative to kvexp/data/
    description: str  # what the run's log names
    exact: bool = False
    hub: tuple[str, str | None, str] | None = None  # (hub_id, hub_config, split name) the exact copy is

    @property
    def path(self) -> Path:
        return ROOT / self.file


WIKITEXT2 = Embedded(
    "wikitext2/wiki.test.raw",
    "the WikiText-2 raw test split embedded in kvexp (CC BY-SA 3.0, kvexp/data/wikitext2/LICENSE.md)",
    exact=True,
    hub=("wikitext", "wikitext-2-raw-v1", "test"),
)
PG19_BOOK = Embedded(
    "pg19/test_book_10321.jsonl",
    "the embedded stand-in for PG-19: test book 10321, Dragon's Blood by Henry Milner Rideout (public domain)",
)
HAYSTACK_BOOK = Embedded(
    "haystack/the_man_who_was_thursday.txt",
    "the embedded haystack: The Man Who Was Thursday by G. K. Chesterton (Project Gutenberg, public domain)",
)
PYTHON_CODE = Embedded(
    "fixtures/python_code",
    "the embedded stand-in for Python sources: kvexp/data/fixtures/python_code (written by kvexp)",
)

# Dataset name -> the embedded file that serves it (exact copy or stand-in).
EMBEDDED: dict[str, Embedded] = {
    "wikitext2": WIKITEXT2,
    "pg19": PG19_BOOK,
    "cnn_dailymail": Embedded(
        "fixtures/cnn_dailymail.jsonl",
        "the embedded stand-in for CNN/DailyMail: 3 articles written by kvexp in its schema",
    ),
    "xsum": Embedded(
        "fixtures/xsum.jsonl", "the embedded stand-in for XSum: 3 documents written by kvexp in its schema"
    ),
    "qa_jsonl": Embedded(
        "fixtures/qa.jsonl", "the embedded stand-in for a QA file: 3 questions written by kvexp"
    ),
    "longbench": Embedded(
        "fixtures/longbench.jsonl",
        "the embedded stand-in for LongBench: one row per English task written by kvexp in its schema",
    ),
    "longbench_v2": Embedded(
        "fixtures/longbench_v2.json",
        "the embedded stand-in for LongBench-v2: one question per domain written by kvexp in its schema",
    ),
    "infinitebench": Embedded(
        "fixtures/infinitebench",
        "the embedded stand-in for InfiniteBench: one row per task written by kvexp in its schema",
    ),
    "loogle": Embedded(
        "fixtures/loogle",
        "the embedded stand-in for LooGLE: one question per task written by kvexp in its schema",
    ),
    "zero_scrolls": Embedded(
        "fixtures/zero_scrolls",
        "the embedded stand-in for ZeroSCROLLS: one validation example per task written by kvexp in its schema",
    ),
    "math500": Embedded(
        "fixtures/math500.jsonl",
        "the embedded stand-in for MATH-500: 7 problems written by kvexp in its schema",
    ),
    "aime25": Embedded(
        "fixtures/aime25.jsonl",
        "the embedded stand-in for AIME 2025: 4 problems written by kvexp in math-ai/aime25's schema",
    ),
}


def data_dir() -> Path | None:
    """The local evaluation-data folder from ``$KVEXP_DATA_DIR``, or None when unset."""
    value = os.environ.get(DATA_DIR_ENV)
    return Path(value).expanduser() if value else None


def required_data_file(name: str, option: str) -> Path:
    """The file `name` (absolute, or relative to $KVEXP_DATA_DIR) that option `option` names; a ValueError
    naming the option when it cannot be found. The default training / calibration corpus
    (`GUTENBERG_CORPUS`) falls back to the embedded public-domain novel, named in the log."""
    path = Path(name).expanduser()
    if not path.is_absolute():
        root = data_dir()
        if (root is None or not (root / path).is_file()) and name == GUTENBERG_CORPUS:
            log.warning(
                "%s=%s is not under $%s (%s); using %s",
                option,
                name,
                DATA_DIR_ENV,
                root,
                HAYSTACK_BOOK.description,
            )
            return HAYSTACK_BOOK.path
        if root is None:
            raise ValueError(
                f"{option}={name!r} is relative to ${DATA_DIR_ENV}, which is not set; set it or give an absolute path"
            )
        path = root / path
    if not path.is_file():
        raise ValueError(f"{option}: {path} does not exist")
    return path


def read_jsonl(path: Path, text: str | None = None) -> list[dict[str, Any]]:
    """The objects of a JSONL file (blank lines skipped); a line that is not a JSON object fails naming the file
    and the line. `text`: the file's content when already read."""
    if text is None:
        text = read_text(path)
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(
                f"{path}, line {number}: not valid JSON ({err.msg}, column {err.colno})"
            ) from err
        if not isinstance(row, dict):
            raise ValueError(f"{path}, line {number}: expected a JSON object, got {type(row).__name__}")
        rows.append(row)
    return rows


def read_records(path: Path) -> list[dict[str, Any]]:
    """The records of a JSONL file, of a JSON list of objects (`.json`, e.g. LongBench-v2's data.json), or of a
    Parquet file (`.parquet`: the hub's own format, e.g. a downloaded copy of emozilla/pg19-test); a file that is
    not what its name says fails naming it."""
    if path.suffix == ".json":
        return _read_json_list(path)
    if path.suffix != ".parquet":
        return read_jsonl(path)
    import pyarrow.parquet as pq  # installed with `datasets`

    try:
        return pq.read_table(path).to_pylist()
    except (OSError, ValueError) as err:  # pyarrow's ArrowInvalid is a ValueError
        raise ValueError(f"{path}: not a readable Parquet file ({err})") from err


def _read_json_list(path: Path) -> list[dict[str, Any]]:
    try:
        rows = json.loads(read_text(path))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err.msg}, line {err.lineno})") from err
    if not isinstance(rows, list) or not all(isinstance(row, dict) for row in rows):
        raise ValueError(f"{path}: expected a JSON list of objects")
    return rows


def read_text(path: Path) -> str:
    """A UTF-8 text file; anything else fails naming the file and where it stops being UTF-8."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(
            f"{path} is not UTF-8 text (byte {err.start}: {err.reason}); give a text file"
        ) from err


def read_corpus(path: Path, text_field: str = "text") -> list[tuple[str, str]]:
    """(id, text) of a text corpus: JSONL records with `text_field` (id: `file`, `id` or the line number), or
    a plain-text file (`.txt`) as one document."""
    if path.suffix == ".txt":
        return [(path.name, read_text(path))]
    return [(str(r.get("file") or r.get("id") or i), r[text_field]) for i, r in enumerate(read_jsonl(path))]


TOKEN_ENVS = ("HF_TOKEN", "HF_API_KEY")


def hub_token() -> str | None:
    """The Hugging Face token for gated models and datasets: $HF_TOKEN, else $HF_API_KEY (the name some studies'
    scripts use); None leaves it to huggingface_hub (a stored `hf auth login`)."""
    return next((os.environ[name] for name in TOKEN_ENVS if os.environ.get(name)), None)


@functools.cache
def hub_reachable() -> bool:
    """Whether the Hugging Face hub answers a TCP connection within a few seconds (False when HF_HUB_OFFLINE or
    HF_DATASETS_OFFLINE is set). The probe runs once per process, in a thread, so a hanging DNS lookup costs
    at most HUB_PROBE_SECONDS."""
    if any(
        os.environ.get(v, "").lower() in ("1", "true", "yes")
        for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    ):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co").hostname or "huggingface.co"
    reached: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((host, 443), timeout=HUB_PROBE_SECONDS).close()
            reached.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(HUB_PROBE_SECONDS)
    if not reached:
        log.info("the Hugging Face hub (%s) is not reachable: using local or embedded data only", host)
    return bool(reached)
