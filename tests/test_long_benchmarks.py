"""LongBench-v2, InfiniteBench, LooGLE and ZeroSCROLLS: their official metrics against hand-computed values, their
prompts against prompts written out here for rows of the embedded stand-ins, the context / question split,
truncation, the config checks, local files and hub files in each benchmark's schema, and one app run each.

Nothing leaves the machine: rows are the stand-ins kvexp ships or rows written here, the hub downloads are
replaced by local files, and the model is the tiny random Llama.
"""

from __future__ import annotations

import copy
import json
import math
import zipfile
from pathlib import Path

import pytest
import yaml

from kvexp.models import tiny_tokenizer
from kvexp.tasks import data as data_module
from kvexp.tasks import infinitebench, long_context, longbench_v2, loogle, zero_scrolls
from kvexp.tasks.generation import PromptEncoder
from kvexp.tasks.metrics import rouge_package, score
from kvexp.tasks.registry import DATASETS

CONF = Path(__file__).parents[1] / "conf" / "dataset"
FIXTURES = Path(__file__).parents[1] / "kvexp" / "data" / "fixtures"
MODULES = {
    "longbench_v2": longbench_v2,
    "infinitebench": infinitebench,
    "loogle": loogle,
    "zero_scrolls": zero_scrolls,
}


def cfg(name: str, **overrides) -> dict:
    return {**yaml.safe_load((CONF / f"{name}.yaml").read_text()), **overrides}


def load(name: str, max_length: int = 100_000, **overrides):
    """The dataset's samples through its registry loader, with a byte-level tokenizer (one token per byte)."""
    dataset = cfg(name, **overrides)
    DATASETS[name].check(dataset)
    return DATASETS[name].load(dataset, PromptEncoder(tiny_tokenizer(), False, max_length), None, 0)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def stand_in(relative: str) -> dict:
    return json.loads((FIXTURES / relative).read_text(encoding="utf-8").splitlines()[0])


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.delenv("KVEXP_DATA_DIR", raising=False)


# ---- metrics, by hand ----------------------------------------------------------------------------------------
def test_rouge_package_by_hand():
    # words: the cat sat | the cat ran -> 2 of 3 unigrams, 1 of 2 bigrams, LCS "the cat" (2 of 3 distinct words)
    s = rouge_package("the cat sat", "the cat ran")
    assert s["rouge-1"] == pytest.approx({"p": 2 / 3, "r": 2 / 3, "f": 2 / 3}, abs=1e-7)
    assert s["rouge-2"] == pytest.approx({"p": 1 / 2, "r": 1 / 2, "f": 1 / 2}, abs=1e-7)
    assert s["rouge-l"]["r"] == pytest.approx(2 / 3)
    # sets: a repeated word counts once; n-grams run across "." sentence ends; a side without sentences: None
    assert rouge_package("cat cat. sat", "cat sat")["rouge-1"]["r"] == 1.0
    assert rouge_package("cat. sat", "cat sat")["rouge-2"]["r"] == 1.0
    assert rouge_package("...", "cat") is None


def test_longbench_v2_accuracy():
    answer = ["B"]
    assert score("longbench_v2", "The correct answer is (B)", answer) == {"accuracy": 1.0}
    assert score("longbench_v2", "**The correct answer is** (B).", answer) == {"accuracy": 1.0}  # * removed
    assert score("longbench_v2", "The correct answer is B, because", answer) == {"accuracy": 1.0}
    assert score("longbench_v2", "The correct answer is (C)", answer) == {"accuracy": 0.0}
    assert score("longbench_v2", "Answer: (B)", answer) == {"accuracy": 0.0}  # no answer sentence
    assert score("longbench_v2", "", answer) == {"accuracy": 0.0}


