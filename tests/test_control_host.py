"""Structure control in the real host: ControlNet-Union parity with diffusers, strength, start/end, several
controls, GGUF, inpainting and DiffSynth patches."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.common.schedule import flow_sigmas, resolution_shift
from models.qwen_image.latent import QWEN_IMAGE_LATENT
from tiny_models.configs import TINY_CONTROLNET
from tiny_models.images import photo_like
from references import (QWEN_SCHEDULER, host_tokenizer_dir, pack, reference_controlnet, reference_dit,
                        reference_text_encoder, reference_vae)
from test_t2i_host import normalized_packed, read_latent, save_latent

UNION = "Qwen-Image-InstantX-ControlNet-Union.safetensors"
WIDTH, HEIGHT = 128, 96


def control_graph(control_image: str, *, strength=0.8, start=0.0, end=1.0, steps=3, seed=31, controls=1,
                  control_net=UNION, prompt="a quiet street at night", sigmas_split: int | None = None) -> dict:
    graph = {
        "dit": {"class_type": "QIP_DiffusionModelLoader", "inputs": {
            "model_name": "qwen_image_bf16.safetensors", "weight_dtype": "auto", "edit_2511": "auto (from the file)"}},
        "te": {"class_type": "QIP_TextEncoderLoader", "inputs": {
            "text_encoder_name": "qwen_2.5_vl_7b.safetensors", "weight_dtype": "auto"}},
        "vae": {"class_type": "QIP_VAELoader", "inputs": {"vae_name": "qwen_image_vae.safetensors",
                                                          "weight_dtype": "auto"}},
        "text": {"class_type": "QIP_TextEncode", "inputs": {"text_encoder": ["te", 0], "prompt": prompt,
                                                            "negative_prompt": " "}},
        "empty": {"class_type": "QIP_EmptyLatent", "inputs": {
            "preset": "custom (width x height below)", "width": WIDTH, "height": HEIGHT, "batch_size": 1}},
        "image": {"class_type": "LoadImage", "inputs": {"image": control_image}},
        "cn": {"class_type": "QIP_ControlNetLoader", "inputs": {"control_net_name": control_net,
                                                                "weight_dtype": "auto"}},
        "cfg": {"class_type": "QIP_TrueCFG", "inputs": {"model": ["dit", 0]}},
        "sigmas": {"class_type": "QIP_Scheduler", "inputs": {
            "model": ["cfg", 0], "latent": ["empty", 0], "steps": steps, "denoise": 1.0,
            "shift": "from the latent's resolution", "terminal_sigma": 0.02}},
        "sampler": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
        "noise": {"class_type": "RandomNoise", "inputs": {"noise_seed": seed}},
    }
    conditioning = [["text", 0], ["text", 1]]
    for i in range(controls):
        graph[f"apply{i}"] = {"class_type": "QIP_ControlNetApply", "inputs": {
            "positive": conditioning[0], "negative": conditioning[1], "control_net": ["cn", 0], "vae": ["vae", 0],
            "image": ["image", 0], "strength": strength, "start_percent": start, "end_percent": end}}
        conditioning = [[f"apply{i}", 0], [f"apply{i}", 1]]
    graph["guider"] = {"class_type": "CFGGuider", "inputs": {"model": ["cfg", 0], "positive": conditioning[0],
                                                              "negative": conditioning[1], "cfg": 4.0}}
    graph["sample"] = {"class_type": "SamplerCustomAdvanced", "inputs": {
        "noise": ["noise", 0], "guider": ["guider", 0], "sampler": ["sampler", 0], "sigmas": ["sigmas", 0],
        "latent_image": ["empty", 0]}}
    if sigmas_split is not None:  # controlled high-noise steps, then uncontrolled low-noise steps
        graph["split"] = {"class_type": "SplitSigmas", "inputs": {"sigmas": ["sigmas", 0], "step": sigmas_split}}
        graph["sample"]["inputs"]["sigmas"] = ["split", 0]
        graph["plain_guider"] = {"class_type": "CFGGuider", "inputs": {
            "model": ["cfg", 0], "positive": ["text", 0], "negative": ["text", 1], "cfg": 4.0}}
        graph["no_noise"] = {"class_type": "DisableNoise", "inputs": {}}
        graph["sample2"] = {"class_type": "SamplerCustomAdvanced", "inputs": {
            "noise": ["no_noise", 0], "guider": ["plain_guider", 0], "sampler": ["sampler", 0],
            "sigmas": ["split", 1], "latent_image": ["sample", 0]}}
        save_latent(graph, ["sample2", 0], "control")
    else:
        save_latent(graph, ["sample", 0], "control")
    return graph


@pytest.fixture(scope="module")
def control_image(host) -> str:
    name = "control_parity.png"
    host.add_inputs({name: (photo_like(WIDTH, HEIGHT, seed=90) * 255).round().astype(np.uint8)})
    return name


def test_canny_workflow_latent_equals_the_diffusers_controlnet_pipeline(host, host_models_dir, control_image,
                                                                         monkeypatch):
    from PIL import Image
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImageControlNetPipeline
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_controlnet
    from transformers import Qwen2Tokenizer

    prompt, steps, seed, strength = "a lighthouse on a cliff", 3, 31, 0.8
    ours = normalized_packed(read_latent(host.run(control_graph(control_image, strength=strength, steps=steps,
                                                                seed=seed, prompt=prompt))))
    # The reference encodes the control image with latent_dist.sample(generator): we (like ComfyUI) use the mean,
    # so the reference is run with the mean too (sample_mode="argmax"); everything else is the pipeline as is.
    original = pipeline_qwenimage_controlnet.retrieve_latents
    monkeypatch.setattr(pipeline_qwenimage_controlnet, "retrieve_latents",
                        lambda output, generator=None, sample_mode="sample": original(output, generator, "argmax"))
    pipe = QwenImageControlNetPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**QWEN_SCHEDULER),
        vae=reference_vae(host_models_dir / "vae" / "qwen_image_vae.safetensors"),
        text_encoder=reference_text_encoder(host_models_dir / "text_encoders" / "qwen_2.5_vl_7b.safetensors"),
        tokenizer=Qwen2Tokenizer.from_pretrained(str(host_tokenizer_dir())),
        transformer=reference_dit(host_models_dir / "diffusion_models" / "qwen_image_bf16.safetensors"),
        controlnet=reference_controlnet(host_models_dir / "controlnet" / UNION, TINY_CONTROLNET))
    noise = torch.randn([1, 16, 1, HEIGHT // 8, WIDTH // 8], generator=torch.manual_seed(seed))
    with torch.no_grad():
        reference = pipe(prompt=prompt, negative_prompt=" ", true_cfg_scale=4.0, height=HEIGHT, width=WIDTH,
                         control_image=Image.open(host.input_dir / control_image).convert("RGB"),
                         controlnet_conditioning_scale=strength, num_inference_steps=steps, latents=pack(noise),
                         output_type="latent").images
    error = (ours - reference).abs().max().item()
    print(f"ControlNet canny end-to-end vs diffusers: max abs error {error:.2e}")
    assert error <= 1e-4


def _uncontrolled(host, control_image, **kwargs) -> torch.Tensor:
    graph = control_graph(control_image, **kwargs)
    graph["guider"]["inputs"].update(positive=["text", 0], negative=["text", 1])
    return read_latent(host.run(graph))


def test_strength_zero_is_exactly_the_uncontrolled_output(host, control_image):
    controlled = read_latent(host.run(control_graph(control_image, strength=0.8)))
    off = read_latent(host.run(control_graph(control_image, strength=0.0)))
    plain = _uncontrolled(host, control_image)
    assert torch.equal(off, plain)
    assert (controlled - plain).abs().max() > 1e-3


def test_end_percent_switches_the_control_off_at_the_right_sigma(host, control_image):
    steps, end = 6, 0.4
    # The host maps a percent to a sigma through the model's sampling (Flux-style shift, our default mu); the
    # control is active on the steps whose sigma is at least that.
    mu = resolution_shift(QWEN_IMAGE_LATENT.image_tokens(166, 166))
    threshold = np.exp(mu) / (np.exp(mu) + 1 / (1 - end) - 1)
    sigmas = flow_sigmas(steps, resolution_shift(QWEN_IMAGE_LATENT.image_tokens(HEIGHT // 8, WIDTH // 8)))[:-1]
    active = int((sigmas >= threshold).sum())
    assert 0 < active < steps, "pick an end percent that splits this schedule"
    ended = read_latent(host.run(control_graph(control_image, end=end, steps=steps)))
    split = read_latent(host.run(control_graph(control_image, steps=steps, sigmas_split=active)))
    full = read_latent(host.run(control_graph(control_image, steps=steps)))
    assert (ended - split).abs().max() < 1e-5  # controlled exactly on the first `active` steps
    assert (ended - full).abs().max() > 1e-4


def test_chained_controls_add_their_residuals(host, control_image):
    twice = read_latent(host.run(control_graph(control_image, strength=0.3, controls=2)))
    once = read_latent(host.run(control_graph(control_image, strength=0.6, controls=1)))
    assert (twice - once).abs().max() < 1e-4  # r * 0.3 + r * 0.3 == r * 0.6


def test_gguf_controlnet_loads_and_runs(host, host_models_dir, control_image):
    from tiny_models.factory import make_controlnet_gguf

    gguf = make_controlnet_gguf(host_models_dir / "controlnet", variant="union", qtype="Q8_0", seed=0).name
    quantized = read_latent(host.run(control_graph(control_image, control_net=gguf)))
    full = read_latent(host.run(control_graph(control_image)))
    plain = _uncontrolled(host, control_image)
    assert torch.isfinite(quantized).all()
    assert (quantized - full).abs().max() < (full - plain).abs().max()  # close to the full-precision control


def test_inpainting_controlnet_needs_and_uses_a_mask(host, control_image):
    graph = control_graph(control_image, control_net="Qwen-Image-InstantX-ControlNet-Inpainting.safetensors")
    with pytest.raises(Exception, match="give the apply node a mask"):
        host.run(graph)
    graph["mask"] = {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": WIDTH, "height": HEIGHT}}
    graph["apply0"]["inputs"]["mask"] = ["mask", 0]
    assert torch.isfinite(read_latent(host.run(graph))).all()


def test_diffsynth_patch_changes_the_output_and_strength_zero_does_not(host, control_image):
    def run(strength: float) -> torch.Tensor:
        graph = control_graph(control_image, controls=0)
        graph["patch"] = {"class_type": "QIP_BlockwiseControlLoader", "inputs": {
            "patch_name": "qwen_image_canny_diffsynth_controlnet.safetensors", "weight_dtype": "auto"}}
        graph["patched"] = {"class_type": "QIP_BlockwiseControlApply", "inputs": {
            "model": ["dit", 0], "control": ["patch", 0], "vae": ["vae", 0], "image": ["image", 0],
            "strength": strength}}
        graph["cfg"]["inputs"]["model"] = ["patched", 0]
        return read_latent(host.run(graph))

    plain = _uncontrolled(host, control_image)
    assert torch.equal(run(0.0), plain)
    assert (run(1.0) - plain).abs().max() > 1e-3
