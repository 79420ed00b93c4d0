"""Load our DiT through the host's ModelPatcher fully and in low-VRAM (partial) mode, with a LoRA patch, and
compare the outputs (subprocess helper for tests/test_host_lowvram.py; it imports the host, hence a process).

Usage: python host_lowvram_probe.py COMFYUI_DIR REPO_ROOT DIT_FILE LORA_FILE OUT_FILE
"""

import sys

import torch

from host_process import load_pack, start_host


def main() -> None:
    comfy_dir, repo, dit_file, lora_file, out_file = sys.argv[1:6]
    start_host(comfy_dir)
    import comfy.lora
    import comfy.ops
    import comfy.utils

    load_pack(repo)
    from qip.models import load_diffusion_model
    from qip.nodes.host.model import HostQwenImageDiT, wrap_diffusion_model
    from qip.nodes.host.ops import HostGGUFOps

    ops = HostGGUFOps if dit_file.endswith(".gguf") else comfy.ops.disable_weight_init
    dit = load_diffusion_model(dit_file, dtype=torch.float32, ops=ops, model_class=HostQwenImageDiT)
    patcher = wrap_diffusion_model(dit, torch.float32, None)
    size_without_lora = patcher.model_size()
    key_map = comfy.lora.model_lora_keys_unet(patcher.model, {})
    patcher = patcher.clone()  # as the LoRA loaders do
    patcher.add_patches(comfy.lora.load_lora(comfy.utils.load_torch_file(lora_file), key_map), 0.8)

    generator = torch.manual_seed(0)
    x = torch.randn(1, 16, 1, 8, 12, generator=generator)
    context = torch.randn(1, 7, 64, generator=generator)
    sigma = torch.tensor([0.7])
    cpu = torch.device("cpu")
    results = {"size_without_lora": size_without_lora, "size_with_lora": patcher.model_size(),
               "patched_gguf_bytes": patcher.patched_gguf_bytes()}
    for mode, budget in (("full", 0), ("lowvram", 1)):
        patcher.load(cpu, lowvram_model_memory=budget, full_load=(mode == "full"))
        cast = sum(1 for m in patcher.model.modules() if getattr(m, "comfy_cast_weights", False))
        patched = sum(1 for m in patcher.model.modules() if getattr(m, "weight_function", None))
        with torch.no_grad():
            results[mode] = patcher.model.apply_model(x, sigma, c_crossattn=context).clone()
        results[f"{mode}_cast_layers"] = cast
        results[f"{mode}_patched_layers"] = patched
        patcher.unpatch_model(cpu)
        # nothing of the patch stays behind (GGUF layers hold the host's patches until unpatched)
        held = ("_patched", "_host_patch", "_lowvram_memo")
        results[f"{mode}_left_after_unpatch"] = sum(any(k in vars(m) for k in held) for m in patcher.model.modules())
    patcher.load(cpu, full_load=True)  # no LoRA: what the patches change
    patcher.patches = {}
    patcher.unpatch_model(cpu)
    patcher.load(cpu, full_load=True)
    with torch.no_grad():
        results["no_lora"] = patcher.model.apply_model(x, sigma, c_crossattn=context).clone()
    torch.save(results, out_file)


if __name__ == "__main__":
    main()
