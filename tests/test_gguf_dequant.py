"""Torch dequantization is bit-exact with gguf-py (gguf.quants.dequantize) for every supported type."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from models.io.gguf import GGMLType, GGUFError, dequantize, load_gguf_state_dict
from models.io.gguf import dequant as dequant_module
from models.io.gguf.reader import QUANT_BLOCKS

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


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_K", "Q5_K", "Q6_K", "IQ4_XS"])
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
    with pytest.raises(GGUFError, match="Q8_K"):  # neither a torch kernel nor gguf-py (IQ2_XXS has one now)
        dequantize(torch.zeros(292, dtype=torch.uint8), GGMLType.Q8_K, (256,))
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


# -- quantizers and the writer ------------------------------------------------------------------------------------
from models.io.gguf.quantize import quantize  # noqa: E402
from models.io.gguf.reader import GGUFReader, GGUFValueType  # noqa: E402
from models.io.gguf.writer import GGUFWriter  # noqa: E402


def awkward_values(shape, seed: int) -> torch.Tensor:
    """Gaussian rows of very different scales, plus an all-zero block, a constant block and a huge outlier."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * torch.logspace(-4, 2, shape[0]).unsqueeze(1)
    x[0, :32] = 0
    x[1, :32] = 0.5
    x[2, 7] = 3e4
    return x


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "F16", "BF16", "F32"])
def test_quantizers_bit_exact_with_gguf_py(qtype: str):
    x = awkward_values((16, 512), seed=1)
    ref = gguf.quants.quantize(x.numpy(), gguf.GGMLQuantizationType[qtype])
    ours = quantize(x, GGMLType[qtype]).numpy()
    assert ours.tobytes() == np.ascontiguousarray(ref).tobytes()


@pytest.mark.parametrize("qtype,bound", [("Q4_K", 0.085), ("Q5_K", 0.042), ("Q6_K", 0.021)])
def test_k_quantizers_valid_and_accurate(qtype: str, bound: float):
    x = awkward_values((24, 1024), seed=2)
    raw = quantize(x, GGMLType[qtype])
    assert raw.shape == (24, 1024 // 256 * QUANT_BLOCKS[GGMLType[qtype]][1])
    ours = dequantize(raw, GGMLType[qtype], x.shape)
    theirs = gguf.quants.dequantize(raw.numpy(), gguf.GGMLQuantizationType[qtype])
    assert np.array_equal(ours.numpy(), theirs)
    assert torch.all(ours[0, :32] == 0)
    # per-row relative error (rows have scales from 1e-4 to 1e2)
    error = ((ours - x).norm(dim=1) / x.norm(dim=1))[3:]
    assert float(error.max()) < bound, float(error.max())


def test_writer_round_trip_through_gguf_py(tmp_path: Path):
    path = tmp_path / "ours.gguf"
    writer = GGUFWriter(path, "qwen_image", alignment=64)
    values = {"a.u8": (7, GGUFValueType.UINT8), "a.i8": (-7, GGUFValueType.INT8), "a.u16": (65535, GGUFValueType.UINT16),
              "a.i16": (-3, GGUFValueType.INT16), "a.u32": (1 << 31, None), "a.i32": (-5, None),
              "a.f32": (0.5, None), "a.bool": (True, None), "a.str": ("ünïcode", None),
              "a.u64": (1 << 40, None), "a.i64": (-(1 << 40), None), "a.f64": (0.1, GGUFValueType.FLOAT64),
              "a.arr": ([1, 2, 3], None), "a.sarr": (["x", "yy", ""], None), "a.farr": ([0.25, 1.5], None),
              "a.nested": ([[1, 2], [3]], None)}
    for key, (value, vtype) in values.items():
        writer.add(key, value, vtype)
    x = awkward_values((8, 256), seed=3)
    tensors = {}
    for i, qtype in enumerate(["Q8_0", "Q4_K", "Q6_K", "F16", "F32", "BF16", "Q5_1"]):
        raw = quantize(x, GGMLType[qtype])
        shape = (2, 4, 256) if i % 2 else (8, 256)
        writer.add_tensor(f"t.{qtype}", lambda r=raw: r, GGMLType[qtype], shape)  # callables are streamed
        tensors[f"t.{qtype}"] = (raw, shape)
    writer.write()
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())

    ref = gguf.GGUFReader(str(path))
    assert ref.fields["general.alignment"].contents() == 64
    for key, (value, _) in values.items():
        got = ref.fields[key].contents()
        if key == "a.nested":
            value = [1, 2, 3]  # gguf-py flattens nested arrays
        if isinstance(value, float):
            assert got == pytest.approx(value)
        else:
            assert got == value, key
    assert [t.name for t in ref.tensors] == list(tensors)
    for t in ref.tensors:
        raw, shape = tensors[t.name]
        assert tuple(int(d) for d in reversed(t.shape.tolist())) == shape
        assert np.asarray(t.data).tobytes() == raw.numpy().tobytes()
        assert t.data_offset % 64 == 0
    ours = GGUFReader(path)
    assert ours.metadata["a.nested"] == [[1, 2], [3]] and ours.alignment == 64


