"""Dequantization of ggml block formats in torch (CPU and GPU), bit-exact with ggml's reference code.

Each kernel unpacks the quantized integers with uint8/int8 bit operations on the raw block bytes, then does the
float arithmetic in fp32 in the same order as ggml's ``dequantize_row_*`` reference (e.g. Q4_K is
``(d * sc) * q - (dmin * m)``), so results are identical to gguf-py's numpy implementation bit for bit.  The
fp32 result is cast to the requested dtype at the end.  Work is done in chunks of blocks so temporaries stay
small (cache-friendly on CPU, bounded memory on GPU).

Types without a torch kernel that gguf-py can decode (the IQ1/IQ2/IQ3 families, TQ1_0/TQ2_0, MXFP4, ...:
:data:`GGUF_PY_TYPES`) go through ``gguf.quants.dequantize`` on the CPU, and the result is copied to the bytes'
device in the requested dtype: correct everywhere, but slower than a torch kernel (IQ2_XXS / IQ3_S about
10x Q4_K on one CPU thread, TQ1_0 about 2x: ``bench/bench_gguf.py --parts 4``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import gguf
import numpy as np
import torch

from .reader import QUANT_BLOCKS, GGMLType, GGUFError, quantized_nbytes

__all__ = ["dequantize", "DEQUANTIZABLE_TYPES", "TORCH_TYPES", "GGUF_PY_TYPES", "IQ4_NL_VALUES"]

IQ4_NL_VALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)
_CPU_CHUNK_ELEMENTS = 1 << 18  # fp32 output per chunk on CPU (1 MiB): temporaries stay in cache
_GPU_CHUNK_ELEMENTS = 1 << 26

_constants: dict[tuple[str, torch.device], torch.Tensor] = {}


def _const(name: str, values: Sequence[int], dtype: torch.dtype, device: torch.device, shape) -> torch.Tensor:
    """Small per-device constant tensors (bit shifts, lookup tables), made once."""
    key = (name, device)
    if key not in _constants:
        _constants[key] = torch.tensor(values, dtype=dtype, device=device).reshape(shape)
    return _constants[key]


class _Workspace:
    """Scratch tensors reused from chunk to chunk (sized by the first, largest chunk), so the loop allocates
    nothing: fresh memory costs page faults, which can dominate simple integer kernels."""

    def __init__(self, device: torch.device):
        self.device = device
        self._buffers: dict[str, torch.Tensor] = {}

    def get(self, key: str, shape: tuple[int, ...], dtype: torch.dtype = torch.uint8) -> torch.Tensor:
        buf = self._buffers.get(key)
        if buf is None or buf.shape[0] < shape[0] or buf.shape[1:] != shape[1:] or buf.dtype != dtype:
            buf = self._buffers[key] = torch.empty(shape, dtype=dtype, device=self.device)
        return buf[:shape[0]]


def _f16(ws: _Workspace, blocks: torch.Tensor, start: int, key: str) -> torch.Tensor:
    """The fp16 field at byte ``start`` of each block, as fp32 ``[n, 1]``."""
    out = ws.get(key, (blocks.shape[0], 1), torch.float32)
    if blocks.storage_offset() % 2 or blocks.stride(0) % 2:
        return out.copy_(blocks[:, start:start + 2].contiguous().view(torch.float16))
    # every block size and field offset is even: read the field through a 16-bit view, no byte gather
    return out.copy_(blocks.view(torch.float16)[:, start // 2:start // 2 + 1])


def _nibbles(ws: _Workspace, qs: torch.Tensor, groups: int, key: str) -> torch.Tensor:
    """Split bytes ``[n, groups * k]`` into ``[n, groups, 2, k]`` uint8: low nibbles, then high nibbles."""
    n = qs.shape[0]
    qs = qs.reshape(n, groups, 1, -1)
    out = ws.get(key, (n, groups, 2, qs.shape[-1]))
    torch.bitwise_and(qs, 0x0F, out=out[:, :, :1])
    torch.bitwise_right_shift(qs, 4, out=out[:, :, 1:])
    return out


def _bits(ws: _Workspace, bytes_: torch.Tensor, width: int, count: int, key: str) -> torch.Tensor:
    """``bytes_ [n, g, 1, k] >> (0, width, 2*width, ...)`` masked to ``width`` bits: ``[n, g, count, k]``."""
    shifts = _const(f"shift{width}x{count}", [width * i for i in range(count)], torch.uint8, bytes_.device,
                    (1, 1, count, 1))
    n, g, _, k = bytes_.shape
    out = ws.get(key, (n, g, count, k))
    torch.bitwise_right_shift(bytes_, shifts, out=out)
    return out.bitwise_and_((1 << width) - 1)


def _scaled(q: torch.Tensor, scale: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out = float(q) * scale`` (scale broadcast per group)."""
    out.copy_(q)
    out.mul_(scale)
    return out


