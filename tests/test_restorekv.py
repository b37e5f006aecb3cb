"""RestoreKV: the restore pass leaves the model's other forwards alone, its entries are a forward of the restore
embeddings over the full cache with the LoRA on (against PEFT itself), they stay in every layer inside the budget,
the masking oracle after the compression, the published-layout loader, validation, the trainer and the run."""

import copy
import json
import math

import pytest
import torch
from safetensors.torch import save_file

from kvexp.methods import build_method, make_cache
from kvexp.methods.base import Probing
from kvexp.methods.kvzip import FIRST_PROMPT, NEXT_PROMPT
from kvexp.methods.restorekv import (
    CHECKPOINT_FILES,
    INIT,
    LORA_TARGETS,
    RESTORE_FILE,
    RESTORE_KEY,
    RestoreAdapter,
    init_adapter,
    load_adapter,
    published_id,
    save_adapter,
)
from kvexp.tasks.generation import GenerationSample, PromptEncoder, run_generation
from tests.conftest import load
from tests.oracle import _MASKS, ORACLE, Visibility
from tests.test_config import _compose

TOL = 1e-4
N_RESTORE = 8


def _ids(model, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, model.config.vocab_size, (1, n), generator=g)


def _encoder(model):
    """Text -> ids without a tokenizer: a fixed id sequence per prompt."""
    table = {
        FIRST_PROMPT: _ids(model, 5, seed=11),
        NEXT_PROMPT: _ids(model, 7, seed=12),
        "\n": _ids(model, 1, seed=13),
    }
    return table.__getitem__


def _probing(model, cache, ids):
    def run(probe):
        model(probe, past_key_values=cache)

    def feed(prompt):
        return model(prompt, past_key_values=cache).logits[:, -1].float()

    encode = _encoder(model)
    return Probing(ids=ids, opening=0, closing=encode("\n"), encode=encode, run=run, feed=feed)


def _random_adapter(model, tokens=N_RESTORE, rank=4, seed=1) -> RestoreAdapter:
    """An adapter that does something: random embeddings and a non-zero LoRA on every projection."""
    adapter = init_adapter(model, tokens, rank, 2.0 * rank, LORA_TARGETS, seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        adapter.embeddings.copy_(torch.randn(adapter.embeddings.shape, generator=g))
        for _, b in adapter.lora.values():
            b.copy_(0.2 * torch.randn(b.shape, generator=g))
    return adapter


def _method(model, adapter, **params):
    method = build_method("restorekv", checkpoint=INIT, restore_tokens=adapter.tokens, **params)
    method.use_adapter(adapter, model)
    return method


def _restore_slots(layer, start):
    """Per KV head of row 0, the slots holding positions >= start (the restore entries), in position order."""
    out = []
    for h in range(layer.kv_heads):
        pos, live = layer.positions[0, h], layer.live()[0, h]
        slots = ((pos >= start) & live).nonzero().squeeze(-1)
        out.append(slots[pos[slots].argsort()])
    return out


@torch.no_grad()
def test_the_restore_pass_leaves_every_other_forward_of_the_model_unchanged():
    model, _ = load("tiny_llama")
    ids, follow = _ids(model, 30), _ids(model, 3, seed=2)
    before = model(ids, past_key_values=make_cache(model, "full")).logits
    hooks = {name: dict(m._forward_hooks) for name, m in model.named_modules()}  # other tests' (shared model)
    runs = {}
    for name, method in (
        ("kvzip", build_method("kvzip", chunk_size=11)),
        ("restorekv", _method(model, _random_adapter(model), chunk_size=11)),
    ):
        cache = make_cache(model, method, 16)
        prompt_logits = method.prefill(cache, _probing(model, cache, ids))
        runs[name] = (prompt_logits, model(follow, past_key_values=cache).logits, cache)
    # The prompt's forward is KVzip's, bit for bit: the adapter is not on outside its pass.
    assert torch.equal(runs["kvzip"][0], runs["restorekv"][0])
    assert {
        name: dict(m._forward_hooks) for name, m in model.named_modules()
    } == hooks  # the pass's hooks are gone
    assert torch.equal(model(ids, past_key_values=make_cache(model, "full")).logits, before)
    # ... and the restore entries are there, read by what follows (the test can tell the pass ran).
    assert runs["restorekv"][2].get_seq_length() == 30 + N_RESTORE + 3
    assert not torch.allclose(runs["kvzip"][1], runs["restorekv"][1])


def _peft_checkpoint(model, path, rank=4, alpha=8.0, seed=3):
    """A checkpoint in the published layout, its LoRA written by PEFT itself (non-zero B); returns the PEFT model
    (on a copy of `model`) and the restore embeddings."""
    from peft import LoraConfig, get_peft_model

    twin = copy.deepcopy(model)
    twin.set_attn_implementation("eager")
    torch.manual_seed(seed)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(LORA_TARGETS), init_lora_weights=False)
    peft_model = get_peft_model(twin, config)
    peft_model.save_pretrained(str(path))
    embeddings = torch.randn(
        N_RESTORE, model.config.hidden_size, generator=torch.Generator().manual_seed(seed)
    )
    save_file({RESTORE_KEY: embeddings}, str(path / RESTORE_FILE))
    return peft_model, embeddings


