"""Aggregate finished runs into a report: reads summary.json files under run/sweep dirs, never re-runs a job.

    python -m kvexp.report outputs/kvexp/multiruns/<timestamp> [more dirs] [--out-dir DIR] [--no-plots]

Writes into `--out-dir` (default: the first directory): `results.csv` (one row per run, every metric before and
after, cost figures, and a column for every config key that differs between the runs), `report.md` (a header:
when the runs finished, the command rebuilt from their overrides, the swept keys, hardware, versions, the config
they share and links to their run dirs; then one captioned table per comparison group and budget in the
kvcompress study's format: the full cache and each method, then each metric's % change against the full cache;
then, for RULER runs, its per-task tables as the leaderboards print them; then the captioned plots), the plots
(`plots/*.png`: per-metric method comparison per budget, quality vs throughput, method x metric heatmap of %
changes, cache efficiency, quality vs compression Pareto curves, cluster quality vs quality where a method
reports it) and `report.html`, the same with the plots inline, which opens
offline. A multirun writes it by itself (kvexp.callbacks). Timings are in the console's units: TTFT in s, TPOT
in ms, throughput in tokens/s.

Runs are compared only with the full cache of their own *comparison group*: the runs whose configs agree on
everything that changes the full-cache result (model, hardware, dataset, eval settings, seed, training: every
key but the compressor's `method`, `budget`, `engine` and the bookkeeping). A row is labelled by its method and
by the compressor keys that differ between the runs (`h2o (method.recent_ratio=0.2)`), so a grid never prints
two rows with one name; every numeric swept key also gets a plot of the main metric against it.
"""

from __future__ import annotations

import argparse
import base64
import html
import json
import logging
import math
import os
import re
from collections import defaultdict
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from kvexp.files import atomic_write_text
from kvexp.tasks.metrics import lower_is_better
from kvexp.tracking import atomic_write_csv

log = logging.getLogger(__name__)

# Quality metrics in display order (a metric is "higher is better" unless kvexp.tasks.metrics.lower_is_better).
QUALITY_ORDER = (
    "perplexity",
    "accuracy",
    "exact_match",
    "f1",
    "rouge.rouge1",
    "rouge.rouge2",
    "rouge.rougeL",
    "rouge.rougeLsum",
)
# Counters and bookkeeping that are not quality.
NOT_QUALITY = {"tokens", "documents", "samples", "nll", "new_tokens"}  # nll: perplexity again; counts
# Config keys that do not change the full-cache result: the compressor's (they label rows) and bookkeeping.
COMPRESSOR_KEYS = ("method", "budget", "engine")
BOOKKEEPING_KEYS = ("logger", "resume", "objective", "tags", "cache_dir", "task_name", "overwrite")
# Budget keys the tables are split by (the other budget keys, e.g. the allocation, label rows).
BUDGET_SPLIT = ("budget.tokens", "budget.keep_ratio")
_CONFIG_ROOTS = ("model", "dataset", "method", "budget", "engine", "eval", "hardware", "train")


def collect(*roots: str | Path) -> list[dict[str, Any]]:
    """Every summary.json below the given directories, in path order (each with its run dir as `run_dir`)."""
    paths = sorted(p for root in roots for p in Path(root).rglob("summary.json"))
    return [{**json.loads(p.read_text()), "run_dir": str(p.parent)} for p in paths]


def flat_config(summary: dict[str, Any]) -> dict[str, Any]:
    """The run's resolved config as dotted keys -> leaf values (lists and empty dicts as JSON text); runs
    written without a config give what the summary itself says (model, dataset, method, budget)."""
    config = summary.get("config") or {
        "model": {"name": summary["model"]},
        "dataset": {"name": summary["dataset"]},
        "method": summary["method"],
        "budget": summary["budget"],
    }
    out: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict) and node:
            for key, value in node.items():
                walk(value, f"{prefix}.{key}" if prefix else str(key))
        else:
            out[prefix] = json.dumps(node, sort_keys=True) if isinstance(node, list | dict) else node

    walk({k: v for k, v in config.items() if k not in BOOKKEEPING_KEYS}, "")
    return out


def varying_keys(summaries: list[dict[str, Any]]) -> list[str]:
    """The config keys whose values differ between the runs (a key a run lacks counts as None), sorted."""
    flats = [flat_config(s) for s in summaries]
    keys = sorted({k for f in flats for k in f})
    return [k for k in keys if len({json.dumps(f.get(k), sort_keys=True, default=str) for f in flats}) > 1]


def _is_compressor(key: str) -> bool:
    return key.split(".", 1)[0] in COMPRESSOR_KEYS


def comparison_group(summary: dict[str, Any], varying: list[str]) -> tuple[tuple[str, Any], ...]:
    """The values of the varying keys that change the full-cache result: runs with the same group share it."""
    flat = flat_config(summary)
    return tuple((k, flat.get(k)) for k in varying if not _is_compressor(k))


def label_keys(summaries: list[dict[str, Any]]) -> dict[str, list[str]]:
    """Per method, the compressor keys that differ between its runs (not the budget the tables split by):
    what tells its rows apart (a method swept alone keeps its plain name)."""
    by_method: dict[str, list[dict]] = defaultdict(list)
    for s in summaries:
        by_method[s["method"]["name"]].append(s)
    return {
        name: [k for k in varying_keys(runs) if _is_compressor(k) and k not in BUDGET_SPLIT]
        for name, runs in by_method.items()
    }


def run_label(summary: dict[str, Any], keys: dict[str, list[str]]) -> str:
    """The method's name plus the values of its label keys (`label_keys`)."""
    name, flat = summary["method"]["name"], flat_config(summary)
    parts = [f"{k}={_short(flat.get(k))}" for k in keys.get(name, [])]
    flag = " [nothing compressed]" if summary.get("nothing_compressed") else ""
    return name + (f" ({', '.join(parts)})" if parts else "") + flag