@pytest.mark.parametrize(
    "task,prediction,answers,expected",
    [
        ("passkey", "48213.", ["48213"], 1.0),
        ("passkey", "The pass key is 482130", ["48213"], 0.0),  # the first digit run, whole
        ("number_string", "", ["7305918246"], 0.0),
        ("kv_retrieval", '"c1-b8".', ["c1-b8"], 1.0),
        ("kv_retrieval", "c1-b8x", ["c1-b8"], 0.0),
        ("longbook_choice_eng", "B", ["Patience", "B"], 1.0),
        ("longbook_choice_eng", "The answer is: Patience", ["Patience", "B"], 1.0),
        ("longbook_choice_eng", "Option C, surely", ["Patience", "B"], 0.0),  # the first A-D word decides
        ("longbook_choice_eng", "AB", ["Patience", "B"], 0.0),  # a leading letter decides
        ("code_debug", "B. merge_rows", ["merge_rows", "B"], 1.0),
        ("code_debug", "The answer is: merge_rows", ["merge_rows", "B"], 1.0),
        ("code_debug", "B", ["merge_rows", "B"], 0.0),  # neither "B." nor an answer prefix
        ("math_find", "99 is the largest", ["99"], 1.0),
        ("math_find", "99.5", ["99"], 0.0),  # an int answer, a decimal first number (InfiniteBench raises)
        ("math_find", "12.50", ["12.5"], 1.0),
        ("math_calc", "[3, 8, 6, 16, 9]", ["3", "8", "6", "16", "9"], 1.0),
        ("math_calc", "[3, 8, 7, 16, 9]", ["3", "8", "6", "16", "9"], 2 / 5),
        ("math_calc", "3, 8", ["3", "8", "6", "16", "9"], 2 / 5),
        ("math_calc", "-3, 8", ["-3", "8"], 0.0),  # the prediction's minus signs are lost
        ("code_run", "The value is 7.", ["7"], 1.0),
        ("code_run", "seven", ["7"], 0.0),
        ("longdialogue_qa_eng", "Margo, of course.", ["MARGO"], 1.0),
        ("longdialogue_qa_eng", "Dev", ["MARGO", "DEV"], 0.0),  # only the first name counts
        ("longbook_qa_eng", "flour", ["in flour"], 2 / 3),  # P = 1, R = 1/2
        ("longbook_qa_chn", "林阿姨。", ["林阿姨"], 1.0),
        ("longbook_qa_chn", "阿姨", ["林阿姨"], 0.8),  # characters: P = 1, R = 2/3
        ("longbook_sum_eng", "the cat sat", ["the cat ran"], 2 / 3),  # rougeLsum F
        ("longbook_sum_eng", "cats", ["cat"], 0.0),  # no stemming
    ],
)
def test_infinitebench_scores(task, prediction, answers, expected):
    assert score("infinitebench", prediction, answers, task=task)["score"] == pytest.approx(expected)


def test_infinitebench_needs_its_task():
    with pytest.raises(ValueError, match="task="):
        score("infinitebench", "1", ["1"])


def test_loogle_similarity_by_hand():
    # BLEU-1: 3/3 unigrams, brevity penalty exp(1 - 5/3); no 4-gram in a 3-word answer. ROUGE recall: 3/5, 2/4, 3/5
    s = score("loogle_similarity", "the film won", ["the film won an award"])
    assert s["bleu1"] == pytest.approx(math.exp(-2 / 3))
    assert s["bleu4"] == pytest.approx(0.0, abs=1e-12)
    assert (s["rouge1_recall"], s["rouge2_recall"], s["rougeL_recall"]) == pytest.approx(
        (3 / 5, 1 / 2, 3 / 5)
    )
    s = score("loogle_similarity", "the film won an award at", ["the film won an award"])
    assert (s["bleu1"], s["bleu4"]) == pytest.approx((5 / 6, 2 / 3))  # 5 of 6 unigrams, 2 of 3 4-grams
    empty = score("loogle_similarity", "", ["None at all"])  # scored as the text "None"
    assert empty["rouge1_recall"] == pytest.approx(1 / 3)


def test_loogle_cloze_by_hand():
    reference = [json.dumps({"<mask-0>": "Ana Lindqvist", "<mask-1>": "Piet Oram"})]
    assert score("loogle_cloze", "{'<mask-0>': 'Ana Lindqvist', '<mask-1>': 'Oram'}", reference) == {
        "exact_match": 0.5,
        "partial_match": 1.0,
    }
    assert score("loogle_cloze", "{'<mask-1>': 7}", reference) == {"exact_match": 0.0, "partial_match": 0.0}
    for not_a_dict in ("Ana Lindqvist", "['Ana']", "", "__import__('os')"):
        assert score("loogle_cloze", not_a_dict, reference) == {"exact_match": 0.0, "partial_match": 0.0}


