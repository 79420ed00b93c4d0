"""Nothing silently wrong in the library: each class of bad input of issue 16 is refused where it is read, with a
message that names the file (and the key or tensor) and says what to do; good files next to them still load.

The same classes through the nodes of a real host: tests/test_reliability_host.py.  Fuzzing: test_fuzz_formats.py.
"""

from __future__ import annotations

import json
import logging
import shutil
import struct
from pathlib import Path

import pytest
import torch

from models import WeightFileError, identify, load_diffusion_model, load_text_encoder, load_vae, open_checkpoint
from models.encoders.tokenizer import TokenizerNotFoundError, find_tokenizer
from models.io.gguf import GGUFError, GGUFReader, open_text_encoder_gguf
from models.io.gguf.reader import GGMLType
from models.io.gguf.writer import GGUFWriter
from models.io.integrity import MIN_ZERO_TAIL
from references import host_tokenizer_dir
from tiny_models.factory import make_dit, make_text_encoder, make_vae
from tiny_models.gguf_factory import make_dit_gguf

INCOMPLETE = "incomplete download"


def zero_fill(source: Path, target: Path, start: float = 0.5) -> Path:
    """A copy of ``source`` of full size whose bytes from ``start`` (a fraction) on are zero: what an interrupted
    pre-allocating downloader leaves."""
    data = bytearray(source.read_bytes())
    cut = int(len(data) * start)
    data[cut:] = bytes(len(data) - cut)
    target.write_bytes(data)
    return target


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("reliability")
    return {"dit": make_dit(root, seed=3), "gguf": make_dit_gguf(root, seed=3), "vae": make_vae(root, seed=3),
            "dit_folder": make_dit(root, layout="diffusers", dtype="fp32", seed=3), "root": root}


# -- 1. half-downloaded files ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["dit", "gguf", "vae"])
def test_a_zero_filled_tail_is_refused_naming_the_file_and_tensors(files, tmp_path, kind):
    broken = zero_fill(files[kind], tmp_path / files[kind].name)
    assert broken.stat().st_size == files[kind].stat().st_size
    loader = load_vae if kind == "vae" else load_diffusion_model
    with pytest.raises(GGUFError if kind == "gguf" else WeightFileError) as failure:
        loader(broken)
    message = str(failure.value)
    assert str(broken) in message and INCOMPLETE in message and "Download the file again" in message
    assert "whole tensor(s) (from '" in message  # names the first tensors that never arrived
    loader(files[kind])  # the complete file still loads


def test_a_short_zero_tail_is_not_a_download_failure(files, tmp_path):
    # The last tensor in the file deliberately zero (a zero-initialised bias): real, and loads.
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(files["dit"]))
    header = json.loads(files["dit"].read_bytes()[8:8 + struct.unpack("<Q", files["dit"].read_bytes()[:8])[0]])
    last = max(tensors, key=lambda name: header[name]["data_offsets"][1])
    tensors[last] = torch.zeros_like(tensors[last])
    save_file(tensors, str(tmp_path / "zero_bias.safetensors"))
    assert tensors[last].numel() * tensors[last].element_size() < MIN_ZERO_TAIL
    model = load_diffusion_model(tmp_path / "zero_bias.safetensors")
    assert not model.state_dict()[last].any()


def test_zero_filled_shard_of_a_folder_is_refused(files, tmp_path):
    folder = Path(shutil.copytree(files["dit_folder"], tmp_path / "transformer"))
    shard = sorted(folder.glob("*.safetensors"))[-1]
    zero_fill(shard, shard, start=0.3)
    with pytest.raises(WeightFileError, match=INCOMPLETE) as failure:
        load_diffusion_model(folder)
    assert shard.name in str(failure.value)


# -- 8. damaged safetensors headers and config.json -----------------------------------------------------------------
def _safetensors(path: Path, header: dict, data: bytes = bytes(range(1, 33))) -> Path:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


