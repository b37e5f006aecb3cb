"""Config schemas (Hydra ConfigStore) and the early validation every run goes through before a model loads.

The dataclasses type every group except `method`, whose parameters differ per method and are checked against
the method's own dataclass by `build_method`. Datasets with options of their own extend `DatasetConfig`
(`GenerationDatasetConfig` and its retrieval / summarization kinds), stored as `base_<kind>` outside the
dataset group (no choice of it): their yaml starts with `defaults: [/base_<kind>@_here_, _self_]`. `validate(cfg)` turns every bad value a
user can give into a ValueError naming the option, the value and what is allowed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from kvexp.budgets import ALLOCATIONS, allocate
from kvexp.tracking import LOGGERS, WANDB_MODES
from kvexp.train import PROBING_TRAINERS, TRAIN_CHOICES, check_train


# OmegaConf 2.3 structured configs need typing.Optional/List/Dict, not PEP 604 unions.
@dataclass
class ModelConfig:
    name: str = MISSING
    source: str = MISSING
    path: str | None = None
    gguf_file: str | None = None
    gguf_package: str | None = None
    architecture: str | None = None
    tiny: dict[str, Any] = field(default_factory=dict)
    max_context: int = 2048
    revision: str | None = None
    trust_remote_code: bool = False
    attn_implementation: str = "sdpa"
    checkpoint: str | None = None  # trained weights to load on top (a run dir's checkpoint/; see train=)


@dataclass
class DatasetConfig:
    name: str = MISSING
    task: str = "perplexity"
    path: str | None = None
    local_file: str | None = None
    hub_id: str | None = None
    hub_config: str | None = None
    split: str | None = "test"
    text_field: str | None = "text"
    split_documents: bool = False
    max_samples: int | None = 1  # the default of eval.max_samples (documents for perplexity)


@dataclass
class GenerationDatasetConfig(DatasetConfig):
    """Common options of generation datasets (kvexp.tasks.generation)."""

    task: str = "generation"
    max_samples: int | None = None  # all samples by default
    max_new_tokens: int = 32  # the answer's length limit (eval.max_new_tokens overrides it)
    answer_prefix: str = ""  # text the answer continues (after the question)
    stop: list[str] = field(default_factory=list)  # the answer ends at the first of these
    report_by: list[str] = field(default_factory=list)  # sample meta keys the scores are also grouped by
    chat_template: bool = (
        False  # the prompt goes in the tokenizer's chat template, if it has one (eval.chat_template: null)
    )


@dataclass
class RetrievalDatasetConfig(GenerationDatasetConfig):
    """passkey / needle (kvexp.tasks.retrieval)."""

    haystack: str = "book"  # book (embedded novel, or dataset.path) | essays (local file) | repeat (noise) | a text dataset
    lengths: list[int] = field(default_factory=lambda: [1024, 2048, 4096, 8192])  # prompt + answer tokens
    depths: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])  # needle depth
    repeats: int = 1  # samples per (length, depth)
    phrasing: str = "plain"  # plain | ruler
    variant: str = "single"  # single | multi_key | multi_value | multi_query
    num_keys: int = 4  # multi_key: keys in the haystack (one is asked)
    num_values: int = 4  # multi_value: values of the asked key
    num_queries: int = 4  # multi_query: keys asked at once


@dataclass
class RulerDatasetConfig(GenerationDatasetConfig):
    """ruler (kvexp.tasks.ruler): RULER's tasks generated at `lengths` tokens."""

    tasks: list[str] = field(default_factory=list)  # RULER's task names (conf/dataset/ruler.yaml: all 13)
    lengths: list[int] = field(default_factory=lambda: [4096])  # prompt + generated tokens, RULER's length
    samples_per_task: int = 20  # per task and length
    haystack: str = (
        "book"  # the essay haystack: book (embedded novel, or dataset.path) | essays | a text dataset
    )
    squad_path: str | None = None  # RULER's squad.json (SQuAD v2 dev); else $KVEXP_DATA_DIR/ruler/squad.json
    hotpotqa_path: str | None = (
        None  # RULER's hotpotqa.json (HotpotQA dev distractor); else .../hotpotqa.json
    )
    squad_hub_id: str | None = "rajpurkar/squad_v2"
    hotpotqa_hub_id: str | None = "hotpotqa/hotpot_qa"


