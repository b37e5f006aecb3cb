"""`dataset=prompt`: your own prompt, answered with the full cache and with the compressed one, side by side.

    python -m kvexp dataset=prompt dataset.prompt="What is machine learning?" method=pooling_merge budget=64
    python -m kvexp dataset=prompt dataset.prompt_file=prompts.txt method=snapkv budget=keep_0.5
    python -m kvexp dataset=prompt method=h2o budget=64          # prompts typed on standard input, Ctrl-D ends

A prompt is a generation sample (kvexp.tasks.generation) whose context is the prompt, with no question and no
reference answer (metric family `none`: no scores). It goes through the generation runner like any other sample:
the user turn of the chat template when the tokenizer has one (`dataset.chat_template`, `eval.chat_template`),
the prompt as the compressed context (`eval.protocol=query_agnostic`: the template's assistant header is then
appended uncompressed, so every layer keeps budget + header tokens; `query_aware`: compressed with it;
`budget.keep_ratio`: a fraction of what is compressed), `eval.max_new_tokens` (null: `dataset.max_new_tokens`),
greedy or seeded sampling (`eval.do_sample`, `temperature`, `top_p`), `eval.prefill_chunk_size`, `engine.*`.

Each prompt is answered with the full cache (unless `eval.compare_to_full=false`), then with the method, one
right after the other in this process, and the pair is printed at once with each answer's KV figures from that
very run (`cache.stats()`: tokens kept, the mean over layers and KV heads, of the tokens seen; the KV bytes held)
and its time (seconds from the prompt to the last token, tokens/s, time to first token). The full-cache answers
are never taken from `cache_dir` (their timings would be another run's). `eval.warmup` runs both caches once,
untimed, for 2 tokens before the first prompt, so its timings exclude the process's first-call overhead.

The prompts: `dataset.prompt` (one, verbatim), `dataset.prompt_file` (one per line, blank lines skipped), or,
with neither, standard input: a loop that keeps the model loaded, shows `> ` when stdin is a terminal, answers
each non-blank line as it is read and ends at EOF (Ctrl-D). `eval.max_samples` caps the number of prompts. The
run dir gets summary.json (the generation task's metrics, kv_cache and timing figures, plus `prompts`: each
prompt with both answers and their printed figures) and samples.csv (one row per prompt) once the prompts are done. A prompt file's text is
part of the config hash; a stdin session is never resumed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import shutil
import sys
import textwrap
from collections.abc import Iterable, Iterator, Mapping
from itertools import zip_longest
from pathlib import Path
from typing import IO, Any

from omegaconf import DictConfig

from kvexp.budgets import resolve_budget
from kvexp.tasks.base import Results, engine_options
from kvexp.tasks.generation import (
    UNSCORED,
    GenerationResult,
    GenerationSample,
    GenerationSetup,
    PromptEncoder,
    run_generation,
    warm_up,
)

LAYOUTS = ("auto", "side_by_side", "stacked")
SIDE_BY_SIDE_MIN_WIDTH = 120  # layout=auto: two columns from this terminal width on


def check_prompt(dataset: Mapping) -> None:
    """The prompt options work (before any model loads): one source at most, non-empty, a readable file."""
    if dataset.get("layout", "auto") not in LAYOUTS:
        raise ValueError(
            f"dataset.layout={dataset.get('layout')!r} is not allowed; choose one of: {', '.join(LAYOUTS)}"
        )
    if dataset.get("prompt") is not None and dataset.get("prompt_file") is not None:
        raise ValueError(
            "dataset.prompt and dataset.prompt_file are both set; give one of them "
            "(or neither, to type prompts on standard input)"
        )
    configured_prompts(dataset)


def configured_prompts(dataset: Mapping) -> list[str] | None:
    """The prompts of `dataset.prompt` or `dataset.prompt_file` (one per line, blank lines skipped); None when
    neither is set (the prompts come from standard input)."""
    if dataset.get("prompt") is not None:
        if not str(dataset["prompt"]).strip():
            raise ValueError(
                "dataset.prompt is empty; give the prompt text (or leave it unset to use standard input)"
            )
        return [str(dataset["prompt"])]
    if dataset.get("prompt_file") is None:
        return None
    path = Path(dataset["prompt_file"]).expanduser()
    if not path.is_file():
        raise ValueError(f"dataset.prompt_file={dataset['prompt_file']}: no such file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(
            f"dataset.prompt_file={dataset['prompt_file']}: cannot be read as UTF-8 text ({err})"
        ) from err
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ValueError(
            f"dataset.prompt_file={dataset['prompt_file']} holds no prompt (every line is blank)"
        )
    return prompts


def prompt_inputs(dataset: Mapping) -> str | None:
    """The config-hash digest of the prompts (a prompt file's lines); None for standard input (never resumed)."""
    prompts = configured_prompts(dataset)
    if prompts is None:
        return None
    if dataset.get("prompt_file") is None:
        return ""  # dataset.prompt is in the config itself
    return hashlib.sha256("\n".join(prompts).encode()).hexdigest()


def stdin_prompts(stream: IO[str] | None = None, out: IO[str] | None = None) -> Iterator[str]:
    """Non-blank lines of `stream` (default: sys.stdin, looked up now) as they are read, until EOF; a `> `
    prompt on `out` (default: sys.stdout) when the stream is a terminal. Ctrl-C at the prompt ends like EOF."""
    stream = stream if stream is not None else sys.stdin
    out = out if out is not None else sys.stdout
    interactive = stream.isatty()
    while True:
        if interactive:
            out.write("> ")
            out.flush()
        try:
            line = stream.readline()
        except KeyboardInterrupt:
            line = ""
        if not line:
            if interactive:
                out.write("\n")
            return
        if line.strip():
            yield line.strip()


def prompt_sample(text: str, index: int, dataset: Mapping) -> GenerationSample:
    """Prompt `index` (0-based) as a generation sample: the prompt is the context; no question, no references."""
    return GenerationSample(
        id=str(index + 1),
        context=text,
        question="",
        answers=[],
        max_new_tokens=dataset["max_new_tokens"],
        metric=UNSCORED,
        meta={"prompt": text},
        stop=list(dataset.get("stop") or []),
    )


def prompt_samples(
    dataset: Mapping, encoder: PromptEncoder | None = None, max_samples: int | None = None, seed: int = 0
) -> list[GenerationSample]:
    """The registry loader (Python API): the configured prompts, or every non-blank line of standard input."""
    texts = configured_prompts(dataset)
    texts = list(texts if texts is not None else stdin_prompts())
    return [prompt_sample(t, i, dataset) for i, t in enumerate(texts[:max_samples])]


def run_prompts(cfg: DictConfig, setup: GenerationSetup) -> Results:
    """dataset=prompt's own loop (its registry entry's `run`; the model is loaded once): answer each prompt with the
    full cache and the method, printing the pair as it is done; the generation task then summarizes them all,
    plus `prompts` (each prompt with both answers)."""
    model, tokenizer, method = setup.model, setup.tokenizer, setup.method
    encoder, settings = setup.encoder, setup.settings
    engine = engine_options(cfg)
    layers = model.config.num_hidden_layers

    def budget_for(tokens: int):
        return resolve_budget(cfg.budget, tokens, layers)  # keep_ratio: of the compressed prompt

    texts: Iterable[str] | None = configured_prompts(cfg.dataset)
    if texts is None:
        if sys.stdin.isatty():
            print("Type a prompt and press Enter; Ctrl-D ends the session.", file=sys.stderr, flush=True)
        texts = stdin_prompts()
    samples: list[GenerationSample] = []
    before: list[GenerationResult] = []
    after: list[GenerationResult] = []
    for i, text in enumerate(texts):
        sample = prompt_sample(text, i, cfg.dataset)
        prompt = encoder.encode(sample, cfg.eval.max_new_tokens)
        if i == 0 and cfg.eval.warmup:  # both caches, so neither pays the first-call overhead in its times
            warm_up(model, tokenizer, prompt, settings)
            budget = budget_for(prompt.compressed_tokens(settings["protocol"]))
            warm_up(model, tokenizer, prompt, settings, method, budget, **engine)
        # Both caches sample with seed + i, as run_generation's sample i would.
        decoding = dataclasses.replace(settings["decoding"], seed=settings["decoding"].seed + i)
        run = {**settings, "decoding": decoding}
        full = None
        if cfg.eval.compare_to_full:
            full = run_generation(model, tokenizer, [sample], [prompt], "full", lambda tokens: None, **run)[0]
            before.append(full)
        compressed = run_generation(
            model, tokenizer, [sample], [prompt], method, budget_for, **run, **engine
        )[0]
        samples.append(sample)
        after.append(compressed)
        label = _label(method, cfg.budget, cfg.eval.protocol, compressed)
        print(format_pair(sample, full, compressed, label, layout=cfg.dataset.layout), flush=True)
        if cfg.eval.max_samples is not None and len(samples) >= cfg.eval.max_samples:
            break
    if not samples:
        raise ValueError(
            "dataset=prompt: standard input held no prompt (type one per line, or give dataset.prompt / "
            "dataset.prompt_file)"
        )
    prompts = [
        {
            "id": s.id,
            "prompt": s.context,
            "full": answer_record(b) if b else None,
            "compressed": answer_record(a),
        }
        for s, a, b in zip_longest(samples, after, before)
    ]
    return Results(samples, before or None, after, extra={"prompts": prompts})


def _label(method, budget: Mapping, protocol: str, result: GenerationResult) -> str:
    """The compressed answer's heading: the method and its budget (and the uncompressed template tail)."""
    if not method.compresses:
        return method.name
    label = f"{method.name}, {budget_text(budget, result.budget)}"
    if protocol == "query_agnostic" and result.question_tokens:
        label += f" (+{result.question_tokens} template tokens after the prompt, kept whole)"
    return label


def budget_text(budget: Mapping, resolved: int | list[int] | None) -> str:
    """The compressed answer's budget in words: "budget 64 tokens", "keep_ratio 0.5 = 14 tokens", ..."""
    if resolved is None:
        return "per-head budgets" if budget.get("per_head") is not None else "no budget"
    if isinstance(resolved, list):
        tokens = (
            f"{sum(resolved) / len(resolved):g} tokens per layer on average ({min(resolved)}-{max(resolved)})"
        )
    else:
        tokens = f"{resolved} tokens"
    if budget.get("keep_ratio") is not None:
        return f"keep_ratio {budget['keep_ratio']} = {tokens}"
    return f"budget {tokens}"


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:.1f}"