def _times(ws: _Workspace, d: torch.Tensor, values: torch.Tensor, key: str) -> torch.Tensor:
    """``d [n, 1] * float(values [n, m])`` in fp32."""
    out = ws.get(key, tuple(values.shape), torch.float32)
    return _scaled(values, d, out)


# -- kernels: (workspace, blocks uint8 [n, type_size], out fp32 [n, block_elems]) -> out ----------------------

def _q8_0(ws: _Workspace, b: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    return _scaled(b[:, 2:].view(torch.int8), _f16(ws, b, 0, "d"), out)


def _q4_0(ws: _Workspace, b: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    q = _nibbles(ws, b[:, 2:], 1, "q").view(torch.int8).sub_(8).view(-1, 32)
    return _scaled(q, _f16(ws, b, 0, "d"), out)


def _q4_1(ws: _Workspace, b: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    q = _nibbles(ws, b[:, 4:], 1, "q").view(-1, 32)
    return _scaled(q, _f16(ws, b, 0, "d"), out).add_(_f16(ws, b, 2, "m"))


def _q5_values(ws: _Workspace, b: torch.Tensor, qh_at: int) -> torch.Tensor:
    """5-bit values of Q5_0/Q5_1: low nibbles from ``qs``, bit 4 from the 32-bit ``qh`` (bit i -> element i)."""
    ql = _nibbles(ws, b[:, qh_at + 4:], 1, "ql").view(-1, 32)
    qh = _bits(ws, b[:, qh_at:qh_at + 4].reshape(-1, 4, 1, 1), 1, 8, "qh").view(-1, 32)
    return ql.bitwise_or_(qh.bitwise_left_shift_(4))


def _q5_0(ws: _Workspace, b: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    q = _q5_values(ws, b, 2).view(torch.int8).sub_(16)
    return _scaled(q, _f16(ws, b, 0, "d"), out)


def _q5_1(ws: _Workspace, b: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    return _scaled(_q5_values(ws, b, 4), _f16(ws, b, 0, "d"), out).add_(_f16(ws, b, 2, "m"))


def _q2_k(ws: _Workspace, b: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    scales = b[:, :16]
    low = torch.bitwise_and(scales, 0x0F, out=ws.get("sl", (n, 16)))
    high = torch.bitwise_right_shift(scales, 4, out=ws.get("sh", (n, 16)))
    dl = _times(ws, _f16(ws, b, 80, "d"), low, "dl").view(n, 16, 1)
    ml = _times(ws, _f16(ws, b, 82, "dmin"), high, "ml").view(n, 16, 1)
    q = _bits(ws, b[:, 16:80].reshape(n, 2, 1, 32), 2, 4, "q").view(n, 16, 16)
    _scaled(q, dl, out.view(n, 16, 16)).sub_(ml)
    return out


def _q3_k(ws: _Workspace, b: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    hmask, qs, sc = b[:, :32], b[:, 32:96], b[:, 96:108]
    low = _nibbles(ws, sc[:, :8], 1, "sl").view(n, 16)
    high = _bits(ws, sc[:, 8:12].reshape(n, 1, 1, 4), 2, 4, "sh").view(n, 16)
    scales = low.bitwise_or_(high.bitwise_left_shift_(4)).view(torch.int8).sub_(32)
    dl = _times(ws, _f16(ws, b, 108, "d"), scales, "dl").view(n, 16, 1)
    ql = _bits(ws, qs.reshape(n, 2, 1, 32), 2, 4, "ql").view(n, 16, 16)
    # a cleared hmask bit means "subtract 4"
    qh = _bits(ws, hmask.reshape(n, 1, 1, 32), 1, 8, "qh").view(n, 16, 16).bitwise_xor_(1).bitwise_left_shift_(2)
    q = ql.view(torch.int8).sub_(qh.view(torch.int8))
    _scaled(q, dl, out.view(n, 16, 16))
    return out


def _k_scale_min(ws: _Workspace, sc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 8 six-bit scales and mins packed in the 12 bytes of Q4_K / Q5_K."""
    n = sc.shape[0]
    d, m, md = sc[:, 0:4], sc[:, 4:8], sc[:, 8:12]
    scales, mins, tmp = ws.get("sc", (n, 8)), ws.get("mn", (n, 8)), ws.get("tmp", (n, 4))
    torch.bitwise_and(d, 0x3F, out=scales[:, :4])
    torch.bitwise_right_shift(d, 2, out=tmp).bitwise_and_(0x30)
    torch.bitwise_and(md, 0x0F, out=scales[:, 4:]).bitwise_or_(tmp)
    torch.bitwise_and(m, 0x3F, out=mins[:, :4])
    torch.bitwise_right_shift(m, 2, out=tmp).bitwise_and_(0x30)
    torch.bitwise_right_shift(md, 4, out=mins[:, 4:]).bitwise_or_(tmp)
    return scales, mins


def _k_header(ws: _Workspace, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K / Q5_K: per-sub-block ``d * sc`` and ``dmin * m`` as fp32 ``[n, 8, 1]``."""
    n = b.shape[0]
    sc, mn = _k_scale_min(ws, b[:, 4:16])
    dl = _times(ws, _f16(ws, b, 0, "d"), sc, "dl").view(n, 8, 1)
    ml = _times(ws, _f16(ws, b, 2, "dmin"), mn, "ml").view(n, 8, 1)
    return dl, ml


def _q4_k(ws: _Workspace, b: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    dl, ml = _k_header(ws, b)
    q = _nibbles(ws, b[:, 16:], 4, "q").view(n, 8, 32)
    _scaled(q, dl, out.view(n, 8, 32)).sub_(ml)
    return out


def _q5_k(ws: _Workspace, b: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    dl, ml = _k_header(ws, b)
    ql = _nibbles(ws, b[:, 48:], 4, "ql").view(n, 8, 32)
    qh = _bits(ws, b[:, 16:48].reshape(n, 1, 1, 32), 1, 8, "qh").view(n, 8, 32)
    q = ql.bitwise_or_(qh.bitwise_left_shift_(4))
    _scaled(q, dl, out.view(n, 8, 32)).sub_(ml)
    return out


def _q6_k(ws: _Workspace, b: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    dl = _times(ws, _f16(ws, b, 208, "d"), b[:, 192:208].view(torch.int8), "dl").view(n, 16, 1)
    ql = _nibbles(ws, b[:, :128], 2, "ql").view(n, 8, 32)
    qh = _bits(ws, b[:, 128:192].reshape(n, 2, 1, 32), 2, 4, "qh").view(n, 8, 32)
    q = ql.bitwise_or_(qh.bitwise_left_shift_(4)).view(torch.int8).sub_(32).view(n, 16, 16)
    _scaled(q, dl, out.view(n, 16, 16))
    return out


def _iq4_lookup(ws: _Workspace, idx: torch.Tensor) -> torch.Tensor:
    table = _const("iq4nl", IQ4_NL_VALUES, torch.float32, idx.device, (16,))
    flat = ws.get("idx", (idx.numel(),), torch.int32).copy_(idx.reshape(-1))
    values = ws.get("values", (idx.numel(),), torch.float32)
    return torch.index_select(table, 0, flat, out=values).view(idx.shape)


def _iq4_nl(ws: _Workspace, b: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    values = _iq4_lookup(ws, _nibbles(ws, b[:, 2:], 1, "q").view(-1, 32))
    return torch.mul(_f16(ws, b, 0, "d"), values, out=out)


def _iq4_xs(ws: _Workspace, b: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    low = _nibbles(ws, b[:, 4:8].reshape(n, 4, 1), 4, "sl").view(n, 8)  # scale j: nibble j % 2 of byte j // 2
    high = _bits(ws, b[:, 2:4].reshape(n, 2, 1, 1), 2, 4, "sh").view(n, 8)  # scale j: bits 2j, 2j+1 of the u16
    scales = low.bitwise_or_(high.bitwise_left_shift_(4)).view(torch.int8).sub_(32)
    dl = _times(ws, _f16(ws, b, 0, "d"), scales, "dl").view(n, 8, 1)
    values = _iq4_lookup(ws, _nibbles(ws, b[:, 8:], 8, "q").view(n, 8, 32))
    torch.mul(dl, values, out=out.view(n, 8, 32))
    return out


_KERNELS: dict[GGMLType, Callable[[_Workspace, torch.Tensor, torch.Tensor], torch.Tensor]] = {
    GGMLType.Q8_0: _q8_0, GGMLType.Q4_0: _q4_0, GGMLType.Q4_1: _q4_1, GGMLType.Q5_0: _q5_0,
    GGMLType.Q5_1: _q5_1, GGMLType.Q2_K: _q2_k, GGMLType.Q3_K: _q3_k, GGMLType.Q4_K: _q4_k,
    GGMLType.Q5_K: _q5_k, GGMLType.Q6_K: _q6_k, GGMLType.IQ4_NL: _iq4_nl, GGMLType.IQ4_XS: _iq4_xs,
}
_FLOAT_TYPES = {GGMLType.F32: torch.float32, GGMLType.F16: torch.float16, GGMLType.BF16: torch.bfloat16}
TORCH_TYPES = frozenset(_KERNELS) | frozenset(_FLOAT_TYPES)


def _gguf_py_decodes(qtype: GGMLType) -> bool:
    """Whether gguf-py can dequantize ``qtype``, asked with one zero block (its own type table is private)."""
    try:
        gguf.quants.dequantize(np.zeros((1, QUANT_BLOCKS[qtype][1]), np.uint8), qtype)
    except Exception:  # NotImplementedError, or code that fails on a zero block and so cannot be trusted either
        return False
    return True


GGUF_PY_TYPES = frozenset(t for t in QUANT_BLOCKS if t not in TORCH_TYPES and _gguf_py_decodes(t))
DEQUANTIZABLE_TYPES = TORCH_TYPES | GGUF_PY_TYPES


def _gguf_py(blocks: torch.Tensor, qtype: GGMLType, out: torch.Tensor) -> None:
    """Decode ``blocks [n, type_size]`` into ``out [n, block]`` (any device and dtype) with gguf-py on the CPU, a
    chunk at a time: its numpy temporaries stay small, and one call per chunk keeps its per-call overhead low."""
    data = blocks.cpu().numpy()
    block = out.shape[1]
    chunk = max(1, _CPU_CHUNK_ELEMENTS // block)
    with np.errstate(all="ignore"):  # inf/nan scales of a corrupt file decode to inf/nan, as in the torch kernels
        for start in range(0, data.shape[0], chunk):
            values = gguf.quants.dequantize(data[start:start + chunk].reshape(1, -1), qtype)
            out[start:start + chunk].copy_(torch.from_numpy(values).view(-1, block))


def dequantize(raw: torch.Tensor, qtype: GGMLType | int, shape: Sequence[int],
               dtype: torch.dtype = torch.float32, out: torch.Tensor | None = None) -> torch.Tensor:
    """Dequantize the stored bytes ``raw`` (uint8, any shape) of a ``qtype`` tensor to ``shape`` in ``dtype``.

    Returns new memory on ``raw``'s device (never a view of ``raw``), or writes into ``out`` (contiguous, ``dtype``,
    as many elements as ``shape``) and returns it reshaped: reusing a buffer avoids the page faults of fresh
    memory, which cost more than the arithmetic on CPU.  :data:`GGUF_PY_TYPES` are decoded by gguf-py on the CPU
    whatever the device.  Raises :class:`GGUFError` for a type outside :data:`DEQUANTIZABLE_TYPES` or a byte count
    that does not match the shape.
    """
    qtype = GGMLType(qtype)
    shape = tuple(int(d) for d in shape)
    if qtype not in DEQUANTIZABLE_TYPES:
        raise GGUFError(f"dequantizing {qtype.name} tensors is not supported (supported: "
                        f"{', '.join(sorted(t.name for t in DEQUANTIZABLE_TYPES))}).")
    if raw.dtype != torch.uint8:
        raise GGUFError(f"expected raw uint8 bytes for a {qtype.name} tensor, got {raw.dtype}.")
    expected = quantized_nbytes(qtype, shape) if shape[-1] % QUANT_BLOCKS[qtype][0] == 0 else -1
    if raw.numel() != expected:
        raise GGUFError(f"{qtype.name} tensor of shape {list(shape)} needs {expected} bytes, got {raw.numel()}.")
    flat = raw.reshape(-1)
    if out is not None and (out.dtype != dtype or out.device != raw.device or not out.is_contiguous()
                            or out.numel() != math.prod(shape)):
        raise ValueError(f"out must be a contiguous {dtype} tensor of {math.prod(shape)} elements on {raw.device}")
    if qtype in _FLOAT_TYPES:
        values = flat.view(_FLOAT_TYPES[qtype])
        if out is not None:
            return out.view(shape).copy_(values.view(shape))
        return values.to(dtype, copy=True).reshape(shape)

    block, type_size = QUANT_BLOCKS[qtype]
    blocks = flat.view(-1, type_size)
    n_blocks = blocks.shape[0]
    if out is None:
        out = torch.empty(n_blocks, block, dtype=dtype, device=raw.device)
    else:
        out = out.view(n_blocks, block)
    if qtype in GGUF_PY_TYPES:
        _gguf_py(blocks, qtype, out)
        return out.reshape(shape)
    chunk_elements = _CPU_CHUNK_ELEMENTS if raw.device.type == "cpu" else _GPU_CHUNK_ELEMENTS
    chunk = max(1, chunk_elements // block)
    kernel = _KERNELS[qtype]
    ws = _Workspace(raw.device)
    for start in range(0, n_blocks, chunk):
        stop = min(start + chunk, n_blocks)
        if dtype == torch.float32:
            kernel(ws, blocks[start:stop], out[start:stop])
        else:
            fp32 = ws.get("fp32", (stop - start, block), torch.float32)
            out[start:stop].copy_(kernel(ws, blocks[start:stop], fp32))
    return out.reshape(shape)