GOOD = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
BAD_HEADERS = {
    "string offsets": ({"a": {**GOOD, "data_offsets": ["0", "8"]}}, "data_offsets [\"0\", \"8\"]"),
    "string shape": ({"a": {**GOOD, "shape": ["2"]}}, "shape [\"2\"]"),
    "negative shape": ({"a": {**GOOD, "shape": [-2, -1]}}, "shape [-2, -1]"),
    "bool shape": ({"a": {**GOOD, "shape": [True, 2]}}, "shape [true, 2]"),
    "float shape": ({"a": {**GOOD, "shape": [2.0]}}, "shape [2.0]"),
    "list dtype": ({"a": {**GOOD, "dtype": ["F32"]}}, "dtype [\"F32\"]"),
    "reversed offsets": ({"a": {**GOOD, "data_offsets": [8, 0]}}, "data_offsets [8, 0]"),
    "three offsets": ({"a": {**GOOD, "data_offsets": [0, 8, 9]}}, "data_offsets [0, 8, 9]"),
    "entry is null": ({"a": None}, "described by null"),
    "size mismatch": ({"a": {**GOOD, "shape": [3]}}, "8 bytes of data for shape [3]"),
    "overlap": ({"a": GOOD, "b": {**GOOD, "data_offsets": [4, 12]}}, "'a' and 'b' overlap"),
    "metadata list": ({"__metadata__": [1], "a": GOOD}, "__metadata__ is not an object"),
}


@pytest.mark.parametrize("case", BAD_HEADERS)
def test_damaged_safetensors_headers_are_refused(tmp_path, case):
    header, detail = BAD_HEADERS[case]
    path = _safetensors(tmp_path / "damaged.safetensors", header)
    with pytest.raises(WeightFileError) as failure:
        open_checkpoint(path)
    assert str(path) in str(failure.value) and detail in str(failure.value)


def test_a_valid_hand_written_header_reads_its_values(tmp_path):
    path = _safetensors(tmp_path / "good.safetensors", {"a": GOOD, "b": {**GOOD, "data_offsets": [8, 16]}},
                        struct.pack("<4f", 1.0, 2.0, 3.0, 4.0))
    checkpoint = open_checkpoint(path)
    assert checkpoint["a"].tolist() == [1.0, 2.0] and checkpoint["b"].tolist() == [3.0, 4.0]


def _with_config(folder: Path, target: Path, config) -> Path:
    copy = Path(shutil.copytree(folder, target))
    (copy / "config.json").write_text(json.dumps(config))
    return copy


def test_config_json_that_is_not_an_object_is_refused(files, tmp_path):
    folder = _with_config(files["dit_folder"], tmp_path / "list", [1, 2])
    with pytest.raises(WeightFileError) as failure:
        load_diffusion_model(folder)
    assert str(folder / "config.json") in str(failure.value) and "not a list" in str(failure.value)


def test_config_json_nulls_mean_not_set(files, tmp_path):
    config = json.loads((files["dit_folder"] / "config.json").read_text())
    nulls = _with_config(files["dit_folder"], tmp_path / "nulls", {key: None for key in config})
    plain = load_diffusion_model(files["dit_folder"])
    nulled = load_diffusion_model(nulls)
    assert nulled.config == plain.config
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), nulled.state_dict().values()))


@pytest.mark.parametrize("key,value", [("axes_dims_rope", "x"), ("axes_dims_rope", [4, 14]),
                                       ("axes_dims_rope", [40, -4, -4]), ("zero_cond_t", "yes")])
def test_config_json_values_of_the_wrong_kind_name_the_key(files, tmp_path, key, value):
    config = json.loads((files["dit_folder"] / "config.json").read_text())
    folder = _with_config(files["dit_folder"], tmp_path / "wrong", {**config, key: value})
    with pytest.raises(WeightFileError) as failure:
        load_diffusion_model(folder)
    message = str(failure.value)
    assert str(folder / "config.json") in message and f"'{key}' is {json.dumps(value)}" in message


