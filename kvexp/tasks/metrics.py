"""Text metrics for generation tasks: SQuAD-style QA scores, ROUGE, and the long-context benchmarks' official
scorers (LongBench, LongBench-v2, InfiniteBench, LooGLE, ZeroSCROLLS).

`score(metric, prediction, answers, **kwargs)` is the one entry point the generation runner calls with a
sample's `metric` family, the decoded prediction, the sample's references and the sample's `meta` (extra
keys are ignored, so `**sample.meta` can be passed as is). Every family returns a dict of floats in [0, 1];
references are scored one by one and the best value is kept, as SQuAD and LongBench do (the benchmark
families below combine them as their benchmark does).

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
- "ruler_all", "ruler_part": {score}, RULER's string_match_all (NIAH, VT, CWE, FWE: the share of references in
  the prediction) and string_match_part (QA: any reference in it), case-insensitive substrings, in [0, 1]
  (RULER reports them x 100).
- "math": {accuracy, boxed}, math reasoning's final answer (MATH-500, AIME): the last \\boxed{} of the
  prediction normalized as Hendrycks MATH's and PRM800K's graders do and compared with the reference, and
  whether the prediction boxed an answer at all (kvexp.tasks.math_grader).
- "longbench_v2": {accuracy}, LongBench-v2's answer extraction ("The correct answer is (X)") and judge.
- "infinitebench": {score}, InfiniteBench's get_score_one of the sample's task (`task=`).
- "loogle_similarity": {bleu1, bleu4, rouge1_recall, rouge2_recall, rougeL_recall}, "loogle_cloze":
  {exact_match, partial_match}: LooGLE's automatic metrics that run offline.
- "zero_scrolls_rouge" {geometric_mean, rouge1, rouge2, rougeL}, "zero_scrolls_f1" {f1}, "zero_scrolls_accuracy"
  {accuracy}, "zero_scrolls_exp_similarity" {exp_similarity}, "zero_scrolls_concordance_index"
  {concordance_index}: ZeroSCROLLS's metrics per task, in [0, 1] (ZeroSCROLLS reports them x 100).
The benchmark scorers follow the benchmark's own evaluation code; where a reproduction differs from it, the
scorer's docstring says so.
"""

from __future__ import annotations

import ast
import difflib
import itertools
import json
import re
import string
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from functools import cache
from typing import Any

from kvexp.tasks import math_grader

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
def _rouge_scorer(use_stemmer: bool = True):
    """rouge-score's scorer, built once per stemming choice (the stemmer loads once); imported lazily like
    other extras."""
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=use_stemmer)


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


def _precision_recall_f(overlap: int, predicted: int, referenced: int) -> dict[str, float]:
    """The `rouge` package's scores of an overlap: p, r (0 over an empty side) and f = 2pr / (p + r + 1e-8)."""
    p = overlap / predicted if predicted else 0.0
    r = overlap / referenced if referenced else 0.0
    return {"p": p, "r": r, "f": 2.0 * p * r / (p + r + 1e-8)}


def rouge_package(prediction: str, reference: str) -> dict[str, dict[str, float]] | None:
    """`Rouge().get_scores(prediction, reference)[0]` of the `rouge` package (pltrdy, v1.0.1), reimplemented:
    {"rouge-1", "rouge-2", "rouge-l"}, each {"p", "r", "f"}; None where the package raises (a side without a
    sentence).

    The package splits texts into "."-separated sentences and those into words at single spaces (case-
    sensitive, unstemmed), and counts *sets* (its default exclusive=True): rouge-n compares the distinct
    n-grams of the two word sequences (n-grams across sentence ends included); rouge-l is a summary-level
    union-LCS: the distinct words lying on the chosen LCS of some (reference sentence, prediction sentence)
    pair, over the distinct prediction words (p) and reference words (r). One difference: the package
    backtracks the LCS recursively, so a sentence pair longer than Python's recursion limit (~1000 words)
    raises there; here it is scored.
    """
    hyp, ref = _rouge_package_sentences(prediction), _rouge_package_sentences(reference)
    if not hyp or not ref:
        return None
    hyp_words = [w for s in hyp for w in s.split(" ")]
    ref_words = [w for s in ref for w in s.split(" ")]
    scores = {}
    for n in (1, 2):
        hyp_grams = {tuple(hyp_words[i : i + n]) for i in range(len(hyp_words) - n + 1)}
        ref_grams = {tuple(ref_words[i : i + n]) for i in range(len(ref_words) - n + 1)}
        scores[f"rouge-{n}"] = _precision_recall_f(len(hyp_grams & ref_grams), len(hyp_grams), len(ref_grams))
    union: set[str] = set()
    for r in ref:
        for h in hyp:
            union |= _lcs_words(r.split(" "), h.split(" "))
    scores["rouge-l"] = _precision_recall_f(len(union), len(set(hyp_words)), len(set(ref_words)))
    return scores


