"""LongBench loaders, prompts, truncation and scoring on fixtures written here in LongBench's schema.

The data is not on this machine (and the hub is not reachable), so every one of the 16 English tasks gets a
one-row JSONL fixture; the expected prompts are LongBench's `dataset2prompt.json` templates written out by
hand with the fixture's context and input filled in.
"""

from __future__ import annotations

import copy
import json
import zipfile
from pathlib import Path

import pytest
import yaml

from kvexp.models import tiny_tokenizer
from kvexp.tasks import data as data_module
from kvexp.tasks import longbench
from kvexp.tasks.long_context import middle_truncate
from kvexp.tasks.longbench import (
    MAX_NEW_TOKENS,
    TASKS,
    build_sample,
    check_longbench,
    load_longbench,
    prompt_limit,
    read_archive,
)
from kvexp.tasks.metrics import score

CONF = Path(__file__).parents[1] / "conf" / "dataset" / "longbench.yaml"
C, Q = "<CTX>", "<INP>"  # the fixture's context and input

# The prompt of each task for context <CTX> and input <INP>, and where the context part ends.
PROMPTS = {
    "narrativeqa": "You are given a story, which can be either a novel or a movie script, and a question. Answer the question asconcisely as you can, using a single phrase if possible. Do not provide any explanation.\n\nStory: <CTX>\n\nNow, answer the question based on the story asconcisely as you can, using a single phrase if possible. Do not provide any explanation.\n\nQuestion: <INP>\n\nAnswer:",
    "qasper": 'You are given a scientific article and a question. Answer the question as concisely as you can, using a single phrase or sentence if possible. If the question cannot be answered based on the information in the article, write "unanswerable". If the question is a yes/no question, answer "yes", "no", or "unanswerable". Do not provide any explanation.\n\nArticle: <CTX>\n\n Answer the question based on the above article as concisely as you can, using a single phrase or sentence if possible. If the question cannot be answered based on the information in the article, write "unanswerable". If the question is a yes/no question, answer "yes", "no", or "unanswerable". Do not provide any explanation.\n\nQuestion: <INP>\n\nAnswer:',
    "multifieldqa_en": "Read the following text and answer briefly.\n\n<CTX>\n\nNow, answer the following question based on the above text, only give me the answer and do not output any other words.\n\nQuestion: <INP>\nAnswer:",
    "hotpotqa": "Answer the question based on the given passages. Only give me the answer and do not output any other words.\n\nThe following are given passages.\n<CTX>\n\nAnswer the question based on the given passages. Only give me the answer and do not output any other words.\n\nQuestion: <INP>\nAnswer:",
    "2wikimqa": "Answer the question based on the given passages. Only give me the answer and do not output any other words.\n\nThe following are given passages.\n<CTX>\n\nAnswer the question based on the given passages. Only give me the answer and do not output any other words.\n\nQuestion: <INP>\nAnswer:",
    "musique": "Answer the question based on the given passages. Only give me the answer and do not output any other words.\n\nThe following are given passages.\n<CTX>\n\nAnswer the question based on the given passages. Only give me the answer and do not output any other words.\n\nQuestion: <INP>\nAnswer:",
    "gov_report": "You are given a report by a government agency. Write a one-page summary of the report.\n\nReport:\n<CTX>\n\nNow, write a one-page summary of the report.\n\nSummary:",
    "qmsum": "You are given a meeting transcript and a query containing a question or instruction. Answer the query in one or more sentences.\n\nTranscript:\n<CTX>\n\nNow, answer the query based on the above meeting transcript in one or more sentences.\n\nQuery: <INP>\nAnswer:",
    "multi_news": "You are given several news passages. Write a one-page summary of all news. \n\nNews:\n<CTX>\n\nNow, write a one-page summary of all the news.\n\nSummary:",
    "trec": "Please determine the type of the question below. Here are some examples of questions.\n\n<CTX>\n<INP>",
    "triviaqa": "Answer the question based on the given passage. Only give me the answer and do not output any other words. The following are some examples.\n\n<CTX>\n\n<INP>",
    "samsum": "Summarize the dialogue into a few short sentences. The following are some examples.\n\n<CTX>\n\n<INP>",
    "passage_count": "There are some paragraphs below sourced from Wikipedia. Some of them may be duplicates. Please carefully read these paragraphs and determine how many unique paragraphs there are after removing duplicates. In other words, how many non-repeating paragraphs are there in total?\n\n<CTX>\n\nPlease enter the final count of unique paragraphs after removing duplicates. The output format should only contain the number, such as 1, 2, 3, and so on.\n\nThe final answer is: ",
    "passage_retrieval_en": 'Here are 30 paragraphs from Wikipedia, along with an abstract. Please determine which paragraph the abstract is from.\n\n<CTX>\n\nThe following is an abstract.\n\n<INP>\n\nPlease enter the number of the paragraph that the abstract is from. The answer format must be like "Paragraph 1", "Paragraph 2", etc.\n\nThe answer is: ',
    "lcc": "Please complete the code given below. \n<CTX>Next line of code:\n",
    "repobench-p": "Please complete the code given below. \n<CTX><INP>Next line of code:\n",
}
# dataset2maxlen.json and eval.py's dataset2metric, written out per task
GEN_METRIC = {
    "narrativeqa": (128, "longbench_qa_f1"),
    "qasper": (128, "longbench_qa_f1"),
    "multifieldqa_en": (64, "longbench_qa_f1"),
    "hotpotqa": (32, "longbench_qa_f1"),
    "2wikimqa": (32, "longbench_qa_f1"),
    "musique": (32, "longbench_qa_f1"),
    "gov_report": (512, "longbench_rouge"),
    "qmsum": (512, "longbench_rouge"),
    "multi_news": (512, "longbench_rouge"),
    "trec": (64, "longbench_classification"),
    "triviaqa": (32, "longbench_qa_f1"),
    "samsum": (128, "longbench_rouge"),
    "passage_count": (32, "longbench_count"),
    "passage_retrieval_en": (32, "longbench_retrieval"),
    "lcc": (64, "longbench_code_sim"),
    "repobench-p": (64, "longbench_code_sim"),
}
# a gold answer per task and a wrong prediction that scores 0 against it
ANSWERS = {
    "trec": ("Other location", "Date"),
    "passage_count": ("7", "8"),
    "passage_retrieval_en": ("Paragraph 3", "Paragraph 4"),
    "lcc": ("    return self.x", "zzzzzzzzzzzzzzzzzzzz"),
    "repobench-p": ("self.assertEqual(a, b)", "~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~"),
}
TREC_CLASSES = ["City", "Other location", "Date", "Other number"]


