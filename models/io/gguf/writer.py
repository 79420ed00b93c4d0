"""Writing GGUF v3 files: typed metadata, aligned tensor data, atomic replace.

Tensor data may be given as bytes / a uint8 tensor / a numpy array, or as a zero-argument callable that returns
one of those when the file is written, so very large files can be streamed to disk one tensor at a time.
The file is written to a temporary name next to the target and moved into place with :func:`os.replace`, so a
crash never leaves a half-written file under the final name.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch

from .reader import DEFAULT_ALIGNMENT, QUANT_BLOCKS, GGMLType, GGUFError, GGUFValueType, quantized_nbytes

__all__ = ["GGUFWriter", "TensorData"]

TensorData = Union[bytes, bytearray, np.ndarray, torch.Tensor, Callable[[], Any]]

_STRUCT_OF = {
    GGUFValueType.UINT8: "B", GGUFValueType.INT8: "b", GGUFValueType.UINT16: "H", GGUFValueType.INT16: "h",
    GGUFValueType.UINT32: "I", GGUFValueType.INT32: "i", GGUFValueType.FLOAT32: "f", GGUFValueType.BOOL: "?",
    GGUFValueType.UINT64: "Q", GGUFValueType.INT64: "q", GGUFValueType.FLOAT64: "d",
}
_NUMPY_TYPES = {
    np.dtype(np.uint8): GGUFValueType.UINT8, np.dtype(np.int8): GGUFValueType.INT8,
    np.dtype(np.uint16): GGUFValueType.UINT16, np.dtype(np.int16): GGUFValueType.INT16,
    np.dtype(np.uint32): GGUFValueType.UINT32, np.dtype(np.int32): GGUFValueType.INT32,
    np.dtype(np.float32): GGUFValueType.FLOAT32, np.dtype(np.bool_): GGUFValueType.BOOL,
    np.dtype(np.uint64): GGUFValueType.UINT64, np.dtype(np.int64): GGUFValueType.INT64,
    np.dtype(np.float64): GGUFValueType.FLOAT64,
}


def _string(text: str) -> bytes:
    raw = text.encode("utf-8")
    return struct.pack("<Q", len(raw)) + raw


def _infer_type(value: Any) -> GGUFValueType:
    if isinstance(value, (bool, np.bool_)):
        return GGUFValueType.BOOL
    if isinstance(value, (int, np.integer)):
        v = int(value)
        if 0 <= v < 1 << 32:
            return GGUFValueType.UINT32
        if -(1 << 31) <= v < 0:
            return GGUFValueType.INT32
        return GGUFValueType.UINT64 if v > 0 else GGUFValueType.INT64
    if isinstance(value, (float, np.floating)):
        return GGUFValueType.FLOAT32
    if isinstance(value, str):
        return GGUFValueType.STRING
    if isinstance(value, (list, tuple, np.ndarray)):
        return GGUFValueType.ARRAY
    raise GGUFError(f"cannot store a {type(value).__name__} in GGUF metadata.")


def _encode_value(value: Any, vtype: GGUFValueType, element_type: GGUFValueType | None) -> bytes:
    if vtype == GGUFValueType.STRING:
        return _string(value)
    if vtype != GGUFValueType.ARRAY:
        return struct.pack("<" + _STRUCT_OF[vtype], value)
    if isinstance(value, np.ndarray) and element_type is None:
        element_type = _NUMPY_TYPES.get(value.dtype)
    if element_type is None:
        element_type = _infer_type(value[0]) if len(value) else GGUFValueType.UINT32
        if element_type in (GGUFValueType.UINT32, GGUFValueType.INT32) and len(value):  # one type fits every one
            ints = [int(v) for v in value]
            element_type = GGUFValueType.INT32 if min(ints) < 0 else GGUFValueType.UINT32
            if max(ints) >= 1 << 31 and min(ints) < 0 or max(ints) >= 1 << 32:
                element_type = GGUFValueType.INT64 if min(ints) < 0 else GGUFValueType.UINT64
    head = struct.pack("<IQ", element_type, len(value))
    if element_type == GGUFValueType.STRING:
        return head + b"".join(_string(v) for v in value)
    if element_type == GGUFValueType.ARRAY:
        return head + b"".join(_encode_value(v, GGUFValueType.ARRAY, None) for v in value)
    return head + np.asarray(value).astype("<" + _STRUCT_OF[element_type].replace("?", "b1")).tobytes()


@dataclass
class _PendingTensor:
    name: str
    qtype: GGMLType
    shape: tuple[int, ...]
    data: TensorData
    nbytes: int


class GGUFWriter:
    """Collect metadata and tensors, then :meth:`write` a GGUF v3 file (atomically).

    ``add(key, value)`` infers the value type (bool, int -> UINT32/INT32/UINT64/INT64 by range, float -> FLOAT32,
    str, list/tuple/ndarray -> ARRAY); pass ``vtype`` / ``element_type`` to force one (e.g. FLOAT64, UINT64).
    ``add_tensor(name, data, qtype, shape)`` takes the *stored* bytes of a ``qtype`` tensor with torch-order
    ``shape`` (for F32/F16/BF16 a float tensor of that dtype is accepted as is).
    """

    def __init__(self, path: str | os.PathLike, arch: str | None = None, alignment: int = DEFAULT_ALIGNMENT):
        if alignment <= 0 or alignment & (alignment - 1):
            raise GGUFError(f"alignment {alignment} is not a power of two.")
        self.path = Path(path)
        self.alignment = alignment
        self._metadata: dict[str, bytes] = {}
        self._tensors: dict[str, _PendingTensor] = {}
        if arch is not None:
            self.add("general.architecture", arch)
        if alignment != DEFAULT_ALIGNMENT:
            self.add("general.alignment", alignment, GGUFValueType.UINT32)

    def add(self, key: str, value: Any, vtype: GGUFValueType | None = None,
            element_type: GGUFValueType | None = None) -> None:
        """Add one metadata entry (keys are unique)."""
        if key in self._metadata:
            raise GGUFError(f"metadata key '{key}' added twice.")
        vtype = GGUFValueType(vtype) if vtype is not None else _infer_type(value)
        self._metadata[key] = _string(key) + struct.pack("<I", vtype) + _encode_value(value, vtype, element_type)

    def add_tensor(self, name: str, data: TensorData, qtype: GGMLType | int, shape: Iterable[int]) -> None:
        """Add a tensor's stored bytes (or a callable producing them at write time)."""
        qtype, shape = GGMLType(qtype), tuple(int(d) for d in shape)
        if name in self._tensors:
            raise GGUFError(f"tensor '{name}' added twice.")
        if not 1 <= len(shape) <= 4 or min(shape) <= 0:
            raise GGUFError(f"tensor '{name}': shape {shape} is not storable in GGUF (1-4 positive dimensions).")
        if shape[-1] % QUANT_BLOCKS[qtype][0]:
            raise GGUFError(f"tensor '{name}': row length {shape[-1]} is not a multiple of the {qtype.name} "
                            f"block size {QUANT_BLOCKS[qtype][0]}.")
        self._tensors[name] = _PendingTensor(name, qtype, shape, data, quantized_nbytes(qtype, shape))

    def write(self) -> Path:
        """Write the file: temporary name, then :func:`os.replace` onto ``path``."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "wb") as f:
                self._write_to(f)
            os.replace(tmp, self.path)
        finally:
            if tmp.exists():
                tmp.unlink()
        return self.path

    def _write_to(self, f) -> None:
        header = [b"GGUF", struct.pack("<IQQ", 3, len(self._tensors), len(self._metadata))]
        header.extend(self._metadata.values())
        offset = 0
        for t in self._tensors.values():
            header.append(_string(t.name) + struct.pack("<I", len(t.shape)))
            header.append(b"".join(struct.pack("<Q", d) for d in reversed(t.shape)))
            header.append(struct.pack("<IQ", t.qtype, offset))
            offset += t.nbytes + (-t.nbytes % self.alignment)
        blob = b"".join(header)
        f.write(blob + b"\0" * (-len(blob) % self.alignment))
        for t in self._tensors.values():
            data = t.data() if callable(t.data) else t.data
            raw = _as_bytes(data)
            if len(raw) != t.nbytes:
                raise GGUFError(f"tensor '{t.name}': got {len(raw)} bytes, a {t.qtype.name} tensor of shape "
                                f"{list(t.shape)} needs {t.nbytes}.")
            f.write(raw)
            f.write(b"\0" * (-t.nbytes % self.alignment))


def _as_bytes(data: Any) -> memoryview | bytes:
    if isinstance(data, (bytes, bytearray)):
        return bytes(data)
    if isinstance(data, torch.Tensor):
        data = data.detach().cpu().contiguous()
        if data.dtype == torch.bfloat16:
            data = data.view(torch.int16)
        return memoryview(data.numpy()).cast("B")
    return memoryview(np.ascontiguousarray(data)).cast("B")
