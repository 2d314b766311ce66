"""Lazy registration of backends whose libraries are optional (bitsandbytes, ...)."""

from __future__ import annotations

import importlib.util
import logging

_loaded = False


def load() -> None:
    """Import each optional backend module once, if its library is installed."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    if importlib.util.find_spec("bitsandbytes") is not None:
        quiet_bitsandbytes()
        from . import bnb  # noqa: F401  (registers the bitsandbytes backends)


def quiet_bitsandbytes() -> None:
    """Silence bitsandbytes' import-time advice to install `kernels` (which would fetch code from
    a hub at run time: ia3fuse never does that); its CPU kernels work without it."""
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
