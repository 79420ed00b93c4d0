"""Property-based fuzzing of every format the pack reads: the only outcomes are a correct load or our documented
error (:class:`models.WeightFileError`, of which ``GGUFError`` and ``TokenizerNotFoundError`` are kinds) - never
another exception, a hang or a runaway allocation.

* safetensors headers (structured: any JSON in any field) and raw bytes after the length prefix;
* ``config.json`` of diffusers / HF folders, through the DiT and text-encoder loaders;
* tokenizer folders (vocab.json, merges.txt, tokenizer_config.json);
* LoRA files and any tensor names / shapes, through the registry (``identify``, ``models.load``);
* GGUF text-encoder metadata (the keys our loader reads) and tokenizer metadata; the GGUF container itself is
  fuzzed byte by byte in tests/test_gguf_reader.py;
* widget values of our nodes, posted to the real host: rejected by its validation, run, or refused by the node
  with a ValueError.

Every test has a fixed example budget and no per-example deadline beyond the suite's; the whole file runs in
well under a minute on two cores (the examples are tiny files).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import struct
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from models import WeightFileError, identify, load, load_diffusion_model, load_text_encoder, open_checkpoint
from models.encoders.tokenizer import QwenTokenizer, find_tokenizer
from models.io.gguf import GGUFReader, tokenizer_from_gguf
from models.io.gguf.writer import GGUFWriter
from references import host_tokenizer_dir
from tiny_models.factory import make_dit, make_text_encoder
from tiny_models.gguf_factory import make_text_encoder_gguf

FUZZ = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
                derandomize=True)
SAFETENSORS_DTYPES = ("F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL", "F8_E4M3", "F8_E5M2")

scalars = st.one_of(st.none(), st.booleans(), st.integers(-(1 << 70), 1 << 70), st.integers(-3, 70),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=6))
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=8)


def outcome(load, *args, **kwargs):
    """``load(*args, **kwargs)``, or None when it raises our documented error; the outcome is counted
    (``--hypothesis-show-statistics``: "loaded", or the refusal without the file's path)."""
    try:
        result = load(*args, **kwargs)
    except WeightFileError as error:
        event("refused: " + str(error).split(": ", 1)[-1][:40])
        return None
    event("loaded")
    return result


@contextlib.contextmanager
def scratch_folder(tmp_path: Path) -> Iterator[Path]:
    """A fresh folder for one example, removed after it (hypothesis runs many examples in one tmp_path)."""
    folder = _unique(tmp_path, "")
    folder.mkdir()
    try:
        yield folder
    finally:
        shutil.rmtree(folder)


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _unique(folder: Path, suffix: str) -> Path:
    return folder / f"{uuid.uuid4().hex}{suffix}"


# -- safetensors headers -------------------------------------------------------------------------------------------
entries = st.one_of(
    st.fixed_dictionaries({
        "dtype": st.sampled_from(SAFETENSORS_DTYPES) | json_values,
        "shape": st.lists(st.integers(-2, 6), max_size=3) | json_values,
        "data_offsets": st.lists(st.integers(-4, 80), min_size=2, max_size=2) | json_values}),
    json_values)
headers = st.dictionaries(st.sampled_from(["__metadata__", "a", "b", "img_in.weight", "lora_A.weight"])
                          | st.text(max_size=8), entries, max_size=4)


def _safetensors_bytes(header, data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


@settings(FUZZ, max_examples=250)
@given(header=headers, data=st.binary(max_size=96))
def test_fuzzed_safetensors_headers_load_correctly_or_raise_weight_file_error(tmp_path, header, data):
    path = _write(_unique(tmp_path, ".safetensors"), _safetensors_bytes(header, data))
    checkpoint = outcome(open_checkpoint, path)
    if checkpoint is None:
        return
    identify(checkpoint)
    for name in checkpoint:  # a header that was accepted describes its data exactly
        tensor = checkpoint[name]
        assert tuple(tensor.shape) == checkpoint.shape(name) and tensor.dtype == checkpoint.dtype(name)
        begin, end = header[name]["data_offsets"]
        assert tensor.numel() * tensor.element_size() == end - begin


@settings(FUZZ, max_examples=150)
@given(length=st.integers(0, (1 << 64) - 1) | st.integers(0, 200), body=st.binary(max_size=200))
def test_fuzzed_safetensors_bytes_raise_weight_file_error(tmp_path, length, body):
    outcome(open_checkpoint, _write(_unique(tmp_path, ".safetensors"), struct.pack("<Q", length) + body))


# -- config.json -----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fuzz-folders")
    return {"dit": make_dit(root, layout="diffusers", dtype="fp32", seed=5),
            "text_encoder": make_text_encoder(root, layout="hf", dtype="bf16", seed=5)}


@pytest.fixture(scope="module")
def tokenizer() -> QwenTokenizer:
    return QwenTokenizer.from_folder(host_tokenizer_dir())


def _key_paths(config: dict, prefix: tuple = ()) -> list[tuple]:
    paths = []
    for key, value in config.items():
        paths.append((*prefix, key))
        if isinstance(value, dict):
            paths += _key_paths(value, (*prefix, key))
    return paths


def _fuzzed_config(base: dict, changes: list[tuple[int, object]], whole) -> object:
    if whole is not None:
        return whole
    config = json.loads(json.dumps(base))
    paths = _key_paths(base)
    for index, value in changes:
        *parents, leaf = paths[index % len(paths)]
        target = config
        for parent in parents:
            target = target.get(parent) if isinstance(target, dict) else None
        if isinstance(target, dict):
            target[leaf] = value
    return config


def _fuzzed_copy(source: Path, folder: Path, changes: list, whole) -> None:
    """``source`` (a model folder) in ``folder``, its config.json fuzzed; the shards are linked (only read)."""
    for item in source.iterdir():
        (folder / item.name).symlink_to(item) if item.suffix == ".safetensors" else shutil.copy(item, folder)
    base = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(_fuzzed_config(base, changes, whole)))


config_changes = st.lists(st.tuples(st.integers(0, 1000), json_values), min_size=1, max_size=3)
whole_configs = st.none() | st.none() | st.none() | json_values


@settings(FUZZ, max_examples=60)
@given(changes=config_changes, whole=whole_configs)
def test_fuzzed_dit_config_json_loads_or_raises_weight_file_error(folders, tmp_path, changes, whole):
    with scratch_folder(tmp_path) as folder:
        _fuzzed_copy(folders["dit"], folder, changes, whole)
        outcome(load_diffusion_model, folder)


@settings(FUZZ, max_examples=25)
@given(changes=config_changes, whole=whole_configs)
def test_fuzzed_text_encoder_config_json_loads_or_raises_weight_file_error(folders, tokenizer, tmp_path, changes,
                                                                           whole):
    with scratch_folder(tmp_path) as folder:
        _fuzzed_copy(folders["text_encoder"], folder, changes, whole)
        outcome(load_text_encoder, folder, tokenizer=tokenizer)


# -- tokenizer files -----------------------------------------------------------------------------------------------
def _byte_level_alphabet() -> list[str]:
    """GPT-2's byte-to-unicode alphabet: the 256 base tokens of a byte-level BPE vocabulary."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(extra))]


SMALL_VOCAB = {token: index for index, token in enumerate(_byte_level_alphabet() + ["he", "ll", "hell", "Ġw"])}
SMALL_MERGES = ["#version: 0.2", "h e", "l l", "he ll", "Ġ w"]
SMALL_CONFIG = {"added_tokens_decoder": {str(260 + i): {"content": token, "special": True} for i, token in
                                         enumerate(["<|im_start|>", "<|im_end|>", "<|image_pad|>"])}}
tokenizer_files = st.fixed_dictionaries({
    "vocab.json": st.none() | json_values.map(json.dumps) | st.binary(max_size=40),
    "merges.txt": st.none() | st.lists(st.text(max_size=8), max_size=6).map("\n".join) | st.binary(max_size=40),
    "tokenizer_config.json": st.none() | json_values.map(json.dumps)
    | st.dictionaries(st.text(max_size=4), json_values, max_size=2).map(lambda d: json.dumps(
        {"added_tokens_decoder": d})) | st.binary(max_size=40),
})


@settings(FUZZ, max_examples=120)
@given(replaced=tokenizer_files)
def test_fuzzed_tokenizer_files_load_or_raise_weight_file_error(tmp_path, replaced):
    files = {"vocab.json": json.dumps(SMALL_VOCAB), "merges.txt": "\n".join(SMALL_MERGES),
             "tokenizer_config.json": json.dumps(SMALL_CONFIG)}
    with scratch_folder(tmp_path) as folder:
        for name, content in {**files, **{k: v for k, v in replaced.items() if v is not None}}.items():
            (folder / name).write_bytes(content if isinstance(content, bytes) else content.encode())
        loaded = outcome(find_tokenizer, explicit=folder)
    if loaded is not None:
        assert all(isinstance(i, int) for i in loaded.encode("hello world <|im_start|>"))


gguf_tokens = st.one_of(st.lists(st.text(max_size=4), max_size=12), st.lists(st.integers(0, 9), max_size=5),
                        st.text(max_size=5), st.integers())
gguf_types = st.one_of(st.lists(st.integers(-1, 6), max_size=12), st.lists(st.text(max_size=2), max_size=3),
                       st.floats(), st.none())


@settings(FUZZ, max_examples=150)
@given(tokens=gguf_tokens, merges=gguf_tokens, types=gguf_types)
def test_fuzzed_gguf_tokenizer_metadata_builds_or_raises_weight_file_error(tokens, merges, types):
    metadata = {"tokenizer.ggml.tokens": tokens, "tokenizer.ggml.merges": merges}
    if types is not None:
        metadata["tokenizer.ggml.token_type"] = types
    built = outcome(tokenizer_from_gguf, metadata)
    if built is not None:
        built.encode("a b")


# -- GGUF text-encoder metadata ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gguf_pair(tmp_path_factory) -> tuple[GGUFReader, GGUFReader]:
    text, mmproj = make_text_encoder_gguf(tmp_path_factory.mktemp("fuzz-gguf"), qtype="Q8_0", seed=5)
    return GGUFReader(text), GGUFReader(mmproj)


TEXT_KEYS = ("qwen2vl.attention.head_count", "qwen2vl.attention.layer_norm_rms_epsilon", "qwen2vl.rope.freq_base",
             "qwen2vl.rope.dimension_sections", "qwen2vl.embedding_length")
MMPROJ_KEYS = ("clip.vision.attention.head_count", "clip.vision.window_size", "clip.vision.block_count",
               "clip.vision.n_wa_pattern", "clip.vision.projection_dim")
gguf_values = st.one_of(st.integers(1, 130), st.integers(1, 8), st.integers(-(1 << 40), 1 << 40), st.floats(width=32),
                        st.text(max_size=4), st.booleans(), st.lists(st.integers(0, 40), max_size=5),
                        st.lists(st.text(max_size=3), max_size=3))


def _rewrite(reader: GGUFReader, path: Path, overrides: dict) -> Path:
    """A copy of ``reader``'s file (same tensor bytes) with some metadata values replaced."""
    writer = GGUFWriter(path, None)
    for key, value in {**reader.metadata, **overrides}.items():
        if key != "general.alignment":
            writer.add(key, value)
    for name, info in reader.tensors.items():
        writer.add_tensor(name, reader.raw(name).numpy().tobytes(), info.qtype, info.shape)
    return writer.write()


@settings(FUZZ, max_examples=30)
@given(text=st.dictionaries(st.sampled_from(TEXT_KEYS), gguf_values, max_size=2),
       vision=st.dictionaries(st.sampled_from(MMPROJ_KEYS), gguf_values, max_size=2))
def test_fuzzed_gguf_text_encoder_metadata_loads_or_raises_weight_file_error(gguf_pair, tokenizer, tmp_path, text,
                                                                             vision):
    with scratch_folder(tmp_path) as folder:
        path = _rewrite(gguf_pair[0], folder / "Qwen2.5-VL-7B-Instruct-Q8_0.gguf", text)
        _rewrite(gguf_pair[1], folder / "mmproj-F16.gguf", vision)
        outcome(load_text_encoder, path, tokenizer=tokenizer)


# -- LoRA files and tensor names: the registry -------------------------------------------------------------------------
NAME_PARTS = ("transformer.", "diffusion_model.", "lora_unet_", "model.diffusion_model.", "first_stage_model.",
              "transformer_blocks.0.", "img_in", "txt_in", "proj_out", "attn.add_q_proj", "attn.norm_q", "img_mod.1",
              "controlnet_x_embedder", "controlnet_blocks.0.x_rms", "encoder.conv1", "encoder.conv_in", "conv2",
              "post_quant_conv", "quant_conv", "model.embed_tokens", "model.layers.0.self_attn.q_proj", "visual.",
              "double_blocks.", ".lora_A", ".lora_B", ".lora_down", ".lora_up", ".alpha", ".weight", ".bias",
              "__index_timestep_zero__", "time_text_embed.addition_t_embedding", "modulation.1", "txt_in.in_layer")
tensor_names = st.lists(st.sampled_from(NAME_PARTS), min_size=1, max_size=4).map("".join)
tensors = st.dictionaries(tensor_names, st.lists(st.integers(0, 5), max_size=5), max_size=10)


@settings(FUZZ, max_examples=300)
@given(shapes=tensors)
def test_the_registry_names_any_tensor_mapping(shapes):
    found = identify({name: torch.empty(shape) for name, shape in shapes.items()})
    assert found.family and found.role and found.description


lora_entries = st.dictionaries(tensor_names, st.lists(st.integers(1, 4), min_size=0, max_size=2), min_size=1,
                               max_size=6)


@settings(FUZZ, max_examples=60)
@given(shapes=lora_entries, lora=st.sampled_from([".lora_A.weight", ".lora_down.weight", ".hada_w1_a"]))
def test_fuzzed_lora_files_are_named_and_refused(tmp_path, shapes, lora):
    from safetensors.torch import save_file

    tensors = {name + lora: torch.full(shape, 0.5) for name, shape in shapes.items()}
    path = _unique(tmp_path, ".safetensors")
    save_file(tensors, str(path))
    assert identify(path).role == "lora"
    with pytest.raises(WeightFileError, match="LoRA"):
        load(path)


# -- widget values through the real host ---------------------------------------------------------------------------
WIDGET_NODES = ("QIP_EmptyLatent", "QIP_EditLatent", "QIP_ControlPreprocess")
# Upper bounds for in-range draws that keep every run small (the declared maxima allocate gigabytes by design).
WIDGET_CAPS = {"batch_size": 4}
INT_CAP = 1024
anything = st.one_of(st.integers(-5, 1 << 40), st.floats(allow_nan=False), st.text(max_size=4), st.none(),
                     st.lists(st.integers(), max_size=2))


def _graph(kind: str, values: dict) -> dict:
    """A small graph around one of our nodes with ``values`` as its widgets, ending in an output node."""
    node = {"class_type": kind, "inputs": dict(values)}
    graph = {"n": node}
    if kind != "QIP_EmptyLatent":
        graph["load"] = {"class_type": "LoadImage", "inputs": {"image": "fuzz.png"}}
        node["inputs"]["image"] = ["load", 0]
    if kind == "QIP_ControlPreprocess":
        graph["out"] = {"class_type": "PreviewImage", "inputs": {"images": ["n", 0]}}
    else:
        graph["out"] = {"class_type": "SaveLatent", "inputs": {"samples": ["n", 0], "filename_prefix": "fuzz"}}
    return graph


def _widget(name: str, spec: list) -> st.SearchStrategy | None:
    """Values for one widget within its declared choices or range."""
    kind, options = spec[0], (spec[1] if len(spec) > 1 else {})
    if isinstance(kind, list) or kind == "COMBO":  # a V1 or a V3 (our nodes) combo
        return st.sampled_from(kind if isinstance(kind, list) else options["options"])
    if kind == "INT":
        return st.integers(options.get("min", 0), min(options.get("max", INT_CAP), WIDGET_CAPS.get(name, INT_CAP)))
    if kind == "FLOAT":
        return st.floats(options.get("min", -10.0), options.get("max", 10.0))
    return None  # a link (IMAGE ...), not a widget


def _widgets(object_info: dict) -> st.SearchStrategy:
    """(node id, widget values) for one of :data:`WIDGET_NODES`, from the host's own description of the node:
    every widget within its choices or range, or one of them replaced by anything at all."""
    def node(kind: str) -> st.SearchStrategy:
        inputs = object_info[kind]["input"]["required"]
        widgets = {name: strategy for name, spec in inputs.items() if (strategy := _widget(name, spec)) is not None}
        junk = st.none() | st.tuples(st.sampled_from(sorted(widgets)), anything)
        return st.tuples(st.just(kind), st.fixed_dictionaries(widgets), junk).map(
            lambda drawn: (drawn[0], {**drawn[1], **dict([drawn[2]] if drawn[2] else [])}))

    return st.one_of(*map(node, WIDGET_NODES))


@pytest.fixture(scope="module")
def widget_host(host):
    import numpy as np

    host.add_inputs({"fuzz.png": (np.random.default_rng(0).random((40, 56, 3)) * 255).astype(np.uint8)})
    return host, host.object_info()


@settings(FUZZ, max_examples=50)
@given(data=st.data())
def test_fuzzed_widget_values_are_validated_run_or_refused_with_a_value_error(widget_host, data):
    host, object_info = widget_host
    kind, values = data.draw(_widgets(object_info), label="node and widgets")
    status, body = host.post("/prompt", {"prompt": _graph(kind, values), "client_id": "fuzz"})
    if status != 200 or body.get("node_errors"):  # the host's validation: types, ranges, choices
        assert status == 400 and (body.get("node_errors") or body.get("error")), body
        event(f"{kind}: rejected by the host")
        return
    entry = host.wait(body["prompt_id"], timeout=120)
    errors = [m[1] for m in entry["status"].get("messages", []) if m[0] == "execution_error"]
    if errors:  # our node refused the values, with a message
        error = errors[0]
        assert error["node_type"] == kind and error["exception_type"].endswith("ValueError"), (
            kind, values, error["exception_type"], error["exception_message"])
        assert error["exception_message"].strip()
        event(f"{kind}: refused by the node")
    else:
        assert entry["status"]["status_str"] == "success" and entry["outputs"]
        event(f"{kind}: ran")
