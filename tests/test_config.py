"""Every config option composes; bad values fail before any model loads, naming the option."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

import kvexp.config  # noqa: F401  (schemas)
from kvexp.config import normalize_overrides, validate
from kvexp.methods import METHODS, build_method
from kvexp.tasks.base import method_from_config

CONF = Path(__file__).resolve().parents[1] / "conf"


def _compose(*overrides: str):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=normalize_overrides(list(overrides)))


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize(
    "group,option",
    [(g, o) for g in ["model", "method", "dataset", "budget", "hardware", "logger"] for o in _options(g)],
)
def test_every_group_option_composes(group, option, tmp_path):
    extra = [f"dataset.path={CONF.parent / 'pyproject.toml'}"] if option == "text_file" else []
    if option == "qa_jsonl":
        (tmp_path / "qa.jsonl").write_text('{"context": "c", "question": "q", "answer": "a"}\n')
        extra = [f"dataset.path={tmp_path / 'qa.jsonl'}"]
    if (
        option == "wikitext103"
    ):  # nothing embedded: a local copy of its raw text (here the WikiText-2 file's format)
        from kvexp.data import WIKITEXT2

        extra = [f"dataset.path={WIKITEXT2.path}"]
    extra += ["method=full"] if option == "full" else []
    if group == "method" and option != "full":
        method = build_method(option)
        # probes and prompt blocks need a prompt (a generation task); FINCH the query-aware protocol
        extra += ["dataset=passkey"] if method.probes or method.prompt_block is not None else []
        extra += ["eval.protocol=query_aware"] if method.needs_question else []
    extra += ["eval.max_tokens=1024"] if option == "gpt2" else []  # its 1,024 learned positions
    cfg = _compose(f"{group}={option}", *extra)
    if group in ("model", "method", "dataset", "hardware"):
        assert cfg[group].name == option
    if group == "logger":
        assert option.startswith(cfg.logger.name)
    if group != "hardware" and not (group == "logger" and option == "wandb"):
        validate(cfg)


@pytest.mark.parametrize("option", _options("experiment"))
def test_every_experiment_preset_composes_and_validates(option):
    cfg = _compose(f"experiment={option}")
    assert option.split("_")[0] in " ".join(cfg.tags) or cfg.tags
    validate(cfg)


def test_every_method_has_a_config_whose_fields_match_its_dataclass():
    from dataclasses import fields

    assert set(_options("method")) == set(METHODS)
    for name, cls in METHODS.items():
        node = OmegaConf.load(CONF / "method" / f"{name}.yaml")
        assert set(node) - {"name"} == {f.name for f in fields(cls) if f.init}, name
        method = method_from_config(node)
        assert type(method) is cls


def test_default_config_is_the_embedded_experiment():
    cfg = _compose()
    assert (cfg.model.name, cfg.method.name, cfg.budget.tokens, cfg.dataset.name) == (
        "smollm2_135m",
        "streaming_llm",
        256,
        "wikitext2",
    )
    validate(cfg)


def test_numeric_budget_choices_are_quoted_for_hydra():
    assert normalize_overrides(["budget=256", "budget=64,128", "method=knorm", "budget.tokens=5"]) == [
        "budget='256'",
        "budget='64','128'",
        "method=knorm",
        "budget.tokens=5",
    ]
    assert _compose("budget=512").budget.tokens == 512
    assert _compose("budget=keep_0.5").budget.keep_ratio == 0.5


def test_a_misspelt_method_key_names_the_methods_keys():
    """Hydra alone refuses `method.sink_token=4` advising `+method.sink_token` (which fails again); kvexp names the
    method's parameters instead, and real keys, nested ones and sweeps still work."""
    assert normalize_overrides(["method.sink_token=4", "+method.x=1", "method=h2o"]) == [
        "++method.sink_token=4",
        "+method.x=1",
        "method=h2o",
    ]
    cfg = _compose(*normalize_overrides(["method.sink_token=4"]))
    with pytest.raises(
        ValueError, match=r"no parameter\(s\) \['sink_token'\]; its parameters are: \['sink_tokens'\]"
    ):
        validate(cfg)
    assert _compose(*normalize_overrides(["method.sink_tokens=8"])).method.sink_tokens == 8
    cfg = _compose(*normalize_overrides(["method=think", "method.evict.window_size=16"]))
    assert cfg.method.evict.window_size == 16
    schedule = normalize_overrides(["budget.allocation=pyramid", "budget.allocation_params.beta=0"])
    with pytest.raises(
        ValueError, match=r"budget.allocation=pyramid, budget.allocation_params: pyramid: beta must"
    ):
        validate(_compose(*schedule))
    with pytest.raises(ValueError, match=r"allocation 'pyramid' has no parameter\(s\) \['gamma'\]"):
        validate(
            _compose(*normalize_overrides(["budget.allocation=pyramid", "budget.allocation_params.gamma=2"]))
        )


