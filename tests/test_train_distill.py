"""train=distill: the differentiable engine mode, the distillation loss, checkpoints, resume, option checks, and the
end-to-end train_or_eval run on a tiny random model."""

import csv
import json
import random
from pathlib import Path

import pytest
import torch

from kvexp.app import train_or_eval
from kvexp.config import validate
from kvexp.methods import METHODS, build_method, make_cache
from kvexp.methods.storage import StorageMethod
from kvexp.models import load_model
from kvexp.tasks.base import method_from_config
from kvexp.tasks.metrics import lower_is_better
from kvexp.tasks.perplexity import evaluate_perplexity
from kvexp.train import distill
from kvexp.train.data import check_disjoint, load_training_texts, token_windows
from kvexp.train.evaluation import OBJECTIVE, TrainingEvaluator
from tests.conftest import load
from tests.test_config import _compose
from tests.test_engine import SMALL_PARAMS

WORDS = [
    "the",
    "a",
    "cat",
    "dog",
    "sat",
    "ran",
    "on",
    "under",
    "over",
    "mat",
    "tree",
    "house",
    "red",
    "blue",
    "big",
    "small",
    "quickly",
    "slowly",
    "and",
    "then",
]
EVAL_TEXT = "It was the best of times, it was the worst of times, it was the age of wisdom. " * 6


def _text(seed: int, words: int = 200) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(words))


@pytest.fixture
def files(tmp_path):
    books = tmp_path / "books.jsonl"
    books.write_text("".join(json.dumps({"file": f"b{i}", "text": _text(i)}) + "\n" for i in range(3)))
    doc = tmp_path / "doc.txt"
    doc.write_text(EVAL_TEXT)
    return books, doc


def _cfg(files, *extra, method="adaptive_kmeans", trainable="compressor"):
    books, doc = files
    return _compose(
        "model=tiny_llama", f"method={method}", "budget.tokens=24", "dataset=text_file", f"dataset.path={doc}",
        "eval.max_tokens=120", "eval.chunk_size=8", "cache_dir=null", "train=distill",
        f"train.trainable={trainable}", f"train.data.path={books}", "train.max_length=97", "train.chunk_size=8",
        "train.max_steps=3", "train.warmup_steps=0", "train.learning_rate=0.05", *extra,
    )  # fmt: skip


def _distiller(cfg):
    model, _ = load_model(cfg.model, cfg.hardware)
    method = method_from_config(cfg.method)
    return distill.Distiller(cfg, model, method, 24, model.device)


# -- the engine's differentiable mode ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["adaptive_kmeans", "semantic_cluster", "h2o", "cam"])
def test_differentiable_mode_gives_the_default_forward_values(name):
    model, _ = load("tiny_llama")
    ids = torch.randint(4, 200, (2, 96), generator=torch.Generator().manual_seed(0))
    logits = []
    for differentiable in (False, True):
        cache = make_cache(model, name, 24, differentiable=differentiable)
        with torch.no_grad():
            logits.append(
                torch.cat(
                    [model(ids[:, s : s + 8], past_key_values=cache).logits for s in range(0, 96, 8)], 1
                )
            )
        assert cache.stats()["compressions"] > 0
    assert torch.equal(logits[0], logits[1])


@pytest.mark.parametrize("name", ["adaptive_kmeans", "semantic_cluster"])
def test_gradients_reach_lora_and_the_compressor_through_merged_entries(name):
    from peft import LoraConfig, get_peft_model

    base, _ = load_model(_compose("model=tiny_llama").model, {"device": "cpu"})
    peft = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["k_proj", "v_proj"]))
    model = peft.get_base_model()
    method = build_method(name)
    merged_bias = method.trainable_parameters(model)["merged_bias"]
    ids = torch.randint(4, 200, (1, 80), generator=torch.Generator().manual_seed(1))
    logits, compressed = distill.student_forward(model, method, 24, ids, 8, {})
    assert compressed.any() and not compressed.all()
    logits[:, compressed].logsumexp(-1).sum().backward()  # only positions after a compression
    assert merged_bias.grad is not None and bool((merged_bias.grad != 0).all())
    lora_b = [
        p.grad for n, p in peft.named_parameters() if "lora_B" in n
    ]  # lora_A: 0 while B is at its init 0
    assert lora_b and all(g is not None and g.abs().sum() > 0 for g in lora_b)


