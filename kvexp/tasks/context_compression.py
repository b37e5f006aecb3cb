"""Prompt compression before the KV cache exists: Selective Context (Li et al., EMNLP 2023, arXiv 2310.06201).

kvexp's counterpart of the pooling-merge study's `--compress_context` ("compressing the prompt context during
inference ... reducing the size of the input context"; its code is not published): the context's least
informative lexical units are dropped, by the evaluated model's own token surprisal, before the prefill. The
same filter is LLMLingua's (Jiang et al., EMNLP 2023, arXiv 2310.05736) coarse first stage.

1. Self-information. I(x_t) = -ln p(x_t | x_<t) (nats; the paper writes log2, which ranks identically) from
   the evaluated causal LM, in one forward over the context, or, past `chunk_size` tokens, in a sliding window
   so memory stays bounded (`self_information`). The first token has no prediction: its I is +inf, so it is
   always kept (it is usually the BOS or the chat template's first token). `compress` also gives +inf to
   special tokens (template markers) and to the first `keep_prefix` tokens, so they are never dropped.
2. Lexical units (`lexical_units`): `token`; `word`, a whitespace-delimited word with the whitespace before
   it; `sentence`, split after sentence punctuation (.!?… and their closing quotes/brackets) followed by
   whitespace, at blank lines and after 。！？. Unit boundaries come from the tokens' own decoded pieces (no
   re-tokenization); special tokens are units of their own. A unit's self-information is the SUM of its
   tokens' (`unit_information`; the paper's additivity rule, I(u) = sum_t I(x_t); the authors' code averages
   instead, which favours short units).
3. Filter (`select_units`). The paper keeps the units whose I reaches the p-th percentile of the units' I
   (p = the reduce ratio), i.e. a threshold on the ranking by I. kvexp sets the threshold by a token budget
   instead of a unit count, so `keep` is the fraction of TOKENS that remain: units are ranked by I, highest
   first (ties: the earlier unit first), and the kept set is the ranking prefix (the units above a threshold)
   whose token count is nearest to target = p + round(keep * (n - p)) (p = `keep_prefix`; ties: the longer
   prefix), never leaving out a +inf unit. Token units meet the target exactly (unless the +inf tokens alone
   exceed it); coarser units are within half a unit of it. Kept units stay in their original order.

In a run: `context_compression.keep=R` (any method, generation tasks; `unit`, `chunk_size` alike), or a method's own
`compress_context` flag (pooling_merge, the study's; keep `DEFAULT_KEEP` unless `context_compression.keep` is set).
Only the compressed run's contexts are shortened (the full-cache baseline answers the original prompts); a chat
template's opening stays whole; the question is never touched. Each sample's compression time is added to its TTFT,
and summary.json's `context_compression` block gives the tokens before and after.

The result is the kept token ids themselves ([1, C']), not the kept text re-tokenized: re-tokenizing the
joined text would merge or split tokens at the cuts (tokenizer round-trip drift), so the model would see ids
the filter never scored, and the kept count would no longer be the one the filter chose.
"""

from __future__ import annotations

import bisect
import dataclasses
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from kvexp.engine import sliding_layers
from kvexp.tasks.generation import Prompt

UNITS = ("token", "word", "sentence")
DEFAULT_KEEP = (
    0.5  # a method's `compress_context` flag without context_compression.keep (the study gives no ratio)
)
MIN_CHUNK = 4  # a sliding window holds the sink, every target and each target's predecessor

# A sentence ends at terminal punctuation (optionally closed by quotes or brackets) before whitespace, unless
# it is an abbreviation such as "e.g." or "Mr." (Selective Context's own split pattern has the same two
# exceptions); it also ends at a blank line.
_TERMINAL = re.compile(r"[.!?…][\"'”’)\]]*$")
_ABBREVIATION = re.compile(r"(?:\b\w\.\w\.|\b[A-Z][a-z]\.)$")
_CJK_TERMINAL = re.compile(r"[。！？]+[”’」』）]*")
_LOOKBACK = 16  # characters before a whitespace run searched for its sentence end (keeps the split linear)


