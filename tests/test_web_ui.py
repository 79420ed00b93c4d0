"""The web extension and the node-side data it shows, in the real host.

* Edit Encode reports "what the model sees": one VL and one VAE preview per input image (temp PNGs, at most 512 px)
  and their true sizes (``qip_sizes``), computed here independently from the size policy.
* The loaders report a badge (``qip_badge``): variant, stored weight format, parameter count (checked against the
  tiny safetensors files themselves) and bytes in memory.
* The host serves web/js/qwen_image.js as an extension, and the file parses (``node --check``).
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from PIL import Image
from safetensors import safe_open

from models.qwen_image.edit_geometry import EDIT_PLUS_VL_AREA, policy_size
from host import PACK_NAME
from test_edit_host import EDIT_PLUS, _add_images, edit_graph
from test_t2i_host import node_id, small_t2i

REPO_ROOT = Path(__file__).resolve().parent.parent
SCRIPT = REPO_ROOT / "web" / "js" / "qwen_image.js"
APP_IMPORT = 'import { app } from "../../../scripts/app.js";'
# Tensors a loader reads as markers, not weights (Edit-2511's zero_cond_t marker).
MARKERS = ("__index_timestep_zero__",)


def file_parameters(path: Path, unused: tuple[str, ...] = ()) -> int:
    """Elements of every weight in a safetensors file (markers, and tensors whose names hold one of ``unused``,
    left out)."""
    with safe_open(str(path), "pt") as f:
        return sum(math.prod(f.get_slice(name).get_shape()) for name in f.keys()
                   if not name.endswith(MARKERS) and not any(part in name for part in unused))


def fresh_caches(host) -> None:
    """Empty the host's node cache (/free), so the next graph loads its models again: the host reports the ui of
    the nodes a prompt executed, and a loader whose output is cached is not even visited (the frontend keeps the
    badge it drew after the load)."""
    assert host.post("/free", {"unload_models": True, "free_memory": True})[0] == 200
    time.sleep(3)  # the worker wakes on the flag and resets its caches while idle


def badge(result, node: str) -> dict:
    assert node in result.outputs, f"node {node} reported no ui: {sorted(result.outputs)}"
    (found,) = result.outputs[node]["qip_badge"]
    return found


def seen_sizes(sizes: list[tuple[int, int]], area: int = 512 * 512, multiple: int = 32) -> list[dict]:
    """Edit Encode's ``qip_sizes`` for Edit-2509/2511 images of ``sizes`` (reference: the VL sees a 384x384-area
    copy, the VAE the policy size of the chosen area)."""
    return ([{"role": "vl", "index": i, "width": w, "height": h}
             for i, (w, h) in enumerate(policy_size(w, h, EDIT_PLUS_VL_AREA) for w, h in sizes)]
            + [{"role": "vae", "index": i, "width": w, "height": h}
               for i, (w, h) in enumerate(policy_size(w, h, area, multiple) for w, h in sizes)])


@pytest.fixture(scope="module")
def edit_run(host):
    sizes = [(1000, 750), (300, 520)]
    names = _add_images(host, sizes, seed=91)
    graph = edit_graph(names, model="qwen_image_edit_2511_bf16.safetensors", mode=EDIT_PLUS, prompt="x", steps=1,
                       seed=5, area="512x512")
    fresh_caches(host)
    return sizes, host.run(graph)


def test_edit_encode_shows_what_the_model_sees(host, edit_run):
    sizes, result = edit_run
    ui = result.outputs["encode"]
    expected = seen_sizes(sizes)
    assert ui["qip_sizes"] == expected
    assert len(ui["images"]) == len(expected)
    assert all(item["type"] == "temp" for item in ui["images"])
    assert len(set(item["filename"] for item in ui["images"])) == len(expected)  # unique names
    assert [path.name for path in result.files["previews"]] == [item["filename"] for item in ui["images"]]
    for path, size in zip(result.files["previews"], expected):
        with Image.open(path) as preview:
            width, height = preview.size
        assert max(width, height) <= 512  # cheap previews ...
        assert abs(width / height - size["width"] / size["height"]) < 0.05  # ... of the image, aspect kept
        if max(size["width"], size["height"]) <= 512:
            assert (width, height) == (size["width"], size["height"])  # small ones at their true size
    assert not result.images  # previews are not saved outputs


def test_edit_loaders_show_their_badges(host, host_models_dir, edit_run):
    _, result = edit_run
    dit = badge(result, "dit")
    assert dit["variant"] == "Edit-2511" and dit["format"] == "bf16"
    assert dit["parameters"] == file_parameters(host_models_dir / "diffusion_models" /
                                                "qwen_image_edit_2511_bf16.safetensors")
    assert dit["bytes"] > 0
    assert badge(result, "vae")["parameters"] == file_parameters(host_models_dir / "vae" /
                                                                 "qwen_image_vae.safetensors")
    text = badge(result, "te")
    assert text["variant"] == "Qwen2.5-VL" and text["format"] == "bf16" and text["parameters"] > 0


def test_t2i_loaders_show_their_badges(host, host_models_dir):
    graph = small_t2i(host, steps=1, size=64)
    fresh_caches(host)
    result = host.run(graph)
    dit = badge(result, node_id(graph, "QIP_DiffusionModelLoader"))
    name = graph[node_id(graph, "QIP_DiffusionModelLoader")]["inputs"]["model_name"]
    assert dit["variant"] == "T2I" and dit["format"] == "bf16"
    assert dit["parameters"] == file_parameters(host_models_dir / "diffusion_models" / name)
    # in memory: fp32 on this CPU host (the loader converts bf16 to its compute dtype), bf16 on a bf16 GPU
    assert dit["bytes"] in (2 * dit["parameters"], 4 * dit["parameters"])
    vae = badge(result, node_id(graph, "QIP_VAELoader"))
    assert vae["variant"] == "Qwen-Image VAE"
    assert vae["parameters"] == file_parameters(host_models_dir / "vae" /
                                                graph[node_id(graph, "QIP_VAELoader")]["inputs"]["vae_name"])


def _get(host, path: str) -> tuple[int, bytes]:
    with urllib.request.urlopen(host.url + path, timeout=30) as response:
        return response.status, response.read()


def test_the_host_serves_the_extension(host):
    status, body = _get(host, "/extensions")
    assert status == 200
    url = f"/extensions/{PACK_NAME}/js/qwen_image.js"
    assert url in json.loads(body)
    status, body = _get(host, url)
    assert status == 200 and body == SCRIPT.read_bytes()


NEEDS_NODE = pytest.mark.skipif(shutil.which("node") is None, reason="node is not on PATH")


@NEEDS_NODE
def test_the_extension_parses():
    result = subprocess.run(["node", "--check", str(SCRIPT)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


# Drives the extension in node with a stand-in for the host's app: registers the node types, then draws on nodes
# with and without widgets (undefined widgets must not throw) and after onExecuted messages.
DRIVER = r"""
const extension = globalThis.registered;
const drawn = [];
const ctx = {save() {}, restore() {}, fillText(text) { drawn.push(text); }};
function make(name) {
  const nodeType = function () {};
  nodeType.prototype.onExecuted = function () { this.originalRan = true; };
  extension.beforeRegisterNodeDef(nodeType, {name});
  const node = new nodeType();
  node.size = [300, 100];
  return node;
}
const out = {};
const latent = make("QIP_EmptyLatent");
latent.onDrawForeground(ctx);  // node.widgets undefined
out.bare = drawn.splice(0);
latent.widgets = [{name: "preset", value: "custom (width x height below)"}, {name: "width", value: 1000},
                  {name: "height", value: 512}];