DENSE_METHODS = sorted(
    n for n, cls in METHODS.items() if n != "full" and not issubclass(cls, StorageMethod) and not cls.probes
)


@pytest.mark.parametrize("name", DENSE_METHODS)
def test_every_dense_method_backpropagates_to_lora_through_its_compressions(name):
    from peft import LoraConfig, get_peft_model

    base, _ = load_model(_compose("model=tiny_llama").model, {"device": "cpu"})
    peft = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["k_proj", "v_proj"]))
    method = build_method(name, **SMALL_PARAMS.get(name, {}))
    ids = torch.randint(4, 200, (1, 64), generator=torch.Generator().manual_seed(2))
    logits, compressed = distill.student_forward(peft.get_base_model(), method, 16, ids, 8, {})
    assert compressed.any(), "the method never compressed: the test would not reach a compressed entry"
    logits[:, compressed].logsumexp(-1).sum().backward()
    grads = [p.grad for n, p in peft.named_parameters() if "lora_B" in n]
    assert grads and all(g is not None and bool(torch.isfinite(g).all()) and g.abs().sum() > 0 for g in grads)


def test_an_untrained_compressor_adds_no_bias_offset():
    method = build_method("adaptive_kmeans")
    assert method.trainable_parameters(None) == {}
    model, _ = load("tiny_llama")
    cache = make_cache(model, method, 24)
    with torch.no_grad():
        model(torch.randint(4, 200, (1, 60)), past_key_values=cache)
    assert all(method.bias_offset(layer) is None for layer in cache.layers)
    assert all(torch.equal(layer.attention_bias(), layer.bias) for layer in cache.layers)


# -- the loss ------------------------------------------------------------------------------------------------------
def test_distillation_loss_is_kl_at_temperature_plus_ce():
    torch.manual_seed(0)
    student, teacher = torch.randn(1, 5, 7), torch.randn(1, 5, 7)
    labels = torch.randint(0, 7, (1, 5))
    counted = torch.tensor([[False, False, True, True, True]])
    loss, parts = distill.distillation_loss(student, teacher, labels, counted, 2.0, 0.3)
    p = torch.softmax(teacher[0, 2:] / 2, -1)
    kl = (p * (p.log() - torch.log_softmax(student[0, 2:] / 2, -1))).sum(-1).mean() * 4
    ce = torch.nn.functional.cross_entropy(student[0, 2:], labels[0, 2:])
    assert loss.item() == pytest.approx((0.3 * kl + 0.7 * ce).item(), rel=1e-5)
    assert parts["positions"] == 3
    same, _ = distill.distillation_loss(teacher, teacher, labels, counted, 2.0, 1.0)
    assert same.item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("trainable", ["lora", "compressor", "all"])
def test_distillation_loss_decreases_on_a_fixed_batch(files, trainable):
    cfg = _cfg(
        files,
        "train.learning_rate=0.01" if trainable != "compressor" else "train.learning_rate=0.2",
        trainable=trainable,
    )
    d = _distiller(cfg)
    d.make_scheduler(100)
    batch = torch.randint(4, 200, (2, 97), generator=torch.Generator().manual_seed(2))
    losses = [d.step([batch])["loss"] for _ in range(6)]
    assert losses[-1] < losses[0], losses


# -- checkpoints, evaluation with the trained parts, resume ---------------------------------------------------------
def test_compressor_checkpoint_round_trips_into_the_evaluated_method(files, tmp_path):
    cfg = _cfg(files)
    trained = distill.train(cfg, tmp_path / "run" / "checkpoint")
    path = trained.method_overrides["checkpoint"]
    assert Path(path).is_file() and trained.model_checkpoint is None
    assert (tmp_path / "run" / "train_log.csv").is_file()
    loaded = build_method("adaptive_kmeans", checkpoint=path)
    values = loaded.trainable_parameters(None)["merged_bias"]
    assert values.shape == (2, 2) and bool((values != 0).all())
    model, tok = load("tiny_llama")
    default = evaluate_perplexity(model, tok, EVAL_TEXT, "adaptive_kmeans", 24, chunk_size=8)
    trained_ppl = evaluate_perplexity(model, tok, EVAL_TEXT, loaded, 24, chunk_size=8)
    assert trained_ppl["metrics"]["perplexity"] != default["metrics"]["perplexity"]
    with pytest.raises(ValueError, match="method.checkpoint"):
        build_method("semantic_cluster", checkpoint=path)  # another method's parameters


