"""Automatic-weight rows of the quality benchmark: weight search on a few validation examples,
and a learned router over the task adapters (a dynamic mixture).

Every run gets the same budget of forward passes and starts from uniform weights (1/K, the
"task_arithmetic" default row). Gradient search (task- and layer-wise, on the labeled loss and
on entropy alone) is compared with CMA-ES (task- and layer-wise, the loss); each found adapter
is scored on the test split like every other row, and each run's objective history is kept, so
the report can say how many forward passes Adam needed to reach CMA-ES's final objective.

The ``method="auto"`` runs (`AUTO_RUNS`) get the same data and budget; they hold a quarter of the
examples out of every choice, and their held-out accuracy is reported next to their test score.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Callable, Optional

from ia3fuse.adapter import IA3Adapter
from ia3fuse.errors import IA3FuseWarning
from ia3fuse.search.auto import AutoSearchResult

from .suite import Suite

__all__ = ["SEARCH_RUNS", "AUTO_RUNS", "run_search_rows", "run_router_rows", "passes_to_reach", "write_search_plot"]

# (optimizer, granularity, objective)
SEARCH_RUNS = (
    ("adam", "task", "loss"),
    ("adam", "layer", "loss"),
    ("adam", "layer", "entropy"),
    ("cma", "task", "loss"),
    ("cma", "layer", "loss"),
)


# method="auto" (method + parameter + scale + weights, held-out estimate) on the same data and
# budget: over every searchable method, and over task arithmetic alone (so its layer-wise
# weights, regularised towards the task-wise ones and stopped on validation, compare with the
# plain layer-wise rows above)
AUTO_RUNS = (
    ("search: auto (method + scale + weights)", None),
    ("search: adam, layer-wise regularised (task arithmetic, auto)", ["task_arithmetic"]),
)


def run_label(optimizer: str, granularity: str, objective: str) -> str:
    return f"search: {optimizer}, {granularity}-wise ({objective})"


def passes_to_reach(history: list[dict[str, float]], target: float) -> Optional[int]:
    """Forward passes after which the best objective so far is <= ``target`` (None: never)."""
    best = float("inf")
    for h in history:
        best = min(best, h["objective"])
        if best <= target + 1e-12:
            return int(h["forwards"])
    return None


def run_search_rows(
    suite: Suite,
    *,
    quick: bool,
    seed: int,
    progress: bool,
    score: Callable[[IA3Adapter], dict[str, float]],
    log: Callable[[str], None] = print,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Run every search in `SEARCH_RUNS` on ``suite`` and score each found adapter with ``score``.

    Returns:
        (rows for the quality table, a summary: budget, examples, per-run objectives and
        histories, and the passes Adam needed to reach CMA-ES's best final loss).
    """
    from ia3fuse.search import search_weights

    per_task = 4 if quick else 16
    evaluations = 12 if quick else 200
    batches, objectives = suite.search_problem("val", per_task, seed)
    budget = evaluations * len(batches)
    adapters = {t: suite.adapter_dir(t) for t in suite.tasks}
    rows, runs = [], {}
    for optimizer, granularity, objective in SEARCH_RUNS:
        label = run_label(optimizer, granularity, objective)
        # the entropy run's collapse check reads the suite's own answers (its objective is the suite's)
        predict = suite.search_predictions if objective == "entropy" else None
        with warnings.catch_warnings(record=True):
            warnings.simplefilter("always", IA3FuseWarning)
            result = search_weights(
                suite.base_model(),
                adapters,
                batches,
                objective=objectives[objective],
                granularity=granularity,
                optimizer=optimizer,
                budget=budget,
                seed=seed,
                progress=progress,
                name=label,
                predict=predict,
            )
        accuracy = score(result.adapter)
        runs[label] = {
            "forwards": result.forwards,
            "initial_objective": result.initial_objective,
            "final_objective": result.final_objective,
            "objective": objective,
            "weights": result.weights.tolist(),
            "groups": result.groups,
            "history": result.history,
            "notes": list(result.notes),
            "collapse_checked": predict is not None,
        }
        rows.append(
            {
                "name": label,
                "group": "automatic weights",
                "params": {"forwards": result.forwards, f"final {objective}": round(result.final_objective, 4)},
                "accuracy": accuracy,
            }
        )
        log(f"{suite.name}: {label}: {objective} {result.initial_objective:.4f} -> {result.final_objective:.4f}")
    for label, methods in AUTO_RUNS:
        if quick:  # a smoke run: two methods, and the budget auto needs for them (the quick budget is smaller)
            methods = methods or ["task_arithmetic", "ties"]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", IA3FuseWarning)
            result = search_weights(
                suite.base_model(),
                adapters,
                batches,
                objective=objectives["loss"],
                metric=suite.search_accuracy,
                method="auto",
                methods=methods,
                granularity="layer",
                budget=None if quick else budget,
                seed=seed,
                progress=progress,
                name=label,
            )
        assert isinstance(result, AutoSearchResult)
        accuracy = score(result.adapter)
        test_average = sum(accuracy.values()) / len(accuracy)
        estimate = result.heldout["metric"]
        runs[label] = {
            "forwards": result.forwards,
            "budget": result.budget,
            "initial_objective": result.initial_objective,
            "final_objective": result.final_objective,
            "objective": "loss (held-out)",
            "weights": result.weights.tolist(),
            "groups": result.groups,
            "history": result.history,
            "chosen": result.chosen,
            "granularity": result.granularity,
            "heldout": result.heldout,
            "split": result.split,
            "layer_note": result.layer_note,
            "notes": [str(w.message) for w in caught if issubclass(w.category, IA3FuseWarning)],
            "candidates": result.candidates,
            "test_average": test_average,
        }
        rows.append(
            {
                "name": label,
                "group": "automatic weights",
                "params": {
                    "chosen": f"{result.method} {result.granularity}-wise",
                    "scale": round(result.chosen["scale"], 3),
                    "held-out estimate": f"{100 * estimate:.1f}% (test {100 * test_average:.1f}%)",
                },
                "accuracy": accuracy,
            }
        )
        log(
            f"{suite.name}: {label}: chose {result.method} ({result.granularity}-wise, scale {result.chosen['scale']:.3g}); "
            f"held-out accuracy {100 * estimate:.1f}%, test {100 * test_average:.1f}%"
        )
    cma_best = min(
        r["final_objective"]
        for label, r in runs.items()
        if label.startswith("search: cma") and r["objective"] == "loss"
    )
    cma_forwards = max(r["forwards"] for label, r in runs.items() if label.startswith("search: cma"))
    adam_layer = runs[run_label("adam", "layer", "loss")]
    summary = {
        "split": "val",
        "per_task": per_task,
        "batches": len(batches),
        "budget": budget,
        "runs": runs,
        "cma_best_final_loss": cma_best,
        "cma_forwards": cma_forwards,
        "adam_layer_passes_to_cma_best": passes_to_reach(adam_layer["history"], cma_best),
    }
    return rows, summary