def test_a_lone_keep_ratio_replaces_the_default_token_budget():
    assert normalize_overrides(["budget.keep_ratio=0.5"]) == ["budget.keep_ratio=0.5", "budget.tokens=null"]
    assert normalize_overrides(["budget.keep_ratio=0.5", "budget.tokens=8"])[-1] == "budget.tokens=8"
    budget = _compose("budget.keep_ratio=0.5").budget
    assert (budget.tokens, budget.keep_ratio) == (None, 0.5)


@pytest.mark.parametrize(
    "overrides,match",
    [
        (["budget.tokens=0"], "budget.tokens"),
        (["budget.tokens=-3"], "budget.tokens"),
        (["budget=keep_0.5", "budget.keep_ratio=1.5"], r"budget.keep_ratio"),
        (["budget=keep_0.5", "budget.keep_ratio=0"], r"budget.keep_ratio"),
        (["budget.tokens=64", "budget.keep_ratio=0.5"], "either budget.tokens or budget.keep_ratio"),
        (["budget=256", "budget.keep_ratio=0.5"], "either budget.tokens or budget.keep_ratio"),
        (["method.name=nope"], r"method must be one of: .*full, .*streaming_llm"),
        (["+method.bogus=1"], "has no parameter"),
        (["method.sink_tokens=300"], "sink_tokens"),
        # types against the method's own annotations: neither acting as something else nor crashing later
        (["method.sink_tokens=2.5"], r"method.sink_tokens=2.5 must be an integer \(method 'streaming_llm'\)"),
        (["method=h2o", "method.recent_ratio=abc"], r"method.recent_ratio='abc' must be a number"),
        (["method=h2o", "method.recent_size=1.5"], r"method.recent_size=1.5 must be an integer or null"),
        (["method=random", "method.seed=abc"], r"method.seed='abc' must be an integer"),
        (
            ["method=dms", "method.threshold=-.inf"],
            r"'-.inf' must be a number .*written inf / -inf on the command",
        ),
        (["method=knorm", "method.keep_ratio=2.0"], "method.keep_ratio"),
        (["dataset=text_file"], "dataset.path"),
        (["dataset=text_file", "dataset.path=/no/such/file.txt"], "dataset.path"),
        (["engine.positions=shifted"], "engine.positions"),
        (["engine.when=sometimes"], "engine.when"),
        (
            ["engine.compile_mode=fast"],
            r"engine.compile_mode='fast' is not allowed; choose one of: default, ",
        ),
        (["eval.chunk_size=0"], "eval.chunk_size"),
        (
            ["hardware.num_threads=0"],
            r"hardware.num_threads must be null \(torch's default\) or an integer >= 1, got 0",
        ),
        # perplexity past the model's positions: refused before the weights load, naming the allowed maximum
        (
            ["eval.max_tokens=9000"],
            r"eval.max_tokens=9000 .*model.max_context=8192 .*eval.max_tokens <= 8193",
        ),
        (["model=tiny_gpt2", "eval.max_tokens=2300"], r"eval.max_tokens <= 2049"),
        (["model=tiny_gpt2", "eval.beyond_context=true"], r"eval.beyond_context=true needs a RoPE model"),
        (["budget=full"], "needs a budget"),
        (["logger=wandb", "logger.mode=sometimes"], "logger.mode"),
        (["model.source=ftp"], "model.source"),
        (["dataset.task=translation"], "dataset.task"),
        (["dataset.task=generation"], "not a generation dataset"),
        (["dataset=passkey", "dataset.task=perplexity"], "not a perplexity dataset"),
        (
            ["dataset=passkey", "model=tiny_llama"],
            r"dataset.lengths=\[1024, 2048, 4096, 8192\] exceeds model.max_context=2048",
        ),
        (["dataset=passkey", "dataset.depths=[0.5,2.0]"], "dataset.depths"),
        (["dataset=needle", "dataset.variant=multi"], "dataset.variant"),
        (["dataset=needle", "dataset.phrasing=rhyme"], "dataset.phrasing"),
        (["dataset=passkey", "dataset.max_new_tokens=0"], "dataset.max_new_tokens"),
        (["dataset=qa_jsonl", "dataset.path=/no/such/qa.jsonl"], "dataset.path"),
        (["dataset=pg19", "dataset.path=/no/such/books.jsonl"], "dataset.path"),
        (["dataset=wikitext2", "dataset.split=train"], r"no data found.*dataset\.split=train"),
        (["eval.protocol=query_sometimes"], "eval.protocol"),
        (["eval.max_new_tokens=0"], "eval.max_new_tokens"),
        (["eval.temperature=0"], "eval.temperature"),
        (["eval.top_p=1.5"], "eval.top_p"),
        (["eval.prefill_chunk_size=0"], "eval.prefill_chunk_size"),
        # sized by the model: checked against its config (a GGUF header, a tiny model's yaml) before the weights
        (
            ["model=tiny_llama", "method=knorm", "method.skip_layers=[7]"],
            r"method.skip_layers \[7\] are not layers of this model \(2 layers",
        ),
        (["model=tiny_llama", "method=fix_size_l2", "method.skip_layers=[0,-3]"], r"skip_layers \[-3\]"),
        (["model=tiny_llama", "method=d2o", "method.skip_layers=[2]"], r"skip_layers \[2\]"),
        (
            ["model=tiny_llama", "method=think", "method.evict={name:knorm,skip_layers:[5]}"],
            r"method.evict: .*skip_layers \[5\]",
        ),
        (
            ["model=tiny_llama", "budget.per_head=[[32,32,32],[32,32,32]]"],
            r"budget.per_head is 2 rows of \[3\] entries; model tiny_llama has 2 layers and 2 KV heads",
        ),
        (["model=tiny_llama", "budget.per_layer=[8,8,8]"], r"budget.per_layer has 3 entries; .*2 layers"),
        (
            ["budget.per_layer=[8,8]"],
            r"budget.per_layer has 2 entries; model smollm2_135m has 30 layers and 3",
        ),
        (
            ["model=tiny_llama", "model.path=/some/model"],
            r"model.path / model.gguf_file: .*tiny random model",
        ),
        (["train=distill", "train.learning_rate=abc"], r"train.learning_rate='abc' must be a number"),
        (["train=distill", "train.lora.rank=1.5"], r"train.lora.rank=1.5 must be an integer"),
    ],
)
def test_bad_values_fail_early_naming_the_option(overrides, match):
    with pytest.raises(ValueError, match=match):
        validate(_compose(*overrides))


