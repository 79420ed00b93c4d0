"""The InstantX Qwen-Image ControlNet (Union and Inpainting) and its loader.

The model is a short copy of the DiT's input side (``img_in``, ``txt_norm``, ``txt_in``, ``time_text_embed``)
and a few of its double-stream blocks (``transformer_blocks.N``, 5 in the released files), plus
``controlnet_x_embedder`` (the packed control latent, 64 channels, or 68 for the Inpainting variant, added to the
embedded target tokens) and one ``controlnet_blocks.N`` Linear per block.  Its output is one residual per block,
``controlnet_blocks[i](image tokens after block i) * conditioning_scale``, which
:class:`models.qwen_image.dit.QwenImageDiT` takes as ``control=`` (sample ``i // ceil(depth / samples)`` after DiT block i).

Key names are those of diffusers' ``QwenImageControlNetModel`` (the InstantX files: a folder with ``config.json``
+ ``diffusion_pytorch_model.safetensors``, or that single file as Comfy users keep it in ``models/controlnet``);
GGUF files of the same names (arch ``qwen_image``, what city96-style converters write for these keys) load
through :mod:`models.io.gguf`.  The shape (blocks, width, heads, extra channels) is detected from tensor shapes.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..common.attention import Options
from ..common.ops import CastOps
from ..io.loading import TensorView, materialize
from ..io.weights import WeightFileError, tensor_shape
from ..registry import expect
from .dit import DiTConfig, DoubleStreamTrunk, joint_attention_mask, pack_latent
from .dit_loader import open_dit_weights, trunk_shape
from .latent import QWEN_IMAGE_LATENT

__all__ = ["ControlNetConfig", "QwenImageControlNet", "load_controlnet", "controlnet_from_tensors",
           "detect_controlnet_config", "controlnet_inpaint_latent"]

logger = logging.getLogger("qwen_image")

REQUIRED = ("img_in.weight", "txt_in.weight", "controlnet_x_embedder.weight", "controlnet_blocks.0.weight",
            "transformer_blocks.0.attn.norm_q.weight")
EXPECTED = "an InstantX Qwen-Image ControlNet (Union or Inpainting)"


@dataclass(frozen=True)
class ControlNetConfig(DiTConfig):
    """Shape of an InstantX Qwen-Image ControlNet (defaults: the released Union model, 5 blocks)."""

    depth: int = 5
    extra_channels: int = 0  # packed extra control channels: 4 for the Inpainting variant (one mask channel)

    @property
    def control_channels(self) -> int:
        """Channels of the unpacked control latent: 16, or 17 for the Inpainting variant."""
        p = self.patch_size
        return (self.in_channels + self.extra_channels) // (p * p)


class QwenImageControlNet(DoubleStreamTrunk):
    """Call ``cn(x, timestep, context, control_latent, context_mask=None, conditioning_scale=1.0)``.

    Build on ``device="meta"`` and fill with :func:`models.io.weights.assign_weights` (see :func:`load_controlnet`).
    """

    def __init__(self, config: ControlNetConfig, compute_dtype: torch.dtype = torch.float32, ops=CastOps,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        super().__init__(config, compute_dtype, ops, device, dtype)
        width = config.width
        factory = {"device": device, "dtype": dtype}
        self.controlnet_blocks = nn.ModuleList(ops.Linear(width, width, bias=True, **factory)
                                               for _ in range(config.depth))
        self.controlnet_x_embedder = ops.Linear(config.in_channels + config.extra_channels, width, bias=True,
                                                **factory)

    def _packed(self, latent: torch.Tensor, channels: int, batch: int, size: tuple[int, int], what: str):
        if latent.ndim != 4 or latent.shape[1] != channels or tuple(latent.shape[2:]) != size:
            raise ValueError(f"expected {what} [B, {channels}, {size[0]}, {size[1]}], got {tuple(latent.shape)}")
        if latent.shape[0] != batch:
            if latent.shape[0] != 1:
                raise ValueError(f"{what} batch {latent.shape[0]} does not match the batch {batch}")
            latent = latent.expand(batch, -1, -1, -1)
        return pack_latent(latent.to(self.compute_dtype), self.config.patch_size)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, timestep: torch.Tensor | float, context: torch.Tensor,
                control_latent: torch.Tensor, context_mask: torch.Tensor | None = None,
                conditioning_scale: float = 1.0, options: Options | None = None) -> list[torch.Tensor]:
        """One residual ``[B, N_target_tokens, width]`` per ControlNet block (in the compute dtype).

        ``x``: the normalized target latent ``[B, 16, H, W]`` (even sizes); ``timestep``: sigma in [0, 1];
        ``context [B, L, joint_dim]`` with optional ``context_mask [B, L]``; ``control_latent``: the normalized
        VAE latent of the control image ``[B or 1, 16, H, W]``, or for the Inpainting variant
        ``[B or 1, 17, H, W]`` from :func:`controlnet_inpaint_latent`.
        """
        batch, _, height, width = x.shape
        p = self.config.patch_size
        if height % p or width % p:
            raise ValueError(f"latent height and width must be multiples of {p}, got {height}x{width}")
        device, dtype = x.device, self.compute_dtype
        img = self._packed(x, QWEN_IMAGE_LATENT.channels, batch, (height, width), "a latent")
        hint = self._packed(control_latent.to(device), self.config.control_channels, batch, (height, width),
                            "a control latent")
        img = self.image_tokens(img) + self.controlnet_x_embedder(hint)

        silu_temb = self.time_embedding(torch.as_tensor(timestep, device=device).reshape(-1).expand(batch))
        txt = self.text_tokens(context, device)
        rope = self.rope([(height // p, width // p)], txt.shape[1], device, dtype)
        mask = joint_attention_mask(context_mask, img.shape[1], device)

        samples = []
        for block, head in zip(self.transformer_blocks, self.controlnet_blocks):
            img, txt = block(img, txt, silu_temb, [img.shape[1]], rope, mask, options)
            samples.append(head(img.to(dtype)) * conditioning_scale)
        return samples


def controlnet_inpaint_latent(latent: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The 17-channel control input of the Inpainting ControlNet, built as diffusers'
    ``QwenImageControlNetInpaintPipeline`` does.

    ``latent``: the normalized VAE latent ``[B, 16, h, w]`` of the image whose repainted region was set to black
    (-1 in the VAE's [-1, 1] range: pixels where ``mask > 0.5``) before encoding.  ``mask``: ``[B or 1, H, W]`` or
    ``[B or 1, 1, H, W]`` at any resolution, 1 = repaint.  The mask is resized (nearest) to the latent size and
    inverted (1 = keep), then appended as channel 16.
    """
    if mask.ndim == 3:
        mask = mask[:, None]
    if mask.ndim != 4 or mask.shape[1] != 1:
        raise ValueError(f"expected a mask [B, H, W] or [B, 1, H, W], got {tuple(mask.shape)}")
    keep = 1 - F.interpolate(mask.to(device=latent.device, dtype=latent.dtype), size=latent.shape[-2:])
    if keep.shape[0] != latent.shape[0]:
        keep = keep.expand(latent.shape[0], -1, -1, -1)
    return torch.cat([latent, keep], dim=1)


