"""The strict GGUF reader: parity with gguf-py on valid files, GGUFError (fast) on malformed ones, fuzzing."""

from __future__ import annotations

import struct
import tempfile
import time
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from models.io.gguf import GGUFError, GGUFReader, dequantize
from models.io.gguf.dequant import DEQUANTIZABLE_TYPES

# -- hand-built GGUF bytes (for malformed files) ----------------------------------------------------------------
U8, I8, U16, I16, U32, I32, F32, BOOL, STR, ARR, U64, I64, F64 = range(13)


def s(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(raw)) + raw


def kv(key: str | bytes, vtype: int, payload: bytes) -> bytes:
    return s(key) + struct.pack("<I", vtype) + payload


def arr(etype: int, count: int, payload: bytes = b"") -> bytes:
    return struct.pack("<IQ", etype, count) + payload


def tinfo(name: str | bytes, ne: list[int], qtype: int, offset: int) -> bytes:
    return s(name) + struct.pack("<I", len(ne)) + b"".join(struct.pack("<Q", d) for d in ne) + \
        struct.pack("<I", qtype) + struct.pack("<Q", offset)


def build(kvs: list[bytes] = (), tensors: list[bytes] = (), data: bytes = b"", *, version: int = 3,
          n_tensors: int | None = None, n_kv: int | None = None, alignment: int = 32, magic: bytes = b"GGUF",
          pad: bool = True) -> bytes:
    head = magic + struct.pack("<IQQ", version, len(tensors) if n_tensors is None else n_tensors,
                               len(kvs) if n_kv is None else n_kv)
    body = head + b"".join(kvs) + b"".join(tensors)
    if pad:
        body += b"\0" * (-len(body) % alignment)
    return body + data


F32_TENSOR = tinfo("w", [4, 2], 0, 0)  # 2x4 fp32 = 32 bytes
DATA32 = np.arange(8, dtype=np.float32).tobytes()


def q8_info(name: str, offset: int) -> bytes:
    return tinfo(name, [32, 1], 8, offset)  # one Q8_0 block = 34 bytes


