"""Plots of a weight search: the weights as a heatmap, the objective against forward passes."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

__all__ = ["plot_weights", "plot_objective", "plot_candidates"]


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        from ..errors import MissingDependencyError

        raise MissingDependencyError("plots", "matplotlib", "search") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _finish(plt: Any, fig: Any, ax: Any, path: Path, xlabel: str, ylabel: str) -> Path:
    """Labels, grid and legend of a line or scatter plot; write it and close the figure."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_weights(result: Any, path: Path) -> Path:
    """Heatmap of ``result.weights``: adapters (rows) x groups of modules (columns)."""
    plt = _pyplot()
    w = result.weights.numpy()
    k, g = w.shape
    fig, ax = plt.subplots(figsize=(min(max(6.0, 2 + 0.55 * g), 18), 1.6 + 0.45 * k))
    bound = max(float(abs(w).max()), 1e-9)
    im = ax.imshow(w, cmap="RdBu_r", vmin=-bound, vmax=bound, aspect="auto")
    ax.set_yticks(range(k), result.names)
    labels = [lbl.rsplit(".", 1)[-1] if lbl != "all" else "all" for lbl in result.groups]
    ax.set_xticks(range(g), labels, rotation=90 if g > 12 else 0, fontsize=8)
    ax.set_xlabel("layer" if result.granularity != "task" else "")
    if k * g <= 120:
        for i in range(k):
            for j in range(g):
                dark = abs(w[i, j]) > 0.6 * bound
                ax.text(
                    j, i, f"{w[i, j]:.2f}", ha="center", va="center", fontsize=7, color="white" if dark else "black"
                )
    ax.set_title(
        f"searched weights of {result.adapter.name} ({result.granularity}-wise, {result.optimizer}, {result.method})",
        fontsize=10,
    )
    fig.colorbar(im, ax=ax, fraction=0.03)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_objective(
    histories: Mapping[str, Sequence[Mapping[str, float]]], path: Path, objective: str = "objective"
) -> Path:
    """Best objective so far against forward passes, one line per run (label -> history)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for label, hist in histories.items():
        xs = [h["forwards"] for h in hist]
        best, ys = float("inf"), []
        for h in hist:
            best = min(best, h["objective"])
            ys.append(best)
        ax.plot(xs, ys, label=label, drawstyle="steps-post")
    return _finish(plt, fig, ax, path, "forward passes", f"best {objective} so far")


def plot_candidates(
    candidates: Sequence[Mapping[str, Any]], chosen: Mapping[str, Any], path: Path, objective: str = "objective"
) -> Path:
    """The automatic search's candidates: selection objective (what chose) against held-out
    objective (what was not used to choose), one point per candidate, the chosen one circled."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    markers = {"screen": "o", "task-wise": "s", "layer-wise": "^"}
    for stage, marker in markers.items():
        pts = [c for c in candidates if c["stage"] == stage and c["heldout"] is not None]
        if pts:
            ax.scatter(
                [c["selection"] for c in pts], [c["heldout"] for c in pts], marker=marker, label=stage, alpha=0.75
            )
            for c in pts:
                ax.annotate(c["method"], (c["selection"], c["heldout"]), fontsize=6, alpha=0.7)
    if chosen.get("heldout") is not None:
        ax.scatter(
            [chosen["selection"]], [chosen["heldout"]], s=220, facecolors="none", edgecolors="red", label="chosen"
        )
    return _finish(
        plt,
        fig,
        ax,
        path,
        f"selection {objective} (fit + val for the screen, val for trained)",
        f"held-out {objective}",
    )
