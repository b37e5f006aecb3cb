r"""math500 / aime25: boxed-answer extraction, the MATH graders' normalization, AIME's integer answers, the prompt,
config checks, local files, an empty context under query_agnostic, and one app run with decoding compression.

The normalization pairs are the documented cases of Hendrycks MATH's `math_equivalence_test.py` (written out
here, not imported), PRM800K's grader rules and Qwen2.5-Math's `strip_string`, plus what kvexp deliberately does
not do (symbolic equivalence).
"""

from __future__ import annotations

import copy
import csv
import json
from pathlib import Path

import pytest
import torch
import yaml

from kvexp.models import tiny_tokenizer
from kvexp.tasks.generation import GenerationSample, Prompt, PromptEncoder, generate_answer
from kvexp.tasks.math_grader import grade, is_equiv, last_boxed, normalize_answer
from kvexp.tasks.math_reasoning import check_math, math_samples
from kvexp.tasks.metrics import score

CONF = Path(__file__).parents[1] / "conf" / "dataset"
INSTRUCTION = "\nPlease reason step by step, and put your final answer within \\boxed{}."


def cfg(name: str, **overrides) -> dict:
    node = yaml.safe_load((CONF / f"{name}.yaml").read_text())
    node.pop("defaults")
    return {**node, **overrides}


@pytest.fixture(autouse=True)
def no_data_dir(monkeypatch):
    """No $KVEXP_DATA_DIR: the embedded stand-ins or the test's own files (the hub is offline in tests)."""
    monkeypatch.delenv("KVEXP_DATA_DIR", raising=False)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# -- extraction ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text,boxed",
    [
        ("so the answer is $\\boxed{\\frac{1}{2}}$.", "\\frac{1}{2}"),  # nested braces
        ("\\boxed{\\sqrt{\\frac{a}{b}}} and {x}", "\\sqrt{\\frac{a}{b}}"),
        ("first \\boxed{3}, then corrected: \\boxed{4}", "4"),  # several: the last
        ("\\boxed{1} then \\fbox{2}", "2"),  # \fbox counts too
        ("The final answer is $\\boxed 12$.", "12"),  # brace-less: up to the `$`
        ("no box here, the answer is 5", None),
        ("cut by max_new_tokens: \\boxed{\\frac{1}{", None),  # never closed
        ("\\boxedx{3}", None),  # another command
        ("\\boxed{}", ""),  # boxed, but empty
    ],
)
def test_last_boxed(text, boxed):
    assert last_boxed(text) == boxed


# -- normalization -------------------------------------------------------------------------------------------
EQUIVALENT = [
    # Hendrycks MATH's math_equivalence_test.py
    ("\\tfrac{1}{2} +\\! \\frac1{72}", "\\\\dfrac{1}{2} +\\frac{1}{72}"),
    ("10\\text{ units}", "10 "),
    ("10", "\\$10"),
    ("\\left(x-2\\right)\\left(x+2\\right)", "(x-2)(x+2)"),
    ("0.1", ".1"),
    ("10\\%", "10"),
    ("10\\sqrt{3} + \\sqrt4", "10\\sqrt3 + \\sqrt{4}"),
    ("\\frac34i", "\\frac{3}{4}i"),
    ("\\tfrac83", "\\frac{8}{3}"),
    ("1/2", "\\frac{1}{2}"),
    # the rest of Hendrycks's _strip_string
    ("90^\\circ", "90"),
    ("90^{\\circ}", "90"),
    ("k = 7", "7"),
    ("y = 2x+1", "2x+1"),
    ("0.5", "\\frac12"),
    ("\\frac{\\sqrt{3}}{2}", "\\dfrac{\\sqrt3}{2}"),
    ("-1/2", "-\\frac{1}{2}"),  # kvexp: the sign in front
    # PRM800K's grader
    ("\\text{Monday}", "monday"),
    ("$12$", "12"),
    ("{5}", "5"),
    ("1,000", "1000"),
    ("1{,}000", "1000"),
    ("5.00", "5"),
    ("033", "33"),
    # Qwen2.5-Math's strip_string
    ("5.", "5"),
    ("5\\text{cm}", "5"),
    ("\\text{(C)}", "(C)"),
    ("\\begin{bmatrix}1\\\\2\\end{bmatrix}", "\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}"),
    ("1\\,000", "1000"),  # kvexp: thin spaces
]
DIFFERENT = [
    # Hendrycks MATH's math_equivalence_test.py
    ("\\tfrac{1}{2} + \\frac1{72}", "\\\\frac{1}{2} + 2/3"),
    ("10, 4, -2", "4, 10, -2"),
    ("10, 4, 2", "4, 12, 2"),
    ("10\\text{ units}", "100 "),
    ("0.1, 4, 2", "4, .1, 2"),
    ("5x - 7y + 11z + 4 = 0", "x + y - z + 2 = 0"),
    # a prefix is dropped only before a one- or two-character left side
    ("x+y = 5", "5"),
    # no symbolic or numeric equivalence (module docstring): PRM800K's sympy step would accept these
    ("\\frac{\\sqrt{2}}{2}", "\\frac{1}{\\sqrt{2}}"),
    ("0.25", "\\frac{1}{4}"),
    ("2x+2", "2(x+1)"),
    # PRM800K refuses unreduced fractions even with sympy
    ("\\frac{2}{4}", "\\frac{1}{2}"),
    ("(1,2)", "[1,2]"),
    ("33", "330"),
]


