"""Shared pytest set-up: markers, and the ONNX conformance summary line."""

from __future__ import annotations

import numpy as np
import pytest

CONFORMANCE: dict[str, str] = {}  # case name -> "passed" | "failed" | "excluded: reason"


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long-running; opt-in with -m slow")
    config.addinivalue_line("markers", "cuda: needs a CUDA device or the simulator")


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