@pytest.mark.parametrize("trainable", ["lora", "all"])
def test_model_checkpoint_is_loaded_by_load_model(files, tmp_path, trainable):
    cfg = _cfg(files, "train.max_steps=2", "train.learning_rate=0.01", trainable=trainable)
    trained = distill.train(cfg, tmp_path / "checkpoint")
    assert Path(trained.model_checkpoint).exists() and trained.method_overrides == {}
    plain, _ = load_model(cfg.model, cfg.hardware)
    with_ckpt, _ = load_model({**cfg.model, "checkpoint": trained.model_checkpoint}, cfg.hardware)
    assert not any("lora" in n for n, _ in with_ckpt.named_parameters())  # the adapter is merged
    ids = torch.randint(4, 200, (1, 20))
    with torch.no_grad():
        assert not torch.allclose(plain(ids).logits, with_ckpt(ids).logits)
    with pytest.raises(ValueError, match="model.checkpoint"):
        load_model({**cfg.model, "checkpoint": str(tmp_path)}, cfg.hardware)


def test_resume_continues_from_the_saved_step(files, tmp_path):
    full = distill.train(_cfg(files, "train.max_steps=4"), tmp_path / "a" / "checkpoint")
    distill.train(_cfg(files, "train.max_steps=4", "train.save_every=2"), tmp_path / "b" / "checkpoint")
    step2 = tmp_path / "b" / "checkpoint" / "step-2"
    assert (step2 / distill.STATE_FILE).is_file()
    resumed = distill.train(
        _cfg(files, "train.max_steps=4", f"train.resume_from={step2}"), tmp_path / "c" / "checkpoint"
    )
    assert resumed.metrics["resumed_from_step"] == 2 and resumed.metrics["steps"] == 4
    rows = (tmp_path / "c" / "train_log.csv").read_text().splitlines()
    assert len(rows) == 1 + 4  # header, the two saved steps and the two new ones
    a = build_method("adaptive_kmeans", checkpoint=full.method_overrides["checkpoint"]).trainable_parameters(
        None
    )
    c = build_method(
        "adaptive_kmeans", checkpoint=resumed.method_overrides["checkpoint"]
    ).trainable_parameters(None)
    torch.testing.assert_close(a["merged_bias"], c["merged_bias"])  # same batches, same optimizer state


# -- options --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "override,option",
    [
        ("train.trainable=everything", "train.trainable"),
        ("train.precision=fp16", "train.precision"),
        ("train.precision=int8", "train.precision"),
        ("train.temperature=0", "train.temperature"),
        ("train.distillation_weight=1.5", "train.distillation_weight"),
        ("train.batch_size=0", "train.batch_size"),
        ("train.max_length=20", "train.max_length"),
        ("train.data.source=ftp", "train.data.source"),
        ("train.resume_from=/nonexistent", "train.resume_from"),
        ("train.lora.rank=0", "train.lora.rank"),
        ("method=snapkv", "train.trainable=compressor"),
        ("budget.tokens=null", "budget"),
        ("method=kivi", "method=kivi"),
    ],
)
def test_bad_options_fail_before_any_model_loads(files, override, option):
    extra = ["train.trainable=lora"] if "lora" in override else []
    cfg = _cfg(files, *extra, override)
    with pytest.raises(ValueError, match=option.replace(".", r"\.")):
        train_or_eval(cfg, "/nonexistent/never-created")


def test_training_data_is_checked_disjoint_and_windowed(files):
    books, _ = files
    docs = load_training_texts({"source": "local", "path": str(books)})
    assert len(docs) == 3
    check_disjoint(docs, [("eval", EVAL_TEXT)])
    with pytest.raises(ValueError, match="disjoint"):
        check_disjoint(docs, [("eval", docs[1][1])])
    _, tok = load("tiny_llama")
    windows = token_windows(docs, tok, 97, 5)
    assert windows.shape == (5, 97)


# -- end to end ------------------------------------------------------------------------------------------------------
def test_train_or_eval_with_train_distill(files, tmp_path):
    summary = train_or_eval(_cfg(files, "train.trainable=lora", "train.max_steps=2"), tmp_path / "out")
    written = json.loads((tmp_path / "out" / "summary.json").read_text())
    for key in ("metrics_before", "metrics_untrained", "metrics_after", "train"):
        assert written[key] == summary[key] or key == "train"
    assert written["train"]["name"] == "distill" and written["train"]["steps"] == 2
    assert Path(written["checkpoint"]["model"]).is_dir()
    assert (tmp_path / "out" / "checkpoint" / "adapter" / "adapter_config.json").is_file()
    assert (tmp_path / "out" / "train_log.csv").is_file()
    assert written["metrics_after"]["perplexity"] != written["metrics_untrained"]["perplexity"]


