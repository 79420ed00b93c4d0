"""A strict, lazy GGUF reader over a memory map.

Only the header (metadata and tensor table) is parsed when a file is opened; tensor data stays in the memory
map and is handed out as zero-copy ``torch.uint8`` views on access, so opening a 13 GB file costs a few
milliseconds and a few megabytes.  Every count, length and offset read from the file is checked against the
bytes that remain *before* anything is allocated or looped over, so a hostile or truncated file fails fast with
:class:`GGUFError` (a :class:`ValueError`) naming the file, the key or tensor, and the problem; a file of full size
whose end was never downloaded (zero bytes) is refused too (:mod:`models.io.integrity`).

Layout (little-endian, versions 2 and 3)::

    "GGUF" u32 version, u64 n_tensors, u64 n_kv
    n_kv x (string key, u32 value_type, value)
    n_tensors x (string name, u32 n_dims, u64 ne[n_dims], u32 ggml_type, u64 offset)
    padding to general.alignment (default 32), then the data section; tensor offsets are relative to it.

``ne`` is ggml order (fastest-varying dimension first); :class:`GGUFTensorInfo` shapes are in torch order.
Type ids, block sizes and value types are the ``gguf`` package's (gguf-py) tables; a type id it does not know is
refused here.
"""

from __future__ import annotations

import mmap
import os
import struct
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import torch
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from ..errors import WeightFileError
from ..integrity import refuse_zero_filled_tail

__all__ = ["GGUFError", "GGMLType", "GGUFValueType", "GGUFTensorInfo", "GGUFReader", "StringArray",
           "QUANT_BLOCKS", "DEFAULT_ALIGNMENT", "quantized_nbytes"]


class GGUFError(WeightFileError):
    """A GGUF file that is malformed, truncated, or not usable for what it was given to (a ValueError)."""


# Type ids, block sizes and value types are gguf-py's tables, so a type that gguf knows is one this reader knows.
GGMLType = GGMLQuantizationType
# type -> (elements per block, bytes per block); read-only so no caller can change gguf-py's own table.
QUANT_BLOCKS: Mapping[GGMLType, tuple[int, int]] = MappingProxyType(GGML_QUANT_SIZES)


# struct / numpy format characters of the scalar value types (little-endian)
_SCALARS: dict[GGUFValueType, str] = {
    GGUFValueType.UINT8: "B", GGUFValueType.INT8: "b", GGUFValueType.UINT16: "H", GGUFValueType.INT16: "h",
    GGUFValueType.UINT32: "I", GGUFValueType.INT32: "i", GGUFValueType.FLOAT32: "f", GGUFValueType.BOOL: "B",
    GGUFValueType.UINT64: "Q", GGUFValueType.INT64: "q", GGUFValueType.FLOAT64: "d",
}
_STRUCTS = {vt: struct.Struct("<" + ch) for vt, ch in _SCALARS.items()}
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")

DEFAULT_ALIGNMENT = 32
_MAX_ALIGNMENT = 1 << 30
_MAX_ARRAY_DEPTH = 4
_EAGER_ARRAY_LEN = 1024  # longer arrays stay lazy (numpy views / StringArray)
_MAX_ELEMENTS = 1 << 48
# Smallest encoding of one item, used to bound counts before looping: key/name length + type + value ...
_MIN_KV_BYTES = 8 + 4 + 1
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 8 + 4 + 8
_MIN_ARRAY_ITEM = {GGUFValueType.STRING: 8, GGUFValueType.ARRAY: 4 + 8}


def quantized_nbytes(qtype: GGMLType, shape: Sequence[int]) -> int:
    """Bytes of a tensor of ``qtype`` with torch-order ``shape`` (the last dimension must fill whole blocks)."""
    block, size = QUANT_BLOCKS[qtype]
    numel = 1
    for d in shape:
        numel *= int(d)
    return numel // block * size


@dataclass(frozen=True)
class GGUFTensorInfo:
    """Where one tensor lives: ``shape`` is the torch-order logical shape, ``offset`` absolute in the file."""

    name: str
    qtype: GGMLType
    shape: tuple[int, ...]
    offset: int
    nbytes: int

    @property
    def row_bytes(self) -> int:
        block, size = QUANT_BLOCKS[self.qtype]
        return self.shape[-1] // block * size

    @property
    def is_quantized(self) -> bool:
        return QUANT_BLOCKS[self.qtype][0] > 1


