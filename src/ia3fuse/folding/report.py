"""What a fold did: one report type for every fold, and its file-output subclass.

`FoldReport` lists the changed weight modules of an in-memory fold (`ia3fuse.fold`);
`FileFoldReport` adds what a fold written to disk has (the output, how many of its tensors it
holds and changed); `CheckpointFoldReport` and `GGUFFoldReport` are its subclasses. Every entry
is a `FoldEntry`: the thing changed, its type, the path taken, what it carries, and the error.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from .._text import count, format_table
from .base import Snapshot

__all__ = ["FoldEntry", "FoldReport", "FileFoldReport"]


@dataclass
class FoldEntry:
    """One weight module changed by a fold."""

    module: str
    layer: str
    path: str  # "statistic", "dense", "requantize", each maybe "+ neighbour"
    carries: str  # which IA3 vectors, and how (rows / cols / neighbour)
    rel_error: Optional[float]  # ||W_folded - diag(r) W diag(c)|| / ||diag(r) W diag(c)||, float32
    reason: Optional[str] = None  # why a lossy path was taken
    _snapshot: Optional[Snapshot] = field(default=None, repr=False)

    @property
    def exact(self) -> bool:
        return self.reason is None


@dataclass
class FoldReport:
    """What a fold did, module by module."""

    entries: list[FoldEntry]
    model_type: str
    # Trained non-IA3 tensors (modules_to_save, e.g. a classifier head) copied into the model.
    trained: list[str] = field(default_factory=list)
    _trained_originals: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict, repr=False)

    @property
    def exact(self) -> bool:
        """True when every module took an exact path."""
        return all(e.exact for e in self.entries)

    @property
    def max_error(self) -> Optional[float]:
        errs = [e.rel_error for e in self.entries if e.rel_error is not None]
        return max(errs) if errs else None

    def table(self, max_width: Optional[int] = 100) -> str:
        """A markdown table: module, layer type, path, what it carries, relative error, why lossy.

        Args:
            max_width: the widest line. The layer, path and carries cells wrap onto continuation
                rows to fit (module names and errors never wrap), and the reasons of lossy modules
                follow the table, one paragraph per distinct reason. None: one line per module
                with a "lossy because" column, for a markdown file.
        """
        headers = ["module", "layer", "path", "carries", "rel. error"]
        rows = [
            [e.module, e.layer, e.path, e.carries, "-" if e.rel_error is None else f"{e.rel_error:.2e}"]
            for e in self.entries
        ]
        if max_width is None:
            return format_table([*headers, "lossy because"], [[*r, e.reason or ""] for r, e in zip(rows, self.entries)])
        table = format_table(headers, rows, max_width=max_width, wrap=(1, 2, 3))
        reasons: dict[str, list[str]] = {}
        for e in self.entries:
            if e.reason is not None:
                reasons.setdefault(e.reason, []).append(e.module)
        notes = []
        for reason, modules in reasons.items():
            who = modules[0] if len(modules) == 1 else f"{modules[0]} and {len(modules) - 1} more"
            notes += textwrap.wrap(f"- {who}: {reason}", max_width, subsequent_indent="  ", break_on_hyphens=False)
        return table + ("\n\nlossy because:\n" + "\n".join(notes) if notes else "")

    def breakdown(self) -> str:
        """One line: how many modules took each path, exact and lossy apart, and the largest measured error."""
        parts = []
        for kind, exact in (("exact", True), ("lossy", False)):
            paths: dict[str, int] = {}
            for e in self.entries:
                if e.exact == exact:
                    paths[e.path] = paths.get(e.path, 0) + 1
            if paths:
                parts.append(f"{kind}: " + ", ".join(f"{n} {p}" for p, n in paths.items()))
        errors = [e.rel_error for e in self.entries if e.rel_error is not None]
        parts.append(f"max rel. error {max(errors):.2e} ({len(errors)} measured)" if errors else "error not measured")
        return "; ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model_type": self.model_type,
            "exact": self.exact,
            "entries": [
                {k: getattr(e, k) for k in ("module", "layer", "path", "carries", "rel_error", "reason")}
                for e in self.entries
            ],
        }


@dataclass
class FileFoldReport(FoldReport):
    """A fold written to a file or a folder: where, and how much of it changed.

    Each entry's ``module`` is the name of a changed tensor in the output.
    """

    output: Optional[Path] = None
    tensors: int = 0  # tensors in the output
    modules: int = 0  # IA3 modules of the adapter folded
    notes: list[str] = field(default_factory=list)  # warnings raised during the fold

    @property
    def changed(self) -> int:
        """How many tensors the fold changed."""
        return len(self.entries)

    def summary(self) -> str:
        """One line: where, and what changed."""
        exact = sum(1 for e in self.entries if e.exact)
        return (
            f"wrote {self.output}: folded {count(self.modules, 'IA3 module')} into {self.changed} of {self.tensors} "
            f"tensors ({self.model_type}), {exact} exact, {self.changed - exact} requantized"
        )

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out.update(output=str(self.output), tensors=self.tensors, modules=self.modules, notes=list(self.notes))
        return out
