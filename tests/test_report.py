"""The report reads finished runs, computes the % changes against the full cache and writes its files."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

from kvexp.report import collect, pareto_front, plots, rows, tables, write_report

ROOT = Path(__file__).resolve().parents[1]


def _summary(method, ppl, acc, kept, tpot_ms=10.0):
    timing = {"ttft_s": 0.5, "tpot_ms": tpot_ms, "throughput_tok_s": 1000 / tpot_ms}
    return {
        "model": "m",
        "dataset": "wikitext2",
        "budget": {"tokens": 256, "keep_ratio": None},
        "method": {"name": method},
        "metrics_before": {"perplexity": 10.0, "accuracy": 0.5, "tokens": 1999},
        "metrics_after": {"perplexity": ppl, "accuracy": acc, "tokens": 1999},
        "timing": timing,
        "timing_full": {"ttft_s": 1.0, "tpot_ms": 20.0, "throughput_tok_s": 50.0},
        "kv_cache": {"tokens_seen": 1999, "tokens_kept": kept},
    }


def test_tables_from_run_dirs(tmp_path):
    for i, (method, ppl, acc) in enumerate([("h2o", 11.0, 0.45), ("knorm", 15.0, 0.40)]):
        (tmp_path / str(i)).mkdir()
        (tmp_path / str(i) / "summary.json").write_text(json.dumps(_summary(method, ppl, acc, 256)))
    text = tables(collect(tmp_path))
    assert "### wikitext2, budget 256 (m, 1999 tokens scored)" in text
    assert "| full (baseline) | 1.0000 | 20.00 | 50.00 | 10.00 | 50.00% | 1999 |" in text  # TPOT in ms
    assert "| h2o | 0.5000 | 10.00 | 100.00 | 11.00 | 45.00% | 256 |" in text
    assert "| h2o | +100.0% | -50.0% | +10.0% | -10.0% |" in text  # throughput, TPOT, PPL, accuracy
    assert "| knorm | +100.0% | -50.0% | +50.0% | -20.0% |" in text


def test_analysis_notebook_runs_on_finished_runs(tmp_path, monkeypatch):
    """notebooks/budget_vs_perplexity.ipynb on a real Jupyter kernel, over the finished runs of two tiny models:
    one curve per (model, method), each point the perplexity its own run's summary.json holds, each model's %
    changes against its own full cache, one figure file per model; the runs are found from the repository root
    (not only from notebooks/) and, through KVEXP_RUNS, from any folder."""
    from collections import defaultdict

    import nbformat
    import pytest
    from ipykernel.kernelspec import write_kernel_spec
    from nbclient import NotebookClient

    from kvexp.app import train_or_eval
    from tests.test_config import _compose

    notebook = nbformat.read(ROOT / "notebooks" / "budget_vs_perplexity.ipynb", as_version=4)
    assert all(not c.outputs for c in notebook.cells if c.cell_type == "code")  # the repo stores no outputs
    # A checkout of its own (the notebook looks for pyproject.toml, conf/ and kvexp/ upwards; kvexp/ is the real
    # package, which a kernel started there imports), its outputs/ holding two models' runs in two sweep folders.
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    for name in ("pyproject.toml", "conf", "kvexp"):
        (checkout / name).symlink_to(ROOT / name)
    text = tmp_path / "doc.txt"
    text.write_text("It was the best of times, it was the worst of times. " * 12)
    multiruns = checkout / "outputs" / "kvexp" / "multiruns"
    sweeps = {model: multiruns / model for model in ("tiny_llama", "tiny_qwen2")}
    expected = defaultdict(list)  # (model, method) -> [(budget, perplexity)], from the runs' summary.json
    baseline = {}  # model -> its full cache's perplexity
    for model, sweep in sweeps.items():
        for method, budget in [("streaming_llm", 32), ("streaming_llm", 64), ("knorm", 32)]:
            cfg = _compose(
                f"model={model}", f"method={method}", f"budget={budget}", "dataset=text_file",
                f"dataset.path={text}", "eval.max_tokens=100", "eval.chunk_size=10", "cache_dir=null",
            )  # fmt: skip
            train_or_eval(cfg, sweep / f"{method}_{budget}")
            summary = json.loads((sweep / f"{method}_{budget}" / "summary.json").read_text())
            expected[(model, method)].append((budget, summary["metrics_after"]["perplexity"]))
            baseline[model] = summary["metrics_before"]["perplexity"]
    assert baseline["tiny_llama"] != baseline["tiny_qwen2"]  # else a shared baseline would go unnoticed
    # A kernel running this very interpreter, whatever kernels the machine has registered.
    write_kernel_spec(tmp_path / "jupyter" / "kernels" / "kvexp-test")
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "jupyter" / "runtime"))
    # Appended in memory: what the notebook built and drew, printed as JSON for the test to read back.
    dump = nbformat.v4.new_code_cell(
        "import json\n"
        "drawn = {\n"
        "    group: [[line.get_label(), [*map(float, line.get_xdata())], [*map(float, line.get_ydata())]]\n"
        "            for line in fig.axes[0].get_lines()]\n"
        "    for group, fig in figures.items()\n"
        "}\n"
        "print(json.dumps({\n"
        "    'summaries': len(summaries), 'figures_dir': str(FIGURES), 'full': full, 'lines': drawn,\n"
        "    'curves': [[*key, points] for key, points in curves.items()],\n"
        "    'changes': [[*key, points] for key, points in changes.items()],\n"
        "}))"
    )

    def execute(cwd: Path) -> dict:
        cwd.mkdir(exist_ok=True)
        nb = nbformat.from_dict({**notebook, "cells": [*notebook.cells, dump]})
        resources = {"metadata": {"path": str(cwd)}}  # the kernel's working folder
        NotebookClient(nb, kernel_name="kvexp-test", timeout=120, resources=resources).execute()
        return json.loads(nb.cells[-1].outputs[0]["text"])

    monkeypatch.delenv("KVEXP_RUNS", raising=False)
    monkeypatch.delenv("KVEXP_FIGURES", raising=False)
    found = execute(checkout)  # at the repository root: reads <root>/outputs, writes <root>/outputs/figures
    monkeypatch.setenv("KVEXP_RUNS", os.pathsep.join(str(sweep) for sweep in sweeps.values()))
    monkeypatch.setenv("KVEXP_FIGURES", str(tmp_path / "figures"))
    named = execute(tmp_path / "elsewhere")  # outside any checkout, told where the runs are
    groups = {"tiny_llama": "text_file_model-tiny_llama", "tiny_qwen2": "text_file_model-tiny_qwen2"}
    for result, figures_dir in [(found, checkout / "outputs" / "figures"), (named, tmp_path / "figures")]:
        assert result["summaries"] == 6 and Path(result["figures_dir"]) == figures_dir
        curves = {(model, label): [tuple(p) for p in pts] for _, model, _, label, pts in result["curves"]}
        assert curves == {key: sorted(points) for key, points in expected.items()}
        assert all(group == groups[model] for group, model, *_ in result["curves"])  # a group per model
        assert result["full"] == {groups[model]: ppl for model, ppl in baseline.items()}
        for _, model, _, label, points in result["changes"]:  # against the model's own full cache
            budgets, ppls = zip(*sorted(expected[(model, label)]), strict=True)
            assert [b for b, _ in points] == list(budgets)
            ref = baseline[model]
            assert [c for _, c in points] == pytest.approx([100 * (ppl - ref) / ref for ppl in ppls])
        for model, group in groups.items():  # what the figure draws, every line named by its model
            lines = {label: (x, y) for label, x, y in result["lines"][group]}
            assert lines.pop(f"{model}: full cache")[1] == [baseline[model]] * 2
            assert lines == {
                f"{model}: {method}": tuple(map(list, zip(*sorted(points), strict=True)))
                for (m, method), points in expected.items()
                if m == model
            }
        files = sorted(figures_dir.iterdir())
        assert [f.name for f in files] == [f"budget_vs_perplexity_{groups[m]}.png" for m in sorted(groups)]
        assert all(f.read_bytes().startswith(b"\x89PNG") for f in files)


def test_generation_metrics_get_columns_and_changes(tmp_path):
    """Nested metric dicts (ROUGE) become columns; fractions print as %, changes are relative."""
    summary = _summary("snapkv", 0.0, 0.0, 100)
    summary["dataset"] = "xsum"
    summary["metrics_before"] = {"rouge": {"rouge1": 0.40, "rougeL": 0.30}, "samples": 10}
    summary["metrics_after"] = {"rouge": {"rouge1": 0.30, "rougeL": 0.27}, "samples": 10}
    (tmp_path / "0").mkdir()
    (tmp_path / "0" / "summary.json").write_text(json.dumps(summary))
    text = tables(collect(tmp_path))
    assert "### xsum, budget 256 (m, 10 samples)" in text
    assert "| full (baseline) | 1.0000 | 20.00 | 50.00 | 40.00% | 30.00% | 1999 |" in text
    assert "| snapkv | +100.0% | -50.0% | -25.0% | -10.0% |" in text
    row = rows(collect(tmp_path))[0]
    assert row["rouge.rouge1_before"] == 0.40 and row["rouge.rougeL_after"] == 0.27
    assert "samples_after" not in row


def test_tables_show_the_overall_scores_under_titles_that_name_them(tmp_path):
    """passkey's per-cell breakdown (`by`) stays out of the tables (unlabelled it read as more overall columns),
    and two families sharing a score name get their full names."""
    summary = _summary("snapkv", 0.0, 0.0, 100)
    summary["dataset"] = "passkey"
    cell = {"qa": {"accuracy": 0.0, "f1": 0.1}}
    by = {"depth": {"0.25": cell, "0.75": cell}, "length/depth": {"1024/0.25": cell}}
    summary["metrics_before"] = {
        "qa": {"accuracy": 0.5, "f1": 0.6},
        "qa_all": {"accuracy": 0.75},
        "samples": 4,
    }
    summary["metrics_after"] = {
        "qa": {"accuracy": 0.25, "f1": 0.3},
        "qa_all": {"accuracy": 0.5},
        "samples": 4,
        "by": by,
    }
    text = tables(_write(tmp_path, [summary]))
    header = next(line for line in text.splitlines() if line.startswith("| method | TTFT"))
    assert "| qa.accuracy | f1 | qa_all.accuracy | KV kept |" in header
    assert "| full (baseline) | 1.0000 | 20.00 | 50.00 | 50.00% | 60.00% | 75.00% | 1999 |" in text
    assert "| snapkv | +100.0% | -50.0% | -50.0% | -50.0% | -33.3% |" in text
    assert "by." not in text and "0.25" not in text


def test_pareto_front_keeps_only_undominated_points():
    points = [(0.5, 12.0), (0.5, 11.0), (0.75, 13.0), (0.75, 20.0), (0.9, 12.5), (0.25, 11.5)]
    # Perplexity: lower is better. (0.9, 12.5) beats (0.75, 13.0); (0.5, 11.0) beats (0.25, 11.5).
    assert pareto_front(points, lower_is_better=True) == [(0.5, 11.0), (0.9, 12.5)]
    accuracy = [(0.5, 0.4), (0.75, 0.45), (0.9, 0.3)]
    assert pareto_front(accuracy, lower_is_better=False) == [(0.75, 0.45), (0.9, 0.3)]


def test_write_report_files(tmp_path):
    for i, (method, budget, ppl) in enumerate([("h2o", 256, 11.0), ("h2o", 512, 10.5), ("knorm", 256, 15.0)]):
        summary = _summary(method, ppl, 0.4, budget)
        summary["budget"]["tokens"] = budget
        summary["kv_cache"].update({"compression_ratio": 1 - budget / 1999, "bytes_kept": budget * 1000})
        for key in ("metrics_before", "metrics_after"):  # passkey's breakdown: its keys hold "/"
            summary[key]["by"] = {"length/depth": {"1024/0.5": {"accuracy": summary[key]["accuracy"]}}}
        (tmp_path / str(i)).mkdir()
        (tmp_path / str(i) / "summary.json").write_text(json.dumps(summary))
    out = write_report([tmp_path])
    with open(out / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert [(r["method"], r["budget"], float(r["perplexity_after"])) for r in table] == [
        ("h2o", "256", 11.0), ("h2o", "512", 10.5), ("knorm", "256", 15.0)
    ]  # fmt: skip
    plots = {p.name for p in (out / "plots").glob("*.png")}
    assert {
        "wikitext2_perplexity_by_method.png", "wikitext2_accuracy_by_method.png", "wikitext2_tradeoff.png",
        "wikitext2_heatmap_256.png", "wikitext2_heatmap_512.png", "wikitext2_cache_efficiency.png",
        "wikitext2_pareto.png", "wikitext2_by.length-depth.1024-0.5.accuracy_by_method.png",
    } <= plots  # fmt: skip
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == len(plots)  # self-contained: every plot inline
    assert "<th>PPL</th>" in page and "<td>h2o</td>" in page
    assert tables(collect(tmp_path)) in (out / "report.md").read_text()
    # Rewritten without the 512 runs: the 512 heatmap of the earlier report is gone, not shown or uploaded again.
    (tmp_path / "1" / "summary.json").unlink()
    write_report([tmp_path])
    assert not (out / "plots" / "wikitext2_heatmap_512.png").exists()
    assert (out / "plots" / "wikitext2_heatmap_256.png").exists()


def test_multirun_ends_with_its_report(tmp_path):
    """A real 2 methods x 2 budgets sweep on a tiny model: the Hydra callback writes the report."""
    text = tmp_path / "doc.txt"
    text.write_text("It was the best of times, it was the worst of times. " * 12)
    sweep = tmp_path / "sweep"
    proc = subprocess.run(
        [
            sys.executable, "-m", "kvexp", "-m", "model=tiny_llama", "method=knorm,streaming_llm",
            "budget=32,64", "dataset=text_file", f"dataset.path={text}", "eval.max_tokens=100",
            "eval.chunk_size=10", f"hydra.sweep.dir={sweep}", f"cache_dir={tmp_path / 'cache'}",
        ],
        cwd=ROOT, capture_output=True, text=True, env={**os.environ, "HYDRA_FULL_ERROR": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    with open(sweep / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert sorted((r["method"], r["budget"]) for r in table) == [
        ("knorm", "32"), ("knorm", "64"), ("streaming_llm", "32"), ("streaming_llm", "64")
    ]  # fmt: skip
    report = (sweep / "report.md").read_text()
    assert "### text_file, budget 32" in report and "### text_file, budget 64" in report
    assert (sweep / "plots" / "text_file_pareto.png").exists()
    assert "data:image/png;base64," in (sweep / "report.html").read_text()


def _configured(
    model, method, ppl, before, budget=64, max_tokens=256, throughput=100.0, full_throughput=50.0, **params
):
    """A summary with its resolved config, as train_or_eval writes it."""
    summary = _summary(method, ppl, 0.4, budget)
    summary["model"] = model
    summary["budget"]["tokens"] = budget
    summary["metrics_before"]["perplexity"] = before
    summary["timing"]["throughput_tok_s"] = throughput
    summary["timing_full"]["throughput_tok_s"] = full_throughput
    summary["method"] = {"name": method, **params}
    summary["config"] = {
        "model": {"name": model, "architecture": model.split("_")[-1], "tiny": {"hidden_size": 64}},
        "method": {"name": method, **params},
        "budget": {"tokens": budget, "keep_ratio": None, "allocation": "uniform"},
        "dataset": {"name": "wikitext2", "split": "test"},
        "eval": {"max_tokens": max_tokens, "chunk_size": 1},
        "hardware": {"dtype": "float32", "num_threads": 2},
        "engine": {"slack": 0},
        "logger": {"name": "none"},
        "seed": 0,
    }
    return summary


def _write(root, summaries):
    for i, summary in enumerate(summaries):
        (root / str(i)).mkdir()
        (root / str(i) / "summary.json").write_text(json.dumps(summary))
    return collect(root)


def test_each_model_is_compared_with_its_own_full_cache(tmp_path):
    """Two models in one sweep: two tables, each row's change against its own model's full cache."""
    summaries = _write(
        tmp_path,
        [
            _configured("tiny_llama", "h2o", 11.0, 10.0),
            _configured("tiny_llama", "knorm", 12.0, 10.0),
            _configured("tiny_qwen2", "h2o", 19.98, 20.0),
            _configured("tiny_qwen2", "knorm", 22.0, 20.0),
        ],
    )
    text = tables(summaries)
    assert text.count("### wikitext2, budget 64") == 2
    llama, qwen = text.split("### wikitext2, budget 64 (tiny_qwen2")
    assert "(tiny_llama, 1999 tokens scored)" in llama and "| h2o | +100.0% | -50.0% | +10.0% |" in llama
    assert "| full (baseline) | 1.0000 | 20.00 | 50.00 | 20.00 |" in qwen
    assert "| h2o | +100.0% | -50.0% | -0.1% |" in qwen  # 19.98 vs 20.0, not vs tiny_llama's 10.0
    assert "| knorm | +100.0% | -50.0% | +10.0% |" in qwen
    table = rows(summaries)
    assert {r["group"] for r in table} == {"wikitext2_model-tiny_llama", "wikitext2_model-tiny_qwen2"}
    assert all(r["model.name"] == r["model"] for r in table)


def test_swept_parameters_label_rows_and_get_columns_and_plots(tmp_path):
    """An H2O heavy/recent grid beside knorm: one labelled row per grid point, a column, a plot against it."""
    summaries = [
        _configured("m", "h2o", 11.0 + r, 10.0, recent_ratio=r, sink_tokens=4) for r in (0.2, 0.5, 0.8)
    ] + [_configured("m", "knorm", 15.0, 10.0, keep_ratio=None)]
    _write(tmp_path, summaries)
    text = tables(collect(tmp_path))
    for r in ("0.2", "0.5", "0.8"):
        assert f"| h2o (method.recent_ratio={r}) |" in text
    assert "| knorm |" in text and text.count("| h2o |") == 0
    out = write_report([tmp_path])
    with open(out / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert sorted(r["method.recent_ratio"] for r in table) == ["", "0.2", "0.5", "0.8"]
    assert (out / "plots" / "wikitext2_m_perplexity_vs_method.recent_ratio.png").exists()


def test_a_length_sweep_makes_one_group_per_length_and_a_plot_against_it(tmp_path):
    summaries = [
        _configured("m", "h2o", ppl, before, max_tokens=n)
        for n, ppl, before in ((256, 12.0, 10.0), (512, 11.0, 10.5), (1024, 10.8, 10.6))
    ]
    _write(tmp_path, summaries)
    text = tables(collect(tmp_path))
    assert "(m, 1999 tokens scored) [eval.max_tokens=512]" in text
    assert "| h2o | +100.0% | -50.0% | +4.8% |" in text  # 11.0 vs 10.5: the 512-token full cache
    out = write_report([tmp_path])
    assert (out / "plots" / "wikitext2_m_perplexity_vs_eval.max_tokens.png").exists()
    # The length-scaling study's second axis: the decode step's time against length, the full cache dashed.
    assert (out / "plots" / "wikitext2_m_tpot_ms_vs_eval.max_tokens.png").exists()
    assert (
        "wikitext2 (m): the decode step's time (TPOT, ms; lower is better) against the swept `eval.max_tokens`, "
        "one line per method and budget; dashed: the full cache at each value."
    ) in (out / "report.md").read_text()


def test_timing_changes_use_the_full_cache_of_the_same_run(tmp_path):
    """Throughput changes compare each run with the full-cache timing measured in that very run."""
    summaries = _write(
        tmp_path,
        [
            _configured("m", "h2o", 11.0, 10.0, throughput=60.0, full_throughput=50.0),
            _configured("m", "knorm", 12.0, 10.0, throughput=60.0, full_throughput=30.0),  # slower machine
        ],
    )
    text = tables(summaries)
    assert "| h2o | +20.0% |" in text and "| knorm | +100.0% |" in text


def test_new_tokens_is_not_a_quality_metric(tmp_path):
    summary = _summary("snapkv", 0.0, 0.0, 100)
    summary["metrics_before"] = {"qa": {"accuracy": 0.5}, "new_tokens": 48.0, "samples": 1}
    summary["metrics_after"] = {"qa": {"accuracy": 0.5}, "new_tokens": 48.0, "samples": 1}
    text = tables(_write(tmp_path, [summary]))
    assert "4800.00%" not in text and "new_tokens" not in text


def test_two_model_sweep_reports_each_model_against_its_own_baseline(tmp_path):
    """The issue's sweep (two models x two methods) end to end: one table per model, each % change from the
    results of its own model."""
    sweep = tmp_path / "sweep"
    proc = subprocess.run(
        [
            sys.executable, "-m", "kvexp", "-m", "model=tiny_llama,tiny_qwen2", "method=h2o,knorm", "budget=32",
            "eval.max_tokens=96", f"hydra.sweep.dir={sweep}", f"cache_dir={tmp_path / 'cache'}",
            "hydra.callbacks.report.plots=false",
        ],
        cwd=ROOT, capture_output=True, text=True, env={**os.environ, "HYDRA_FULL_ERROR": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    with open(sweep / "results.csv") as f:
        table = list(csv.DictReader(f))
    report = (sweep / "report.md").read_text()
    for model in ("tiny_llama", "tiny_qwen2"):
        section = report.split(f"### wikitext2, budget 32 ({model}")[1].split("###")[0]
        for r in (r for r in table if r["model"] == model):
            change = (
                100
                * (float(r["perplexity_after"]) - float(r["perplexity_before"]))
                / float(r["perplexity_before"])
            )
            assert f"| {r['method']} | " in section and f"| {change:+.1f}% |" in section


def test_a_rerun_sweep_reuses_jobs_by_config_and_reports_only_its_own(tmp_path):
    """`-m method=h2o,knorm`, then `-m method=knorm,h2o` into the same sweep dir: nothing redone or
    overwritten (jobs are matched by config hash, not job number); then `-m method=knorm` reports knorm alone."""
    text = tmp_path / "doc.txt"
    text.write_text("It was the best of times, it was the worst of times. " * 12)
    sweep = tmp_path / "sweep"

    def run(methods: str) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            [
                sys.executable, "-m", "kvexp", "-m", "model=tiny_llama", f"method={methods}", "budget=32",
                "dataset=text_file", f"dataset.path={text}", "eval.max_tokens=60", "eval.chunk_size=10",
                f"hydra.sweep.dir={sweep}", "cache_dir=null", "hydra.callbacks.report.plots=false",
            ],
            cwd=ROOT, capture_output=True, text=True, env={**os.environ, "HYDRA_FULL_ERROR": "1"},
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-2000:]
        return proc

    def methods_in(job: str) -> str:
        return json.loads((sweep / job / "summary.json").read_text())["method"]["name"]

    run("h2o,knorm")
    written = {job: (sweep / job / "summary.json").read_text() for job in ("0", "1")}
    assert (methods_in("0"), methods_in("1")) == ("h2o", "knorm")
    swapped = run("knorm,h2o")
    assert (swapped.stdout + swapped.stderr).count("already holds this config's results") == 2
    assert {job: (sweep / job / "summary.json").read_text() for job in ("0", "1")} == written
    for job in ("0", "1"):  # each job resumed in the dir holding its results: Hydra's record agrees with them
        assert f"name: {methods_in(job)}\n" in (sweep / job / ".hydra" / "config.yaml").read_text()
    with open(sweep / "results.csv") as f:
        assert sorted(r["method"] for r in csv.DictReader(f)) == ["h2o", "knorm"]
    run("tova")  # job 0 of another config: beside h2o's dir 0, never over it
    (tova,) = [d.name for d in sweep.iterdir() if d.name.startswith("0-")]
    assert methods_in(tova) == "tova" and len(tova) == 10
    assert {job: (sweep / job / "summary.json").read_text() for job in ("0", "1")} == written
    assert "name: h2o\n" in (sweep / "0" / ".hydra" / "config.yaml").read_text()
    run("knorm")
    with open(sweep / "results.csv") as f:
        assert [r["method"] for r in csv.DictReader(f)] == ["knorm"]  # not the older h2o job beside it
    assert "| h2o" not in (sweep / "report.md").read_text()


def _hydra_record(run_dir, task, hydra):
    """The .hydra/hydra.yaml Hydra writes into a job's run dir: the keys the report reads (JSON is YAML)."""
    (run_dir / ".hydra").mkdir()
    record = {"hydra": {"mode": "MULTIRUN", "overrides": {"hydra": hydra, "task": task}}}
    (run_dir / ".hydra" / "hydra.yaml").write_text(json.dumps(record))