def longbench_rouge(prediction: str, answer: str, **_: Any) -> float:
    """LongBench's rouge_score: the `rouge` package's rouge-l F (`rouge_package`); where the package raises
    (an empty side) LongBench scores 0.0, here too."""
    scores = rouge_package(prediction, answer)
    return scores["rouge-l"]["f"] if scores else 0.0


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


def string_match_all(prediction: str, references: Sequence[str]) -> float:
    """RULER's string_match_all: the share of references that occur in the prediction, case-insensitive."""
    text = prediction.lower()
    return sum(r.lower() in text for r in references) / len(references) if references else 0.0


def string_match_part(prediction: str, references: Sequence[str]) -> float:
    """RULER's string_match_part: 1.0 if any reference occurs in the prediction, case-insensitive."""
    text = prediction.lower()
    return float(any(r.lower() in text for r in references))


_RULER: dict[str, Callable[[str, Sequence[str]], float]] = {
    "ruler_all": string_match_all,
    "ruler_part": string_match_part,
}
# ---- LongBench-v2 (THUDM/LongBench, pred.py and result.py) ----

_CORRECT_ANSWER = (
    re.compile(r"The correct answer is \(([A-D])\)"),
    re.compile(r"The correct answer is ([A-D])"),
)


def longbench_v2_choice(response: str) -> str | None:
    """LongBench-v2's extract_answer: the letter of "The correct answer is (X)", else of "The correct answer is
    X", once markdown asterisks are removed; None when the response names none."""
    response = response.replace("*", "")
    match = next((m for m in (p.search(response) for p in _CORRECT_ANSWER) if m), None)
    return match.group(1) if match else None


def longbench_v2_accuracy(prediction: str, answers: Sequence[str], **_: Any) -> dict[str, float]:
    """pred.py's judge: the extracted letter is the answer's. pred.py drops a sample whose response is empty
    (it only expects that of a failed API call); here an empty prediction scores 0."""
    return {"accuracy": float(longbench_v2_choice(prediction) == answers[0])}


# ---- InfiniteBench (OpenBMB/InfiniteBench, src/compute_scores.py's get_score_one) ----

_WORD_BREAKS = ("\n", ":", '"', "'", ".", ",", "?", "!", "{", "}")
_DIGITS = re.compile(r"[0-9]+")
_FIRST_NUMBER = re.compile(r"\d+\.\d+|\d+")
# normalize_zh_answer's punctuation: ASCII's and these.
_ZH_PUNCTUATION = frozenset(
    string.punctuation
    + "！？｡。＂＃＄％＆＇（）＊＋，－／：；＜＝＞＠［＼］＾＿｀｛｜｝～｟｠｢｣､、〃》「」『』【】〔〕〖〗〘〙〚〛〜〝〞〟〰〾〿–—‘’‛“”„‟…‧﹏."
)


def _replaced(text: str, characters: Sequence[str], collapse: bool = False) -> str:
    """`text` with each of `characters` (strings) replaced by a space; `collapse`: runs of spaces made one."""
    for c in characters:
        text = text.replace(c, " ")
    return re.sub(" {2,}", " ", text) if collapse else text


