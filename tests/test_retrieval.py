"""Task datasets on fixtures: pass key and needle prompts (depth, length, variants), qa_jsonl, summarization."""

import json
import re

import pytest
from omegaconf import OmegaConf

from kvexp.data import HAYSTACK_BOOK
from kvexp.tasks.data import locate
from kvexp.tasks.generation import PromptEncoder, generate_answer
from kvexp.tasks.qa import check_qa_jsonl, qa_jsonl_samples
from kvexp.tasks.retrieval import NOISE, check_retrieval, retrieval_samples
from kvexp.tasks.summarization import check_summarization, summarization_samples
from tests.conftest import DATA_DIR, ROOT, load

SENTENCES = " ".join(f"Sentence number {i} talks about topic {i % 7}." for i in range(400))


def _dataset(name: str, tmp_path=None, **overrides):
    """conf/dataset/<name>.yaml with the schema defaults it relies on, plus overrides."""
    node = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "dataset" / f"{name}.yaml"))
    node.pop("defaults", None)
    if tmp_path is not None and name in ("passkey", "needle"):
        haystack = tmp_path / "haystack.json"
        haystack.write_text(json.dumps({"text": SENTENCES}))
        node["path"] = str(haystack)
    return {**node, **overrides}


def _encoder(max_context=4096):
    return PromptEncoder(load("tiny_llama")[1], max_context=max_context)


def _haystack_share_before(sample, needle: str) -> float:
    """The fraction of the haystack (context after the intro line) that precedes `needle`."""
    body = sample.context.split("\n", 1)[1]
    return body.index(needle) / (len(body) - len(needle))


def test_passkey_hides_one_key_at_each_depth_in_prompts_of_each_length(tmp_path):
    dataset = _dataset("passkey", tmp_path, lengths=[800, 1600], depths=[0.0, 0.5, 1.0])
    encoder = _encoder()
    samples = retrieval_samples(dataset, encoder, None, seed=0)
    assert [(s.meta["length"], s.meta["depth"]) for s in samples] == [
        (n, d) for n in (800, 1600) for d in (0.0, 0.5, 1.0)
    ]
    for s in samples:
        (key,) = s.answers
        assert re.fullmatch(r"\d{5}", key)
        needle = f"The pass key is {key}. Remember it. {key} is the pass key."
        assert s.context.count(needle) == 1 and s.context.startswith("There is an important info")
        assert (s.question, s.answer_prefix, s.metric, s.stop) == (
            "What is the pass key?",
            "The pass key is",
            "qa",
            ["\n"],
        )
        # The prompt plus the answer fill the length (RULER's rule), give or take a re-tokenized cut.
        prompt = encoder.encode(s)
        total = prompt.context.shape[1] + prompt.question.shape[1] + s.max_new_tokens
        assert s.meta["length"] - 4 <= total == s.meta["tokens"] <= s.meta["length"]
        assert _haystack_share_before(s, needle) == pytest.approx(s.meta["depth"], abs=0.1)
    assert samples[0].context.split("\n")[1].startswith("The pass key is")  # depth 0: first in the haystack
    assert samples[2].context.rstrip("\n").endswith("is the pass key.")  # depth 1: last
    assert len({s.answers[0] for s in samples}) == len(samples)


def test_retrieval_samples_are_seeded(tmp_path):
    dataset = _dataset("passkey", tmp_path, lengths=[800], depths=[0.5], repeats=3)
    encoder = _encoder()
    first = retrieval_samples(dataset, encoder, None, seed=0)
    assert [s.context for s in first] == [
        s.context for s in retrieval_samples(dataset, encoder, None, seed=0)
    ]
    assert first[0].answers != retrieval_samples(dataset, encoder, None, seed=1)[0].answers
    assert len(first) == 3 and len({s.context for s in first}) == 3
    assert len(retrieval_samples(dataset, encoder, 2, seed=0)) == 2  # eval.max_samples


@pytest.mark.parametrize(
    "variant,needles,answers,metric",
    [
        ("single", 1, 1, "qa"),
        ("multi_key", 3, 1, "qa"),
        ("multi_value", 3, 3, "qa_all"),
        ("multi_query", 3, 3, "qa_all"),
    ],
)
def test_needle_variants(tmp_path, variant, needles, answers, metric):
    dataset = _dataset(
        "needle",
        tmp_path,
        lengths=[1200],
        depths=[0.25],
        variant=variant,
        num_keys=3,
        num_values=3,
        num_queries=3,
    )
    (s,) = retrieval_samples(dataset, _encoder(), None, seed=0)
    found = re.findall(r"The pass key for ([a-z]+-[a-z]+) is (\d{7})\. Remember it\.", s.context)
    assert len(found) == needles and len(s.answers) == answers and s.metric == metric
    asked = {k for k, v in found if v in s.answers}
    assert len(asked) == (3 if variant == "multi_query" else 1)
    assert all(k in s.question and k in s.answer_prefix for k in asked)
    if variant == "multi_key":
        assert len({k for k, _ in found}) == 3  # distractor keys
    # The first asked value sits at the controlled depth.
    needle = f"The pass key for {found[[v for _, v in found].index(s.answers[0])][0]} is {s.answers[0]}."
    assert _haystack_share_before(s, needle) == pytest.approx(0.25, abs=0.1)