@dataclass
class SummarizationDatasetConfig(GenerationDatasetConfig):
    """cnn_dailymail / xsum (kvexp.tasks.summarization)."""

    summary_field: str = "summary"  # the reference summary's field (text_field is the article's)
    context_prefix: str = "Article: "
    instruction: str = "Summarize the article above."


@dataclass
class LongBenchDatasetConfig(GenerationDatasetConfig):
    """longbench (kvexp.tasks.longbench) and the other long-context benchmarks, longbench_v2, infinitebench, loogle,
    zero_scrolls (kvexp.tasks.long_context): one task per run."""

    subset: str | None = "narrativeqa"  # the benchmark's task (longbench_v2: a domain, or null for all)
    hub_file: str | None = (
        "data.zip"  # the hub file to read ({task}: the subset; null: datasets.load_dataset)
    )
    max_length: int | None = (
        None  # prompt tokens kept, cut as the benchmark cuts (null: model context - answer length)
    )


@dataclass
class MathDatasetConfig(GenerationDatasetConfig):
    """math500 / aime25 (kvexp.tasks.math_reasoning): one problem per row, its last \\boxed{} graded."""

    prompt_template: str = "{problem}"  # the question: {problem} replaced by the row's problem
    question_field: str = "problem"  # the rows' fields: the problem ...
    answer_field: str = "answer"  # ... its reference answer (a string, a number or a list of them) ...
    id_field: str | None = None  # ... its id (else the row number) ...
    meta_fields: list[str] = field(default_factory=list)  # ... and what samples.csv and report_by get


@dataclass
class PromptDatasetConfig(GenerationDatasetConfig):
    """prompt (kvexp.tasks.prompt): your own prompts, answered with the full cache and the compressed one."""

    prompt: str | None = None  # one prompt (taken verbatim: normalize_overrides quotes it)
    prompt_file: str | None = None  # or one prompt per line (blank lines skipped); neither: standard input
    layout: str = "auto"  # auto | side_by_side | stacked: how the two answers are printed


@dataclass
class PythonCodeDatasetConfig(DatasetConfig):
    """python_code (kvexp.tasks.data): standard-library source files as perplexity documents."""

    files: list[str] | None = None  # explicit files (relative to the folder), in order
    glob: str = "*.py"  # else every match, sorted by path ...
    min_bytes: int = 20000  # ... of at least this size


@dataclass
class LmEvalDatasetConfig(DatasetConfig):
    """lm_eval (kvexp.tasks.lm_eval_harness): lm-eval-harness tasks through the compressed cache."""

    task: str = "lm_eval"
    tasks: list[str] = field(default_factory=lambda: ["kvexp_recall"])
    include_path: Any = None  # a folder or a list of folders of task YAMLs
    limit: Any = None  # documents per task: an int >= 1 or a fraction < 1 (null: all)
    num_fewshot: int | None = None
    batch_size: int = 1
    bootstrap_iters: int = 1000


@dataclass
class BudgetConfig:
    tokens: int | None = None  # kept entries per KV head and layer
    keep_ratio: float | None = None  # or: kept fraction of each document / prompt
    per_layer: list[int] | None = None  # explicit per-layer budgets (override tokens)
    per_head: list[list[int]] | None = None  # explicit per-layer, per-KV-head budgets
    allocation: str = "uniform"  # split of tokens / keep_ratio over layers (kvexp.budgets.ALLOCATIONS)
    allocation_params: dict[str, Any] = field(default_factory=dict)  # the schedule's parameters


