#!/usr/bin/env python3
"""Write the UI-format workflows in workflows/ from compact descriptions (run after changing one).

A description lists nodes as ``Node(id, type, widgets, inputs, outputs)``: widget values in the order the
frontend stores them, inputs as ``name: (source id, source slot, type)``.  The UI JSON (positions, link table,
note) is derived; tests convert the result back to an API prompt with the host's own /object_info.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

WORKFLOWS = Path(__file__).resolve().parent.parent / "workflows"


@dataclass
class Node:
    id: int
    type: str
    widgets: list = field(default_factory=list)
    inputs: dict[str, tuple[int, int, str]] = field(default_factory=dict)
    outputs: list[tuple[str, str]] = field(default_factory=list)
    column: int = 0
    title: str | None = None


def build(nodes: list[Node], note: str) -> dict:
    links, ui_nodes = [], []
    outgoing: dict[tuple[int, int], list[int]] = {}
    for node in nodes:
        for name, (source, slot, kind) in node.inputs.items():
            link_id = len(links) + 1
            target_slot = list(node.inputs).index(name)
            links.append([link_id, source, slot, node.id, target_slot, kind])
            outgoing.setdefault((source, slot), []).append(link_id)
    rows: dict[int, int] = {}
    for order, node in enumerate(nodes):
        row = rows.get(node.column, 0)
        rows[node.column] = row + 1
        entry = {
            "id": node.id, "type": node.type, "pos": [40 + 380 * node.column, 40 + 260 * row], "size": [340, 200],
            "flags": {}, "order": order, "mode": 0,
            "inputs": [{"name": name, "type": kind,
                        "link": next(link[0] for link in links if link[3] == node.id and link[4] == slot)}
                       for slot, (name, (_, _, kind)) in enumerate(node.inputs.items())],
            "outputs": [{"name": name, "type": kind, "links": outgoing.get((node.id, slot), []), "slot_index": slot}
                        for slot, (name, kind) in enumerate(node.outputs)],
            "properties": {"Node name for S&R": node.type},
            "widgets_values": node.widgets,
        }
        if node.title:
            entry["title"] = node.title
        ui_nodes.append(entry)
    note_id = max(n.id for n in nodes) + 1
    ui_nodes.append({"id": note_id, "type": "MarkdownNote", "pos": [40, -320], "size": [720, 300], "flags": {},
                     "order": len(nodes), "mode": 0, "inputs": [], "outputs": [],
                     "properties": {}, "widgets_values": [note], "title": "Model files"})
    return {"last_node_id": note_id, "last_link_id": len(links), "nodes": ui_nodes, "links": links,
            "groups": [], "config": {}, "extra": {}, "version": 0.4}


def loaders(model: str, text_encoder: str = "qwen_2.5_vl_7b.safetensors",
            vae: str = "qwen_image_vae.safetensors") -> list[Node]:
    """Nodes 1-3: the diffusion model, text encoder and VAE loaders."""
    return [
        Node(1, "QIP_DiffusionModelLoader", [model, "auto", "auto (from the file)"], outputs=[("MODEL", "MODEL")]),
        Node(2, "QIP_TextEncoderLoader", [text_encoder, "auto"], outputs=[("QWEN_IMAGE_TEXT_ENCODER",) * 2]),
        Node(3, "QIP_VAELoader", [vae, "auto"], outputs=[("VAE", "VAE")]),
    ]


# Lightning LoRAs (lightx2v) are distilled for 4 / 8 steps at CFG 1 with the exponential shift mu = ln 3, which is
# exactly the AuraFlow / SD3 shift 3: sigma' = 3 s / (1 + 2 s).  Core's ModelSamplingAuraFlow states it with a
# whole number (our Sampling Shift takes mu itself, and ln 3 does not survive a 0.01-step widget).
LIGHTNING_SHIFT = 3.0
LIGHTNING_STEPS = 4
LORA_ID = 30


def lora(name: str, model: tuple = (1, 0, "MODEL")) -> Node:
    """A Load Qwen-Image LoRA node (id :data:`LORA_ID`) at strength 1 on ``model``."""
    return Node(LORA_ID, "QIP_LoraLoader", [name, 1.0, 1.0], {"model": model},
                [("model", "MODEL"), ("text_encoder", "QWEN_IMAGE_TEXT_ENCODER"), ("report", "STRING")], column=1)


def sampling(first: int, model: tuple, positive: tuple, negative: tuple, latent: tuple, steps: int, prefix: str,
             restore_to: tuple | None = None, layered: bool = False, lightning: bool = False,
             qwen_2_1: bool = False) -> list[Node]:
    """The reference sampling from node id ``first`` on: true CFG 4, the Qwen-Image Scheduler, euler, decode with
    the VAE (node 3), optionally Restore Size to ``restore_to``'s image, and save.  ``layered``: plain CFG 4 (the
    Layered reference does not rescale) and Layered Decode, saving the layers and the whole image.  ``lightning``:
    the Lightning LoRAs' sampling - CFG 1 and shift 3 without the terminal stretch (see :data:`LIGHTNING_NOTE`).
    ``qwen_2_1``: Qwen-Image 2.1's - plain CFG 1 (no guidance) and the 2.1 Scheduler."""
    cfg, sigmas, sampler, noise, guider, sample, decode = range(first, first + 7)
    guided = model if layered or qwen_2_1 else (cfg, 0, "MODEL")
    scheduler, scheduler_inputs = (("QIP_21Scheduler", {"latent": latent}) if qwen_2_1
                                   else ("QIP_Scheduler", {"model": guided, "latent": latent}))
    if qwen_2_1:
        nodes, schedule, guidance = [], [steps, 1.0], 1.0
    elif lightning:
        nodes = [Node(cfg, "ModelSamplingAuraFlow", [LIGHTNING_SHIFT], {"model": model}, [("MODEL", "MODEL")],
                      column=1)]
        schedule, guidance = [steps, 1.0, "the model's current shift", 0.0], 1.0
    else:
        nodes = [] if layered else [Node(cfg, "QIP_TrueCFG", [], {"model": model}, [("MODEL", "MODEL")], column=1)]
        schedule, guidance = [steps, 1.0, "from the latent's resolution", 0.02], 4.0
    nodes += [
        Node(sigmas, scheduler, schedule, scheduler_inputs, [("SIGMAS", "SIGMAS")], column=2),
        Node(sampler, "KSamplerSelect", ["euler"], outputs=[("SAMPLER", "SAMPLER")], column=2),
        Node(noise, "RandomNoise", [42, "fixed"], outputs=[("NOISE", "NOISE")], column=2),
        Node(guider, "CFGGuider", [guidance], {"model": guided, "positive": positive, "negative": negative},
             [("GUIDER", "GUIDER")], column=2),
        Node(sample, "SamplerCustomAdvanced", [],
             {"noise": (noise, 0, "NOISE"), "guider": (guider, 0, "GUIDER"), "sampler": (sampler, 0, "SAMPLER"),
              "sigmas": (sigmas, 0, "SIGMAS"), "latent_image": latent},
             [("output", "LATENT"), ("denoised_output", "LATENT")], column=3),
    ]
    if layered:
        return nodes + [
            Node(decode, "QIP_LayeredDecode", [False], {"vae": (3, 0, "VAE"), "samples": (sample, 0, "LATENT")},
                 [("layers", "IMAGE"), ("whole_image", "IMAGE")], column=3),
            Node(decode + 1, "SaveImage", [f"{prefix}_layer"], {"images": (decode, 0, "IMAGE")}, column=3),
            Node(decode + 2, "SaveImage", [f"{prefix}_whole"], {"images": (decode, 1, "IMAGE")}, column=3),
        ]
    nodes.append(Node(decode, "VAEDecode", [], {"samples": (sample, 0, "LATENT"), "vae": (3, 0, "VAE")},
                      [("IMAGE", "IMAGE")], column=3))
    image = (decode, 0, "IMAGE")
    if restore_to is not None:
        nodes.append(Node(decode + 1, "QIP_RestoreSize", [], {"image": image, "original": restore_to},
                          [("IMAGE", "IMAGE")], column=3))
        image = (decode + 1, 0, "IMAGE")
    nodes.append(Node(image[0] + 1, "SaveImage", [prefix], {"images": image}, column=3))
    return nodes


