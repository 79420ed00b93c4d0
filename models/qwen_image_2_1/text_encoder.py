"""The Qwen-Image 2.1 condition encoder: Qwen3-VL with the 2.1 template."""

from __future__ import annotations

import os
from collections.abc import Iterable

import torch

from ..encoders.qwen3vl.encoder import Qwen3VLEncoder, load_qwen3vl
from ..encoders.tokenizer import QwenTokenizer
from .templates import QWEN_IMAGE_2_1_TEMPLATES

__all__ = ["load_text_encoder_2_1"]


def load_text_encoder_2_1(path: str | os.PathLike, tokenizer: str | os.PathLike | QwenTokenizer | None = None,
                          dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", ops=None,
                          host_tokenizer_dirs: Iterable[str | os.PathLike] = ()) -> Qwen3VLEncoder:
    """Load the Qwen3-VL condition encoder (Comfy-style single file or the diffusers ``text_encoder`` folder) with
    the Qwen-Image 2.1 template ``default``; see :func:`models.encoders.qwen3vl.encoder.load_qwen3vl` for the
    arguments.  ``encode(prompt, images=None, template="default", options=None)`` returns a
    :class:`~models.encoders.qwen3vl.encoder.Qwen3VLCondition` ``(embeds, mask, image_mask, image_grids)``.
    :func:`models.load_text_encoder` dispatches 2.1 files here."""
    return load_qwen3vl(path, QWEN_IMAGE_2_1_TEMPLATES, tokenizer=tokenizer, dtype=dtype, device=device, ops=ops,
                        host_tokenizer_dirs=host_tokenizer_dirs)
