"""lm-eval-harness tasks through the compressed cache (`dataset=lm_eval`; docs/usage.md#lm-eval-harness).

`CompressedLM` is an lm-eval model around an already loaded Hugging Face model in which every request runs
through a fresh kvexp cache (`make_cache`, budget resolved per request as in `resolve_budget`). Stock lm-eval
scores log-likelihoods with one uncached forward, so only generation would feel compression; here
multiple-choice and perplexity tasks feel it too.

One boundary rule for every request type: a scored or generated token is predicted by a step that attends to
the compressed cache of everything before that step plus the step's own tokens.

* `loglikelihood(context, continuation)`: the tokens are lm-eval's HF ones (`TemplateLM._encode_pair`, inputs
  `(context + continuation)[:-1]` left-truncated to `max_length + 1`). `context[:-1]` is prefilled
  (`prefill_chunk_size` tokens per step, one step by default) and compressed; then the last context token and
  `continuation[:-1]` go through in ONE step. The engine compresses only after a step's attention, so within
  that step the continuation sees the compressed context and all of itself: it is never compressed, and the
  engine needs no switch (the compression after that step works on a cache that is thrown away). The last
  context token rides with the continuation because its logits predict the first continuation token:
  prefilling the whole context would score a one-token continuation, i.e. most multiple-choice tasks, against
  the uncompressed context. All continuations of one context share one compressed prefill (the cache is
  repeated over the batch), so every choice of a question is scored against the same compressed context.
  `is_greedy` is lm-eval's: every continuation token is the argmax.
* `loglikelihood_rolling(text)`: streaming perplexity (`score_documents`) of `[prefix] + tokens`, every token
  scored, `chunk_size` tokens per step (default 1, exact). One stream per document, not lm-eval's
  `max_length` windows: the cache, not a window, bounds the context (same numbers for documents that fit).
* `generate_until(context, gen_kwargs)`: `context[:-1]` is prefilled and compressed, then greedy decoding
  starts from the last context token, one token per step with compression whenever a layer is over budget,
  until a stop string, EOS or `max_gen_toks` (lm-eval's `until` / `max_gen_toks`; the context is
  left-truncated to `max_length - max_gen_toks` like HFLM). Sampling requests are decoded greedily, with a
  warning.

`batch_size` (`dataset.batch_size`): generate_until requests, and log-likelihood contexts, go that many at a time,
left-padded into one cache among those whose caches take the same shape (generation's `batch_key`), each row with
its own positions and budget: a generating row leaves the batch when it stops, a context's row is copied once per
continuation for the scoring step; rolling documents stream together from position 0 (perplexity's
`score_batch`: a budget per row or documents of one budget), a row leaving when its document ends. Every request
gets the text, scores (to float rounding) and cache it gets alone (tested).
`CompressedLM.records` keeps one record per request (tokens, log-likelihood or generation, the cache's kept tokens
and bytes, time), which `evaluate_lm_eval` returns as samples.csv rows.

A killed run resumes: with a `journal`, the requests of each cache (a context's continuations, a document, a
generation) are recorded as that cache finishes, under the request's place in lm-eval's order (the same in every
run of one config) and a digest of its tokens; a later run reads a cache's requests back when the journal holds
them all with the same digests, and runs the rest.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from lm_eval.api.instance import Instance
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import (
    handle_stop_sequences,
    has_bos_prefix,
    normalize_gen_kwargs,
    postprocess_generated_text,
    resolve_max_length,
)
from tqdm.auto import tqdm

from kvexp.budgets import resolve_budget
from kvexp.engine import KVCache
from kvexp.files import Journal
from kvexp.methods import Method, build_method, make_cache
from kvexp.tasks.base import share_batch_costs
from kvexp.tasks.generation import BatchFeed, Prompt, batch_key, left_padded
from kvexp.tasks.perplexity import budget_batches, score_batch

log = logging.getLogger(__name__)

LOCAL_TASKS_DIR = Path(__file__).with_name("lm_eval_tasks")
DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's HFLM default


class CompressedLM(TemplateLM):
    """lm-eval model: `model` + `tokenizer` with a fresh compressed cache per request (see the module docstring).

    `budget`: a budget config (`tokens` / `keep_ratio` / `per_layer` / `allocation`, resolved per request
    from its context length) or a fixed make_cache budget. `prefill_chunk_size`: tokens per step while a
    context is prefilled (None: one step, as `eval.prefill_chunk_size`); `chunk_size`: tokens per step of a
    rolling document (1: exact streaming, as `eval.chunk_size`). Compression runs between steps.
    `max_length`: lm-eval's truncation length (default: the model's context length, as HFLM).
    `cache_kwargs` go to make_cache (`slack`, `when`, `positions`, `head_budgets`, method parameters).
    `journal`: each cache's requests are recorded there as it finishes, and read back instead of run when a killed
    run recorded them (module docstring); `restored` counts the requests read back. `batch_size`: generations or
    log-likelihood contexts per batch (module docstring); a method that cannot batch is refused above 1.
    """

    def __init__(
        self,
        model,
        tokenizer,
        method: str | Method = "full",
        budget: Mapping | int | list[int] | None = None,
        *,
        chunk_size: int = 1,
        prefill_chunk_size: int | None = None,
        max_length: int | None = None,
        progress: bool = True,
        journal: Journal | None = None,
        batch_size: int = 1,
        **cache_kwargs,
    ):
        super().__init__()
        if chunk_size < 1 or (prefill_chunk_size is not None and prefill_chunk_size < 1):
            raise ValueError(
                f"chunk_size must be >= 1 and prefill_chunk_size null or >= 1, got {chunk_size}, {prefill_chunk_size}"
            )
        self.model, self.tokenizer = model, tokenizer
        self.method, self.budget_config = method, budget
        self.chunk_size, self.prefill_chunk_size = chunk_size, prefill_chunk_size
        self._max_length = max_length or resolve_max_length(model.config, tokenizer)
        self.progress = progress
        self.cache_kwargs = cache_kwargs
        self.records: list[dict[str, Any]] = []
        self.journal = journal
        self._held = journal.entries() if journal is not None else {}
        self.batch_size = batch_size
        built = method if isinstance(method, Method) else build_method(method)
        if batch_size > 1 and not built.batches:
            raise ValueError(
                f"method={built.name} cannot answer a batch as it answers each row alone: use batch 1"
            )
        self._row_budgets = built.row_budgets  # rows of different budgets may share a batch
        self.restored = 0
        self._warned_sampling = False

    # -- what lm-eval asks ----------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        # HFLM's choice: the context of an empty-context request and of a rolling document's first token.
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.eot_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """HFLM's encoding: the tokenizer's default special tokens, unless the text already starts with BOS."""
        if add_special_tokens is None and has_bos_prefix(string, self.tokenizer.decode(self.prefix_token_id)):
            add_special_tokens = False
        special = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        return self.tokenizer.encode(string, **special)

    # -- log-likelihood -------------------------------------------------------------------------------------------
    def loglikelihood(self, requests: list[Instance], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        start = len(self.records)
        results = super().loglikelihood(requests, disable_tqdm=disable_tqdm)
        # _loglikelihood_tokens sees token lists only: name the requests its records belong to.
        self.records[start:] = [
            {**_request_fields(request), **record}
            for request, record in zip(requests, self.records[start:], strict=True)
        ]
        return results

    def _loglikelihood_tokens(
        self,
        requests: list[tuple[tuple[str, str], list[int], list[int]]],
        disable_tqdm: bool = False,
        **kwargs,
    ) -> list[tuple[float, bool]]:
        fitted = [self._fit(context, continuation) for _, context, continuation in requests]
        by_context: dict[tuple[int, ...], list[int]] = {}
        for i, (context, _) in enumerate(fitted):
            by_context.setdefault(tuple(context), []).append(i)
        first = len(self.records)  # the requests' places in lm-eval's order
        contexts = list(by_context)
        results: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
        records: list[dict[str, Any]] = [{}] * len(requests)
        bar = tqdm(
            total=len(contexts), desc="loglikelihood (contexts)", disable=disable_tqdm or not self.progress
        )
        for batch in self._batches([list(c) for c in contexts]):
            members = [by_context[contexts[b]] for b in batch]
            order = [i for group in members for i in group]  # the batch's requests, context by context
            continuations = [[fitted[i][1] for i in group] for group in members]
            runs = [first + group[0] for group in members]
            score = functools.partial(
                self._score_contexts, [list(contexts[b]) for b in batch], continuations, runs
            )
            keys = [["loglikelihood", list(fitted[i][0]), fitted[i][1]] for i in order]
            scores, scored = self._journaled([first + i for i in order], keys, score)
            for i, (logprob, greedy), record in zip(order, scores, scored, strict=True):
                results[i], records[i] = (logprob, greedy), record
            bar.update(len(batch))
        bar.close()
        self.records.extend(records)
        return results

    def _fit(self, context: list[int], continuation: list[int]) -> tuple[list[int], list[int]]:
        """HFLM's left truncation: the model sees at most `max_length` of `(context + continuation)[:-1]`."""
        if len(continuation) > self.max_length:
            raise ValueError(
                f"a continuation of {len(continuation)} tokens does not fit max_length={self.max_length}"
            )
        whole = (context + continuation)[-(self.max_length + 1) :]
        return whole[: len(whole) - len(continuation)], continuation

    @torch.no_grad()
    def _score_contexts(
        self, contexts: list[list[int]], continuations: list[list[list[int]]], runs: list[int]
    ) -> tuple[list[list], list[dict[str, Any]]]:
        """Compress each `context[:-1]` once (the contexts left-padded into one cache, each with its own budget and
        positions), then score every continuation of every context in one step, each a row after its context's
        (module docstring): `[log-likelihood, is_greedy]` and a record per continuation, context by context."""
        start = time.perf_counter()
        cache, feed = self._batch_cache(contexts)
        # each context's compressed cache, its share of the method's time: what the continuations are scored against
        kvs = self._row_costs(cache, feed)
        owner = [r for r, group in enumerate(continuations) for _ in group]
        flat = [c for group in continuations for c in group]
        feed.keep(owner)  # a row per continuation, a copy of its context's
        width = max(len(c) for c in flat)
        # Right padding sits after each row's real tokens, so causal attention keeps it out of their logits.
        rows = [
            [contexts[r][-1], *c[:-1]] + [self.eot_token_id] * (width - len(c))
            for r, c in zip(owner, flat, strict=True)
        ]
        ids = torch.tensor(rows)
        logprobs = F.log_softmax(feed(ids, torch.ones_like(ids), every=True), dim=-1)  # [rows, width, V]
        scores = []
        for row, continuation in zip(logprobs, flat, strict=True):
            target = torch.tensor(continuation, device=row.device)
            scored = row[: len(continuation)]
            logprob = scored.gather(-1, target[:, None]).sum()
            scores.append([float(logprob), bool((scored.argmax(-1) == target).all())])
        wall = self._since(start)
        costs = [self._run(kv, wall / len(contexts), run) for kv, run in zip(kvs, runs, strict=True)]
        records = [
            {
                "request_type": "loglikelihood",
                "context_tokens": len(contexts[r]),
                "continuation_tokens": len(continuation),
                "loglikelihood": logprob,
                "is_greedy": greedy,
                **costs[r],
            }
            for r, continuation, (logprob, greedy) in zip(owner, flat, scores, strict=True)
        ]
        return scores, records

    def loglikelihood_rolling(self, requests: list[Instance], disable_tqdm: bool = False) -> list[float]:
        first = len(self.records)  # the requests' places in lm-eval's order
        docs = []
        for request in requests:
            (text,) = request.args
            ids = [self.prefix_token_id, *self.tok_encode(text)]
            if len(ids) > self.max_length:
                log.warning(
                    "a %d-token document streams past max_length=%d (one stream through the cache, no windows)",
                    len(ids),
                    self.max_length,
                )
            docs.append(ids)
        results = [0.0] * len(requests)  # a document of one token predicts nothing: lm-eval's empty sum
        records = [
            {
                **_request_fields(r),
                "request_type": "loglikelihood_rolling",
                "continuation_tokens": 0,
                "loglikelihood": 0.0,
            }
            for r in requests
        ]
        scored = [i for i, ids in enumerate(docs) if len(ids) >= 2]
        budgets = [self._budget(len(docs[i])) for i in scored]
        per_row = self._row_budgets and not self.cache_kwargs.get("slack")
        bar = tqdm(total=len(scored), desc="loglikelihood_rolling", disable=disable_tqdm or not self.progress)
        for batch in budget_batches(budgets, self.batch_size, per_row):
            batch = [scored[b] for b in batch]
            names = [f"{requests[i].task_name}/{requests[i].doc_id}" for i in batch]
            score = functools.partial(
                self._score_rolling, [docs[i] for i in batch], names, [first + i for i in batch]
            )
            keys = [["loglikelihood_rolling", docs[i]] for i in batch]
            done, made = self._journaled([first + i for i in batch], keys, score)
            for i, logprob, record in zip(batch, done, made, strict=True):
                results[i] = logprob
                records[i].update(record)
            bar.update(len(batch))
        bar.close()
        self.records.extend(records)
        return results

    def _score_rolling(
        self, docs: list[list[int]], names: list[str], runs: list[int]
    ) -> tuple[list[float], list[dict[str, Any]]]:
        """Stream documents through one cache, each a row from position 0 with its own budget (`score_batch`): their
        log-likelihoods and records (a row's seconds and method time its share of the batch's)."""
        scored = score_batch(
            self.model,
            [(name, torch.tensor([ids])) for name, ids in zip(names, docs, strict=True)],
            self.method,
            [self._budget(len(ids)) for ids in docs],
            self.chunk_size,
            **self.cache_kwargs,
        )
        records = [
            {
                "context_tokens": 1,
                "continuation_tokens": doc.tokens,
                "loglikelihood": -doc.nll,
                "is_greedy": doc.correct == doc.tokens,
                **self._run(doc.kv, doc.cost_s, run),
            }
            for doc, run in zip(scored, runs, strict=True)
        ]
        return [-doc.nll for doc in scored], records

    # -- generation -----------------------------------------------------------------------------------------------
    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        eos = self.tokenizer.decode([self.eot_token_id], skip_special_tokens=False)
        first = len(self.records)  # the requests' places in lm-eval's order
        asks = []  # (ids, until, max_gen_toks) per request
        for request in requests:
            context, gen_kwargs = request.args
            kwargs = normalize_gen_kwargs(gen_kwargs, DEFAULT_MAX_GEN_TOKS)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            max_gen_toks = kwargs.pop("max_gen_toks")
            if kwargs.get("do_sample") and not self._warned_sampling:
                log.warning(
                    "a task asks for sampling (%s); kvexp's lm-eval model decodes greedily", gen_kwargs
                )
                self._warned_sampling = True
            if max_gen_toks >= self.max_length:
                raise ValueError(
                    f"max_gen_toks={max_gen_toks} leaves no room in max_length={self.max_length}"
                )
            ids = self.tok_encode(context)[-(self.max_length - max_gen_toks) :] or [self.prefix_token_id]
            asks.append((ids, until, max_gen_toks))
        texts: list[str] = [""] * len(requests)
        records: list[dict[str, Any]] = [{}] * len(requests)
        bar = tqdm(total=len(requests), desc="generate_until", disable=disable_tqdm or not self.progress)
        for batch in self._batches([ids for ids, _, _ in asks]):
            generate = functools.partial(self._generate, [asks[i] for i in batch], [first + i for i in batch])
            keys = [["generate_until", *asks[i]] for i in batch]
            done, made = self._journaled([first + i for i in batch], keys, generate)
            for i, text, record in zip(batch, done, made, strict=True):
                texts[i], records[i] = text, {**_request_fields(requests[i]), **record}
            bar.update(len(batch))
        bar.close()
        self.records.extend(records)
        return texts

    def _batches(self, contexts: list[list[int]]) -> list[list[int]]:
        """Up to `batch_size` requests at a time among those whose caches take the same shape (generation's
        `batch_key`: the budget, unless the method keeps one per row; the context's length under chunked prefill
        or slack), in the order of each batch's first request."""
        groups: dict[tuple, list[int]] = {}
        for i, ids in enumerate(contexts):
            prompt = Prompt(torch.tensor([ids[:-1]]), torch.tensor([ids[-1:]]))
            budget, chunk = self._budget(len(ids)), self.prefill_chunk_size
            key = batch_key(
                prompt, budget, "query_agnostic", chunk, row_budgets=self._row_budgets, **self.cache_kwargs
            )
            groups.setdefault(key, []).append(i)
        size = self.batch_size
        return sorted(idx[j : j + size] for idx in groups.values() for j in range(0, len(idx), size))

    @torch.no_grad()
    def _generate(
        self, asks: list[tuple[list[int], list[str], int]], runs: list[int]
    ) -> tuple[list[str], list[dict[str, Any]]]:
        """Compress each `context[:-1]` (the rows left-padded into one cache, each with its own budget and
        positions), then decode greedily from each context's last token, a row leaving the batch when it stops
        (lm-eval's `until`, EOS or `max_gen_toks`): each row's text and record, as it gets them alone (a batch's
        TTFT and steps are what the row waited; its seconds and the method's time its share)."""
        start = time.perf_counter()
        n = len(asks)
        contexts = [ids for ids, _, _ in asks]
        cache, feed = self._batch_cache(contexts)
        prefill_s = self._since(start)
        token = torch.tensor([ids[-1] for ids in contexts])
        generated: list[list[int]] = [[] for _ in range(n)]
        steps: list[float] = []
        taken = [0] * n  # the steps each row took (its picks, EOS included)
        rows: list[SimpleNamespace | None] = [None] * n  # each row's cache figures when it stops

        def stops(i: int, picked: int) -> bool:
            """Row i picked `picked`: whether its answer ends (the loop of one row alone: EOS is not kept)."""
            if picked == self.eot_token_id:
                return True
            generated[i].append(picked)
            text = self.tokenizer.decode(generated[i], skip_special_tokens=True)
            return any(stop and stop in text for stop in asks[i][1]) or len(generated[i]) >= asks[i][2]

        active = [i for i in range(n) if asks[i][2] > 0]  # max_gen_toks=0: an empty answer, no step
        for i in set(range(n)) - set(active):
            kv = cache.stats(row=i, seen=int(feed.seen[i])) if n > 1 else cache.stats()
            rows[i] = SimpleNamespace(kv=kv)
        if len(active) < n and active:
            feed.keep(active)
            token = token[torch.tensor(active)]
        while active:
            step_start = time.perf_counter()
            logits = feed(token[:, None], torch.ones((len(active), 1), dtype=torch.long))
            token = logits.argmax(-1).cpu()
            steps.append(self._since(step_start))
            going = []
            for at, i in enumerate(active):
                taken[i] += 1
                if stops(i, int(token[at])):
                    kv = cache.stats(row=at, seen=int(feed.seen[at])) if n > 1 else cache.stats()
                    rows[i] = SimpleNamespace(kv=kv)
                else:
                    going.append(at)
            if going and len(going) < len(active):
                feed.keep(going)
                token = token[torch.tensor(going)]
            active = [active[at] for at in going]
        wall = self._since(start)
        share_batch_costs(rows, cache, 0, wall)
        texts, records = [], []
        for i, row in enumerate(rows):
            text = postprocess_generated_text(
                self.tokenizer.decode(generated[i], skip_special_tokens=True), asks[i][1], None
            )
            own = steps[1 : taken[i]]
            texts.append(text)
            records.append(
                {
                    "request_type": "generate_until",
                    "context_tokens": len(contexts[i]),
                    "continuation_tokens": len(generated[i]),
                    "generation": text,
                    "ttft_s": prefill_s + steps[0] if taken[i] else None,
                    "tpot_ms": 1000 * sum(own) / len(own) if own else None,
                    **self._run(row.kv, wall if n == 1 else row.wall_s, runs[i]),
                }
            )
        return texts, records

    # -- shared -------------------------------------------------------------------------------------------------
    def _journaled(
        self, places: list[int], keys: list[list], run: Callable[[], tuple[list[Any], list[dict[str, Any]]]]
    ) -> tuple[list[Any], list[dict[str, Any]]]:
        """The results and records of one cache's requests (at `places` in lm-eval's order, their inputs `keys`):
        read back from the journal when it holds all of them with the same inputs, else `run()` and recorded."""
        digests = [hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16] for key in keys]
        held = [self._held.get(place) for place in places]
        if all(h is not None and h["digest"] == d for h, d in zip(held, digests, strict=True)):
            self.restored += len(places)
            return [h["result"] for h in held], [h["record"] for h in held]
        results, records = run()
        if self.journal is not None:
            self.journal.append(
                {
                    place: {"digest": digest, "result": result, "record": record}
                    for place, digest, result, record in zip(places, digests, results, records, strict=True)
                }
            )
        return results, records

    def _budget(self, tokens: int) -> int | list[int] | None:
        if isinstance(self.budget_config, Mapping):
            return resolve_budget(self.budget_config, tokens, self.model.config.num_hidden_layers)
        return self.budget_config

    def _batch_cache(self, contexts: list[list[int]]) -> tuple[KVCache, BatchFeed]:
        """One cache for the contexts' rows (each its own budget when they differ) with each `context[:-1]` fed
        through it, left-padded, `prefill_chunk_size` tokens per step (None: one), compression after each step."""
        budgets = [self._budget(len(c)) for c in contexts]
        if len(contexts) > 1 and any(b != budgets[0] for b in budgets):
            cache = make_cache(self.model, self.method, row_budgets=budgets, **self.cache_kwargs)
        else:
            cache = make_cache(self.model, self.method, budgets[0], **self.cache_kwargs)
        feed = BatchFeed(self.model, cache, len(contexts))
        prompts = [torch.tensor([c[:-1]]) for c in contexts]
        if any(p.shape[1] for p in prompts):
            feed(*left_padded(prompts, self.eot_token_id), self.prefill_chunk_size)
        return cache, feed

    def _row_costs(self, cache: KVCache, feed: BatchFeed) -> list[dict[str, Any]]:
        """Each row's cache figures now: its own entries, with its share of the method's time the rows spent
        together (`share_batch_costs`)."""
        n = len(feed.seen)
        rows = [
            SimpleNamespace(kv=cache.stats(row=r, seen=int(feed.seen[r])) if n > 1 else cache.stats())
            for r in range(n)
        ]
        share_batch_costs(rows, cache, 0, 0.0)
        return [row.kv for row in rows]

    def _since(self, start: float) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - start

    def _run(self, kv: Mapping[str, Any], seconds: float, run: int) -> dict[str, Any]:
        """The cost fields of one cache (shared by the records of the requests it served; `run`: the place of its
        first request in lm-eval's order, which names the cache)."""
        return {
            "cache_run": run,
            "kv_tokens_seen": kv["tokens_seen"],
            "kv_tokens_full": kv.get("tokens_full", kv["tokens_seen"]),
            "kv_tokens_kept": kv["tokens_kept"],
            "compression_ratio": kv["compression_ratio"],
            "kv_bytes_full": kv.get("bytes_full", 0),
            "kv_bytes_kept": kv.get("bytes_kept", 0),
            "compress_s": kv.get("compress_seconds", 0.0),
            "seconds": seconds,
        }