SAFETENSORS_NOTE = """\
**Qwen-Image text-to-image** (pack: Qwen-Image / QIP)

Put these files in your ComfyUI `models/` folders, then pick them in the three loaders:

| file | folder |
|---|---|
| `qwen_image_bf16.safetensors` **or** `qwen_image_fp8_e4m3fn.safetensors` (fp8 stays fp8 in memory) | `diffusion_models/` |
| `qwen_2.5_vl_7b.safetensors` **or** `qwen_2.5_vl_7b_fp8_scaled.safetensors` | `text_encoders/` |
| `qwen_image_vae.safetensors` | `vae/` |

Reference settings: 50 steps, CFG 4 (true CFG with norm-preserving rescale), euler, the Qwen-Image Scheduler.
With a Lightning LoRA (add LoraLoaderModelOnly after the model loader): 4 or 8 steps, CFG 1.
"""

GGUF_NOTE = """\
**Qwen-Image text-to-image from GGUF** (pack: Qwen-Image / QIP)

| file | folder |
|---|---|
| `qwen-image-Q4_K_M.gguf` (or Q2_K ... Q8_0) | `diffusion_models/` |
| `Qwen2.5-VL-7B-Instruct-Q4_K_M.gguf` **and** its mmproj file (`mmproj-*.gguf` or `*-mmproj-*.gguf`, same folder; \
needed for editing, no renaming) | `text_encoders/` |
| `qwen_image_vae.safetensors` | `vae/` |

Quantized weights stay quantized in memory and are dequantized per layer; the modulation layers are dequantized once.
Reference settings: 50 steps, CFG 4 (true CFG), euler, the Qwen-Image Scheduler.
"""


