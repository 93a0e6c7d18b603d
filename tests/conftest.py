"""Fixtures shared by every test suite: a tiny random model on disk."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import transformers

from bench.tiny_models import build_tiny_llama, smollm2_tokenizer

# On a 2-core machine torch's default thread pool makes tiny models erratically
# slow on a small machine; tests never need more than one.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def smollm2_tokenizer_dir(pytestconfig: pytest.Config, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The SmolLM2 tokenizer as a plain folder (left padding), converted from
    the GGUF once and kept in pytest's cache between sessions."""
    cache = getattr(pytestconfig, "cache", None)
    root = cache.mkdir("mmserve") if cache is not None else tmp_path_factory.mktemp("mmserve")
    directory = root / f"smollm2-tokenizer-transformers-{transformers.__version__}"
    smollm2_tokenizer(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, smollm2_tokenizer_dir: Path) -> Path:
    """A tiny random LlamaForCausalLM with the SmolLM2 tokenizer, saved so that
    AutoModelForCausalLM / AutoTokenizer.from_pretrained(path) load it."""
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), tokenizer_cache_dir=smollm2_tokenizer_dir)


@pytest.fixture(scope="session")
def smollm2_shaped_model_dir(tmp_path_factory: pytest.TempPathFactory, smollm2_tokenizer_dir: Path) -> Path:
    """A random 2-layer Llama with the bundled model's layer shapes (whose bfloat16 kernels
    vary with the batch, as the tiny Llama's do not)."""
    from bench.tiny_models import build_smollm2_shaped_llama

    return build_smollm2_shaped_llama(
        tmp_path_factory.mktemp("smollm2-shaped"), tokenizer_cache_dir=smollm2_tokenizer_dir
    )


@pytest.fixture(scope="session")
def tiny_vlm_dir(
    tmp_path_factory: pytest.TempPathFactory, smollm2_tokenizer_dir: Path
) -> Callable[[str], Path]:
    """The folder of a family's tiny random vision-language model and its processor
    (bench.tiny_vlms.FAMILIES names them), built on first use."""
    from bench.tiny_vlms import FAMILIES

    built: dict[str, Path] = {}

    def directory(family: str) -> Path:
        if family not in built:
            built[family] = FAMILIES[family](
                tmp_path_factory.mktemp(f"tiny-{family}"), tokenizer_cache_dir=smollm2_tokenizer_dir
            )
        return built[family]

    return directory


@pytest.fixture(scope="session")
def tiny_llava_dir(tiny_vlm_dir: Callable[[str], Path]) -> Path:
    """A tiny random LLaVA (CLIP tower + Llama + SmolLM2 tokenizer with <image>) and
    its processor, loadable by AutoModelForImageTextToText / AutoProcessor."""
    return tiny_vlm_dir("llava")


@pytest.fixture(scope="session")
def tiny_idefics3_dir(tiny_vlm_dir: Callable[[str], Path]) -> Path:
    """A tiny random Idefics3 (the SmolVLM family, with image splitting) and its processor."""
    return tiny_vlm_dir("idefics3")


@pytest.fixture(scope="session")
def tiny_smolvlm_dir(tiny_vlm_dir: Callable[[str], Path]) -> Path:
    """A tiny random SmolVLM (transformers' smolvlm classes) and its processor, saved
    without a video processor: load it with worker.engine.models.loading.load_processor."""
    return tiny_vlm_dir("smolvlm")


@pytest.fixture(scope="session")
def tiny_lora_dir(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """A --lora-dir for the tiny Llama: two random adapters, "alpha" and "beta"."""
    from tests.support.tiny_loras import build_tiny_lora

    root = tmp_path_factory.mktemp("tiny-loras")
    build_tiny_lora(tiny_model_dir, root / "alpha", seed=1)
    build_tiny_lora(tiny_model_dir, root / "beta", seed=2, target_modules=["k_proj", "up_proj"])
    return root


@pytest.fixture(scope="session")
def tiny_llava_lora_dir(tmp_path_factory: pytest.TempPathFactory, tiny_llava_dir: Path) -> Path:
    """A --lora-dir for the tiny LLaVA: "text" adapts the language model only;
    "vision" also adapts the vision tower (which mmserve refuses)."""
    from tests.support.tiny_loras import build_tiny_lora

    root = tmp_path_factory.mktemp("tiny-llava-loras")
    language_only = r".*language_model.*\.(q_proj|v_proj)"
    build_tiny_lora(tiny_llava_dir, root / "text", seed=3, vision=True, target_modules=language_only)
    build_tiny_lora(tiny_llava_dir, root / "vision", seed=4, vision=True, target_modules=["q_proj", "v_proj"])
    return root