def _short(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _distinguishing(group: tuple[tuple[str, Any], ...]) -> list[tuple[str, Any]]:
    """The group's values worth naming: not the model and dataset names (titles name them anyway), nor the
    model's architecture details, which its name implies."""
    implied = ("model.name", "dataset.name")
    return [
        (k, v)
        for k, v in group
        if k not in implied and not k.startswith(("model.tiny.", "model.architecture"))
    ]


def _group_title(group: tuple[tuple[str, Any], ...]) -> str:
    """What sets the group apart, beyond the model and dataset the title names anyway."""
    parts = [f"{k}={_short(v)}" for k, v in _distinguishing(group)]
    return f" [{', '.join(parts)}]" if parts else ""


def budget_label(summary: dict[str, Any]) -> str:
    budget = summary["budget"]
    if budget.get("tokens") is not None:
        return str(budget["tokens"])
    if budget.get("keep_ratio") is not None:
        return f"keep {budget['keep_ratio']}"
    return "none"


def quality_metrics(metrics: dict[str, Any] | None) -> dict[str, float]:
    """The numeric quality metrics of a metrics dict, nested dicts flattened with dots (rouge.rouge1); not counts,
    nor standard errors."""
    out: dict[str, float] = {}
    for key, value in (metrics or {}).items():
        if isinstance(value, dict):
            out.update({f"{key}.{k}": v for k, v in quality_metrics(value).items()})
        elif (
            isinstance(value, int | float)
            and not isinstance(value, bool)
            and key not in NOT_QUALITY
            and "_stderr" not in key  # lm-eval's standard errors: how sure a metric is, not a quality
        ):
            out[key] = float(value)
    return out


def _ordered(names: set[str]) -> list[str]:
    known = [m for m in QUALITY_ORDER if m in names]
    return known + sorted(names - set(known))


def rows(summaries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One flat row per run: identity, its label and comparison group, every config key that differs between
    the runs, budget, every quality metric before/after, cost figures."""
    varying, labels = varying_keys(summaries), label_keys(summaries)
    groups = _group_names(summaries, varying)
    out = []
    for s in summaries:
        kv, timing, full_timing = s["kv_cache"], s["timing"], s.get("timing_full") or {}
        flat = flat_config(s)
        row = {
            "run_dir": s.get("run_dir"),
            "model": s["model"],
            "dataset": s["dataset"],
            "method": s["method"]["name"],
            "label": run_label(s, labels),
            "nothing_compressed": bool(s.get("nothing_compressed")),
            "group": groups[comparison_group(s, varying)],
            "budget": budget_label(s),
            "budget_tokens": s["budget"].get("tokens"),
            "keep_ratio": s["budget"].get("keep_ratio"),
            **{k: flat.get(k) for k in varying},
        }
        for name, value in quality_metrics(s.get("metrics_before")).items():
            row[f"{name}_before"] = value
        for name, value in quality_metrics(s["metrics_after"]).items():
            row[f"{name}_after"] = value
        seen = kv.get("tokens_seen") or 0
        row.update(
            {
                "tokens_seen": seen,
                "tokens_kept": kv.get("tokens_kept"),
                "compression_ratio": kv.get("compression_ratio"),
                "kv_bytes_kept": kv.get("bytes_kept"),
                "kv_bytes_full": kv.get("bytes_full"),
                "ttft_s": timing.get("ttft_s"),
                "tpot_ms": timing.get("tpot_ms"),
                "throughput_tok_s": timing.get("throughput_tok_s"),
                "ttft_s_full": full_timing.get("ttft_s"),
                "tpot_ms_full": full_timing.get("tpot_ms"),
                "throughput_tok_s_full": full_timing.get("throughput_tok_s"),
                "compress_share": timing.get("compress_share"),
                "eviction_ms_mean": timing.get("eviction_ms_mean"),
                "eviction_ms_std": timing.get("eviction_ms_std"),
                "kv_bytes_peak": (s.get("memory") or {}).get("kv_bytes_peak"),
                "memory_peak_bytes": _peak_memory(s),
            }
        )
        for name, value in ((s["kv_cache"].get("method_stats")) or {}).items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                row[f"method_stats.{name}"] = value
        out.append(row)
    return out


def _peak_memory(summary: dict[str, Any]) -> int | None:
    """The run's peak memory: the CUDA allocator's peak on GPU, the process's peak RSS on CPU."""
    memory = summary.get("memory") or {}
    return memory.get("cuda_max_allocated_bytes") or memory.get("peak_rss_bytes")


def _fmt_number(value: float | None, spec: str) -> str:
    """A timing cell: "-" where the run has none (no token decoded: no TPOT; lm-eval scoring only: no TTFT)."""
    return "-" if value is None else format(value, spec)


def _fmt_mb(value: float | None) -> str:
    return "-" if value is None else f"{value / 2**20:.1f}"


def _fmt_eviction(timing: dict[str, Any]) -> str:
    mean, std = timing.get("eviction_ms_mean"), timing.get("eviction_ms_std")
    return "-" if mean is None else f"{mean:.3f} ± {std:.3f}"


def _fmt_metric(name: str, value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}" if lower_is_better(name) else f"{100 * value:.2f}%"


def _change(value: float | None, reference: float | None) -> str:
    return f"{100 * (value - reference) / reference:+.1f}%" if value is not None and reference else "-"


def _group_names(summaries: list[dict[str, Any]], varying: list[str]) -> dict[tuple, str]:
    """A file-name-safe name per comparison group: the dataset, plus what sets the group apart when the
    dataset has several."""
    groups = sorted({comparison_group(s, varying) for s in summaries}, key=str)
    names: dict[tuple, str] = {}
    for group in groups:
        dataset = dict(group).get("dataset.name") or next(
            s["dataset"] for s in summaries if comparison_group(s, varying) == group
        )
        siblings = [g for g in groups if (dict(g).get("dataset.name") or dataset) == dataset]
        model = [("model", dict(group)["model.name"])] if "model.name" in dict(group) else []
        extra = [f"{k.rsplit('.', 1)[-1]}-{_short(v)}" for k, v in model + _distinguishing(group)]
        names[group] = _slug("_".join([str(dataset), *extra])) if len(siblings) > 1 else str(dataset)
    return names


def tables(summaries: list[dict[str, Any]]) -> str:
    """Markdown tables, one per (comparison group, budget), each under a caption: the group's full-cache baseline
    first (the method=full run itself when the group has one, else the full-cache pass of the first run), then
    each run by its label; then the % changes (quality against the baseline row, timings against the full cache
    of the same run). Timings in the console's units: TTFT in s, TPOT in ms."""
    varying, labels = varying_keys(summaries), label_keys(summaries)
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for s in summaries:
        groups[(comparison_group(s, varying), budget_label(s))].append(s)

    def order(item):
        (group, budget), runs = item
        return (runs[0]["dataset"], runs[0]["model"], str(group), _budget_sort(budget))

    out = []
    for (group, budget), runs in sorted(groups.items(), key=order):
        # The overall scores: the per-cell breakdowns (`by.<key>.<value>...`) have their own grid in the console
        # summary and their own plots, and unlabelled they would read as more overall columns.
        metrics = _ordered(
            {m for s in runs for m in quality_metrics(s["metrics_after"]) if not m.startswith("by.")}
        )
        full = next((s for s in runs if s["method"]["name"] == "full"), None)
        first = next((s for s in runs if s.get("metrics_before")), None)
        table = []  # (label, timing, quality values, kept, the same run's full-cache timing, its summary)
        source = None  # where the baseline row comes from
        if full is not None:  # the full cache's own run is the baseline: its quality and its own timings
            quality, kept = quality_metrics(full["metrics_after"]), full["kv_cache"]["tokens_kept"]
            table.append(("full (baseline)", full["timing"], quality, kept, None, full))
            source = f"the method=full run `{Path(full['run_dir']).name}`"
        elif first is not None:
            before = quality_metrics(first["metrics_before"])
            table.append(
                (
                    "full (baseline)",
                    first["timing_full"],
                    before,
                    first["kv_cache"]["tokens_seen"],
                    None,
                    None,
                )
            )
            source = f"the full-cache pass of run `{Path(first['run_dir']).name}`"
        for s in sorted((s for s in runs if s is not full), key=lambda s: run_label(s, labels)):
            table.append(
                (
                    run_label(s, labels),
                    s["timing"],
                    quality_metrics(s["metrics_after"]),
                    s["kv_cache"]["tokens_kept"],
                    s.get("timing_full"),
                    s,
                )
            )
        scored = runs[0]["metrics_after"].get("tokens") or runs[0]["metrics_after"].get("samples")
        unit = "tokens scored" if "tokens" in runs[0]["metrics_after"] else "samples"
        title = f"### {runs[0]['dataset']}, budget {budget} ({runs[0]['model']}, {scored} {unit})"
        out.append(title + _group_title(group) + "\n")
        baseline = f"`full (baseline)`: the full cache, from {source}." if source else "No full-cache result."
        out.append(
            f"*Each run at budget {budget}: TTFT in s, TPOT in ms (as the console prints them), decoding "
            f"throughput in tokens/s, quality after compression, tokens held in the KV cache, one eviction (a "
            f"layer's compression) in ms as mean ± std over the run, the KV cache's peak bytes and the peak memory "
            f"(the CUDA allocator's on GPU; on CPU the process's peak RSS, which never falls within one process). "
            f"{baseline}*\n"
        )
        names = _metric_titles(metrics)
        out.append(
            "| method | TTFT (s) | TPOT (ms) | throughput (tok/s) | "
            + " | ".join(names)
            + " | KV kept | eviction (ms) | KV peak (MB) | peak memory (MB) |"
        )
        out.append("|---" * (8 + len(metrics)) + "|")
        for name, timing, values, kept, _, run in table:
            cells = [_fmt_metric(m, values.get(m)) for m in metrics]
            kv_peak = (run.get("memory") or {}).get("kv_bytes_peak") if run else None
            out.append(
                f"| {name} | {_fmt_number(timing['ttft_s'], '.4f')} | {_fmt_number(timing['tpot_ms'], '.2f')} | "
                f"{_fmt_number(timing['throughput_tok_s'], '.2f')} | "
                + " | ".join(cells)
                + f" | {kept:.0f} | "
                f"{_fmt_eviction(timing)} | {_fmt_mb(kv_peak)} | {_fmt_mb(_peak_memory(run) if run else None)} |"
            )
        if source and len(table) > 1:
            base_values = table[0][2]
            lower = [n for m, n in zip(metrics, names, strict=True) if lower_is_better(m)]
            out.append(
                "\n*% change of each run against the full cache: quality against `full (baseline)` above"
                + (f" (lower {', '.join(lower)} is better, higher for the rest)" if lower else "")
                + ", throughput and TPOT against the full cache timed in the same run (-: timed in another "
                "process, not compared).*\n"
            )
            out.append("| method | throughput | TPOT | " + " | ".join(names) + " |")
            out.append("|---" * (3 + len(metrics)) + "|")
            for name, timing, values, _, full_timing, _ in table[1:]:
                # No full-cache timing in this run, or one from another process (n/c): "-".
                full_timing = full_timing if full_timing and full_timing.get("comparable", True) else {}
                changes = [
                    _change(timing["throughput_tok_s"], full_timing.get("throughput_tok_s")),
                    _change(timing["tpot_ms"], full_timing.get("tpot_ms")),
                    *(_change(values.get(m), base_values.get(m)) for m in metrics),
                ]
                out.append(f"| {name} | " + " | ".join(changes) + " |")
        out.append("")
    return "\n".join(out)


# RULER's task names as its leaderboards print them (niah_single_1 -> s1); the others (vt, cwe, fwe, qa_1) as they are.
_RULER_SHORT = {"niah_single_": "s", "niah_multikey_": "mk", "niah_multivalue": "mv", "niah_multiquery": "mq"}


def _ruler_title(task: str) -> str:
    for prefix, short in _RULER_SHORT.items():
        if task.startswith(prefix):
            return short + task[len(prefix) :]
    return task


def ruler_tables(summaries: list[dict[str, Any]]) -> str:
    """RULER's tables (markdown) for the runs that have them (`summary["ruler"]`), one per comparison group and
    length, as the leaderboards print them: the full cache first, then every run by budget (largest first) and
    average (best first), with the per-task scores x 100, their average, that average as % of the full cache's,
    and the KV cache a sample held at the end (entries per layer and KV head, K/V MiB; means over samples)."""
    runs = [s for s in summaries if s.get("ruler")]
    if not runs:
        return ""
    varying, labels = varying_keys(summaries), label_keys(summaries)
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for s in runs:
        for length in s["ruler"]["after"]:
            groups[(comparison_group(s, varying), length)].append(s)
    out = []
    for (group, length), members in sorted(
        groups.items(), key=lambda item: (str(item[0][0]), int(item[0][1]))
    ):
        full = next((s for s in members if s["method"]["name"] == "full"), None)
        first = next((s for s in members if (s["ruler"].get("before") or {}).get(length)), None)
        if full is not None:
            base, source = (
                full["ruler"]["after"][length],
                f"the method=full run `{Path(full['run_dir']).name}`",
            )
        elif first is not None:
            base = first["ruler"]["before"][length]
            source = f"the full-cache pass of run `{Path(first['run_dir']).name}`"
        else:
            base, source = None, None
        table = [("full", "all", base)] if base is not None else []
        others = [
            (run_label(s, labels), budget_label(s), s["ruler"]["after"][length])
            for s in members
            if s is not full
        ]
        table += sorted(others, key=_ruler_order)
        tasks = list(dict.fromkeys(t for _, _, cells in table for t in cells["tasks"]))
        model = members[0]["model"]
        out.append(
            f"### RULER, {length} tokens ({model}, {table[0][2]['samples']} samples)" + _group_title(group)
        )
        short = [t for t in tasks if _ruler_title(t) != t]
        legend = f" Task columns: {', '.join(f'{_ruler_title(t)} = {t}' for t in short)}." if short else ""
        out.append(
            "\n*RULER's score per task x 100 (string_match_all, QA string_match_part), their average over the tasks "
            "and that average as % of the full cache's"
            + (f" (`full`: {source})" if source else " (no full-cache result)")
            + "; KV kept: the entries a layer's KV head holds at the end of a sample, and K/V MiB the bytes it "
            f"holds, means over the samples.{legend}*\n"
        )
        out.append(
            "| method | budget | "
            + " | ".join(_ruler_title(t) for t in tasks)
            + " | average | % of full | KV kept | K/V MiB |"
        )
        out.append("|---" * (6 + len(tasks)) + "|")
        reference = base["average"] if base is not None else None
        for name, budget, cells in table:
            scores = " | ".join(_fmt_score(cells["tasks"].get(t)) for t in tasks)
            share = f"{100 * cells['average'] / reference:.0f}%" if reference else "-"
            kept = cells.get("kv_tokens_kept")
            kept = "-" if kept is None else f"{kept:.1f}"
            out.append(
                f"| {name} | {budget} | {scores} | **{cells['average']:.1f}** | {share} | {kept} | "
                f"{_fmt_mb(cells.get('kv_bytes_kept'))} |"
            )
        out.append("")
        out += _ruler_by_budget(table[1:] if base is not None else table, base)
    return "\n".join(out)


def _ruler_by_budget(runs: list[tuple[str, str, dict[str, Any]]], base: dict[str, Any] | None) -> list[str]:
    """The leaderboard's view of a RULER table with several budgets: each method's average per budget (columns as
    the table orders them), methods by their mean over the budgets they ran, the full cache first."""
    budgets = list(dict.fromkeys(budget for _, budget, _ in runs))
    if len(budgets) < 2:
        return []
    averages = {(name, budget): cells["average"] for name, budget, cells in runs}
    names = list(dict.fromkeys(name for name, _, _ in runs))
    mean = {
        n: sum(v for (m, _), v in averages.items() if m == n) / sum(m == n for m, _ in averages)
        for n in names
    }
    lines = [
        "*The average by budget: methods by their mean over the budgets they ran"
        + (", the full cache's average in every column" if base is not None else "")
        + ".*\n",
        "| method | " + " | ".join(budgets) + " |",
        "|---" * (1 + len(budgets)) + "|",
    ]
    if base is not None:
        lines.append("| full | " + " | ".join(f"{base['average']:.1f}" for _ in budgets) + " |")
    for name in sorted(names, key=lambda n: (-mean[n], n)):
        cells = [f"{averages[(name, b)]:.1f}" if (name, b) in averages else "-" for b in budgets]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def _ruler_order(row: tuple[str, str, dict[str, Any]]) -> tuple:
    """A RULER table's rows: token budgets before ratios, each largest first, then the best average first."""
    kind, size = _budget_sort(row[1])
    return (kind, -size, -row[2]["average"], row[0])


def _fmt_score(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def _metric_titles(metrics: list[str]) -> list[str]:
    """Column titles: a metric's last name part (`qa.f1` -> f1, `perplexity` -> PPL), its full name where two
    metrics would share a title (`qa.accuracy` and `qa_all.accuracy`)."""
    short = [{"perplexity": "PPL"}.get(m, m.split(".")[-1]) for m in metrics]
    return [m if short.count(t) > 1 else t for m, t in zip(metrics, short, strict=True)]


# -- plots ------------------------------------------------------------------------------------------------------
def plots(table: list[dict[str, Any]], out_dir: Path) -> list[tuple[Path, str]]:
    """Draw the report's figures from `rows(...)` into out_dir; returns the files written, each with its caption."""
    import matplotlib

    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[tuple[Path, str]] = []

    def save(fig, name: str, caption: str) -> None:
        path = out_dir / f"{name.replace('/', '-')}.png"  # metric keys like by.length/depth.1024/0.5 hold "/"
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append((path, caption))

    by_group: dict[str, list[dict]] = defaultdict(list)  # one comparison group: one baseline
    for r in table:
        by_group[r["group"]].append(r)
    for dataset, runs in sorted(
        by_group.items()
    ):  # `dataset`: the group's name, the dataset's if it is alone
        metrics = _ordered(  # not a config column that ends like one (method.prune_after)
            {
                k[: -len("_after")]
                for r in runs
                for k in r
                if k.endswith("_after") and k.split(".", 1)[0] not in _CONFIG_ROOTS
            }
        )
        budgets = sorted({r["budget"] for r in runs}, key=_budget_sort)
        methods = sorted({r["label"] for r in runs})
        main = metrics[0] if metrics else None
        for metric in metrics:  # per-metric method comparison, grouped by budget, the full cache as a line
            fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(methods) * len(budgets)), 4))
            width = 0.8 / max(len(budgets), 1)
            for j, budget in enumerate(budgets):
                values = [_value(runs, m, budget, f"{metric}_after") for m in methods]
                values = [float("nan") if v is None else v for v in values]  # a method not run at this budget
                ax.bar([i + j * width for i in range(len(methods))], values, width, label=f"budget {budget}")
            full = _full_value(runs, metric)
            if full is not None:
                ax.axhline(full, color="black", linestyle="--", linewidth=1, label="full cache")
            ax.set_xticks(
                [i + 0.4 - width / 2 for i in range(len(methods))], methods, rotation=60, ha="right"
            )
            caption = f"{dataset}: {metric} of each method, one bar per budget"
            caption += "; dashed line: the full cache" if full is not None else ""
            caption += f" ({_direction(metric)}"
            if lower_is_better(metric):  # a perplexity: bars from zero would hide its differences
                _fit_y(ax, [v for r in runs for v in (r.get(f"{metric}_after"), full) if v is not None])
                caption += "; the axis fits the values, it does not start at zero"
            ax.set_ylabel(metric)
            ax.set_title(f"{dataset}: {metric} by method and budget")
            ax.legend(fontsize=7)
            save(fig, f"{dataset}_{metric}_by_method", caption + ").")
        if main is None:
            continue
        # Quality vs throughput trade-off.
        fig, ax = plt.subplots(figsize=(6, 4.5))
        for m in methods:
            pts = [
                (r["throughput_tok_s"], r[f"{main}_after"])
                for r in runs
                if r["label"] == m and r.get(f"{main}_after") is not None
            ]
            if pts:
                ax.scatter(*zip(*pts, strict=True), label=m, s=18)
        _full_point(ax, runs, main)
        ax.set_xlabel("throughput (tokens/s)")
        ax.set_ylabel(main)
        ax.set_title(f"{dataset}: {main} vs throughput")
        ax.legend(fontsize=6, ncol=2)
        save(
            fig,
            f"{dataset}_tradeoff",
            f"{dataset}: {main} against decoding throughput (tokens/s), one point per run"
            + ("; star: the full cache" if _full_value(runs, main) is not None else "")
            + f" ({_direction(main)}).",
        )
        # Method x metric heatmap of % change against the full cache, per budget.
        for budget in budgets:
            grid = [
                [
                    _pct(_value(runs, m, budget, f"{metric}_after"), _full_value(runs, metric))
                    for metric in metrics
                ]
                for m in methods
            ]
            if all(v is None for row in grid for v in row):
                continue
            fig, ax = plt.subplots(figsize=(1.2 * len(metrics) + 3, 0.35 * len(methods) + 1.5))
            # Colour = harm (red: worse than the full cache, for every metric's direction); text = raw change.
            harm = [
                [
                    float("nan") if v is None else (v if lower_is_better(metric) else -v)
                    for v, metric in zip(row, metrics, strict=True)
                ]
                for row in grid
            ]
            limit = max((abs(v) for row in harm for v in row if v == v), default=1.0) or 1.0
            image = ax.imshow(harm, cmap="coolwarm", aspect="auto", vmin=-limit, vmax=limit)
            ax.set_xticks(range(len(metrics)), metrics, rotation=30, ha="right")
            ax.set_yticks(range(len(methods)), methods)
            for i, row in enumerate(grid):
                for j, v in enumerate(row):
                    if v is not None:
                        ax.text(j, i, f"{v:+.0f}%", ha="center", va="center", fontsize=7)
            fig.colorbar(image, ax=ax, label="worse than full cache (%)")
            ax.set_title(f"{dataset}, budget {budget}: % change vs full cache")
            save(
                fig,
                f"{dataset}_heatmap_{_slug(budget)}",
                f"{dataset}, budget {budget}: % change of each metric against the full cache, per method; red: "
                "worse than the full cache, blue: better, whatever the metric's direction.",
            )
        # Cache efficiency: quality change per fraction of the cache saved (none without a nonzero full-cache value).
        efficiency = {}
        for m in methods:
            pts = [
                (r["kv_bytes_kept"] / 2**20, _pct(r.get(f"{main}_after"), _full_value(runs, main)))
                for r in runs
                if r["label"] == m and r.get("kv_bytes_kept") and r.get(f"{main}_after") is not None
            ]
            if pts := [(x, y) for x, y in pts if y is not None]:
                efficiency[m] = pts
        if efficiency:
            fig, ax = plt.subplots(figsize=(6, 4.5))
            for m, pts in efficiency.items():
                ax.scatter(*zip(*pts, strict=True), label=m, s=18)
            ax.set_xlabel("KV cache held (MiB)")
            ax.set_ylabel(f"{main}: % change vs full cache")
            ax.set_title(f"{dataset}: cache efficiency")
            ax.legend(fontsize=6, ncol=2)
            save(
                fig,
                f"{dataset}_cache_efficiency",
                f"{dataset}: % change of {main} against the full cache versus the KV cache each run held (MiB).",
            )
        # Quality vs compression Pareto curves (one line per method over its budgets) and the Pareto front.
        fig, ax = plt.subplots(figsize=(6, 4.5))
        points = []
        for m in methods:
            pts = sorted(
                (r["compression_ratio"], r[f"{main}_after"])
                for r in runs
                if r["label"] == m
                and r.get("compression_ratio") is not None
                and r.get(f"{main}_after") is not None
            )
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", markersize=3, label=m)
                points += pts
        front = pareto_front(points, lower_is_better=lower_is_better(main))
        if front:
            ax.plot(*zip(*front, strict=True), color="black", linewidth=2, alpha=0.4, label="Pareto front")
        ax.set_xlabel("compression ratio (1 - kept / seen)")
        ax.set_ylabel(main)
        ax.set_title(f"{dataset}: {main} vs compression")
        ax.legend(fontsize=6, ncol=2)
        save(
            fig,
            f"{dataset}_pareto",
            f"{dataset}: {main} against the compression ratio, one line per method over its budgets; grey: the "
            f"Pareto front, the runs no other run beats on both ({_direction(main)}).",
        )
        # Cluster quality (clustering methods report a silhouette) vs quality, the H2O study's analysis.
        pts = [
            (r["method_stats.silhouette"], r[f"{main}_after"])
            for r in runs
            if r.get("method_stats.silhouette") is not None and r.get(f"{main}_after") is not None
        ]
        if pts:
            fig, ax = plt.subplots(figsize=(5, 4))
            ax.scatter(*zip(*pts, strict=True))
            ax.set_xlabel("silhouette of the key clusters")
            ax.set_ylabel(main)
            r = pearson(pts)
            ax.set_title(
                f"{dataset}: cluster quality vs {main}" + (f" (r = {r:.2f})" if r is not None else "")
            )
            correlation = (
                f" Pearson correlation r = {r:.3f} over {len(pts)} runs."
                if r is not None
                else " No correlation: fewer than 3 runs, or no spread."
            )
            save(
                fig,
                f"{dataset}_cluster_quality",
                f"{dataset}: {main} against the silhouette of the key clusters, one point per clustering run."
                + correlation,
            )
    _swept_key_plots(table, save, plt)
    return written