QWEN_IMAGE_2512_NOTE = """\
**Qwen-Image-2512 text-to-image** (pack: Qwen-Image / QIP)

Qwen-Image-2512 (Dec 2025) is the same architecture as Qwen-Image with more realistic people, finer natural \
detail and better text rendering; it loads like Qwen-Image (bf16, fp8, GGUF).

| file | folder |
|---|---|
| `qwen_image_2512_bf16.safetensors` **or** `qwen_image_2512_fp8_e4m3fn.safetensors` | `diffusion_models/` |
| `qwen_2.5_vl_7b.safetensors` | `text_encoders/` |
| `qwen_image_vae.safetensors` | `vae/` |

Recommended settings (model card): 50 steps, CFG 4 (true CFG), 1328x1328 or another official aspect preset, \
euler, the Qwen-Image Scheduler.
"""

LAYERED_NOTE = """\
**Qwen-Image-Layered: decompose an image into RGBA layers** (pack: Qwen-Image / QIP)

| file | folder |
|---|---|
| `qwen_image_layered_bf16.safetensors` (or fp8 / GGUF) | `diffusion_models/` |
| `qwen_2.5_vl_7b.safetensors` | `text_encoders/` |
| `qwen_image_layered_vae.safetensors` (the RGBA VAE) | `vae/` |

Load your own image (its transparency is used). Describe the whole image in the prompt (the reference writes a \
caption with Qwen2.5-VL when you give none). Layered Encode sizes it to the 640 (or 1024) bucket; the sampler \
generates the whole image and the layers; Layered Decode saves each layer as an RGBA PNG.
Reference settings: 4 layers, resolution 640, 50 steps, CFG 4 (plain CFG: the reference does not rescale), euler, \
the Qwen-Image Scheduler (it uses the Layered shift for layered latents).
"""