def test_zero_scrolls_metrics_by_hand():
    s = score(
        "zero_scrolls_rouge", "the cat sat", ["the dog ran", "the cat ran"]
    )  # the best reference per key
    assert s == pytest.approx(
        {
            "rouge1": 2 / 3,
            "rouge2": 1 / 2,
            "rougeL": 2 / 3,
            "geometric_mean": (2 / 3 * 1 / 2 * 2 / 3) ** (1 / 3),
        }
    )
    assert score("zero_scrolls_f1", "his compass", ["his own compass"])["f1"] == pytest.approx(0.8)
    assert score("zero_scrolls_accuracy", "C", ["(C) the harbor master"]) == {"accuracy": 1.0}
    assert score("zero_scrolls_accuracy", "A is wrong, C", ["(C) the harbor master"]) == {"accuracy": 0.0}
    with pytest.raises(ValueError, match="no option letter"):
        score("zero_scrolls_accuracy", "C", ["the harbor master"])
    assert score("zero_scrolls_exp_similarity", "about 40%", ["60%"]) == {"exp_similarity": 0.25}
    assert score("zero_scrolls_exp_similarity", "most", ["60%"]) == {"exp_similarity": 0.0}
    assert score("zero_scrolls_exp_similarity", "5%", ["none"])["exp_similarity"] == pytest.approx(0.5**0.5)
    ci = "zero_scrolls_concordance_index"
    assert score(ci, "2, 3, 1", ["2, 3, 1"]) == {"concordance_index": 1.0}
    # gold 2 3 1, predicted 3 2 1: of the pairs (2,3) (2,1) (3,1) only the first is swapped
    assert score(ci, "Order: 3, 2, 1", ["2, 3, 1"])["concordance_index"] == pytest.approx(2 / 3)
    assert score(ci, "2, 3", ["2, 3, 1"]) == {"concordance_index": 0.0}  # not the same summaries
    assert score(ci, "1", ["1"]) == {"concordance_index": 1.0}


# ---- prompts -----------------------------------------------------------------------------------------------------
def test_longbench_v2_prompt_of_a_stand_in_row():
    (s,) = [s for s in load("longbench_v2", chat_template=False) if s.id == "kvexp-v2-icl"]
    glossary = (
        "Glossary of the invented Veldan language, written for this exercise.\n"
        "tavu: house. keru: boat. rena: red. sol: old. mira: small. lun: river.\n"
        "Adjectives follow the noun they describe: 'keru sol' means 'old boat' and 'lun mira' means 'small river'."
    )
    assert s.context == (
        "Please read the following text and answer the question below.\n\n<text>\n" + glossary
    )
    assert s.question == (
        "\n</text>\n\nWhat is the correct answer to this question: Using the glossary, what does 'tavu rena' mean?\n"
        "Choices:\n(A) small house\n(B) red river\n(C) old boat\n(D) red house\n\n"
        'Format your response as follows: "The correct answer is (insert answer here)".'
    )
    assert (s.answers, s.metric, s.max_new_tokens) == (["D"], "longbench_v2", 128)
    assert (s.meta["difficulty"], s.meta["length"], s.meta["domain"]) == (
        "hard",
        "short",
        "Long In-context Learning",
    )


def test_infinitebench_prompts_of_stand_in_rows():
    (find,) = load("infinitebench", subset="math_find")
    assert (
        find.context == "What is the largest number in the following list?\n\n[12, 87, 3, 45, 99, 21, 64, 8]"
    )
    assert find.question == (
        "\n\nYou should answer with only one number, no other words. The largest number of the list is: "
    )
    assert (find.answers, find.max_new_tokens, find.meta["task"]) == (["99"], 3, "math_find")
    (run,) = load("infinitebench", subset="code_run")
    code = stand_in("infinitebench/code_run.jsonl")["context"]
    assert run.context == f"There is a function called func_2 in the following Python code.\n\n{code}"
    assert run.question == "\n\nPlease compute the exact value of func_2(1). The value of func_2(1) is"
    (debug,) = load("infinitebench", subset="code_debug")
    assert debug.question.endswith(
        "Options:\nA. parse_header\nB. merge_rows\nC. count_words\nD. render_table\n\nThe correct option is:"
    )
    assert debug.answers == ["merge_rows", "B"]  # get_answer's [text, letter]
    (calc,) = load("infinitebench", subset="math_calc")
    assert calc.answers == ["3", "8", "6", "16", "9"]  # [[...]] unnested


