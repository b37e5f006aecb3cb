"""Generation tasks: a context that is compressed, a question, and reference answers to score the output against.

Protocol (docs/usage.md#generation, `eval.protocol`):

* `query_agnostic` (default; kvpress's benchmark protocol): the context is prefilled and compressed alone, then
  the question (with the answer prefix) is appended in one step that never compresses: every layer's budget
  grows by the question's length first, so each layer still holds every question token when the first answer
  token is chosen, and the method still observes the question's queries. Decode steps then compress as
  `engine.when` says (`always`: back down to budget + question length; `prefill`: not at all, kvpress's
  prefill-only setting, under which the question stays in every layer until the end).
* `query_aware` (SnapKV's setting): context and question are one prompt, prefilled and compressed together.

Both protocols feed the same token ids (context and question are tokenized separately, as kvpress does), so the
protocol is the only difference between them. The prompt follows kvpress's pipeline: without a chat template
`context` then `question + "\\n" + answer_prefix` (the question alone when there is no prefix, so a task that
builds its whole prompt, e.g. LongBench, is fed exactly that); with one (`eval.chat_template`, by default the
dataset's `chat_template` when the tokenizer has a template) the context opens the user turn and the question
closes it, followed by the template's assistant header and the answer prefix.

The context is prefilled in one forward by default; `prefill_chunk_size` feeds it in chunks with compression
between them (so the peak KV memory is budget + chunk). Decoding is an explicit loop, so every step is
timed: greedy by default, or seeded sampling (temperature, top-p). It stops at EOS, after `max_new_tokens`, or
at a stop string (searched after the answer's leading whitespace; the prediction is cut there).

Cost per sample: TTFT (prefill, compression and the question step, until the first answer token), TPOT (mean
later decode step), KV bytes at the end (`cache.stats()`) and at the peak (before compressions: a one-forward
prefill holds the whole context until the compression that follows it).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from kvexp.data import read_jsonl, read_text
from kvexp.engine import KVCache
from kvexp.files import Journal
from kvexp.methods import Method, build_method, make_cache
from kvexp.methods.base import Probing
from kvexp.tasks import metrics
from kvexp.tasks.base import Loaded, eviction_times, kv_totals, run_journaled, share_batch_costs
from kvexp.tasks.data import (
    LOCAL_SPLIT,
    check_split,
    from_hub,
    load_hub_split,
    locate,
    split_bounds,
)
from kvexp.tracking import log_progress

log = logging.getLogger(__name__)

PROTOCOLS = ("query_agnostic", "query_aware")
# The score a family reports first, and the objective of a run (other families: their first key).
PRIMARY_SCORE = {"qa": "accuracy", "qa_all": "accuracy", "rouge": "rougeL"}
UNSCORED = "none"  # the metric family of a sample without references (dataset=prompt): no scores


@dataclass
class GenerationSample:
    """One generation example, task-independent: every generation dataset yields these."""

    id: str
    context: str  # the long part the cache compresses
    question: (
        str  # appended after compression (query_agnostic) or part of the compressed prompt (query_aware)
    )
    answers: list[str]  # references the prediction is scored against
    answer_prefix: str = ""  # text the model continues from, after the question (e.g. "The pass key is")
    max_new_tokens: int = 32
    metric: str = "qa"  # which scorer applies (the task's metric family, see kvexp.tasks.metrics)
    meta: dict[str, Any] = field(
        default_factory=dict
    )  # depth, length, task name, ... (copied to samples.csv)
    stop: list[str] = field(default_factory=list)  # generation ends at the first of these (e.g. "\n")


@dataclass
class Prompt:
    """A sample's token ids: the context (compressed) and the question part (question, template, prefix)."""

    context: torch.Tensor  # [1, C]
    question: torch.Tensor  # [1, Q]
    opening: int = 0  # leading context tokens that open the chat template (system prompt, user header)
    closing: torch.Tensor | None = (
        None  # [1, c] the template's user-turn closing and answer opening (None: none)
    )

    def compressed_tokens(self, protocol: str) -> int:
        """Tokens the prefill compression sees: what `budget.keep_ratio` is a fraction of."""
        return self.context.shape[1] + (self.question.shape[1] if protocol == "query_aware" else 0)


