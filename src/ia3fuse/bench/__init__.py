"""Benchmarks: multi-task fusion quality suites and their runner (speed lives in benchmarks/)."""

from __future__ import annotations

import importlib
from typing import Any

from ..errors import IA3FuseError

__all__ = ["SUITES", "get_suite"]

# suite name -> "module:class", imported only when asked for (the suites need the bench extra)
SUITES = {"encoder": "ia3fuse.bench.encoder:EncoderSuite", "causal": "ia3fuse.bench.causal:CausalSuite"}


def get_suite(name: str) -> Any:
    """A new instance of the quality suite ``name``."""
    if name not in SUITES:
        raise IA3FuseError(f"unknown benchmark suite {name!r}; valid suites are: {', '.join(SUITES)}")
    module, cls = SUITES[name].split(":")
    try:
        return getattr(importlib.import_module(module), cls)()
    except ImportError as exc:
        if (exc.name or "").startswith("ia3fuse"):
            raise
        raise IA3FuseError(
            f"the {name!r} suite needs packages that are not installed ({exc}); "
            'install them with: pip install "ia3fuse[bench]"'
        ) from None