@torch.no_grad()
@pytest.mark.parametrize("allocation", ["global", "uniform"])
def test_restore_entries_are_the_embeddings_forward_over_the_full_cache_with_the_lora(tmp_path, allocation):
    from transformers import DynamicCache

    model, _ = load("tiny_llama")
    peft_model, embeddings = _peft_checkpoint(model, tmp_path)
    assert set(CHECKPOINT_FILES) <= {p.name for p in tmp_path.iterdir()}  # (and PEFT's README.md)
    ids = _ids(model, 40)
    # By hand: the plain model (PEFT's adapter off) over the prompt, then the embeddings with PEFT's adapter on.
    reference = DynamicCache(config=model.config)
    base = peft_model.get_base_model()
    with peft_model.disable_adapter():
        base(ids, past_key_values=reference)
    base.model(inputs_embeds=embeddings[None], past_key_values=reference)
    method = build_method("restorekv", checkpoint=str(tmp_path), chunk_size=15, allocation=allocation)
    cache = make_cache(model, method, 16)
    method.prefill(cache, _probing(model, cache, ids))
    for layer, ref in zip(cache.layers, reference.layers, strict=True):
        # Computed over the full cache (before the compression), kept whole in every KV head.
        for h, slots in enumerate(_restore_slots(layer, 40)):
            assert layer.positions[0, h, slots].tolist() == list(range(40, 40 + N_RESTORE))
            assert torch.allclose(layer.keys[0, h, slots], ref.keys[0, h, 40:], atol=1e-5)
            assert torch.allclose(layer.values[0, h, slots], ref.values[0, h, 40:], atol=1e-5)
    # The adapter off (the embeddings alone) gives other entries: the LoRA acted.
    plain = DynamicCache(config=model.config)
    with peft_model.disable_adapter():
        base(ids, past_key_values=plain)
        base.model(inputs_embeds=embeddings[None], past_key_values=plain)
    assert not torch.allclose(
        plain.layers[1].keys[..., 40:, :], reference.layers[1].keys[..., 40:, :], atol=1e-3
    )


def test_the_published_layout_round_trips_and_peft_reads_what_kvexp_writes(tmp_path):
    from peft import PeftModel

    model, _ = load("tiny_llama")
    peft_model, embeddings = _peft_checkpoint(model, tmp_path / "theirs")
    adapter = load_adapter(tmp_path / "theirs")
    assert torch.equal(adapter.embeddings, embeddings) and adapter.tokens == N_RESTORE
    state = peft_model.state_dict()
    path = "model.layers.1.mlp.down_proj"
    a, b = adapter.lora[path]
    assert torch.equal(a, state[f"base_model.model.{path}.lora_A.default.weight"])
    assert torch.equal(b, state[f"base_model.model.{path}.lora_B.default.weight"])
    assert len(adapter.lora) == 7 * model.config.num_hidden_layers and adapter.scaling[path] == 8.0 / 4
    save_adapter(adapter, tmp_path / "ours")
    again = load_adapter(tmp_path / "ours")
    assert all(
        torch.equal(x, y)
        for x, y in zip(again.parameters().values(), adapter.parameters().values(), strict=True)
    )
    reread = PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path / "ours")).state_dict()
    assert torch.equal(reread[f"base_model.model.{path}.lora_B.default.weight"], b)
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (4, 8.0)


