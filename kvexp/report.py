"""Aggregate finished runs into tables: reads summary.json files under run/sweep dirs, never re-runs a job.

    python -m kvexp.report outputs/kvexp/multiruns/<timestamp> [more dirs] [--out table.md]

Prints one markdown table per (dataset, budget) in seed 001's format: TTFT, TPOT, throughput, perplexity,
next-token accuracy and KV tokens kept for the full cache and each method, then the % change of each
against the full cache.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path
from typing import Any


def collect(*roots: str | Path) -> list[dict[str, Any]]:
    """Every summary.json below the given directories, in path order."""
    paths = sorted(p for root in roots for p in Path(root).rglob("summary.json"))
    return [json.loads(p.read_text()) for p in paths]


def _budget_label(summary: dict[str, Any]) -> str:
    budget = summary["budget"]
    if budget.get("tokens") is not None:
        return str(budget["tokens"])
    if budget.get("keep_ratio") is not None:
        return f"keep {budget['keep_ratio']}"
    return "none"


def _row(name: str, metrics: dict, timing: dict, kept: float) -> dict[str, Any]:
    return {
        "method": name,
        "ttft_s": timing["ttft_s"],
        "tpot_s": (timing["tpot_ms"] or 0.0) / 1000,
        "throughput": timing["throughput_tok_s"],
        "perplexity": metrics["perplexity"],
        "accuracy": metrics["accuracy"],
        "kv_kept": kept,
    }


def tables(summaries: list[dict[str, Any]]) -> str:
    """Markdown tables, one per (dataset, budget), baseline first."""
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for s in summaries:
        groups[(s["dataset"], _budget_label(s))].append(s)
    out = []
    for (dataset, budget), runs in sorted(groups.items()):
        first = next((s for s in runs if s["metrics_before"]), None)
        rows = []
        if first is not None:
            baseline = _row(
                "full (baseline)",
                first["metrics_before"],
                first["timing_full"],
                first["kv_cache"]["tokens_seen"],
            )
            rows.append(baseline)
        for s in sorted(runs, key=lambda s: s["method"]["name"]):
            rows.append(
                _row(s["method"]["name"], s["metrics_after"], s["timing"], s["kv_cache"]["tokens_kept"])
            )
        model = runs[0]["model"]
        tokens = runs[0]["metrics_after"]["tokens"]
        out.append(f"### {dataset}, budget {budget} ({model}, {tokens} tokens scored)\n")
        out.append("| method | TTFT (s) | TPOT (s) | throughput (tok/s) | PPL | accuracy | KV kept |")
        out.append("|---|---|---|---|---|---|---|")
        for r in rows:
            out.append(
                f"| {r['method']} | {r['ttft_s']:.4f} | {r['tpot_s']:.4f} | {r['throughput']:.2f} | "
                f"{r['perplexity']:.2f} | {100 * r['accuracy']:.2f}% | {r['kv_kept']:.0f} |"
            )
        if first is not None:
            out.append("\n| method | throughput | TPOT | PPL | accuracy |")
            out.append("|---|---|---|---|---|")
            for r in rows[1:]:
                changes = [
                    _change(r[k], baseline[k]) for k in ("throughput", "tpot_s", "perplexity", "accuracy")
                ]
                out.append(f"| {r['method']} | " + " | ".join(changes) + " |")
        out.append("")
    return "\n".join(out)


def _change(value: float, reference: float) -> str:
    return f"{100 * (value - reference) / reference:+.1f}%" if reference else "-"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("dirs", nargs="+", help="run or multirun directories")
    parser.add_argument("--out", help="also write the tables to this markdown file")
    args = parser.parse_args()
    text = tables(collect(*args.dirs))
    print(text)
    if args.out:
        from kvexp.tracking import atomic_write_text

        atomic_write_text(Path(args.out), text)


if __name__ == "__main__":
    main()
