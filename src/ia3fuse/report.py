"""Plain-text tables for the CLI (inspect, methods, demo). Formatting only."""

from __future__ import annotations

import textwrap
from typing import TYPE_CHECKING, Any, Optional, Sequence

if TYPE_CHECKING:
    from .adapter import IA3Adapter

__all__ = ["format_table", "adapter_table", "methods_table", "count"]


def count(n: int, noun: str, plural: Optional[str] = None) -> str:
    """``n`` and ``noun``, plural unless n is 1: ``count(1, "adapter") == "1 adapter"``,
    ``count(3, "forward pass", "forward passes") == "3 forward passes"``."""
    return f"{n} {noun if n == 1 else plural or noun + 's'}"


def format_table(
    headers: Sequence[str], rows: Sequence[Sequence[Any]], *, max_width: Optional[int] = None, wrap: Sequence[int] = ()
) -> str:
    """A GitHub-markdown table with columns padded to width.

    Args:
        max_width: the widest a line may be; the columns in ``wrap`` (indices) are narrowed,
            the widest first, down to their longest word and then, if that is not enough, down to
            their header (splitting words), and their cells continue on extra rows whose other
            cells are blank. None: one line per row.
        wrap: the columns that may wrap (text, not names or numbers that one looks up).
    """
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    wrap = [i for i in wrap if i < len(headers)]  # a column a caller left out does not wrap
    if max_width is not None:
        # first down to each column's longest word, then (only if that is not enough) splitting words
        words = {i: max(len(w) for r in cells for w in r[i].split() or [""]) for i in wrap}
        for floor in ({i: max(words[i], len(cells[0][i])) for i in wrap}, {i: len(cells[0][i]) for i in wrap}):
            while sum(widths) + 3 * len(widths) + 1 > max_width:
                narrowable = [i for i in wrap if widths[i] > floor[i]]
                if not narrowable:
                    break
                widths[max(narrowable, key=lambda i: widths[i])] -= 1
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731

    def lines(row: list[str]) -> list[str]:
        parts = [
            (textwrap.wrap(c, widths[i], break_on_hyphens=False) or [""]) if i in wrap and len(c) > widths[i] else [c]
            for i, c in enumerate(row)
        ]
        return [line([p[k] if k < len(p) else "" for p in parts]) for k in range(max(map(len, parts)))]

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(cells[0]), sep, *(ln for r in cells[1:] for ln in lines(r))])


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


def methods_table(width: int = 100) -> str:
    """Every registered fusion method, one block each, no line wider than ``width``.

    The name and its one-line summary, then lines ``parameters: name=default, ...`` and
    ``paper: URL`` under the summary (words are never split, so a URL stays whole).
    """
    from .methods import methods

    specs = list(methods())
    indent = " " * (max(len(m.name) for m in specs) + 2)
    blocks = []
    for m in specs:
        params = ", ".join(f"{p.name}={p.default!r}" for p in m.params) or "-"
        fill = lambda text, first, rest: textwrap.wrap(
            text, width, initial_indent=first, subsequent_indent=rest, break_long_words=False, break_on_hyphens=False
        )
        lines = fill(m.summary, m.name.ljust(len(indent)), indent)
        lines += fill(f"parameters: {params}", indent, indent + "  ") + fill(f"paper: {m.paper}", indent, indent)
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)
