"""Aggregate finished runs into a report: reads summary.json files under run/sweep dirs, never re-runs a job.

    python -m kvexp.report outputs/kvexp/multiruns/<timestamp> [more dirs] [--out-dir DIR] [--no-plots]

Writes into `--out-dir` (default: the first directory): `results.csv` (one row per run, every metric before and
after, cost figures), `report.md` (one table per (dataset, budget) in the kvcompress study's format: the full cache and
each method, then each metric's % change against the full cache), the plots (`plots/*.png`: per-metric method
comparison per budget, quality vs throughput, method x metric heatmap of % changes, cache efficiency, quality vs
compression Pareto curves, cluster quality vs quality where a method reports it) and `report.html`, which holds
the tables and the plots inline and opens offline. A multirun writes it by itself (kvexp.callbacks).
"""

from __future__ import annotations

import argparse
import base64
import html
import json
import logging
from collections import defaultdict
from pathlib import Path
from typing import Any

from kvexp.tracking import atomic_write_csv, atomic_write_text

log = logging.getLogger(__name__)

# Quality metrics in display order; a metric is "higher is better" unless listed in LOWER_IS_BETTER.
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
LOWER_IS_BETTER = {"perplexity"}
# Counters and bookkeeping that are not quality.
NOT_QUALITY = {"tokens", "documents", "samples", "nll"}  # nll: perplexity again


def collect(*roots: str | Path) -> list[dict[str, Any]]:
    """Every summary.json below the given directories, in path order (each with its run dir as `run_dir`)."""
    paths = sorted(p for root in roots for p in Path(root).rglob("summary.json"))
    return [{**json.loads(p.read_text()), "run_dir": str(p.parent)} for p in paths]


def budget_label(summary: dict[str, Any]) -> str:
    budget = summary["budget"]
    if budget.get("tokens") is not None:
        return str(budget["tokens"])
    if budget.get("keep_ratio") is not None:
        return f"keep {budget['keep_ratio']}"
    return "none"


def quality_metrics(metrics: dict[str, Any] | None) -> dict[str, float]:
    """The numeric quality metrics of a metrics dict, nested dicts flattened with dots (rouge.rouge1)."""
    out: dict[str, float] = {}
    for key, value in (metrics or {}).items():
        if isinstance(value, dict):
            out.update({f"{key}.{k}": v for k, v in quality_metrics(value).items()})
        elif isinstance(value, int | float) and not isinstance(value, bool) and key not in NOT_QUALITY:
            out[key] = float(value)
    return out


def _ordered(names: set[str]) -> list[str]:
    known = [m for m in QUALITY_ORDER if m in names]
    return known + sorted(names - set(known))


