"""Reading checkpoint files without a second full copy in memory.

* :class:`WeightFileError` is the one error type for "this file is not what the loader needs": its message says
  what was found, what was expected and what to do.
* :func:`open_checkpoint` gives a lazy, read-only mapping ``name -> tensor`` over a single ``.safetensors`` file
  or a diffusers/HF folder (sharded safetensors with an ``*.safetensors.index.json``).  Headers are validated up
  front (every field's type, sizes, overlaps; a truncated or zero-filled download is refused before any tensor is
  read, see :mod:`.integrity`), ``config.json`` is read by :mod:`.model_config`; tensors are read one at a time on
  access.
* :func:`assign_weights` moves tensors from such a mapping into a module built on the ``meta`` device, one tensor
  at a time, so peak memory stays near the size of the weights themselves.
* Quantized checkpoints: "scaled fp8" (per-layer ``scale_weight`` / ``scale_input``) and ComfyUI's mixed-precision
  layout (per-layer ``comfy_quant`` JSON marker, ``weight_scale``, optional ``input_scale``; read with
  :func:`quant_config`, written with :func:`quant_marker`).
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import torch
from torch import nn

from .errors import WeightFileError
from .integrity import refuse_zero_filled_tail
from .model_config import ModelConfig, read_config

__all__ = ["WeightFileError", "SafetensorsCheckpoint", "open_checkpoint", "assign_weights", "tensor_shape",
           "tensor_dtype", "FLOAT8_DTYPES", "QUANT_MARKER", "FLOAT8_FORMATS", "quant_config", "quant_marker"]

FLOAT8_DTYPES = tuple(
    getattr(torch, name) for name in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
    if hasattr(torch, name)
)

_SAFETENSORS_DTYPES = {
    "F64": (torch.float64, 8), "F32": (torch.float32, 4), "F16": (torch.float16, 2), "BF16": (torch.bfloat16, 2),
    "I64": (torch.int64, 8), "I32": (torch.int32, 4), "I16": (torch.int16, 2), "I8": (torch.int8, 1),
    "U8": (torch.uint8, 1), "BOOL": (torch.bool, 1),
    "F8_E4M3": (getattr(torch, "float8_e4m3fn", None), 1), "F8_E5M2": (getattr(torch, "float8_e5m2", None), 1),
}
_MAX_HEADER = 100 * 1024 * 1024
# Per-layer factors: "scaled fp8" (scale_weight / scale_input) and ComfyUI's mixed precision (weight_scale /
# input_scale).  They stay fp32 whatever the compute dtype.
_SCALES = ("scale_weight", "scale_input", "weight_scale", "input_scale")
QUANT_MARKER = "comfy_quant"  # ComfyUI's per-layer quantization marker: uint8 bytes of JSON, e.g. {"format": ...}
_SCALED_FP8_MARKER = "scaled_fp8"  # top-level "scaled fp8" marker: its dtype names the fp8 format, no weights
# Marker formats whose weight is a plain fp8 tensor times ``weight_scale``: what per-layer casting can compute.
FLOAT8_FORMATS = ("float8_e4m3fn", "float8_e5m2")


class SafetensorsCheckpoint(Mapping):
    """Lazy ``name -> tensor`` view over one or more safetensors files (each tensor read on access).

    ``metadata`` is the merged ``__metadata__`` of the files; ``config`` the parsed ``config.json`` of a
    diffusers/HF folder (or ``None``).  Tensor shapes and dtypes are known without reading any data:
    :meth:`shape` / :meth:`dtype`.
    """

    def __init__(self, files: list[Path], config: ModelConfig | None = None, source: Path | None = None):
        self.source = Path(source or files[0])
        self.config = config
        self.metadata: dict[str, str] = {}
        self._index: dict[str, tuple[Path, str, list[int], int]] = {}  # name -> (file, dtype tag, shape, data offset)
        for path in files:
            self._read_header(path)

    # -- header validation -------------------------------------------------------------------------------------
    def _read_header(self, path: Path) -> None:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise WeightFileError(f"{path}: not a safetensors file (only {size} bytes).")
            (header_len,) = struct.unpack("<Q", head)
            if header_len > min(_MAX_HEADER, size - 8):
                raise WeightFileError(
                    f"{path}: not a valid safetensors file (header length {header_len} does not fit in a "
                    f"{size}-byte file). The file is corrupt, truncated, or not a .safetensors file.")
            raw = f.read(header_len)
        try:
            header = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
            raise WeightFileError(f"{path}: corrupt safetensors header ({type(e).__name__}: {e}).") from None
        if not isinstance(header, dict):
            raise WeightFileError(f"{path}: corrupt safetensors header (not a JSON object).")
        data_start = 8 + header_len
        spans: list[tuple[str, int, int]] = []
        for name, info in header.items():
            if name == "__metadata__":
                if not isinstance(info, dict):
                    raise WeightFileError(f"{path}: corrupt safetensors header (__metadata__ is not an object).")
                self.metadata.update({str(k): str(v) for k, v in info.items()})
                continue
            tag, shape, begin, end = _header_entry(path, name, info)
            if data_start + end > size:
                raise WeightFileError(
                    f"{path}: the file is truncated: tensor '{name}' ends at byte {data_start + end} but the file "
                    f"has {size} bytes. Download it again.")
            if name in self._index:
                raise WeightFileError(f"{path}: tensor '{name}' appears in more than one shard.")
            spans.append((name, data_start + begin, data_start + end))
            self._index[name] = (path, tag, shape, data_start + begin)
        _refuse_overlaps(path, spans)
        refuse_zero_filled_tail(path, size, spans, WeightFileError)

    # -- mapping interface -------------------------------------------------------------------------------------
    def __getitem__(self, name: str) -> torch.Tensor:
        path, tag, shape, offset = self._index[name]
        dtype, itemsize = _SAFETENSORS_DTYPES[tag]
        numel = 1
        for d in shape:
            numel *= d
        buf = bytearray(numel * itemsize)
        with open(path, "rb") as f:
            f.seek(offset)
            if f.readinto(buf) != len(buf):
                raise WeightFileError(f"{path}: the file is truncated while reading tensor '{name}'.")
        if numel == 0:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(buf, dtype=dtype).reshape(shape)

    def __iter__(self) -> Iterator[str]:
        return iter(self._index)

    def __len__(self) -> int:
        return len(self._index)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._index[name][2])

    def dtype(self, name: str) -> torch.dtype:
        return _SAFETENSORS_DTYPES[self._index[name][1]][0]

    def nbytes(self) -> int:
        total = 0
        for _, tag, shape, _ in self._index.values():
            n = _SAFETENSORS_DTYPES[tag][1]
            for d in shape:
                n *= d
            total += n
        return total


def _is_count(value) -> bool:
    return type(value) is int and value >= 0  # JSON integers only: not bools, floats or strings


def _header_entry(path: Path, name: str, info) -> tuple[str, list[int], int, int]:
    """One tensor's ``(dtype tag, shape, begin, end)`` from a safetensors header, every field checked."""
    def corrupt(problem: str) -> WeightFileError:
        return WeightFileError(f"{path}: corrupt safetensors header: tensor '{name}' {problem}. The file is damaged "
                               "or was not written by a safetensors library; download it again.")

    if not isinstance(info, dict):
        raise corrupt(f"is described by {json.dumps(info)[:40]} instead of dtype / shape / data_offsets")
    tag, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(tag, str):
        raise corrupt(f"has dtype {json.dumps(tag)[:40]}")
    if tag not in _SAFETENSORS_DTYPES or _SAFETENSORS_DTYPES[tag][0] is None:
        raise WeightFileError(f"{path}: tensor '{name}' has dtype {tag}, which this loader cannot read.")
    if not (isinstance(shape, list) and all(map(_is_count, shape))):
        raise corrupt(f"has shape {json.dumps(shape)[:40]} (dimensions are non-negative integers)")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_count, offsets))
            and offsets[0] <= offsets[1]):
        raise corrupt(f"has data_offsets {json.dumps(offsets)[:40]} (two integers, begin <= end)")
    begin, end = offsets
    if end - begin != math.prod(shape) * _SAFETENSORS_DTYPES[tag][1]:
        raise corrupt(f"has {end - begin} bytes of data for shape {shape} of {tag}")
    return tag, shape, begin, end


