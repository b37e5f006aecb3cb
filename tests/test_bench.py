"""`make bench` (kvexp.bench) in a smoke run on a tiny random model, and its op counter against a hand count."""

import json

import pytest
import torch

from kvexp import bench


def test_op_counter_counts_each_dispatched_op():
    with bench.OpCounter() as counter:
        x = torch.ones(3)  # aten.ones
        y = (x + 1).sum()  # aten.add.Tensor, aten.sum
        y.view(1)  # aten.view
    assert counter.ops == {
        "aten.ones.default": 1,
        "aten.add.Tensor": 1,
        "aten.sum.default": 1,
        "aten.view.default": 1,
    }


def test_bench_smoke_run_writes_every_section(tmp_path):
    args = ["--model", "tiny_llama", "--context", "192", "--short-context", "64", "--p2-context", "128",
            "--p5-tokens", "48", "--budget", "48", "--chunk", "16", "--steps", "4", "--warmup", "1", "--repeats", "1",
            "--op-steps", "6", "--skip-p3", "--methods", "streaming_llm,h2o", "--compiled-methods", "h2o",
            "--prefill-methods", "snapkv", "--attention-methods", "observed_attention", "--step-methods", "h2o", "--p5-methods", "h2o", "--out", str(tmp_path),
            "--p6-methods", "h2o,pyramidinfer", "--p6-length", "2048", "--p6-samples", "1", "--p6-batch", "4",
            "--p6-budget", "64", "--p7-length", "96", "--p7-batch", "3", "--p7-repeats", "1",
            "--p8-methods", "streaming_llm", "--p8-limit", "3", "--p8-batch", "2"]  # fmt: skip
    results = bench.main(args)
    written = json.loads((tmp_path / "bench.json").read_text())
    assert set(written["P1"]) == {
        "plain@64",
        "plain@192",
        "streaming_llm@192/48",
        "h2o@192/48",
        "h2o@192/48 compiled",
    }
    assert written["P1"]["h2o@192/48 compiled"]["kept"] == 48
    assert written["P4"].keys() == {"plain", "streaming_llm", "h2o"}
    layers = 2  # tiny_llama
    for name, r in written["P4"].items():
        assert r["ops_per_step"] == r["ops_per_layer"] * layers
        if name != "plain":
            assert r["evictions_per_step"] == 1.0  # a full cache: every layer evicts once per step
            assert r["ratio_to_plain"] == r["ops_per_step"] / written["P4"]["plain"]["ops_per_step"]
            assert r["extra_per_layer"] > 0  # eviction is not free
    text = (tmp_path / "bench.md").read_text()
    assert "**P4 aten ops per decode step**" in text and "| h2o |" in text and "<= 1.15:" in text
    assert set(results) >= {"P1", "P2", "P4", "P5", "P6"}
    p2 = written["P2"]
    assert p2.keys() == {"snapkv prefill@128", "observed_attention prefill@128", "h2o decode@64/48"}
    assert [
        p2[name]["attention_sums"] for name in ("snapkv prefill@128", "observed_attention prefill@128")
    ] == [
        False,
        True,
    ]
    assert all(0 < r["share"] < 1 for r in p2.values())  # the method's seconds are part of the step's
    assert "| snapkv prefill@128 |" in text and "| <= 3%: " in text
    assert (
        "none: a second attention pass" in text.split("| observed_attention prefill@128 |")[1].split("\n")[0]
    )
    p6 = written["P6"]
    assert p6.keys() == {"h2o budget=64", "h2o keep_0.5", "pyramidinfer budget=64", "pyramidinfer keep_0.5"}
    for r in p6.values():
        assert r["same_answers"] == r["samples"] == 11  # RULER's tasks that need no download, one sample each
        assert r["ratio"] == pytest.approx(r["samples_per_s_batched"] / r["samples_per_s_one"])
    assert (
        p6["h2o budget=64"]["batches"] == p6["pyramidinfer budget=64"]["batches"] == 3
    )  # 11 rows in batches of 4
    # keep 0.5 gives the prompts their own budgets: H2O keeps a budget per row (its recent window each row's share),
    # PyramidInfer's recent window (a share of the largest layer budget) batches equal budgets only.
    assert p6["h2o keep_0.5"]["budgets"] > 1 and p6["h2o keep_0.5"]["batches"] == 3
    assert p6["pyramidinfer keep_0.5"]["batches"] > 3
    assert "**P6 batched generation**" in text and "| h2o keep_0.5 | 11 |" in text
    p7 = written["P7"]
    assert p7.keys() == {"plain", "full cache"} and p7["plain"]["ratio_to_plain"] == 1.0
    assert p7["full cache"]["tokens"] == 96 + 72 + 48 and p7["full cache"]["rows"] == 3  # 96 down to half
    assert p7["full cache"]["ratio_to_plain"] == p7["full cache"]["seconds"] / p7["plain"]["seconds"]
    assert "**P7 padded prefill** (3 prompts of 96 down to 48 tokens" in text and "| full cache |" in text
    p8 = written["P8"]["streaming_llm"]
    # 3 documents x (4 choices + 1 generation + 1 rolling log): every request batched as alone, the same task metrics
    assert p8["requests"] == p8["same_results"] == 18 and p8["same_metrics"]
    assert p8["ratio"] == pytest.approx(p8["tokens_per_s_batched"] / p8["tokens_per_s_one"])
    assert (
        "**P8 batched lm-eval** (kvexp_recall, kvexp_recall_gen, kvexp_recall_ppl, 3 documents each" in text
    )
    assert "| streaming_llm | 18 |" in text


