"""Prompt encoding: positive and negative prompts to the host's CONDITIONING, with the reference template."""

from __future__ import annotations

from .common import CATEGORY, DEFAULT_NEGATIVE, TEXT_ENCODER_TYPE, mappings


class TextEncode:
    NODE_ID = "TextEncode"
    DISPLAY_NAME = "Qwen-Image Text Encode"
    CATEGORY = CATEGORY
    FUNCTION = "encode"
    RETURN_TYPES = ("CONDITIONING", "CONDITIONING")
    RETURN_NAMES = ("positive", "negative")
    OUTPUT_TOOLTIPS = ("Conditioning for the prompt.", "Conditioning for the negative prompt (true CFG).")
    DESCRIPTION = ("Encodes a prompt and a negative prompt with Qwen2.5-VL using the text-to-image template of the "
                   "reference pipeline (system prompt dropped from the embeddings).")

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "text_encoder": (TEXT_ENCODER_TYPE, {"tooltip": "From Load Qwen-Image Text Encoder."}),
            "prompt": ("STRING", {"multiline": True, "dynamicPrompts": True, "default": "",
                                  "tooltip": "What to draw. Qwen-Image follows long, detailed prompts and renders "
                                             "quoted text (English and Chinese) well."}),
            "negative_prompt": ("STRING", {"multiline": True, "dynamicPrompts": True, "default": DEFAULT_NEGATIVE,
                                           "tooltip": "What to steer away from, used when CFG > 1. The reference "
                                                      "default is a single space."}),
        }}

    def encode(self, text_encoder, prompt: str, negative_prompt: str):
        positive = text_encoder.encode(prompt, template="t2i")
        negative = text_encoder.encode(negative_prompt, template="t2i")
        return (text_encoder.conditioning(positive), text_encoder.conditioning(negative))


NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = mappings(TextEncode)
