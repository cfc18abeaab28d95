"""Graph -> graph rewrites and the pass manager.

Each module holds one pass (its file name is the pass name with ``_`` for ``-``); importing
the package registers them all. See ``passes.manager`` for the pass contract.
"""

from __future__ import annotations

import importlib
import pkgutil

from .manager import (  # noqa: F401
    DEFAULT_PIPELINES,
    PassError,
    PassManager,
    PassOptions,
    all_passes,
    default_pipeline,
    get_pass,
    parse_pipeline,
    register_pass,
)


def _import_pass_modules() -> None:
    skip = {"manager"}
    for info in pkgutil.iter_modules(__path__):
        if info.name not in skip and not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")


_import_pass_modules()
