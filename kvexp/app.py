"""train_or_eval(cfg): the single entrypoint behind `python -m kvexp`, sweeps and notebooks."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import platform
import shutil
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import transformers
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict

from kvexp.config import method_from_config, validate
from kvexp.models import load_model
from kvexp.tasks.data import load_documents
from kvexp.tasks.generation import (
    Decoding,
    GenerationDataset,
    GenerationResult,
    PromptEncoder,
    aggregate_generation,
    run_generation,
    score_results,
)
from kvexp.tasks.generation import warm_up as warm_up_generation
from kvexp.tasks.longbench import check_longbench, load_longbench, prompt_limit
from kvexp.tasks.perplexity import (
    DocumentResult,
    aggregate,
    peak_memory,
    perplexity,
    resolve_budget,
    score_document,
)
from kvexp.tasks.perplexity import warm_up as warm_up_perplexity
from kvexp.tasks.prompt import check_prompt, prompt_inputs, prompt_samples, run_prompts
from kvexp.tasks.qa import check_qa_jsonl, qa_jsonl_samples
from kvexp.tasks.retrieval import check_retrieval, retrieval_samples
from kvexp.tasks.summarization import check_summarization, summarization_samples
from kvexp.tracking import (
    ACTIVE_LOGGER,
    WandbLogger,
    atomic_write_csv,
    atomic_write_json,
    log_progress,
    make_logger,
)
from kvexp.train import run_trainer

log = logging.getLogger(__name__)


def train_or_eval(cfg: DictConfig, output_dir: str | Path | None = None) -> dict[str, Any]:
    """Validate, build model and method, evaluate (compressed and full), write the run dir, log to W&B.

    The task (`dataset.task`: perplexity | generation | lm_eval) decides how samples are evaluated; returns the
    summary that `summary.json` holds. With `resume` (the default), a run dir that already holds the summary
    of this very config (same hash) is not redone: an interrupted sweep re-run with the same
    `hydra.sweep.dir` finishes only its missing jobs.
    """
    validate(cfg)  # every user error surfaces here, before any model loads
    out = Path(output_dir) if output_dir is not None else Path(HydraConfig.get().runtime.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    inputs = _dataset_inputs(cfg)
    config_hash = _config_hash(cfg, inputs)
    sweep = _sweep_dir() if output_dir is None else None
    if sweep is None:
        check_run_dir(cfg, out, inputs)
    summary = _finished_summary(out, config_hash) if cfg.resume and inputs is not None else None
    if summary is not None:
        log.info("resume: %s already holds this config's results (hash %s); skipped", out, config_hash)
        _record_sweep_job(sweep, config_hash, out)
        return {**summary, "objective": _objective(cfg, summary)}
    logger = _start_wandb(cfg, out)  # the W&B run exists while the job goes (progress, a crash's exit code)
    token = ACTIVE_LOGGER.set(logger)
    exit_code = 1  # a job that raises (a crash, a failed run) ends its W&B run with 1
    try:
        summary = _evaluate_and_write(cfg, out, sweep, config_hash, logger)
        exit_code = None
    finally:
        ACTIVE_LOGGER.reset(token)
        if logger is not None:
            logger.finish(exit_code=exit_code)
    return {
        **summary,
        "objective": _objective(cfg, summary),
    }  # a bad objective= fails after the results are safe


def _evaluate_and_write(
    cfg: DictConfig, out: Path, sweep: Path | None, config_hash: str, logger: WandbLogger | None
) -> dict[str, Any]:
    """Evaluate (training first with `train=`), write summary.json and samples.csv, log the summary to W&B."""
    torch.manual_seed(cfg.seed)
    if cfg.train.name == "none":
        summary, rows = TASKS[cfg.dataset.task](cfg)
    else:
        summary, rows = _train_then_evaluate(cfg, out)
    summary["config_hash"] = config_hash
    summary["machine"] = _machine(cfg)
    summary["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    if nothing_compressed(summary):
        summary["nothing_compressed"] = True
        log.warning(
            "NOTHING COMPRESSED: method=%s kept every token it saw (%s) and every byte: the budget is at or above "
            "the evaluated length, so this run measures the full cache again; lower the budget or raise the length",
            summary["method"]["name"],
            summary["kv_cache"].get("tokens_seen"),
        )
    non_finite = non_finite_metrics(summary)
    if non_finite:  # written (NaN/inf as null) and marked, so the evidence is kept, but the run fails
        summary["failed"] = {"reason": "non-finite metrics", "metrics": non_finite}
    atomic_write_csv(out / "samples.csv", rows)
    atomic_write_json(out / "summary.json", summary)
    _record_sweep_job(sweep, config_hash, out)
    if logger is not None:
        logger.log_summary({k: v for k, v in summary.items() if k != "config"})
        if logger.log_samples:
            logger.log_table("samples", rows)
    log.info("results written to %s", out)
    if non_finite:
        raise NonFiniteMetricError(
            f"non-finite metric(s) {', '.join(f'{k}={v}' for k, v in non_finite.items())}: the run failed "
            f"(its results are in {out}, marked failed). Typical causes: float16 overflow (try "
            "hardware.dtype=float32 or bfloat16) or a diverged model."
        )
    return summary


# Options that change neither what is computed nor its results: a finished run with other values is reused.
_HASH_EXCLUDED = ("logger", "resume", "objective", "tags", "overwrite")


def _config_hash(cfg: DictConfig, inputs: str | None = "", versions: dict[str, str] | None = None) -> str:
    """sha256 (16 hex digits) of the resolved config without the bookkeeping options, with `inputs` and the
    versions of kvexp, torch, transformers and Python (these ones, or `versions`)."""
    content = OmegaConf.to_container(cfg, resolve=True)
    for key in _HASH_EXCLUDED:
        content.pop(key, None)
    if inputs:
        content["dataset_inputs"] = inputs
    content["versions"] = (
        versions or _versions()
    )  # another kvexp, torch or transformers may give other results
    return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _dataset_inputs(cfg: DictConfig) -> str | None:
    """A digest of what the dataset reads besides its config (dataset=prompt: the prompt file's text); "" for
    none; None when that is unknown before the run (prompts from standard input: the run is never resumed)."""
    entry = GENERATION_DATASETS.get(cfg.dataset.name) if cfg.dataset.task == "generation" else None
    return entry.inputs(cfg.dataset) if entry is not None and entry.inputs is not None else ""


def _finished_summary(out: Path, config_hash: str) -> dict[str, Any] | None:
    """The summary.json in `out` when it was written for `config_hash` (else None: the run is (re)done). A sweep
    job already runs in the dir holding its results (`job_subdir`), so its own dir is the only place to look."""
    summary = _held(out)
    if summary is None or summary.get("config_hash") != config_hash:
        return None
    if summary.get("failed"):
        log.info("resume: %s holds a failed run (%s); running again", out, summary["failed"]["reason"])
        return None
    return summary


def nothing_compressed(summary: dict[str, Any]) -> bool:
    """A compressing method that kept every token it saw and every byte: the run is the full cache again."""
    kv = summary.get("kv_cache") or {}
    if summary["method"]["name"] == "full" or not kv.get("tokens_seen"):
        return False
    return kv.get("tokens_kept", 0) >= kv["tokens_seen"] and kv.get("bytes_kept", 0) >= kv.get(
        "bytes_full", 0
    )


# Set by kvexp.callbacks at the start of a multirun (inherited by launcher processes): which invocation a job
# belongs to, so its report covers its own jobs, not older ones left in the same sweep dir.
SWEEP_ID_ENV = "KVEXP_SWEEP_ID"
SWEEP_JOBS = ".kvexp_jobs"  # <sweep dir>/.kvexp_jobs/<sweep id>/<job num>.json: {config_hash, run_dir}


def _sweep_dir() -> Path | None:
    """The multirun's sweep dir when this job is part of one."""
    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        return Path(HydraConfig.get().sweep.dir)
    return None


def job_subdir(num: str, root: DictConfig) -> str:
    """A sweep job's run dir name (`hydra.sweep.subdir`): the dir of the sweep holding this config's results (the
    job resumes there, so the .hydra/config.yaml Hydra writes agrees with its summary.json), else the job number,
    or `<num>-<config hash>` when that dir holds another config's results (a job never overwrites them)."""
    try:
        content = OmegaConf.to_container(root, resolve=False)
        content.pop("hydra", None)
        cfg = OmegaConf.create(content)
        inputs = _dataset_inputs(cfg)
        sweep = Path(str(root.hydra.sweep.dir))
        dirs = sorted(d for d in sweep.iterdir() if d.is_dir()) if sweep.is_dir() else []
        mine = [d.name for d in dirs if _held(d) is not None and _other_config(cfg, d, inputs) is None]
    except Exception as err:  # a config that does not even hash fails in validation, with its own message
        log.debug("job dir by config hash unavailable (%s); using the job number", err)
        return str(num)
    if mine:
        return mine[0]
    if _held(sweep / str(num)) is None:
        return str(num)
    return f"{num}-{_config_hash(cfg, inputs)[:8]}"


def _held(run_dir: Path) -> dict[str, Any] | None:
    """The summary a run dir holds (None: none)."""
    try:
        return json.loads((run_dir / "summary.json").read_text())
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
        return None


def _other_config(cfg: DictConfig, run_dir: Path, inputs: str | None) -> str | None:
    """The config hash of another config's results in `run_dir`; None when it holds none, or this config's (under
    any kvexp / torch / transformers versions: a rerun with new software replaces its own results)."""
    held = _held(run_dir)
    if held is None or held.get("config_hash") is None:
        return None
    versions = held.get("versions")
    if held["config_hash"] in (_config_hash(cfg, inputs), versions and _config_hash(cfg, inputs, versions)):
        return None
    return held["config_hash"]


def prepare_run_dir(cfg: DictConfig, out: Path) -> None:
    """Before a single run's dir is created: validate (a bad value leaves no dir behind), then refuse a dir holding
    another config's results, or, with `overwrite=true`, delete it, so the run never leaves a dir that disagrees
    with itself (Hydra's .hydra/config.yaml of one config beside another's summary.json)."""
    validate(cfg)
    if cfg.overwrite and _other_config(cfg, out, _dataset_inputs(cfg)) is not None:
        log.warning("overwrite=true: deleting %s, which held another config's results", out)
        shutil.rmtree(out)
    check_run_dir(cfg, out, _dataset_inputs(cfg))


def check_run_dir(cfg: DictConfig, out: Path, inputs: str | None) -> None:
    """A run never writes into a dir holding another config's results, unless `overwrite=true`."""
    other = _other_config(cfg, out, inputs)
    if other is not None and not cfg.overwrite:
        raise ValueError(
            f"{out} holds the results of another config (or other inputs) (summary.json, config hash {other}; this one is "
            f"{_config_hash(cfg, inputs)}): choose another hydra.run.dir, or overwrite=true to replace them"
        )


def _record_sweep_job(sweep: Path | None, config_hash: str, run_dir: Path) -> None:
    """Note, for this invocation's report, which run dir holds this job's results."""
    sweep_id = os.environ.get(SWEEP_ID_ENV)
    if sweep is None or not sweep_id:
        return
    job = HydraConfig.get().job.num
    record = {"config_hash": config_hash, "run_dir": str(run_dir.resolve())}
    atomic_write_json(sweep / SWEEP_JOBS / sweep_id / f"{job}.json", record)


class NonFiniteMetricError(RuntimeError):
    """A metric came out NaN or infinite: the run is written, marked failed, and exits non-zero."""


def non_finite_metrics(summary: dict[str, Any]) -> dict[str, float]:
    """Every NaN / infinite number in the summary's metrics (`metrics_after`, `metrics_before`,
    `metrics_untrained`, nested keys dotted) and its objective."""
    found: dict[str, float] = {}

    def walk(value: Any, key: str) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(v, f"{key}.{k}")
        elif isinstance(value, float) and not math.isfinite(value):
            found[key] = value

    for name in ("metrics_after", "metrics_before", "metrics_untrained", "objective"):
        walk(summary.get(name), name)
    return found


def _objective(cfg: DictConfig, summary: dict[str, Any]) -> Any:
    """The value returned to sweepers: `objective=<metrics_after key>` (dotted into nested metrics, e.g.
    `rouge.rouge1`, `qa.f1`), else the task's main metric (summary.json's `objective`)."""
    if cfg.objective is None:
        return summary["objective"]
    value: Any = summary["metrics_after"]
    for part in cfg.objective.split("."):
        if not isinstance(value, dict) or part not in value:
            raise ValueError(
                f"objective={cfg.objective!r} is not a metric of this run; choose one of: "
                f"{sorted(_metric_paths(summary['metrics_after']))}"
            )
        value = value[part]
    return value


def _metric_paths(metrics: dict[str, Any], prefix: str = "") -> list[str]:
    """Every dotted path to a value in nested metrics ({"rouge": {"rouge1": ..}} -> ["rouge.rouge1"])."""
    paths = []
    for key, value in metrics.items():
        path = f"{prefix}{key}"
        paths += _metric_paths(value, f"{path}.") if isinstance(value, dict) else [path]
    return paths


def _train_then_evaluate(cfg: DictConfig, out: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Evaluate the untrained compressor (and the full cache), train, evaluate the trained compressor.

    The summary is the trained run's, with `metrics_before` (full cache) and `metrics_untrained` (the
    compressor before training) beside its `metrics_after`, so the gain from training is one subtraction;
    `train` holds the trainer's own summary and `checkpoint` where the trained parts are.
    """
    untrained, _ = TASKS[cfg.dataset.task](cfg)
    trained = run_trainer(cfg, out / "checkpoint")
    trained_cfg = cfg.copy()
    with open_dict(trained_cfg):
        if trained.model_checkpoint is not None:
            trained_cfg.model.checkpoint = trained.model_checkpoint
        trained_cfg.method = OmegaConf.merge(trained_cfg.method, trained.method_overrides)
        trained_cfg.eval.compare_to_full = False  # the full cache was just evaluated
    summary, rows = TASKS[cfg.dataset.task](trained_cfg)
    summary["metrics_before"] = untrained["metrics_before"]
    summary["metrics_untrained"] = untrained["metrics_after"]
    summary["train"] = {"name": cfg.train.name, **trained.metrics}
    summary["checkpoint"] = {"model": trained.model_checkpoint, "method": trained.method_overrides}
    return summary, rows


def _engine(cfg: DictConfig) -> dict[str, Any]:
    """make_cache's engine settings from the config."""
    return {
        "slack": cfg.engine.slack,
        "when": cfg.engine.when,
        "positions": cfg.engine.positions,
        "head_budgets": OmegaConf.to_container(cfg.budget.per_head)
        if cfg.budget.per_head is not None
        else None,
    }


def _evaluate_perplexity(cfg: DictConfig) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Streaming perplexity of each document, compressed and (by default) with the full cache."""
    documents = load_documents(cfg.dataset, cfg.eval.max_samples)
    model, tokenizer = load_model(cfg.model, cfg.hardware)  # sets threads, dtype, flush-denormal
    method = method_from_config(cfg.method)
    samples = [
        (d.id, tokenizer(d.text, return_tensors="pt").input_ids[:, : cfg.eval.max_tokens]) for d in documents
    ]
    samples = [(i, ids) for i, ids in samples if ids.shape[1] >= 2]
    if not samples:
        raise ValueError(f"dataset={cfg.dataset.name}: no document has the 2 tokens perplexity needs")
    longest = max(ids.shape[1] for _, ids in samples)
    if (
        longest - 1 > cfg.model.max_context and not cfg.eval.beyond_context
    ):  # eval.max_tokens=null: whole texts
        raise ValueError(
            f"eval.max_tokens={cfg.eval.max_tokens}: a document has {longest} tokens, more positions than "
            f"model.max_context={cfg.model.max_context}; set eval.max_tokens <= {cfg.model.max_context + 1}"
        )

    if cfg.eval.warmup:
        warm_up_perplexity(model, samples[0][1], cfg.eval.chunk_size)
    before, comparable = (
        _full_cache_results(cfg, model, samples) if cfg.eval.compare_to_full else (None, True)
    )
    after = []
    for doc_id, ids in samples:
        budget = resolve_budget(cfg.budget, ids.shape[1], model.config.num_hidden_layers)
        after.append(
            score_document(model, ids, method, budget, cfg.eval.chunk_size, doc_id, True, **_engine(cfg))
        )
        _document_progress("compressed", after)
    agg_before = aggregate(before) if before is not None else None
    agg_after = aggregate(after)
    resolved = [r.kv.get("tokens_kept") for r in after]
    summary = _summary(cfg, method, agg_before, agg_after, after[-1].kv, resolved, model.device)
    summary["objective"] = agg_after["metrics"]["perplexity"]
    return _unless_comparable(summary, comparable), _sample_rows(before, after)


# The summary fields that compare this run's time with the full cache's.
_TIME_COMPARISONS = (
    "time_before",
    "avg_time_saving_s",
    "throughput_before",
    "avg_throughput_improvement_tokens_s",
)


def _unless_comparable(summary: dict[str, Any], comparable: bool) -> dict[str, Any]:
    """Mark full-cache timings reused from another process as not comparable (quality is reused as is):
    `timing_full.comparable` false, and no time comparison fields."""
    if summary.get("timing_full") is not None:
        summary["timing_full"]["comparable"] = comparable
    if not comparable:
        summary.update({k: None for k in _TIME_COMPARISONS if k in summary})
    return summary


def _evaluate_generation(cfg: DictConfig) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Answer every sample with the compressed cache and (by default) the full one; score both."""
    if GENERATION_DATASETS[cfg.dataset.name].run is not None:  # a dataset with its own loop (dataset=prompt)
        return GENERATION_DATASETS[cfg.dataset.name].run(cfg)
    model, tokenizer = load_model(cfg.model, cfg.hardware)
    encoder = PromptEncoder(tokenizer, _use_chat_template(cfg, tokenizer), cfg.model.max_context)
    samples = GENERATION_DATASETS[cfg.dataset.name].load(cfg.dataset, encoder, cfg.eval.max_samples, cfg.seed)
    if not samples:
        raise ValueError(f"dataset={cfg.dataset.name}: no samples (check dataset.split and eval.max_samples)")
    prompts = [encoder.encode(s, cfg.eval.max_new_tokens) for s in samples]
    method = method_from_config(cfg.method)
    settings = _generation_settings(cfg)
    layers = model.config.num_hidden_layers
    if cfg.eval.warmup:
        warm_up_generation(model, tokenizer, prompts[0], settings)
    before, comparable = (
        _full_cache_generation(cfg, model, tokenizer, samples, prompts, settings)
        if cfg.eval.compare_to_full
        else (None, True)
    )
    after = run_generation(
        model,
        tokenizer,
        samples,
        prompts,
        method,
        lambda tokens: resolve_budget(cfg.budget, tokens, layers),  # keep_ratio: of the compressed prompt
        progress=True,
        **settings,
        **_engine(cfg),
    )
    summary, rows = _generation_summary(cfg, method, encoder, settings, samples, before, after, model.device)
    return _unless_comparable(summary, comparable), rows


def _generation_settings(cfg: DictConfig) -> dict[str, Any]:
    """run_generation's decoding settings from `eval` (sample i samples with seed + i)."""
    return {
        "protocol": cfg.eval.protocol,
        "decoding": Decoding(cfg.eval.do_sample, cfg.eval.temperature, cfg.eval.top_p, cfg.seed),
        "max_new_tokens": cfg.eval.max_new_tokens,
        "prefill_chunk_size": cfg.eval.prefill_chunk_size,
    }


def _generation_summary(
    cfg: DictConfig, method, encoder, settings, samples, before, after, device
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The summary and samples.csv rows of generation results (`before`: the full cache's, or None)."""
    report_by = list(cfg.dataset.report_by)
    agg_before = aggregate_generation(samples, before, report_by) if before is not None else None
    agg_after = aggregate_generation(samples, after, report_by)
    summary = _summary(cfg, method, agg_before, agg_after, after[-1].kv, [r.budget for r in after], device)
    summary["generation"] = {
        "protocol": cfg.eval.protocol,
        "chat_template": encoder.chat_template,
        "max_new_tokens": cfg.eval.max_new_tokens,
        "prefill_chunk_size": cfg.eval.prefill_chunk_size,
        "decoding": dataclasses.asdict(settings["decoding"]),
    }
    summary.update(_generation_cost(before, after, agg_before, agg_after))
    summary["objective"] = agg_after["objective"]
    return summary, _generation_rows(samples, before, after)


def _use_chat_template(cfg: DictConfig, tokenizer) -> bool:
    """eval.chat_template when set; else the dataset's preference, if the tokenizer has a template (never for
    a dataset that templates its own prompts)."""
    if GENERATION_DATASETS[cfg.dataset.name].own_template:
        return False
    if cfg.eval.chat_template is not None:
        return cfg.eval.chat_template
    return bool(cfg.dataset.chat_template and getattr(tokenizer, "chat_template", None))


def _evaluate_lm_eval(cfg: DictConfig) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """lm-eval-harness tasks through the compressed cache and (by default) the full one."""
    from kvexp.tasks.lm_eval_harness import evaluate_lm_eval

    model, tokenizer = load_model(cfg.model, cfg.hardware)
    method = method_from_config(cfg.method)
    chunks = {"chunk_size": cfg.eval.chunk_size, "prefill_chunk_size": cfg.eval.prefill_chunk_size}
    before = (
        evaluate_lm_eval(cfg.dataset, model, tokenizer, "full", None, {}, cfg.seed, **chunks)[0]
        if cfg.eval.compare_to_full
        else None
    )
    after, rows = evaluate_lm_eval(
        cfg.dataset, model, tokenizer, method, cfg.budget, _engine(cfg), cfg.seed, **chunks
    )
    summary = _summary(
        cfg,
        method,
        _lm_eval_aggregate(before),
        _lm_eval_aggregate(after),
        {},
        [after.get("kv_tokens_kept")],
        model.device,
    )
    summary["objective"] = next((v for k, v in after.items() if "/" in k and "stderr" not in k), None)
    return summary, rows


_LM_EVAL_COST = (
    "requests", "cache_runs", "kv_tokens_seen", "kv_tokens_kept", "kv_bytes_full", "kv_bytes_kept", "compression_ratio",
    "total_s", "compress_s", "compress_share", "ttft_s", "tpot_ms",
)  # fmt: skip


def _lm_eval_aggregate(result: dict[str, Any] | None) -> dict[str, Any] | None:
    """evaluate_lm_eval's flat dict in the metrics / kv_cache / timing shape the summary uses."""
    if result is None:
        return None
    total = result.get("total_s") or 0.0
    return {
        "metrics": {k: v for k, v in result.items() if k not in _LM_EVAL_COST},
        "kv_cache": {
            "tokens_seen": result.get("kv_tokens_seen"),
            "tokens_kept": result.get("kv_tokens_kept"),
            "compression_ratio": result.get("compression_ratio"),
            "bytes_full": result.get("kv_bytes_full"),
            "bytes_kept": result.get("kv_bytes_kept"),
            "bytes_peak": result.get("kv_bytes_kept"),
        },
        "timing": {
            "ttft_s": result.get("ttft_s"),
            "tpot_ms": result.get("tpot_ms"),
            "throughput_tok_s": result.get("requests", 0) / total if total else None,
            "total_s": total,
            "compress_s": result.get("compress_s"),
            "compress_share": result.get("compress_share"),
        },
    }


TASKS: dict[str, Callable[[DictConfig], tuple[dict[str, Any], list[dict[str, Any]]]]] = {
    "perplexity": _evaluate_perplexity,
    "generation": _evaluate_generation,
    "lm_eval": _evaluate_lm_eval,
}

# Generation datasets by `dataset.name`: how to check the config and load the samples (one entry per dataset).
GENERATION_DATASETS: dict[str, GenerationDataset] = {
    "passkey": GenerationDataset(retrieval_samples, check_retrieval),
    "needle": GenerationDataset(retrieval_samples, check_retrieval),
    "qa_jsonl": GenerationDataset(qa_jsonl_samples, check_qa_jsonl),
    "cnn_dailymail": GenerationDataset(summarization_samples, check_summarization),
    "xsum": GenerationDataset(summarization_samples, check_summarization),
    "longbench": GenerationDataset(
        lambda dataset, encoder, max_samples, seed: load_longbench(
            dataset, encoder.tokenizer, prompt_limit(dataset, encoder.max_context), max_samples
        ),
        check_longbench,
        own_template=True,  # LongBench applies dataset.chat_template itself (never for its few-shot/code tasks)
    ),
    # Your own prompts: each answered with both caches and printed as it is read (kvexp.tasks.prompt).
    "prompt": GenerationDataset(prompt_samples, check_prompt, run=run_prompts, inputs=prompt_inputs),
}


def _full_cache_path(cfg: DictConfig, content: dict[str, Any]) -> Path | None:
    """Where the full-cache results of this model, hardware and `content` (settings, sample hashes) live."""
    if not cfg.cache_dir:
        return None
    key = hashlib.sha256(
        json.dumps(
            {
                "model": OmegaConf.to_container(cfg.model, resolve=True),
                "dtype": cfg.hardware.dtype,
                "device": cfg.hardware.device,
                "versions": _versions(),
                **content,
            },
            sort_keys=True,
        ).encode()
    ).hexdigest()[:24]
    return Path(cfg.cache_dir) / "full" / f"{key}.json"


def _machine(cfg: DictConfig) -> dict[str, Any]:
    """Where the run was timed: the host, the device (GPU name, else the CPU's) and torch's thread count."""
    cuda = cfg.hardware.device in ("cuda", "auto") and torch.cuda.is_available()
    device = torch.cuda.get_device_name() if cuda else platform.processor() or platform.machine()
    return {"host": socket.gethostname(), "device": device, "threads": torch.get_num_threads()}


def _versions() -> dict[str, str]:
    """What can change a result besides the config: kvexp's, torch's, transformers' and Python's versions."""
    return {
        "kvexp": _version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def _ids_hash(*ids: torch.Tensor) -> str:
    return hashlib.sha256(b"".join(t.numpy().tobytes() for t in ids)).hexdigest()


def _full_cache_results(cfg: DictConfig, model, samples) -> tuple[list[DocumentResult], bool]:
    """The full-cache run of the same samples, reused across a sweep (keyed by model, data, settings and
    versions), and whether its timings are comparable with this run's (timed in this very process)."""
    path = _full_cache_path(
        cfg, {"chunk_size": cfg.eval.chunk_size, "samples": [(i, _ids_hash(ids)) for i, ids in samples]}
    )
    reused = _reuse(path)
    if reused is not None:
        return [DocumentResult(**r) for r in reused[0]], reused[1]
    results = []
    for i, ids in samples:
        results.append(score_document(model, ids, "full", None, cfg.eval.chunk_size, i, True))
        _document_progress("full", results)
    _store(path, [dataclasses.asdict(r) for r in results])
    return results, True


def _document_progress(cache: str, results: list[DocumentResult]) -> None:
    """The job's W&B run gets one point per document: `<cache>/documents`, its perplexity, the running one."""
    last = results[-1]
    running = perplexity(sum(r.nll for r in results) / sum(r.tokens for r in results))
    log_progress(
        {
            f"{cache}/documents": len(results),
            f"{cache}/perplexity": last.perplexity,
            f"{cache}/running_perplexity": running,
        }
    )


# Who timed a full-cache result: timings are comparable only within one process (same machine, threads, load).
_TIMED_IN = f"{socket.gethostname()}:{os.getpid()}:{time.time_ns()}"


def _reuse(path: Path | None) -> tuple[list[dict[str, Any]], bool] | None:
    """A stored full-cache result and whether its timings come from this process; None when there is none."""
    if path is None or not path.exists():
        return None
    stored = json.loads(path.read_text())
    comparable = stored["timed_in"] == _TIMED_IN
    log.info(
        "full-cache results reused from %s%s",
        path,
        "" if comparable else " (timed in another process: its timings are not compared with this run's)",
    )
    return stored["results"], comparable


def _store(path: Path | None, results: list[dict[str, Any]]) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, {"timed_in": _TIMED_IN, "results": results})


def _full_cache_generation(
    cfg: DictConfig, model, tokenizer, samples, prompts, settings
) -> tuple[list[GenerationResult], bool]:
    """The full-cache answers of the same prompts, reused across a sweep; re-scored on every use; and whether
    their timings are comparable with this run's."""
    content = {
        "task": "generation",
        **settings,
        "decoding": dataclasses.asdict(settings["decoding"]),
        "samples": [
            (s.id, _ids_hash(p.context, p.question), s.max_new_tokens, s.stop)
            for s, p in zip(samples, prompts, strict=True)
        ],
    }
    path = _full_cache_path(cfg, content)
    reused = _reuse(path)
    if reused is not None:
        results = [GenerationResult(**r) for r in reused[0]]
        score_results(samples, results)
        return results, reused[1]
    results = run_generation(
        model, tokenizer, samples, prompts, "full", lambda tokens: None, progress=True, **settings
    )
    _store(path, [dataclasses.asdict(r) for r in results])
    return results, True


def _summary(
    cfg: DictConfig, method, agg_before, agg_after, last_kv: dict, resolved: list, device
) -> dict[str, Any]:
    """The summary keys every task writes (docs/usage.md#outputs); `last_kv` is the last sample's cache.stats()."""
    return {
        "model": cfg.model.name,
        "method": {"name": method.name, **{f.name: getattr(method, f.name) for f in _init_fields(method)}},
        "budget": {**OmegaConf.to_container(cfg.budget, resolve=True), "resolved_tokens": resolved},
        "dataset": cfg.dataset.name,
        "task": cfg.dataset.task,
        "metrics_before": agg_before["metrics"] if agg_before else None,
        "metrics_after": agg_after["metrics"],
        "kv_cache": {
            **agg_after["kv_cache"],
            # The last sample's kept tokens per layer and per KV head (batch means): allocations made visible.
            "tokens_kept_per_layer": last_kv.get("tokens_kept_per_layer"),
            "tokens_kept_per_head": last_kv.get("tokens_kept_per_head"),
            "method_stats": last_kv.get("method_stats"),  # e.g. cluster quality of a clustering method
        },
        "timing": agg_after["timing"],
        "timing_full": agg_before["timing"] if agg_before else None,
        "memory": {**peak_memory(device), "kv_bytes_peak": agg_after["kv_cache"]["bytes_peak"]},
        "engine": OmegaConf.to_container(cfg.engine, resolve=True),
        "config": OmegaConf.to_container(cfg, resolve=True),
        "versions": _versions(),
        "seed": cfg.seed,
    }


def _generation_cost(before, after, agg_before, agg_after) -> dict[str, float | None]:
    """The SimCalKV study's summary fields: KV memory saved per sample, seconds and tokens/s per sample before/after."""
    saving = sum(r.kv.get("bytes_full", 0) - r.kv.get("bytes_kept", 0) for r in after) / len(after) / 2**20
    time_after, tput_after = agg_after["timing"]["sample_s"], agg_after["timing"]["throughput_tok_s"]
    time_before = agg_before["timing"]["sample_s"] if before is not None else None
    tput_before = agg_before["timing"]["throughput_tok_s"] if before is not None else None
    return {
        "avg_memory_saving_MB": saving,
        "time_before": time_before,
        "time_after": time_after,
        "avg_time_saving_s": time_before - time_after if time_before is not None else None,
        "throughput_before": tput_before,
        "throughput_after": tput_after,
        "avg_throughput_improvement_tokens_s": tput_after - tput_before if tput_before is not None else None,
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


def _generation_rows(samples, before, after) -> list[dict[str, Any]]:
    """One row per sample: its meta (length, depth, ...), answers, predictions and scores before/after, cost."""
    rows = []
    for i, (sample, a) in enumerate(zip(samples, after, strict=True)):
        b = before[i] if before is not None else None
        row = {
            "id": a.id,
            **sample.meta,
            "context_tokens": a.context_tokens,
            "question_tokens": a.question_tokens,
        }
        row["answers"] = " | ".join(sample.answers)
        row["prediction_before"] = b.prediction if b else None
        row["prediction_after"] = a.prediction
        for key in a.scores:
            row[f"{key}_before"] = b.scores[key] if b else None
            row[f"{key}_after"] = a.scores[key]
        row.update(
            {
                "new_tokens_before": b.new_tokens if b else None,
                "new_tokens_after": a.new_tokens,
                "kept_tokens": a.kv["tokens_kept"],
                "compression_ratio": a.kv["compression_ratio"],
                "kv_bytes_kept": a.kv.get("bytes_kept"),
                "kv_bytes_full": a.kv.get("bytes_full"),
                "ttft_s_before": b.ttft_s if b else None,
                "ttft_s_after": a.ttft_s,
                "tpot_ms_before": _tpot_ms(b) if b else None,
                "tpot_ms_after": _tpot_ms(a),
                "compress_s": a.kv.get("compress_seconds", 0.0),
            }
        )
        rows.append(row)
    return rows


def _tpot_ms(result: GenerationResult) -> float | None:
    return 1000 * sum(result.step_s) / len(result.step_s) if result.step_s else None


def _start_wandb(cfg: DictConfig, out: Path) -> WandbLogger | None:
    """The job's W&B run (None for logger=none), created before evaluation: the resolved config as its config,
    typed by method, tagged with method, budget, model, dataset and the run's tags; one group per sweep."""
    job_name, group = None, None
    if HydraConfig.initialized():
        hc = HydraConfig.get()
        job_name = hc.job.override_dirname or None
        if hc.mode == RunMode.MULTIRUN:
            group = Path(hc.sweep.dir).name
    budget = cfg.budget
    budget_tag = f"budget={budget.tokens}" if budget.tokens else f"keep_ratio={budget.keep_ratio}"
    tags = [cfg.method.name, budget_tag, f"model={cfg.model.name}", f"dataset={cfg.dataset.name}", *cfg.tags]
    logger_cfg = {
        **OmegaConf.to_container(cfg.logger),
        "job_type": cfg.logger.get("job_type") or cfg.method.name,
    }
    return make_logger(logger_cfg, OmegaConf.to_container(cfg, resolve=True), out, job_name, group, tags)
