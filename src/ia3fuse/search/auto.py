"""``search_weights(method="auto")``: choose the fusion method, its key parameter, a global scale
and the weights from a few examples, and say honestly how good the choice is.

The examples are split three ways (per batch, so every task keeps its share): ``fit`` (weights
are trained on it), ``val`` (every choice is made on it: which candidates, when to stop, task- or
layer-wise) and ``holdout`` (never used for a choice: it only measures the returned adapter and
every candidate, so the reported estimate is not biased by the selection). Stages, under one
budget of forward passes (a pass over part of a batch counts as that part of a pass):

1. **Screen** every searchable method at a few settings of its key parameter (density, rank) at
   uniform weights, each with the best continuous global scale (a golden-section search over the
   scale on ``fit`` + ``val``: the weights' common factor, or TIES's ``lam``, which its weighted
   mean does not scale otherwise). Methods then compete at their best scale, not at 1/K.
2. **Task-wise weights** for the best few: Adam on ``fit`` from the scaled uniform weights,
   stopped at the step with the lowest ``val`` objective.
3. **Layer-wise weights** for the best of those: Adam on ``fit``, pulled towards the task-wise
   solution by an L2 penalty, and stopped on ``val``; kept only when its ``val`` objective beats
   the task-wise one.

The returned adapter is the candidate with the lowest ``val`` objective, merged by `ia3fuse.merge`
(its recipe reproduces it bit for bit); its ``holdout`` scores are the honest estimate.
"""

from __future__ import annotations

import math
import random
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
from torch import Tensor

from ..errors import DataError, IA3FuseError, IA3FuseWarning, InvalidParameterError
from ..forms import MethodForm, formed_methods
from ..fusion import get_method
from ..scaling import ScaleHooks, TaskStack
from .data import Batch, _rows, model_family, read_records
from .run import SearchResult
from .space import WeightSpace

__all__ = [
    "AutoCandidate",
    "AutoSearchResult",
    "golden_min",
    "scale_kind",
    "scale_range",
    "auto_candidates",
    "split_examples",
    "AutoRun",
    "HOLDOUT",
    "VAL",
]

HOLDOUT = 0.25  # share of the examples kept for the estimate
VAL = 0.25  # share used to choose
GOLDEN = (math.sqrt(5) - 1) / 2


@dataclass
class AutoCandidate:
    """One candidate of the automatic search: a method and parameters, a global scale, and (after
    stage 2 or 3) weights. Scores are mean objectives (lower is better) and, where a metric is
    available, the metric on the held-out split (higher is better)."""

    method: str
    params: dict[str, Any]
    scale: float
    stage: str  # "screen", "task-wise", "layer-wise"
    theta: Optional[Tensor] = None  # (K, G) weights; None: uniform at `scale`
    selection: float = math.inf  # screen: objective on fit + val; searched: objective on val
    heldout: Optional[float] = None
    heldout_metric: Optional[float] = None
    val_batches: list[float] = field(default_factory=list)  # per-batch val objectives (separation check)

    def label(self) -> str:
        shown = {k: v for k, v in self.params.items() if k in ("density", "svd_rank")}
        extra = ", ".join(f"{k}={v}" for k, v in shown.items())
        return f"{self.method}" + (f" ({extra})" if extra else "")

    def row(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "parameters": {k: v for k, v in self.params.items() if k != "seed"},
            "scale": self.scale,
            "stage": self.stage,
            "selection": self.selection,
            "heldout": self.heldout,
            "heldout_metric": self.heldout_metric,
        }


def golden_min(f: Callable[[float], float], low: float, high: float, evaluations: int) -> tuple[float, float]:
    """The lowest of ``evaluations`` values of ``f`` seen by a golden-section search over
    ``[low, high]`` in log scale (a scale's effect is multiplicative): ``(x, f(x))``.

    Example:
        >>> x, fx = golden_min(lambda s: (math.log(s) - math.log(3.0)) ** 2, 0.1, 30.0, 20)
        >>> round(x, 2)
        3.0
    """
    a, b = math.log(low), math.log(high)
    x1, x2 = b - GOLDEN * (b - a), a + GOLDEN * (b - a)
    f1, f2 = f(math.exp(x1)), f(math.exp(x2))
    seen = {x1: f1, x2: f2}
    for _ in range(max(0, evaluations - 2)):
        if f1 <= f2:
            b, x2, f2 = x2, x1, f1
            x1 = b - GOLDEN * (b - a)
            f1 = seen[x1] = f(math.exp(x1))
        else:
            a, x1, f1 = x1, x2, f2
            x2 = a + GOLDEN * (b - a)
            f2 = seen[x2] = f(math.exp(x2))
    best = min(seen, key=lambda x: seen[x])
    return math.exp(best), seen[best]


