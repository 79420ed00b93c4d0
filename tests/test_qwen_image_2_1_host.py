"""Qwen-Image 2.1 in the real host: final latents equal diffusers' QwenImage21Pipeline (text-to-image, and two
condition images), the prefix cache changes nothing, core VAE nodes take the 2.1 VAE, and each family's loaders
name the other family's files."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from PIL import Image

from models.encoders.qwen3vl.encoder import MAX_PIXELS, MIN_PIXELS
from models.qwen_image_2_1.latent import QWEN_IMAGE_2_1_LATENT
from models.qwen_image_2_1.vae_keys import diffusers_to_comfy
from references import comfy_tensors, host_tokenizer_dir
from test_edit_host import _add_images as add_images
from test_qwen3vl import CHAT_TEMPLATE, reference_model
from test_t2i_host import read_latent, save_latent, set_inputs, small_t2i
from tiny_models.qwen_image_2_1 import TINY_DIT_2_1
from tiny_models.qwen_image_2_1_vae import TINY_VAE_2_1

DIT = "qwen_image_2.1_bf16.safetensors"
TEXT_ENCODER = "qwen3vl_8b_bf16.safetensors"
VAE = "qwen_image_2.1_vae_bf16.safetensors"
ATOL = 1e-4
CACHE_ATOL = 1e-6
# The scheduler QwenImage21Pipeline is built with: dynamic exponential shift, mu from 0.5 at 256 image tokens to
# 1.15 at 4096, no terminal stretch (FlowMatchEulerDiscreteScheduler's own defaults for these).
SCHEDULER_2_1 = dict(use_dynamic_shifting=True, time_shift_type="exponential", base_image_seq_len=256,
                     max_image_seq_len=4096, base_shift=0.5, max_shift=1.15, shift_terminal=None)
# Two condition images already on the reference's grid at output_resolution 288 (neither side resizes them).
RESOLUTION = 288
SIZES = [(288, 288), (320, 256)]
CALLS = re.compile(r"Qwen-Image 2\.1 prefix cache: reused in (\d+) of (\d+) model calls \([\d.]+ MiB, ([\w ]+)\)")


def graph_2_1(images: list[str], *, prompt: str, negative: str, steps: int, seed: int, cfg: float,
              size: tuple[int, int] | None = None, cache: str | None = None) -> dict:
    """2.1 Encode (the images as conditions, through the VAE loader ``vae``), the 2.1 Scheduler, euler, CFGGuider;
    the final latent saved.  ``size``: sample into a 2.1 Empty Latent of that size instead of Encode's latent;
    ``cache``: a Prefix Cache mode."""
    graph = {
        "dit": {"class_type": "QIP_21DiffusionModelLoader", "inputs": {"model_name": DIT, "weight_dtype": "auto"}},
        "te": {"class_type": "QIP_21TextEncoderLoader", "inputs": {"text_encoder_name": TEXT_ENCODER,
                                                                   "weight_dtype": "auto"}},
        "vae": {"class_type": "QIP_21VAELoader", "inputs": {"vae_name": VAE, "weight_dtype": "auto"}},
        "encode": {"class_type": "QIP_21Encode", "inputs": {
            "text_encoder": ["te", 0], "prompt": prompt, "negative_prompt": negative, "output_resolution": RESOLUTION}},
        "sampler": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
        "noise": {"class_type": "RandomNoise", "inputs": {"noise_seed": seed}},
        "guider": {"class_type": "CFGGuider", "inputs": {"model": ["dit", 0], "positive": ["encode", 0],
                                                          "negative": ["encode", 1], "cfg": cfg}},
    }
    if images:  # text-to-image needs no VAE before decoding
        graph["encode"]["inputs"]["vae"] = ["vae", 0]
    for i, name in enumerate(images):
        graph[f"load{i}"] = {"class_type": "LoadImage", "inputs": {"image": name}}
        graph["encode"]["inputs"]["image" if i == 0 else f"image{i + 1}"] = [f"load{i}", 0]
    latent = ["encode", 2]
    if size is not None:
        graph["empty"] = {"class_type": "QIP_21EmptyLatent", "inputs": {"width": size[0], "height": size[1],
                                                                        "batch_size": 1}}
        latent = ["empty", 0]
    if cache is not None:
        graph["cache"] = {"class_type": "QIP_21PrefixCache", "inputs": {"model": ["dit", 0], "mode": cache}}
        graph["guider"]["inputs"]["model"] = ["cache", 0]
    graph["sigmas"] = {"class_type": "QIP_21Scheduler", "inputs": {"latent": latent, "steps": steps, "denoise": 1.0}}
    graph["sample"] = {"class_type": "SamplerCustomAdvanced", "inputs": {
        "noise": ["noise", 0], "guider": ["guider", 0], "sampler": ["sampler", 0], "sigmas": ["sigmas", 0],
        "latent_image": latent}}
    save_latent(graph, ["sample", 0], "qip21")
    return graph


def packed(raw: torch.Tensor) -> torch.Tensor:
    """A raw host latent ``[B, 64, h, w]`` as the pipeline's normalized tokens ``[B, h * w, 64]`` (2.1: unpatched)."""
    return QWEN_IMAGE_2_1_LATENT.normalize(raw).flatten(2).transpose(1, 2)