latent.onDrawForeground(ctx);
out.custom = drawn.splice(0);
latent.widgets[0].value = "1328x1328 (1:1)";
latent.onDrawForeground(ctx);
out.preset = drawn.splice(0);
const latent21 = make("QIP_21EmptyLatent");
latent21.widgets = [{name: "width", value: 1040}, {name: "height", value: 1024}];
latent21.onDrawForeground(ctx);
out.latent21 = drawn.splice(0);
const picker = make("QIP_EmptyLatent");
picker.widgets = [{name: "preset", value: "1328x1328 (1:1)", callback(value) { this.originalGot = value; }},
                  {name: "width", value: 1024}, {name: "height", value: 1024}];
picker.onNodeCreated();  // a new node: its fields take its default preset's size
out.created = [picker.widgets[1].value, picker.widgets[2].value];
const pick = (value) => { picker.widgets[0].value = value; picker.widgets[0].callback(value); };
pick("1664x928 (16:9)");
out.picked = [picker.widgets[1].value, picker.widgets[2].value, picker.widgets[0].originalGot];
pick("custom (width x height below)");  // custom keeps the fields as they are
out.pickedCustom = [picker.widgets[1].value, picker.widgets[2].value];
const encode = make("QIP_EditEncode");
encode.size = new Float32Array([300, 100]);  // current frontends' node.size is a typed array
encode.widgets = [{name: "area", value: "1024x1024 (reference)"}, {name: "size_multiple", value: 32}];
encode.onDrawForeground(ctx);
out.area = drawn.splice(0);
encode.onExecuted({images: [], qip_sizes: [{role: "vl", index: 0, width: 448, height: 320},
                                           {role: "vae", index: 0, width: 1216, height: 864}]});