def pearson(points: list[tuple[float, float]]) -> float | None:
    """Pearson's correlation coefficient of (x, y) points; None for fewer than 3 points or no spread in x or y."""
    if len(points) < 3:
        return None
    n = len(points)
    mx, my = sum(x for x, _ in points) / n, sum(y for _, y in points) / n
    sxy = sum((x - mx) * (y - my) for x, y in points)
    sxx, syy = sum((x - mx) ** 2 for x, _ in points), sum((y - my) ** 2 for _, y in points)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else None


def _swept_key_plots(table: list[dict[str, Any]], save, plt) -> None:
    """The main metric against every numeric config key the runs were swept over (an H2O heavy/recent split,
    a cluster count K, a length ...), one line per method and budget with the other keys fixed, per dataset
    and model; for a key that changes the baseline (a length), the full cache as a black line."""
    keys = [k for k in (table[0] if table else {}) if "." in k and k.split(".", 1)[0] in _CONFIG_ROOTS]
    by_data: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in table:
        by_data[(r["dataset"], r["model"])].append(r)
    for (dataset, model), runs in sorted(by_data.items()):
        main = next((m for m in QUALITY_ORDER if any(r.get(f"{m}_after") is not None for r in runs)), None)
        if main is None:
            continue
        for key in keys:
            if key in BUDGET_SPLIT or key.endswith((".name", ".architecture")):
                continue
            values = {r.get(key) for r in runs} - {None}  # None: a run without the key (another method)
            if len(values) < 2 or not all(
                isinstance(v, int | float) and not isinstance(v, bool) for v in values
            ):
                continue
            # One line per method, budget and value of every other key that varies here (named in the label).
            # A key varies when it takes two values among one method's runs (another method's parameters do not).
            others = [
                k
                for k in keys
                if k != key
                and any(
                    len({str(r.get(k)) for r in runs if r["method"] == m}) > 1
                    for m in {r["method"] for r in runs}
                )
            ]
            # Against a key that changes the baseline (a length), the decode step's time too: quality and TPOT
            # against length per method is the length-scaling study.
            plotted = [(main, f"{main}_after", f"{main}_before")]
            if not _is_compressor(key):
                plotted.append(("tpot_ms", "tpot_ms", "tpot_ms_full"))
            for metric, after, before in plotted:
                series: dict[tuple, list[tuple[float, float]]] = defaultdict(list)
                full: dict[float, float] = {}
                for r in runs:
                    if r.get(after) is None or r.get(key) is None:
                        continue
                    rest = tuple((k.rsplit(".", 1)[-1], r.get(k)) for k in others if r.get(k) is not None)
                    series[(r["method"], r["budget"], rest)].append((r[key], r[after]))
                    if not _is_compressor(key) and r.get(before) is not None:
                        full[r[key]] = r[before]
                if not series:
                    continue
                fig, ax = plt.subplots(figsize=(6, 4.5))
                for (method, budget, rest), pts in sorted(series.items(), key=str):
                    label = f"{method} @ {budget}" + "".join(f", {k}={_short(v)}" for k, v in rest)
                    ax.plot(*zip(*sorted(pts), strict=True), marker="o", markersize=3, label=label)
                if full:
                    ax.plot(
                        *zip(*sorted(full.items()), strict=True),
                        color="black",
                        linestyle="--",
                        label="full cache",
                    )
                ax.set_xlabel(key)
                ax.set_ylabel("TPOT (ms)" if metric == "tpot_ms" else metric)
                ax.set_title(f"{dataset} ({model}): {metric} vs {key}")
                ax.legend(fontsize=6, ncol=2)
                what = (
                    "the decode step's time (TPOT, ms; lower is better)"
                    if metric == "tpot_ms"
                    else f"{metric} ({_direction(metric)})"
                )
                save(
                    fig,
                    f"{dataset}_{model}_{metric}_vs_{key}",
                    f"{dataset} ({model}): {what} against the swept `{key}`, one line per method and budget"
                    + ("; dashed: the full cache at each value" if full else "")
                    + ".",
                )