@dataclass
class EngineConfig:
    positions: str = "original"  # original | rerotate
    when: str = "always"  # always | prefill
    slack: int = 0  # amortized compression: compress once a layer exceeds budget + slack
    compile: bool = False  # decode steps that evict one entry run as one torch.compile'd step
    compile_mode: str | None = None  # torch.compile mode; null: reduce-overhead on CUDA, default elsewhere


@dataclass
class HardwareConfig:
    name: str = MISSING
    device: str = "cpu"
    dtype: str = "float32"
    num_threads: int | None = None
    flush_denormal: bool = False
    device_map: str | None = None


@dataclass
class LoggerConfig:
    name: str = "none"
    project: str | None = None
    entity: str | None = None
    mode: str | None = None
    job_type: str | None = None
    log_samples: bool = False


@dataclass
class EvalConfig:
    max_samples: int | None = 1  # documents evaluated (null: all)
    max_tokens: int | None = 2048  # tokens per document (null: all)
    beyond_context: bool = False  # perplexity past model.max_context: RoPE models only, set knowingly
    chunk_size: int = 1  # tokens fed per step; 1 = exact token-by-token streaming
    compare_to_full: bool = True  # also evaluate the full cache on the same samples (metrics_before)
    warmup: bool = True  # an untimed short run first, so no timing includes the process's first-call overhead
    # Generation tasks (kvexp.tasks.generation):
    protocol: str = "query_agnostic"  # query_agnostic | query_aware
    chat_template: bool | None = (
        None  # null: dataset.chat_template when the tokenizer has one; true/false: force
    )
    max_new_tokens: int | None = None  # null: the dataset's
    do_sample: bool = False  # greedy by default; sampling is seeded (seed + sample index)
    temperature: float = 1.0
    top_p: float = 1.0
    num_beams: int = 1  # > 1: beam search (greedy), the cache's rows reordered with the beams
    length_penalty: float = 1.0  # beam search: finished hypotheses score sum log p / length ** length_penalty
    prefill_chunk_size: int | None = None  # null: the context in one forward; N: chunks, compressed between
    batch_size: int = (
        1  # generation: samples answered at once (left-padded; the same answers as one at a time)
    )


@dataclass
class ContextCompressionConfig:
    """Prompt compression before the cache exists (kvexp.tasks.context_compression, Selective Context)."""

    keep: float | None = None  # fraction of the context's tokens kept, in (0, 1]; null: off
    unit: str = "word"  # token | word | sentence: what is dropped or kept whole
    chunk_size: int = 1024  # the longest scoring forward (a sliding window past it)


