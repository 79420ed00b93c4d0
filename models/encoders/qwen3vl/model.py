"""Qwen3-VL: the language model (q/k-normed GQA decoder, interleaved M-RoPE, DeepStack) and the vision tower.

Module parameter names are the Comfy-style single-file names (transformers-5 names with ``model.language_model.``
-> ``model.`` and ``model.visual.`` -> ``visual.``, as for Qwen2.5-VL):

* ``model.embed_tokens``, ``model.layers.N.{self_attn.{q,k,v,o}_proj, self_attn.{q,k}_norm, mlp.{gate,up,
  down}_proj, input_layernorm, post_attention_layernorm}``.  The final ``model.norm`` is not part of the module:
  the condition is the last decoder layer's output *before* it (see :class:`LanguageModel`), and ``lm_head`` is
  never used.
* ``visual.patch_embed.proj`` (Conv3d with bias), ``visual.pos_embed`` (a learned square grid of position
  embeddings, resampled to each image), ``visual.blocks.N.{norm1, norm2 (LayerNorm), attn.qkv, attn.proj,
  mlp.linear_fc1, mlp.linear_fc2}``, ``visual.merger.{norm, linear_fc1, linear_fc2}`` and
  ``visual.deepstack_merger_list.K.{norm, linear_fc1, linear_fc2}``.

DeepStack: the output of vision block ``deepstack_indexes[k]`` goes through ``deepstack_merger_list.k`` and is added
to the image tokens' hidden states after decoder layer ``k``.

All layers come from an operations namespace ``ops`` (see :mod:`models.common.ops`); every attention call goes
through :func:`models.common.attention.attention` with the caller's ``options``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ...common.attention import Options
from ...common.ops import CastOps
from ...common.tiled_vae import Progress
from ..blocks import (DecoderConfig, DecoderLayer, PatchEmbed, VisionBlock, chunk_groups, inverse_frequencies,
                      merge_window_coords, vision_rotary)

__all__ = ["TextConfig", "VisionConfig", "Qwen3VLModel", "LanguageModel", "VisionTower", "default_mrope_section",
           "default_deepstack_indexes"]


def default_mrope_section(head_dim: int) -> tuple[int, int, int]:
    """Interleaved M-RoPE split (temporal, height, width) of ``head_dim // 2``: height and width 5/16 each, the
    rest temporal (128 -> 24, 20, 20)."""
    half = head_dim // 2
    spatial = half * 5 // 16
    return half - 2 * spatial, spatial, spatial


def default_deepstack_indexes(depth: int, count: int) -> tuple[int, ...]:
    """Vision blocks feeding the ``count`` DeepStack mergers: evenly spaced ``(k + 1) * (depth - 3) // count``
    (the real 27-block tower with 3 mergers: 8, 16, 24)."""
    return tuple((k + 1) * (depth - 3) // count for k in range(count))


@dataclass(frozen=True)
class TextConfig(DecoderConfig):
    """Language-model shape.  Real Qwen3-VL-8B: vocab 151936, hidden 4096, MLP 12288, 36 layers, 32 heads,
    8 KV heads, head_dim 128, rope theta 5e6, M-RoPE sections (24, 20, 20) interleaved."""

    rope_theta: float = 5_000_000.0

    def default_sections(self) -> tuple[int, int, int]:
        return default_mrope_section(self.head_dim)


@dataclass(frozen=True)
class VisionConfig:
    """Vision-tower shape.  Real Qwen3-VL-8B: hidden 1152, MLP 4304, depth 27, 16 heads, output 4096 (the LM
    width), 2304 (48 x 48) position embeddings, DeepStack after blocks 8, 16, 24, patch 16."""

    hidden_size: int
    intermediate_size: int
    depth: int
    num_heads: int
    out_hidden_size: int
    num_position_embeddings: int
    deepstack_indexes: tuple[int, ...]
    patch_size: int = 16
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    in_channels: int = 3
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6

    @property
    def patch_dim(self) -> int:
        """Length of one flattened input patch: channels x temporal x patch x patch (3 x 2 x 16 x 16 = 1536)."""
        return self.in_channels * self.temporal_patch_size * self.patch_size * self.patch_size


# ---------------------------------------------------------------------------------------------------------------
# Language model
# ---------------------------------------------------------------------------------------------------------------
class LanguageModel(nn.Module):
    """The Qwen3 decoder stack with DeepStack injection; :meth:`forward` returns the last layer's output before
    the final norm (what Qwen-Image 2.1 conditions on)."""

    def __init__(self, cfg: TextConfig, device=None, dtype=None, ops=CastOps):
        super().__init__()
        self.config = cfg
        self.embed_tokens = ops.Embedding(cfg.vocab_size, cfg.hidden_size, device=device, dtype=dtype)
        self.layers = nn.ModuleList(DecoderLayer(cfg, qkv_bias=False, qk_norm=True, device=device, dtype=dtype,
                                                 ops=ops) for _ in range(cfg.num_layers))

    def rotary(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin ``[L, head_dim]`` (fp32) for 3D positions ``[3, L]``.  Interleaved M-RoPE: frequency ``i``
        reads the height axis when ``i % 3 == 1`` and ``i < 3 * sections[1]``, the width axis when ``i % 3 == 2``
        and ``i < 3 * sections[2]``, the temporal axis otherwise."""
        cfg = self.config
        inv_freq = inverse_frequencies(cfg.head_dim, cfg.rope_theta, positions.device)
        index = torch.arange(inv_freq.numel(), device=positions.device)
        _, height, width = cfg.sections
        axis = torch.zeros_like(index)
        axis[(index % 3 == 1) & (index < 3 * height)] = 1
        axis[(index % 3 == 2) & (index < 3 * width)] = 2
        angles = positions[axis].float() * inv_freq[:, None]  # [head_dim / 2, L]: each frequency on its axis
        angles = torch.cat((angles, angles), dim=0).T
        return angles.cos(), angles.sin()

    def forward(self, embeds: torch.Tensor, positions: torch.Tensor, image_mask: torch.Tensor | None = None,
                deepstack: Sequence[torch.Tensor] = (), options: Options | None = None,
                progress: Progress | None = None) -> torch.Tensor:
        """``embeds [B, L, hidden]`` (in the compute dtype), ``positions [3, L]``; ``image_mask [L]`` bool marks
        the image tokens, which get ``deepstack[k] [n_image_tokens, hidden]`` added after layer ``k``.
        ``progress(done, total)`` is called after each layer (an exception it raises, a host's interrupt, stops
        encoding).  Returns ``[B, L, hidden]``, the last layer's output (no final norm)."""
        cos, sin = self.rotary(positions.to(embeds.device))
        x = embeds
        for index, layer in enumerate(self.layers):
            x = layer(x, cos, sin, options)
            if index < len(deepstack):
                x[:, image_mask] += deepstack[index].to(x.dtype)
            if progress is not None:
                progress(index + 1, len(self.layers))
        return x


