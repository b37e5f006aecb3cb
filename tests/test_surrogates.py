"""method=kvzap and method=fastkvzip (learned surrogates of KVzip's score read off each token's hidden state) and
train=kvzip_surrogate, on tiny random models.

The surrogates' formulas are written out here (linear, MLP with GELU, the sink-attention gate); the scores the cache
holds are those formulas on the attention-input hidden states captured here with hooks of the test's own; trained
surrogates must beat a random scorer at ranking KVzip's scores of held-out windows; checkpoints round-trip and the
authors' published formats load; bad options fail with one line."""

import copy
import json
import math

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file

from kvexp.app import train_or_eval
from kvexp.config import validate
from kvexp.methods import build_method, make_cache
from kvexp.methods.fastkvzip import LONG_CONTEXT
from kvexp.methods.hidden_state import save_checkpoint
from kvexp.tasks.generation import PromptEncoder
from kvexp.train import kvzip_surrogate
from kvexp.train.data import training_books
from kvexp.train.kvzip_surrogate import Window, agreement, fit, kvzip_window
from kvexp.train.learned_scorer import text_windows
from tests.conftest import load
from tests.test_config import _compose
from tests.test_engine import _check_oracle

SMALL = ("train.texts=6", "train.max_tokens=256")


def _ids(model, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, model.config.vocab_size, (1, n), generator=g)


# -- the formulas, written out --------------------------------------------------------------------------------------
def kvzap_by_hand(state: dict, layer: int, h: torch.Tensor) -> torch.Tensor:
    """KVzap's per-layer model on hidden states [n, d] -> [n, Hkv] from its kvpress-layout tensors."""
    p = f"layers.{layer}."
    if p + "weight" in state:
        return h @ state[p + "weight"].float().T + state[p + "bias"].float()
    x = h @ state[p + "0.weight"].float().T + state[p + "0.bias"].float()
    x = 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))  # GELU (exact)
    return x @ state[p + "2.weight"].float().T + state[p + "2.bias"].float()


def gate_by_hand(state: dict, h: torch.Tensor) -> torch.Tensor:
    """Fast KVzip's gate on hidden states [n, d] -> [n, Hkv], one token, head and query at a time."""
    st = {k: v.float() for k, v in state.items()}
    heads, _, sinks, r = st["k_base"].shape
    groups = st["b"].shape[-1]

    def rms(x, w):
        return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w

    out = torch.zeros(h.shape[0], heads)
    for j in range(h.shape[0]):
        q = (st["q_proj.weight"] @ h[j] + st["q_proj.bias"]).view(heads, groups, r)
        k = (st["k_proj.weight"] @ h[j]).view(heads, r)
        for hh in range(heads):
            key = rms(k[hh], st["k_norm.weight"])
            shares = []
            for g in range(groups):
                query = rms(q[hh, g], st["q_norm.weight"])
                own = key @ query / math.sqrt(r) + st["b"][hh, 0, g]
                sink_logits = st["k_base"][hh, 0] @ query / math.sqrt(r)  # [S]
                shares.append(1.0 / (1.0 + torch.exp(sink_logits - own).sum()))
            out[j, hh] = sum(shares) / groups
    return out


def by_hand(name: str, state: dict, layer: int, h: torch.Tensor) -> torch.Tensor:
    if name == "kvzap":
        return kvzap_by_hand(state, layer, h)
    prefix = f"layers.{layer}."
    return gate_by_hand({k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}, h)


def _hooked_hidden_states(model) -> tuple[dict[int, list[torch.Tensor]], list]:
    """Every forward's attention-input hidden states [q, d] per layer, by hooks of this test on the llama's self_attn
    modules (the handles to remove)."""
    seen: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(model.model.layers))}

    def record(i, module, args, kwargs):
        seen[i].append((args[0] if args else kwargs["hidden_states"])[0])

    handles = [
        layer.self_attn.register_forward_pre_hook(lambda m, a, k, i=i: record(i, m, a, k), with_kwargs=True)
        for i, layer in enumerate(model.model.layers)
    ]
    return seen, handles


def _random_checkpoint(name: str, model, path, **options):
    """A kvexp checkpoint whose every parameter is random (norm weights, sink keys and biases included)."""
    method = build_method(name, **options)
    surrogate = method.initialize(method.shape(model.config))
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in surrogate.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.5 if p.dim() > 1 else 1.0))
    config = {"shape": list(surrogate.shape), **method.architecture(surrogate)}
    save_checkpoint(path, method.checkpoint_format, config, {}, surrogate)
    return {k: v.clone() for k, v in surrogate.state_dict().items()}


