"""EliGen in the real host: the poster template end to end against DiffSynth-Studio's pipeline, and the attention
map showing that an entity acts only inside its region.

The graphs come from example_workflows/qwen_image_eligen_poster.json (three entities in boxes, plain CFG 4),
made small.  DiffSynth's ``QwenImagePipeline`` runs on the same tiny weights (its DiT built from its own classes,
with Qwen-Image's tanh GELU: see tests/test_eligen.py), transformers' Qwen2.5-VL as its text encoder and the host's
tokenizer.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from build_workflows import ELIGEN_ENTITIES, ELIGEN_GLOBAL, ELIGEN_NEGATIVE
from references import QWEN_SCHEDULER, comfy_tensors, host_tokenizer_dir, pack, reference_text_encoder
from test_eligen import diffsynth_dit, tanh_gelu
from test_t2i_host import normalized_packed, read_latent, save_latent
from test_web_ui import fresh_caches
from tiny_models.factory import DIT_PREFIX
from workflow import ui_to_api

WORKFLOW = Path(__file__).resolve().parent.parent / "example_workflows" / "qwen_image_eligen_poster.json"
WIDTH, HEIGHT = 128, 96
# The reference's text-to-image template (DiffSynth's and diffusers'); its first 34 tokens are dropped.
T2I_TEMPLATE = ("<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, "
                "spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n"
                "<|im_start|>assistant\n")
T2I_DROP = 34


def poster_graph(host, steps: int = 3, seed: int = 5, lora: bool = True) -> dict:
    graph = ui_to_api(json.loads(WORKFLOW.read_text(encoding="utf-8")), host.object_info())
    for node in graph.values():
        inputs = node["inputs"]
        if node["class_type"] == "QIP_EmptyLatent":
            inputs.update(width=WIDTH, height=HEIGHT)
        if node["class_type"] == "QIP_Scheduler":
            inputs["steps"] = steps
        if node["class_type"] == "RandomNoise":
            inputs["noise_seed"] = seed
    if not lora:  # the LoRA loader's consumers take the diffusion model itself
        (lora_id,) = [key for key, node in graph.items() if node["class_type"] == "QIP_LoraLoader"]
        (dit_id,) = [key for key, node in graph.items() if node["class_type"] == "QIP_DiffusionModelLoader"]
        for node in graph.values():
            for name, value in node["inputs"].items():
                if value == [lora_id, 0]:
                    node["inputs"][name] = [dit_id, 0]
        del graph[lora_id]
    return graph


def node_of(graph: dict, class_type: str) -> str:
    (found,) = [key for key, node in graph.items() if node["class_type"] == class_type]
    return found


BOX_GRID = 1024  # Add EliGen Entity draws a box on a 1024 x 1024 grid of the image


def box_mask(box: str) -> np.ndarray:
    """A box entity's mask, computed here from its fractions "left, top, right, bottom" (1 inside)."""
    left, top, right, bottom = (round(float(v) * BOX_GRID) for v in box.split(","))
    mask = np.zeros((BOX_GRID, BOX_GRID), dtype=np.float32)
    mask[top:bottom, left:right] = 1
    return mask


class HiddenStates(torch.nn.Module):
    """transformers' Qwen2.5-VL called as DiffSynth calls its text encoder (``(...)[-1]`` = the last hidden state)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, **_ignored):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True).hidden_states


class LatentTap:
    """Stands in for DiffSynth's VAE at the end of its pipeline: keeps the final latents (the result compared)."""

    def __init__(self):
        self.latents = None

    def decode(self, latents, **_ignored):
        self.latents = latents.clone()
        return torch.zeros(latents.shape[0], 3, latents.shape[-2] * 8, latents.shape[-1] * 8)


