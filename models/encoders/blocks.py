"""Building blocks shared by the Qwen-VL condition encoders (:mod:`.qwen25vl`, :mod:`.qwen3vl`).

* :class:`DecoderLayer`: pre-norm decoder layer, grouped-query causal self-attention with rotate-half RoPE
  (optional q/k biases, optional per-head RMSNorm on q and k) and a SwiGLU MLP (:class:`GatedMLP`);
* the vision towers' :class:`PatchEmbed`, :class:`VisionBlock` (norms and MLP chosen by the model) and
  :class:`VisionAttention` over chunks of the patch sequence (:func:`chunk_groups`);
* rotary helpers (:func:`apply_rotary` in fp32, :func:`inverse_frequencies`) and the vision towers' 2D RoPE in the
  image processor's merge-window patch order (:func:`merge_window_coords`, :func:`vision_rotary`);
* :func:`mrope_positions`: the 3D (temporal, height, width) prompt positions of text with image spans.

Module names are the checkpoints' (``self_attn.{q,k,v,o}_proj``, ``self_attn.{q,k}_norm``, ``mlp.{gate,up,
down}_proj``, ``input_layernorm``, ``post_attention_layernorm``, ``proj``, ``norm1``, ``norm2``, ``attn.{qkv,proj}``,
``mlp``); layers come from an ops namespace.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from ..common.attention import Options, attention
from ..common.ops import CastOps

__all__ = ["DecoderConfig", "DecoderLayer", "GatedMLP", "VisionShape", "PatchEmbed", "VisionAttention", "VisionBlock",
           "chunk_groups", "apply_rotary", "inverse_frequencies", "merge_window_coords", "vision_rotary",
           "mrope_positions"]


@dataclass(frozen=True)
class DecoderConfig:
    """A Qwen-VL language model's shape; each model subclasses it with its M-RoPE split (:meth:`default_sections`)
    and its rope theta default."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    mrope_section: tuple[int, int, int] | None = None  # None: default_sections()

    @property
    def sections(self) -> tuple[int, int, int]:
        """M-RoPE frequency split (temporal, height, width) of ``head_dim // 2``."""
        return tuple(self.mrope_section) if self.mrope_section else self.default_sections()

    def default_sections(self) -> tuple[int, int, int]:
        raise NotImplementedError


class VisionShape(Protocol):
    """What the vision blocks need of their tower's config."""

    hidden_size: int
    num_heads: int
    in_channels: int
    temporal_patch_size: int
    patch_size: int


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE, computed in fp32 (cos/sin are fp32) and returned in ``x``'s dtype."""
    xf = x.float()
    return (xf * cos + _rotate_half(xf) * sin).to(x.dtype)


def inverse_frequencies(dim: int, theta: float, device: torch.device) -> torch.Tensor:
    """``dim / 2`` RoPE frequencies ``theta ** (-2i / dim)`` (fp32)."""
    exponents = torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim
    return 1.0 / (theta ** exponents)


