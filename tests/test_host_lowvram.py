"""Our DiT under the host's low-VRAM (partial) loading: per-layer casting and LoRA weight functions apply."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch

from env import REPO_ROOT, comfyui_path, venv_python


@pytest.mark.parametrize("model", ["qwen_image_bf16.safetensors", "qwen-image-Q8_0.gguf"])
def test_partial_load_with_a_lora_equals_full_load(host_models_dir, tmp_path, model):
    out = tmp_path / "lowvram.pt"
    probe = Path(__file__).with_name("host_lowvram_probe.py")
    result = subprocess.run(
        [str(venv_python()), str(probe), str(comfyui_path()), str(REPO_ROOT),
         str(host_models_dir / "diffusion_models" / model),
         str(host_models_dir / "loras" / "qwen_image_tiny_lora_diffusers.safetensors"), str(out)],
        cwd=comfyui_path(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    results = torch.load(out)
    # In low-VRAM mode the host casts layers per call and applies the LoRA through weight functions.
    assert results["full_cast_layers"] == 0 and results["lowvram_cast_layers"] > 10
    assert results["lowvram_patched_layers"] > 10
    assert (results["lowvram"] - results["full"]).abs().max() < 1e-5
    assert results["full_left_after_unpatch"] == 0 and results["lowvram_left_after_unpatch"] == 0
    # GGUF: the host is told about the LoRA tensors patched layers will hold (safetensors weights: nothing).
    extra = results["size_with_lora"] - results["size_without_lora"]
    assert extra == results["patched_gguf_bytes"] and (extra > 0) == model.endswith(".gguf")
    assert (results["full"] - results["no_lora"]).abs().max() > 1e-3  # the LoRA is really in both
