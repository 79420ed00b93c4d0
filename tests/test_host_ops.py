"""Layer classes from the host's op selection: ``host_ops`` returns what ``comfy.ops.pick_operations`` picks (our own
casting where a host lacks it), ComfyUI's mixed-precision ("comfy_quant") fp8 files load on the host's
mixed-precision layers and match the bf16 file, and a host started with ``--fast`` (fp8 matmul) stays within fp8
bounds of a normal one.

The bounds are measured, not guessed: "bf16 bounds" is the relative error of the same computation with the bf16
file in bf16 against fp32; "fp8 bounds" that of the plain fp8 file against the bf16 one.  The mixed file is
compared with its dequantized twin (the same weights as a plain bf16 file: fp8 x weight_scale rounded to bf16,
see tools/tiny_models/comfy_quant.py), which it must match within bf16 bounds, and with the original bf16 file,
which it must match within fp8 bounds for one step and within bf16 bounds for a sampled latent.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch

from env import REPO_ROOT, comfyui_path, venv_python
from tiny_models.comfy_quant import make_companions, make_dit_comfy_quant
from tiny_models.factory import make_dit, make_text_encoder
from test_t2i_host import node_id, read_latent, save_latent, set_inputs, small_t2i

PROBE = Path(__file__).with_name("host_ops_probe.py")
BF16, FP8, SCALED = ("qwen_image_bf16.safetensors", "qwen_image_fp8_e4m3fn.safetensors",
                     "qwen_image_fp8_e4m3fn_scaled.safetensors")
MIXED, MIXED_INPUT_SCALE = "qwen_image_fp8mixed.safetensors", "qwen_image_fp8mixed_input_scale.safetensors"
TWIN = "qwen_image_fp8mixed_twin.safetensors"


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def write_files(folder: Path) -> None:
    """The fp8 files of every kind, with the values of the models folder's bf16 file (seed 0)."""
    make_dit(folder, dtype="fp8_e4m3fn", seed=0)
    make_dit(folder, dtype="fp8_e4m3fn_scaled", seed=0)
    make_companions(make_dit_comfy_quant(folder, seed=0))
    make_dit_comfy_quant(folder, seed=0, prefix=True)
    make_dit_comfy_quant(folder, seed=0, input_scale=1.0)


