"""The one attention function every model calls: the DiT's joint attention, the encoders' text and vision
attention, the VAE's mid-block attention.

Standalone it is PyTorch SDPA.  A host supplies its own kernel (its attention backends, overrides, a NaN guard)
through the ``options`` mapping the models thread from their ``forward`` down to every block: a callable under
:data:`ATTENTION_KERNEL` replaces SDPA for every call that sees those options.  The mapping is otherwise the
host's own (ComfyUI's ``transformer_options``), passed through untouched.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

import torch
import torch.nn.functional as F

__all__ = ["attention", "ATTENTION_KERNEL", "AttentionKernel", "Options"]

Options = Mapping[str, Any]
ATTENTION_KERNEL = "qip_attention_kernel"


class AttentionKernel(Protocol):
    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, mask: torch.Tensor | None,
                 causal: bool, options: Options) -> torch.Tensor: ...


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, mask: torch.Tensor | None = None,
              causal: bool = False, options: Options | None = None) -> torch.Tensor:
    """Softmax attention over ``q, k, v [B, heads, L, head_dim]`` -> ``[B, heads, L_q, head_dim]``.

    ``mask``: a boolean (True = attend) or additive mask broadcastable to ``[B, heads, L_q, L_k]``;
    ``causal``: a causal mask instead.  ``options``: the caller's run options (see the module docstring).
    """
    kernel: AttentionKernel | None = options.get(ATTENTION_KERNEL) if options else None
    if kernel is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
    return kernel(q, k, v, mask=mask, causal=causal, options=options)
