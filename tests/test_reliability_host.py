"""Every error at the right node: the classes of issue 16 through the nodes of a real host.

Each failing graph must stop at the node whose input is wrong, and the message must name that input (for
loaders), the file and what to do; the graphs that must work produce the same latent as the plain setup.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from models.io.gguf import load_gguf_state_dict
from models.io.gguf.reader import GGMLType
from models.io.gguf.writer import GGUFWriter
from tiny_models.factory import make_dit, make_text_encoder
from tiny_models.images import photo_like
from test_control_host import control_graph
from test_edit_host import EDIT_ONE, _add_images, edit_graph
from test_reliability import zero_fill
from test_t2i_host import node_id, read_latent, save_latent, set_inputs, small_t2i

TEXT_ENCODER = "qwen_2.5_vl_7b.safetensors"
GGUF_TEXT_ENCODER = "Qwen2.5-VL-7B-Instruct-Q8_0.gguf"


def execution_error(host, graph: dict) -> dict:
    """The host's execution_error of a graph that must fail: node_type, exception_type, exception_message..."""
    entry = host.wait(host.submit(graph))
    errors = [m[1] for m in entry.get("status", {}).get("messages", []) if m[0] == "execution_error"]
    assert errors, f"the graph ran without an error: {json.dumps(entry.get('status'))[:2000]}"
    return errors[0]


def t2i_graph(host, *, seed: int = 11, **loaders) -> dict:
    """The small T2I graph with loader files replaced, e.g. ``QIP_TextEncoderLoader="narrow/te.safetensors"``."""
    graph = small_t2i(host, steps=2, seed=seed)
    for class_type, value in loaders.items():
        node = graph[node_id(graph, class_type)]
        (input_name,) = [name for name in node["inputs"] if name.endswith("_name")]
        node["inputs"][input_name] = value
    return graph


def t2i_latent(host, **loaders) -> torch.Tensor:
    graph = t2i_graph(host, **loaders)
    save_latent(graph, [node_id(graph, "SamplerCustomAdvanced"), 0], "t2i")
    return read_latent(host.run(graph))


def t2i_error(host, **loaders) -> dict:
    return execution_error(host, t2i_graph(host, **loaders))


def assert_refused_by(error: dict, node_type: str, *fragments: str, exception: str = "Error") -> str:
    message = error["exception_message"]
    assert error["node_type"] == node_type, (error["node_type"], message)
    assert error["exception_type"].endswith(exception), error["exception_type"]
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in: {message}"
    return message


# -- 1. half-downloaded files ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,exception", [("qwen_image_bf16.safetensors", "WeightFileError"),
                                            ("qwen-image-Q8_0.gguf", "GGUFError")])
def test_a_half_downloaded_model_stops_at_its_loader(host, host_models_dir, name, exception):
    folder = host_models_dir / "diffusion_models"
    broken = zero_fill(folder / name, folder / f"half_{name}")
    error = t2i_error(host, QIP_DiffusionModelLoader=broken.name)
    message = assert_refused_by(error, "QIP_DiffusionModelLoader", str(broken), "incomplete download",
                                "Download the file again", exception=exception)
    assert message.startswith("model_name: ")


# -- 2. a GGUF text encoder without its mmproj ----------------------------------------------------------------------
def test_gguf_text_encoder_without_mmproj_runs_t2i_and_edit_asks_for_the_mmproj(host, host_models_dir):
    alone = host_models_dir / "text_encoders" / "alone"
    alone.mkdir(exist_ok=True)
    shutil.copyfile(host_models_dir / "text_encoders" / GGUF_TEXT_ENCODER, alone / GGUF_TEXT_ENCODER)
    with_vision = t2i_latent(host, QIP_TextEncoderLoader=GGUF_TEXT_ENCODER)
    without = t2i_latent(host, QIP_TextEncoderLoader=f"alone/{GGUF_TEXT_ENCODER}")
    assert torch.equal(with_vision, without)  # text-to-image never uses the vision tower

    graph = edit_graph(_add_images(host, [(128, 96)], seed=160), model="qwen_image_bf16.safetensors",
                       mode=EDIT_ONE, prompt="make it blue", steps=2, seed=1)
    set_inputs(graph, "QIP_TextEncoderLoader", text_encoder_name=f"alone/{GGUF_TEXT_ENCODER}")
    assert_refused_by(execution_error(host, graph), "QIP_EditEncode", str(alone / GGUF_TEXT_ENCODER),
                      "encodes prompts but not images", "mmproj-F16.gguf", f"put it in {alone}",
                      exception="WeightFileError")


