"""Where data comes from (`locate`: dataset.path, $KVEXP_DATA_DIR, the embedded copy, the hub, the embedded
stand-in) and the perplexity documents: WikiText-2 from the copy embedded in the package, PG-19 from the local
data ($KVEXP_DATA_DIR, `data` tests) or its embedded stand-in, and the running interpreter's standard library
(python_code). The hub is never reached: conftest sets HF_HUB_OFFLINE, and hub paths are monkeypatched."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sysconfig
import time
import tokenize
from pathlib import Path

import pytest
import yaml

from kvexp.data import (
    EMBEDDED,
    GUTENBERG_CORPUS,
    HAYSTACK_BOOK,
    HUB_PROBE_SECONDS,
    PG19_BOOK,
    WIKITEXT2,
    data_dir,
    hub_reachable,
    read_corpus,
    required_data_file,
)
from kvexp.tasks import data as data_module
from kvexp.tasks.data import DATASETS, Document, check_dataset, load_documents, locate, stdlib_dir

CONF = Path(__file__).parents[1] / "conf" / "dataset"
DATA = Path(os.environ["KVEXP_DATA_DIR"]) if os.environ.get("KVEXP_DATA_DIR") else None
WIKITEXT2_SHA256 = "173c87a53759e0201f33e0ccf978e510c2042d7f2cb78229d9a50d79b9e7dd08"
KEYS = {
    "name",
    "task",
    "path",
    "local_file",
    "hub_id",
    "hub_config",
    "split",
    "text_field",
    "split_documents",
}
CODE_KEYS = {"files", "glob", "min_bytes"}  # python_code's selection options


@pytest.fixture(autouse=True)
def _no_local_data(monkeypatch):
    """Every test starts as a fresh clone does: no $KVEXP_DATA_DIR, no hub."""
    monkeypatch.delenv("KVEXP_DATA_DIR", raising=False)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub_reachable.cache_clear()
    yield
    hub_reachable.cache_clear()


@pytest.fixture
def local_data(monkeypatch):
    """The real local evaluation data ($KVEXP_DATA_DIR) for the `data` tests."""
    monkeypatch.setenv("KVEXP_DATA_DIR", str(DATA))
    return DATA


def cfg(config: str, **overrides) -> dict:
    with (CONF / f"{config}.yaml").open() as f:
        return {**yaml.safe_load(f), **overrides}


def wikitext_rows() -> list[str]:
    """The hub split's rows from the raw text: a line each, whitespace-only lines empty (checked against the
    hub's own rows in test_embedded_wikitext2_equals_the_local_copy)."""
    raw = WIKITEXT2.path.read_bytes().decode("utf-8")
    return [line + "\n" if line.strip() else "" for line in raw.split("\n")[:-1]]


def test_every_config_has_all_keys():
    names = sorted(p.stem for p in CONF.glob("*.yaml"))
    assert set(DATASETS) <= set(names)
    for name in names:
        assert cfg(name)["name"] == name
    for name in DATASETS:  # the perplexity datasets (generation datasets are tested with their tasks)
        c = cfg(name)
        assert set(c) - {"defaults"} == KEYS | (CODE_KEYS if name == "python_code" else set()), (
            name
        )  # defaults: schema
        assert c["task"] == "perplexity"


def test_embedded_wikitext2_is_the_published_file():
    assert hashlib.sha256(WIKITEXT2.path.read_bytes()).hexdigest() == WIKITEXT2_SHA256
    assert (WIKITEXT2.path.parent / "LICENSE.md").read_text().count("CC BY-SA 3.0") >= 2
    for embedded in EMBEDDED.values():
        assert embedded.path.exists() and (embedded.path.parent / "LICENSE.md").is_file(), embedded.file
    total = sum(f.stat().st_size for f in WIKITEXT2.path.parents[1].rglob("*") if f.is_file())
    assert total < 5_000_000  # the package's data stays small


@pytest.mark.data
def test_embedded_wikitext2_equals_the_local_copy(local_data):
    assert WIKITEXT2.path.read_bytes() == (local_data / "wikitext2" / "wiki.test.raw").read_bytes()
    rows = json.loads((local_data / "wikitext2" / "test_rows.json").read_text(encoding="utf-8"))
    assert wikitext_rows() == (rows["text"] if isinstance(rows, dict) else rows)  # the hub's rows
    embedded = load_documents(cfg("wikitext2"), max_samples=None)
    assert locate(cfg("wikitext2"), announce=False).path == local_data / "wikitext2" / "test_rows.json"
    assert load_documents(cfg("wikitext2"), max_samples=None) == embedded  # same text either way


