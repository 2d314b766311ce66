"""Lazy registration of backends whose libraries are optional (bitsandbytes, ...)."""

from __future__ import annotations

import importlib.util

_loaded = False


def load() -> None:
    """Import each optional backend module once, if its library is installed."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    if importlib.util.find_spec("bitsandbytes") is not None:
        from . import bnb  # noqa: F401  (registers the bitsandbytes backends)