def test_report_header_names_command_config_hardware_dates_versions_and_run_dirs(tmp_path):
    """report.md and report.html open with what made the runs: the sweep's command rebuilt from the jobs'
    overrides, the swept keys (not the details a model name implies), hardware, the date range, the versions,
    the config every run shares, and relative links to the run dirs."""
    from datetime import datetime

    sweep = tmp_path / "sweep"
    sweep.mkdir()
    start = datetime(2025, 1, 2, 3, 4).timestamp()
    for i, (model, method) in enumerate(
        [("tiny_llama", "h2o"), ("tiny_llama", "knorm"), ("tiny_qwen2", "h2o"), ("tiny_qwen2", "knorm")]
    ):
        summary = _configured(model, method, 11.0, 10.0)
        summary["versions"] = {
            "kvexp": "0.1.0",
            "torch": "2.5.0",
            "transformers": "4.46.0",
            "python": "3.11.7",
        }
        summary["machine"] = {"host": "node7", "device": "x86_64", "threads": 2}
        (sweep / str(i)).mkdir()
        (sweep / str(i) / "summary.json").write_text(json.dumps(summary))
        os.utime(sweep / str(i) / "summary.json", (start + 3600 * i, start + 3600 * i))
        task = [f"model={model}", f"method={method}", "budget=64"]
        _hydra_record(sweep / str(i), task, [f"hydra.sweep.dir={sweep}", "hydra.mode=MULTIRUN"])
    out = write_report([sweep], tmp_path / "report", with_plots=False)
    md = (out / "report.md").read_text()
    assert md.startswith("# kvexp report\n")
    assert "4 in 2 comparison group(s), finished 2025-01-02 03:04 to 2025-01-02 06:04" in md
    command = (
        f"python -m kvexp -m model=tiny_llama,tiny_qwen2 method=h2o,knorm budget=64 hydra.sweep.dir={sweep}"
    )
    assert f"`{command}`" in md
    assert "- **Swept**: `method.name` = h2o, knorm; `model.name` = tiny_llama, tiny_qwen2\n" in md
    assert "- **Hardware**: dtype=float32, num_threads=2\n" in md
    assert "- **Versions**: kvexp 0.1.0, torch 2.5.0, transformers 4.46.0, python 3.11.7\n" in md
    assert "- **Machine**: node7 (x86_64, 2 threads)\n" in md
    assert (
        "- **eval**: `chunk_size=1 max_tokens=256`" in md
        and "- **budget**: `allocation=uniform tokens=64`" in md
    )
    assert "- [../sweep/0](../sweep/0): tiny_llama, wikitext2, h2o, budget 64\n" in md
    assert "- [../sweep/3](../sweep/3): tiny_qwen2, wikitext2, knorm, budget 64\n" in md
    assert md.index("## Run dirs") < md.index("### wikitext2, budget 64")
    page = (out / "report.html").read_text()
    assert "<h1>kvexp report</h1>" in page and f"<code>{command}</code>" in page
    assert '<a href="../sweep/0">../sweep/0</a>' in page


