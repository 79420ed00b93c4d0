#!/usr/bin/env python3
"""Write the example workflows in example_workflows/ (the host's template folder) from compact descriptions: run it
after changing one.

A description lists nodes as ``Node(id, type, widgets, inputs, outputs)``: widget values in the order the frontend
stores them, inputs as ``name: (source id, source slot, type)``.  The UI JSON is derived: the link table, the model
files' download links (``properties.models`` on every loader), the layout and a same-name ``.jpg`` thumbnail for the
template browser.  Tests convert the workflows back to API prompts with the host's own /object_info.

Layout: the frontend opens a template fitted to its window, so a workflow reads left to right in four stages (load,
prompt, sample, decode and save), each a LiteGraph group holding columns of nodes, compact enough to stay readable at
that zoom.  Chains stack under their source, nodes are ordered after their consumers, links that pass a column run
along the top and whatever they would cross moves below them.  Nodes take the size the frontend gives them and links
enter where it draws their sockets (:data:`FRONTEND`: every socket and widget of a node's definition, the image
previews included), so nothing grows over a neighbour once loaded.  :func:`crossings` checks the result (the tests
run it on the files; tests/test_browser.py checks it in the real frontend).  The thumbnails need Pillow: the
script re-runs itself in the cached environment (tools/env.py).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = REPO_ROOT / "example_workflows"


@dataclass
class Node:
    id: int
    type: str
    widgets: list = field(default_factory=list)
    inputs: dict[str, tuple[int, int, str]] = field(default_factory=dict)
    outputs: list[tuple[str, str]] = field(default_factory=list)
    title: str | None = None


# -- model files: the frontend's missing-model dialog offers these downloads --------------------------------------
# Keyed by the file name a loader's widget holds (the frontend matches ``name`` against the widget values).  Official
# sources: Comfy-Org's repackaged single files, the publishers' own repositories for the LoRAs and quantizations.
HF = "https://huggingface.co/"
QWEN_IMAGE = HF + "Comfy-Org/Qwen-Image_ComfyUI/resolve/main/split_files/"
QWEN_IMAGE_2_1 = HF + "Comfy-Org/Qwen-Image-2.1/resolve/main/"
MODEL_URLS = {
    "qwen_image_bf16.safetensors": QWEN_IMAGE + "diffusion_models/qwen_image_bf16.safetensors",
    "qwen_image_2512_bf16.safetensors": QWEN_IMAGE + "diffusion_models/qwen_image_2512_bf16.safetensors",
    "qwen_2.5_vl_7b.safetensors": QWEN_IMAGE + "text_encoders/qwen_2.5_vl_7b.safetensors",
    "qwen_image_vae.safetensors": QWEN_IMAGE + "vae/qwen_image_vae.safetensors",
    "qwen_image_edit_2511_bf16.safetensors":
        HF + "Comfy-Org/Qwen-Image-Edit_ComfyUI/resolve/main/split_files/diffusion_models/"
             "qwen_image_edit_2511_bf16.safetensors",
    "qwen_image_layered_bf16.safetensors":
        HF + "Comfy-Org/Qwen-Image-Layered_ComfyUI/resolve/main/split_files/diffusion_models/"
             "qwen_image_layered_bf16.safetensors",
    "qwen_image_layered_vae.safetensors":
        HF + "Comfy-Org/Qwen-Image-Layered_ComfyUI/resolve/main/split_files/vae/qwen_image_layered_vae.safetensors",
    "qwen-image-Q8_0.gguf": HF + "city96/Qwen-Image-gguf/resolve/main/qwen-image-Q8_0.gguf",
    "Qwen2.5-VL-7B-Instruct-Q8_0.gguf":
        HF + "ggml-org/Qwen2.5-VL-7B-Instruct-GGUF/resolve/main/Qwen2.5-VL-7B-Instruct-Q8_0.gguf",
    "Qwen-Image-InstantX-ControlNet-Union.safetensors":
        HF + "Comfy-Org/Qwen-Image-InstantX-ControlNets/resolve/main/split_files/controlnet/"
             "Qwen-Image-InstantX-ControlNet-Union.safetensors",
    "Qwen-Image-InstantX-ControlNet-Inpainting.safetensors":
        HF + "Comfy-Org/Qwen-Image-InstantX-ControlNets/resolve/main/split_files/controlnet/"
             "Qwen-Image-InstantX-ControlNet-Inpainting.safetensors",
    "qwen_image_canny_diffsynth_controlnet.safetensors":
        HF + "Comfy-Org/Qwen-Image-DiffSynth-ControlNets/resolve/main/split_files/model_patches/"
             "qwen_image_canny_diffsynth_controlnet.safetensors",
    "Qwen-Image-EliGen-Poster.safetensors":
        HF + "DiffSynth-Studio/Qwen-Image-EliGen-Poster/resolve/main/model.safetensors",
    "Qwen-Image-Lightning-4steps-V1.0.safetensors":
        HF + "lightx2v/Qwen-Image-Lightning/resolve/main/Qwen-Image-Lightning-4steps-V1.0.safetensors",
    "Qwen-Image-2512-Lightning-4steps-V1.0-bf16.safetensors":
        HF + "lightx2v/Qwen-Image-2512-Lightning/resolve/main/Qwen-Image-2512-Lightning-4steps-V1.0-bf16.safetensors",
    "Qwen-Image-Edit-2511-Lightning-4steps-V1.0-bf16.safetensors":
        HF + "lightx2v/Qwen-Image-Edit-2511-Lightning/resolve/main/"
             "Qwen-Image-Edit-2511-Lightning-4steps-V1.0-bf16.safetensors",
    "qwen_image_2.1_bf16.safetensors": QWEN_IMAGE_2_1 + "diffusion_models/qwen_image_2.1_bf16.safetensors",
    "qwen_image_2.1_turbo_bf16.safetensors": QWEN_IMAGE_2_1 + "diffusion_models/qwen_image_2.1_turbo_bf16.safetensors",
    "qwen3vl_8b_bf16.safetensors": QWEN_IMAGE_2_1 + "text_encoders/qwen3vl_8b_bf16.safetensors",
    "qwen_image_2.1_vae_bf16.safetensors": QWEN_IMAGE_2_1 + "vae/qwen_image_2.1_vae_bf16.safetensors",
}
# Node types whose first widget picks a model file, and the models/ folder it lists.
LOADER_FOLDERS = {
    "QIP_DiffusionModelLoader": "diffusion_models", "QIP_21DiffusionModelLoader": "diffusion_models",
    "QIP_TextEncoderLoader": "text_encoders", "QIP_21TextEncoderLoader": "text_encoders",
    "QIP_VAELoader": "vae", "QIP_21VAELoader": "vae", "QIP_LoraLoader": "loras",
    "QIP_ControlNetLoader": "controlnet", "QIP_BlockwiseControlLoader": "model_patches",
}


def model_properties(node: Node) -> dict:
    name = node.widgets[0]
    return {"models": [{"name": name, "url": MODEL_URLS[name], "directory": LOADER_FOLDERS[node.type]}]}


# -- layout --------------------------------------------------------------------------------------------------------
TITLE_H, SLOT_H = 30, 20  # LiteGraph's NODE_TITLE_HEIGHT and NODE_SLOT_HEIGHT
WIDGET_H, TEXT_BOX_H = 24, 96  # a widget row with its margin; a multiline prompt box
COLUMN_GAP, STAGE_GAP, ROW_GAP, GROUP_PAD, GROUP_HEADER = 30, 70, 20, 16, 44
LINK_CLEARANCE = 8  # how far above or below a node a link passes that does not connect to it
STAGES = [("1  Load models and images", "#3f789e"), ("2  Prompt and conditioning", "#8A8"), ("3  Sample", "#88A"),
          ("4  Decode and save", "#b58b2a")]
STAGE = {
    **dict.fromkeys(["MarkdownNote", "LoadImage", "QIP_LoraLoader", "QIP_EliGenEntity", *LOADER_FOLDERS], 0),
    **dict.fromkeys(["QIP_TextEncode", "QIP_EditEncode", "QIP_LayeredEncode", "QIP_21Encode", "QIP_EmptyLatent",
                     "QIP_21EmptyLatent", "QIP_ControlPreprocess", "QIP_ControlNetApply", "QIP_BlockwiseControlApply",
                     "QIP_TrueCFG", "ModelSamplingAuraFlow", "QIP_21PrefixCache", "QIP_EliGenApply"], 1),
    **dict.fromkeys(["QIP_Scheduler", "QIP_21Scheduler", "KSamplerSelect", "RandomNoise", "CFGGuider",
                     "SamplerCustomAdvanced"], 2),
    **dict.fromkeys(["VAEDecode", "QIP_LayeredDecode", "QIP_RestoreSize", "SaveImage"], 3),
}
WIDTH = {**dict.fromkeys(LOADER_FOLDERS, 320), "MarkdownNote": 320,
         **dict.fromkeys(["QIP_TextEncode", "QIP_EditEncode", "QIP_LayeredEncode", "QIP_21Encode",
                          "QIP_EliGenEntity"], 340),
         "SaveImage": 260, "SamplerCustomAdvanced": 230}
DEFAULT_WIDTH = 250
# Multiline prompt boxes: how many a node has, and how tall they are laid out (the frontend's least is 50 + 4 px;
# an entity's short prompt gets that).
TEXT_BOXES = {**dict.fromkeys(["QIP_TextEncode", "QIP_LayeredEncode", "QIP_21Encode"], (2, TEXT_BOX_H)),
              "QIP_EditEncode": (2, 72), "QIP_EliGenEntity": (1, 54)}
# What the frontend builds for a node from its definition (the host's /object_info), whatever the workflow lists: its
# input sockets, every one in the definition's order, connected or not (a link enters at its socket's place), and
# how many widgets it has (options the workflow leaves out, a seed's "control after generate" and Load Image's
# upload button included).  tests/test_templates.py checks this table against the host.
FRONTEND = {
    "CFGGuider": (("model", "positive", "negative"), 1),
    "KSamplerSelect": ((), 1),
    "LoadImage": ((), 2),
    "ModelSamplingAuraFlow": (("model",), 1),
    "QIP_21DiffusionModelLoader": ((), 3),
    "QIP_21EmptyLatent": ((), 3),
    "QIP_21Encode": (("text_encoder", "vae", "image", "image2", "image3", "more_images"), 3),
    "QIP_21PrefixCache": (("model",), 1),
    "QIP_21Scheduler": (("latent",), 2),
    "QIP_21TextEncoderLoader": ((), 2),
    "QIP_21VAELoader": ((), 2),
    "QIP_BlockwiseControlApply": (("model", "control", "vae", "image", "mask"), 1),
    "QIP_BlockwiseControlLoader": ((), 2),
    "QIP_ControlNetApply": (("positive", "negative", "control_net", "vae", "image", "mask"), 3),
    "QIP_ControlNetLoader": ((), 2),
    "QIP_ControlPreprocess": (("image",), 3),
    "QIP_DiffusionModelLoader": ((), 4),
    "QIP_EditEncode": (("text_encoder", "vae", "image", "image2", "image3", "more_images", "mask"), 7),
    "QIP_EliGenApply": (("entities", "text_encoder", "positive", "negative"), 1),
    "QIP_EliGenEntity": (("mask", "mask_image", "entities"), 2),
    "QIP_EmptyLatent": ((), 4),
    "QIP_LayeredDecode": (("vae", "samples"), 1),
    "QIP_LayeredEncode": (("text_encoder", "vae", "image", "alpha_mask"), 4),
    "QIP_LoraLoader": (("model", "text_encoder"), 3),
    "QIP_RestoreSize": (("image", "original"), 0),
    "QIP_Scheduler": (("model", "latent"), 4),
    "QIP_TextEncode": (("text_encoder",), 2),
    "QIP_TextEncoderLoader": ((), 2),
    "QIP_TrueCFG": (("model",), 0),
    "QIP_VAELoader": ((), 2),
    "RandomNoise": ((), 2),
    "SamplerCustomAdvanced": (("noise", "guider", "sampler", "sigmas", "latent_image"), 0),
    "SaveImage": (("images",), 1),
    "VAEDecode": (("samples", "vae"), 0),
}
# The image preview the frontend adds below the widgets once a node has an image (Load Image once its picture
# loads, Save Image after a run): a widget of at least 220 px (useImagePreviewWidget's minHeight); the node grows to
# hold it.
PREVIEW_H = 220
PREVIEWS = {"LoadImage", "SaveImage"}


def _height(node: Node) -> int:
    """The node's body height, at least what the frontend makes it, so that no node grows over its neighbour there:
    LGraphNode.computeSize (a row per socket or output, each widget with its 4 px gap, 8 px below the widgets, a
    6 px margin; the prompt boxes laid out taller than their least), and for an image preview LGraphNode.arrange
    (the slots, 6 px, the widgets, the preview's 220 px)."""
    if node.type == "MarkdownNote":  # the rendered note: ~44 characters a line at this width, scrolls beyond
        lines = sum(1 + len(line) // 44 for line in node.widgets[0].splitlines())
        return min(560, 20 * lines)
    sockets, widgets = FRONTEND[node.type]
    boxes, box_h = TEXT_BOXES.get(node.type, (0, 0))
    rows = max(len(sockets), len(node.outputs), 1)
    if node.type in PREVIEWS:  # the preview's room below the slots and widgets (LGraphNode.arrange)
        return SLOT_H * rows + 6 + WIDGET_H * widgets + PREVIEW_H
    body = WIDGET_H * (widgets - boxes) + box_h * boxes
    return SLOT_H * rows + (body + 8 if body else 0) + 6


def drawn_slot(node: dict, slot: int) -> int:
    """Where among its sockets the frontend draws input ``slot`` of a workflow's node (its place in the node type's
    sockets, see :data:`FRONTEND`); the layout's own boxes (no ``inputs``) already count that way."""
    if "inputs" not in node:
        return slot
    return FRONTEND[node["type"]][0].index(node["inputs"][slot]["name"])


def input_position(node: dict, slot: int) -> tuple[float, float]:
    """Where LiteGraph draws an input slot (left edge) and an output slot (right edge), by their drawn place."""
    return node["pos"][0], node["pos"][1] + (slot + 0.7) * SLOT_H


def output_position(node: dict, slot: int) -> tuple[float, float]:
    return node["pos"][0] + node["size"][0], node["pos"][1] + (slot + 0.7) * SLOT_H


def node_rect(node: dict) -> tuple[float, float, float, float]:
    """(left, top, right, bottom) with the title bar, which LiteGraph draws above ``pos``."""
    (x, y), (w, h) = node["pos"], node["size"]
    return x, y - TITLE_H, x + w, y + h


def _segment_y_range(p, q, left: float, right: float) -> tuple[float, float] | None:
    """The y values the segment p-q takes over x in [left, right], or None when it does not get there."""
    (x0, y0), (x1, y1) = p, q
    lo, hi = max(min(x0, x1), left), min(max(x0, x1), right)
    if lo > hi:
        return None
    if x0 == x1:
        return min(y0, y1), max(y0, y1)
    ys = [y0 + (y1 - y0) * (x - x0) / (x1 - x0) for x in (lo, hi)]
    return min(ys), max(ys)


def _crosses(p, q, rect, clearance: float = 0.0) -> bool:
    left, top, right, bottom = rect
    span = _segment_y_range(p, q, left, right)
    return span is not None and span[0] <= bottom + clearance and span[1] >= top - clearance


def link_segments(workflow: dict):
    """(link id, source id, target id, start, end) for every link, straight from output slot to input slot (where
    the frontend draws them)."""
    nodes = {node["id"]: node for node in workflow["nodes"]}
    for link_id, source, slot, target, target_slot, _ in workflow["links"]:
        yield (link_id, source, target, output_position(nodes[source], slot),
               input_position(nodes[target], drawn_slot(nodes[target], target_slot)))


def crossings(workflow: dict, clearance: float = 0.0) -> list[tuple[int, int]]:
    """(link id, node id) for every node a link's straight segment crosses, other than the link's own two."""
    return [(link_id, node["id"]) for link_id, source, target, start, end in link_segments(workflow)
            for node in workflow["nodes"]
            if node["id"] not in (source, target) and _crosses(start, end, node_rect(node), clearance)]


def _columns(nodes: list[Node], links: list) -> list[list[list[Node]]]:
    """Columns of blocks, left to right.  A block is a chain stacked top-down: a node joins the block of its only
    same-stage producer when it is that producer's only same-stage consumer.  A block's column in its stage is one
    past its same-stage producers'; the note has the first column to itself, so every link leaving the load stage
    starts in one column, next to the prompt stage (but with several images, see below)."""
    by_id = {node.id: node for node in nodes}
    producers = {node.id: set() for node in nodes}
    consumers = {node.id: set() for node in nodes}
    for _, source, _, target, _, _ in links:
        if STAGE[by_id[source].type] == STAGE[by_id[target].type]:
            producers[target].add(source)
            consumers[source].add(target)
    block_of: dict[int, list[Node]] = {}
    blocks: list[list[Node]] = []
    for node in nodes:  # descriptions list producers first
        (source,) = producers[node.id] if len(producers[node.id]) == 1 else (None,)
        if source is not None and consumers[source] == {node.id}:
            block_of[node.id] = block_of[source]
            block_of[node.id].append(node)
        else:
            block_of[node.id] = [node]
            blocks.append(block_of[node.id])
    # Several images (each as tall as its preview) and the loaders overflow one column: the images stay in the first,
    # under the VAE loader (its link to the decoder runs along the top), the other loaders move one column right.
    several = sum(node.type == "LoadImage" for node in nodes) > 1
    moved = {node.id for node in nodes if several and LOADER_FOLDERS.get(node.type, "vae") != "vae"}
    column: dict[int, int] = {}
    for block in blocks:
        upstream = {source for node in block for source in producers[node.id]} - {node.id for node in block}
        column[id(block)] = max([column[id(block_of[source])] + 1 for source in upstream],
                                default=-int(block[0].type == "MarkdownNote") + int(block[0].id in moved))
    keys = sorted({(STAGE[block[0].type], column[id(block)]) for block in blocks})
    return [[block for block in blocks if (STAGE[block[0].type], column[id(block)]) == key] for key in keys]


def layout(nodes: list[Node], links: list) -> dict[int, dict]:
    """Node id -> {"pos", "size"}: see the module docstring."""
    columns = _columns(nodes, links)
    stage_of = [STAGE[column[0][0].type] for column in columns]
    boxes, x = {}, 0.0
    for index, column in enumerate(columns):
        if index:
            x += (STAGE_GAP if stage_of[index] != stage_of[index - 1] else COLUMN_GAP)
        width = max(WIDTH.get(node.type, DEFAULT_WIDTH) for block in column for node in block)
        for block in column:
            for node in block:
                boxes[node.id] = {"pos": [x, 0.0], "size": [width, _height(node)]}
        x += width
    column_of = {node.id: index for index, column in enumerate(columns) for block in column for node in block}

    def stack(column: list[list[Node]], tops: dict[int, float] | None = None) -> None:
        """Top-down positions keeping the order and the gaps, each block no higher than ``tops`` asks."""
        y = TITLE_H
        for block in column:
            y = max(y, (tops or {}).get(block[0].id, y))
            for node in block:
                boxes[node.id]["pos"][1] = y
                y += boxes[node.id]["size"][1] + ROW_GAP + TITLE_H

    # Links that pass a column on their way are buses: they run level along the top, above everything they pass.
    def passes(link: list) -> bool:
        return column_of[link[3]] - column_of[link[1]] > 1

    # Order each column after its consumers (right to left), by the mean height of the input slots it feeds, the
    # blocks with a bus first.
    def order_key(block: list[Node]) -> tuple[bool, float]:
        ids = {node.id for node in block}
        ends = [input_position(boxes[link[3]], link[4])[1] for link in links
                if link[1] in ids and column_of[link[3]] > column_of[link[1]]]
        bus = any(passes(link) for link in links if ids & {link[1], link[3]})
        return not bus, sum(ends) / len(ends) if ends else float("inf")

    for column in reversed(columns):
        column.sort(key=order_key)  # stable: declaration order among equals (and the note stays last)
        stack(column)
    # Then heights left to right: a block's first node level with what feeds it (its buses, if any).
    for column in columns:
        tops = {}
        for block in column:
            feeds = [link for link in links if link[3] == block[0].id and column_of[link[1]] < column_of[link[3]]]
            starts = [output_position(boxes[source], slot)[1] - (target_slot + 0.7) * SLOT_H
                      for _, source, slot, _, target_slot, _ in [link for link in feeds if passes(link)] or feeds]
            if starts:
                tops[block[0].id] = sum(starts) / len(starts)
        stack(column, tops)
    # Finally push every block a bus crosses below that bus (with what stacks under it), until none is crossed: links
    # between neighbouring columns cross nothing.
    graph = {"nodes": [{"id": node_id, **box} for node_id, box in boxes.items()], "links": links}
    block_of = {node.id: block for column in columns for block in column for node in block}
    for _ in range(300):
        hits = crossings(graph, LINK_CLEARANCE)
        if not hits:
            break
        link_id, node_id = hits[0]
        start, end = next(segment[3:] for segment in link_segments(graph) if segment[0] == link_id)
        head = block_of[node_id][0].id  # the block moves as one: its chain links stay short
        left, top, right, _ = node_rect(boxes[head])
        column = columns[column_of[head]]
        tops = {block[0].id: boxes[block[0].id]["pos"][1] for block in column}
        tops[head] += _segment_y_range(start, end, left, right)[1] + LINK_CLEARANCE + 1 - top
        stack(column, tops)
    else:
        raise RuntimeError(f"layout: links still cross nodes: {hits}")
    return boxes


def stage_groups(nodes: list[Node], boxes: dict[int, dict]) -> list[dict]:
    """One LiteGraph group per stage, all of one height."""
    rects = {}
    for node in nodes:
        rects.setdefault(STAGE[node.type], []).append(node_rect(boxes[node.id]))
    top = min(rect[1] for stage in rects.values() for rect in stage) - GROUP_PAD - GROUP_HEADER
    bottom = max(rect[3] for stage in rects.values() for rect in stage) + GROUP_PAD
    groups = []
    for stage in sorted(rects):
        left = min(rect[0] for rect in rects[stage]) - GROUP_PAD
        right = max(rect[2] for rect in rects[stage]) + GROUP_PAD
        title, color = STAGES[stage]
        groups.append({"id": len(groups) + 1, "title": title, "bounding": [left, top, right - left, bottom - top],
                       "color": color, "font_size": 24, "flags": {}})
    return groups


def build(nodes: list[Node], note: str) -> dict:
    """The UI workflow of ``nodes`` with ``note`` (the model files table) in a Markdown note among the loaders."""
    nodes = [*nodes, Node(max(node.id for node in nodes) + 1, "MarkdownNote", [note], title="Model files")]
    links = []  # [id, source, source slot, target, target slot, type], as LiteGraph serialises them
    for node in nodes:
        for target_slot, (source, slot, kind) in enumerate(node.inputs.values()):
            links.append([len(links) + 1, source, slot, node.id, target_slot, kind])
    # The layout places the links as the frontend draws them: each entering at its socket's place (drawn_slot).
    by_id = {node.id: node for node in nodes}
    boxes = layout(nodes, [[*link[:4], FRONTEND[by_id[link[3]].type][0].index(list(by_id[link[3]].inputs)[link[4]]),
                            link[5]] for link in links])
    ui_nodes = []
    for order, node in enumerate(nodes):
        entry = {
            "id": node.id, "type": node.type, **boxes[node.id], "flags": {}, "order": order, "mode": 0,
            "inputs": [{"name": name, "type": kind, "link": next(link[0] for link in links
                                                                  if link[3] == node.id and link[4] == slot)}
                       for slot, (name, (_, _, kind)) in enumerate(node.inputs.items())],
            "outputs": [{"name": name, "type": kind, "slot_index": slot,
                         "links": [link[0] for link in links if link[1] == node.id and link[2] == slot]}
                        for slot, (name, kind) in enumerate(node.outputs)],
            "properties": {"Node name for S&R": node.type,
                           **(model_properties(node) if node.type in LOADER_FOLDERS else {})},
            "widgets_values": node.widgets,
        }
        if node.title:
            entry["title"] = node.title
        ui_nodes.append(entry)
    return {"last_node_id": nodes[-1].id, "last_link_id": len(links), "nodes": ui_nodes, "links": links,
            "groups": stage_groups(nodes, boxes), "config": {}, "extra": {}, "version": 0.4}


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
                [("model", "MODEL"), ("text_encoder", "QWEN_IMAGE_TEXT_ENCODER"), ("report", "STRING")])


def sampling(first: int, model: tuple, positive: tuple, negative: tuple, latent: tuple, steps: int, prefix: str,
             restore_to: tuple | None = None, layered: bool = False, lightning: bool = False,
             qwen_2_1: bool = False, plain_cfg: bool = False) -> list[Node]:
    """The reference sampling from node id ``first`` on: true CFG 4, the Qwen-Image Scheduler, euler, decode with
    the VAE (node 3), optionally Restore Size to ``restore_to``'s image, and save.  ``layered``: plain CFG 4 (the
    Layered reference does not rescale) and Layered Decode, saving the layers and the whole image.  ``lightning``:
    the Lightning LoRAs' sampling - CFG 1 and shift 3 without the terminal stretch (see :data:`LIGHTNING_NOTE`).
    ``qwen_2_1``: Qwen-Image 2.1's - plain CFG 1 (no guidance) and the 2.1 Scheduler.  ``plain_cfg``: CFG 4
    without the rescale (DiffSynth's pipelines, e.g. EliGen)."""
    cfg, sigmas, sampler, noise, guider, sample, decode = range(first, first + 7)
    guided = model if layered or qwen_2_1 or plain_cfg else (cfg, 0, "MODEL")
    scheduler, scheduler_inputs = (("QIP_21Scheduler", {"latent": latent}) if qwen_2_1
                                   else ("QIP_Scheduler", {"model": guided, "latent": latent}))
    if qwen_2_1:
        nodes, schedule, guidance = [], [steps, 1.0], 1.0
    elif lightning:
        nodes = [Node(cfg, "ModelSamplingAuraFlow", [LIGHTNING_SHIFT], {"model": model}, [("MODEL", "MODEL")])]
        schedule, guidance = [steps, 1.0, "the model's current shift", 0.0], 1.0
    else:
        rescale = not (layered or plain_cfg)
        nodes = [Node(cfg, "QIP_TrueCFG", [], {"model": model}, [("MODEL", "MODEL")])] if rescale else []
        schedule, guidance = [steps, 1.0, "from the latent's resolution", 0.02], 4.0
    nodes += [
        Node(sigmas, scheduler, schedule, scheduler_inputs, [("SIGMAS", "SIGMAS")]),
        Node(sampler, "KSamplerSelect", ["euler"], outputs=[("SAMPLER", "SAMPLER")]),
        Node(noise, "RandomNoise", [42, "fixed"], outputs=[("NOISE", "NOISE")]),
        Node(guider, "CFGGuider", [guidance], {"model": guided, "positive": positive, "negative": negative},
             [("GUIDER", "GUIDER")]),
        Node(sample, "SamplerCustomAdvanced", [],
             {"noise": (noise, 0, "NOISE"), "guider": (guider, 0, "GUIDER"), "sampler": (sampler, 0, "SAMPLER"),
              "sigmas": (sigmas, 0, "SIGMAS"), "latent_image": latent},
             [("output", "LATENT"), ("denoised_output", "LATENT")]),
    ]
    if layered:
        return nodes + [
            Node(decode, "QIP_LayeredDecode", [False], {"vae": (3, 0, "VAE"), "samples": (sample, 0, "LATENT")},
                 [("layers", "IMAGE"), ("whole_image", "IMAGE")]),
            Node(decode + 1, "SaveImage", [f"{prefix}_layer"], {"images": (decode, 0, "IMAGE")}),
            Node(decode + 2, "SaveImage", [f"{prefix}_whole"], {"images": (decode, 1, "IMAGE")}),
        ]
    nodes.append(Node(decode, "VAEDecode", [], {"samples": (sample, 0, "LATENT"), "vae": (3, 0, "VAE")},
                      [("IMAGE", "IMAGE")]))
    image = (decode, 0, "IMAGE")
    if restore_to is not None:
        nodes.append(Node(decode + 1, "QIP_RestoreSize", [], {"image": image, "original": restore_to},
                          [("IMAGE", "IMAGE")]))
        image = (decode + 1, 0, "IMAGE")
    nodes.append(Node(image[0] + 1, "SaveImage", [prefix], {"images": image}))
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
              ("sized_image", "IMAGE")]),
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
             [("positive", "CONDITIONING"), ("negative", "CONDITIONING")]),
        Node(5, "QIP_EmptyLatent", ["1328x1328 (1:1)", 1024, 1024, 1], outputs=[("LATENT", "LATENT")]),
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


