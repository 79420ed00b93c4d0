"""Edit Encode's work, counted in-process with the host's modules (tests/edit_encode_probe.py): the VL token count
of every image equals the reference pipeline's for each mode, the vision tower runs once per image for both
prompts, each image is VAE-encoded once (masked too), and the text encoder reports progress per decoder layer and
stops on the host's interrupt."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

from models.encoders.vision_preprocess import MAX_PIXELS, MIN_PIXELS
from references import host_tokenizer_dir
from tiny_models.factory import make_text_encoder

REPO_ROOT = Path(__file__).resolve().parent.parent
SIZES = [(1000, 750), (777, 1231), (1024, 1024), (512, 2048)]
# The node's two modes; Edit-2509 and Edit-2511 share diffusers' QwenImageEditPlusPipeline and the node's mode.
MODEL_MODES = {"edit": "edit", "edit_2509": "edit_plus", "edit_2511": "edit_plus"}


def _reference_tokens(model: str, width: int, height: int) -> int:
    """Merged VL tokens of one image as diffusers' pipeline for ``model`` computes its VL image size, then the
    Qwen2-VL processor's own rounding (one token per 28x28 pixels)."""
    if model == "edit":
        from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit import calculate_dimensions

        vl_width, vl_height, _ = calculate_dimensions(1024 * 1024, width / height)
    else:
        from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import (CONDITION_IMAGE_SIZE,
                                                                                calculate_dimensions)

        vl_width, vl_height = calculate_dimensions(CONDITION_IMAGE_SIZE, width / height)
    rows, cols = smart_resize(vl_height, vl_width, factor=28, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    return (rows // 28) * (cols // 28)


@pytest.fixture(scope="module")
def probe(tmp_path_factory) -> dict:
    from env import comfyui_path, venv_python

    root = tmp_path_factory.mktemp("edit-probe")
    runs = {f"edit_{i}": {"mode": "edit", "sizes": [size]} for i, size in enumerate(SIZES)}
    runs["edit_plus"] = {"mode": "edit_plus", "sizes": SIZES}
    runs["edit_plus_same"] = {"mode": "edit_plus", "sizes": SIZES[:2], "vl_area": "same as the references"}
    runs["masked"] = {"mode": "edit_plus", "sizes": SIZES[:2], "mask": True}
    runs["interrupt"] = {"mode": "edit_plus", "sizes": SIZES[:1], "interrupt": True}
    io_file = root / "io.json"
    io_file.write_text(json.dumps({
        "text_encoder": str(make_text_encoder(root, layout="comfy", dtype="fp32", seed=3)),
        "tokenizer": str(host_tokenizer_dir()), "runs": list(runs.values())}), encoding="utf-8")
    result = subprocess.run([str(venv_python()), str(Path(__file__).with_name("edit_encode_probe.py")),
                             str(REPO_ROOT), str(io_file)], cwd=comfyui_path(), capture_output=True, text=True,
                            timeout=600, env=dict(os.environ, PYTHONPATH=str(comfyui_path())))
    assert result.returncode == 0, result.stderr[-4000:]
    results = json.loads(io_file.read_text(encoding="utf-8"))["results"]
    return {name: {**run, **result} for (name, run), result in zip(runs.items(), results)}


@pytest.mark.parametrize("model", list(MODEL_MODES))
def test_vl_tokens_per_image_equal_the_reference(probe, model):
    if MODEL_MODES[model] == "edit":  # one image per run
        ours = [token for i in range(len(SIZES)) for token in probe[f"edit_{i}"]["vision_tokens"]]
    else:
        ours = probe["edit_plus"]["vision_tokens"]
    expected = [_reference_tokens(model, w, h) for w, h in SIZES]
    print(f"{model}: VL tokens per image {ours} (reference {expected})")
    assert ours == expected


def test_the_previous_vl_size_is_still_an_option(probe):
    # 'same as the references': the 1024x1024-area VAE images, as the node did before
    assert probe["edit_plus_same"]["vision_tokens"] == [_reference_tokens("edit", w, h) for w, h in SIZES[:2]]


def test_the_vision_tower_runs_once_per_image_for_both_prompts(probe):
    for name, result in probe.items():
        if not result.get("interrupt"):
            assert len(result["vision_tokens"]) == len(result["sizes"]), name  # calls of the vision tower
            assert result["layer_calls"] == 2 * result["decoder_layers"], name  # positive and negative


def test_each_image_is_vae_encoded_once(probe):
    assert probe["edit_plus"]["vae_calls"] == len(SIZES)
    assert probe["masked"]["vae_calls"] == 2  # the masked target reuses the chosen image's latent


def test_the_text_encoder_reports_progress_per_decoder_layer(probe):
    result = probe["edit_plus"]
    total = 2 * result["decoder_layers"]
    assert result["progress"] == [[done, total] for done in range(1, total + 1)]


def test_an_interrupt_stops_the_text_encoder_after_one_layer(probe):
    result = probe["interrupt"]
    assert result["interrupted"] and result["layer_calls"] == 1