@dataclass
class KVExpConfig:
    model: ModelConfig = MISSING
    method: dict[str, Any] = MISSING
    dataset: DatasetConfig = MISSING
    budget: BudgetConfig = MISSING
    hardware: HardwareConfig = MISSING
    logger: LoggerConfig = MISSING
    train: dict[str, Any] = field(default_factory=lambda: {"name": "none"})  # each trainer checks its options
    engine: EngineConfig = field(default_factory=EngineConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    context_compression: ContextCompressionConfig = field(default_factory=ContextCompressionConfig)
    task_name: str = "kvexp"
    seed: int = 0
    tags: list[str] = field(default_factory=list)
    objective: str | None = None  # the metrics_after key returned to sweepers (null: the task's main metric)
    resume: bool = True  # skip a run whose dir holds summary.json of the same resolved config
    overwrite: bool = (
        False  # run into a hydra.run.dir holding another config's results (they are deleted first)
    )
    cache_dir: str | None = "outputs/.cache"  # full-cache results reused across a sweep (null: off)


ConfigStore.instance().store(name="base_config", node=KVExpConfig)
# Dataset schemas, outside the dataset group (not dataset choices): a conf/dataset yaml extends one with
# `defaults: [/base_<kind>@_here_, _self_]`.
ConfigStore.instance().store(name="base_generation", node=GenerationDatasetConfig)
ConfigStore.instance().store(name="base_retrieval", node=RetrievalDatasetConfig)
ConfigStore.instance().store(name="base_summarization", node=SummarizationDatasetConfig)
ConfigStore.instance().store(name="base_ruler", node=RulerDatasetConfig)
ConfigStore.instance().store(name="base_longbench", node=LongBenchDatasetConfig)
ConfigStore.instance().store(name="base_math", node=MathDatasetConfig)
ConfigStore.instance().store(name="base_prompt", node=PromptDatasetConfig)
ConfigStore.instance().store(name="base_python_code", node=PythonCodeDatasetConfig)
ConfigStore.instance().store(name="base_lm_eval", node=LmEvalDatasetConfig)


def _job_subdir(num: str, *, _root_: DictConfig) -> str:
    """`${kvexp_job_subdir:${hydra.job.num}}` (conf/config.yaml's hydra.sweep.subdir): see kvexp.run_dir.job_subdir."""
    from kvexp.run_dir import job_subdir  # torch loads here, not for --help

    return job_subdir(num, _root_)


OmegaConf.register_new_resolver("kvexp_job_subdir", _job_subdir, replace=True)

_NUMERIC_GROUP_CHOICE = re.compile(r"([+~]?budget)=([\d.]+(?:,[\d.]+)*)")


def normalize_overrides(overrides: list[str]) -> list[str]:
    """Quote numeric choices of the `budget` group (`budget=256`, `budget=256,512`), and let a lone
    `budget.keep_ratio=R` replace the default preset's token budget.

    Hydra's override parser reads `256` as an int, and a config group only takes option names (strings);
    quoting keeps `python -m kvexp budget=256` working as the README promises. `budget.keep_ratio=0.5` with no
    `budget=` / `budget.tokens=` override means a keep-ratio budget, so `budget.tokens=null` is added; given
    together with either, both stay and validation asks for one. `dataset.prompt=<text>` is quoted too, so a
    prompt is taken verbatim (commas, brackets, `!`, `=`, `${`), not as a sweep or a syntax error.
    A method parameter (`method.<key>=v`) becomes `++method.<key>=v` (set, or add): its keys differ per method, so a
    misspelt one reaches `build_method`, which names the keys the method has (Hydra would advise `+method.<key>`);
    so does a schedule's parameter (`budget.allocation_params.<key>=v`, checked by the schedule).
    """
    normalized = []
    for override in overrides:
        match = _NUMERIC_GROUP_CHOICE.fullmatch(override)
        if match:
            override = f"{match[1]}=" + ",".join(f"'{v}'" for v in match[2].split(","))
        key, _, value = override.partition("=")
        if key.lstrip("+") == "dataset.prompt" and value != "null" and not _quoted(value):
            override = f"{key}={_quote(value)}"
        if key.startswith(("method.", "budget.allocation_params.")):
            override = f"++{override}"
        normalized.append(override)
    keys = [o.split("=", 1)[0].lstrip("+~") for o in normalized]
    if "budget.keep_ratio" in keys and "budget" not in keys and "budget.tokens" not in keys:
        normalized.append("budget.tokens=null")
    return normalized


def _quoted(value: str) -> bool:
    return len(value) >= 2 and value[0] == value[-1] and value[0] in "'\""


def _quote(value: str) -> str:
    """`value` as a single-quoted Hydra string that parses back to itself (and is no OmegaConf interpolation)."""
    value = value.replace("${", "\\${")
    value = re.sub(r"(\\*)'", lambda m: m[1] * 2 + "\\'", value)  # backslashes before a quote double
    value = re.sub(r"(\\+)$", lambda m: m[1] * 2, value)  # ... and before the closing quote
    return f"'{value}'"


# Architectures whose positions are rotary (RoPE): they run, untrained, past their context; gpt2's learned
# position table ends there.
ROPE_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "gpt_neox")


