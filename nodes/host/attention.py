"""The host's attention for our models: every attention call of the DiT, the text encoder and the VAE goes through
ComfyUI's ``optimized_attention_masked`` with the current ``transformer_options``, so its backend flags
(--use-sage-attention, --use-flash-attention, xformers, pytorch) and ``optimized_attention_override`` apply.

Fast backends can return NaN / inf on Qwen's large activations (users see black images): their output is checked
and the call falls back to PyTorch SDPA, said once in the log.  The plain PyTorch backend is not checked (it is
the fallback itself, and the check costs a device sync per call).

Masks must hold (padded prompts, EliGen's entity regions): SageAttention releases differ on ``attn_mask`` (some
raise, some accept and ignore it), so masked calls with --use-sage-attention go to the host's PyTorch attention,
which ``optimized_attention_override`` wraps like every backend.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch
import torch.nn.functional as F

import comfy.ldm.modules.attention as host_attention

from ...models import ATTENTION_KERNEL

logger = logging.getLogger("qwen_image")

_warned = False


def _additive(mask: torch.Tensor | None, causal: bool, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor | None:
    """The host's backends take additive float masks; a boolean mask (True = attend) or a causal one is turned
    into 0 / most-negative entries of the query's dtype.  A model passes one boolean mask to all its blocks (EliGen's
    is [S, S]): its additive form is kept on the mask tensor, so it is made once per forward, not once per block."""
    if causal:
        keep = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril(k.shape[-2] - q.shape[-2])
        mask = keep if mask is None else mask & keep
    if mask is None or mask.dtype != torch.bool:
        return mask
    cached = getattr(mask, "_qip_additive", None)
    if cached is not None and cached.dtype == q.dtype and cached.device == q.device:
        return cached
    additive = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill_(~mask, torch.finfo(q.dtype).min)
    mask._qip_additive = additive  # lives as long as the mask: one forward
    return additive


def masked_backend(attend):
    """The host backend for a masked call: ``attend`` unless it may drop masks (SageAttention)."""
    if attend is getattr(host_attention, "attention_sage", None):
        return host_attention.attention_pytorch
    return attend


def host_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, mask: torch.Tensor | None, causal: bool,
                options: Mapping) -> torch.Tensor:
    """``q, k, v [B, heads, L, head_dim]`` -> ``[B, heads, L_q, head_dim]`` through the host's attention."""
    global _warned
    additive = _additive(mask, causal, q, k)
    attend = host_attention.optimized_attention_masked
    if additive is not None:
        attend = masked_backend(attend)
    out = attend(q, k, v, q.shape[1], mask=additive, skip_reshape=True, skip_output_reshape=True,
                 transformer_options=dict(options))
    if attend is host_attention.attention_pytorch or bool(torch.isfinite(out).all()):
        return out
    if not _warned:
        _warned = True
        logger.warning("Qwen-Image: the host's attention backend (%s) returned NaN/inf; those calls fall back to "
                       "PyTorch attention.", getattr(attend, "__name__", attend))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=additive)


def with_host_attention(options: Mapping | None = None) -> dict:
    """Run options for a model call inside the host: the host's ``transformer_options`` plus its attention."""
    return {**(options or {}), ATTENTION_KERNEL: host_kernel}
