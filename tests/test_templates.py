"""The example workflows as the host's template browser offers them: generated, laid out for the fit-to-view the
frontend opens them with, every loader with its model download, a thumbnail each, the same graphs as before."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

import build_workflows
from build_workflows import (EXAMPLES, FRONTEND, LOADER_FOLDERS, MODEL_URLS, STAGE, THUMBNAIL_SIZE, crossings,
                             node_rect)
from host import PACK_NAME
from tiny_models.factory import EARLIER_NAMES

OLD_WORKFLOWS = Path(__file__).resolve().parent / "fixtures" / "workflows_v1"
NAMES = sorted(path.name for path in EXAMPLES.glob("*.json"))
# The model folders of ComfyUI 0.3.75 the loaders list (the frontend refuses a download into an unknown one).
MODEL_FOLDERS = {"diffusion_models", "text_encoders", "vae", "loras", "controlnet", "model_patches"}
# The frontend's fit-to-view: fitToBounds(node bounds) at zoom 0.75 of the canvas; on a 1920x1080 screen the canvas
# is about 1920x1000.  Below a scale of 8/14 (min_font_size_for_lod 8 over the 14 px node text) LiteGraph stops
# drawing text, so the whole graph must fit at a scale above that.
CANVAS = (1920, 1000)
READABLE_SCALE = 0.6


def _load(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def test_the_examples_are_the_generators_output():
    assert NAMES, "example_workflows/ is empty"
    generated = build_workflows.workflows()
    assert sorted(generated) == NAMES
    for name in NAMES:
        assert _load(EXAMPLES / name) == json.loads(json.dumps(generated[name])), \
            f"{name} is stale: run python3 tools/build_workflows.py"


@pytest.mark.parametrize("name", NAMES)
def test_each_example_has_its_thumbnail(name):
    with Image.open((EXAMPLES / name).with_suffix(".jpg")) as thumbnail:
        assert thumbnail.format == "JPEG" and thumbnail.size == THUMBNAIL_SIZE


@pytest.mark.parametrize("name", NAMES)
def test_every_loader_offers_its_model_download(name):
    for node in _load(EXAMPLES / name)["nodes"]:
        files = [value for value in node["widgets_values"]
                 if isinstance(value, str) and value.endswith((".safetensors", ".gguf"))]
        if node["type"] not in LOADER_FOLDERS:
            assert not files, f"node {node['id']} ({node['type']}) picks a model file but is not a known loader"
            continue
        (model,) = node["properties"]["models"]
        assert model["name"] == node["widgets_values"][0]  # the frontend matches the entry to the widget value
        assert model["directory"] in MODEL_FOLDERS
        assert model["url"].startswith("https://huggingface.co/") and "/resolve/main/" in model["url"]


def test_every_model_link_is_used():
    used = {model["name"] for name in NAMES for node in _load(EXAMPLES / name)["nodes"]
            for model in node["properties"].get("models", [])}
    assert used == set(MODEL_URLS)


@pytest.mark.parametrize("name", NAMES)
def test_no_link_crosses_a_node_and_no_nodes_overlap(name):
    workflow = _load(EXAMPLES / name)
    assert crossings(workflow) == []
    rects = [node_rect(node) for node in workflow["nodes"]]
    for i, a in enumerate(rects):
        for b in rects[i + 1:]:
            assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1], f"{a} overlaps {b}"


def test_the_detector_sees_a_crossing():
    workflow = _load(EXAMPLES / "qwen_image_t2i.json")
    decode = next(node for node in workflow["nodes"] if node["type"] == "VAEDecode")
    guider = next(node for node in workflow["nodes"] if node["type"] == "CFGGuider")
    guider["pos"] = [guider["pos"][0], decode["pos"][1] + 20]  # the VAE's link to the decoder now runs through it
    assert any(node_id == guider["id"] for _, node_id in crossings(workflow))


@pytest.mark.parametrize("name", NAMES)
def test_stages_run_left_to_right_in_groups(name):
    workflow = _load(EXAMPLES / name)
    groups = workflow["groups"]
    assert [group["title"][0] for group in groups] == [str(i + 1) for i in range(len(groups))]
    lefts = [group["bounding"][0] for group in groups]
    assert lefts == sorted(lefts)
    for a, b in zip(groups, groups[1:]):
        assert a["bounding"][0] + a["bounding"][2] < b["bounding"][0], "groups overlap"
    for node in workflow["nodes"]:
        left, top, right, bottom = node_rect(node)
        x, y, w, h = groups[STAGE[node["type"]]]["bounding"]
        assert x <= left and right <= x + w and y <= top and bottom <= y + h, f"node {node['id']} outside its group"


@pytest.mark.parametrize("name", NAMES)
def test_the_whole_graph_is_readable_at_fit_to_view(name):
    rects = [node_rect(node) for node in _load(EXAMPLES / name)["nodes"]]
    width = max(rect[2] for rect in rects) - min(rect[0] for rect in rects)
    height = max(rect[3] for rect in rects) - min(rect[1] for rect in rects)
    assert 0.75 * min(CANVAS[0] / width, CANVAS[1] / height) >= READABLE_SCALE, (width, height)


def _graph(workflow: dict) -> dict:
    """What the host runs: nodes with their types, widget values and connections, and the link table."""
    return {"nodes": {node["id"]: (node["type"], node["widgets_values"],
                                   [(slot["name"], slot["type"], slot["link"]) for slot in node["inputs"]],
                                   [(slot["name"], slot["type"], slot["links"]) for slot in node["outputs"]])
                      for node in workflow["nodes"]},
            "links": workflow["links"]}


# Model files the examples name differently now (earlier 2.1 templates' names -> Comfy-Org's published ones).
RENAMED = {Path(earlier).name: Path(name).name for earlier, name in EARLIER_NAMES.items()}


@pytest.mark.parametrize("old", sorted(OLD_WORKFLOWS.glob("*.json")), ids=lambda path: path.stem)
def test_each_old_workflow_is_an_example_with_the_same_graph(old):
    workflow = _load(old)
    for node in workflow["nodes"]:  # the loaders' widgets and the note's table
        for i, value in enumerate(node["widgets_values"]):
            for earlier, name in RENAMED.items():
                value = value.replace(earlier, name) if isinstance(value, str) else value
            node["widgets_values"][i] = value
    assert _graph(_load(EXAMPLES / old.name)) == _graph(workflow)


def test_the_examples_name_the_published_2_1_files():
    named = {value for name in NAMES for node in _load(EXAMPLES / name)["nodes"] for value in node["widgets_values"]}
    assert set(RENAMED.values()) <= named and not set(RENAMED) & named
    for published in RENAMED.values():  # the download link saves the file under the name the loader shows
        assert MODEL_URLS[published].endswith("/" + published)


def test_the_layout_knows_each_node_as_the_frontend_builds_it(host):
    """build_workflows.FRONTEND (what the sizes and link ends follow): each node type's input sockets in order and
    its widget count, as the frontend builds them from the host's definitions."""
    info = host.object_info()
    used = {node["type"] for name in NAMES for node in _load(EXAMPLES / name)["nodes"]} - {"MarkdownNote"}
    assert used == set(FRONTEND)
    for node_type, expected in FRONTEND.items():
        sockets, widgets = [], 0
        for section in ("required", "optional"):
            for name, spec in info[node_type]["input"].get(section, {}).items():
                options = spec[1] if len(spec) > 1 else {}
                if isinstance(spec[0], list) or spec[0] in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"):
                    # a seed's "control after generate" and an image upload button are widgets of their own
                    widgets += 1 + bool(options.get("control_after_generate")) + bool(options.get("image_upload"))
                else:
                    sockets.append(name)
        assert (tuple(sockets), widgets) == expected, node_type


def test_the_host_lists_every_example_as_a_template(host):
    listed = host.get("/api/workflow_templates").get(PACK_NAME, [])
    assert sorted(listed) == sorted(Path(name).stem for name in NAMES)
    for name in ("qwen_image_t2i.json", "qwen_image_t2i.jpg"):  # what the browser fetches for a template
        with urllib.request.urlopen(f"{host.url}/api/workflow_templates/{PACK_NAME}/{name}", timeout=30) as reply:
            assert reply.read() == (EXAMPLES / name).read_bytes()
