"""Tensor names of the Qwen-Image VAE: original Wan 2.1 names (ComfyUI files) <-> diffusers names.

The Qwen-Image VAE is the Wan 2.1 video VAE.  Comfy-Org single files keep the original Wan module names
(``encoder.conv1``, ``encoder.downsamples.N.residual.{0,2,3,6}``, ``encoder.middle.{0,1,2}``,
``encoder.head.{0,2}``, ``conv1``, ``conv2``, ``decoder.upsamples.N``...); diffusers' ``AutoencoderKLQwenImage``
renames them (``encoder.conv_in``, ``encoder.down_blocks.N.{norm1,conv1,norm2,conv2}``, ``mid_block``,
``quant_conv``, ``post_quant_conv``, ``decoder.up_blocks.I.{resnets.J,upsamplers.0}``...).  The loader reads
diffusers files through :func:`diffusers_to_wan`, a bijection over the full key set.

Both layouts index the encoder's residual/resample blocks in one flat list, so those indices are kept.  The
decoder differs: Wan flattens every level into ``upsamples`` (``num_res_blocks + 1`` residual blocks, then one
resample block, per level), diffusers nests them, so the decoder mapping needs ``num_res_blocks`` (2 in every
Qwen-Image / Wan 2.1 VAE).
"""

from __future__ import annotations

import re

from ..io.weights import WeightFileError

__all__ = ["diffusers_to_wan"]

# Inside a residual block: Wan's nn.Sequential positions <-> diffusers attribute names.
_RESIDUAL_DIFFUSERS_TO_WAN = {
    "norm1": "residual.0",
    "conv1": "residual.2",
    "norm2": "residual.3",
    "conv2": "residual.6",
    "conv_shortcut": "shortcut",
}

# Names identical in both layouts inside attention and resample blocks.
_SAME_INSIDE = ("norm.", "to_qkv.", "proj.", "resample.1.", "time_conv.")

# Encoder/decoder middle: Wan nn.Sequential(residual, attention, residual).
_MIDDLE_DIFFUSERS_TO_WAN = {"mid_block.resnets.0": "0", "mid_block.attentions.0": "1", "mid_block.resnets.1": "2"}

_HEAD_DIFFUSERS_TO_WAN = {"norm_out.": "head.0.", "conv_out.": "head.2."}


def _unknown(name: str, layout: str) -> WeightFileError:
    return WeightFileError(
        f"VAE tensor '{name}' is not a {layout} Qwen-Image/Wan 2.1 VAE name. The file is probably not a "
        f"Qwen-Image VAE (expected names like 'encoder.conv1.weight' or 'encoder.conv_in.weight').")


def _block_inside(rest: str, table: dict[str, str], name: str, layout: str) -> str:
    """Rename the part of a name inside one residual / attention / resample block."""
    if rest.startswith(_SAME_INSIDE):
        return rest
    prefix, _, leaf = rest.rpartition(".")
    if prefix in table:
        return f"{table[prefix]}.{leaf}"
    raise _unknown(name, layout)


def diffusers_to_wan(name: str, num_res_blocks: int = 2) -> str:
    """The original Wan 2.1 (ComfyUI) name of a diffusers ``AutoencoderKLQwenImage`` tensor name.

    Raises :class:`~models.io.weights.WeightFileError` for a name that is not part of the diffusers VAE.
    """
    if name.startswith("quant_conv."):
        return "conv1." + name[len("quant_conv."):]
    if name.startswith("post_quant_conv."):
        return "conv2." + name[len("post_quant_conv."):]
    side, dot, rest = name.partition(".")
    if side not in ("encoder", "decoder") or not dot:
        raise _unknown(name, "diffusers")
    if rest.startswith("conv_in."):
        return f"{side}.conv1.{rest[len('conv_in.'):]}"
    for diffusers, wan in _HEAD_DIFFUSERS_TO_WAN.items():
        if rest.startswith(diffusers):
            return f"{side}.{wan}{rest[len(diffusers):]}"
    match = re.fullmatch(r"(mid_block\.(?:resnets|attentions)\.\d+)\.(.+)", rest)
    if match and match.group(1) in _MIDDLE_DIFFUSERS_TO_WAN:
        inside = _block_inside(match.group(2), _RESIDUAL_DIFFUSERS_TO_WAN, name, "diffusers")
        return f"{side}.middle.{_MIDDLE_DIFFUSERS_TO_WAN[match.group(1)]}.{inside}"
    if side == "encoder":
        match = re.fullmatch(r"down_blocks\.(\d+)\.(.+)", rest)
        if match:
            inside = _block_inside(match.group(2), _RESIDUAL_DIFFUSERS_TO_WAN, name, "diffusers")
            return f"encoder.downsamples.{match.group(1)}.{inside}"
    else:
        match = re.fullmatch(r"up_blocks\.(\d+)\.(?:resnets\.(\d+)|(upsamplers\.0))\.(.+)", rest)
        if match and (match.group(3) or int(match.group(2)) <= num_res_blocks):
            position = num_res_blocks + 1 if match.group(3) else int(match.group(2))
            index = int(match.group(1)) * (num_res_blocks + 2) + position
            inside = _block_inside(match.group(4), _RESIDUAL_DIFFUSERS_TO_WAN, name, "diffusers")
            return f"decoder.upsamples.{index}.{inside}"
    raise _unknown(name, "diffusers")
