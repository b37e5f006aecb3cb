"""A killed job resumes at its last finished batch: the journal file, and runs killed mid-way (compressed or full
cache, generation or perplexity) that finish with exactly the uninterrupted run's results, redoing nothing."""

import csv
import json

import pytest
from omegaconf import OmegaConf

import kvexp.tasks.generation
import kvexp.tasks.perplexity
from kvexp.app import train_or_eval
from kvexp.files import Journal, journal_header
from kvexp.run_dir import JOURNAL, config_hash, job_subdir
from kvexp.tasks.base import versions
from kvexp.tasks.lm_eval_harness import CompressedLM
from kvexp.tasks.registry import dataset_inputs
from tests.test_config import _compose


def test_the_journal_reads_back_its_batches_and_skips_a_torn_line(tmp_path):
    path = tmp_path / "j.jsonl"
    journal = Journal(path, {"config_hash": "abc"})
    assert journal.entries() == {} and journal.restored == 0
    journal.append({0: {"x": 1.5}, 1: {"x": float("nan")}})
    journal.append({2: {"x": [1, 2]}})
    with open(path, "a") as f:
        f.write('{"3": {"x": ')  # a kill in the middle of a batch's line
    again = Journal(path, {"config_hash": "abc"})
    held = again.entries()
    assert sorted(held) == [0, 1, 2] and held[0] == {"x": 1.5} and held[2] == {"x": [1, 2]}
    assert held[1]["x"] != held[1]["x"] and again.restored == 3  # NaN comes back as NaN
    assert journal_header(path) == {"config_hash": "abc"}
    other = Journal(path, {"config_hash": "def"})  # another work's journal: read as empty ...
    assert other.entries() == {} and other.restored == 0
    other.append({5: {"x": 0}})  # ... and replaced at the first append
    assert Journal(path, {"config_hash": "def"}).entries() == {5: {"x": 0}}
    assert Journal(path, {"config_hash": "abc"}).entries() == {}
    other.remove()
    assert not path.exists() and journal_header(path) is None


# task -> (the config; what answers one batch (lm-eval: one cache's requests): where, the names, and the method
# among its arguments)
TASKS = {
    "generation": (
        ("dataset=qa_jsonl", "eval.max_new_tokens=3", "eval.batch_size=2"),
        (kvexp.tasks.generation, ("generate_batch",), lambda args: args[3]),
    ),
    "perplexity": (
        ("dataset=wikitext2", "dataset.split_documents=true", "eval.max_samples=4", "eval.max_tokens=40",
         "eval.chunk_size=8", "eval.batch_size=2"),
        (kvexp.tasks.perplexity, ("score_documents",), lambda args: args[2]),
    ),
    # two documents of 4 choices (a cache each) and, with kvexp_recall_gen, two generations
    "lm_eval": (
        ("dataset=lm_eval", "dataset.tasks=[kvexp_recall,kvexp_recall_gen]", "dataset.limit=2",
         "dataset.bootstrap_iters=0"),
        (CompressedLM, ("_score_contexts", "_generate"), lambda args: args[0].method),
    ),
}  # fmt: skip


def _batches(monkeypatch, task: str, fail_at: tuple[str, int] | None = None) -> list[str]:
    """Record the method of every batch answered (or scored); with `fail_at` (method, n), the n-th batch of that
    method raises, as a kill would stop the job there."""
    owner, names, method_of = TASKS[task][1]
    calls = []

    def recording(real):
        def record(*args, **kwargs):
            method = getattr(method_of(args), "name", method_of(args))
            calls.append(method)
            if fail_at is not None and calls.count(fail_at[0]) == fail_at[1] and method == fail_at[0]:
                raise KeyboardInterrupt("killed")
            return real(*args, **kwargs)

        return record

    for name in names:
        monkeypatch.setattr(owner, name, recording(getattr(owner, name)))
    return calls


def _results(run_dir) -> list[dict[str, str]]:
    """samples.csv without its timing columns."""
    rows = list(csv.DictReader((run_dir / "samples.csv").open(newline="")))
    timing = ("_s", "_s_before", "_s_after", "seconds", "ms_per_step", "tpot", "throughput", "wall")
    return [{k: v for k, v in r.items() if not any(t in k for t in timing)} for r in rows]


# task -> the samples (lm-eval: requests) of the compressed run's first batch, and its number of batches
FIRST_BATCH = {"generation": (2, 2), "perplexity": (2, 2), "lm_eval": (4, 4)}


