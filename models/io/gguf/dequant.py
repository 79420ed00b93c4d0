"""Dequantization of ggml block formats in torch (CPU and GPU), bit-exact with ggml's reference code.

Why any evaluation order is exact: every product the reference computes (fp16 scale x integer sub-block scale x
quantized integer) needs at most 24 significant bits - e.g. Q6_K: 11 (fp16) + 7 (|scale| <= 128) + 5 (|q| <= 32) -
so it is exact in fp32, and the only roundings are the final ``+ min`` / ``- min`` (one fp32 rounding, as in the
reference) and the cast to the requested dtype.  Results equal gguf-py's bit for bit whatever the order of the
factors, and also when a compiler fuses the arithmetic (fused multiply-add, one kernel).

CPU kernels are written for throughput with eager torch ops, each of which costs a few microseconds plus a loop whose
rows should be long; they run on the calling thread alone (see :class:`_Serial`):

* a tensor is done in chunks of blocks whose temporaries stay in the CPU caches, written into the buffers of a
  :class:`Workspace` that is reused from chunk to chunk and call to call (fresh memory costs page faults);
* the per-block scales of a whole span of chunks are unpacked first, with few ops on 32-bit words;
* bit fields are extracted with one shift per *plane* over all the blocks of a chunk (long contiguous rows), and the
  planes are put in element order by one gather of 8-byte words (``index_select``), so the integer values reach
  fp32 with one conversion and are scaled with one or two broadcast ops per chunk;
* a bf16/fp16 result is cast from the fp32 chunk while it is still in cache.

Other devices run one functional formulation per type (:data:`FUSED_TYPES`): through ``torch.compile`` when a
:class:`FusedDequant` is given (the quantized layers give one on CUDA), every block becomes one kernel that writes
the weight in the compute dtype, with no fp32 intermediate in memory; where it does not compile, the same
formulation runs as eager ops, a chunk at a time.

Types without a torch kernel that gguf-py can decode (the IQ1/IQ2/IQ3 families, TQ1_0/TQ2_0, MXFP4, ...:
:data:`GGUF_PY_TYPES`) go through ``gguf.quants.dequantize`` on the CPU, and the result is copied to the bytes'
device in the requested dtype: correct everywhere, but slower than a torch kernel (IQ2_XXS / IQ3_S about
10x Q4_K on one CPU thread, TQ1_0 about 2x: ``bench/bench_gguf.py --parts 4``).
"""

from __future__ import annotations

import ctypes
import functools
import logging
import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import gguf
import numpy as np
import torch

from .reader import QUANT_BLOCKS, GGMLType, GGUFError, quantized_nbytes

__all__ = ["dequantize", "dequantize_group", "Workspace", "FusedDequant", "DEQUANTIZABLE_TYPES", "TORCH_TYPES",
           "GGUF_PY_TYPES", "FUSED_TYPES", "CPU_KERNEL_TYPES", "IQ4_NL_VALUES"]

logger = logging.getLogger("qwen_image")

IQ4_NL_VALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)
_CPU_CHUNK_ELEMENTS = 1 << 19  # fp32 output per chunk on CPU (2 MiB): temporaries stay in the caches
_DEVICE_CHUNK_ELEMENTS = 1 << 24  # other devices: elements per chunk of the eager functional kernels
_HEADER_CHUNKS = 16  # scales are unpacked for this many chunks at a time (their ops are per block: tiny rows)


class Workspace:
    """One thread's scratch for dequantizing on the CPU: named buffers that grow to the largest request and are
    reused from chunk to chunk and call to call, small constants, and gather indices.  Not thread-safe by design:
    each thread needs its own (see :class:`models.io.gguf.layers.DequantContext`)."""

    def __init__(self):
        self._buffers: dict[str, torch.Tensor] = {}
        self._views: dict[tuple[str, tuple[int, ...], torch.dtype], torch.Tensor] = {}
        self._memos: dict[object, object] = {}
        self._constants: dict[object, torch.Tensor] = {}

    def get(self, key: str, shape: tuple[int, ...], dtype: torch.dtype = torch.uint8) -> torch.Tensor:
        """A contiguous ``shape`` x ``dtype`` view of buffer ``key`` (contents undefined; views of one key alias the
        same bytes), kept for the next call with these arguments: a torch call costs microseconds."""
        view = self._views.get((key, shape, dtype))
        if view is not None:
            return view
        nbytes = math.prod(shape) * dtype.itemsize
        buffer = self._buffers.get(key)
        if buffer is None or buffer.numel() < nbytes:
            buffer = self._buffers[key] = torch.empty(max(nbytes, 8), dtype=torch.uint8)
            self._views = {k: v for k, v in self._views.items() if k[0] != key}  # views of the old buffer
            self._memos.clear()
        view = self._views[key, shape, dtype] = buffer[:nbytes].view(dtype).view(shape)
        return view

    def memo(self, key: object, make: Callable[[], object]):
        """``make()`` (views of this workspace's buffers, typically) kept until a buffer grows."""
        value = self._memos.get(key)
        if value is None:
            value = self._memos[key] = make()
        return value

    def const(self, key: object, make: Callable[[], torch.Tensor]) -> torch.Tensor:
        """A constant tensor built by ``make()`` once."""
        tensor = self._constants.get(key)
        if tensor is None:
            tensor = self._constants[key] = make()
        return tensor

    def scalar(self, value: int, dtype: torch.dtype = torch.uint8) -> torch.Tensor:
        """``value`` as a 0-dim tensor of ``dtype``: an op with it skips the conversion a Python number costs."""
        return self.const(("scalar", value, dtype), lambda: torch.tensor(value, dtype=dtype))

    @property
    def nbytes(self) -> int:
        """Memory held by the buffers and constants."""
        return sum(t.numel() * t.element_size() for t in (*self._buffers.values(), *self._constants.values()))


