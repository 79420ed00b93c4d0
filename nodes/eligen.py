"""EliGen regional (entity) prompts: a global prompt plus (entity prompt, region) pairs, with the EliGen LoRAs.

Add EliGen Entity pairs one entity prompt with its region (chain the node for any number of entities); Apply EliGen
Entities encodes the entity prompts and attaches them to a conditioning, where the DiT masks its joint attention so
that each entity's words act only inside its region (models/qwen_image/eligen.py).  A region is a mask, a picture
of one, or a box given in fractions of the image.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ..models import Entities
from .common import ELIGEN, Node, TextEncoder, io, mappings, output, prompt_input, schema
from .host.model import ENTITIES_KEY
from .host.previews import temp_previews

ENTITIES_TYPE = "QIP_ELIGEN_ENTITIES"
EntityList = io.Custom(ENTITIES_TYPE)
# A box region is drawn on this grid (fractions of the image; the region is stretched to the image like any mask).
BOX_GRID = 1024
# Region colours of the preview (and of the legend the web extension writes beside it).
COLOURS = ((230, 80, 70), (70, 160, 230), (110, 200, 90), (240, 190, 60), (180, 100, 220), (60, 200, 190),
           (240, 130, 190), (150, 150, 150))


@dataclass(frozen=True, eq=False)
class Entity:
    """One entity: its prompt and region ``[H, W]`` in [0, 1]."""

    prompt: str
    mask: torch.Tensor


def box_mask(node: str, box: str) -> torch.Tensor:
    """``[1, BOX_GRID, BOX_GRID]``: 1 inside ``box`` ("left, top, right, bottom" in fractions of the image)."""
    try:
        left, top, right, bottom = (float(part) for part in box.replace(";", ",").split(","))
    except ValueError:
        raise ValueError(f"{node}: box {box!r} is not four numbers 'left, top, right, bottom' (fractions of the "
                         "image, e.g. '0.05, 0.2, 0.5, 0.45').") from None
    x0, y0, x1, y1 = (round(min(max(v, 0.0), 1.0) * BOX_GRID) for v in (left, top, right, bottom))
    if x1 <= x0 or y1 <= y0:
        raise ValueError(f"{node}: box {box!r} is empty: right must exceed left and bottom top (fractions 0 to 1).")
    mask = torch.zeros(1, BOX_GRID, BOX_GRID)
    mask[:, y0:y1, x0:x1] = 1.0
    return mask


def _region(node: str, mask: torch.Tensor | None, mask_image: torch.Tensor | None, box: str) -> torch.Tensor:
    """The entity's region ``[H, W]`` from a MASK, an IMAGE (the mean of its colour channels) or a box, refusing
    none, several, batches and empty regions with a message naming the node."""
    given = [name for name, value in (("mask", mask), ("mask_image", mask_image), ("box", box.strip() or None))
             if value is not None]
    if len(given) != 1:
        raise ValueError(f"{node}: give the region exactly one way: a 'mask' (e.g. from the mask editor of Load "
                         "Image), a 'mask_image' (white = inside) or a 'box'; got "
                         f"{' and '.join(given) if given else 'none'}.")
    if box.strip():
        region = box_mask(node, box)
    else:
        region = mask if mask is not None else mask_image[..., :3].mean(-1)
    if region.ndim == 2:
        region = region[None]
    if region.shape[0] != 1:
        raise ValueError(f"{node}: one region per entity, got a batch of {region.shape[0]}; add one entity per "
                         "mask (chain the node).")
    region = region[0].float().cpu()
    if not bool((region > 0.5).any()):
        raise ValueError(f"{node}: the region is empty (no value above 0.5), so the entity could not appear anywhere."
                         " Paint the region white / 1 in the mask.")
    return region


class AddEntity(Node):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
            "EliGenEntity", "Add EliGen Entity", ELIGEN,
            "One entity for EliGen (regional prompts): a prompt and the region it acts in. Chain the node for more "
            "entities (any number), then Apply EliGen Entities; use an EliGen LoRA (DiffSynth-Studio "
            "Qwen-Image-EliGen V1, V2 or Poster) loaded through Qwen-Image LoRA.",
            inputs=[
                prompt_input("prompt", "What this entity is, e.g. 'a red umbrella' or the words of a title. It acts "
                                       "only inside the region."),
                io.String.Input("box", default="", tooltip="The region as a box 'left, top, right, bottom' in "
                                                           "fractions of the image (e.g. '0.05, 0.2, 0.5, 0.45'); "
                                                           "leave empty when a mask is connected."),
                io.Mask.Input("mask", optional=True, tooltip="Or the entity's region as a mask (1 inside), e.g. drawn "
                                                             "in Load Image's mask editor. Any size: it is stretched "
                                                             "to the image."),
                io.Image.Input("mask_image", optional=True, tooltip="Or the region as a picture: white (the mean of "
                                                                    "the colours above 0.5) is inside."),
                EntityList.Input("entities", optional=True, tooltip="Entities added before this one (chain as many "
                                                                    "as you need)."),
            ],
            outputs=[output(EntityList, "entities", "The entities so far, this one last.")])

    @classmethod
    def execute(cls, prompt: str, box: str, mask=None, mask_image=None, entities=None) -> io.NodeOutput:
        name = cls.title()
        if not prompt.strip():
            raise ValueError(f"{name}: the entity prompt is empty; describe what belongs in the region.")
        return io.NodeOutput((*(entities or ()), Entity(prompt, _region(name, mask, mask_image, box))))


def _preview(entities: tuple[Entity, ...]) -> torch.Tensor:
    """The regions coloured over a dark ground ``[H, W, 3]`` in the first region's aspect (overlaps blend)."""
    height, width = entities[0].mask.shape
    scale = 512 / max(height, width)
    size = (max(1, round(height * scale)), max(1, round(width * scale)))
    picture = torch.full((*size, 3), 0.12)
    for index, entity in enumerate(entities):
        inside = torch.nn.functional.interpolate(entity.mask[None, None], size=size, mode="nearest-exact")[0, 0] > 0.5
        colour = torch.tensor(COLOURS[index % len(COLOURS)], dtype=torch.float32) / 255
        picture[inside] = picture[inside] * 0.35 + colour * 0.65
    return picture


