"""Text metrics for generation tasks: SQuAD-style QA scores, ROUGE, and LongBench's official scorers.

`score(metric, prediction, answers, **kwargs)` is the one entry point the generation runner calls with a
sample's `metric` family, the decoded prediction, the sample's references and the sample's `meta` (extra
keys are ignored, so `**sample.meta` can be passed as is). Every family returns a dict of floats in [0, 1];
references are scored one by one and the best value is kept, as SQuAD and LongBench do.

Families:
- "qa": {accuracy, exact_match, f1}. accuracy = `contains_answer` (the passkey/needle criterion).
- "rouge": {rouge1, rouge2, rougeL, rougeLsum} F-measures from Google's `rouge-score` with the Porter
  stemmer. rougeLsum is the summary-level LCS over sentences that rouge-score takes to be the lines of the
  text ("\\n"-separated); a prediction without newlines is one sentence, so rougeLsum == rougeL for it. Beside
  them `sentence_bleu`: sacrebleu's sentence BLEU against all the references at once (13a tokenization, `exp`
  smoothing), / 100; its mean over samples is not corpus BLEU, hence the name.
- "longbench_qa_f1", "longbench_rouge", "longbench_classification", "longbench_retrieval",
  "longbench_count", "longbench_code_sim": {score}, LongBench's `metrics.py` reproduced value for value
  (THUDM/LongBench, v1 `eval.py` + `metrics.py`), with its first-line post-processing when the sample
  asks for it (`first_line=True`: trec, triviaqa, samsum). Where the reproduction differs from the
  original, the scorer's docstring says so.
"""

from __future__ import annotations

import difflib
import re
import string
from collections import Counter
from collections.abc import Callable, Sequence
from functools import cache
from typing import Any

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = frozenset(string.punctuation)
_NUMBER = re.compile(r"\d+")
_PARAGRAPH_ID = re.compile(r"Paragraph (\d+)")

# Metrics that are better when smaller, by the last part of their name (lm-eval's perplexity tasks included).
LOWER_IS_BETTER = frozenset({"perplexity", "nll", "word_perplexity", "byte_perplexity", "bits_per_byte"})


def lower_is_better(metric: str) -> bool:
    """Whether a metric — a name or a path: `rouge.rougeL`, lm-eval's `wikitext/word_perplexity,none` — is better
    when smaller."""
    return re.split(r"[./]", metric.split(",")[0])[-1] in LOWER_IS_BETTER


def normalize_answer(s: str) -> str:
    """SQuAD's normalization: lower case, drop ASCII punctuation and the articles a/an/the, collapse spaces."""
    text = "".join(ch for ch in s.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    """1.0 if the normalized prediction equals one of the normalized answers."""
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(a) for a in answers))


def _f1(prediction_tokens: Sequence[str], answer_tokens: Sequence[str]) -> float:
    """Bag-of-tokens F1; 0 without overlap (also when either side is empty, as LongBench's f1_score)."""
    same = sum((Counter(prediction_tokens) & Counter(answer_tokens)).values())
    if same == 0:
        return 0.0
    precision = same / len(prediction_tokens)
    recall = same / len(answer_tokens)
    return 2 * precision * recall / (precision + recall)


def token_f1(prediction: str, answers: Sequence[str]) -> float:
    """SQuAD token F1 of the normalized texts, max over answers (identical to LongBench's qa_f1_score)."""
    tokens = normalize_answer(prediction).split()
    return max((_f1(tokens, normalize_answer(a).split()) for a in answers), default=0.0)


def contains_answer(prediction: str, answers: Sequence[str]) -> float:
    """1.0 if a normalized answer occurs in the normalized prediction as whole tokens.

    Matching on token boundaries keeps a passkey "4123" from counting inside "41235"; an answer that
    normalizes to nothing (e.g. "the") never matches.
    """
    pred = f" {normalize_answer(prediction)} "
    return float(any(norm and f" {norm} " in pred for norm in map(normalize_answer, answers)))


@cache
def _rouge_scorer():
    """rouge-score's scorer, built once (it loads the Porter stemmer); imported lazily like other extras."""
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)