def _check_context(cfg: DictConfig) -> None:
    """Perplexity feeds eval.max_tokens - 1 positions: at most model.max_context, unless the user asks to go
    beyond on a RoPE model (`eval.beyond_context=true`)."""
    if cfg.dataset.task != "perplexity":
        return
    limit, n, arch = cfg.model.max_context, cfg.eval.max_tokens, cfg.model.get("architecture")
    if cfg.eval.beyond_context:
        if arch not in ROPE_ARCHITECTURES:
            raise ValueError(
                f"eval.beyond_context=true needs a RoPE model ({', '.join(ROPE_ARCHITECTURES)}); "
                f"model.architecture={arch!r} cannot go past model.max_context={limit}"
            )
        return
    if n is not None and n - 1 > limit:
        raise ValueError(
            f"eval.max_tokens={n} feeds {n - 1} positions, more than model.max_context={limit} of model "
            f"{cfg.model.name}; allowed: eval.max_tokens <= {limit + 1} (eval.beyond_context=true runs a RoPE "
            "model past its context, knowingly)"
        )


def _check_choice(option: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{option}={value!r} is not allowed; choose one of: {', '.join(map(str, allowed))}")


def validate(cfg: DictConfig) -> None:
    """Every check that needs no model: run it before loading anything."""
    from kvexp.engine.cache import (  # torch loads here, not for --help
        COMPILE_MODES,
        POSITION_OPTIONS,
        WHEN_OPTIONS,
    )
    from kvexp.models import MODEL_SOURCES, check_checkpoint
    from kvexp.tasks.base import method_from_config

    _check_choice("model.source", cfg.model.source, MODEL_SOURCES)
    _check_dataset(cfg)
    _check_choice("engine.positions", cfg.engine.positions, POSITION_OPTIONS)
    _check_choice("engine.when", cfg.engine.when, WHEN_OPTIONS)
    if cfg.engine.slack < 0:
        raise ValueError(f"engine.slack must be >= 0, got {cfg.engine.slack}")
    if cfg.engine.compile_mode is not None:
        _check_choice("engine.compile_mode", cfg.engine.compile_mode, COMPILE_MODES)
    _check_choice("logger", cfg.logger.name, LOGGERS)
    _check_train(cfg)
    if cfg.logger.name == "wandb":
        _check_choice("logger.mode", cfg.logger.mode, WANDB_MODES)
    threads = cfg.hardware.num_threads
    if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool) or threads < 1):
        raise ValueError(
            f"hardware.num_threads must be null (torch's default) or an integer >= 1, got {threads!r}"
        )
    if cfg.eval.chunk_size < 1:
        raise ValueError(f"eval.chunk_size must be >= 1, got {cfg.eval.chunk_size}")
    _check_generation_options(cfg.eval)
    if cfg.eval.num_beams > 1 and cfg.dataset.task != "generation":
        raise ValueError(
            f"eval.num_beams={cfg.eval.num_beams}: beam search applies to generation tasks, not "
            f"dataset.task={cfg.dataset.task}; leave eval.num_beams=1"
        )
    if cfg.eval.batch_size > 1 and cfg.dataset.task not in ("generation", "perplexity"):
        raise ValueError(
            f"eval.batch_size={cfg.eval.batch_size}: batched evaluation applies to generation and perplexity tasks, "
            f"not dataset.task={cfg.dataset.task} (lm-eval batches with dataset.batch_size); leave eval.batch_size=1"
        )
    for key in ("max_samples", "max_tokens"):
        value = cfg.eval[key]
        if value is not None and value < (2 if key == "max_tokens" else 1):
            raise ValueError(f"eval.{key} must be null or >= {2 if key == 'max_tokens' else 1}, got {value}")

    _check_context(cfg)
    if cfg.model.get("checkpoint"):
        check_checkpoint(str(cfg.model.checkpoint))  # a corrupt file fails here, not after the model loads

    budget = cfg.budget
    if budget.tokens is not None and budget.tokens <= 0:
        raise ValueError(f"budget.tokens must be a positive number of tokens, got {budget.tokens}")
    if budget.keep_ratio is not None and not 0.0 < budget.keep_ratio <= 1.0:
        raise ValueError(f"budget.keep_ratio must be in (0, 1], got {budget.keep_ratio}")
    if budget.tokens is not None and budget.keep_ratio is not None:
        raise ValueError(
            "set either budget.tokens or budget.keep_ratio, not both (use budget.keep_ratio=null)"
        )
    for name in ("per_layer", "per_head"):
        values = budget[name]
        flat = [] if values is None else OmegaConf.to_container(values)
        flat = [b for row in flat for b in (row if isinstance(row, list) else [row])]
        if any(b <= 0 for b in flat):
            raise ValueError(f"budget.{name} entries must be positive token counts, got {flat}")
    _check_allocation(budget)
    method = method_from_config(cfg.method)
    has_budget = any(budget[k] is not None for k in ("tokens", "keep_ratio", "per_layer", "per_head"))
    if method.compresses and not has_budget and not getattr(method, "keep_ratio", None):
        raise ValueError(
            f"method={method.name} needs a budget: budget=<64..4096|keep_0.5|...>, budget.tokens=N or "
            "budget.keep_ratio=R"
        )
    method.validate(budget.tokens)
    trains = cfg.train.name not in ("none", *PROBING_TRAINERS)
    if method.probes and has_budget and (cfg.dataset.task != "generation" or trains):
        where = f"dataset.task={cfg.dataset.task}" if cfg.train.name == "none" else f"train={cfg.train.name}"
        raise ValueError(
            f"method={method.name} scores the prompt with probes after it, which only the generation tasks run "
            f"(dataset=passkey, ruler, ...); {where} cannot use it"
        )
    from kvexp.tasks.context_compression import requested_compression

    compression = requested_compression(cfg.context_compression, method)
    if compression is not None:
        compression.validate()
        if cfg.dataset.task != "generation":
            raise ValueError(
                f"context_compression shortens a generation task's context; dataset.task={cfg.dataset.task} has none"
            )
    if method.prompt_block is not None and cfg.dataset.task == "perplexity":
        raise ValueError(
            f"method={method.name} feeds prompts in blocks; streaming perplexity feeds eval.chunk_size-token blocks "
            "already: use the scorer itself with eval.chunk_size=N"
        )
    if method.prompt_block is not None and cfg.eval.prefill_chunk_size not in (None, method.prompt_block):
        raise ValueError(
            f"method.block_size={method.prompt_block} and eval.prefill_chunk_size={cfg.eval.prefill_chunk_size} "
            "disagree: set one"
        )
    if method.needs_question and cfg.dataset.task == "generation" and cfg.eval.protocol != "query_aware":
        raise ValueError(
            f"method={method.name} compresses the context by the question's attention: set eval.protocol=query_aware"
        )
    option = (
        "dataset.batch_size" if cfg.dataset.task == "lm_eval" else "eval.batch_size"
    )  # lm-eval's own knob
    batch = OmegaConf.select(cfg, option, default=1)
    if batch > 1 and not method.batches:
        raise ValueError(
            f"{option}={batch}: method={method.name} cannot answer a batch exactly as it answers each sample alone "
            f"(it couples the rows or counts tokens by slot; docs/methods.md says why); set {option}=1"
        )
    _check_model_shape(cfg, method)