class GatedMLP(nn.Module):
    """SwiGLU feed-forward: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, dim: int, inner: int, bias: bool, device=None, dtype=None, ops=CastOps):
        super().__init__()
        self.gate_proj = ops.Linear(dim, inner, bias=bias, device=device, dtype=dtype)
        self.up_proj = ops.Linear(dim, inner, bias=bias, device=device, dtype=dtype)
        self.down_proj = ops.Linear(inner, dim, bias=bias, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class TextAttention(nn.Module):
    """Grouped-query causal self-attention with RoPE; the output projection has no bias.

    ``qkv_bias``: q/k/v projections with biases (Qwen2.5).  ``qk_norm``: per-head RMSNorm on q and k before the
    rotation (Qwen3).
    """

    def __init__(self, cfg: DecoderConfig, qkv_bias: bool, qk_norm: bool, device=None, dtype=None, ops=CastOps):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        q_dim, kv_dim = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.q_proj = ops.Linear(cfg.hidden_size, q_dim, bias=qkv_bias, device=device, dtype=dtype)
        self.k_proj = ops.Linear(cfg.hidden_size, kv_dim, bias=qkv_bias, device=device, dtype=dtype)
        self.v_proj = ops.Linear(cfg.hidden_size, kv_dim, bias=qkv_bias, device=device, dtype=dtype)
        self.o_proj = ops.Linear(q_dim, cfg.hidden_size, bias=False, device=device, dtype=dtype)
        if qk_norm:
            self.q_norm = ops.RMSNorm(cfg.head_dim, eps=cfg.rms_norm_eps, device=device, dtype=dtype)
            self.k_norm = ops.RMSNorm(cfg.head_dim, eps=cfg.rms_norm_eps, device=device, dtype=dtype)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, options: Options | None = None) -> torch.Tensor:
        """``x [B, L, hidden]``, ``cos``/``sin [L, head_dim]`` (fp32) -> ``[B, L, hidden]``."""
        batch, length, _ = x.shape
        q = self.q_proj(x).view(batch, length, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(batch, length, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q.transpose(1, 2), cos, sin), apply_rotary(k.transpose(1, 2), cos, sin)
        groups = self.num_heads // self.num_kv_heads
        if groups > 1:
            k = k.repeat_interleave(groups, dim=1)
            v = v.repeat_interleave(groups, dim=1)
        out = attention(q, k, v, causal=True, options=options)
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, -1))


class DecoderLayer(nn.Module):
    """Pre-norm decoder layer: ``x + attn(norm(x))``, then ``x + mlp(norm(x))`` (bias-free SwiGLU)."""

    def __init__(self, cfg: DecoderConfig, qkv_bias: bool, qk_norm: bool, device=None, dtype=None, ops=CastOps):
        super().__init__()
        self.input_layernorm = ops.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, device=device, dtype=dtype)
        self.self_attn = TextAttention(cfg, qkv_bias, qk_norm, device=device, dtype=dtype, ops=ops)
        self.post_attention_layernorm = ops.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, device=device, dtype=dtype)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, bias=False, device=device, dtype=dtype, ops=ops)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, options: Options | None = None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, options)
        return x + self.mlp(self.post_attention_layernorm(x))


class PatchEmbed(nn.Module):
    """Conv3d with kernel = stride = (temporal, patch, patch) over pre-flattened patches."""

    def __init__(self, cfg: VisionShape, bias: bool, device=None, dtype=None, ops=CastOps):
        super().__init__()
        self.kernel = (cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)
        self.in_channels, self.hidden = cfg.in_channels, cfg.hidden_size
        self.proj = ops.Conv3d(cfg.in_channels, cfg.hidden_size, kernel_size=self.kernel, stride=self.kernel,
                               bias=bias, device=device, dtype=dtype)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        """``[N, C * T * p * p]`` -> ``[N, hidden]``."""
        x = patches.view(-1, self.in_channels, *self.kernel)
        return self.proj(x).view(-1, self.hidden)


def chunk_groups(lengths: list[int], device: torch.device) -> list[torch.Tensor]:
    """Index tensors for consecutive chunks of the given lengths, grouped by length: ``[n_chunks, length]`` each."""
    starts, offset = {}, 0
    for length in lengths:
        if length:
            starts.setdefault(length, []).append(offset)
        offset += length
    return [torch.tensor(s, device=device)[:, None] + torch.arange(n, device=device) for n, s in starts.items()]


class VisionAttention(nn.Module):
    """Non-causal attention with 2D RoPE restricted to chunks of the sequence (windows, or one whole image)."""

    def __init__(self, cfg: VisionShape, device=None, dtype=None, ops=CastOps):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.qkv = ops.Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=True, device=device, dtype=dtype)
        self.proj = ops.Linear(cfg.hidden_size, cfg.hidden_size, bias=True, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, chunks: list[torch.Tensor],
                options: Options | None = None) -> torch.Tensor:
        """``x [N, hidden]``, ``cos``/``sin [N, 1, head_dim]``, ``chunks`` (:func:`chunk_groups`) -> ``[N, hidden]``."""
        length = x.shape[0]
        q, k, v = self.qkv(x).view(length, 3, self.num_heads, -1).unbind(1)  # each [N, heads, head_dim]
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out = torch.empty_like(q)
        # ``chunks`` groups equally long chunks: index [n_chunks, chunk_len] -> one batched SDPA call per group.
        for index in chunks:
            qs, ks, vs = (t[index].transpose(1, 2) for t in (q, k, v))  # [n_chunks, heads, chunk_len, head_dim]
            out[index] = attention(qs, ks, vs, options=options).transpose(1, 2)
        return self.proj(out.reshape(length, -1))


class VisionBlock(nn.Module):
    """Pre-norm vision block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``.  ``norm`` builds a norm layer of
    a given width (RMSNorm or LayerNorm, per model); ``mlp`` is the block's feed-forward module."""

    def __init__(self, cfg: VisionShape, norm: Callable[[int], nn.Module], mlp: nn.Module, device=None, dtype=None,
                 ops=CastOps):
        super().__init__()
        self.norm1, self.norm2 = norm(cfg.hidden_size), norm(cfg.hidden_size)
        self.attn = VisionAttention(cfg, device=device, dtype=dtype, ops=ops)
        self.mlp = mlp

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, chunks: list[torch.Tensor],
                options: Options | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cos, sin, chunks, options)
        return x + self.mlp(self.norm2(x))


def merge_window_coords(grid_h: int, grid_w: int, merge: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, column) of every patch ``[gh * gw]`` each, in the image processor's order: merge window by merge
    window (row-major), then row-major inside the ``merge x merge`` window."""
    rows = torch.arange(grid_h, device=device).view(grid_h // merge, merge, 1, 1).expand(-1, -1, grid_w // merge, merge)
    cols = torch.arange(grid_w, device=device).view(1, 1, grid_w // merge, merge).expand(grid_h // merge, merge, -1, -1)
    return rows.permute(0, 2, 1, 3).reshape(-1), cols.permute(0, 2, 1, 3).reshape(-1)


def vision_rotary(grid_h: int, grid_w: int, merge: int, head_dim: int, theta: float,
                  device) -> tuple[torch.Tensor, torch.Tensor]:
    """2D RoPE cos/sin ``[gh * gw, 1, head_dim]`` (fp32, broadcast over heads) in processor patch order: half the
    frequencies rotate with the patch row, half with the column."""
    rows, cols = merge_window_coords(grid_h, grid_w, merge, device)
    inv_freq = inverse_frequencies(head_dim // 2, theta, device)
    angles = torch.cat((rows[:, None].float() * inv_freq, cols[:, None].float() * inv_freq), dim=-1)
    angles = torch.cat((angles, angles), dim=-1)[:, None, :]
    return angles.cos(), angles.sin()


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
