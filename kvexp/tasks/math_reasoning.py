r"""`math500` and `aime25`: math reasoning as a decoding-compression task (`engine.when=always`).

The setting of the reasoning-compression work (R-KV, kvpress's DecodingPress and KVzap on AIME25): a short
problem, a long step-by-step solution, and the KV cache compressed while the solution is generated. What a method
does to that trace decides whether the final answer survives.

Prompt: the problem put into `dataset.prompt_template`, by default DeepSeek-R1's and Qwen's math instruction,
`{problem}\nPlease reason step by step, and put your final answer within \boxed{}.`, inside the tokenizer's chat
template (`dataset.chat_template: true`). No answer prefix, no stop string: generation runs to EOS or
`max_new_tokens` (32,768 in the yaml files, the R1 protocol; lowered on CPU).

Context / question split: the whole prompt is the sample's `question` and its `context` is empty (with a chat
template: the template's opening, system prompt included). So under the default `eval.protocol=query_agnostic`
the problem is appended in the step that never compresses, every layer holds all of it when the first solution
token is chosen, and decoding compresses back to `budget + problem length`: `budget.tokens` is what the
generated trace may keep beyond the problem, the same for a short and a long problem (the method may still evict
problem tokens later). `query_aware` makes the problem part of the compressed prompt instead, so the budget caps
problem and trace together (DecodingPress's `target_size`). Give the budget in tokens: `budget.keep_ratio` is a
fraction of the compressed prompt, which is (almost) empty under query_agnostic.

Grading: `kvexp.tasks.math_grader` (the `math` metric family: `accuracy`, `boxed`): the last `\boxed{}` of the
generation, normalized as Hendrycks MATH's and PRM800K's graders do, equal to the reference; AIME's integers
compare as integers ("033" == "33"). No symbolic equivalence (see that module).

Data (`kvexp.tasks.data.locate`'s order): `dataset.path` (JSONL or a JSON list), `$KVEXP_DATA_DIR/
<dataset.local_file>`, the hub, else the embedded stand-in (problems written by kvexp in the default schema, named
in the log). Defaults: MATH-500 is `HuggingFaceH4/MATH-500` split test (`problem`, `solution`, `answer`,
`subject`, `level`, `unique_id`; scores also reported by subject and level); AIME 2025 is `math-ai/aime25` split
test (`problem`, `answer`, `id`), all 30 problems in one split. Other schemas map their fields with
`dataset.question_field`, `answer_field`, `id_field` and `meta_fields`; e.g. OpenCompass's copy, one half of the
contest per config: `dataset.hub_id=opencompass/AIME2025 dataset.hub_config=AIME2025-I dataset.question_field=
question`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kvexp.tasks.data import locate
from kvexp.tasks.generation import (
    GenerationSample,
    PromptEncoder,
    check_records,
    read_records,
    require_fields,
)

PROBLEM_SLOT = "{problem}"


def check_math(dataset: Mapping) -> None:
    """Reject a bad math500 / aime25 config before a model loads, naming the option to fix."""
    template = dataset.get("prompt_template")
    if not template or PROBLEM_SLOT not in str(template):
        raise ValueError(
            f"dataset.prompt_template={template!r} must contain {PROBLEM_SLOT}, where the problem goes"
        )
    for option in ("question_field", "answer_field"):
        if not dataset.get(option):
            raise ValueError(f"dataset.{option}={dataset.get(option)!r} must name a field of the rows")
    meta = list(dataset.get("meta_fields") or [])
    unknown = [key for key in dataset.get("report_by") or [] if key not in meta]
    if unknown:
        raise ValueError(
            f"dataset.report_by={unknown} is not allowed; allowed values: dataset.meta_fields={meta}"
        )
    check_records(dataset)  # a source exists; a local file parses and dataset.split selects rows
    source = locate(dataset, announce=False)
    if source.kind in ("path", "data_dir"):  # the hub's rows are checked once loaded; the stand-in is ours
        _require_fields(read_records(dataset, None), dataset, source.option(dataset))


def math_samples(
    dataset: Mapping, encoder: PromptEncoder, max_samples: int | None, seed: int
) -> list[GenerationSample]:
    """One sample per row, in order: the problem in the prompt template as the question, no context."""
    rows = read_records(dataset, max_samples)
    _require_fields(rows, dataset, str(dataset.get("path") or dataset.get("hub_id") or dataset["name"]))
    template, id_field = str(dataset["prompt_template"]), dataset.get("id_field")
    return [
        GenerationSample(
            id=str(row[id_field]) if id_field in row else str(i),
            context="",
            question=template.replace(PROBLEM_SLOT, str(row[dataset["question_field"]])),
            answers=_answers(row[dataset["answer_field"]]),
            answer_prefix=dataset.get("answer_prefix") or "",
            max_new_tokens=dataset["max_new_tokens"],
            metric="math",
            meta={key: row.get(key) for key in dataset.get("meta_fields") or []},
            stop=list(dataset.get("stop") or []),
        )
        for i, row in enumerate(rows)
    ]


def _require_fields(rows: list[dict[str, Any]], dataset: Mapping, where: str) -> None:
    options = f"dataset.question_field={dataset['question_field']!r}, dataset.answer_field={dataset['answer_field']!r}"
    require_fields(rows, (dataset["question_field"], dataset["answer_field"]), f"{where} ({options})")


def _answers(value: Any) -> list[str]:
    """The reference answers: AIME copies store integers, some files a list of accepted answers."""
    return [str(v) for v in value] if isinstance(value, list) else [str(value)]