# -- building blocks of the eager kernels ------------------------------------------------------------------------

def _f16(ws: Workspace, blocks: torch.Tensor, start: int, key: str, count: int = 1) -> torch.Tensor:
    """The ``count`` fp16 fields from byte ``start`` of each block, as fp32 ``[n, count]``."""
    out = ws.get(key, (blocks.shape[0], count), torch.float32)
    stop = start + 2 * count
    if blocks.storage_offset() % 2 or blocks.stride(0) % 2:
        return out.copy_(blocks[:, start:stop].contiguous().view(torch.float16))
    # every block size and field offset is even: read the fields through a 16-bit view, no byte gather
    return out.copy_(blocks.view(torch.float16)[:, start // 2:stop // 2])


def _field(ws: Workspace, blocks: torch.Tensor, start: int, stop: int, key: str) -> torch.Tensor:
    """Bytes ``start:stop`` of each block copied to a contiguous, word-aligned ``[n, stop - start]`` buffer."""
    return ws.get(key, (blocks.shape[0], stop - start)).copy_(blocks[:, start:stop])


def _words(ws: Workspace, blocks: torch.Tensor, start: int, stop: int, key: str) -> torch.Tensor:
    """Bytes ``start:stop`` of each block as little-endian int32 words ``[n, (stop - start) // 4]``."""
    return _field(ws, blocks, start, stop, key).view(torch.int32)


def _shifts(ws: Workspace, shifts: Sequence[int], ndim: int, dtype: torch.dtype = torch.uint8) -> torch.Tensor:
    """Shift amounts as a ``[len(shifts), 1, ...]`` tensor (``ndim`` dims) that broadcasts over leading planes."""
    key = ("shifts", tuple(shifts), ndim, dtype)
    return ws.const(key, lambda: torch.tensor(shifts, dtype=dtype).view(-1, *([1] * (ndim - 1))))


def _planes(ws: Workspace, field: torch.Tensor, shifts: Sequence[int], mask: int, key: str,
            capacity: int) -> torch.Tensor:
    """``(field >> s) & mask`` for each shift ``s``: ``[len(shifts), capacity, m]`` uint8, of which the first
    ``field.shape[0]`` rows of each plane are filled.  One op per step over all blocks (long rows: ``field`` should
    be contiguous or have rows of 64 bytes or more); the plane stride is fixed by ``capacity`` so that gather
    indices built for a full chunk serve shorter ones too."""
    n, m = field.shape
    planes = ws.get(key, (len(shifts), capacity, m))
    filled = ws.memo(("filled", key, n, planes.shape), lambda: planes[:, :n])
    torch.bitwise_right_shift(field.unsqueeze(0), _shifts(ws, shifts, 3), out=filled)
    filled.bitwise_and_(ws.scalar(mask))
    return planes


def _gather(ws: Workspace, planes: torch.Tensor, layout: Sequence[tuple[int, int]], n: int, key: str) -> torch.Tensor:
    """Bytes in element order ``[n, 8 * len(layout)]`` (a workspace buffer) from ``planes [P, capacity, m]`` (see
    :func:`_planes`): 8-byte word ``w`` of block ``i`` is word ``layout[w][1]`` of block ``i`` in plane
    ``layout[w][0]``.  One ``index_select`` of int64 words: far cheaper than a strided copy of short rows."""
    _, capacity, m = planes.shape
    per_plane = m // 8

    def index() -> torch.Tensor:
        base = torch.tensor([p * capacity * per_plane + w for p, w in layout], dtype=torch.int64)
        return (torch.arange(capacity, dtype=torch.int64).unsqueeze(1) * per_plane + base).reshape(-1)

    words = len(layout)
    idx = ws.memo(("gather", key, tuple(layout), n, capacity, m), lambda: ws.const(
        ("gather", key, tuple(layout), capacity, m), index)[:n * words])
    source = ws.memo(("words", planes.data_ptr(), planes.shape), lambda: planes.view(torch.int64).view(-1))
    torch.index_select(source, 0, idx, out=ws.get(key, (n * words,), torch.int64))
    return ws.get(key, (n, 8 * words))


def _scale(q: torch.Tensor, group: int, dl: torch.Tensor, ml: torch.Tensor | None, out: torch.Tensor) -> None:
    """``out = float(q) * dl (- ml)`` with one scale (and min) per ``group`` consecutive elements."""
    rows = out.view(-1, group)
    rows.copy_(q.view(-1, group))
    rows.mul_(dl.reshape(-1, 1))
    if ml is not None:
        rows.sub_(ml.reshape(-1, 1))


def _scaled_halves(values: torch.Tensor, skip: int, d: torch.Tensor, out: torch.Tensor) -> None:
    """32-element blocks: ``out[:, 16h:16h + 16] = values[h, :, skip:] * d`` for the two nibble planes ``h``."""
    halves = out.view(-1, 2, 16)
    for h in range(2):
        torch.mul(values[h, :, skip:], d, out=halves[:, h])


def _nibble_planes(ws: Workspace, b: torch.Tensor, key: str) -> torch.Tensor:
    """Low and high nibbles of every byte of 32-element blocks ``b [n, size]``: ``[2, n, size]`` uint8 (the whole
    block, scale bytes included: two ops over contiguous memory instead of many short rows)."""
    n, size = b.shape
    planes = ws.get(key, (2, n, size))
    torch.bitwise_right_shift(b.reshape(1, n, size), _shifts(ws, (0, 4), 3), out=planes)
    return planes.bitwise_and_(ws.scalar(0x0F))


def _as_float(ws: Workspace, values: torch.Tensor, key: str) -> torch.Tensor:
    return ws.get(key, tuple(values.shape), torch.float32).copy_(values)


# -- headers: per-block scales for a span of chunks -> tuple of fp32 tensors, one row per block ----------------

def _h_d(ws: Workspace, b: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return (_f16(ws, b, 0, "d"),)


def _h_dm(ws: Workspace, b: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return _f16(ws, b, 0, "d"), _f16(ws, b, 2, "m")


def _h_q2_k(ws: Workspace, b: torch.Tensor) -> tuple[torch.Tensor, ...]:
    n = b.shape[0]
    sc = _planes(ws, _field(ws, b, 0, 16, "hsc"), (0, 4), 0x0F, "hpl", n)  # scales, then mins
    values = _as_float(ws, sc, "hval")
    dl = torch.mul(values[0], _f16(ws, b, 80, "d"), out=ws.get("dl", (n, 16), torch.float32))
    ml = torch.mul(values[1], _f16(ws, b, 82, "dmin"), out=ws.get("ml", (n, 16), torch.float32))
    return dl, ml


def _h_q3_k(ws: Workspace, b: torch.Tensor) -> tuple[torch.Tensor, ...]:
    # 16 six-bit scales: low 4 bits of scale j are nibble (j // 8) of byte j % 8, its high 2 bits are bits
    # 2 * (j // 4) of byte 8 + j % 4; with 32-bit words, four scales per op
    n = b.shape[0]
    w = _words(ws, b, 96, 108, "hsc")
    out = ws.get("hout", (n, 4), torch.int32)
    nibbles = ws.scalar(0x0F0F0F0F, torch.int32)
    torch.bitwise_and(w[:, :2], nibbles, out=out[:, :2])
    torch.bitwise_right_shift(w[:, :2], ws.scalar(4, torch.int32), out=out[:, 2:]).bitwise_and_(nibbles)
    high = ws.get("hhigh", (n, 4), torch.int32)
    torch.bitwise_right_shift(w[:, 2:3], _shifts(ws, (0, 2, 4, 6), 1, torch.int32), out=high)
    high.bitwise_and_(ws.scalar(0x03030303, torch.int32)).mul_(ws.scalar(16, torch.int32))
    scales = out.bitwise_or_(high).view(torch.uint8).sub_(ws.scalar(32)).view(torch.int8)
    dl = ws.get("dl", (n, 16), torch.float32).copy_(scales)
    return (dl.mul_(_f16(ws, b, 108, "d")),)


class _KHeader(NamedTuple):
    """Views of the workspace a Q4_K / Q5_K header of ``n`` blocks works in, made once per ``n`` (views cost as
    much as the ops of a small tensor)."""

    field: torch.Tensor  # bytes 0..16 of each block
    low: torch.Tensor  # the words of the low 6 bits of scales 0-3 and mins 0-3
    md: torch.Tensor  # the word of the low 4 bits of scales and mins 4-7
    low_out: torch.Tensor  # out: words scales 0-3, scales 4-7, mins 0-3, mins 4-7
    high_out: torch.Tensor
    tmp: torch.Tensor
    out_bytes: torch.Tensor  # [2, n, 8]: scales, mins
    values: torch.Tensor  # the same in fp32
    d_dmin_f16: torch.Tensor  # [2, n, 1]
    d_dmin: torch.Tensor  # the same in fp32
    scaled: torch.Tensor  # [2, n, 8]: d * scale, dmin * min
    dl: torch.Tensor
    ml: torch.Tensor

    @classmethod
    def make(cls, ws: Workspace, n: int) -> _KHeader:
        field, out = ws.get("hsc", (n, 16)), ws.get("hout", (n, 4), torch.int32)
        words, scaled = field.view(torch.int32), ws.get("dlml", (2, n, 8), torch.float32)
        return cls(field, words[:, 1:3], words[:, 3:4], out[:, 0::2], out[:, 1::2],
                   ws.get("htmp", (n, 2), torch.int32), out.view(torch.uint8).view(n, 2, 8).transpose(0, 1),
                   ws.get("hval", (2, n, 8), torch.float32), field.view(torch.float16)[:, :2].t().unsqueeze(2),
                   ws.get("d", (2, n, 1), torch.float32), scaled, scaled[0], scaled[1])


def _h_k_scale_min(ws: Workspace, b: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Q4_K / Q5_K: ``d`` and ``dmin`` (bytes 0..4) times the 8 six-bit scales and mins packed in bytes 4..16."""
    v = ws.memo(("k_scale_min", b.shape[0]), lambda: _KHeader.make(ws, b.shape[0]))
    v.field.copy_(b[:, :16])
    torch.bitwise_and(v.low, ws.scalar(0x3F3F3F3F, torch.int32), out=v.low_out)
    torch.bitwise_right_shift(v.low, ws.scalar(2, torch.int32), out=v.tmp)
    v.tmp.bitwise_and_(ws.scalar(0x30303030, torch.int32))  # the high bits of scales and mins 4-7
    torch.bitwise_right_shift(v.md, _shifts(ws, (0, 4), 1, torch.int32), out=v.high_out)
    v.high_out.bitwise_and_(ws.scalar(0x0F0F0F0F, torch.int32)).bitwise_or_(v.tmp)
    v.values.copy_(v.out_bytes)
    v.d_dmin.copy_(v.d_dmin_f16)
    torch.mul(v.values, v.d_dmin, out=v.scaled)
    return v.dl, v.ml


def _h_q6_k(ws: Workspace, b: torch.Tensor) -> tuple[torch.Tensor, ...]:
    dl = _as_float(ws, _field(ws, b, 192, 208, "hsc").view(torch.int8), "dl")
    return (dl.mul_(_f16(ws, b, 208, "d")),)


def _h_iq4_xs(ws: Workspace, b: torch.Tensor) -> tuple[torch.Tensor, ...]:
    # scale j: nibble j % 2 of byte 4 + j // 2, plus bits 2j, 2j + 1 of the u16 at byte 2 as bits 4, 5
    n = b.shape[0]
    low = _planes(ws, _field(ws, b, 4, 8, "hsl"), (0, 4), 0x0F, "hpl", n)  # [nibble, n, byte]
    high = ws.get("hhigh", (n, 8), torch.int32)
    torch.bitwise_right_shift(_field(ws, b, 0, 4, "hsh").view(torch.int32), _shifts(ws, range(16, 32, 2), 1,
                                                                                   torch.int32), out=high)
    high.bitwise_and_(ws.scalar(3, torch.int32)).mul_(ws.scalar(16, torch.int32))
    scales = high.view(n, 4, 2).add_(low.permute(1, 2, 0)).sub_(ws.scalar(32, torch.int32))
    dl = ws.get("dl", (n, 8), torch.float32).copy_(scales.view(n, 8))
    return (dl.mul_(_f16(ws, b, 0, "d")),)


# -- bodies: (workspace, blocks [n, size], scales for these blocks, out fp32 [n, block], chunk capacity) ------

def _q8_0(ws: Workspace, b: torch.Tensor, scales: Sequence[torch.Tensor], out: torch.Tensor, cap: int) -> None:
    # the whole blocks (scale bytes too) to fp32 as one long row - vectorized, unlike 32-byte rows of stride 34 -
    # then one multiply from the 32 values of each row into ``out`` (about 10% less CPU time than copy_ + mul_)
    n, size = b.shape
    values = ws.get("values", (n, size), torch.float32)
    values.copy_(b.view(torch.int8))  # contiguous blocks: one long row for TensorIterator
    torch.mul(ws.memo(("q8_0", n), lambda: values[:, 2:]), scales[0], out=out)


def _q4_0(ws: Workspace, b: torch.Tensor, scales: Sequence[torch.Tensor], out: torch.Tensor, cap: int) -> None:
    q = _nibble_planes(ws, b, "q").sub_(ws.scalar(8)).view(torch.int8)
    _scaled_halves(_as_float(ws, q, "values"), 2, scales[0], out)


def _q4_1(ws: Workspace, b: torch.Tensor, scales: Sequence[torch.Tensor], out: torch.Tensor, cap: int) -> None:
    _scaled_halves(_as_float(ws, _nibble_planes(ws, b, "q"), "values"), 4, scales[0], out)
    out.add_(scales[1])


def _q5_bits(ws: Workspace, b: torch.Tensor, qh_at: int) -> torch.Tensor:
    """The fifth bits of Q5_0 / Q5_1 (bit i of the 32-bit ``qh`` -> element i) as 0 / 16, fp32 ``[n, 32]``: each
    ``qh`` byte looks up its 8 output bytes, packed in one int64."""
    def table() -> torch.Tensor:
        byte = torch.arange(256, dtype=torch.int64).unsqueeze(1)
        return (((byte >> torch.arange(8)) & 1) << (8 * torch.arange(8) + 4)).sum(1)

    n = b.shape[0]
    idx = ws.get("qhidx", (n, 4), torch.int64).copy_(b[:, qh_at:qh_at + 4])
    bits = ws.get("qhbits", (n, 4), torch.int64)
    torch.index_select(ws.const("q5bits", table), 0, idx.view(-1), out=bits.view(-1))
    return _as_float(ws, bits.view(torch.uint8), "qhvalues")


def _q5_0(ws: Workspace, b: torch.Tensor, scales: Sequence[torch.Tensor], out: torch.Tensor, cap: int) -> None:
    low = _as_float(ws, _nibble_planes(ws, b, "q").sub_(ws.scalar(16)).view(torch.int8), "values")
    high = _q5_bits(ws, b, 2)
    halves = out.view(-1, 2, 16)
    for h in range(2):
        torch.add(low[h, :, 6:], high[:, 16 * h:16 * h + 16], out=halves[:, h])
    out.mul_(scales[0])


def _q5_1(ws: Workspace, b: torch.Tensor, scales: Sequence[torch.Tensor], out: torch.Tensor, cap: int) -> None:
    low = _as_float(ws, _nibble_planes(ws, b, "q"), "values")
    high = _q5_bits(ws, b, 4)
    halves = out.view(-1, 2, 16)
    for h in range(2):
        torch.add(low[h, :, 8:], high[:, 16 * h:16 * h + 16], out=halves[:, h])
    out.mul_(scales[0]).add_(scales[1])


# Element order of the K-quants, as (plane, 8-byte word in the plane's row) per output word.
# Q2_K / Q3_K: element 128a + 32j + l is (qs[32a + l] >> 2j) & 3: plane j, bytes 32a + l of 64.
_Q2_LAYOUT = tuple((j, 4 * a + w) for a in range(2) for j in range(4) for w in range(4))
# Q4_K / Q5_K: element 64g + 32h + l is nibble h of qs[32g + l]: plane h, bytes 32g + l of 128.
_NIBBLE_LAYOUT = tuple((h, 4 * g + w) for g in range(4) for h in range(2) for w in range(4))
# Q5_K: element 32k + l takes bit k of qh[l]: plane k, bytes l of 32.
_Q5_HIGH_LAYOUT = tuple((k, w) for k in range(8) for w in range(4))
# Q6_K: element 128h + 32k + l takes nibble k // 2 of ql[64h + 32(k % 2) + l] and bits 2k of qh[32h + l]
# (gathered from planes k of 64 bytes that hold both).
_Q6_HIGH_LAYOUT = tuple((k, 4 * h + w) for h in range(2) for k in range(4) for w in range(4))
# IQ4_XS: element 32i + 16h + j is nibble h of qs[16i + j].
_IQ4_XS_LAYOUT = tuple((h, 2 * i + w) for i in range(8) for h in range(2) for w in range(2))


def _q2_k(ws: Workspace, b: torch.Tensor, scales: Sequence[torch.Tensor], out: torch.Tensor, cap: int) -> None:
    n = b.shape[0]
    planes = _planes(ws, b[:, 16:80], (0, 2, 4, 6), 3, "planes", cap)
    _scale(_gather(ws, planes, _Q2_LAYOUT, n, "q"), 16, scales[0], scales[1], out)


def _q3_k(ws: Workspace, b: torch.Tensor, scales: Sequence[torch.Tensor], out: torch.Tensor, cap: int) -> None:
    n = b.shape[0]
    planes = _planes(ws, b[:, 32:96], (0, 2, 4, 6), 3, "planes", cap)
    # bit 4a + j of hmask[l] belongs to plane j, bytes 32a + l: hmask and hmask >> 4 side by side, then one
    # shift per plane; a cleared bit means "subtract 4", so q = low | (bit << 2) - 4
    hmask = ws.get("hm", (n, 64))
    hmask[:, :32].copy_(b[:, :32])
    torch.bitwise_right_shift(b[:, :32], 4, out=hmask[:, 32:])
    high = _planes(ws, hmask, (0, 1, 2, 3), 1, "hplanes", cap)
    planes[:, :n].bitwise_or_(high[:, :n].mul_(ws.scalar(4)))
    q = _gather(ws, planes, _Q2_LAYOUT, n, "q").sub_(ws.scalar(4)).view(torch.int8)
    _scale(q, 16, scales[0], None, out)


def _q4_k(ws: Workspace, b: torch.Tensor, scales: Sequence[torch.Tensor], out: torch.Tensor, cap: int) -> None:
    n = b.shape[0]
    planes = _planes(ws, b[:, 16:144], (0, 4), 0x0F, "planes", cap)
    _scale(_gather(ws, planes, _NIBBLE_LAYOUT, n, "q"), 32, scales[0], scales[1], out)


def _q5_k(ws: Workspace, b: torch.Tensor, scales: Sequence[torch.Tensor], out: torch.Tensor, cap: int) -> None:
    # element 32k + l (k = 2g + h) is nibble h of qs[32g + l] plus bit k of qh[l] as 16: the bits go straight to
    # bit 4 (shifts left for k < 4, right for k >= 4, then one mask), the nibble planes are OR-ed into the bit
    # planes through a strided view, and one gather puts the 8 planes in element order
    n = b.shape[0]
    low = _planes(ws, b[:, 48:176], (0, 4), 0x0F, "planes", cap)  # [h, cap, 32g + l]
    qh = _field(ws, b, 16, 48, "qh").unsqueeze(0)
    high = ws.get("hplanes", (8, cap, 32))  # [k, cap, l]
    filled = ws.memo(("q5high", n, cap), lambda: high[:, :n])
    torch.bitwise_left_shift(qh, _shifts(ws, (4, 3, 2, 1), 3), out=filled[:4])
    torch.bitwise_right_shift(qh, _shifts(ws, (0, 1, 2, 3), 3), out=filled[4:])
    filled.bitwise_and_(ws.scalar(16))
    ws.memo(("q5view", n, cap), lambda: filled.view(4, 2, n, 32)).bitwise_or_(
        ws.memo(("q5low", n, cap), lambda: low[:, :n].view(2, n, 4, 32).permute(2, 0, 1, 3)))
    _scale(_gather(ws, high, _Q5_HIGH_LAYOUT, n, "q"), 32, scales[0], scales[1], out)


def _q6_k(ws: Workspace, b: torch.Tensor, scales: Sequence[torch.Tensor], out: torch.Tensor, cap: int) -> None:
    # element 128h + 32k + l is nibble k // 2 of ql[64h + 32(k % 2) + l] plus bits 2k of qh[32h + l] as bits 4-5:
    # the high bits go straight to bits 4-5 (shifts left by 4, 2, 0, right by 2, then one mask), the nibble
    # planes are OR-ed into the high planes through a strided view, and one gather puts them in element order
    n = b.shape[0]
    low = _planes(ws, b[:, :128], (0, 4), 0x0F, "planes", cap)  # [k // 2, cap, 64h + 32(k % 2) + l]
    qh = _field(ws, b, 128, 192, "qh").unsqueeze(0)
    high = ws.get("hplanes", (4, cap, 64))  # [k, cap, 32h + l]
    filled = ws.memo(("q6high", n, cap), lambda: high[:, :n])
    torch.bitwise_left_shift(qh, _shifts(ws, (4, 2, 0), 3), out=filled[:3])
    torch.bitwise_right_shift(qh, ws.scalar(2), out=filled[3:])
    filled.bitwise_and_(ws.scalar(0x30))
    ws.memo(("q6view", n, cap), lambda: filled.view(2, 2, n, 2, 32)).bitwise_or_(
        ws.memo(("q6low", n, cap), lambda: low[:, :n].view(2, n, 2, 2, 32).permute(0, 3, 1, 2, 4)))
    q = _gather(ws, high, _Q6_HIGH_LAYOUT, n, "q").sub_(ws.scalar(32)).view(torch.int8)
    _scale(q, 16, scales[0], None, out)


def _iq4_values(ws: Workspace, nibbles: torch.Tensor) -> torch.Tensor:
    """IQ4 codebook values (fp32) of ``nibbles`` (uint8 0..15)."""
    idx = ws.get("idx", tuple(nibbles.shape), torch.int64).copy_(nibbles)
    values = ws.get("values", tuple(nibbles.shape), torch.float32)
    table = ws.const("iq4nl", lambda: torch.tensor(IQ4_NL_VALUES, dtype=torch.float32))
    return torch.index_select(table, 0, idx.view(-1), out=values.view(-1)).view(nibbles.shape)


def _iq4_nl(ws: Workspace, b: torch.Tensor, scales: Sequence[torch.Tensor], out: torch.Tensor, cap: int) -> None:
    _scaled_halves(_iq4_values(ws, _nibble_planes(ws, b, "q")), 2, scales[0], out)


def _iq4_xs(ws: Workspace, b: torch.Tensor, scales: Sequence[torch.Tensor], out: torch.Tensor, cap: int) -> None:
    n = b.shape[0]
    q = _gather(ws, _planes(ws, b[:, 8:136], (0, 4), 0x0F, "planes", cap), _IQ4_XS_LAYOUT, n, "q")
    rows = out.view(-1, 32)
    torch.mul(_iq4_values(ws, q).view(-1, 32), scales[0].reshape(-1, 1), out=rows)


class _Kernel(NamedTuple):
    header: Callable[[Workspace, torch.Tensor], tuple[torch.Tensor, ...]]
    body: Callable[[Workspace, torch.Tensor, Sequence[torch.Tensor], torch.Tensor, int], None]


_KERNELS: dict[GGMLType, _Kernel] = {
    GGMLType.Q8_0: _Kernel(_h_d, _q8_0), GGMLType.Q4_0: _Kernel(_h_d, _q4_0), GGMLType.Q4_1: _Kernel(_h_dm, _q4_1),
    GGMLType.Q5_0: _Kernel(_h_d, _q5_0), GGMLType.Q5_1: _Kernel(_h_dm, _q5_1),
    GGMLType.Q2_K: _Kernel(_h_q2_k, _q2_k), GGMLType.Q3_K: _Kernel(_h_q3_k, _q3_k),
    GGMLType.Q4_K: _Kernel(_h_k_scale_min, _q4_k), GGMLType.Q5_K: _Kernel(_h_k_scale_min, _q5_k),
    GGMLType.Q6_K: _Kernel(_h_q6_k, _q6_k), GGMLType.IQ4_NL: _Kernel(_h_d, _iq4_nl),
    GGMLType.IQ4_XS: _Kernel(_h_iq4_xs, _iq4_xs),
}
_FLOAT_TYPES = {GGMLType.F32: torch.float32, GGMLType.F16: torch.float16, GGMLType.BF16: torch.bfloat16}
TORCH_TYPES = frozenset(_KERNELS) | frozenset(_FLOAT_TYPES)
CPU_KERNEL_TYPES = frozenset(_KERNELS)  # block types with eager CPU kernels (what :func:`dequantize_group` takes)


# -- the fused path: one functional expression per type, for torch.compile ----------------------------------------

def _fbits(x: torch.Tensor, shifts: Sequence[int], mask: int) -> torch.Tensor:
    """``(x >> s) & mask`` for each shift, as a new dimension before the last one."""
    s = torch.tensor(shifts, dtype=x.dtype, device=x.device).view(-1, 1)
    return (x.unsqueeze(-2) >> s) & mask


def _ff16(b: torch.Tensor, start: int) -> torch.Tensor:
    return b[:, start:start + 2].contiguous().view(torch.float16).float()


def _fnibbles(qs: torch.Tensor) -> torch.Tensor:
    """``qs [n, 16]`` -> ``[n, 32]``: low nibbles, then high nibbles (the legacy 32-element layout)."""
    return _fbits(qs, (0, 4), 0x0F).reshape(qs.shape[0], 32)


def _f5bits(b: torch.Tensor, at: int) -> torch.Tensor:
    """Bit i of the 32-bit ``qh`` at byte ``at`` -> element i, as 0 / 16."""
    return _fbits(b[:, at:at + 4], range(8), 1).transpose(1, 2).reshape(b.shape[0], 32) << 4


def _fused_q8_0(b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (b[:, 2:].view(torch.int8).float() * _ff16(b, 0)).to(dtype)


def _fused_q4_0(b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return ((_fnibbles(b[:, 2:]).float() - 8) * _ff16(b, 0)).to(dtype)


def _fused_q4_1(b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (_fnibbles(b[:, 4:]).float() * _ff16(b, 0) + _ff16(b, 2)).to(dtype)


def _fused_q5_0(b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (((_fnibbles(b[:, 6:]) | _f5bits(b, 2)).float() - 16) * _ff16(b, 0)).to(dtype)


def _fused_q5_1(b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return ((_fnibbles(b[:, 8:]) | _f5bits(b, 4)).float() * _ff16(b, 0) + _ff16(b, 2)).to(dtype)


def _fused_q2_k(b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    n = b.shape[0]
    sc = b[:, :16]
    dl = (_ff16(b, 80) * (sc & 0x0F).float()).view(n, 16, 1)
    ml = (_ff16(b, 82) * (sc >> 4).float()).view(n, 16, 1)
    q = _fbits(b[:, 16:80].reshape(n, 2, 32), (0, 2, 4, 6), 3)  # [n, a, j, l]
    return (q.reshape(n, 16, 16).float() * dl - ml).reshape(n, 256).to(dtype)


def _fused_q3_k(b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    n = b.shape[0]
    sc = b[:, 96:108]
    low = torch.cat([sc[:, :8] & 0x0F, sc[:, :8] >> 4], 1)
    high = _fbits(sc[:, 8:12], (0, 2, 4, 6), 3).reshape(n, 16)
    dl = (_ff16(b, 108) * ((low | (high << 4)).float() - 32)).view(n, 16, 1)
    q = _fbits(b[:, 32:96].reshape(n, 2, 32), (0, 2, 4, 6), 3)  # [n, a, j, l]
    hbit = _fbits(b[:, :32], range(8), 1).reshape(n, 2, 4, 32)  # bit 4a + j of hmask[l]
    return (((q | (hbit << 2)).float() - 4).reshape(n, 16, 16) * dl).reshape(n, 256).to(dtype)


def _fk_values(b: torch.Tensor, q: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Q4_K / Q5_K: ``d * scale * q - dmin * min`` for ``q [n, 8, 32]``."""
    sc, m, md = b[:, 4:8], b[:, 8:12], b[:, 12:16]
    scales = torch.cat([sc & 0x3F, (md & 0x0F) | ((sc >> 2) & 0x30)], 1).float()
    mins = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], 1).float()
    dl, ml = (_ff16(b, 0) * scales).unsqueeze(2), (_ff16(b, 2) * mins).unsqueeze(2)
    return (q.float() * dl - ml).reshape(b.shape[0], 256).to(dtype)


def _fused_q4_k(b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    n = b.shape[0]
    return _fk_values(b, _fbits(b[:, 16:].reshape(n, 4, 32), (0, 4), 0x0F).reshape(n, 8, 32), dtype)


def _fused_q5_k(b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    n = b.shape[0]
    low = _fbits(b[:, 48:].reshape(n, 4, 32), (0, 4), 0x0F).reshape(n, 8, 32)
    return _fk_values(b, low | (_fbits(b[:, 16:48], range(8), 1) << 4), dtype)


def _fused_q6_k(b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    n = b.shape[0]
    dl = (_ff16(b, 208) * b[:, 192:208].view(torch.int8).float()).view(n, 16, 1)
    low = _fbits(b[:, :128].reshape(n, 2, 2, 32), (0, 4), 0x0F)  # [n, h, k % 2, k // 2, l]
    low = low.transpose(2, 3).reshape(n, 2, 4, 32)
    high = _fbits(b[:, 128:192].reshape(n, 2, 32), (0, 2, 4, 6), 3)  # [n, h, k, l]
    q = (low | (high << 4)).view(torch.int8) - 32
    return (q.reshape(n, 16, 16).float() * dl).reshape(n, 256).to(dtype)


def _fiq4(nibbles: torch.Tensor) -> torch.Tensor:
    table = torch.tensor(IQ4_NL_VALUES, dtype=torch.float32, device=nibbles.device)
    return table[nibbles.long()]


def _fused_iq4_nl(b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (_fiq4(_fnibbles(b[:, 2:])) * _ff16(b, 0)).to(dtype)


def _fused_iq4_xs(b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    n = b.shape[0]
    low = _fbits(b[:, 4:8], (0, 4), 0x0F).transpose(1, 2).reshape(n, 8)
    sh = b[:, 2:4].contiguous().view(torch.int16).int() & 0xFFFF
    high = _fbits(sh, range(0, 16, 2), 3).reshape(n, 8)
    dl = (_ff16(b, 0) * ((low.int() | (high << 4)) - 32).float()).view(n, 8, 1)
    q = _fbits(b[:, 8:].reshape(n, 8, 16), (0, 4), 0x0F).reshape(n, 8, 32)
    return (_fiq4(q) * dl).reshape(n, 256).to(dtype)


# Each compiles separately (its own code object, so its own compile cache); the cast is inside, so it fuses.
_FUSED: dict[GGMLType, Callable[[torch.Tensor, torch.dtype], torch.Tensor]] = {
    GGMLType.Q8_0: _fused_q8_0, GGMLType.Q4_0: _fused_q4_0, GGMLType.Q4_1: _fused_q4_1,
    GGMLType.Q5_0: _fused_q5_0, GGMLType.Q5_1: _fused_q5_1, GGMLType.Q2_K: _fused_q2_k,
    GGMLType.Q3_K: _fused_q3_k, GGMLType.Q4_K: _fused_q4_k, GGMLType.Q5_K: _fused_q5_k,
    GGMLType.Q6_K: _fused_q6_k, GGMLType.IQ4_NL: _fused_iq4_nl, GGMLType.IQ4_XS: _fused_iq4_xs,
}
FUSED_TYPES = frozenset(_FUSED)


class FusedDequant:
    """Compiled dequantization: ``torch.compile`` of the functional kernels above (one kernel per type and output
    dtype, dynamic in the number of blocks), behind a guard: the first failure - no compiler, no Triton, an
    unsupported torch - is logged once and turns this instance off, and the eager kernels take over.  The quantized
    layers use it for CUDA tensors; the CPU backend of ``torch.compile`` works too (the tests use it).
    """

    def __init__(self, **compile_options):
        self.enabled = hasattr(torch, "compile")
        self._options = {"dynamic": True, **compile_options}
        self._compiled: dict[GGMLType, Callable[[torch.Tensor, torch.dtype], torch.Tensor]] = {}

    def __call__(self, blocks: torch.Tensor, qtype: GGMLType, dtype: torch.dtype) -> torch.Tensor | None:
        """``[n, block]`` values in ``dtype``, or None where this path does not apply or has failed."""
        if not self.enabled or qtype not in _FUSED:
            return None
        try:
            fn = self._compiled.get(qtype)
            if fn is None:
                logger.info("GGUF: compiling the fused %s dequantization (once per process)", qtype.name)
                fn = self._compiled[qtype] = torch.compile(_FUSED[qtype], **self._options)
            return fn(blocks, dtype)
        except Exception as error:  # any compiler failure: the eager kernels are always correct
            self.enabled = False
            logger.warning("GGUF: compiled dequantization unavailable (%s: %s); using the eager kernels",
                           type(error).__name__, error)
            return None


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


@functools.cache
def _openmp() -> tuple[Callable[[], int], Callable[[int], None]] | None:
    """``omp_get_max_threads`` / ``omp_set_num_threads`` of the OpenMP runtime torch's CPU ops run on (found through
    torch's own library), or None where torch does not use OpenMP or the symbols cannot be reached."""
    if "OpenMP" not in torch.__config__.parallel_info():
        return None
    try:
        library = ctypes.CDLL(torch._C.__file__)
        get, set_ = library.omp_get_max_threads, library.omp_set_num_threads
    except (OSError, AttributeError):
        return None
    get.restype, set_.argtypes = ctypes.c_int, [ctypes.c_int]
    return get, set_


class _Serial:
    """``with _Serial():`` the calling thread's torch CPU ops run on this thread alone (its own OpenMP setting: other
    threads keep theirs).  Dequantizing is dozens of short ops per weight; spread over a thread team, each op ends at
    a barrier that waits whenever one of the team's threads is preempted, so on a busy machine every op costs a
    scheduler time slice (a step 10x slower, measured).  One thread per op never waits for another."""

    def __enter__(self) -> None:
        omp = _openmp()
        self._previous = None if omp is None else omp[0]()
        if omp is not None:
            omp[1](1)

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            _openmp()[1](self._previous)


def _cpu(ws: Workspace, blocks: torch.Tensor, qtype: GGMLType, out: torch.Tensor) -> None:
    """The CPU kernels: scales per span of chunks, then each chunk into fp32 (in ``out`` when it is fp32, else in a
    workspace buffer cast into ``out`` while in cache).  A tensor of one chunk is not sliced at all: for the
    small weights of small models the per-op costs are most of the time; longer ones are cut with one ``split``
    per tensor (a Python slice per chunk and tensor costs as much as a small op)."""
    kernel = _KERNELS[qtype]
    n, block = out.shape
    chunk = max(1, _CPU_CHUNK_ELEMENTS // block)
    span = chunk * _HEADER_CHUNKS
    fp32 = out.dtype == torch.float32
    spans = zip((blocks,), (out,)) if n <= span else zip(blocks.split(span), out.split(span))
    for part, part_out in spans:
        header = kernel.header(ws, part)
        rows = part.shape[0]
        if rows <= chunk:
            pieces = ((part, header, part_out),)
        else:
            pieces = zip(part.split(chunk), zip(*(h.split(chunk) for h in header)), part_out.split(chunk))
        for piece, scales, target in pieces:
            values = target if fp32 else ws.get("fp32", tuple(target.shape), torch.float32)
            kernel.body(ws, piece, scales, values, chunk)
            if values is not target:
                target.copy_(values)


def _functional(blocks: torch.Tensor, qtype: GGMLType, out: torch.Tensor) -> None:
    """The fused formulation as eager ops (devices without compiled kernels), a chunk at a time: bounded memory."""
    chunk = max(1, _DEVICE_CHUNK_ELEMENTS // out.shape[1])
    for start in range(0, blocks.shape[0], chunk):
        out[start:start + chunk] = _FUSED[qtype](blocks[start:start + chunk], out.dtype)


def dequantize_group(raws: Sequence[torch.Tensor], qtype: GGMLType, out: torch.Tensor,
                     workspace: Workspace) -> torch.Tensor:
    """Dequantize several CPU tensors of one type (:data:`CPU_KERNEL_TYPES`) with ONE kernel call, back to back into
    ``out`` (contiguous, flat, exactly their elements, any float dtype): their bytes are first copied one after
    the other into a workspace buffer (one ``torch.cat``: the packed bytes are small).  For many small weights, whose
    time goes to the per-op costs of the eager kernels rather than to their arithmetic, this replaces one kernel
    call - a few dozen ops - per weight by one per group.  Nothing is checked: the caller passes whole blocks."""
    block, type_size = QUANT_BLOCKS[qtype]
    flat = [raw.reshape(-1) for raw in raws]
    n = sum(f.numel() for f in flat) // type_size
    if len(flat) == 1:
        blocks = flat[0].view(n, type_size)
    else:
        blocks = workspace.get("group", (n * type_size,))
        torch.cat(flat, out=blocks)
        blocks = blocks.view(n, type_size)
    with _Serial():
        _cpu(workspace, blocks, qtype, out.view(n, block))
    return out


def dequantize(raw: torch.Tensor, qtype: GGMLType | int, shape: Sequence[int],
               dtype: torch.dtype = torch.float32, out: torch.Tensor | None = None,
               workspace: Workspace | None = None, fused: FusedDequant | None = None) -> torch.Tensor:
    """Dequantize the stored bytes ``raw`` (uint8, any shape) of a ``qtype`` tensor to ``shape`` in ``dtype``.

    Returns new memory on ``raw``'s device (never a view of ``raw``), or writes into ``out`` (contiguous, ``dtype``,
    as many elements as ``shape``) and returns it reshaped: reusing a buffer avoids the page faults of fresh
    memory, which cost more than the arithmetic on CPU.  ``workspace``: the calling thread's CPU scratch (kept
    between calls: no allocation per call; by default a fresh one).  ``fused``: compiled kernels to try first (any
    device).  :data:`GGUF_PY_TYPES` are decoded by gguf-py on the CPU whatever the device.  Raises
    :class:`GGUFError` for a type outside :data:`DEQUANTIZABLE_TYPES` or a byte count that does not match the shape.
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
    if fused is not None:
        values = fused(blocks, qtype, dtype)
        if values is not None:
            return values.reshape(shape) if out is None else out.view(shape).copy_(values.view(shape))
    result = torch.empty(blocks.shape[0], block, dtype=dtype, device=raw.device) if out is None else \
        out.view(-1, block)
    if qtype in GGUF_PY_TYPES:
        with _Serial():
            _gguf_py(blocks, qtype, result)
    elif raw.device.type == "cpu":
        with _Serial():
            _cpu(workspace if workspace is not None else Workspace(), blocks, qtype, result)
    else:
        _functional(blocks, qtype, result)
    return result.reshape(shape)
