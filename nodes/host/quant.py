"""The host's layer classes for a safetensors file, chosen the way core chooses them for its own models.

* Plain (bf16 / fp16 / fp32, fp8) and legacy "scaled fp8" files (``scale_weight`` and a ``scaled_fp8`` marker) go
  through ``comfy.ops.pick_operations``, with ``fp8_optimizations`` from the marker as core reads it: the host
  then runs fp8 matmul where it enables it (``--fast`` or a scaled file on a GPU with fp8 compute).  Text
  encoders never get fp8 matmul, as core builds its own (comfy/sd1_clip.py).
* Mixed-precision files (ComfyUI's ``comfy_quant`` layout: per-layer ``<layer>.comfy_quant`` JSON markers,
  ``weight_scale``, optional ``input_scale``; or, from ComfyUI 0.3.7x, the ``_quantization_metadata`` entry) get
  the host's mixed-precision layers, through ``pick_operations`` (its ``model_config`` argument; for text
  encoders ``mixed_precision_ops`` in full precision, as core), wrapped so that our meta-device loading reaches
  them (see :func:`_loadable`).
* Where this ComfyUI lacks a piece (no ``pick_operations``, or one without scaled-fp8 or mixed-precision support),
  our own casting: the host's ``manual_cast`` for plain files, :class:`models.common.ops.CastOps` (which applies
  ``scale_weight`` / ``weight_scale``) for scaled ones.  Each path is logged once.
"""

from __future__ import annotations

import inspect
import json
import logging

import torch

import comfy.ops

from ...models import (COMFY_DIT_PREFIX, FLOAT8_DTYPES, FLOAT8_FORMATS, QUANT_MARKER, CastOps, SafetensorsCheckpoint,
                      WeightFileError, identify, quant_config, quant_marker)

try:  # the host's quantized formats (ComfyUI >= 0.3.7x)
    from comfy.quant_ops import QUANT_ALGOS
except ImportError:  # pragma: no cover
    QUANT_ALGOS = {}

__all__ = ["safetensors_ops", "layer_quant_configs"]

logger = logging.getLogger("qwen_image")
_METADATA_KEY = "_quantization_metadata"  # ComfyUI 0.3.7x: {"format_version", "layers": {layer: config}}
_SCALED_MARKER = "scaled_fp8"
_told: set[str] = set()


def _tell_once(message: str) -> None:
    if message not in _told:
        _told.add(message)
        logger.info("Qwen-Image: %s", message)


def layer_quant_configs(checkpoint: SafetensorsCheckpoint) -> dict[str, dict]:
    """A mixed-precision file's per-layer configs (``{"format": ...}``) by layer name without the diffusion-model
    prefix: from its ``comfy_quant`` markers, else from its ``_quantization_metadata``; empty for other files."""
    suffix = "." + QUANT_MARKER
    configs = {name[: -len(suffix)]: quant_config(checkpoint[name], name)
               for name in checkpoint if name.endswith(suffix)}
    if not configs and _METADATA_KEY in checkpoint.metadata:
        try:
            layers = json.loads(checkpoint.metadata[_METADATA_KEY])["layers"]
            configs = {layer: config if isinstance(config, dict) else {"format": config}
                       for layer, config in layers.items()}
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise WeightFileError(f"{checkpoint.source}: unreadable {_METADATA_KEY} ({type(e).__name__}: {e})."
                                  ) from None
    return {name.removeprefix(COMFY_DIT_PREFIX): config for name, config in configs.items()}


def _scaled_fp8(checkpoint: SafetensorsCheckpoint, stored: torch.dtype) -> tuple[torch.dtype, bool] | None:
    """``(fp8 dtype, fp8_optimizations)`` of a legacy scaled-fp8 file, as core reads its ``scaled_fp8`` marker
    (an fp32 marker means e4m3fn; a 2-element marker turns fp8 matmul off); None for other files."""
    marker = next((name for name in checkpoint if name.rpartition(".")[2] == _SCALED_MARKER), None)
    if marker is None:
        if not any(name.endswith(".scale_weight") for name in checkpoint):
            return None
        return stored, False  # scales without the marker: scaled all the same, no fp8 optimizations
    dtype = checkpoint.dtype(marker)
    return (torch.float8_e4m3fn if dtype == torch.float32 else dtype), checkpoint[marker].numel() != 2


def _pick_operations():
    """The host's ``pick_operations`` and the names of its parameters (they changed across releases)."""
    pick = getattr(comfy.ops, "pick_operations", None)
    if pick is None:
        return None, frozenset()
    try:
        return pick, frozenset(inspect.signature(pick).parameters)
    except (TypeError, ValueError):  # pragma: no cover - a wrapped callable without a signature
        return pick, frozenset()


class _QuantizedModelConfig:
    """What ``pick_operations`` reads from a model config to choose the mixed-precision layers: the formats by
    layer name (``layer_quant_config``, ComfyUI 0.3.7x) and the flag that markers travel with the weights
    (``quant_config``, later releases, whose layers read each ``comfy_quant`` marker themselves)."""

    def __init__(self, layers: dict[str, dict]):
        self.layer_quant_config = layers
        self.quant_config = {"mixed_ops": True}