@pytest.mark.parametrize("task", ["generation", "perplexity", "lm_eval"])
def test_a_killed_compressed_run_resumes_at_its_last_finished_batch(task, qa_file, tmp_path, monkeypatch):
    data = (*TASKS[task][0], f"dataset.path={qa_file}") if task == "generation" else TASKS[task][0]
    base = ("model=tiny_llama", "method=h2o", "budget=32", "engine.when=prefill", "eval.warmup=false", *data)
    first, batches = FIRST_BATCH[task]
    reference = train_or_eval(_compose(*base, f"cache_dir={tmp_path / 'ref_cache'}"), tmp_path / "ref")
    cfg = _compose(*base, f"cache_dir={tmp_path / 'cache'}")
    out = tmp_path / "run"
    _batches(monkeypatch, task, fail_at=("h2o", 2))
    with pytest.raises(KeyboardInterrupt):
        train_or_eval(cfg, out)
    lines = (out / JOURNAL).read_text().splitlines()
    assert len(lines) == 2 and sorted(json.loads(lines[1]), key=int) == [str(i) for i in range(first)]
    assert not (out / "summary.json").exists()
    header = json.loads(lines[0])

    calls = _batches(monkeypatch, task)
    summary = train_or_eval(cfg, out)
    # the full cache was stored whole; only the compressed run's batches after the first are run
    assert calls == ["h2o"] * (batches - 1)
    assert (
        summary["resumed"] == first
        and "resumed" not in reference
        and header["config_hash"] == summary["config_hash"]
    )
    assert summary["metrics_after"] == reference["metrics_after"]
    assert summary["metrics_before"] == reference["metrics_before"]
    assert _results(out) == _results(tmp_path / "ref")
    columns = (out / "samples.csv").read_text().partition("\n")[0]
    assert (
        columns == (tmp_path / "ref" / "samples.csv").read_text().partition("\n")[0]
    )  # columns in their order
    # timed in two processes: no time comparison with the full cache, which was timed in the first one
    assert summary["timing_full"]["comparable"] is False and reference["timing_full"]["comparable"] is True
    assert all(summary[k] is None for k in ("time_before", "avg_time_saving_s") if k in summary)
    assert not (out / JOURNAL).exists()  # finished: the results are in summary.json and samples.csv

    calls.clear()
    again = train_or_eval(
        _compose(*base, f"cache_dir={tmp_path / 'cache'}", "resume=false"), tmp_path / "fresh"
    )
    assert calls == ["h2o"] * batches and "resumed" not in again


@pytest.mark.parametrize("task", ["generation", "perplexity"])
def test_a_killed_full_cache_run_resumes_in_the_next_job(task, qa_file, tmp_path, monkeypatch):
    """The full-cache run's journal sits beside the stored results (cache_dir/full), so any later job needing the
    same full-cache results, of any method, resumes it; results read back were timed in another process."""
    data = (*TASKS[task][0], f"dataset.path={qa_file}") if task == "generation" else TASKS[task][0]
    base = ("model=tiny_llama", "budget=32", "engine.when=prefill", "eval.warmup=false",
            f"cache_dir={tmp_path / 'cache'}", *data)  # fmt: skip
    reference = train_or_eval(_compose(*base, "method=h2o", f"cache_dir={tmp_path / 'ref'}"), tmp_path / "r")
    _batches(monkeypatch, task, fail_at=("full", 2))
    with pytest.raises(KeyboardInterrupt):
        train_or_eval(_compose(*base, "method=h2o"), tmp_path / "a")
    (partial,) = (tmp_path / "cache" / "full").glob("*.partial.jsonl")
    assert not list((tmp_path / "cache" / "full").glob("*.json"))  # not stored: the run did not finish

    calls = _batches(monkeypatch, task)
    summary = train_or_eval(_compose(*base, "method=knorm"), tmp_path / "b")  # the next job, another method
    assert calls == ["full", "knorm", "knorm"]  # the full cache's first batch was read back
    assert summary["timing_full"]["comparable"] is False and "resumed" not in summary
    assert summary["metrics_before"] == reference["metrics_before"]
    assert not partial.exists() and len(list((tmp_path / "cache" / "full").glob("*.json"))) == 1
    calls.clear()
    later = train_or_eval(_compose(*base, "method=h2o"), tmp_path / "a")  # the killed job, re-run
    assert calls == ["h2o", "h2o"] and later["timing_full"]["comparable"] is False
    assert later["metrics_after"] == reference["metrics_after"]


