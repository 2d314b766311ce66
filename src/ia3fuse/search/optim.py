"""The optimisers of a weight search, under one budget counted in forward passes.

Both call ``evaluate(theta, grad)``, which runs every batch once (``cost`` forward passes) and
returns the objective, the penalised objective (objective + L1 term) and, when asked, the
penalised objective's gradient with respect to ``theta``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from ..errors import MissingDependencyError

__all__ = ["OPTIMIZERS", "Trace", "run_adam", "run_cma"]

OPTIMIZERS = ("adam", "cma")
Evaluate = Callable[[Tensor, bool], tuple[float, float, Optional[Tensor]]]


@dataclass
class Trace:
    """What an optimiser saw: one point per evaluation, and the best (lowest penalised) one."""

    history: list[dict[str, float]] = field(default_factory=list)
    best_theta: Optional[Tensor] = None
    best_value: float = float("inf")
    forwards: int = 0
    stopped: str = ""  # why the search ended before its budget ("" when it spent it)

    def record(self, theta: Tensor, objective: float, penalized: float, cost: int) -> None:
        self.forwards += cost
        best = min(self.best_value, penalized)
        self.history.append({"forwards": self.forwards, "objective": objective, "penalized": penalized, "best": best})
        if penalized < self.best_value:
            self.best_value, self.best_theta = penalized, theta.detach().clone()


def _clamp(theta: Tensor, bounds: Optional[tuple[float, float]]) -> Tensor:
    return theta if bounds is None else theta.clamp(bounds[0], bounds[1])


def run_adam(
    evaluate: Evaluate,
    theta0: Tensor,
    *,
    budget: int,
    cost: int,
    lr: float = 0.05,
    bounds: Optional[tuple[float, float]] = None,
    on_step: Callable[[Trace], None] = lambda t: None,
) -> Trace:
    """Adam on the full-data objective; projected onto ``bounds`` after each step."""
    theta = _clamp(theta0.clone(), bounds).requires_grad_(True)
    opt = torch.optim.Adam([theta], lr=lr)
    trace = Trace()
    steps = budget // cost
    for step in range(steps):
        last = step == steps - 1
        objective, penalized, grad = evaluate(theta, not last)  # the last point needs no gradient
        trace.record(theta, objective, penalized, cost)
        on_step(trace)
        if last:
            break
        opt.zero_grad()
        theta.grad = grad
        opt.step()
        with torch.no_grad():
            theta.copy_(_clamp(theta, bounds))
    return trace


def run_cma(
    evaluate: Evaluate,
    theta0: Tensor,
    *,
    budget: int,
    cost: int,
    sigma0: float = 0.2,
    popsize: Optional[int] = None,
    bounds: Optional[tuple[float, float]] = (-1.5, 1.5),
    seed: int = 0,
    on_step: Callable[[Trace], None] = lambda t: None,
) -> Trace:
    """CMA-ES (the ``cma`` package) from ``theta0``, as LoraHub searches LoRA weights.

    The starting point is evaluated first; then generations run while the budget lasts. Of a
    last generation that does not fit, the candidates that do are evaluated (and not told: the
    search ends there), so ``budget // cost`` candidates in all, unless CMA-ES stops itself
    (``trace.stopped`` names its criteria).
    """
    try:
        import cma
    except ImportError:
        raise MissingDependencyError("optimizer 'cma'", "cma", "search") from None
    shape = theta0.shape
    x0 = _clamp(theta0, bounds).reshape(-1).double()
    options: dict[str, Any] = {"seed": seed + 1, "verbose": -9}
    if bounds is not None:
        options["bounds"] = [bounds[0], bounds[1]]
    if popsize is not None:
        options["popsize"] = popsize
    es = cma.CMAEvolutionStrategy(x0.tolist(), sigma0, options)
    trace = Trace()
    objective, penalized, _ = evaluate(x0.reshape(shape), False)
    trace.record(x0.reshape(shape), objective, penalized, cost)
    on_step(trace)
    while trace.forwards + cost <= budget and not es.stop():
        xs = es.ask()
        values = []
        for x in xs[: (budget - trace.forwards) // cost]:
            theta = torch.as_tensor(x, dtype=torch.float64).reshape(shape)
            objective, penalized, _ = evaluate(theta, False)
            trace.record(theta, objective, penalized, cost)
            values.append(penalized)
        if len(values) == len(xs):
            es.tell(xs, values)
        on_step(trace)
    if trace.forwards + cost <= budget:
        trace.stopped = "CMA-ES stopped itself: " + ", ".join(es.stop())
    return trace