def cache_log(host) -> tuple[int, int, str]:
    """(reused, calls, storage) of the last prefix cache report in the host's log."""
    reused, calls, storage = CALLS.findall(host.log_text())[-1]
    return int(reused), int(calls), storage


def reference_vae(path):
    """diffusers' AutoencoderKLQwenImage21 with a Comfy-Org file's weights (through the loader's name mapping)."""
    from diffusers import AutoencoderKLQwenImage21

    model = AutoencoderKLQwenImage21(**TINY_VAE_2_1)
    stored = comfy_tensors(path)
    model.load_state_dict({name: stored[diffusers_to_comfy(name, TINY_VAE_2_1["num_res_blocks"])].reshape(t.shape)
                           for name, t in model.state_dict().items()}, strict=True)
    return model.eval()


def reference_pipeline(models_dir):
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImage21Pipeline, QwenImage21Transformer2DModel
    from transformers import Qwen2Tokenizer, Qwen2VLImageProcessor, Qwen3VLProcessor
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    transformer = QwenImage21Transformer2DModel(**TINY_DIT_2_1)
    transformer.load_state_dict(comfy_tensors(models_dir / "diffusion_models" / DIT), strict=True)
    images = Qwen2VLImageProcessor(patch_size=16, merge_size=2, temporal_patch_size=2, image_mean=[0.5] * 3,
                                   image_std=[0.5] * 3, size={"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS})
    processor = Qwen3VLProcessor(image_processor=images, video_processor=Qwen3VLVideoProcessor(),
                                 tokenizer=Qwen2Tokenizer.from_pretrained(str(host_tokenizer_dir())),
                                 chat_template=CHAT_TEMPLATE)
    return QwenImage21Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_2_1),
                               vae=reference_vae(models_dir / "vae" / VAE),
                               text_encoder=reference_model(models_dir / "text_encoders" / TEXT_ENCODER),
                               processor=processor, transformer=transformer.eval())


def run_reference(pipeline, noise: torch.Tensor, **kwargs) -> torch.Tensor:
    """The pipeline's final (normalized, packed) latent from the host's noise ``[1, 64, h, w]``."""
    with torch.no_grad():
        return pipeline(latents=noise.flatten(2).transpose(1, 2), output_type="latent", **kwargs).images


def max_error(ours: torch.Tensor, reference: torch.Tensor, start: torch.Tensor) -> float:
    assert ours.shape == reference.shape
    assert (reference - start).abs().max() > 0.1, "sampling did not move the latent: a meaningless comparison"
    return (ours - reference).abs().max().item()


# The negatives: one of another length (cond and uncond run as two calls) and one of the prompt's length and layout
# (the host batches them into one call).
@pytest.mark.parametrize("negative,batched", [(" ", False), ("A blue fox in the snow at dawn.", True)],
                         ids=["separate", "batched"])
