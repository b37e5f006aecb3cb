"""Summarization: CNN/DailyMail (3.0.0) and XSum, scored with ROUGE-1/2/L/Lsum (rouge-score, stemmed).

The article is the context that is compressed; the question is an instruction (`dataset.instruction`) and the
answer prefix `dataset.answer_prefix` ("Summary:"). References are split into one sentence per line (CNN/DM's
highlights already are), and so are predictions at scoring time, so rougeLsum is the summary-level score.
Rows come from `dataset.path`, `$KVEXP_DATA_DIR/<local_file>` or the hub (`cnn_dailymail` 3.0.0,
`EdinburghNLP/xsum`), sliced by `dataset.split` ("test[:100]", the SimCalKV study's setting); without any of
them, from the embedded stand-in (three records written by kvexp), which the log names.
"""

from __future__ import annotations

from collections.abc import Mapping

from kvexp.tasks.generation import (
    GenerationSample,
    PromptEncoder,
    check_records,
    read_records,
    require_fields,
    sentence_lines,
)


def check_summarization(dataset: Mapping) -> None:
    check_records(dataset)  # raises when no source has the data or a local file does not parse
    for key in ("text_field", "summary_field"):
        if not dataset.get(key):
            raise ValueError(f"dataset.{key} must name a field of the {dataset.get('name')} rows")


def summarization_samples(
    dataset: Mapping, encoder: PromptEncoder, max_samples: int | None, seed: int
) -> list[GenerationSample]:
    """One sample per article: context "<context_prefix><article>\\n", the instruction, the answer prefix."""
    rows = read_records(dataset, max_samples)
    text, summary = dataset["text_field"], dataset["summary_field"]
    require_fields(rows, (text, summary), str(dataset["name"]))
    return [
        GenerationSample(
            id=str(row.get("id", i)),
            context=f"{dataset.get('context_prefix') or ''}{row[text].strip()}\n",
            question=dataset["instruction"],
            answers=[sentence_lines(row[summary])],
            answer_prefix=dataset.get("answer_prefix") or "",
            max_new_tokens=dataset["max_new_tokens"],
            metric="rouge",
            stop=list(dataset.get("stop") or []),
        )
        for i, row in enumerate(rows)
    ]