def rouge(prediction: str, references: Sequence[str]) -> dict[str, float]:
    """ROUGE-1/2/L/Lsum F-measures (rouge-score, stemmed), each the max over references.

    rougeLsum splits both texts into sentences at newlines, as rouge-score expects: put one sentence per
    line to get the summary-level score the CNN/DM literature reports.
    """
    best = dict.fromkeys(ROUGE_TYPES, 0.0)
    for reference in references:
        scores = _rouge_scorer().score(reference, prediction)  # rouge-score's order: (target, prediction)
        for key in ROUGE_TYPES:
            best[key] = max(best[key], scores[key].fmeasure)
    return best


def sentence_bleu(prediction: str, references: Sequence[str]) -> float:
    """sacrebleu's sentence BLEU of the prediction against every reference (multi-reference), in [0, 1]."""
    import sacrebleu

    return sacrebleu.sentence_bleu(prediction, list(references)).score / 100


# ---- LongBench (THUDM/LongBench v1, English tasks) ----


def first_line(prediction: str) -> str:
    """LongBench's post-processing for the few-shot tasks (trec, triviaqa, samsum): the first line after
    any leading newlines (the model tends to go on with the next few-shot example)."""
    return prediction.lstrip("\n").split("\n")[0]


def longbench_qa_f1(prediction: str, answer: str, **_: Any) -> float:
    """LongBench's qa_f1_score: SQuAD normalization, token F1."""
    return _f1(normalize_answer(prediction).split(), normalize_answer(answer).split())


def _rouge_package_sentences(text: str) -> list[str]:
    """The `rouge` package's sentence split: at ".", whitespace collapsed, pieces empty *before* collapsing
    dropped (so a " " piece survives as the empty sentence "", whose one word "" then counts)."""
    return [" ".join(piece.split()) for piece in text.split(".") if piece]


def _lcs_words(ref: Sequence[str], hyp: Sequence[str]) -> set[str]:
    """The words of one longest common subsequence of ref and hyp, chosen with the `rouge` package's
    backtracking tie-break (diagonal on a match, else up only when strictly longer, else left)."""
    table = [[0] * (len(hyp) + 1) for _ in range(len(ref) + 1)]
    for i, r in enumerate(ref, 1):
        for j, h in enumerate(hyp, 1):
            table[i][j] = table[i - 1][j - 1] + 1 if r == h else max(table[i - 1][j], table[i][j - 1])
    words, i, j = set(), len(ref), len(hyp)
    while i and j:
        if ref[i - 1] == hyp[j - 1]:
            words.add(ref[i - 1])
            i, j = i - 1, j - 1
        elif table[i - 1][j] > table[i][j - 1]:
            i -= 1
        else:
            j -= 1
    return words


def longbench_rouge(prediction: str, answer: str, **_: Any) -> float:
    """LongBench's rouge_score: the rouge-l F of the `rouge` package (pltrdy, v1.0.1), reimplemented.

    That rouge-l is a summary-level union-LCS over "."-separated sentences computed on word *sets*: the
    distinct words lying on the chosen LCS of some (reference sentence, prediction sentence) pair, divided
    by the number of distinct prediction words (precision) and distinct reference words (recall),
    F = 2PR / (P + R + 1e-8). Words are split on single spaces, case-sensitive, unstemmed. The package
    raises on an empty side (LongBench then scores 0.0), reproduced here. One difference: the package
    backtracks recursively, so a sentence pair longer than Python's recursion limit (~1000 words) raises
    and LongBench scores 0.0; this iterative version scores such pairs normally.
    """
    hyp, ref = _rouge_package_sentences(prediction), _rouge_package_sentences(answer)
    if not hyp or not ref:
        return 0.0
    hyp_vocab = {w for s in hyp for w in s.split(" ")}
    ref_vocab = {w for s in ref for w in s.split(" ")}
    union: set[str] = set()
    for r in ref:
        for h in hyp:
            union |= _lcs_words(r.split(" "), h.split(" "))
    precision, recall = len(union) / len(hyp_vocab), len(union) / len(ref_vocab)
    return 2.0 * precision * recall / (precision + recall + 1e-8)


