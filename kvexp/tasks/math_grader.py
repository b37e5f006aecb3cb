r"""Final answers of math reasoning generations (MATH-500, AIME): the last `\boxed{...}`, normalized and compared
with the reference as the MATH graders do. kvexp's own implementation of their documented rules.

Extraction (`last_boxed`): the content of the last `\boxed{...}` or `\fbox{...}` of the generation, braces
balanced (Hendrycks MATH's `last_boxed_only_string`, which looks for `\fbox` only when there is no `\boxed`;
kvpress's AIME25 scorer also takes the last box); the brace-less form `\boxed 5` runs to the next `$` or line
end (lm-eval's hendrycks_math). Nothing boxed, or a box never closed (a generation cut by `max_new_tokens`), is
no answer: wrong, as in those graders. There is no fallback to "the answer is ..." or the last number
(Qwen2.5-Math's evaluation has one); the `boxed` score says how often an answer was given at all.

Normalization (`normalize_answer`), applied to both sides, in this order:

* Hendrycks MATH `is_equiv` / `_strip_string` (hendrycks/math, modeling/math_equivalence.py; PRM800K's
  `math_normalize` is the same): line breaks and `\!` dropped, `\\` -> `\`, `\tfrac` / `\dfrac` -> `\frac`,
  `\left` / `\right` dropped, degrees (`^\circ`, `^{\circ}`), `\$` and `\%` / `%` dropped, a unit after the value
  dropped (`10\text{ units}` -> `10`), `.5` -> `0.5` at the start and after a space or `{`, a one-variable prefix
  `x = ` / `k = ` dropped (one `=`, at most 2 characters before it, counted without spaces here), spaces removed,
  one-character arguments braced (`\sqrt3` -> `\sqrt{3}`, `\frac12` -> `\frac{1}{2}`, `\frac1{72}` ->
  `\frac{1}{72}`; `\frac{72}1` stays, as there), `0.5` -> `\frac{1}{2}` (its one decimal-fraction rule), an
  integer `a/b` -> `\frac{a}{b}` (the sign put in front here, so `-1/2` equals `-\frac{1}{2}`).
* PRM800K's grader (openai/prm800k, grading/grader.py and math_normalize.py): an answer that is one `\text{...}`
  is its text, bare `$` dropped, enclosing braces `{...}` dropped, thousands separators of a whole number dropped
  (`1,000` -> `1000`, also `1{,}000`), an integer-valued decimal is the integer (`5.00` -> `5`), an integer is its
  canonical form (`033` -> `33`: AIME's integer comparison), and text is compared in lower case.
* Qwen2.5-Math's `strip_string` (QwenLM/Qwen2.5-Math, evaluation/parser.py): a trailing `.` dropped, a final
  `\text{...}` / `\mbox{...}` after a value is a unit even without Hendrycks's leading space (`5\text{cm}`), any
  other `\text{X}` / `\mbox{X}` -> `X`, `bmatrix` -> `pmatrix`; and kvexp's own: the thin spaces `\,` and `\;`
  removed like spaces.

The answer is correct when the normalized strings are equal (for any reference). Not reproduced: the symbolic
step of PRM800K's grader (sympy simplification of the difference, which needs `pylatexenc`, and sympy, which
kvexp does not declare: it is installed only as torch's dependency) and Qwen's `math_equal` (numeric tolerance, sympy, `latex2sympy`). So equal values in
different forms beyond the rules above count as wrong: `\frac{\sqrt{2}}{2}` vs `\frac{1}{\sqrt{2}}`, `0.25` vs
`\frac{1}{4}`, `2x+2` vs `2(x+1)`, a reordered list. On MATH-500 that makes accuracy a little lower (a lower
bound) than PRM800K's or math-verify's; on AIME, whose answers are integers 0-999, it changes nothing.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

# `\boxed` or `\fbox`, not the start of a longer command name.
_BOX = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
# Plain replacements, in order (the sources are in the module docstring).
_REPLACEMENTS = (
    ("\n", ""),
    ("\\!", ""),
    ("\\\\", "\\"),
    ("tfrac", "frac"),
    ("dfrac", "frac"),
    ("\\left", ""),
    ("\\right", ""),
    ("^{\\circ}", ""),
    ("^\\circ", ""),
    ("\\$", ""),
    ("$", ""),
    ("bmatrix", "pmatrix"),
    ("{,}", ","),
    ("\\,", ""),
    ("\\;", ""),
    ("\\%", ""),
    ("%", ""),
)
_WHOLE_TEXT = re.compile(r"\\text\{([^{}]*)\}")
# A unit after a value: a final \text{...} / \mbox{...} that something precedes.
_TRAILING_UNIT = re.compile(r"^(.*\S)\s*\\(?:text|mbox)\{[^{}]*\}$")
_TEXT_ARGUMENT = re.compile(r"\\(?:text|mbox)\{([^{}]*)\}")
_SQRT_CHAR = re.compile(r"\\sqrt(\w)")
_FRAC_TWO_CHARS = re.compile(r"\\frac(\w)(\w)")
_FRAC_CHAR_THEN_BRACE = re.compile(r"\\frac(\w)\{")
_INTEGER_FRACTION = re.compile(r"(-?)(\d+)/(\d+)")
_THOUSANDS = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_INTEGER_DECIMAL = re.compile(r"(-?\d+)\.0+")
_INTEGER = re.compile(r"-?\d+")


def last_boxed(text: str) -> str | None:
    r"""The content of the last `\boxed{...}` / `\fbox{...}` of `text` (None: none, or never closed)."""
    boxes = list(_BOX.finditer(text))
    if not boxes:
        return None
    rest = text[boxes[-1].end() :]
    if not rest.startswith("{"):
        # `\boxed 5$`: the argument runs to the next `$` or line end.
        argument = re.split(r"[$\n]", rest, maxsplit=1)[0].strip()
        return argument if rest[:1].isspace() and argument else None
    depth = 0
    for i, char in enumerate(rest):
        depth += {"{": 1, "}": -1}.get(char, 0)
        if depth == 0:
            return rest[1:i]
    return None


def _unbrace(text: str) -> str:
    """`{...}` -> `...` when the first brace closes at the end (not `{1}{2}`)."""
    if not (text.startswith("{") and text.endswith("}")):
        return text
    depth = 0
    for i, char in enumerate(text):
        depth += {"{": 1, "}": -1}.get(char, 0)
        if depth == 0:
            return text[1:-1] if i == len(text) - 1 else text
    return text


def normalize_answer(answer: str) -> str:
    """An answer in the canonical form two equal answers share (the rules of the module docstring)."""
    text = answer.strip()
    whole = _WHOLE_TEXT.fullmatch(text)
    if whole:
        text = whole[1].strip()
    text = text.rstrip(".")
    for old, new in _REPLACEMENTS:
        text = text.replace(old, new)
    text = _TRAILING_UNIT.sub(r"\1", text)
    text = _TEXT_ARGUMENT.sub(r"\1", text)
    text = text.replace(" .", " 0.").replace("{.", "{0.")
    if text.startswith("."):
        text = "0" + text
    sides = text.split("=")
    if len(sides) == 2 and len(sides[0].strip()) <= 2:
        text = sides[1]
    text = _unbrace(text.replace(" ", ""))
    text = _SQRT_CHAR.sub(r"\\sqrt{\1}", text)
    text = _FRAC_TWO_CHARS.sub(r"\\frac{\1}{\2}", text)
    text = _FRAC_CHAR_THEN_BRACE.sub(r"\\frac{\1}{", text)
    if text == "0.5":
        text = "\\frac{1}{2}"
    if _INTEGER_FRACTION.fullmatch(text):
        text = _INTEGER_FRACTION.sub(r"\1\\frac{\2}{\3}", text)  # the sign outside: -1/2 == -\frac{1}{2}
    if _THOUSANDS.fullmatch(text):
        text = text.replace(",", "")
    if _INTEGER_DECIMAL.fullmatch(text):
        text = _INTEGER_DECIMAL.sub(r"\1", text)
    if _INTEGER.fullmatch(text):
        text = str(int(text))
    return text.lower()


def is_equiv(answer: str | None, reference: str) -> bool:
    """Whether a (boxed) answer equals the reference after normalization; None (no answer) never does."""
    return answer is not None and normalize_answer(answer) == normalize_answer(reference)


def grade(generation: str, references: Sequence[str]) -> dict[str, float]:
    r"""The `math` metric family: `accuracy` (the last boxed answer equals a reference) and `boxed` (the
    generation boxed an answer at all). A reference holding a `\boxed{}` (a solution given as the answer field)
    is graded on its last box, as Hendrycks's evaluation takes the answer from the solution."""
    answer = last_boxed(generation)
    correct = any(is_equiv(answer, last_boxed(r) or r) for r in references)
    return {"accuracy": float(correct), "boxed": float(answer is not None)}