@pytest.mark.data
def test_embedded_books_are_the_local_copies(local_data):
    """The PG-19 stand-in is book 10321 of the local PG-19 test books, the haystack novel the corpus's copy."""
    local = {str(r["book_id"]): r for r in map(json.loads, (local_data / "pg19" / "test_books.jsonl").open())}
    (embedded,) = map(json.loads, PG19_BOOK.path.open())
    assert embedded["text"] == local["10321"]["text"] and local["10321"]["pg19_exact"]
    assert required_data_file(GUTENBERG_CORPUS, "x") == local_data / GUTENBERG_CORPUS
    corpus = dict(read_corpus(local_data / GUTENBERG_CORPUS))
    assert len(corpus) == 23 and corpus["chesterton-thursday.txt"] == HAYSTACK_BOOK.path.read_text("utf-8")


def test_data_dir_from_env(monkeypatch, tmp_path):
    assert data_dir() is None
    monkeypatch.setenv("KVEXP_DATA_DIR", str(tmp_path))
    assert data_dir() == tmp_path


def test_lookup_order(monkeypatch, tmp_path, caplog):
    """dataset.path -> $KVEXP_DATA_DIR -> the exact embedded copy -> the hub -> the stand-in -> an error."""
    mine = tmp_path / "mine.json"
    mine.write_text("[]")
    (tmp_path / "pg19").mkdir()
    (tmp_path / "pg19" / "test_books.jsonl").write_text('{"book_id": 1, "text": "a"}\n')
    assert locate(cfg("wikitext2", path=str(mine))).kind == "path"
    assert locate(cfg("wikitext2")).kind == "embedded"  # before the hub, even when it is reachable
    assert locate(cfg("pg19")).kind == "stand_in"  # no local copy, no hub
    monkeypatch.setattr(data_module, "hub_reachable", lambda: True)
    assert locate(cfg("wikitext2")).kind == "embedded"
    hub = locate(cfg("pg19"))
    assert hub.kind == "hub" and hub.path is None and hub.stand_in == PG19_BOOK
    monkeypatch.setenv("KVEXP_DATA_DIR", str(tmp_path))
    assert locate(cfg("pg19")).path == tmp_path / "pg19" / "test_books.jsonl"
    # not the embedded dataset (another config or split): the hub, never the embedded text
    assert locate(cfg("wikitext2", hub_config="wikitext-103-raw-v1", local_file=None)).kind == "hub"
    assert locate(cfg("wikitext2", split="validation", local_file=None)).kind == "hub"
    monkeypatch.setattr(data_module, "hub_reachable", lambda: False)
    with pytest.raises(
        ValueError, match=r"dataset 'wikitext2': no data found.*dataset\.path.*KVEXP_DATA_DIR.*hub"
    ):
        locate(cfg("wikitext2", hub_config="wikitext-103-raw-v1", local_file=None))
    with pytest.raises(ValueError, match=r"dataset\.path='.*nope.json' does not exist"):
        locate(cfg("wikitext2", path=str(tmp_path / "nope.json")))


def test_pg19_stand_in_is_named_in_the_log(caplog):
    with caplog.at_level(logging.INFO, logger="kvexp.tasks.data"):
        docs = load_documents(cfg("pg19", split="test[1:2]"), max_samples=None)
    assert [d.id for d in docs] == ["10321"] and len(docs[0].text) == 318_194
    assert "DRAGON'S BLOOD" in docs[0].text[:1000]
    assert any("stand-in for PG-19: test book 10321" in r.getMessage() for r in caplog.records)


