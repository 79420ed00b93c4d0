"""Types without a torch kernel (IQ1/IQ2/IQ3, TQ1_0/TQ2_0, MXFP4, ...) dequantize through gguf-py on the CPU, on
every path, with gguf-py's exact numbers; types nobody can dequantize are refused when the file is opened."""

from __future__ import annotations

import struct
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from models.io.gguf import GGUFError, GGUFReader, QuantizedTensor, dequantize, load_gguf_state_dict, open_dit_gguf
from models.io.gguf import dequant as dequant_module
from models.io.gguf.dequant import DEQUANTIZABLE_TYPES, GGUF_PY_TYPES, TORCH_TYPES
from models.io.gguf.layers import GGUFOps
from models.io.gguf.reader import QUANT_BLOCKS, GGMLType, GGUFValueType

T = gguf.GGMLQuantizationType
# byte offset of the fp16 super-block scale ``d`` (other types get random bytes everywhere)
D_FIELD = {"IQ2_XXS": 0, "IQ2_XS": 0, "IQ2_S": 0, "IQ3_XXS": 0, "IQ3_S": 0, "IQ1_S": 0, "TQ1_0": 52, "TQ2_0": 64}


def random_blocks(qtype: str, n_blocks: int, seed: int) -> np.ndarray:
    """Random block bytes with a finite, sane fp16 ``d`` where the type has one at a known offset."""
    rng = np.random.default_rng(seed)
    _, type_size = gguf.GGML_QUANT_SIZES[T[qtype]]
    raw = rng.integers(0, 256, size=(n_blocks, type_size), dtype=np.uint8)
    if qtype in D_FIELD:
        d = (rng.standard_normal(n_blocks) * 1e-2).astype(np.float16)
        raw[:, D_FIELD[qtype]:D_FIELD[qtype] + 2] = d.view(np.uint8).reshape(n_blocks, 2)
    return raw


def reference(raw: np.ndarray, qtype: str) -> np.ndarray:
    with np.errstate(all="ignore"):
        return gguf.quants.dequantize(raw, T[qtype])


def same_bits(ours: torch.Tensor, ref: np.ndarray) -> bool:
    """Bit-identical fp32, NaN matching NaN (random bytes of some types decode to NaN)."""
    a, b = ours.numpy(), np.asarray(ref, np.float32)
    return a.shape == b.shape and bool(np.all((a.view(np.uint32) == b.view(np.uint32)) | (np.isnan(a) & np.isnan(b))))


def test_type_tables_are_gguf_py_tables():
    assert GGMLType is gguf.GGMLQuantizationType and GGUFValueType is gguf.GGUFValueType
    assert dict(QUANT_BLOCKS) == gguf.GGML_QUANT_SIZES
    with pytest.raises(TypeError):
        QUANT_BLOCKS[GGMLType.Q8_0] = (1, 1)  # read-only: gguf-py's own table must not change under it
    assert GGMLType(12) is T.Q4_K and QUANT_BLOCKS[GGMLType.Q4_K] == (256, 144)


