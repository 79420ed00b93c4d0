"""GGUF support in pure torch + numpy: a strict lazy reader, dequantization, quantized layers, a writer.

Public entry points::

    from models.gguf import GGUFError, GGUFReader, load_gguf_state_dict
    sd = load_gguf_state_dict(path, dequantize=True, dtype=torch.float32)  # names as stored, torch-order shapes
"""

from __future__ import annotations

import os

import torch

from . import dequant as _dequant
from .dequant import dequantize
from .reader import GGMLType, GGUFError, GGUFReader, GGUFTensorInfo

_STORED_DTYPE = {GGMLType.F32: torch.float32, GGMLType.F16: torch.float16, GGMLType.BF16: torch.bfloat16}

__all__ = ["GGUFError", "GGUFReader", "GGUFTensorInfo", "GGMLType", "dequantize", "load_gguf_state_dict"]


def load_gguf_state_dict(path: str | os.PathLike, dequantize: bool = True,
                         dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """All tensors of a GGUF file by their stored names, in torch-order shapes.

    ``dequantize=True``: every tensor is decoded to ``dtype`` (new memory).  ``dequantize=False``: quantized
    tensors become :class:`models.gguf.layers.QuantizedTensor` (packed bytes, zero-copy over the file's memory
    map) and F32/F16/BF16 tensors are copied out as ordinary tensors in their stored dtype.
    """
    reader = GGUFReader(path)
    out: dict[str, torch.Tensor] = {}
    for name, info in reader.tensors.items():
        raw = reader.raw(name)
        if dequantize:
            out[name] = _dequant.dequantize(raw, info.qtype, info.shape, dtype)
        elif info.is_quantized:
            from .layers import QuantizedTensor  # layers imports this package

            out[name] = QuantizedTensor.wrap(raw, info.qtype, info.shape)
        else:
            stored = _STORED_DTYPE.get(info.qtype, torch.float32)
            out[name] = _dequant.dequantize(raw, info.qtype, info.shape, stored)
    return out