def test_writer_refuses_bad_input(tmp_path: Path):
    writer = GGUFWriter(tmp_path / "x.gguf")
    writer.add("k", 1)
    with pytest.raises(GGUFError, match="twice"):
        writer.add("k", 2)
    with pytest.raises(GGUFError, match="multiple"):
        writer.add_tensor("t", b"", GGMLType.Q8_0, (4, 33))
    writer.add_tensor("t", b"\0" * 10, GGMLType.Q8_0, (1, 32))
    with pytest.raises(GGUFError, match="needs 34"):
        writer.write()
    assert not any(tmp_path.iterdir())  # nothing half-written left behind


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_K", "F16"])
def test_dequantize_into_a_reused_buffer_is_identical(qtype):
    from models.io.gguf.dequant import dequantize
    from models.io.gguf.quantize import quantize
    from models.io.gguf.reader import GGMLType

    weight = torch.randn(8, 512, generator=torch.manual_seed(3))
    raw = quantize(weight, GGMLType[qtype]).reshape(-1)
    fresh = dequantize(raw, GGMLType[qtype], (8, 512))
    buffer = torch.full((8 * 512,), float("nan"))
    reused = dequantize(raw, GGMLType[qtype], (8, 512), out=buffer)
    assert torch.equal(reused, fresh) and reused.data_ptr() == buffer.data_ptr()
    with pytest.raises(ValueError, match="contiguous"):
        dequantize(raw, GGMLType[qtype], (8, 512), out=torch.empty(10))


# -- the fused (compiled) path: run on the CPU here; on CUDA it is the default --------------------------------
from models.io.gguf.dequant import _FUSED, FUSED_TYPES, FusedDequant, Workspace  # noqa: E402


@pytest.mark.parametrize("kind", ["normal", "extreme"])
def test_fused_formulations_are_bit_exact(kind: str):
    # the functional kernels torch.compile fuses, run as plain torch: every torch-kernel type has one
    assert FUSED_TYPES == frozenset(GGMLType[q] for q in F16_FIELDS)
    for qtype in sorted(F16_FIELDS):
        raw = random_blocks(qtype, 40, seed=11, kind=kind)
        with np.errstate(all="ignore"):
            ref = gguf.quants.dequantize(raw.reshape(1, -1), gguf.GGMLQuantizationType[qtype]).reshape(40, -1)
        for dtype in (torch.float32, torch.bfloat16):
            ours = _FUSED[GGMLType[qtype]](torch.from_numpy(raw), dtype)
            assert ours.dtype == dtype and torch.equal(ours, torch.from_numpy(ref).to(dtype)), (qtype, dtype)