def _direction(metric: str) -> str:
    return "lower is better" if lower_is_better(metric) else "higher is better"


def _fit_y(ax, values: list[float]) -> None:
    """The y axis around the values with a 10% margin, not from zero."""
    if not values:
        return
    low, high = min(values), max(values)
    margin = 0.1 * (high - low) or 0.05 * abs(high) or 1.0
    ax.set_ylim(low - margin, high + margin)


def pareto_front(points: list[tuple[float, float]], lower_is_better: bool) -> list[tuple[float, float]]:
    """The points no other point beats on both axes (more compression and better quality), by compression."""
    front, best = [], None
    for x, y in sorted(points, key=lambda p: (-p[0], p[1] if lower_is_better else -p[1])):
        if best is None or (y < best if lower_is_better else y > best):
            front.append((x, y))
            best = y
    return sorted(front)


def _value(runs: list[dict], label: str, budget: str, key: str) -> float | None:
    found = [r[key] for r in runs if r["label"] == label and r["budget"] == budget and r.get(key) is not None]
    return found[0] if found else None


def _full_value(runs: list[dict], metric: str) -> float | None:
    found = [r[f"{metric}_before"] for r in runs if r.get(f"{metric}_before") is not None]
    return found[0] if found else None


def _full_point(ax, runs: list[dict], metric: str) -> None:
    full = [
        (r["throughput_tok_s_full"], r[f"{metric}_before"])
        for r in runs
        if r.get(f"{metric}_before") is not None
    ]
    if full:
        ax.scatter(*full[0], marker="*", s=120, color="black", label="full cache")