# -- the formulas and the scores written ----------------------------------------------------------------------------
def test_kvzap_linear_and_mlp_are_the_formulas():
    h = torch.randn(9, 64)
    for model_type in ("linear", "mlp"):
        method = build_method("kvzap", model_type=model_type, hidden_size=8)
        surrogate = method.initialize((2, 64, 2))
        state = surrogate.state_dict()
        for layer in range(2):
            assert torch.allclose(surrogate(layer, h), kvzap_by_hand(state, layer, h), atol=1e-5)
        assert surrogate.model_type == model_type


def test_fastkvzip_gate_is_the_sink_attention_formula(tmp_path):
    model, _ = load("tiny_llama")
    state = _random_checkpoint("fastkvzip", model, tmp_path / "gates.pt", output_dim=4, sink=3)
    method = build_method("fastkvzip", checkpoint=str(tmp_path / "gates.pt"), output_dim=4, sink=3)
    h = torch.randn(6, 64)
    for layer in range(2):
        got = method.surrogate(layer, h)
        assert ((got > 0) & (got < 1)).all()
        assert torch.allclose(got, by_hand("fastkvzip", state, layer, h), atol=1e-5)


@pytest.mark.parametrize("name", ["kvzap", "fastkvzip"])
@torch.no_grad()
def test_scores_are_set_at_write_time_from_the_entrys_own_hidden_state(name, tmp_path):
    model, _ = load("tiny_llama")
    options = {"hidden_size": 8} if name == "kvzap" else {"output_dim": 4, "sink": 3, "n_sink": 0}
    state = _random_checkpoint(name, model, tmp_path / "c.pt", **options)
    ids = _ids(model, 40)
    plain, handles = _hooked_hidden_states(model)
    model(ids)  # the model alone, no cache
    for handle in handles:
        handle.remove()

    def run(budget):
        """A chunked prefill then decoding; the scores each layer holds for its slots, and the scores the formula
        gives on the hidden states this run's forwards got (after a compression they depend on what was kept)."""
        seen, handles = _hooked_hidden_states(model)
        cache = make_cache(model, name, budget, checkpoint=str(tmp_path / "c.pt"), **options)
        for start in range(0, 30, 7):
            model(ids[:, start : min(start + 7, 30)], past_key_values=cache)
        for t in range(30, 40):
            model(ids[:, t : t + 1], past_key_values=cache)
        for handle in handles:
            handle.remove()
        hidden = {i: torch.cat(steps) for i, steps in seen.items()}  # [40, d] in time order
        return cache, hidden, {i: by_hand(name, state, i, h).T for i, h in hidden.items()}  # [Hkv, 40]

    cache, hidden, want = run(64)
    for layer in cache.layers:  # nothing evicted: every token's score, in time order
        i = layer.layer_idx
        assert torch.allclose(hidden[i], plain[i][0], atol=1e-5)  # the cache is exact: the model's own states
        order = layer.positions[0, 0].argsort()
        assert torch.allclose(layer.state(name)[0][:, order], want[i], atol=1e-5)
    cache, _, want = run(12)
    for layer in cache.layers:
        # Scores fixed at write time: the kept entries are each head's 12 best of all 40, each still holding the
        # score its token got when written.
        for h in range(layer.kv_heads):
            kept = layer.positions[0, h]
            best = want[layer.layer_idx][h].topk(12).indices
            assert sorted(kept.tolist()) == sorted(best.tolist())
            assert torch.allclose(layer.state(name)[0, h], want[layer.layer_idx][h, kept], atol=1e-5)


