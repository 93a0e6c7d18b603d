"""LoRA adapters over the engine's model: which exist, which are in memory.

The catalogue is a folder (`--lora-dir`: each sub-folder holding a PEFT
`adapter_config.json` is an adapter named after it; read again on every look, so an
adapter copied in later is served without a restart) plus adapters named one by one
(`--lora name=path`, which win). An adapter loads on first use into PEFT's LoRA
layers and stays in an LRU of at most `max_loaded`; the least recently used one that
no running row needs is evicted. Rows with different adapters, and rows with none,
share one forward (PEFT's mixed-adapter inference). Knows PEFT and torch, not Redis.

Easy to get wrong: an adapter may change a vision-language model's language model
only; one with LoRA layers in the vision tower or the projector is refused when it
loads rather than half-applied (a request's images are encoded by the base tower)."""

from __future__ import annotations

import contextlib
import json
import logging
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from transformers import PreTrainedModel

from shared import defaults

log = logging.getLogger(__name__)

BASE = "__base__"  # PEFT's adapter name for "no adapter" in adapter_names
ADAPTER_CONFIG = "adapter_config.json"


class AdapterError(Exception):
    """A row's adapter cannot be used; the message is meant for the client."""

    status = 500
    error_type = "lora_error"


class UnknownAdapter(AdapterError):
    status = 404
    error_type = "unknown_lora"


class AdapterLoadFailed(AdapterError):
    """The adapter exists but does not load over this model (wrong base, broken files...)."""

    status = 422
    error_type = "invalid_lora"


class AdaptersBusy(AdapterError):
    """Every slot holds an adapter that running rows use: the rows must wait."""

    status = 503
    error_type = "lora_slots_busy"


@dataclass(frozen=True)
class AdapterCatalog:
    """Where adapters live: a folder of adapter folders and/or named paths."""

    directory: Path | None = None
    named: Mapping[str, Path] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for lora_id in self.named:
            if not valid_id(lora_id):
                raise ValueError(f"LoRA id {lora_id!r} must match {defaults.LORA_ID_PATTERN}")

    def paths(self) -> dict[str, Path]:
        """Every adapter id with its folder."""
        found: dict[str, Path] = {}
        if self.directory is not None and self.directory.is_dir():
            for entry in sorted(self.directory.iterdir()):
                if valid_id(entry.name) and (entry / ADAPTER_CONFIG).is_file():
                    found[entry.name] = entry
        found.update({lora_id: Path(path) for lora_id, path in self.named.items()})
        return found

    def path(self, lora_id: str) -> Path:
        path = self.paths().get(lora_id)
        if path is None:
            raise UnknownAdapter(f"unknown lora_id '{lora_id}': this worker has no such adapter")
        return path

    @property
    def empty(self) -> bool:
        return self.directory is None and not self.named


def valid_id(lora_id: str) -> bool:
    return lora_id != BASE and re.fullmatch(defaults.LORA_ID_PATTERN, lora_id) is not None


def parse_named(specs: Collection[str]) -> dict[str, Path]:
    """`--lora name=path` values as {name: path}."""
    named: dict[str, Path] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--lora takes name=path, not {spec!r}")
        named[name] = Path(path)
    return named


