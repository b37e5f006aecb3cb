"""Every dataset and task a config can name, and how a run evaluates each task.

`DATASETS` maps `dataset.name` to its entry (kvexp.tasks.data.Dataset: its task, how its config is checked and
its samples are loaded); `TASKS` maps `dataset.task` to the Task that kvexp.app runs. A task here turns the
config into calls of its evaluator (kvexp.tasks.perplexity, .generation, .lm_eval_harness, the Python API): it
loads the model, the method and the samples, runs them through the full cache (reused across a sweep,
kvexp.tasks.full_cache) and the compressed one, and builds the summary and samples.csv rows from the results.
"""

from __future__ import annotations

import dataclasses
import logging
from importlib.metadata import version
from typing import Any

from omegaconf import DictConfig, OmegaConf

from kvexp.budgets import resolve_budget
from kvexp.files import Journal
from kvexp.tasks import full_cache
from kvexp.tasks.base import Loaded, Prepared, Results, Task, build_summary, engine_options, prepare
from kvexp.tasks.context_compression import compress_prompts, count_dropped_tokens, requested_compression
from kvexp.tasks.data import DATASETS as TEXT_DATASETS
from kvexp.tasks.data import Dataset, load_documents, registered
from kvexp.tasks.generation import (
    Decoding,
    GenerationResult,
    GenerationSetup,
    PromptEncoder,
    aggregate_generation,
    generation_cost,
    generation_rows,
    run_generation,
    score_results,
)
from kvexp.tasks.generation import warm_up as warm_up_generation
from kvexp.tasks.infinitebench import check_infinitebench, infinitebench_samples
from kvexp.tasks.lm_eval_harness import check_lm_eval_dataset, evaluate_lm_eval, summary_aggregate
from kvexp.tasks.longbench import check_longbench, longbench_samples
from kvexp.tasks.longbench_v2 import check_longbench_v2, longbench_v2_samples
from kvexp.tasks.loogle import check_loogle, loogle_samples
from kvexp.tasks.math_reasoning import check_math, math_samples
from kvexp.tasks.metrics import lower_is_better
from kvexp.tasks.perplexity import DocumentResult, document_progress, document_rows, score_in_batches
from kvexp.tasks.perplexity import aggregate as aggregate_documents
from kvexp.tasks.perplexity import warm_up as warm_up_perplexity
from kvexp.tasks.prompt import check_prompt, prompt_inputs, prompt_samples, run_prompts
from kvexp.tasks.qa import check_qa_jsonl, qa_jsonl_samples
from kvexp.tasks.retrieval import check_retrieval, retrieval_samples
from kvexp.tasks.ruler import check_ruler, ruler_samples
from kvexp.tasks.ruler import summary_fields as ruler_summary
from kvexp.tasks.summarization import check_summarization, summarization_samples
from kvexp.tasks.zero_scrolls import check_zero_scrolls, zero_scrolls_samples

log = logging.getLogger(__name__)

DATASETS: dict[str, Dataset] = {
    **TEXT_DATASETS,  # perplexity: wikitext2, pg19, text_file, python_code (kvexp.tasks.data)
    "passkey": Dataset("generation", check_retrieval, retrieval_samples),
    "needle": Dataset("generation", check_retrieval, retrieval_samples),
    "qa_jsonl": Dataset("generation", check_qa_jsonl, qa_jsonl_samples),
    "cnn_dailymail": Dataset("generation", check_summarization, summarization_samples),
    "xsum": Dataset("generation", check_summarization, summarization_samples),
    # LongBench applies dataset.chat_template itself (never for its few-shot/code tasks).
    "longbench": Dataset("generation", check_longbench, longbench_samples, own_template=True),
    # The other long-context benchmarks, each with its own prompts, truncation and metrics; they apply
    # dataset.chat_template themselves (kvexp.tasks.long_context).
    "longbench_v2": Dataset("generation", check_longbench_v2, longbench_v2_samples, own_template=True),
    "infinitebench": Dataset("generation", check_infinitebench, infinitebench_samples, own_template=True),
    "loogle": Dataset("generation", check_loogle, loogle_samples, own_template=True),
    "zero_scrolls": Dataset("generation", check_zero_scrolls, zero_scrolls_samples, own_template=True),
    # Math reasoning for decoding compression: the last \boxed{} graded (kvexp.tasks.math_reasoning).
    "math500": Dataset("generation", check_math, math_samples),
    "aime25": Dataset("generation", check_math, math_samples),
    # RULER's 13 tasks, generated at dataset.lengths in the model's tokens (kvexp.tasks.ruler).
    "ruler": Dataset("generation", check_ruler, ruler_samples, summary=ruler_summary),
    # Your own prompts: each answered with both caches and printed as it is read (kvexp.tasks.prompt).
    "prompt": Dataset("generation", check_prompt, prompt_samples, run=run_prompts, inputs=prompt_inputs),
}


