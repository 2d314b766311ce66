"""What a quality suite provides to the benchmark runner.

A suite owns a base model, a few tasks with fixed train / validation / test splits, one IA3
adapter per task and one trained on all tasks together (trained with PEFT, cached on disk),
and a scorer. The runner (`benchmarks.quality.runner`) fuses the task adapters with every method
and asks the suite to score each fused model on every task; it never looks inside a task.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence, Sized
from itertools import pairwise
from pathlib import Path
from typing import Any, Protocol, TypeVar

import torch
from torch import Tensor, nn

from ia3fuse.errors import DataError, IA3FuseError

__all__ = [
    "SEARCH_BATCH",
    "SUITE_SPLITS",
    "SearchObjective",
    "Suite",
    "check_search_pick",
    "even_batches",
    "mean_entropy",
]

SUITE_SPLITS = ("train", "val", "test")

# What `ia3fuse.search.search_weights` calls per ready batch: ``objective(model, inputs)`` -> a
# scalar (lower is better), differentiable with respect to the model's activations.
SearchObjective = Callable[[nn.Module, dict[str, Any]], Tensor]

# Most examples in one search batch; a task with more is split into near-equal batches, so every
# example weighs about the same in the search's mean over batches.
SEARCH_BATCH = 32

_T = TypeVar("_T")


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

    def search_problem(
        self, split: str, per_task: int, seed: int
    ) -> tuple[list[dict[str, Any]], dict[str, SearchObjective]]:
        """Few-shot data for a weight search: ``per_task`` examples of every task from ``split``
        (a deterministic pick from ``seed``), as ready batches, and the objectives by name:
        ``"loss"`` (mean training loss on the labeled examples, the loss the suite's adapters were
        trained with) and ``"entropy"`` (mean prediction entropy, labels unused, as AdaMerging).

        Each batch holds the examples of one task; the objectives take the suite's base model
        (as `ia3fuse.search.search_weights` hooks it) or a PeftModel around it.
        """

    def search_predictions(self, model: nn.Module, inputs: dict[str, Any]) -> list[Any]:
        """One answer per example of a `search_problem` batch (a label index, a decoded string):
        what the entropy search's collapse check compares before and after."""

    def search_accuracy(self, model: nn.Module, inputs: dict[str, Any]) -> float:
        """Accuracy in [0, 1] on one `search_problem` batch, scored as the test split is (the
        held-out metric of ``method="auto"``; not differentiable)."""


# ---------------------------------------------------------------------------------------------
# Helpers the suites share for `Suite.search_problem`
# ---------------------------------------------------------------------------------------------


def check_search_pick(split: str, per_task: Any, splits: Mapping[str, Mapping[str, Sized]]) -> None:
    """Refuse a split or a ``per_task`` that `Suite.search_problem` cannot serve.

    Args:
        split: the split asked for.
        per_task: examples asked for per task.
        splits: task -> split name -> that split's examples.

    Raises:
        IA3FuseError: unknown split. DataError: ``per_task`` not a positive integer, or more
            than a task's split holds.
    """
    if split not in SUITE_SPLITS:
        raise IA3FuseError(f"unknown split {split!r}; valid splits are: {', '.join(SUITE_SPLITS)}")
    if isinstance(per_task, bool) or not isinstance(per_task, int) or per_task < 1:
        raise DataError(f"per_task={per_task!r}; pass the number of examples per task, an integer >= 1")
    for task, by_split in splits.items():
        n = len(by_split[split])
        if per_task > n:
            raise DataError(
                f"per_task={per_task} but task {task!r} has only {n} {split!r} examples; pass per_task <= {n}"
            )


def even_batches(items: Sequence[_T], size: int = SEARCH_BATCH) -> list[list[_T]]:
    """``items`` cut, in order, into the fewest batches of at most ``size``, as equal as possible.

    Example:
        >>> [len(b) for b in even_batches(list(range(40)), 32)]
        [20, 20]
    """
    count = max(1, math.ceil(len(items) / size))
    bounds = [round(i * len(items) / count) for i in range(count + 1)]
    return [list(items[a:b]) for a, b in pairwise(bounds)]


def mean_entropy(logits: Tensor) -> Tensor:
    """Mean entropy (nats) of the softmax of ``logits`` over the last dimension, computed in float32."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1).mean()