def layered() -> dict:
    """Decompose an RGBA image into 4 layers with Qwen-Image-Layered."""
    return build([
        *loaders("qwen_image_layered_bf16.safetensors", vae="qwen_image_layered_vae.safetensors"),
        Node(20, "LoadImage", ["qwen_edit_input_masked.png", "image"], outputs=[("IMAGE", "IMAGE"), ("MASK", "MASK")]),
        Node(7, "QIP_LayeredEncode", ["A photo of a room with a window, a table and a plant in the foreground.", " ",
                                      4, "640"],
             {"text_encoder": (2, 0, "QWEN_IMAGE_TEXT_ENCODER"), "vae": (3, 0, "VAE"), "image": (20, 0, "IMAGE"),
              "alpha_mask": (20, 1, "MASK")},
             [("positive", "CONDITIONING"), ("negative", "CONDITIONING"), ("latent", "LATENT"),
              ("sized_image", "IMAGE")], column=1),
        *sampling(8, (1, 0, "MODEL"), (7, 0, "CONDITIONING"), (7, 1, "CONDITIONING"), (7, 2, "LATENT"), 50,
                  "qwen_image_layered", layered=True),
    ], LAYERED_NOTE)


def text_to_image(model: str, text_encoder: str, note: str, lightning_lora: str | None = None) -> dict:
    """Text-to-image; with ``lightning_lora``, that LoRA and the Lightning sampling in 4 steps."""
    dit = (LORA_ID, 0, "MODEL") if lightning_lora else (1, 0, "MODEL")
    return build([
        *loaders(model, text_encoder),
        *([lora(lightning_lora)] if lightning_lora else []),
        Node(4, "QIP_TextEncode", ["A coffee shop entrance with a chalkboard sign reading \"Qwen Coffee $2 per cup\", "
                                  "a neon light beside it displaying \"通义千问\", ultra HD, 4K, cinematic composition.",
                                  " "],
             {"text_encoder": (2, 0, "QWEN_IMAGE_TEXT_ENCODER")},
             [("positive", "CONDITIONING"), ("negative", "CONDITIONING")], column=1),
        Node(5, "QIP_EmptyLatent", ["1328x1328 (1:1)", 1024, 1024, 1], outputs=[("LATENT", "LATENT")], column=1),
        *sampling(6, dit, (4, 0, "CONDITIONING"), (4, 1, "CONDITIONING"), (5, 0, "LATENT"),
                  LIGHTNING_STEPS if lightning_lora else 50, "qwen_image", lightning=bool(lightning_lora)),
    ], note)


EDIT_NOTE = """\
**Qwen-Image editing** (pack: Qwen-Image / QIP)

| file | folder |
|---|---|
| `qwen_image_edit_2511_bf16.safetensors` (or 2509, or the original `qwen_image_edit_*`; fp8 and GGUF work too) | \
`diffusion_models/` |
| `qwen_2.5_vl_7b.safetensors` (the vision tower is needed; a GGUF text encoder needs its mmproj file next to it) | \
`text_encoders/` |
| `qwen_image_vae.safetensors` | `vae/` |

Load your own image(s) in the Load Image node(s). Every image is sized by one policy (aspect kept, ~1024x1024 area, \
sides multiples of 32) for both the vision-language branch and the VAE references, the output latent sits on the \
grid of the last image, and Restore Size maps the result back to the input's exact size: no zoom, no shift. \
The original Qwen-Image-Edit: choose mode "one image". Edit-2511 is detected from the file.
Reference settings: 40 steps, CFG 4 (true CFG), euler, the Qwen-Image Scheduler.
"""

EDIT_PROMPTS = {
    1: "Turn the scene into a watercolor painting, keep the composition.",
    3: "Put the object from Picture 2 on the table in Picture 1, lit like Picture 3.",
}