def dataset_inputs(cfg: DictConfig) -> str | None:
    """A digest of what the dataset reads besides its config (dataset=prompt: the prompt file's text); "" for
    none; None when that is unknown before the run (prompts from standard input: the run is never resumed)."""
    entry = DATASETS.get(cfg.dataset.name)
    if entry is None or entry.task != cfg.dataset.task or entry.inputs is None:
        return ""
    return entry.inputs(cfg.dataset)


class Perplexity(Task):
    """Streaming perplexity of each document, compressed and (by default) with the full cache."""

    lower_is_better = True

    def check(self, cfg: DictConfig) -> None:
        registered(DATASETS, cfg.dataset, "perplexity").check(cfg.dataset)

    def load(self, cfg: DictConfig, given: Prepared | None = None) -> Loaded:
        documents = load_documents(cfg.dataset, cfg.eval.max_samples)
        model, tokenizer, method = prepare(cfg, given)
        samples = [
            (d.id, tokenizer(d.text, return_tensors="pt").input_ids[:, : cfg.eval.max_tokens])
            for d in documents
        ]
        samples = [(i, ids) for i, ids in samples if ids.shape[1] >= 2]
        if not samples:
            raise ValueError(f"dataset={cfg.dataset.name}: no document has the 2 tokens perplexity needs")
        longest = max(ids.shape[1] for _, ids in samples)
        # Checked before the load for eval.max_tokens; here for whole texts (eval.max_tokens=null).
        if longest - 1 > cfg.model.max_context and not cfg.eval.beyond_context:
            raise ValueError(
                f"eval.max_tokens={cfg.eval.max_tokens}: a document has {longest} tokens, more positions than "
                f"model.max_context={cfg.model.max_context}; set eval.max_tokens <= {cfg.model.max_context + 1}"
            )
        return Loaded(model, tokenizer, method, samples)

    def run(self, cfg: DictConfig, loaded: Loaded, journal: Journal | None = None) -> Results:
        model, samples = loaded.model, loaded.samples
        if cfg.eval.warmup:
            warm_up_perplexity(model, samples[0][1], cfg.eval.chunk_size)
        before, comparable = (
            _full_documents(cfg, model, samples) if cfg.eval.compare_to_full else (None, True)
        )
        chunk, engine, layers = cfg.eval.chunk_size, engine_options(cfg), model.config.num_hidden_layers
        after = score_in_batches(
            model,
            samples,
            loaded.method,
            lambda tokens: resolve_budget(cfg.budget, tokens, layers),
            chunk,
            cfg.eval.batch_size,
            lambda done: document_progress("compressed", done),
            journal=journal,
            **engine,
        )
        return Results(samples, before, after, comparable)

    def aggregate(self, cfg: DictConfig, loaded: Loaded, results: Results) -> dict[str, Any]:
        before = None if results.before is None else aggregate_documents(results.before)
        after = aggregate_documents(results.after)
        resolved = [r.kv.get("tokens_kept") for r in results.after]
        summary = build_summary(cfg, loaded, before, after, results.after[-1].kv, resolved)
        summary["objective"] = after["metrics"]["perplexity"]
        return summary

    def rows(self, results: Results) -> list[dict[str, Any]]:
        return document_rows(results.before, results.after)


def _full_documents(cfg: DictConfig, model, samples) -> tuple[list[DocumentResult], bool]:
    """The full-cache run of the same documents, reused across a sweep, and whether its timings are comparable."""

    def run(journal: Journal | None) -> list[DocumentResult]:
        return score_in_batches(
            model,
            samples,
            "full",
            lambda tokens: None,
            cfg.eval.chunk_size,
            cfg.eval.batch_size,
            lambda done: document_progress("full", done),
            journal=journal,
        )

    content = {
        "chunk_size": cfg.eval.chunk_size,
        "batch_size": cfg.eval.batch_size,
        "samples": [(i, full_cache.ids_hash(ids)) for i, ids in samples],
    }
    return full_cache.reuse_or_run(cfg, content, run, lambda stored: [DocumentResult(**r) for r in stored])