def load_images(names: list[str]) -> list[Node]:
    """LoadImage nodes 20, 21, ...; several are titled by number, as the prompts refer to them."""
    return [Node(20 + i, "LoadImage", [name, "image"], outputs=[("IMAGE", "IMAGE"), ("MASK", "MASK")],
                 title=f"Image {i + 1}" if len(names) > 1 else None) for i, name in enumerate(names)]


def edit(images: int, masked: bool = False, lightning_lora: str | None = None) -> dict:
    """Edit with ``images`` input images (Edit-2509/2511 mode); ``masked``: the first image's alpha is the mask;
    ``lightning_lora``: that LoRA and the Lightning sampling in 4 steps."""
    loads = load_images(["qwen_edit_input_masked.png"] if masked else
                        [f"qwen_edit_input_{i + 1}.png" for i in range(images)])
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
                           ("sized_images", "IMAGE")]),
        *sampling(8, dit, (7, 0, "CONDITIONING"), (7, 1, "CONDITIONING"), (7, 2, "LATENT"),
                  LIGHTNING_STEPS if lightning_lora else 40, "qwen_image_edit",
                  restore_to=(20 + images - 1, 0, "IMAGE"), lightning=bool(lightning_lora)),
    ], lightning_note("Qwen-Image-Edit-2511", "qwen_image_edit_2511_bf16.safetensors", lightning_lora,
                      EDIT_LIGHTNING_HINT) if lightning_lora else EDIT_NOTE)