def rows(summaries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One flat row per run: identity, budget, every quality metric before/after, cost figures."""
    out = []
    for s in summaries:
        kv, timing, full_timing = s["kv_cache"], s["timing"], s.get("timing_full") or {}
        row = {
            "run_dir": s.get("run_dir"),
            "model": s["model"],
            "dataset": s["dataset"],
            "method": s["method"]["name"],
            "budget": budget_label(s),
            "budget_tokens": s["budget"].get("tokens"),
            "keep_ratio": s["budget"].get("keep_ratio"),
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
            }
        )
        for name, value in ((s["kv_cache"].get("method_stats")) or {}).items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                row[f"method_stats.{name}"] = value
        out.append(row)
    return out


def _fmt_metric(name: str, value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}" if name in LOWER_IS_BETTER else f"{100 * value:.2f}%"


def _change(value: float | None, reference: float | None) -> str:
    return f"{100 * (value - reference) / reference:+.1f}%" if value is not None and reference else "-"


def tables(summaries: list[dict[str, Any]]) -> str:
    """Markdown tables, one per (dataset, budget), the full-cache baseline first, then the % changes."""
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for s in summaries:
        groups[(s["dataset"], budget_label(s))].append(s)
    out = []
    for (dataset, budget), runs in sorted(groups.items()):
        metrics = _ordered({m for s in runs for m in quality_metrics(s["metrics_after"])})
        first = next((s for s in runs if s.get("metrics_before")), None)
        table = []
        if first is not None:
            before = quality_metrics(first["metrics_before"])
            table.append(("full (baseline)", first["timing_full"], before, first["kv_cache"]["tokens_seen"]))
        for s in sorted(runs, key=lambda s: s["method"]["name"]):
            table.append(
                (
                    s["method"]["name"],
                    s["timing"],
                    quality_metrics(s["metrics_after"]),
                    s["kv_cache"]["tokens_kept"],
                )
            )
        scored = runs[0]["metrics_after"].get("tokens") or runs[0]["metrics_after"].get("samples")
        unit = "tokens scored" if "tokens" in runs[0]["metrics_after"] else "samples"
        out.append(f"### {dataset}, budget {budget} ({runs[0]['model']}, {scored} {unit})\n")
        names = [_metric_title(m) for m in metrics]
        out.append(
            "| method | TTFT (s) | TPOT (s) | throughput (tok/s) | " + " | ".join(names) + " | KV kept |"
        )
        out.append("|---" * (5 + len(metrics)) + "|")
        for name, timing, values, kept in table:
            cells = [_fmt_metric(m, values.get(m)) for m in metrics]
            out.append(
                f"| {name} | {timing['ttft_s']:.4f} | {(timing['tpot_ms'] or 0.0) / 1000:.4f} | "
                f"{timing['throughput_tok_s']:.2f} | " + " | ".join(cells) + f" | {kept:.0f} |"
            )
        if first is not None:
            base_timing, base_values = table[0][1], table[0][2]
            out.append("\n| method | throughput | TPOT | " + " | ".join(names) + " |")
            out.append("|---" * (3 + len(metrics)) + "|")
            for name, timing, values, _ in table[1:]:
                changes = [
                    _change(timing["throughput_tok_s"], base_timing["throughput_tok_s"]),
                    _change(timing["tpot_ms"], base_timing["tpot_ms"]),
                    *(_change(values.get(m), base_values.get(m)) for m in metrics),
                ]
                out.append(f"| {name} | " + " | ".join(changes) + " |")
        out.append("")
    return "\n".join(out)


def _metric_title(name: str) -> str:
    return {"perplexity": "PPL"}.get(name, name.split(".")[-1])


# -- plots ------------------------------------------------------------------------------------------------------
def plots(table: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    """Draw the report's figures from `rows(...)` into out_dir; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []

    def save(fig, name: str) -> None:
        path = out_dir / f"{name.replace('/', '-')}.png"  # metric keys like by.length/depth.1024/0.5 hold "/"
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    by_dataset: dict[str, list[dict]] = defaultdict(list)
    for r in table:
        by_dataset[r["dataset"]].append(r)
    for dataset, runs in sorted(by_dataset.items()):
        metrics = _ordered({k[: -len("_after")] for r in runs for k in r if k.endswith("_after")})
        budgets = sorted({r["budget"] for r in runs}, key=_budget_sort)
        methods = sorted({r["method"] for r in runs})
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
            ax.set_ylabel(metric)
            ax.set_title(f"{dataset}: {metric} by method and budget")
            ax.legend(fontsize=7)
            save(fig, f"{dataset}_{metric}_by_method")
        if main is None:
            continue
        # Quality vs throughput trade-off.
        fig, ax = plt.subplots(figsize=(6, 4.5))
        for m in methods:
            pts = [
                (r["throughput_tok_s"], r[f"{main}_after"])
                for r in runs
                if r["method"] == m and r.get(f"{main}_after") is not None
            ]
            if pts:
                ax.scatter(*zip(*pts, strict=True), label=m, s=18)
        _full_point(ax, runs, main)
        ax.set_xlabel("throughput (tokens/s)")
        ax.set_ylabel(main)
        ax.set_title(f"{dataset}: {main} vs throughput")
        ax.legend(fontsize=6, ncol=2)
        save(fig, f"{dataset}_tradeoff")
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
                    float("nan") if v is None else (v if metric in LOWER_IS_BETTER else -v)
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
            save(fig, f"{dataset}_heatmap_{_slug(budget)}")
        # Cache efficiency: quality change per fraction of the cache saved.
        fig, ax = plt.subplots(figsize=(6, 4.5))
        for m in methods:
            pts = [
                (r["kv_bytes_kept"] / 2**20, _pct(r.get(f"{main}_after"), _full_value(runs, main)))
                for r in runs
                if r["method"] == m and r.get("kv_bytes_kept") and r.get(f"{main}_after") is not None
            ]
            pts = [(x, y) for x, y in pts if y is not None]
            if pts:
                ax.scatter(*zip(*pts, strict=True), label=m, s=18)
        ax.set_xlabel("KV cache held (MiB)")
        ax.set_ylabel(f"{main}: % change vs full cache")
        ax.set_title(f"{dataset}: cache efficiency")
        ax.legend(fontsize=6, ncol=2)
        save(fig, f"{dataset}_cache_efficiency")
        # Quality vs compression Pareto curves (one line per method over its budgets) and the Pareto front.
        fig, ax = plt.subplots(figsize=(6, 4.5))
        points = []
        for m in methods:
            pts = sorted(
                (r["compression_ratio"], r[f"{main}_after"])
                for r in runs
                if r["method"] == m
                and r.get("compression_ratio") is not None
                and r.get(f"{main}_after") is not None
            )
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", markersize=3, label=m)
                points += pts
        front = pareto_front(points, lower_is_better=main in LOWER_IS_BETTER)
        if front:
            ax.plot(*zip(*front, strict=True), color="black", linewidth=2, alpha=0.4, label="Pareto front")
        ax.set_xlabel("compression ratio (1 - kept / seen)")
        ax.set_ylabel(main)
        ax.set_title(f"{dataset}: {main} vs compression")
        ax.legend(fontsize=6, ncol=2)
        save(fig, f"{dataset}_pareto")
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
            ax.set_title(f"{dataset}: cluster quality vs {main}")
            save(fig, f"{dataset}_cluster_quality")
    return written


def pareto_front(points: list[tuple[float, float]], lower_is_better: bool) -> list[tuple[float, float]]:
    """The points no other point beats on both axes (more compression and better quality), by compression."""
    front, best = [], None
    for x, y in sorted(points, key=lambda p: (-p[0], p[1] if lower_is_better else -p[1])):
        if best is None or (y < best if lower_is_better else y > best):
            front.append((x, y))
            best = y
    return sorted(front)


def _value(runs: list[dict], method: str, budget: str, key: str) -> float | None:
    found = [
        r[key] for r in runs if r["method"] == method and r["budget"] == budget and r.get(key) is not None
    ]
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
def write_report(dirs: list[str | Path], out_dir: str | Path | None = None, with_plots: bool = True) -> Path:
    """results.csv, report.md, plots/ and a self-contained report.html for the runs under `dirs`."""
    summaries = collect(*dirs)
    if not summaries:
        raise ValueError(f"no summary.json under {', '.join(map(str, dirs))}: nothing to report")
    out = Path(out_dir if out_dir is not None else dirs[0])
    table = rows(summaries)
    atomic_write_csv(out / "results.csv", table, fieldnames=_fieldnames(table))
    markdown = tables(summaries)
    atomic_write_text(out / "report.md", markdown)
    figures = plots(table, out / "plots") if with_plots else []
    atomic_write_text(out / "report.html", _html(markdown, figures))
    log.info("report of %d runs written to %s", len(summaries), out)
    return out


def _fieldnames(table: list[dict]) -> list[str]:
    names: dict[str, None] = {}
    for r in table:
        names.update(dict.fromkeys(r))
    return list(names)


def _html(markdown: str, figures: list[Path]) -> str:
    """The markdown tables as HTML tables and the figures inline (base64), so the file opens anywhere offline."""
    body = []
    lines = markdown.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("### "):
            body.append(f"<h3>{html.escape(line[4:])}</h3>")
        elif line.startswith("|"):
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
        i += 1
    for path in figures:
        data = base64.b64encode(path.read_bytes()).decode()
        body.append(
            f'<figure><img src="data:image/png;base64,{data}"><figcaption>{html.escape(path.stem)}</figcaption></figure>'
        )
    style = (
        "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin:1em 0}"
        "td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}img{max-width:100%}"
    )
    return f"<!doctype html><html><head><meta charset='utf-8'><title>kvexp report</title><style>{style}</style></head><body><h1>kvexp report</h1>{''.join(body)}</body></html>"


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
