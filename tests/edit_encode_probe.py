"""Run the pack's Edit Encode node in-process with the host's modules (subprocess helper for
tests/test_edit_encode_node.py), counting what the node does.

Usage (cwd = the ComfyUI folder, PYTHONPATH = it): python edit_encode_probe.py REPO_ROOT IO_FILE.  IO_FILE (JSON)
holds {"text_encoder": path, "tokenizer": dir, "runs": [{"mode", "sizes": [[w, h], ...], "vl_area" (default: the
node's default), "mask": bool, "interrupt": bool}]}; each run's counts are written back under "results".  The node gets the real host text
encoder (a ModelPatcher on the CPU) and a VAE stand-in that only counts its calls.
"""

import importlib.util
import json
import sys

import torch

PACKAGE = "qip_edit_probe"


def import_pack(repo: str):
    """The pack as the host imports it (after folder_paths), under a fresh package name."""
    sys.argv = ["main.py", "--cpu"]
    import comfy.options

    comfy.options.enable_args_parsing()
    import folder_paths  # noqa: F401  (the pack registers its nodes only inside a host)

    spec = importlib.util.spec_from_file_location(PACKAGE, repo + "/__init__.py", submodule_search_locations=[repo])
    pack = importlib.util.module_from_spec(spec)
    sys.modules[PACKAGE] = pack
    spec.loader.exec_module(pack)
    return pack


class CountingVAE:
    """The VAE interface Edit Encode uses; returns zero latents of the right shape and counts its calls."""

    def __init__(self):
        self.calls = 0

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return torch.zeros(pixels.shape[0], 16, 1, pixels.shape[1] // 8, pixels.shape[2] // 8)


def run(edit, text_encoder, case: dict) -> dict:
    import comfy.model_management as mm
    import comfy.utils

    visual, layers = text_encoder.encoder.model.visual, text_encoder.encoder.model.model.layers
    tokens, layer_calls, updates = [], [], []
    hooks = [visual.register_forward_hook(lambda _module, _args, out: tokens.append(out.shape[0]))]
    hooks += [layer.register_forward_hook(lambda *_: layer_calls.append(1)) for layer in layers]
    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, node_id=None: updates.append([value, total]))
    vae = CountingVAE()
    images = [torch.rand(1, h, w, 3) for w, h in case["sizes"]]
    more = {f"image{i + 1}": image for i, image in enumerate(images[1:3], start=1)}
    if images[3:]:
        more["more_images"] = images[3:]
    if case.get("mask"):
        more["mask"] = torch.zeros(1, case["sizes"][0][1], case["sizes"][0][0])
    mode = {"edit": edit.MODE_EDIT, "edit_plus": edit.MODE_EDIT_PLUS}[case["mode"]]
    interrupted = False
    if case.get("interrupt"):
        mm.interrupt_current_processing(True)
    try:
        # the node's defaults: reference area and VL size, multiple 32, the last image's grid
        edit.EditEncode.execute(text_encoder, vae, images[0], "Picture 1 in red.", " ", mode,
                                "1024x1024 (reference)", case.get("vl_area", edit.VL_REFERENCE), 32, "last image",
                                **more)
    except mm.InterruptProcessingException:
        interrupted = True
    finally:
        mm.interrupt_current_processing(False)
        comfy.utils.set_progress_bar_global_hook(None)
        for hook in hooks:
            hook.remove()
    return {"vision_tokens": tokens, "layer_calls": len(layer_calls), "vae_calls": vae.calls,
            "progress": updates, "interrupted": interrupted, "decoder_layers": len(layers)}


def main() -> None:
    repo, io_file = sys.argv[1], sys.argv[2]
    import_pack(repo)
    with open(io_file, encoding="utf-8") as handle:
        spec = json.load(handle)
    edit = sys.modules[f"{PACKAGE}.nodes.edit"]
    components = sys.modules[f"{PACKAGE}.nodes.host.components"]
    models = sys.modules[f"{PACKAGE}.models"]
    encoder = models.load_text_encoder(spec["text_encoder"], tokenizer=spec["tokenizer"])
    text_encoder = components.HostTextEncoder(encoder, torch.device("cpu"), torch.device("cpu"))
    spec["results"] = [run(edit, text_encoder, case) for case in spec["runs"]]
    with open(io_file, "w", encoding="utf-8") as handle:
        json.dump(spec, handle)


if __name__ == "__main__":
    main()
