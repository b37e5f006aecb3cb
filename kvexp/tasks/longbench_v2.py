"""LongBench-v2 (THUDM/LongBench-v2): 503 multiple-choice questions on long documents, prompted and scored as
the benchmark's `pred.py` and `result.py` do (github.com/THUDM/LongBench, main branch).

Prompt: `prompts/0shot.txt` filled with the document, the question and the four choices (each stripped, as
pred.py does). A prompt over the limit keeps its first and last `max_length // 2` tokens, decoded as one token
list, and is sent inside the model's chat template (pred.py queries an OpenAI-compatible chat server), so
`dataset.chat_template` is true by default. 128 new tokens; the answer is the letter of "The correct answer is
(X)" (metric family `longbench_v2`: accuracy), reported overall and by `difficulty` (easy, hard) and `length`
(short, medium, long) as result.py's table is (`dataset.report_by`).

Context / question split (kvexp.tasks.long_context): `context` is the instruction, `<text>` and the document;
`question` is `</text>`, the question, the choices and the answer format.

Data: rows in LongBench-v2's schema (`_id`, `domain`, `sub_domain`, `difficulty`, `length`, `question`,
`choice_A`..`choice_D`, `answer`, `context`): `dataset.path` (the hub's data.json, a JSONL, or a folder holding
data.json), else `$KVEXP_DATA_DIR/<dataset.local_file>`, else the hub (`datasets`, its one split "train"), else
the embedded stand-in (one question per domain, written by kvexp). `dataset.subset`: null for every question, or
one domain.

Not reproduced: pred.py samples at temperature 0.1 (here `eval.*` decides: greedy by default); its
chain-of-thought (two calls), no-context and retrieval variants; for an odd limit pred.py keeps one more tail
token (`-max_len//2`); pred.py skips a sample whose response is empty (a failed call), scored 0 here; pred.py's
chained `str.replace` would also fill a `$Q$` written inside a document.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from functools import partial
from typing import Any

from kvexp.tasks.generation import GenerationSample, PromptEncoder
from kvexp.tasks.long_context import (
    Layout,
    check_options,
    check_rows,
    fit_prompt,
    hub_split_rows,
    middle_truncate,
    prompt_limit,
    read_rows,
    split_template,
)

log = logging.getLogger(__name__)

# prompts/0shot.txt, with str.format fields for pred.py's $DOC$, $Q$, $C_A$..$C_D$.
TEMPLATE = (
    "Please read the following text and answer the question below.\n\n<text>\n{context}\n</text>\n\n"
    "What is the correct answer to this question: {question}\nChoices:\n(A) {choice_A}\n(B) {choice_B}\n"
    '(C) {choice_C}\n(D) {choice_D}\n\nFormat your response as follows: "The correct answer is (insert answer here)".'
)
DOMAINS = (
    "Single-Document QA",
    "Multi-Document QA",
    "Long In-context Learning",
    "Long-dialogue History Understanding",
    "Code Repository Understanding",
    "Long Structured Data Understanding",
)
MAX_NEW_TOKENS = 128  # pred.py without chain-of-thought
CHOICES = ("choice_A", "choice_B", "choice_C", "choice_D")
LAYOUT = Layout(
    "LongBench-v2", "data.json", ("question", *CHOICES, "answer", "context"), split="train"
)  # the hub's only split is "train"


def check_longbench_v2(dataset: Mapping) -> None:
    """Reject a bad LongBench-v2 config before a model loads, naming the option to fix."""
    check_options(dataset, (None, *DOMAINS), LAYOUT)
    check_rows(dataset, LAYOUT, None, prepare=partial(_in_domain, dataset.get("subset")))


def _in_domain(domain: str | None, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The questions of `domain` (None: all)."""
    return rows if domain is None else [r for r in rows if r.get("domain") == domain]


def read_questions(dataset: Mapping) -> list[dict[str, Any]]:
    """The questions of `dataset.subset` (null: all), after `dataset.split`."""
    return read_rows(
        dataset,
        LAYOUT,
        None,
        lambda: hub_split_rows(dataset, None, LAYOUT.split),
        partial(_in_domain, dataset.get("subset")),
    )


def split_prompt(record: Mapping[str, Any]) -> tuple[str, str]:
    """LongBench-v2's 0-shot prompt for `record`, as (up to and including the document, the rest)."""
    fields = {key: str(record[key]).strip() for key in ("context", "question", *CHOICES)}
    return split_template(TEMPLATE, fields)


def build_sample(
    record: Mapping[str, Any], index: int, tokenizer, max_length: int | None, chat_template: bool
) -> GenerationSample:
    """One question as a GenerationSample: the official prompt, truncation and chat template, the answer letter."""
    truncate = partial(middle_truncate, decode_jointly=True)
    context, question, fitted = fit_prompt(
        *split_prompt(record), tokenizer, max_length, chat_template, truncate
    )
    return GenerationSample(
        id=str(record.get("_id") or f"longbench_v2-{index}"),
        context=context,
        question=question,
        answers=[str(record["answer"])],
        max_new_tokens=MAX_NEW_TOKENS,
        metric="longbench_v2",
        meta={key: record.get(key) for key in ("domain", "sub_domain", "difficulty", "length")} | fitted,
    )


def longbench_v2_samples(
    dataset: Mapping, encoder: PromptEncoder, max_samples: int | None, seed: int
) -> list[GenerationSample]:
    """The registry loader: the first `max_samples` questions, prompts cut to fit the model (`prompt_limit`)."""
    limit = prompt_limit(dataset, encoder.max_context, MAX_NEW_TOKENS)
    records = read_questions(dataset)[:max_samples]
    chat = bool(dataset.get("chat_template"))
    samples = [build_sample(r, i, encoder.tokenizer, limit, chat) for i, r in enumerate(records)]
    domain = dataset.get("subset") or "all domains"
    log.info("LongBench-v2 (%s): %d question(s), prompt limit %s tokens", domain, len(samples), limit)
    return samples