ELIGEN_LORA = "Qwen-Image-EliGen-Poster.safetensors"  # tiny_models/loras.py writes a tiny one under this name
ELIGEN_NOTE = """\
**Qwen-Image EliGen: a poster laid out with regional prompts** (pack: Qwen-Image / QIP)

| file | folder |
|---|---|
| `qwen_image_bf16.safetensors` (or fp8 / GGUF) | `diffusion_models/` |
| `qwen_2.5_vl_7b.safetensors` | `text_encoders/` |
| `qwen_image_vae.safetensors` | `vae/` |
| `Qwen-Image-EliGen-Poster.safetensors`: DiffSynth-Studio's `model.safetensors`, renamed (or EliGen / EliGen-V2 \
for photos) | `loras/` |

The global prompt describes the whole poster; each Add EliGen Entity node puts one entity (a title, a subtitle, a \
subject) in its region: a box in fractions of the image (left, top, right, bottom), or a mask painted in Load \
Image's mask editor. Apply EliGen Entities shows the regions after a run.
Reference settings (DiffSynth's poster example): 1280x784, 40 steps, CFG 4 (plain CFG, as DiffSynth), euler, the \
Qwen-Image Scheduler.
"""
ELIGEN_GLOBAL = ("一张以柔粉紫为背景的海报，左侧有大号粉紫色文字“Qwen-Image EliGen-Poster”，粉紫色椭圆框内白色小字：“图像精确分区控制"
                 "模型”。右侧有一只小兔子在拆礼物，旁边站着一只头顶迷你烟花发射器的小龙（卡通Q版）。背景有一些白云点缀。整体风格卡通可爱，传达节日"
                 "惊喜的主题。")
