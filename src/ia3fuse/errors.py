"""Exception types raised by ia3fuse.

Every message names what was wrong, the offending value and the fix. The CLI turns any
`IA3FuseError` into a one-line message and exit status 2. Every one is also a ``ValueError``.
"""

from __future__ import annotations

from typing import Optional

__all__ = [
    "IA3FuseWarning",
    "IA3FuseError",
    "AdapterFormatError",
    "IncompatibleAdaptersError",
    "InvalidWeightsError",
    "UnknownMethodError",
    "InvalidParameterError",
    "MethodInputError",
    "OutputPathError",
    "RecipeError",
    "FoldError",
    "DataError",
    "MissingDependencyError",
]


class IA3FuseError(ValueError):
    """Base class of every error ia3fuse raises on bad input.

    A ``ValueError``, as the errors PEFT raises for the same mistakes (unknown adapter, bad
    weights...), so ``except ValueError`` code written for PEFT keeps working.
    """


class AdapterFormatError(IA3FuseError):
    """An adapter directory or file is not a readable PEFT IA3 adapter."""


class IncompatibleAdaptersError(IA3FuseError):
    """Adapters cannot be fused together (shapes, feed-forward flags, bases)."""


class InvalidWeightsError(IA3FuseError):
    """Fusion weights do not fit the adapters (count, names, NaN/Inf, schedule form)."""


class UnknownMethodError(IA3FuseError):
    """A fusion method name is not registered."""


class InvalidParameterError(IA3FuseError):
    """A fusion method parameter is unknown or out of range."""


class MethodInputError(IA3FuseError):
    """A fusion method cannot handle the vectors it was given (e.g. geometric with l <= 0)."""

    adapter_index: Optional[int] = None  # the offending adapter's position, where the method knows it


class OutputPathError(IA3FuseError):
    """An output path exists, is an input, or cannot be written."""


class RecipeError(IA3FuseError):
    """A YAML recipe is malformed."""


class FoldError(IA3FuseError):
    """An adapter cannot be folded into a model as asked (absent modules, lossy under exact="require")."""


class DataError(IA3FuseError):
    """Examples for a weight search or a router are empty, malformed or do not fit the model."""


class IA3FuseWarning(UserWarning):
    """A suspicious but legal input (e.g. adapters trained on different bases) or a lossy step."""


class MissingDependencyError(IA3FuseError, ImportError):
    """An optional package a feature needs is not installed; the message names the pip extra.

    Both an `IA3FuseError` (the CLI prints it as one line) and an ``ImportError``.
    """

    def __init__(self, feature: str, package: str, extra: str) -> None:
        super().__init__(f"{feature} needs the {package} package; install it with pip install 'ia3fuse[{extra}]'")
        self.package, self.extra = package, extra