class StringArray(Sequence):
    """A GGUF string array decoded on first access (tokenizer vocabularies hold 150k+ strings)."""

    def __init__(self, buf: memoryview, start: int, count: int, end: int, where: str):
        self._buf, self._start, self._count, self._end, self._where = buf, start, count, end, where
        self._items: list[str] | None = None

    def _decode(self) -> list[str]:
        if self._items is None:
            raw = bytes(self._buf[self._start:self._end])
            items, pos, unpack = [], 0, _U64.unpack_from
            try:
                for _ in range(self._count):
                    (n,) = unpack(raw, pos)
                    items.append(raw[pos + 8:pos + 8 + n].decode("utf-8"))
                    pos += 8 + n
            except UnicodeDecodeError as e:
                raise GGUFError(f"{self._where}: string {len(items)} is not valid UTF-8 ({e.reason}).") from None
            self._items = items
        return self._items

    def __len__(self) -> int:
        return self._count

    def __getitem__(self, index):
        return self._decode()[index]

    def __iter__(self) -> Iterator[str]:
        return iter(self._decode())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sequence) and list(self) == list(other)

    def __repr__(self) -> str:
        return f"StringArray(len={self._count})"


class _Cursor:
    """Bounds-checked sequential reads over the header; every failure is a GGUFError naming ``where``."""

    def __init__(self, buf: memoryview, size: int, fail):
        self.buf, self.size, self.pos, self.fail = buf, size, 0, fail

    def need(self, n: int, where: str, what: str) -> None:
        if n < 0 or n > self.size - self.pos:
            self.fail(where, f"{what} needs {n} bytes at offset {self.pos} but only {self.size - self.pos} "
                             f"remain (truncated or corrupt file)")

    def u32(self, where: str, what: str) -> int:
        self.need(4, where, what)
        (v,) = _U32.unpack_from(self.buf, self.pos)
        self.pos += 4
        return v

    def u64(self, where: str, what: str) -> int:
        self.need(8, where, what)
        (v,) = _U64.unpack_from(self.buf, self.pos)
        self.pos += 8
        return v

    def string(self, where: str, what: str) -> str:
        n = self.u64(where, f"{what} length")
        self.need(n, where, f"{what} ({n} bytes)")
        raw = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            self.fail(where, f"{what} is not valid UTF-8 ({e.reason})")