def edit(images: int, masked: bool = False, lightning_lora: str | None = None) -> dict:
    """Edit with ``images`` input images (Edit-2509/2511 mode); ``masked``: the first image's alpha is the mask;
    ``lightning_lora``: that LoRA and the Lightning sampling in 4 steps."""
    names = ["qwen_edit_input_masked.png"] if masked else [f"qwen_edit_input_{i + 1}.png" for i in range(images)]
    loads = [Node(20 + i, "LoadImage", [name, "image"], outputs=[("IMAGE", "IMAGE"), ("MASK", "MASK")])
             for i, name in enumerate(names)]
    edit_inputs = {"text_encoder": (2, 0, "QWEN_IMAGE_TEXT_ENCODER"), "vae": (3, 0, "VAE"), "image": (20, 0, "IMAGE")}
    for i in range(1, images):
        edit_inputs[f"image{i + 1}"] = (20 + i, 0, "IMAGE")
    if masked:
        edit_inputs["mask"] = (20, 1, "MASK")
    prompt = "Replace the masked area with a small wooden cabin." if masked else EDIT_PROMPTS.get(images, "")
    dit = (LORA_ID, 0, "MODEL") if lightning_lora else (1, 0, "MODEL")
    return build([
        *loaders("qwen_image_edit_2511_bf16.safetensors"),
        *([lora(lightning_lora)] if lightning_lora else []),
        *loads,
        Node(7, "QIP_EditEncode", [prompt, " ", "Qwen-Image-Edit-2509 / 2511 (one or more images)",
                                   "1024x1024 (reference)", "same as the references", 32, "last image"],
             edit_inputs, [("positive", "CONDITIONING"), ("negative", "CONDITIONING"), ("latent", "LATENT"),
                           ("sized_images", "IMAGE")], column=1),
        *sampling(8, dit, (7, 0, "CONDITIONING"), (7, 1, "CONDITIONING"), (7, 2, "LATENT"),
                  LIGHTNING_STEPS if lightning_lora else 40, "qwen_image_edit",
                  restore_to=(20 + images - 1, 0, "IMAGE"), lightning=bool(lightning_lora)),
    ], lightning_note("Qwen-Image-Edit-2511", "qwen_image_edit_2511_bf16.safetensors", lightning_lora,
                      EDIT_LIGHTNING_HINT) if lightning_lora else EDIT_NOTE)


# The Lightning LoRAs' released file names (lightx2v); tiny_models/loras.py writes tiny ones under these names.
LIGHTNING_LORAS = {
    "qwen_image": "Qwen-Image-Lightning-4steps-V1.0.safetensors",
    "qwen_image_2512": "Qwen-Image-2512-Lightning-4steps-V1.0-bf16.safetensors",
    "edit_2511": "Qwen-Image-Edit-2511-Lightning-4steps-V1.0-bf16.safetensors",
}

LIGHTNING_NOTE = """\
**{title} in 4 steps with a Lightning LoRA** (pack: Qwen-Image / QIP)

| file | folder |
|---|---|
| `{model}` (or the scaled fp8 file) | `diffusion_models/` |
| `{lora}` (lightx2v; the 8-step LoRA works the same with 8 steps) | `loras/` |
| `qwen_2.5_vl_7b.safetensors` | `text_encoders/` |
| `qwen_image_vae.safetensors` | `vae/` |
{hint}
Lightning settings (the distillation's): 4 steps, CFG 1 (one model call per step, no negative pass), euler, shift 3 \
(ModelSamplingAuraFlow 3, the same curve as the reference's exponential shift mu = ln 3) and the Qwen-Image Scheduler \
following the model's shift with terminal sigma 0 (the Lightning schedule is not stretched to 0.02).
On a plain (unscaled) fp8 model use the fp8-distilled Lightning LoRA instead: a bf16 one gives grid artifacts there, \
and the LoRA node warns.
"""
EDIT_LIGHTNING_HINT = """
Load your own image. Edit Encode sizes it for both branches, Restore Size maps the result back to its exact size.
"""


def lightning_note(title: str, model: str, lora_name: str, hint: str = "") -> str:
    return LIGHTNING_NOTE.format(title=title, model=model, lora=lora_name, hint=hint)


CONTROL_NOTE = """\
**Qwen-Image with structure control** (pack: Qwen-Image / QIP)

| file | folder |
|---|---|
| `qwen_image_bf16.safetensors` (or fp8 / GGUF) | `diffusion_models/` |
| `qwen_2.5_vl_7b.safetensors` | `text_encoders/` |
| `qwen_image_vae.safetensors` | `vae/` |
| {control_file} | {control_folder} |

Load your own control image. {hint}
Reference settings: 30-50 steps, CFG 4 (true CFG), control strength 0.8-1.0, euler, the Qwen-Image Scheduler.
"""


