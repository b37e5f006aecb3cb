"""Training text for the trainers: local Gutenberg books or a hub corpus, cut into fixed-length token windows.

`train.data.source`: `local` reads a JSONL of `text` records (`train.data.path`, else
`$KVEXP_DATA_DIR/<train.data.local_file>`, by default the 23 NLTK Gutenberg books, disjoint from the PG-19 test
books); `hub` loads `datasets.load_dataset(hub_id, hub_config, split=...)` (WikiText-103 train by default; needs
the network). Each document is tokenized on its own (the tokenizer's default special tokens) and cut into
windows of `max_length` tokens; a shorter tail is dropped, so a batch never holds padding.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from kvexp.data import DATA_DIR_ENV, WIKITEXT2, hub_token, read_corpus, read_text, required_data_file

log = logging.getLogger(__name__)

DATA_SOURCES = ("local", "hub")


def load_training_texts(data: Mapping) -> list[tuple[str, str]]:
    """(id, text) of every training document `data` (the `train.data` node) names."""
    source = data.get("source")
    if source not in DATA_SOURCES:
        raise ValueError(f"train.data.source={source!r}: expected one of {DATA_SOURCES}")
    limit = data.get("max_documents")
    if source == "hub":
        from datasets import load_dataset

        rows = load_dataset(
            data["hub_id"], data.get("hub_config"), split=data.get("split") or "train", token=hub_token()
        )
        field = data.get("text_field") or "text"
        # WikiText rows are lines; articles are joined, empty rows included, as the usual perplexity text.
        text = "".join(rows[field]) if data["hub_id"].endswith("wikitext") else None
        docs = [("hub", text)] if text is not None else [(str(i), r[field]) for i, r in enumerate(rows)]
        return docs[:limit] if limit else docs
    docs = read_corpus(resolve_training_file(data), data.get("text_field") or "text")
    return docs[:limit] if limit else docs


def resolve_training_file(data: Mapping) -> Path:
    """`train.data.path`, else `$KVEXP_DATA_DIR/<train.data.local_file>` (the default corpus: else the embedded
    novel); missing: a ValueError naming the option."""
    if data.get("path"):
        path = Path(str(data["path"])).expanduser()
        if not path.is_file():
            raise ValueError(f"train.data.path={str(data['path'])!r} does not exist or is not a file")
        return path
    try:
        return required_data_file(str(data.get("local_file")), "train.data.local_file")
    except ValueError as err:
        raise ValueError(f"{err}; set train.data.path, ${DATA_DIR_ENV}, or train.data.source=hub") from err


def _fingerprints(text: str, min_chars: int = 60) -> set[str]:
    """Hashes of the text's long normalized lines (short lines such as chapter titles repeat across books)."""
    lines = (" ".join(line.split()).lower() for line in text.splitlines())
    return {
        hashlib.blake2b(line.encode(), digest_size=8).hexdigest() for line in lines if len(line) >= min_chars
    }


def check_disjoint(
    train_docs: list[tuple[str, str]], eval_docs: list[tuple[str, str]], limit: float = 0.05
) -> None:
    """Raise if a training document shares more than `limit` of an evaluation document's long lines: training on
    the evaluated book would make the perplexity after training meaningless."""
    for eval_id, eval_text in eval_docs:
        held = _fingerprints(eval_text)
        if not held:
            continue
        for train_id, train_text in train_docs:
            shared = len(held & _fingerprints(train_text)) / len(held)
            if shared > limit:
                raise ValueError(
                    f"training document {train_id!r} shares {shared:.0%} of its long lines with evaluation document "
                    f"{eval_id!r}: train.data must be disjoint from the evaluated dataset"
                )


def token_windows(
    docs: list[tuple[str, str]], tokenizer, max_length: int, max_windows: int | None = None
) -> torch.Tensor:
    """[N, max_length] long: consecutive windows of each document's tokens (tails shorter than a window dropped).
    With `max_windows`, every document gives at most its share (ceil(max_windows / documents)) from its beginning,
    so a short run still sees several books, and only that prefix is tokenized."""
    windows: list[torch.Tensor] = []
    share = None if max_windows is None else -(-max_windows // len(docs))
    for _, text in docs:
        if share is not None:
            text = text[: share * max_length * 8]  # enough characters: English BPE tokens average ~4
        ids = torch.tensor(tokenizer(text).input_ids, dtype=torch.long)
        starts = range(0, ids.numel() - max_length + 1, max_length)
        windows.extend(ids[start : start + max_length] for start in list(starts)[:share])
    if not windows:
        raise ValueError(f"no training document has train.max_length={max_length} tokens")
    return torch.stack(windows[:max_windows] if max_windows else windows)


def training_books(data_file: str) -> tuple[list[str], str]:
    """The texts `train.data_file` names (a corpus under $KVEXP_DATA_DIR, or `wikitext2`: the embedded WikiText-2
    test split) and a name for them."""
    if data_file == "wikitext2":
        return [read_text(WIKITEXT2.path)], WIKITEXT2.path.name
    path = required_data_file(data_file, "train.data_file")
    return [text for _, text in read_corpus(path)], path.name


def engine_settings(cfg: Mapping) -> dict[str, Any]:
    """make_cache's engine settings from a run's config, as its evaluation uses them (without the compiled decode,
    which training does not run)."""
    engine = cfg.get("engine") or {}
    per_head = cfg.budget.get("per_head") if cfg.get("budget") is not None else None
    return {
        "slack": engine.get("slack", 0),
        "when": engine.get("when", "always"),
        "positions": engine.get("positions", "original"),
        "head_budgets": OmegaConf.to_container(per_head) if per_head is not None else None,
    }


def check_trainer_options(
    cfg: Mapping, trainer: str, methods: tuple[str, ...], options: tuple[str, ...]
) -> None:
    """A trainer's first checks, before any model loads: the run's method is one it trains, and `train.*` holds
    only its options (one line naming what is allowed)."""
    if cfg.method.name not in methods:
        trains = " or ".join(f"method={m}" for m in methods)
        raise ValueError(f"train={trainer} trains {trains}; got method={cfg.method.name}")
    unknown = sorted(set(cfg.train) - set(options))
    if unknown:
        raise ValueError(f"train={trainer} has no option(s) {unknown}; its options are: {sorted(options)}")
