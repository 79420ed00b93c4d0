"""Dequantization of ggml block formats in torch (CPU and GPU), bit-exact with ggml's reference code.

Each kernel unpacks the quantized integers with uint8/int8 bit operations on the raw block bytes, then does the
float arithmetic in fp32 in the same order as ggml's ``dequantize_row_*`` reference (e.g. Q4_K is
``(d * sc) * q - (dmin * m)``), so results are identical to gguf-py's numpy implementation bit for bit.  The
fp32 result is cast to the requested dtype at the end.  Work is done in chunks of blocks so temporaries stay
small (cache-friendly on CPU, bounded memory on GPU).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .reader import QUANT_BLOCKS, GGMLType, GGUFError, quantized_nbytes

__all__ = ["dequantize", "DEQUANTIZABLE_TYPES", "IQ4_NL_VALUES"]

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


def _f16(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """The fp16 field at byte ``start`` of each block, as fp32 ``[n, 1]``."""
    if blocks.storage_offset() % 2 or blocks.stride(0) % 2:
        return blocks[:, start:start + 2].contiguous().view(torch.float16).to(torch.float32)
    # every block size and field offset is even: read the field through a 16-bit view, no byte gather
    return blocks.view(torch.float16)[:, start // 2:start // 2 + 1].to(torch.float32)


def _nibbles(qs: torch.Tensor, groups: int) -> torch.Tensor:
    """Split bytes ``[n, groups * k]`` into ``[n, groups, 2, k]`` uint8: low nibbles, then high nibbles."""
    n = qs.shape[0]
    qs = qs.reshape(n, groups, 1, -1)
    out = torch.empty(n, groups, 2, qs.shape[-1], dtype=torch.uint8, device=qs.device)
    torch.bitwise_and(qs, 0x0F, out=out[:, :, :1])
    torch.bitwise_right_shift(qs, 4, out=out[:, :, 1:])
    return out


def _bits(bytes_: torch.Tensor, width: int, count: int) -> torch.Tensor:
    """``bytes_ [n, g, 1, k] >> (0, width, 2*width, ...)`` masked to ``width`` bits: ``[n, g, count, k]``."""
    shifts = _const(f"shift{width}x{count}", [width * i for i in range(count)], torch.uint8, bytes_.device,
                    (1, 1, count, 1))
    return torch.bitwise_and(torch.bitwise_right_shift(bytes_, shifts), (1 << width) - 1)


def _scaled(q: torch.Tensor, scale: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out = float(q) * scale`` (scale broadcast per group)."""
    out.copy_(q)
    out.mul_(scale)
    return out


# -- kernels: (blocks uint8 [n, type_size], out fp32 [n, block_elems]) -> out ----------------------------------

