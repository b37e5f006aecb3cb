"""`qa_jsonl`: generic local question answering from a JSONL file (`dataset.path=`; without one, the three
questions of the embedded stand-in, named in the log).

Each row has `context`, `question` and `answer` (a string or a list of accepted strings), optionally
`answer_prefix` (else `dataset.answer_prefix`) and `id` (else the row number). The question text is used as
given. The prompt goes inside the tokenizer's chat template when it has one (`dataset.chat_template`, as
instruct models such as SmolLM2 answer a plain "...\nAnswer:" with EOS). Scored with the `qa` family:
`accuracy` (an answer occurs in the generated text), `exact_match` and token `f1` (SQuAD normalization).
"""

from __future__ import annotations

from collections.abc import Mapping

from kvexp.tasks.generation import (
    GenerationSample,
    PromptEncoder,
    check_records,
    read_records,
    require_fields,
)


def check_qa_jsonl(dataset: Mapping) -> None:
    check_records(dataset)  # dataset.path exists and parses (or the embedded stand-in stands in)


def qa_jsonl_samples(
    dataset: Mapping, encoder: PromptEncoder, max_samples: int | None, seed: int
) -> list[GenerationSample]:
    """One sample per row, in file order."""
    rows = read_records(dataset, max_samples)
    require_fields(rows, ("context", "question", "answer"), str(dataset.get("path") or dataset["name"]))
    return [
        GenerationSample(
            id=str(row.get("id", i)),
            context=row["context"],
            question=row["question"],
            answers=[row["answer"]] if isinstance(row["answer"], str) else list(row["answer"]),
            answer_prefix=row.get("answer_prefix", dataset.get("answer_prefix") or ""),
            max_new_tokens=dataset["max_new_tokens"],
            metric="qa",
            stop=list(dataset.get("stop") or []),
        )
        for i, row in enumerate(rows)
    ]
