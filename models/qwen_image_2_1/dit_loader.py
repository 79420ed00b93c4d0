"""Loading the Qwen-Image 2.1 DiT from its published layouts.

:func:`load_diffusion_model_2_1` accepts a Comfy-Org single ``.safetensors`` file (bf16 / fp16 / fp32 / fp8 / "scaled"
fp8, with or without the ``model.diffusion_model.`` prefix), a diffusers folder (``config.json`` + sharded
safetensors + index), a pipeline folder with ``transformer/``, and a ``.gguf`` with the diffusers names (arch
``qwen_image21`` as ComfyUI-GGUF's converter writes it, or ``qwen_image``: the registry goes by the names; through the
shared GGUF reader, weights stay quantized).  The shape comes from tensor shapes (``config.json`` wins where it says
more); the model is built on the meta device and filled one tensor at a time, fp8 weights stay fp8.
:func:`models.load_diffusion_model` dispatches 2.1 files here.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping

import torch

from ..common.ops import CastOps
from ..io.loading import TensorView, materialize
from ..io.weights import WeightFileError, tensor_dtype, tensor_shape
from ..qwen_image.dit_loader import SCALED_FP8_MARKER, open_dit_weights
from ..registry import identify, refusal
from .dit import DiT21Config, QwenImage21DiT

__all__ = ["load_diffusion_model_2_1", "dit_2_1_from_tensors", "detect_dit_2_1_config", "REQUIRED_KEYS", "EXPECTED"]

logger = logging.getLogger("qwen_image")

REQUIRED_KEYS = ("img_in.weight", "txt_in.in_layer.weight", "modulation.1.weight", "proj_out.weight",
                 "transformer_blocks.0.attn.norm_q.weight", "transformer_blocks.0.img_mlp.proj.weight")
EXPECTED = "a Qwen-Image 2.1 diffusion model (DiT)"
_BLOCK = re.compile(r"transformer_blocks\.(\d+)\.")


def detect_dit_2_1_config(tensors: Mapping, config_json: Mapping | None = None,
                          source: str = "checkpoint") -> DiT21Config:
    """The :class:`DiT21Config` of a prefix-free 2.1 DiT mapping from tensor shapes (no data read); ``config_json``
    (a diffusers ``config.json``) gives the RoPE axes, eps and ``causal_condition`` and must agree with the shapes.
    Without it the axes are ``(head_dim // 8, rest / 2, rest / 2)`` ((16, 56, 56) at head_dim 128)."""
    width, in_channels = tensor_shape(tensors, "img_in.weight")
    context_dim = tensor_shape(tensors, "txt_in.in_layer.weight")[1]
    head_dim = tensor_shape(tensors, "transformer_blocks.0.attn.norm_q.weight")[0]
    mlp_hidden = tensor_shape(tensors, "transformer_blocks.0.img_mlp.proj.weight")[0]
    out_channels = tensor_shape(tensors, "proj_out.weight")[0]
    if width % head_dim or mlp_hidden % width or tensor_shape(tensors, "modulation.1.weight") != (4 * width, width):
        raise WeightFileError(f"{source}: inconsistent Qwen-Image 2.1 shapes (width {width}, head_dim {head_dim}, "
                              f"MLP {mlp_hidden}).")
    blocks = sorted({int(m.group(1)) for k in tensors if (m := _BLOCK.match(k))})
    if blocks != list(range(len(blocks))):
        raise WeightFileError(f"{source}: transformer_blocks are not numbered 0..N-1 (found {blocks[:5]}...); "
                              "the file is incomplete.")
    rest = head_dim - head_dim // 8
    axes = (head_dim // 8, rest // 2, rest - rest // 2)
    eps, causal = 1e-6, True
    if config_json:
        if config_json.get("patch_size", 1) != 1:
            raise WeightFileError(f"{source}: patch_size {config_json.get('patch_size', 1)} - Qwen-Image 2.1 reads "
                                  "latents unpatched (patch_size 1).")
        axes = tuple(config_json.get("axes_dims_rope", axes))
        eps = float(config_json.get("eps", eps))
        causal = config_json.get("causal_condition", causal)
        stated = {"num_layers": len(blocks), "num_attention_heads": width // head_dim,
                  "attention_head_dim": head_dim, "in_channels": in_channels, "out_channels": out_channels,
                  "context_in_dim": context_dim, "mlp_ratio": mlp_hidden // width}
        wrong = {k: (config_json.get(k, v), v) for k, v in stated.items() if config_json.get(k, v) != v}
        if wrong:
            raise WeightFileError(f"{source}: config.json disagrees with the tensor shapes: " + ", ".join(
                f"{k} {said} (tensors: {found})" for k, (said, found) in wrong.items()) + ".")
    if sum(axes) != head_dim:
        raise WeightFileError(f"{source}: RoPE axes {axes} do not add up to the head dimension {head_dim}.")
    return DiT21Config(depth=len(blocks), heads=width // head_dim, head_dim=head_dim, in_channels=in_channels,
                       out_channels=out_channels, context_dim=context_dim, mlp_ratio=mlp_hidden // width,
                       axes_dim=axes, causal_condition=causal, eps=eps)


def dit_2_1_from_tensors(tensors: Mapping, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                         ops=None, config_json: Mapping | None = None, source: str = "checkpoint",
                         model_class: type[QwenImage21DiT] = QwenImage21DiT) -> QwenImage21DiT:
    """Build a :class:`QwenImage21DiT` from a ``name -> tensor`` mapping (any supported key layout).

    ``dtype`` is the compute dtype and the storage dtype of non-fp8 weights; fp8 weights are kept as stored.
    ``model_class``: a subclass to instantiate (a host adapts the calling convention this way).
    Raises :class:`WeightFileError` (the registry's words) for anything but a Qwen-Image 2.1 DiT.
    """
    identity = identify(tensors)
    if (identity.family, identity.role, identity.supported) != ("qwen_image_2_1", "diffusion_model", True):
        raise refusal(source, identity, EXPECTED, REQUIRED_KEYS, gguf=getattr(tensors, "arch", None) is not None)
    view = TensorView(tensors, identity.prefix, frozenset({SCALED_FP8_MARKER}))
    config = detect_dit_2_1_config(view, config_json, source)
    stored = str(tensor_dtype(view, "transformer_blocks.0.attn.to_q.weight")).removeprefix("torch.")
    logger.info("Qwen-Image 2.1 DiT: %d blocks, width %d, %s weights", config.depth, config.width, stored)
    model = model_class(config, compute_dtype=dtype, ops=ops or CastOps, device="meta", dtype=dtype)
    return materialize(model, view, dtype=dtype, device=device, what=f"{source} (Qwen-Image 2.1 DiT)")


def load_diffusion_model_2_1(path: str | os.PathLike, dtype: torch.dtype = torch.float32,
                             device: torch.device | str = "cpu", ops=None,
                             model_class: type[QwenImage21DiT] = QwenImage21DiT) -> QwenImage21DiT:
    """Load a Qwen-Image 2.1 DiT from a single file, a diffusers folder, a pipeline folder or a ``.gguf`` file.

    ``dtype``: compute dtype (and storage dtype of non-fp8 weights).  ``ops``: operations namespace (default
    :class:`models.common.ops.CastOps`; GGUF files default to their quantized layers).  ``model_class``: as in
    :func:`dit_2_1_from_tensors`.
    """
    weights = open_dit_weights(path, "transformer")
    return dit_2_1_from_tensors(weights.tensors, dtype=dtype, device=device, ops=ops or weights.ops,
                                config_json=weights.config, source=str(path), model_class=model_class)