def test_tables_and_plots_have_captions_naming_what_is_compared(tmp_path):
    """A caption over each table and under each plot says what is compared with which baseline, in units."""
    _write(tmp_path, [_configured("m", "h2o", 11.0, 10.0, budget=b) for b in (64, 128)])
    out = write_report([tmp_path])
    md = (out / "report.md").read_text()
    assert (
        "*Each run at budget 64: TTFT in s, TPOT in ms (as the console prints them), decoding throughput in "
        "tokens/s, quality after compression, tokens held in the KV cache, one eviction (a layer's compression) "
        "in ms as mean ± std over the run, the KV cache's peak bytes and the peak memory (the CUDA allocator's on "
        "GPU; on CPU the process's peak RSS, which never falls within one process). `full (baseline)`: the full "
        "cache, from the full-cache pass of run `0`.*\n\n| method |"
    ) in md
    assert (
        "*% change of each run against the full cache: quality against `full (baseline)` above (lower PPL"
        in md
    )
    figures = sorted((out / "plots").glob("*.png"))
    for path in figures:  # every plot in report.md, its caption under it
        assert f"![{path.stem}](plots/{path.name})\n\n*wikitext2" in md
    assert "*wikitext2: perplexity of each method, one bar per budget; dashed line: the full cache" in md
    page = (out / "report.html").read_text()
    assert page.count("<figure>") == len(figures) > 0
    assert "<p><em>wikitext2: perplexity against the compression ratio, one line per method" in page


