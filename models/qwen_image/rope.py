"""MSRoPE: the multimodal scalable rotary position embedding of the Qwen-Image DiT.

Every token gets a position on three axes (frame, height, width); each axis owns a slice of the head dimension
(``axes_dim``, e.g. 16 + 56 + 56 = 128) and rotates interleaved pairs ``(2k, 2k+1)`` of its slice by
``position * theta ** (-2k / axis_dim)``.

Positions (as the diffusers reference computes them):

* image ``i`` (target ``i = 0``, edit references ``1..n``) with a patch grid ``(h, w)``: frame ``i``, rows
  ``-(h - h//2) .. h//2 - 1``, columns ``-(w - w//2) .. w//2 - 1`` (centred; for odd sizes one more negative
  position than positive), row-major;
* text token ``j``: ``m + j`` on all three axes, with ``m = max over all images of max(h//2, w//2)``.

Layer-3D RoPE (Qwen-Image-Layered): the same, except that the last image (the condition) sits at frame -1 and the
text starts at least at the number of images minus one (the layer count).

Angles are computed in float32 exactly like the reference (``fp32 angle = position * fp32 frequency``); fp32
runs rotate with one complex multiply per pair as the reference does, so they agree to rounding.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch

__all__ = ["msrope_positions", "rope_angles", "rope_table", "apply_rope", "split_rope", "MSRoPE"]

Grid = tuple[int, int]


def _centred(n: int) -> torch.Tensor:
    return torch.arange(-(n - n // 2), n // 2, dtype=torch.int64)


def msrope_positions(image_grids: Sequence[Grid], text_len: int,
                     layer3d: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer positions ``(text [text_len, 3], images [sum h*w, 3])`` for the given patch grids (target first);
    ``layer3d``: the Layered model's layout (the last grid is the condition image, at frame -1)."""
    if not image_grids:
        raise ValueError("MSRoPE needs at least the target image grid.")
    last = len(image_grids) - 1
    image_parts = []
    for index, (h, w) in enumerate(image_grids):
        rows = _centred(h)[:, None].expand(h, w)
        cols = _centred(w)[None, :].expand(h, w)
        frame = torch.full((h, w), -1 if layer3d and index == last else index, dtype=torch.int64)
        image_parts.append(torch.stack([frame, rows, cols], dim=-1).reshape(h * w, 3))
    text_start = max(max(h // 2, w // 2) for h, w in image_grids)
    if layer3d:
        text_start = max(text_start, last)
    text = torch.arange(text_start, text_start + text_len, dtype=torch.int64)[:, None].expand(text_len, 3)
    return text, torch.cat(image_parts, dim=0)


def rope_angles(positions: torch.Tensor, axes_dim: Sequence[int], theta: float = 10000.0) -> torch.Tensor:
    """Rotation angles ``[L, D/2]`` (float32) of pair ``k`` for integer ``positions [L, 3]``."""
    angles = []
    for axis, dim in enumerate(axes_dim):
        if dim % 2:
            raise ValueError(f"RoPE axis dimensions must be even, got {tuple(axes_dim)}.")
        inv_freq = 1.0 / torch.pow(theta, torch.arange(0, dim, 2, dtype=torch.float32) / dim)
        angles.append(positions[:, axis].to(torch.float32)[:, None] * inv_freq[None, :])
    return torch.cat(angles, dim=-1)


def rope_table(angles: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The rotation in the layout :func:`apply_rope` uses for ``dtype``.

    float32: ``exp(i * angle)`` as complex64 ``[L, 1, D/2]`` (one complex multiply per pair).  Other dtypes (no
    complex type): ``[2, L, 1, D]`` real rows ``(cos, cos)`` and ``(-sin, sin)`` per pair, in ``dtype``.
    The singleton dimension broadcasts over heads.
    """
    if dtype == torch.float32:
        return torch.polar(torch.ones_like(angles), angles).unsqueeze(1)
    cos, sin = torch.cos(angles), torch.sin(angles)
    table = torch.stack([torch.stack([cos, cos], dim=-1), torch.stack([-sin, sin], dim=-1)])
    return table.flatten(-2).unsqueeze(2).to(dtype)


def apply_rope(x: torch.Tensor, table: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [B, L, H, D]`` by ``table`` (:func:`rope_table` for ``x``'s dtype, first dim ``L``) into ``out``,
    a ``[B, L, H, D]`` destination that may be a strided view into a larger buffer.  Returns ``out``."""
    if table.is_complex():
        # The product goes through a temporary and is copied into ``out``: writing through a complex view of a
        # strided slice is what torch.compile cannot trace.  The values are the same complex products.
        rotated = torch.view_as_complex(x.unflatten(-1, (-1, 2))) * table
        return out.copy_(torch.view_as_real(rotated).flatten(-2))
    swapped = x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)  # (x1, x0) per pair
    torch.mul(x, table[0], out=out)
    return out.addcmul_(swapped, table[1])


def split_rope(table: torch.Tensor, first: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a :func:`rope_table` along its sequence dimension into the first ``first`` positions and the rest."""
    return table.narrow(-3, 0, first), table.narrow(-3, first, table.shape[-3] - first)


class MSRoPE:
    """Caches joint ``[text, images]`` rotation tables per (grids, text length, device, dtype)."""

    def __init__(self, axes_dim: Sequence[int], theta: float = 10000.0, cache_size: int = 8, layer3d: bool = False):
        self.axes_dim = tuple(int(d) for d in axes_dim)
        self.theta = float(theta)
        self.layer3d = layer3d
        self.cache_size = cache_size
        self._cache: OrderedDict[tuple, torch.Tensor] = OrderedDict()

    def __call__(self, image_grids: Sequence[Grid], text_len: int, device: torch.device,
                 dtype: torch.dtype) -> torch.Tensor:
        """Table for the joint sequence ``[text tokens, target tokens, reference tokens...]``."""
        key = (tuple(tuple(g) for g in image_grids), int(text_len), torch.device(device), dtype)
        table = self._cache.get(key)
        if table is None:
            text, images = msrope_positions(key[0], text_len, self.layer3d)
            angles = rope_angles(torch.cat([text, images]), self.axes_dim, self.theta)
            table = rope_table(angles, dtype).to(device)
            self._cache[key] = table
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(key)
        return table