ELIGEN_NEGATIVE = "网格化，规则的网格，模糊, 低分辨率, 低质量, 变形, 畸形, 错误的解剖学, 变形的手, 变形的身体, 变形的脸"
# (entity prompt, its box "left, top, right, bottom" in fractions of the poster)
ELIGEN_ENTITIES = [
    ("粉紫色文字“Qwen-Image EliGen-Poster”", "0.05, 0.18, 0.5, 0.45"),
    ("粉紫色椭圆框内白色小字：“图像精确分区控制模型”", "0.08, 0.52, 0.46, 0.68"),
    ("一只小兔子在拆礼物，小兔子旁边站着一只头顶迷你烟花发射器的小龙（卡通Q版）", "0.55, 0.15, 0.97, 0.92"),
]
ELIGEN_SIZE = (1280, 784)


def eligen_poster() -> dict:
    """Text-to-image with three EliGen entities in boxes and the EliGen-Poster LoRA (plain CFG 4)."""
    width, height = ELIGEN_SIZE
    entities: list[Node] = []
    previous = None
    for i, (prompt, box) in enumerate(ELIGEN_ENTITIES):
        inputs = {} if previous is None else {"entities": (previous, 0, "QIP_ELIGEN_ENTITIES")}
        previous = 40 + i
        entities.append(Node(previous, "QIP_EliGenEntity", [prompt, box], inputs,
                             [("entities", "QIP_ELIGEN_ENTITIES")]))
    return build([
        *loaders("qwen_image_bf16.safetensors"),
        lora(ELIGEN_LORA),
        Node(4, "QIP_TextEncode", [ELIGEN_GLOBAL, ELIGEN_NEGATIVE], {"text_encoder": (2, 0, "QWEN_IMAGE_TEXT_ENCODER")},
             [("positive", "CONDITIONING"), ("negative", "CONDITIONING")]),
        *entities,
        Node(50, "QIP_EliGenApply", [False], {"entities": (previous, 0, "QIP_ELIGEN_ENTITIES"),
                                              "text_encoder": (2, 0, "QWEN_IMAGE_TEXT_ENCODER"),
                                              "positive": (4, 0, "CONDITIONING"), "negative": (4, 1, "CONDITIONING")},
             [("positive", "CONDITIONING"), ("negative", "CONDITIONING")]),
        Node(5, "QIP_EmptyLatent", ["custom (width x height below)", width, height, 1], outputs=[("LATENT", "LATENT")]),
        *sampling(8, (LORA_ID, 0, "MODEL"), (50, 0, "CONDITIONING"), (50, 1, "CONDITIONING"), (5, 0, "LATENT"), 40,
                  "qwen_image_eligen", plain_cfg=True),
    ], ELIGEN_NOTE)


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
             [("positive", "CONDITIONING"), ("negative", "CONDITIONING")]),
        Node(5, "QIP_EmptyLatent", ["custom (width x height below)", 768, 512, 1], outputs=[("LATENT", "LATENT")]),
        Node(20, "LoadImage", [image_name, "image"], outputs=[("IMAGE", "IMAGE"), ("MASK", "MASK")]),
    ]
    control_image = (20, 0, "IMAGE")
    if method:
        nodes.append(Node(21, "QIP_ControlPreprocess", [method, 0.1, 0.2], {"image": (20, 0, "IMAGE")},
                          [("IMAGE", "IMAGE")]))
        control_image = (21, 0, "IMAGE")
    model, positive, negative = (1, 0, "MODEL"), (4, 0, "CONDITIONING"), (4, 1, "CONDITIONING")
    if kind == "diffsynth":
        nodes += [
            Node(22, "QIP_BlockwiseControlLoader", [control_file, "auto"], outputs=[("QWEN_IMAGE_BLOCKWISE_CONTROL",) * 2]),
            Node(23, "QIP_BlockwiseControlApply", [1.0], {"model": model, "control": (22, 0, "QWEN_IMAGE_BLOCKWISE_CONTROL"),
                                                         "vae": (3, 0, "VAE"), "image": control_image},
                 [("MODEL", "MODEL")]),
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
                 [("positive", "CONDITIONING"), ("negative", "CONDITIONING")]),
        ]
        positive, negative = (23, 0, "CONDITIONING"), (23, 1, "CONDITIONING")
    nodes += sampling(6, model, positive, negative, (5, 0, "LATENT"), 30, f"qwen_image_{kind}")
    return build(nodes, note)