def test_ruler_phrasing_and_noise_haystack():
    dataset = _dataset("needle", None, lengths=[1200], depths=[0.5], phrasing="ruler", haystack="repeat")
    check_retrieval(dataset)
    (s,) = retrieval_samples(dataset, _encoder(), None, seed=0)
    assert s.context.startswith("Some special magic numbers are hidden within the following text.")
    (key,) = re.findall(r"One of the special magic numbers for ([a-z]+-[a-z]+) is: (\d{7})\.", s.context)
    assert s.answers == [key[1]]
    assert (
        s.question == f"What are all the special magic numbers for {key[0]} mentioned in the provided text?"
    )
    assert s.answer_prefix == f"The special magic numbers for {key[0]} mentioned in the provided text are"
    assert NOISE in s.context


def test_a_text_dataset_can_be_the_haystack():
    dataset = _dataset("passkey", None, lengths=[800], depths=[0.5], haystack="wikitext2")
    (s,) = retrieval_samples(dataset, _encoder(), None, seed=0)
    assert "Robert Boulter" in s.context or " @-@ " in s.context  # WikiText-2's test text


@pytest.mark.parametrize(
    "overrides,match",
    [
        ({"depths": [1.5]}, "dataset.depths"),
        ({"lengths": []}, "dataset.lengths"),
        ({"phrasing": "poetic"}, "dataset.phrasing"),
        ({"variant": "multi_everything"}, "dataset.variant"),
        ({"haystack": "nope"}, "dataset.haystack"),
        (
            {"haystack": "essays", "local_file": "no/such.json"},
            r"no data found.*no/such\.json.*KVEXP_DATA_DIR",
        ),
        ({"haystack": "repeat", "path": "/no/such.json"}, "dataset.path is a haystack file"),
        ({"haystack": "book", "path": "/no/such.json"}, r"dataset\.path='/no/such\.json' does not exist"),
    ],
)
def test_bad_retrieval_options_name_the_option(overrides, match):
    with pytest.raises(ValueError, match=match):
        check_retrieval(_dataset("needle", None, **overrides))


def test_default_haystack_is_the_embedded_book(caplog):
    """No dataset.path and no $KVEXP_DATA_DIR: the haystack is the public-domain novel shipped with kvexp."""
    book = " ".join(HAYSTACK_BOOK.path.read_text(encoding="utf-8").split())
    dataset = _dataset("passkey", None, lengths=[512], depths=[0.5])
    check_retrieval(dataset)
    with caplog.at_level("INFO", logger="kvexp.tasks.retrieval"):
        (sample,) = retrieval_samples(dataset, _encoder(), None, 0)
    assert any("The Man Who Was Thursday" in r.getMessage() for r in caplog.records)
    body = sample.context.split("\n", 1)[1]
    before_needle = body[: body.index("The pass key is")].split()
    assert len(before_needle) > 40 and " ".join(before_needle[5:25]) in book


@pytest.mark.data
def test_essays_haystack_from_the_local_data(monkeypatch):
    """dataset.haystack=essays reads RULER's essays from $KVEXP_DATA_DIR (the haystack of the pass-key results)."""
    monkeypatch.setenv("KVEXP_DATA_DIR", str(DATA_DIR))
    essays = json.loads((DATA_DIR / "haystack" / "paul_graham_essays.json").read_text(encoding="utf-8"))[
        "text"
    ]
    dataset = _dataset("passkey", None, haystack="essays", lengths=[512], depths=[0.0])
    check_retrieval(dataset)
    (sample,) = retrieval_samples(dataset, _encoder(), None, 0)
    words = sample.context.split("\n", 1)[1].split()
    assert " ".join(words[30:50]) in " ".join(essays.split())


@pytest.mark.data
@pytest.mark.parametrize("name", ["cnn_dailymail", "xsum"])
def test_real_summarization_data_from_the_data_dir(name, monkeypatch):
    monkeypatch.setenv("KVEXP_DATA_DIR", str(DATA_DIR))
    dataset = _dataset(name, split="test[:100]")
    assert locate(dataset).path == DATA_DIR / dataset["local_file"]
    samples = summarization_samples(dataset, _encoder(), None, 0)
    assert len(samples) == 100 and len({s.context for s in samples}) == 100
    assert sum(len(s.context) for s in samples) / 100 > 1000  # real articles, not the short stand-in


