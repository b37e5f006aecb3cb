"""The README and the docs say only what is true: every code block of README.md runs, every command line in the
README and in docs/*.md composes against conf/ and passes the run's validation, and every link or reference to a
docs file points at a file and a section that exist."""

import itertools
import json
import os
import re
import shlex
from collections import OrderedDict
from importlib.util import find_spec
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Glob
from omegaconf import OmegaConf

from kvexp.config import normalize_overrides, validate

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
MAX_README_LINES = 300
# The planning documents the code once cited, which are not in the repository: their names with ".md" or "§".
PLANNING_DOCS = re.compile(
    r"\b(" + "|".join(n.upper() for n in ("design", "methods", "anchors", "ecosystem")) + r")(\.md\b|\s?§)"
)
DOC_REFERENCE = re.compile(r"docs/([\w-]+\.md)(#[\w-]+)?")
MARKDOWN_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


# -- reading markdown ------------------------------------------------------------------------------------------
def fenced_blocks(path: Path) -> list[tuple[str, int, str]]:
    """(language, first line number, text) of every fenced code block of a markdown file."""
    blocks, lang, start, body = [], None, 0, []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.startswith("```"):
            if lang is None:
                lang, start, body = line[3:].strip(), number, []
            else:
                blocks.append((lang, start, "\n".join(body)))
                lang = None
        elif lang is not None:
            body.append(line)
    assert lang is None, f"{path.name}: unclosed code block at line {start}"
    return blocks


def command_lines(text: str) -> list[tuple[int, list[str]]]:
    """The commands of a bash block as (line offset, argv): continuations joined, comments dropped."""
    commands, pending, first = [], "", 0
    for offset, line in enumerate(text.splitlines()):
        first = offset if not pending else first
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        if argv := shlex.split(pending + line, comments=True):
            commands.append((first, argv))
        pending = ""
    return commands


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """The anchors of a markdown file's headings (outside code blocks)."""
    found, fenced = set(), False
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and (match := re.match(r"#{1,6} (.+)", line)):
            found.add(slug(match[1]))
    return found


def outside_code(path: Path) -> str:
    """A markdown file's text without its fenced code blocks."""
    kept, fenced = [], False
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced:
            kept.append(line)
    return "\n".join(kept)


# -- checking a `python -m kvexp ...` line ----------------------------------------------------------------------
def _compose(overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=overrides, return_hydra_config=True)


def _values(override) -> list[str]:
    """The values a (possibly sweep) override takes, as Hydra's basic sweeper expands them."""
    if isinstance(override.value(), Glob):
        group = override.key_or_group.lstrip("+~")
        return override.value().filter(sorted(p.stem for p in (CONF / group).glob("*.yaml")))
    if override.is_sweep_override():
        return list(override.sweep_string_iterator())
    return [override.get_value_element_as_str()]


def _placeholder(key: str, value: str, line: list[str], tmp_path: Path) -> str:
    """A relative file or folder a command names as data (`dataset.path=my.txt`) is the user's: stand one up
    under tmp_path so that validation, which checks that it exists, can run."""
    if not (key.endswith(".path") or key.endswith("_file")) or not value or Path(value).is_absolute():
        return value
    if "${" in value or (ROOT / value).exists():
        return value
    target = tmp_path / value
    dataset = next((a.split("=", 1)[1] for a in line if a.startswith("dataset=")), "")
    if value.endswith("/"):
        target.mkdir(parents=True, exist_ok=True)
        subset = next((a.split("=", 1)[1] for a in line if a.startswith("dataset.subset=")), "narrativeqa")
        row = {"input": "q", "context": "c", "answers": ["a"], "length": 1, "dataset": subset, "_id": "0"}
        (target / f"{subset}.jsonl").write_text(json.dumps(row) + "\n")
    else:
        target.parent.mkdir(parents=True, exist_ok=True)
        if dataset == "qa_jsonl":
            target.write_text(json.dumps({"context": "c", "question": "q", "answer": "a"}) + "\n")
        else:
            target.write_text("What is machine learning?\nIt was the best of times.\n")
    return str(target)


