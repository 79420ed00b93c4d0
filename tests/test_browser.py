"""The pack in the host's real frontend: ComfyUI_frontend in headless Chromium, driven by playwright-core.

One browser for the module (tests/browser/drive.mjs, one node process): it opens the host's page, then

* loads every template of the host's template list the way the template browser does (``app.loadGraphData``):
  no missing node type, no node the frontend could not build, no dialog; and no console error or warning from the
  pack in the whole session (our extension loads: ``qwen_image.ui`` is registered); once Load Image shows its
  picture, every node keeps the size the layout gave it, none overlaps another and no link crosses a node;
* picks every option of Empty Latent's ``preset`` through the combo widget (value, then its callback): width and
  height take the preset's size (the node's own preset list, models/qwen_image/latent.py's ASPECT_PRESETS), and the
  node draws its megapixels and tokens (and the off-grid warning for a custom size);
* loads an edit graph (``app.loadApiJson``) and queues it from the frontend (``app.queuePrompt``): once the host's
  ``executed`` messages reach the page, Edit Encode holds and draws the VL / VAE sizes and shows the four
  previews at the sizes of the PNGs the host wrote; each loader holds and draws its badge;
* opens Empty Latent's help from the selection toolbox's info button: the frontend fetches web/docs/ from the
  host and shows the page.

Screenshots of each step go to ``$QIP_ARTIFACTS/browser`` (or a pytest temporary folder); the path is printed.
Needs Chromium and playwright-core (tools/env.py installs them; tools/test.py does it before the tests): without
them these tests fail in CI and skip elsewhere.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
from PIL import Image

import env
from build_workflows import FRONTEND, _crosses
from host import PACK_NAME
from models.qwen_image.latent import ASPECT_PRESETS
from test_edit_host import EDIT_PLUS, _add_images, edit_graph
from test_web_ui import file_parameters, fresh_caches, seen_sizes

REPO_ROOT = Path(__file__).resolve().parent.parent
DRIVER = Path(__file__).resolve().parent / "browser" / "drive.mjs"
EXAMPLES = REPO_ROOT / "example_workflows"
CUSTOM = "custom (width x height below)"
GRID = 16  # QIP_EmptyLatent's size step
EDIT_SIZES = [(1000, 750), (300, 520)]
EDIT_MODEL = "qwen_image_edit_2511_bf16.safetensors"
BROWSER_SECONDS = 240
# Console messages that name the pack but do not come from it: the frontend's look-ups of node ids in the online
# registry (the host's Content-Security-Policy blocks them; the host runs offline), and its probe for a localized
# help page (web/docs/<id>/<locale>.md) before the plain web/docs/<id>.md.
NOT_OURS = (re.compile(r"violates the following Content Security Policy"),)
LOCALE_PROBE = re.compile(rf"/extensions/{re.escape(PACK_NAME)}/docs/QIP_\w+/[\w-]+\.md$")


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


@pytest.fixture(scope="module")
def browser() -> dict:
    try:
        return env.browser(install=False)
    except env.BrowserUnavailable as error:
        message = f"the browser tests need Chromium and playwright-core (python3 tools/env.py --browser): {error}"
        if _in_ci():
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> Path:
    root = os.environ.get("QIP_ARTIFACTS")
    folder = Path(root).resolve() / "browser" if root else tmp_path_factory.mktemp("browser-artifacts")
    folder.mkdir(parents=True, exist_ok=True)
    print(f"\n[browser] screenshots in {folder}")
    return folder


def _numbered(graph: dict) -> tuple[dict, dict]:
    """The API graph with the frontend's numeric node ids, and our names -> those ids."""
    ids = {name: str(i + 1) for i, name in enumerate(graph)}

    def link(value):
        return [ids[value[0]], value[1]] if isinstance(value, list) and len(value) == 2 and value[0] in ids else value

    return ({ids[name]: {**node, "inputs": {key: link(value) for key, value in node["inputs"].items()}}
             for name, node in graph.items()}, ids)