def test_hub_failure_falls_back_to_the_stand_in_or_fails_clearly(monkeypatch, caplog):
    monkeypatch.setattr(data_module, "hub_reachable", lambda: True)

    def broken(dataset):
        raise ConnectionError("Couldn't reach the hub")

    monkeypatch.setattr(data_module, "load_hub_split", broken)
    with caplog.at_level(logging.WARNING, logger="kvexp.tasks.data"):
        assert [d.id for d in load_documents(cfg("pg19"), max_samples=None)] == ["10321"]
    assert any("the hub failed" in r.getMessage() for r in caplog.records)
    with pytest.raises(ValueError, match=r"loading wikitext from the hub failed .*dataset\.path"):
        load_documents(cfg("wikitext2", hub_config="wikitext-103-raw-v1", local_file=None), max_samples=None)


def test_unreachable_hub_costs_seconds(monkeypatch):
    assert hub_reachable() is False  # HF_HUB_OFFLINE: no probe at all
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("HF_DATASETS_OFFLINE")
    monkeypatch.setenv("HF_ENDPOINT", "https://kvexp-unreachable.invalid")
    hub_reachable.cache_clear()
    start = time.perf_counter()
    assert hub_reachable() is False
    assert time.perf_counter() - start < HUB_PROBE_SECONDS + 1


def test_wikitext2_single_document_is_the_joined_rows():
    rows = wikitext_rows()
    assert len(rows) == 4358
    docs = load_documents(cfg("wikitext2"), max_samples=None)
    assert docs == [Document(id="wikitext2", text="\n\n".join(rows))]


