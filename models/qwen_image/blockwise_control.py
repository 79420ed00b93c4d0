"""DiffSynth "blockwise" ControlNets for Qwen-Image (Canny, Depth, Inpaint): model patches, not ControlNets.

A file holds ``img_in`` (Linear from the packed control latent, 64 channels or 68 for Inpaint, to the DiT width)
and one ``controlnet_blocks.N`` per DiT block, each ``output_proj(GELU(input_proj(x_rms(img) + y_rms(control))))``
with RMSNorms of eps 1e-6 and exact GELU.  After DiT block ``i`` the target image tokens get
``strength * controlnet_blocks[i](target tokens, control tokens)`` added (ComfyUI 0.3.75 applies it this way as a
``double_block`` patch, before any ControlNet residual).  The control tokens are computed once per control image:
``img_in(pack(normalized latent [+ keep mask]))``.

Usage with :class:`models.qwen_image.dit.QwenImageDiT`::

    control = load_blockwise_control(path)
    tokens = control.encode(control_latent)            # once per image size
    dit(x, t, ctx, block_patches=[control.patch(tokens, strength)])
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..common.ops import CastOps
from ..io.loading import materialize, open_weights
from ..io.weights import WeightFileError, tensor_shape
from ..registry import expect
from .dit import BlockPatch
from .latent import QWEN_IMAGE_LATENT

__all__ = ["BlockwiseControlConfig", "BlockwiseControl", "load_blockwise_control", "blockwise_from_tensors",
           "blockwise_inpaint_latent"]

logger = logging.getLogger("qwen_image")

_EPS = 1e-6
REQUIRED = ("img_in.weight", "controlnet_blocks.0.x_rms.weight", "controlnet_blocks.0.y_rms.weight",
            "controlnet_blocks.0.input_proj.weight", "controlnet_blocks.0.output_proj.weight")
EXPECTED = "a DiffSynth Qwen-Image blockwise ControlNet (model patch)"
_PATCH = QWEN_IMAGE_LATENT.patch_size


@dataclass(frozen=True)
class BlockwiseControlConfig:
    """Shape of a DiffSynth blockwise ControlNet (defaults: the released files for the 60-block DiT)."""

    depth: int = 60
    width: int = 3072
    in_channels: int = 64
    extra_channels: int = 0  # packed: 4 for the Inpaint variant (one mask channel)

    @property
    def control_channels(self) -> int:
        """Channels of the unpacked control latent: 16, or 17 for the Inpaint variant."""
        return (self.in_channels + self.extra_channels) // (_PATCH * _PATCH)


class ControlBlock(nn.Module):
    """``output_proj(GELU(input_proj(x_rms(img) + y_rms(control))))``."""

    def __init__(self, width: int, ops, device=None, dtype=None):
        super().__init__()
        self.x_rms = ops.RMSNorm(width, eps=_EPS, device=device, dtype=dtype)
        self.y_rms = ops.RMSNorm(width, eps=_EPS, device=device, dtype=dtype)
        self.input_proj = ops.Linear(width, width, bias=True, device=device, dtype=dtype)
        self.output_proj = ops.Linear(width, width, bias=True, device=device, dtype=dtype)

    def forward(self, img: torch.Tensor, control: torch.Tensor) -> torch.Tensor:
        return self.output_proj(F.gelu(self.input_proj(self.x_rms(img) + self.y_rms(control))))


class BlockwiseControl(nn.Module):
    """A DiffSynth blockwise ControlNet: :meth:`encode` the control latent once, then :meth:`block_residual`
    per DiT block (or hand :meth:`patch` to ``QwenImageDiT(..., block_patches=[...])``)."""

    def __init__(self, config: BlockwiseControlConfig, compute_dtype: torch.dtype = torch.float32, ops=CastOps,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        self.config = config
        self.compute_dtype = compute_dtype
        self.img_in = ops.Linear(config.in_channels + config.extra_channels, config.width, bias=True,
                                 device=device, dtype=dtype)
        self.controlnet_blocks = nn.ModuleList(ControlBlock(config.width, ops, device=device, dtype=dtype)
                                               for _ in range(config.depth))

    @torch.no_grad()
    def encode(self, control_latent: torch.Tensor) -> torch.Tensor:
        """Control tokens ``[B, N, width]`` from the normalized control latent ``[B, 16, H, W]`` (``[B, 17, H, W]``
        for the Inpaint variant, see :func:`blockwise_inpaint_latent`), ``H`` and ``W`` even (the target's size)."""
        channels = self.config.control_channels
        if control_latent.ndim != 4 or control_latent.shape[1] != channels:
            raise ValueError(f"expected a control latent [B, {channels}, H, W], got {tuple(control_latent.shape)}")
        if control_latent.shape[2] % _PATCH or control_latent.shape[3] % _PATCH:
            raise ValueError(f"control latent sizes must be multiples of {_PATCH}, got {tuple(control_latent.shape)}")
        return self.img_in(QWEN_IMAGE_LATENT.pack(control_latent.to(self.compute_dtype)))

    @torch.no_grad()
    def block_residual(self, block_index: int, img_tokens: torch.Tensor, control_tokens: torch.Tensor) -> torch.Tensor:
        """The (unscaled) residual for the target image tokens ``[B, N, width]`` after DiT block ``block_index``;
        ``control_tokens`` from :meth:`encode` (batch 1 broadcasts)."""
        if not 0 <= block_index < len(self.controlnet_blocks):
            raise ValueError(f"this blockwise ControlNet has {len(self.controlnet_blocks)} blocks; DiT block "
                             f"{block_index} has none (the ControlNet was made for a different DiT).")
        if img_tokens.shape[1] != control_tokens.shape[1]:
            raise ValueError(f"{control_tokens.shape[1]} control tokens for {img_tokens.shape[1]} image tokens: "
                             "encode the control image at the target latent's size.")
        control = control_tokens.to(device=img_tokens.device, dtype=img_tokens.dtype)
        return self.controlnet_blocks[block_index](img_tokens, control)

    def patch(self, control_tokens: torch.Tensor, strength: float = 1.0) -> BlockPatch:
        """A ``block_patches`` entry for :class:`models.qwen_image.dit.QwenImageDiT`: ``strength * block_residual``."""

        def apply(block_index: int, img_tokens: torch.Tensor) -> torch.Tensor:
            return self.block_residual(block_index, img_tokens, control_tokens) * strength

        return apply


def blockwise_inpaint_latent(latent: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The 17-channel control latent of the Inpaint variant, as ComfyUI's ``QwenImageDiffsynthControlnet`` builds it.

    ``latent``: normalized VAE latent ``[B, 16, h, w]`` of the control image; ``mask``: ``[B or 1, H, W]`` or
    ``[B or 1, 1, H, W]`` at any resolution, 1 = repaint, or None (nothing to repaint).  Channel 16 is the kept
    area ``1 - mask`` resized bilinearly to ``h x w``.
    """
    if mask is None:
        keep = torch.ones_like(latent[:, :1])
    else:
        if mask.ndim == 3:
            mask = mask[:, None]
        if mask.ndim != 4 or mask.shape[1] != 1:
            raise ValueError(f"expected a mask [B, H, W] or [B, 1, H, W], got {tuple(mask.shape)}")
        keep = F.interpolate(1.0 - mask.to(device=latent.device, dtype=latent.dtype), size=latent.shape[-2:],
                             mode="bilinear")
        if keep.shape[0] != latent.shape[0]:
            keep = keep.expand(latent.shape[0], -1, -1, -1)
    return torch.cat([latent, keep], dim=1)


def detect_blockwise_config(tensors: Mapping, source: str = "checkpoint") -> BlockwiseControlConfig:
    """The :class:`BlockwiseControlConfig` of a DiffSynth blockwise ControlNet mapping, from tensor shapes."""
    width, in_features = tensor_shape(tensors, "img_in.weight")
    base = _PATCH * _PATCH * QWEN_IMAGE_LATENT.channels
    extra = in_features - base
    if extra < 0 or extra % (_PATCH * _PATCH) or tensor_shape(tensors, "controlnet_blocks.0.x_rms.weight") != (width,):
        raise WeightFileError(f"{source}: inconsistent blockwise ControlNet shapes (img_in {in_features} -> "
                              f"{width}).")
    depth = 0
    while f"controlnet_blocks.{depth}.input_proj.weight" in tensors:
        depth += 1
    return BlockwiseControlConfig(depth=depth, width=width, in_channels=base, extra_channels=extra)


def blockwise_from_tensors(tensors: Mapping, dtype: torch.dtype = torch.float32,
                           device: torch.device | str = "cpu", ops=None,
                           source: str = "checkpoint") -> BlockwiseControl:
    """Build a :class:`BlockwiseControl` from a ``name -> tensor`` mapping (DiffSynth / Comfy-Org names)."""
    expect(tensors, "qwen_image", "model_patch", EXPECTED, REQUIRED, source_name=source)
    config = detect_blockwise_config(tensors, source)
    logger.info("Qwen-Image blockwise ControlNet: %d blocks, width %d%s", config.depth, config.width,
                ", inpaint" if config.extra_channels else "")
    model = BlockwiseControl(config, compute_dtype=dtype, ops=ops or CastOps, device="meta", dtype=dtype)
    return materialize(model, tensors, dtype=dtype, device=device, what=f"{source} (Qwen-Image blockwise ControlNet)")


def load_blockwise_control(path: str | os.PathLike, dtype: torch.dtype = torch.float32,
                           device: torch.device | str = "cpu", ops=None) -> BlockwiseControl:
    """Load a DiffSynth blockwise ControlNet (``model.safetensors`` of DiffSynth-Studio/Qwen-Image-Blockwise-
    ControlNet-*, or Comfy-Org's ``qwen_image_*_diffsynth_controlnet.safetensors`` from ``models/model_patches``).

    ``dtype``: compute dtype (and storage dtype of float weights).  Raises :class:`WeightFileError` for any other
    file (an InstantX ControlNet, a DiT, ...), naming what it is.
    """
    weights = open_weights(path)
    return blockwise_from_tensors(weights.tensors, dtype=dtype, device=device, ops=ops, source=str(path))