def _refuse_overlaps(path: Path, spans: list[tuple[str, int, int]]) -> None:
    previous = None
    for name, begin, end in sorted(spans, key=lambda span: span[1:]):
        if previous is not None and begin < previous[2] and end > begin:
            raise WeightFileError(f"{path}: corrupt safetensors header: the data of tensors '{previous[0]}' and "
                                  f"'{name}' overlap. The file is damaged; download it again.")
        if end > begin:
            previous = (name, begin, end)


def tensor_shape(tensors: Mapping, name: str) -> tuple[int, ...]:
    """Logical (torch-order) shape of one tensor, from the mapping's ``shape(name)`` when it has one (a lazy
    checkpoint reads it from the header; a quantized one reports the unpacked shape), else the tensor itself."""
    shape_of = getattr(tensors, "shape", None)
    return tuple(shape_of(name)) if callable(shape_of) else tuple(tensors[name].shape)


def tensor_dtype(tensors: Mapping, name: str) -> torch.dtype:
    """Stored dtype of one tensor (from the header when the mapping can tell without reading data)."""
    dtype_of = getattr(tensors, "dtype", None)
    return dtype_of(name) if callable(dtype_of) else tensors[name].dtype


def quant_config(marker: torch.Tensor, name: str = "comfy_quant") -> dict:
    """A ``<layer>.comfy_quant`` marker's JSON object (``{"format": "float8_e4m3fn", ...}``)."""
    try:
        config = json.loads(marker.to(torch.uint8).cpu().numpy().tobytes())
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise WeightFileError(f"tensor '{name}' is not a quantization marker ({type(e).__name__}: {e}).") from None
    if not isinstance(config, dict) or not isinstance(config.get("format"), str):
        raise WeightFileError(f"tensor '{name}' is not a quantization marker (no \"format\" in {str(config)[:60]}).")
    return config