def test_fallback_covers_the_iq_tq_and_mxfp4_types():
    expected = {"IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "TQ1_0", "TQ2_0", "MXFP4"}
    assert expected <= {t.name for t in GGUF_PY_TYPES}
    assert not GGUF_PY_TYPES & TORCH_TYPES and DEQUANTIZABLE_TYPES == GGUF_PY_TYPES | TORCH_TYPES
    assert not {T.Q8_K, T.Q8_1, T.I32, T.F64} & DEQUANTIZABLE_TYPES  # gguf-py cannot dequantize these either


@pytest.mark.parametrize("qtype", sorted(t.name for t in GGUF_PY_TYPES))
def test_dequantize_matches_gguf_py(qtype: str, monkeypatch):
    # a small chunk runs the chunk loop with a partial last chunk
    monkeypatch.setattr(dequant_module, "_CPU_CHUNK_ELEMENTS", 1024)
    block, _ = QUANT_BLOCKS[GGMLType[qtype]]
    raw = random_blocks(qtype, 35, seed=len(qtype)).reshape(5, -1)
    ref = reference(raw, qtype)
    shape = (5, 7 * block)
    ours = dequantize(torch.from_numpy(raw), GGMLType[qtype], shape)
    assert ours.dtype == torch.float32 and same_bits(ours, ref)
    half = dequantize(torch.from_numpy(raw), GGMLType[qtype], shape, torch.bfloat16)
    assert half.dtype == torch.bfloat16 and same_bits(half.float(), torch.from_numpy(ref).bfloat16().float().numpy())
    buffer = torch.full((shape[0] * shape[1],), float("nan"))
    reused = dequantize(torch.from_numpy(raw), GGMLType[qtype], shape, out=buffer)
    assert reused.data_ptr() == buffer.data_ptr() and same_bits(reused, ref)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fallback_returns_on_the_bytes_device():
    raw = random_blocks("IQ2_XXS", 24, seed=5).reshape(4, -1)
    ref = torch.from_numpy(reference(raw, "IQ2_XXS"))
    ours = dequantize(torch.from_numpy(raw).cuda(), GGMLType.IQ2_XXS, (4, 1536), torch.bfloat16)
    assert ours.device.type == "cuda" and torch.equal(ours.cpu(), ref.bfloat16())
    weight = QuantizedTensor.wrap(torch.from_numpy(raw), GGMLType.IQ2_XXS, (4, 1536))
    layer = GGUFOps.Linear(1536, 4, bias=False, device="meta")
    layer.weight = nn.Parameter(weight, requires_grad=False)
    x = torch.randn(3, 1536, device="cuda")
    assert torch.equal(layer(x), F.linear(x, ref.cuda()))


def write_gguf(path: Path, tensors: dict[str, tuple[str, np.ndarray]]) -> None:
    """A file written by gguf-py's own writer: ``name -> (type, raw block bytes [..., row_bytes])``."""
    writer = gguf.GGUFWriter(str(path), "qwen_image")
    for name, (qtype, raw) in tensors.items():
        writer.add_tensor(name, raw, raw_dtype=T[qtype])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_gguf_py_file_with_iq_and_tq_tensors_on_every_path(tmp_path: Path):
    rng = np.random.default_rng(7)
    tq = gguf.quants.quantize(rng.standard_normal((48, 512)).astype(np.float32), T.TQ1_0)  # gguf-py quantizes TQ1_0
    written = {
        "blocks.0.attn.to_q.weight": ("IQ2_XXS", random_blocks("IQ2_XXS", 64 * 2, seed=1).reshape(64, -1)),
        "blocks.0.ff.weight": ("IQ3_S", random_blocks("IQ3_S", 2 * 8, seed=2).reshape(2, 8, -1)),
        "blocks.0.attn.to_k.weight": ("TQ1_0", tq),
    }
    path = tmp_path / "iq.gguf"
    write_gguf(path, written)
    expected = {name: reference(raw, qtype) for name, (qtype, raw) in written.items()}
    shapes = {"blocks.0.attn.to_q.weight": (64, 512), "blocks.0.ff.weight": (2, 8, 256),
              "blocks.0.attn.to_k.weight": (48, 512)}

    # gguf-py's reader sees the same bytes and numbers: the file is what we meant to write
    for t in gguf.GGUFReader(str(path)).tensors:
        assert np.array_equal(reference(np.asarray(t.data), t.tensor_type.name), expected[t.name])
    assert all(np.isfinite(v).all() and np.abs(v).max() > 0 for v in expected.values())

    dense = load_gguf_state_dict(path)
    assert set(dense) == set(expected)
    for name, values in expected.items():
        assert tuple(dense[name].shape) == shapes[name] and same_bits(dense[name], values), name
    half = load_gguf_state_dict(path, dtype=torch.bfloat16)
    assert all(torch.equal(half[n], torch.from_numpy(v).bfloat16()) for n, v in expected.items())

    packed = load_gguf_state_dict(path, dequantize=False)
    for name, (qtype, _) in written.items():
        assert isinstance(packed[name], QuantizedTensor) and packed[name].qtype == GGMLType[qtype]
        assert same_bits(packed[name].dequantize(), expected[name])

    checkpoint, ops = open_dit_gguf(path)
    assert checkpoint.shape("blocks.0.ff.weight") == (2, 8, 256)
    for name, values in expected.items():
        weight = checkpoint[name]
        assert isinstance(weight, QuantizedTensor) and same_bits(weight.dequantize(), values), name

    # just-in-time weights of the layers: the output of F.linear / F.embedding with gguf-py's weights
    for name in ("blocks.0.attn.to_q.weight", "blocks.0.attn.to_k.weight"):
        out_features, in_features = shapes[name]
        layer = ops.Linear(in_features, out_features, bias=False, device="meta")
        layer.weight = nn.Parameter(checkpoint[name], requires_grad=False)
        x = torch.randn(3, in_features, generator=torch.Generator().manual_seed(0))
        reference_weight = torch.from_numpy(expected[name])
        assert torch.equal(layer(x), F.linear(x, reference_weight)), name
        assert torch.equal(layer(x.bfloat16()), F.linear(x.bfloat16(), reference_weight.bfloat16())), name
    embedding = ops.Embedding(64, 512, device="meta")
    embedding.weight = nn.Parameter(checkpoint["blocks.0.attn.to_q.weight"], requires_grad=False)
    ids = torch.tensor([[0, 63, 5], [5, 1, 2]])
    assert torch.equal(embedding(ids), F.embedding(ids, torch.from_numpy(expected["blocks.0.attn.to_q.weight"])))


def test_undecodable_types_are_refused_when_the_file_is_opened(tmp_path: Path):
    path = tmp_path / "q8k.gguf"
    write_gguf(path, {"blocks.0.attn.to_q.weight": ("Q8_K", np.zeros((4, 292), np.uint8)),
                      "blocks.0.attn.to_k.weight": ("Q8_0", np.zeros((4, 34), np.uint8))})
    assert GGUFReader(path).tensors["blocks.0.attn.to_q.weight"].qtype == GGMLType.Q8_K  # the reader only reads
    needle = r"q8k\.gguf: tensor 'blocks\.0\.attn\.to_q\.weight' is stored as Q8_K .*Re-download .*Q4_K_M"
    for dequantize_ in (True, False):
        with pytest.raises(GGUFError, match=needle):
            load_gguf_state_dict(path, dequantize=dequantize_)
    with pytest.raises(GGUFError, match=needle):
        open_dit_gguf(path)

    # a type id gguf-py does not know at all: the reader refuses the file, naming the tensor
    data = bytearray(path.read_bytes())
    name = b"blocks.0.attn.to_q.weight"
    type_at = data.index(struct.pack("<Q", len(name)) + name) + 8 + len(name) + 4 + 2 * 8  # after n_dims and ne
    assert struct.unpack_from("<I", data, type_at)[0] == int(T.Q8_K)
    struct.pack_into("<I", data, type_at, 99)
    path.write_bytes(bytes(data))
    for opener in (GGUFReader, load_gguf_state_dict, open_dit_gguf):
        with pytest.raises(GGUFError, match=r"tensor 'blocks\.0\.attn\.to_q\.weight': has unknown ggml type 99"):
            opener(path)