def _check_model_shape(cfg: DictConfig, method) -> None:
    """Options sized by the model (budget.per_layer, budget.per_head, a method's layer indices) against its
    config, read without the weights; skipped when the config cannot be read before the load (hub offline)."""
    from kvexp.models import model_shape

    shape = model_shape(cfg.model)
    if shape is None:
        return
    layers, kv_heads = shape
    where = f"model {cfg.model.name} has {layers} layers and {kv_heads} KV heads"
    per_layer, per_head = cfg.budget.per_layer, cfg.budget.per_head
    if per_layer is not None and len(per_layer) != layers:
        raise ValueError(f"budget.per_layer has {len(per_layer)} entries; {where}: give one per layer")
    if per_head is not None:
        rows = [len(row) for row in per_head]
        if len(rows) != layers or any(n != kv_heads for n in rows):
            raise ValueError(
                f"budget.per_head is {len(rows)} rows of {sorted(set(rows))} entries; {where}: give "
                f"{layers} rows of {kv_heads} (one per layer, one per KV head)"
            )
    method.check_model(layers, kv_heads)


def _check_train(cfg: DictConfig) -> None:
    """train=<name> names a trainer, and the trainer accepts its options (checked before any model loads)."""
    _check_choice("train", cfg.train.name, TRAIN_CHOICES)
    if cfg.train.name != "none":
        check_train(cfg)


