#!/usr/bin/env python3
"""The test command: ``python3 tools/test.py [pytest arguments]``.

Builds the cached environment and host on first use (tools/env.py), then runs pytest on tests/ inside it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import env  # noqa: E402

if os.environ.get("QWEN_IMAGE_IN_ENV") != "1":  # once, before the re-exec: the tests themselves run offline
    try:
        env.browser()  # Chromium + playwright-core for tests/test_browser.py, installed on first use
    except env.BrowserUnavailable as error:  # those tests report it (a failure in CI, a skip elsewhere)
        env.log(f"browser tests unavailable: {error}")
env.reexec_in_env(Path(__file__))

import pytest  # noqa: E402  (available once inside the environment)

os.chdir(env.REPO_ROOT)
sys.exit(pytest.main(["-ra", "-p", "no:cacheprovider", *(sys.argv[1:] or ["tests"])]))
