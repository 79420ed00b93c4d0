"""Run ComfyUI's own Qwen-Image DiT on given weights and inputs (subprocess helper for tests/test_dit.py).

Usage: python comfy_dit_oracle.py COMFYUI_DIR IO_FILE.  IO_FILE (torch.save) holds {"config": diffusers config,
"state_dict": ..., "cases": [{"x", "timestep", "context", "mask", "refs"}]}; the outputs are written back under
"outputs".  Importing comfy has side effects (argument parsing, device probing), hence the separate process.
"""

import sys

import torch


def import_host(comfy_dir: str) -> None:
    """Make ComfyUI importable in this process, configured as the tests run it (CPU, plain SDPA)."""
    sys.argv = [sys.argv[0], "--cpu", "--use-pytorch-cross-attention"]
    sys.path.insert(0, comfy_dir)
    import comfy.options

    comfy.options.enable_args_parsing()


def comfy_dit(cfg: dict, state_dict: dict):
    """ComfyUI's QwenImageTransformer2DModel for a diffusers config, loaded strictly with ``state_dict``."""
    import comfy.ldm.qwen_image.model as qwen_model
    import comfy.ops

    model = qwen_model.QwenImageTransformer2DModel(
        patch_size=cfg["patch_size"], in_channels=cfg["in_channels"], out_channels=cfg["out_channels"],
        num_layers=cfg["num_layers"], attention_head_dim=cfg["attention_head_dim"],
        num_attention_heads=cfg["num_attention_heads"], joint_attention_dim=cfg["joint_attention_dim"],
        axes_dims_rope=tuple(cfg["axes_dims_rope"]), image_model="qwen_image", dtype=torch.float32, device="cpu",
        operations=comfy.ops.disable_weight_init)
    model.load_state_dict(state_dict, strict=True)
    return model


def main() -> None:
    comfy_dir, io_file = sys.argv[1], sys.argv[2]
    import_host(comfy_dir)
    data = torch.load(io_file)
    model = comfy_dit(data["config"], data["state_dict"])
    outputs = []
    with torch.no_grad():
        for case in data["cases"]:
            refs = [r.unsqueeze(2) for r in case["refs"]] if case["refs"] else None
            # ComfyUI takes the unpacked 5-D latent [B, C, T, H, W] and sigma (its time_proj scales by 1000)
            out = model(case["x"].unsqueeze(2), case["timestep"], case["context"], attention_mask=case["mask"],
                        ref_latents=refs, transformer_options={})
            outputs.append(out.squeeze(2))
    data["outputs"] = outputs
    torch.save(data, io_file)


if __name__ == "__main__":
    main()
