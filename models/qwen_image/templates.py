"""The Qwen-Image 1.x prompt templates, exactly as the diffusers pipelines build them (template strings, image
placeholders, dropped system prefix, the T2I truncation to 1024 + 34 tokens)."""

from __future__ import annotations

from ..encoders.templates import IMAGE_PLACEHOLDER, PromptTemplate, chat

__all__ = ["QWEN_IMAGE_TEMPLATES"]

_T2I_SYSTEM = ("Describe the image by detailing the color, shape, size, texture, quantity, text, spatial "
               "relationships of the objects and background:")
_EDIT_SYSTEM = ("Describe the key features of the input image (color, shape, size, texture, objects, background), "
                "then explain how the user's text instruction should alter or modify the image. Generate a new image "
                "that meets the user's requirements while maintaining consistency with the original input where "
                "appropriate.")

QWEN_IMAGE_TEMPLATES: dict[str, PromptTemplate] = {
    # QwenImagePipeline: tokenizer(max_length=1024 + 34, truncation=True)
    "t2i": PromptTemplate(chat(_T2I_SYSTEM, "{}"), drop=34, images="none", max_tokens=1024 + 34),
    # QwenImageEditPipeline: one image, its placeholder before the user text
    "edit": PromptTemplate(chat(_EDIT_SYSTEM, IMAGE_PLACEHOLDER + "{}"), drop=64, images="one"),
    # QwenImageEditPlusPipeline (Edit-2509 / 2511): "Picture i: <placeholder>" per image, then the user text
    "edit_plus": PromptTemplate(chat(_EDIT_SYSTEM, "{}"), drop=64, images="numbered"),
}