def quant_marker(config: dict) -> torch.Tensor:
    """The ``<layer>.comfy_quant`` tensor ComfyUI writes for a layer's quantization ``config``."""
    return torch.tensor(list(json.dumps(config).encode("utf-8")), dtype=torch.uint8)


def _index_shards(index: Path) -> set[str]:
    """The shard file names a ``*.safetensors.index.json`` lists (its ``weight_map`` values)."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map")
    except (AttributeError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise WeightFileError(f"{index}: not a valid safetensors index ({type(e).__name__}: {e}).") from None
    shards = list(weight_map.values()) if isinstance(weight_map, dict) else []
    if not shards or not all(isinstance(s, str) and s and Path(s).name == s for s in shards):
        raise WeightFileError(f"{index}: not a valid safetensors index (its weight_map must map tensor names to "
                              "shard file names in the same folder).")
    return set(shards)


def open_checkpoint(path: str | os.PathLike) -> SafetensorsCheckpoint:
    """Open a ``.safetensors`` file or a folder (diffusers / HF layout) lazily; validates headers only.

    A folder may hold the weights directly or in a ``transformer/``, ``vae/``, ``text_encoder/`` ... subfolder
    of a full pipeline: pass that subfolder.  Raises :class:`WeightFileError` with a helpful message otherwise.
    """
    path = Path(path)
    if not path.exists():
        raise WeightFileError(f"{path}: no such file or folder.")
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            raise WeightFileError(f"{path}: this is a GGUF file; it is read by the GGUF loader, not as safetensors.")
        return SafetensorsCheckpoint([path])
    config = read_config(path / "config.json") if (path / "config.json").is_file() else None
    indexes = sorted(path.glob("*.safetensors.index.json"))
    if indexes:
        files = sorted({path / shard for shard in _index_shards(indexes[0])})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise WeightFileError(f"{path}: the index lists shards that are missing: {', '.join(missing)}.")
    else:
        files = sorted(path.glob("*.safetensors"))
    if not files:
        raise WeightFileError(f"{path}: the folder holds no .safetensors weights.")
    return SafetensorsCheckpoint(files, config=config, source=path)


def _loads_itself(module: nn.Module) -> bool:
    """A leaf layer with its own state-dict loading (a host's mixed-precision Linear builds its quantized weight
    from the checkpoint's tensors): it is handed its tensors through torch's protocol instead of one by one."""
    return next(module.children(), None) is None and \
        type(module)._load_from_state_dict is not nn.Module._load_from_state_dict


def _stored(tensor: torch.Tensor, leaf: str, dtype: torch.dtype | None,
            keep_dtypes: tuple[torch.dtype, ...]) -> torch.Tensor:
    """A checkpoint tensor as the model keeps it: scales in fp32, ``keep_dtypes`` (fp8) and integers as stored,
    other floats in ``dtype``."""
    if leaf in _SCALES:
        return tensor.to(torch.float32)
    if dtype is not None and tensor.dtype not in keep_dtypes and tensor.is_floating_point():
        return tensor.to(dtype)
    return tensor


def _refuse_uncastable(marker: torch.Tensor, key: str, what: str) -> None:
    """A ``comfy_quant`` marker reaching per-layer casting: fine for fp8 (the weight times ``weight_scale``),
    refused for formats only a host's mixed-precision layers compute."""
    found = quant_config(marker, key)["format"]
    if found not in FLOAT8_FORMATS:
        layer = key[: -len(QUANT_MARKER) - 1]
        raise WeightFileError(f"{what}: layer '{layer}' is quantized as {found}, which these layers cannot compute "
                              f"(they run {' and '.join(FLOAT8_FORMATS)}); load it in a ComfyUI whose mixed-precision "
                              f"layers support {found}.")


def _load_layer(layer: nn.Module, name: str, state: dict[str, torch.Tensor], what: str,
                missing: list[str], unexpected: list[str]) -> None:
    """Load one self-loading layer from its tensors (named as in the model), assigning rather than copying into
    its meta-device parameters."""
    errors: list[str] = []
    try:
        layer._load_from_state_dict(state, name + ".", {"assign_to_params_buffers": True}, True, missing,
                                    unexpected, errors)
    except (ValueError, KeyError, TypeError, RuntimeError) as e:
        raise WeightFileError(f"{what}: layer '{name}' could not be loaded ({type(e).__name__}: {e}).") from None
    if errors:
        raise WeightFileError(f"{what}: layer '{name}' could not be loaded: {errors[0]}")


def assign_weights(
    module: nn.Module,
    tensors: Mapping[str, torch.Tensor],
    dtype: torch.dtype | None = None,
    rename: Callable[[str], str | None] | None = None,
    keep_dtypes: tuple[torch.dtype, ...] = FLOAT8_DTYPES,
    what: str = "model",
) -> None:
    """Replace every parameter/buffer of a meta-device ``module`` with the checkpoint's tensor, one at a time.

    ``rename`` maps a checkpoint name to the module's name (``None`` drops the tensor).  Tensors are converted
    to ``dtype`` unless their dtype is in ``keep_dtypes`` (fp8 stays fp8); scales stay fp32.  Extra per-layer
    scales (``scale_weight`` / ``scale_input``, ``weight_scale`` / ``input_scale``) become buffers on their layer;
    the ``scaled_fp8`` marker and fp8 ``comfy_quant`` markers are dropped (the fp8 weight and its scale say it
    all), other ``comfy_quant`` formats are refused.  Layers that load themselves (see :func:`_loads_itself`) get
    all their tensors, markers included, one layer at a time.  Missing or unexpected names raise
    :class:`WeightFileError`.
    """
    self_loading = {name: m for name, m in module.named_modules() if name and _loads_itself(m)}
    expected = {name: t for name, t in [*module.named_parameters(), *module.named_buffers()]
                if name.rpartition(".")[0] not in self_loading}
    layer_keys: dict[str, list[tuple[str, str]]] = {name: [] for name in self_loading}
    seen: set[str] = set()
    missing: list[str] = []
    unexpected: list[str] = []
    for key in tensors:
        name = rename(key) if rename else key
        if name is None or name == _SCALED_FP8_MARKER:
            continue
        owner_name, _, leaf = name.rpartition(".")
        if owner_name in layer_keys:
            layer_keys[owner_name].append((key, name))
            continue
        if name not in expected:
            if leaf in _SCALES:
                owner = module.get_submodule(owner_name) if owner_name else module
                if not hasattr(owner, leaf):  # a layer class that declares the attribute handles it itself
                    owner.register_buffer(leaf, tensors[key].to(torch.float32), persistent=True)
                continue
            if leaf == QUANT_MARKER and f"{owner_name}.weight" in expected:
                _refuse_uncastable(tensors[key], key, what)
                continue
            unexpected.append(key)
            continue
        ref = expected[name]
        shape = tensor_shape(tensors, key)  # quantized checkpoints report the unpacked shape
        if shape != tuple(ref.shape):
            raise WeightFileError(f"{what}: tensor '{key}' has shape {shape}, expected {tuple(ref.shape)}.")
        tensor = _stored(tensors[key], leaf, dtype, keep_dtypes)
        owner = module.get_submodule(owner_name) if owner_name else module
        if isinstance(ref, nn.Parameter):
            owner._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)
        else:
            owner._buffers[leaf] = tensor
        seen.add(name)
    for owner_name, keys in layer_keys.items():
        if not keys:
            missing.append(f"{owner_name}.weight")
            continue
        state = {name: _stored(tensors[key], name.rpartition(".")[2], dtype, keep_dtypes) for key, name in keys}
        _load_layer(self_loading[owner_name], owner_name, state, what, missing, unexpected)
    for name in set(expected) - seen:
        owner_name, _, leaf = name.rpartition(".")
        if leaf in _SCALES:  # a "scaled fp8" layer class declares scales for every Linear; unscaled layers use 1
            owner = module.get_submodule(owner_name) if owner_name else module
            ones = torch.ones(expected[name].shape, dtype=torch.float32)
            if isinstance(expected[name], nn.Parameter):
                owner._parameters[leaf] = nn.Parameter(ones, requires_grad=False)
            else:
                owner._buffers[leaf] = ones
            seen.add(name)
    missing = sorted({*missing, *(set(expected) - seen)})
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        raise WeightFileError(f"{what}: the checkpoint does not match the model: " + "; ".join(parts) + ".")