class PromptEncoder:
    """Sample -> token ids, the way kvpress's pipeline builds them (see the module docstring).

    A prompt longer than `max_context - max_new_tokens` loses the middle of its context (LongBench's rule).
    """

    def __init__(self, tokenizer, chat_template: bool = False, max_context: int | None = None):
        if chat_template and not getattr(tokenizer, "chat_template", None):
            raise ValueError("eval.chat_template=true, but the model's tokenizer has no chat template")
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.max_context = max_context

    def texts(self, sample: GenerationSample) -> tuple[str, str]:
        """(context text, question text) as they are tokenized."""
        if not self.chat_template:
            # kvpress: the answer prefix goes on the line after the question; without one the question is as given.
            return sample.context, sample.question + (
                f"\n{sample.answer_prefix}" if sample.answer_prefix else ""
            )
        # kvpress's trick: a separator longer than the context cannot occur in it.
        separator = "#" * (len(sample.context) + 10)
        text = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": sample.context + separator}],
            add_generation_prompt=True,
            tokenize=False,
        )
        context, suffix = text.split(separator)
        return context, sample.question + suffix + sample.answer_prefix

    def token_ids(self, sample: GenerationSample) -> tuple[list[int], list[int]]:
        """(context ids, question ids), never truncated."""
        context_text, question_text = self.texts(sample)
        # Plain prompts get the tokenizer's default special tokens (as perplexity does); a template has its own.
        context = self.tokenizer(context_text, add_special_tokens=not self.chat_template).input_ids
        return context, self.tokenizer(question_text, add_special_tokens=False).input_ids

    def encode(self, sample: GenerationSample, max_new_tokens: int | None = None) -> Prompt:
        context, question = self.token_ids(sample)
        if self.max_context is not None:
            room = self.max_context - len(question) - (max_new_tokens or sample.max_new_tokens)
            if room < 2:
                raise ValueError(
                    f"sample {sample.id}: the question and answer ({len(question)} + "
                    f"{max_new_tokens or sample.max_new_tokens} tokens) do not fit model.max_context={self.max_context}"
                )
            if len(context) > room:
                log.warning(
                    "sample %s: context truncated in the middle, %d -> %d tokens",
                    sample.id,
                    len(context),
                    room,
                )
                context = context[: room // 2] + context[len(context) - (room - room // 2) :]
        opening, closing = self.template_parts()
        return Prompt(
            torch.tensor([context]),
            torch.tensor([question], dtype=torch.long),
            min(opening, len(context)),
            closing,
        )

    def template_parts(self) -> tuple[int, torch.Tensor | None]:
        """(tokens that open the chat template before a context, ids [1, c] that close the user turn and open the
        answer) for a probing method (KVzip's repeat prompt sits between them); (0, None) without a template."""
        if not self.chat_template:
            return 0, None
        separator = "#" * 16
        text = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": separator}], add_generation_prompt=True, tokenize=False
        )
        opening, closing = text.split(separator)
        ids = self.tokenizer(opening, add_special_tokens=False).input_ids
        return len(ids), torch.tensor([self.tokenizer(closing, add_special_tokens=False).input_ids])


@dataclass
class GenerationSetup(Loaded):
    """A generation run's model, method and samples (kvexp.tasks.base.Loaded), their prompts as the `encoder`
    built them, and run_generation's decoding `settings` (protocol, decoding, max_new_tokens, prefill_chunk_size)."""

    encoder: PromptEncoder
    prompts: list[Prompt]
    settings: dict[str, Any]
    # The compressed run's prompts after context compression (None: the prompts above) and its figures.
    compressed_prompts: list[Prompt] | None = None
    context_compression: dict[str, Any] | None = None


@dataclass(frozen=True)
class Decoding:
    """How answer tokens are chosen: greedy by default; sampling is seeded; `num_beams` > 1: beam search (with
    `length_penalty`, transformers' default semantics)."""

    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    num_beams: int = 1
    length_penalty: float = 1.0


@dataclass
class GenerationResult:
    id: str
    prediction: str  # the decoded answer, cut at the first stop string, stripped
    context_tokens: int
    question_tokens: int
    new_tokens: int  # generated tokens (EOS included when it ended the answer)
    ttft_s: float  # prefill + compression + question step, until the first answer token
    step_s: list[float] = field(default_factory=list)  # every later decode step
    kv: dict[str, Any] = field(default_factory=dict)  # cache.stats() at the end
    kv_peak_bytes: int = 0  # largest physical KV footprint, before compressions included
    budget: int | list[int] | None = None  # the budget the cache was made with (resolved per sample)
    scores: dict[str, float] = field(default_factory=dict)  # filled by `score_results`
    wall_s: float | None = None  # in a batch: its share of the batch's wall time (None: answered alone)

    @property
    def total_s(self) -> float:
        """The answer's latency: TTFT plus its later steps."""
        return self.ttft_s + sum(self.step_s)

    @property
    def cost_s(self) -> float:
        """The wall time the answer cost: its share of its batch's, or its latency when answered alone."""
        return self.total_s if self.wall_s is None else self.wall_s


def _eos_ids(model, tokenizer) -> set[int]:
    ids = model.generation_config.eos_token_id
    ids = set(ids if isinstance(ids, list) else [] if ids is None else [ids])
    return ids | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set())


