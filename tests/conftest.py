"""Shared fixtures. The bundled model is converted once per machine into the rsavq cache."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Triton decides at decoration time whether a kernel is compiled or interpreted, so the switch
# must be set before any test imports ``kernels``. By default every run interprets (the tests
# marked ``interpret`` check each kernel against its reference, on any host, a GPU host included);
# ``make test-gpu`` sets RSAVQ_TEST_COMPILED=1 for the run of the tests marked ``gpu``, which
# compile the kernels for the GPU, and runs the interpreter tests in a second process. Model
# code still takes the reference path unless a test also sets RSAVQ_KERNELS=interpret.
COMPILED = os.environ.get("RSAVQ_TEST_COMPILED") == "1"
if not COMPILED:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config: pytest.Config) -> None:
    if COMPILED and not torch.cuda.is_available():
        raise pytest.UsageError("RSAVQ_TEST_COMPILED=1 (make test-gpu) needs a CUDA GPU: none is visible here")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU and compiled kernels (make test-gpu)")
    skip_interp = pytest.mark.skip(reason="needs TRITON_INTERPRET=1 set before the kernels are imported")
    for item in items:
        if "gpu" in item.keywords and not (COMPILED and torch.cuda.is_available()):
            item.add_marker(skip_gpu)
        if "interpret" in item.keywords and os.environ.get("TRITON_INTERPRET") != "1":
            item.add_marker(skip_interp)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matmuls on 2 contended cores are ~1000x slower with 2 OpenMP threads than with 1."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def smol_dir() -> Path:
    """Folder of the bundled SmolLM2-135M checkpoint (safetensors), converted on first use."""
    from rsavq_core.models.resolve import resolve_model

    return resolve_model("smollm2-135m")


@pytest.fixture(scope="session")
def smol(smol_dir: Path):
    """(model, tokenizer) of the bundled model in float32, eval mode. Do not mutate it."""
    from rsavq_core.models.resolve import load_model

    model, tokenizer, _ = load_model(str(smol_dir))
    return model, tokenizer


@pytest.fixture(scope="session")
def tiny_llama(smol_dir: Path):
    """A randomly initialised 2-block LLaMA with the bundled tokenizer's vocabulary (fast tests)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(str(smol_dir))
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config).eval()
    return model, tokenizer


@pytest.fixture
def rsavq_settings():
    """Change the library's settings inside one test: ``rsavq_settings(kernels="off")``; restored after.

    The settings are read once per process, so tests change them here, not in the environment.
    """
    from rsavq_core import settings as core

    before = core.get_settings()

    def change(**changes: object) -> None:
        current = core.get_settings()
        core.configure(core.load_settings(type(current), **{**current.model_dump(), **changes}))

    yield change
    core.configure(before)