def write_search_plot(summary: dict[str, Any], path: Path, suite: str) -> Optional[Path]:
    """Best loss so far against forward passes, one line per loss-objective run."""
    from ia3fuse.errors import IA3FuseError
    from ia3fuse.search.plots import plot_objective

    histories = {label: r["history"] for label, r in summary["runs"].items() if r["objective"] == "loss"}
    try:
        return plot_objective(histories, path, f"{suite} suite loss")
    except IA3FuseError:  # matplotlib missing: the JSON is the record
        return None


def run_router_rows(
    suite: Suite,
    *,
    quick: bool,
    seed: int,
    progress: bool,
    score: Callable[[Any], dict[str, float]],
    log: Callable[[str], None] = print,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Train a sequence-level router over the task adapters on the suite's training loss and
    score the routed mixture on every task (the router picks each test input's weights).

    Returns:
        (one row for the quality table, a summary: examples, epochs, loss per epoch, and the
        mean routed weight of each adapter on each task's test inputs when measurable).
    """
    from ia3fuse.mixture import Mixture, train_router

    per_task = 8 if quick else 32
    epochs = 2 if quick else 6
    batches, objectives = suite.search_problem("train", per_task, seed)
    mixture = Mixture(suite.base_model(), {t: suite.adapter_dir(t) for t in suite.tasks})
    try:
        mixture.add_router(level="sequence")
        losses = train_router(
            mixture, batches, epochs=epochs, lr=2e-2, seed=seed, objective=objectives["loss"], progress=progress
        )
        accuracy = score(mixture)
    finally:
        mixture.close()
    label = "router: sequence-level, trained"
    log(f"{suite.name}: {label}: training loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    row = {
        "name": label,
        "group": "dynamic mixture",
        "accuracy": accuracy,
        "params": {"train examples": per_task * len(suite.tasks), "epochs": epochs},
    }
    return [row], {"per_task": per_task, "epochs": epochs, "losses": losses}