def scale_kind(method: str) -> str:
    """How a global scale enters ``method``: ``"lam"`` for sign-elected forms (their weighted mean
    divides by the weights, so only ``lam`` scales the result), ``"weights"`` (the weights' common
    factor) for the others."""
    form = get_method(method).form
    return "lam" if form == "elected" else "weights"


def scale_range(method: str, k: int) -> tuple[float, float]:
    """Where the screen looks for ``method``'s global scale with ``k`` adapters."""
    form = get_method(method).form
    if form == "elected":
        return (0.1, 2.0)  # lam
    if form == "linear":
        return (0.5, 1.5)  # sum w_k l_k: a scale far from 1 scales every activation
    return (0.25, max(1.5 * k, 2.0))  # s / K each: from a quarter of the mean to beyond the sum


def auto_candidates(k: int, methods: Optional[Sequence[str]] = None) -> list[tuple[str, dict[str, Any]]]:
    """The (method, parameters) pairs the screen compares: every searchable method, with its key
    parameter at a few settings (density 0.3 and 0.7; SVD rank 1 and ceil(K/2))."""
    chosen = list(methods) if methods is not None else list(formed_methods())
    out: list[tuple[str, dict[str, Any]]] = []
    for m in chosen:
        spec = get_method(m)
        names = {p.name for p in spec.params}
        if "density" in names:
            out += [(m, {"density": d}) for d in (0.3, 0.7)]
        elif "svd_rank" in names:
            out += [(m, {"svd_rank": r}) for r in sorted({1, max(1, math.ceil(k / 2))})]
        else:
            out.append((m, {}))
    return out


# ---------------------------------------------------------------------- the split
def _take(value: Any, rows: list[int], size: int) -> Any:
    if isinstance(value, Tensor) and value.dim() > 0 and value.shape[0] == size:
        return value[rows]
    if isinstance(value, list) and len(value) == size:
        return [value[i] for i in rows]
    return value


def split_examples(
    data: Any, *, seed: int, holdout: float = HOLDOUT, val: float = VAL
) -> tuple[list[Any], list[Any], list[Any]]:
    """Split examples into (fit, val, holdout), each a list of records or of ready batches.

    Records are split within each ``task`` (a record field, when present) after a seeded shuffle.
    Ready batches are split by rows, each batch on its own (so a batch per task keeps every task in
    every split): every tensor and list whose first dimension is the batch's size is cut; other
    entries (a task name, label descriptions) are kept whole in each part.

    Raises:
        DataError: too few examples for three parts (at least 3 records, or 3 rows per batch).
    """
    rng = random.Random(f"ia3fuse-auto-split-{seed}")
    items = read_records(data) if isinstance(data, (str, Path)) else list(data)
    if not items:
        raise DataError("the data hold no examples; pass at least one example (a JSON object per line)")
    ready = all(isinstance(r, Mapping) and any(isinstance(v, Tensor) for v in r.values()) for r in items)

    def cuts(n: int) -> tuple[int, int]:
        n_hold = max(1, round(holdout * n))
        n_val = max(1, round(val * n))
        if n - n_hold - n_val < 1:
            raise DataError(
                f"method='auto' splits the examples into fit, val and holdout parts, but a group has only {n}; "
                "give at least 3 examples per batch or task (more give a better estimate)"
            )
        return n_hold, n_val

    fit: list[Any] = []
    val_part: list[Any] = []
    hold: list[Any] = []
    if ready:
        for b in items:
            size = _rows(b)
            order = list(range(size))
            rng.shuffle(order)
            n_hold, n_val = cuts(size)
            parts = (sorted(order[n_hold + n_val :]), sorted(order[n_hold : n_hold + n_val]), sorted(order[:n_hold]))
            for target, rows in zip((fit, val_part, hold), parts):
                target.append({k: _take(v, rows, size) for k, v in b.items()})
        return fit, val_part, hold
    groups: dict[Any, list[Any]] = {}
    for r in items:
        key = r.get("task") if isinstance(r, Mapping) else None
        groups.setdefault(key, []).append(r)
    for members in groups.values():
        order = list(members)
        rng.shuffle(order)
        n_hold, n_val = cuts(len(order))
        hold += order[:n_hold]
        val_part += order[n_hold : n_hold + n_val]
        fit += order[n_hold + n_val :]
    return fit, val_part, hold