def test_compiled_kernel_is_bit_exact_and_writes_the_compute_dtype():
    # torch.compile's CPU backend (a C++ compiler) stands in for CUDA's Triton here: one fused kernel per type and
    # dtype, whatever the number of blocks
    fused = FusedDequant()
    for n_blocks in (24, 61):
        raw = random_blocks("Q4_K", n_blocks, seed=n_blocks, kind="normal")
        ref = torch.from_numpy(gguf.quants.dequantize(raw.reshape(1, -1), gguf.GGMLQuantizationType.Q4_K))
        half = dequantize(torch.from_numpy(raw), GGMLType.Q4_K, ref.shape, torch.bfloat16, fused=fused)
        if not fused.enabled:
            pytest.skip("torch.compile does not work here (no C++ compiler?)")
        assert half.dtype == torch.bfloat16 and torch.equal(half, ref.bfloat16())
    assert set(fused._compiled) == {GGMLType.Q4_K}


def test_compile_failure_falls_back_to_the_eager_kernels(monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("no compiler")

    monkeypatch.setattr(torch, "compile", broken)
    fused = FusedDequant()
    raw = random_blocks("Q6_K", 12, seed=1, kind="normal")
    ref = torch.from_numpy(gguf.quants.dequantize(raw.reshape(1, -1), gguf.GGMLQuantizationType.Q6_K))
    for _ in range(2):
        ours = dequantize(torch.from_numpy(raw), GGMLType.Q6_K, ref.shape, fused=fused)
        assert torch.equal(ours, ref)
    assert not fused.enabled
    assert sum("compiled dequantization unavailable" in r.message for r in caplog.records) == 1  # said once


def test_workspace_is_reused_across_calls():
    # no allocation per call: the second call of the same shape finds every buffer and index it needs
    workspace = Workspace()
    raw = torch.from_numpy(random_blocks("Q5_K", 64, seed=2, kind="normal"))
    first = dequantize(raw, GGMLType.Q5_K, (4, 16 * 256), torch.bfloat16, workspace=workspace)
    held = workspace.nbytes
    buffers = {k: v.data_ptr() for k, v in workspace._buffers.items()}
    second = dequantize(raw, GGMLType.Q5_K, (4, 16 * 256), torch.bfloat16, workspace=workspace)
    assert torch.equal(first, second) and workspace.nbytes == held > 0
    assert {k: v.data_ptr() for k, v in workspace._buffers.items()} == buffers


def test_cpu_dequantization_runs_its_ops_on_the_calling_thread_only():
    # torch's CPU ops would split each op over a thread team; dequantization sets its own thread's OpenMP team to
    # one while it runs (a preempted team member would stall every one of its many short ops), and only its own
    import threading

    from models.io.gguf.dequant import _openmp, _Serial

    omp = _openmp()
    if omp is None:
        pytest.skip("torch does not run its CPU ops on a reachable OpenMP runtime here")
    get, _ = omp
    before = get()
    seen: dict[str, int] = {}
    with _Serial():
        seen["inside"] = get()
        other = threading.Thread(target=lambda: seen.update(other=get()))
        other.start()
        other.join()
    assert seen["inside"] == 1 and seen["other"] == before and get() == before


def test_devices_without_compiled_kernels_run_the_same_formulation_in_chunks(monkeypatch):
    # what a GPU without torch.compile runs (dequantize sends other devices there), exercised on CPU tensors
    from models.io.gguf.dequant import _functional

    monkeypatch.setattr(dequant_module, "_DEVICE_CHUNK_ELEMENTS", 1000)  # 3 chunks of Q6_K blocks, the last short
    raw = random_blocks("Q6_K", 10, seed=4, kind="normal")
    ref = torch.from_numpy(gguf.quants.dequantize(raw.reshape(1, -1), gguf.GGMLQuantizationType.Q6_K)).view(10, 256)
    out = torch.full((10, 256), float("nan"), dtype=torch.bfloat16)
    _functional(torch.from_numpy(raw), GGMLType.Q6_K, out)
    assert torch.equal(out, ref.bfloat16())