def control(kind: str) -> dict:
    """Text-to-image guided by a control: "canny", "depth", "inpaint" (InstantX) or "diffsynth" (blockwise)."""
    union = "Qwen-Image-InstantX-ControlNet-Union.safetensors"
    spec = {
        "canny": ("qwen_control_photo.png", "canny", union, "ControlNet-Union: canny edges made by the preprocessor."),
        "depth": ("qwen_control_depth.png", "none (depth / pose map as given)", union,
                  "ControlNet-Union: the depth map is used as given (bring one from any depth estimator)."),
        "inpaint": ("qwen_edit_input_masked.png", None, "Qwen-Image-InstantX-ControlNet-Inpainting.safetensors",
                    "Inpainting ControlNet: the image's transparent area (its mask) is repainted."),
        "diffsynth": ("qwen_control_photo.png", "canny", "qwen_image_canny_diffsynth_controlnet.safetensors",
                      "DiffSynth blockwise canny patch (models/model_patches): it patches the MODEL."),
    }[kind]
    image_name, method, control_file, hint = spec
    folder = "`model_patches/`" if kind == "diffsynth" else "`controlnet/`"
    note = CONTROL_NOTE.format(control_file=f"`{control_file}`", control_folder=folder, hint=hint)
    nodes = [
        *loaders("qwen_image_bf16.safetensors"),
        Node(4, "QIP_TextEncode", ["A cozy reading corner with a green armchair, warm lamp light, film photo.", " "],
             {"text_encoder": (2, 0, "QWEN_IMAGE_TEXT_ENCODER")},
             [("positive", "CONDITIONING"), ("negative", "CONDITIONING")], column=1),
        Node(5, "QIP_EmptyLatent", ["custom (width x height below)", 768, 512, 1], outputs=[("LATENT", "LATENT")],
             column=1),
        Node(20, "LoadImage", [image_name, "image"], outputs=[("IMAGE", "IMAGE"), ("MASK", "MASK")]),
    ]
    control_image = (20, 0, "IMAGE")
    if method:
        nodes.append(Node(21, "QIP_ControlPreprocess", [method, 0.1, 0.2], {"image": (20, 0, "IMAGE")},
                          [("IMAGE", "IMAGE")], column=1))
        control_image = (21, 0, "IMAGE")
    model, positive, negative = (1, 0, "MODEL"), (4, 0, "CONDITIONING"), (4, 1, "CONDITIONING")
    if kind == "diffsynth":
        nodes += [
            Node(22, "QIP_BlockwiseControlLoader", [control_file, "auto"], outputs=[("QWEN_IMAGE_BLOCKWISE_CONTROL",) * 2]),
            Node(23, "QIP_BlockwiseControlApply", [1.0], {"model": model, "control": (22, 0, "QWEN_IMAGE_BLOCKWISE_CONTROL"),
                                                         "vae": (3, 0, "VAE"), "image": control_image},
                 [("MODEL", "MODEL")], column=1),
        ]
        model = (23, 0, "MODEL")
    else:
        apply_inputs = {"positive": positive, "negative": negative, "control_net": (22, 0, "CONTROL_NET"),
                        "vae": (3, 0, "VAE"), "image": control_image}
        if kind == "inpaint":
            apply_inputs["mask"] = (20, 1, "MASK")
        nodes += [
            Node(22, "QIP_ControlNetLoader", [control_file, "auto"], outputs=[("CONTROL_NET", "CONTROL_NET")]),
            Node(23, "QIP_ControlNetApply", [1.0, 0.0, 1.0], apply_inputs,
                 [("positive", "CONDITIONING"), ("negative", "CONDITIONING")], column=1),
        ]
        positive, negative = (23, 0, "CONDITIONING"), (23, 1, "CONDITIONING")
    nodes += sampling(6, model, positive, negative, (5, 0, "LATENT"), 30, f"qwen_image_{kind}")
    return build(nodes, note)


