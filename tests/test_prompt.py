"""dataset=prompt: your own prompts answered with the full cache and the method, printed side by side."""

import csv
import dataclasses
import io
import json
import re

import pytest
import torch

import kvexp.models
import kvexp.tasks.base
from kvexp import make_cache
from kvexp.app import train_or_eval
from kvexp.config import validate
from kvexp.report import format_table
from kvexp.run_dir import config_hash
from kvexp.tasks import registry
from kvexp.tasks.prompt import format_pair, prompt_sample, stdin_prompts
from tests.conftest import load
from tests.test_config import _compose

PROMPT = "What is machine learning? Explain it to a curious student in a few sentences, please."  # 86 bytes
BASE = (
    "model=tiny_llama",
    "dataset=prompt",
    "cache_dir=null",
    "dataset.layout=stacked",
    "eval.warmup=false",
)


def _run(tmp_path, *overrides, out="run"):
    summary = train_or_eval(_compose(*BASE, *overrides), tmp_path / out)
    rows = list(csv.DictReader((tmp_path / out / "samples.csv").open()))
    return summary, json.loads((tmp_path / out / "summary.json").read_text()), rows


def _words(text: str) -> str:
    """`text` with its whitespace normalized (wrapping only moves whitespace)."""
    return " ".join(text.split())


def _kept(output: str) -> list[tuple[str, str]]:
    """Every printed (tokens kept, tokens seen) pair, in print order."""
    return re.findall(r"KV cache: ([\d.]+) of (\d+) tokens kept", output)