def reference_sigmas(steps: int) -> torch.Tensor:
    """The Qwen-Image schedule as the diffusers reference computes it (float64, then float32), without the final 0."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift

    scheduler = FlowMatchEulerDiscreteScheduler(**QWEN_SCHEDULER)
    mu = calculate_shift((HEIGHT // 16) * (WIDTH // 16), QWEN_SCHEDULER["base_image_seq_len"],
                         QWEN_SCHEDULER["max_image_seq_len"], QWEN_SCHEDULER["base_shift"], QWEN_SCHEDULER["max_shift"])
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    return scheduler.sigmas[:-1].float()


def on_reference_schedule(pipe, steps: int) -> None:
    """Run DiffSynth's pipeline on the reference's sigmas, exactly.  DiffSynth computes the schedule in float32 (up
    to 2.4e-7 from the reference's) and hands the DiT ``sigma * 1000 / 1000``; the sinusoidal embedding scales sigma
    by 1000, which turns those few ulps into about 1e-4 of the final latent on the tiny random model, with or
    without entities (measured: 1.1e-4 at CFG 4, 6.6e-5 at CFG 1, while ours equals diffusers' pipeline to 8e-7)."""
    sigmas = reference_sigmas(steps)
    set_timesteps = pipe.scheduler.set_timesteps

    def reference_timesteps(*args, **kwargs):
        set_timesteps(*args, **kwargs)
        assert (pipe.scheduler.sigmas - sigmas).abs().max() < 1e-6  # the same schedule, but for rounding
        pipe.scheduler.sigmas, pipe.scheduler.timesteps = sigmas.clone(), sigmas * 1000

    embed = pipe.dit.time_text_embed.forward

    def exact_sigma(timestep, dtype, addition_t_cond=None):
        timestep = sigmas[(sigmas - timestep).abs().argmin()].reshape(1)  # the sigma before * 1000 / 1000
        return embed(timestep, dtype, addition_t_cond)

    pipe.scheduler.set_timesteps = reference_timesteps
    pipe.dit.time_text_embed.forward = exact_sigma


@pytest.mark.parametrize("on_negative", [False, True], ids=["plain_negative", "entities_on_negative"])
def test_eligen_poster_final_latent_equals_diffsynth(host, host_models_dir, on_negative):
    from diffsynth.pipelines.qwen_image import QwenImagePipeline
    from transformers import Qwen2Tokenizer

    steps, seed = 3, 5
    graph = poster_graph(host, steps=steps, seed=seed, lora=False)
    graph[node_of(graph, "QIP_EliGenApply")]["inputs"]["entities_on_negative"] = on_negative
    save_latent(graph, [node_of(graph, "SamplerCustomAdvanced"), 0], f"eligen_{on_negative}")
    result = host.run(graph)
    ours = normalized_packed(read_latent(result))

    dit_file = host_models_dir / "diffusion_models" / "qwen_image_bf16.safetensors"
    pipe = QwenImagePipeline(device="cpu", torch_dtype=torch.float32)
    pipe.dit = diffsynth_dit({name.removeprefix(DIT_PREFIX): tensor
                              for name, tensor in comfy_tensors(dit_file).items()})
    pipe.text_encoder = HiddenStates(reference_text_encoder(host_models_dir / "text_encoders" /
                                                            "qwen_2.5_vl_7b.safetensors"))
    pipe.tokenizer = Qwen2Tokenizer.from_pretrained(str(host_tokenizer_dir()))
    pipe.vae = LatentTap()
    on_reference_schedule(pipe, steps)
    masks = [Image.fromarray((np.stack([box_mask(box)] * 3, axis=-1) * 255).astype(np.uint8))
             for _, box in ELIGEN_ENTITIES]
    with tanh_gelu(), torch.no_grad():
        pipe(prompt=ELIGEN_GLOBAL, negative_prompt=ELIGEN_NEGATIVE, cfg_scale=4.0, height=HEIGHT, width=WIDTH,
             seed=seed, rand_device="cpu", num_inference_steps=steps,
             eligen_entity_prompts=[prompt for prompt, _ in ELIGEN_ENTITIES], eligen_entity_masks=masks,
             eligen_enable_on_negative=on_negative)
    reference = pack(pipe.vae.latents)
    assert ours.shape == reference.shape
    error = (ours - reference).abs().max().item()
    print(f"EliGen poster end-to-end vs DiffSynth QwenImagePipeline (3 entities, CFG 4, {steps} steps, entities on "
          f"the negative: {on_negative}): max abs "
          f"error {error:.2e} (|latent| max {reference.abs().max():.2f})")
    assert error <= 1e-4
    noise = torch.randn([1, 16, HEIGHT // 8, WIDTH // 8], generator=torch.manual_seed(seed))
    assert (ours - pack(noise)).abs().max() > 0.1  # sampling really moved the latent


def _token_lengths(prompts: list[str]) -> list[int]:
    """Each prompt's embedding length (T2I template, system prompt dropped), from the host's tokenizer."""
    from transformers import Qwen2Tokenizer

    tokenizer = Qwen2Tokenizer.from_pretrained(str(host_tokenizer_dir()))
    return [len(tokenizer(T2I_TEMPLATE.format(p)).input_ids) - T2I_DROP for p in prompts]


def _region_tokens(mask: np.ndarray) -> torch.Tensor:
    """Image tokens (row-major) in the region by the reference's rule: the mask resized to the latent by nearest
    neighbour (PIL: latent pixel j reads mask pixel floor((j + 0.5) * mask size / latent size)), a token inside when
    any of its 2x2 latent pixels is."""
    rows = np.floor((np.arange(HEIGHT // 8) + 0.5) * mask.shape[0] / (HEIGHT // 8)).astype(int)
    cols = np.floor((np.arange(WIDTH // 8) + 0.5) * mask.shape[1] / (WIDTH // 8)).astype(int)
    latent = mask[rows][:, cols]
    return torch.from_numpy(latent.reshape(HEIGHT // 16, 2, WIDTH // 16, 2).max(axis=(1, 3)).reshape(-1) > 0)


def test_entities_act_only_inside_their_regions_on_the_attention_map(host, tmp_path):
    graph = poster_graph(host, steps=1, lora=True)
    probe = str(tmp_path / "maps")
    sampler = node_of(graph, "SamplerCustomAdvanced")
    guider = node_of(graph, "CFGGuider")
    graph["maps"] = {"class_type": "QIPTest_AttentionMaps",
                     "inputs": {"model": graph[guider]["inputs"]["model"], "path": probe, "calls": 2}}
    graph[guider]["inputs"]["model"] = ["maps", 0]
    result = host.run(graph)
    assert result.images and sampler

    prompts = [prompt for prompt, _ in ELIGEN_ENTITIES]
    lengths = _token_lengths(prompts + [ELIGEN_GLOBAL])
    regions = [_region_tokens(box_mask(box)) for _, box in ELIGEN_ENTITIES]
    image_tokens = (HEIGHT // 16) * (WIDTH // 16)
    text = sum(lengths)
    maps = [load_file(f"{probe}_{i}.safetensors")["probabilities"] for i in range(2)]
    (entity_map,) = [m for m in maps if m.shape[0] == text + image_tokens]  # the positive side; the negative has none
    starts = np.cumsum([0] + lengths)
    image = slice(text, text + image_tokens)
    for i, region in enumerate(regions):
        words = slice(starts[i], starts[i + 1])
        outside, inside = ~region, region
        # the entity's words read nothing outside its region, and nothing outside reads them
        assert entity_map[words, image][:, outside].abs().max() == 0
        assert entity_map[image, words][outside].abs().max() == 0
        # inside, both directions carry attention
        assert entity_map[words, image][:, inside].sum(-1).min() > 0
        assert entity_map[image, words][inside].sum(-1).min() > 0
        # an entity's words never read another prompt's words
        others = torch.ones(text, dtype=torch.bool)
        others[words] = False
        assert entity_map[words, :text][:, others].abs().max() == 0
    # the global prompt reads every image token, and every row is a distribution
    global_words = slice(starts[-2], starts[-1])
    assert entity_map[global_words, image].min() > 0
    torch.testing.assert_close(entity_map.sum(-1), torch.ones(text + image_tokens), rtol=0, atol=1e-4)
    assert 0 < sum(r.sum() for r in regions) < len(regions) * image_tokens  # the regions really cut the image


def _without_entities(graph: dict) -> dict:
    """The same graph with Apply EliGen Entities bypassed (the sampler gets the plain prompt)."""
    apply = node_of(graph, "QIP_EliGenApply")
    source = graph[apply]["inputs"]
    for node in graph.values():
        for name, value in node["inputs"].items():
            if isinstance(value, list) and value[:1] == [apply]:
                node["inputs"][name] = source["positive" if value[1] == 0 else "negative"]
    return graph


@pytest.mark.parametrize("model_name", ["qwen-image-Q8_0.gguf", "fp8_e4m3fn_scaled"])
def test_entities_work_with_gguf_and_fp8_models(host, host_models_dir, model_name):
    from tiny_models.factory import make_dit

    if model_name.startswith("fp8"):
        model_name = make_dit(host_models_dir / "diffusion_models", dtype=model_name, seed=0).name

    def run(name: str, entities: bool) -> torch.Tensor:
        graph = poster_graph(host, steps=3, seed=11)
        graph[node_of(graph, "QIP_DiffusionModelLoader")]["inputs"]["model_name"] = name
        if not entities:
            _without_entities(graph)
        save_latent(graph, [node_of(graph, "SamplerCustomAdvanced"), 0], f"{name.split('.')[0]}_{entities}")
        return read_latent(host.run(graph)).flatten()

    # what the entities change, with the bf16 file and with the quantized one: the same change, but for rounding
    reference = run("qwen_image_bf16.safetensors", True) - run("qwen_image_bf16.safetensors", False)
    quantized = run(model_name, True) - run(model_name, False)
    cosine = torch.nn.functional.cosine_similarity(quantized, reference, dim=0).item()
    ratio = (quantized.norm() / reference.norm()).item()
    print(f"EliGen with {model_name}: the entities' effect vs bf16's: cosine {cosine:.4f}, norm ratio {ratio:.3f}")
    assert cosine > 0.95 and 0.8 < ratio < 1.25


def test_apply_shows_the_regions_and_their_prompts(host):
    graph = poster_graph(host, steps=1)
    fresh_caches(host)  # a node whose output the host has cached reports no ui
    result = host.run(graph)
    ui = result.outputs[node_of(graph, "QIP_EliGenApply")]
    assert [e["prompt"] for e in ui["qip_entities"]] == [prompt for prompt, _ in ELIGEN_ENTITIES]
    (preview,) = ui["images"]
    (path,) = [p for p in result.files["previews"] if p.name == preview["filename"]]
    picture = np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)
    assert picture.shape[:2] == (512, 512)  # box regions are drawn on a square grid of the image
    for entity, (_, box) in zip(ui["qip_entities"], ELIGEN_ENTITIES):
        colour = np.array([int(entity["colour"][i:i + 2], 16) for i in (1, 3, 5)])
        left, top, right, bottom = (float(v) for v in box.split(","))
        centre = picture[int((top + bottom) / 2 * 512), int((left + right) / 2 * 512)]
        assert np.abs(centre - (0.35 * 0.12 * 255 + 0.65 * colour)).max() <= 2, (entity, centre)
