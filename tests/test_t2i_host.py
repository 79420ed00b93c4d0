"""Text-to-image in the real host: the workflows run, the result equals diffusers' pipeline, host nodes interoperate.

All graphs come from the checked-in UI workflows, converted with the running host's /object_info, and are made
small (128x128, a few steps) so the suite stays fast on CPU.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from models import layered_size
from tiny_models.configs import TINY_DIT
from tiny_models.factory import DIT_PREFIX, LORA_TARGETS
from references import (QWEN_SCHEDULER, comfy_tensors, host_tokenizer_dir, pack, reference_dit,
                        reference_text_encoder, reference_vae)
from workflow import ui_to_api

REPO_ROOT = Path(__file__).resolve().parent.parent
WORKFLOWS = REPO_ROOT / "example_workflows"
# The workflows earlier versions shipped (workflows/ before 0.2.0), as users saved them: they must keep running.
OLD_WORKFLOWS = REPO_ROOT / "tests" / "fixtures" / "workflows_v1"
CUSTOM = "custom (width x height below)"
LATENT_MEAN = torch.tensor([-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508, 0.4134, -0.0715,
                            0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921])
LATENT_STD = torch.tensor([2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743, 3.2687, 2.1526, 2.8652,
                           1.5579, 1.6382, 1.1253, 2.8251, 1.9160])


def set_inputs(graph: dict, class_type: str, **values) -> str:
    """Set widget inputs of the single node of ``class_type``; returns its id."""
    ids = [node_id for node_id, node in graph.items() if node["class_type"] == class_type]
    assert len(ids) == 1, f"expected one {class_type}, found {len(ids)}"
    graph[ids[0]]["inputs"].update(values)
    return ids[0]


def node_id(graph: dict, class_type: str) -> str:
    return set_inputs(graph, class_type)


def small_t2i(host, *, prompt="a red fox in the snow", steps=3, size=128, seed=42, cfg=4.0,
              workflow="qwen_image_t2i.json") -> dict:
    graph = ui_to_api(json.loads((WORKFLOWS / workflow).read_text(encoding="utf-8")), host.object_info())
    set_inputs(graph, "QIP_TextEncode", prompt=prompt, negative_prompt=" ")
    set_inputs(graph, "QIP_EmptyLatent", preset=CUSTOM, width=size, height=size, batch_size=1)
    set_inputs(graph, "QIP_Scheduler", steps=steps)
    set_inputs(graph, "RandomNoise", noise_seed=seed)
    set_inputs(graph, "CFGGuider", cfg=cfg)
    return graph


def save_latent(graph: dict, source: list, prefix: str) -> None:
    graph[f"save_{prefix}"] = {"class_type": "SaveLatent", "inputs": {"samples": source, "filename_prefix": prefix}}


def read_latent(result) -> torch.Tensor:
    (path,) = result.files["latents"]
    return load_file(str(path))["latent_tensor"].float()


def normalized_packed(raw: torch.Tensor) -> torch.Tensor:
    shape = (1, 16) + (1,) * (raw.ndim - 2)
    return pack((raw - LATENT_MEAN.reshape(shape)) / LATENT_STD.reshape(shape))


def png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


@pytest.mark.parametrize("path", sorted(WORKFLOWS.glob("*.json")) + sorted(OLD_WORKFLOWS.glob("*.json")),
                         ids=lambda path: f"{path.parent.name}/{path.stem}")
def test_every_workflow_runs_in_the_host(host, path):
    graph = ui_to_api(json.loads(path.read_text(encoding="utf-8")), host.object_info())
    small = {"preset": CUSTOM, "width": 128, "height": 128, "steps": 2, "area": "512x512", "layers": 2,
             "output_resolution": 320}
    for node in graph.values():  # small and quick, whatever the workflow is
        for name, value in small.items():
            if name in node["inputs"] and not isinstance(node["inputs"][name], list):
                node["inputs"][name] = value
    result = host.run(graph)
    assert result.images, "the workflow saved no image"
    loaded = [node["inputs"]["image"] for node in graph.values() if node["class_type"] == "LoadImage"]
    empty = any(node["class_type"] in ("QIP_EmptyLatent", "QIP_21EmptyLatent") for node in graph.values())
    # Generation at the small size; an edit restored to its (last) input image's exact size; layers at the size
    # of the Layered reference's resolution bucket.
    expected = (128, 128) if empty else png(host.input_dir / loaded[-1]).shape[:2]
    layered = [node["inputs"] for node in graph.values() if node["class_type"] == "QIP_LayeredEncode"]
    if layered:
        width, height = layered_size(expected[1], expected[0], int(layered[0]["resolution"]))
        expected = (height, width)
    for path in result.images:
        image = png(path)
        assert image.shape == (*expected, 3) and image.std() > 1.0  # a real picture, not a constant


def test_t2i_final_latent_equals_the_diffusers_pipeline(host, host_models_dir):
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline
    from transformers import Qwen2Tokenizer

    prompt, steps, size, seed = "A cozy cabin in a snowy forest at dusk, warm light in the windows.", 4, 128, 1234
    graph = small_t2i(host, prompt=prompt, steps=steps, size=size, seed=seed, cfg=4.0)
    save_latent(graph, [node_id(graph, "SamplerCustomAdvanced"), 0], "parity")
    ours = normalized_packed(read_latent(host.run(graph)))

    pipe = QwenImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**QWEN_SCHEDULER),
        vae=reference_vae(host_models_dir / "vae" / "qwen_image_vae.safetensors"),
        text_encoder=reference_text_encoder(host_models_dir / "text_encoders" / "qwen_2.5_vl_7b.safetensors"),
        tokenizer=Qwen2Tokenizer.from_pretrained(str(host_tokenizer_dir())),
        transformer=reference_dit(host_models_dir / "diffusion_models" / "qwen_image_bf16.safetensors"))
    # The host's RandomNoise: torch.manual_seed(seed), randn of the single-frame latent shape on the CPU.
    noise = torch.randn([1, 16, 1, size // 8, size // 8], generator=torch.manual_seed(seed))
    with torch.no_grad():
        reference = pipe(prompt=prompt, negative_prompt=" ", true_cfg_scale=4.0, num_inference_steps=steps,
                         height=size, width=size, latents=pack(noise), output_type="latent").images
    assert ours.shape == reference.shape
    error = (ours - reference).abs().max().item()
    print(f"T2I end-to-end vs diffusers QwenImagePipeline: max abs error {error:.2e} (|latent| max "
          f"{reference.abs().max():.2f})")
    assert error <= 1e-4
    assert (ours - pack(noise)).abs().max() > 0.1  # sampling really moved the latent


def test_host_ksampler_and_vae_nodes_interoperate_with_ours(host):
    # Our loaders feed the host's KSampler; the host's VAE (core loader, our tiny file) and ours decode the same
    # LATENT and encode the same IMAGE.
    graph = {
        "dit": {"class_type": "QIP_DiffusionModelLoader",
                "inputs": {"model_name": "qwen_image_bf16.safetensors", "weight_dtype": "auto",
                           "edit_2511": "auto (from the file)"}},
        "te": {"class_type": "QIP_TextEncoderLoader",
               "inputs": {"text_encoder_name": "qwen_2.5_vl_7b.safetensors", "weight_dtype": "auto"}},
        "our_vae": {"class_type": "QIP_VAELoader", "inputs": {"vae_name": "qwen_image_vae.safetensors",
                                                             "weight_dtype": "auto"}},
        "host_vae": {"class_type": "VAELoader", "inputs": {"vae_name": "qwen_image_vae.safetensors"}},
        "text": {"class_type": "QIP_TextEncode", "inputs": {"text_encoder": ["te", 0], "prompt": "a lighthouse",
                                                            "negative_prompt": " "}},
        "empty": {"class_type": "QIP_EmptyLatent", "inputs": {"preset": CUSTOM, "width": 128, "height": 128,
                                                              "batch_size": 1}},
        "ks": {"class_type": "KSampler", "inputs": {
            "model": ["dit", 0], "seed": 7, "steps": 3, "cfg": 2.0, "sampler_name": "euler", "scheduler": "simple",
            "positive": ["text", 0], "negative": ["text", 1], "latent_image": ["empty", 0], "denoise": 1.0}},
        "dec_host": {"class_type": "VAEDecode", "inputs": {"samples": ["ks", 0], "vae": ["host_vae", 0]}},
        "dec_ours": {"class_type": "VAEDecode", "inputs": {"samples": ["ks", 0], "vae": ["our_vae", 0]}},
        "enc_ours": {"class_type": "VAEEncode", "inputs": {"pixels": ["dec_host", 0], "vae": ["our_vae", 0]}},
        "enc_host": {"class_type": "VAEEncode", "inputs": {"pixels": ["dec_host", 0], "vae": ["host_vae", 0]}},
        "save_h": {"class_type": "SaveImage", "inputs": {"images": ["dec_host", 0], "filename_prefix": "h"}},
        "save_o": {"class_type": "SaveImage", "inputs": {"images": ["dec_ours", 0], "filename_prefix": "o"}},
    }
    save_latent(graph, ["enc_ours", 0], "encours")
    save_latent(graph, ["enc_host", 0], "enchost")
    result = host.run(graph)
    images = {p.name.split("_")[0]: png(p) for p in result.images}
    assert images["h"].shape == images["o"].shape == (128, 128, 3) and images["h"].std() > 1.0
    assert np.abs(images["h"] - images["o"]).max() <= 2, "the host's VAE and ours decode the same latent differently"
    latents = {p.name.split("_")[0]: load_file(str(p))["latent_tensor"] for p in result.files["latents"]}
    assert latents["encours"].shape == latents["enchost"].shape == (1, 16, 1, 16, 16)
    assert (latents["encours"] - latents["enchost"]).abs().max() < 1e-3


def _merged_dit(models_dir: Path, base: str, lora_path: Path, strength: float) -> str:
    """The tiny DiT ``base`` (safetensors or GGUF, dequantized) with the LoRA merged in, saved as an fp32 file."""
    path = models_dir / "diffusion_models" / base
    if path.suffix == ".gguf":
        from models.io.gguf import load_gguf_state_dict

        weights = load_gguf_state_dict(path, dequantize=True, dtype=torch.float32)
    else:
        weights = {k.removeprefix(DIT_PREFIX): v for k, v in comfy_tensors(path).items()}
    lora = load_file(str(lora_path))
    for block in range(TINY_DIT["num_layers"]):
        for target in LORA_TARGETS:
            module = f"transformer_blocks.{block}.{target}"
            down = lora[f"transformer.{module}.lora_A.weight"].float()
            up = lora[f"transformer.{module}.lora_B.weight"].float()
            weights[module + ".weight"] = weights[module + ".weight"] + strength * (up @ down)
    name = f"merged_{path.stem}_fp32.safetensors"
    save_file({k: v.contiguous() for k, v in weights.items()}, str(models_dir / "diffusion_models" / name))
    return name


@pytest.mark.parametrize("base", ["qwen_image_bf16.safetensors", "qwen-image-Q8_0.gguf"])
def test_host_lora_loader_changes_the_output_exactly_like_merging(host, host_models_dir, base):
    strength = 0.8
    lora_name = "qwen_image_tiny_lora_diffusers.safetensors"
    merged = _merged_dit(host_models_dir, base, host_models_dir / "loras" / lora_name, strength)
    outputs = {}
    for case in ("plain", "lora", "merged"):
        graph = small_t2i(host, steps=3, seed=5)
        loader = node_id(graph, "QIP_DiffusionModelLoader")
        graph[loader]["inputs"]["model_name"] = merged if case == "merged" else base
        if case == "lora":
            graph["lora"] = {"class_type": "LoraLoaderModelOnly", "inputs": {
                "model": [loader, 0], "lora_name": lora_name, "strength_model": strength}}
            for node in graph.values():
                for name, value in node["inputs"].items():
                    if value == [loader, 0] and node["class_type"] != "LoraLoaderModelOnly":
                        node["inputs"][name] = ["lora", 0]
        save_latent(graph, [node_id(graph, "SamplerCustomAdvanced"), 0], case)
        outputs[case] = read_latent(host.run(graph))
    assert "lora key not loaded" not in host.log_text()
    assert (outputs["lora"] - outputs["plain"]).abs().max() > 1e-2, "the LoRA did not change the output"
    assert (outputs["lora"] - outputs["merged"]).abs().max() < 1e-4
    # The patch is undone when the LoRA is not used any more: the plain model gives its plain output again.
    graph = small_t2i(host, steps=3, seed=5)
    graph[node_id(graph, "QIP_DiffusionModelLoader")]["inputs"]["model_name"] = base
    save_latent(graph, [node_id(graph, "SamplerCustomAdvanced"), 0], "plain_again")
    assert torch.equal(read_latent(host.run(graph)), outputs["plain"])


def _host_rss_mb(host) -> float:
    for line in Path(f"/proc/{host.process.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_free_unloads_and_a_second_run_reuses_the_loaded_models(host):
    host.run(small_t2i(host, steps=2, seed=11))
    loads = host.log_text().count("Qwen-Image DiT:")
    second = host.run(small_t2i(host, steps=2, seed=12))  # same loaders, new seed: the loaded models are reused
    assert second.images and host.log_text().count("Qwen-Image DiT:") == loads
    loaded = _host_rss_mb(host)
    assert host.post("/free", {"unload_models": True, "free_memory": True})[0] == 200
    # The worker applies /free between prompts (at the latest after its 10 s garbage-collection wait).
    deadline, freed = time.monotonic() + 20, loaded
    while time.monotonic() < deadline and loaded - freed < 25:
        time.sleep(0.5)
        freed = _host_rss_mb(host)
    print(f"host RSS: {loaded:.0f} MB with the models loaded, {freed:.0f} MB after /free")
    assert loaded - freed >= 25, "the models' memory did not come back after /free (tiny models: ~90 MB)"
    reloaded_run = host.run(small_t2i(host, steps=2, seed=13))
    assert reloaded_run.images and host.log_text().count("Qwen-Image DiT:") == loads + 1  # loaded afresh


def test_interrupt_returns_the_host_to_idle(host):
    slow = small_t2i(host, steps=400, size=256, seed=21)
    prompt_id = host.submit(slow)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # wait until it is sampling
        if "%|" in host.log_text().splitlines()[-1] if host.log_text() else False:
            break
        time.sleep(0.2)
    time.sleep(1.0)
    started = time.monotonic()
    assert host.post("/interrupt")[0] == 200
    entry = host.wait(prompt_id, timeout=120)
    stopped_after = time.monotonic() - started
    messages = [m[0] for m in entry["status"]["messages"]]
    assert "execution_interrupted" in messages, messages
    assert stopped_after < 30, f"the interrupt took {stopped_after:.1f} s"
    assert host.run(small_t2i(host, steps=2, seed=22)).images



@pytest.mark.parametrize("dtype", ["fp8_e4m3fn", "fp8_e4m3fn_scaled"])
def test_fp8_files_run_with_the_hosts_fp8_layers(host, host_models_dir, dtype):
    from tiny_models.factory import make_dit

    name = make_dit(host_models_dir / "diffusion_models", dtype=dtype, seed=0).name
    outputs = {}
    for model_name in ("qwen_image_bf16.safetensors", name):
        graph = small_t2i(host, steps=3, seed=8)
        set_inputs(graph, "QIP_DiffusionModelLoader", model_name=model_name)
        save_latent(graph, [node_id(graph, "SamplerCustomAdvanced"), 0], model_name.split(".")[0])
        outputs[model_name] = read_latent(host.run(graph)).flatten()
    cosine = torch.nn.functional.cosine_similarity(outputs[name], outputs["qwen_image_bf16.safetensors"], dim=0)
    assert cosine > 0.99, f"{dtype} output differs from bf16 (cosine {cosine:.4f})"


@pytest.mark.parametrize("sampler", ["KSampler", "SamplerCustomAdvanced"])
def test_aura_flow_shift_and_cfg_norm_apply_to_our_model(host, sampler):
    def run(patch: bool) -> torch.Tensor:
        graph = small_t2i(host, steps=3, seed=9)
        model = graph[node_id(graph, "QIP_TrueCFG")]["inputs"]["model"]
        if patch:
            graph["aura"] = {"class_type": "ModelSamplingAuraFlow", "inputs": {"model": model, "shift": 3.1}}
            graph["norm"] = {"class_type": "CFGNorm", "inputs": {"model": ["aura", 0], "strength": 1.0}}
            model = ["norm", 0]
        encode = node_id(graph, "QIP_TextEncode")
        if sampler == "KSampler":
            graph["ks"] = {"class_type": "KSampler", "inputs": {
                "model": model, "seed": 9, "steps": 3, "cfg": 4.0, "sampler_name": "euler", "scheduler": "simple",
                "positive": [encode, 0], "negative": [encode, 1],
                "latent_image": [node_id(graph, "QIP_EmptyLatent"), 0], "denoise": 1.0}}
            output = ["ks", 0]
        else:  # our scheduler follows the model's (AuraFlow) sampling when told to
            set_inputs(graph, "CFGGuider", model=model)
            set_inputs(graph, "QIP_Scheduler", model=model, shift="the model's current shift")
            output = [node_id(graph, "SamplerCustomAdvanced"), 0]
        save_latent(graph, output, f"{sampler}{int(patch)}")
        return read_latent(host.run(graph))

    plain, patched = run(False), run(True)
    assert torch.isfinite(patched).all() and (plain - patched).abs().max() > 1e-3


def test_loaders_refuse_a_wrong_file_with_a_clear_message(host, host_models_dir):
    import shutil

    shutil.copyfile(host_models_dir / "vae" / "qwen_image_vae.safetensors",
                    host_models_dir / "diffusion_models" / "not_a_dit.safetensors")
    graph = small_t2i(host, steps=2)
    set_inputs(graph, "QIP_DiffusionModelLoader", model_name="not_a_dit.safetensors")
    with pytest.raises(Exception) as failure:
        host.run(graph)
    message = str(failure.value)
    assert "QIP_DiffusionModelLoader" in message and "VAE" in message, message[:2000]


def test_loader_offers_diffusers_folders_but_not_their_shards(host, host_models_dir):
    from tiny_models.factory import make_dit

    folder = make_dit(host_models_dir / "diffusion_models", layout="diffusers", dtype="bf16", seed=0)
    name = f"{folder.parent.name}/{folder.name}/"
    choices = host.object_info()["QIP_DiffusionModelLoader"]["input"]["required"]["model_name"][1]["options"]
    assert name in choices
    assert not any("diffusion_pytorch_model" in choice for choice in choices), choices
    outputs = []
    for model_name in (name, "qwen_image_bf16.safetensors"):  # the same seed: the same weights in both layouts
        graph = small_t2i(host, steps=2, seed=4)
        set_inputs(graph, "QIP_DiffusionModelLoader", model_name=model_name)
        save_latent(graph, [node_id(graph, "SamplerCustomAdvanced"), 0], f"layout{len(outputs)}")
        outputs.append(read_latent(host.run(graph)))
    assert torch.equal(outputs[0], outputs[1])