@torch.no_grad()
def self_information(model, context_ids: torch.Tensor, chunk_size: int = 1024) -> torch.Tensor:
    """I(x_t) = -ln p(x_t | x_<t) under `model`, float32 [n] on the cpu; I(x_0) = +inf (nothing predicts it).

    n <= chunk_size: one forward over the context. Otherwise a sliding window of `chunk_size` tokens: the
    first window scores tokens 1..chunk_size-1; every later window scores the next stride = chunk_size // 2
    tokens from the context's first token (an attention sink, as the paper conditions every pass on
    <|endoftext|>) followed by the chunk_size - 1 tokens that end at its last target. Every token is thus
    scored once, with at least chunk_size - stride - 1 real tokens before it besides the sink, and no forward
    is longer than chunk_size, so peak memory does not grow with the context.
    """
    _check_chunk_size(chunk_size)
    ids = _as_row(context_ids)
    n = ids.shape[1]
    info = torch.full((n,), float("inf"), dtype=torch.float32, device="cpu")
    if n < 2:
        return info
    device = _device(model)
    ids = ids.to(device)

    def score(window: torch.Tensor, first: int, targets: range) -> None:
        # window[0, j] is followed by window[0, j + 1]; `first` is the window index of targets[0]
        logits = model(input_ids=window, use_cache=False).logits[0, first - 1 : first - 1 + len(targets)]
        logp = logits.float().log_softmax(-1)
        target = ids[0, targets.start : targets.stop, None]
        info[targets.start : targets.stop] = -logp.gather(-1, target)[:, 0].cpu()

    if n <= chunk_size:
        score(ids, 1, range(1, n))
        return info
    score(ids[:, :chunk_size], 1, range(1, chunk_size))
    stride = chunk_size // 2
    end = chunk_size
    while end < n:
        stop = min(end + stride, n)
        window = torch.cat([ids[:, :1], ids[:, stop - (chunk_size - 1) : stop]], dim=1)
        score(window, window.shape[1] - (stop - end), range(end, stop))
        end = stop
    return info


