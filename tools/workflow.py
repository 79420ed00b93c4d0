"""Turn a ComfyUI UI workflow (what users drag onto the canvas) into an API prompt the server runs.

The UI format stores widget values positionally (``widgets_values``) and connections as a link table; the API
format wants ``{node_id: {"class_type": ..., "inputs": {name: value or [from_id, slot]}}}``.  The positional order
comes from the host's ``/object_info`` (required inputs, then optional, in declaration order), the same rule the
ComfyUI frontend uses, including the extra hidden values the frontend stores after a seed ("control after
generate") and after an image-upload combo.
"""

from __future__ import annotations

from typing import Any

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
# Nodes that exist only in the frontend: they carry no computation.
FRONTEND_ONLY = {"Note", "MarkdownNote", "Reroute"}


class WorkflowError(ValueError):
    """The UI workflow cannot be converted (unknown node, unsupported construct)."""


def _is_widget(spec: list) -> bool:
    kind = spec[0]
    options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if options.get("forceInput"):
        return False
    return isinstance(kind, list) or kind in WIDGET_TYPES


def _extra_values_after(name: str, spec: list) -> int:
    """How many hidden frontend values follow this widget's own value in widgets_values."""
    options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if spec[0] == "INT" and (options.get("control_after_generate") or name in ("seed", "noise_seed")):
        return 1
    if options.get("image_upload"):
        return 1
    return 0


def ui_to_api(workflow: dict, object_info: dict) -> dict[str, dict[str, Any]]:
    """Convert a UI workflow dict into an API prompt, using the running host's object_info."""
    nodes = {node["id"]: node for node in workflow["nodes"]}
    links = {link[0]: link for link in workflow.get("links", [])}  # [id, from_node, from_slot, to_node, to_slot, type]

    def source(link_id: int) -> list:
        _, from_node, from_slot, _, _, _ = links[link_id]
        upstream = nodes[from_node]
        if upstream["type"] == "Reroute":  # follow a reroute back to the real output
            return source(upstream["inputs"][0]["link"])
        return [str(from_node), from_slot]

    prompt: dict[str, dict[str, Any]] = {}
    for node in workflow["nodes"]:
        kind = node["type"]
        if kind in FRONTEND_ONLY:
            continue
        if node.get("mode", 0) == 2:  # muted: not executed
            continue
        if node.get("mode", 0) == 4:
            raise WorkflowError(f"node {node['id']} ({kind}) is bypassed; bypass is not supported by this converter")
        if kind not in object_info:
            raise WorkflowError(f"node {node['id']} has type {kind}, which the host does not know (missing pack?)")
        spec = object_info[kind]["input"]
        declared = list(spec.get("required", {}).items()) + list(spec.get("optional", {}).items())
        values = node.get("widgets_values", [])
        inputs: dict[str, Any] = {}
        if isinstance(values, dict):
            inputs.update({name: values[name] for name, s in declared if _is_widget(s) and name in values})
        else:
            position = 0
            for name, s in declared:
                if not _is_widget(s):
                    continue
                if position < len(values):
                    inputs[name] = values[position]
                position += 1 + _extra_values_after(name, s)
        for slot in node.get("inputs", []):
            if slot.get("link") is not None:
                inputs[slot["name"]] = source(slot["link"])
        prompt[str(node["id"])] = {"class_type": kind, "inputs": inputs}
    return prompt
