"""Test-only nodes for the host the tests start (never shipped): IMAGE shapes no core node makes, which other
packs' nodes hand to ours (a 1-channel depth map, a 2-channel image, an empty batch); probes of the host's model
hooks (DIFFUSION_MODEL wrappers, the attention override, block patches) as other packs install them."""

import json
import os

import torch
from safetensors.torch import save_file

import comfy.patcher_extension


class ImageShape:
    """The first ``batch`` pictures (0: an empty batch) with ``channels`` channels (fewer: the first ones kept;
    more: filled with ones)."""

    CATEGORY = "testing"
    FUNCTION = "reshape"
    RETURN_TYPES = ("IMAGE",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"image": ("IMAGE",), "channels": ("INT", {"default": 3, "min": 1, "max": 4}),
                             "batch": ("INT", {"default": 1, "min": 0, "max": 64})}}

    def reshape(self, image: torch.Tensor, channels: int, batch: int):
        image = image[:batch]
        if channels <= image.shape[-1]:
            return (image[..., :channels].contiguous(),)
        fill = torch.ones(*image.shape[:-1], channels - image.shape[-1], dtype=image.dtype)
        return (torch.cat([image, fill], dim=-1),)


NODE_CLASS_MAPPINGS = {"QIPTest_ImageShape": ImageShape}


class ModelPatch:
    """A probe that patches a MODEL: ``INPUTS`` are its inputs after ``model``; ``patch(model, ...)`` returns it."""

    CATEGORY = "testing"
    FUNCTION = "patch"
    RETURN_TYPES = ("MODEL",)
    INPUTS: dict = {}

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"model": ("MODEL",), **cls.INPUTS}}


def _append(path: str, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


class RecordDiT(ModelPatch):
    """Counts the calls that reach the diffusion model (a DIFFUSION_MODEL wrapper: placed after a cache node it
    sees only the calls the cache lets through) and saves the first call's inputs and output to ``path`` +
    ``.safetensors``, one JSON line per call to ``path``."""

    INPUTS = {"path": ("STRING", {"default": ""})}

    def patch(self, model, path: str):
        model = model.clone()

        def wrapper(executor, *args, **kwargs):
            out = executor(*args, **kwargs)
            options = args[-1]
            _append(path, {"options_last": isinstance(options, dict), "compiling": torch.compiler.is_compiling()})
            first = path + ".safetensors"
            if not os.path.exists(first):
                tensors = {"x": args[0], "timestep": args[1].reshape(-1), "context": args[2], "out": out}
                for i, ref in enumerate(args[4] or []):
                    tensors[f"ref{i}"] = ref
                save_file({k: v.detach().float().contiguous().cpu() for k, v in tensors.items()}, first)
            return out

        model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "qip_test_record", wrapper)
        return (model,)


class AttentionOverride(ModelPatch):
    """Installs ``optimized_attention_override``: one JSON line per attention call (its block index and query
    shape); the call's result is the host function's, or plain SDPA on the same tensors."""

    INPUTS = {"path": ("STRING", {"default": ""}),
              "sdpa": ("BOOLEAN", {"default": False})}

    def patch(self, model, path: str, sdpa: bool):
        model = model.clone()

        def override(func, q, k, v, heads, *args, **kwargs):
            options = kwargs.get("transformer_options") or {}
            _append(path, {"block": options.get("block_index"), "total": options.get("total_blocks"),
                           "shape": list(q.shape)})
            if sdpa:
                assert kwargs.get("skip_reshape") and kwargs.get("skip_output_reshape")
                return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=kwargs.get("mask"))
            return func(q, k, v, heads, *args, **kwargs)

        model.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = override
        return (model,)


class ReplaceBlock(ModelPatch):
    """``patches_replace["dit"][("double_block", index)]``: "skip" returns the block's inputs unchanged,
    "original" runs the original block (and then reads its inputs again, which must be unchanged)."""

    INPUTS = {"index": ("INT", {"default": 0, "min": 0}),
              "mode": (["skip", "original"],)}

    def patch(self, model, index: int, mode: str):
        model = model.clone()

        def replace(args, extra):
            if mode == "skip":
                return {"img": args["img"], "txt": args["txt"]}
            before = args["img"].clone()
            out = extra["original_block"](args)
            assert torch.equal(before, args["img"]), "original_block changed its inputs"
            return out

        model.set_model_patch_replace(replace, "dit", "double_block", index)
        return (model,)


