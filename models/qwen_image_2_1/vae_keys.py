"""Tensor names of the Qwen-Image 2.1 VAE: diffusers names (the model's) -> Comfy-Org names.

diffusers' ``AutoencoderKLQwenImage21`` names the modules ``encoder.conv_in``, ``encoder.down_blocks.I.{resnets.J,
downsampler}``, ``{encoder,decoder}.mid_block.{resnets.0, attentions.0, resnets.1}``, ``norm_out`` / ``conv_out``,
``quant_conv``, ``post_quant_conv``, ``decoder.up_blocks.I.{resnets.J, upsampler}``, and stores every convolution
2-D.  Comfy-Org's single file (``qwen_image_2.1_vae_bf16.safetensors``) is read by ComfyUI's Wan 2.2 VAE code
(``comfy/ldm/wan/vae2_2.py`` with ``temporal_kernel=1``), so it keeps the original Wan 2.2 names: ``encoder.conv1``,
``encoder.downsamples.I.downsamples.J`` (the resample block at ``J = num_res_blocks``), ``middle.{0,1,2}``,
``head.{0,2}``, ``conv1`` / ``conv2``, ``decoder.upsamples.I.upsamples.J`` (the resample block at
``J = num_res_blocks + 1``), residual blocks as ``residual.{0,2,3,6}`` / ``shortcut``.  Its convolutions that were
causal 3-D ones keep a temporal axis of length 1 (``[out, in, 1, k, k]``); ``resample.1`` and the attention's
``to_qkv`` / ``proj`` are 2-D there too.

Assumed, not checked against the file itself (not available here): the names and shapes follow from ComfyUI's Wan 2.2
VAE module with ``temporal_kernel=1`` and agree with published third-party readers of the Comfy-Org file.
"""

from __future__ import annotations

import re

__all__ = ["diffusers_to_comfy", "comfy_shape"]

_TOP = {"quant_conv": "conv1", "post_quant_conv": "conv2"}
_ENDS = {"conv_in": "conv1", "norm_out": "head.0", "conv_out": "head.2"}
_MIDDLE = {"resnets.0": "0", "attentions.0": "1", "resnets.1": "2"}
_RESIDUAL = {"norm1": "residual.0", "conv1": "residual.2", "norm2": "residual.3", "conv2": "residual.6",
             "conv_shortcut": "shortcut"}
_BLOCK = re.compile(r"(?:mid_block\.(?P<middle>resnets\.[01]|attentions\.0)|"
                    r"(?:down|up)_blocks\.(?P<level>\d+)\.(?:resnets\.(?P<resnet>\d+)|downsampler|upsampler))"
                    r"\.(?P<layer>\w+)\.(?P<rest>.+)")
# 2-D in both layouts: the resampling convolutions and the attention's 1x1 projections.
_PLAIN_2D = ("resample.1.weight", "to_qkv.weight", "proj.weight")


def diffusers_to_comfy(name: str, num_res_blocks: int = 2) -> str:
    """The Comfy-Org name of a diffusers ``AutoencoderKLQwenImage21`` tensor name (``ValueError`` if it is none)."""
    layer, _, leaf = name.rpartition(".")
    if layer in _TOP:
        return f"{_TOP[layer]}.{leaf}"
    side, _, rest = layer.partition(".")
    if side in ("encoder", "decoder") and rest in _ENDS:
        return f"{side}.{_ENDS[rest]}.{leaf}"
    match = _BLOCK.fullmatch(f"{rest}.{leaf}") if side in ("encoder", "decoder") else None
    if match is None:
        raise ValueError(f"'{name}' is not a tensor name of the Qwen-Image 2.1 VAE.")
    inside = f"{_RESIDUAL.get(match['layer'], match['layer'])}.{match['rest']}"
    if match["middle"]:
        return f"{side}.middle.{_MIDDLE[match['middle']]}.{inside}"
    group = "downsamples" if side == "encoder" else "upsamples"
    # The resample block follows the level's residual blocks (num_res_blocks + 1 of them in the decoder).
    index = match["resnet"] or num_res_blocks + (side == "decoder")
    return f"{side}.{group}.{match['level']}.{group}.{index}.{inside}"


def comfy_shape(name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape a Comfy-Org file stores for the diffusers tensor ``name`` of ``shape``."""
    if len(shape) == 4 and name.endswith(".weight") and not name.endswith(_PLAIN_2D):
        return (*shape[:2], 1, *shape[2:])
    return shape