def _pct(value: float | None, reference: float | None) -> float | None:
    return 100 * (value - reference) / reference if value is not None and reference else None


def _budget_sort(label: str) -> tuple[int, float]:
    if label.isdigit():
        return (0, float(label))
    if label.startswith("keep "):
        return (1, float(label.split()[1]))
    return (2, 0.0)


def _slug(text: str) -> str:
    return text.replace(" ", "_")


# -- the report ---------------------------------------------------------------------------------------------------
def format_table(summary: dict[str, Any]) -> str:
    """A readable before/after table of quality and cost (and, for generation, scores per reported group)."""
    before, after = summary["metrics_before"] or {}, summary["metrics_after"]
    timing, full_timing = summary["timing"], summary.get("timing_full") or {}
    kv = summary["kv_cache"]
    label = f"{summary['method']['name']}"
    if summary.get("task", "perplexity") == "perplexity":
        rows = [
            ("perplexity", before.get("perplexity"), after["perplexity"]),
            ("next-token accuracy", before.get("accuracy"), after["accuracy"]),
            ("tokens evaluated", before.get("tokens"), after["tokens"]),
            ("KV tokens kept (mean)", kv["tokens_seen"] / max(after["documents"], 1), kv["tokens_kept"]),
        ]
    elif summary["task"] == "lm_eval":  # lm-eval's metrics, flattened to task/metric
        rows = [(k, before.get(k), v) for k, v in after.items() if isinstance(v, float | int)]
        rows.append(("KV tokens kept (mean)", kv["tokens_seen"], kv["tokens_kept"]))
    else:
        rows = [
            (f"{f} {k}", before.get(f, {}).get(k), v)
            for f, scores in _families(after)
            for k, v in scores.items()
        ]
        rows += [
            ("samples", before.get("samples"), after["samples"]),
            ("answer tokens (mean)", before.get("new_tokens"), after["new_tokens"]),
            ("KV tokens kept (mean)", kv["tokens_seen"] / max(after["samples"], 1), kv["tokens_kept_mean"]),
        ]
    timed = full_timing.get("comparable", True)  # full-cache timings from another process are not compared
    rows += [
        ("TTFT s", full_timing.get("ttft_s") if timed else None, timing["ttft_s"]),
        ("TPOT ms", full_timing.get("tpot_ms") if timed else None, timing["tpot_ms"]),
        (
            "throughput tok/s",
            full_timing.get("throughput_tok_s") if timed else None,
            timing["throughput_tok_s"],
        ),
    ]
    for grouping, groups in after.get("by", {}).items():  # the first score of each family, per group
        for value, scores in groups.items():
            for family, values in _families(scores):
                key = next(iter(values))
                b = before.get("by", {}).get(grouping, {}).get(value, {}).get(family, {}).get(key)
                rows.append((f"{key} {grouping}={value}", b, values[key]))
    width, name_width = max(len(label), 12), max(24, *(len(name) + 2 for name, _, _ in rows))
    lines = [f"{'':{name_width}}{'full':>14}{label:>{width + 2}}{'change':>10}"]
    for name, b, a in rows:
        change = f"{100 * (a - b) / b:+.1f}%" if isinstance(a, float | int) and b not in (None, 0) else ""
        lines.append(f"{name:{name_width}}{_fmt(b):>14}{_fmt(a):>{width + 2}}{change:>10}")
    if not timed:
        lines.append(
            "full-cache timings come from another run (reused results): not compared; rerun with cache_dir=null"
        )
    if summary.get("nothing_compressed"):
        lines.append("NOTHING COMPRESSED: the budget is at or above the evaluated length (see the log)")
    lines.append(
        f"compression ratio {kv['compression_ratio']:.3f}; KV bytes {kv['bytes_kept']:,} kept of {kv['bytes_full']:,}; "
        f"{100 * timing['compress_share']:.1f}% of the time inside the method"
    )
    return "\n".join(lines)