def test_wikitext103_reads_a_local_raw_file_and_is_labelled_wikitext103(tmp_path, monkeypatch):
    cfg103 = cfg("wikitext103")
    assert (cfg103["hub_id"], cfg103["hub_config"]) == ("wikitext", "wikitext-103-raw-v1")
    raw = tmp_path / "wiki.test.raw"
    raw.write_bytes(WIKITEXT2.path.read_bytes()[:20000])  # the raw format of both WikiText releases
    (doc,) = load_documents(cfg("wikitext103", path=str(raw)), max_samples=None)
    assert doc.id == "wikitext103" and doc.text.lstrip("\n").startswith(" = Robert Boulter = ")
    articles = load_documents(cfg("wikitext103", path=str(raw), split_documents=True), max_samples=None)
    assert articles[0].id == "Robert Boulter"
    # Nothing embedded for WikiText-103: offline and without a local file the run stops naming where to put one.
    monkeypatch.delenv("KVEXP_DATA_DIR", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub_reachable.cache_clear()
    try:
        with pytest.raises(ValueError, match="dataset.path"):
            check_dataset(cfg("wikitext103"))
    finally:
        hub_reachable.cache_clear()


def test_wikitext2_articles():
    full = "\n\n".join(wikitext_rows())
    docs = load_documents(cfg("wikitext2", split_documents=True), max_samples=None)
    assert 55 <= len(docs) <= 65
    assert len(docs) == 60  # the README's article count
    assert docs[0].id == "Robert Boulter"
    assert docs[1].id == "Du Fu"
    assert docs[-1].id == "The Hustler ( film )"
    assert docs[0].text.lstrip("\n").startswith(" = Robert Boulter = \n")
    assert all(" = = " not in d.id for d in docs)
    assert "\n\n".join(d.text for d in docs) == full  # no text lost or duplicated


def test_wikitext2_split_slice_and_max_samples():
    rows = wikitext_rows()
    (doc,) = load_documents(cfg("wikitext2", split="test[:100]"), max_samples=None)
    assert doc.text == "\n\n".join(rows[:100])
    docs = load_documents(cfg("wikitext2", split_documents=True), max_samples=3)
    assert [d.id for d in docs] == ["Robert Boulter", "Du Fu", "Kiss You ( One Direction song )"]


@pytest.mark.data
def test_pg19_books(local_data):
    docs = load_documents(cfg("pg19"), max_samples=None)
    assert [d.id for d in docs] == ["10146", "10321", "10356", "10762"]
    assert all(len(d.text) > 200_000 for d in docs)
    assert "Dragon" in docs[1].text[:5000] or "DRAGON" in docs[1].text[:5000]
    assert [d.id for d in load_documents(cfg("pg19"), max_samples=2)] == ["10146", "10321"]
    assert load_documents(cfg("pg19"), max_samples=0) == []


def test_pg19_user_path_overrides_local_file(tmp_path):
    books = tmp_path / "books.jsonl"
    rows = [{"url": "http://www.gutenberg.org/ebooks/42", "text": "a"}, {"book_id": 7, "text": "b"}]
    books.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    docs = load_documents(cfg("pg19", path=str(books)), max_samples=None)
    assert docs == [Document("42", "a"), Document("7", "b")]  # hub rows have only the url


def test_pg19_reads_a_local_parquet_file_like_jsonl(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [
        {"short_book_title": "A", "url": "http://www.gutenberg.org/ebooks/42", "text": "a"},
        {"short_book_title": "B", "url": "http://www.gutenberg.org/ebooks/7", "text": "b"},
        {"short_book_title": "C", "url": "http://www.gutenberg.org/ebooks/9", "text": "c"},
    ]  # emozilla/pg19-test's columns
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "test.parquet")
    docs = load_documents(
        cfg("pg19", path=str(tmp_path / "test.parquet"), split="test[1:]"), max_samples=None
    )
    assert docs == [Document("7", "b"), Document("9", "c")]
    (tmp_path / "bad.parquet").write_text("not parquet")
    with pytest.raises(ValueError, match="bad.parquet: not a readable Parquet file"):
        load_documents(cfg("pg19", path=str(tmp_path / "bad.parquet")), max_samples=None)


def test_text_file(tmp_path):
    f = tmp_path / "essay.txt"
    f.write_text("Grüße\n\nline two\n", encoding="utf-8")
    assert load_documents(cfg("text_file", path=str(f)), max_samples=None) == [
        Document(id="essay.txt", text="Grüße\n\nline two\n")
    ]


def test_check_dataset_errors(tmp_path):
    with pytest.raises(ValueError, match=r"dataset\.name.*wikitext2"):
        check_dataset(cfg("wikitext2", name="wikitext4"))  # not a dataset (wikitext103 is one now)
    with pytest.raises(ValueError, match=r"dataset\.path"):
        check_dataset(cfg("text_file"))
    with pytest.raises(ValueError, match=r"dataset\.path"):
        check_dataset(cfg("text_file", path=str(tmp_path / "nope.txt")))
    with pytest.raises(ValueError, match=r"dataset\.path"):
        check_dataset(cfg("pg19", path=str(tmp_path / "nope.jsonl")))
    with pytest.raises(ValueError, match=r"dataset\.split"):
        check_dataset(cfg("wikitext2", split="train"))
    with pytest.raises(ValueError, match=r"dataset 'text_file'|dataset\.path"):
        check_dataset(cfg("text_file", path=None))
    with pytest.raises(ValueError, match="max_samples"):
        load_documents(cfg("pg19"), max_samples=-1)
    for name in DATASETS:
        if name not in ("text_file", "wikitext103"):  # those need a file of the user's (or the hub)
            check_dataset(cfg(name))


def test_omegaconf_config(tmp_path):
    """Hydra hands over DictConfig, not dict."""
    from omegaconf import OmegaConf

    docs = load_documents(OmegaConf.create(cfg("wikitext2", split_documents=True)), max_samples=1)
    assert [d.id for d in docs] == ["Robert Boulter"]


def test_wikitext2_slice_starting_mid_article():
    rows = wikitext_rows()
    docs = load_documents(cfg("wikitext2", split="test[10:40]", split_documents=True), max_samples=None)
    assert [d.id for d in docs] == ["(untitled)", "Du Fu"]
    assert "\n\n".join(d.text for d in docs) == "\n\n".join(rows[10:40])


def _source(path: Path) -> str:
    with tokenize.open(path) as f:
        return f.read()


def test_python_code_is_the_interpreters_stdlib():
    root = Path(sysconfig.get_paths()["stdlib"])
    assert stdlib_dir() == root
    docs = load_documents(cfg("python_code"), max_samples=None)
    expected = sorted(p for p in root.glob("*.py") if p.stat().st_size >= 20000)
    assert [d.id for d in docs] == [p.name for p in expected]  # top-level modules by name, >= 20 kB
    assert len(docs) >= 20 and "argparse.py" in [d.id for d in docs]
    by_id = {d.id: d.text for d in docs}
    assert "class ArgumentParser" in by_id["argparse.py"]
    assert by_id["argparse.py"] == _source(root / "argparse.py")
    assert load_documents(cfg("python_code"), max_samples=3) == docs[:3]  # deterministic; count = max_samples
    picked = load_documents(cfg("python_code", files=["json/decoder.py", "heapq.py"]), max_samples=None)
    assert [d.id for d in picked] == ["json/decoder.py", "heapq.py"]  # in the order given, any size
    assert picked[1].text == _source(root / "heapq.py")


def test_python_code_selection_in_a_folder(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "site-packages").mkdir()
    (tmp_path / "b.py").write_text("x = 1\n" * 10, encoding="utf-8")  # 60 bytes
    (tmp_path / "a.py").write_text("y = 2\n", encoding="utf-8")  # 6 bytes
    (tmp_path / "pkg" / "c.py").write_text("z = 3\n" * 20, encoding="utf-8")  # 120 bytes
    (tmp_path / "site-packages" / "d.py").write_text("w = 4\n" * 20, encoding="utf-8")  # never selected
    (tmp_path / "latin.py").write_bytes("# -*- coding: latin-1 -*-\ns = 'é'\n".encode("latin-1"))
    (tmp_path / "broken.py").write_bytes(b"s = '\xff\xfe'\n")  # not UTF-8, no coding cookie
    (tmp_path / "notes.txt").write_text("not code", encoding="utf-8")
    base = cfg("python_code", path=str(tmp_path), min_bytes=0)

    docs = load_documents(base, max_samples=None)
    assert [d.id for d in docs] == ["a.py", "b.py", "latin.py"]  # top level only; broken.py skipped
    assert docs[2].text == "# -*- coding: latin-1 -*-\ns = 'é'\n"  # decoded with its coding cookie
    deep = load_documents({**base, "glob": "**/*.py"}, max_samples=None)
    assert [d.id for d in deep] == ["a.py", "b.py", "latin.py", "pkg/c.py"]
    big = load_documents({**base, "glob": "**/*.py", "min_bytes": 60}, max_samples=None)
    assert [d.id for d in big] == ["b.py", "pkg/c.py"]
    listed = load_documents({**base, "files": ["pkg/c.py", "a.py"]}, max_samples=1)
    assert listed == [Document("pkg/c.py", "z = 3\n" * 20)]

    with pytest.raises(ValueError, match=r"dataset\.files.*missing\.py"):
        check_dataset({**base, "files": ["a.py", "missing.py"]})
    with pytest.raises(ValueError, match=r"dataset\.files.*broken\.py"):
        load_documents({**base, "files": ["broken.py"]}, max_samples=None)
    with pytest.raises(ValueError, match=r"dataset\.glob='\*\.pyx'"):
        check_dataset({**base, "glob": "*.pyx"})
    with pytest.raises(ValueError, match=r"dataset\.path"):
        check_dataset({**base, "path": str(tmp_path / "a.py")})


def test_required_data_file_names_the_option(tmp_path, monkeypatch):

    (tmp_path / "a.jsonl").write_text("{}")
    monkeypatch.setenv("KVEXP_DATA_DIR", str(tmp_path))
    assert required_data_file("a.jsonl", "train.data_file") == tmp_path / "a.jsonl"
    assert required_data_file(str(tmp_path / "a.jsonl"), "x") == tmp_path / "a.jsonl"
    with pytest.raises(ValueError, match=r"method.calibration_file: .*b.jsonl does not exist"):
        required_data_file("b.jsonl", "method.calibration_file")
    monkeypatch.delenv("KVEXP_DATA_DIR")
    with pytest.raises(
        ValueError, match=r"train.data_file='a.jsonl' is relative to \$KVEXP_DATA_DIR, which is not set"
    ):
        required_data_file("a.jsonl", "train.data_file")
    # the default Gutenberg corpus, when absent, is the embedded novel (a plain-text corpus of one document)
    assert required_data_file(GUTENBERG_CORPUS, "method.calibration_file") == HAYSTACK_BOOK.path
    ((name, text),) = read_corpus(HAYSTACK_BOOK.path)
    assert name == HAYSTACK_BOOK.path.name and text.startswith("[The Man Who Was Thursday")
    (tmp_path / "c.jsonl").write_text('{"id": "x", "body": "one"}\n\n{"body": "two"}\n')
    assert read_corpus(tmp_path / "c.jsonl", "body") == [
        ("x", "one"),
        ("1", "two"),
    ]  # id: file, id or record index