def test_perplexity_axes_fit_the_data_and_accuracy_starts_at_zero(tmp_path, monkeypatch):
    """Perplexities of 10 to 15 on an axis from 0 hide their differences: the axis fits them with a margin."""
    from matplotlib.figure import Figure

    limits, savefig = {}, Figure.savefig

    def spy(fig, path, **kwargs):
        limits[Path(path).name] = fig.axes[0].get_ylim()
        return savefig(fig, path, **kwargs)

    monkeypatch.setattr(Figure, "savefig", spy)
    summaries = _write(tmp_path, [_configured("m", "h2o", 11.0, 10.0), _configured("m", "knorm", 15.0, 10.0)])
    plots(rows(summaries), tmp_path / "plots")
    low, high = limits["wikitext2_perplexity_by_method.png"]
    assert 9.0 < low < 10.0 and 15.0 < high < 16.0  # the full cache's 10.0 to knorm's 15.0, a margin around
    assert limits["wikitext2_accuracy_by_method.png"][0] == 0.0


def test_timings_are_in_the_units_the_console_prints(tmp_path):
    """The console prints TTFT in s and TPOT in ms; the report's columns say and use the same units."""
    from kvexp.report import format_table

    summary = _summary("h2o", 11.0, 0.45, 256, tpot_ms=12.5)
    summary["metrics_after"]["documents"] = 1
    summary["kv_cache"].update({"compression_ratio": 0.87, "bytes_kept": 1, "bytes_full": 8})
    summary["timing"]["compress_share"] = 0.1
    console = format_table(summary)
    units = dict(line.split()[:2] for line in console.splitlines() if line.startswith(("TTFT", "TPOT")))
    assert units == {"TTFT": "s", "TPOT": "ms"}
    assert "12.5" in next(line for line in console.splitlines() if line.startswith("TPOT"))
    text = tables(_write(tmp_path, [summary]))
    assert "| method | TTFT (s) | TPOT (ms) | throughput (tok/s) |" in text
    assert (
        "| h2o | 0.5000 | 12.50 | 80.00 |" in text and "| full (baseline) | 1.0000 | 20.00 | 50.00 |" in text
    )
    assert rows(collect(tmp_path))[0]["tpot_ms"] == 12.5  # results.csv names its units too