class LoraAdapters:
    """The adapters in memory over one base model, and the model to run rows with."""

    def __init__(self, model: PreTrainedModel, catalog: AdapterCatalog, max_loaded: int = 4):
        if max_loaded < 1:
            raise ValueError("max_loaded must be at least 1")
        self.base = model
        self.catalog = catalog
        self.max_loaded = max_loaded
        self.peft_model = None  # a peft.PeftModel over `base` once the first adapter loads
        self._loaded: OrderedDict[str, float] = OrderedDict()  # id -> load seconds, least recent first
        self._loads = 0  # adapters read so far: numbers each load, for the prefix cache's keys
        self._load_numbers: dict[str, int] = {}
        self._language_modules = _language_modules(model)
        self.lock = threading.RLock()  # held by whoever runs or changes the model
        self._active: list[str] | None = None  # PEFT's active adapters, as we last set them
        self._row_adapters: list[str] | None = None  # each row's adapter during a mixed forward
        self._hooked: set[int] = set()  # ids of the LoRA layers that carry our hook
        # PEFT freezes the base model's parameters (requires_grad=False). That costs
        # nothing in training, but in inference it sends torch's linear over a
        # non-contiguous input (the prefill's last-token slice that `logits_to_keep`
        # takes) to a batched matmul that copies the weight once per row (worst for
        # the vocabulary head, at every prefill). The flags are put back
        # after every load (inference mode records no gradients either way).
        self._base_flags = [(parameter, parameter.requires_grad) for parameter in model.parameters()]

    # -- what there is --------------------------------------------------------

    def available(self) -> list[str]:
        return sorted(self.catalog.paths())

    def cache_namespace(self, lora_id: str | None) -> tuple | None:
        """What names the keys and values a row with this adapter computes, for the
        prefix cache: the adapter and which load of it (its files may change between
        loads); None for the base model."""
        if lora_id is None:
            return None
        return ("lora", lora_id, self._load_numbers.get(lora_id))

    def knows(self, lora_id: str) -> bool:
        return lora_id in self._loaded or lora_id in self.catalog.paths()

    @property
    def loaded(self) -> list[str]:
        """Adapters in memory, least recently used first (safe from any thread:
        waits for a load or a step in progress)."""
        with self.lock:
            return list(self._loaded)

    def fits(self, wanted: Collection[str], in_use: Collection[str]) -> bool:
        """Whether `wanted` can all be in memory at once beside the adapters of running rows."""
        missing = [lora_id for lora_id in set(wanted) if lora_id not in self._loaded]
        if not missing:
            return True
        keep = set(in_use) | set(wanted)
        room = self.max_loaded - len(self._loaded) + sum(1 for lora_id in self._loaded if lora_id not in keep)
        return len(missing) <= room

    # -- loading ----------------------------------------------------------------

    def ensure(self, wanted: Collection[str], in_use: Collection[str]) -> None:
        """Load every adapter of `wanted` that is not in memory, evicting the
        least recently used ones no running row (`in_use`) needs; mark them all used."""
        wanted = list(dict.fromkeys(wanted))
        with self.lock:
            if not self.fits(wanted, in_use):
                raise AdaptersBusy(
                    f"all {self.max_loaded} LoRA slots hold adapters that running requests use"
                )
            for lora_id in wanted:
                if lora_id not in self._loaded:
                    self._load(lora_id, keep=set(in_use) | set(wanted))
                self._loaded.move_to_end(lora_id)

    def load(self, lora_id: str, in_use: Collection[str]) -> float:
        """Load one adapter now (e.g. asked for by an operator); its load time in
        seconds (0 when it was in memory already)."""
        with self.lock:
            if lora_id in self._loaded:
                self._loaded.move_to_end(lora_id)
                return 0.0
            self.ensure([lora_id], in_use)
            return self._loaded[lora_id]

    def _load(self, lora_id: str, keep: Collection[str]) -> None:
        path = self.catalog.path(lora_id)
        started = time.monotonic()
        try:
            self._read(lora_id, path)
        except Exception as exc:
            self._forget_partial(lora_id)
            raise AdapterLoadFailed(f"LoRA adapter '{lora_id}' does not load over this model: {exc}") from exc
        outside = self._modules_outside_language_model(lora_id)
        if outside:
            self._forget_partial(lora_id)
            raise AdapterLoadFailed(
                f"LoRA adapter '{lora_id}' changes {outside[0]} (outside the language model); "
                "adapters of vision-language models may change the language model only"
            )
        self._hook_new_layers()
        for parameter, requires_grad in self._base_flags:
            parameter.requires_grad_(requires_grad)
        self._active = None  # PEFT may have changed its active adapter
        seconds = time.monotonic() - started
        self._loaded[lora_id] = seconds
        self._loads += 1
        self._load_numbers[lora_id] = self._loads
        log.info("loaded LoRA adapter %s from %s in %.2f s", lora_id, path, seconds)
        while len(self._loaded) > self.max_loaded:
            victim = next(name for name in self._loaded if name not in keep)
            del self._loaded[victim]
            self._delete(victim)
            log.info("evicted LoRA adapter %s (most %d in memory)", victim, self.max_loaded)

    def _read(self, lora_id: str, path: Path) -> None:
        """Put the adapter's LoRA layers over the base model and read its weights.
        The first adapter wraps the base in a PeftModel (in two steps, as
        PeftModel.from_pretrained does, so that a failed read can be undone)."""
        from peft import LoraConfig, PeftModel  # a server without adapters never imports PEFT

        kind = json.loads((path / ADAPTER_CONFIG).read_text()).get("peft_type")
        if kind != "LORA":
            raise ValueError(f"it is a {kind} adapter; only LoRA adapters are served")
        if self.peft_model is None:
            config = LoraConfig.from_pretrained(path)
            config.inference_mode = True
            self.peft_model = PeftModel(self.base, config, adapter_name=lora_id).eval()
        self.peft_model.load_adapter(path, adapter_name=lora_id)

    def _delete(self, lora_id: str) -> None:
        assert self.peft_model is not None
        self.peft_model.delete_adapter(lora_id)
        self._active = None  # PEFT picks another active adapter when the active one goes

    def _forget_partial(self, lora_id: str) -> None:
        """Remove what a failed load left behind."""
        if self.peft_model is None or lora_id not in self.peft_model.peft_config:
            return
        if self._loaded:
            self._delete(lora_id)
        else:  # the first adapter: give the base model back untouched
            self.peft_model.unload()
            self.peft_model = None
            self._hooked.clear()

    def _modules_outside_language_model(self, lora_id: str) -> list[str]:
        from peft.tuners.lora import LoraLayer

        assert self.peft_model is not None
        return [
            name
            for name, module in self.base.named_modules()
            if isinstance(module, LoraLayer)
            and (lora_id in module.lora_A or lora_id in module.lora_embedding_A)
            and not any(
                prefix == "" or name == prefix or name.startswith(prefix + ".")
                for prefix in self._language_modules
            )
        ]

    # -- running ---------------------------------------------------------------

    @contextlib.contextmanager
    def applied(self, adapter_names: Sequence[str | None]) -> Iterator[None]:
        """Within this block, a forward of the base model over a batch runs
        each row with its adapter (None = none). A batch on one adapter (or
        none) runs it as PEFT's active adapter; a mixed batch goes through
        PEFT's mixed-adapter path, each LoRA layer told the rows' adapters by
        a hook of ours (PeftModel.forward would walk every module twice per
        call to install and remove its own hooks)."""
        if self.peft_model is None:
            if any(name is not None for name in adapter_names):
                raise AdapterError("a row asks for a LoRA adapter that is not loaded")
            yield
            return
        distinct = set(adapter_names)
        if len(distinct) == 1:
            (only,) = distinct
            self._activate([] if only is None else [only])
            yield
            return
        self._row_adapters = [name or BASE for name in adapter_names]
        try:
            yield
        finally:
            self._row_adapters = None

    def _activate(self, names: list[str]) -> None:
        """Make `names` PEFT's active adapters (a walk over the model: only when they change)."""
        if self._active != names:
            assert self.peft_model is not None
            self.peft_model.base_model.set_adapter(names, inference_mode=True)
            self._active = names

    def _hook_new_layers(self) -> None:
        """Give every LoRA layer that has none our hook that passes it the rows' adapters."""
        from peft.tuners.lora import LoraLayer

        for module in self.base.modules():
            if isinstance(module, LoraLayer) and id(module) not in self._hooked:
                module.register_forward_pre_hook(self._pass_row_adapters, with_kwargs=True)
                self._hooked.add(id(module))

    def _pass_row_adapters(self, module, args, kwargs):
        if self._row_adapters is None:
            return None
        return args, {**kwargs, "adapter_names": self._row_adapters}


def _language_modules(model: PreTrainedModel) -> list[str]:
    """Qualified names of the modules an adapter may change (with everything
    below them): the whole model ("") for a text model, the decoder and the
    output head for a vision-language one. Names, not objects: PEFT replaces
    the modules it adapts."""
    if getattr(model.config, "vision_config", None) is None:
        return [""]
    wanted = {id(model.get_decoder()), id(model.get_output_embeddings())}
    return [name for name, module in model.named_modules() if id(module) in wanted]