@pytest.fixture(scope="module")
def session(host, browser, artifacts) -> dict:
    names = _add_images(host, EDIT_SIZES, seed=97)  # in the input folder before the page lists LoadImage's files
    graph, ids = _numbered(edit_graph(names, model=EDIT_MODEL, mode=EDIT_PLUS, prompt="x", steps=1, seed=5,
                                      area="512x512"))
    # a user who has seen the first-run tour: the page opens on a graph, not on the template browser
    assert host.post("/api/settings/Comfy.TutorialCompleted", True)[0] == 200
    fresh_caches(host)  # the loaders load (and report their badges) in this run
    job = {
        "url": host.url, "pack": PACK_NAME, "artifacts": str(artifacts), "timeout_s": BROWSER_SECONDS,
        "chromium": browser["chromium"], "chromium_args": list(env.CHROMIUM_ARGS),
        "playwright_core": browser["playwright_core"],
        "steps": [
            {"kind": "templates"},
            {"kind": "preset", "node": "QIP_EmptyLatent", "width": 1000, "height": 600},
            {"kind": "run", "graph": graph, "nodes": [ids[n] for n in ("encode", "dit", "te", "vae")],
             "shots": [ids["encode"], ids["dit"]], "timeout_s": 180},
            {"kind": "help", "node": "QIP_EmptyLatent", "expect": "Empty Latent (Qwen-Image)"},
        ],
    }
    job_path, result_path = artifacts / "job.json", artifacts / "result.json"
    job_path.write_text(json.dumps(job, indent=1), encoding="utf-8")
    result_path.unlink(missing_ok=True)
    done = subprocess.run([browser["node"], str(DRIVER), str(job_path), str(result_path)], capture_output=True,
                          text=True, timeout=BROWSER_SECONDS + 60)
    assert result_path.is_file(), (f"the browser driver wrote no result (exit {done.returncode}):\n"
                                    f"{done.stderr[-4000:]}\n{done.stdout[-2000:]}")
    result = json.loads(result_path.read_text(encoding="utf-8"))
    assert not result.get("error"), f"{result['error']}\n(screenshots: {artifacts})\n{done.stderr[-2000:]}"
    result["ids"] = ids
    result["by_kind"] = {step["kind"]: step for step in result["steps"]}
    result["artifacts"] = artifacts
    return result


def _step(session: dict, kind: str) -> dict:
    step = session["by_kind"][kind]
    assert step["ok"], f"browser step {kind} failed: {step['error']}\n(screenshots: {session['artifacts']})"
    return step["data"]


def _from_pack(message: dict) -> bool:
    where = f"{message['text']} {message['url']}"
    if not any(mark in where for mark in (PACK_NAME, "qwen_image", "QIP_")):
        return False
    if any(pattern.search(message["text"]) for pattern in NOT_OURS):
        return False
    return not (LOCALE_PROBE.search(message["url"]) and "404" in message["text"])


def _report(messages: list[dict]) -> str:
    return "\n".join(f"[{m['step']}] {m['type']}: {m['text'][:600]} ({m['url']})" for m in messages)


def test_every_template_loads_in_the_frontend(session):
    loaded = _step(session, "templates")
    assert sorted(loaded) == sorted(path.stem for path in EXAMPLES.glob("*.json"))
    problems = {name: {key: info[key] for key in ("missing", "broken", "dialogs") if info[key]}
                for name, info in loaded.items()}
    problems = {name: found for name, found in problems.items() if found}
    assert not problems, f"templates the frontend could not load cleanly: {json.dumps(problems, indent=1)}"
    for name, info in loaded.items():
        workflow = json.loads((EXAMPLES / f"{name}.json").read_text(encoding="utf-8"))
        assert sorted(info["types"]) == sorted(node["type"] for node in workflow["nodes"]), name
    assert "qwen_image.ui" in session["extensions"], f"our extension is not registered: {session['extensions']}"
    ours = [message for message in session["console"] if _from_pack(message)]
    assert not ours, (f"console errors / warnings from the pack:\n{_report(ours)}\n\nall errors and warnings:\n"
                      f"{_report(session['console'])}")


