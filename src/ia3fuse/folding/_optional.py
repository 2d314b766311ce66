"""Lazy registration of backends whose libraries are optional (bitsandbytes, torchao, HQQ)."""

from __future__ import annotations

import importlib.util
import logging

_loaded = False


def load() -> None:
    """Import each optional backend module once, if its library is installed.

    The torchao and HQQ backends import their library only when a layer holds one of its
    tensors or layers (each import costs seconds), so registering them costs nothing.
    """
    global _loaded
    if _loaded:
        return
    _loaded = True
    if importlib.util.find_spec("bitsandbytes") is not None:
        quiet_bitsandbytes()
        from . import bnb  # noqa: F401  (registers the bitsandbytes backends)
    if importlib.util.find_spec("torchao") is not None:
        from . import torchao  # noqa: F401  (registers the torchao backend)
    if importlib.util.find_spec("hqq") is not None:
        from . import hqq  # noqa: F401  (registers the HQQ backend)


def quiet_bitsandbytes() -> None:
    """Silence bitsandbytes' import-time advice to install `kernels` (which would fetch code from
    a hub at run time: ia3fuse never does that); its CPU kernels work without it."""
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
