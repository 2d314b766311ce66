"""ia3fuse: fuse IA3 ((IA)^3) adapters trained with Hugging Face PEFT.

Example:
    >>> import ia3fuse
    >>> "ties" in [m.name for m in ia3fuse.methods()]
    True

The public names load on first use, so ``import ia3fuse`` and ``ia3fuse --help`` do not import
torch, transformers or PEFT.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

from ._version import __version__ as __version__
from .errors import (
    AdapterFormatError,
    DataError,
    FoldError,
    IA3FuseError,
    IA3FuseWarning,
    IncompatibleAdaptersError,
    InvalidParameterError,
    InvalidWeightsError,
    MethodInputError,
    MissingDependencyError,
    OutputPathError,
    RecipeError,
    UnknownMethodError,
)

if TYPE_CHECKING:
    from .adapter import IA3Adapter, load_adapter
    from .folding import (
        CheckpointFoldReport,
        FileFoldReport,
        FoldEntry,
        FoldReport,
        GGUFFoldReport,
        fold,
        fold_checkpoint,
        fold_gguf,
        unfold,
    )
    from .fusion import get_method, methods
    from .live import adapter_from_peft, add_weighted_adapter
    from .merging import merge, run_recipe
    from .recipe import Recipe, load_recipe
    from .mixture import Mixture
    from .router import Router, train_router
    from .search import SearchResult, search_weights
    from .weights import WeightSchedule

# Where each lazily loaded public name lives (the imports above, for type checkers).
_LAZY = {
    ".adapter": ("IA3Adapter", "load_adapter"),
    ".folding": (
        "FoldReport",
        "FoldEntry",
        "FileFoldReport",
        "CheckpointFoldReport",
        "fold",
        "unfold",
        "fold_checkpoint",
        "GGUFFoldReport",
        "fold_gguf",
    ),
    ".merging": ("merge", "run_recipe"),
    ".recipe": ("Recipe", "load_recipe"),
    ".fusion": ("get_method", "methods"),
    ".mixture": ("Mixture",),
    ".router": ("Router", "train_router"),
    ".live": ("adapter_from_peft", "add_weighted_adapter"),
    ".search": ("SearchResult", "search_weights"),
    ".weights": ("WeightSchedule",),
}
_HOME = {name: module for module, names in _LAZY.items() for name in names}


__all__ = [
    "IA3Adapter",
    "load_adapter",
    "merge",
    "Recipe",
    "load_recipe",
    "run_recipe",
    "methods",
    "get_method",
    "add_weighted_adapter",
    "adapter_from_peft",
    "WeightSchedule",
    "search_weights",
    "Mixture",
    "Router",
    "train_router",
    "SearchResult",
    "fold",
    "unfold",
    "fold_checkpoint",
    "fold_gguf",
    "GGUFFoldReport",
    "CheckpointFoldReport",
    "FileFoldReport",
    "FoldEntry",
    "FoldReport",
    "FoldError",
    "DataError",
    "IA3FuseWarning",
    "IA3FuseError",
    "AdapterFormatError",
    "IncompatibleAdaptersError",
    "InvalidParameterError",
    "InvalidWeightsError",
    "MethodInputError",
    "MissingDependencyError",
    "OutputPathError",
    "RecipeError",
    "UnknownMethodError",
]


def __getattr__(name: str) -> Any:
    if name in _HOME:
        value = getattr(importlib.import_module(_HOME[name], __name__), name)
        globals()[name] = value
        return value
    if not name.startswith("__") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        return importlib.import_module(f".{name}", __name__)  # a subpackage, e.g. ia3fuse.search
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