@torch.no_grad()
def test_fastkvzip_keeps_its_sinks_and_recent_window():
    model, _ = load("tiny_llama")
    method = build_method("fastkvzip", checkpoint="random", n_sink=3, window_ratio=0.1)
    cache = make_cache(model, method, 64)
    model(_ids(model, 40), past_key_values=cache)
    for layer in cache.layers:
        scores, positions = method.score(layer), layer.positions
        protected = (positions < 3) | (positions >= 40 - 4)  # window: floor(0.1 x 40) = 4 newest
        assert torch.isinf(scores[protected]).all()
        assert torch.equal(scores[~protected], layer.state("fastkvzip")[~protected])
    # Rows that have seen 31,999 and 32,000 tokens: 10% of them, then window_size from 32k tokens on.
    long = torch.tensor([[[0, 5, LONG_CONTEXT - 2], [0, 5, LONG_CONTEXT - 1]]])
    assert method.window(long).flatten().tolist() == [(LONG_CONTEXT - 1) // 10, method.window_size]


@torch.no_grad()
def test_dms_thresholds_kvzap_scores():
    """The paper's inference: DMS's delayed threshold over KVzap's scores (here the untrained surrogate)."""
    model, _ = load("tiny_llama")
    method = build_method(
        "dms", scorer="kvzap", scorer_params={"checkpoint": "random"}, threshold=0.0, window_size=4
    )
    cache = make_cache(model, method, 36)
    ids = _ids(model, 40)
    for t in range(40):
        model(ids[:, t : t + 1], past_key_values=cache)
    stats = method.statistics(cache.layers)
    assert stats["dms_threshold_evicted"] > 0
    for layer in cache.layers:
        live = layer.live()
        judged = live & (layer.positions <= 39 - 4)
        assert (layer.state("kvzap")[judged] >= 0.0).all()  # what left the window below 0 was evicted


# -- training --------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sharp_windows():
    """KVzip's scores on windows of the embedded novel, for the tiny llama with its query and key projections scaled
    by 4 (its random attention is otherwise nearly uniform: KVzip's scores would differ by a few percent)."""
    model, tok = load("tiny_llama")
    sharp = copy.deepcopy(model)
    with torch.no_grad():
        for layer in sharp.model.layers:
            layer.self_attn.q_proj.weight.mul_(4.0)
            layer.self_attn.k_proj.weight.mul_(4.0)
    books, name = training_books("gutenberg/books.jsonl")
    windows = [
        kvzip_window(sharp, tok, PromptEncoder(tok), tok.decode(ids[0], skip_special_tokens=True), 2000)
        for ids in text_windows(books, name, tok, 6, 160, 2000)
    ]
    return sharp, [w for w, _ in windows], windows[0][1]


@pytest.mark.parametrize(
    "name, options, fit_options",
    [
        ("kvzap", {"model_type": "linear"}, []),
        ("kvzap", {"hidden_size": 16}, ["train.epochs=30"]),
        ("fastkvzip", {}, ["train.steps=300"]),
    ],
)
def test_trained_surrogate_ranks_kvzip_scores_far_better_than_random(
    sharp_windows, name, options, fit_options
):
    model, windows, trained = sharp_windows
    assert trained == [0, 1] and all(torch.isfinite(w.scores).all() and (w.scores > 0).all() for w in windows)
    cfg = _compose("model=tiny_llama", f"method={name}", "train=kvzip_surrogate", *fit_options)
    method = build_method(name, **options)
    method.surrogate = method.initialize(method.shape(model.config))
    budget = OmegaConf.create({"tokens": None, "keep_ratio": 0.25})
    before = agreement(method, trained, windows[4:], budget, 0)
    data = Window(
        torch.cat([w.hidden for w in windows[:4]], 1), torch.cat([w.scores for w in windows[:4]], 1)
    )
    summary = fit(method, trained, data, cfg.train)
    after = agreement(method, trained, windows[4:], budget, 0)
    # measured: Spearman 0.55-0.63 (random -0.01), recall of KVzip's top quarter 0.52-0.58 (random 0.25)
    assert after["val_spearman_surrogate"] > 0.45 > 0.1 > abs(after["val_spearman_random"])
    assert after["val_recall_surrogate"] > after["val_recall_random"] + 0.15
    assert after["val_loss"] < before["val_loss"]
    if "train_loss_per_epoch" in summary:
        assert summary["train_loss_per_epoch"][-1] < summary["train_loss_per_epoch"][0]


@pytest.fixture(scope="module")
def trained_kvzap(tmp_path_factory):
    """train=kvzip_surrogate end to end on the tiny llama (kvzap linear: the closed-form ridge)."""
    cfg = _compose(
        "model=tiny_llama",
        "method=kvzap",
        "method.model_type=linear",
        "train=kvzip_surrogate",
        "budget.tokens=64",
        *SMALL,
    )
    kvzip_surrogate.check(cfg)
    out = kvzip_surrogate.train(cfg, tmp_path_factory.mktemp("kvzap"))
    return cfg, out.method_overrides["checkpoint"], out.metrics


def test_the_trainer_reports_agreement_with_kvzip_and_beats_random(trained_kvzap):
    _, path, m = trained_kvzap
    assert path.endswith("kvzap.pt") and m["trained_layers"] == [0, 1]
    assert m["oracle"] == "kvzip_plus"  # KVzap's paper trains on KVzip+
    assert m["train_samples"] > m["val_samples"] > 0
    # measured: 0.46 vs 0.05 (the tiny model's KVzip scores differ by a few percent only)
    assert m["val_spearman_surrogate"] > m["val_spearman_random"] + 0.25
    assert m["val_recall_surrogate"] > m["val_recall_random"]


@torch.no_grad()
def test_the_checkpoint_reproduces_the_trainers_validation(trained_kvzap):
    cfg, path, metrics = trained_kvzap
    model, tok = load("tiny_llama")
    method = build_method("kvzap", model_type="linear", checkpoint=path)
    assert method.meta["model"] == "tiny_llama" and method.meta["trained_layers"] == [0, 1]
    books, name = training_books(cfg.train.data_file)
    held_out = text_windows(books, name, tok, 6, 256, 2000)[-2:]  # the trainer's validation windows
    windows = [
        kvzip_window(
            model, tok, PromptEncoder(tok), tok.decode(ids[0], skip_special_tokens=True), 2000, True
        )[0]
        for ids in held_out
    ]  # KVzip+ scores, the trainer's default oracle for kvzap
    again = agreement(method, [0, 1], windows, cfg.budget, cfg.train.seed)
    assert again["val_loss"] == pytest.approx(metrics["val_loss"], rel=1e-5)
    assert again["val_spearman_surrogate"] == pytest.approx(metrics["val_spearman_surrogate"], abs=1e-6)
    assert again["val_recall_surrogate"] == pytest.approx(metrics["val_recall_surrogate"], abs=1e-6)
    by_dir = build_method("kvzap", model_type="linear", checkpoint=str(path).rsplit("/", 1)[0])
    assert by_dir.surrogate == method.surrogate


@torch.no_grad()
def test_a_trained_kvzap_passes_the_masking_oracle(trained_kvzap):
    model, _ = load("tiny_llama")
    _, path, _ = trained_kvzap
    ids = _ids(model, 40)
    for chunk in (1, 7):
        cache = _check_oracle(
            model, ids, chunk, method="kvzap", budget=12, checkpoint=path, model_type="linear"
        )
        assert cache.physical_lengths() == [12, 12]


def test_train_then_evaluate_runs_untrained_then_trained(tmp_path):
    cfg = _compose(
        "model=tiny_llama",
        "method=fastkvzip",
        "train=kvzip_surrogate",
        "budget.tokens=32",
        "eval.max_tokens=64",
        "train.texts=3",
        "train.max_tokens=128",
        "train.steps=20",
    )
    summary = train_or_eval(cfg, tmp_path / "run")  # the untrained evaluation runs the seeded initialization
    assert summary["train"]["name"] == "kvzip_surrogate" and summary["train"]["fit"]["steps"] == 20
    assert (tmp_path / "run" / "checkpoint" / "fastkvzip.pt").is_file()
    assert summary["checkpoint"]["method"]["checkpoint"].endswith("fastkvzip.pt")
    assert summary["metrics_untrained"].keys() == summary["metrics_after"].keys()
    assert -1.0 <= summary["train"]["val_spearman_surrogate"] <= 1.0


# -- checkpoints and the published formats ---------------------------------------------------------------------------
def _kvzap_model_dir(folder, hidden_dim):
    """A folder in kvpress's KVzapModel.save_pretrained layout (bf16 weights) for the tiny llama's shape."""
    g = torch.Generator().manual_seed(3)
    state = {}
    for i in range(2):
        if hidden_dim is None:
            shapes = {"weight": (2, 64), "bias": (2,)}
        else:
            shapes = {
                "0.weight": (hidden_dim, 64),
                "0.bias": (hidden_dim,),
                "2.weight": (2, hidden_dim),
                "2.bias": (2,),
            }
        state.update({f"layers.{i}.{k}": torch.randn(s, generator=g).bfloat16() for k, s in shapes.items()})
    folder.mkdir()
    save_file(state, str(folder / "model.safetensors"))
    config = {
        "model_type": "kvzap",
        "input_dim": 64,
        "output_dim": 2,
        "hidden_dim": hidden_dim,
        "n_modules": 2,
    }
    (folder / "config.json").write_text(json.dumps(config))
    return state


@pytest.mark.parametrize("hidden_dim", [None, 8])
def test_kvzap_loads_kvpress_kvzap_model_folders(tmp_path, monkeypatch, hidden_dim):
    state = _kvzap_model_dir(tmp_path / "KVzap", hidden_dim)
    options = (
        {"model_type": "linear"} if hidden_dim is None else {"model_type": "mlp", "hidden_size": hidden_dim}
    )
    h = torch.randn(5, 64)
    for checkpoint in (tmp_path / "KVzap", tmp_path / "KVzap" / "model.safetensors"):
        method = build_method("kvzap", checkpoint=str(checkpoint), **options)
        method.validate(64)
        assert torch.allclose(method.surrogate(1, h), kvzap_by_hand(state, 1, h), atol=1e-4)
    # A hub id, and null: the published nvidia/KVzap-<type>-<model> (here the hub's answer is this folder).
    asked = []

    def hub(repo, filename):
        asked.append((repo, filename))
        return tmp_path / "KVzap" / filename

    monkeypatch.setattr("kvexp.methods.hidden_state.published_file", hub)
    monkeypatch.setattr("kvexp.methods.kvzap.published_file", hub)
    repo = f"nvidia/KVzap-{options['model_type']}-Some-Model"
    by_id = build_method("kvzap", checkpoint=repo, **options)
    assert by_id.surrogate == method.surrogate and asked[0] == (repo, "config.json")
    model, _ = load("tiny_llama")
    monkeypatch.setattr(model.config, "_name_or_path", "someone/Tiny-Llama")
    cache = make_cache(model, "kvzap", 12, **options)
    assert asked[-1] == ("nvidia/KVzap-" + options["model_type"] + "-Tiny-Llama", "model.safetensors")
    assert cache.layers[0].evictor.surrogate == method.surrogate


def test_fastkvzip_loads_the_authors_gate_files(tmp_path, monkeypatch):
    """The authors' optim.py output: {"module": [per-layer state dicts], loss curves as numpy arrays}."""
    g = torch.Generator().manual_seed(5)
    heads, groups, r, sinks = 2, 2, 16, 16
    layers = [
        {
            "q_proj.weight": torch.randn(heads * groups * r, 64, generator=g) * 0.2,
            "q_proj.bias": torch.randn(heads * groups * r, generator=g),
            "k_proj.weight": torch.randn(heads * r, 64, generator=g) * 0.2,
            "q_norm.weight": torch.rand(r, generator=g) + 0.5,
            "k_norm.weight": torch.rand(r, generator=g) + 0.5,
            "k_base": torch.randn(heads, 1, sinks, r, generator=g),
            "b": torch.randn(heads, 1, groups, generator=g),
        }
        for _ in range(2)
    ]
    stored = [{k: v.bfloat16() for k, v in layer.items()} for layer in layers]
    path = tmp_path / "tiny-llama" / "q2_dim16_sink16.pt"
    path.parent.mkdir()
    losses = np.random.default_rng(0).random((3, 2))
    torch.save(
        {"module": stored, "loss": losses, "acc": losses, "loss_train": losses, "acc_train": losses}, path
    )
    method = build_method("fastkvzip", checkpoint=str(path))
    h = torch.randn(4, 64)
    for i in range(2):
        assert torch.allclose(method.surrogate(i, h), gate_by_hand(stored[i], h), atol=1e-4)
    asked = []

    def hub(repo, filename):
        asked.append((repo, filename))
        return tmp_path / filename

    monkeypatch.setattr("kvexp.methods.fastkvzip.published_file", hub)
    model, _ = load("tiny_llama")
    monkeypatch.setattr(model.config, "_name_or_path", "someone/Tiny-Llama")
    cache = make_cache(model, "fastkvzip", 12)
    assert asked == [("Jang-Hyun/Fast-KVzip", "tiny-llama/q2_dim16_sink16.pt")]
    assert cache.layers[0].evictor.surrogate == method.surrogate


def test_without_a_checkpoint_the_methods_refuse_saying_how_to_train_one():
    model, _ = load("tiny_llama")
    for name in ("kvzap", "fastkvzip"):
        with pytest.raises(ValueError, match=f"train=kvzip_surrogate method={name}") as failure:
            make_cache(model, name, 12)
        assert "\n" not in str(failure.value)


# -- validation and configuration -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name, params, match",
    [
        ("kvzap", {"model_type": "conv"}, "method.model_type must be one of linear, mlp"),
        ("kvzap", {"hidden_size": 0}, "method.hidden_size must be >= 1"),
        ("fastkvzip", {"output_dim": 0}, "method.output_dim must be >= 1"),
        ("fastkvzip", {"sink": 0}, "method.sink must be >= 1"),
        ("fastkvzip", {"n_sink": 64}, r"method.n_sink \(64\) must be smaller than the budget"),
        ("fastkvzip", {"window_ratio": 1.0}, r"method.window_ratio must be in \[0, 1\)"),
        ("fastkvzip", {"window_size": -1}, "method.window_size must be >= 0"),
    ],
)
def test_validation(name, params, match):
    with pytest.raises(ValueError, match=match):
        build_method(name, **params).validate(64)