def detect_controlnet_config(tensors: Mapping, config_json: dict | None = None,
                             source: str = "checkpoint") -> ControlNetConfig:
    """The :class:`ControlNetConfig` of a prefix-free InstantX ControlNet mapping, from tensor shapes."""
    shape = trunk_shape(tensors, config_json, source)
    embed_width, control_in = tensor_shape(tensors, "controlnet_x_embedder.weight")
    extra = control_in - shape["in_channels"]
    if extra < 0 or extra % 4 or embed_width != shape["heads"] * shape["head_dim"]:
        raise WeightFileError(f"{source}: inconsistent Qwen-Image ControlNet shapes (control in {control_in}, "
                              f"embedder width {embed_width}).")
    depth = 0
    while f"transformer_blocks.{depth}.attn.norm_q.weight" in tensors:
        depth += 1
    heads = sum(1 for k in tensors if k.startswith("controlnet_blocks.") and k.endswith(".weight"))
    if heads != depth:
        raise WeightFileError(f"{source}: {depth} transformer_blocks but {heads} controlnet_blocks; the file is "
                              "incomplete or not an InstantX Qwen-Image ControlNet.")
    return ControlNetConfig(depth=depth, extra_channels=extra, **shape)


def controlnet_from_tensors(tensors: Mapping, dtype: torch.dtype = torch.float32,
                            device: torch.device | str = "cpu", ops=None, config_json: dict | None = None,
                            source: str = "checkpoint") -> QwenImageControlNet:
    """Build a :class:`QwenImageControlNet` from a ``name -> tensor`` mapping (diffusers / InstantX names).

    ``dtype`` is the compute dtype and the storage dtype of non-fp8 weights.
    """
    identity = expect(tensors, "qwen_image", "controlnet", EXPECTED, REQUIRED, source_name=source)
    tensors = TensorView(tensors, identity.prefix)
    config = detect_controlnet_config(tensors, config_json, source)
    logger.info("Qwen-Image ControlNet: %d blocks, width %d%s", config.depth, config.width,
                ", inpainting" if config.extra_channels else "")
    model = QwenImageControlNet(config, compute_dtype=dtype, ops=ops or CastOps, device="meta", dtype=dtype)
    return materialize(model, tensors, dtype=dtype, device=device, what=f"{source} (Qwen-Image ControlNet)")


def load_controlnet(path: str | os.PathLike, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                    ops=None) -> QwenImageControlNet:
    """Load an InstantX Qwen-Image ControlNet (Union or Inpainting) from a ``.safetensors`` file, a diffusers
    folder (``config.json`` + ``diffusion_pytorch_model.safetensors``) or a ``.gguf`` file.

    ``dtype``: compute dtype (and storage dtype of float weights).  ``ops``: operations namespace (default
    :class:`models.common.ops.CastOps`; GGUF files default to their quantized layers).  Raises
    :class:`WeightFileError` for any other file (a Flux / SD ControlNet, a DiT, a DiffSynth model patch ...).
    """
    weights = open_dit_weights(path, "controlnet")
    return controlnet_from_tensors(weights.tensors, dtype=dtype, device=device, ops=ops or weights.ops,
                                   config_json=weights.config, source=str(path))