@pytest.fixture(scope="module")
def hf_text_encoder(tmp_path_factory) -> Path:
    return make_text_encoder(tmp_path_factory.mktemp("hf"), layout="hf", dtype="fp32", seed=2,
                             tokenizer_dir=host_tokenizer_dir())


@pytest.mark.parametrize("key,value,detail", [
    ("text_config", [1], "'text_config' is [1]"),
    ("text_config.rms_norm_eps", "tiny", "'text_config.rms_norm_eps' is \"tiny\""),
    ("text_config.rope_scaling", {"mrope_section": ["2", 3, 3]}, "mrope_section is ['2', 3, 3]"),
    ("vision_config.num_heads", 0.5, "'vision_config.num_heads' is 0.5"),
    ("vision_config.fullatt_block_indexes", [0, 99], "fullatt_block_indexes is [0, 99]"),
    ("vision_config.window_size", 5, "window 5"),
])
def test_text_encoder_config_values_are_checked(hf_text_encoder, tmp_path, key, value, detail):
    config = json.loads((hf_text_encoder / "config.json").read_text())
    *parents, leaf = key.split(".")
    target = config
    for parent in parents:
        target = target[parent]
    target[leaf] = value
    folder = _with_config(hf_text_encoder, tmp_path / "te", config)
    with pytest.raises(WeightFileError) as failure:
        load_text_encoder(folder)
    assert str(folder) in str(failure.value) and detail in str(failure.value), str(failure.value)


# -- 2. GGUF metadata of the wrong kind ----------------------------------------------------------------------------
@pytest.mark.parametrize("key,value", [("qwen2vl.attention.head_count", "four"),
                                       ("qwen2vl.attention.layer_norm_rms_epsilon", -1.0),
                                       ("qwen2vl.rope.dimension_sections", 7)])
def test_gguf_text_metadata_of_the_wrong_kind_names_the_key(tmp_path, key, value):
    writer = GGUFWriter(tmp_path / "text.gguf", "qwen2vl")
    writer.add(key, value)
    writer.add_tensor("token_embd.weight", torch.ones(4, 8), GGMLType.F32, (4, 8))
    with pytest.raises(GGUFError) as failure:
        open_text_encoder_gguf(writer.write())
    assert str(tmp_path / "text.gguf") in str(failure.value) and f"'{key}'" in str(failure.value)


# -- 3. a text encoder of another size -----------------------------------------------------------------------------
def _qwen25_header(width: int, vision: bool = True) -> dict[str, torch.Tensor]:
    """Names and shapes of a Qwen2.5(-VL) of ``width`` (tiny data: identification reads shapes only)."""
    tensors = {"model.embed_tokens.weight": torch.ones(2, width), "model.norm.weight": torch.ones(width),
               "model.layers.0.self_attn.q_proj.bias": torch.ones(width)}
    if vision:
        tensors["visual.blocks.0.attn.qkv.weight"] = torch.ones(3, 2)
    return tensors


@pytest.mark.parametrize("width,size", [(2048, "3B"), (5120, "14B / 32B"), (8192, "72B"), (1536, "1.5B")])
def test_qwen25_of_another_size_is_named_and_refused_by_the_loader(tmp_path, width, size):
    from safetensors.torch import save_file

    path = tmp_path / f"qwen2.5_vl_{size.split()[0]}.safetensors"
    save_file(_qwen25_header(width), str(path))
    identity = identify(path)
    assert (identity.family, identity.role, identity.supported) == ("qwen2.5", "text_encoder", False)
    with pytest.raises(WeightFileError) as failure:
        load_text_encoder(path)
    message = str(failure.value)
    assert str(path) in message and f"{size} size ({width} wide)" in message and "Qwen2.5-VL-7B" in message
    assert "qwen_2.5_vl_7b" in message