class GGUFReader:
    """Parse a GGUF file's header; tensors stay in a read-only memory map until asked for.

    Attributes: ``path``, ``version``, ``metadata`` (key -> value; arrays longer than 1024 items are read-only
    numpy views or a lazily decoded :class:`StringArray`), ``tensors`` (name -> :class:`GGUFTensorInfo`, in file
    order), ``alignment``, ``data_offset``.  :meth:`raw` returns a tensor's bytes as a zero-copy uint8 view.
    The views are read-only memory: never write into them (dequantize or copy first).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
        except OSError as e:
            raise GGUFError(f"{self.path}: cannot open GGUF file ({e.strerror or e}).") from None
        if size < 24:
            raise GGUFError(f"{self.path}: not a GGUF file (only {size} bytes; a GGUF header needs at least 24).")
        with open(self.path, "rb") as f:
            self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self._buf = memoryview(self._mmap)
        self.file_size = size
        self.metadata: dict[str, Any] = {}
        self.tensors: dict[str, GGUFTensorInfo] = {}
        self._parse()

    # -- errors ------------------------------------------------------------------------------------------------
    def _fail(self, where: str, problem: str):
        prefix = f"{self.path}: {where}: " if where else f"{self.path}: "
        raise GGUFError(prefix + problem + ".")

    # -- header ------------------------------------------------------------------------------------------------
    def _parse(self) -> None:
        cur = _Cursor(self._buf, self.file_size, self._fail)
        magic = bytes(self._buf[0:4])
        if magic != b"GGUF":
            self._fail("", f"not a GGUF file (magic {magic!r}, expected b'GGUF')")
        cur.pos = 4
        version = cur.u32("header", "version")
        if version not in (2, 3):
            swapped = int.from_bytes(version.to_bytes(4, "little"), "big")
            if swapped in (1, 2, 3):
                self._fail("header", "big-endian GGUF files are not supported; convert it to little-endian")
            if version == 1:
                self._fail("header", "GGUF version 1 is obsolete and not supported (expected version 2 or 3)")
            self._fail("header", f"unsupported GGUF version {version} (expected 2 or 3)")
        self.version = version
        n_tensors = cur.u64("header", "tensor count")
        n_kv = cur.u64("header", "metadata count")
        remaining = self.file_size - cur.pos
        if n_kv > remaining // _MIN_KV_BYTES:
            self._fail("header", f"declares {n_kv} metadata entries but only {remaining} bytes follow")
        if n_tensors > (remaining - n_kv * _MIN_KV_BYTES) // _MIN_TENSOR_INFO_BYTES:
            self._fail("header", f"declares {n_tensors} tensors but only {remaining} bytes follow")

        for i in range(n_kv):
            key = cur.string(f"metadata entry {i}", "key")
            where = f"metadata key '{key}'"
            if not key:
                self._fail(f"metadata entry {i}", "has an empty key")
            if key in self.metadata:
                self._fail(where, "appears more than once")
            vtype = cur.u32(where, "value type")
            self.metadata[key] = self._read_value(cur, vtype, where, depth=0)

        self.alignment = self._alignment()
        self._names: set[str] = set()
        infos = [self._read_tensor_info(cur, i) for i in range(n_tensors)]
        self.data_offset = -(-cur.pos // self.alignment) * self.alignment
        self._place_tensors(infos)

    def _read_value(self, cur: _Cursor, vtype: int, where: str, depth: int) -> Any:
        if vtype in _STRUCTS:
            st = _STRUCTS[GGUFValueType(vtype)]
            cur.need(st.size, where, "value")
            (v,) = st.unpack_from(self._buf, cur.pos)
            cur.pos += st.size
            if vtype == GGUFValueType.BOOL:
                if v > 1:
                    self._fail(where, f"boolean value {v} is neither 0 nor 1")
                return bool(v)
            return v
        if vtype == GGUFValueType.STRING:
            return cur.string(where, "string value")
        if vtype == GGUFValueType.ARRAY:
            return self._read_array(cur, where, depth)
        self._fail(where, f"unknown value type {vtype}")

    def _read_array(self, cur: _Cursor, where: str, depth: int) -> Any:
        if depth >= _MAX_ARRAY_DEPTH:
            self._fail(where, f"arrays nested more than {_MAX_ARRAY_DEPTH} deep")
        etype = cur.u32(where, "array element type")
        count = cur.u64(where, "array length")
        if etype in _SCALARS:
            item = _STRUCTS[GGUFValueType(etype)].size
        elif etype in _MIN_ARRAY_ITEM:
            item = _MIN_ARRAY_ITEM[GGUFValueType(etype)]
        else:
            self._fail(where, f"unknown array element type {etype}")
        remaining = self.file_size - cur.pos
        if count > remaining // item:
            self._fail(where, f"array declares {count} elements of at least {item} bytes but only {remaining} "
                              f"bytes remain")
        if count == 0:
            return []
        if etype in _SCALARS:
            arr = np.frombuffer(self._buf, dtype="<" + _SCALARS[GGUFValueType(etype)], count=count, offset=cur.pos)
            cur.pos += count * item
            if etype == GGUFValueType.BOOL:
                if count and int(arr.max()) > 1:
                    self._fail(where, "boolean array holds values other than 0 and 1")
                arr = arr.view(np.bool_)
            return arr.tolist() if count <= _EAGER_ARRAY_LEN else arr
        if etype == GGUFValueType.STRING:
            start = cur.pos
            self._skip_strings(cur, count, where)
            strings = StringArray(self._buf, start, count, cur.pos, f"{self.path}: {where}")
            return list(strings) if count <= _EAGER_ARRAY_LEN else strings
        return [self._read_array(cur, where, depth + 1) for _ in range(count)]

    def _skip_strings(self, cur: _Cursor, count: int, where: str) -> None:
        # One pass over the length prefixes (the count was already bounded by the bytes left / 8).
        buf, pos, end, unpack = self._buf, cur.pos, self.file_size, _U64.unpack_from
        for i in range(count):
            if pos + 8 > end:
                cur.pos = pos
                self._fail(where, f"string {i} of {count}: length runs past the end of the file")
            (n,) = unpack(buf, pos)
            pos += 8 + n
            if pos > end:
                self._fail(where, f"string {i} of {count} declares {n} bytes, past the end of the file")
        cur.pos = pos

    def _alignment(self) -> int:
        if "general.alignment" not in self.metadata:
            return DEFAULT_ALIGNMENT
        value = self.metadata["general.alignment"]
        if type(value) is not int or value <= 0 or value > _MAX_ALIGNMENT or value & (value - 1):
            self._fail("metadata key 'general.alignment'", f"{value!r} is not a power of two up to 2**30")
        return value

    def _read_tensor_info(self, cur: _Cursor, index: int) -> tuple[str, GGMLType, tuple[int, ...], int, int]:
        name = cur.string(f"tensor info {index}", "name")
        where = f"tensor '{name}'"
        if not name:
            self._fail(f"tensor info {index}", "has an empty name")
        if name in self._names:
            self._fail(where, "appears more than once")
        self._names.add(name)
        n_dims = cur.u32(where, "dimension count")
        if not 1 <= n_dims <= 4:
            self._fail(where, f"has {n_dims} dimensions (GGUF allows 1 to 4)")
        ne = [cur.u64(where, "dimension") for _ in range(n_dims)]
        numel = 1
        for d in ne:
            if d == 0 or d >= 1 << 63:
                self._fail(where, f"has an invalid dimension {d} in {ne}")
            numel *= d
            if numel > _MAX_ELEMENTS:
                self._fail(where, f"has an implausible shape {ne} ({numel}+ elements)")
        raw_type = cur.u32(where, "type")
        if raw_type not in QUANT_BLOCKS:  # the keys are IntEnums, which hash and compare like their ids
            self._fail(where, f"has unknown ggml type {raw_type}")
        qtype = GGMLType(raw_type)
        block, type_size = QUANT_BLOCKS[qtype]
        if ne[0] % block:
            self._fail(where, f"row length {ne[0]} is not a multiple of the {qtype.name} block size {block}")
        offset = cur.u64(where, "data offset")
        if offset % self.alignment:
            self._fail(where, f"data offset {offset} is not aligned to {self.alignment} bytes")
        return name, qtype, tuple(reversed(ne)), offset, numel // block * type_size

    def _place_tensors(self, infos: list[tuple[str, GGMLType, tuple[int, ...], int, int]]) -> None:
        data_size = self.file_size - self.data_offset
        if infos and data_size < 0:
            self._fail("data section", f"starts at byte {self.data_offset}, past the end of the "
                                       f"{self.file_size}-byte file (truncated)")
        for name, qtype, shape, offset, nbytes in infos:
            if offset + nbytes > data_size:
                self._fail(f"tensor '{name}'", f"data [{offset}, {offset + nbytes}) lies outside the "
                                              f"{data_size}-byte data section (truncated or corrupt file)")
            self.tensors[name] = GGUFTensorInfo(name, qtype, shape, self.data_offset + offset, nbytes)
        previous = None
        for info in sorted(self.tensors.values(), key=lambda t: t.offset):
            if previous is not None and info.offset < previous.offset + previous.nbytes:
                self._fail(f"tensor '{info.name}'", f"overlaps tensor '{previous.name}'")
            previous = info
        refuse_zero_filled_tail(self.path, self.file_size,
                                ((t.name, t.offset, t.offset + t.nbytes) for t in self.tensors.values()), GGUFError)

    # -- access ------------------------------------------------------------------------------------------------
    @property
    def arch(self) -> str | None:
        """``general.architecture`` (e.g. ``qwen_image``, ``qwen2vl``, ``clip``), or None."""
        arch = self.metadata.get("general.architecture")
        return arch if isinstance(arch, str) else None

    def raw(self, name: str) -> torch.Tensor:
        """The tensor's stored bytes as a read-only, zero-copy ``uint8`` view ``[*shape[:-1], row_bytes]``."""
        info = self.tensors[name]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns that the buffer is not writable; we never write
            data = torch.frombuffer(self._mmap, dtype=torch.uint8, count=info.nbytes, offset=info.offset)
        return data.view(*info.shape[:-1], info.row_bytes)

    def __repr__(self) -> str:
        return f"GGUFReader({str(self.path)!r}, arch={self.arch!r}, tensors={len(self.tensors)})"