def test_checkpoint_errors_name_the_option(tmp_path):
    model, _ = load("tiny_llama")
    _random_checkpoint("kvzap", model, tmp_path / "linear.pt", model_type="linear")
    with pytest.raises(ValueError, match="set method.model_type=linear"):
        build_method("kvzap", checkpoint=str(tmp_path / "linear.pt")).validate(64)
    _random_checkpoint("kvzap", model, tmp_path / "mlp.pt", hidden_size=8)
    with pytest.raises(ValueError, match="method.hidden_size=8"):
        build_method("kvzap", checkpoint=str(tmp_path / "mlp.pt")).validate(64)
    gemma, _ = load("tiny_gemma3")  # three layers
    with pytest.raises(ValueError, match=r"scores \(layers, hidden size, KV heads\) = \(2, 64, 2\)"):
        make_cache(gemma, "kvzap", 12, checkpoint=str(tmp_path / "mlp.pt"), hidden_size=8)
    (tmp_path / "bad.pt").write_bytes(b"\x80\x02corrupt")
    with pytest.raises(ValueError, match=r"method.checkpoint=.*bad.pt' cannot be read"):
        build_method("fastkvzip", checkpoint=str(tmp_path / "bad.pt"))
    with pytest.raises(ValueError, match="no such file"):
        build_method("fastkvzip", checkpoint=str(tmp_path / "missing.pt"))
    with pytest.raises(ValueError, match="neither a local path nor a hub repository"):
        build_method("kvzap", checkpoint="no-such-org/no-such-model")