MALFORMED: dict[str, bytes] = {
    "empty": b"",
    "ten_bytes": b"GGUF\x03\0\0\0\0\0",
    "bad_magic": build([], [F32_TENSOR], DATA32, magic=b"GGML"),
    "version_1": build([], [F32_TENSOR], DATA32, version=1),
    "version_99": build([], [F32_TENSOR], DATA32, version=99),
    "big_endian": build([], [F32_TENSOR], DATA32, version=3 << 24),
    "huge_tensor_count": build([], [F32_TENSOR], DATA32, n_tensors=1 << 60),
    "huge_kv_count": build([kv("a", U8, b"\1")], [], b"", n_kv=(1 << 64) - 1),
    "tensor_count_slightly_too_big": build([], [F32_TENSOR], DATA32, n_tensors=3),
    "kv_count_too_big": build([kv("a", U32, b"\1\0\0\0")] * 1, [], b"", n_kv=2),
    "huge_key_length": build([struct.pack("<Q", 1 << 62) + b"key"], [], b""),
    "huge_string_value": build([s("k") + struct.pack("<I", STR) + struct.pack("<Q", 1 << 40) + b"abc"]),
    "huge_numeric_array": build([kv("a", ARR, arr(U32, 1_000_000, b"\0" * 64))]),
    "huge_string_array": build([kv("a", ARR, arr(STR, 10_000_000, s("x") * 4))]),
    "huge_array_of_arrays": build([kv("a", ARR, arr(ARR, 1 << 40, arr(U8, 0)))]),
    "string_in_array_past_end": build([kv("a", ARR, arr(STR, 2, s("ok") + struct.pack("<Q", 1000) + b"xx"))]),
    "bad_value_type": build([kv("a", 99, b"\0" * 8)]),
    "bad_array_element_type": build([kv("a", ARR, arr(13, 1, b"\0" * 8))]),
    "nested_array_bomb": build([kv("a", ARR, b"".join(arr(ARR, 1) for _ in range(50)) + arr(U8, 0))]),
    "nested_array_huge_inner": build([kv("a", ARR, arr(ARR, 2, arr(U64, 1 << 50)))]),
    "bool_not_0_or_1": build([kv("a", BOOL, b"\x07")]),
    "bool_array_not_0_or_1": build([kv("a", ARR, arr(BOOL, 3, b"\x01\x00\x05"))]),
    "duplicate_key": build([kv("a", U8, b"\1"), kv("a", U8, b"\2")]),
    "key_not_utf8": build([kv(b"\xff\xfe", U8, b"\1")]),
    "alignment_zero": build([kv("general.alignment", U32, struct.pack("<I", 0))], [F32_TENSOR], DATA32),
    "alignment_not_power_of_two": build([kv("general.alignment", U32, struct.pack("<I", 24))], [F32_TENSOR],
                                        DATA32, alignment=24),
    "alignment_wrong_type": build([kv("general.alignment", STR, s("32"))], [F32_TENSOR], DATA32),
    "alignment_huge": build([kv("general.alignment", U64, struct.pack("<Q", 1 << 40))], [F32_TENSOR], DATA32),
    "n_dims_zero": build([], [tinfo("w", [], 0, 0)], DATA32),
    "n_dims_five": build([], [tinfo("w", [1, 1, 1, 1, 8], 0, 0)], DATA32),
    "zero_dim": build([], [tinfo("w", [4, 0], 0, 0)], DATA32),
    "negative_dim": build([], [tinfo("w", [4, (1 << 64) - 2], 0, 0)], DATA32),
    "dims_product_overflow": build([], [tinfo("w", [1 << 32, 1 << 32, 1 << 32], 0, 0)], DATA32),
    "unknown_quant_type": build([], [tinfo("w", [4, 2], 99, 0)], DATA32),
    "removed_quant_type_4": build([], [tinfo("w", [32, 1], 4, 0)], DATA32),
    "row_not_multiple_of_block": build([], [tinfo("w", [33, 1], 8, 0)], DATA32 * 2),
    "misaligned_offset": build([], [tinfo("w", [4, 1], 0, 8)], DATA32),
    "offset_out_of_range": build([], [tinfo("w", [4, 2], 0, 1 << 20)], DATA32),
    "offset_near_2_64": build([], [tinfo("w", [4, 2], 0, (1 << 64) - 32)], DATA32),
    "tensor_past_end": build([], [tinfo("w", [4, 4], 0, 0)], DATA32),
    "overlapping_tensors": build([], [q8_info("a", 0), q8_info("b", 32)], b"\0" * 96),
    "duplicate_tensor_names": build([], [q8_info("a", 0), q8_info("a", 64)], b"\0" * 128),
    "tensor_name_not_utf8": build([], [tinfo(b"\xc3\x28", [4, 2], 0, 0)], DATA32),
    "data_section_missing": build([], [F32_TENSOR], b"", pad=False),
    "tensor_info_truncated": build([], [F32_TENSOR[:-5]], b"", pad=False),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_file_raises_gguf_error_fast(case: str, tmp_path: Path):
    path = tmp_path / f"{case}.gguf"
    path.write_bytes(MALFORMED[case])
    start = time.perf_counter()
    with pytest.raises(GGUFError) as info:
        GGUFReader(path)
    elapsed = time.perf_counter() - start
    assert elapsed < 1.0, f"{case}: took {elapsed:.2f} s"
    assert str(path) in str(info.value)
    assert isinstance(info.value, ValueError)


def test_malformed_messages_name_the_key_or_tensor(tmp_path: Path):
    for case, needle in [("duplicate_key", "'a'"), ("tensor_past_end", "tensor 'w'"),
                         ("overlapping_tensors", "overlaps"), ("alignment_zero", "general.alignment"),
                         ("huge_numeric_array", "1000000 elements"), ("unknown_quant_type", "unknown ggml type 99")]:
        path = tmp_path / f"{case}.gguf"
        path.write_bytes(MALFORMED[case])
        with pytest.raises(GGUFError, match=needle):
            GGUFReader(path)


def test_missing_file_is_gguf_error(tmp_path: Path):
    with pytest.raises(GGUFError, match="cannot open"):
        GGUFReader(tmp_path / "nope.gguf")


# -- valid files written by gguf-py ------------------------------------------------------------------------------

def write_reference_file(path: Path, n_tokens: int = 40) -> dict[str, np.ndarray]:
    """A small but varied GGUF written by gguf-py; returns the float tensors it quantized."""
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), "qwen_image")
    w.add_uint8("t.u8", 200)
    w.add_int8("t.i8", -5)
    w.add_uint16("t.u16", 60000)
    w.add_int16("t.i16", -30000)
    w.add_uint32("t.u32", 4_000_000_000)
    w.add_int32("t.i32", -2_000_000_000)
    w.add_float32("t.f32", 0.25)
    w.add_uint64("t.u64", 1 << 60)
    w.add_int64("t.i64", -(1 << 60))
    w.add_float64("t.f64", 1e300)
    w.add_bool("t.bool", True)
    w.add_string("t.str", "Qwen-Image ✓")
    w.add_array("t.ints", [1, 2, 3])
    w.add_array("t.floats", [0.5, 1.5])
    w.add_array("t.nested", [[1, 2], [3]])
    w.add_array("t.empty", [])
    w.add_array("tokenizer.ggml.tokens", [f"tok{i}Ġ" for i in range(n_tokens)])
    w.add_array("tokenizer.ggml.token_type", [1] * n_tokens)
    tensors = {}
    for name, qtype, shape in [("a.q8", "Q8_0", (3, 64)), ("b.q4", "Q4_0", (2, 32)), ("c.q51", "Q5_1", (4, 32)),
                               ("d.f16", "F16", (5, 7)), ("e.f32", "F32", (9,)), ("f.bf16", "BF16", (2, 3, 4))]:
        x = rng.standard_normal(shape).astype(np.float32)
        tensors[name] = x
        t = gguf.GGMLQuantizationType[qtype]
        w.add_tensor(name, gguf.quants.quantize(x, t), raw_dtype=t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return tensors


def plain(value):
    if isinstance(value, (list, tuple)) or hasattr(value, "__len__") and not isinstance(value, (str, bytes)):
        return [plain(v) for v in value]
    return value


def test_matches_gguf_py_reader(tmp_path: Path):
    path = tmp_path / "ref.gguf"
    write_reference_file(path, n_tokens=3000)
    ours = GGUFReader(path)
    ref = gguf.GGUFReader(str(path))
    assert ours.arch == "qwen_image"
    assert ours.version == 3
    assert set(ours.metadata) == {k for k in ref.fields if not k.startswith("GGUF.")}
    for key, field in ref.fields.items():
        if key.startswith("GGUF."):
            continue
        value = plain(ours.metadata[key])
        if key == "t.nested":  # gguf-py's contents() flattens nested arrays
            assert value == [[1, 2], [3]]
            value = [x for inner in value for x in inner]
        assert value == plain(field.contents()), key
    assert list(ours.tensors) == [t.name for t in ref.tensors]
    for t in ref.tensors:
        info = ours.tensors[t.name]
        assert info.shape == tuple(int(d) for d in reversed(t.shape.tolist()))
        assert info.qtype == int(t.tensor_type)
        assert info.offset == t.data_offset
        assert info.nbytes == t.n_bytes
        raw = ours.raw(t.name)
        assert raw.dtype == torch.uint8
        assert raw.numpy().tobytes() == np.asarray(t.data).tobytes()


def test_raw_is_a_zero_copy_view_of_the_file(tmp_path: Path):
    path = tmp_path / "ref.gguf"
    write_reference_file(path)
    reader = GGUFReader(path)
    a, b = reader.raw("a.q8"), reader.raw("a.q8")
    assert a.data_ptr() == b.data_ptr()
    assert tuple(a.shape) == (3, 2 * 34)


def test_lazy_string_array_and_fast_open(tmp_path: Path):
    path = tmp_path / "tok.gguf"
    w = gguf.GGUFWriter(str(path), "qwen2vl")
    tokens = [f"Ġtoken{i}" for i in range(152_064)]
    merges = [f"Ġ t{i}" for i in range(151_387)]
    w.add_array("tokenizer.ggml.tokens", tokens)
    w.add_array("tokenizer.ggml.merges", merges)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    start = time.perf_counter()
    reader = GGUFReader(path)
    elapsed = time.perf_counter() - start
    assert elapsed < 1.0  # limit check (gguf-py needs many seconds here)
    assert len(reader.metadata["tokenizer.ggml.tokens"]) == len(tokens)
    assert reader.metadata["tokenizer.ggml.tokens"][151_000] == tokens[151_000]
    assert list(reader.metadata["tokenizer.ggml.merges"]) == merges


@pytest.mark.parametrize("fraction", [i / 23 for i in range(1, 23)])
def test_truncated_valid_file_raises(tmp_path: Path, fraction: float):
    path = tmp_path / "ref.gguf"
    write_reference_file(path)
    reader = GGUFReader(path)
    end_of_data = max(t.offset + t.nbytes for t in reader.tensors.values())
    data = path.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[:max(1, int(end_of_data * fraction))])
    start = time.perf_counter()
    with pytest.raises(GGUFError):
        GGUFReader(cut)
    assert time.perf_counter() - start < 1.0