@pytest.mark.parametrize("task", infinitebench.TASKS)
def test_infinitebench_context_and_question_make_the_prompt(task):
    (s,) = load("infinitebench", subset=task)
    row = stand_in(f"infinitebench/{task}.jsonl")
    assert s.context + s.question == infinitebench.PROMPTS[task].format(
        **infinitebench.prompt_fields(task, row)
    )
    assert s.context.endswith(row["context"]) and row["context"] not in s.question
    assert s.max_new_tokens == infinitebench.MAX_NEW_TOKENS[task] and s.metric == "infinitebench"


def test_loogle_cloze_prompt_of_a_stand_in_row():
    (s,) = load("loogle", subset="shortdep_cloze")
    document = stand_in("loogle/shortdep_cloze.jsonl")["context"]
    assert s.context == (
        "Please fill in the clozes based on the given long texts below. Each of the placeholder '<mask-n>' in the "
        "question could be an entity of Person, Location or Organiocation. The same masks represent the same entity. "
        "Output a json format answer, for example: {'<mask-0>': 'Bob', '<mask-1>': 'Gorrosion Magazine',"
        "'<mask-2>': 'Bethel Horizon'}\n" + document
    )
    assert s.question == (
        "\n Question: The documentary by <mask-0> follows <mask-1> through his final season on the ferry. "
        "What are the masked entities? \nAnswer:"
    )
    assert json.loads(s.answers[0]) == {"<mask-0>": "Ana Lindqvist", "<mask-1>": "Piet Oram"}
    assert (s.metric, s.max_new_tokens) == ("loogle_cloze", 50)


@pytest.mark.parametrize("task", loogle.TASKS)
def test_loogle_context_and_question_make_the_prompt(task):
    (s,) = load("loogle", subset=task)
    row = stand_in(f"loogle/{task}.jsonl")
    assert s.context + s.question == loogle.PROMPTS[task].format(input=row["context"], Q=row["question"])
    assert s.context.endswith(row["context"]) and s.max_new_tokens == loogle.MAX_NEW_TOKENS[task]


def test_zero_scrolls_prompts_of_a_stand_in_row():
    paper = (
        "Adaptive Lamps for Coastal Navigation\n\n1 Introduction\nWe study how the flash pattern of a coastal lamp "
        "affects how quickly sailors identify it at night. In a simulator study with 24 sailors, lamps whose patterns "
        "differ in rhythm rather than color were identified 30 percent faster. We propose a scheme that assigns "
        "rhythms so that neighboring lamps never share one."
    )
    (s,) = load("zero_scrolls", subset="qasper")
    assert s.context == (
        "Answer the question about the article below as briefly as you can.\n\nArticle:\n"
        + paper
        + "\n\nQuestion:\n"
    )
    assert s.question == "How many sailors took part in the simulator study?\n\nAnswer:"
    assert s.context + s.question == stand_in("zero_scrolls/qasper/validation.jsonl")["input"]
    assert (s.answers, s.metric, s.max_new_tokens) == (["24"], "zero_scrolls_f1", 128)
    # the chat-API prompt: the format request after the instruction, no answer cue, then the chat template
    tok = copy.deepcopy(tiny_tokenizer())
    tok.chat_template = "{% for m in messages %}<u>{{ m['content'] }}</u>{% endfor %}<a>"
    row = zero_scrolls.examples([stand_in("zero_scrolls/qasper/validation.jsonl")])[0]
    chat = zero_scrolls.build_sample("qasper", row, 0, tok, None, chat_template=True)
    assert chat.context == (
        "<u>Answer the question about the article below as briefly as you can. Do not provide any explanation."
        "\n\nArticle:\n" + paper + "\n\nQuestion:\n"
    )
    assert chat.question == "How many sailors took part in the simulator study?</u><a>"


def test_zero_scrolls_groups_the_references_of_one_example():
    (s,) = load("zero_scrolls", subset="narrative_qa")  # two stand-in rows share an id
    assert s.answers == ["his compass", "his own compass"]
    assert score(s.metric, "his own compass", s.answers)["f1"] == 1.0


# ---- truncation --------------------------------------------------------------------------------------------------
def test_middle_truncation_decoded_jointly_keeps_both_ends():
    # byte tokens: <bos> + one per byte; 20 kept of 2 + 40 + 2 + 1: <bos> + 9 bytes, then the last 10 bytes
    tok = tiny_tokenizer()
    context, question = "h:" + "c" * 40, "q?"
    got = long_context.middle_truncate(context, question, tok, 20, decode_jointly=True)
    assert got == ("h:" + "c" * 7 + "c" * 8, "q?", 45)
    assert long_context.middle_truncate(context, question, tok, 45, decode_jointly=True) == (
        context,
        question,
        45,
    )


