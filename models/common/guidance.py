"""True classifier-free guidance with the reference's norm-preserving rescale.

``comb = uncond + scale * (cond - uncond)``, then every ``patch x patch`` latent block (one DiT token: all
channels of the block) is rescaled so its norm equals the conditional prediction's norm there.  Works on
velocity-like predictions of shape ``[B,C,H,W]`` or ``[B,C,1,H,W]``; the rescale is invariant to a common
per-sample factor, so it may also be given ``sigma * velocity``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def norm_preserving_cfg(cond: torch.Tensor, uncond: torch.Tensor, scale: float, patch: int) -> torch.Tensor:
    """The guided prediction, each token (``patch x patch`` latent cells) rescaled to the conditional prediction's
    norm."""
    comb = uncond + scale * (cond - uncond)
    ratio = _token_norm(cond, patch) / _token_norm(comb, patch)
    return (comb.float() * ratio).to(comb.dtype)


def _token_norm(x: torch.Tensor, patch: int) -> torch.Tensor:
    shape = x.shape
    x4 = x.reshape(shape[0], -1, shape[-2], shape[-1]).float()
    # Sum of squares over channels and each patch x patch block, then back to full resolution.
    block = F.avg_pool2d(x4.square().sum(dim=1, keepdim=True), patch, stride=patch, ceil_mode=True,
                         divisor_override=1)
    norm = block.sqrt().repeat_interleave(patch, -2).repeat_interleave(patch, -1)[..., : shape[-2], : shape[-1]]
    return norm.reshape((shape[0],) + (1,) * (len(shape) - 3) + shape[-2:]) if len(shape) == 5 else norm