def test_a_full_run_is_the_baseline_row_not_a_row_beside_it(tmp_path):
    """method=full in a sweep is the full cache: one `full (baseline)` row with that run's own quality and
    timings, no second `full` row, no % change of it against itself; without any full-cache pass in the other
    runs (eval.compare_to_full=false) it is still their baseline."""
    full = _configured("m", "full", 10.0, 10.0, throughput=40.0)
    full["metrics_after"]["accuracy"] = 0.5
    full["kv_cache"]["tokens_kept"] = 1999
    full["timing"]["tpot_ms"] = 25.0
    (tmp_path / "a").mkdir()
    text = tables(_write(tmp_path / "a", [_configured("m", "h2o", 11.0, 10.0), full]))
    assert [line.split("|")[1].strip() for line in text.splitlines() if line.startswith("| full")] == [
        "full (baseline)"
    ]
    assert "| full (baseline) | 0.5000 | 25.00 | 40.00 | 10.00 | 50.00% | 1999 |" in text
    assert "the full cache, from the method=full run `1`" in text
    assert "| h2o | +100.0% | -50.0% | +10.0% | -20.0% |" in text
    alone = _configured("m", "h2o", 11.0, 10.0)
    alone["metrics_before"], alone["timing_full"] = None, None
    full["metrics_before"], full["timing_full"] = None, None
    (tmp_path / "b").mkdir()
    text = tables(_write(tmp_path / "b", [alone, full]))
    assert "| full (baseline) | 0.5000 | 25.00 |" in text and "| h2o | - | - | +10.0% | -20.0% |" in text


