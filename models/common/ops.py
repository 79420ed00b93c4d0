"""The operations namespace every model in this package builds its layers from.

Models never instantiate ``torch.nn.Linear`` & co. directly; they take an ``ops`` namespace with the classes
``Linear, Conv2d, Conv3d, LayerNorm, GroupNorm, RMSNorm, Embedding`` (torch constructor signatures) and build
with ``ops.Linear(...)``.  The host (ComfyUI) passes its own ``comfy.ops`` namespace so its low-VRAM casting,
offloading and LoRA weight functions apply; standalone use gets :class:`CastOps`, defined here.

``CastOps`` layers keep their weights in the stored dtype (fp8 stays 1 byte per weight) and cast them to the
input's dtype and device at compute time.  Scaled fp8 checkpoints carry a per-layer factor - ``scale_weight``
("scaled fp8") or ``weight_scale`` (ComfyUI's mixed-precision ``comfy_quant`` layout, fp8 formats); a layer that
has one multiplies the upcast weight by it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["CastOps", "cast_weight", "cast_bias"]


def cast_weight(layer: nn.Module, like: torch.Tensor) -> torch.Tensor | None:
    """The layer's weight in ``like``'s dtype and device, with a scaled-fp8 factor (``scale_weight`` or
    ``weight_scale``) applied."""
    weight = layer.weight
    if weight is None:
        return None
    scale = getattr(layer, "scale_weight", None)
    if scale is None:
        scale = getattr(layer, "weight_scale", None)
    if weight.dtype == like.dtype and weight.device == like.device and scale is None:
        return weight
    weight = weight.to(device=like.device, dtype=like.dtype)
    if scale is not None:
        weight = weight * scale.to(device=like.device, dtype=like.dtype)
    return weight


def cast_bias(layer: nn.Module, like: torch.Tensor) -> torch.Tensor | None:
    bias = getattr(layer, "bias", None)
    if bias is None or (bias.dtype == like.dtype and bias.device == like.device):
        return bias
    return bias.to(device=like.device, dtype=like.dtype)


class _NoInit:
    """Skip torch's random initialisation: every weight is overwritten by the checkpoint anyway."""

    def reset_parameters(self) -> None:
        return None


class CastOps:
    """Default operations: weights stay as stored, computed in the input's dtype."""

    class Linear(_NoInit, nn.Linear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.linear(x, cast_weight(self, x), cast_bias(self, x))

    class Conv2d(_NoInit, nn.Conv2d):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self._conv_forward(x, cast_weight(self, x), cast_bias(self, x))

    class Conv3d(_NoInit, nn.Conv3d):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self._conv_forward(x, cast_weight(self, x), cast_bias(self, x))

    class LayerNorm(_NoInit, nn.LayerNorm):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.layer_norm(x, self.normalized_shape, cast_weight(self, x), cast_bias(self, x), self.eps)

    class GroupNorm(_NoInit, nn.GroupNorm):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.group_norm(x, self.num_groups, cast_weight(self, x), cast_bias(self, x), self.eps)

    class RMSNorm(_NoInit, nn.RMSNorm):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.rms_norm(x, self.normalized_shape, cast_weight(self, x), self.eps)

    class Embedding(_NoInit, nn.Embedding):
        def forward(self, ids: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
            weight = self.weight
            if out_dtype is not None:
                weight = weight.to(out_dtype)
            elif weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
                weight = weight.to(torch.float32)  # fp8 tables: gather in a real float type
            return F.embedding(ids.to(weight.device), weight, self.padding_idx)