QWEN_2_1_FILES = """\
| file | folder |
|---|---|
| `{model}` (or its fp8 / GGUF file) | `diffusion_models/` |
| `qwen3vl_8b_bf16.safetensors` (Qwen3-VL-8B; or its scaled fp8 file) | `text_encoders/` |
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
        Node(2, "QIP_21TextEncoderLoader", ["qwen3vl_8b_bf16.safetensors", "auto"],
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
                [("positive", "CONDITIONING"), ("negative", "CONDITIONING"), ("latent", "LATENT")])


def text_to_image_2_1(model: str, steps: int, title: str, settings: str) -> dict:
    """Qwen-Image 2.1 text-to-image at 1024x1024."""
    return build([
        *loaders_2_1(model),
        encode_2_1("A capybara wearing a wizard hat, reading a book by candlelight, oil painting."),
        Node(5, "QIP_21EmptyLatent", [1024, 1024, 1], outputs=[("LATENT", "LATENT")]),
        *sampling(6, (1, 0, "MODEL"), (4, 0, "CONDITIONING"), (4, 1, "CONDITIONING"), (5, 0, "LATENT"), steps,
                  "qwen_image_2_1", qwen_2_1=True),
    ], QWEN_2_1_NOTE.format(title=title, files=QWEN_2_1_FILES.format(model=model), hint="", settings=settings))


def edit_2_1(images: int) -> dict:
    """Qwen-Image 2.1 conditioned on ``images`` images, with the prefix cache node."""
    model = "qwen_image_2.1_bf16.safetensors"
    return build([
        *loaders_2_1(model),
        *load_images([f"qwen_edit_input_{i + 1}.png" for i in range(images)]),
        encode_2_1("Put the object from image 2 on the table in image 1, lit like image 3.", images),
        Node(5, "QIP_21PrefixCache", ["on, kept on the compute device (fastest)"], {"model": (1, 0, "MODEL")},
             [("MODEL", "MODEL")]),
        *sampling(6, (5, 0, "MODEL"), (4, 0, "CONDITIONING"), (4, 1, "CONDITIONING"), (4, 2, "LATENT"), 40,
                  "qwen_image_2_1_edit", restore_to=(20 + images - 1, 0, "IMAGE"), qwen_2_1=True),
    ], QWEN_2_1_NOTE.format(title=f"with {images} condition images", files=QWEN_2_1_FILES.format(model=model),
                            hint=QWEN_2_1_EDIT_HINT, settings=QWEN_2_1_SETTINGS))


THUMBNAIL_SIZE = (512, 288)
SUPERSAMPLE = 3
# The frontend's default link colours, so the picture reads like the canvas.
LINK_COLORS = {"MODEL": "#b39ddb", "VAE": "#ff6e6e", "CONDITIONING": "#ffa931", "LATENT": "#ff9cf9",
               "IMAGE": "#64b5f6", "MASK": "#81c784", "SIGMAS": "#cdffcd", "NOISE": "#b0b0b0", "GUIDER": "#66ffff",
               "SAMPLER": "#ecb4b4", "CONTROL_NET": "#00d78d"}
OTHER_LINK_COLOR = "#ffd500"  # our own types (the text encoders, the control patch)


def _title(node: dict) -> str:
    """The node's title, or its type in words (QIP_21EmptyLatent -> 2.1 Empty Latent)."""
    name = node["type"].removeprefix("QIP_")
    return node.get("title") or re.sub(r"^21", "2.1 ", re.sub(r"(?<=[a-z])(?=[A-Z])", " ", name))