def test_templates_keep_their_layout_once_image_previews_show(session):
    """The layout (tools/build_workflows.py) is what the frontend draws: once Load Image shows its picture, every
    node has the size the template gives it (none grew over a neighbour), no two nodes overlap, the sockets are where
    the layout expects them and no link crosses a node."""
    loaded = _step(session, "templates")
    problems = {}
    for name, info in loaded.items():
        workflow = json.loads((EXAMPLES / f"{name}.json").read_text(encoding="utf-8"))
        planned = {node["id"]: node for node in workflow["nodes"]}
        found = []
        for node in info["layout"]:
            if node["type"] == "LoadImage" and node["previews"] != 1:
                found.append(f"Load Image {node['id']} shows {node['previews']} images")
            if any(abs(got - want) > 0.5 for got, want in zip(node["size"], planned[node["id"]]["size"])):
                found.append(f"node {node['id']} ({node['type']}) is drawn {node['size']}, laid out "
                             f"{planned[node['id']]['size']}")
            if node["type"] in FRONTEND and node["sockets"] != list(FRONTEND[node["type"]][0]):
                found.append(f"node {node['id']} ({node['type']}) has sockets {node['sockets']}")
        rects = {node["id"]: (node["pos"][0], node["pos"][1] - info["title_height"],
                              node["pos"][0] + node["size"][0], node["pos"][1] + node["size"][1])
                 for node in info["layout"]}
        found += [f"nodes {a} and {b} overlap" for a, ra in rects.items() for b, rb in rects.items()
                  if a < b and not (ra[2] <= rb[0] or rb[2] <= ra[0] or ra[3] <= rb[1] or rb[3] <= ra[1])]
        for link in info["links"]:  # from the source's right edge to the target's left one, at the slots' heights
            start = (rects[link["origin"]][2], link["start"][1])
            end = (rects[link["target"]][0], link["end"][1])
            found += [f"link {link['id']} crosses node {node_id}" for node_id, rect in rects.items()
                      if node_id not in (link["origin"], link["target"]) and _crosses(start, end, rect)]
        if found:
            problems[name] = found
    assert not problems, (f"templates the frontend draws otherwise than laid out (screenshots: "
                          f"{session['artifacts']}): {json.dumps(problems, indent=1)}")


def _latent_line(width: int, height: int) -> str:
    return f"{width}×{height} · {width * height / 1e6:.2f} MP · {(width // GRID) * (height // GRID)} tokens"


def test_picking_a_preset_sets_width_and_height(session):
    data = _step(session, "preset")
    assert data["options"] == [*ASPECT_PRESETS, CUSTOM]  # the node's own list, as the host defines it
    default = next(iter(ASPECT_PRESETS))
    assert data["created"] == {"preset": default, "width": ASPECT_PRESETS[default][0],
                               "height": ASPECT_PRESETS[default][1], "batch_size": 1}
    last = None
    for pick in data["picks"]:
        widgets = pick["widgets"]
        if pick["preset"] == CUSTOM:  # the fields stay as the last preset left them
            assert (widgets["width"], widgets["height"]) == last
            continue
        size = tuple(round(side / GRID) * GRID for side in ASPECT_PRESETS[pick["preset"]])
        assert widgets["preset"] == pick["preset"] and (widgets["width"], widgets["height"]) == size, pick
        assert pick["drawn"] == [_latent_line(*size)], pick
        last = size
    off_grid = data["offGrid"]
    assert (off_grid["widgets"]["width"], off_grid["widgets"]["height"]) == (1000, 600)
    assert off_grid["drawn"] == [_latent_line(1000, 600), "⚠ not a multiple of 16: use 992×608"]