def test_gpu_suite_smoke_run_on_the_cpu(tmp_path):
    """`python -m kvexp.bench --suite gpu --smoke`: the GPU suite's code path on a tiny shape (figures meaningless)."""
    results = bench.main(["--suite", "gpu", "--smoke", "--batches", "1,2", "--methods", "streaming_llm,h2o,kivi",
                          "--compiled-methods", "h2o", "--out", str(tmp_path)])  # fmt: skip
    written = json.loads((tmp_path / "bench_gpu.json").read_text())
    assert written["runs"].keys() == {"tiny, batch 1", "tiny, batch 2"} == results["runs"].keys()
    for run in written["runs"].values():
        decode = run["decode"]
        methods = {
            "streaming_llm@128/48 eager",
            "h2o@128/48 eager",
            "kivi@128/48 eager",
            "h2o@128/48 compiled",
        }
        assert set(decode) == {"plain@48", "plain@128"} | methods
        assert decode["plain@48"]["vs_plain_short"] == 1.0
        assert [decode[name]["kept"] for name in sorted(methods)] == [48] * 4  # the budget, after 128 tokens
        # Every timed step evicts one entry per layer: the compiled case ran them all compiled.
        assert decode["h2o@128/48 compiled"]["compiled_steps"] == (3 + 1) * 2
        assert decode["h2o@128/48 eager"]["compiled_steps"] == 0
        chunked = run["prefill"]["chunked/16"]
        assert chunked["peak_kv_ratio"] <= 1.0  # chunked prefill holds at most budget + chunk
        assert run["prefill"]["one-shot"]["peak_kv_ratio"] == 128 / (48 + 16)  # the whole prompt, once
    text = (tmp_path / "bench_gpu.md").read_text()
    assert "**tiny, batch 2: decode**" in text and "<= 1.1:" in text and "| chunked/16 |" in text


def test_bench_cases_are_checked_before_the_model_loads():
    with pytest.raises(SystemExit, match="P5 compares with P1's plain decode"):
        bench.main(["--cases", "P5", "--model", "no_such_model"])
    with pytest.raises(SystemExit, match="--cases must name some of P1, P2, P3, P4, P5, P6, P7, P8"):
        bench.main(["--cases", "P9", "--model", "no_such_model"])
