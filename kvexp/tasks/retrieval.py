"""Retrieval tasks generated on the fly: a pass key, or RULER's needles, hidden at a controlled depth of a haystack.

Each sample is a haystack of real text (`dataset.haystack`: `book`, the default, is a public-domain novel
embedded in kvexp, or `dataset.path`'s file; `essays`, Paul Graham's essays as RULER uses them, from
`$KVEXP_DATA_DIR/<dataset.local_file>` or `dataset.path`; any perplexity dataset's text by its name; or
RULER's repeated noise sentences, `repeat`) with needles
inserted at sentence boundaries, sized so that the whole prompt plus the answer's `max_new_tokens` takes
`length` tokens (RULER's rule), for every `length` x `depth` x `repeats`. The first needle sits at `depth`
(0 = the start of the haystack, 1 = its end); further needles at seeded depths from RULER's 40-level grid.
Keys, values and the haystack window are drawn from `seed`.

* `passkey`: one 5-digit pass key (LongLoRA / landmark-attention's task).
* `needle`: RULER's niah variants: `single`, `multi_key` (the queried key among `num_keys` keys),
  `multi_value` (`num_values` values for one key, all asked), `multi_query` (`num_queries` keys, all asked);
  7-digit values and adjective-noun keys (RULER draws them from wonderwords; a fixed word list here).

Phrasing (`dataset.phrasing`): `plain` (default) is LongLoRA's pass-key wording ("The pass key is 12345.
Remember it. 12345 is the pass key."), which SmolLM2-135M answers with the full cache; `ruler` is RULER's
"special magic number" template, a variant for larger models (SmolLM2 answers it 0/12 times at 2k tokens).
Scored by `qa` (the answer occurs in the prediction) or, when several values are asked, RULER's
string_match_all (`qa_all`: the fraction of values found). Results are reported by `length` and `depth`.
"""

from __future__ import annotations

import json
import logging
import random
import re
from collections.abc import Mapping
from pathlib import Path

from omegaconf import OmegaConf

from kvexp.data import HAYSTACK_BOOK
from kvexp.models import REPO
from kvexp.tasks.data import DATASETS as TEXT_DATASETS
from kvexp.tasks.data import load_documents, locate
from kvexp.tasks.generation import GenerationSample, PromptEncoder

log = logging.getLogger(__name__)

PHRASINGS = ("plain", "ruler")
HAYSTACKS = ("book", "essays", "repeat")  # or a perplexity dataset's name
VARIANTS = ("single", "multi_key", "multi_value", "multi_query")
# RULER's noise haystack (niah_single_1, after LongLoRA's pass-key garbage).
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
RULER_DEPTHS = [round(100 * i / 39) / 100 for i in range(40)]  # np.round(np.linspace(0, 100, 40)) / 100

_ADJECTIVES = (  # noqa: SIM905 (a word list reads better as words)
    "ancient bewildered brave breezy calm careful clever cloudy crooked curious damp defiant eager "
    "elegant fancy fierce fluffy gentle gigantic gleaming grumpy hollow icy jolly lively lucky massive "
    "misty modern narrow nervous obedient odd polite precious proud quaint quiet rapid rustic shallow "
    "shiny silly smooth sparkling spicy steep stormy strange sturdy swift tender tiny vast wandering "
    "warm wicked wild witty wooden zealous"
).split()
_NOUNS = (  # noqa: SIM905 (a word list reads better as words)
    "anchor apple arrow badge balloon banjo basket beacon bicycle blanket bottle bridge bucket butterfly "
    "cabin camera candle canyon castle cello chimney compass cookie cottage crayon crown cushion dagger "
    "desert dolphin dragon drum eagle engine falcon feather forest fountain garden glacier guitar hammer "
    "harbor helmet island jacket kettle ladder lantern lemon lighthouse lizard magnet meadow mirror "
    "mountain necklace orchard otter palace parrot pebble pencil piano pillow planet pumpkin puzzle "
    "pyramid quilt rabbit ribbon river rocket saddle scarf shovel squirrel statue tiger trumpet tulip "
    "umbrella valley violin volcano wagon walrus zebra"
).split()


