"""Soak: 50 prompts back to back through the real host, alternating text-to-image, edit, ControlNet, GGUF (the DiT;
the prompts share one text encoder, as a user's session does) and LoRA on the tiny weights.

Every prompt really runs (its sampler is never served from the host's cache), every output is bit-identical to the
first run of its kind (no state leaks from one graph into the next: LoRA patches undone, controls detached, caches
keyed right), and the server's memory stays flat: the least-squares slope of its resident memory over the prompts
after the first round is printed and bounded.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from tiny_models.images import photo_like
from test_control_host import control_graph
from test_edit_host import EDIT_ONE, _add_images, edit_graph
from test_t2i_host import node_id, read_latent, save_latent, set_inputs, small_t2i

PROMPTS = 50
KINDS = ("t2i", "edit", "control", "gguf", "lora")
MAX_SLOPE_MIB = 0.25  # per prompt, after the first round (a leaked tiny DiT copy would be ~0.7 MiB per prompt)


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def _sampled(graph: dict, class_type: str = "SamplerCustomAdvanced") -> dict:
    if not any(node["class_type"] == "SaveLatent" for node in graph.values()):
        save_latent(graph, [node_id(graph, class_type), 0], "soak")
    return graph


def _graphs(host, control_image: str, edit_image: str) -> dict:
    t2i = _sampled(small_t2i(host, steps=2, seed=21))
    gguf = _sampled(small_t2i(host, steps=2, seed=21))
    set_inputs(gguf, "QIP_DiffusionModelLoader", model_name="qwen-image-Q8_0.gguf")
    lora = _sampled(small_t2i(host, steps=2, seed=21))
    loader = node_id(lora, "QIP_DiffusionModelLoader")
    for node in lora.values():
        for name, value in node["inputs"].items():
            if value == [loader, 0]:
                node["inputs"][name] = ["lora", 0]
    lora["lora"] = {"class_type": "LoraLoaderModelOnly", "inputs": {
        "model": [loader, 0], "lora_name": "qwen_image_tiny_lora_diffusers.safetensors", "strength_model": 0.8}}
    edit = edit_graph([edit_image], model="qwen_image_bf16.safetensors", mode=EDIT_ONE, prompt="make it blue",
                      steps=2, seed=21)
    return {"t2i": t2i, "edit": edit, "control": control_graph(control_image, steps=2, seed=21), "gguf": gguf,
            "lora": lora}


def _slope(values: list[float]) -> float:
    x = np.arange(len(values), dtype=np.float64)
    return float(np.polyfit(x, np.asarray(values), 1)[0])


def test_fifty_prompts_stay_correct_and_flat(host):
    control_image = "soak_control.png"
    host.add_inputs({control_image: (photo_like(128, 96, seed=92) * 255).round().astype(np.uint8)})
    graphs = _graphs(host, control_image, _add_images(host, [(128, 96)], seed=170)[0])
    first: dict[str, torch.Tensor] = {}
    memory, start = [], time.monotonic()
    for index in range(PROMPTS):
        kind = KINDS[index % len(KINDS)]
        result = host.run(graphs[kind])
        samplers = {n for n, node in graphs[kind].items() if node["class_type"] == "SamplerCustomAdvanced"}
        cached = {n for m in host.get(f"/history/{result.prompt_id}")[result.prompt_id]["status"]["messages"]
                  if m[0] == "execution_cached" for n in m[1]["nodes"]}
        assert not samplers & cached, f"prompt {index} ({kind}) was served from the cache"
        latent = read_latent(result)
        if kind not in first:
            assert torch.isfinite(latent).all() and latent.std() > 0.1
            first[kind] = latent
        assert torch.equal(latent, first[kind]), f"prompt {index} ({kind}) differs from the first {kind} run"
        memory.append(_rss_mib(host.process.pid))
    settled = memory[len(KINDS):]
    slope = _slope(settled)
    print(f"\nsoak: {PROMPTS} prompts in {time.monotonic() - start:.0f} s; server RSS {memory[0]:.0f} -> "
          f"{memory[-1]:.0f} MiB (after round 1: {settled[0]:.0f}); slope {slope * 1024:+.1f} KiB/prompt over "
          f"prompts {len(KINDS) + 1}-{PROMPTS}")
    assert slope < MAX_SLOPE_MIB, f"server memory grows {slope:.2f} MiB per prompt: {memory}"