def test_tables_show_eviction_time_and_peak_memory(tmp_path):
    summary = _summary("h2o", 11.0, 0.45, 256)
    summary["timing"].update({"eviction_ms_mean": 0.62, "eviction_ms_std": 0.022})
    summary["memory"] = {"peak_rss_bytes": 300 * 2**20, "kv_bytes_peak": 3 * 2**20}
    text = tables(_write(tmp_path, [summary]))
    assert "| KV kept | eviction (ms) | KV peak (MB) | peak memory (MB) |" in text
    assert "| 256 | 0.620 ± 0.022 | 3.0 | 300.0 |" in text
    assert "| 1999 | - | - | - |" in text  # the full-cache pass: nothing evicted, no memory of its own
    row = rows(collect(tmp_path))[0]
    assert (row["eviction_ms_mean"], row["kv_bytes_peak"], row["memory_peak_bytes"]) == (
        0.62,
        3 * 2**20,
        300 * 2**20,
    )


def test_pearson_by_hand():
    from kvexp.report import pearson

    # x = 1, 2, 3; y = 2, 4, 5: means 2 and 11/3; sxy = 3, sxx = 2, syy = 14/3 -> r = 3 / sqrt(28/3).
    assert abs(pearson([(1, 2), (2, 4), (3, 5)]) - 3 / (28 / 3) ** 0.5) < 1e-12
    assert pearson([(1, 2), (2, 4)]) is None and pearson([(1, 2), (1, 3), (1, 4)]) is None