def _request_fields(request: Instance) -> dict[str, Any]:
    return {"task": request.task_name, "doc_id": request.doc_id, "request": request.idx}


# -- tasks and config ------------------------------------------------------------------------------------------------
@functools.cache
def _task_manager(include_paths: tuple[str, ...], defaults: bool):
    """lm-eval's task index over kvexp's local tasks + `include_paths` (+ lm-eval's ~15k stock YAMLs)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=[str(LOCAL_TASKS_DIR), *include_paths], include_defaults=defaults)


def _unknown(manager, names: Sequence[str]) -> list[str]:
    return [name for name in names if not manager.match_tasks([name])]


def _task_names(dataset: Mapping) -> list[str]:
    tasks = dataset.get("tasks")
    tasks = [tasks] if isinstance(tasks, str) else list(tasks or [])
    if not tasks or not all(isinstance(t, str) and t for t in tasks):
        raise ValueError(
            f"dataset.tasks must be a non-empty list of lm-eval task names (e.g. [kvexp_recall]), got {tasks!r}"
        )
    return tasks


def _check_int(option: str, value: Any, minimum: int, nullable: bool = True) -> None:
    if value is None and nullable:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        allowed = f"{'null or ' if nullable else ''}an integer >= {minimum}"
        raise ValueError(f"dataset.{option}={value!r} is not allowed; use {allowed}")


def check_lm_eval_dataset(dataset: Mapping):
    """Validate a `dataset=lm_eval` config before any model loads; returns the lm-eval TaskManager that knows
    its tasks (kvexp's local ones and `include_path` first; lm-eval's stock tasks only when a name needs them)."""
    tasks = _task_names(dataset)
    limit = dataset.get("limit")
    number = isinstance(limit, int | float) and not isinstance(limit, bool)
    if limit is not None and not (number and limit > 0 and (limit < 1 or float(limit).is_integer())):
        raise ValueError(
            f"dataset.limit={limit!r} is not allowed; use null, a number of documents per task (>= 1) or a "
            "fraction in (0, 1)"
        )
    _check_int("num_fewshot", dataset.get("num_fewshot"), 0)
    _check_int("bootstrap_iters", dataset.get("bootstrap_iters", 0), 0, nullable=False)
    _check_int("batch_size", dataset.get("batch_size", 1), 1, nullable=False)
    include = dataset.get("include_path")
    include = [] if include is None else [include] if isinstance(include, str) else list(include)
    for path in include:
        if not Path(str(path)).expanduser().is_dir():
            raise ValueError(f"dataset.include_path={str(path)!r} is not a directory of lm-eval task YAMLs")
    paths = tuple(str(Path(str(p)).expanduser().resolve()) for p in include)
    manager = _task_manager(paths, False)
    if _unknown(manager, tasks):
        manager = _task_manager(paths, True)
    unknown = _unknown(manager, tasks)
    if unknown:
        local = _task_manager(paths, False).all_tasks
        close = sorted(
            {m for name in unknown for m in difflib.get_close_matches(name, manager.all_tasks, n=5)}
        )
        raise ValueError(
            f"dataset.tasks: unknown lm-eval task(s) {unknown}. kvexp's local and include_path tasks: {local}; "
            f"close stock names: {close or 'none'} ({len(manager.all_tasks)} known; `lm-eval ls tasks` lists them)"
        )
    return manager


def _expand(manager, tasks: Sequence[str]) -> list[str]:
    """Names as lm-eval's CLI takes them: exact names, or glob patterns over the index."""
    return [
        m for name in tasks for m in ([name] if name in manager.all_tasks else manager.match_tasks([name]))
    ]


