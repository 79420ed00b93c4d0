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
import torch.nn.functional as F
from torch import nn

from ...common.attention import Options, attention
from ...common.ops import CastOps

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
class TextConfig:
    """Language-model shape. Real Qwen2.5-VL-7B: 152064, 3584, 18944, 28 layers, 28 heads, 4 KV heads, 128."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    mrope_section: tuple[int, int, int] | None = None  # None: default_mrope_section(head_dim)

    @property
    def sections(self) -> tuple[int, int, int]:
        return tuple(self.mrope_section) if self.mrope_section else default_mrope_section(self.head_dim)


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


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def _apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE, computed in fp32 (cos/sin are fp32) and returned in ``x``'s dtype."""
    xf = x.float()
    return (xf * cos + _rotate_half(xf) * sin).to(x.dtype)


def _inverse_frequencies(dim: int, theta: float, device: torch.device) -> torch.Tensor:
    exponents = torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim
    return 1.0 / (theta ** exponents)


# ---------------------------------------------------------------------------------------------------------------
# Language model
# ---------------------------------------------------------------------------------------------------------------
class TextAttention(nn.Module):
    """Grouped-query causal self-attention with M-RoPE; q/k/v carry a bias, the output projection does not."""

    def __init__(self, cfg: TextConfig, device=None, dtype=None, ops=CastOps):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = ops.Linear(cfg.hidden_size, cfg.num_heads * cfg.head_dim, bias=True, device=device, dtype=dtype)
        self.k_proj = ops.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=True, device=device, dtype=dtype)
        self.v_proj = ops.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=True, device=device, dtype=dtype)
        self.o_proj = ops.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=False, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, options: Options | None = None) -> torch.Tensor:
        batch, length, _ = x.shape
        q = self.q_proj(x).view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = _apply_rotary(q, cos, sin), _apply_rotary(k, cos, sin)
        groups = self.num_heads // self.num_kv_heads
        if groups > 1:
            k = k.repeat_interleave(groups, dim=1)
            v = v.repeat_interleave(groups, dim=1)
        out = attention(q, k, v, causal=True, options=options)
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, -1))


class GatedMLP(nn.Module):
    """SwiGLU feed-forward: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, dim: int, inner: int, bias: bool, device=None, dtype=None, ops=CastOps):
        super().__init__()
        self.gate_proj = ops.Linear(dim, inner, bias=bias, device=device, dtype=dtype)
        self.up_proj = ops.Linear(dim, inner, bias=bias, device=device, dtype=dtype)
        self.down_proj = ops.Linear(inner, dim, bias=bias, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig, device=None, dtype=None, ops=CastOps):
        super().__init__()
        self.input_layernorm = ops.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, device=device, dtype=dtype)
        self.self_attn = TextAttention(cfg, device=device, dtype=dtype, ops=ops)
        self.post_attention_layernorm = ops.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, device=device, dtype=dtype)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, bias=False, device=device, dtype=dtype, ops=ops)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, options: Options | None = None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, options)
        return x + self.mlp(self.post_attention_layernorm(x))


class LanguageModel(nn.Module):
    """The Qwen2.5 decoder stack; :meth:`forward` returns the post-final-norm hidden states."""

    def __init__(self, cfg: TextConfig, device=None, dtype=None, ops=CastOps):
        super().__init__()
        self.config = cfg
        self.embed_tokens = ops.Embedding(cfg.vocab_size, cfg.hidden_size, device=device, dtype=dtype)
        self.layers = nn.ModuleList(DecoderLayer(cfg, device=device, dtype=dtype, ops=ops) for _ in range(cfg.num_layers))
        self.norm = ops.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, device=device, dtype=dtype)

    def rotary(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin ``[L, head_dim]`` (fp32) for 3D positions ``[3, L]``: each frequency band reads one axis."""
        cfg = self.config
        inv_freq = _inverse_frequencies(cfg.head_dim, cfg.rope_theta, positions.device)
        angles = positions[..., None].float() * inv_freq  # [3, L, head_dim / 2]
        bands = angles.split(list(cfg.sections), dim=-1)
        angles = torch.cat([band[axis % 3] for axis, band in enumerate(bands)], dim=-1)
        angles = torch.cat((angles, angles), dim=-1)
        return angles.cos(), angles.sin()

    def forward(self, embeds: torch.Tensor, positions: torch.Tensor, options: Options | None = None) -> torch.Tensor:
        """``embeds`` ``[B, L, hidden]`` (already in the compute dtype), ``positions`` ``[3, L]`` -> ``[B, L, hidden]``."""
        cos, sin = self.rotary(positions.to(embeds.device))
        x = embeds
        for layer in self.layers:
            x = layer(x, cos, sin, options)
        return self.norm(x)


# ---------------------------------------------------------------------------------------------------------------
# Vision tower
# ---------------------------------------------------------------------------------------------------------------
class PatchEmbed(nn.Module):
    """Conv3d with kernel = stride = (temporal, patch, patch) over pre-flattened patches; no bias."""

    def __init__(self, cfg: VisionConfig, device=None, dtype=None, ops=CastOps):
        super().__init__()
        self.kernel = (cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)
        self.in_channels, self.hidden = cfg.in_channels, cfg.hidden_size
        self.proj = ops.Conv3d(cfg.in_channels, cfg.hidden_size, kernel_size=self.kernel, stride=self.kernel,
                               bias=False, device=device, dtype=dtype)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        x = patches.view(-1, self.in_channels, *self.kernel)
        return self.proj(x).view(-1, self.hidden)


