"""The layer classes ``host_ops`` picks for each kind of file, with the host's ``pick_operations`` and without it,
and the DiT they load computing one step through the pack's diffusion-model loader node (subprocess helper for
tests/test_host_ops.py; it imports the host, hence a process).

Usage: python host_ops_probe.py COMFYUI_DIR REPO_ROOT DIFFUSION_MODELS_DIR OUT_FILE
DIFFUSION_MODELS_DIR holds the files named in FILES and TEXT_ENCODER; OUT_FILE (torch.save) gets, per case, the ops' class names,
what pick_operations was asked, and the DiT's output (``apply_model`` on a fixed latent).
"""

import sys

import torch

from host_process import load_pack, start_host

FILES = {"bf16": "qwen_image_bf16.safetensors", "fp8": "qwen_image_fp8_e4m3fn.safetensors",
         "scaled": "qwen_image_fp8_e4m3fn_scaled.safetensors", "comfy_quant": "qwen_image_fp8mixed.safetensors",
         "comfy_quant_prefixed": "qwen_image_fp8mixed_prefixed.safetensors",
         "metadata_only": "qwen_image_fp8mixed_metadata.safetensors", "twin": "qwen_image_fp8mixed_twin.safetensors"}
TEXT_ENCODER = "qwen_2.5_vl_7b_fp8_scaled.safetensors"


def main() -> None:
    comfy_dir, repo, models_dir, out_file = sys.argv[1:5]
    folder_paths = start_host(comfy_dir)
    import comfy.ops
    from comfy.quant_ops import QuantizedTensor

    folder_paths.add_model_folder_path("diffusion_models", models_dir)
    load_pack(repo)
    from qip.nodes.host.ops import host_ops
    from qip.nodes.loaders import DiffusionModelLoader

    x = torch.randn(1, 16, 1, 8, 12, generator=torch.manual_seed(0))
    sigma = torch.tensor([0.7])

    def output(name: str, weight_dtype: str) -> tuple[torch.Tensor, dict]:
        (patcher,) = DiffusionModelLoader.execute(name, weight_dtype, "auto (from the file)")
        dit = patcher.model.diffusion_model
        context = torch.randn(1, 7, dit.config.joint_dim, generator=torch.manual_seed(1))
        q = dit.transformer_blocks[0].attn.to_q
        layers = {"to_q_mixed": any("MixedPrecisionOps" in c.__qualname__ for c in type(q).__mro__),
                  "to_q_quantized": isinstance(q.weight, QuantizedTensor),
                  "img_in_quantized": isinstance(dit.img_in.weight, QuantizedTensor),
                  "to_q_dtype": str(q.weight.dtype), "img_in_dtype": str(dit.img_in.weight.dtype)}
        patcher.load(torch.device("cpu"), full_load=True)
        with torch.no_grad():
            out = patcher.model.apply_model(x, sigma, c_crossattn=context).clone()
        patcher.unpatch_model(torch.device("cpu"))
        return out, layers

    results: dict = {"calls": [], "outputs": {}, "layers": {}, "ops": {}, "fallback_ops": {}}
    original = comfy.ops.pick_operations

    def spy(weight_dtype, compute_dtype, load_device=None, disable_fast_fp8=False, fp8_optimizations=False,
            scaled_fp8=None, model_config=None):
        chosen = original(weight_dtype, compute_dtype, load_device, disable_fast_fp8, fp8_optimizations, scaled_fp8,
                          model_config)
        results["calls"].append({"weight_dtype": str(weight_dtype), "compute_dtype": str(compute_dtype),
                                 "fp8_optimizations": fp8_optimizations, "scaled_fp8": str(scaled_fp8),
                                 "disable_fast_fp8": disable_fast_fp8, "mixed": model_config is not None,
                                 "returned": chosen})
        return chosen

    comfy.ops.pick_operations = spy
    for case, name in FILES.items():
        ops, stored = host_ops(folder_paths.get_full_path("diffusion_models", name), torch.float32)
        returned = results["calls"][-1]["returned"]
        results["ops"][case] = {"is_pick_result": ops is returned, "subclass_of_pick_result": issubclass(ops, returned),
                                "name": ops.__name__, "stored": str(stored)}
    ops, _ = host_ops(f"{models_dir}/{TEXT_ENCODER}", torch.float32)
    results["text_encoder"] = {**results["calls"][-1], "is_pick_result": ops is results["calls"][-1]["returned"]}
    for case, name in FILES.items():
        results["outputs"][case], results["layers"][case] = output(name, "fp32")
    results["outputs"]["bf16@bf16"], _ = output(FILES["bf16"], "bf16")

    del comfy.ops.pick_operations  # a host without it: our own casting
    for case, name in FILES.items():
        ops, _ = host_ops(folder_paths.get_full_path("diffusion_models", name), torch.float32)
        results["fallback_ops"][case] = f"{ops.__module__}.{ops.__qualname__}"
    results["outputs"]["comfy_quant_fallback"], results["layers"]["comfy_quant_fallback"] = \
        output(FILES["comfy_quant"], "fp32")
    comfy.ops.pick_operations = original
    for call in [*results["calls"], results["text_encoder"]]:
        call["returned"] = call["returned"].__name__
    torch.save(results, out_file)


if __name__ == "__main__":
    main()