@pytest.mark.parametrize(
    "overrides,samples",
    [
        ([], 1),  # perplexity datasets: one document unless asked
        (["dataset=passkey"], None),  # every generated sample
        (["dataset=cnn_dailymail"], 100),  # the SimCalKV study's "test[:100]"
        (["dataset=cnn_dailymail", "eval.max_samples=3"], 3),
    ],
)
def test_eval_max_samples_defaults_to_the_datasets(overrides, samples):
    assert _compose(*overrides).eval.max_samples == samples


def test_generation_datasets_get_their_schema_and_eval_options():
    cfg = _compose("dataset=needle", "dataset.lengths=[1024]", "eval.protocol=query_aware")
    assert (cfg.dataset.task, cfg.dataset.variant, cfg.dataset.lengths, cfg.dataset.report_by) == (
        "generation",
        "single",
        [1024],
        ["length", "depth"],
    )
    assert (cfg.eval.protocol, cfg.eval.chat_template, cfg.eval.do_sample) == ("query_aware", None, False)
    validate(cfg)


@pytest.mark.parametrize("override", ["model=no_such_model", "method=no_such_method", "budget=17"])
def test_unknown_group_options_fail_at_compose_with_the_choices(override):
    from hydra.errors import MissingConfigException

    with pytest.raises(MissingConfigException, match="Available options"):
        _compose(override)


def test_schema_rejects_wrong_types():
    from hydra.errors import ConfigCompositionException
    from omegaconf.errors import ValidationError

    with pytest.raises((ValidationError, ConfigCompositionException)):
        _compose("budget.tokens=many")
    with pytest.raises((ValidationError, ConfigCompositionException)):
        _compose("dataset=passkey", "dataset.lengths=[long]")