# ---------------------------------------------------------------------- the run
class AutoRun:
    """The stages of ``method="auto"`` over one hooked model (built by `search_weights`)."""

    def __init__(
        self,
        *,
        model: Any,
        stack: TaskStack,
        hooks: ScaleHooks,
        objective: Callable[[Any, Batch], Tensor],
        metric: Optional[Callable[[Any, Mapping[str, Any]], float]],
        splits: dict[str, list[Batch]],
        pass_rows: float,
        budget: float,
        seed: int,
        lr: float,
        device: Any,
        methods: Optional[Sequence[str]] = None,
        on_step: Callable[[dict[str, float]], None] = lambda d: None,
    ):
        self.model, self.stack, self.hooks = model, stack, hooks
        self.objective, self.metric = objective, metric
        self.splits = splits
        self.rows = {name: sum(b.size for b in batches) for name, batches in splits.items()}
        # a forward over a whole batch of the original data counts 1; over part of one, that part
        self.per_row = 1.0 / pass_rows
        self.budget, self.seed, self.lr, self.device = budget, seed, lr, device
        self.k = len(stack.adapters)
        self.methods = methods
        self.spent = 0.0
        self.excluded: dict[str, str] = {}  # candidate label -> why it cannot fuse these adapters
        self.history: list[dict[str, float]] = []
        self.on_step = on_step

    # -------------------------------------------------------------- evaluation
    def cost(self, split: str) -> float:
        return self.rows[split] * self.per_row

    def _scales(self, form: MethodForm, space: WeightSpace, theta: Tensor) -> Tensor:
        return form(space.expand(theta.to(self.device, torch.float32)))

    def value(self, split: str, scales: Any, *, grad: bool = False, per_batch: bool = False) -> Any:
        """Mean objective over ``split`` (each batch weighted by its rows), with its gradient when
        ``grad`` (``scales`` then a callable); per-batch values too with ``per_batch``."""
        batches = self.splits[split]
        n = self.rows[split]
        total = torch.zeros((), dtype=torch.float64)
        each = []
        for b in batches:
            self.hooks.scales = scales() if callable(scales) else scales
            with torch.set_grad_enabled(grad):
                loss = self.objective(self.model, b)
            if grad:
                (loss * (b.size / n)).backward()
            v = float(loss.detach())
            each.append(v)
            total += v * b.size / n
        self.hooks.scales = None
        self.spent += self.cost(split)
        value = float(total)
        if not math.isfinite(value):
            raise DataError(f"the objective is {value} on the {split} examples; check the data and the adapters")
        return (value, each) if per_batch else value

    def score(self, split: str, scales: Tensor) -> Optional[float]:
        if self.metric is None:
            return None
        n = self.rows[split]
        total = 0.0
        with torch.no_grad():
            for b in self.splits[split]:
                self.hooks.scales = scales
                total += float(self.metric(self.model, b.inputs)) * b.size / n
        self.hooks.scales = None
        self.spent += self.cost(split)
        return total

    def _record(self, stage: str, objective: float) -> None:
        self.history.append({"forwards": self.spent, "objective": objective, "stage": stage})  # type: ignore[dict-item]
        self.on_step(
            {"forwards": self.spent, "objective": objective, "best": min(h["objective"] for h in self.history)}
        )

    # -------------------------------------------------------------- forms
    def form(self, cand: AutoCandidate, space: WeightSpace, theta: Tensor) -> MethodForm:
        params = dict(cand.params)
        if scale_kind(cand.method) == "lam":
            params["lam"] = cand.scale
        return MethodForm(self.stack, cand.method, params, space.expand(theta).float(), self.device)

    def uniform(self, cand: AutoCandidate, groups: int) -> Tensor:
        w = 1.0 / self.k if scale_kind(cand.method) == "lam" else cand.scale / self.k
        return torch.full((self.k, groups), w, dtype=torch.float64)

    def final_params(self, cand: AutoCandidate) -> dict[str, Any]:
        params = dict(cand.params)
        if scale_kind(cand.method) == "lam":
            params["lam"] = float(cand.scale)
        return get_method(cand.method).validate(params)

    # -------------------------------------------------------------- stage 1
    def _at(self, cand: AutoCandidate, task: WeightSpace, scale: float) -> float:
        """The objective on fit + val of ``cand`` at uniform weights and global ``scale``."""
        cand.scale = scale
        theta = self.uniform(cand, 1)
        try:
            form = self.form(cand, task, theta)
        except IA3FuseError as exc:  # a method that cannot take these adapters (geometric with l <= 0)
            self.excluded[cand.label()] = " ".join(str(exc).split())
            return math.inf
        scales = self._scales(form, task, theta).detach()
        with torch.no_grad():
            v = self.value("fit", scales) * self.rows["fit"] + self.value("val", scales) * self.rows["val"]
        v /= self.rows["fit"] + self.rows["val"]
        self._record("screen", v)
        return v

    def screen(self, evaluations: int) -> list[AutoCandidate]:
        """Every candidate at its best global scale (golden section in log scale on fit + val)."""
        task = WeightSpace(self.stack, "task")
        out = []
        for method, params in auto_candidates(self.k, self.methods):
            full = get_method(method).validate(
                {**params, **({"seed": self.seed} if get_method(method).randomized else {})}
            )
            low, high = scale_range(method, self.k)
            cand = AutoCandidate(method, full, 1.0, "screen")

            def at(scale: float, cand: AutoCandidate = cand) -> float:
                return self._at(cand, task, scale)

            best_scale, best_value = golden_min(at, low, high, evaluations)
            if cand.label() in self.excluded:  # it cannot fuse these adapters at any scale (no forward was spent)
                continue
            cand.scale, cand.selection = best_scale, best_value
            if math.isfinite(cand.selection):
                out.append(cand)
        if not out:
            raise InvalidParameterError("no method could fuse these adapters; check the adapters (NaN, l <= 0)")
        return sorted(out, key=lambda c: c.selection)

    # -------------------------------------------------------------- stages 2 and 3
    def train(
        self,
        cand: AutoCandidate,
        granularity: str,
        steps: int,
        *,
        start: Optional[Tensor] = None,
        anchor: Optional[Tensor] = None,
        rho: float = 0.0,
    ) -> AutoCandidate:
        """Adam on ``fit`` (plus ``rho * mean((theta - anchor)^2)``), keeping the step with the
        lowest ``val`` objective (the start included)."""
        space = WeightSpace(self.stack, granularity)
        theta0 = start if start is not None else self.uniform(cand, len(space.groups))
        form = self.form(cand, space, theta0)
        theta = theta0.clone().to(torch.float32).requires_grad_(True)
        opt = torch.optim.Adam([theta], lr=self.lr)
        with torch.no_grad():
            best_val, best_each = self.value("val", self._scales(form, space, theta), per_batch=True)
        best = theta0.clone()
        self._record(granularity, best_val)
        for _ in range(steps):
            opt.zero_grad()
            self.value("fit", lambda: self._scales(form, space, theta), grad=True)
            if rho and anchor is not None:
                (rho * ((theta - anchor.to(theta)) ** 2).mean()).backward()
            opt.step()
            with torch.no_grad():
                v, each = self.value("val", self._scales(form, space, theta), per_batch=True)
            self._record(granularity, v)
            if v < best_val:
                best_val, best_each, best = v, each, theta.detach().to(torch.float64).clone()
        stage = "task-wise" if granularity == "task" else "layer-wise"
        return AutoCandidate(cand.method, cand.params, cand.scale, stage, best, best_val, val_batches=best_each)

    def space_of(self, cand: AutoCandidate) -> WeightSpace:
        return WeightSpace(self.stack, "task" if cand.theta is None or cand.theta.shape[1] == 1 else "layer")

    def scales_of(self, cand: AutoCandidate) -> Tensor:
        space = self.space_of(cand)
        theta = cand.theta if cand.theta is not None else self.uniform(cand, len(space.groups))
        return self._scales(self.form(cand, space, theta), space, theta).detach()


