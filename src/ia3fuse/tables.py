"""The CLI's tables: an adapter's modules (``ia3fuse inspect``) and the fusion methods (``ia3fuse methods``)."""

from __future__ import annotations

import textwrap
from typing import TYPE_CHECKING

from ._text import format_table

if TYPE_CHECKING:
    from .adapter import IA3Adapter

__all__ = ["adapter_table", "methods_table"]


def adapter_table(adapter: IA3Adapter) -> str:
    """One row per module: kind, shape, statistics of tau = l - 1."""
    rows = []
    for path, vec in adapter.vectors.items():
        tau = vec.double() - 1
        rows.append(
            [
                path,
                adapter.kind(path),
                "x".join(map(str, vec.shape)),
                str(vec.dtype).removeprefix("torch."),
                f"{tau.mean():+.4f}",
                f"{tau.std(unbiased=False):.4f}",
                f"{tau.min():+.4f}",
                f"{tau.max():+.4f}",
            ]
        )
    head = [
        f"adapter: {adapter.name}",
        f"base model: {adapter.base_model or '(not recorded)'}",
        f"modules: {len(adapter.vectors)} ({sum(adapter.feedforward.values())} feed-forward)",
    ]
    if adapter.extras:
        head.append(f"other tensors (modules_to_save): {len(adapter.extras)}")
    if adapter.recipe is not None:
        head.append(f"fused with: {adapter.recipe.method} {adapter.recipe.parameters or ''}".rstrip())
    table = format_table(["module", "kind", "shape", "dtype", "mean tau", "std tau", "min tau", "max tau"], rows)
    return "\n".join(head) + "\n\n" + table


def methods_table(width: int = 100) -> str:
    """Every registered fusion method, one block each, no line wider than ``width``.

    The name and its one-line summary, then lines ``parameters: name=default, ...`` and
    ``paper: URL`` under the summary (words are never split, so a URL stays whole).
    """
    from .fusion import methods

    specs = list(methods())
    indent = " " * (max(len(m.name) for m in specs) + 2)
    blocks = []

    def fill(text: str, first: str, rest: str) -> list[str]:
        return textwrap.wrap(
            text, width, initial_indent=first, subsequent_indent=rest, break_long_words=False, break_on_hyphens=False
        )

    for m in specs:
        params = ", ".join(f"{p.name}={p.default!r}" for p in m.params) or "-"
        lines = fill(m.summary, m.name.ljust(len(indent)), indent)
        lines += fill(f"parameters: {params}", indent, indent + "  ") + fill(f"paper: {m.paper}", indent, indent)
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)