@pytest.fixture(autouse=True)
def _wide_terminal(monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # shutil.get_terminal_size: no wrapping inside short answers


def test_a_prompt_run_prints_both_labelled_answers_and_writes_them(tmp_path, capsys):
    summary, written, rows = _run(
        tmp_path, f"dataset.prompt={PROMPT}", "method=streaming_llm", "budget=32", "eval.max_new_tokens=6"
    )
    out = capsys.readouterr().out
    (entry,) = written["prompts"]
    full, compressed = entry["full"], entry["compressed"]
    assert entry["prompt"] == PROMPT and summary["prompts"] == written["prompts"]
    assert "=== prompt 1 " in out and PROMPT in out
    head, tail = out.split("--- full cache ")[1].split("--- streaming_llm, budget 32 tokens ")
    assert _words(full["answer"]) in _words(head) and _words(compressed["answer"]) in _words(tail)
    # Kept tokens: the budget once the prompt is longer; the full cache holds the prompt and the answer but
    # its last token (never fed to the model).
    prompt_tokens = int(rows[0]["context_tokens"])
    assert prompt_tokens == len(load("tiny_llama")[1](PROMPT).input_ids) > 32
    seen = prompt_tokens + 6 - 1
    assert _kept(out) == [(str(seen), str(seen)), ("32", str(seen))]
    assert (full["kv_tokens_kept"], compressed["kv_tokens_kept"]) == (seen, 32)
    assert full["new_tokens"] == compressed["new_tokens"] == 6
    # The printed bytes and times are the run's (the summary's timing/timing_full of its one prompt).
    assert f"{compressed['kv_bytes_kept']:,} bytes" in tail and f"{full['kv_bytes_kept']:,} bytes" in head
    assert compressed["kv_bytes_kept"] == written["kv_cache"]["bytes_kept"] < full["kv_bytes_kept"]
    assert compressed["tokens_per_s"] == pytest.approx(written["timing"]["throughput_tok_s"])
    assert full["tokens_per_s"] == pytest.approx(written["timing_full"]["throughput_tok_s"])
    assert f"{full['tokens_per_s']:.1f} tokens/s" in head and f"{compressed['total_s']:.3f} s" in tail
    # Written like any generation run: metrics, kv_cache, timing, samples.csv; no scores, no objective.
    assert written["dataset"] == "prompt" and written["task"] == "generation" and written["objective"] is None
    assert written["metrics_after"] == {"samples": 1, "new_tokens": 6.0} == written["metrics_before"]
    assert written["kv_cache"]["tokens_kept"] == 32 and written["budget"]["resolved_tokens"] == [32]
    assert rows[0]["prompt"] == PROMPT
    assert (rows[0]["prediction_before"], rows[0]["prediction_after"]) == (
        full["answer"],
        compressed["answer"],
    )
    assert "answer tokens (mean)" in format_table(summary)


def test_greedy_compressed_answer_is_make_cache_greedy_decoding(tmp_path):
    _, written, _ = _run(
        tmp_path, f"dataset.prompt={PROMPT}", "method=knorm", "budget.tokens=24", "eval.max_new_tokens=8"
    )
    model, tokenizer = load("tiny_llama")
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    cache, tokens = make_cache(model, "knorm", 24), []
    with torch.no_grad():
        logits = model(ids, past_key_values=cache).logits[:, -1]
        while True:
            tokens.append(int(logits.argmax(-1)))
            if len(tokens) == 8 or tokens[-1] == tokenizer.eos_token_id:
                break
            logits = model(torch.tensor([[tokens[-1]]]), past_key_values=cache).logits[:, -1]
    expected = tokenizer.decode(tokens, skip_special_tokens=True).strip()
    assert written["prompts"][0]["compressed"]["answer"] == expected
    assert written["prompts"][0]["compressed"]["kv_tokens_kept"] == cache.stats()["tokens_kept"] == 24


@pytest.mark.parametrize(
    "decoding",
    [(), ("eval.do_sample=true", "eval.temperature=0.7", "eval.top_p=0.9"), ("eval.prefill_chunk_size=16",)],
)
def test_method_full_answers_as_the_full_cache(tmp_path, decoding):
    _, written, _ = _run(
        tmp_path, f"dataset.prompt={PROMPT}", "method=full", "eval.max_new_tokens=8", *decoding
    )
    assert written["generation"]["decoding"]["do_sample"] is bool(decoding and "do_sample" in decoding[0])
    full, compressed = written["prompts"][0]["full"], written["prompts"][0]["compressed"]
    assert compressed["answer"] == full["answer"] and compressed["kv_tokens_kept"] == full["kv_tokens_kept"]


def test_keep_ratio_is_a_fraction_of_the_prompt(tmp_path, capsys):
    _, written, rows = _run(
        tmp_path, f"dataset.prompt={PROMPT}", "method=knorm", "budget=keep_0.5", "eval.max_new_tokens=4"
    )
    budget = int(0.5 * int(rows[0]["context_tokens"]))
    assert written["budget"]["resolved_tokens"] == [budget]
    assert written["prompts"][0]["compressed"]["kv_tokens_kept"] == budget
    assert f"knorm, keep_ratio 0.5 = {budget} tokens" in capsys.readouterr().out


def test_a_prompt_file_gives_one_pair_per_non_blank_line(tmp_path, capsys):
    path = tmp_path / "prompts.txt"
    path.write_text("First prompt, with a comma.\n\n   \nSecond prompt?\n")
    _, written, rows = _run(
        tmp_path, f"dataset.prompt_file={path}", "method=streaming_llm", "budget=32", "eval.max_new_tokens=3"
    )
    out = capsys.readouterr().out
    assert [p["prompt"] for p in written["prompts"]] == ["First prompt, with a comma.", "Second prompt?"]
    assert out.count("=== prompt ") == 2 and out.count("--- full cache ") == 2 and len(_kept(out)) == 4
    assert [r["id"] for r in rows] == ["1", "2"] and written["metrics_after"]["samples"] == 2


def test_stdin_mode_answers_each_line_until_eof(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("first prompt\n\nsecond prompt\n"))
    _, written, rows = _run(tmp_path, "method=streaming_llm", "budget=32", "eval.max_new_tokens=3")
    out = capsys.readouterr().out
    assert [p["prompt"] for p in written["prompts"]] == ["first prompt", "second prompt"]
    assert out.count("=== prompt ") == 2 and "> " not in out  # not a terminal: no prompt shown
    assert len(rows) == 2
    # Never resumed: the same config on another session's input runs again.
    monkeypatch.setattr("sys.stdin", io.StringIO("third prompt\n"))
    _, again, _ = _run(tmp_path, "method=streaming_llm", "budget=32", "eval.max_new_tokens=3")
    assert [p["prompt"] for p in again["prompts"]] == ["third prompt"]


def test_stdin_prompts_show_a_prompt_on_a_terminal_and_end_at_eof():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    out = io.StringIO()
    prompts = stdin_prompts(Terminal("a\n\n b \n"), out)
    assert next(prompts) == "a" and out.getvalue() == "> "
    assert list(prompts) == ["b"] and out.getvalue() == "> > > > \n"  # a, blank, b, then EOF


def test_stdin_without_prompts_fails(tmp_path, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("\n  \n"))
    with pytest.raises(ValueError, match="standard input held no prompt"):
        train_or_eval(_compose(*BASE, "method=full"), tmp_path / "run")


@pytest.mark.parametrize(
    "overrides,option",
    [
        (("dataset.prompt=hi", "dataset.prompt_file={file}"), "dataset.prompt and dataset.prompt_file"),
        (("dataset.prompt_file={missing}",), "dataset.prompt_file="),
        (("dataset.prompt_file={empty}",), "dataset.prompt_file="),
        (("dataset.prompt=",), "dataset.prompt is empty"),
        (("dataset.prompt=hi", "dataset.layout=wide"), "dataset.layout='wide'"),
    ],
)
def test_bad_input_fails_before_the_model_loads(overrides, option, tmp_path, monkeypatch):
    (tmp_path / "empty.txt").write_text("\n   \n")
    (tmp_path / "file.txt").write_text("a prompt\n")
    paths = {"file": tmp_path / "file.txt", "missing": tmp_path / "nope.txt", "empty": tmp_path / "empty.txt"}
    monkeypatch.setattr(kvexp.models, "load_model", lambda *a: pytest.fail("the model loaded"))
    monkeypatch.setattr(kvexp.tasks.base, "load_model", lambda *a: pytest.fail("the model loaded"))
    cfg = _compose(*BASE, *(o.format(**paths) for o in overrides))
    with pytest.raises(ValueError, match=re.escape(option)) as err:
        validate(cfg)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match=re.escape(option)):
        train_or_eval(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "summary.json").exists()