def test_zero_scrolls_keeps_the_beginning_and_marks_the_cut():
    tok = tiny_tokenizer()
    context, question = "Read.\n\n" + "d" * 60 + "\n\nQuestion:\n", "Why?\n\nAnswer:"
    got = zero_scrolls.keep_beginning(context, question, tok, 40, separator=" [cut] ")
    # 40 tokens: the separator and the question take 7 + 13; <bos> and the first 19 bytes stay
    assert got == (context[:19] + " [cut] ", question, 1 + len(context) + len(question))
    with pytest.raises(ValueError, match="dataset.max_length"):
        zero_scrolls.keep_beginning(context, question, tok, 20, separator=" [cut] ")


def test_a_limit_that_leaves_no_room_names_the_options():
    with pytest.raises(ValueError, match="dataset.max_length"):
        long_context.prompt_limit(cfg("infinitebench", subset="math_calc"), 2048, 30000)
    assert long_context.prompt_limit(cfg("infinitebench", max_length=1000), 2048, 30000) == 1000


# ---- config checks -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", MODULES)
def test_bad_options_fail_in_check(name, tmp_path):
    check = DATASETS[name].check
    with pytest.raises(ValueError, match=r"dataset\.subset='nope'.*allowed values"):
        check(cfg(name, subset="nope"))
    with pytest.raises(ValueError, match=r"dataset\.max_length"):
        check(cfg(name, max_length=1))
    with pytest.raises(ValueError, match=r"dataset\.path"):
        check(cfg(name, path=str(tmp_path / "missing.jsonl")))
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"not json\n', encoding="utf-8")
    with pytest.raises(ValueError, match="not valid JSON.*JSONL"):
        check(cfg(name, path=str(broken)))
    with pytest.raises(ValueError, match="lacks"):
        check(cfg(name, path=str(write_jsonl(tmp_path / "empty_row.jsonl", [{"id": "x", "output": "o"}]))))


def test_bad_splits_fail_in_check():
    with pytest.raises(ValueError, match=r"dataset\.split='validation'.*'test'"):
        DATASETS["infinitebench"].check(cfg("infinitebench", split="validation"))
    with pytest.raises(ValueError, match=r"dataset\.split='train'"):
        DATASETS["loogle"].check(cfg("loogle", split="train"))
    with pytest.raises(ValueError, match="test outputs are private"):
        DATASETS["zero_scrolls"].check(cfg("zero_scrolls", split="test[:5]"))
    with pytest.raises(ValueError, match=r"dataset\.split='test'.*'train'"):
        DATASETS["longbench_v2"].check(cfg("longbench_v2", split="test"))


# ---- local files and hub files in the benchmarks' schemas -------------------------------------------------------
def v2_row(i: int, domain: str) -> dict:
    return {
        "_id": f"q{i}", "domain": domain, "sub_domain": "s", "difficulty": "easy", "length": "short", "question": f"Q{i}?",
        "choice_A": "a", "choice_B": "b", "choice_C": "c", "choice_D": "d", "answer": "A", "context": f" doc {i} ",
    }  # fmt: skip


def test_longbench_v2_data_json_domain_and_split(tmp_path):
    rows = [v2_row(0, "Multi-Document QA"), v2_row(1, "Single-Document QA"), v2_row(2, "Single-Document QA")]
    (tmp_path / "data.json").write_text(json.dumps(rows), encoding="utf-8")
    samples = load("longbench_v2", path=str(tmp_path), chat_template=False)  # a folder holding data.json
    assert [s.id for s in samples] == ["q0", "q1", "q2"]
    assert samples[0].context.endswith("<text>\ndoc 0")  # fields stripped, as pred.py does
    domain = load(
        "longbench_v2",
        path=str(tmp_path),
        subset="Single-Document QA",
        split="train[1:]",
        chat_template=False,
    )
    assert [s.id for s in domain] == ["q2"]
    with pytest.raises(ValueError, match="no LongBench-v2 rows"):
        DATASETS["longbench_v2"].check(
            cfg("longbench_v2", path=str(tmp_path), subset="Code Repository Understanding")
        )