def test_t2i_final_latent_equals_the_pipeline(host, host_models_dir, negative, batched):
    prompt, steps, seed, (width, height) = "A red fox in the snow at dawn.", 4, 1234, (160, 128)
    graph = graph_2_1([], prompt=prompt, negative=negative, steps=steps, seed=seed, cfg=4.0, size=(width, height))
    ours = packed(read_latent(host.run(graph)))
    assert cache_log(host)[:2] == ((steps - 1, steps) if batched else (2 * steps - 2, 2 * steps))

    # The host's RandomNoise: torch.manual_seed(seed), randn of the latent's shape on the CPU.
    noise = torch.randn([1, 64, height // 16, width // 16], generator=torch.manual_seed(seed))
    reference = run_reference(reference_pipeline(host_models_dir), noise, prompt=prompt, negative_prompt=negative,
                              true_cfg_scale=4.0, height=height, width=width, num_inference_steps=steps)
    error = max_error(ours, reference, packed(noise))
    print(f"2.1 T2I ({'batched' if batched else 'separate'} CFG) vs QwenImage21Pipeline: max abs error {error:.2e}")
    assert error <= ATOL


def test_two_condition_images_final_latent_equals_the_pipeline(host, host_models_dir):
    names = add_images(host, SIZES, seed=210)
    prompt, steps, seed = "The cup from image 2 on the table of image 1.", 3, 77
    graph = graph_2_1(names, prompt=prompt, negative=" ", steps=steps, seed=seed, cfg=4.0)
    ours = packed(read_latent(host.run(graph)))

    width, height = SIZES[-1]  # the output takes the last image's aspect at the output resolution's area
    noise = torch.randn([1, 64, height // 16, width // 16], generator=torch.manual_seed(seed))
    images = [Image.open(host.input_dir / name).convert("RGB") for name in names]
    reference = run_reference(reference_pipeline(host_models_dir), noise, prompt=prompt, image=images,
                              negative_prompt=" ", true_cfg_scale=4.0, num_inference_steps=steps,
                              output_resolution=RESOLUTION)
    error = max_error(ours, reference, packed(noise))
    print(f"2.1 with two condition images vs QwenImage21Pipeline: max abs error {error:.2e}")
    assert error <= ATOL


def test_the_prefix_cache_changes_nothing(host):
    names = add_images(host, SIZES, seed=220)
    steps, latents, reports = 3, {}, {}
    for mode in (None, "off", "on, offloaded to the CPU (least VRAM)"):
        graph = graph_2_1(names, prompt="Image 1 in the style of image 2.", negative=" ", steps=steps, seed=5,
                          cfg=4.0, cache=mode)
        before = len(CALLS.findall(host.log_text()))
        latents[mode] = read_latent(host.run(graph))
        reports[mode] = cache_log(host) if len(CALLS.findall(host.log_text())) > before else None
    # Per CFG branch: the first step fills the prompt's and the negative's entries, every later call reuses them.
    assert reports[None] == (2 * steps - 2, 2 * steps, "compute device")
    assert reports["off"] is None
    assert reports["on, offloaded to the CPU (least VRAM)"] == (2 * steps - 2, 2 * steps, "cpu")
    for mode in ("off", "on, offloaded to the CPU (least VRAM)"):
        difference = (latents[mode] - latents[None]).abs().max().item()
        print(f"prefix cache '{mode}' vs on: max abs difference {difference:.1e}")
        assert difference <= CACHE_ATOL, mode


def test_core_vae_nodes_use_the_2_1_vae(host, host_models_dir):
    (name,) = add_images(host, [(320, 256)], seed=230)
    graph = {
        "vae": {"class_type": "QIP_21VAELoader", "inputs": {"vae_name": VAE, "weight_dtype": "auto"}},
        "load": {"class_type": "LoadImage", "inputs": {"image": name}},
        "encode": {"class_type": "VAEEncode", "inputs": {"pixels": ["load", 0], "vae": ["vae", 0]}},
        "decode": {"class_type": "VAEDecode", "inputs": {"samples": ["encode", 0], "vae": ["vae", 0]}},
        "save": {"class_type": "SaveImage", "inputs": {"images": ["decode", 0], "filename_prefix": "qip21_vae"}},
    }
    save_latent(graph, ["encode", 0], "qip21_vae")
    result = host.run(graph)
    image = torch.from_numpy(np.asarray(Image.open(host.input_dir / name).convert("RGBA"), dtype=np.float32) / 255)
    with torch.no_grad():
        x = image.permute(2, 0, 1)[None, :, None] * 2 - 1
        expected = reference_vae(host_models_dir / "vae" / VAE).encode(x).latent_dist.mode()[:, :, 0]
    latent = read_latent(result)
    assert latent.shape == (1, 64, 256 // 16, 320 // 16)
    assert (latent - expected).abs().max() <= ATOL
    (path,) = result.images
    decoded = Image.open(path)
    assert decoded.mode == "RGBA" and decoded.size == (320, 256)


def _t2i_1x(host) -> dict:
    return small_t2i(host, steps=1)


def _t2i_2_1(host) -> dict:
    return graph_2_1([], prompt="x", negative="", steps=1, seed=0, cfg=1.0, size=(64, 64))


def _decoded_t2i_2_1(host) -> dict:
    graph = _t2i_2_1(host)
    graph["decode"] = {"class_type": "VAEDecode", "inputs": {"samples": ["sample", 0], "vae": ["vae", 0]}}
    graph["save"] = {"class_type": "SaveImage", "inputs": {"images": ["decode", 0], "filename_prefix": "qip21"}}
    return graph


WRONG_FAMILY = {  # graph, loader, input, the other family's file, what the message must name
    "1.x DiT in the 2.1 loader": (_t2i_2_1, "QIP_21DiffusionModelLoader", "model_name", "qwen_image_bf16.safetensors",
                                  ("a Qwen-Image diffusion model", "Qwen-Image 2.1")),
    "2.1 DiT in the 1.x loader": (_t2i_1x, "QIP_DiffusionModelLoader", "model_name", DIT,
                                  ("Qwen-Image 2.1", "a Qwen-Image diffusion model")),
    "1.x text encoder in the 2.1 loader": (_t2i_2_1, "QIP_21TextEncoderLoader", "text_encoder_name",
                                           "qwen_2.5_vl_7b.safetensors", ("Qwen2.5-VL", "Qwen-Image 2.1")),
    "2.1 text encoder in the 1.x loader": (_t2i_1x, "QIP_TextEncoderLoader", "text_encoder_name", TEXT_ENCODER,
                                           ("Qwen3-VL text encoder (Qwen-Image 2.1)", "Qwen2.5-VL")),
    "1.x VAE in the 2.1 loader": (_decoded_t2i_2_1, "QIP_21VAELoader", "vae_name", "qwen_image_vae.safetensors",
                                  ("the Qwen-Image VAE", "the Qwen-Image 2.1 VAE")),
    "2.1 VAE in the 1.x loader": (_t2i_1x, "QIP_VAELoader", "vae_name", VAE, ("Qwen-Image 2.1", "Qwen-Image VAE")),
}


@pytest.mark.parametrize("case", WRONG_FAMILY)
def test_a_file_of_the_other_family_is_named_by_the_loader(host, case):
    make_graph, loader, name, file, expected = WRONG_FAMILY[case]
    graph = make_graph(host)
    set_inputs(graph, loader, **{name: file})
    with pytest.raises(Exception) as failure:
        host.run(graph)
    message = str(failure.value)
    assert loader in message and f"{name}: " in message, message[:2000]
    for words in expected:
        assert words in message, message[:2000]


ENCODE_REFUSALS = {  # what Encode gets -> what its message says
    "images without the VAE": (dict(vae=None), "vae: condition images need the Qwen-Image 2.1 VAE"),
    "the 1.x VAE": (dict(vae=["vae_1x", 0]), "vae: condition images need the Qwen-Image 2.1 VAE"),
    "eleven images": (dict(image=["eleven", 0]), "at most 10 condition images, got 11"),
    "images the vision encoder resizes": (dict(output_resolution=256), "vision encoder resizes it"),
}


@pytest.mark.parametrize("case", ENCODE_REFUSALS)
def test_encode_refuses_what_the_model_cannot_read(host, case):
    inputs, expected = ENCODE_REFUSALS[case]
    graph = graph_2_1(add_images(host, [(320, 240)], seed=240), prompt="x", negative="", steps=1, seed=0, cfg=1.0)
    graph["vae_1x"] = {"class_type": "QIP_VAELoader", "inputs": {"vae_name": "qwen_image_vae.safetensors",
                                                                 "weight_dtype": "auto"}}
    graph["eleven"] = {"class_type": "RepeatImageBatch", "inputs": {"image": ["load0", 0], "amount": 11}}
    changed = {**graph["encode"]["inputs"], **inputs}
    graph["encode"]["inputs"] = {name: value for name, value in changed.items() if value is not None}
    with pytest.raises(Exception) as failure:
        host.run(graph)
    assert "QIP_21Encode" in str(failure.value) and expected in str(failure.value), str(failure.value)[:2000]
