"""Editing in the real host: parity with diffusers' Edit pipelines, many images, masks, and the size policy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from models.qwen_image.edit_geometry import policy_size
from tiny_models.configs import TINY_DIT
from tiny_models.images import photo_like
from references import (QWEN_SCHEDULER, host_tokenizer_dir, pack, passing_token_types, reference_dit,
                        reference_text_encoder, reference_vae)
from test_t2i_host import normalized_packed, read_latent, save_latent

EDIT_PLUS = "Qwen-Image-Edit-2509 / 2511 (one or more images)"
EDIT_ONE = "Qwen-Image-Edit (one image)"
NATIVE = "native (the input's own size)"
REFERENCE = "1024x1024 (reference)"


def _add_images(host, sizes: list[tuple[int, int]], seed: int) -> list[str]:
    arrays = {f"edit_{seed}_{i}_{w}x{h}.png": (photo_like(w, h, seed + i) * 255).round().astype(np.uint8)
              for i, (w, h) in enumerate(sizes)}
    host.add_inputs(arrays)
    return list(arrays)


def edit_graph(names: list[str], *, model: str, mode: str, prompt: str, steps: int, seed: int,
               area: str = NATIVE, use_list: bool = False, mask_from: str | None = None,
               vl_area: str = "reference (per mode)") -> dict:
    """Edit Encode over the images, reference sampling (true CFG 4, our scheduler, euler), final latent saved."""
    graph = {
        "dit": {"class_type": "QIP_DiffusionModelLoader", "inputs": {
            "model_name": model, "weight_dtype": "auto", "edit_2511": "auto (from the file)"}},
        "te": {"class_type": "QIP_TextEncoderLoader", "inputs": {
            "text_encoder_name": "qwen_2.5_vl_7b.safetensors", "weight_dtype": "auto"}},
        "vae": {"class_type": "QIP_VAELoader", "inputs": {"vae_name": "qwen_image_vae.safetensors",
                                                          "weight_dtype": "auto"}},
        "encode": {"class_type": "QIP_EditEncode", "inputs": {
            "text_encoder": ["te", 0], "vae": ["vae", 0], "prompt": prompt, "negative_prompt": " ", "mode": mode,
            "area": area, "vl_area": vl_area, "size_multiple": 32, "latent_from": "last image"}},
        "cfg": {"class_type": "QIP_TrueCFG", "inputs": {"model": ["dit", 0]}},
        "sigmas": {"class_type": "QIP_Scheduler", "inputs": {
            "model": ["cfg", 0], "latent": ["encode", 2], "steps": steps, "denoise": 1.0,
            "shift": "from the latent's resolution", "terminal_sigma": 0.02}},
        "sampler": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
        "noise": {"class_type": "RandomNoise", "inputs": {"noise_seed": seed}},
        "guider": {"class_type": "CFGGuider", "inputs": {"model": ["cfg", 0], "positive": ["encode", 0],
                                                          "negative": ["encode", 1], "cfg": 4.0}},
        "sample": {"class_type": "SamplerCustomAdvanced", "inputs": {
            "noise": ["noise", 0], "guider": ["guider", 0], "sampler": ["sampler", 0], "sigmas": ["sigmas", 0],
            "latent_image": ["encode", 2]}},
    }
    for i, name in enumerate(names):
        graph[f"load{i}"] = {"class_type": "LoadImage", "inputs": {"image": name}}
    graph["encode"]["inputs"]["image"] = ["load0", 0]
    if use_list:  # every further image through a chain of Image List nodes
        previous = None
        for i in range(1, len(names)):
            inputs = {"image": [f"load{i}", 0]} | ({"images": previous} if previous else {})
            graph[f"list{i}"] = {"class_type": "QIP_ImageList", "inputs": inputs}
            previous = [f"list{i}", 0]
        if previous:
            graph["encode"]["inputs"]["more_images"] = previous
    else:
        for i in range(1, len(names)):
            graph["encode"]["inputs"][f"image{i + 1}"] = [f"load{i}", 0]
    if mask_from:
        graph["mask"] = {"class_type": "LoadImage", "inputs": {"image": mask_from}}
        graph["encode"]["inputs"]["mask"] = ["mask", 1]
    save_latent(graph, ["sample", 0], "edit")
    return graph


def _reference_parts(models_dir, dit_file: str):
    from transformers import Qwen2Tokenizer, Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    from models.encoders.vision_preprocess import MAX_PIXELS, MIN_PIXELS

    tokenizer = Qwen2Tokenizer.from_pretrained(str(host_tokenizer_dir()))
    processor = Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS),
                                 tokenizer=tokenizer, video_processor=Qwen2VLVideoProcessor())
    config = {**TINY_DIT, "zero_cond_t": True} if "2511" in dit_file else TINY_DIT  # Edit-2511's flag
    transformer = reference_dit(models_dir / "diffusion_models" / dit_file, config)
    return dict(vae=reference_vae(models_dir / "vae" / "qwen_image_vae.safetensors"),
                text_encoder=reference_text_encoder(models_dir / "text_encoders" / "qwen_2.5_vl_7b.safetensors"),
                tokenizer=tokenizer, processor=processor, transformer=transformer)


@pytest.mark.parametrize("case", ["edit", "edit_plus_2511"])
def test_edit_final_latent_equals_the_diffusers_pipeline(host, host_models_dir, case):
    from PIL import Image
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImageEditPipeline, QwenImageEditPlusPipeline

    # The reference pipelines at their own sizes: a 1024x1024 area for the VAE (and the original Edit's VL image),
    # 384x384 for Edit-2509/2511's VL image.  The inputs lie on the 1024x1024 grid, so only that VL image is
    # resized, and both sides resize it with Pillow's Lanczos.
    sizes = [(1184, 896)] if case == "edit" else [(1024, 1024), (896, 1184)]
    names = _add_images(host, sizes, seed=40 if case == "edit" else 50)
    dit_file = "qwen_image_bf16.safetensors" if case == "edit" else "qwen_image_edit_2511_bf16.safetensors"
    prompt, steps, seed = "Make the sky orange and add a small red boat.", 3, 77
    graph = edit_graph(names, model=dit_file, mode=EDIT_ONE if case == "edit" else EDIT_PLUS, prompt=prompt,
                       steps=steps, seed=seed, area=REFERENCE)
    ours = normalized_packed(read_latent(host.run(graph)))

    parts = _reference_parts(host_models_dir, dit_file)
    scheduler = FlowMatchEulerDiscreteScheduler(**QWEN_SCHEDULER)
    images = [Image.open(host.input_dir / name).convert("RGB") for name in names]
    if case == "edit":
        pipe, image_arg = QwenImageEditPipeline(scheduler=scheduler, **parts), images[0]
    else:
        pipe, image_arg = QwenImageEditPlusPipeline(scheduler=scheduler, **parts), images
    width, height = sizes[-1]  # the pipelines' own output size: the last image's, on the 1024x1024 grid
    noise = torch.randn([1, 16, 1, height // 8, width // 8], generator=torch.manual_seed(seed))
    with torch.no_grad(), passing_token_types(pipe.text_encoder):
        reference = pipe(image=image_arg, prompt=prompt, negative_prompt=" ", true_cfg_scale=4.0,
                         num_inference_steps=steps, latents=pack(noise), output_type="latent").images
    assert ours.shape == reference.shape
    error = (ours - reference).abs().max().item()
    print(f"{case}: max abs error vs diffusers {error:.2e}")
    assert error <= 1e-4


def test_five_images_edit_in_the_host(host):
    names = _add_images(host, [(320, 240), (256, 256), (240, 320), (384, 192), (200, 300)], seed=60)
    graph = edit_graph(names, model="qwen_image_edit_2511_bf16.safetensors", mode=EDIT_PLUS,
                       prompt="Picture 1 with the objects of Pictures 2 to 5.", steps=2, seed=1, use_list=True)
    latent = read_latent(host.run(graph))
    width, height = policy_size(200, 300, None)  # the last image's grid
    assert latent.shape == (1, 16, 1, height // 8, width // 8)
    assert torch.isfinite(latent).all()


def test_a_masked_edit_keeps_the_unmasked_area_exactly(host):
    (name,) = _add_images(host, [(256, 192)], seed=70)
    rgba = np.asarray(__import__("PIL.Image", fromlist=["Image"]).open(host.input_dir / name).convert("RGBA")).copy()
    rgba[..., 3] = 255
    rgba[64:128, 96:192, 3] = 0  # transparent = edit here (LoadImage's mask is 1 - alpha)
    host.add_inputs({"masked_" + name: rgba})
    graph = edit_graph([name], model="qwen_image_edit_2511_bf16.safetensors", mode=EDIT_PLUS,
                       prompt="Put a cat there.", steps=3, seed=2, mask_from="masked_" + name)
    save_latent(graph, ["encode", 2], "input")  # the image's own latent that the mask keeps
    result = host.run(graph)
    latents = {p.name.split("_")[0]: load_file(str(p))["latent_tensor"] for p in result.files["latents"]}
    edited, source = latents["edit"][0, :, 0], latents["input"][0, :, 0]
    keep = torch.ones(source.shape[-2:], dtype=torch.bool)
    keep[64 // 8 - 1:128 // 8 + 1, 96 // 8 - 1:192 // 8 + 1] = False  # the mask plus its resampled rim
    # Equal up to the float32 rounding of the host's latent normalisation round trip ((z - mean) / std * std + mean).
    unchanged = (edited[:, keep] - source[:, keep]).abs().max().item()
    assert unchanged < 1e-5, f"the unmasked area changed by {unchanged:.2e}"
    assert (edited[:, 9:15, 13:23] - source[:, 9:15, 13:23]).abs().max() > 1e-2, "nothing was edited"


@pytest.mark.parametrize("width,height", [(1000, 750), (777, 1231)])
def test_every_branch_uses_the_policy_size(host, width, height):
    names = _add_images(host, [(width, height)], seed=80)
    graph = edit_graph(names, model="qwen_image_edit_2511_bf16.safetensors", mode=EDIT_PLUS, prompt="x", steps=1,
                       seed=3, area="512x512")
    graph["save_sized"] = {"class_type": "SaveImage", "inputs": {"images": ["encode", 3], "filename_prefix": "sized"}}
    graph["restore"] = {"class_type": "QIP_RestoreSize", "inputs": {"image": ["encode", 3], "original": ["load0", 0]}}
    graph["save_restored"] = {"class_type": "SaveImage", "inputs": {"images": ["restore", 0],
                                                                      "filename_prefix": "restored"}}
    result = host.run(graph)
    policy_w, policy_h = policy_size(width, height, 512 * 512)
    images = {p.name.split("_")[0]: np.asarray(__import__("PIL.Image", fromlist=["Image"]).open(p))
              for p in result.images}
    assert images["sized"].shape[:2] == (policy_h, policy_w)  # the VAE (and, here, VL) image
    assert images["restored"].shape[:2] == (height, width)  # back to the exact input size
    assert read_latent(result).shape == (1, 16, 1, policy_h // 8, policy_w // 8)  # the target grid
