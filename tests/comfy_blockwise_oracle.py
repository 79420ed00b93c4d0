"""Run ComfyUI's own DiffSynth blockwise ControlNet code on given weights (subprocess helper for
tests/test_blockwise_control.py).

Usage: python comfy_blockwise_oracle.py COMFYUI_DIR IO_FILE.  IO_FILE (torch.save) holds {"dit_config": diffusers
config, "dit_state", "patches": [{"config": ComfyUI QwenImageBlockWiseControlNet kwargs, "state", "modules":
[{"raw", "img", "block"}], "guided": [{"x", "timestep", "context", "raw", "strength", "mask"}]}]}.  Written into
each patch entry: "module_outputs" [(tokens, block output)] (ComfyUI's process_input_latent_image and
control_block) and "guided_outputs" (ComfyUI's DiT with the patch made by its QwenImageDiffsynthControlnet node;
the node's VAE is replaced by one that returns the given raw latent).
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from comfy_dit_oracle import comfy_dit, import_host  # noqa: E402


def main() -> None:
    comfy_dir, io_file = sys.argv[1], sys.argv[2]
    import_host(comfy_dir)
    import comfy.ops
    from comfy_extras.nodes_model_patch import QwenImageBlockWiseControlNet, QwenImageDiffsynthControlnet

    data = torch.load(io_file)
    dit = comfy_dit(data["dit_config"], data["dit_state"])

    class FixedVAE:
        def __init__(self, raw):
            self.raw = raw

        def encode(self, image):
            return self.raw.clone()  # process_input_latent_image normalizes in place

        def spacial_compression_encode(self):
            return 8

    class Model:  # the MODEL input: the node clones it and sets a double_block patch
        patch = None

        def clone(self):
            return self

        def set_model_double_block_patch(self, patch):
            self.patch = patch

    for entry in data["patches"]:
        patch_model = QwenImageBlockWiseControlNet(**entry["config"], dtype=torch.float32, device="cpu",
                                                   operations=comfy.ops.manual_cast)
        patch_model.load_state_dict(entry["state"], strict=True)

        class ModelPatch:  # what ModelPatchLoader returns: a ModelPatcher whose .model is the module
            model = patch_model

        module_outputs, guided_outputs = [], []
        with torch.no_grad():
            for case in entry["modules"]:
                tokens = patch_model.process_input_latent_image(case["raw"].clone())
                module_outputs.append((tokens, patch_model.control_block(case["img"], tokens, case["block"])))
            for case in entry["guided"]:
                x, raw = case["x"], case["raw"]
                image = torch.rand(raw.shape[0], x.shape[-2] * 8, x.shape[-1] * 8, 4)  # RGBA: the node drops alpha
                model = Model()
                QwenImageDiffsynthControlnet().diffsynth_controlnet(model, ModelPatch(), FixedVAE(raw), image,
                                                                    case["strength"], case["mask"])
                options = {"patches": {"double_block": [model.patch]}}
                out = dit(x.unsqueeze(2), case["timestep"], case["context"], transformer_options=options)
                guided_outputs.append(out.squeeze(2))
        entry["module_outputs"], entry["guided_outputs"] = module_outputs, guided_outputs
    torch.save(data, io_file)


if __name__ == "__main__":
    main()
