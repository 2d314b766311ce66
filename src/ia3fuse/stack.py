"""The adapter-stack vocabulary shared by merge, run-time scaling, search and fold: which
modules a set of adapters covers (`plan_modules`), each one's side and shape, and a stable
per-module seed for randomized methods. No math, no files."""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Sequence

from ._text import summarize
from .adapter import IA3Adapter
from .errors import IncompatibleAdaptersError

__all__ = ["ModulePlan", "plan_modules", "module_seed"]


@dataclass(frozen=True)
class ModulePlan:
    """One module of the fused adapter: its path, side, shape and which adapters have it."""

    path: str
    feedforward: bool
    shape: tuple[int, ...]
    present: tuple[bool, ...]

    @property
    def kind(self) -> str:
        return "feedforward" if self.feedforward else "attention"


def plan_modules(adapters: Sequence[IA3Adapter]) -> list[ModulePlan]:
    """The union of the adapters' modules, in first-seen order, with conflicts checked.

    Raises:
        IncompatibleAdaptersError: listing every module whose shape or feed-forward flag differs.
    """
    order: list[str] = []
    seen: set[str] = set()
    for a in adapters:
        for p in a.vectors:
            if p not in seen:
                seen.add(p)
                order.append(p)
    problems = []
    plans = []
    for p in order:
        owners = [a for a in adapters if p in a.vectors]
        shapes = {tuple(a.vectors[p].shape) for a in owners}
        flags = {a.feedforward[p] for a in owners}
        if len(flags) > 1:
            desc = ", ".join(f"{a.name!r}: {'feed-forward' if a.feedforward[p] else 'output-side'}" for a in owners)
            problems.append(f"{p!r} is feed-forward in one adapter and not in another ({desc})")
        elif len(shapes) > 1:
            desc = ", ".join(f"{a.name!r}: {tuple(a.vectors[p].shape)}" for a in owners)
            problems.append(f"{p!r} has different shapes ({desc})")
        plans.append(
            ModulePlan(
                p, owners[0].feedforward[p], tuple(owners[0].vectors[p].shape), tuple(p in a.vectors for a in adapters)
            )
        )
    if problems:
        shown = summarize(problems)
        raise IncompatibleAdaptersError(
            f"the adapters do not fit one base model: {shown}; fuse only adapters trained on the same base "
            "with the same feedforward_modules"
        )
    return plans


def module_seed(seed: int, path: str) -> int:
    """A stable per-module seed: two modules never share a drop mask, and reruns are identical."""
    return (seed * 1_000_003 + zlib.crc32(path.encode())) % (2**63)