QWEN_2_1_FILES = """\
| file | folder |
|---|---|
| `{model}` (or its fp8 / GGUF file) | `diffusion_models/` |
| `qwen_3_vl_8b.safetensors` (Qwen3-VL-8B; or its scaled fp8 file) | `text_encoders/` |
| `qwen_image_2.1_vae_bf16.safetensors` | `vae/` |

Licence: Qwen-Image 2.1's weights are under the Qwen Research License, not Apache 2.0: read it before you use them.
"""

QWEN_2_1_NOTE = """\
**Qwen-Image 2.1 {title}** (pack: Qwen-Image / QIP)

{files}
{hint}
Reference settings: {settings}, euler, the Qwen-Image 2.1 Scheduler (its shift follows the image size). \
For CFG above 1 give a negative prompt (a single space is the reference's empty one).
"""
QWEN_2_1_SETTINGS = "40 steps, CFG 1 (2.1 is sampled without guidance), 1024x1024 (any size on a 32-px grid)"
QWEN_2_1_TURBO_SETTINGS = ("8 steps, CFG 1; if your Turbo checkpoint ships its own sigma grid "
                           "(sample_sigmas), sample that instead")
QWEN_2_1_EDIT_HINT = """\
Load your own images. 2.1 Encode sizes each one like the reference (its aspect at the output resolution's area, \
sides multiples of 32) for Qwen3-VL and the VAE alike; refer to them as image 1, 2, 3 in the prompt; up to 10 \
images (more through Qwen-Image Image List). The output takes the last image's aspect; Restore Size maps it to that \
image's exact size (remove it to keep the model's size). The Prefix Cache node keeps the prompt's and images' keys \
and values for all steps; offload them to the CPU if VRAM is short.
"""
QWEN_2_1_ENCODER = (2, 0, "QWEN_IMAGE_2_1_TEXT_ENCODER")


def loaders_2_1(model: str) -> list[Node]:
    """Nodes 1-3: the Qwen-Image 2.1 loaders."""
    return [
        Node(1, "QIP_21DiffusionModelLoader", [model, "auto"], outputs=[("MODEL", "MODEL")]),
        Node(2, "QIP_21TextEncoderLoader", ["qwen_3_vl_8b.safetensors", "auto"],
             outputs=[(QWEN_2_1_ENCODER[2],) * 2]),
        Node(3, "QIP_21VAELoader", ["qwen_image_2.1_vae_bf16.safetensors", "auto"], outputs=[("VAE", "VAE")]),
    ]


def encode_2_1(prompt: str, images: int = 0) -> Node:
    """Node 4: Qwen-Image 2.1 Encode, with the images of LoadImage nodes 20, 21, ... when ``images``."""
    inputs = {"text_encoder": QWEN_2_1_ENCODER}
    if images:
        inputs |= {"vae": (3, 0, "VAE"), "image": (20, 0, "IMAGE")}
        inputs |= {f"image{i + 1}": (20 + i, 0, "IMAGE") for i in range(1, images)}
    return Node(4, "QIP_21Encode", [prompt, "", 1024], inputs,
                [("positive", "CONDITIONING"), ("negative", "CONDITIONING"), ("latent", "LATENT")], column=1)


def text_to_image_2_1(model: str, steps: int, title: str, settings: str) -> dict:
    """Qwen-Image 2.1 text-to-image at 1024x1024."""
    return build([
        *loaders_2_1(model),
        encode_2_1("A capybara wearing a wizard hat, reading a book by candlelight, oil painting."),
        Node(5, "QIP_21EmptyLatent", [1024, 1024, 1], outputs=[("LATENT", "LATENT")], column=1),
        *sampling(6, (1, 0, "MODEL"), (4, 0, "CONDITIONING"), (4, 1, "CONDITIONING"), (5, 0, "LATENT"), steps,
                  "qwen_image_2_1", qwen_2_1=True),
    ], QWEN_2_1_NOTE.format(title=title, files=QWEN_2_1_FILES.format(model=model), hint="", settings=settings))