def test_a_prompt_is_taken_verbatim_from_the_command_line():
    text = "It's ML, really? (x) = y [1] {2} ${z} 50% $5 back\\slash\\"
    cfg = _compose(*BASE, f"dataset.prompt={text}")
    assert cfg.dataset.prompt == text
    assert (
        _compose(*BASE, 'dataset.prompt="a, b"').dataset.prompt == "a, b"
    )  # already quoted: as Hydra reads it
    validate(cfg)


def test_the_config_hash_covers_the_prompt_and_the_prompt_files_text(tmp_path, monkeypatch):
    assert config_hash(_compose(*BASE, "dataset.prompt=a")) != config_hash(
        _compose(*BASE, "dataset.prompt=b")
    )
    path = tmp_path / "prompts.txt"
    path.write_text("first\n")
    overrides = (f"dataset.prompt_file={path}", "method=streaming_llm", "budget=32", "eval.max_new_tokens=2")
    calls = []
    entry = registry.DATASETS["prompt"]
    counted = dataclasses.replace(entry, run=lambda cfg, setup: calls.append(cfg) or entry.run(cfg, setup))
    monkeypatch.setitem(registry.DATASETS, "prompt", counted)
    _run(tmp_path, *overrides)
    _run(tmp_path, *overrides)  # the same file: resumed
    assert len(calls) == 1
    path.write_text("second\n")
    with pytest.raises(ValueError, match=r"holds the results of another config \(or other inputs\)"):
        _run(tmp_path, *overrides)  # the same config, another text: not over the first text's results ...
    _, written, _ = _run(tmp_path, *overrides, "overwrite=true")  # ... unless asked: run again
    assert len(calls) == 2 and written["prompts"][0]["prompt"] == "second"


