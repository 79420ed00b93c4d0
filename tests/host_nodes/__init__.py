"""Test-only nodes for the host the tests start (never shipped): IMAGE shapes no core node makes, which other
packs' nodes hand to ours (a 1-channel depth map, a 2-channel image, an empty batch)."""

import torch


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