def edit_2_1(images: int) -> dict:
    """Qwen-Image 2.1 conditioned on ``images`` images, with the prefix cache node."""
    model = "qwen_image_2_1_bf16.safetensors"
    return build([
        *loaders_2_1(model),
        *(Node(20 + i, "LoadImage", [f"qwen_edit_input_{i + 1}.png", "image"],
               outputs=[("IMAGE", "IMAGE"), ("MASK", "MASK")]) for i in range(images)),
        encode_2_1("Put the object from image 2 on the table in image 1, lit like image 3.", images),
        Node(5, "QIP_21PrefixCache", ["on, kept on the compute device (fastest)"], {"model": (1, 0, "MODEL")},
             [("MODEL", "MODEL")], column=1),
        *sampling(6, (5, 0, "MODEL"), (4, 0, "CONDITIONING"), (4, 1, "CONDITIONING"), (4, 2, "LATENT"), 40,
                  "qwen_image_2_1_edit", restore_to=(20 + images - 1, 0, "IMAGE"), qwen_2_1=True),
    ], QWEN_2_1_NOTE.format(title=f"with {images} condition images", files=QWEN_2_1_FILES.format(model=model),
                            hint=QWEN_2_1_EDIT_HINT, settings=QWEN_2_1_SETTINGS))


def main() -> None:
    WORKFLOWS.mkdir(exist_ok=True)
    outputs = {
        "qwen_image_t2i.json": text_to_image("qwen_image_bf16.safetensors", "qwen_2.5_vl_7b.safetensors",
                                             SAFETENSORS_NOTE),
        "qwen_image_t2i_gguf.json": text_to_image("qwen-image-Q8_0.gguf", "Qwen2.5-VL-7B-Instruct-Q8_0.gguf",
                                                  GGUF_NOTE),
        "qwen_image_2512_t2i.json": text_to_image("qwen_image_2512_bf16.safetensors", "qwen_2.5_vl_7b.safetensors",
                                                  QWEN_IMAGE_2512_NOTE),
        "qwen_image_layered.json": layered(),
        "qwen_image_edit.json": edit(1),
        "qwen_image_edit_3_images.json": edit(3),
        "qwen_image_edit_masked.json": edit(1, masked=True),
        "qwen_image_controlnet_canny.json": control("canny"),
        "qwen_image_controlnet_depth.json": control("depth"),
        "qwen_image_controlnet_inpaint.json": control("inpaint"),
        "qwen_image_diffsynth_canny.json": control("diffsynth"),
        "qwen_image_t2i_lightning.json": text_to_image(
            "qwen_image_bf16.safetensors", "qwen_2.5_vl_7b.safetensors",
            lightning_note("Qwen-Image", "qwen_image_bf16.safetensors", LIGHTNING_LORAS["qwen_image"]),
            LIGHTNING_LORAS["qwen_image"]),
        "qwen_image_2512_t2i_lightning.json": text_to_image(
            "qwen_image_2512_bf16.safetensors", "qwen_2.5_vl_7b.safetensors",
            lightning_note("Qwen-Image-2512", "qwen_image_2512_bf16.safetensors", LIGHTNING_LORAS["qwen_image_2512"]),
            LIGHTNING_LORAS["qwen_image_2512"]),
        "qwen_image_edit_lightning.json": edit(1, lightning_lora=LIGHTNING_LORAS["edit_2511"]),
        "qwen_image_2_1_t2i.json": text_to_image_2_1("qwen_image_2_1_bf16.safetensors", 40, "text-to-image",
                                                     QWEN_2_1_SETTINGS),
        "qwen_image_2_1_edit_3_images.json": edit_2_1(3),
        "qwen_image_2_1_turbo_t2i.json": text_to_image_2_1("qwen_image_2_1_turbo_bf16.safetensors", 8,
                                                           "Turbo text-to-image in 8 steps", QWEN_2_1_TURBO_SETTINGS),
    }
    for name, workflow in outputs.items():
        (WORKFLOWS / name).write_text(json.dumps(workflow, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        print(f"wrote workflows/{name}")


if __name__ == "__main__":
    main()
