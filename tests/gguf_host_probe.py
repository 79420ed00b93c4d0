"""Load a GGUF DiT through the pack's diffusion-model loader node with the dequant cache on and off, and record what
the host is told (model size) and what the model holds and computes (subprocess helper for tests/test_gguf_host.py;
it imports the host, hence a process).

Usage: python gguf_host_probe.py COMFYUI_DIR REPO_ROOT DIFFUSION_MODELS_DIR MODEL_NAME OUT_FILE
"""

import sys

import torch

from host_process import load_pack, start_host


def main() -> None:
    comfy_dir, repo, models_dir, model_name, out_file = sys.argv[1:6]
    folder_paths = start_host(comfy_dir)
    folder_paths.add_model_folder_path("diffusion_models", models_dir)
    load_pack(repo)
    from qip.models.io.gguf.layers import ONE_VECTOR_LAYERS, QuantizedTensor
    from qip.nodes.loaders import DiffusionModelLoader

    generator = torch.manual_seed(0)
    x = torch.randn(1, 16, 1, 8, 12, generator=generator)
    sigma = torch.tensor([0.7])
    cpu = torch.device("cpu")
    results = {}
    for cache in (True, False):
        (patcher,) = DiffusionModelLoader.execute(model_name, "fp32", "auto (from the file)", dequant_cache=cache)
        dit = patcher.model.diffusion_model
        context = torch.randn(1, 7, dit.config.joint_dim, generator=torch.manual_seed(1))
        one_vector = [m for name, m in dit.named_modules()
                      if name.endswith(ONE_VECTOR_LAYERS) and isinstance(m.weight, QuantizedTensor)]
        results[f"size_{cache}"] = patcher.model_size()
        results[f"planned_{cache}"] = patcher.gguf_cache_bytes()
        results["one_vector_fp32_bytes"] = sum(m.weight.logical_shape.numel() * 4 for m in one_vector)
        results["modulation_layers"] = sum(1 for m in one_vector if m.weight.logical_shape[0] == 6 * dit.config.width)
        patcher.load(cpu, full_load=True)
        with torch.no_grad():
            results[f"out_{cache}"] = patcher.model.apply_model(x, sigma, c_crossattn=context).clone()
        results[f"held_{cache}"] = sum(m.cached_bytes() for m in dit.modules() if hasattr(m, "cached_bytes"))
        patcher.unpatch_model(cpu)
    torch.save(results, out_file)


if __name__ == "__main__":
    main()