def test_the_uncompressed_control_trains_the_plain_model_on_every_position(files):
    cfg = _cfg(files, "train.use_compression=false", trainable="lora")
    validate(cfg)
    d = _distiller(cfg)
    d.make_scheduler(3)
    batch = torch.randint(4, 200, (1, 97), generator=torch.Generator().manual_seed(2))
    first = d.step([batch])
    assert first["positions"] == 96  # every position, not only those after a compression
    assert first["kl"] == pytest.approx(0.0, abs=1e-5)  # LoRA B = 0: the student is the teacher at first
    assert d.step([batch])["kl"] > 0  # then it moves away from it, driven by the cross-entropy
    validate(
        _cfg(files, "train.use_compression=false", method="full", trainable="lora")
    )  # the plain fine-tune
    with pytest.raises(ValueError, match="train=distill needs a compressing method"):
        validate(_cfg(files, method="full", trainable="lora"))
    with pytest.raises(ValueError, match="use_compression=false trains without a compressed cache"):
        validate(_cfg(files, "train.use_compression=false"))


def test_the_uncompressed_control_runs_end_to_end_and_evaluates_with_the_method(files, tmp_path):
    summary = train_or_eval(
        _cfg(files, "train.use_compression=false", method="h2o", trainable="lora"), tmp_path / "run"
    )
    assert summary["train"]["steps"] == 3 and summary["method"]["name"] == "h2o"
    assert summary["metrics_untrained"] != summary["metrics_after"]  # fine-tuned, then evaluated compressed
    assert summary["kv_cache"]["compression_ratio"] > 0


# -- evaluation during training (train.eval_every) --------------------------------------------------------------------
def _log(run_dir: Path) -> list[dict]:
    with (run_dir / distill.LOG_FILE).open() as f:
        return list(csv.DictReader(f))


def _perplexity_with(checkpoint: Path) -> float:
    """The run's evaluation (EVAL_TEXT, 120 tokens, chunk 8, budget 24) of a saved compressor, computed anew."""
    model, tok = load("tiny_llama")
    method = build_method("adaptive_kmeans", checkpoint=str(checkpoint))
    result = evaluate_perplexity(
        model, tok, EVAL_TEXT, method, 24, chunk_size=8, max_tokens=120, progress=False
    )
    return result["metrics"]["perplexity"]


def test_evaluation_during_training_logs_each_evaluation_and_keeps_the_best_step(files, tmp_path):
    cfg = _cfg(files, "train.max_steps=5", "train.eval_every=2", "train.save_every=2")
    run = tmp_path / "run"
    trained = distill.train(cfg, run / "checkpoint")
    rows = _log(run)
    evaluated = {int(r["step"]): float(r["eval/perplexity"]) for r in rows if r["eval/perplexity"]}
    assert sorted(evaluated) == [2, 4, 5]  # every 2 steps and after the last
    assert all(r["eval/objective"] == r["eval/perplexity"] for r in rows)  # the run's objective: perplexity
    assert (
        len(set(evaluated.values())) == 3
    )  # training moved the compressor, so the choice below means something
    # Each figure is the run's evaluation of that step's trained compressor, computed here anew from its checkpoint.
    for step in (2, 4):
        assert evaluated[step] == pytest.approx(
            _perplexity_with(run / "checkpoint" / f"step-{step}" / "compressor.safetensors"), rel=1e-6
        )
    assert evaluated[5] == pytest.approx(
        _perplexity_with(run / "checkpoint" / "compressor.safetensors"), rel=1e-6
    )
    best = min(evaluated, key=evaluated.get)  # lower perplexity is better
    assert trained.metrics["best_step"] == best and trained.metrics["best_objective"] == pytest.approx(
        evaluated[best]
    )
    assert trained.metrics["evaluations"] == 3 and trained.metrics["evaluated_checkpoint"] == "best"
    assert trained.method_overrides["checkpoint"] == str(
        run / "checkpoint" / "best" / "compressor.safetensors"
    )
    assert _perplexity_with(Path(trained.method_overrides["checkpoint"])) == pytest.approx(
        evaluated[best], rel=1e-6
    )
    # The evaluations leave training as it was: the same losses as a run without them.
    plain = tmp_path / "plain"
    distill.train(_cfg(files, "train.max_steps=5"), plain / "checkpoint")
    assert [r["loss"] for r in rows] == [r["loss"] for r in _log(plain)]
    assert "eval/perplexity" not in _log(plain)[0]
    last = distill.train(
        _cfg(files, "train.max_steps=5", "train.eval_every=2", "train.keep_best=false"),
        tmp_path / "last" / "checkpoint",
    )
    assert last.method_overrides["checkpoint"] == str(
        tmp_path / "last" / "checkpoint" / "compressor.safetensors"
    )
    assert last.metrics["best_step"] == best and last.metrics["evaluated_checkpoint"] == "last"