def _entities_ui(entities: tuple[Entity, ...]) -> dict:
    """The regions as a preview image and the prompts with their colours (``qip_entities``; the web extension
    writes the legend).  Without the preview when it cannot be written: it never fails the node."""
    legend = [{"prompt": e.prompt, "colour": "#%02x%02x%02x" % COLOURS[i % len(COLOURS)]}
              for i, e in enumerate(entities)]
    try:
        return {"images": temp_previews([_preview(entities)], "qip_eligen"), "qip_entities": legend}
    except Exception as e:  # noqa: BLE001
        logging.getLogger("qwen_image").debug("no EliGen preview (%s: %s)", type(e).__name__, e)
        return {"qip_entities": legend}


def _with_entities(conditioning: list, contexts: list[torch.Tensor] | None, masks: tuple[torch.Tensor, ...],
                   node: str) -> list:
    """``conditioning`` with EliGen entities (``contexts``, one per mask) attached to every entry; ``contexts``
    None: each entity prompt replaced by the entry's own embeddings (the reference's EliGen on the negative side)."""
    out = []
    for context, options in conditioning:
        if contexts and contexts[0].shape[-1] != context.shape[-1]:
            raise ValueError(f"{node}: the entity prompts are encoded {contexts[0].shape[-1]} wide but the "
                             f"conditioning is {context.shape[-1]} wide: encode the prompt with the same Qwen-Image "
                             "text encoder as connected here.")
        own = tuple(contexts) if contexts else (context,) * len(masks)
        out.append([context, {**options, ENTITIES_KEY: Entities(own, masks)}])
    return out


class ApplyEntities(Node):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
            "EliGenApply", "Apply EliGen Entities", ELIGEN,
            "Encodes the EliGen entity prompts and attaches them to the conditioning: each entity's prompt acts only "
            "inside its region, the global prompt everywhere (DiffSynth-Studio's attention mask). Sample with an "
            "EliGen LoRA loaded.",
            inputs=[
                EntityList.Input("entities", tooltip="From Add EliGen Entity."),
                TextEncoder.Input("text_encoder", tooltip="From Load Qwen-Image Text Encoder (Qwen2.5-VL): the one "
                                                          "that encoded the global prompt."),
                io.Conditioning.Input("positive", tooltip="The global prompt's conditioning (Qwen-Image Text Encode "
                                                          "or Edit Encode)."),
                io.Conditioning.Input("negative", tooltip="The negative conditioning; it keeps no entities unless "
                                                          "'entities_on_negative' is on."),
                io.Boolean.Input("entities_on_negative", default=False,
                                 tooltip="As DiffSynth's eligen_enable_on_negative: the negative side gets the same "
                                         "regions, each with the negative prompt in place of the entity prompt. Off "
                                         "(the reference default): the negative is sampled without entities."),
            ],
            outputs=[output(io.Conditioning, "positive", "The positive conditioning with the entities."),
                     output(io.Conditioning, "negative", "The negative conditioning (with the regions if "
                                                         "'entities_on_negative').")])

    @classmethod
    def execute(cls, entities, text_encoder, positive, negative, entities_on_negative: bool) -> io.NodeOutput:
        name = cls.title()
        if not entities:
            raise ValueError(f"{name}: no entities; connect Add EliGen Entity.")
        # each entity prompt on its own, with the text-to-image template (as the reference encodes them)
        contexts = text_encoder.encode_prompts([entity.prompt for entity in entities], template="t2i")
        masks = tuple(entity.mask for entity in entities)
        positive = _with_entities(positive, contexts, masks, name)
        if entities_on_negative:
            negative = _with_entities(negative, None, masks, name)
        return io.NodeOutput(positive, negative, ui=_entities_ui(entities))


NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = mappings(AddEntity, ApplyEntities)
