"""Process-wide settings that ia3fuse changes only for the duration of a block, then restores."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

__all__ = ["torch_threads", "no_hf_progress_bars", "model_device"]


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run with ``n`` intra-op threads, then restore the caller's setting.

    ia3fuse's per-module math and its tiny benchmark models gain nothing from torch's thread
    pool and lose a lot when another process holds a core (measured on 2 cores: merging 8
    TinyLlama-sized adapters 0.02 s -> 0.5 s; the quick encoder suite 64 s -> 276 s).
    """
    before = torch.get_num_threads()
    if before != n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


@contextlib.contextmanager
def no_hf_progress_bars() -> Iterator[None]:
    """Hide transformers' "Loading weights" / "Writing model shards" bars, then restore them."""
    from transformers.utils import logging as tf_logging

    was_on = tf_logging.is_progress_bar_enabled()
    tf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            tf_logging.enable_progress_bar()


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a model without parameters)."""
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")