@pytest.fixture(scope="module")
def probe(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("host-ops")
    make_dit(folder, dtype="bf16", seed=0)
    make_text_encoder(folder, dtype="fp8_e4m3fn_scaled", seed=0)
    write_files(folder)
    out = folder / "probe.pt"
    result = subprocess.run([str(venv_python()), str(PROBE), str(comfyui_path()), str(REPO_ROOT), str(folder),
                             str(out)], cwd=comfyui_path(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return torch.load(out)


def test_host_ops_returns_what_pick_operations_picks(probe):
    ops, calls = probe["ops"], probe["calls"]
    # plain, fp8 and scaled fp8 files: the very namespace the host picked, asked as core asks for its own models
    assert ops["bf16"] == {"is_pick_result": True, "subclass_of_pick_result": True, "name": "disable_weight_init",
                           "stored": "torch.float32"}
    assert ops["fp8"]["is_pick_result"] and ops["fp8"]["name"] == "manual_cast"
    assert ops["scaled"]["is_pick_result"] and ops["scaled"]["name"] == "scaled_fp8_op"
    scaled_call = next(c for c in calls if c["scaled_fp8"] != "None")
    # the factory's marker is empty (as ComfyUI writes it): fp8 optimizations on, as core reads it
    assert scaled_call["fp8_optimizations"] is True and scaled_call["scaled_fp8"] == "torch.float8_e4m3fn"
    assert all(c["fp8_optimizations"] is False for c in calls if c["scaled_fp8"] == "None")
    # mixed-precision files: the host's mixed-precision namespace, subclassed so that our loaders can fill it
    for case in ("comfy_quant", "comfy_quant_prefixed", "metadata_only"):
        assert ops[case]["subclass_of_pick_result"] and ops[case]["name"] == "MixedPrecisionOps", case
        assert ops[case]["stored"] == "torch.float8_e4m3fn"
    assert any(c["mixed"] and c["returned"] == "MixedPrecisionOps" for c in calls)
    # a scaled text encoder: never fp8 matmul, as core builds its own (scaled_fp8_ops(fp8_matrix_mult=False))
    text_encoder = probe["text_encoder"]
    assert text_encoder["is_pick_result"] and text_encoder["returned"] == "scaled_fp8_op"
    assert text_encoder["fp8_optimizations"] is False and text_encoder["disable_fast_fp8"] is True


def test_without_pick_operations_our_own_casting(probe):
    assert probe["fallback_ops"] == {
        "bf16": "comfy.ops.disable_weight_init", "fp8": "comfy.ops.manual_cast",
        "scaled": "qip.models.common.ops.CastOps", "comfy_quant": "qip.models.common.ops.CastOps",
        "comfy_quant_prefixed": "qip.models.common.ops.CastOps", "metadata_only": "qip.models.common.ops.CastOps",
        "twin": "comfy.ops.disable_weight_init"}
    # our casting (fp8 x weight_scale) computes what the host's mixed-precision layers compute
    outputs = probe["outputs"]
    assert probe["layers"]["comfy_quant_fallback"]["to_q_dtype"] == "torch.float8_e4m3fn"
    assert torch.allclose(outputs["comfy_quant_fallback"], outputs["comfy_quant"], rtol=0, atol=1e-6)


def test_comfy_quant_files_load_on_the_hosts_mixed_precision_layers(probe):
    for case in ("comfy_quant", "comfy_quant_prefixed", "metadata_only"):
        layers = probe["layers"][case]
        assert layers["to_q_mixed"] and layers["to_q_quantized"], (case, layers)  # block Linear: fp8 + scale
        assert not layers["img_in_quantized"] and layers["img_in_dtype"] == "torch.float32", (case, layers)
    outputs = probe["outputs"]
    # markers or metadata, with or without the prefix: the same model
    assert torch.equal(outputs["comfy_quant_prefixed"], outputs["comfy_quant"])
    assert torch.equal(outputs["metadata_only"], outputs["comfy_quant"])


def test_comfy_quant_step_matches_the_bf16_file(probe):
    outputs = probe["outputs"]
    bf16_bound = relative(outputs["bf16@bf16"], outputs["bf16"])  # the bf16 file: bf16 vs fp32 compute
    fp8_bound = relative(outputs["fp8"], outputs["bf16"])  # the plain fp8 file vs the bf16 file
    twin, original = relative(outputs["comfy_quant"], outputs["twin"]), relative(outputs["comfy_quant"],
                                                                                   outputs["bf16"])
    print(f"one step: comfy_quant vs its bf16 twin {twin:.2e}, vs the bf16 file {original:.2e}; "
          f"bf16 vs fp32 {bf16_bound:.2e}; fp8 file vs bf16 {fp8_bound:.2e}")
    assert 0 < twin <= bf16_bound
    assert original <= fp8_bound


# -- in the running host ---------------------------------------------------------------------------------------
def latent(host, model_name: str, weight_dtype: str = "fp32") -> torch.Tensor:
    graph = small_t2i(host, steps=3, seed=8)
    set_inputs(graph, "QIP_DiffusionModelLoader", model_name=model_name, weight_dtype=weight_dtype)
    save_latent(graph, [node_id(graph, "SamplerCustomAdvanced"), 0], model_name.split(".")[0] + weight_dtype)
    return read_latent(host.run(graph)).flatten()


@pytest.fixture(scope="module")
def host_files(host_models_dir) -> Path:
    write_files(host_models_dir / "diffusion_models")
    return host_models_dir


def test_comfy_quant_file_samples_like_the_bf16_file(host, host_files):
    fp32, bf16 = latent(host, BF16), latent(host, BF16, "bf16")
    mixed, twin, fp8 = latent(host, MIXED), latent(host, TWIN), latent(host, FP8)
    bf16_bound, fp8_bound = relative(bf16, fp32), relative(fp8, fp32)
    print(f"sampling: comfy_quant vs its bf16 twin {relative(mixed, twin):.2e}, vs the bf16 file "
          f"{relative(mixed, fp32):.2e}; bf16 vs fp32 {bf16_bound:.2e}; fp8 file vs bf16 {fp8_bound:.2e}")
    assert relative(mixed, twin) <= bf16_bound
    # the sampled latent: the fp8 blocks leave it as close to the bf16 file as bf16 compute does (unlike one step)
    assert relative(mixed, fp32) <= bf16_bound
    assert "mixed-precision (float8_e4m3fn) layers from the host" in host.log_text()


def test_lora_on_the_comfy_quant_file_acts_as_on_the_bf16_twin(host, host_files):
    """The host patches the mixed-precision layers itself (dequantize, add, requantize to fp8): the LoRA changes
    the mixed model as it changes the twin, within fp8 bounds."""
    from test_lora_host import _sample

    lora = ("qwen_image_tiny_lora_diffusers.safetensors", 1.0)
    (mixed, _), (mixed_lora, _) = _sample(host, MIXED), _sample(host, MIXED, lora)
    (twin, _), (twin_lora, _) = _sample(host, TWIN), _sample(host, TWIN, lora)
    (bf16, _), (fp8, _) = _sample(host, BF16), _sample(host, FP8)
    fp8_bound = relative(fp8, bf16)
    print(f"LoRA: changes the twin by {relative(twin_lora, twin):.2e}; mixed + LoRA vs twin + LoRA "
          f"{relative(mixed_lora, twin_lora):.2e}; fp8 bound {fp8_bound:.2e}")
    assert relative(twin_lora, twin) > 3 * fp8_bound and relative(mixed_lora, mixed) > 3 * fp8_bound  # it matters
    assert relative(mixed_lora, twin_lora) <= fp8_bound


def test_fast_host_stays_within_fp8_bounds(host, host_files):
    """``--fast`` with ``--supports-fp8-compute`` (the host then acts as on a GPU with fp8 compute, so its fp8
    matmul runs here on the CPU: torch's _scaled_mm) against the normal host, file by file.  fp8 matmul rounds the
    activations to fp8 as well as the weights: the bound is twice the largest error fp8 weights cause (the fp8
    files against the bf16 file on the normal host)."""
    from host import ComfyHost

    names = (BF16, FP8, SCALED, MIXED, MIXED_INPUT_SCALE)
    normal = {name: latent(host, name) for name in names}
    with ComfyHost(host_files, extra_args=("--fast", "--supports-fp8-compute"), offline=True) as fast_host:
        fast = {name: latent(fast_host, name) for name in names}
        log = fast_host.log_text()
    fp8_bound = 2 * max(relative(normal[name], normal[BF16]) for name in (FP8, SCALED))
    errors = {name: relative(fast[name], normal[name]) for name in names}
    print("--fast vs normal: " + ", ".join(f"{name.removeprefix('qwen_image_').split('.')[0]} {error:.2e}"
                                           for name, error in errors.items()) + f"; fp8 bound {fp8_bound:.2e}")
    assert errors[BF16] == 0  # no fp8 weights: fp8 matmul does not apply
    assert errors[MIXED] == 0  # no input_scale: ComfyUI 0.3.75's mixed layers dequantize
    for name in (FP8, SCALED, MIXED_INPUT_SCALE):  # activations in fp8 too: changed, within fp8 bounds
        assert 0 < errors[name] <= fp8_bound, (name, errors)
        assert torch.nn.functional.cosine_similarity(fast[name], normal[name], dim=0) > 0.99
    # the fp8 matmul ran (the host falls back to dequantizing, logging this, when it fails)
    assert "fp8 matrix mult: True" in log and "Exception during fp8 op" not in log