# -- fuzzing ------------------------------------------------------------------------------------------------------
_FUZZ_DIR = Path(tempfile.mkdtemp(prefix="gguf_fuzz_"))
_BASE: list[bytes] = []


def base_file() -> bytes:
    if not _BASE:
        write_reference_file(_FUZZ_DIR / "base.gguf", n_tokens=20)
        _BASE.append((_FUZZ_DIR / "base.gguf").read_bytes())
    return _BASE[0]


_mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 1 << 16), st.integers(1, 255)),
    st.tuples(st.just("truncate"), st.integers(0, 1 << 16), st.just(0)),
    st.tuples(st.just("insert"), st.integers(0, 1 << 16), st.integers(0, 255)),
    st.tuples(st.just("u64"), st.integers(0, 1 << 16), st.sampled_from([0, 1, 3, 5, 255, 1 << 31, 1 << 40,
                                                                          (1 << 64) - 1])),
)


def mutate(data: bytes, ops) -> bytes:
    buf = bytearray(data)
    for op, pos, value in ops:
        if not buf:
            break
        pos %= len(buf)
        if op == "flip":
            buf[pos] ^= value
        elif op == "truncate":
            del buf[pos:]
        elif op == "insert":
            buf[pos:pos] = bytes([value]) * (1 + value % 7)
        else:
            buf[pos:pos + 8] = struct.pack("<Q", value)
    return bytes(buf)


@settings(max_examples=300, deadline=2000, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(_mutation, min_size=1, max_size=4))
def test_fuzzed_files_only_raise_gguf_error(ops):
    path = _FUZZ_DIR / "fuzz.gguf"
    path.write_bytes(mutate(base_file(), ops))
    try:
        reader = GGUFReader(path)
        for value in reader.metadata.values():
            plain(value)  # force lazy decoding
        for name, info in reader.tensors.items():
            if info.qtype in DEQUANTIZABLE_TYPES:
                dequantize(reader.raw(name), info.qtype, info.shape)
    except GGUFError:
        pass
