"""What a LoRA file holds, read from its safetensors header alone.

A usable adapter is a diffusers/peft LoRA of the FLUX transformer: tensors named
``transformer.<layer>.lora_A.weight`` (rank x in) and ``.lora_B.weight`` (out x rank), and
optionally diffusers' ``lora_adapter_metadata`` (alphas). Adapters of the text encoders are refused:
prompts are encoded once for every image of a batch, whatever adapters the images use. Everything
here reads only the header (a few kilobytes), so the ingress can check a file without loading it.
"""

from __future__ import annotations

import collections
import json
import re
from dataclasses import dataclass
from typing import Any

HEADER_PREFIX_BYTES = 8
MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit
_METADATA_KEY = "lora_adapter_metadata"  # where diffusers writes the adapter's LoraConfig
_TRANSFORMER = "transformer."
_LORA_TENSOR = re.compile(r"^transformer\.(?P<module>[A-Za-z0-9_.]+)\.lora_(?P<part>[AB])\.weight$")
_TEXT_ENCODER = re.compile(r"^(text_encoder|text_encoder_2|te\d?|lora_te\d?)[._]")
_FLOAT_DTYPES = {"F32", "F16", "BF16"}
_BLOCK_NUMBER = re.compile(r"(?<=blocks)\.\d+(?=\.)")


class NotAnAdapter(ValueError):
    """The file is not a LoRA this service can apply; the message says why, for the client."""


@dataclass(frozen=True)
class AdaptedLayer:
    """One transformer layer an adapter changes: W x + scale * B A x, with A of shape
    (rank, in_features) and B of shape (out_features, rank)."""

    module: str
    rank: int
    in_features: int
    out_features: int


@dataclass(frozen=True)
class AdapterFile:
    """The layers of a LoRA file and the peft settings that apply it as it was trained."""

    layers: tuple[AdaptedLayer, ...]
    alpha: float
    alpha_pattern: dict[str, float]
    use_rslora: bool

    @property
    def rank(self) -> int:
        """The highest rank among its layers."""
        return max(layer.rank for layer in self.layers)

    @property
    def layer_kinds(self) -> list[str]:
        """Its layers with block numbers as ``*``: what it changes, in a few lines."""
        return sorted({_BLOCK_NUMBER.sub(".*", layer.module) for layer in self.layers})

    def lora_config(self) -> dict[str, Any]:
        """peft LoraConfig arguments, as diffusers reads them from a file's metadata."""
        ranks = collections.Counter(layer.rank for layer in self.layers)
        rank = ranks.most_common(1)[0][0]
        # diffusers' anchored module patterns: "^name" matches that one layer only.
        rank_pattern = {
            f"^{layer.module}": layer.rank for layer in self.layers if layer.rank != rank
        }
        return {
            "r": rank,
            "lora_alpha": self.alpha,
            "target_modules": sorted(layer.module for layer in self.layers),
            "rank_pattern": rank_pattern,
            "alpha_pattern": self.alpha_pattern,
            "use_rslora": self.use_rslora,
        }

    def diffusers_metadata(self) -> dict[str, Any]:
        """lora_config() as diffusers' load_lora_adapter takes it (keys under ``transformer.``)."""
        return {_TRANSFORMER + key: value for key, value in self.lora_config().items()}

    def weight_bytes(self, element_size: int) -> int:
        """Bytes of its weights once loaded with ``element_size`` bytes per value."""
        values = sum(layer.rank * (layer.in_features + layer.out_features) for layer in self.layers)
        return values * element_size


def header_length(prefix: bytes) -> int:
    """The length of the JSON header from a file's first 8 bytes."""
    if len(prefix) < HEADER_PREFIX_BYTES:
        raise NotAnAdapter("not a safetensors file: it is shorter than a header")
    length = int.from_bytes(prefix[:HEADER_PREFIX_BYTES], "little")
    if not 2 <= length <= MAX_HEADER_BYTES:
        raise NotAnAdapter("not a safetensors file: its header length is implausible")
    return length