def _after_prefix(text: str, prefixes: Sequence[str]) -> str | None:
    """What follows the first of `prefixes` (tried in order) found in `text`, past the one character after it
    (InfiniteBench's `pred[idx + len(prefix) + 1:]`); None when none occurs."""
    for prefix in prefixes:
        idx = text.find(prefix)
        if idx != -1:
            return text[idx + len(prefix) + 1 :]
    return None


def _infinitebench_first_int(prediction: str, answers: Sequence[str]) -> bool:
    """passkey, number_string: the prediction's first run of digits is the answer."""
    match = _DIGITS.search(prediction)
    return (match.group() if match else "") == answers[0]


def _infinitebench_kv_retrieval(prediction: str, answers: Sequence[str]) -> bool:
    """kv_retrieval: the value is one of the prediction's words (split at spaces and punctuation)."""
    return answers[0] in _replaced(prediction, _WORD_BREAKS).split()


def _infinitebench_dialogue(prediction: str, answers: Sequence[str]) -> bool:
    """longdialogue_qa_eng: the first listed name is one of the prediction's upper-cased words."""
    return answers[0] in [w.upper() for w in _replaced(prediction.strip(), _WORD_BREAKS).split()]


def _infinitebench_choice(prediction: str, answers: Sequence[str]) -> bool:
    """longbook_choice_eng (answers = [the option's text, its letter]): a leading letter, the whole prediction,
    the text after an answer prefix, or the first word that is one of A-D."""
    pred = prediction.strip()
    if pred == "":
        return False
    if pred[0] in "ABCD":
        return pred[0] in answers
    if pred in answers:
        return True
    pred = _replaced(pred, ("\n", '"', "'", ".", ",", "?", "!", "{", "}"), collapse=True)
    after = _after_prefix(pred, ("answer is:", "answer:", "answer is", "option is"))
    if after is not None:
        return any(after.startswith(s) for s in answers)
    # `word in "ABCD"` as InfiniteBench writes it: a substring test ("AB" passes, then fails `in answers`).
    return next((word in answers for word in pred.split() if word in "ABCD"), False)


def _infinitebench_code_debug(prediction: str, answers: Sequence[str]) -> bool:
    """code_debug (answers = [the function's name, its option letter]): "X." / "X:" first, or the letter or
    the name right after an answer prefix."""
    pred = prediction.strip()
    name, letter = answers[0], answers[1]
    if pred[:2] in (f"{letter}.", f"{letter}:"):
        return True
    pred = _replaced(pred, ("\n", "`", "'", '"', "-", "*", "Option", "option"), collapse=True)
    after = _after_prefix(pred, ("answer is:", "is:", "answer:", "correct option is:"))
    return after is not None and (after.startswith(letter) or after.startswith(name))


def _infinitebench_math_find(prediction: str, answers: Sequence[str]) -> bool:
    """math_find: the prediction's first number equals the answer, compared as an int when the answer is one.
    InfiniteBench's int() of a decimal first number raises; here it scores 0."""
    match = _FIRST_NUMBER.search(prediction)
    if match is None:
        return False
    if re.fullmatch(r"-?\d+", answers[0]):
        return "." not in match.group() and int(match.group()) == int(answers[0])
    return float(match.group()) == float(answers[0])


def _infinitebench_math_calc(prediction: str, answers: Sequence[str]) -> float:
    """math_calc (answers = the intermediate values): the share of them the prediction's digit runs reproduce
    from the first on, up to the first mismatch. The prediction's numbers lose their minus signs, as in
    InfiniteBench, so a negative value never matches."""
    expected = [int(a) for a in answers]
    predicted = [int(d) for d in _DIGITS.findall(prediction)]
    matched = 0
    for want, got in zip(expected, predicted, strict=False):  # the prediction may stop early
        if want != got:
            break
        matched += 1
    return matched / len(expected)


def _infinitebench_code_run(prediction: str, answers: Sequence[str]) -> bool:
    """code_run: the prediction's last word is the return value."""
    words = _replaced(prediction.strip(), ("\n", ".", "`", "'", '"', ":")).split()
    try:
        return bool(words) and int(words[-1]) == int(answers[0])
    except ValueError:
        return False