def _families(metrics: dict[str, Any]) -> list[tuple[str, dict[str, float]]]:
    """The (metric family, {score: mean}) entries of a generation metrics dict."""
    return [(k, v) for k, v in metrics.items() if isinstance(v, dict) and k != "by"]


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def write_report(dirs: list[str | Path], out_dir: str | Path | None = None, with_plots: bool = True) -> Path:
    """results.csv, report.md, plots/ and a self-contained report.html for the runs under `dirs`."""
    summaries = collect(*dirs)
    if not summaries:
        raise ValueError(f"no summary.json under {', '.join(map(str, dirs))}: nothing to report")
    out = Path(out_dir if out_dir is not None else dirs[0])
    table = rows(summaries)
    atomic_write_csv(out / "results.csv", table, fieldnames=_fieldnames(table))
    markdown = header(summaries, out) + "\n## Tables\n\n" + tables(summaries)
    ruler = ruler_tables(summaries)
    if ruler:
        markdown += "\n## RULER\n\n" + ruler
    figures = plots(table, out / "plots") if with_plots else []
    current = {path for path, _ in figures}
    for stale in (out / "plots").glob(
        "*.png"
    ):  # an earlier report's figures: gone, not shown or uploaded again
        if stale not in current:
            stale.unlink()
    if figures:
        markdown += "\n## Plots\n\n" + "\n".join(
            f"![{path.stem}]({path.relative_to(out).as_posix()})\n\n*{caption}*\n"
            for path, caption in figures
        )
    atomic_write_text(out / "report.md", markdown)
    atomic_write_text(out / "report.html", _html(markdown, out))
    log.info("report of %d runs written to %s", len(summaries), out)
    return out


