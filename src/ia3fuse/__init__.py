"""ia3fuse: fuse IA3 ((IA)^3) adapters trained with Hugging Face PEFT.

Example:
    >>> import ia3fuse
    >>> "ties" in [m.name for m in ia3fuse.methods()]
    True
"""

from .adapter import IA3Adapter, load_adapter
from .errors import (
    AdapterFormatError,
    DataError,
    FoldError,
    IA3FuseError,
    IncompatibleAdaptersError,
    InvalidParameterError,
    InvalidWeightsError,
    MethodInputError,
    OutputPathError,
    RecipeError,
    UnknownMethodError,
)
from .fold import FoldReport, fold, unfold
from .fold.checkpoint import fold_checkpoint
from .fold.gguf import GGUFFoldReport, fold_gguf
from .merge import IA3FuseWarning, merge
from .methods import get_method, methods
from .peft import adapter_from_peft, add_weighted_adapter
from .mixture import Mixture, Router, train_router
from .search import SearchResult, search_weights
from .weights import WeightSchedule

__version__ = "0.1.0"

__all__ = [
    "IA3Adapter",
    "load_adapter",
    "merge",
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
    "OutputPathError",
    "RecipeError",
    "UnknownMethodError",
]