class AfterBlock(ModelPatch):
    """``patches["double_block"]``: adds ``value * ramp`` (a ramp over the channels: a constant would vanish in
    the next LayerNorm) to the image tokens after block ``index``."""

    INPUTS = {"index": ("INT", {"default": 0, "min": 0}),
              "value": ("FLOAT", {"default": 0.5, "min": -10, "max": 10})}

    def patch(self, model, index: int, value: float):
        model = model.clone()

        def after(args):
            if args["block_index"] == index:
                img = args["img"]
                args["img"] = img + value * torch.linspace(0, 1, img.shape[-1], dtype=img.dtype, device=img.device)
            return args

        model.set_model_patch(after, "double_block")
        return (model,)


NODE_CLASS_MAPPINGS.update({"QIPTest_RecordDiT": RecordDiT, "QIPTest_AttentionOverride": AttentionOverride,
                            "QIPTest_ReplaceBlock": ReplaceBlock, "QIPTest_AfterBlock": AfterBlock})


class CoreQwenImage:
    """Core's own Qwen-Image MODEL (comfy.ldm.qwen_image) built for the tiny DiT's shape and loaded with its file:
    the reference our MODEL is compared with under the host's wrappers (core's detection assumes the real width,
    so UNETLoader cannot load the tiny file)."""

    CATEGORY = "testing"
    FUNCTION = "load"
    RETURN_TYPES = ("MODEL",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"model_name": ("STRING", {"default": ""}), "config": ("STRING", {"default": "{}"})}}

    def load(self, model_name: str, config: str):
        import comfy.model_management as mm
        import comfy.model_patcher
        import comfy.supported_models
        import comfy.utils
        import folder_paths

        state_dict = comfy.utils.load_torch_file(folder_paths.get_full_path("diffusion_models", model_name))
        model_config = comfy.supported_models.QwenImage({"image_model": "qwen_image", **json.loads(config)})
        model_config.set_inference_dtype(torch.float32, None)
        model = model_config.get_model(state_dict, "", device=mm.unet_offload_device())
        model.load_model_weights(state_dict, "")
        return (comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                                 offload_device=mm.unet_offload_device()),)


NODE_CLASS_MAPPINGS["QIPTest_CoreQwenImage"] = CoreQwenImage


class AttentionMaps(ModelPatch):
    """Installs ``optimized_attention_override`` saving the attention probabilities (softmax of the scaled scores
    plus the mask the model passed, averaged over heads, batch item 0) of the first ``calls`` attention calls of
    block 0 to ``path`` + ``_<n>.safetensors``; every call's result is the host function's."""

    INPUTS = {"path": ("STRING", {"default": ""}),
              "calls": ("INT", {"default": 2, "min": 1})}

    def patch(self, model, path: str, calls: int):
        model = model.clone()
        saved = []

        def override(func, q, k, v, heads, *args, **kwargs):
            options = kwargs.get("transformer_options") or {}
            if options.get("block_index") == 0 and len(saved) < calls:
                assert kwargs.get("skip_reshape"), "the probe reads [B, heads, L, D] inputs"
                scores = (q.float() @ k.float().transpose(-1, -2)) / q.shape[-1] ** 0.5
                mask = kwargs.get("mask")
                if mask is not None:
                    scores = scores + mask.float()
                probabilities = scores.softmax(-1)[0].mean(0)
                saved.append(path)
                save_file({"probabilities": probabilities.contiguous().cpu()}, f"{path}_{len(saved) - 1}.safetensors")
            return func(q, k, v, heads, *args, **kwargs)

        model.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = override
        return (model,)


NODE_CLASS_MAPPINGS["QIPTest_AttentionMaps"] = AttentionMaps