class Generation(Task):
    """Answer every sample with the compressed cache and (by default) the full one; score both."""

    def check(self, cfg: DictConfig) -> None:
        dataset = cfg.dataset
        registered(DATASETS, dataset, "generation").check(dataset)
        if dataset.max_new_tokens < 1:
            raise ValueError(f"dataset.max_new_tokens must be >= 1, got {dataset.max_new_tokens}")
        lengths = dataset.get("lengths")
        if lengths and cfg.model.max_context is not None and max(lengths) > cfg.model.max_context:
            raise ValueError(
                f"dataset.lengths={list(lengths)} exceeds model.max_context={cfg.model.max_context} of {cfg.model.name}"
            )

    def load(self, cfg: DictConfig, given: Prepared | None = None) -> GenerationSetup:
        entry = DATASETS[cfg.dataset.name]
        model, tokenizer, method = prepare(cfg, given)
        encoder = PromptEncoder(tokenizer, use_chat_template(cfg, tokenizer), cfg.model.max_context)
        samples, prompts = [], []
        if entry.run is None:  # a dataset with its own loop (dataset=prompt) reads its samples as it goes
            samples = entry.load(cfg.dataset, encoder, cfg.eval.max_samples, cfg.seed)
            if not samples:
                raise ValueError(
                    f"dataset={cfg.dataset.name}: no samples (check dataset.split and eval.max_samples)"
                )
            prompts = [encoder.encode(s, cfg.eval.max_new_tokens) for s in samples]
        return GenerationSetup(model, tokenizer, method, samples, encoder, prompts, generation_settings(cfg))

    def run(self, cfg: DictConfig, loaded: GenerationSetup, journal: Journal | None = None) -> Results:
        entry = DATASETS[cfg.dataset.name]
        if entry.run is not None:
            return entry.run(cfg, loaded)
        model, tokenizer, settings = loaded.model, loaded.tokenizer, loaded.settings
        layers = model.config.num_hidden_layers
        if cfg.eval.warmup:
            warm_up_generation(model, tokenizer, loaded.prompts[0], settings)
        before, comparable = _full_answers(cfg, loaded) if cfg.eval.compare_to_full else (None, True)
        prompts, compressions = loaded.prompts, []
        compression = requested_compression(cfg.context_compression, loaded.method)
        if (
            compression is not None
        ):  # the compressed run's contexts only; the full cache answers the originals
            prompts, compressions, loaded.context_compression = compress_prompts(
                compression, model, tokenizer, loaded.prompts
            )
            loaded.compressed_prompts = prompts
        after = run_generation(
            model,
            tokenizer,
            loaded.samples,
            prompts,
            loaded.method,
            lambda tokens: resolve_budget(cfg.budget, tokens, layers),  # keep_ratio: of the compressed prompt
            progress=True,
            journal=journal,
            **settings,
            **engine_options(cfg),
        )
        if compressions:
            count_dropped_tokens(after, [dropped for _, dropped in compressions], model)
        for result, (seconds, _) in zip(after, compressions, strict=False):
            result.ttft_s += seconds  # the prompt's compression comes before its first token
            if result.wall_s is not None:
                result.wall_s += seconds
        return Results(loaded.samples, before, after, comparable)

    def aggregate(self, cfg: DictConfig, loaded: GenerationSetup, results: Results) -> dict[str, Any]:
        samples, report_by = results.samples, list(cfg.dataset.report_by)
        before = None if results.before is None else aggregate_generation(samples, results.before, report_by)
        after = aggregate_generation(samples, results.after, report_by)
        resolved = [r.budget for r in results.after]
        summary = build_summary(cfg, loaded, before, after, results.after[-1].kv, resolved)
        summary["generation"] = {
            "protocol": cfg.eval.protocol,
            "chat_template": loaded.encoder.chat_template,
            "max_new_tokens": cfg.eval.max_new_tokens,
            "prefill_chunk_size": cfg.eval.prefill_chunk_size,
            "decoding": dataclasses.asdict(loaded.settings["decoding"]),
        }
        if loaded.context_compression is not None:
            summary["context_compression"] = loaded.context_compression
        summary.update(generation_cost(results.before, results.after, before, after))
        entry = DATASETS[cfg.dataset.name]
        if entry.summary is not None:
            summary.update(entry.summary(samples, results.before, results.after))
        summary["objective"] = after["objective"]
        return summary

    def rows(self, results: Results) -> list[dict[str, Any]]:
        return generation_rows(results.samples, results.before, results.after)


def _full_answers(cfg: DictConfig, setup: GenerationSetup) -> tuple[list[GenerationResult], bool]:
    """The full-cache answers of the same prompts, reused across a sweep and re-scored on every use; and whether
    their timings are comparable with this run's."""
    samples, prompts, settings = setup.samples, setup.prompts, setup.settings
    content = {
        "task": "generation",
        **settings,
        "decoding": dataclasses.asdict(settings["decoding"]),
        "samples": [
            (s.id, full_cache.ids_hash(p.context, p.question), s.max_new_tokens, s.stop)
            for s, p in zip(samples, prompts, strict=True)
        ],
    }

    def run(journal: Journal | None) -> list[GenerationResult]:
        model, tokenizer = setup.model, setup.tokenizer
        return run_generation(
            model,
            tokenizer,
            samples,
            prompts,
            "full",
            lambda tokens: None,
            progress=True,
            journal=journal,
            **settings,
        )

    def restore(stored: list[dict[str, Any]]) -> list[GenerationResult]:
        results = [GenerationResult(**r) for r in stored]
        score_results(samples, results)
        return results

    return full_cache.reuse_or_run(cfg, content, run, restore)