def row(task: str, i: int = 0, context: str = C, input: str = Q) -> dict:
    """One row in LongBench's schema."""
    return {
        "input": input if "{input}" in longbench.PROMPTS[task] else "",
        "context": context,
        "answers": [ANSWERS.get(task, ("the gold answer", "nothing"))[0]],
        "length": 1234 + i,
        "dataset": task,
        "language": "en",
        "all_classes": TREC_CLASSES if task == "trec" else None,
        "_id": f"{task}-id-{i}",
    }


def write(folder: Path, task: str, rows: list[dict]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{task}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def cfg(**overrides) -> dict:
    return {**yaml.safe_load(CONF.read_text()), **overrides}


@pytest.fixture
def fixtures(tmp_path, monkeypatch) -> Path:
    """A folder with one <task>.jsonl per task (as LongBench's data.zip unpacks); no $KVEXP_DATA_DIR."""
    monkeypatch.delenv("KVEXP_DATA_DIR", raising=False)
    for task in TASKS:
        write(tmp_path / "data", task, [row(task, i) for i in range(3)])
    return tmp_path / "data"


def test_the_sixteen_english_tasks():
    assert set(TASKS) == set(PROMPTS) == set(GEN_METRIC)
    assert len(TASKS) == 16


@pytest.mark.parametrize("task", sorted(PROMPTS))
def test_every_task_loads_with_the_official_prompt(fixtures, task):
    samples = load_longbench(cfg(subset=task, path=str(fixtures)), tiny_tokenizer(), max_length=None)
    assert len(samples) == 3
    s = samples[0]
    assert s.context + s.question == PROMPTS[task]
    # the context part ends with the context; the question part is everything after it
    assert s.context.endswith(C)
    assert s.question == PROMPTS[task].split(C, 1)[1]
    assert (s.max_new_tokens, s.metric) == GEN_METRIC[task]
    assert s.id == f"{task}-id-0"
    assert s.answers == [ANSWERS.get(task, ("the gold answer",))[0]]
    assert s.answer_prefix == ""
    assert s.meta["task"] == task and s.meta["length"] == 1234
    assert s.meta["first_line"] == (task in {"trec", "triviaqa", "samsum"})
    assert s.meta["all_classes"] == (TREC_CLASSES if task == "trec" else None)
    assert s.meta["truncated"] is False


@pytest.mark.parametrize("task", sorted(PROMPTS))
def test_every_task_scores_its_gold_answer_1_and_a_wrong_one_0(fixtures, task):
    (s,) = load_longbench(cfg(subset=task, path=str(fixtures)), tiny_tokenizer(), None, max_samples=1)
    gold, wrong = ANSWERS.get(task, ("the gold answer", "nothing"))
    assert score(s.metric, gold, s.answers, **s.meta)["score"] == pytest.approx(1.0, abs=1e-7)
    assert score(s.metric, wrong, s.answers, **s.meta) == {"score": 0.0}


def test_first_line_post_processing_reaches_the_scorer(fixtures):
    (s,) = load_longbench(cfg(subset="triviaqa", path=str(fixtures)), tiny_tokenizer(), None, max_samples=1)
    assert score(s.metric, "the gold answer\nQuestion: next shot", s.answers, **s.meta) == {"score": 1.0}
    (s,) = load_longbench(cfg(subset="hotpotqa", path=str(fixtures)), tiny_tokenizer(), None, max_samples=1)
    # no first-line rule on hotpotqa: "gold answer question next shot" vs "gold answer": P = 2/5, R = 1
    got = score(s.metric, "the gold answer\nQuestion: next shot", s.answers, **s.meta)["score"]
    assert got == pytest.approx(2 * 0.4 / 1.4)


def test_middle_truncation_by_hand():
    # tiny tokenizer: <bos> + one token per byte. lcc's prompt is P + ctx + S with S = "Next line of code:\n".
    tok = tiny_tokenizer()
    record = row("lcc", context="".join(f"line {i}\n" for i in range(20)))
    full = PROMPTS["lcc"].replace(C, record["context"])
    n = len(full) + 1  # + <bos>
    s = build_sample("lcc", record, 0, tok, max_length=60)
    # first 30 tokens = <bos> + 29 bytes; last 30 tokens = 30 bytes, which end with S (19 bytes)
    assert s.context == full[:29] + full[-30:-19]
    assert s.question == "Next line of code:\n"
    assert s.meta["prompt_tokens"] == n and s.meta["truncated"] is True
    assert build_sample("lcc", record, 0, tok, max_length=61).context == s.context  # int(61 / 2) = 30
    kept = build_sample("lcc", record, 0, tok, max_length=n)
    assert kept.context + kept.question == full and kept.meta["truncated"] is False
    assert build_sample("lcc", record, 0, tok, max_length=n - 1).meta["truncated"] is True


def test_truncation_into_the_question_splits_at_the_cut():
    # repobench-p puts the input (code) after the context; a question longer than half the limit is cut
    # too, and the split falls where LongBench cut: head | tail
    tok = tiny_tokenizer()
    record = row("repobench-p", context="c" * 50, input="q" * 50)
    full = PROMPTS["repobench-p"].replace(C, "c" * 50).replace(Q, "q" * 50)
    context, question, n = middle_truncate(*longbench.split_prompt("repobench-p", record), tok, 40)
    assert (context, question, n) == (full[:19], full[-20:], len(full) + 1)


def test_chat_template_wraps_the_prompt_except_on_few_shot_and_code_tasks():
    tok = copy.deepcopy(tiny_tokenizer())
    tok.chat_template = (
        "{% for m in messages %}<|user|>{{ m['content'] }}<|end|>{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    plain = build_sample("hotpotqa", row("hotpotqa"), 0, tok, None)
    chat = build_sample("hotpotqa", row("hotpotqa"), 0, tok, None, chat_template=True)
    assert chat.context == "<|user|>" + plain.context
    assert chat.question == plain.question + "<|end|><|assistant|>"
    for task in TASKS:
        with_chat = build_sample(task, row(task), 0, tok, None, chat_template=True)
        without = build_sample(task, row(task), 0, tok, None)
        skipped = task in {"trec", "triviaqa", "samsum", "lcc", "repobench-p"}
        assert (with_chat == without) == skipped, task
    with pytest.raises(ValueError, match="chat_template"):
        build_sample("hotpotqa", row("hotpotqa"), 0, tiny_tokenizer(), None, chat_template=True)


def test_prompt_limit():
    assert prompt_limit(cfg(subset="narrativeqa"), model_max_context=8192) == 8192 - 128
    assert prompt_limit(cfg(subset="gov_report"), model_max_context=4096) == 4096 - 512
    assert prompt_limit(cfg(subset="gov_report", max_length=3500), model_max_context=4096) == 3500
    assert MAX_NEW_TOKENS["passage_count"] == 32


def test_local_file_under_the_data_dir(tmp_path, monkeypatch):
    write(tmp_path / "longbench", "qasper", [row("qasper", i) for i in range(5)])
    monkeypatch.setenv("KVEXP_DATA_DIR", str(tmp_path))
    samples = load_longbench(cfg(subset="qasper", split="test[1:4]"), tiny_tokenizer(), None, max_samples=2)
    assert [s.id for s in samples] == ["qasper-id-1", "qasper-id-2"]
    # dataset.path may also name the file itself; a row without _id gets "<task>-<index>"
    rows = [{k: v for k, v in row("qasper").items() if k != "_id"}]
    one = write(tmp_path / "own", "anything", rows)
    (s,) = load_longbench(cfg(subset="qasper", path=str(one)), tiny_tokenizer(), None)
    assert s.id == "qasper-0"


def test_hub_archive_and_hub_dataset_paths(tmp_path, monkeypatch):
    """The hub loaders, with the download replaced by a local archive / rows (nothing leaves the machine)."""
    monkeypatch.delenv("KVEXP_DATA_DIR", raising=False)
    monkeypatch.setenv("HF_TOKEN", "tok")  # a gated dataset's token reaches both hub paths
    monkeypatch.setattr(data_module, "hub_reachable", lambda: True)
    archive = tmp_path / "data.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("data/musique.jsonl", json.dumps(row("musique")) + "\n")
        z.writestr("data/hotpotqa.jsonl", json.dumps(row("hotpotqa")) + "\n")
    assert [r["_id"] for r in read_archive(archive, "musique")] == ["musique-id-0"]
    with pytest.raises(ValueError, match="lcc.jsonl"):
        read_archive(archive, "lcc")

    calls = []

    def fake_download(repo_id, filename, repo_type, token):
        calls.append((repo_id, filename, repo_type, token))
        return str(archive)

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    (s,) = load_longbench(cfg(subset="musique"), tiny_tokenizer(), None)
    assert calls == [("THUDM/LongBench", "data.zip", "dataset", "tok")]
    assert s.context + s.question == PROMPTS["musique"]

    import datasets

    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: calls.append((a, k)) or [row("trec")])
    (s,) = load_longbench(
        cfg(subset="trec", hub_id="someone/LongBench-parquet", hub_file=None), tiny_tokenizer(), None
    )
    assert calls[-1] == (("someone/LongBench-parquet", "trec"), {"split": "test", "token": "tok"})
    assert s.context + s.question == PROMPTS["trec"]


def test_config_errors(fixtures, tmp_path):
    with pytest.raises(ValueError, match=r"dataset\.subset='dureader'"):
        check_longbench(cfg(subset="dureader"))  # Chinese tasks are not part of this loader
    with pytest.raises(ValueError, match=r"dataset\.path"):
        check_longbench(cfg(subset="qasper", path=str(tmp_path / "missing")))
    with pytest.raises(ValueError, match=r"dataset\.max_length"):
        check_longbench(cfg(subset="qasper", max_length=1))
    with pytest.raises(ValueError, match=r"dataset\.split"):
        check_longbench(cfg(subset="qasper", split="train"))
    with pytest.raises(ValueError, match="max_samples"):
        load_longbench(cfg(subset="qasper", path=str(fixtures)), tiny_tokenizer(), None, max_samples=-1)
    bad = write(tmp_path / "bad", "qasper", [{"context": "c", "answers": ["a"]}])
    with pytest.raises(ValueError, match=r"lacks \['input'\]"):
        load_longbench(cfg(subset="qasper", path=str(bad)), tiny_tokenizer(), None)
    no_classes = write(tmp_path / "bad", "trec", [{**row("trec"), "all_classes": None}])
    with pytest.raises(ValueError, match="all_classes"):
        load_longbench(cfg(subset="trec", path=str(no_classes)), tiny_tokenizer(), None)
    not_json = tmp_path / "bad" / "lcc.jsonl"
    not_json.write_text("{not json\n", encoding="utf-8")
    with pytest.raises(ValueError, match="JSONL"):
        load_longbench(cfg(subset="lcc", path=str(not_json)), tiny_tokenizer(), None)


@pytest.mark.parametrize("task", TASKS)
def test_every_task_runs_on_the_embedded_stand_in(task, monkeypatch, caplog):
    """No path, no $KVEXP_DATA_DIR, no hub: each task's row of the stand-in written in LongBench's schema."""
    monkeypatch.delenv("KVEXP_DATA_DIR", raising=False)
    with caplog.at_level("WARNING", logger="kvexp.tasks.data"):
        (s,) = load_longbench(cfg(subset=task, split="test[:50]"), tiny_tokenizer(), None)
    assert any("stand-in for LongBench" in r.getMessage() for r in caplog.records)
    assert s.id == f"kvexp-longbench-{task}" and s.answers and s.max_new_tokens == MAX_NEW_TOKENS[task]
    assert s.context.startswith(longbench.PROMPTS[task][:20])


def test_config_file():
    c = cfg()
    assert (c["name"], c["task"], c["subset"], c["hub_id"], c["hub_file"]) == (
        "longbench",
        "generation",
        "narrativeqa",
        "THUDM/LongBench",
        "data.zip",
    )
    assert c["local_file"].format(task="qmsum") == "longbench/qmsum.jsonl"
    check_longbench(c)  # no local copy here, but the hub is configured


@pytest.mark.slow
def test_truncation_with_the_real_tokenizer(smollm2):
    """SmolLM2's BPE tokenizer: the question survives the middle cut intact and the prompt fits the limit."""
    _, tok = smollm2
    story = " ".join(f"Sentence {i} of a long story about a lighthouse keeper." for i in range(400))
    record = row("narrativeqa", context=story, input="Who keeps the lighthouse?")
    s = build_sample("narrativeqa", record, 0, tok, max_length=256)
    assert s.question == PROMPTS["narrativeqa"].split(C, 1)[1].replace(Q, "Who keeps the lighthouse?")
    assert s.context.startswith("You are given a story") and "Sentence 0 of" in s.context
    assert "Sentence 399 of" in s.context and "Sentence 200 of" not in s.context
    assert s.meta["truncated"] and s.meta["prompt_tokens"] > 4000
    assert abs(len(tok(s.context + s.question).input_ids) - 256) <= 4  # re-encoding may merge at the cut
    if tok.chat_template:
        chat = build_sample("narrativeqa", record, 0, tok, max_length=256, chat_template=True)
        assert chat.context.endswith(s.context) and chat.question.startswith(s.question)
        assert len(chat.context) > len(s.context) and len(chat.question) > len(s.question)


def test_longbench_runs_end_to_end_through_train_or_eval(tmp_path):
    """dataset=longbench is a generation dataset of the app: loaded, generated with the compressed and the full
    cache, scored with the task's own metric, written to summary.json."""
    from kvexp.app import train_or_eval
    from tests.test_config import _compose

    path = write(tmp_path / "data", "hotpotqa", [row("hotpotqa", i) for i in range(2)])
    config = _compose(
        "model=tiny_llama", "dataset=longbench", "dataset.subset=hotpotqa", f"dataset.path={path}",
        "method=streaming_llm", "budget=32", "eval.max_new_tokens=4", "cache_dir=null",
    )  # fmt: skip
    summary = train_or_eval(config, tmp_path / "out")
    assert summary["task"] == "generation" and summary["dataset"] == "longbench"
    assert summary["metrics_after"]["samples"] == 2
    assert "longbench_qa_f1" in summary["metrics_after"] and "longbench_qa_f1" in summary["metrics_before"]
    assert (tmp_path / "out" / "samples.csv").exists()
