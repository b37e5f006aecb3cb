"""Shared fixtures: offline environment, tiny random models (cached per session), the embedded SmolLM2."""

import atexit
import functools
import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

from kvexp.models import cache_root

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_SILENT", "true")
ROOT = Path(__file__).resolve().parents[1]
# The local evaluation data (CNN/DailyMail, XSum, PG-19 test books, the Gutenberg corpus, the essays) is not
# part of the repository: tests that need it are marked `data` and run only when $KVEXP_DATA_DIR points at it.
DATA_DIR = Path(os.environ["KVEXP_DATA_DIR"]).expanduser() if os.environ.get("KVEXP_DATA_DIR") else None

# What methods compute once per model (calibrations, DuoAttention's gates) goes to a cache folder of the session's
# own, so no test reads what an earlier run or an older kvexp left in the user's cache; the converted GGUF weights
# (keyed by the file's digest) stay shared through a link. Subprocesses (`python -m kvexp`) inherit the folder.
_user_gguf = cache_root() / "gguf"
_user_gguf.mkdir(parents=True, exist_ok=True)
TEST_CACHE = Path(tempfile.mkdtemp(prefix="kvexp-test-cache-"))
(TEST_CACHE / "gguf").symlink_to(_user_gguf, target_is_directory=True)
os.environ["KVEXP_CACHE_DIR"] = str(TEST_CACHE)
atexit.register(shutil.rmtree, TEST_CACHE, ignore_errors=True)

torch.set_flush_denormal(True)
# KVEXP_TEST_DEVICE=cuda runs the model tests on a GPU in float32 (models built there, new tensors default
# there), so the masking-oracle tests hold the CUDA path to the same 1e-4 tolerance.
DEVICE = os.environ.get("KVEXP_TEST_DEVICE", "cpu")
HARDWARE = "cpu"
if DEVICE != "cpu":
    torch.set_default_device(DEVICE)
    HARDWARE = {
        "name": DEVICE,
        "device": DEVICE,
        "dtype": "float32",
        "num_threads": None,
        "flush_denormal": False,
    }

TINY_MODELS = [
    "tiny_llama",
    "tiny_qwen2",
    "tiny_qwen3",
    "tiny_mistral",
    "tiny_gpt_neox",
    "tiny_gpt2",
    "tiny_phi3",
    "tiny_gemma3",
]


@functools.cache
def load(name: str):
    from kvexp.models import load_model_by_name

    model, tokenizer = load_model_by_name(name, HARDWARE)
    return model, tokenizer


@pytest.fixture(params=TINY_MODELS)
def tiny(request):
    return load(request.param)


@pytest.fixture(scope="session")
def smollm2():
    return load("smollm2_135m")


def pytest_collection_modifyitems(config, items):
    """Skip the `data` tests, saying why, when $KVEXP_DATA_DIR is unset."""
    if DATA_DIR is not None:
        return
    skip = pytest.mark.skip(
        reason="needs the local evaluation data: set KVEXP_DATA_DIR to its folder (see tests/conftest.py)"
    )
    for item in items:
        if "data" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def qa_file(tmp_path):
    """A qa_jsonl file of three short samples (a code word repeated in each context)."""
    rows = [
        {
            "context": f"Note {i}: the code word is {w}. " * 8,
            "question": "What is the code word?",
            "answer": w,
        }
        for i, w in enumerate(["apple", "river", "candle"])
    ]
    path = tmp_path / "qa.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path
