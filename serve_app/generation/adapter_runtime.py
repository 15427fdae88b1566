"""Puts a batch's LoRA adapters on the pipeline just before its call, with diffusers' LoRA loading.

Adapters are never fused into the base weights (fusing and unfusing drifts): peft keeps them
beside each layer. A worker keeps the adapters it loaded in an AdapterCache, so a switch to one it
holds costs only setting which adapters are active and at what scale.

Two ways, by compile mode:

- eager (``compile_mode`` off): every cached adapter is a peft adapter of the transformer;
  ``set_adapters`` activates a batch's adapters at its scales, and a batch without adapters runs
  with LoRA disabled, exactly the base model.
- compiled: a compiled graph must not change, so the transformer carries ``max_loras`` adapter
  slots from the start, every slot always active, sized for ``lora_max_rank`` and covering the
  layers the library's adapters change. diffusers' hot-swapping (``enable_lora_hotswap``, then
  ``load_lora_adapter(hotswap=True)``) copies a cached adapter's weights into a slot, and scales
  are tensors set in place (an unused slot has scale 0): nothing ever recompiles.
"""

from __future__ import annotations

import abc
import contextlib
import logging
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from serve_app.generation.adapter_cache import AdapterCache, OverBudget
from serve_app.generation.adapter_files import AdaptedLayer, AdapterFile
from serve_app.generation.adapter_library import AdapterLibrary, AdapterRefused, LoadedAdapter
from serve_app.models.tiny_loras import ATTENTION
from serve_app.schemas import Lora
from serve_app.settings import ServiceSettings
from serve_app.telemetry import NoTelemetry, Telemetry

logger = logging.getLogger(__name__)

_UPPER_BOUND_ELEMENT_BYTES = 4  # peft may keep half-precision adapters in float32


class AdapterRuntime(Protocol):
    """What the generator needs: put adapters on the pipeline, and say which it holds."""

    @property
    def loaded(self) -> list[str]:
        """Digests of the adapters this replica holds now."""

    def activate(self, loras: tuple[Lora, ...]) -> None:
        """Make the next pipeline call apply exactly ``loras``; AdapterRefused naming the entry
        that can't be applied (the pipeline is left as it was for the others)."""


def adapter_runtime(
    pipeline: Any, settings: ServiceSettings, telemetry: Telemetry | None = None
) -> AdapterRuntime | None:
    """The runtime for this deployment's adapters; None where it serves none. Call it before the
    transformer is compiled."""
    if not settings.serves_loras:
        return None
    library = AdapterLibrary(settings)
    if settings.compile_mode == "off":
        return NamedAdapters(pipeline, library, settings, telemetry or NoTelemetry())
    return HotswapSlots(pipeline, library, settings, telemetry or NoTelemetry())


def linear_layers(transformer: Any) -> dict[str, torch.nn.Linear]:
    """The transformer's linear layers by name (before any adapter wraps them)."""
    return {
        name: module
        for name, module in transformer.named_modules()
        if isinstance(module, torch.nn.Linear)
    }


