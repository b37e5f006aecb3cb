"""Write a generation dataset's samples to a JSONL file, exactly as a run builds them for a model's tokenizer, so
another tool can be scored on the very same samples:

    python -m kvexp.export ruler_4k.jsonl dataset=ruler model=llama3.1_8b_instruct dataset.lengths=[4096]

The overrides are a run's (`model=`, `dataset=`, `dataset.*`, `seed=`, `eval.max_samples=`, `eval.chat_template=`);
only the model's tokenizer loads. One line per sample: `id`, `context` (the part a query-agnostic run
compresses), `question`, `answer_prefix`, `answers`, `max_new_tokens`, `metric` (kvexp's metric family, e.g.
`ruler_all` = RULER's string_match_all), `chat_template` (whether a run wraps the prompt in the tokenizer's
template) and the sample's meta (RULER: `task`, `length`, `tokens`; pass-key: `length`, `depth`).
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig

from kvexp.config import normalize_overrides, validate
from kvexp.files import atomic_write_text
from kvexp.models import REPO, load_tokenizer
from kvexp.tasks.generation import GenerationSample, PromptEncoder
from kvexp.tasks.registry import DATASETS, use_chat_template


def build_samples(
    overrides: Sequence[str], tokenizer: Any = None
) -> tuple[DictConfig, PromptEncoder, list[GenerationSample]]:
    """The run config the overrides make, its prompt encoder and the dataset's samples as a run builds them (with
    `tokenizer`, or the model's own, loaded alone)."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=normalize_overrides(list(overrides)))
    validate(cfg)
    entry = DATASETS[cfg.dataset.name]
    if entry.task != "generation" or entry.run is not None:
        exportable = sorted(n for n, d in DATASETS.items() if d.task == "generation" and d.run is None)
        raise ValueError(f"dataset={cfg.dataset.name} has no samples to export; choose one of {exportable}")
    tokenizer = load_tokenizer(cfg.model) if tokenizer is None else tokenizer
    encoder = PromptEncoder(tokenizer, use_chat_template(cfg, tokenizer), cfg.model.max_context)
    return cfg, encoder, entry.load(cfg.dataset, encoder, cfg.eval.max_samples, cfg.seed)


def export(out: Path, overrides: Sequence[str]) -> int:
    """Write the samples of the dataset the overrides name to `out` (atomically); their count."""
    cfg, encoder, samples = build_samples(overrides)
    lines = [
        json.dumps(
            {
                "id": s.id,
                **s.meta,
                "context": s.context,
                "question": s.question,
                "answer_prefix": s.answer_prefix,
                "answers": s.answers,
                "max_new_tokens": cfg.eval.max_new_tokens or s.max_new_tokens,
                "metric": s.metric,
                "chat_template": encoder.chat_template,
            }
        )
        for s in samples
    ]
    atomic_write_text(out, "".join(f"{line}\n" for line in lines))
    return len(samples)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m kvexp.export",
        description="Write a generation dataset's samples, as kvexp builds them for a model, to a JSONL file.",
    )
    parser.add_argument("out", type=Path, help="the JSONL file to write")
    parser.add_argument(
        "overrides",
        nargs="*",
        help="config overrides, as for python -m kvexp: dataset=ruler model=... dataset.*=...",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        count = export(args.out, args.overrides)
    except ValueError as err:  # a user error: one line, no traceback
        parser.exit(2, f"error: {err}\n")
    print(f"wrote {count} samples to {args.out}")


if __name__ == "__main__":
    main()
