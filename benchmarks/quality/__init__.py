"""The multi-task fusion quality suites, their runner and report writer (speed: the scripts in benchmarks/).

Run from a clone: ``python -m benchmarks.quality run [--quick]``, ``python -m benchmarks.quality report``.
"""

from __future__ import annotations

import importlib
from typing import Any

from ia3fuse.errors import IA3FuseError

__all__ = ["SUITES", "get_suite"]

# suite name -> "module:class", imported only when asked for (the suites need the dev extra)
SUITES = {"encoder": "benchmarks.quality.encoder:EncoderSuite", "causal": "benchmarks.quality.causal:CausalSuite"}


def get_suite(name: str) -> Any:
    """A new instance of the quality suite ``name``."""
    if name not in SUITES:
        raise IA3FuseError(f"unknown benchmark suite {name!r}; valid suites are: {', '.join(SUITES)}")
    module, cls = SUITES[name].split(":")
    try:
        return getattr(importlib.import_module(module), cls)()
    except ImportError as exc:
        if (exc.name or "").startswith(("ia3fuse", "benchmarks")):
            raise
        raise IA3FuseError(
            f"the {name!r} suite needs packages that are not installed ({exc}); "
            "install them from the repository root with: pip install -e '.[dev]'"
        ) from None