encode.onDrawForeground(ctx);
out.seen = drawn.splice(0);
out.encodeOriginal = encode.originalRan === true;
const loader = make("QIP_DiffusionModelLoader");
loader.onDrawForeground(ctx);
out.noBadge = drawn.splice(0);
loader.onExecuted({qip_badge: [{variant: "Edit-2511", format: "Q4_K_M", parameters: 20430401088,
                                bytes: 12 * 2 ** 30}]});
loader.onExecuted(undefined);  // a message without a badge keeps the last one
loader.onDrawForeground(ctx);
out.badge = drawn.splice(0);
const apply = make("QIP_EliGenApply");
apply.onDrawForeground(ctx);
out.noEntities = drawn.splice(0);
apply.onExecuted({images: [], qip_entities: [{prompt: "a red\n umbrella", colour: "#e65046"},
                                             {prompt: "x".repeat(60), colour: "not a colour"}]});
apply.onDrawForeground(ctx);
out.entities = drawn.splice(0);
console.log(JSON.stringify(out));
"""


@NEEDS_NODE
def test_the_extension_draws(tmp_path):
    source = SCRIPT.read_text(encoding="utf-8")
    stub = "const app = {registerExtension(extension) { globalThis.registered = extension; }};"
    script = tmp_path / "driver.mjs"
    # the host serves the file at /extensions/<pack>/js/, three levels under the root that holds scripts/app.js
    assert APP_IMPORT in source
    script.write_text(source.replace(APP_IMPORT, stub) + DRIVER, encoding="utf-8")
    result = subprocess.run(["node", str(script)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["bare"] == [] and out["noBadge"] == []
    assert out["custom"] == ["1000×512 · 0.51 MP · 1984 tokens", "⚠ not a multiple of 16: use 992×512"]
    assert out["preset"] == ["1328×1328 · 1.76 MP · 6889 tokens"]
    assert out["latent21"] == ["1040×1024 · 1.06 MP · 4160 tokens", "⚠ not a multiple of 32: use 1024×1024"]
    assert out["created"] == [1328, 1328]
    assert out["picked"] == [1664, 928, "1664x928 (16:9)"] and out["pickedCustom"] == [1664, 928]
    assert out["area"] == ["≈ 1.05 MP · ≈ 4096 tokens per image"]
    assert out["seen"] == ["VL 1: 448×320", "VAE 1: 1216×864"] and out["encodeOriginal"]
    assert out["badge"] == ["Edit-2511 · Q4_K_M · 20.4 B params · 12.00 GB"]
    assert out["noEntities"] == [] and out["entities"] == ["■ 1: a red umbrella", "■ 2: " + "x" * 47 + "…"]


def test_2_1_loaders_show_their_badges(host, host_models_dir):
    from test_qwen_image_2_1_host import DIT, TEXT_ENCODER, VAE, graph_2_1

    names = _add_images(host, [(96, 64)], seed=93)
    fresh_caches(host)
    result = host.run(graph_2_1(names, prompt="a fox", negative=" ", steps=1, seed=1, cfg=1.0, size=(64, 64)))
    dit = badge(result, "dit")
    assert dit["variant"] == "2.1" and dit["format"] == "bf16"
    assert dit["parameters"] == file_parameters(host_models_dir / "diffusion_models" / DIT)
    assert badge(result, "te")["variant"] == "Qwen3-VL (2.1)"
    vae = badge(result, "vae")
    assert vae["variant"] == "2.1 VAE"
    # the image VAE holds all but the temporal (video) up/downsampling convolutions of the file
    assert vae["parameters"] == file_parameters(host_models_dir / "vae" / VAE, unused=(".time_conv.",))


def test_gguf_loader_badges(host, host_models_dir):
    from models.io.gguf.reader import GGUFReader

    graph = small_t2i(host, steps=1, size=64, workflow="qwen_image_t2i_gguf.json")
    fresh_caches(host)
    result = host.run(graph)
    loader = node_id(graph, "QIP_DiffusionModelLoader")
    dit = badge(result, loader)
    reader = GGUFReader(host_models_dir / "diffusion_models" / graph[loader]["inputs"]["model_name"])
    assert dit["variant"] == "T2I" and dit["format"] == "Q8_0"  # llama.cpp's label, from the file name
    assert dit["parameters"] == sum(math.prod(info.shape) for info in reader.tensors.values())
    assert dit["bytes"] <= sum(info.nbytes for info in reader.tensors.values())  # kept quantized (norms may be F32)
    assert "Q8_0" in dit["types"]
    text = badge(result, node_id(graph, "QIP_TextEncoderLoader"))
    assert text["format"] == "Q8_0" and text["parameters"] > 0
