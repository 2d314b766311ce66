"""Plain-text tables for the CLI (inspect, methods, demo). Formatting only."""

from __future__ import annotations

from typing import Any, Sequence

from .adapter import IA3Adapter

__all__ = ["format_table", "adapter_table", "methods_table"]


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-markdown table with columns padded to width."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(cells[0]), sep, *(line(r) for r in cells[1:])])


def adapter_table(adapter: IA3Adapter) -> str:
    """One row per module: kind, shape, statistics of tau = l - 1."""
    rows = []
    for path, vec in adapter.vectors.items():
        tau = vec.double() - 1
        rows.append(
            [path, adapter.kind(path), "x".join(map(str, vec.shape)), str(vec.dtype).removeprefix("torch."),
             f"{tau.mean():+.4f}", f"{tau.std(unbiased=False):.4f}", f"{tau.min():+.4f}", f"{tau.max():+.4f}"]
        )
    head = [
        f"adapter: {adapter.name}",
        f"base model: {adapter.base_model or '(not recorded)'}",
        f"modules: {len(adapter.vectors)} ({sum(adapter.feedforward.values())} feed-forward)",
    ]
    if adapter.extras:
        head.append(f"other tensors (modules_to_save): {len(adapter.extras)}")
    if adapter.recipe:
        head.append(f"fused with: {adapter.recipe.get('method')} {adapter.recipe.get('parameters') or ''}".rstrip())
    table = format_table(["module", "kind", "shape", "dtype", "mean tau", "std tau", "min tau", "max tau"], rows)
    return "\n".join(head) + "\n\n" + table


def methods_table() -> str:
    """One row per registered fusion method."""
    from .methods import methods

    rows = []
    for m in methods():
        params = ", ".join(f"{p.name}={p.default!r}" for p in m.params) or "-"
        rows.append([m.name, params, m.summary, m.paper])
    return format_table(["method", "parameters (defaults)", "summary", "paper"], rows)