def test_bad_files_fail_before_the_model_loads_naming_the_file(tmp_path):
    """Bad JSONL (file and line), a binary 'text' file, corrupt or truncated checkpoints: one clear ValueError
    from validation, never a raw UnicodeDecodeError / JSONDecodeError / UnpicklingError after the load."""
    import torch
    from safetensors.torch import save_file

    jsonl = tmp_path / "qa.jsonl"
    jsonl.write_text('{"context": "c", "question": "q", "answer": "a"}\n{"context": "c", "quest\n')
    with pytest.raises(ValueError, match=r"qa.jsonl, line 2: not valid JSON"):
        validate(_compose("dataset=qa_jsonl", f"dataset.path={jsonl}"))
    binary = tmp_path / "doc.txt"
    binary.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ValueError, match=r"doc.txt is not UTF-8 text \(byte 128"):
        validate(_compose("dataset=text_file", f"dataset.path={binary}"))
    weights = tmp_path / "model.safetensors"
    save_file({"w": torch.zeros(64, 64)}, str(weights))
    validate(_compose(f"model.checkpoint={weights}"))  # a whole file passes
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated
    with pytest.raises(
        ValueError, match=r"model.checkpoint: .*model.safetensors is not a readable safetensors file"
    ):
        validate(_compose(f"model.checkpoint={weights}"))
    bias = tmp_path / "compressor.safetensors"
    bias.write_bytes(b"not safetensors at all")
    with pytest.raises(
        ValueError, match=r"method.checkpoint: .*compressor.safetensors is not a readable safetensors"
    ):
        validate(_compose("method=adaptive_kmeans", f"method.checkpoint={bias}"))
    scorer = tmp_path / "learned_scorer.pt"
    scorer.write_bytes(b"\x80\x02corrupt pickle")
    with pytest.raises(ValueError, match=r"method.checkpoint=.*learned_scorer.pt' cannot be read") as failure:
        validate(_compose("method=learned", f"method.checkpoint={scorer}"))
    assert "weights_only" not in str(failure.value)  # torch's advice to load unsafely is not passed on


def test_empty_files_and_empty_splits_fail_before_the_model_loads_naming_the_option(tmp_path):
    """An empty JSONL, an empty text file and a split selecting no rows used to fail after the model loaded, as
    "no samples" or "no document has the 2 tokens perplexity needs"."""
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(
        ValueError, match=r"dataset.path='.*empty.jsonl' holds no records \(dataset qa_jsonl\)"
    ):
        validate(_compose("dataset=qa_jsonl", f"dataset.path={empty}"))
    with pytest.raises(
        ValueError, match=r"dataset.path='.*empty.jsonl' is empty: dataset pg19 has no documents"
    ):
        validate(_compose("dataset=pg19", f"dataset.path={empty}"))
    blank = tmp_path / "blank.txt"
    blank.write_text("  \n")
    with pytest.raises(ValueError, match=r"dataset.path='.*blank.txt' is empty"):
        validate(_compose("dataset=text_file", f"dataset.path={blank}"))
    with pytest.raises(ValueError, match=r"dataset.split='test\[50%:10%\]' selects no rows"):
        validate(_compose("dataset.split='test[50%:10%]'"))
    one = tmp_path / "one.jsonl"
    one.write_text('{"context": "c", "question": "q", "answers": ["a"]}\n')
    with pytest.raises(
        ValueError, match=r"dataset.split='test\[1:\]' selects none of the 1 records of dataset.path"
    ):
        validate(_compose("dataset=qa_jsonl", f"dataset.path={one}", "dataset.split='test[1:]'"))
    validate(_compose("dataset=qa_jsonl", f"dataset.path={one}", "dataset.split='test[:1]'"))


def test_help_is_quick_and_lists_only_choices():
    """`python -m kvexp --help` imports neither torch nor transformers (the config code needs neither), and the
    dataset schemas (`base_<kind>`) are no choices of the dataset group."""
    import subprocess
    import sys

    probe = "import sys, kvexp, kvexp.config, kvexp.__main__; print(sorted({'torch', 'transformers'} & set(sys.modules)))"
    assert (
        subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
        == "[]\n"
    )
    out = subprocess.run(
        [sys.executable, "-m", "kvexp", "--help"], capture_output=True, text=True, check=True, cwd=CONF.parent
    ).stdout
    (datasets,) = [line for line in out.splitlines() if line.startswith("dataset: ")]
    assert "passkey" in datasets and "wikitext2" in datasets and "base_" not in datasets
