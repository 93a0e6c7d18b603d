"""Loaded tiny models (text, and every vision-language family), tokenizer and a
fresh engine for the engine tests."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from bench.tiny_vlms import FAMILIES
from tests.support.vlm_runs import Vlm, load
from worker.engine.engine import Engine


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir: Path) -> PreTrainedModel:
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()


@pytest.fixture(scope="session")
def tokenizer(tiny_model_dir: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture
def engine(tiny_model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> Engine:
    return Engine(tiny_model, tokenizer)


@pytest.fixture(scope="session")
def loaded_vlm(tiny_vlm_dir: Callable[[str], Path]) -> Callable[[str], Vlm]:
    """A family's tiny vision-language model and processor, loaded once a session."""
    loaded: dict[str, Vlm] = {}

    def vlm(family: str) -> Vlm:
        if family not in loaded:
            loaded[family] = load(tiny_vlm_dir(family))
        return loaded[family]

    return vlm


@pytest.fixture(params=sorted(FAMILIES))
def vlm(request, loaded_vlm: Callable[[str], Vlm]) -> Vlm:
    """Each family's tiny vision-language model in turn."""
    return loaded_vlm(request.param)


@pytest.fixture
def llava(loaded_vlm: Callable[[str], Vlm]) -> Vlm:
    return loaded_vlm("llava")


@pytest.fixture(scope="session")
def served(smollm2_shaped_model_dir: Path):
    """The bundled model's shapes (random weights) loaded as a worker serves them, in
    bfloat16: fused layers, packed weights, the batch-invariant mode's padded products."""
    from shared.settings import WorkerSettings
    from worker import main as worker_main

    settings = WorkerSettings(redis_url="x", model=str(smollm2_shaped_model_dir), dtype="bfloat16")
    loaded = worker_main.load_for_serving(settings)
    assert loaded.dtype == torch.bfloat16
    return loaded
