"""Loading the Qwen-Image DiT from any of its published layouts.

:func:`load_diffusion_model` accepts a Comfy-Org single ``.safetensors`` file (bf16 / fp16 / fp32 / fp8 e4m3fn or
e5m2 / "scaled" fp8 with per-layer ``scale_weight`` and a ``scaled_fp8`` marker; with or without the
``model.diffusion_model.`` prefix), a diffusers folder (``config.json`` + sharded safetensors + index), a full
pipeline folder with ``transformer/``, and (through the GGUF reader) a ``.gguf`` file.  The shape of the model is
detected from tensor shapes alone; Edit-2511 (``zero_cond_t``) from ``config.json`` or ComfyUI's marker tensor
``__index_timestep_zero__``.  The model is built on the meta device and filled one tensor at a time; fp8 weights
stay fp8 (the ops namespace casts them per layer).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from ..common.ops import CastOps
from ..io.loading import TensorView, materialize, open_weights
from ..io.weights import WeightFileError, tensor_dtype, tensor_shape
from ..registry import LAYERED_KEY, ZERO_COND_MARKER, expect
from .dit import DiTConfig, QwenImageDiT

__all__ = ["load_diffusion_model", "detect_dit_config", "dit_from_tensors", "trunk_shape", "open_dit_weights"]

logger = logging.getLogger("qwen_image")

SCALED_FP8_MARKER = "scaled_fp8"
REQUIRED = ("img_in.weight", "txt_in.weight", "proj_out.weight", "transformer_blocks.0.attn.norm_q.weight")
EXPECTED = "a Qwen-Image diffusion model (DiT)"
_BLOCK = re.compile(r"transformer_blocks\.(\d+)\.")


def trunk_shape(tensors: Mapping, config_json: dict | None, source: str) -> dict:
    """The double-stream trunk's shape from a prefix-free mapping (what the DiT and the InstantX ControlNet share):
    width, heads, head_dim, in_channels, joint_dim and RoPE axes ``(head_dim // 8, rest / 2, rest / 2)`` unless
    ``config_json`` names them."""
    width, in_channels = tensor_shape(tensors, "img_in.weight")
    joint_dim = tensor_shape(tensors, "txt_in.weight")[1]
    head_dim = tensor_shape(tensors, "transformer_blocks.0.attn.norm_q.weight")[0]
    if width % head_dim or in_channels % 4:
        raise WeightFileError(f"{source}: inconsistent Qwen-Image shapes (width {width}, head_dim {head_dim}, "
                              f"in {in_channels}).")
    rest = head_dim - head_dim // 8
    axes = (head_dim // 8, rest // 2, rest - rest // 2)
    if config_json:
        axes = tuple(config_json.get("axes_dims_rope", axes))
    if sum(axes) != head_dim:
        raise WeightFileError(f"{source}: RoPE axes {axes} do not add up to the head dimension {head_dim}.")
    return {"heads": width // head_dim, "head_dim": head_dim, "in_channels": in_channels, "joint_dim": joint_dim,
            "axes_dim": axes}


def detect_dit_config(tensors: Mapping, config_json: dict | None = None, source: str = "checkpoint") -> DiTConfig:
    """The :class:`DiTConfig` of a prefix-free Qwen-Image DiT mapping, from tensor shapes (no data read).

    ``zero_cond_t`` (Edit-2511) comes from ``config_json`` or the marker tensor ``__index_timestep_zero__``; the
    Layered flags from ``config_json`` or the ``time_text_embed.addition_t_embedding`` tensor.
    """
    out_features = tensor_shape(tensors, "proj_out.weight")[0]
    if out_features % 4:
        raise WeightFileError(f"{source}: inconsistent Qwen-Image DiT shapes (out {out_features}).")
    blocks = sorted({int(m.group(1)) for k in tensors if (m := _BLOCK.match(k))})
    if blocks != list(range(len(blocks))):
        raise WeightFileError(f"{source}: transformer_blocks are not numbered 0..N-1 (found {blocks[:5]}...); "
                              "the file is incomplete.")
    config_json = config_json or {}
    zero_cond = ZERO_COND_MARKER in tensors or bool(config_json.get("zero_cond_t", False))
    layered = LAYERED_KEY in tensors  # Comfy files carry no config: the extra embedding means Layered
    return DiTConfig(depth=len(blocks), out_channels=out_features // 4, zero_cond_t=zero_cond,
                     additional_t_cond=layered or bool(config_json.get("use_additional_t_cond", False)),
                     layer3d_rope=bool(config_json.get("use_layer3d_rope", layered)),
                     **trunk_shape(tensors, config_json, source))


def _weight_format(tensors: Mapping, scaled: bool) -> str:
    name = str(tensor_dtype(tensors, "transformer_blocks.0.attn.to_q.weight")).removeprefix("torch.")
    return f"{name} scaled" if scaled else name


def dit_from_tensors(tensors: Mapping, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                     ops=None, config_json: dict | None = None, source: str = "checkpoint",
                     model_class: type[QwenImageDiT] = QwenImageDiT) -> QwenImageDiT:
    """Build a :class:`QwenImageDiT` from a ``name -> tensor`` mapping (any supported key layout).

    ``dtype`` is the compute dtype and the storage dtype of non-fp8 weights; fp8 weights are kept as stored.
    ``model_class``: a subclass to instantiate (a host adapts the calling convention this way).
    """
    identity = expect(tensors, "qwen_image", "diffusion_model", EXPECTED, REQUIRED, source_name=source)
    prefix = identity.prefix
    config = detect_dit_config(TensorView(tensors, prefix, frozenset({SCALED_FP8_MARKER})), config_json, source)
    view = TensorView(tensors, prefix, frozenset({ZERO_COND_MARKER, SCALED_FP8_MARKER}))
    scaled = prefix + SCALED_FP8_MARKER in tensors or any(k.endswith(".scale_weight") for k in tensors)
    variant = ", Edit-2511 zero_cond_t" if config.zero_cond_t else ", Layered" if config.layer3d_rope else ""
    if "2512" in Path(source).name and not variant:  # same architecture as Qwen-Image: only its name tells
        variant = ", Qwen-Image-2512 (by its file name)"
    logger.info("Qwen-Image DiT: %d blocks, width %d, %s%s", config.depth, config.width,
                _weight_format(view, scaled), variant)
    model = model_class(config, compute_dtype=dtype, ops=ops or CastOps, device="meta", dtype=dtype)
    return materialize(model, view, dtype=dtype, device=device, what=f"{source} (Qwen-Image DiT)")


def _open_gguf(path: Path):
    from ..io.gguf import open_dit_gguf

    return open_dit_gguf(path)


def open_dit_weights(path: str | os.PathLike, part: str):
    """A Qwen-Image DiT-architecture checkpoint (DiT or ControlNet): single file, folder or ``.gguf``."""
    return open_weights(path, part, gguf_opener=_open_gguf)


def load_diffusion_model(path: str | os.PathLike, dtype: torch.dtype = torch.float32,
                         device: torch.device | str = "cpu", ops=None,
                         model_class: type[QwenImageDiT] = QwenImageDiT) -> QwenImageDiT:
    """Load a Qwen-Image 1.x DiT from a single file, a diffusers folder, a pipeline folder or a ``.gguf`` file (the
    family's loader; :func:`models.load_diffusion_model` loads either family).

    ``dtype``: compute dtype (and storage dtype of non-fp8 weights).  ``ops``: operations namespace (default
    :class:`models.common.ops.CastOps`; GGUF files default to their quantized layers).  Raises
    :class:`WeightFileError` for a file that is not a Qwen-Image DiT, naming what it is.
    """
    weights = open_dit_weights(path, "transformer")
    return dit_from_tensors(weights.tensors, dtype=dtype, device=device, ops=ops or weights.ops,
                            config_json=weights.config, source=str(path), model_class=model_class)