# -- 3. a text encoder of another width -----------------------------------------------------------------------------
def test_a_text_encoder_of_another_width_is_named_with_the_model_at_the_sampler(host, host_models_dir):
    make_text_encoder(host_models_dir / "text_encoders" / "narrow", seed=4, hidden_size=32)
    error = t2i_error(host, QIP_TextEncoderLoader=f"narrow/{TEXT_ENCODER}")
    assert_refused_by(error, "SamplerCustomAdvanced", "conditioning is 32 wide",
                      f"text encoder narrow/{TEXT_ENCODER}", "qwen_image_bf16.safetensors reads 64-wide",
                      "Load Qwen-Image Text Encoder", exception="ValueError")


def test_a_qwen25_vl_3b_is_refused_by_the_text_encoder_loader(host, host_models_dir):
    path = host_models_dir / "text_encoders" / "qwen2.5_vl_3b_instruct.safetensors"
    save_file({"model.embed_tokens.weight": torch.ones(2, 2048), "model.norm.weight": torch.ones(2048),
               "model.layers.0.self_attn.q_proj.bias": torch.ones(2048),
               "visual.blocks.0.attn.qkv.weight": torch.ones(3, 2)}, str(path))
    message = assert_refused_by(t2i_error(host, QIP_TextEncoderLoader=path.name), "QIP_TextEncoderLoader",
                                str(path), "Qwen2.5-VL model of the 3B size (2048 wide)", "Qwen2.5-VL-7B",
                                exception="WeightFileError")
    assert message.startswith("text_encoder_name: ")


# -- 5. a GGUF type nothing can decode -----------------------------------------------------------------------------
def test_a_gguf_with_an_undecodable_type_stops_at_the_loader(host, host_models_dir):
    source = host_models_dir / "diffusion_models" / "qwen-image-Q8_0.gguf"
    path = host_models_dir / "diffusion_models" / "qwen-image-F64.gguf"
    writer = GGUFWriter(path, "qwen_image")
    for name, tensor in load_gguf_state_dict(source, dequantize=True).items():
        qtype = GGMLType.F64 if name == "img_in.weight" else GGMLType.F32
        writer.add_tensor(name, tensor.double() if qtype == GGMLType.F64 else tensor, qtype, tensor.shape)
    writer.write()
    message = assert_refused_by(t2i_error(host, QIP_DiffusionModelLoader=path.name), "QIP_DiffusionModelLoader",
                                str(path), "'img_in.weight'", "F64", exception="GGUFError")
    assert message.startswith("model_name: ")


# -- 6. control images of any channel count --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def control_image(host) -> str:
    name = "reliability_control.png"
    host.add_inputs({name: (photo_like(128, 96, seed=91) * 255).round().astype(np.uint8)})
    return name


def _reshaped_control(graph: dict, channels: int, gray_rgb: bool = False) -> None:
    """Feed the apply nodes a ``channels``-channel version of the loaded image (or its gray channel as RGB)."""
    graph["shape"] = {"class_type": "QIPTest_ImageShape", "inputs": {"image": ["image", 0], "channels": channels,
                                                                       "batch": 1}}
    source = ["shape", 0]
    if gray_rgb:
        graph["mask"] = {"class_type": "ImageToMask", "inputs": {"image": source, "channel": "red"}}
        graph["rgb"] = {"class_type": "MaskToImage", "inputs": {"mask": ["mask", 0]}}
        source = ["rgb", 0]
    for node in graph.values():
        if node["class_type"] in ("QIP_ControlNetApply", "QIP_BlockwiseControlApply"):
            node["inputs"]["image"] = source