def read_adapter(header: bytes, file_size: int) -> AdapterFile:
    """The adapter a file holds, from its JSON header (the bytes after the 8-byte length)."""
    try:
        entries = json.loads(header)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise NotAnAdapter("not a safetensors file: its header is not JSON") from error
    if not isinstance(entries, dict):
        raise NotAnAdapter("not a safetensors file: its header is not a JSON object")
    metadata = entries.pop("__metadata__", None) or {}
    shapes: dict[str, dict[str, list[int]]] = collections.defaultdict(dict)
    end = 0
    for key, entry in entries.items():
        module, part = _tensor_name(key)
        shapes[module][part], tensor_end = _shape(key, entry)
        end = max(end, tensor_end)
    if not shapes:
        raise NotAnAdapter("it holds no tensors")
    if HEADER_PREFIX_BYTES + len(header) + end > file_size:
        raise NotAnAdapter("the file is truncated: its tensors end past the end of the file")
    layers = tuple(_layer(module, parts) for module, parts in sorted(shapes.items()))
    alpha, alpha_pattern, use_rslora = _alphas(metadata, layers)
    return AdapterFile(layers, alpha, alpha_pattern, use_rslora)


def _tensor_name(key: str) -> tuple[str, str]:
    match = _LORA_TENSOR.match(key)
    if match:
        return match["module"], match["part"]
    if _TEXT_ENCODER.match(key):
        raise NotAnAdapter(
            f"it changes the text encoder ({key!r}): only adapters of the transformer are served"
        )
    raise NotAnAdapter(
        f"not a diffusers/peft FLUX LoRA: unexpected tensor {key!r} (expected "
        "transformer.<layer>.lora_A.weight and transformer.<layer>.lora_B.weight)"
    )


def _pair(value: Any, minimum: int) -> list[int] | None:
    pair = isinstance(value, list) and len(value) == 2
    if pair and all(isinstance(item, int) and item >= minimum for item in value):
        return value  # type: ignore[no-any-return]
    return None


def _shape(key: str, entry: Any) -> tuple[list[int], int]:
    """A tensor's shape and where its data ends."""
    if not isinstance(entry, dict) or entry.get("dtype") not in _FLOAT_DTYPES:
        raise NotAnAdapter(f"tensor {key!r} is not float32, float16 or bfloat16")
    shape, offsets = _pair(entry.get("shape"), 1), _pair(entry.get("data_offsets"), 0)
    if shape is None or offsets is None or offsets[0] > offsets[1]:
        raise NotAnAdapter(f"tensor {key!r} is not a matrix with valid offsets")
    return shape, offsets[1]


def _layer(module: str, parts: dict[str, list[int]]) -> AdaptedLayer:
    if set(parts) != {"A", "B"}:
        missing = "lora_B" if "A" in parts else "lora_A"
        raise NotAnAdapter(f"layer {module!r} has no {missing} weight")
    (rank, in_features), (out_features, rank_b) = parts["A"], parts["B"]
    if rank != rank_b:
        raise NotAnAdapter(f"layer {module!r}: lora_A has rank {rank}, lora_B rank {rank_b}")
    return AdaptedLayer(module, rank, in_features, out_features)


def _alphas(
    metadata: dict[str, Any], layers: tuple[AdaptedLayer, ...]
) -> tuple[float, dict[str, float], bool]:
    """Alpha, per-layer alphas and rsLoRA as trained; without metadata, diffusers' convention
    (alpha equal to each layer's rank: B A applied as it is)."""
    rank = collections.Counter(layer.rank for layer in layers).most_common(1)[0][0]
    raw = metadata.get(_METADATA_KEY)
    if raw is None:
        pattern = {f"^{layer.module}": float(layer.rank) for layer in layers if layer.rank != rank}
        return float(rank), pattern, False
    try:
        config = json.loads(raw)
    except json.JSONDecodeError as error:
        raise NotAnAdapter(f"its {_METADATA_KEY} is not JSON") from error
    if not isinstance(config, dict):
        raise NotAnAdapter(f"its {_METADATA_KEY} is not a JSON object")
    settings = {key.removeprefix(_TRANSFORMER): value for key, value in config.items()}
    if settings.get("use_dora"):
        raise NotAnAdapter("it is a DoRA adapter, which is not served")
    alpha = settings.get("lora_alpha", rank)
    pattern = settings.get("alpha_pattern") or {}
    valid_pattern = isinstance(pattern, dict) and all(
        isinstance(value, int | float) for value in pattern.values()
    )
    if not isinstance(alpha, int | float) or not valid_pattern:
        raise NotAnAdapter(f"its {_METADATA_KEY} has alphas that are not numbers")
    pattern = {str(key): float(value) for key, value in pattern.items()}
    return float(alpha), pattern, bool(settings.get("use_rslora", False))
