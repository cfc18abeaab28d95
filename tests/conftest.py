"""Shared pytest set-up: markers, the ONNX conformance summary line, a private code cache."""

from __future__ import annotations

import os
import shutil
import tempfile

import numpy as np
import pytest

# the suite must never write into the user's ~/.cache/graphc: one temporary cache per session
_CACHE_DIR = tempfile.mkdtemp(prefix="graphc-test-cache-")
os.environ["GRAPHC_CACHE_DIR"] = _CACHE_DIR

CONFORMANCE: dict[str, str] = {}  # case name -> "passed" | "failed" | "excluded: reason"


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long-running; opt-in with -m slow")
    config.addinivalue_line("markers", "cuda: needs a CUDA device or the simulator")


def pytest_unconfigure(config):
    shutil.rmtree(_CACHE_DIR, ignore_errors=True)


def pytest_terminal_summary(terminalreporter):
    if not CONFORMANCE:
        return
    counts: dict[str, int] = {}
    for outcome in CONFORMANCE.values():
        key = outcome.split(":")[0]
        counts[key] = counts.get(key, 0) + 1
    terminalreporter.write_line(
        f"ONNX node conformance: {counts.get('passed', 0)} passed, "
        f"{counts.get('failed', 0)} failed, {counts.get('excluded', 0)} excluded "
        f"(of {len(CONFORMANCE)} cases of registered ops)")


@pytest.fixture
def rng():
    return np.random.default_rng(0)
