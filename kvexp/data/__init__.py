"""Data shipped inside the package, so a fresh install runs its default experiment and its tests offline.

Each text sits in its own folder with a LICENSE.md (source, license, attribution):

* `wikitext2/wiki.test.raw`: the WikiText-2 raw test split, byte for byte (CC BY-SA 3.0). It *is* the
  dataset `dataset=wikitext2` asks for, so it is used before the hub and no network call is made.
* `pg19/test_book_10321.jsonl`: one public-domain PG-19 test book, the stand-in for `dataset=pg19` when PG-19
  cannot be had (after the hub).
* `haystack/`: a public-domain Project Gutenberg novel, the default haystack of the retrieval tasks.
* `fixtures/`: a few records written by the project in the real schemas of CNN/DailyMail, XSum, a QA file and
  LongBench, and a Python module: stand-ins that let every task run end to end without the real data.

`kvexp.tasks.data.locate` decides between these and the user's own data; this module only names the files.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

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
}
