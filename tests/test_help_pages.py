"""Node help pages and the Chinese locale.

* every node the host registers for this pack has ``web/docs/<NodeId>.md`` (the frontend's help panel), non-empty,
  naming each of the node's inputs; the host serves it under ``/extensions/<pack folder>/docs/``;
* ``web/docs/<NodeId>/zh.md`` pages (the frontend's per-locale help) exist for the main nodes and only for real ids;
* ``locales/zh/nodeDefs.json`` (node names, descriptions, input names and tooltips, output names) parses, covers
  every node, input and output, and names nothing the host does not have; the host's ``/i18n`` serves it.
"""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import pytest

from host import PACK_NAME

REPO_ROOT = Path(__file__).resolve().parent.parent
DOCS = REPO_ROOT / "web" / "docs"
ZH_NODE_DEFS = REPO_ROOT / "locales" / "zh" / "nodeDefs.json"
PACK_MODULE = f"custom_nodes.{PACK_NAME}"
MAIN_NODES = ("QIP_DiffusionModelLoader", "QIP_TextEncoderLoader", "QIP_VAELoader", "QIP_LoraLoader", "QIP_TextEncode",
              "QIP_EditEncode", "QIP_EmptyLatent", "QIP_Scheduler", "QIP_21DiffusionModelLoader", "QIP_21Encode")


def _inputs(node: dict) -> list[str]:
    return [name for section in ("required", "optional") for name in node["input"].get(section, {})]


def _fetch(host, path: str) -> tuple[int, bytes]:
    with urllib.request.urlopen(host.url + path, timeout=30) as response:
        return response.status, response.read()


@pytest.fixture(scope="module")
def ours(host) -> dict:
    nodes = {node_id: node for node_id, node in host.object_info().items()
             if node.get("python_module") == PACK_MODULE}
    assert nodes, "the host registered no node of this pack"
    return nodes


def test_every_node_has_a_help_page_naming_its_inputs(ours):
    missing = [node_id for node_id in ours if not (DOCS / f"{node_id}.md").is_file()]
    assert not missing, f"nodes without web/docs/<id>.md: {missing}"
    for node_id, node in ours.items():
        text = (DOCS / f"{node_id}.md").read_text(encoding="utf-8")
        assert text.startswith("# ") and len(text.splitlines()) >= 10, f"{node_id}.md is empty or a stub"
        assert f"`{node_id}`" in text
        unnamed = [name for name in _inputs(node) if f"`{name}`" not in text]
        assert not unnamed, f"{node_id}.md does not describe inputs {unnamed}"


def test_help_pages_are_for_real_nodes_only(ours):
    pages = {path.stem for path in DOCS.glob("*.md")}
    assert pages <= set(ours), f"help pages for unknown node ids: {sorted(pages - set(ours))}"
    localized = {path.parent.name for path in DOCS.glob("*/zh.md")}
    assert localized <= set(ours), f"zh pages for unknown node ids: {sorted(localized - set(ours))}"
    assert set(MAIN_NODES) <= localized, f"main nodes without a zh page: {sorted(set(MAIN_NODES) - localized)}"
    for node_id in localized:
        text = (DOCS / node_id / "zh.md").read_text(encoding="utf-8")
        unnamed = [name for name in _inputs(ours[node_id]) if f"`{name}`" not in text]
        assert not unnamed, f"{node_id}/zh.md does not describe inputs {unnamed}"


def test_the_zh_locale_covers_exactly_the_registered_nodes(ours):
    defs = json.loads(ZH_NODE_DEFS.read_text(encoding="utf-8"))
    assert set(defs) == set(ours), f"unknown: {sorted(set(defs) - set(ours))}; missing: {sorted(set(ours) - set(defs))}"
    for node_id, entry in defs.items():
        node = ours[node_id]
        assert entry["display_name"].strip() and entry["description"].strip(), node_id
        assert set(entry["inputs"]) == set(_inputs(node)), (node_id, set(entry["inputs"]) ^ set(_inputs(node)))
        for name, text in entry["inputs"].items():
            assert text["name"].strip() and text["tooltip"].strip(), f"{node_id}.{name}"
        assert sorted(entry["outputs"], key=int) == [str(i) for i in range(len(node["output"]))], node_id
        assert all(out["name"].strip() for out in entry["outputs"].values()), node_id


def test_the_host_serves_help_pages_and_the_locale(host, ours):
    for node_id in ours:
        status, body = _fetch(host, f"/extensions/{PACK_NAME}/docs/{node_id}.md")
        assert status == 200 and body == (DOCS / f"{node_id}.md").read_bytes(), node_id
    status, body = _fetch(host, f"/extensions/{PACK_NAME}/docs/QIP_EditEncode/zh.md")
    assert status == 200 and body == (DOCS / "QIP_EditEncode" / "zh.md").read_bytes()
    translations = host.get("/i18n")
    served = translations.get("zh", {}).get("nodeDefs", {})
    assert set(ours) <= set(served), "the host's /i18n does not serve the pack's zh nodeDefs"
