"""Plain-text helpers: counted nouns and tables that fit a width. Formatting only, no ia3fuse imports."""

from __future__ import annotations

import textwrap
from typing import Any, Optional, Sequence

__all__ = ["count", "format_table", "summarize"]


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


def summarize(items: Sequence[str], limit: int = 5, sep: str = "; ") -> str:
    """The first ``limit`` items joined by ``sep``, then how many more: every message that lists
    problems says it this way, e.g. ``summarize(["a", "b", "c"], 2) == "a; b; and 1 more"``."""
    rest = len(items) - limit
    return sep.join(items[:limit]) + (f"{sep}and {rest} more" if rest > 0 else "")