def test_infinitebench_local_file_with_typed_answers(tmp_path, monkeypatch):
    rows = [
        {
            "id": 7,
            "context": "[1, 2]",
            "input": "The smallest number of the list is: ",
            "answer": 1,
            "options": [],
        },
        {"id": 8, "context": "[3, 4]", "input": "The median of the list is: ", "answer": 3.5, "options": []},
    ]
    write_jsonl(tmp_path / "infinitebench" / "math_find.jsonl", rows)
    monkeypatch.setenv("KVEXP_DATA_DIR", str(tmp_path))  # dataset.local_file: infinitebench/{task}.jsonl
    samples = load("infinitebench", subset="math_find", split="test[1:]")
    assert [(s.id, s.answers) for s in samples] == [("8", ["3.5"])]
    assert samples[0].context == "What is the median in the following list?\n\n[3, 4]"
    assert score(samples[0].metric, "3.5", samples[0].answers, **samples[0].meta)["score"] == 1.0
    choice = {"id": 0, "context": "c", "input": "q", "options": ["w", "x", "y", "z"], "answer": "y"}
    path = write_jsonl(tmp_path / "own.jsonl", [choice])
    (s,) = load("infinitebench", subset="longbook_choice_eng", path=str(path))
    assert s.answers == ["y", "C"]
    with pytest.raises(ValueError, match="is not an option"):
        load(
            "infinitebench",
            subset="longbook_choice_eng",
            path=str(write_jsonl(path, [{**choice, "answer": "v"}])),
        )


def test_loogle_first_release_schema(tmp_path):
    """The repository's LooGLE-testdata/ rows: a document with its qa_pairs as a Python literal."""
    pairs = [
        {"Q": "Who?", "A": "Ana", "S": ["s"]},
        {"Q": "Where?", "A": "Vesk", "S": ["t"], "type": "computation"},
    ]
    row = {"input": "Some document.", "title": "Doc", "qa_pairs": str(pairs), "output": "none"}
    samples = load("loogle", subset="longdep_qa", path=str(write_jsonl(tmp_path / "longdep_qa.jsonl", [row])))
    assert [(s.id, s.answers, s.meta["type"]) for s in samples] == [
        ("Doc-0", ["Ana"], None),
        ("Doc-1", ["Vesk"], "computation"),
    ]
    assert samples[1].question == "\nQuestion: Where?\nAnswer: "
    summary = {"input": "A paper.", "title": "2201.0", "qa_pairs": "none", "output": "Its abstract."}
    (s,) = load(
        "loogle", subset="longdep_summarization", path=str(write_jsonl(tmp_path / "s.jsonl", [summary]))
    )
    assert (s.id, s.answers, s.question) == ("2201.0", ["Its abstract."], "\n Summarization: ")
    cloze = {
        "input": "Doc.",
        "title": "T",
        "qa_pairs": str([{"Q": "<mask-0> ran.", "A": {"<mask-0>": "Ana"}}]),
    }
    (s,) = load("loogle", subset="shortdep_cloze", path=str(write_jsonl(tmp_path / "c.jsonl", [cloze])))
    assert json.loads(s.answers[0]) == {"<mask-0>": "Ana"}


def zs_row(id_: str, output: str) -> dict:
    text = "Do it.\n\nStory:\nThe story.\n\nQuestion:\nWhat?\n\nAnswer:"
    start = text.index("What?")
    return {
        "id": id_, "pid": "p", "input": text, "output": output, "document_start_index": 15, "document_end_index": 25,
        "query_start_index": start, "query_end_index": start + 5, "truncation_seperator": "\n\n[cut]\n\n",
    }  # fmt: skip


def test_zero_scrolls_folder_of_unpacked_archives(tmp_path):
    write_jsonl(
        tmp_path / "musique" / "validation.jsonl", [zs_row("a", "x"), zs_row("a", "y"), zs_row("b", "z")]
    )
    samples = load("zero_scrolls", subset="musique", path=str(tmp_path))
    assert [(s.id, s.answers) for s in samples] == [("a", ["x", "y"]), ("b", ["z"])]
    assert samples[0].question == "What?\n\nAnswer:"
    assert [
        s.id for s in load("zero_scrolls", subset="musique", path=str(tmp_path), split="validation[1:]")
    ] == ["b"]
    with pytest.raises(ValueError, match="no output"):
        load(
            "zero_scrolls",
            subset="musique",
            path=str(write_jsonl(tmp_path / "t.jsonl", [{**zs_row("c", ""), "output": None}])),
        )