def token_pieces(tokenizer, context_ids: torch.Tensor) -> list[str]:
    """Each token's text as it reads inside the context, leading space included.

    A token is decoded after a fixed anchor token and the anchor's text is cut off, since decoding a token
    alone drops a SentencePiece word's leading space. Special tokens decode to their own text; a byte-level
    fragment of a multi-byte character decodes to U+FFFD (a non-space character, so word boundaries hold).
    """
    ids = _as_row(context_ids)[0].tolist()

    def decode(seq: list[int]) -> str:
        return tokenizer.decode(seq, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    anchor = tokenizer.encode("a", add_special_tokens=False)
    base = decode(anchor) if len(anchor) == 1 else None
    special = _special_ids(tokenizer)
    pieces: dict[int, str] = {}
    for i in ids:
        if i in pieces:
            continue
        text = decode(anchor + [i]) if base is not None and i not in special else None
        pieces[i] = text[len(base) :] if text is not None and text.startswith(base) else decode([i])
    return [pieces[i] for i in ids]


def lexical_units(
    tokenizer, context_ids: torch.Tensor, unit: str = "word", keep_prefix: int = 0
) -> torch.Tensor:
    """The lexical unit of every token, long [n]: 0, 1, ... in order, each unit a run of consecutive tokens.

    `word` and `sentence` units are found in the text of the tokens' pieces (`token_pieces`): a word begins
    where a whitespace run begins (so it carries the whitespace before it), a sentence where whitespace
    follows terminal punctuation (not an abbreviation) or holds a blank line, or right after 。！？. A token
    belongs to the unit its first character falls in (an empty piece to its predecessor's). Special tokens
    are units of their own, and a unit never straddles the end of the first `keep_prefix` tokens.
    """
    if unit not in UNITS:
        raise ValueError(f"context_compression.unit must be one of {UNITS}, got {unit!r}")
    ids = _as_row(context_ids)[0]
    n = ids.shape[0]
    if unit == "token" or n == 0:
        return torch.arange(n, device="cpu")
    pieces = token_pieces(tokenizer, ids)
    text = "".join(pieces)
    starts = [0]
    for m in re.finditer(r"\s+", text):
        if m.start() == 0:
            continue
        # a word begins at every whitespace run; a sentence at one after its end or holding a blank line
        before = max(0, m.start() - _LOOKBACK)
        if (
            unit == "word"
            or m.group().count("\n") >= 2
            or (
                _TERMINAL.search(text, before, m.start())
                and not _ABBREVIATION.search(text, before, m.start())
            )
        ):
            starts.append(m.start())
    if unit == "sentence":
        starts += [m.end() for m in _CJK_TERMINAL.finditer(text) if m.end() < len(text)]
        starts.sort()
    special = _special_ids(tokenizer)
    is_special = [i in special for i in ids.tolist()]
    units = torch.zeros(n, dtype=torch.long, device="cpu")
    offset, segment, current = 0, 0, 0
    for t, piece in enumerate(pieces):
        previous = segment
        if piece:
            segment = bisect.bisect_right(starts, offset) - 1
        if t > 0 and (
            segment != previous
            or is_special[t]
            or is_special[t - 1]
            or (keep_prefix > 0 and t == keep_prefix)
        ):
            current += 1
        units[t] = current
        offset += len(piece)
    return units


def unit_information(token_info: torch.Tensor, units: torch.Tensor) -> torch.Tensor:
    """I(u) = the SUM of its tokens' self-information, float32 [U] (+inf for a unit holding a +inf token)."""
    units = units.cpu()
    count = int(units.max()) + 1 if units.numel() else 0
    return torch.zeros(count, dtype=torch.float32, device="cpu").index_add_(
        0, units, token_info.cpu().float()
    )


def select_units(unit_info: torch.Tensor, unit_sizes: torch.Tensor, target: int) -> torch.Tensor:
    """Which units to keep, bool [U] on the cpu: a threshold on the ranking by information whose kept tokens
    are nearest `target`.

    Units are ranked by `unit_info`, highest first (ties: the earlier unit first); the kept set is the ranking
    prefix whose token count (sum of `unit_sizes`) is nearest `target` (ties: the longer prefix), and holds at
    least every +inf unit.
    """
    unit_info, unit_sizes = unit_info.cpu(), unit_sizes.cpu()
    count = unit_info.shape[0]
    keep = torch.zeros(count, dtype=torch.bool, device="cpu")
    if count == 0:
        return keep
    order = torch.sort(unit_info, descending=True, stable=True).indices
    tokens = torch.cat([torch.zeros(1, dtype=torch.long, device="cpu"), unit_sizes[order].long().cumsum(0)])
    forced = int((unit_info == float("inf")).sum())  # ranked first
    gap = (tokens[forced:] - target).abs()
    k = forced + int(torch.nonzero(gap == gap.min())[-1])  # the nearest prefix, the longer one on a tie
    keep[order[:k]] = True
    return keep


@dataclass
class ContextCompression:
    """Selective Context over the prompt's context (see the module docstring).

    keep: the fraction of the context's tokens that remain, in (0, 1] (1 keeps everything).
    unit: the lexical unit dropped or kept whole: `token`, `word` or `sentence`.
    chunk_size: the longest forward used to score the context (a sliding window past it).
    """

    keep: float = 0.5
    unit: str = "word"
    chunk_size: int = 1024

    def validate(self) -> None:
        if isinstance(self.keep, bool) or not isinstance(self.keep, (int, float)) or not 0 < self.keep <= 1:
            raise ValueError(f"context_compression.keep must be a number in (0, 1], got {self.keep!r}")
        if self.unit not in UNITS:
            raise ValueError(f"context_compression.unit must be one of {UNITS}, got {self.unit!r}")
        _check_chunk_size(self.chunk_size)

    def compress(
        self, model, tokenizer, context_ids: torch.Tensor, keep_prefix: int = 0
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """The compressed context ids, long [1, C'] on `context_ids`'s device, and statistics.

        context_ids: [1, n] or [n] token ids. keep_prefix: how many leading tokens are kept verbatim and left
        out of the `keep` fraction (e.g. a chat template's header before the document); they still condition
        the scores of what follows. Deterministic; runs under torch.no_grad on the model's device.
        """
        self.validate()
        ids = _as_row(context_ids)
        n = ids.shape[1]
        prefix = min(max(int(keep_prefix), 0), n)
        info = self_information(model, ids, self.chunk_size)
        info[:prefix] = float("inf")
        special = _special_ids(tokenizer)
        is_special = torch.tensor([i in special for i in ids[0].tolist()], dtype=torch.bool, device="cpu")
        info[is_special] = float("inf")  # template markers are never dropped
        units = lexical_units(tokenizer, ids, self.unit, prefix)
        unit_info = unit_information(info, units)
        count = unit_info.shape[0]
        target = prefix + round(self.keep * (n - prefix))
        kept_units = select_units(unit_info, torch.bincount(units, minlength=count), target)
        kept = ids[:, kept_units[units].to(ids.device)]
        finite = unit_info[kept_units & torch.isfinite(unit_info)]
        stats = {
            "unit": self.unit,
            "keep": self.keep,
            "tokens_before": n,
            "tokens_after": kept.shape[1],
            "tokens_dropped": n - kept.shape[1],
            "kept_fraction": kept.shape[1] / n if n else 1.0,
            "target_tokens": target,
            "units_before": count,
            "units_after": int(kept_units.sum()),
            "units_dropped": count - int(kept_units.sum()),
            "threshold": float(finite.min()) if finite.numel() else None,  # the lowest kept unit's I (nats)
        }
        return kept, stats


def _as_row(context_ids: torch.Tensor) -> torch.Tensor:
    ids = torch.as_tensor(context_ids)
    if ids.dim() == 1:
        ids = ids[None]
    if ids.dim() != 2 or ids.shape[0] != 1:
        raise ValueError(
            f"context compression takes one context, [n] or [1, n] ids; got shape {tuple(ids.shape)}"
        )
    return ids.long()


def _device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


def _special_ids(tokenizer) -> set[int]:
    """The tokenizer's special tokens: BOS/EOS/... and the added tokens marked special (template markers)."""
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    return set(tokenizer.all_special_ids) | {
        i for i, token in added.items() if getattr(token, "special", False)
    }


def _check_chunk_size(chunk_size) -> None:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < MIN_CHUNK:
        raise ValueError(
            f"context_compression.chunk_size must be an integer >= {MIN_CHUNK}, got {chunk_size!r}"
        )


def requested_compression(options: Mapping[str, Any], method: Any) -> ContextCompression | None:
    """The prompt compression a run asks for (the `context_compression` config block): its `keep`, or a method's
    own `compress_context` flag (the pooling-merge study's) at `keep` or `DEFAULT_KEEP`; None when off."""
    if options["keep"] is None and not getattr(method, "compress_context", False):
        return None
    keep = DEFAULT_KEEP if options["keep"] is None else options["keep"]
    return ContextCompression(keep, options["unit"], options["chunk_size"])


def compress_prompts(
    compression: ContextCompression, model, tokenizer, prompts: Sequence[Prompt]
) -> tuple[list[Prompt], list[tuple[float, int]], dict[str, Any]]:
    """Every prompt's context compressed (its chat-template opening kept whole, the question untouched): the new
    prompts, each one's (compression seconds, tokens dropped), and the run's figures (means over the prompts)."""
    compressed, seconds, stats = [], [], []
    for prompt in prompts:
        start = time.perf_counter()
        if prompt.context.shape[1]:
            ids, figures = compression.compress(model, tokenizer, prompt.context, keep_prefix=prompt.opening)
        else:
            ids, figures = prompt.context, {"tokens_before": 0, "tokens_after": 0}
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
        compressed.append(dataclasses.replace(prompt, context=ids.cpu()))
        stats.append(figures)
    dropped = [s["tokens_before"] - s["tokens_after"] for s in stats]
    before = sum(s["tokens_before"] for s in stats) / len(stats)
    after = sum(s["tokens_after"] for s in stats) / len(stats)
    return (
        compressed,
        list(zip(seconds, dropped, strict=True)),
        {
            "keep": compression.keep,
            "unit": compression.unit,
            "chunk_size": compression.chunk_size,
            "context_tokens_before": before,
            "context_tokens_after": after,
            "kept_fraction": after / before if before else 1.0,
            "seconds": sum(seconds) / len(seconds),
        },
    )


def count_dropped_tokens(results: Sequence[Any], dropped: Sequence[int], model) -> None:
    """Make each result's cache figures (`kv`) count the tokens its prompt compression dropped as tokens the full
    cache would hold: `tokens_seen`, `tokens_full` (a sliding-window layer's full cache stays its window), `bytes_full`
    and the compression ratio refer to the original prompt, so the saving reported is the whole saving."""
    windows = [
        model.config.sliding_window if local else None
        for local in sliding_layers(model) or [False] * model.config.num_hidden_layers
    ]
    if not any(sliding_layers(model)) and getattr(model.config, "sliding_window", None):
        windows = [model.config.sliding_window] * len(windows)  # every layer slides (Mistral)
    for result, extra in zip(results, dropped, strict=True):
        kv = result.kv
        seen = kv["tokens_seen"]

        def full(tokens: int) -> list[int]:
            return [tokens if w is None else min(tokens, w - 1) for w in windows]

        before, after = sum(full(seen)), sum(full(seen + extra))
        kv["tokens_seen"] = seen + extra
        kv["tokens_full"] = after / len(windows)
        if before:
            kv["bytes_full"] = kv["bytes_full"] * after / before
        kv["compression_ratio"] = 1.0 - kv["tokens_kept"] / kv["tokens_full"] if kv["tokens_full"] else 0.0