# ---------------------------------------------------------------------------------------------------------------
# Vision tower
# ---------------------------------------------------------------------------------------------------------------
class VisionMLP(nn.Module):
    """``fc2(gelu_tanh(fc1(x)))`` with biases."""

    def __init__(self, cfg: VisionConfig, device=None, dtype=None, ops=CastOps):
        super().__init__()
        self.linear_fc1 = ops.Linear(cfg.hidden_size, cfg.intermediate_size, bias=True, device=device, dtype=dtype)
        self.linear_fc2 = ops.Linear(cfg.intermediate_size, cfg.hidden_size, bias=True, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_fc2(F.gelu(self.linear_fc1(x), approximate="tanh"))


class PatchMerger(nn.Module):
    """Each merge window of patches (2x2) concatenated -> Linear, GELU, Linear to the LM width.  The LayerNorm runs
    per patch (the final merger) or on the concatenation (``post_shuffle``: the DeepStack mergers)."""

    def __init__(self, cfg: VisionConfig, post_shuffle: bool, device=None, dtype=None, ops=CastOps):
        super().__init__()
        self.merged_dim = cfg.hidden_size * cfg.spatial_merge_size ** 2
        self.post_shuffle = post_shuffle
        self.norm = ops.LayerNorm(self.merged_dim if post_shuffle else cfg.hidden_size, eps=cfg.norm_eps,
                                  device=device, dtype=dtype)
        self.linear_fc1 = ops.Linear(self.merged_dim, self.merged_dim, bias=True, device=device, dtype=dtype)
        self.linear_fc2 = ops.Linear(self.merged_dim, cfg.out_hidden_size, bias=True, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[N, hidden]`` patches in processor order -> ``[N / merge^2, out_hidden]``."""
        if self.post_shuffle:
            x = self.norm(x.reshape(-1, self.merged_dim))
        else:
            x = self.norm(x).reshape(-1, self.merged_dim)
        return self.linear_fc2(F.gelu(self.linear_fc1(x)))


class VisionTower(nn.Module):
    """Qwen3-VL vision transformer for one image at a time.

    Input: flattened patches ``[gh * gw, patch_dim]`` in the image processor's (merge-window) order and the patch
    grid ``(gh, gw)``.  Output: ``(tokens [gh * gw / merge^2, out_hidden], deepstack)``: the merged tokens in the
    order of the ``<|image_pad|>`` tokens, and one ``[gh * gw / merge^2, out_hidden]`` feature per DeepStack merger.
    """

    def __init__(self, cfg: VisionConfig, device=None, dtype=None, ops=CastOps):
        super().__init__()
        self.config = cfg
        self.patch_embed = PatchEmbed(cfg, bias=True, device=device, dtype=dtype, ops=ops)
        self.pos_embed = ops.Embedding(cfg.num_position_embeddings, cfg.hidden_size, device=device, dtype=dtype)

        def norm(dim: int) -> nn.Module:
            return ops.LayerNorm(dim, eps=cfg.norm_eps, device=device, dtype=dtype)

        self.blocks = nn.ModuleList(VisionBlock(cfg, norm, VisionMLP(cfg, device=device, dtype=dtype, ops=ops),
                                                device=device, dtype=dtype, ops=ops) for _ in range(cfg.depth))
        self.merger = PatchMerger(cfg, post_shuffle=False, device=device, dtype=dtype, ops=ops)
        self.deepstack_merger_list = nn.ModuleList(PatchMerger(cfg, post_shuffle=True, device=device, dtype=dtype,
                                                               ops=ops) for _ in cfg.deepstack_indexes)

    def _position_embeddings(self, grid_h: int, grid_w: int, dtype: torch.dtype) -> torch.Tensor:
        """The learned square grid resampled (bilinear, corners aligned) to ``gh x gw``, in processor order."""
        side = math.isqrt(self.config.num_position_embeddings)
        table = self.pos_embed(torch.arange(side * side), out_dtype=torch.float32)
        table = table.T.reshape(1, -1, side, side)  # [1, hidden, side, side]
        grid = F.interpolate(table, size=(grid_h, grid_w), mode="bilinear", align_corners=True)[0]
        rows, cols = merge_window_coords(grid_h, grid_w, self.config.spatial_merge_size, grid.device)
        return grid[:, rows, cols].T.to(dtype)  # [gh * gw, hidden]

    def forward(self, patches: torch.Tensor, grid: tuple[int, int], dtype: torch.dtype | None = None,
                options: Options | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        cfg = self.config
        grid_h, grid_w = grid
        if patches.shape != (grid_h * grid_w, cfg.patch_dim):
            raise ValueError(f"vision tower: expected patches of shape {(grid_h * grid_w, cfg.patch_dim)}, "
                             f"got {tuple(patches.shape)}")
        x = self.patch_embed(patches.to(dtype or patches.dtype))
        x = x + self._position_embeddings(grid_h, grid_w, x.dtype).to(x.device)
        cos, sin = vision_rotary(grid_h, grid_w, cfg.spatial_merge_size, cfg.hidden_size // cfg.num_heads,
                                 cfg.rope_theta, x.device)
        whole_image = chunk_groups([grid_h * grid_w], x.device)  # no windows: every block sees the whole image
        deepstack = []
        for index, block in enumerate(self.blocks):
            x = block(x, cos, sin, whole_image, options)
            if index in cfg.deepstack_indexes:
                deepstack.append(self.deepstack_merger_list[cfg.deepstack_indexes.index(index)](x))
        return self.merger(x), deepstack


class Qwen3VLModel(nn.Module):
    """Language model (``model``) plus the vision tower (``visual``)."""

    def __init__(self, text: TextConfig, vision: VisionConfig, device=None, dtype=None, ops=CastOps):
        super().__init__()
        self.model = LanguageModel(text, device=device, dtype=dtype, ops=ops)
        self.visual = VisionTower(vision, device=device, dtype=dtype, ops=ops)