@pytest.mark.parametrize("name", ["kvzap", "fastkvzip"])
def test_configs_compose_and_validate(name):
    cfg = _compose(f"method={name}", "method.checkpoint=random")
    assert cfg.method.name == name and cfg.method.checkpoint == "random"
    validate(cfg)
    validate(_compose("model=tiny_llama", f"method={name}", "train=kvzip_surrogate"))


@pytest.mark.parametrize(
    "overrides, match",
    [
        (("method=knorm",), "train=kvzip_surrogate trains method=kvzap or method=fastkvzip"),
        (("method=kvzap", "train.texts=1"), "train.texts must be >= 2"),
        (("method=kvzap", "train.steps=0"), "train.steps must be a positive integer or null"),
        (("method=fastkvzip", "train.lr=-1"), "train.lr must be > 0 or null"),
        (("method=kvzap", "train.val_fraction=1.0"), r"train.val_fraction must be in \(0, 1\)"),
        (("method=kvzap", "train.chat_template=maybe"), "train.chat_template must be true, false or null"),
        (("method=kvzap", "train.data_file=/nonexistent/books.jsonl"), "train.data_file"),
        (("method=kvzap", "+train.epoch=3"), r"has no option\(s\) \['epoch'\]"),
        (("method=kvzap", "train.oracle=h2o"), "train.oracle must be one of kvzip, kvzip_plus or null"),
        (
            ("method=fastkvzip", "train.oracle=kvzip_plus"),
            "cannot train method=fastkvzip: its gate's cross-entropy",
        ),
    ],
)
def test_trainer_options_fail_before_the_model_loads(overrides, match):
    with pytest.raises(ValueError, match=match):
        validate(_compose("model=tiny_llama", "train=kvzip_surrogate", *overrides))