def test_the_authors_adapter_is_found_by_the_model_name_in_the_hub_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants

    model, _ = load("tiny_llama")
    monkeypatch.setattr(model.config, "_name_or_path", "org/Tiny-Llama")
    assert published_id(model) == "higokri/RestoreKV-Tiny-Llama"
    assert published_id(model, plus=True) == "higokri/RestoreKV-Tiny-Llama_plus"
    snapshot = tmp_path / "models--higokri--RestoreKV-Tiny-Llama" / "snapshots" / ("a" * 40)
    save_adapter(_random_adapter(model), snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    method = build_method("restorekv")  # checkpoint null: the authors' adapter for the model
    make_cache(model, method, 16)
    assert torch.equal(method.adapter.embeddings, load_adapter(snapshot).embeddings)
    hub = build_method("restorekv", checkpoint="higokri/RestoreKV-Tiny-Llama")  # a hub id
    assert torch.equal(hub.adapter.embeddings, method.adapter.embeddings)
    monkeypatch.setattr(model.config, "_name_or_path", "org/Other")
    with pytest.raises(
        ValueError, match="needs method.checkpoint: no published adapter higokri/RestoreKV-Other"
    ):
        make_cache(model, build_method("restorekv"), 16)


@torch.no_grad()
@pytest.mark.parametrize("allocation", ["global", "layer", "uniform"])
def test_restore_entries_stay_in_every_layer_and_head_within_the_budget(allocation):
    model, _ = load("tiny_qwen3")
    budget, n = 14, 50
    method = _method(model, _random_adapter(model), chunk_size=20, allocation=allocation)
    cache = make_cache(model, method, budget)
    method.prefill(cache, _probing(model, cache, _ids(model, n)))
    assert sum(layer.budget for layer in cache.layers) == budget * len(cache.layers)  # the total stays
    for layer in cache.layers:
        live = layer.live()[0]  # [Hkv, slots]
        restore = (layer.positions[0] >= n) & live
        assert (restore.sum(-1) == N_RESTORE).all()  # all n restore entries, in every KV head
        assert torch.isinf(layer.state("kvzip")[0][restore]).all()
        if allocation == "uniform":
            assert (live.sum(-1) == budget).all()  # restore + kept context = the budget, per head
        else:
            assert int(live.sum()) == layer.budget * layer.kv_heads  # the layer's share, over its heads
            assert layer.budget > N_RESTORE


def _oracle_with_restore(model, context, follow, adapter, vis) -> torch.Tensor:
    """The plain model over context + restore embeddings + follow (one forward, eager, masked to what the compressed
    run saw), the LoRA term added at the restore positions only: log-probs [1, T, V]."""
    n, k = context.shape[1], adapter.tokens
    table = model.get_input_embeddings()
    inputs = torch.cat(
        [table(context), adapter.embeddings[None].to(table.weight.dtype), table(follow)], dim=1
    )
    rows = torch.zeros(inputs.shape[1], 1)
    rows[n : n + k] = 1.0

    def lora(a, b, scale):
        return lambda module, args, out: out + rows * ((args[0] @ a.T) @ b.T * scale)

    handles = [
        model.get_submodule(path).register_forward_hook(lora(a, b, adapter.scaling[path]))
        for path, (a, b) in adapter.lora.items()
    ]
    _MASKS.clear()
    _MASKS.update(vis.masks)
    previous = model.config._attn_implementation
    model.set_attn_implementation(ORACLE)
    try:
        return model(inputs_embeds=inputs, use_cache=False).logits.float().log_softmax(-1)
    finally:
        model.set_attn_implementation(previous)
        for handle in handles:
            handle.remove()


@torch.no_grad()
@pytest.mark.parametrize(
    "model_name, allocation", [("tiny_llama", "global"), ("tiny_llama", "uniform"), ("tiny_qwen3", "layer")]
)
def test_masking_oracle_after_the_compression(model_name, allocation):
    model, _ = load(model_name)
    n, decode = 30, 6
    ids = _ids(model, n + decode)
    adapter = _random_adapter(model)
    kv = model.config.num_key_value_heads
    vis = Visibility(1, kv, n + N_RESTORE + decode)
    method = _method(model, adapter, chunk_size=11, allocation=allocation)
    cache = make_cache(model, method, 20, recorder=vis)  # sinks 4 + restore 8 + 8 context entries (>= decode)
    for s in range(0, n, 7):  # the prompt in chunks, held
        model(ids[:, s : min(s + 7, n)], past_key_values=cache)
    method.probe(cache, _probing(model, cache, ids[:, :n]))
    logits = torch.cat(
        [model(ids[:, t : t + 1], past_key_values=cache).logits for t in range(n, n + decode)], 1
    )
    ref = _oracle_with_restore(model, ids[:, :n], ids[:, n:], adapter, vis)[:, n + N_RESTORE :]
    assert (logits.float().log_softmax(-1) - ref).abs().max() < TOL
    for layer in cache.layers:  # the budget held through the decode (when=always)
        assert int(layer.live()[0].sum()) == layer.budget * layer.kv_heads


def _sample(words=90, seed=0):
    g = torch.Generator().manual_seed(seed)
    vocab = ["the", "cat", "sat", "on", "a", "mat", "while", "red", "dogs", "ran", "far", "away", "home"]
    text = " ".join(vocab[i] for i in torch.randint(0, len(vocab), (words,), generator=g).tolist())
    return GenerationSample(f"s{seed}", text, "Where did the dogs run?", ["away"], max_new_tokens=4)


@torch.no_grad()
def test_generation_keeps_the_budget_with_the_restore_entries_in_it():
    model, tok = load("tiny_llama")
    samples = [_sample(seed=i) for i in range(2)]
    prompts = [PromptEncoder(tok).encode(s) for s in samples]
    method = build_method("restorekv", checkpoint=INIT, chunk_size=64)
    results = run_generation(model, tok, samples, prompts, method, lambda n: 24)
    for result, prompt in zip(results, prompts, strict=True):
        kv, question = result.kv, prompt.question.shape[1]
        # the budget (the restore entries in it) and the question
        assert kv["tokens_kept"] == pytest.approx(24 + question)
        seen = prompt.context.shape[1] + N_RESTORE + question + result.new_tokens - 1
        assert kv["tokens_seen"] == seen


def test_the_untrained_adapter_is_seeded_and_adds_nothing_yet():
    model, _ = load("tiny_llama")
    first, second = init_adapter(model, 8), init_adapter(model, 8)
    assert all(
        torch.equal(x, y)
        for x, y in zip(first.parameters().values(), second.parameters().values(), strict=True)
    )
    assert all(not b.any() for _, b in first.lora.values())  # B = 0: the LoRA starts as the identity
    assert set(first.lora) == {f"model.layers.{i}.{m}" for i in range(2) for m in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}  # fmt: skip
    rows = model.get_input_embeddings().weight.float()
    assert all(any(torch.equal(e, r) for r in rows) for e in first.embeddings)  # vocabulary embeddings


@pytest.mark.parametrize(
    "params, budget, match",
    [
        ({"restore_tokens": 0}, 64, "method.restore_tokens must be an integer >= 1"),
        ({"restore_tokens": 8}, 8, r"method.restore_tokens \(8\) must be smaller than the budget \(8\)"),
        ({"chunk_size": 0}, 64, "method.chunk_size"),
        ({"allocation": "head"}, 64, "method.allocation must be one of global, layer, uniform"),
    ],
)
def test_validation(params, budget, match):
    with pytest.raises(ValueError, match=match):
        build_method("restorekv", **params).validate(budget)


def test_a_bad_checkpoint_fails_naming_the_option(tmp_path):
    model, _ = load("tiny_llama")
    with pytest.raises(ValueError, match="method.checkpoint=.*is not a RestoreKV checkpoint directory"):
        build_method("restorekv", checkpoint=str(tmp_path))
    save_adapter(_random_adapter(model, tokens=4), tmp_path / "four")
    with pytest.raises(ValueError, match="holds 4 restore tokens; set method.restore_tokens=4"):
        build_method("restorekv", checkpoint=str(tmp_path / "four")).validate(64)
    narrow = load_adapter(tmp_path / "four")
    narrow.embeddings = torch.nn.Parameter(narrow.embeddings[:, :32])
    save_adapter(narrow, tmp_path / "narrow")
    method = build_method("restorekv", checkpoint=str(tmp_path / "narrow"), restore_tokens=4)
    with pytest.raises(ValueError, match="its restore embeddings are 32 wide, the model's 64"):
        make_cache(model, method, 16)


TRAIN_RUN = ["model=tiny_llama", "method=restorekv", "budget=32", "dataset=passkey", "dataset.lengths=[512]"]
TRAIN_RUN += ["train=restorekv"]


def test_the_config_composes_and_only_generation_or_its_trainer_run_it():
    from kvexp.config import validate

    validate(_compose("method=restorekv", "dataset=passkey"))
    with pytest.raises(ValueError, match="dataset.task=perplexity cannot use it"):
        validate(_compose("method=restorekv"))
    with pytest.raises(ValueError, match="train=distill cannot use it"):
        validate(_compose("method=restorekv", "dataset=passkey", "train=distill"))
    validate(_compose(*TRAIN_RUN))


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["method=kvzip"], "train=restorekv trains method=restorekv"),
        (["train.continuation=512"], "must leave a context"),
        (["train.max_tokens=40", "train.continuation=8"], "must exceed budget.tokens=32"),
        (["train.lr=0"], "train.lr must be a number > 0"),
        (["+train.epochs=2"], r"no option\(s\) \['epochs'\]"),
        (["train.lora.rank=0"], "train.lora.rank must be a positive integer"),
        (["train.lora.target_modules=q_proj"], "train.lora.target_modules must be a list"),
        (["budget=full"], "needs a budget"),
    ],
)
def test_trainer_options_fail_before_the_model_loads(overrides, match):
    from kvexp.config import validate

    with pytest.raises(ValueError, match=match):
        validate(_compose(*TRAIN_RUN, *overrides))