def header(summaries: list[dict[str, Any]], out_dir: Path) -> str:
    """What the report covers, in markdown: how many runs finished when, the command that made them (rebuilt from
    their `.hydra/hydra.yaml`), the keys they sweep, the hardware, the versions, the config they share and links
    to their run dirs (relative to out_dir, where the report is written)."""
    flats, varying = [flat_config(s) for s in summaries], varying_keys(summaries)
    finished = sorted(
        datetime.fromisoformat(s["finished"]).timestamp()
        if s.get("finished")
        else Path(s["run_dir"], "summary.json").stat().st_mtime
        for s in summaries
    )  # summary.json's `finished`, else (older runs) the file's time
    when = " to ".join(
        dict.fromkeys(
            datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M") for t in (finished[0], finished[-1])
        )
    )
    groups = {comparison_group(s, varying) for s in summaries}
    lines = [
        "# kvexp report",
        "",
        f"- **Runs**: {len(summaries)} in {len(groups)} comparison group(s), finished {when} (summary.json times)",
    ]
    command = _command(summaries)
    if command:
        lines.append(f"- **Command** (rebuilt from the runs' `.hydra/hydra.yaml`): `{command}`")
    # Swept: two values or more (not a key only some methods have); a model's or dataset's details
    # (architecture, hub id ...) vary with its name: the name says it.
    implied = tuple(f"{root}." for root in ("model", "dataset") if f"{root}.name" in varying)
    swept = [
        k
        for k in varying
        if len(_values(flats, k)) > 1 and (not k.startswith(implied) or k.endswith(".name"))
    ]
    if swept:
        lines.append("- **Swept**: " + "; ".join(f"`{k}` = {', '.join(_values(flats, k))}" for k in swept))
    hardware = sorted({k for f in flats for k in f if k.startswith("hardware.")})
    if hardware:
        parts = [f"{k.split('.', 1)[1]}={' / '.join(_values(flats, k))}" for k in hardware]
        lines.append("- **Hardware**: " + ", ".join(p for p in parts if not p.endswith("=")))
    machines = sorted(
        {f"{m['host']} ({m['device']}, {m['threads']} threads)" for s in summaries if (m := s.get("machine"))}
    )
    if machines:
        lines.append("- **Machine**: " + "; ".join(machines))
    versions = [s["versions"] for s in summaries if s.get("versions")]
    if versions:
        names = list(dict.fromkeys(k for v in versions for k in v))
        lines.append(
            "- **Versions**: "
            + ", ".join(f"{k} {' / '.join(dict.fromkeys(str(v.get(k)) for v in versions))}" for k in names)
        )
    shared: dict[str, list[str]] = defaultdict(list)  # config root -> key=value, for the keys no run changes
    for key in sorted({k for f in flats for k in f} - set(varying)):
        if not key.startswith("hardware.") and flats[0].get(key) is not None:
            root, _, rest = key.partition(".")
            shared[root].append(f"{rest or root}={_short(flats[0][key])}")
    if shared:
        lines += ["", "## Config shared by every run", "", "*Null values left out.*", ""]
        lines += [f"- **{root}**: `{' '.join(items)}`" for root, items in shared.items()]
    labels = label_keys(summaries)
    lines += ["", "## Run dirs", ""]
    for s in summaries:
        link = Path(os.path.relpath(s["run_dir"], out_dir)).as_posix()
        lines.append(
            f"- [{link}]({link}): {s['model']}, {s['dataset']}, {run_label(s, labels)}, budget {budget_label(s)}"
        )
    return "\n".join(lines) + "\n"


