"""Loaded tiny model, tokenizer and a fresh engine for the engine tests."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

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