def test_hub_files(tmp_path, monkeypatch):
    """The hub readers, with the downloads replaced by local files (nothing leaves the machine)."""
    monkeypatch.setattr(data_module, "hub_reachable", lambda: True)
    archive = tmp_path / "musique.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("musique/validation.jsonl", json.dumps(zs_row("h", "x")) + "\n")
        z.writestr("musique/test.jsonl", json.dumps(zs_row("t", "")) + "\n")
    task_file = write_jsonl(
        tmp_path / "passkey.jsonl", [{"id": 3, "context": "c", "input": "i", "answer": ["5"]}]
    )
    calls = []

    def download(repo_id, filename, repo_type, token):
        calls.append((repo_id, filename))
        return str({"musique.zip": archive, "passkey.jsonl": task_file}[filename])

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    assert [s.id for s in load("zero_scrolls", subset="musique")] == ["h"]
    assert [s.id for s in load("infinitebench")] == ["3"]
    assert calls == [("tau/zero_scrolls", "musique.zip"), ("xinrongzhang2022/InfiniteBench", "passkey.jsonl")]

    import datasets

    asked = []
    loogle_row = {"id": "r", "context": "c", "question": "q", "answer": "a"}
    monkeypatch.setattr(
        datasets, "load_dataset", lambda *a, **k: asked.append((a, k["split"])) or [loogle_row]
    )
    load("loogle", subset="longdep_summarization")
    assert asked == [(("bigainlco/LooGLE", "summarization"), "test")]  # the hub's config of the task
    monkeypatch.setattr(
        datasets, "load_dataset", lambda *a, **k: asked.append((a, k["split"])) or [v2_row(0, "x")]
    )
    load("longbench_v2", chat_template=False)
    assert asked[-1] == (("THUDM/LongBench-v2", None), "train")


# ---- the stand-ins and the app -------------------------------------------------------------------------------
@pytest.mark.parametrize("name", MODULES)
def test_every_task_runs_on_its_stand_in(name, caplog):
    tasks = [None] if name == "longbench_v2" else MODULES[name].TASKS
    with caplog.at_level("WARNING", logger="kvexp.tasks.data"):
        for task in tasks:
            samples = load(name, subset=task, chat_template=False)
            assert samples and all(s.answers and s.context and s.question for s in samples), task
            for s in samples:  # each reference scores as a prediction of itself
                gold = (
                    s.answers[0] if s.metric != "longbench_v2" else f"The correct answer is ({s.answers[0]})"
                )
                gold = (
                    "B. merge_rows"
                    if task == "code_debug"
                    else " ".join(s.answers)
                    if task == "math_calc"
                    else gold
                )
                assert next(iter(score(s.metric, gold, s.answers, **s.meta).values())) == pytest.approx(
                    1.0
                ), task
    assert any("embedded stand-in" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(
    "name,overrides,metric",
    [
        ("longbench_v2", ["dataset.chat_template=false", "eval.max_samples=2"], "longbench_v2"),
        ("infinitebench", ["dataset.subset=kv_retrieval"], "infinitebench"),
        ("loogle", ["dataset.subset=shortdep_cloze"], "loogle_cloze"),
        ("zero_scrolls", ["dataset.subset=narrative_qa"], "zero_scrolls_f1"),
    ],
)
def test_runs_end_to_end_through_train_or_eval(name, overrides, metric, tmp_path):
    """Each benchmark is a generation dataset of the app: loaded, answered with the compressed and the full cache,
    scored with its own metric and written to summary.json."""
    from kvexp.app import train_or_eval
    from tests.test_config import _compose

    config = _compose(
        "model=tiny_llama", f"dataset={name}", *overrides, "method=streaming_llm", "budget=32",
        "eval.max_new_tokens=3", "cache_dir=null",
    )  # fmt: skip
    summary = train_or_eval(config, tmp_path / "out")
    assert summary["task"] == "generation" and summary["dataset"] == name
    assert metric in summary["metrics_after"] and metric in summary["metrics_before"]
    if name == "longbench_v2":
        assert set(summary["metrics_after"]["by"]) == {"difficulty", "length", "difficulty/length"}
    assert (tmp_path / "out" / "samples.csv").exists()