def _values(flats: list[dict[str, Any]], key: str) -> list[str]:
    """The distinct values of a config key over the runs, in run order (runs without it left out)."""
    return list(dict.fromkeys(_short(f[key]) for f in flats if f.get(key) is not None))


def _command(summaries: list[dict[str, Any]]) -> str | None:
    """`python -m kvexp` with every override the runs were made with, a key's values comma-joined as a sweep
    takes them, from each run dir's `.hydra/hydra.yaml`; None when no run dir holds one."""
    task: dict[str, list[str]] = defaultdict(list)
    hydra: dict[str, list[str]] = defaultdict(list)
    multirun = False
    for s in summaries:
        path = Path(s["run_dir"], ".hydra", "hydra.yaml")
        if not path.is_file():
            continue
        record = yaml.safe_load(path.read_text())["hydra"]
        multirun |= record.get("mode") == "MULTIRUN"
        for overrides, kind in ((task, "task"), (hydra, "hydra")):
            for item in record["overrides"][kind]:
                key, _, value = item.partition("=")
                if key != "hydra.mode" and value not in overrides[key]:
                    overrides[key].append(value)
    if not task and not hydra:
        return None
    multirun |= any(len(values) > 1 for values in task.values())
    args = [f"{k}={','.join(v)}" for k, v in (*task.items(), *hydra.items())]
    return " ".join(["python -m kvexp", *(["-m"] if multirun else []), *args])


def _fieldnames(table: list[dict]) -> list[str]:
    names: dict[str, None] = {}
    for r in table:
        names.update(dict.fromkeys(r))
    return list(names)


def _html(markdown: str, out_dir: Path) -> str:
    """The report's markdown as HTML, the figures inline (base64), so the file opens anywhere offline."""
    body = []
    lines = markdown.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        image = re.fullmatch(r"!\[(.*)\]\((.+)\)", line)
        if line.startswith("|"):
            block = []
            while i < len(lines) and lines[i].startswith("|"):
                block.append([html.escape(c.strip()) for c in lines[i].strip("|").split("|")])
                i += 1
            head, rest = block[0], block[2:]
            body.append(
                "<table><tr>"
                + "".join(f"<th>{c}</th>" for c in head)
                + "</tr>"
                + "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rest)
                + "</table>"
            )
            continue
        if line.startswith("- "):
            items = []
            while i < len(lines) and lines[i].startswith("- "):
                items.append(f"<li>{_inline(lines[i][2:])}</li>")
                i += 1
            body.append(f"<ul>{''.join(items)}</ul>")
            continue
        if image:
            data = base64.b64encode((out_dir / image[2]).read_bytes()).decode()
            body.append(
                f'<figure><img alt="{html.escape(image[1])}" src="data:image/png;base64,{data}"></figure>'
            )
        elif line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            body.append(f"<h{level}>{_inline(line[level:].strip())}</h{level}>")
        elif line:
            body.append(f"<p>{_inline(line)}</p>")
        i += 1
    style = (
        "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin:1em 0}"
        "td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}img{max-width:100%}"
        "code{background:#f4f4f4}"
    )
    return f"<!doctype html><html><head><meta charset='utf-8'><title>kvexp report</title><style>{style}</style></head><body>{''.join(body)}</body></html>"


def _inline(text: str) -> str:
    """Markdown's inline marks the report uses (code, bold, italics, links) as HTML."""
    text = html.escape(text, quote=False)
    text = re.sub(r"`([^`]+)`", r"<code>\1</code>", text)
    text = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", text)
    text = re.sub(r"\*(.+?)\*", r"<em>\1</em>", text)
    return re.sub(r"\[([^\]]+)\]\(([^)]+)\)", r'<a href="\2">\1</a>', text)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("dirs", nargs="+", help="run or multirun directories")
    parser.add_argument("--out-dir", help="where the report files go (default: the first directory)")
    parser.add_argument("--out", help="also write the markdown tables to this file")
    parser.add_argument("--no-plots", action="store_true", help="tables and results.csv only")
    args = parser.parse_args()
    out = write_report(args.dirs, args.out_dir, with_plots=not args.no_plots)
    text = (out / "report.md").read_text()
    print(text)
    if args.out:
        atomic_write_text(Path(args.out), text)


if __name__ == "__main__":
    main()