def task_metrics(results: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    """lm-eval's per-task results as `{task/metric: value}`; the filter stays in the name unless it is "none"
    (`kvexp_recall/acc`, `kvexp_recall_gen/exact_match,strip`). Non-numeric entries ("N/A" stderr) are dropped."""
    flat = {}
    for task, values in results.items():
        for key, value in values.items():
            if isinstance(value, bool) or not isinstance(value, int | float) or "," not in key:
                continue
            flat[f"{task}/{_metric_name(key)}"] = value
    return flat


def _metric_name(key: str) -> str:
    metric, _, filter_name = key.partition(",")
    return metric if filter_name == "none" else key


def cost_metrics(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Counts and cost over the caches the requests used (a shared multiple-choice context counts once): the
    documents (`samples`), requests, caches and tokens run (each cache's context once, every continuation); mean
    tokens and bytes per cache (seen vs kept), the compression ratio 1 - kept/full over all of them (full: what the
    model's own cache holds, below seen for sliding-window layers), time."""
    runs = list({r["cache_run"]: r for r in records if "cache_run" in r}.values())
    seen = sum(r["kv_tokens_seen"] for r in runs)
    full = sum(r["kv_tokens_full"] for r in runs)
    kept = sum(r["kv_tokens_kept"] for r in runs)
    seconds = sum(r["seconds"] for r in runs)
    compress_s = sum(r["compress_s"] for r in runs)
    generated = [r for r in records if r.get("ttft_s") is not None]
    decoded = [r for r in generated if r.get("tpot_ms") is not None]
    n = max(len(runs), 1)
    # the tokens the model ran: each cache's context once, every request's continuation (scored or generated)
    tokens = sum(r["context_tokens"] for r in runs) + sum(r.get("continuation_tokens", 0) for r in records)
    return {
        "samples": len({(r.get("task"), r.get("doc_id")) for r in records}),
        "requests": len(records),
        "cache_runs": len(runs),
        "tokens": tokens,
        "kv_tokens_seen": seen / n,
        "kv_tokens_full": full / n,
        "kv_tokens_kept": kept / n,
        "compression_ratio": 1.0 - kept / full if full else 0.0,
        "kv_bytes_full": sum(r["kv_bytes_full"] for r in runs) / n,
        "kv_bytes_kept": sum(r["kv_bytes_kept"] for r in runs) / n,
        "total_s": seconds,
        "compress_s": compress_s,
        "compress_share": compress_s / seconds if seconds else 0.0,
        "ttft_s": sum(r["ttft_s"] for r in generated) / len(generated) if generated else None,
        "tpot_ms": sum(r["tpot_ms"] for r in decoded) / len(decoded) if decoded else None,
    }


_COST = (
    "requests", "cache_runs", "tokens", "kv_tokens_seen", "kv_tokens_full", "kv_tokens_kept", "kv_bytes_full",
    "kv_bytes_kept", "compression_ratio", "total_s", "compress_s", "compress_share", "ttft_s", "tpot_ms",
)  # fmt: skip


def summary_aggregate(result: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """evaluate_lm_eval's flat metrics in the metrics / kv_cache / timing shape of the other tasks' aggregates."""
    if result is None:
        return None
    total = result.get("total_s") or 0.0
    return {
        "metrics": {k: v for k, v in result.items() if k not in _COST},
        "kv_cache": {
            "tokens_seen": result.get("kv_tokens_seen"),
            "tokens_full": result.get("kv_tokens_full"),
            "tokens_kept": result.get("kv_tokens_kept"),
            "compression_ratio": result.get("compression_ratio"),
            "bytes_full": result.get("kv_bytes_full"),
            "bytes_kept": result.get("kv_bytes_kept"),
            "bytes_peak": result.get("kv_bytes_kept"),
        },
        "timing": {
            "ttft_s": result.get("ttft_s"),
            "tpot_ms": result.get("tpot_ms"),
            "throughput_tok_s": result["tokens"] / total if total else None,  # tokens run per second
            "total_s": total,
            "compress_s": result.get("compress_s"),
            "compress_share": result.get("compress_share"),
        },
    }


def _sample_metrics(
    samples: Mapping[str, Sequence[Mapping[str, Any]]],
) -> dict[tuple[str, int], dict[str, Any]]:
    """(task, doc_id) -> that document's metric values from lm-eval's logged samples, named like task_metrics."""
    by_doc: dict[tuple[str, int], dict[str, Any]] = {}
    for task, docs in samples.items():
        for doc in docs:
            names = {m: _metric_name(f"{m},{doc['filter']}") for m in doc["metrics"]}
            by_doc.setdefault((task, doc["doc_id"]), {}).update({names[m]: doc[m] for m in doc["metrics"]})
    return by_doc


def evaluate_lm_eval(
    dataset_cfg: Mapping,
    model,
    tokenizer,
    method: str | Method,
    budget_cfg: Mapping | None,
    engine: dict[str, Any],
    seed: int,
    *,
    chunk_size: int = 1,
    prefill_chunk_size: int | None = None,
    progress: bool = True,
    journal: Journal | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Run `dataset.tasks` with lm-eval through the compressed cache.

    Returns (metrics, rows): lm-eval's results as `{task/metric: value}` plus `cost_metrics` (kept vs seen
    tokens and bytes per cache, compression ratio, time), and one row per request (task, doc_id, tokens,
    log-likelihood or generation, kept tokens and bytes of its cache, seconds) carrying its document's metric
    values. `engine`: make_cache options (slack, when, positions, head_budgets); `chunk_size` /
    `prefill_chunk_size`: `eval.chunk_size` (rolling documents) and `eval.prefill_chunk_size` (contexts).
    Seeds lm-eval's python, numpy, torch and few-shot generators with `seed`. `journal`: each cache's requests are
    recorded there, and a killed run's read back (`journal.restored`: how many requests were).
    """
    from lm_eval import simple_evaluate

    manager = check_lm_eval_dataset(dataset_cfg)
    tasks = _expand(manager, _task_names(dataset_cfg))
    lm = CompressedLM(
        model,
        tokenizer,
        method,
        budget_cfg,
        chunk_size=chunk_size,
        prefill_chunk_size=prefill_chunk_size,
        progress=progress,
        journal=journal,
        batch_size=dataset_cfg.get("batch_size", 1),
        **engine,
    )
    results = simple_evaluate(
        model=lm,
        tasks=tasks,
        num_fewshot=dataset_cfg.get("num_fewshot"),
        batch_size=1,
        limit=dataset_cfg.get("limit"),
        bootstrap_iters=dataset_cfg.get("bootstrap_iters", 0),
        task_manager=manager,
        log_samples=True,
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
    )
    if journal is not None:
        journal.restored = lm.restored  # held entries whose inputs differ were run again
    metrics = {**task_metrics(results["results"]), **cost_metrics(lm.records)}
    per_doc = _sample_metrics(results.get("samples") or {})
    rows = [{**r, **per_doc.get((r.get("task"), r.get("doc_id")), {})} for r in lm.records]
    return metrics, rows
