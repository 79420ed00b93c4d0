"""The Qwen-Image 2.1 prompt template, exactly as ``QwenImage21Pipeline`` builds it: one system prompt; condition
images as "<image1><|vision_start|><|image_pad|><|vision_end|>", then " <image2>..." each, before the user text
(no images: the text-to-image template); the dropped prefix is the system turn, counted with the encoder's
tokenizer as the reference counts it (14 tokens with the Qwen tokenizer); an empty prompt is encoded as " "."""

from __future__ import annotations

from ..encoders.templates import PromptTemplate, chat, system_turn

__all__ = ["QWEN_IMAGE_2_1_TEMPLATES", "SYSTEM_PROMPT"]

SYSTEM_PROMPT = "Comprehend and analyze the provided prompt."

QWEN_IMAGE_2_1_TEMPLATES: dict[str, PromptTemplate] = {
    # prompt_template_t2i without images, prompt_template_ti2i with any number of them; no truncation
    "default": PromptTemplate(chat(SYSTEM_PROMPT, "{}"), drop=system_turn(SYSTEM_PROMPT), images="numbered",
                              image_label="<image{}>", image_separator=" ", empty_prompt=" "),
}
