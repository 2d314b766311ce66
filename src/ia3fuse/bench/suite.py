"""What a quality suite provides to the benchmark runner.

A suite owns a base model, a few tasks with fixed train / validation / test splits, one IA3
adapter per task and one trained on all tasks together (trained with PEFT, cached on disk),
and a scorer. The runner (`ia3fuse.bench.quality`) fuses the task adapters with every method
and asks the suite to score each fused model on every task; it never looks inside a task.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from torch import nn

__all__ = ["Suite", "SUITE_SPLITS"]

SUITE_SPLITS = ("train", "val", "test")


class Suite(Protocol):
    """A multi-task quality suite."""

    name: str  # "encoder" or "causal"
    tasks: list[str]  # task names, in report order

    def prepare(self, cache: Path, *, quick: bool, seed: int, progress: bool) -> None:
        """Build the data, the base model and the adapters, or load them from ``cache``.

        Training artefacts live under ``cache`` in a folder keyed by the suite's code version,
        ``seed`` and ``quick``, so a second call is fast and a code change retrains.
        """

    def base_model(self) -> nn.Module:
        """A fresh copy of the base model in eval mode (never one a previous row modified)."""

    def adapter_dir(self, task: str) -> Path:
        """The PEFT IA3 adapter directory trained on ``task`` alone."""

    def multitask_adapter_dir(self) -> Path:
        """The PEFT IA3 adapter directory trained on all tasks together (the upper bound)."""

    def evaluate(self, model: nn.Module, task: str, split: str) -> float:
        """Accuracy in [0, 1] of ``model`` (the base, or a PeftModel with one active adapter) on
        ``task``'s ``split`` ("val" or "test")."""

    def describe(self) -> dict[str, Any]:
        """Facts for the report: model, tasks with their split sizes and labels, training setup."""
