"""Fail-soft gathering of node mappings from feature modules (standard library only, so it is testable alone)."""

from __future__ import annotations

import importlib
import logging
import traceback

logger = logging.getLogger("qwen_image")


def load_feature_modules(names: tuple[str, ...], package: str) -> tuple[dict, dict, dict[str, str]]:
    """Import ``package.<name>`` for each name; return merged class and display-name mappings and the failures.

    A module that raises while importing is logged with its traceback and skipped; the others still load.
    """
    classes: dict = {}
    display: dict = {}
    failures: dict[str, str] = {}
    for name in names:
        try:
            module = importlib.import_module(f".{name}", package)
        except Exception as e:  # noqa: BLE001 - any failure of an optional feature must not stop the pack
            failures[name] = f"{type(e).__name__}: {e}"
            logger.error("Qwen-Image pack: could not load feature module '%s' (its nodes are unavailable): %s\n%s",
                         name, failures[name], traceback.format_exc())
            continue
        for node_id, cls in module.NODE_CLASS_MAPPINGS.items():
            if node_id in classes:
                raise RuntimeError(f"Qwen-Image pack: node id {node_id} is defined twice")
            classes[node_id] = cls
        display.update(module.NODE_DISPLAY_NAME_MAPPINGS)
    logger.info("Qwen-Image pack: %d nodes from %d feature modules%s", len(classes), len(names) - len(failures),
                f" ({len(failures)} failed: {', '.join(failures)})" if failures else "")
    return classes, display, failures