def _infinitebench_summary(prediction: str, answers: Sequence[str]) -> float:
    """longbook_sum_eng: HF evaluate's rouge (rouge-score, no stemmer) rougeLsum F, the best reference; the
    texts are not split into sentences, so rougeLsum sees each line as one."""
    return max(_rouge_scorer(use_stemmer=False).score(a, prediction)["rougeLsum"].fmeasure for a in answers)


def _normalize_zh(text: str) -> str:
    """normalize_zh_answer: lower case, punctuation (ASCII and Chinese) and every whitespace removed."""
    return "".join("".join(ch for ch in text.lower() if ch not in _ZH_PUNCTUATION).split())


def _infinitebench_qa_zh(prediction: str, answers: Sequence[str]) -> float:
    """longbook_qa_chn: character F1 of the normalized texts, the best reference."""
    return max(_f1(list(_normalize_zh(prediction)), list(_normalize_zh(a))) for a in answers)


_INFINITEBENCH: dict[str, Callable[[str, Sequence[str]], float]] = {
    "passkey": _infinitebench_first_int,
    "number_string": _infinitebench_first_int,
    "kv_retrieval": _infinitebench_kv_retrieval,
    "longbook_sum_eng": _infinitebench_summary,
    "longbook_choice_eng": _infinitebench_choice,
    "longbook_qa_eng": token_f1,
    "longbook_qa_chn": _infinitebench_qa_zh,
    "longdialogue_qa_eng": _infinitebench_dialogue,
    "math_find": _infinitebench_math_find,
    "math_calc": _infinitebench_math_calc,
    "code_run": _infinitebench_code_run,
    "code_debug": _infinitebench_code_debug,
}


def infinitebench(
    prediction: str, answers: Sequence[str], task: str | None = None, **_: Any
) -> dict[str, float]:
    """InfiniteBench's get_score_one for the sample's `task` (answers as the loader writes them: strings; the
    option's text and letter for the choice tasks), as a yarn-mistral/yi/chatglm3 run is scored (GPT-4's
    math_calc rule, which skips the first number, is not applied)."""
    scorer = _INFINITEBENCH.get(str(task))
    if scorer is None:
        raise ValueError(f"metric 'infinitebench' needs task= one of {list(_INFINITEBENCH)}, got {task!r}")
    return {"score": float(scorer(prediction, answers))}


# ---- LooGLE (bigai-nlco/LooGLE, Evaluation/automatic_metrics.py) ----