@pytest.mark.parametrize("answer,reference", EQUIVALENT)
def test_equivalent_answers(answer, reference):
    assert is_equiv(answer, reference), (normalize_answer(answer), normalize_answer(reference))


@pytest.mark.parametrize("answer,reference", DIFFERENT)
def test_different_answers(answer, reference):
    assert not is_equiv(answer, reference), (normalize_answer(answer), normalize_answer(reference))


def test_normal_forms_by_hand():
    assert normalize_answer("\\dfrac{1}{2} + \\frac1{72}") == "\\frac{1}{2}+\\frac{1}{72}"
    assert normalize_answer(" x = \\left[ 2, 3 \\right]. ") == "[2,3]"
    assert normalize_answer("\\$1,\\!000") == "1000"
    assert is_equiv(None, "5") is False


def test_aime_answers_compare_as_integers():
    solution = "... so there are $\\boxed{033}$ ways."
    assert grade(solution, ["33"]) == {"accuracy": 1.0, "boxed": 1.0}
    assert grade("\\boxed{33}", ["033"])["accuracy"] == 1.0
    assert grade("\\boxed{33.0}", ["33"])["accuracy"] == 1.0
    assert grade("\\boxed{34}", ["33"]) == {"accuracy": 0.0, "boxed": 1.0}
    assert grade("the answer is 33", ["33"]) == {"accuracy": 0.0, "boxed": 0.0}  # no box, no answer
    # the metric family through the runner's entry point, with a sample's meta as keyword arguments
    assert score("math", "\\boxed{\\frac{1}{12}}", ["\\frac{1}{12}"], subject="Algebra", level=3) == {
        "accuracy": 1.0,
        "boxed": 1.0,
    }
    assert grade("\\boxed{6}", ["The width is $\\boxed{6}$."])["accuracy"] == 1.0  # a solution as reference


# -- samples and prompts -------------------------------------------------------------------------------------
def test_math500_stand_in_sample_and_prompt(caplog):
    with caplog.at_level("WARNING", logger="kvexp.tasks.data"):
        samples = math_samples(cfg("math500"), PromptEncoder(tiny_tokenizer()), None, 0)
    assert any("stand-in for MATH-500" in r.getMessage() for r in caplog.records)
    assert len(samples) == 7 and len({s.meta["subject"] for s in samples}) == 7
    first = samples[0]
    assert first.id == "kvexp/algebra/1.json" and first.context == "" and first.answers == ["22"]
    assert first.question == "What is the value of $3x + 7$ when $x = 5$?" + INSTRUCTION
    assert (first.metric, first.meta, first.stop, first.answer_prefix) == (
        "math",
        {"subject": "Algebra", "level": 1},
        [],
        "",
    )
    assert first.max_new_tokens == 32768
    # without a chat template the prompt is the question alone; with one, the template wraps it
    assert PromptEncoder(tiny_tokenizer()).texts(first) == ("", first.question)
    tok = copy.deepcopy(tiny_tokenizer())
    tok.chat_template = (
        "{% for m in messages %}<|user|>{{ m['content'] }}<|end|>{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    assert PromptEncoder(tok, chat_template=True).texts(first) == (
        "<|user|>",
        "What is the value of $3x + 7$ when $x = 5$?" + INSTRUCTION + "<|end|><|assistant|>",
    )


def test_aime25_stand_in_and_its_answers_grade():
    samples = math_samples(cfg("aime25"), PromptEncoder(tiny_tokenizer()), 2, 0)
    assert [s.id for s in samples] == ["kvexp-1", "kvexp-2"] and samples[1].answers == ["100"]
    assert samples[0].meta == {} and samples[0].question.endswith(INSTRUCTION)
    assert grade("\\boxed{100}", samples[1].answers)["accuracy"] == 1.0