def _spline(start: tuple[float, float], end: tuple[float, float], steps: int = 24) -> list[tuple[float, float]]:
    """LiteGraph's link curve: a cubic Bezier leaving and entering horizontally, a quarter of its length out."""
    reach = 0.25 * ((end[0] - start[0]) ** 2 + (end[1] - start[1]) ** 2) ** 0.5
    controls = [start, (start[0] + reach, start[1]), (end[0] - reach, end[1]), end]
    return [tuple(sum(weight * point[axis] for weight, point in
                      zip(((1 - t) ** 3, 3 * t * (1 - t) ** 2, 3 * t * t * (1 - t), t ** 3), controls))
                  for axis in (0, 1)) for t in (i / steps for i in range(steps + 1))]


def thumbnail(workflow: dict):
    """The template browser's picture: the graph itself, its stage groups, nodes and links (deterministic)."""
    from PIL import Image, ImageDraw, ImageFont

    left = min(group["bounding"][0] for group in workflow["groups"])
    top = min(group["bounding"][1] for group in workflow["groups"])
    right = max(group["bounding"][0] + group["bounding"][2] for group in workflow["groups"])
    bottom = max(group["bounding"][1] + group["bounding"][3] for group in workflow["groups"])
    width, height = (side * SUPERSAMPLE for side in THUMBNAIL_SIZE)
    scale = min(width * 0.96 / (right - left), height * 0.96 / (bottom - top))
    offset = ((width - (right - left) * scale) / 2 - left * scale, (height - (bottom - top) * scale) / 2 - top * scale)

    def at(x: float, y: float) -> tuple[float, float]:
        return offset[0] + x * scale, offset[1] + y * scale

    image = Image.new("RGB", (width, height), "#202020")
    draw = ImageDraw.Draw(image, "RGBA")
    group_font = ImageFont.load_default(size=round(28 * scale))
    node_font = ImageFont.load_default(size=round(22 * scale))
    for group in workflow["groups"]:
        x, y, w, h = group["bounding"]
        color = group["color"] if len(group["color"]) == 7 else "#" + "".join(c * 2 for c in group["color"][1:])
        rgb = tuple(int(color[i:i + 2], 16) for i in (1, 3, 5))
        draw.rounded_rectangle([at(x, y), at(x + w, y + h)], radius=6 * SUPERSAMPLE, fill=(*rgb, 70))
        draw.rounded_rectangle([at(x, y), at(x + w, y + GROUP_HEADER)], radius=6 * SUPERSAMPLE, fill=(*rgb, 200))
        draw.text(at(x + 12, y + GROUP_HEADER / 2), group["title"], font=group_font, fill="#ffffff", anchor="lm")
    for node in workflow["nodes"]:
        x0, y0, x1, y1 = node_rect(node)
        draw.rounded_rectangle([at(x0, y0), at(x1, y1)], radius=4 * SUPERSAMPLE, fill="#353535", outline="#555555")
        draw.rounded_rectangle([at(x0, y0), at(x1, y0 + TITLE_H)], radius=4 * SUPERSAMPLE, fill="#2a2a2a")
        draw.text(at(x0 + 8, y0 + TITLE_H / 2), _title(node), font=node_font, fill="#dddddd", anchor="lm")
    for link, (_, _, _, start, end) in zip(workflow["links"], link_segments(workflow)):
        draw.line([at(*point) for point in _spline(start, end)], fill=LINK_COLORS.get(link[5], OTHER_LINK_COLOR),
                  width=2 * SUPERSAMPLE, joint="curve")
    return image.resize(THUMBNAIL_SIZE, Image.LANCZOS)