def _q8_0(b: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    return _scaled(b[:, 2:].view(torch.int8), _f16(b, 0), out)


def _q4_0(b: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    q = _nibbles(b[:, 2:], 1).view(torch.int8).sub_(8).reshape(-1, 32)
    return _scaled(q, _f16(b, 0), out)


def _q4_1(b: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    q = _nibbles(b[:, 4:], 1).reshape(-1, 32)
    return _scaled(q, _f16(b, 0), out).add_(_f16(b, 2))


def _q5_low_high(b: torch.Tensor, qh_at: int) -> torch.Tensor:
    """5-bit values of Q5_0/Q5_1: low nibbles from ``qs``, bit 4 from the 32-bit ``qh`` (bit i -> element i)."""
    ql = _nibbles(b[:, qh_at + 4:], 1).reshape(-1, 32)
    qh = _bits(b[:, qh_at:qh_at + 4].reshape(-1, 4, 1, 1), 1, 8).reshape(-1, 32)
    return ql.bitwise_or_(qh.bitwise_left_shift_(4))


def _q5_0(b: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    q = _q5_low_high(b, 2).view(torch.int8).sub_(16)
    return _scaled(q, _f16(b, 0), out)


def _q5_1(b: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    return _scaled(_q5_low_high(b, 4), _f16(b, 0), out).add_(_f16(b, 2))


def _q2_k(b: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    scales = b[:, :16]
    d, dmin = _f16(b, 80), _f16(b, 82)
    dl = (d * torch.bitwise_and(scales, 0x0F)).reshape(n, 16, 1)
    ml = (dmin * torch.bitwise_right_shift(scales, 4)).reshape(n, 16, 1)
    q = _bits(b[:, 16:80].reshape(n, 2, 1, 32), 2, 4).reshape(n, 16, 16)
    o = out.view(n, 16, 16)
    _scaled(q, dl, o).sub_(ml)
    return out


def _q3_k(b: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    hmask, qs, sc = b[:, :32], b[:, 32:96], b[:, 96:108]
    d = _f16(b, 108)
    low = _nibbles(sc[:, :8], 1).reshape(n, 16)
    high = _bits(sc[:, 8:12].reshape(n, 1, 1, 4), 2, 4).reshape(n, 16)
    scales = low.bitwise_or_(high.bitwise_left_shift_(4)).view(torch.int8).sub_(32)
    dl = (d * scales).reshape(n, 16, 1)
    ql = _bits(qs.reshape(n, 2, 1, 32), 2, 4).reshape(n, 16, 16)
    # a cleared hmask bit means "subtract 4"
    qh = _bits(hmask.reshape(n, 1, 1, 32), 1, 8).reshape(n, 16, 16).bitwise_xor_(1).bitwise_left_shift_(2)
    q = ql.view(torch.int8).sub_(qh.view(torch.int8))
    _scaled(q, dl, out.view(n, 16, 16))
    return out


def _k_scale_min(sc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 8 six-bit scales and mins packed in the 12 bytes of Q4_K / Q5_K."""
    n = sc.shape[0]
    d, m, md = sc[:, 0:4], sc[:, 4:8], sc[:, 8:12]
    scales = torch.empty(n, 8, dtype=torch.uint8, device=sc.device)
    mins = torch.empty_like(scales)
    torch.bitwise_and(d, 0x3F, out=scales[:, :4])
    torch.bitwise_or(torch.bitwise_and(md, 0x0F), torch.bitwise_and(torch.bitwise_right_shift(d, 2), 0x30),
                     out=scales[:, 4:])
    torch.bitwise_and(m, 0x3F, out=mins[:, :4])
    torch.bitwise_or(torch.bitwise_right_shift(md, 4), torch.bitwise_and(torch.bitwise_right_shift(m, 2), 0x30),
                     out=mins[:, 4:])
    return scales, mins


def _q4_k(b: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    sc, mn = _k_scale_min(b[:, 4:16])
    dl = (_f16(b, 0) * sc).reshape(n, 8, 1)
    ml = (_f16(b, 2) * mn).reshape(n, 8, 1)
    q = _nibbles(b[:, 16:], 4).reshape(n, 8, 32)
    _scaled(q, dl, out.view(n, 8, 32)).sub_(ml)
    return out


def _q5_k(b: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    sc, mn = _k_scale_min(b[:, 4:16])
    dl = (_f16(b, 0) * sc).reshape(n, 8, 1)
    ml = (_f16(b, 2) * mn).reshape(n, 8, 1)
    ql = _nibbles(b[:, 48:], 4).reshape(n, 8, 32)
    qh = _bits(b[:, 16:48].reshape(n, 1, 1, 32), 1, 8).reshape(n, 8, 32)
    q = ql.bitwise_or_(qh.bitwise_left_shift_(4))
    _scaled(q, dl, out.view(n, 8, 32)).sub_(ml)
    return out


def _q6_k(b: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    scales = b[:, 192:208].view(torch.int8)
    dl = (_f16(b, 208) * scales).reshape(n, 16, 1)
    ql = _nibbles(b[:, :128], 2).reshape(n, 8, 32)
    qh = _bits(b[:, 128:192].reshape(n, 2, 1, 32), 2, 4).reshape(n, 8, 32)
    q = ql.bitwise_or_(qh.bitwise_left_shift_(4)).view(torch.int8).sub_(32).reshape(n, 16, 16)
    _scaled(q, dl, out.view(n, 16, 16))
    return out


def _iq4_lookup(idx: torch.Tensor) -> torch.Tensor:
    table = _const("iq4nl", IQ4_NL_VALUES, torch.float32, idx.device, (16,))
    return table[idx.to(torch.int32)]


def _iq4_nl(b: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    values = _iq4_lookup(_nibbles(b[:, 2:], 1).reshape(-1, 32))
    return torch.mul(_f16(b, 0), values, out=out)


def _iq4_xs(b: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    low = _nibbles(b[:, 4:8].reshape(n, 4, 1), 4).reshape(n, 8)  # scale j: nibble j % 2 of byte j // 2
    high = _bits(b[:, 2:4].reshape(n, 2, 1, 1), 2, 4).reshape(n, 8)  # scale j: bits 2j..2j+1 of the u16
    scales = low.bitwise_or_(high.bitwise_left_shift_(4)).view(torch.int8).sub_(32)
    dl = (_f16(b, 0) * scales).reshape(n, 8, 1)
    values = _iq4_lookup(_nibbles(b[:, 8:], 8).reshape(n, 8, 32))
    torch.mul(dl, values, out=out.view(n, 8, 32))
    return out


_KERNELS: dict[GGMLType, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    GGMLType.Q8_0: _q8_0, GGMLType.Q4_0: _q4_0, GGMLType.Q4_1: _q4_1, GGMLType.Q5_0: _q5_0,
    GGMLType.Q5_1: _q5_1, GGMLType.Q2_K: _q2_k, GGMLType.Q3_K: _q3_k, GGMLType.Q4_K: _q4_k,
    GGMLType.Q5_K: _q5_k, GGMLType.Q6_K: _q6_k, GGMLType.IQ4_NL: _iq4_nl, GGMLType.IQ4_XS: _iq4_xs,
}
_FLOAT_TYPES = {GGMLType.F32: torch.float32, GGMLType.F16: torch.float16, GGMLType.BF16: torch.bfloat16}
DEQUANTIZABLE_TYPES = frozenset(_KERNELS) | frozenset(_FLOAT_TYPES)


def dequantize(raw: torch.Tensor, qtype: GGMLType | int, shape: Sequence[int],
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Dequantize the stored bytes ``raw`` (uint8, any shape) of a ``qtype`` tensor to ``shape`` in ``dtype``.

    Always returns new memory on ``raw``'s device (never a view of ``raw``).  Raises :class:`GGUFError` for a
    type this module cannot dequantize or a byte count that does not match the shape.
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
    if qtype in _FLOAT_TYPES:
        return flat.view(_FLOAT_TYPES[qtype]).to(dtype, copy=True).reshape(shape)

    block, type_size = QUANT_BLOCKS[qtype]
    blocks = flat.view(-1, type_size)
    n_blocks = blocks.shape[0]
    out = torch.empty(n_blocks, block, dtype=dtype, device=raw.device)
    chunk_elements = _CPU_CHUNK_ELEMENTS if raw.device.type == "cpu" else _GPU_CHUNK_ELEMENTS
    chunk = max(1, chunk_elements // block)
    kernel = _KERNELS[qtype]
    scratch = None if dtype == torch.float32 else torch.empty(min(chunk, n_blocks), block, device=raw.device)
    for start in range(0, n_blocks, chunk):
        stop = min(start + chunk, n_blocks)
        if scratch is None:
            kernel(blocks[start:stop], out[start:stop])
        else:
            out[start:stop].copy_(kernel(blocks[start:stop], scratch[:stop - start]))
    return out.reshape(shape)