def test_local_jsonl_with_a_field_mapping(tmp_path, monkeypatch):
    """OpenCompass's AIME2025 schema (`question`, integer answers, no id) mapped onto aime25; a split slice."""
    rows = [{"question": f"Problem {i}?", "answer": 10 + i} for i in range(4)]
    path = write_jsonl(tmp_path / "aime.jsonl", rows)
    dataset = cfg("aime25", path=str(path), question_field="question", id_field=None, split="test[1:3]")
    check_math(dataset)
    samples = math_samples(dataset, PromptEncoder(tiny_tokenizer()), None, 0)
    assert [(s.id, s.question, s.answers) for s in samples] == [
        ("0", "Problem 1?" + INSTRUCTION, ["11"]),
        ("1", "Problem 2?" + INSTRUCTION, ["12"]),
    ]
    # $KVEXP_DATA_DIR/<local_file> before the hub and the stand-in; a list of accepted answers
    write_jsonl(tmp_path / "data" / "math500" / "test.jsonl", [{"problem": "p", "answer": ["2", "two"]}])
    monkeypatch.setenv("KVEXP_DATA_DIR", str(tmp_path / "data"))
    (s,) = math_samples(cfg("math500"), PromptEncoder(tiny_tokenizer()), None, 0)
    assert (s.id, s.answers, s.meta) == ("0", ["2", "two"], {"subject": None, "level": None})


def test_check_errors_name_the_option(tmp_path):
    with pytest.raises(ValueError, match=r"dataset.prompt_template=.* must contain \{problem\}"):
        check_math(cfg("math500", prompt_template="Solve it."))
    with pytest.raises(ValueError, match=r"dataset.question_field=None must name a field"):
        check_math(cfg("math500", question_field=None))
    with pytest.raises(ValueError, match=r"report_by=\['year'\].*allowed values: dataset.meta_fields=\["):
        check_math(cfg("math500", report_by=["year"]))
    wrong = write_jsonl(tmp_path / "wrong.jsonl", [{"question": "q", "answer": "1"}])
    with pytest.raises(
        ValueError, match=r"dataset.question_field='problem'.*its fields are \['answer', 'question'\]"
    ):
        check_math(cfg("aime25", path=str(wrong)))
    with pytest.raises(ValueError, match=r"dataset.split='test\[5:\]' selects none"):
        check_math(cfg("aime25", path=str(wrong), question_field="question", split="test[5:]"))
    with pytest.raises(ValueError, match="does not exist"):
        check_math(cfg("aime25", path=str(tmp_path / "missing.jsonl")))
    check_math(cfg("math500"))  # the defaults: the stand-in (no data dir, no hub)
    check_math(cfg("aime25"))


# -- an empty context under query_agnostic -------------------------------------------------------------------
def test_an_empty_context_runs_and_the_question_is_the_first_step():
    """A tokenizer that adds no BOS gives an all-question prompt no context token: the question step is the
    first forward (query_agnostic), the same tokens as query_aware with the full cache, and decoding
    compresses back to budget + question length."""
    from tests.conftest import load

    model, tok = load("tiny_llama")
    sample = GenerationSample("p", "", "What is $1 + 1$?" + INSTRUCTION, ["2"])
    question = PromptEncoder(tok).encode(sample, 8).question
    prompt = Prompt(torch.zeros((1, 0), dtype=torch.long), question)
    agnostic = generate_answer(model, tok, prompt, "full", None, max_new_tokens=8)
    aware = generate_answer(model, tok, prompt, "full", None, max_new_tokens=8, protocol="query_aware")
    assert agnostic.prediction == aware.prediction and agnostic.new_tokens == aware.new_tokens == 8
    assert agnostic.context_tokens == 0 and agnostic.question_tokens == question.shape[1]
    compressed = generate_answer(model, tok, prompt, "streaming_llm", 6, max_new_tokens=8, when="always")
    assert compressed.kv["tokens_kept"] == 6 + question.shape[1] < compressed.kv["tokens_seen"]
    with pytest.raises(ValueError, match="no tokens"):
        generate_answer(model, tok, Prompt(prompt.context, prompt.context), "full", None, max_new_tokens=2)


# -- one run of the app --------------------------------------------------------------------------------------
def test_math500_runs_end_to_end_with_decoding_compression(tmp_path):
    from kvexp.app import train_or_eval
    from tests.test_config import _compose

    config = _compose(
        "model=tiny_llama", "dataset=math500", "method=streaming_llm", "budget=32", "engine.when=always",
        "eval.max_new_tokens=40", "eval.max_samples=2", "cache_dir=null",
    )  # fmt: skip
    summary = train_or_eval(config, tmp_path / "out")
    after, before = summary["metrics_after"], summary["metrics_before"]
    assert summary["dataset"] == "math500" and after["samples"] == 2
    assert set(after["math"]) == set(before["math"]) == {"accuracy", "boxed"}
    assert set(after["by"]) == {"subject", "level", "subject/level"}
    assert set(after["by"]["level"]) == {"1", "2"}
    assert summary["objective"] == after["math"]["accuracy"]
    # decoding compressed back to budget + question length (the context: the tiny tokenizer's BOS)
    with open(tmp_path / "out" / "samples.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["subject"] for r in rows] == ["Algebra", "Prealgebra"] and "boxed_after" in rows[0]
    for row in rows:
        assert row["context_tokens"] == "1" and float(row["kept_tokens"]) == 32 + int(row["question_tokens"])
