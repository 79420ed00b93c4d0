"""Torch dequantization is bit-exact with gguf-py (gguf.quants.dequantize) for every supported type."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from models.gguf import GGMLType, GGUFError, dequantize, load_gguf_state_dict
from models.gguf import dequant as dequant_module
from models.gguf.reader import QUANT_BLOCKS

# byte offsets of the fp16 scale fields inside one block of each type
F16_FIELDS = {
    "Q8_0": [0], "Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q2_K": [80, 82], "Q3_K": [108],
    "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208], "IQ4_NL": [0], "IQ4_XS": [0],
}
EXTREME_F16 = np.array([0.0, -0.0, 6e-8, -6e-8, 6.1e-5, 1e-3, 1.0, -1.0, 1000.0, 65504.0, -65504.0], np.float16)


def random_blocks(qtype: str, n_blocks: int, seed: int, kind: str) -> np.ndarray:
    """Raw blocks: random bits with finite fp16 scales; ``kind`` picks normal/extreme/zero/max patterns."""
    rng = np.random.default_rng(seed)
    _, type_size = QUANT_BLOCKS[GGMLType[qtype]]
    if kind == "zero":
        raw = np.zeros((n_blocks, type_size), np.uint8)
    elif kind == "max":
        raw = np.full((n_blocks, type_size), 0xFF, np.uint8)
    else:
        raw = rng.integers(0, 256, size=(n_blocks, type_size), dtype=np.uint8)
    for offset in F16_FIELDS[qtype]:
        if kind == "zero":
            continue
        if kind == "extreme" or kind == "max":
            d = rng.choice(EXTREME_F16, n_blocks)
        else:
            d = (rng.standard_normal(n_blocks) * 10.0 ** rng.integers(-6, 3, n_blocks)).astype(np.float16)
        raw[:, offset:offset + 2] = d.view(np.uint8).reshape(n_blocks, 2)
    return raw


@pytest.mark.parametrize("kind", ["normal", "extreme", "zero", "max"])
@pytest.mark.parametrize("qtype", sorted(F16_FIELDS))
def test_bit_exact_with_gguf_py(qtype: str, kind: str):
    block, _ = QUANT_BLOCKS[GGMLType[qtype]]
    raw = random_blocks(qtype, 96, seed=hash((qtype, kind)) % 1000, kind=kind)
    rows = raw.reshape(12, -1)
    with np.errstate(all="ignore"):
        ref = gguf.quants.dequantize(rows, gguf.GGMLQuantizationType[qtype])
    ours = dequantize(torch.from_numpy(rows), GGMLType[qtype], ref.shape)
    assert ours.dtype == torch.float32 and tuple(ours.shape) == ref.shape == (12, 8 * block)
    assert np.array_equal(ours.numpy().view(np.uint32), ref.view(np.uint32))


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_K", "Q6_K", "IQ4_XS"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_chunked_path_and_output_dtype(qtype: str, dtype: torch.dtype, monkeypatch):
    # a chunk smaller than the tensor exercises the chunk loop and the fp32 scratch buffer
    monkeypatch.setattr(dequant_module, "_CPU_CHUNK_ELEMENTS", 1024)
    raw = random_blocks(qtype, 77, seed=3, kind="normal")
    shape = (7, 11 * QUANT_BLOCKS[GGMLType[qtype]][0])
    ref = gguf.quants.dequantize(raw.reshape(7, -1), gguf.GGMLQuantizationType[qtype])
    ours = dequantize(torch.from_numpy(raw), GGMLType[qtype], shape, dtype=dtype)
    assert ours.dtype == dtype
    assert torch.equal(ours, torch.from_numpy(ref).to(dtype))


@pytest.mark.parametrize("qtype,np_dtype", [("F32", np.float32), ("F16", np.float16)])
def test_float_types(qtype: str, np_dtype):
    x = np.random.default_rng(0).standard_normal((5, 6)).astype(np_dtype)
    raw = torch.from_numpy(x.view(np.uint8).reshape(5, -1).copy())
    ref = gguf.quants.dequantize(x.view(np.uint8).reshape(5, -1), gguf.GGMLQuantizationType[qtype])
    ours = dequantize(raw, GGMLType[qtype], (5, 6))
    assert np.array_equal(ours.numpy(), ref)
    assert ours.data_ptr() != raw.data_ptr()


def test_bf16():
    x = np.random.default_rng(0).standard_normal((4, 8)).astype(np.float32)
    packed = gguf.quants.quantize(x, gguf.GGMLQuantizationType.BF16)
    ref = gguf.quants.dequantize(packed, gguf.GGMLQuantizationType.BF16)
    ours = dequantize(torch.from_numpy(packed.copy()), GGMLType.BF16, (4, 8))
    assert np.array_equal(ours.numpy(), ref)


def test_unsupported_type_and_wrong_size_raise():
    with pytest.raises(GGUFError, match="IQ2_XXS"):
        dequantize(torch.zeros(66, dtype=torch.uint8), GGMLType.IQ2_XXS, (256,))
    with pytest.raises(GGUFError, match="needs 34 bytes"):
        dequantize(torch.zeros(35, dtype=torch.uint8), GGMLType.Q8_0, (32,))
    with pytest.raises(GGUFError, match="uint8"):
        dequantize(torch.zeros(34, dtype=torch.int8), GGMLType.Q8_0, (32,))


GGUF_PY_QUANTIZABLE = ["F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"]


def test_files_written_by_gguf_py(tmp_path: Path):
    rng = np.random.default_rng(1)
    path = tmp_path / "ref.gguf"
    writer = gguf.GGUFWriter(str(path), "qwen_image")
    shapes = {}
    for i, qtype in enumerate(GGUF_PY_QUANTIZABLE):
        shape = (3, 2, 64) if i % 2 else (96, 32)
        shapes[f"t.{qtype}"] = shape
        x = (rng.standard_normal(shape) * 10.0 ** (i - 4)).astype(np.float32)
        t = gguf.GGMLQuantizationType[qtype]
        writer.add_tensor(f"t.{qtype}", gguf.quants.quantize(x, t), raw_dtype=t)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    ours = load_gguf_state_dict(path)
    ref = gguf.GGUFReader(str(path))
    assert set(ours) == {t.name for t in ref.tensors}
    for t in ref.tensors:
        expected = gguf.quants.dequantize(t.data, t.tensor_type)
        got = ours[t.name]
        assert tuple(got.shape) == shapes[t.name] == expected.shape
        assert np.array_equal(got.numpy().view(np.uint32), expected.astype(np.float32).view(np.uint32)), t.name
    half = load_gguf_state_dict(path, dtype=torch.bfloat16)
    assert all(v.dtype == torch.bfloat16 for v in half.values())
    assert torch.equal(half["t.Q8_0"], ours["t.Q8_0"].to(torch.bfloat16))