def longbench_classification(
    prediction: str, answer: str, all_classes: Sequence[str] | None = None, **_: Any
) -> float:
    """LongBench's classification_score (trec): partial credit 1/k when the answer is among k named classes.

    Classes whose name occurs in the prediction are matched; those that are a proper substring of the
    answer are then dropped, so "city" does not compete with "other city". LongBench drops them while
    iterating the same list, which skips the class right after each dropped one; that quirk is kept so the
    numbers match. Its difflib fallback for "no class named" is unreachable (`list != 0` is always true),
    so no class named scores 0.0, here too.
    """
    if not all_classes:
        raise ValueError("metric 'longbench_classification' needs all_classes (the task's class names)")
    matched = [c for c in all_classes if c in prediction]
    i = 0
    while i < len(matched):
        if matched[i] in answer and matched[i] != answer:
            del matched[i]  # the next class slides into slot i and is skipped, as in LongBench
        i += 1
    return 1.0 / len(matched) if answer in matched else 0.0


def _share_equal(numbers: Sequence[str], target: str) -> float:
    """The fraction of the numbers that equal target (0 when there are none): guessing many is penalized."""
    return sum(n == target for n in numbers) / len(numbers) if numbers else 0.0


def longbench_retrieval(prediction: str, answer: str, **_: Any) -> float:
    """LongBench's retrieval_score (passage_retrieval_en): the answer "Paragraph 12" names id 12; the score
    is the fraction of the prediction's integers that are 12."""
    match = _PARAGRAPH_ID.search(answer)
    if match is None:
        raise ValueError(f"longbench_retrieval: answer {answer!r} has no 'Paragraph <n>'")
    return _share_equal(_NUMBER.findall(prediction), match.group(1))


def longbench_count(prediction: str, answer: str, **_: Any) -> float:
    """LongBench's count_score (passage_count): the fraction of the prediction's integers equal to the answer."""
    return _share_equal(_NUMBER.findall(prediction), str(answer))


def fuzz_ratio(a: str, b: str) -> float:
    """fuzzywuzzy's `fuzz.ratio(a, b) / 100` as LongBench ran it (no python-Levenshtein in its
    requirements, so fuzzywuzzy uses difflib): SequenceMatcher ratio, rounded to a whole percent.

    With python-Levenshtein installed fuzzywuzzy (and rapidfuzz) use the indel-distance ratio instead,
    which can differ from difflib's matching-blocks ratio by a few points on long lines.
    """
    return round(100 * difflib.SequenceMatcher(None, a, b).ratio()) / 100


def longbench_code_sim(prediction: str, answer: str, **_: Any) -> float:
    """LongBench's code_sim_score (lcc, repobench-p): the first prediction line that has no "`", "#" or "//"
    (a markdown fence or a comment), compared with the reference line by `fuzz_ratio`."""
    lines = prediction.lstrip("\n").split("\n")
    line = next((x for x in lines if "`" not in x and "#" not in x and "//" not in x), "")
    return fuzz_ratio(line, answer)


_LONGBENCH: dict[str, Callable[..., float]] = {
    "longbench_qa_f1": longbench_qa_f1,
    "longbench_rouge": longbench_rouge,
    "longbench_classification": longbench_classification,
    "longbench_retrieval": longbench_retrieval,
    "longbench_count": longbench_count,
    "longbench_code_sim": longbench_code_sim,
}
METRICS = ("qa", "rouge", *_LONGBENCH)


def score(metric: str, prediction: str, answers: Sequence[str], **kwargs: Any) -> dict[str, float]:
    """Score one prediction against its references with the metric family `metric` (see module docstring).

    kwargs: `all_classes` (longbench_classification), `first_line` (LongBench's first-line
    post-processing, set by the trec/triviaqa/samsum loaders); other keys are ignored.
    """
    if isinstance(answers, str):
        raise ValueError(f"answers must be a list of strings, got the string {answers!r}")
    if metric == "qa":
        return {
            "accuracy": contains_answer(prediction, answers),
            "exact_match": exact_match(prediction, answers),
            "f1": token_f1(prediction, answers),
        }
    if metric == "rouge":
        return {**rouge(prediction, answers), "sentence_bleu": sentence_bleu(prediction, answers)}
    scorer = _LONGBENCH.get(metric)
    if scorer is None:
        raise ValueError(f"metric={metric!r} is unknown; allowed values: {list(METRICS)}")
    if kwargs.get("first_line"):
        prediction = first_line(prediction)
    # LongBench's scorer: start from 0 and keep the best reference.
    best = max((scorer(prediction, a, **kwargs) for a in answers), default=0.0)
    return {"score": float(best)}
