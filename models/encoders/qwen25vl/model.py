"""Qwen2.5-VL, the Qwen-Image condition encoder: the language model (M-RoPE decoder) and the vision tower.

Module parameter names are the ComfyUI single-file names, so a Comfy checkpoint loads without renaming:
``model.embed_tokens``, ``model.layers.N.{self_attn.{q,k,v,o}_proj, mlp.{gate,up,down}_proj, input_layernorm,
post_attention_layernorm}``, ``model.norm``, ``visual.patch_embed.proj``, ``visual.blocks.N.{norm1, norm2,
attn.qkv, attn.proj, mlp.{gate,up,down}_proj}``, ``visual.merger.{ln_q, mlp.0, mlp.2}``.  There is no LM head:
the condition is the post-final-norm last hidden state.

All layers come from an operations namespace ``ops`` (see :mod:`models.common.ops`) so a host can supply its own.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ...common.attention import Options
from ...common.ops import CastOps
from ...common.tiled_vae import Progress
from ..blocks import (DecoderConfig, DecoderLayer, GatedMLP, PatchEmbed, VisionBlock, chunk_groups, inverse_frequencies,
                      mrope_positions, vision_rotary)

__all__ = [
    "TextConfig", "VisionConfig", "Qwen25VLModel", "LanguageModel", "VisionTower",
    "default_mrope_section", "mrope_positions",
]


def default_mrope_section(head_dim: int) -> tuple[int, int, int]:
    """M-RoPE frequency split (temporal, height, width) of ``head_dim // 2``: 1/4, 3/8, 3/8 (128 -> 16, 24, 24)."""
    half = head_dim // 2
    temporal = half // 4
    height = (half - temporal) // 2
    return temporal, height, half - temporal - height


@dataclass(frozen=True)
class TextConfig(DecoderConfig):
    """Language-model shape. Real Qwen2.5-VL-7B: 152064, 3584, 18944, 28 layers, 28 heads, 4 KV heads, 128;
    rope theta 1e6."""

    def default_sections(self) -> tuple[int, int, int]:
        return default_mrope_section(self.head_dim)


@dataclass(frozen=True)
class VisionConfig:
    """Vision-tower shape. Real: hidden 1280, depth 32, 16 heads, MLP 3420, output 3584 (the LM width)."""

    hidden_size: int
    intermediate_size: int
    depth: int
    num_heads: int
    out_hidden_size: int
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    in_channels: int = 3
    window_size: int = 112
    fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6

    @property
    def patch_dim(self) -> int:
        """Length of one flattened input patch: channels x temporal x patch x patch (3 x 2 x 14 x 14 = 1176)."""
        return self.in_channels * self.temporal_patch_size * self.patch_size * self.patch_size