def generation_settings(cfg: DictConfig) -> dict[str, Any]:
    """run_generation's decoding settings from `eval` (sample i samples with seed + i)."""
    return {
        "protocol": cfg.eval.protocol,
        "decoding": Decoding(
            cfg.eval.do_sample,
            cfg.eval.temperature,
            cfg.eval.top_p,
            cfg.seed,
            cfg.eval.num_beams,
            cfg.eval.length_penalty,
        ),
        "max_new_tokens": cfg.eval.max_new_tokens,
        "prefill_chunk_size": cfg.eval.prefill_chunk_size,
        "batch_size": cfg.eval.batch_size,
    }


def use_chat_template(cfg: DictConfig, tokenizer) -> bool:
    """eval.chat_template when set; else the dataset's preference, if the tokenizer has a template (never for
    a dataset that templates its own prompts)."""
    if DATASETS[cfg.dataset.name].own_template:
        return False
    if cfg.eval.chat_template is not None:
        return cfg.eval.chat_template
    return bool(cfg.dataset.chat_template and getattr(tokenizer, "chat_template", None))


class LmEval(Task):
    """lm-eval-harness tasks through the compressed cache and (by default) the full one."""

    def check(self, cfg: DictConfig) -> None:
        check_lm_eval_dataset(cfg.dataset)

    def load(self, cfg: DictConfig, given: Prepared | None = None) -> Loaded:
        model, tokenizer, method = prepare(cfg, given)
        return Loaded(model, tokenizer, method, [])  # lm-eval reads its own samples

    def run(self, cfg: DictConfig, loaded: Loaded, journal: Journal | None = None) -> Results:
        # lm-eval runs its own loop every time: the journals make it read back the requests already answered
        model, tokenizer, seed = loaded.model, loaded.tokenizer, cfg.seed
        prefill = cfg.eval.prefill_chunk_size or loaded.method.prompt_block  # the method's blocks (`block`)
        chunks = {"chunk_size": cfg.eval.chunk_size, "prefill_chunk_size": prefill}
        before, comparable = None, None
        if cfg.eval.compare_to_full:
            content = {
                "task": "lm_eval",
                "dataset": OmegaConf.to_container(cfg.dataset, resolve=True),
                **chunks,
                "seed": seed,
                "lm_eval": version("lm_eval"),
            }
            kept = full_cache.kept_journal(cfg, content)
            before = evaluate_lm_eval(
                cfg.dataset, model, tokenizer, "full", None, {}, seed, **chunks, journal=kept
            )[0]
            comparable = kept is None or kept.restored == 0
            if not comparable:
                log.info(
                    "full-cache lm-eval requests: %d of %d read back from %s",
                    kept.restored,
                    before["requests"],
                    kept.path,
                )
        after, rows = evaluate_lm_eval(
            cfg.dataset,
            model,
            tokenizer,
            loaded.method,
            cfg.budget,
            engine_options(cfg),
            seed,
            **chunks,
            journal=journal,
        )
        return Results(rows, before, after, comparable)  # the samples: lm-eval's requests, one row each

    def aggregate(self, cfg: DictConfig, loaded: Loaded, results: Results) -> dict[str, Any]:
        before, after = summary_aggregate(results.before), summary_aggregate(results.after)
        summary = build_summary(cfg, loaded, before, after, {}, [results.after.get("kv_tokens_kept")])
        summary["objective"] = results.after.get(_main_metric(results.after))
        return summary

    def objective_lower_is_better(self, cfg: DictConfig, summary: dict[str, Any]) -> bool:
        if cfg.objective is not None:
            return super().objective_lower_is_better(cfg, summary)
        main = _main_metric(summary["metrics_after"])
        return main is not None and lower_is_better(main)

    def rows(self, results: Results) -> list[dict[str, Any]]:
        return results.samples


def _main_metric(metrics: dict[str, Any]) -> str | None:
    """lm-eval's main metric: the first `task/metric` key that is not a standard error."""
    return next((k for k in metrics if "/" in k and "stderr" not in k), None)


# `dataset.task` -> how a run evaluates it (kvexp.app dispatches here; kvexp.config.validate calls `check`).
TASKS: dict[str, Task] = {"perplexity": Perplexity(), "generation": Generation(), "lm_eval": LmEval()}
