"""The report reads finished runs and computes the % changes against the full cache."""

import json

from kvexp.report import collect, tables


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
    assert "| full (baseline) | 1.0000 | 0.0200 | 50.00 | 10.00 | 50.00% | 1999 |" in text
    assert "| h2o | 0.5000 | 0.0100 | 100.00 | 11.00 | 45.00% | 256 |" in text
    assert "| h2o | +100.0% | -50.0% | +10.0% | -10.0% |" in text  # throughput, TPOT, PPL, accuracy
    assert "| knorm | +100.0% | -50.0% | +50.0% | -20.0% |" in text


def test_analysis_notebook_runs_on_finished_runs(tmp_path, monkeypatch):
    """notebooks/budget_vs_perplexity.ipynb executes top to bottom on run dirs (headless backend)."""
    from pathlib import Path

    import matplotlib

    matplotlib.use("Agg")
    for i, (method, budget, ppl) in enumerate([("h2o", 256, 11.0), ("h2o", 512, 10.5), ("knorm", 256, 15.0)]):
        summary = _summary(method, ppl, 0.4, budget)
        summary["budget"]["tokens"] = budget
        (tmp_path / str(i)).mkdir()
        (tmp_path / str(i) / "summary.json").write_text(json.dumps(summary))
    notebook = json.loads(
        (Path(__file__).parents[1] / "notebooks" / "budget_vs_perplexity.ipynb").read_text()
    )
    code = ["".join(c["source"]) for c in notebook["cells"] if c["cell_type"] == "code"]
    code[0] = code[0].replace('Path("../outputs")', f"Path({str(tmp_path)!r})")
    scope: dict = {}
    for source in code:
        exec(compile(source, "notebook", "exec"), scope)
    assert len(scope["summaries"]) == 3
    assert sorted(scope["curves"][("wikitext2", "h2o")]) == [(256, 11.0), (512, 10.5)]
    assert scope["full"] == {"wikitext2": 10.0}
