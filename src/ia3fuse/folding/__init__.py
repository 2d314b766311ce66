"""Fold IA3 vectors into base weights: in memory (`model`), on a safetensors checkpoint on disk
(`checkpoint`), or into a llama.cpp GGUF file (`gguf`); backends per weight format (`dense`,
`bnb`) behind one interface (`base`), one planner (`plan`) and one report type (`report`)."""

from typing import Any

from .model import backends, fold, unfold
from .report import FileFoldReport, FoldEntry, FoldReport

__all__ = [
    "fold",
    "unfold",
    "FoldReport",
    "FoldEntry",
    "FileFoldReport",
    "backends",
    "fold_checkpoint",
    "CheckpointFoldReport",
    "fold_gguf",
    "GGUFFoldReport",
]


def __getattr__(name: str) -> Any:  # the on-disk folds import their I/O only when used
    if name in ("fold_checkpoint", "CheckpointFoldReport"):
        from . import checkpoint

        return getattr(checkpoint, name)
    if name in ("fold_gguf", "GGUFFoldReport"):
        from . import gguf

        return getattr(gguf, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