def test_a_gray_control_image_works_like_its_rgb_copy(host, control_image):
    latents = []
    for gray_rgb in (False, True):
        graph = control_graph(control_image, steps=2)
        _reshaped_control(graph, 1, gray_rgb)
        latents.append(read_latent(host.run(graph)))
    assert torch.equal(latents[0], latents[1])


def _blockwise(graph: dict) -> dict:
    """The control graph with the DiffSynth patch instead of the ControlNet."""
    graph["patch"] = {"class_type": "QIP_BlockwiseControlLoader", "inputs": {
        "patch_name": "qwen_image_canny_diffsynth_controlnet.safetensors", "weight_dtype": "auto"}}
    graph["apply0"] = {"class_type": "QIP_BlockwiseControlApply", "inputs": {
        "model": ["cfg", 0], "control": ["patch", 0], "vae": ["vae", 0], "image": ["image", 0], "strength": 1.0}}
    graph["guider"]["inputs"].update(model=["apply0", 0], positive=["text", 0], negative=["text", 1])
    del graph["cn"]
    return graph


@pytest.mark.parametrize("apply", ["QIP_ControlNetApply", "QIP_BlockwiseControlApply"])
def test_a_two_channel_control_image_stops_at_the_apply_node(host, control_image, apply):
    graph = control_graph(control_image, steps=2)
    if apply == "QIP_BlockwiseControlApply":
        graph = _blockwise(graph)
    _reshaped_control(graph, 2)
    assert_refused_by(execution_error(host, graph), apply, "image: a control image", "got shape [1, 96, 128, 2]",
                      exception="ValueError")


# -- 7. wrong files named as what they are ---------------------------------------------------------------------------
def test_a_full_sdxl_checkpoint_in_the_vae_loader_is_named_as_such(host, host_models_dir):
    path = host_models_dir / "vae" / "sd_xl_base_1.0.safetensors"
    save_file({"first_stage_model.encoder.conv_in.weight": torch.ones(8, 3, 3, 3),
               "first_stage_model.quant_conv.weight": torch.ones(8, 8, 1, 1),
               "model.diffusion_model.input_blocks.0.0.weight": torch.ones(8, 4, 3, 3),
               "conditioner.embedders.1.model.ln_final.weight": torch.ones(8)}, str(path))
    graph = small_t2i(host, steps=2)
    set_inputs(graph, "QIP_VAELoader", vae_name=path.name)
    message = assert_refused_by(execution_error(host, graph), "QIP_VAELoader", str(path),
                                "a full Stable Diffusion XL checkpoint", exception="WeightFileError")
    assert message.startswith("vae_name: ") and "checkpoint's VAE" not in message


def test_a_diffsynth_patch_in_the_diffusion_model_loader_is_sent_to_its_own_loader(host, host_models_dir):
    name = "qwen_image_canny_diffsynth_controlnet.safetensors"
    shutil.copyfile(host_models_dir / "model_patches" / name, host_models_dir / "diffusion_models" / name)
    message = assert_refused_by(t2i_error(host, QIP_DiffusionModelLoader=name), "QIP_DiffusionModelLoader",
                                "a DiffSynth blockwise ControlNet", "DiffSynth control loader (models/model_patches)",
                                exception="WeightFileError")
    assert message.startswith("model_name: ") and "the ControlNet loader" not in message


# -- 8. a damaged config.json -----------------------------------------------------------------------------------------
def test_a_config_json_that_is_a_list_stops_at_the_loader(host, host_models_dir):
    folder = make_dit(host_models_dir / "diffusion_models", layout="diffusers", dtype="fp16", seed=0)
    (folder / "config.json").write_text("[1, 2]")
    error = t2i_error(host, QIP_DiffusionModelLoader=f"{folder.parent.name}/{folder.name}/")
    assert_refused_by(error, "QIP_DiffusionModelLoader", "model_name: ", str(folder / "config.json"),
                      "must be a JSON object", exception="WeightFileError")