# ---------------------------------------------------------------------------------------------------------------
# Language model
# ---------------------------------------------------------------------------------------------------------------
class LanguageModel(nn.Module):
    """The Qwen2.5 decoder stack; :meth:`forward` returns the post-final-norm hidden states."""

    def __init__(self, cfg: TextConfig, device=None, dtype=None, ops=CastOps):
        super().__init__()
        self.config = cfg
        self.embed_tokens = ops.Embedding(cfg.vocab_size, cfg.hidden_size, device=device, dtype=dtype)
        self.layers = nn.ModuleList(DecoderLayer(cfg, qkv_bias=True, qk_norm=False, device=device,
                                                 dtype=dtype, ops=ops) for _ in range(cfg.num_layers))
        self.norm = ops.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, device=device, dtype=dtype)

    def rotary(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin ``[L, head_dim]`` (fp32) for 3D positions ``[3, L]``: each frequency band reads one axis."""
        cfg = self.config
        inv_freq = inverse_frequencies(cfg.head_dim, cfg.rope_theta, positions.device)
        angles = positions[..., None].float() * inv_freq  # [3, L, head_dim / 2]
        bands = angles.split(list(cfg.sections), dim=-1)
        angles = torch.cat([band[axis % 3] for axis, band in enumerate(bands)], dim=-1)
        angles = torch.cat((angles, angles), dim=-1)
        return angles.cos(), angles.sin()

    def forward(self, embeds: torch.Tensor, positions: torch.Tensor, options: Options | None = None,
                progress: Progress | None = None) -> torch.Tensor:
        """``embeds`` ``[B, L, hidden]`` (already in the compute dtype), ``positions`` ``[3, L]`` -> ``[B, L, hidden]``.

        ``progress(done, total)`` is called after each layer; an exception it raises (a host's interrupt) stops
        the stack there."""
        cos, sin = self.rotary(positions.to(embeds.device))
        x = embeds
        for index, layer in enumerate(self.layers):
            x = layer(x, cos, sin, options)
            if progress is not None:
                progress(index + 1, len(self.layers))
        return self.norm(x)


# ---------------------------------------------------------------------------------------------------------------
# Vision tower
# ---------------------------------------------------------------------------------------------------------------
class PatchMerger(nn.Module):
    """RMSNorm per patch, then each merge-window of patches (2x2) concatenated -> Linear, GELU, Linear."""

    def __init__(self, cfg: VisionConfig, device=None, dtype=None, ops=CastOps):
        super().__init__()
        self.merged_dim = cfg.hidden_size * cfg.spatial_merge_size ** 2
        self.ln_q = ops.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, device=device, dtype=dtype)
        self.mlp = nn.Sequential(
            ops.Linear(self.merged_dim, self.merged_dim, bias=True, device=device, dtype=dtype),
            nn.GELU(),
            ops.Linear(self.merged_dim, cfg.out_hidden_size, bias=True, device=device, dtype=dtype),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.ln_q(x).reshape(-1, self.merged_dim))


class VisionTower(nn.Module):
    """Qwen2.5-VL vision transformer for one image at a time.

    Input: flattened patches ``[gh * gw, patch_dim]`` in the image processor's order (merge-window order, see
    :mod:`models.encoders.vision_preprocess`) and the patch grid ``(gh, gw)``.  Output: ``[gh * gw / merge^2,
    out_hidden]`` merged tokens in the same (row-major over merge windows) order as the ``<|image_pad|>`` tokens.

    Inside, merge windows are reordered so every attention window (``window_size`` pixels square) is contiguous;
    window blocks attend within their window, the ``fullatt_block_indexes`` blocks over the whole image.
    """

    def __init__(self, cfg: VisionConfig, device=None, dtype=None, ops=CastOps):
        super().__init__()
        self.config = cfg
        self.patch_embed = PatchEmbed(cfg, bias=False, device=device, dtype=dtype, ops=ops)

        def norm(dim: int) -> nn.Module:
            return ops.RMSNorm(dim, eps=cfg.rms_norm_eps, device=device, dtype=dtype)

        self.blocks = nn.ModuleList(
            VisionBlock(cfg, norm, GatedMLP(cfg.hidden_size, cfg.intermediate_size, bias=True, device=device,
                                            dtype=dtype, ops=ops), device=device, dtype=dtype, ops=ops)
            for _ in range(cfg.depth))
        self.merger = PatchMerger(cfg, device=device, dtype=dtype, ops=ops)

    def _window_order(self, grid_h: int, grid_w: int, device) -> tuple[torch.Tensor, list[int]]:
        """Merge-window (unit) indices in window-major order, and the patch count of each window."""
        cfg = self.config
        merge = cfg.spatial_merge_size
        rows, cols = grid_h // merge, grid_w // merge
        span = cfg.window_size // merge // cfg.patch_size  # window side in merge units (112 px -> 4)
        units = torch.arange(rows * cols, device=device).view(rows, cols)
        order, lengths = [], []
        for top in range(0, rows, span):
            for left in range(0, cols, span):
                window = units[top:top + span, left:left + span].reshape(-1)
                order.append(window)
                lengths.append(window.numel() * merge * merge)
        return torch.cat(order), lengths

    def forward(self, patches: torch.Tensor, grid: tuple[int, int], dtype: torch.dtype | None = None,
                options: Options | None = None) -> torch.Tensor:
        cfg = self.config
        grid_h, grid_w = grid
        unit = cfg.spatial_merge_size ** 2
        if patches.shape != (grid_h * grid_w, cfg.patch_dim):
            raise ValueError(f"vision tower: expected patches of shape {(grid_h * grid_w, cfg.patch_dim)}, "
                             f"got {tuple(patches.shape)}")
        device = patches.device
        units, window_lengths = self._window_order(grid_h, grid_w, device)
        patch_order = (units[:, None] * unit + torch.arange(unit, device=device)).reshape(-1)
        window_chunks = chunk_groups(window_lengths, device)
        full_chunks = chunk_groups([grid_h * grid_w], device)

        x = self.patch_embed(patches.to(dtype or patches.dtype))[patch_order]
        cos, sin = vision_rotary(grid_h, grid_w, cfg.spatial_merge_size, cfg.hidden_size // cfg.num_heads,
                                 cfg.rope_theta, device)
        cos, sin = cos[patch_order], sin[patch_order]
        for index, block in enumerate(self.blocks):
            chunks = full_chunks if index in cfg.fullatt_block_indexes else window_chunks
            x = block(x, cos, sin, chunks, options)
        merged = self.merger(x)
        return merged[torch.argsort(units)]


class Qwen25VLModel(nn.Module):
    """Language model (``model``) plus an optional vision tower (``visual``; ``None`` for a text-only file)."""

    def __init__(self, text: TextConfig, vision: VisionConfig | None, device=None, dtype=None, ops=CastOps):
        super().__init__()
        self.model = LanguageModel(text, device=device, dtype=dtype, ops=ops)
        self.visual = VisionTower(vision, device=device, dtype=dtype, ops=ops) if vision is not None else None

