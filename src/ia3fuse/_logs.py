"""Dependencies' log noise, quieted while a command runs (no torch import: ``--help`` stays fast)."""

from __future__ import annotations

import logging

__all__ = ["quiet_dependencies", "restore_levels"]


# Loggers of dependencies that print import-time noise a command's user can do nothing about:
# bitsandbytes' advice to install `kernels`; torchao's "Failed to load <CUDA-only .so>" (transformers
# imports torchao whenever it is installed); torch's pytree deprecation notes that torchao triggers.
_NOISY = ("bitsandbytes.backends.cpu.ops", "torchao", "torch.utils._pytree")


def quiet_dependencies() -> dict[str, int]:
    """Raise those loggers to ERROR; returns their previous levels (for `restore_levels`)."""
    before = {name: logging.getLogger(name).level for name in _NOISY}
    for name in _NOISY:
        logging.getLogger(name).setLevel(logging.ERROR)
    return before


def restore_levels(levels: dict[str, int]) -> None:
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)