def check_kvexp_command(argv: list[str], tmp_path: Path) -> None:
    """Compose a `python -m kvexp ...` command's config (each job of a sweep: every value of the command's own
    sweep axes, the first of a preset's) and run the validation a run makes before loading a model."""
    args = argv[3:]
    multirun = bool({"-m", "--multirun"} & set(args))
    args = [a for a in args if a not in ("-m", "--multirun")]
    assert all(not a.startswith("-") for a in args), f"unknown option in {shlex.join(argv)}"
    parser = OverridesParser.create()
    parsed = parser.parse_overrides(normalize_overrides(args))
    fixed = [o.input_line for o in parsed if not o.is_sweep_override() and not isinstance(o.value(), Glob)]
    fixed = [
        f"{o.split('=', 1)[0]}={_placeholder(o.split('=', 1)[0], o.split('=', 1)[1], args, tmp_path)}"
        if "=" in o
        else o
        for o in fixed
    ]
    base = _compose(fixed)
    preset_mode = str(base.hydra.get("mode") or "")
    sweeps = [o for o in parsed if o.is_sweep_override() or isinstance(o.value(), Glob)]
    assert not sweeps or multirun or preset_mode.endswith("MULTIRUN"), (
        f"{shlex.join(argv)}: a sweep needs -m (Hydra refuses comma lists in a single run)"
    )

    # Axes as Hydra's basic sweeper builds them: the preset's params first, the command line's win per key.
    axes: OrderedDict[str, list[str]] = OrderedDict()
    params = base.hydra.sweeper.get("params") if multirun or preset_mode.endswith("MULTIRUN") else None
    for key, value in (OmegaConf.to_container(params) if params else {}).items():
        values = _values(parser.parse_override(f"{key}={value}"))
        axes[key] = values[:1]  # the presets' own sweeps are proven by tests/test_experiments.py
    for override in parsed:
        key = override.get_key_element()
        if key in axes:
            del axes[key]
        if override.is_sweep_override() or isinstance(override.value(), Glob):
            axes[key] = _values(override)
    assert all(axes.values()), f"{shlex.join(argv)}: an empty sweep axis {axes}"
    firsts = [values[0] for values in axes.values()]
    jobs = {tuple(firsts)}
    for i, values in enumerate(axes.values()):
        jobs |= {tuple(firsts[:i] + [v] + firsts[i + 1 :]) for v in values}
    keys = list(axes)
    for job in sorted(jobs):
        cfg = _compose(fixed + [f"{k}={v}" for k, v in zip(keys, job, strict=True)])
        try:
            validate(cfg)
        except ValueError as err:
            if "KVEXP_DATA_DIR" in str(err) and not os.environ.get("KVEXP_DATA_DIR"):
                pytest.skip(f"needs the local evaluation data (set KVEXP_DATA_DIR): {err}")
            raise


def makefile_targets() -> set[str]:
    return set(re.findall(r"^([A-Za-z][\w-]*):", (ROOT / "Makefile").read_text(), flags=re.M))


def check_command(argv: list[str], tmp_path: Path) -> None:
    """One command of a bash block: `make <target>`, `python -m kvexp ...` or `python -m kvexp.<module> ...`."""
    while argv and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", argv[0]):  # VAR=value prefixes
        argv = argv[1:]
    if argv[0] == "make":
        targets = [a for a in argv[1:] if not a.startswith("-") and "=" not in a]
        assert targets and set(targets) <= makefile_targets(), f"{shlex.join(argv)}: not a Makefile target"
    elif argv[:3] == ["python", "-m", "kvexp"]:
        check_kvexp_command(argv, tmp_path)
    elif argv[:2] == ["python", "-m"] and argv[2].startswith("kvexp."):
        assert find_spec(argv[2]) is not None, f"{shlex.join(argv)}: no module {argv[2]}"
    else:
        pytest.fail(f"{shlex.join(argv)}: tests/test_readme.py does not know how to check this command")


def commands_of(path: Path) -> list[tuple[str, list[str]]]:
    """(test id, argv) of every command in a file's bash blocks."""
    found = []
    for lang, start, text in fenced_blocks(path):
        if lang == "bash":
            found += [(f"{path.name}:{start + 1 + i}", argv) for i, argv in command_lines(text)]
    return found


README_COMMANDS = commands_of(README)
DOC_COMMANDS = [command for doc in DOCS for command in commands_of(doc)]


# -- README -----------------------------------------------------------------------------------------------------
def test_readme_is_short():
    lines = README.read_text().splitlines()
    assert len(lines) <= MAX_README_LINES, f"README.md has {len(lines)} lines; keep it to {MAX_README_LINES}"


def test_readme_blocks_are_ones_this_test_runs():
    languages = [lang for lang, _, _ in fenced_blocks(README)]
    assert set(languages) <= {"bash", "python", "text"}, languages
    assert languages.count("text") == 1  # the make run output
    assert README_COMMANDS


@pytest.mark.parametrize("argv", [a for _, a in README_COMMANDS], ids=[i for i, _ in README_COMMANDS])
def test_readme_command(argv, tmp_path):
    check_command(argv, tmp_path)


@pytest.mark.parametrize("argv", [a for _, a in DOC_COMMANDS], ids=[i for i, _ in DOC_COMMANDS])
def test_docs_command(argv, tmp_path):
    check_command(argv, tmp_path)