def workflows() -> dict[str, dict]:
    """File name -> UI workflow, for every example."""
    return {
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
        "qwen_image_eligen_poster.json": eligen_poster(),
        "qwen_image_2_1_t2i.json": text_to_image_2_1("qwen_image_2.1_bf16.safetensors", 40, "text-to-image",
                                                     QWEN_2_1_SETTINGS),
        "qwen_image_2_1_edit_3_images.json": edit_2_1(3),
        "qwen_image_2_1_turbo_t2i.json": text_to_image_2_1("qwen_image_2.1_turbo_bf16.safetensors", 8,
                                                           "Turbo text-to-image in 8 steps", QWEN_2_1_TURBO_SETTINGS),
    }


def main() -> None:
    EXAMPLES.mkdir(exist_ok=True)
    outputs = workflows()
    for stale in sorted(EXAMPLES.glob("*.json")) + sorted(EXAMPLES.glob("*.jpg")):
        if stale.with_suffix(".json").name not in outputs:
            stale.unlink()
    for name, workflow in outputs.items():
        path = EXAMPLES / name
        path.write_text(json.dumps(workflow, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        thumbnail(workflow).save(path.with_suffix(".jpg"), quality=90)
        print(f"wrote example_workflows/{name} and its thumbnail")


if __name__ == "__main__":
    import env  # tools/: the thumbnails need Pillow, which the cached environment has

    env.reexec_in_env(Path(__file__))
    main()