def _templates(phrasing: str, keyed: bool) -> dict[str, str]:
    """Format strings for the intro, a needle, the question and the answer prefix ({key}, {value}, {query})."""
    if phrasing == "ruler":  # RULER's niah template (synthetic.yaml), numbers as the needle type
        return {
            "intro": "Some special magic numbers are hidden within the following text. Make sure to memorize "
            "it. I will quiz you about the numbers afterwards.",
            "needle": "One of the special magic numbers for {key} is: {value}.",
            "question": "What are all the special magic numbers for {query} mentioned in the provided text?",
            "prefix": "The special magic numbers for {query} mentioned in the provided text are",
        }
    intro = (
        "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
        "I will quiz you about the important information there."
    )
    if not keyed:  # LongLoRA's pass-key prompt
        return {
            "intro": intro,
            "needle": "The pass key is {value}. Remember it. {value} is the pass key.",
            "question": "What is the pass key?",
            "prefix": "The pass key is",
        }
    return {
        "intro": intro,
        "needle": "The pass key for {key} is {value}. Remember it. {value} is the pass key for {key}.",
        "question": "What is the pass key for {query}?",
        "prefix": "The pass key for {query} is",
    }


def check_retrieval(dataset: Mapping) -> None:
    """Lengths, depths, phrasing, variant and the haystack's source, before any model loads."""
    lengths, depths = list(dataset.get("lengths") or []), list(dataset.get("depths") or [])
    if not lengths or any(n < 64 for n in lengths):
        raise ValueError(f"dataset.lengths must be a non-empty list of token counts >= 64, got {lengths}")
    if not depths or any(not 0.0 <= d <= 1.0 for d in depths):
        raise ValueError(f"dataset.depths must be a non-empty list of fractions in [0, 1], got {depths}")
    if dataset.get("repeats", 1) < 1:
        raise ValueError(f"dataset.repeats must be >= 1, got {dataset.get('repeats')}")
    if dataset.get("phrasing") not in PHRASINGS:
        raise ValueError(
            f"dataset.phrasing={dataset.get('phrasing')!r} is not allowed; choose one of {PHRASINGS}"
        )
    variant = dataset.get("variant", "single")
    if variant not in VARIANTS:
        raise ValueError(f"dataset.variant={variant!r} is not allowed; choose one of {VARIANTS}")
    for key in ("num_keys", "num_values", "num_queries"):
        if dataset.get(key, 1) < 1:
            raise ValueError(f"dataset.{key} must be >= 1, got {dataset.get(key)}")
    haystack = dataset.get("haystack")
    if haystack not in HAYSTACKS and haystack not in TEXT_DATASETS:
        raise ValueError(
            f"dataset.haystack={haystack!r} is not allowed; choose one of {[*HAYSTACKS, *TEXT_DATASETS]}"
        )
    if dataset.get("path") and haystack not in ("book", "essays"):
        raise ValueError(
            f"dataset.path is a haystack file: it needs dataset.haystack=book or essays, not {haystack!r}"
        )
    haystack_file(dataset, announce=False)  # the file exists


def haystack_file(dataset: Mapping, announce: bool = True) -> Path | None:
    """The haystack's file for `book` / `essays` (`dataset.path` first; None for the other haystacks)."""
    haystack = dataset.get("haystack")
    if haystack not in ("book", "essays"):
        return None
    if haystack == "book" and not dataset.get("path"):
        if announce:
            log.info("dataset %s: haystack from %s", dataset.get("name"), HAYSTACK_BOOK.description)
        return HAYSTACK_BOOK.path
    where = {"name": f"{dataset.get('name')} (haystack={haystack})", "path": dataset.get("path")}
    return locate({**where, "local_file": dataset.get("local_file")}, announce=announce).path


