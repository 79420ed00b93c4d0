"""Qwen-Image 2.1 GGUF in the real host: Load Qwen-Image 2.1 Diffusion Model lists a 2.1 GGUF (tagged qwen_image21,
written by our quantizer from the host's bf16 file) and samples with it as with the file it was made from; the 1.x
loader names it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from test_qwen_image_2_1_host import DIT, graph_2_1
from test_t2i_host import read_latent, set_inputs, small_t2i
from tools.quantize_gguf import quantize_dit

GGUF = "qwen-image-2.1-Q8_0.gguf"
LOADER = "QIP_21DiffusionModelLoader"


@pytest.fixture
def gguf_file(host, host_models_dir) -> Path:
    folder = host_models_dir / "diffusion_models"
    path = quantize_dit(folder / DIT, folder / GGUF, "Q8_0", log=lambda line: None)
    yield path
    path.unlink()  # the other host tests see the models folder as the factory wrote it


def test_the_2_1_loader_lists_and_runs_a_2_1_gguf(host, gguf_file):
    assert GGUF in host.object_info()[LOADER]["input"]["required"]["model_name"][1]["options"]
    latents = {}
    for name in (DIT, GGUF):
        graph = graph_2_1([], prompt="A red fox in the snow.", negative=" ", steps=3, seed=11, cfg=4.0, size=(96, 64))
        set_inputs(graph, LOADER, model_name=name)
        latents[name] = read_latent(host.run(graph))
    error = ((latents[GGUF] - latents[DIT]).norm() / latents[DIT].norm()).item()
    print(f"2.1 Q8_0 GGUF vs its bf16 source in the host: relative L2 {error:.2e}")
    assert 0 < error < 2e-2


def test_the_1x_loader_names_a_2_1_gguf(host, gguf_file):
    graph = small_t2i(host, steps=1)
    set_inputs(graph, "QIP_DiffusionModelLoader", model_name=GGUF)
    with pytest.raises(Exception, match="this is a Qwen-Image 2.1 DiT, not a Qwen-Image diffusion model"):
        host.run(graph)


def test_the_2_1_loader_switches_the_dequant_cache(host, gguf_file):
    # The cache keeps dense copies of the one-vector layers (the shared modulation, the timestep MLP): the same
    # numbers as dequantizing them at every use, so the latents are equal either way.
    assert "dequant_cache" in host.object_info()[LOADER]["input"]["optional"]
    latents = {}
    for cache in (True, False):
        graph = graph_2_1([], prompt="A red fox in the snow.", negative=" ", steps=2, seed=12, cfg=1.0, size=(64, 64))
        set_inputs(graph, LOADER, model_name=GGUF, dequant_cache=cache)
        latents[cache] = read_latent(host.run(graph))
    assert torch.equal(latents[True], latents[False])