def test_edit_encode_shows_the_previews_after_a_frontend_run(session, host):
    run = _step(session, "run")
    encode = run["nodes"][session["ids"]["encode"]]
    expected = seen_sizes(EDIT_SIZES)
    assert encode["type"] == "QIP_EditEncode" and encode["qipSizes"] == expected
    assert encode["drawn"] == [f"{size['role'].upper()} {size['index'] + 1}: {size['width']}×{size['height']}"
                               for size in expected]
    outputs = encode["outputImages"]
    assert [item["type"] for item in outputs] == ["temp"] * len(expected)
    assert len(encode["imgs"]) == len(expected), f"the node shows {len(encode['imgs'])} previews: {encode}"
    for item, shown, size in zip(outputs, encode["imgs"], expected):
        assert f"filename={item['filename']}" in shown["src"]
        with Image.open(host.workdir / "temp" / "temp" / item["subfolder"] / item["filename"]) as png:
            assert (shown["width"], shown["height"]) == png.size  # the page shows the host's preview as written
        assert max(shown["width"], shown["height"]) <= 512
        assert abs(shown["width"] / shown["height"] - size["width"] / size["height"]) < 0.05
        if max(size["width"], size["height"]) <= 512:
            assert (shown["width"], shown["height"]) == (size["width"], size["height"])


def _badge_line(badge: dict) -> str:
    params, size = badge["parameters"], badge["bytes"]
    parts = [badge["variant"], badge["format"],
             f"{params / 1e9:.1f} B params" if params >= 1e9 else
             f"{params / 1e6:.1f} M params" if params >= 1e6 else f"{params} params",
             f"{size / 2 ** 30:.2f} GB" if size >= 2 ** 30 else f"{size / 2 ** 20:.1f} MB"]
    return " · ".join(parts)


def test_loaders_show_their_badges_after_a_frontend_run(session, host_models_dir):
    run = _step(session, "run")
    nodes = {name: run["nodes"][session["ids"][name]] for name in ("dit", "te", "vae")}
    for name, node in nodes.items():
        assert node["qipBadge"], f"{name} ({node['type']}) holds no badge after the run"
        assert node["drawn"] == [_badge_line(node["qipBadge"])], node
    dit = nodes["dit"]["qipBadge"]
    assert dit["variant"] == "Edit-2511" and dit["format"] == "bf16"
    assert dit["parameters"] == file_parameters(host_models_dir / "diffusion_models" / EDIT_MODEL)
    assert nodes["te"]["qipBadge"]["variant"] == "Qwen2.5-VL"
    assert nodes["vae"]["qipBadge"]["variant"] == "Qwen-Image VAE"


def test_the_node_help_opens(session):
    data = _step(session, "help")
    page = (REPO_ROOT / "web" / "docs" / "QIP_EmptyLatent.md").read_text(encoding="utf-8")
    served = f"/extensions/{PACK_NAME}/docs/QIP_EmptyLatent.md"
    assert any(item["url"].endswith(served) and item["status"] == 200 for item in data["fetched"]), data["fetched"]
    headings = [line.lstrip("#").strip() for line in page.splitlines() if line.startswith("#")]
    missing = [heading for heading in headings if heading not in data["text"]]
    assert not missing, f"the help panel lacks {missing}:\n{data['text'][:3000]}"
    assert "QIP_EmptyLatent" in data["text"]


def test_each_step_left_a_screenshot(session):
    for step in session["steps"]:
        assert step["shots"], f"step {step['kind']} saved no screenshot"
        for shot in step["shots"]:
            with Image.open(shot) as png:
                assert png.format == "PNG" and png.size == (1600, 1000)
    templates = session["by_kind"]["templates"]["shots"]
    assert len(templates) == len(list(EXAMPLES.glob("*.json")))
    print(f"\n[browser] {sum(len(step['shots']) for step in session['steps'])} screenshots in {session['artifacts']}")