def _check_dataset(cfg: DictConfig) -> None:
    """The task exists, and its dataset config works (the task's `check`, kvexp.tasks.registry)."""
    from kvexp.tasks.registry import TASKS

    _check_choice("dataset.task", cfg.dataset.task, tuple(TASKS))
    TASKS[cfg.dataset.task].check(cfg)


def _check_generation_options(ev: DictConfig) -> None:
    from kvexp.tasks.generation import PROTOCOLS

    _check_choice("eval.protocol", ev.protocol, PROTOCOLS)
    if ev.max_new_tokens is not None and ev.max_new_tokens < 1:
        raise ValueError(f"eval.max_new_tokens must be null or >= 1, got {ev.max_new_tokens}")
    if ev.prefill_chunk_size is not None and ev.prefill_chunk_size < 1:
        raise ValueError(f"eval.prefill_chunk_size must be null or >= 1, got {ev.prefill_chunk_size}")
    if ev.temperature <= 0:
        raise ValueError(f"eval.temperature must be > 0, got {ev.temperature}")
    if not 0.0 < ev.top_p <= 1.0:
        raise ValueError(f"eval.top_p must be in (0, 1], got {ev.top_p}")
    if ev.num_beams < 1:
        raise ValueError(f"eval.num_beams must be >= 1 (1: no beam search), got {ev.num_beams}")
    if not isinstance(ev.batch_size, int) or ev.batch_size < 1:
        raise ValueError(f"eval.batch_size must be an integer >= 1, got {ev.batch_size!r}")
    if ev.batch_size > 1 and ev.num_beams > 1:
        raise ValueError(
            f"eval.batch_size={ev.batch_size} with eval.num_beams={ev.num_beams}: beam search uses the batch for its "
            "beams; set eval.batch_size=1"
        )
    if ev.num_beams > 1 and ev.do_sample:
        raise ValueError(
            f"eval.num_beams={ev.num_beams} with eval.do_sample=true: beam search here is greedy; set "
            "eval.do_sample=false, or eval.num_beams=1 to sample"
        )


def _check_allocation(budget: DictConfig) -> None:
    """budget.allocation names a schedule, has a budget to split, and its parameters work."""
    _check_choice("budget.allocation", budget.allocation, ALLOCATIONS)
    if budget.allocation != "uniform":
        if budget.per_layer is not None or budget.per_head is not None:
            raise ValueError(
                f"budget.allocation={budget.allocation} splits budget.tokens or budget.keep_ratio over the layers; "
                "explicit budget.per_layer / budget.per_head need budget.allocation=uniform"
            )
        if budget.tokens is None and budget.keep_ratio is None:
            raise ValueError(
                f"budget.allocation={budget.allocation} needs budget.tokens or budget.keep_ratio"
            )
    # A dry run checks the schedule's parameters now; a keep_ratio budget is only known per document.
    probe = budget.tokens if budget.tokens is not None else 4096
    try:
        allocate(budget.allocation, probe, 2, **OmegaConf.to_container(budget.allocation_params))
    except ValueError as err:
        raise ValueError(f"budget.allocation={budget.allocation}, budget.allocation_params: {err}") from err
