"""The tiny Qwen-Image DiT in ComfyUI's mixed-precision ("comfy_quant") fp8 layout.

The layout, as ComfyUI writes and reads it (QUANTIZATION.md, comfy/quant_ops.py ``QUANT_ALGOS["float8_e4m3fn"]``,
the mixed-precision Linear's state dict): for every quantized Linear ``<layer>``

* ``<layer>.weight``: float8_e4m3fn, the weight divided by its scale (clamped to +-448);
* ``<layer>.weight_scale``: float32 scalar, per-tensor absmax / 448, so that ``weight ~ fp8 * weight_scale``;
* ``<layer>.comfy_quant``: uint8, the bytes of the JSON ``{"format": "float8_e4m3fn"}``;
* ``<layer>.input_scale`` (optional): float32 scalar for the activations, from calibration;

every other tensor stays bf16.  The file's ``__metadata__`` also carries ``_quantization_metadata`` (format_version
1.0 and the same per-layer formats, names relative to the diffusion model), which is what ComfyUI releases before
the per-layer markers read.  Following ComfyUI's own fp8 "mixed" files, the blocks' Linear layers are quantized and
the layers at the ends of the model (input / timestep embeddings, norm_out, proj_out) stay bf16.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from models.io.weights import quant_marker
from .factory import DIT_PREFIX, _write_safetensors, make_dit

__all__ = ["make_dit_comfy_quant", "make_companions", "to_comfy_quant", "FP8_FORMAT"]

FP8_FORMAT = "float8_e4m3fn"
_FP8_MAX = torch.finfo(torch.float8_e4m3fn).max


def _quantized_layers(tensors: dict[str, torch.Tensor]) -> list[str]:
    """The blocks' Linear layers (2-D weights under ``transformer_blocks.``), by layer name."""
    return sorted(name[: -len(".weight")] for name, t in tensors.items()
                  if name.startswith("transformer_blocks.") and name.endswith(".weight") and t.ndim == 2)


def to_comfy_quant(tensors: dict[str, torch.Tensor], input_scale: float | None = None
                   ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A prefix-free DiT state dict (fp32 or bf16) in the mixed-precision fp8 layout, and the file metadata."""
    layers = _quantized_layers(tensors)
    out = {name: t.to(torch.bfloat16) for name, t in tensors.items()}
    for layer in layers:
        weight = tensors[f"{layer}.weight"].to(torch.float32)
        scale = weight.abs().amax() / _FP8_MAX
        out[f"{layer}.weight"] = (weight / scale).clamp(-_FP8_MAX, _FP8_MAX).to(torch.float8_e4m3fn)
        out[f"{layer}.weight_scale"] = scale.reshape(())
        out[f"{layer}.comfy_quant"] = quant_marker({"format": FP8_FORMAT})
        if input_scale is not None:
            out[f"{layer}.input_scale"] = torch.tensor(input_scale, dtype=torch.float32)
    metadata = {"format_version": "1.0", "layers": {layer: {"format": FP8_FORMAT} for layer in layers}}
    return out, {"_quantization_metadata": json.dumps(metadata)}


def make_dit_comfy_quant(out_dir: str | os.PathLike, *, seed: int = 0, prefix: bool = False,
                         input_scale: float | None = None) -> Path:
    """Write ``qwen_image_fp8mixed[_input_scale][_prefixed].safetensors``: the tiny DiT of ``seed`` (the values of
    ``make_dit(..., seed=seed)`` in fp32) converted to the mixed-precision fp8 layout; ``prefix``: names under
    ``model.diffusion_model.``; ``input_scale``: write that activation scale for every quantized layer."""
    with tempfile.TemporaryDirectory() as tmp:
        tensors = load_file(str(make_dit(tmp, dtype="fp32", seed=seed)))
    out, metadata = to_comfy_quant(tensors, input_scale)
    if prefix:
        out = {DIT_PREFIX + name: t for name, t in out.items()}
    suffix = ("_input_scale" if input_scale is not None else "") + ("_prefixed" if prefix else "")
    path = Path(out_dir) / f"qwen_image_fp8mixed{suffix}.safetensors"
    _write_safetensors(out, path, metadata=metadata)
    return path


def make_companions(path: str | os.PathLike) -> dict[str, Path]:
    """Two files next to a mixed-precision file, for comparisons: ``metadata`` (``<stem>_metadata``: the file without
    its per-layer markers, the formats only in ``_quantization_metadata``, as ComfyUI 0.3.7x wrote them) and
    ``twin`` (``<stem>_twin``: plain bf16, every quantized weight replaced by what it stands for, fp8 x
    weight_scale rounded to bf16)."""
    path = Path(path)
    tensors = load_file(str(path))
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    marker, scale = ".comfy_quant", ".weight_scale"
    companions = {"metadata": path.with_name(f"{path.stem}_metadata.safetensors"),
                  "twin": path.with_name(f"{path.stem}_twin.safetensors")}
    _write_safetensors({k: t for k, t in tensors.items() if not k.endswith(marker)}, companions["metadata"],
                       metadata=metadata)
    twin = {}
    for name, tensor in tensors.items():
        layer = name.removesuffix(".weight")
        if name.endswith((marker, scale, ".input_scale")):
            continue
        if layer + scale in tensors:
            tensor = (tensor.to(torch.float32) * tensors[layer + scale]).to(torch.bfloat16)
        twin[name] = tensor
    _write_safetensors(twin, companions["twin"])
    return companions