def haystack_text(dataset: Mapping, min_chars: int) -> str:
    """The haystack with whitespace collapsed (RULER splits the essays into words and rejoins them)."""
    haystack = dataset.get("haystack")
    if haystack == "repeat":
        text = " ".join([NOISE] * (min_chars // len(NOISE) + 1))
    elif haystack in TEXT_DATASETS:
        config = OmegaConf.load(REPO / "conf" / "dataset" / f"{haystack}.yaml")
        text = "\n\n".join(d.text for d in load_documents(config, None))
    else:
        text = _read_text(haystack_file(dataset), dataset.get("text_field") or "text")
    return re.sub(r"\s+", " ", text).strip()


def _read_text(path: Path, text_field: str) -> str:
    """A JSON object's `text_field`, a JSON list of strings, or the file as plain text."""
    raw = path.read_text(encoding="utf-8")
    if path.suffix != ".json":
        return raw
    data = json.loads(raw)
    return data[text_field] if isinstance(data, Mapping) else "\n".join(data)


def _insert(text: str, needles: list[tuple[float, str]]) -> str:
    """Insert each (depth, needle) at the first sentence boundary at or after depth * len(text)."""
    cuts = []
    for depth, needle in needles:
        boundary = text.find(". ", int(depth * len(text)))
        cuts.append((0 if depth == 0 else len(text) if boundary < 0 else boundary + 2, needle))
    pieces, last = [], 0
    for at, needle in sorted(cuts, key=lambda c: c[0]):
        pieces += [text[last:at].strip(), needle]
        last = at
    pieces.append(text[last:].strip())
    return " ".join(p for p in pieces if p)


def _needle_sample(
    encoder: PromptEncoder,
    tokens: list[int],  # the haystack, tokenized
    length: int,
    depth: float,
    variant: str,
    dataset: Mapping,
    rng: random.Random,
    index: int,
) -> GenerationSample:
    keyed = dataset["name"] != "passkey"
    t = _templates(dataset["phrasing"], keyed)
    n_keys = dataset.get("num_keys", 1) if variant == "multi_key" else 1
    n_queries = dataset.get("num_queries", 1) if variant == "multi_query" else 1
    n_values = dataset.get("num_values", 1) if variant == "multi_value" else 1
    keys = rng.sample([f"{a}-{n}" for a in _ADJECTIVES for n in _NOUNS], max(n_keys, n_queries))
    digits = 7 if keyed else 5
    pairs = [(k, rng.randint(10 ** (digits - 1), 10**digits - 1)) for k in keys for _ in range(n_values)]
    queried = keys[:n_queries]
    answers = [str(v) for k, v in pairs if k in queried]
    # The first needle holds the (first) queried value at the controlled depth; the others at seeded depths.
    depths = [depth] + rng.sample([d for d in RULER_DEPTHS if d != depth], len(pairs) - 1)
    needles = [(d, t["needle"].format(key=k, value=v)) for d, (k, v) in zip(depths, pairs, strict=True)]
    query = queried[0] if len(queried) == 1 else ", ".join(queried[:-1]) + ", and " + queried[-1]
    sample = GenerationSample(
        id=f"{dataset['name']}/{length}/{depth:g}/{index}",
        context="",
        question=t["question"].format(query=query),
        answers=answers,
        answer_prefix=t["prefix"].format(query=query),
        max_new_tokens=dataset["max_new_tokens"],
        metric="qa_all" if len(answers) > 1 else "qa",
        meta={"length": length, "depth": depth, "variant": variant},
        stop=list(dataset.get("stop") or []),
    )
    # Fit the haystack so the prompt plus the answer takes `length` tokens; re-tokenization at the cut can
    # shift a count by a token or two, so shrink until it fits.
    offset = rng.randrange(max(1, len(tokens) - 2 * length))
    room = length
    for _ in range(8):
        haystack = encoder.tokenizer.decode(tokens[offset : offset + room])
        sample.context = f"{t['intro']}\n{_insert(haystack, needles)}\n"
        prompt = encoder.encode(sample)
        total = prompt.context.shape[1] + prompt.question.shape[1] + sample.max_new_tokens
        if total <= length:
            sample.meta["tokens"] = total
            return sample
        room -= total - length
        if room < length // 4:
            break
    raise ValueError(
        f"dataset.lengths: {length} tokens leave less than a quarter of the prompt for the haystack of {sample.id}"
    )


def retrieval_samples(
    dataset: Mapping, encoder: PromptEncoder, max_samples: int | None, seed: int
) -> list[GenerationSample]:
    """Samples for every (repeat, length, depth) in that order, the first `max_samples` of them."""
    check_retrieval(dataset)
    lengths = list(dataset["lengths"])
    if encoder.max_context is not None and max(lengths) > encoder.max_context:
        raise ValueError(f"dataset.lengths={lengths} exceeds model.max_context={encoder.max_context}")
    grid = [
        (length, d) for _ in range(dataset.get("repeats", 1)) for length in lengths for d in dataset["depths"]
    ]
    grid = grid if max_samples is None else grid[:max_samples]
    # A byte tokenizer takes a character per token, BPE about four: 12 characters per token is room for both.
    text = haystack_text(dataset, 12 * (max(lengths) + 1))
    tokens = encoder.tokenizer(text[: 12 * 3 * max(lengths)], add_special_tokens=False).input_ids
    if len(tokens) < max(lengths):
        raise ValueError(f"the haystack has {len(tokens)} tokens, fewer than dataset.lengths={lengths} needs")
    rng = random.Random(seed)
    variant = dataset.get("variant", "single")
    return [_needle_sample(encoder, tokens, n, d, variant, dataset, rng, i) for i, (n, d) in enumerate(grid)]
