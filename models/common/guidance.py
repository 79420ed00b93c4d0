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
    """Per-token norm at full resolution, ``[B, 1, H, W]`` (``[B, 1, F, H, W]``: each frame has its own tokens)."""
    if x.ndim == 5:
        frames = x.shape[2]
        norm = _token_norm(x.movedim(2, 1).flatten(0, 1), patch)  # frames into the batch
        return norm.unflatten(0, (x.shape[0], frames)).movedim(1, 2)
    height, width = x.shape[-2:]
    # Sum of squares over channels and each patch x patch block, then back to full resolution.
    block = F.avg_pool2d(x.float().square().sum(dim=1, keepdim=True), patch, stride=patch, ceil_mode=True,
                         divisor_override=1)
    return block.sqrt().repeat_interleave(patch, -2).repeat_interleave(patch, -1)[..., :height, :width]