def test_lm_evals_full_cache_requests_are_kept_for_every_later_job(tmp_path, monkeypatch):
    """lm-eval runs its own loop in every job: its full-cache requests are kept in a journal under cache_dir, so a
    job killed midway leaves those it answered and every later job, of any method, reads them back."""
    base = ("model=tiny_llama", "budget=32", "engine.when=prefill", "eval.warmup=false",
            f"cache_dir={tmp_path / 'cache'}", *TASKS["lm_eval"][0])  # fmt: skip
    reference = train_or_eval(_compose(*base, "method=h2o", f"cache_dir={tmp_path / 'ref'}"), tmp_path / "r")
    _batches(monkeypatch, "lm_eval", fail_at=("full", 2))
    with pytest.raises(KeyboardInterrupt):
        train_or_eval(_compose(*base, "method=h2o"), tmp_path / "a")
    (kept,) = (tmp_path / "cache" / "full").glob("*.jsonl")

    calls = _batches(monkeypatch, "lm_eval")
    summary = train_or_eval(_compose(*base, "method=knorm"), tmp_path / "b")  # the next job, another method
    assert calls == ["full"] * 3 + ["knorm"] * 4  # the full cache's first document was read back
    assert summary["timing_full"]["comparable"] is False and "resumed" not in summary
    assert summary["metrics_before"] == reference["metrics_before"]
    calls.clear()
    later = train_or_eval(_compose(*base, "method=h2o"), tmp_path / "a")  # the killed job, re-run
    assert calls == ["h2o"] * 4 and later["timing_full"]["comparable"] is False
    assert later["metrics_before"] == reference["metrics_before"]
    assert later["metrics_after"] == reference["metrics_after"]
    assert kept.exists() and reference["timing_full"]["comparable"] is True


def test_a_run_dir_holding_another_configs_journal_is_refused(qa_file, tmp_path):
    """An unfinished run's journal claims its dir like a summary does: another config is refused there (its
    batches are not overwritten), and with overwrite=true the dir is replaced."""
    base = ("model=tiny_llama", "budget=32", "eval.warmup=false", "cache_dir=null", *TASKS["generation"][0],
            f"dataset.path={qa_file}")  # fmt: skip
    out = tmp_path / "run"
    out.mkdir()
    header = {"config_hash": "0123456789abcdef", "versions": {"torch": "x"}}
    Journal(out / JOURNAL, header).append({0: {"id": "0"}})
    with pytest.raises(
        ValueError, match=rf"holds the results of another config .*{JOURNAL}, config hash 0123"
    ):
        train_or_eval(_compose(*base, "method=h2o"), out)
    assert journal_header(out / JOURNAL) == header
    summary = train_or_eval(_compose(*base, "method=h2o", "overwrite=true"), out)
    assert summary["metrics_after"]["samples"] == 3 and not (out / JOURNAL).exists()


def test_a_sweep_job_finds_its_unfinished_runs_dir_and_leaves_another_configs(qa_file, tmp_path):
    """A re-run sweep job resumes in the dir holding its own journal, whatever its job number now; a job whose
    number names a dir holding another config's journal goes beside it (`<num>-<hash>`)."""
    base = (
        "model=tiny_llama",
        "budget=32",
        "cache_dir=null",
        *TASKS["generation"][0],
        f"dataset.path={qa_file}",
    )
    sweep = tmp_path / "sweep"

    def root(method: str):
        content = OmegaConf.to_container(_compose(*base, f"method={method}"))
        return OmegaConf.create({**content, "hydra": {"sweep": {"dir": str(sweep)}}})

    def journal_of(method: str, job: str) -> None:
        cfg = _compose(*base, f"method={method}")
        digest = config_hash(cfg, dataset_inputs(cfg))
        Journal(sweep / job / JOURNAL, {"config_hash": digest, "versions": versions()}).append({0: {}})

    journal_of("h2o", "0")
    assert job_subdir("0", root("h2o")) == "0" and job_subdir("1", root("h2o")) == "0"  # its own, by config
    assert job_subdir("1", root("knorm")) == "1"
    knorm = job_subdir("0", root("knorm"))  # dir 0 holds h2o's unfinished run: never over it
    assert knorm.startswith("0-") and len(knorm) == 10