def separation_warning(a: AutoCandidate, b: AutoCandidate) -> Optional[str]:
    """A warning when the val data cannot tell the two best candidates apart: their difference is
    within two standard errors of the per-batch paired differences (or there is one batch)."""
    if len(a.val_batches) != len(b.val_batches) or not a.val_batches:
        return None
    d = [y - x for x, y in zip(a.val_batches, b.val_batches)]
    n = len(d)
    mean = sum(d) / n
    if n < 2:
        return (
            f"the validation examples form one batch, so whether {a.label()} ({a.stage}) really beats {b.label()} "
            f"({b.stage}) cannot be "
            "measured; give more examples"
        )
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1))
    se = sd / math.sqrt(n)
    if abs(mean) < 2 * se:
        return (
            f"the data are too few to separate the two best candidates: {a.label()} ({a.stage}) beats {b.label()} "
            f"({b.stage}) by {abs(mean):.4g} on validation, within two standard errors ({2 * se:.4g}); "
            "either may be better on new data"
        )
    return None


def warn(message: str) -> None:
    warnings.warn(message, IA3FuseWarning, stacklevel=4)


def default_metric(model: Any) -> Optional[Callable[[Any, Mapping[str, Any]], float]]:
    """Accuracy on labeled text batches: the class for classifiers, the target tokens for LMs."""
    family = model_family(model)
    if family not in ("classifier", "causal", "seq2seq"):
        return None

    def accuracy(m: Any, batch: Mapping[str, Any]) -> float:
        inputs = {k: v for k, v in batch.items() if k != "prompt_end"}
        labels = inputs.get("labels")
        if labels is None:
            return math.nan
        logits = m(**inputs).logits
        if family == "causal":
            pred, gold = logits[:, :-1].argmax(-1), labels[:, 1:]
        else:
            pred, gold = logits.argmax(-1), labels
        mask = gold != -100
        return float((pred[mask] == gold[mask]).float().mean()) if bool(mask.any()) else math.nan

    return accuracy


