"""GGUF support in pure torch + numpy: a strict lazy reader, dequantization, quantized layers, a writer.

Public entry points::

    from models.io.gguf import GGUFError, load_gguf_state_dict
    sd = load_gguf_state_dict(path, dequantize=True, dtype=torch.float32)  # names as stored, torch-order shapes

    tensors, ops = open_dit_gguf(path)               # lazy mapping (QuantizedTensor values) + GGUFOps
    tensors, tokenizer = open_text_encoder_gguf(path)  # llama.cpp text GGUF + its mmproj, under our names

The mappings behave like :class:`models.io.weights.SafetensorsCheckpoint`: ``name -> tensor`` on access,
``shape(name)`` (logical torch-order shape), ``dtype(name)`` (``torch.uint8`` for packed tensors),
``metadata``, ``arch`` and ``config``, so :func:`models.io.weights.assign_weights` fills a meta-built model with
packed weights that :class:`~models.io.gguf.layers.GGUFOps` layers dequantize just in time.  The packed tensors of
one mapping share one :class:`~models.io.gguf.layers.DequantContext` (the model's per-thread scratch, freed with
its weights).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from . import dequant as _dequant
from .dequant import DEQUANTIZABLE_TYPES, dequantize
from .layers import ONE_VECTOR_LAYERS, DequantContext, GGUFOps, QuantizedTensor
from .names import QWEN_IMAGE_2_1_ARCH, QWEN_IMAGE_ARCH, Source, text_encoder_sources
from .reader import GGMLType, GGUFError, GGUFReader, GGUFTensorInfo

__all__ = ["GGUFError", "GGUFReader", "GGUFTensorInfo", "GGMLType", "GGUFCheckpoint", "QuantizedTensor",
           "GGUFOps", "dequantize", "load_gguf_state_dict", "open_dit_gguf", "open_text_encoder_gguf",
           "find_mmproj", "mmproj_missing_message", "tokenizer_from_gguf"]

_STORED_DTYPE = {GGMLType.F32: torch.float32, GGMLType.F16: torch.float16, GGMLType.BF16: torch.bfloat16}
DIT_ARCHS = (QWEN_IMAGE_ARCH, QWEN_IMAGE_2_1_ARCH)  # the registry tells the families apart
TEXT_ARCHS = ("qwen2vl", "qwen2")
# Dense copies of the DiT's one-vector-per-step weights kept by default, in parameters (1 GiB in bf16): all of them
# for small models, the first blocks' of a full Qwen-Image (whose 2 x 60 modulation Linears would need 13.6 GB).
DENSE_MODULATION_BUDGET = 1 << 29
# ComfyUI-GGUF stores the shape of tensors it had to flatten (more than 4 dims) under this key prefix.
_ORIG_SHAPE_KEY = "comfy.gguf.orig_shape."


def _refuse_undecodable(reader: GGUFReader, name: str) -> None:
    """Fail when the file is opened, not at the first sampling step, if a tensor's type cannot be dequantized."""
    qtype = reader.tensors[name].qtype
    if qtype not in DEQUANTIZABLE_TYPES:
        raise GGUFError(
            f"{reader.path}: tensor '{name}' is stored as {qtype.name} (ggml type {int(qtype)}), which neither this "
            f"pack nor the installed gguf package can dequantize. Re-download the model in a common quantization "
            f"(e.g. a Q4_K_M, Q5_K_M or Q8_0 file), or update gguf (pip install -U gguf) if {qtype.name} is a "
            f"newer format.")