def test_the_cluster_quality_plot_states_the_silhouette_correlation(tmp_path):
    summaries = []
    for i, (silhouette, ppl) in enumerate([(0.2, 14.0), (0.4, 12.0), (0.6, 11.0)]):
        s = _summary("semantic_cluster", ppl, 0.4, 64)
        s["budget"]["tokens"] = 64 * (i + 1)
        s["kv_cache"].update({"compression_ratio": 0.5, "method_stats": {"silhouette": silhouette}})
        summaries.append(s)
    table = rows(_write(tmp_path, summaries))
    captions = dict((path.name, caption) for path, caption in plots(table, tmp_path / "plots"))
    from kvexp.report import pearson

    r = pearson([(0.2, 14.0), (0.4, 12.0), (0.6, 11.0)])
    assert r < -0.9
    assert f"Pearson correlation r = {r:.3f} over 3 runs." in captions["wikitext2_cluster_quality.png"]


def test_swept_key_plot_labels_name_only_what_varies_within_a_method():
    """A length sweep over two methods: each line is the method at its budget, without the other method's
    parameters or its own fixed ones (they differ between methods, not within one)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from kvexp.report import _swept_key_plots

    table = []
    for method, params in (
        ("h2o", {"method.recent_ratio": 0.5}),
        ("streaming_llm", {"method.sink_tokens": 4}),
    ):
        for n, ppl in ((128, 20.0), (256, 22.0)):
            table.append(
                {"dataset": "wikitext2", "model": "m", "method": method, "budget": "64", "perplexity_after": ppl,
                 "perplexity_before": 18.0, "eval.max_tokens": n, **params}
            )  # fmt: skip
    legends = {}

    def save(fig, name, caption):
        legends[name] = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
        plt.close(fig)

    _swept_key_plots(table, save, plt)
    assert legends["wikitext2_m_perplexity_vs_eval.max_tokens"] == [
        "h2o @ 64",
        "streaming_llm @ 64",
        "full cache",
    ]


def _ruler(method, keep, cells, before=None, kept=512.0, mib=23.5, model="smollm2_135m"):
    """A RULER run's summary (two tasks, 1k): per-task scores x 100 after (and the full cache's before)."""
    summary = _configured(model, method, 0.0, 0.0)
    summary["dataset"], summary["budget"] = "ruler", {"tokens": None, "keep_ratio": keep}
    summary["config"]["budget"] = summary["budget"]

    def table(tasks, tokens, mb):
        return {"1024": {"tasks": tasks, "average": sum(tasks.values()) / len(tasks), "samples": 40,
                         "kv_tokens_kept": tokens, "kv_bytes_kept": mb * 2**20}}  # fmt: skip

    summary["ruler"] = {
        "after": table(cells, kept, mib),
        "before": table(before, 1000.0, 45.0) if before else None,
    }
    return summary


def test_ruler_tables_rank_runs_by_budget_then_average_against_the_full_cache(tmp_path):
    from kvexp.report import ruler_tables

    full = {"niah_single_1": 100.0, "niah_multikey_2": 50.0}
    summaries = _write(
        tmp_path,
        [
            _ruler("snapkv", 0.5, {"niah_single_1": 10.0, "niah_multikey_2": 20.0}, full),
            _ruler(
                "tova", 0.25, {"niah_single_1": 90.0, "niah_multikey_2": 0.0}, full, kept=256.0, mib=11.75
            ),
            _ruler("tova", 0.5, {"niah_single_1": 95.0, "niah_multikey_2": 30.0}, full),
        ],
    )
    text = ruler_tables(summaries)
    lines = [line for line in text.splitlines() if line.startswith("| ")]
    assert text.startswith("### RULER, 1024 tokens (smollm2_135m, 40 samples)")
    assert "s1 = niah_single_1, mk2 = niah_multikey_2" in text and "the full-cache pass of run `0`" in text
    assert lines[0] == "| method | budget | s1 | mk2 | average | % of full | KV kept | K/V MiB |"
    # keep 0.5 before 0.25; within a budget the best average first; % of full = average / 75
    assert lines[1:5] == [
        "| full | all | 100 | 50 | **75.0** | 100% | 1000.0 | 45.0 |",
        "| tova | keep 0.5 | 95 | 30 | **62.5** | 83% | 512.0 | 23.5 |",
        "| snapkv | keep 0.5 | 10 | 20 | **15.0** | 20% | 512.0 | 23.5 |",
        "| tova | keep 0.25 | 90 | 0 | **45.0** | 60% | 256.0 | 11.8 |",
    ]
    # the leaderboard's view: the average per budget, tova (mean 53.75) above snapkv (15.0, one budget)
    assert lines[5:] == [
        "| method | keep 0.5 | keep 0.25 |",
        "| full | 75.0 | 75.0 |",
        "| tova | 62.5 | 45.0 |",
        "| snapkv | 15.0 | - |",
    ]
    report = (write_report([tmp_path], with_plots=False) / "report.md").read_text()
    assert "## RULER" in report and lines[2] in report
    (tmp_path / "other").mkdir()
    assert ruler_tables(_write(tmp_path / "other", [_configured("tiny_llama", "h2o", 11.0, 10.0)])) == ""


def test_a_run_without_decoding_prints_no_timing_it_lacks_and_no_stderr_column(tmp_path):
    """lm-eval scoring only: no TTFT or TPOT ("-", never 0.00); its standard errors are not quality columns."""
    summary = _summary("snapkv", 0.0, 0.0, 100)
    summary["dataset"] = "lm_eval"
    summary["metrics_before"] = {"t/acc": 0.5, "t/acc_stderr": 0.1, "samples": 4}
    summary["metrics_after"] = {"t/acc": 0.25, "t/acc_stderr": 0.1, "samples": 4}
    for timing in (summary["timing"], summary["timing_full"]):
        timing.update(ttft_s=None, tpot_ms=None)
    text = tables(_write(tmp_path, [summary]))
    assert "### lm_eval, budget 256 (m, 4 samples)" in text and "stderr" not in text
    assert "| full (baseline) | - | - | 50.00 | 50.00% | 1999 |" in text
    assert "| snapkv | - | - | 100.00 | 25.00% | 100 |" in text
    assert "| snapkv | +100.0% | - | -50.0% |" in text


def test_ruler_tables_of_two_models_each_against_its_own_full_cache(tmp_path):
    """A two-model sweep: one RULER table per model, each share against that model's full cache."""
    from kvexp.report import ruler_tables

    cells = {"niah_single_1": 50.0, "niah_multikey_2": 10.0}
    summaries = _write(
        tmp_path,
        [
            _ruler("tova", 0.5, cells, {"niah_single_1": 100.0, "niah_multikey_2": 20.0}, model="tiny_llama"),
            _ruler("tova", 0.5, cells, {"niah_single_1": 60.0, "niah_multikey_2": 0.0}, model="tiny_qwen2"),
        ],
    )
    llama, qwen = ruler_tables(summaries).split("### RULER, 1024 tokens (tiny_qwen2")
    assert llama.startswith("### RULER, 1024 tokens (tiny_llama, 40 samples)\n")  # the title names the model
    assert (
        "| full | all | 100 | 20 | **60.0** | 100% |" in llama
        and "| tova | keep 0.5 | 50 | 10 | **30.0** | 50% |" in llama
    )
    assert (
        "| full | all | 60 | 0 | **30.0** | 100% |" in qwen
        and "| tova | keep 0.5 | 50 | 10 | **30.0** | 100% |" in qwen
    )


def test_no_cache_efficiency_plot_without_a_full_cache_value_to_compare_with(tmp_path):
    """A full cache scoring 0 leaves no % change to plot: no empty figure under a caption, the other plots stay."""
    for i, method in enumerate(["h2o", "knorm"]):
        summary = _summary(method, 0.0, 0.0, 100)
        summary["dataset"] = "passkey"
        summary["metrics_before"] = {"accuracy": 0.0, "samples": 3}
        summary["metrics_after"] = {"accuracy": 0.0, "samples": 3}
        summary["kv_cache"].update({"compression_ratio": 0.9, "bytes_kept": 1000})
        (tmp_path / str(i)).mkdir()
        (tmp_path / str(i) / "summary.json").write_text(json.dumps(summary))
    made = {path.name for path, _ in plots(rows(collect(tmp_path)), tmp_path / "plots")}
    assert "passkey_pareto.png" in made and "passkey_cache_efficiency.png" not in made