# ---------------------------------------------------------------------- the result
def _fmt(value: Optional[float], pct: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{100 * value:.1f}" if pct else f"{value:.4f}"


@dataclass
class AutoSearchResult(SearchResult):
    """The outcome of ``search_weights(method="auto")``: a `SearchResult` for the chosen candidate
    (its ``final_objective`` and ``initial_objective`` — uniform task arithmetic — are measured on
    the held-out examples), plus the ranking of every candidate.

    Attributes:
        candidates: one row per candidate (method, parameters, scale, stage, selection score —
            fit + val objective for the screen, val objective for the trained ones — and held-out
            objective and metric), trained ones first, each group best first.
        chosen: the chosen candidate's row.
        heldout: ``{"objective", "metric", "examples"}`` of the returned adapter on examples no
            choice used: the honest estimate.
        split: examples per part (``fit``, ``val``, ``holdout``).
        notes (inherited): warnings raised (too few examples to separate the best candidates, a
            small held-out part, a task collapsed by the entropy objective).
        excluded: candidates that cannot fuse these adapters, with the reason (geometric
            fusion of vectors with entries <= 0).
        layer_note: with ``granularity="layer"``, whether layer-wise weights won.
    """

    candidates: list[dict[str, Any]] = field(default_factory=list)
    chosen: dict[str, Any] = field(default_factory=dict)
    heldout: dict[str, Any] = field(default_factory=dict)
    split: dict[str, int] = field(default_factory=dict)
    layer_note: str = ""
    excluded: dict[str, str] = field(default_factory=dict)

    def candidates_table(self) -> str:
        """The ranking as a markdown table."""
        head = (
            "| stage | method | parameters | scale | selection objective | held-out objective | held-out metric (%) |"
        )
        rule = "|---|---|---|---:|---:|---:|---:|"
        rows = []
        for c in self.candidates:
            params = ", ".join(f"{k}={v}" for k, v in c["parameters"].items() if k in ("density", "svd_rank")) or "-"
            mark = " **(chosen)**" if c == self.chosen else ""
            rows.append(
                f"| {c['stage']}{mark} | {c['method']} | {params} | {c['scale']:.3g} | {_fmt(c['selection'])} | "
                f"{_fmt(c['heldout'])} | {_fmt(c['heldout_metric'], pct=True)} |"
            )
        return "\n".join([head, rule, *rows])

    def summary(self) -> dict[str, Any]:
        return {
            **super().summary(),
            "chosen": self.chosen,
            "heldout": self.heldout,
            "split": self.split,
            "layer_note": self.layer_note,
            "excluded": self.excluded,
            "candidates": self.candidates,
        }

    def _write_extra(self, folder: Path, plots: bool) -> None:
        import json

        (folder / "candidates.md").write_text(
            f"# method='auto': the candidates ({self.split.get('fit')} fit, {self.split.get('val')} val, "
            f"{self.split.get('holdout')} held-out examples)\n\n{self.candidates_table()}\n\n"
            + "".join(f"- {n}\n" for n in [self.layer_note, *self.notes] if n)
            + "".join(f"- not applicable: {label}: {why}\n" for label, why in self.excluded.items())
        )
        (folder / "candidates.json").write_text(json.dumps(self.candidates, indent=1) + "\n")
        if plots:
            from .plots import plot_candidates

            plot_candidates(self.candidates, self.chosen, folder / "candidates.png", self.objective)
