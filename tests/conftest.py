"""Shared fixtures: offline environment, tiny random models (cached per session), the embedded SmolLM2."""

import functools
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_SILENT", "true")
ROOT = Path(__file__).resolve().parents[1]
if "KVEXP_DATA_DIR" not in os.environ and (ROOT.parent / "shared" / "data").is_dir():
    os.environ["KVEXP_DATA_DIR"] = str(ROOT.parent / "shared" / "data")

torch.set_flush_denormal(True)

TINY_MODELS = ["tiny_llama", "tiny_qwen2", "tiny_qwen3", "tiny_mistral", "tiny_gpt_neox", "tiny_gpt2"]


@functools.cache
def load(name: str):
    from kvexp.models import load_model_by_name

    model, tokenizer = load_model_by_name(name, "cpu")
    return model, tokenizer


@pytest.fixture(params=TINY_MODELS)
def tiny(request):
    return load(request.param)


@pytest.fixture(scope="session")
def smollm2():
    return load("smollm2_135m")