def answer_record(result: GenerationResult) -> dict[str, Any]:
    """One answer and its figures, from its own run (what `figures` prints; summary.json's `prompts`)."""
    kv = result.kv
    return {
        "answer": result.prediction,
        "new_tokens": result.new_tokens,
        "kv_tokens_kept": kv["tokens_kept"],  # mean over layers and KV heads, at the end of the answer
        "kv_tokens_seen": kv["tokens_seen"],
        "kv_bytes_kept": kv.get("bytes_kept", 0),
        "kv_bytes_full": kv.get("bytes_full", 0),  # an uncompressed cache of the same tokens
        "total_s": result.total_s,  # prompt to last token
        "tokens_per_s": result.new_tokens / result.total_s if result.total_s else None,
        "ttft_s": result.ttft_s,
    }


def figures(result: GenerationResult) -> list[str]:
    """One answer's KV cache and time figures, from its own run."""
    r = answer_record(result)
    held = r["kv_bytes_kept"]
    of_full = f" of {r['kv_bytes_full']:,} uncompressed" if r["kv_bytes_full"] != held else ""
    rate = f"{r['tokens_per_s']:.1f}" if r["tokens_per_s"] is not None else "-"
    return [
        f"KV cache: {_number(r['kv_tokens_kept'])} of {r['kv_tokens_seen']} tokens kept "
        f"(mean per layer and KV head), {held:,} bytes ({held / 2**20:.2f} MiB){of_full}",
        f"time: {r['new_tokens']} new tokens in {r['total_s']:.3f} s, {rate} tokens/s "
        f"(first token after {r['ttft_s']:.3f} s)",
    ]