def test_a_qwen25_vl_3b_gguf_is_refused_too(tmp_path):
    writer = GGUFWriter(tmp_path / "Qwen2.5-VL-3B-Instruct-Q8_0.gguf", "qwen2vl")
    writer.add_tensor("token_embd.weight", torch.ones(2, 2048), GGMLType.F32, (2, 2048))
    with pytest.raises(GGUFError) as failure:
        load_text_encoder(writer.write())
    assert "3B size (2048 wide)" in str(failure.value) and "Qwen2.5-VL-7B" in str(failure.value)


@pytest.mark.parametrize("width", [3584, 64])
def test_the_7b_width_and_tiny_models_stay_supported(width):
    identity = identify(_qwen25_header(width))
    assert (identity.family, identity.role, identity.supported) == ("qwen_image", "text_encoder", True)


# -- 9. images the VAE cannot encode -------------------------------------------------------------------------------
@pytest.mark.parametrize("shape,detail", [((1, 4, 4, 3), "got 1 of 4x4"), ((0, 64, 64, 3), "got 0 of 64x64"),
                                          ((1, 0, 0, 3), "got 1 of 0x0")])
def test_vae_encode_refuses_empty_and_tiny_images(files, shape, detail):
    vae = load_vae(files["vae"])
    with pytest.raises(ValueError) as failure:
        vae.encode(torch.rand(shape))
    assert "at least 8x8 pixels" in str(failure.value) and detail in str(failure.value)
    assert vae.encode(torch.rand(1, 8, 8, 3)).shape == (1, 16, 1, 1)  # one latent cell is enough


def test_vae_decode_refuses_an_empty_batch(files):
    with pytest.raises(ValueError, match="empty latent batch"):
        load_vae(files["vae"]).decode(torch.zeros(0, 16, 4, 4))


# -- 10. the tokenizer search ----------------------------------------------------------------------------------------
def test_a_stray_vocab_json_does_not_stop_the_search(tmp_path):
    (tmp_path / "vocab.json").write_text(json.dumps({"a": 0}))
    weights = tmp_path / "qwen_2.5_vl_7b.safetensors"
    tokenizer = find_tokenizer(weights=weights, host_dirs=[host_tokenizer_dir()])
    assert tokenizer.source == str(host_tokenizer_dir())
    assert tokenizer.token_id("<|image_pad|>") == 151655


def test_a_damaged_tokenizer_next_to_the_weights_is_skipped_with_a_warning(tmp_path, caplog):
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        shutil.copyfile(host_tokenizer_dir() / name, tmp_path / name)
    (tmp_path / "vocab.json").write_text('{"a": "not an id"}')
    with caplog.at_level(logging.WARNING, logger="qwen_image"):
        tokenizer = find_tokenizer(weights=tmp_path / "te.safetensors", host_dirs=[host_tokenizer_dir()])
    assert tokenizer.source == str(host_tokenizer_dir())
    assert any(str(tmp_path) in record.getMessage() for record in caplog.records)
    with pytest.raises(WeightFileError, match="non-negative integer ids"):  # chosen explicitly: an error
        find_tokenizer(explicit=tmp_path)


def test_without_any_tokenizer_every_place_is_listed(tmp_path):
    (tmp_path / "vocab.json").write_text("{}")
    with pytest.raises(TokenizerNotFoundError) as failure:
        find_tokenizer(weights=tmp_path / "te.safetensors", host_dirs=[tmp_path / "nowhere"])
    assert str(tmp_path) in str(failure.value) and str(tmp_path / "nowhere") in str(failure.value)


def test_the_gguf_reader_refuses_a_zero_filled_tail_before_any_tensor_is_read(files, tmp_path):
    broken = zero_fill(files["gguf"], tmp_path / "broken.gguf")
    with pytest.raises(GGUFError, match=INCOMPLETE):
        GGUFReader(broken)
