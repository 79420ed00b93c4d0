"""The dequant-once cache of GGUF models in the host: on by default in the diffusion-model loader, counted in the
model size the host plans with, switched off by the loader's dequant_cache input; the same numbers either way."""

from __future__ import annotations

import subprocess
from pathlib import Path

import torch

from env import REPO_ROOT, comfyui_path, venv_python


def test_loader_dequant_cache_is_planned_for_and_changes_no_number(host_models_dir, tmp_path):
    out = tmp_path / "cache.pt"
    probe = Path(__file__).with_name("gguf_host_probe.py")
    result = subprocess.run(
        [str(venv_python()), str(probe), str(comfyui_path()), str(REPO_ROOT), str(host_models_dir / "diffusion_models"),
         "qwen-image-Q8_0.gguf", str(out)],
        cwd=comfyui_path(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    r = torch.load(out)
    # on (the default): the dense fp32 one-vector weights (modulations, timestep MLP) are in the size the host
    # plans with, and are what the model holds after a step; off: neither
    assert r["planned_True"] == r["one_vector_fp32_bytes"] > 0 and r["modulation_layers"] > 0
    assert r["size_True"] - r["size_False"] == r["planned_True"]
    assert r["held_True"] == r["planned_True"]
    assert r["planned_False"] == 0 and r["held_False"] == 0
    assert torch.equal(r["out_True"], r["out_False"])