@contextlib.contextmanager
def _side_by_side() -> Iterator[None]:
    """Load one more adapter beside others: the point here, which peft warns about (and, on a
    torchao-quantized transformer, that merging would fail: adapters are never merged here)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Already found a `peft_config`")
        warnings.filterwarnings("ignore", "TorchaoLoraLinear was instantiated without")
        yield


def _misfit(layer: AdaptedLayer, linears: dict[str, torch.nn.Linear]) -> str | None:
    module = linears.get(layer.module)
    if module is None:
        return f"the served model has no layer {layer.module!r}"
    if (module.in_features, module.out_features) != (layer.in_features, layer.out_features):
        return (
            f"layer {layer.module!r} is {module.in_features} -> {module.out_features} in the "
            f"served model, {layer.in_features} -> {layer.out_features} in the adapter"
        )
    return None


@dataclass
class _Counts:
    """Cache outcomes since the replica started (also reported to the telemetry)."""

    hits: int = 0
    misses: int = 0
    evictions: int = 0


class _CachedAdapters(abc.ABC):
    """What both ways share: fetching an adapter into the cache, checked against the model."""

    def __init__(
        self,
        pipeline: Any,
        library: AdapterLibrary,
        settings: ServiceSettings,
        telemetry: Telemetry,
    ) -> None:
        self.pipeline = pipeline
        self.transformer = pipeline.transformer
        self.library = library
        self.settings = settings
        self.telemetry = telemetry
        self.counts = _Counts()
        self.linears = linear_layers(self.transformer)
        self.cache: AdapterCache[Any] = AdapterCache(
            settings.lora_cache_size, settings.lora_cache_bytes, self._evict
        )
        self._prepare()

    def _prepare(self) -> None:  # noqa: B027 - a hook; eager mode needs nothing
        """Get the transformer ready for adapters (before it is compiled)."""

    def _evict(self, digest: str, value: Any) -> None:  # noqa: B027 - a hook, as _prepare
        """Unload an adapter the cache lets go."""

    @property
    def loaded(self) -> list[str]:
        """Digests of the adapters in the cache, least recently used first."""
        return self.cache.digests

    def _check_fit(self, loaded: LoadedAdapter, position: int) -> None:
        for layer in loaded.file.layers:
            problem = _misfit(layer, self.linears) or self._misfit(layer)
            if problem:
                raise AdapterRefused(
                    position,
                    "name",
                    f"adapter {loaded.lora.name!r} does not fit the served model: {problem}",
                )

    def _misfit(self, layer: AdaptedLayer) -> str | None:  # noqa: ARG002 - a hook for the slots
        """A reason beyond the model's shapes why ``layer`` can't be applied here."""
        return None

    def _tensors(self, loaded: LoadedAdapter) -> dict[str, torch.Tensor]:
        device, dtype = self.transformer.device, self.transformer.dtype
        return {key: tensor.to(device, dtype) for key, tensor in loaded.tensors.items()}

    def fetch(self, lora: Lora, position: int, keep: list[str]) -> Any:
        """The cached form of ``lora``, loading it (and evicting others, never ``keep``) if
        needed."""
        assert lora.digest is not None  # the ingress resolved it
        held = self.cache.get(lora.digest)
        if held is not None:
            self.counts.hits += 1
            self.telemetry.adapter_cache("hit")
            return held
        self.counts.misses += 1
        self.telemetry.adapter_cache("miss")
        loaded = self.library.load(lora, position)
        self._check_fit(loaded, position)
        try:
            evicted = self.cache.make_room(
                loaded.file.weight_bytes(_UPPER_BOUND_ELEMENT_BYTES), keep
            )
        except OverBudget as error:
            raise AdapterRefused(position, "name", f"adapter {lora.name!r}: {error}") from error
        for _ in evicted:
            self.counts.evictions += 1
            self.telemetry.adapter_cache("evicted")
        value, size = self._install(loaded, position)
        self.cache.add(lora.digest, value, size)
        logger.info("adapter %r (%s) loaded: %d bytes", lora.name, lora.digest[:19], size)
        return value

    @abc.abstractmethod
    def _install(self, loaded: LoadedAdapter, position: int) -> tuple[Any, int]:
        """Load an adapter for use; its cached form and its size in bytes."""

    @abc.abstractmethod
    def activate(self, loras: tuple[Lora, ...]) -> None:
        """Make the next pipeline call apply exactly ``loras`` (see AdapterRuntime)."""


class NamedAdapters(_CachedAdapters):
    """Eager mode: each cached adapter is a peft adapter of the transformer."""

    def _evict(self, digest: str, value: Any) -> None:  # noqa: ARG002
        self.transformer.delete_adapters(value)

    def _install(self, loaded: LoadedAdapter, position: int) -> tuple[str, int]:
        assert loaded.lora.digest is not None
        name = "lora_" + loaded.lora.digest.removeprefix("sha256:")[:16]
        try:
            with _side_by_side():
                self.transformer.load_lora_adapter(
                    self._tensors(loaded),
                    prefix="transformer",
                    adapter_name=name,
                    metadata=loaded.file.diffusers_metadata(),
                )
        except Exception as error:  # diffusers and peft raise many kinds
            raise AdapterRefused(
                position, "name", f"adapter {loaded.lora.name!r} could not be loaded: {error}"
            ) from error
        size = sum(
            parameter.numel() * parameter.element_size()
            for key, parameter in self.transformer.named_parameters()
            if f".{name}." in key
        )
        return name, size

    def activate(self, loras: tuple[Lora, ...]) -> None:
        if not loras:
            if self.cache.digests:
                self.transformer.disable_lora()  # exactly the base model, at no extra cost
            return
        wanted = [lora.digest for lora in loras if lora.digest is not None]
        names = [self.fetch(lora, position, wanted) for position, lora in enumerate(loras)]
        self.transformer.enable_lora()
        self.transformer.set_adapters(names, weights=[lora.scale for lora in loras])


@dataclass
class _Slot:
    """One adapter slot of the compiled transformer and what it holds now."""

    name: str
    digest: str | None = None
    scale: float = 0.0
    last_used: int = 0
    base_scaling: dict[Any, float] = field(default_factory=dict)
    """Each LoRA layer's own alpha / rank for the adapter in the slot."""


@dataclass(frozen=True)
class _Weights:
    """A cached adapter for the slots: its tensors on the device, and its peft settings."""

    tensors: dict[str, torch.Tensor]
    file: AdapterFile


