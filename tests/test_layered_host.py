"""Qwen-Image-Layered in the real host: parity of the final latents with diffusers' QwenImageLayeredPipeline, the
workflow writing RGBA layers, and clear messages for the wrong model or VAE."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from models import QWEN_IMAGE_LATENT
from references import QWEN_SCHEDULER, host_tokenizer_dir, reference_dit, reference_text_encoder, reference_vae
from test_t2i_host import read_latent, save_latent, set_inputs
from tiny_models.configs import TINY_LAYERED_DIT, TINY_RGBA_VAE
from tiny_models.images import photo_like
from workflow import ui_to_api

WORKFLOW = Path(__file__).resolve().parent.parent / "example_workflows" / "qwen_image_layered.json"
LAYERED_DIT = "qwen_image_layered_bf16.safetensors"
LAYERED_VAE = "qwen_image_layered_vae.safetensors"


def _rgba_input(host, size: int, seed: int) -> str:
    rgb = (photo_like(size, size, seed) * 255).round().astype(np.uint8)
    alpha = np.full((size, size, 1), 255, np.uint8)
    alpha[size // 4: size // 2, size // 3: 2 * size // 3] = 40  # a translucent patch: the alpha channel matters
    name = f"layered_{seed}_{size}.png"
    host.add_inputs({name: np.concatenate([rgb, alpha], axis=-1)})
    return name


def layered_graph(host, image: str, *, layers: int, steps: int, seed: int, prompt: str,
                  model: str = LAYERED_DIT, vae: str = LAYERED_VAE) -> dict:
    graph = ui_to_api(json.loads(WORKFLOW.read_text(encoding="utf-8")), host.object_info())
    set_inputs(graph, "QIP_DiffusionModelLoader", model_name=model)
    set_inputs(graph, "QIP_VAELoader", vae_name=vae)
    set_inputs(graph, "LoadImage", image=image)
    set_inputs(graph, "QIP_LayeredEncode", prompt=prompt, negative_prompt=" ", layers=layers, resolution="640")
    set_inputs(graph, "QIP_Scheduler", steps=steps)
    set_inputs(graph, "RandomNoise", noise_seed=seed)
    return graph


def _packed_frames(latent: torch.Tensor) -> torch.Tensor:
    """Packed frame after frame: the Layered pipeline's latent layout."""
    return torch.cat([QWEN_IMAGE_LATENT.pack(frame) for frame in latent.unbind(2)], dim=1)


def test_final_latent_equals_the_diffusers_pipeline(host, host_models_dir):
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImageLayeredPipeline
    from transformers import Qwen2Tokenizer, Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    # 640 x 640: the reference's 640 bucket of a square image, so neither side resizes the input.
    name = _rgba_input(host, 640, seed=90)
    prompt, layers, steps, seed = "A living room with a sofa, a lamp and a painting on the wall.", 2, 3, 2024
    graph = layered_graph(host, name, layers=layers, steps=steps, seed=seed, prompt=prompt)
    save_latent(graph, [set_inputs(graph, "SamplerCustomAdvanced"), 0], "layered")
    raw = read_latent(host.run(graph))
    assert raw.shape == (1, 16, layers + 1, 80, 80)
    ours = _packed_frames(QWEN_IMAGE_LATENT.normalize(raw))

    tokenizer = Qwen2Tokenizer.from_pretrained(str(host_tokenizer_dir()))
    pipe = QwenImageLayeredPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**QWEN_SCHEDULER),
        vae=reference_vae(host_models_dir / "vae" / LAYERED_VAE, TINY_RGBA_VAE),
        text_encoder=reference_text_encoder(host_models_dir / "text_encoders" / "qwen_2.5_vl_7b.safetensors"),
        tokenizer=tokenizer,
        processor=Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(), tokenizer=tokenizer,
                                   video_processor=Qwen2VLVideoProcessor()),
        transformer=reference_dit(host_models_dir / "diffusion_models" / LAYERED_DIT, TINY_LAYERED_DIT))
    # The host's RandomNoise: randn of the latent's shape from torch.manual_seed(seed), on the CPU.
    noise = torch.randn([1, 16, layers + 1, 80, 80], generator=torch.manual_seed(seed))
    packed_noise = _packed_frames(noise)  # the sampler starts from the noise itself (sigma 1)
    image = Image.open(host.input_dir / name).convert("RGBA")
    final = {}

    def keep_latents(_pipe, step, _t, tensors):  # diffusers 0.42.1 fails to return output_type="latent" here
        final["latents"] = tensors["latents"]
        return tensors

    with torch.no_grad():
        pipe(image=image, prompt=prompt, negative_prompt=" ", true_cfg_scale=4.0, layers=layers,
             num_inference_steps=steps, resolution=640, latents=packed_noise, output_type="np",
             callback_on_step_end=keep_latents)
    reference = final["latents"]
    assert ours.shape == reference.shape
    error = (ours - reference).abs().max().item()
    print(f"layered: max abs error vs diffusers {error:.2e}")
    assert error <= 1e-4


def test_the_workflow_writes_rgba_layers(host):
    name = _rgba_input(host, 256, seed=91)
    graph = layered_graph(host, name, layers=3, steps=2, seed=5, prompt="a desk with a laptop")
    set_inputs(graph, "QIP_LayeredEncode", resolution="640")
    result = host.run(graph)
    files = {path.name: Image.open(path) for path in result.images}
    layer_files = sorted(n for n in files if n.startswith("qwen_image_layered_layer"))
    whole_files = [n for n in files if n.startswith("qwen_image_layered_whole")]
    assert len(layer_files) == 3 and len(whole_files) == 1
    for layer in layer_files:
        image = files[layer]
        assert image.mode == "RGBA" and image.size == (640, 640)
        alpha = np.asarray(image)[..., 3]
        assert alpha.std() > 0.5  # a real alpha channel, not a constant


def test_a_layered_dit_in_text_to_image_is_named(host):
    from test_t2i_host import small_t2i

    graph = small_t2i(host, steps=1)
    set_inputs(graph, "QIP_DiffusionModelLoader", model_name=LAYERED_DIT)
    with pytest.raises(Exception, match="Qwen-Image-Layered DiT.*Layered Encode"):
        host.run(graph)


@pytest.mark.parametrize("model,vae,message", [
    ("qwen_image_bf16.safetensors", LAYERED_VAE, "needs a Qwen-Image-Layered DiT"),
    (LAYERED_DIT, "qwen_image_vae.safetensors", "Qwen-Image Layered Encode: this VAE has no alpha channel"),
])
def test_wrong_models_in_the_layered_workflow_are_named(host, model, vae, message):
    name = _rgba_input(host, 128, seed=92)
    graph = layered_graph(host, name, layers=2, steps=1, seed=1, prompt="x", model=model, vae=vae)
    with pytest.raises(Exception, match=message):
        host.run(graph)