# -- 9. images too small for the VAE or for canny --------------------------------------------------------------------
def _image_graph(image_node: dict, consumer: dict) -> dict:
    graph = {"load": {"class_type": "LoadImage", "inputs": {"image": "reliability_control.png"}},
             "image": image_node, "use": consumer,
             "vae": {"class_type": "QIP_VAELoader", "inputs": {"vae_name": "qwen_image_vae.safetensors",
                                                              "weight_dtype": "auto"}}}
    if consumer["class_type"] == "VAEEncode":
        graph["out"] = {"class_type": "SaveLatent", "inputs": {"samples": ["use", 0], "filename_prefix": "tiny"}}
    else:
        graph["out"] = {"class_type": "PreviewImage", "inputs": {"images": ["use", 0]}}
    return graph


def _scaled(side: int) -> dict:
    return {"class_type": "ImageScale", "inputs": {"image": ["load", 0], "upscale_method": "nearest-exact",
                                                   "width": side, "height": side, "crop": "disabled"}}


ENCODE = {"class_type": "VAEEncode", "inputs": {"pixels": ["image", 0], "vae": ["vae", 0]}}


@pytest.mark.parametrize("image,detail", [(_scaled(4), "got 1 of 4x4"), (
    {"class_type": "QIPTest_ImageShape", "inputs": {"image": ["load", 0], "channels": 3, "batch": 0}}, "got 0 of")])
def test_the_core_vae_encode_on_our_vae_names_a_tiny_or_empty_image(host, control_image, image, detail):
    # control_image: puts the picture the graph loads into the host's input folder
    error = execution_error(host, _image_graph(image, ENCODE))
    assert_refused_by(error, "VAEEncode", "at least 8x8 pixels", detail, exception="ValueError")


def test_edit_encode_names_an_empty_image_batch(host):
    graph = edit_graph(_add_images(host, [(128, 96)], seed=161), model="qwen_image_bf16.safetensors",
                       mode=EDIT_ONE, prompt="make it blue", steps=2, seed=1)
    graph["empty"] = {"class_type": "QIPTest_ImageShape", "inputs": {"image": ["load0", 0], "channels": 3,
                                                                       "batch": 0}}
    graph["encode"]["inputs"]["image"] = ["empty", 0]
    assert_refused_by(execution_error(host, graph), "QIP_EditEncode", "image: the batch holds no picture",
                      exception="ValueError")


def test_canny_names_an_image_of_two_pixels(host, control_image):
    preprocess = {"class_type": "QIP_ControlPreprocess", "inputs": {
        "image": ["image", 0], "method": "canny", "low_threshold": 0.1, "high_threshold": 0.2}}
    error = execution_error(host, _image_graph(_scaled(2), preprocess))
    assert_refused_by(error, "QIP_ControlPreprocess", "image: canny needs an image of at least 3x3", "got 2x2",
                      exception="ValueError")


# -- 10. a stray vocab.json next to the weights ---------------------------------------------------------------------
def test_a_stray_vocab_json_next_to_the_text_encoder_falls_back_to_the_hosts_tokenizer(host, host_models_dir):
    stray = host_models_dir / "text_encoders" / "stray"
    stray.mkdir(exist_ok=True)
    shutil.copyfile(host_models_dir / "text_encoders" / TEXT_ENCODER, stray / TEXT_ENCODER)
    (stray / "vocab.json").write_text(json.dumps({"a": 0, "b": 1}))
    plain = t2i_latent(host, QIP_TextEncoderLoader=TEXT_ENCODER)
    assert torch.equal(t2i_latent(host, QIP_TextEncoderLoader=f"stray/{TEXT_ENCODER}"), plain)