def test_lengths_beyond_the_model_context_or_too_short_for_the_prompt_fail(tmp_path):
    with pytest.raises(ValueError, match="model.max_context"):
        retrieval_samples(_dataset("passkey", tmp_path, lengths=[800, 9000]), _encoder(2048), None, 0)
    with pytest.raises(ValueError, match="less than a quarter of the prompt for the haystack"):
        retrieval_samples(_dataset("passkey", tmp_path, lengths=[300]), _encoder(), None, 0)


QA_ROWS = [
    {"context": "Paris is the capital of France.", "question": "Q: capital of France?", "answer": "Paris"},
    {
        "context": "2 + 2 = 4.",
        "question": "What is 2 + 2?",
        "answer": ["4", "four"],
        "answer_prefix": "=",
        "id": "m",
    },
]


@pytest.fixture
def qa_file(tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in QA_ROWS) + "\n")
    return path


def test_qa_jsonl_rows_become_samples(qa_file):
    dataset = _dataset("qa_jsonl", None, path=str(qa_file))
    check_qa_jsonl(dataset)
    first, second = qa_jsonl_samples(dataset, _encoder(), None, 0)
    assert (first.id, first.context, first.question, first.answers) == (
        "0",
        *[QA_ROWS[0][k] for k in ("context", "question")],
        ["Paris"],
    )
    assert first.answer_prefix == "Answer:" and first.metric == "qa" and first.stop == ["\n"]
    assert (second.id, second.answers, second.answer_prefix) == ("m", ["4", "four"], "=")
    assert [s.id for s in qa_jsonl_samples({**dataset, "split": "test[1:]"}, _encoder(), None, 0)] == ["m"]


def test_qa_jsonl_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="dataset.path"):
        check_qa_jsonl(_dataset("qa_jsonl", None, path="/no/such/qa.jsonl"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"context": "c", "question": "q"}) + "\n")
    with pytest.raises(ValueError, match=r"row 0 has no field\(s\) \['answer'\]"):
        qa_jsonl_samples(_dataset("qa_jsonl", None, path=str(bad)), _encoder(), None, 0)


def test_qa_jsonl_answer_found_by_the_runner_is_scored(qa_file):
    """The runner's text goes through the qa metric: a model that cannot answer scores 0 on a real row."""
    model, tok = load("tiny_llama")
    (sample, _) = qa_jsonl_samples(_dataset("qa_jsonl", None, path=str(qa_file)), _encoder(), None, 0)
    result = generate_answer(model, tok, PromptEncoder(tok).encode(sample), "full", None, max_new_tokens=4)
    assert "Paris" not in result.prediction  # a random model; the metric path is what is tested here


@pytest.mark.parametrize(
    "name,row",
    [
        (
            "cnn_dailymail",
            {"article": " (CNN) A long story.  ", "highlights": "First point .\nSecond point ."},
        ),
        ("xsum", {"document": "A BBC story.", "summary": "One sentence. Really.", "id": "123"}),
    ],
)
def test_summarization_prompts_and_references(tmp_path, name, row):
    path = tmp_path / f"{name}.jsonl"
    path.write_text("\n".join(json.dumps(row) for _ in range(3)) + "\n")
    dataset = _dataset(name, None, path=str(path), split="test[:2]")
    check_summarization(dataset)
    samples = summarization_samples(dataset, _encoder(), None, 0)
    assert len(samples) == 2
    s = samples[0]
    article = row[dataset["text_field"]].strip()
    assert s.context == f"Article: {article}\n" and s.answer_prefix == "Summary:" and s.metric == "rouge"
    assert s.question == dataset["instruction"] and s.max_new_tokens == dataset["max_new_tokens"]
    assert s.answers == [
        row[dataset["summary_field"]].replace(" Really", "\nReally")
    ]  # one sentence per line
    assert s.id == row.get("id", "0")


def test_local_summarization_data_matches_its_schema():
    """The shipped CNN/DailyMail and XSum files load with the default configs (first rows only)."""
    for name in ("cnn_dailymail", "xsum"):
        samples = summarization_samples(_dataset(name), _encoder(), 2, 0)
        assert len(samples) == 2 and all(s.context.startswith("Article: ") and s.answers[0] for s in samples)


@pytest.mark.slow
def test_smollm2_full_cache_finds_the_pass_key_at_1k(smollm2):
    model, tok = smollm2
    # The default haystack (the embedded novel), seed 0, 8 depths at 1k and 2k: the samples at depths 0 and 1/7.
    dataset = _dataset("passkey", None, lengths=[1024, 2048], depths=[round(i / 7, 3) for i in range(8)])
    samples = retrieval_samples(dataset, PromptEncoder(tok, max_context=8192), 2, seed=0)
    for sample in samples:
        result = generate_answer(
            model, tok, PromptEncoder(tok).encode(sample), "full", None, max_new_tokens=8, stop=sample.stop
        )
        assert sample.answers[0] in result.prediction, (sample.id, result.prediction)