def _pair(answer_full="The full answer. " * 12, answer_compressed="Short."):
    from kvexp.tasks.generation import GenerationResult

    kv = {"tokens_seen": 100, "tokens_kept": 100.0, "bytes_kept": 4000, "bytes_full": 4000}
    full = GenerationResult("1", answer_full, 95, 0, 6, 0.5, [0.1] * 5, kv)
    compressed = GenerationResult(
        "1", answer_compressed, 95, 0, 6, 0.25, [0.05] * 5, {**kv, "tokens_kept": 32.5, "bytes_kept": 1300}
    )
    return prompt_sample("Why?", 0, {"max_new_tokens": 6}), full, compressed


def test_side_by_side_puts_the_answers_in_two_columns_of_the_width():
    sample, full, compressed = _pair()
    text = format_pair(sample, full, compressed, "h2o, budget 32 tokens", layout="side_by_side", width=100)
    lines = text.splitlines()
    assert lines[0].startswith("=== prompt 1 ") and lines[1] == "Why?"
    assert all(len(line) <= 100 for line in lines)
    assert lines[2].startswith("--- full cache ") and "| --- h2o, budget 32 tokens " in lines[2]
    assert all(line[48:51] in (" | ", " |") for line in lines[2:])  # one column boundary
    assert _words(" ".join(line[:48] for line in lines[3:])).startswith(_words(full.prediction))
    kept = [line for line in lines if "KV cache:" in line]
    assert len(kept) == 1 and "KV cache: 100 of 100" in kept[0] and "KV cache: 32.5 of 100" in kept[0]
    (times,) = [line for line in lines if "time:" in line]
    assert times.startswith("time: 6 new tokens in 1.000 s, 6.0 tokens/s ")  # full: 0.5 + 5 x 0.1 s
    assert times.endswith("| time: 6 new tokens in 0.500 s, 12.0 tokens/s")


def test_stacked_puts_the_answers_one_after_the_other():
    sample, full, compressed = _pair()
    text = format_pair(sample, full, compressed, "h2o, budget 32 tokens", layout="stacked", width=60)
    assert all(len(line) <= 60 for line in text.splitlines())
    assert (
        text.index("--- full cache")
        < text.index("The full answer.")
        < text.index("--- h2o")
        < text.index("Short.")
    )
    assert "1,300 bytes (0.00 MiB) of 4,000 uncompressed" in _words(text)
    only = format_pair(sample, None, compressed, "h2o", layout="side_by_side", width=100)
    assert "full cache" not in only and "Short." in only  # eval.compare_to_full=false: the method alone


@pytest.mark.slow
def test_smollm2_answers_a_question_in_english(smollm2, tmp_path):
    summary = train_or_eval(
        _compose(
            "model=smollm2_135m",
            "dataset=prompt",
            "dataset.prompt=What is machine learning?",
            "method=pooling_merge",
            "budget=64",
            "eval.max_new_tokens=16",
            "cache_dir=null",
        ),  # fmt: skip
        tmp_path / "run",
    )
    full = summary["prompts"][0]["full"]["answer"]
    words = re.findall(r"[A-Za-z]+", full)
    assert len(words) >= 5 and full.isascii(), full
    assert {"learning", "machine", "data", "is", "a", "the"} & {w.lower() for w in words}
    assert summary["prompts"][0]["compressed"]["answer"]
    assert summary["generation"]["chat_template"] is True