def loogle_similarity(prediction: str, answers: Sequence[str], **_: Any) -> dict[str, float]:
    """LooGLE's automatic_sim scores that run offline, against the one reference: BLEU-1 and BLEU-4 (nltk's
    sentence_bleu on whitespace tokens, weights (1,0,0,0) and (0,0,0,1), no smoothing) and the `rouge` package's
    ROUGE-1/2/L *recall* (get_rouge_score's default metric="r"). An empty prediction is scored as the text
    "None", as automatic_eval.py does; where the rouge package raises (no sentence) LooGLE would stop, here the
    ROUGE scores are 0. METEOR (nltk's WordNet data) and BERTScore (a RoBERTa-large download) are not computed.
    """
    from nltk.translate.bleu_score import sentence_bleu

    hypothesis, reference = prediction or "None", answers[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nltk warns for every n-gram order without a match
        bleu1 = sentence_bleu([reference.split()], hypothesis.split(), weights=(1, 0, 0, 0))
        bleu4 = sentence_bleu([reference.split()], hypothesis.split(), weights=(0, 0, 0, 1))
    rouge_scores = rouge_package(hypothesis, reference)
    recall = {
        key: rouge_scores[key]["r"] if rouge_scores else 0.0 for key in ("rouge-1", "rouge-2", "rouge-l")
    }
    return {
        "bleu1": float(bleu1),
        "bleu4": float(bleu4),
        "rouge1_recall": recall["rouge-1"],
        "rouge2_recall": recall["rouge-2"],
        "rougeL_recall": recall["rouge-l"],
    }


def loogle_cloze(prediction: str, answers: Sequence[str], **_: Any) -> dict[str, float]:
    """LooGLE's automatic_match for shortdep_cloze: the prediction read as a dict literal ({"<mask-0>": ...});
    exact_match = the share of masks whose entity it gives exactly, partial_match = the share whose predicted
    entity shares a word with the reference's. The reference is answers[0], the masks' entities as a JSON object.

    LooGLE evaluates the prediction with Python's eval (here ast.literal_eval: a literal dict, no code run) and
    divides the matches by the masks summed over all samples; these are per-sample shares, so their mean weighs
    every question alike. A predicted entity that is not a string (LooGLE's .split() fails) does not match.
    """
    reference = json.loads(answers[0])
    if not reference:
        raise ValueError("metric 'loogle_cloze': the reference names no mask")
    try:
        hypothesis = ast.literal_eval(prediction or "None")
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        hypothesis = None
    if not isinstance(hypothesis, dict):
        return {"exact_match": 0.0, "partial_match": 0.0}
    given = {key: hypothesis[key] for key in reference if key in hypothesis}
    exact = sum(value == reference[key] for key, value in given.items())
    partial = sum(
        isinstance(value, str) and bool(set(reference[key].split()) & set(value.split()))
        for key, value in given.items()
    )
    return {"exact_match": exact / len(reference), "partial_match": partial / len(reference)}


# ---- ZeroSCROLLS (tau/zero_scrolls on the hub, metrics/: rouge, f1, accuracy, exp_similarity, concordance_index) ----

_OPTION_LETTER = re.compile(r"\b[A-D]\b")
_PERCENTAGE = re.compile(r"\d+\.?\d*%")


def zero_scrolls_rouge(prediction: str, answers: Sequence[str], **_: Any) -> dict[str, float]:
    """ZeroSCROLLS's rouge (SCROLLS's): rouge-score F of ROUGE-1/2/L without stemming, each the best over the
    references, and `geometric_mean` = (rouge1 * rouge2 * rougeL) ** (1/3).

    ZeroSCROLLS's task score is the geometric mean of the *means* over samples of rouge1, rouge2 and rougeL
    (compute it from this family's means); the mean of the per-sample `geometric_mean` is at most that.
    rougeLsum (which needs nltk's punkt sentence splitter) is not part of the score and not computed.
    """
    scores = [_rouge_scorer(use_stemmer=False).score(a, prediction) for a in answers]
    best = {key: max(s[key].fmeasure for s in scores) for key in ("rouge1", "rouge2", "rougeL")}
    return {"geometric_mean": (best["rouge1"] * best["rouge2"] * best["rougeL"]) ** (1 / 3), **best}


def zero_scrolls_f1(prediction: str, answers: Sequence[str], **_: Any) -> dict[str, float]:
    """ZeroSCROLLS's f1 (SCROLLS's f1.py, SQuAD's token F1): the best over the references."""
    return {"f1": token_f1(prediction, answers)}


def zero_scrolls_accuracy(prediction: str, answers: Sequence[str], **_: Any) -> dict[str, float]:
    """ZeroSCROLLS's accuracy (QuALITY): the first standalone letter A-D of the prediction is the reference's."""

    def letter(text: str) -> str | None:
        match = _OPTION_LETTER.search(text)
        return match.group() if match else None

    if any(letter(a) is None for a in answers):
        raise ValueError(
            f"metric 'zero_scrolls_accuracy': a reference names no option letter A-D: {list(answers)}"
        )
    return {"accuracy": float(any(letter(prediction) == letter(a) for a in answers))}


def _percentage(text: str) -> float | None:
    match = _PERCENTAGE.search(text)
    return float(match.group()[:-1]) if match else None


def zero_scrolls_exp_similarity(prediction: str, answers: Sequence[str], **_: Any) -> dict[str, float]:
    """ZeroSCROLLS's exp_similarity (SpaceDigest): 0.5 ** (|p - g| / 10) for the first percentages p, g of the
    prediction and the reference (0 without one in the prediction; g = 0 without one in the reference)."""
    predicted = _percentage(prediction)
    if predicted is None:
        return {"exp_similarity": 0.0}
    return {"exp_similarity": max(0.5 ** (abs((_percentage(a) or 0.0) - predicted) / 10) for a in answers)}


def _summary_order(text: str) -> list[int]:
    """The summary ids of an order ("3, 1, 2"): its digit runs, everything but digits, spaces and commas
    dropped first."""
    return [int(x) for x in re.sub(r"[^0-9\s,]", "", text).replace(",", " ").split()]


def zero_scrolls_concordance_index(prediction: str, answers: Sequence[str], **_: Any) -> dict[str, float]:
    """ZeroSCROLLS's concordance_index (BookSumSort): 0 unless the prediction lists the reference's summaries
    (as a multiset); else lifelines' concordance index of the two orders, which for orders of distinct summaries
    is the share of summary pairs they put in the same order. One summary has no pair: lifelines raises; here
    the (then equal) orders score 1."""

    def score_one(reference: str) -> float:
        gold, predicted = _summary_order(reference), _summary_order(prediction)
        if sorted(gold) != sorted(predicted):
            return 0.0
        gold_at, predicted_at = {s: i for i, s in enumerate(gold)}, {s: i for i, s in enumerate(predicted)}
        pairs = list(itertools.combinations(gold_at, 2))
        same = sum((gold_at[a] - gold_at[b]) * (predicted_at[a] - predicted_at[b]) > 0 for a, b in pairs)
        return same / len(pairs) if pairs else 1.0

    return {"concordance_index": max(score_one(a) for a in answers)}


# Families scored on all of a sample's references at once, each as its benchmark combines them.
_BENCHMARKS: dict[str, Callable[..., dict[str, float]]] = {
    "longbench_v2": longbench_v2_accuracy,
    "infinitebench": infinitebench,
    "loogle_similarity": loogle_similarity,
    "loogle_cloze": loogle_cloze,
    "zero_scrolls_rouge": zero_scrolls_rouge,
    "zero_scrolls_f1": zero_scrolls_f1,
    "zero_scrolls_accuracy": zero_scrolls_accuracy,
    "zero_scrolls_exp_similarity": zero_scrolls_exp_similarity,
    "zero_scrolls_concordance_index": zero_scrolls_concordance_index,
}

METRICS = ("qa", "rouge", "math", *_LONGBENCH, *_RULER, *_BENCHMARKS)


def score(metric: str, prediction: str, answers: Sequence[str], **kwargs: Any) -> dict[str, float]:
    """Score one prediction against its references with the metric family `metric` (see module docstring).

    kwargs: `all_classes` (longbench_classification), `first_line` (LongBench's first-line
    post-processing, set by the trec/triviaqa/samsum loaders), `task` (infinitebench); other keys are ignored.
    """
    if isinstance(answers, str):
        raise ValueError(f"answers must be a list of strings, got the string {answers!r}")
    if metric == "qa":
        return {
            "accuracy": contains_answer(prediction, answers),
            "exact_match": exact_match(prediction, answers),
            "f1": token_f1(prediction, answers),
        }
    if metric == "math":
        return math_grader.grade(prediction, answers)
    if metric == "rouge":
        return {**rouge(prediction, answers), "sentence_bleu": sentence_bleu(prediction, answers)}
    if metric in _RULER:
        return {"score": _RULER[metric](prediction, answers)}
    if metric in _BENCHMARKS:
        return _BENCHMARKS[metric](prediction, answers, **kwargs)
    scorer = _LONGBENCH.get(metric)
    if scorer is None:
        raise ValueError(f"metric={metric!r} is unknown; allowed values: {list(METRICS)}")
    if kwargs.get("first_line"):
        prediction = first_line(prediction)
    # LongBench's scorer: start from 0 and keep the best reference.
    best = max((scorer(prediction, a, **kwargs) for a in answers), default=0.0)
    return {"score": float(best)}