def _wrap(text: str, width: int) -> list[str]:
    """`text` wrapped to `width`, its own line breaks (and indentation) kept."""
    lines: list[str] = []
    for paragraph in text.expandtabs(4).splitlines() or [""]:
        lines += textwrap.wrap(paragraph, width, break_on_hyphens=False) or [""]
    return lines


def _parts(title: str, result: GenerationResult, width: int, indent: str = "") -> list[list[str]]:
    """One answer's lines, `width` wide, in parts: header, answer, blank, then each figure (`indent`ed)."""
    header = (
        [f"--- {title} " + "-" * max(0, width - len(title) - 5)]
        if len(title) + 5 <= width
        else _wrap(title, width)
    )
    answer = _wrap(result.prediction, width) if result.prediction else ["(empty answer)"]
    figs = [[indent + line for line in _wrap(f, width - len(indent))] for f in figures(result)]
    return [header, answer, *([[""]] if not indent else []), *figs]


def format_pair(
    sample: GenerationSample,
    full: GenerationResult | None,
    compressed: GenerationResult,
    label: str,
    *,
    layout: str = "auto",
    width: int | None = None,
) -> str:
    """The prompt, then its full-cache answer and its compressed answer, each labelled with its figures:
    side by side (two columns) or one after the other, wrapped to `width` (default: the terminal's)."""
    width = max(40, width or shutil.get_terminal_size((100, 24)).columns)
    answers = [("full cache", full)] if full is not None else []
    answers.append((label, compressed))
    title = f"=== prompt {sample.id} "
    lines = [title + "=" * max(0, width - len(title)), *_wrap(sample.context, width)]
    side = layout == "side_by_side" or (layout == "auto" and width >= SIDE_BY_SIDE_MIN_WIDTH)
    if not side or len(answers) == 1:
        for name, result in answers:
            lines += [line for part in _parts(name, result, width, "  ") for line in part]
        return "\n".join(lines)
    column = (width - 3) // 2
    left, right = (_parts(name, result, column) for name, result in answers)
    for left_part, right_part in zip(left, right, strict=True):  # each part starts on one row in both columns
        for a, b in zip_longest(left_part, right_part, fillvalue=""):
            lines.append(f"{a:<{column}} | {b}".rstrip())
    return "\n".join(lines)