TRAIN = ["train.data_file=wikitext2", "train.texts=2", "train.max_tokens=96", "train.continuation=16"]
TRAIN += ["train.lr=1e-2", "method.chunk_size=40"]


def test_a_few_training_steps_reduce_the_distillation_loss(tmp_path):
    from kvexp.train.restorekv import train

    cfg = _compose(*TRAIN_RUN, *TRAIN)
    cfg.train.steps = 6
    trained = train(cfg, tmp_path / "checkpoint")
    metrics = trained.metrics
    assert metrics["kl_after"] < 0.7 * metrics["kl_before"]
    assert metrics["trainable_parameters"] == N_RESTORE * 64 + sum(
        8 * (m.in_features + m.out_features)
        for name, m in load("tiny_llama")[0].named_modules()
        if name.rsplit(".", 1)[-1] in LORA_TARGETS
    )
    assert trained.method_overrides == {"checkpoint": str(tmp_path / "checkpoint")}
    adapter = load_adapter(tmp_path / "checkpoint")
    assert any(b.any() for _, b in adapter.lora.values())  # the LoRA moved from its zero start
    assert not torch.equal(adapter.embeddings, init_adapter(load("tiny_llama")[0], N_RESTORE).embeddings)


def test_train_then_evaluate_runs_end_to_end(tmp_path):
    from kvexp.app import train_or_eval

    cfg = _compose(*TRAIN_RUN, "eval.max_samples=1", "train.steps=2", *TRAIN)
    summary = train_or_eval(cfg, tmp_path / "out")
    checkpoint = tmp_path / "out" / "checkpoint"
    assert summary["checkpoint"]["method"] == {"checkpoint": str(checkpoint)}
    assert summary["train"]["steps"] == 2 and math.isfinite(summary["train"]["kl_after"])
    for name in ("metrics_before", "metrics_untrained", "metrics_after"):
        assert name in summary
    kv = summary["kv_cache"]  # the trained run's: the budget (restore entries in it) and the question
    assert 32 < kv["tokens_kept_mean"] < kv["tokens_full"] / 2
    # The checkpoint the run wrote is what `method.checkpoint=` reads (the published layout).
    assert sorted(p.name for p in checkpoint.iterdir()) == sorted(CHECKPOINT_FILES)
