"""Spatial tiling and memory budgeting for the Qwen-Image VAE.

Every layer of the VAE except the single attention block in each "middle" is local: per-pixel RMS norms (over
channels), 3x3 convolutions, nearest upsampling and strided downsampling.  The VAE therefore runs its global part
(the attention, at latent resolution, where activations are small) on the whole image and tiles only the local
part at high resolution.  Each tile is computed over a window that extends its core by a context margin (the
``overlap``) on every side; when the margin covers the receptive field of the local part, the zero padding at a
window's edge never reaches the core, and the stitched cores equal the untiled result up to float rounding: no
seams, nothing to blend.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = ["Tile", "plan_axis", "plan_tiles", "run_tiled", "available_memory"]

@dataclass(frozen=True)
class Tile:
    """One tile along one axis: ``core`` is the part of the input it owns, ``window`` what it is computed over."""

    core_start: int
    core_end: int
    window_start: int
    window_end: int


def plan_axis(length: int, tile: int, overlap: int, align: int = 1) -> list[Tile]:
    """Split ``[0, length)`` into cores of at most ``tile`` (multiples of ``align``), each with ``overlap`` context.

    Cores are balanced (equal sizes up to ``align``) so the last tile is not a thin sliver; windows are clipped to
    the axis (at the image border the padding is the same as untiled).
    """
    if length % align or tile % align or overlap % align:
        raise ValueError(f"length {length}, tile {tile} and overlap {overlap} must be multiples of {align}.")
    units = length // align
    count = max(1, -(-length // tile))
    bounds = [round(i * units / count) * align for i in range(count + 1)]
    return [Tile(a, b, max(0, a - overlap), min(length, b + overlap)) for a, b in zip(bounds[:-1], bounds[1:])]


def plan_tiles(height: int, width: int, tile: int, overlap: int, align: int = 1) -> list[tuple[Tile, Tile]]:
    """Row-major list of (row tile, column tile) pairs covering a ``height`` x ``width`` plane."""
    rows = plan_axis(height, tile, overlap, align)
    cols = plan_axis(width, tile, overlap, align)
    return [(r, c) for r in rows for c in cols]


def run_tiled(
    fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    tiles: list[tuple[Tile, Tile]],
    scale: tuple[int, int],
    progress: Callable[[], None] | None = None,
) -> torch.Tensor:
    """Apply a local ``fn`` to ``x`` ([B, C, H, W]) tile by tile and stitch the cores of the results.

    ``scale = (num, den)``: ``fn`` maps an input extent ``n`` to ``n * num // den`` (a decoder upsampling by f: ``(f, 1)``, an encoder: ``(1, f)``).
    ``progress`` is called after each tile.
    """
    num, den = scale
    out = None
    for row, col in tiles:
        piece = fn(x[:, :, row.window_start:row.window_end, col.window_start:col.window_end])
        if out is None:
            out_h, out_w = x.shape[2] * num // den, x.shape[3] * num // den
            out = torch.empty((x.shape[0], piece.shape[1], out_h, out_w), dtype=piece.dtype, device=piece.device)
            out = out.contiguous(memory_format=torch.channels_last)
        r0, r1 = (row.core_start - row.window_start) * num // den, (row.core_end - row.window_start) * num // den
        c0, c1 = (col.core_start - col.window_start) * num // den, (col.core_end - col.window_start) * num // den
        out[:, :, row.core_start * num // den:row.core_end * num // den,
            col.core_start * num // den:col.core_end * num // den] = piece[:, :, r0:r1, c0:c1]
        del piece
        if progress is not None:
            progress()
    return out


def available_memory(device: torch.device) -> int:
    """Bytes that a new allocation on ``device`` can use now (CUDA: free + cached-but-unused; CPU: available RAM)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    try:
        import psutil
    except ImportError:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return psutil.virtual_memory().available