def load_gguf_state_dict(path: str | os.PathLike, dequantize: bool = True,
                         dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """All tensors of a GGUF file by their stored names, in torch-order shapes.

    ``dequantize=True``: every tensor is decoded to ``dtype`` (new memory).  ``dequantize=False``: quantized
    tensors become :class:`QuantizedTensor` (packed bytes, zero-copy over the file's read-only memory map) and
    F32/F16/BF16 tensors are copied out as ordinary tensors in their stored dtype.  A tensor of a type that cannot
    be dequantized (:data:`~models.io.gguf.dequant.DEQUANTIZABLE_TYPES`) is a :class:`GGUFError` before any is read.
    """
    reader = GGUFReader(path)
    for name in reader.tensors:
        _refuse_undecodable(reader, name)
    out: dict[str, torch.Tensor] = {}
    context = DequantContext()
    for name, info in reader.tensors.items():
        raw = reader.raw(name)
        if dequantize:
            out[name] = _dequant.dequantize(raw, info.qtype, info.shape, dtype)
        elif info.is_quantized:
            out[name] = QuantizedTensor.wrap(raw, info.qtype, info.shape, context)
        else:
            out[name] = _dequant.dequantize(raw, info.qtype, info.shape, _STORED_DTYPE.get(info.qtype, dtype))
    return out


class GGUFCheckpoint(Mapping):
    """Lazy ``name -> tensor`` view over one or more GGUF files (see the module docstring).

    ``sources`` maps each exposed name to the stored tensors it is made of (:class:`models.io.gguf.names.Source`;
    files are keys of ``readers``).  Packed tensors come back as zero-copy :class:`QuantizedTensor` views (rows of
    same-type parts are concatenated as bytes); F32/F16/BF16 tensors are copied out in their stored dtype.  A part
    of a type that cannot be dequantized is a :class:`GGUFError` here, when the mapping is built.  Packed tensors
    share :attr:`context`; those named in ``keep_dense`` are marked to be kept dequantized by their layers.
    """

    def __init__(self, readers: dict[str, GGUFReader], sources: dict[str, Source], main: str, config=None,
                 keep_dense: frozenset[str] = frozenset()):
        for src in sources.values():
            for file, name in src.parts:
                _refuse_undecodable(readers[file], name)
        self.readers, self._sources = readers, sources
        self.context, self._keep_dense = DequantContext(), keep_dense
        self.source = readers[main].path
        self.metadata = readers[main].metadata
        self.arch = readers[main].arch
        self.config = config
        self.missing_vision: str | None = None  # a text encoder opened without its mmproj: what to download

    def _info(self, part: tuple[str, str]) -> GGUFTensorInfo:
        return self.readers[part[0]].tensors[part[1]]

    def _logical_shape(self, part: tuple[str, str]) -> tuple[int, ...]:
        info = self._info(part)
        orig = self.readers[part[0]].metadata.get(_ORIG_SHAPE_KEY + part[1])
        if (isinstance(orig, list) and orig and all(type(d) is int and d > 0 for d in orig)
                and math.prod(orig) == math.prod(info.shape)):
            return tuple(orig)
        return info.shape

    def _read(self, part: tuple[str, str], keep_dense: bool = False) -> torch.Tensor:
        info = self._info(part)
        raw = self.readers[part[0]].raw(part[1])
        shape = self._logical_shape(part)
        if info.is_quantized:
            return QuantizedTensor.wrap(raw, info.qtype, shape, self.context, keep_dense)
        return _dequant.dequantize(raw, info.qtype, shape, _STORED_DTYPE.get(info.qtype, torch.float32))

    def __getitem__(self, name: str) -> torch.Tensor:
        src = self._sources[name]
        if src.join is None:
            return self._read(src.parts[0], name in self._keep_dense)
        infos = [self._info(p) for p in src.parts]
        if src.join == "cat0" and infos[0].is_quantized and len({i.qtype for i in infos}) == 1:
            raw = torch.cat([self.readers[f].raw(n) for f, n in src.parts], dim=0)
            return QuantizedTensor.wrap(raw, infos[0].qtype, self.shape(name), self.context,
                                        name in self._keep_dense)
        parts = [self._read(p) for p in src.parts]
        parts = [p.dequantize() if isinstance(p, QuantizedTensor) else p for p in parts]
        common = parts[0].dtype if len({p.dtype for p in parts}) == 1 else torch.float32
        parts = [p.to(common) for p in parts]
        return torch.cat(parts, dim=0) if src.join == "cat0" else torch.stack(parts, dim=2)

    def __iter__(self) -> Iterator[str]:
        return iter(self._sources)

    def __len__(self) -> int:
        return len(self._sources)

    def shape(self, name: str) -> tuple[int, ...]:
        """Logical torch-order shape, without reading data."""
        src = self._sources[name]
        shapes = [self._logical_shape(p) for p in src.parts]
        if src.join == "cat0":
            return (sum(s[0] for s in shapes), *shapes[0][1:])
        if src.join == "stack2":
            return (*shapes[0][:2], len(shapes), *shapes[0][2:])
        return shapes[0]

    def dtype(self, name: str) -> torch.dtype:
        """Stored dtype: ``torch.uint8`` for packed tensors."""
        infos = [self._info(p) for p in self._sources[name].parts]
        if len(infos) == 1 or len({i.qtype for i in infos}) == 1:
            return _STORED_DTYPE.get(infos[0].qtype, torch.uint8)
        return torch.float32

    def qtype(self, name: str) -> GGMLType:
        """ggml type of the (first) stored part."""
        return self._info(self._sources[name].parts[0]).qtype


def _check_arch(reader: GGUFReader, expected: tuple[str, ...], what: str) -> None:
    """Refuse a GGUF of another architecture, naming what it holds (the registry's words)."""
    if reader.arch is None or reader.arch in expected:
        return
    from ...registry import identify, refusal  # the registry reads GGUF headers through this package

    raise refusal(str(reader.path), identify(reader), what, gguf=True)


def _dense_by_default(reader: GGUFReader, budget: int) -> frozenset[str]:
    """The packed :data:`ONE_VECTOR_LAYERS` weights kept dequantized by default: the smallest first, then in file
    order (block 0 first), while their parameters fit in ``budget``."""
    suffixes = tuple(f"{layer}.weight" for layer in ONE_VECTOR_LAYERS)
    candidates = [(math.prod(info.shape), index, name) for index, (name, info) in enumerate(reader.tensors.items())
                  if info.is_quantized and name.endswith(suffixes)]
    kept, total = [], 0
    for size, _, name in sorted(candidates):
        total += size
        if total > budget:
            break
        kept.append(name)
    return frozenset(kept)


def open_dit_gguf(path: str | os.PathLike,
                  dense_budget: int = DENSE_MODULATION_BUDGET) -> tuple[GGUFCheckpoint, type[GGUFOps]]:
    """A Qwen-Image 1.x or 2.1 DiT GGUF (arch ``qwen_image`` / ``qwen_image21``, diffusers names) as a lazy mapping,
    and the ops to run it.

    The weights of layers that see one vector per step (:data:`~models.io.gguf.layers.ONE_VECTOR_LAYERS`: the
    modulations, a third of the parameters, and the timestep MLP) are marked to be dequantized once and kept in the
    compute dtype, up to ``dense_budget`` parameters (0: none); a layer's ``set_dequant_cache`` overrides the mark.
    """
    reader = GGUFReader(path)
    _check_arch(reader, DIT_ARCHS, "a Qwen-Image diffusion model")
    sources = {name: Source((("main", name),)) for name in reader.tensors}
    return GGUFCheckpoint({"main": reader}, sources, "main", keep_dense=_dense_by_default(reader, dense_budget)), \
        GGUFOps


_MMPROJ_NAME = re.compile(r"mmproj.*\.gguf$", re.IGNORECASE)


def mmproj_missing_message(text_path: str | os.PathLike) -> str:
    """What to do when a text-encoder GGUF has no mmproj next to it."""
    folder = Path(text_path).parent
    return (f"{text_path}: the Qwen2.5-VL vision tower of a GGUF text encoder lives in a separate mmproj GGUF, and "
            f"none was found in {folder}. Download the mmproj that matches this model (e.g. 'mmproj-F16.gguf' or "
            f"'Qwen2.5-VL-7B-Instruct-mmproj-F16.gguf'; any file name containing 'mmproj' and ending in .gguf) and "
            f"put it in {folder}.")


def find_mmproj(text_path: str | os.PathLike, hidden_size: int | None = None, required: bool = True) -> Path | None:
    """The mmproj GGUF next to a text-encoder GGUF: any ``*mmproj*.gguf`` (case-insensitive) in its folder,
    e.g. ``mmproj-F16.gguf``, ``mmproj-Qwen2.5-VL-7B-Instruct-f16.gguf`` or
    ``Qwen2.5-VL-7B-Instruct-mmproj-F16.gguf``.  With several, those whose projector outputs ``hidden_size``
    features (``clip.vision.projection_dim``, when given) come first, then the longest shared name prefix.
    None found: a :class:`GGUFError` saying what to download, or ``None`` when not ``required``."""
    text_path = Path(text_path)
    folder = text_path.parent
    candidates = sorted(p for p in folder.iterdir() if p.is_file() and p != text_path
                        and _MMPROJ_NAME.search(p.name)) if folder.is_dir() else []
    if not candidates:
        if required:
            raise GGUFError(mmproj_missing_message(text_path))
        return None

    def shared_prefix(p: Path) -> int:
        a, b = p.name.lower(), text_path.name.lower()
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        return n

    def fits(p: Path) -> bool:
        if hidden_size is None or len(candidates) == 1:
            return True
        try:
            return GGUFReader(p).metadata.get("clip.vision.projection_dim") == hidden_size
        except GGUFError:
            return False

    return max(candidates, key=lambda p: (fits(p), shared_prefix(p), p.name))


def _strings(value) -> bool:
    return isinstance(value, Sequence) and not isinstance(value, str) and all(isinstance(v, str) for v in value)


def tokenizer_from_gguf(metadata: Mapping, source: str = "GGUF metadata"):
    """A :class:`models.encoders.tokenizer.QwenTokenizer` from GGUF tokenizer metadata, or None if the file has none.
    Metadata of the wrong kind (not string arrays, token types of another length) is a :class:`GGUFError`."""
    tokens = metadata.get("tokenizer.ggml.tokens")
    merges = metadata.get("tokenizer.ggml.merges")
    if tokens is None or merges is None:
        return None
    types = metadata.get("tokenizer.ggml.token_type", [])
    if not (_strings(tokens) and _strings(merges) and isinstance(types, (list, np.ndarray))
            and len(types) in (0, len(tokens)) and (not len(types) or np.asarray(types).dtype.kind in "iu")):
        raise GGUFError(f"{source}: the tokenizer metadata (tokenizer.ggml.tokens / merges / token_type) is "
                        "malformed: expected string arrays and one integer type per token.")
    from ...encoders.tokenizer import QwenTokenizer

    types = np.asarray(types)
    special = set(np.flatnonzero(types == 3).tolist())
    added = [(int(i), tokens[int(i)], int(i) in special) for i in np.flatnonzero((types == 3) | (types == 4))]
    return QwenTokenizer.from_vocab(list(tokens), list(merges), added, source=source)


def _metadata_count(reader: GGUFReader, key: str) -> int | None:
    """A positive integer setting from the metadata (None when absent), else a GGUFError naming the key."""
    value = reader.metadata.get(key)
    if value is None:
        return None
    if type(value) is not int or value <= 0:
        raise GGUFError(f"{reader.path}: metadata key '{key}' is {value!r}; expected a positive integer.")
    return value


def _metadata_rate(reader: GGUFReader, key: str) -> float | None:
    """A positive finite number from the metadata (None when absent), else a GGUFError naming the key."""
    value = reader.metadata.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
        raise GGUFError(f"{reader.path}: metadata key '{key}' is {value!r}; expected a positive number.")
    return float(value)


def _text_config(text: GGUFReader, mmproj: GGUFReader | None) -> dict:
    """An HF-style config dict from llama.cpp metadata (what the text encoder's shape detection reads)."""
    arch = text.arch or "qwen2vl"
    config: dict = {}
    if (heads := _metadata_count(text, f"{arch}.attention.head_count")) is not None:
        config["num_attention_heads"] = heads
    if (eps := _metadata_rate(text, f"{arch}.attention.layer_norm_rms_epsilon")) is not None:
        config["rms_norm_eps"] = eps
    if (theta := _metadata_rate(text, f"{arch}.rope.freq_base")) is not None:
        config["rope_theta"] = theta
    sections = text.metadata.get(f"{arch}.rope.dimension_sections", [])
    if not (isinstance(sections, list) and all(type(s) is int and s >= 0 for s in sections)):
        raise GGUFError(f"{text.path}: metadata key '{arch}.rope.dimension_sections' is {sections!r}; expected a "
                        "list of non-negative integers.")
    if len(sections := [s for s in sections if s]) == 3:
        config["rope_scaling"] = {"mrope_section": sections}
    vision: dict = {}
    if mmproj is not None:
        if (heads := _metadata_count(mmproj, "clip.vision.attention.head_count")) is not None:
            vision["num_heads"] = heads
        if (window := _metadata_count(mmproj, "clip.vision.window_size")) is not None:
            vision["window_size"] = window
        depth, pattern = (_metadata_count(mmproj, f"clip.vision.{k}") for k in ("block_count", "n_wa_pattern"))
        if depth and pattern:
            vision["fullatt_block_indexes"] = [i for i in range(depth) if (i + 1) % pattern == 0]
    if vision:
        config["vision_config"] = vision
    return config


def open_text_encoder_gguf(path: str | os.PathLike, mmproj: str | os.PathLike | None = None,
                           require_mmproj: bool = False):
    """A llama.cpp Qwen2.5-VL text GGUF plus its mmproj as one lazy mapping under our (Comfy) names.

    Returns ``(checkpoint, tokenizer)``: ``tokenizer`` is built from the file's metadata (None without it).
    ``mmproj``: the vision GGUF (default: found next to ``path`` with :func:`find_mmproj`).  Without one the
    checkpoint holds the language model only (enough for text-to-image) and ``checkpoint.missing_vision`` says
    what to download; ``require_mmproj`` makes that a :class:`GGUFError` instead.
    """
    text = GGUFReader(path)
    _check_arch(text, TEXT_ARCHS, "a Qwen2.5-VL text encoder")
    readers = {"text": text}
    if mmproj is None:
        hidden = text.metadata.get(f"{text.arch or 'qwen2vl'}.embedding_length")
        mmproj = find_mmproj(path, hidden, required=require_mmproj)
    if mmproj is not None:
        readers["mmproj"] = GGUFReader(mmproj)
        _check_arch(readers["mmproj"], ("clip",), "a Qwen2.5-VL vision projector (mmproj)")
    sources = text_encoder_sources(text.tensors, readers["mmproj"].tensors if "mmproj" in readers else ())
    checkpoint = GGUFCheckpoint(readers, sources, "text", config=_text_config(text, readers.get("mmproj")))
    checkpoint.missing_vision = None if mmproj is not None else mmproj_missing_message(path)
    return checkpoint, tokenizer_from_gguf(text.metadata, str(path))
