"""Every experiment preset composes, and so does every job of its sweep (a preset without a test fails CI)."""

import itertools
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from kvexp.config import normalize_overrides, validate

CONF = Path(__file__).resolve().parents[1] / "conf"
PRESETS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


def _compose(*overrides: str, hydra_config: bool = False):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(
            "config", overrides=normalize_overrides(list(overrides)), return_hydra_config=hydra_config
        )


def _choices(key: str, value: str) -> list[str]:
    """The values of one sweeper parameter: a comma list, or glob(*) over a config group's options."""
    value = str(value)
    if value.startswith("glob("):
        pattern, _, exclude = value[len("glob(") : -1].partition(",")
        excluded = set(exclude.split("=", 1)[1].strip("[] ").split(",")) if exclude else set()
        group = key.lstrip("+~")
        return sorted(
            p.stem for p in (CONF / group).glob(f"{pattern.strip()}.yaml") if p.stem not in excluded
        )
    return [v.strip() for v in value.split(",")]


def sweep_jobs(preset: str) -> list[list[str]]:
    """The override list of every job of a preset's sweep (the basic sweeper's cartesian product)."""
    cfg = _compose(f"experiment={preset}", hydra_config=True)
    params = cfg.hydra.sweeper.get("params")
    params = OmegaConf.to_container(params) if params is not None else {}  # a single-run preset: one job
    axes = [[f"{key}={v}" for v in _choices(key, value)] for key, value in params.items()]
    return [list(job) for job in itertools.product(*axes)]


@pytest.mark.parametrize("preset", PRESETS)
def test_every_job_of_every_preset_composes_and_validates(preset):
    jobs = sweep_jobs(preset)
    assert jobs, f"experiment={preset} has no job"
    for job in jobs:
        cfg = _compose(f"experiment={preset}", *job)
        validate(cfg)  # the same checks a run makes before loading a model


def test_h2o_grid_is_the_h2o_studys_grid():
    jobs = sweep_jobs("h2o_grid")
    assert len(jobs) == 7 * 4  # 5 heavy/recent splits + LRU + sliding window, x 4 budgets
    ratios = set()
    for job in jobs:
        cfg = _compose("experiment=h2o_grid", *job)
        if cfg.method.name == "h2o":
            ratios.add(cfg.method.recent_ratio)
    assert ratios == {0.5, 0.3, 0.7, 0.2, 0.8}
    assert {int(j[1].split("=")[1]) for j in jobs} == {256, 512, 1024, 2048}


HPARAMS_SEARCHES = sorted(p.stem for p in (CONF / "hparams_search").glob("*.yaml"))


@pytest.mark.parametrize("search", HPARAMS_SEARCHES)
def test_every_hparams_search_composes_with_the_optuna_sweeper(search):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    cfg = _compose(f"hparams_search={search}", hydra_config=True)
    assert cfg.hydra.sweeper._target_.endswith("OptunaSweeper")
    assert cfg.hydra.sweeper.direction in ("minimize", "maximize") and cfg.hydra.sweeper.params
    validate(cfg)


def test_snapkv_passkey_search_tunes_window_and_kernel_for_accuracy():
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    cfg = _compose("hparams_search=snapkv_passkey", hydra_config=True)
    assert (cfg.method.name, cfg.dataset.name, cfg.budget.keep_ratio) == ("snapkv", "passkey", 0.25)
    assert set(cfg.hydra.sweeper.params) == {"method.window_size", "method.kernel_size"}
    assert cfg.hydra.sweeper.direction == "maximize"  # pass-key accuracy


def test_compare_all_runs_every_method_but_the_baseline_at_the_kvcompress_studys_budgets():
    from kvexp.methods import METHODS

    jobs = sweep_jobs("compare_all")
    probing = {name for name, cls in METHODS.items() if cls.probes}  # they need a prompt: generation tasks
    trained = {"learned", "kvzap", "fastkvzip"}  # they need a trained checkpoint
    assert {job[0].split("=")[1] for job in jobs} == set(METHODS) - {"full", "block"} - trained - probing
    assert {job[1] for job in jobs} == {"budget.tokens=512", "budget.tokens=1024"}
    cfg = _compose("experiment=compare_all", *jobs[0])
    assert (cfg.dataset.name, cfg.dataset.split, cfg.eval.max_tokens, cfg.eval.chunk_size) == (
        "pg19",
        "test[1:2]",
        2000,
        1,
    )


def test_the_semantic_cluster_policies_are_the_merging_and_the_studys_evicting_form():
    merging = _compose("+policy=semantic_cluster_k32").method
    evicting = _compose("+policy=semantic_cluster_k32_evict").method
    assert (merging.name, merging.num_clusters, merging.fold) == ("semantic_cluster", 32, True)
    assert (evicting.name, evicting.num_clusters, evicting.fold) == ("semantic_cluster", 32, False)


def test_doc_types_scores_the_studys_qa_type_as_qa():
    jobs = [job for job in sweep_jobs("doc_types") if "dataset=longbench" in job]
    assert len(jobs) == 4  # one per policy
    cfg = _compose("experiment=doc_types", *jobs[0])
    assert (cfg.dataset.task, cfg.dataset.subset) == ("generation", "narrativeqa")
    validate(cfg)


@pytest.mark.parametrize(
    "preset,jobs,axes",
    [
        ("length_scaling", 35, {"eval.max_tokens": {"512", "1024", "2048", "4096", "8192"}}),
        ("length_scaling_quick", 6, {"eval.max_tokens": {"128", "256", "512"}}),
        (
            "cluster_count",
            24,
            {"method.num_clusters": {"8", "16", "32", "64"}, "budget.tokens": {"256", "512", "1024"}},
        ),
        ("cluster_count_quick", 8, {"method.num_clusters": {"4", "8"}, "method.fold": {"false", "true"}}),
        (
            "ruler_leaderboard",
            2 * 9 * 4,
            {
                "model": {"qwen3_8b", "llama3.1_8b_instruct"},
                "budget": {"keep_0.75", "keep_0.5", "keep_0.25", "keep_0.125"},
            },
        ),
        ("ruler_leaderboard_quick", 4 * 2, {"budget": {"keep_0.5", "keep_0.25"}}),
    ],
)
def test_the_studies_axes_presets_sweep_their_axes(preset, jobs, axes):
    swept = sweep_jobs(preset)
    assert len(swept) == jobs
    for key, values in axes.items():
        assert {o.split("=", 1)[1] for job in swept for o in job if o.startswith(f"{key}=")} == values


def test_the_ruler_leaderboard_is_kvpress_protocol():
    """RULER 4k, 500 samples per task, query-agnostic, prefill-only compression; the quick one on SmolLM2 at 1k/2k."""
    cfg = _compose("experiment=ruler_leaderboard", *sweep_jobs("ruler_leaderboard")[0])
    assert (
        cfg.dataset.name == "ruler" and list(cfg.dataset.lengths) == [4096] and len(cfg.dataset.tasks) == 13
    )
    assert cfg.dataset.samples_per_task == 500 and cfg.eval.protocol == "query_agnostic"
    assert cfg.engine.when == "prefill" and cfg.hardware.device == "cuda"
    quick = _compose("experiment=ruler_leaderboard_quick", *sweep_jobs("ruler_leaderboard_quick")[0])
    assert quick.model.name == "smollm2_135m" and list(quick.dataset.lengths) == [1024, 2048]
    assert quick.engine.when == "prefill" and quick.hardware.device == "cpu"