def _cut(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """`text` up to the first stop string after its leading whitespace, and whether one was found."""
    lead = len(text) - len(text.lstrip())
    hits = [i for i in (text.find(s, lead) for s in stop if s) if i >= 0]
    return (text[: min(hits)], True) if hits else (text, False)


def _pick(logits: torch.Tensor, decoding: Decoding, generator: torch.Generator | None) -> torch.Tensor:
    """The next token [1] from the last position's logits [1, V] (fp32)."""
    if not decoding.do_sample:
        return logits.argmax(-1)
    probs = torch.softmax(logits / decoding.temperature, dim=-1)
    if decoding.top_p < 1.0:
        # Nucleus: keep the most probable tokens whose mass before them is below top_p (the first always stays).
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs >= decoding.top_p
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs.masked_fill(outside, 0.0))
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def _probed_prefill(
    model,
    tokenizer,
    cache: KVCache,
    prompt: Prompt,
    feed: Callable[[torch.Tensor], torch.Tensor],
    protocol: str,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """The prompt of a probing method (`Method.probes`: KVzip, FINCH), fed and compressed by the method with the
    probes it runs (their entries never stay): the context, and the question under the query-aware protocol.
    Returns the last logits [1, V] (fp32)."""
    device = model.device

    def encode(text: str) -> torch.Tensor:
        return torch.tensor([tokenizer(text, add_special_tokens=False).input_ids], dtype=torch.long)

    def run(probe: torch.Tensor) -> None:
        model(probe.to(device), past_key_values=cache, logits_to_keep=1)

    closing = prompt.closing if prompt.closing is not None else encode("\n")
    question = prompt.question.to(device) if protocol == "query_aware" else None
    probing = Probing(
        prompt.context.to(device), prompt.opening, closing, encode, run, feed, question, chunk_size
    )
    return cache.layers[0].evictor.prefill(cache, probing)


def _forward(model, ids: torch.Tensor, cache: KVCache, chunk_size: int | None) -> torch.Tensor:
    """Feed `ids` [1, n] (in chunks if asked); the last position's logits [1, V] in fp32."""
    step = chunk_size or ids.shape[1]
    for start in range(0, ids.shape[1], step):
        logits = model(ids[:, start : start + step], past_key_values=cache, logits_to_keep=1).logits
    return logits[:, -1].float()


def warm_up(
    model,
    tokenizer,
    prompt: Prompt,
    settings: Mapping[str, Any],
    method: str | Method = "full",
    budget=None,
    **cache_kwargs,
) -> None:
    """One untimed 2-token answer, so the process's first-call overhead (kernel and allocator set-up, lazy
    imports) stays out of the timed runs; the RNG streams the timed runs draw from are left as they were."""
    common = {key: settings[key] for key in ("protocol", "decoding", "prefill_chunk_size")}
    devices = list(range(torch.cuda.device_count())) if model.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        generate_answer(model, tokenizer, prompt, method, budget, max_new_tokens=2, **common, **cache_kwargs)


@torch.no_grad()
def generate_answer(
    model,
    tokenizer,
    prompt: Prompt,
    method: str | Method,
    budget: int | list[int] | None,
    *,
    max_new_tokens: int,
    protocol: str = "query_agnostic",
    decoding: Decoding = Decoding(),
    stop: Sequence[str] = (),
    prefill_chunk_size: int | None = None,
    sample_id: str = "sample",
    **cache_kwargs,
) -> GenerationResult:
    """Answer one prompt through a fresh compressed cache (see the module docstring for the protocol)."""
    if decoding.num_beams == 1:
        rows = [Row(prompt, sample_id, max_new_tokens, decoding, tuple(stop))]
        return generate_batch(
            model, tokenizer, rows, method, budget, protocol, prefill_chunk_size, **cache_kwargs
        )[0]
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    cache = make_cache(model, method, budget, **cache_kwargs)
    context, question = prompt.context.to(model.device), prompt.question.to(model.device)
    eos = _eos_ids(model, tokenizer)
    if not context.shape[1] + question.shape[1]:
        raise ValueError(f"sample {sample_id}: the prompt has no tokens")
    start = time.perf_counter()
    probed = cache.holding  # a probing method feeds the prompt itself
    if probed:
        feed = lambda ids: _forward(model, ids, cache, prefill_chunk_size)  # noqa: E731
        logits = _probed_prefill(model, tokenizer, cache, prompt, feed, protocol, prefill_chunk_size)
    elif protocol == "query_aware":
        logits = _forward(model, torch.cat([context, question], dim=1), cache, prefill_chunk_size)
    if protocol == "query_agnostic":
        # An empty context (a prompt that is all question, e.g. a math problem without a chat template on a
        # tokenizer that adds no BOS) has nothing to prefill: the question step is the first forward.
        if context.shape[1] and not probed:
            logits = _forward(model, context, cache, prefill_chunk_size)
        if question.shape[1]:
            cache.admit(question.shape[1])
            logits = _forward(model, question, cache, None)
    search = BeamSearch(decoding.num_beams, decoding.length_penalty, max_new_tokens, eos, tokenizer, stop)
    tokens, ttft, steps = search.run(model, cache, logits, start)
    text, _ = _cut(tokenizer.decode(tokens, skip_special_tokens=True), stop)
    return GenerationResult(
        id=sample_id,
        prediction=text.strip(),
        context_tokens=context.shape[1],
        question_tokens=question.shape[1],
        new_tokens=len(tokens),
        ttft_s=ttft,
        step_s=steps,
        kv=cache.stats(),
        kv_peak_bytes=sum(layer.peak_bytes for layer in cache.layers if layer.is_initialized),
        budget=budget,
    )


@dataclass(frozen=True)
class Row:
    """One prompt of a batch and how its answer is generated (its own length limit, seed and stop strings)."""

    prompt: Prompt
    sample_id: str
    max_new_tokens: int
    decoding: Decoding  # greedy or sampled (its own seed); beam search runs alone (generate_answer)
    stop: tuple[str, ...] = ()


def _synchronize(model) -> None:
    if model.device.type == "cuda":
        torch.cuda.synchronize()


def left_padded(pieces: Sequence[torch.Tensor], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows [1, n_i] -> ids [B, max n], left-padded, and the mask [B, max n] of real tokens (long)."""
    width = max(p.shape[1] for p in pieces)
    ids = torch.full((len(pieces), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(pieces), width), dtype=torch.long)
    for i, p in enumerate(pieces):
        if p.shape[1]:
            ids[i, width - p.shape[1] :] = p[0]
            mask[i, width - p.shape[1] :] = 1
    return ids, mask


class BatchFeed:
    """The batch's forwards with each row's own positions: token i of row r sits at position seen_r + i whatever
    padding precedes it, so every row is rotated (RoPE) and recorded as when it runs alone; padding is marked in
    the attention mask and becomes dead slots."""

    def __init__(self, model, cache: KVCache, rows: int):
        self.model, self.cache = model, cache
        self.seen = torch.zeros(rows, dtype=torch.long)  # real tokens each row has fed
        self.mask = torch.zeros((rows, 0), dtype=torch.long)  # every forward so far (padding 0)

    def __call__(
        self, ids: torch.Tensor, mask: torch.Tensor, chunk_size: int | None = None, every: bool = False
    ) -> torch.Tensor:
        """Feed `ids` [B, n] (real where `mask`), in chunks if asked; the last position's logits [B, V] fp32
        (`every`: every position's of the last chunk, [B, chunk, V])."""
        step = chunk_size or ids.shape[1]
        for begin in range(0, ids.shape[1], step):
            piece, real = ids[:, begin : begin + step], mask[:, begin : begin + step]
            positions = (self.seen[:, None] + real.cumsum(-1) - 1).clamp_min(0)
            self.seen += real.sum(-1)
            self.mask = torch.cat([self.mask, real], dim=1)
            device = self.model.device
            logits = self.model(
                piece.to(device),
                attention_mask=self.mask.to(device),
                position_ids=positions.to(device),
                past_key_values=self.cache,
                logits_to_keep=0 if every else 1,
            ).logits
        return logits.float() if every else logits[:, -1].float()

    def keep(self, rows: list[int]) -> None:
        """Only these rows (batch positions, in order; one may repeat) go on: the finished ones leave the batch,
        their cache rows too, and the others continue as they would alone."""
        index = torch.tensor(rows)
        self.cache.reorder_cache(index.to(self.model.device))
        self.seen, self.mask = self.seen[index], self.mask[index]


@torch.no_grad()
def generate_batch(
    model,
    tokenizer,
    rows: Sequence[Row],
    method: str | Method,
    budget: int | list[int] | None,
    protocol: str = "query_agnostic",
    prefill_chunk_size: int | None = None,
    *,
    row_budgets: Sequence[int] | None = None,
    **cache_kwargs,
) -> list[GenerationResult]:
    """Answer several prompts at once through one compressed cache, each row left-padded (padding is dead slots,
    positions are each row's own): every row gets the tokens it gets alone, provided the rows share what shapes
    the cache (`batch_key`: the budget; with chunked prefill the context length; with decode-time compression
    under the query-agnostic protocol the question length). A finished row leaves the batch (its cache rows too).
    `row_budgets`: each row's own budget instead of `budget`, for a method with `Method.row_budgets`.

    Each result holds its row's own figures: TTFT and step times are the batch's (the row waited for them), its
    kv stats the row's own entries when it finished with its share (1 / rows) of the bytes held and of the
    method's time, and `wall_s` its share of the batch's wall time."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    for row in rows:
        if not row.prompt.context.shape[1] + row.prompt.question.shape[1]:
            raise ValueError(f"sample {row.sample_id}: the prompt has no tokens")
    n = len(rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    if row_budgets is not None:
        cache = make_cache(model, method, row_budgets=list(row_budgets), **cache_kwargs)
    else:
        cache = make_cache(model, method, budget, **cache_kwargs)
    feed = BatchFeed(model, cache, n)
    eos = _eos_ids(model, tokenizer)
    generators = [
        torch.Generator(model.device).manual_seed(r.decoding.seed) if r.decoding.do_sample else None
        for r in rows
    ]
    start = time.perf_counter()
    contexts = [r.prompt.context for r in rows]
    questions = [r.prompt.question for r in rows]
    if cache.holding and n > 1:
        raise ValueError(
            f"method={cache.layers[0].evictor.name} probes each prompt alone: use eval.batch_size=1"
        )
    probed = cache.holding  # a probing method feeds the prompt itself
    if probed:

        def feed_prompt(ids: torch.Tensor) -> torch.Tensor:
            return feed(ids.cpu(), torch.ones_like(ids.cpu()), prefill_chunk_size)

        logits = _probed_prefill(
            model, tokenizer, cache, rows[0].prompt, feed_prompt, protocol, prefill_chunk_size
        )
    elif protocol == "query_aware":
        logits = feed(
            *left_padded([torch.cat(p, dim=1) for p in zip(contexts, questions, strict=True)], pad),
            prefill_chunk_size,
        )
    if protocol == "query_agnostic":
        # An empty context (a prompt that is all question, e.g. a math problem without a chat template on a
        # tokenizer that adds no BOS) has nothing to prefill: the question step is the first forward.
        if any(c.shape[1] for c in contexts) and not probed:
            logits = feed(*left_padded(contexts, pad), prefill_chunk_size)
        width = max(q.shape[1] for q in questions)
        if width:
            cache.admit(width)
            logits = feed(*left_padded(questions, pad))
    token = _pick_rows(logits, rows, generators)
    _synchronize(model)
    ttft = time.perf_counter() - start
    tokens: list[list[int]] = [[t] for t in token.tolist()]
    results: list[GenerationResult | None] = [None] * n
    steps: list[float] = []

    def finish(i: int, at: int) -> None:
        """Row i, at batch position `at` now, is done: its answer and its own cache figures."""
        row = rows[i]
        text, _ = _cut(tokenizer.decode(tokens[i], skip_special_tokens=True), row.stop)
        results[i] = GenerationResult(
            id=row.sample_id,
            prediction=text.strip(),
            context_tokens=row.prompt.context.shape[1],
            question_tokens=row.prompt.question.shape[1],
            new_tokens=len(tokens[i]),
            ttft_s=ttft,
            step_s=steps[: len(tokens[i]) - 1],
            kv=cache.stats(row=at, seen=int(feed.seen[at])) if n > 1 else cache.stats(),
            budget=budget if row_budgets is None else row_budgets[i],
        )

    def done(i: int) -> bool:
        row, toks = rows[i], tokens[i]
        if toks[-1] in eos or len(toks) >= row.max_new_tokens:
            return True
        return bool(row.stop) and _cut(tokenizer.decode(toks, skip_special_tokens=True), row.stop)[1]

    active = list(range(n))  # the rows still answering, in batch order
    while True:
        going = []
        for at, i in enumerate(active):
            if done(i):
                finish(i, at)
            else:
                going.append(at)
        if len(going) < len(active) and going:
            feed.keep(going)
            token = token[torch.tensor(going, device=token.device)]
        active = [active[at] for at in going]
        if not active:
            break
        t0 = time.perf_counter()
        logits = feed(token[:, None], torch.ones((len(active), 1), dtype=torch.long))
        token = _pick_rows(logits, [rows[i] for i in active], [generators[i] for i in active])
        _synchronize(model)
        steps.append(time.perf_counter() - t0)
        for i, t in zip(active, token.tolist(), strict=True):
            tokens[i].append(t)
    # Each layer's largest physical length (a one-forward prefill holds the whole context until it is compressed;
    # chunked prefill holds budget + chunk), summed over layers; a row's share of it.
    peak = sum(layer.peak_bytes for layer in cache.layers if layer.is_initialized)
    share_batch_costs(results, cache, peak, time.perf_counter() - start)
    return results


def _pick_rows(logits: torch.Tensor, rows: Sequence[Row], generators) -> torch.Tensor:
    """Each row's next token [B] from its last logits [B, V]: greedy rows at once, sampled rows each with its own
    generator (the draws a row alone would make)."""
    token = logits.argmax(-1)
    for i, row in enumerate(rows):
        if row.decoding.do_sample:
            token[i] = _pick(logits[i : i + 1], row.decoding, generators[i])[0]
    return token


@dataclass
class BeamSearch:
    """Beam search over the cache's batch rows, with transformers' semantics (`generate(num_beams=k)`, its default
    `early_stopping=False`): each step ranks the top 2k (more with several EOS ids) continuations of the k running
    beams by summed log-probability; a continuation that ends (EOS, `max_new_tokens`, a stop string) and ranks
    within the first k becomes a finished hypothesis scored sum / length ** `length_penalty`, and the best k
    finished are kept; the k best that go on become the next beams, and the cache rows are reordered to follow
    them (`KVCache.reorder_cache`: every slot buffer, the method's per-slot state and its per-row scratch), so each
    beam's cache is the one its own tokens would have built. The search ends when every candidate ended or no
    running beam can still beat the worst of k finished hypotheses at its current length. The prompt is prefilled
    once (batch 1); the first step copies its row to the k beams."""

    beams: int
    length_penalty: float
    max_new_tokens: int
    eos: set[int]
    tokenizer: Any
    stop: Sequence[str]

    def ended(self, tokens: list[int]) -> bool:
        if tokens[-1] in self.eos or len(tokens) >= self.max_new_tokens:
            return True
        return bool(self.stop) and _cut(self.tokenizer.decode(tokens, skip_special_tokens=True), self.stop)[1]

    def run(
        self, model, cache: KVCache, logits: torch.Tensor, start: float
    ) -> tuple[list[int], float, list[float]]:
        """From the prompt's last logits [1, V]: (the best hypothesis' tokens, TTFT, later step times)."""
        k, device = self.beams, logits.device
        width = max(2, 1 + len(self.eos)) * k  # candidates ranked per step: enough to keep k beams running
        running: list[list[int]] = [[]]  # the beams' tokens so far (one empty beam before the first step)
        running_scores = torch.zeros(1, device=device)  # [beams] summed log-probabilities
        finished: list[list[int]] = []  # the best k ended hypotheses, best first
        # [k] their length-penalized scores, best first; _EMPTY: a free place
        finished_scores = torch.full((k,), _EMPTY, device=device)
        improvable, ttft, steps, step_start = True, 0.0, [], None
        while True:
            summed = torch.log_softmax(logits, dim=-1) + running_scores[:, None]  # [beams, V]
            top_scores, top_index = summed.flatten().topk(min(width, summed.numel()))
            origin = (top_index // summed.shape[-1]).tolist()
            tokens = (top_index % summed.shape[-1]).tolist()
            candidates = [running[b] + [t] for b, t in zip(origin, tokens, strict=True)]
            ends = torch.tensor([self.ended(c) for c in candidates], device=device)
            length = len(candidates[0]) ** self.length_penalty
            # Ended candidates ranked within the first k compete with the kept hypotheses, unless no hypothesis
            # can improve any more.
            entering = ends & (torch.arange(len(candidates), device=device) < k) & improvable
            merged = torch.cat([finished_scores, (top_scores / length).masked_fill(~entering, _EMPTY)])
            pool = finished + [None] * (k - len(finished)) + candidates
            kept = merged.topk(k).indices.tolist()
            finished = [pool[i] for i in kept if merged[i] > _EMPTY]
            finished_scores = merged[kept]
            # The k best that did not end go on (ended ones only when fewer are left); their cache rows follow.
            going_scores = top_scores.masked_fill(ends, _EMPTY)
            going = going_scores.topk(k).indices
            running_scores = going_scores[going]
            running = [candidates[i] for i in going.tolist()]
            cache.reorder_cache(torch.tensor([origin[i] for i in going.tolist()], device=device))
            _synchronize(model)
            if step_start is None:
                ttft = time.perf_counter() - start
            else:
                steps.append(time.perf_counter() - step_start)
            # Can the best running beam (at its current length) still beat the worst of k finished hypotheses?
            worst = float(finished_scores.min()) if len(finished) == k else _EMPTY
            improvable = improvable and float(running_scores[0]) / length > worst
            if not improvable or bool(ends.all()):
                return finished[0], ttft, steps
            step_start = time.perf_counter()
            last = torch.tensor([[beam[-1]] for beam in running], device=device)
            logits = model(last, past_key_values=cache).logits[:, -1].float()


_EMPTY = -1.0e9  # the score of a free place among the finished hypotheses, and of a beam that cannot go on


def sentence_lines(text: str) -> str:
    """One sentence per line, split after . ! ? before whitespace: what rougeLsum takes as sentences
    (HF's summarization examples use nltk's punkt for this, which needs a download)."""
    return "\n".join(s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s)


def qa_all(prediction: str, answers: Sequence[str]) -> dict[str, float]:
    """RULER's string_match_all: the fraction of the answers found in the prediction (multi-value needles)."""
    found = [metrics.contains_answer(prediction, [a]) for a in answers]
    return {"accuracy": sum(found) / len(found) if found else 0.0}


def score_prediction(sample: GenerationSample, prediction: str) -> dict[str, float]:
    """The sample's metric family on the prediction (kvexp.tasks.metrics, plus RULER's `qa_all`).

    ROUGE predictions are split into sentence lines first, as the references are, so rougeLsum is the
    summary-level score the CNN/DM literature reports.
    """
    if sample.metric == UNSCORED:
        return {}
    if sample.metric == "qa_all":
        return qa_all(prediction, sample.answers)
    if sample.metric == "rouge":
        prediction = sentence_lines(prediction)
    return metrics.score(sample.metric, prediction, sample.answers, **sample.meta)


def score_results(samples: Sequence[GenerationSample], results: Sequence[GenerationResult]) -> None:
    """Fill every result's `scores` (after generation, so cached predictions are always re-scored)."""
    for sample, result in zip(samples, results, strict=True):
        result.scores = score_prediction(sample, result.prediction)


def _sample_progress(
    cache: str, samples: Sequence[GenerationSample], results: list[GenerationResult]
) -> None:
    """The job's W&B run gets one point per sample: `<cache>/samples` and the running mean primary score."""
    scored = [primary_score(s, r.scores) for s, r in zip(samples, results, strict=True) if r.scores]
    values = {f"{cache}/samples": len(results), f"{cache}/new_tokens": results[-1].new_tokens}
    if scored:
        values[f"{cache}/running_score"] = sum(scored) / len(scored)
    log_progress(values)


def primary_score(sample: GenerationSample, scores: Mapping[str, float]) -> float:
    return scores[PRIMARY_SCORE.get(sample.metric, next(iter(scores)))]


def _mean_scores(samples: Sequence[GenerationSample], results: Sequence[GenerationResult]) -> dict[str, Any]:
    """{family: {score: mean}} over the samples of each metric family."""
    families: dict[str, dict[str, list[float]]] = {}
    for sample, result in zip(samples, results, strict=True):
        if not result.scores:  # an unscored sample (no references)
            continue
        family = families.setdefault(sample.metric, {})
        for key, value in result.scores.items():
            family.setdefault(key, []).append(value)
    return {f: {k: sum(v) / len(v) for k, v in scores.items()} for f, scores in families.items()}


def aggregate_generation(
    samples: Sequence[GenerationSample], results: Sequence[GenerationResult], report_by: Sequence[str] = ()
) -> dict[str, Any]:
    """Mean scores per metric family (and per value of each `report_by` meta key, and their grid), cost figures.

    `metrics`: {"samples": n, family: {score: mean}, "by": {key: {value: {family: {...}}}}}; with two or more
    `report_by` keys "by" also holds their joint grid under "a/b" keys ("1024/0.5").
    """
    groupings = [[k] for k in report_by] + ([list(report_by)] if len(report_by) > 1 else [])
    by: dict[str, dict[str, Any]] = {}
    for keys in groupings:
        groups: dict[str, list[int]] = {}
        for i, sample in enumerate(samples):
            groups.setdefault("/".join(str(sample.meta.get(k)) for k in keys), []).append(i)
        by["/".join(keys)] = {
            value: _mean_scores([samples[i] for i in idx], [results[i] for i in idx])
            for value, idx in groups.items()
        }
    generated = sum(r.new_tokens for r in results)
    total_s = sum(r.cost_s for r in results)
    later = [s for r in results for s in r.step_s]
    compress_s = sum(r.kv.get("compress_seconds", 0.0) for r in results)
    kv = kv_totals(results)
    scored = [(s, r) for s, r in zip(samples, results, strict=True) if r.scores]
    return {
        "metrics": {
            "samples": len(results),
            **_mean_scores(samples, results),
            **({"by": by} if by else {}),
            "new_tokens": generated / len(results),
        },
        "kv_cache": {**kv, "tokens_kept_mean": kv["tokens_kept"] / len(results)},
        "timing": {
            "ttft_s": sum(r.ttft_s for r in results) / len(results),
            "tpot_ms": 1000 * sum(later) / len(later) if later else None,
            "throughput_tok_s": generated / total_s,
            "total_s": total_s,
            "sample_s": total_s / len(results),
            "compress_s": compress_s,
            "compress_share": compress_s / total_s if total_s else 0.0,
            **eviction_times(results),
        },
        "objective": sum(primary_score(s, r.scores) for s, r in scored) / len(scored) if scored else None,
    }


def generation_cost(before, after, agg_before, agg_after) -> dict[str, float | None]:
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


def generation_rows(
    samples: Sequence[GenerationSample],
    before: Sequence[GenerationResult] | None,
    after: Sequence[GenerationResult],
) -> list[dict[str, Any]]:
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


def run_generation(
    model,
    tokenizer,
    samples: Sequence[GenerationSample],
    prompts: Sequence[Prompt],
    method: str | Method,
    budget_for: Callable[[int], int | list[int] | None],
    *,
    protocol: str = "query_agnostic",
    decoding: Decoding = Decoding(),
    max_new_tokens: int | None = None,
    prefill_chunk_size: int | None = None,
    batch_size: int = 1,
    progress: bool = False,
    journal: Journal | None = None,
    **cache_kwargs,
) -> list[GenerationResult]:
    """Every sample through a fresh cache of `method`, with the budget `budget_for(compressed tokens)`; up to
    `batch_size` samples at once among those whose cache takes the same shape (`batch_key`), in sample order.

    Sample i samples with seed `decoding.seed + i`, so a full-cache and a compressed run draw alike, batched or not.
    A method that feeds prompts in its own blocks (`block`) sets `prefill_chunk_size` when it is not given.
    `journal`: each batch's answers are recorded as they finish, and a killed run's recorded batches are read back
    (and re-scored) instead of answered again.
    """
    name = getattr(method, "name", method)
    built = build_method(method) if isinstance(method, str) else method
    if prefill_chunk_size is None:
        prefill_chunk_size = built.prompt_block
    budgets = [budget_for(p.compressed_tokens(protocol)) for p in prompts]
    rows = [
        Row(
            prompt,
            sample.id,
            max_new_tokens or sample.max_new_tokens,
            dataclasses.replace(decoding, seed=decoding.seed + i),
            tuple(sample.stop),
        )
        for i, (sample, prompt) in enumerate(zip(samples, prompts, strict=True))
    ]
    groups: dict[tuple, list[int]] = {}
    for i, (prompt, budget) in enumerate(zip(prompts, budgets, strict=True)):
        key = batch_key(
            prompt, budget, protocol, prefill_chunk_size, row_budgets=built.row_budgets, **cache_kwargs
        )
        groups.setdefault(key, []).append(i)
    size = 1 if decoding.num_beams > 1 else batch_size  # beam search spends the batch on its beams
    batches = [idx[j : j + size] for idx in groups.values() for j in range(0, len(idx), size)]
    bar = tqdm(total=len(rows), desc=f"generate [{name}]", disable=not progress)

    def answer(batch: list[int]) -> list[GenerationResult]:
        if decoding.num_beams > 1:
            row = rows[batch[0]]
            answers = [
                generate_answer(
                    model, tokenizer, row.prompt, method, budgets[batch[0]], max_new_tokens=row.max_new_tokens,
                    protocol=protocol, decoding=row.decoding, stop=row.stop, prefill_chunk_size=prefill_chunk_size,
                    sample_id=row.sample_id, **cache_kwargs,
                )
            ]  # fmt: skip
        else:
            own = [budgets[i] for i in batch]
            answers = generate_batch(
                model, tokenizer, [rows[i] for i in batch], method, own[0], protocol, prefill_chunk_size,
                row_budgets=own if any(b != own[0] for b in own) else None, **cache_kwargs,
            )  # fmt: skip
        for i, result in zip(batch, answers, strict=True):
            result.scores = score_prediction(samples[i], result.prediction)
        return answers

    def restore(i: int, stored: dict[str, Any]) -> GenerationResult:
        result = GenerationResult(**stored)
        result.scores = score_prediction(samples[i], result.prediction)
        return result

    def on_batch(done: list[int], results: list[GenerationResult | None]) -> None:
        bar.update(len(done) - bar.n)
        _sample_progress(
            "full" if name == "full" else "compressed", [samples[i] for i in done], [results[i] for i in done]
        )

    # in order of each batch's first sample
    results = run_journaled(sorted(batches), len(rows), answer, journal, restore, on_batch)
    bar.close()
    return results


def batch_key(
    prompt: Prompt,
    budget: int | list[int] | None,
    protocol: str,
    prefill_chunk_size: int | None,
    when: str = "always",
    slack: int = 0,
    row_budgets: bool = False,
    **_: Any,
) -> tuple:
    """What rows of one batch must share so that each gets the answer it gets alone: the budget (unless the method
    keeps a budget per row, `row_budgets`, and no chunking or slack ties it to the length); the compressed
    prompt's length when chunk boundaries or amortized compression (slack) depend on it; the question's length
    when the query-agnostic protocol compresses while decoding (every row's budget grows by the batch's longest
    question before the question step, so rows with shorter ones would keep more while decoding)."""
    key: tuple = (tuple(budget) if isinstance(budget, list) else budget,)
    if row_budgets and isinstance(budget, int) and not (prefill_chunk_size or slack):
        key = ("a budget per row",)
    if budget is not None and (prefill_chunk_size or slack):
        key += (prompt.compressed_tokens(protocol),)
    if budget is not None and protocol == "query_agnostic" and when == "always":
        key += (prompt.question.shape[1],)
    return key


def evaluate_generation(
    model,
    tokenizer,
    samples: Sequence[GenerationSample],
    method: str | Method = "full",
    budget: int | list[int] | None = None,
    *,
    keep_ratio: float | None = None,
    chat_template: bool = False,
    report_by: Sequence[str] = (),
    **kwargs,
) -> dict[str, Any]:
    """Python API: answer `samples` under `method` at `budget` tokens (or `keep_ratio` of each compressed
    prompt) and score them; kwargs go to `run_generation` (protocol, decoding, ...) and the cache."""
    if budget is not None and keep_ratio is not None:
        raise ValueError("give either budget or keep_ratio, not both")
    encoder = PromptEncoder(tokenizer, chat_template, getattr(model.config, "max_position_embeddings", None))
    prompts = [encoder.encode(s, kwargs.get("max_new_tokens")) for s in samples]
    budget_for = (lambda n: max(1, int(keep_ratio * n))) if keep_ratio is not None else (lambda n: budget)
    results = run_generation(model, tokenizer, samples, prompts, method, budget_for, **kwargs)
    summary = aggregate_generation(samples, results, report_by)
    summary["results"] = results
    return summary


def read_records(dataset: Mapping, max_samples: int | None) -> list[dict[str, Any]]:
    """The first `max_samples` rows of a record dataset from where `kvexp.tasks.data.locate` finds them: a
    local JSONL or JSON list sliced by `dataset.split` ("test[:100]"), the hub split, or the embedded
    stand-in (read whole)."""
    source = locate(dataset)
    if source.kind != "hub":
        split = None if source.kind == "stand_in" else dataset.get("split") or LOCAL_SPLIT
        return _read_rows(source.path, split, max_samples)

    def hub_rows() -> list[dict[str, Any]]:
        rows = load_hub_split(dataset)
        return [
            dict(r)
            for r in rows.select(range(len(rows) if max_samples is None else min(max_samples, len(rows))))
        ]

    return from_hub(dataset, source, hub_rows, lambda path: _read_rows(path, None, max_samples))


def check_records(dataset: Mapping) -> None:
    """Before a model loads: the record dataset has a source, and a local file of it parses (every line), holds
    records, and `dataset.split` selects some of them."""
    source = locate(dataset, announce=False)
    if source.path is None:
        return
    split = dataset.get("split")
    if split is not None:
        check_split(split)
    rows = _read_rows(source.path, None, None)
    if not rows:
        raise ValueError(f"{source.option(dataset)} holds no records (dataset {dataset.get('name')})")
    start, stop = split_bounds(split, len(rows)) if split is not None else (0, len(rows))
    if stop <= start:
        raise ValueError(
            f"dataset.split={split!r} selects none of the {len(rows)} records of {source.option(dataset)}"
        )


def _read_rows(path: Path, split: str | None, max_samples: int | None) -> list[dict[str, Any]]:
    """JSONL (one object per line) or a JSON list of objects, sliced by `split` (None: all)."""
    text = read_text(path)
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not a valid JSON list ({err.msg}, line {err.lineno})") from err
    else:
        rows = read_jsonl(path, text)
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise ValueError(f"{path}: expected JSONL (one object per line) or a JSON list of objects")
    if split is not None:
        start, stop = split_bounds(split, len(rows))
        rows = rows[start:stop]
    return rows if max_samples is None else rows[:max_samples]


def require_fields(rows: Sequence[Mapping], fields: Sequence[str], where: str) -> None:
    """Every row has every field (a ValueError naming the first row that does not)."""
    for i, row in enumerate(rows):
        missing = [f for f in fields if f not in row]
        if missing:
            raise ValueError(f"{where}: row {i} has no field(s) {missing}; its fields are {sorted(row)}")