class VisionAttention(nn.Module):
    """Non-causal attention restricted to chunks of the sequence (windows, or one whole image)."""

    def __init__(self, cfg: VisionConfig, device=None, dtype=None, ops=CastOps):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.qkv = ops.Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=True, device=device, dtype=dtype)
        self.proj = ops.Linear(cfg.hidden_size, cfg.hidden_size, bias=True, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, chunks: list[torch.Tensor],
                options: Options | None = None) -> torch.Tensor:
        length = x.shape[0]
        q, k, v = self.qkv(x).view(length, 3, self.num_heads, -1).unbind(1)  # each [N, heads, head_dim]
        q, k = _apply_rotary(q, cos, sin), _apply_rotary(k, cos, sin)
        out = torch.empty_like(q)
        # ``chunks`` groups equally long chunks: index [n_chunks, chunk_len] -> one batched SDPA call per group.
        for index in chunks:
            qs, ks, vs = (t[index].transpose(1, 2) for t in (q, k, v))  # [n_chunks, heads, chunk_len, head_dim]
            out[index] = attention(qs, ks, vs, options=options).transpose(1, 2)
        return self.proj(out.reshape(length, -1))


class VisionBlock(nn.Module):
    def __init__(self, cfg: VisionConfig, device=None, dtype=None, ops=CastOps):
        super().__init__()
        self.norm1 = ops.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, device=device, dtype=dtype)
        self.norm2 = ops.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, device=device, dtype=dtype)
        self.attn = VisionAttention(cfg, device=device, dtype=dtype, ops=ops)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, bias=True, device=device, dtype=dtype, ops=ops)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, chunks: list[torch.Tensor],
                options: Options | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cos, sin, chunks, options)
        return x + self.mlp(self.norm2(x))


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


def _chunk_groups(lengths: list[int], device: torch.device) -> list[torch.Tensor]:
    """Index tensors for consecutive chunks of the given lengths, grouped by length: ``[n_chunks, length]`` each."""
    starts, offset = {}, 0
    for length in lengths:
        if length:
            starts.setdefault(length, []).append(offset)
        offset += length
    return [torch.tensor(s, device=device)[:, None] + torch.arange(n, device=device) for n, s in starts.items()]


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
        self.patch_embed = PatchEmbed(cfg, device=device, dtype=dtype, ops=ops)
        self.blocks = nn.ModuleList(VisionBlock(cfg, device=device, dtype=dtype, ops=ops) for _ in range(cfg.depth))
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

    def _rotary(self, grid_h: int, grid_w: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """2D RoPE cos/sin ``[gh * gw, head_dim]`` in processor patch order (half the bands row, half column)."""
        cfg = self.config
        merge = cfg.spatial_merge_size
        head_dim = cfg.hidden_size // cfg.num_heads
        rows = torch.arange(grid_h, device=device).view(grid_h // merge, merge, 1, 1).expand(-1, -1, grid_w // merge, merge)
        cols = torch.arange(grid_w, device=device).view(1, 1, grid_w // merge, merge).expand(grid_h // merge, merge, -1, -1)
        # processor order: merge row, merge column, then the patch inside the merge window (row, column)
        rows = rows.permute(0, 2, 1, 3).reshape(-1)
        cols = cols.permute(0, 2, 1, 3).reshape(-1)
        inv_freq = _inverse_frequencies(head_dim // 2, cfg.rope_theta, device)
        angles = torch.cat((rows[:, None].float() * inv_freq, cols[:, None].float() * inv_freq), dim=-1)
        angles = torch.cat((angles, angles), dim=-1)[:, None, :]  # broadcast over heads
        return angles.cos(), angles.sin()

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
        window_chunks = _chunk_groups(window_lengths, device)
        full_chunks = _chunk_groups([grid_h * grid_w], device)

        x = self.patch_embed(patches.to(dtype or patches.dtype))[patch_order]
        cos, sin = self._rotary(grid_h, grid_w, device)
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


def mrope_positions(length: int, images: list[tuple[int, int, int]]) -> torch.Tensor:
    """3D (temporal, height, width) positions ``[3, length]`` for a prompt with image spans.

    ``images``: ``(start_token, merged_rows, merged_cols)`` per image, in order, non-overlapping.  Text tokens
    count up on all three axes; an image starting at position ``s`` gets ``(s, s + row, s + col)`` and the text
    after it resumes at ``s + max(rows, cols)``.
    """
    positions = torch.empty(3, length, dtype=torch.long)
    cursor, next_pos = 0, 0
    for start, rows, cols in sorted(images):
        if start < cursor or start + rows * cols > length:
            raise ValueError(f"image span at token {start} ({rows}x{cols}) does not fit the prompt")
        positions[:, cursor:start] = torch.arange(next_pos, next_pos + start - cursor)
        next_pos += start - cursor
        end = start + rows * cols
        positions[0, start:end] = next_pos
        positions[1, start:end] = (next_pos + torch.arange(rows)).repeat_interleave(cols)
        positions[2, start:end] = (next_pos + torch.arange(cols)).repeat(rows)
        next_pos += max(rows, cols)
        cursor = end
    positions[:, cursor:] = torch.arange(next_pos, next_pos + length - cursor)
    return positions
