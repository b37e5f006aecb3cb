"""train_or_eval(cfg): the single entrypoint behind `python -m kvexp`, sweeps and notebooks."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import platform
from pathlib import Path
from typing import Any

import torch
import transformers
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from kvexp.config import method_from_config, validate
from kvexp.models import load_model
from kvexp.tasks.data import load_documents
from kvexp.tasks.perplexity import DocumentResult, aggregate, peak_memory, resolve_budget, score_document
from kvexp.tracking import atomic_write_csv, atomic_write_json, make_logger

log = logging.getLogger(__name__)


def train_or_eval(cfg: DictConfig, output_dir: str | Path | None = None) -> dict[str, Any]:
    """Validate, build model and method, evaluate (compressed and full), write the run dir, log to W&B.

    Returns the summary that `summary.json` holds.
    """
    validate(cfg)  # every user error surfaces here, before any model loads
    out = Path(output_dir) if output_dir is not None else Path(HydraConfig.get().runtime.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    documents = load_documents(cfg.dataset, cfg.eval.max_samples)
    model, tokenizer = load_model(cfg.model, cfg.hardware)  # sets threads, dtype, flush-denormal
    device = model.device
    method = method_from_config(cfg.method)
    samples = [
        (d.id, tokenizer(d.text, return_tensors="pt").input_ids[:, : cfg.eval.max_tokens]) for d in documents
    ]
    samples = [(i, ids) for i, ids in samples if ids.shape[1] >= 2]
    if not samples:
        raise ValueError(f"dataset={cfg.dataset.name}: no document has the 2 tokens perplexity needs")
    engine = {
        "slack": cfg.engine.slack,
        "when": cfg.engine.when,
        "positions": cfg.engine.positions,
        "head_budgets": OmegaConf.to_container(cfg.budget.per_head)
        if cfg.budget.per_head is not None
        else None,
    }

    before = _full_cache_results(cfg, model, samples) if cfg.eval.compare_to_full else None
    after = [
        score_document(
            model,
            ids,
            method,
            resolve_budget(cfg.budget, ids.shape[1], model.config.num_hidden_layers),
            cfg.eval.chunk_size,
            doc_id,
            True,
            **engine,
        )
        for doc_id, ids in samples
    ]
    summary = _summary(cfg, method, before, after, device)
    atomic_write_csv(out / "samples.csv", _sample_rows(before, after))
    atomic_write_json(out / "summary.json", summary)
    _log_to_wandb(cfg, out, summary, _sample_rows(before, after))
    log.info("results written to %s", out)
    return summary


def _full_cache_results(cfg: DictConfig, model, samples) -> list[DocumentResult]:
    """The full-cache run of the same samples, reused across a sweep (keyed by model, data and settings)."""
    key = hashlib.sha256(
        json.dumps(
            {
                "model": OmegaConf.to_container(cfg.model, resolve=True),
                "dtype": cfg.hardware.dtype,
                "device": cfg.hardware.device,
                "chunk_size": cfg.eval.chunk_size,
                "samples": [(i, hashlib.sha256(ids.numpy().tobytes()).hexdigest()) for i, ids in samples],
            },
            sort_keys=True,
        ).encode()
    ).hexdigest()[:24]
    path = Path(cfg.cache_dir) / "full" / f"{key}.json" if cfg.cache_dir else None
    if path is not None and path.exists():
        log.info("full-cache results reused from %s", path)
        return [DocumentResult(**r) for r in json.loads(path.read_text())]
    results = [score_document(model, ids, "full", None, cfg.eval.chunk_size, i, True) for i, ids in samples]
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, [dataclasses.asdict(r) for r in results])
    return results


def _summary(cfg: DictConfig, method, before, after, device) -> dict[str, Any]:
    agg_after = aggregate(after)
    agg_before = aggregate(before) if before is not None else None
    return {
        "model": cfg.model.name,
        "method": {"name": method.name, **{f.name: getattr(method, f.name) for f in _init_fields(method)}},
        "budget": {
            **OmegaConf.to_container(cfg.budget, resolve=True),
            "resolved_tokens": [r.kv.get("tokens_kept") for r in after],
        },
        "dataset": cfg.dataset.name,
        "metrics_before": agg_before["metrics"] if agg_before else None,
        "metrics_after": agg_after["metrics"],
        "kv_cache": {
            **agg_after["kv_cache"],
            # The last document's kept tokens per layer and per KV head (batch means): allocations made visible.
            "tokens_kept_per_layer": after[-1].kv.get("tokens_kept_per_layer"),
            "tokens_kept_per_head": after[-1].kv.get("tokens_kept_per_head"),
            "method_stats": after[-1].kv.get("method_stats"),  # e.g. cluster quality of a clustering method
        },
        "timing": agg_after["timing"],
        "timing_full": agg_before["timing"] if agg_before else None,
        "memory": {**peak_memory(device), "kv_bytes_peak": agg_after["kv_cache"]["bytes_peak"]},
        "engine": OmegaConf.to_container(cfg.engine, resolve=True),
        "config": OmegaConf.to_container(cfg, resolve=True),
        "versions": {
            "kvexp": _version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
        },
        "seed": cfg.seed,
    }


def _init_fields(method):
    return [f for f in dataclasses.fields(method) if f.init]


def _version() -> str:
    from importlib.metadata import version

    return version("kvexp")


def _sample_rows(before, after) -> list[dict[str, Any]]:
    rows = []
    for i, a in enumerate(after):
        b = before[i] if before is not None else None
        rows.append(
            {
                "id": a.id,
                "tokens": a.tokens,
                "perplexity_before": b.perplexity if b else None,
                "perplexity_after": a.perplexity,
                "accuracy_before": b.accuracy if b else None,
                "accuracy_after": a.accuracy,
                "kept_tokens": a.kv["tokens_kept"],
                "compression_ratio": a.kv["compression_ratio"],
                "first_step_s": a.first_step_s,
                "ms_per_step": 1000 * sum(a.step_s) / len(a.step_s) if a.step_s else None,
                "compress_s": a.kv.get("compress_seconds", 0.0),
            }
        )
    return rows


def _log_to_wandb(cfg: DictConfig, out: Path, summary: dict, rows: list[dict]) -> None:
    job_name, group = None, None
    if HydraConfig.initialized():
        hc = HydraConfig.get()
        job_name = hc.job.override_dirname or None
        if hc.mode == RunMode.MULTIRUN:
            group = Path(hc.sweep.dir).name
    tags = [cfg.method.name, f"model={cfg.model.name}", f"dataset={cfg.dataset.name}", *cfg.tags]
    logger = make_logger(cfg.logger, summary["config"], out, job_name, group, tags)
    if logger is None:
        return
    try:
        logger.log_summary({k: v for k, v in summary.items() if k != "config"})
        if logger.log_samples:
            logger.log_table("samples", rows)
    finally:
        logger.finish()


def format_table(summary: dict[str, Any]) -> str:
    """A readable before/after table of quality and cost."""
    before, after = summary["metrics_before"] or {}, summary["metrics_after"]
    timing, full_timing = summary["timing"], summary.get("timing_full") or {}
    kv = summary["kv_cache"]
    label = f"{summary['method']['name']}"
    rows = [
        ("perplexity", before.get("perplexity"), after["perplexity"]),
        ("next-token accuracy", before.get("accuracy"), after["accuracy"]),
        ("tokens evaluated", before.get("tokens"), after["tokens"]),
        ("KV tokens kept (mean)", kv["tokens_seen"] / max(after["documents"], 1), kv["tokens_kept"]),
        ("TTFT s", full_timing.get("ttft_s"), timing["ttft_s"]),
        ("TPOT ms", full_timing.get("tpot_ms"), timing["tpot_ms"]),
        ("throughput tok/s", full_timing.get("throughput_tok_s"), timing["throughput_tok_s"]),
    ]
    width = max(len(label), 12)
    lines = [f"{'':24}{'full':>14}{label:>{width + 2}}{'change':>10}"]
    for name, b, a in rows:
        change = f"{100 * (a - b) / b:+.1f}%" if isinstance(a, float | int) and b not in (None, 0) else ""
        lines.append(f"{name:24}{_fmt(b):>14}{_fmt(a):>{width + 2}}{change:>10}")
    lines.append(
        f"compression ratio {kv['compression_ratio']:.3f}; KV bytes {kv['bytes_kept']:,} kept of {kv['bytes_full']:,}; "
        f"{100 * timing['compress_share']:.1f}% of the time inside the method"
    )
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