@pytest.mark.parametrize("objective,best", [(None, 2), ("accuracy", 3)])
def test_the_best_step_follows_the_objective_direction(files, objective, best):
    extra = [f"objective={objective}"] if objective else []
    evaluator = TrainingEvaluator(_cfg(files, "train.eval_every=1", *extra), None, None)
    figures = [(1, 9.0, 0.3), (2, 7.0, 0.2), (3, 8.0, 0.4), (4, float("nan"), float("nan"))]
    rows = [
        {"step": s, "eval/perplexity": p, "eval/accuracy": a, OBJECTIVE: a if objective else p}
        for s, p, a in figures
    ]
    evaluator.restore(rows)  # perplexity: lower is better; accuracy: higher; a NaN is never the best
    assert evaluator.best[0] == best


def test_metric_directions():
    assert lower_is_better("perplexity") and lower_is_better("wikitext/word_perplexity,none")
    assert lower_is_better("wikitext/bits_per_byte,none") and not lower_is_better("kvexp_recall/acc")
    assert (
        not lower_is_better("accuracy")
        and not lower_is_better("rouge.rougeL")
        and not lower_is_better("qa.f1")
    )


def test_resume_carries_the_best_step_on(files, tmp_path):
    options = ("train.max_steps=4", "train.eval_every=2", "train.save_every=2")
    first = distill.train(_cfg(files, *options), tmp_path / "a" / "checkpoint")
    step2 = tmp_path / "a" / "checkpoint" / "step-2"
    resumed = distill.train(
        _cfg(files, *options, f"train.resume_from={step2}"), tmp_path / "c" / "checkpoint"
    )
    assert resumed.metrics["best_step"] == first.metrics["best_step"]
    assert resumed.metrics["best_objective"] == pytest.approx(first.metrics["best_objective"], rel=1e-6)
    assert (
        resumed.metrics["evaluations"] == 2
    )  # the resumed log's evaluation at step 2 and the new one at step 4
    assert _perplexity_with(Path(resumed.method_overrides["checkpoint"])) == pytest.approx(
        first.metrics["best_objective"], rel=1e-6
    )


@pytest.mark.parametrize(
    "override,message",
    [
        ("train.eval_every=0", "train.eval_every"),
        ("train.eval_max_samples=x", "train.eval_max_samples"),
        ("train.keep_best=maybe", "train.keep_best"),
        ("+train.eval_dataset.splitt=validation", r"train.eval_dataset: \['splitt'\]"),
        ("+train.eval_dataset.name=wikitext2", "not its name or task"),
        ("+train.eval_dataset.path=/nonexistent/valid.txt", "dataset.path"),
    ],
)
def test_bad_evaluation_options_fail_before_any_model_loads(files, override, message):
    with pytest.raises(ValueError, match=message):
        train_or_eval(_cfg(files, "train.eval_every=2", override), "/nonexistent/never-created")


def test_train_or_eval_evaluates_the_best_step_and_reports_it(files, tmp_path):
    summary = train_or_eval(
        _cfg(files, "train.max_steps=4", "train.eval_every=2", "train.eval_max_samples=1"), tmp_path / "out"
    )
    rows = _log(tmp_path / "out")
    evaluated = {int(r["step"]): float(r["eval/perplexity"]) for r in rows if r["eval/perplexity"]}
    best = min(evaluated, key=evaluated.get)
    assert summary["train"]["best_step"] == best
    assert summary["checkpoint"]["method"]["checkpoint"].endswith("best/compressor.safetensors")
    # the run's evaluation (the same document here) of the kept step is the in-training figure of that step
    assert summary["metrics_after"]["perplexity"] == pytest.approx(evaluated[best], rel=1e-6)