def _loadable(ops: type, configs: dict[str, dict]) -> type:
    """The host's mixed-precision ops with a Linear our loaders can fill: it builds its weight where the tensors
    are (our models are built on the meta device, the host's layer places its weight on its factory device) and
    finds its format under our module name, whatever the file's prefix or layout."""
    by_name = getattr(ops, "_layer_quant_config", None)  # 0.3.7x: formats looked up by layer name

    class Linear(ops.Linear):
        def _load_from_state_dict(self, state_dict, prefix, *args):
            name, marker_key = prefix[:-1], prefix + QUANT_MARKER
            weight = state_dict.get(prefix + "weight")
            if weight is not None and isinstance(getattr(self, "factory_kwargs", None), dict):
                self.factory_kwargs = {**self.factory_kwargs, "device": weight.device}
            marker = state_dict.get(marker_key)
            config = quant_config(marker, marker_key) if marker is not None else configs.get(name)
            if by_name is not None:
                state_dict.pop(marker_key, None)  # this host does not read markers: it would be an unexpected key
                if config is not None:
                    by_name[name] = config
            elif marker is None and config is not None:  # formats from the metadata: as the host converts them
                state_dict[marker_key] = quant_marker(config)
            super()._load_from_state_dict(state_dict, prefix, *args)

    return type(ops.__name__, (ops,), {"Linear": Linear})


def _host_mixed_precision_ops(configs: dict[str, dict], stored: torch.dtype, compute: torch.dtype,
                              text_encoder: bool) -> type | None:
    """The host's mixed-precision ops for these layers, or None where this ComfyUI has none."""
    if text_encoder:  # core's text encoders: always dequantized (full precision matmul)
        factory = getattr(comfy.ops, "mixed_precision_ops", None)
        return None if factory is None else factory(configs, compute, full_precision_mm=True)
    pick, parameters = _pick_operations()
    if pick is None or "model_config" not in parameters:
        return None
    return pick(stored, compute, model_config=_QuantizedModelConfig(configs))


def _mixed_precision_ops(checkpoint: SafetensorsCheckpoint, configs: dict[str, dict], stored: torch.dtype,
                         compute: torch.dtype, text_encoder: bool) -> type:
    formats = sorted({config.get("format") for config in configs.values()}, key=str)
    if set(formats) <= set(QUANT_ALGOS):
        ops = _host_mixed_precision_ops(configs, stored, compute, text_encoder)
        if ops is not None and "_load_from_state_dict" in vars(ops.Linear):  # mixed precision, not a fallback
            _tell_once(f"mixed-precision ({', '.join(formats)}) layers from the host")
            return _loadable(ops, configs)
    if set(formats) <= set(FLOAT8_FORMATS):
        _tell_once("this ComfyUI has no mixed-precision layers for these formats; fp8 comfy_quant layers run on "
                   "our own casting (weight x weight_scale)")
        return CastOps
    raise WeightFileError(f"{checkpoint.source}: layers quantized as {', '.join(map(str, formats))}, which this "
                          "ComfyUI cannot run; update ComfyUI.")


def safetensors_ops(checkpoint: SafetensorsCheckpoint, stored: torch.dtype, compute: torch.dtype) -> type:
    """The layer classes for a safetensors checkpoint whose (Linear) weights are stored as ``stored``, computed in
    ``compute``; see the module's description."""
    text_encoder = identify(checkpoint).role == "text_encoder"
    configs = layer_quant_configs(checkpoint)
    if configs:
        return _mixed_precision_ops(checkpoint, configs, stored, compute, text_encoder)
    pick, parameters = _pick_operations()
    no_fast = {"disable_fast_fp8": True} if text_encoder and "disable_fast_fp8" in parameters else {}
    scaled = _scaled_fp8(checkpoint, stored)
    if scaled is not None:
        if pick is None or "scaled_fp8" not in parameters:
            _tell_once("this ComfyUI's pick_operations takes no scaled fp8; scaled fp8 runs on our own casting")
            return CastOps
        dtype, fp8_optimizations = scaled
        _tell_once("scaled fp8 layers from comfy.ops.pick_operations")
        return pick(stored, compute, fp8_optimizations=fp8_optimizations and not text_encoder, scaled_fp8=dtype,
                    **no_fast)
    weight_dtype = stored if stored in FLOAT8_DTYPES else compute  # our loaders convert other weights to compute
    if pick is None:
        _tell_once("this ComfyUI has no pick_operations; layers cast by comfy.ops.manual_cast")
        return comfy.ops.disable_weight_init if weight_dtype == compute else comfy.ops.manual_cast
    _tell_once("layers from comfy.ops.pick_operations")
    return pick(weight_dtype, compute, **no_fast)  # fp8_optimizations off, as core for plain files: --fast decides