@pytest.mark.slow
def test_readme_python_blocks_run():
    blocks = [(start, text) for lang, start, text in fenced_blocks(README) if lang == "python"]
    assert blocks
    for start, text in blocks:
        exec(compile(text, f"README.md:{start}", "exec"), {"__name__": "readme"})


def test_make_run_output_shows_rows_the_run_prints():
    """The quick start's table: the default method's column and rows `python -m kvexp` really prints."""
    from kvexp.report import format_table

    (text,) = [text for lang, _, text in fenced_blocks(README) if lang == "text"]
    header, *rows = text.splitlines()
    assert header.split() == ["full", "streaming_llm", "change"]
    assert _compose([]).method.name == "streaming_llm"
    summary = {
        "method": {"name": "streaming_llm"},
        "task": "perplexity",
        "metrics_before": {"perplexity": 15.0, "accuracy": 0.5, "tokens": 2047, "documents": 1},
        "metrics_after": {"perplexity": 28.0, "accuracy": 0.4, "tokens": 2047, "documents": 1},
        "timing": {"ttft_s": 0.1, "tpot_ms": 60.0, "throughput_tok_s": 16.0, "compress_share": 0.1},
        "timing_full": {"ttft_s": 0.1, "tpot_ms": 80.0, "throughput_tok_s": 12.0},
        "kv_cache": {
            "tokens_seen": 2047,
            "tokens_kept": 256,
            "compression_ratio": 0.875,
            "bytes_kept": 1,
            "bytes_full": 8,
        },
    }
    printed = {re.split(r"\s{2,}", line.strip())[0] for line in format_table(summary).splitlines()}
    for row in rows:
        label = re.split(r"\s{2,}", row.strip())[0]
        assert label in printed, f"README's make run output shows {label!r}, which the run does not print"


def test_readme_methods_table_lists_every_method():
    from kvexp.methods import list_methods

    listed = re.findall(r"^\| \[`(\w+)`\]\(docs/methods\.md#\1\)", README.read_text(), flags=re.M)
    assert sorted(listed) == sorted(list_methods())


def test_readme_links_only_to_docs_that_exist():
    links = MARKDOWN_LINK.findall(outside_code(README))
    assert links
    for link in links:
        target, _, anchor = link.partition("#")
        assert re.fullmatch(r"docs/[\w-]+\.md", target), f"README.md links to {link}, not to a docs file"
        assert (ROOT / target).is_file(), f"README.md links to {target}, which does not exist"
        assert not anchor or anchor in anchors(ROOT / target), f"README.md links to {link}: no such section"


# -- docs and the references to them ----------------------------------------------------------------------------
@pytest.mark.parametrize("doc", DOCS, ids=[d.name for d in DOCS])
def test_doc_links_resolve(doc):
    for link in MARKDOWN_LINK.findall(outside_code(doc)):
        if re.match(r"[a-z]+://", link):
            continue
        target, _, anchor = link.partition("#")
        path = doc if not target else (doc.parent / target).resolve()
        assert path.exists(), f"{doc.name} links to {link}: {path} does not exist"
        if anchor:
            assert anchor in anchors(path), f"{doc.name} links to {link}: no such section"


def _text_files():
    for folder in ("kvexp", "tests", "conf", "notebooks"):
        for path in sorted((ROOT / folder).rglob("*")):
            if (
                path.is_file()
                and path.suffix in (".py", ".yaml", ".ipynb", ".md", ".txt")
                and path != Path(__file__)
            ):
                yield path


def test_code_refers_to_docs_sections_that_exist():
    found = 0
    for path in _text_files():
        for name, anchor in DOC_REFERENCE.findall(path.read_text(errors="ignore")):
            target = ROOT / "docs" / name
            assert target.is_file(), f"{path.relative_to(ROOT)} cites docs/{name}, which does not exist"
            assert not anchor or anchor[1:] in anchors(target), (
                f"{path.relative_to(ROOT)} cites docs/{name}{anchor}: no such section"
            )
            found += 1
    assert found


def test_no_citation_of_planning_documents_outside_the_repository():
    for path in itertools.chain(_text_files(), [README], DOCS):
        for number, line in enumerate(path.read_text(errors="ignore").splitlines(), 1):
            assert not PLANNING_DOCS.search(line), f"{path.relative_to(ROOT)}:{number} cites {line.strip()!r}"


def test_studies_are_named_by_their_subject():
    for path in itertools.chain((p for p in _text_files() if "tests" not in p.parts), [README], DOCS):
        text = path.read_text(errors="ignore")
        assert not re.search(r"seed ?00[0-4]", text, flags=re.I), (
            f"{path.relative_to(ROOT)} names a study by number"
        )
