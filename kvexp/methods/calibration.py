"""What methods calibrate once per model on local text (ZACK's bases, Q-Filters' directions, Expected Attention's
query statistics) and what they learn once per model (DuoAttention's gates): the calibration forward, the text, and
the on-disk cache they share (`cache_folder`: kvexp's cache folder by default, as the converted GGUF weights)."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import torch
from transformers import AttentionInterface, AutoTokenizer
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from kvexp.data import HAYSTACK_BOOK, hub_token, read_corpus, required_data_file
from kvexp.files import write_atomically
from kvexp.models import cache_root, model_fingerprint, save_torch, tiny_tokenizer

if TYPE_CHECKING:
    from transformers import PreTrainedModel

log = logging.getLogger(__name__)

CALIBRATION_ATTENTION = "kvexp_calibration"
DEFAULT_CACHE = "default"  # a method's cache option naming kvexp's cache folder (`cache_root`)


def cache_folder(setting: str | None, name: str) -> Path | None:
    """Where a method keeps what it computes once per model: `<setting>/<name>`, `setting` a folder or DEFAULT_CACHE
    (kvexp's cache folder: $KVEXP_CACHE_DIR, else $XDG_CACHE_HOME/kvexp or ~/.cache/kvexp); None: not on disk."""
    if not setting:
        return None
    root = cache_root() if setting == DEFAULT_CACHE else Path(setting).expanduser()
    return root / name


@torch.no_grad()
def record_attention_inputs(model, input_ids: torch.Tensor, record: Callable[..., None]) -> None:
    """One forward over `input_ids` [1, T] (no cache) that hands each layer's attention inputs to `record(module,
    query [B, H, T, D] post-RoPE, key, value)` and then attends as transformers' SDPA attention with its own masks
    (causal, and a model's sliding windows): the calibration pass of ZACK, Q-Filters and Expected Attention's statistics."""
    attend = ALL_ATTENTION_FUNCTIONS["sdpa"]

    def capture(module, query, key, value, attention_mask, **kwargs):
        record(module, query, key, value)
        return attend(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register(CALIBRATION_ATTENTION, capture)
    AttentionMaskInterface.register(CALIBRATION_ATTENTION, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    previous = model.config._attn_implementation
    model.set_attn_implementation(CALIBRATION_ATTENTION)
    try:
        model(input_ids.to(model.device), use_cache=False)
    finally:
        model.set_attn_implementation(previous)


def tokenizer_for(model):
    """The model's tokenizer, found from the model alone (`prepare` gets no tokenizer): kvexp's byte-level one for
    the tiny random models, the GGUF's for a directory holding one GGUF file (the embedded SmolLM2), else the hub
    id / directory the model came from."""
    source = model.config._name_or_path
    if not source:
        if model.config.vocab_size == len(tiny_tokenizer()):
            return tiny_tokenizer()
        raise ValueError(
            "calibration: cannot find the tokenizer of a model built from a config (no name_or_path)"
        )
    ggufs = sorted(Path(source).glob("*.gguf")) if Path(source).is_dir() else []
    if len(ggufs) == 1:
        return AutoTokenizer.from_pretrained(source, gguf_file=ggufs[0].name, local_files_only=True)
    return AutoTokenizer.from_pretrained(source, token=hub_token())


def calibration_text(path: Path, characters: int) -> str:
    """The first `characters` characters of a corpus (JSONL `text` records or plain text), documents joined
    by blank lines."""
    return "\n\n".join(text for _, text in read_corpus(path))[:characters]


def calibration_path(calibration_file: str | None) -> Path:
    """The text a method calibrates on: `method.calibration_file`, or the embedded public-domain novel (None)."""
    if calibration_file is None:
        return HAYSTACK_BOOK.path
    return required_data_file(calibration_file, "method.calibration_file")


def text_ids(model, path: Path, tokens: int, option: str) -> torch.Tensor:
    """The first `tokens` tokens [1, tokens] of the text at `path` in the model's tokenizer (no special tokens added
    by hand); `option` names the count in the error a shorter text raises."""
    ids = tokenizer_for(model)(calibration_text(path, 16 * tokens), return_tensors="pt").input_ids
    if ids.shape[1] < tokens:
        raise ValueError(
            f"method.calibration_file {path} holds {ids.shape[1]} tokens, fewer than {option}={tokens}"
        )
    return ids[:, :tokens]


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors saved in `path`: a safetensors file (by its suffix) or a torch file of a dict of tensors."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(path, weights_only=True)


def save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Write `tensors` as `load_tensors` reads them back (safetensors or torch, by the suffix of `path`); through a
    temporary file renamed into place, so a run killed while writing leaves no torn file for the next to load."""
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        write_atomically(
            path, lambda partial: save_file({k: v.contiguous() for k, v in tensors.items()}, partial)
        )
    else:
        save_torch(path, tensors)


class TextCalibration:
    """What a method calibrated once per model on the model's attention over local text shares (ZACK, Q-Filters,
    Expected Attention with statistics): the text (`calibration_file`: None for the embedded public-domain novel),
    its first `calibration_tokens` tokens, and a cache of the result under `calibration_cache`/`calibration_dir`/
    (None: recompute). The class declares those three fields and `_model_key` (the calibration it holds)."""

    calibration_dir: ClassVar[str] = ""  # the folder under calibration_cache
    calibration_suffix: ClassVar[str] = ".pt"  # the cache files' format (`save_tensors`)
    # The calibration code's version, in the cache key: raise it with any change to what a calibration computes, so
    # that a file an older kvexp wrote is computed again rather than loaded.
    calibration_version: ClassVar[int] = 1

    def check_calibration(self, min_tokens: int = 2) -> None:
        """Validation of the calibration options (`validate`)."""
        if self.calibration_tokens < min_tokens:
            raise ValueError(
                f"method.calibration_tokens must be >= {min_tokens}, got {self.calibration_tokens}"
            )
        if self.calibration_file is not None:
            self._calibration_path()

    def _calibration_path(self) -> Path:
        return calibration_path(self.calibration_file)

    def calibration_tag(self) -> str:
        """What else the calibration depends on, in its cache key ("": the model and the text alone)."""
        return ""

    def cache_file(self, model: PreTrainedModel) -> tuple[str, Path | None]:
        """The calibration's key (model, calibration file, token count, `calibration_tag`, `calibration_version`) and
        the file it is cached in (None: no cache)."""
        path = self._calibration_path()
        tag = hashlib.sha256(
            f"v{self.calibration_version}:{path.name}:{path.stat().st_size}:{self.calibration_tokens}"
            f"{self.calibration_tag()}".encode()
        ).hexdigest()
        key = f"{model_fingerprint(model)[:24]}-{tag[:12]}"
        if not self.calibration_cache:
            return key, None
        return key, cache_folder(
            self.calibration_cache, self.calibration_dir
        ) / f"{key}{self.calibration_suffix}"

    def calibration_ids(self, model: PreTrainedModel) -> torch.Tensor:
        """The tokens [1, T] the calibration runs on: the first `calibration_tokens` (at most the model's maximum
        positions) of the calibration text."""
        limit = getattr(model.config, "max_position_embeddings", None) or self.calibration_tokens
        return text_ids(
            model, self._calibration_path(), min(self.calibration_tokens, limit), "calibration_tokens"
        )

    def calibrated(
        self, model: PreTrainedModel, compute: Callable[[], dict[str, torch.Tensor]]
    ) -> dict[str, torch.Tensor] | None:
        """The calibration's tensors for `model`: None if this object holds it already, else loaded from its cache
        file, or `compute()`d and saved there."""
        key, cached = self.cache_file(model)
        if key == self._model_key:
            return None
        if cached is not None and cached.is_file():
            tensors = load_tensors(cached)
            log.info("%s: calibration loaded from %s", self.name, cached)
        else:
            tensors = compute()
            if cached is not None:
                save_tensors(cached, tensors)
                log.info("%s: calibration saved to %s", self.name, cached)
        self._model_key = key
        return tensors
