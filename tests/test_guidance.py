"""True CFG with the norm-preserving rescale equals the reference pipeline's formula on packed tokens."""

from __future__ import annotations

import pytest
import torch

from models.qwen_image.latent import QWEN_IMAGE_LATENT
from models.common.guidance import norm_preserving_cfg


def _reference(cond_tokens: torch.Tensor, uncond_tokens: torch.Tensor, scale: float) -> torch.Tensor:
    # QwenImagePipeline.__call__: comb = neg + s * (pos - neg), rescaled by ||pos|| / ||comb|| over the last dim.
    comb = uncond_tokens + scale * (cond_tokens - uncond_tokens)
    return comb * (torch.norm(cond_tokens, dim=-1, keepdim=True) / torch.norm(comb, dim=-1, keepdim=True))


def _tokens(x: torch.Tensor) -> torch.Tensor:
    """Packed tokens, frame after frame for a multi-frame (layered) latent, as the pipelines pack them."""
    frames = x.unbind(2) if x.ndim == 5 else (x,)
    return torch.cat([QWEN_IMAGE_LATENT.pack(frame) for frame in frames], dim=1)


@pytest.mark.parametrize("shape", [(1, 16, 8, 8), (2, 16, 6, 10), (1, 16, 1, 12, 4), (2, 16, 3, 4, 6)])
@pytest.mark.parametrize("scale", [1.0, 4.0, 7.5])
def test_matches_the_reference_rescale(shape, scale):
    torch.manual_seed(0)
    cond, uncond = torch.randn(shape), torch.randn(shape)
    ours = norm_preserving_cfg(cond, uncond, scale, QWEN_IMAGE_LATENT.patch_size)
    expected = _reference(_tokens(cond), _tokens(uncond), scale)
    assert torch.allclose(_tokens(ours), expected, atol=1e-6, rtol=1e-5)
    assert ours.shape == cond.shape


def test_the_rescale_is_not_plain_cfg_and_keeps_token_norms():
    torch.manual_seed(1)
    cond, uncond = torch.randn(1, 16, 4, 4), torch.randn(1, 16, 4, 4)
    ours = norm_preserving_cfg(cond, uncond, 4.0, QWEN_IMAGE_LATENT.patch_size)
    plain = uncond + 4.0 * (cond - uncond)
    assert (ours - plain).abs().max() > 0.1
    assert torch.allclose(QWEN_IMAGE_LATENT.pack(ours).norm(dim=-1), QWEN_IMAGE_LATENT.pack(cond).norm(dim=-1), atol=1e-5)
