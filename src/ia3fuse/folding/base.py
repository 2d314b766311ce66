"""The small interface every weight format implements to take an IA3 fold.

A backend knows one kind of layer (dense nn.Linear/Conv1D/ConvNd, bitsandbytes 8-bit, 4-bit,
...). Fold plumbing (`ia3fuse.fold`) decides *what* to scale; a backend only knows *how*:

* ``scale_rows``: multiply output row ``i`` (and bias ``i``) by ``rows[i]``; exact when the
  format keeps a per-row (or per-block-inside-a-row) statistic.
* ``scale_cols``: multiply input column ``j`` by ``cols[j]``; backends that can do this exactly
  say so with ``exact_cols``.
* ``requantize``: the lossy fallback, dequantize -> scale -> quantize again.
* ``snapshot`` / ``restore``: what an exact undo needs (small statistics for quantized formats,
  the weight itself for dense ones).
* ``dequantize``: the effective float32 weight as ``(out, in)``, for error measurement.

Backends never decide policy and never walk the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Protocol

from torch import Tensor, nn

from ..errors import FoldError

__all__ = ["FoldBackend", "Snapshot", "register_backend", "backend_for", "backends", "check_options"]

# name of a module attribute (dotted, e.g. "weight.SCB" or "weight.quant_state.absmax") -> tensor
Snapshot = dict[str, Any]


class FoldBackend(Protocol):
    """How to fold a row/column scale into one kind of layer."""

    name: str

    def handles(self, module: nn.Module) -> bool:
        """True when this backend knows ``module``'s type."""

    def features(self, module: nn.Module) -> tuple[int, int]:
        """``(out_features, in_features)`` as IA3 sees them (channels for convolutions)."""

    def exact_rows(self, module: nn.Module) -> Optional[str]:
        """None when rows fold exactly into this module, else the reason they do not."""

    def exact_cols(self, module: nn.Module) -> Optional[str]:
        """None when columns fold exactly into this module, else the reason they do not."""

    def snapshot(self, module: nn.Module, *, weights: bool) -> Snapshot:
        """Copies of what ``scale_rows``/``scale_cols``/``requantize`` change (``weights``: the
        weight tensor too, which dense backends need and quantized ones usually do not)."""

    def restore(self, module: nn.Module, snap: Snapshot) -> None:
        """Put a snapshot back, bit for bit."""

    def scale_rows(self, module: nn.Module, rows: Tensor, *, options: "FoldOptions") -> str:
        """Fold an output-side scale exactly; returns the path label (e.g. ``"statistic"``)."""

    def scale_cols(self, module: nn.Module, cols: Tensor, *, options: "FoldOptions") -> str:
        """Fold an input-side scale exactly (only called when ``exact_cols`` is None)."""

    def requantize(
        self, module: nn.Module, rows: Optional[Tensor], cols: Optional[Tensor], *, options: "FoldOptions"
    ) -> str:
        """Lossy fallback: dequantize, scale, quantize again; returns ``"requantize"``."""

    def dequantize(self, module: nn.Module) -> Tensor:
        """The effective weight as float32 ``(out, in)`` (convolutions: ``(out, in * k...)``)."""


@dataclass(frozen=True)
class FoldOptions:
    """Policy knobs that some backends read."""

    double_quant: str = "unnest"  # "unnest": exact fp32 absmax; "renest": keep the nested layout


_CHOICES: dict[str, tuple[Any, ...]] = {
    "exact": ("auto", "require", "allow_requant"),
    "double_quant": ("unnest", "renest"),
    "measure_error": (True, False, "lossy"),
    "extras": ("keep", "drop"),
    "permute_qk": (None, True, False),
}
_WHAT = {"exact": "a policy", "double_quant": "a layout"}


def check_options(**options: Any) -> None:
    """The one check of the fold options every entry point runs first, before anything is read
    or changed: each value must be one of its choices, else a FoldError naming them."""
    for name, value in options.items():
        choices = _CHOICES[name]
        if not any(value is c if isinstance(c, bool) or c is None else value == c for c in choices):
            listed = ", ".join("None (by architecture)" if c is None else repr(c) for c in choices)
            listed = " or ".join(listed.rsplit(", ", 1))
            raise FoldError(f"{name}={value!r} is not {_WHAT.get(name, 'a choice')}; pass {listed}")


_BACKENDS: list[FoldBackend] = []


def register_backend(backend: FoldBackend) -> FoldBackend:
    """Add a backend; later registrations are tried first (specific formats before generic)."""
    _BACKENDS.insert(0, backend)
    return backend


def backends() -> list[FoldBackend]:
    """The registered backends, loading the optional ones whose libraries are installed."""
    from . import _optional

    _optional.load()
    return list(_BACKENDS)


def backend_for(module: nn.Module) -> Optional[FoldBackend]:
    """The backend that handles ``module``, or None."""
    for b in backends():
        if b.handles(module):
            return b
    return None
