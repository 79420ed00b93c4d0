"""The Qwen-Image 1.x condition encoder: Qwen2.5-VL with the Qwen-Image templates."""

from __future__ import annotations

import os
from collections.abc import Iterable

import torch

from ..encoders.qwen25vl.encoder import TextEncoder, load_qwen25vl
from ..encoders.tokenizer import QwenTokenizer
from .templates import QWEN_IMAGE_TEMPLATES

__all__ = ["load_text_encoder"]


def load_text_encoder(path: str | os.PathLike, tokenizer: str | os.PathLike | QwenTokenizer | None = None,
                      dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", ops=None,
                      host_tokenizer_dirs: Iterable[str | os.PathLike] = ()) -> TextEncoder:
    """Load the Qwen2.5-VL condition encoder (Comfy single file, HF folder, or llama.cpp GGUF + mmproj) with the
    Qwen-Image templates ``t2i``, ``edit`` and ``edit_plus``; see :func:`models.encoders.qwen25vl.encoder.
    load_qwen25vl` for the arguments.  The 1.x family's loader; :func:`models.load_text_encoder` loads either
    family."""
    return load_qwen25vl(path, QWEN_IMAGE_TEMPLATES, tokenizer=tokenizer, dtype=dtype, device=device, ops=ops,
                         host_tokenizer_dirs=host_tokenizer_dirs)