class HotswapSlots(_CachedAdapters):
    """Compiled mode: ``max_loras`` slots, always active, filled by hot-swapping. Evicting an
    adapter only drops its cached weights: the slots keep their shapes."""

    def _prepare(self) -> None:
        self.rank = self.settings.lora_max_rank
        self.targets = self._slot_layers()
        self.slots = [_Slot(f"slot_{number}") for number in range(self.settings.max_loras)]
        self._lora_layers: list[Any] = []
        self._batches = 0
        self._create_slots()

    def _slot_layers(self) -> list[str]:
        """The layers the library's adapters change (those that fit the model); the attention
        projections if it has none."""
        covered: set[str] = set()
        for adapter in self.library.adapters().values():
            if not any(_misfit(layer, self.linears) for layer in adapter.layers):
                covered.update(layer.module for layer in adapter.layers)
        if not covered:
            covered = {name for name in self.linears if name.endswith(ATTENTION)}
        logger.info("hot-swap slots cover %d layers at rank %d", len(covered), self.rank)
        return sorted(covered)

    def _create_slots(self) -> None:
        # Zero adapters at the full rank over every slot layer: the graph compiled now is the one
        # every later adapter runs in.
        empty = {}
        for module in self.targets:
            linear = self.linears[module]
            empty[f"transformer.{module}.lora_A.weight"] = torch.zeros(
                self.rank, linear.in_features
            )
            empty[f"transformer.{module}.lora_B.weight"] = torch.zeros(
                linear.out_features, self.rank
            )
        metadata = {
            "transformer.r": self.rank,
            "transformer.lora_alpha": float(self.rank),
            "transformer.target_modules": self.targets,
        }
        self.pipeline.enable_lora_hotswap(target_rank=self.rank)
        device, dtype = self.transformer.device, self.transformer.dtype
        for slot in self.slots:
            with _side_by_side():
                self.transformer.load_lora_adapter(
                    {key: tensor.to(device, dtype) for key, tensor in empty.items()},
                    prefix="transformer",
                    adapter_name=slot.name,
                    metadata=dict(metadata),
                )
        names = [slot.name for slot in self.slots]
        self.transformer.set_adapters(names, weights=[0.0] * len(names))
        from peft.tuners.lora import LoraLayer

        self._lora_layers = [
            module for module in self.transformer.modules() if isinstance(module, LoraLayer)
        ]
        for slot in self.slots:
            self._set_scale(slot, 0.0, force=True)

    def _misfit(self, layer: AdaptedLayer) -> str | None:
        if layer.module not in self.targets:
            return (
                f"layer {layer.module!r} is not in the hot-swap slots, which cover the layers "
                "the library's adapters changed when the worker started (restart the workers "
                "after adding adapters that change other layers)"
            )
        return None

    def _install(self, loaded: LoadedAdapter, position: int) -> tuple[_Weights, int]:  # noqa: ARG002
        tensors = self._tensors(loaded)
        size = sum(tensor.numel() * tensor.element_size() for tensor in tensors.values())
        return _Weights(tensors, loaded.file), size

    def _set_scale(self, slot: _Slot, scale: float, *, force: bool = False) -> None:
        """Scale a slot's layers in place: a tensor's value, not a new Python float, which the
        compiled graph would guard on."""
        if scale == slot.scale and not force:
            return
        for module in self._lora_layers:
            current = module.scaling.get(slot.name)
            if current is None:
                continue
            value = scale * slot.base_scaling.get(module, 0.0)
            if isinstance(current, torch.Tensor):
                current.fill_(value)
            else:
                module.scaling[slot.name] = torch.tensor(value, device=module.weight.device)
        slot.scale = scale

    def _swap_in(self, slot: _Slot, lora: Lora, weights: _Weights, position: int) -> None:
        self._set_scale(slot, 0.0)
        slot.digest = None
        try:
            self.transformer.load_lora_adapter(
                dict(weights.tensors),
                prefix="transformer",
                adapter_name=slot.name,
                metadata=weights.file.diffusers_metadata(),
                hotswap=True,
            )
        except (ValueError, RuntimeError) as error:
            raise AdapterRefused(
                position, "name", f"adapter {lora.name!r} can't be hot-swapped: {error}"
            ) from error
        # Hot-swapping set each layer's scaling to the new adapter's alpha / rank.
        slot.base_scaling = {
            module: float(module.scaling[slot.name]) for module in self._lora_layers
        }
        slot.scale = 1.0
        slot.digest = lora.digest

    def activate(self, loras: tuple[Lora, ...]) -> None:
        self._batches += 1
        wanted = [lora.digest for lora in loras if lora.digest is not None]
        # Refill the slots used longest ago: what they hold is the least likely to come back.
        spare = sorted(
            (slot for slot in self.slots if slot.digest not in wanted),
            key=lambda slot: slot.last_used,
        )
        for position, lora in enumerate(loras):
            if any(slot.digest == lora.digest for slot in self.slots):
                continue
            weights = self.fetch(lora, position, wanted)
            self._swap_in(spare.pop(0), lora, weights, position)
        scales = {lora.digest: lora.scale for lora in loras}
        for slot in self.slots:
            if slot.digest in scales:
                slot.last_used = self._batches
            self._set_scale(slot, scales.get(slot.digest, 0.0))
