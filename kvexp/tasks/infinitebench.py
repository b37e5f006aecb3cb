"""InfiniteBench (xinrongzhang2022/InfiniteBench): its 12 tasks, 100k+ token contexts, as generation samples
prompted and scored as the benchmark's own code does (github.com/OpenBMB/InfiniteBench, src/).

Per task: the prompt template open models are evaluated with (`prompt.py`'s yarn_mistral_templates, which
eval_yarn_mistral.py, eval_yi_200k.py and eval_chatglm.py use) filled as `eval_utils.create_prompt` fills it,
the generation length (`DATA_NAME_TO_MAX_NEW_TOKENS`), and `compute_scores.get_score_one` (metric family
`infinitebench`, the task in the sample's meta). A prompt over the limit keeps its first and last
`max_length // 2` tokens, decoded as one token list (`truncate_by_tokens`); no chat template by default.
math_calc generates up to 30000 tokens, as released: on a model of shorter context set `dataset.max_length`
and `eval.max_new_tokens`.

Context / question split (kvexp.tasks.long_context): `context` is the prompt up to and including the long
context (the book, script, code, list or noise), `question` the rest (the question, options, answer cue).

Data: `<task>.jsonl` in InfiniteBench's schema (`id`, `context`, `input`, `answer`, `options`): `dataset.path`
(the file, or a folder of them as scripts/download_dataset.sh writes), else `$KVEXP_DATA_DIR/<dataset.local_file>`,
else the hub (the same file, `dataset.hub_file`), else the embedded stand-in (one row per task, written by kvexp).
Answers become strings (`[text, letter]` for the choice tasks, as `get_answer` makes them), compared as the
original types are (math_find as an int or a float, math_calc and code_run as ints).

Not reproduced: the 128k / 200k truncation lengths (here the model's context; `dataset.max_length`); the GPT-4,
Claude and Kimi prompts and GPT-4's math_calc scoring; eval_yi_200k.py's sampling (temperature 0.8).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from functools import partial
from typing import Any

from kvexp.tasks.generation import GenerationSample, PromptEncoder
from kvexp.tasks.long_context import (
    Layout,
    check_options,
    check_rows,
    fit_prompt,
    hub_file_rows,
    middle_truncate,
    read_rows,
    split_template,
    task_samples,
)

log = logging.getLogger(__name__)

# prompt.py's yarn_mistral_templates, verbatim.
PROMPTS: dict[str, str] = {
    "passkey": (
        "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. I will "
        "quiz you about the important information.\n\n{context}\n\n{input}\n\nThe pass key is"
    ),
    "number_string": (
        "There is an important info hidden inside a lot of irrelevant text. Find it. I will quiz you about "
        "the important information there.\n\n{context}\n\n{input}\n\nThe sequence of digits is"
    ),
    "kv_retrieval": (
        "Extract the value corresponding to the specified key in the JSON object below.\n\n{context}\n\n{input}"
    ),
    "longbook_sum_eng": "Summarize the book below.\n\n{context}\n\nSummary:",
    "longbook_choice_eng": (
        "Read the book and answer the question.\n\n{context}\n\nQuestion: {question}\nA. {OPTION_A}\n"
        "B. {OPTION_B}\nC. {OPTION_C}\nD. {OPTION_D}\n\nThe letter of the correct answer is"
    ),
    "longbook_qa_eng": (
        "Read the book and answer the question. Be very concise in your answer.\n\n{context}\n\n"
        "Question: {question}\nAnswer:"
    ),
    "longbook_qa_chn": "阅读以下书籍然后回答问题。\n\n{context}\n\n问题：{question}\n答案：",
    "longdialogue_qa_eng": (
        'Below is a dialogue script where one random occurrence of a character name is replaced with "$$MASK$$", '
        "and you should try to guess who that character is.\n\n{context}\n\nThe name that has been replaced "
        "with $$MASK$$ is likely"
    ),
    "math_find": "{prefix}\n\n{context}\n\n{input}",
    "math_calc": (
        "Let us calculate the intermediate values of an expression.\n\nExpression: 1 + 3 + 4\n"
        "Values: [1, 4, 8]\n\nExpression: 8 - 3 + 2 - 4\nValues: [8, 5, 7, 3]\n\nExpression: {context}\nValues:"
    ),
    "code_run": (
        "There is a function called {func} in the following Python code.\n\n{context}\n\nPlease compute the "
        "exact value of {func_call}. The value of {func_call} is"
    ),
    "code_debug": (
        "Following is a Python code where exactly one of the functions/methods has a deliberate error that "
        "makes it crash.\n\n{context}\n\nOptions:\nA. {OPTION_A}\nB. {OPTION_B}\nC. {OPTION_C}\nD. {OPTION_D}"
        "\n\nThe correct option is:"
    ),
}
TASKS: tuple[str, ...] = tuple(PROMPTS)

# eval_utils.py's DATA_NAME_TO_MAX_NEW_TOKENS.
MAX_NEW_TOKENS: dict[str, int] = {
    "passkey": 6,
    "number_string": 12,
    "kv_retrieval": 50,
    "longbook_sum_eng": 1200,
    "longbook_choice_eng": 40,
    "longbook_qa_eng": 40,
    "longbook_qa_chn": 40,
    "longdialogue_qa_eng": 40,
    "math_find": 3,
    "math_calc": 30000,
    "code_run": 5,
    "code_debug": 5,
}

# get_answer: the choice tasks are scored against the option's text and its letter.
CHOICE_TASKS = frozenset({"longbook_choice_eng", "code_debug"})
LETTERS = "ABCD"
LAYOUT = Layout("InfiniteBench", "{task}.jsonl", ("context", "input", "answer"))
_FUNCTION_CALL = re.compile(r"func_[0-9]+\(\-?[0-9]+\)")
_MATH_TARGET = re.compile(r"The .+ of")


def check_infinitebench(dataset: Mapping) -> None:
    """Reject a bad InfiniteBench config before a model loads, naming the option to fix."""
    check_options(dataset, TASKS, LAYOUT)
    check_rows(dataset, LAYOUT, dataset["subset"])


def read_task(dataset: Mapping) -> list[dict[str, Any]]:
    """The rows of task `dataset.subset`, after `dataset.split`."""
    task = dataset["subset"]
    return read_rows(dataset, LAYOUT, task, lambda: hub_file_rows(dataset, task))


def prompt_fields(task: str, record: Mapping[str, Any]) -> dict[str, Any]:
    """create_prompt's fields of the task's template: the context and input, the input as the question, the
    options, code_run's function call (the first `func_N(x)` of the input) and math_find's opening question."""
    text = str(record["input"])
    fields: dict[str, Any] = {"context": record["context"], "input": text, "question": text}
    if task in CHOICE_TASKS:
        options = list(record.get("options") or [])
        if len(options) < len(LETTERS):
            raise ValueError(
                f"InfiniteBench {task} row {record.get('id')!r} has {len(options)} options, not 4"
            )
        fields |= {f"OPTION_{letter}": option for letter, option in zip(LETTERS, options, strict=False)}
    if task == "code_run":
        call = _FUNCTION_CALL.search(text)
        if call is None:
            raise ValueError(
                f"InfiniteBench code_run row {record.get('id')!r}: its input names no func_N(x) call"
            )
        fields |= {"func_call": call.group(), "func": call.group().split("(")[0]}
    if task == "math_find":
        target = _MATH_TARGET.search(text)
        if target is None:
            raise ValueError(
                f"InfiniteBench math_find row {record.get('id')!r}: its input names no 'The ... of'"
            )
        fields["prefix"] = f"What is {target.group().lower()[:-3]} in the following list?"
    return fields


def answers(task: str, record: Mapping[str, Any]) -> list[str]:
    """The references as strings: get_answer's [text, letter] for the choice tasks; else the answer (a list of
    them, math_calc's values unnested)."""
    answer = record["answer"]
    values = answer if isinstance(answer, list) else [answer]
    if task in CHOICE_TASKS:
        if len(values) == 2 and values[1] in LETTERS:
            return [str(v) for v in values]
        options = list(record.get("options") or [])
        if len(values) != 1 or values[0] not in options[:4]:
            raise ValueError(
                f"InfiniteBench {task} row {record.get('id')!r}: answer {answer!r} is not an option"
            )
        return [str(values[0]), LETTERS[options.index(values[0])]]
    if values and isinstance(values[0], list):  # math_calc's [[v1, v2, ...]]
        values = values[0]
    return [str(v) for v in values]


def build_sample(
    task: str, record: Mapping[str, Any], index: int, tokenizer, max_length: int | None, chat_template: bool
) -> GenerationSample:
    """One InfiniteBench row as a GenerationSample: the official prompt, truncation, length and scorer."""
    truncate = partial(middle_truncate, decode_jointly=True)
    halves = split_template(PROMPTS[task], prompt_fields(task, record))
    context, question, fitted = fit_prompt(*halves, tokenizer, max_length, chat_template, truncate)
    return GenerationSample(
        id=str(record.get("id", f"{task}-{index}")),
        context=context,
        question=question,
        answers=answers(task, record),
        max_new_tokens=MAX_NEW_TOKENS[task],
        metric="infinitebench",
        meta={"task": task, **fitted},
    )


def infinitebench_samples(
    dataset: Mapping, encoder: PromptEncoder, max_samples: int | None, seed: int
) -> list[GenerationSample]:
    """The registry loader: the task's first `max_samples` rows, prompts cut to fit the model (`prompt_limit`)."""
    return task_samples(
        dataset, encoder, max_samples, MAX_NEW_TOKENS, read_task, build_sample, "InfiniteBench"
    )
