"""The quality runner: fuse a suite's task adapters with every method and score every task.

Rows (FusionBench's conventions): the base model; each task's own adapter; PEFT's own
``add_weighted_adapter`` with uniform weights (computed by PEFT itself, the baseline); every
ia3fuse method with its default parameters; the same with parameters tuned on the validation
split (a small grid); one adapter trained on all tasks together (the upper bound). Columns:
per-task test accuracy, their average, and normalized accuracy: the mean over tasks of
fused accuracy / the task's own adapter's accuracy.
"""

from __future__ import annotations

import itertools
import math
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import torch

from ia3fuse.adapter import IA3Adapter, load_adapter
from ia3fuse.errors import MethodInputError
from ia3fuse.merging import merge
from ia3fuse.fusion import get_method, method_names
from ia3fuse.search.auto import golden_min, scale_kind, scale_range

from .suite import Suite

__all__ = ["run_quality", "tuning_grid"]


def tuning_grid(method: str, k: int, *, quick: bool) -> list[dict[str, Any]]:
    """The parameter settings one method is tuned at on the validation split; each setting then
    gets its best continuous global scale (`tune_scale`), not a few fixed weights.

    The scale is the common weight times K (1 = the mean of the task vectors, K = their sum), or
    ``lam`` for TIES-style methods, whose weighted mean does not scale with the weights.
    """
    params: dict[str, list[Any]] = {}
    names = {p.name for p in get_method(method).params}
    if "density" in names:
        params["density"] = [0.2, 0.5, 0.8] if not quick else [0.3, 0.7]
    if "svd_rank" in names:
        params["svd_rank"] = list(range(1, k + 1)) if not quick else [1, k]
    keys = list(params)
    return [dict(zip(keys, values)) for values in itertools.product(*(params[k_] for k_ in keys))]


def scaled(adapters: list[IA3Adapter], method: str, params: dict[str, Any], scale: float) -> IA3Adapter:
    """``method`` at uniform weights with global ``scale`` (see `tuning_grid`)."""
    k = len(adapters)
    if scale_kind(method) == "lam":
        return merge(adapters, None, method, **{**params, "lam": scale})
    return merge(adapters, [scale / k] * k, method, **params)


def tune_scale(score: Callable[[float], float], method: str, k: int, *, quick: bool) -> tuple[float, float]:
    """The scale with the highest ``score`` (golden section in log scale over the method's range)."""
    low, high = scale_range(method, k)
    scale, value = golden_min(lambda s: -score(s), low, high, 5 if quick else 8)
    return scale, -value


def task_vector_norm(adapter: IA3Adapter) -> float:
    """The L2 norm of ``l - 1`` over every module: how far a fusion moves the model."""
    return math.sqrt(sum(float(((v.double() - 1) ** 2).sum()) for v in adapter.vectors.values()))


def scale_at_norm(adapters: list[IA3Adapter], method: str, params: dict[str, Any], norm: float) -> Optional[float]:
    """The scale at which ``method``'s fused task vector has L2 norm ``norm`` (bisection in log
    scale; the norm grows with the scale), or None when no scale in range reaches it."""
    lo, hi = math.log(1e-3), math.log(100.0)
    if task_vector_norm(scaled(adapters, method, params, math.exp(hi))) < norm:
        return None
    for _ in range(50):
        mid = (lo + hi) / 2
        if task_vector_norm(scaled(adapters, method, params, math.exp(mid))) < norm:
            lo = mid
        else:
            hi = mid
    return math.exp((lo + hi) / 2)


def _peft_with(suite: Suite, adapter_dir: Path) -> Any:
    from peft import PeftModel

    return PeftModel.from_pretrained(suite.base_model(), str(adapter_dir)).eval()


def _scores(suite: Suite, model: Any, split: str) -> dict[str, float]:
    with torch.no_grad():
        return {t: float(suite.evaluate(model, t, split)) for t in suite.tasks}


def _fused_scores(suite: Suite, fused: IA3Adapter, split: str, tmp: Path) -> dict[str, float]:
    out = tmp / f"fused-{time.perf_counter_ns()}"
    fused.save(out)
    return _scores(suite, _peft_with(suite, out), split)


def _peft_baseline(suite: Suite, split: str) -> dict[str, float]:
    """PEFT's own IA3 add_weighted_adapter, uniform weights: the baseline users have today."""
    from peft import PeftModel

    tasks = suite.tasks
    model = PeftModel.from_pretrained(suite.base_model(), str(suite.adapter_dir(tasks[0])), adapter_name=tasks[0])
    for t in tasks[1:]:
        model.load_adapter(str(suite.adapter_dir(t)), adapter_name=t)
    model.add_weighted_adapter(list(tasks), [1.0 / len(tasks)] * len(tasks), "peft_uniform")
    model.set_adapter("peft_uniform")
    return _scores(suite, model.eval(), split)


def _mean(values: Iterable[float]) -> float:
    values = list(values)
    return sum(values) / len(values)


def run_quality(
    suite: Suite,
    *,
    cache: Path,
    quick: bool = False,
    seed: int = 0,
    progress: bool = True,
    methods: Optional[list[str]] = None,
    search: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Prepare ``suite`` (cached), then score every row on the test split.

    With ``search`` (and a suite that has ``search_problem``), the "automatic weights" rows and
    the "dynamic mixture" router row of `benchmarks.quality.auto` are added; their summaries are
    under ``search`` and ``router``.

    Returns:
        JSON-able results: ``suite``, ``tasks``, ``describe``, ``rows`` (name, group, params,
        accuracy per task, average, normalized), ``seconds`` per stage, ``search``.
    """
    from tqdm.auto import tqdm

    started = time.perf_counter()
    suite.prepare(Path(cache), quick=quick, seed=seed, progress=progress)
    prepared = time.perf_counter()
    tasks = list(suite.tasks)
    k = len(tasks)
    adapters = {t: load_adapter(suite.adapter_dir(t), name=t) for t in tasks}
    chosen = methods or method_names()
    rows: list[dict[str, Any]] = []

    def add(name: str, group: str, acc: dict[str, float], params: Optional[dict[str, Any]] = None) -> None:
        rows.append(
            {"name": name, "group": group, "params": params or {}, "accuracy": acc, "average": _mean(acc.values())}
        )

    with tempfile.TemporaryDirectory(prefix="ia3fuse-bench-") as tmp_dir:
        tmp = Path(tmp_dir)
        add("base model", "reference", _scores(suite, suite.base_model(), "test"))
        for t in tasks:
            add(f"adapter: {t}", "individual", _scores(suite, _peft_with(suite, suite.adapter_dir(t)), "test"))
        add(
            "PEFT add_weighted_adapter (uniform)",
            "baseline",
            _peft_baseline(suite, "test"),
            {"weights": [round(1 / k, 6)] * k},
        )
        for m in chosen:
            try:
                fused = merge(list(adapters.values()), None, m)
            except MethodInputError as exc:  # e.g. geometric with l <= 0: recorded, not fatal
                rows.append(
                    {
                        "name": m,
                        "group": "ia3fuse default",
                        "params": {},
                        "error": str(exc),
                        "accuracy": None,
                        "average": None,
                    }
                )
                continue
            add(m, "ia3fuse default", _fused_scores(suite, fused, "test", tmp), {"weights": [round(1 / k, 6)] * k})
        tuned: dict[str, tuple[dict[str, Any], float]] = {}
        for m in tqdm(chosen, desc=f"{suite.name}: tuning on validation", disable=not progress):
            best: Optional[tuple[float, dict[str, Any], float]] = None
            for params in tuning_grid(m, k, quick=quick):

                def val_score(scale: float, m: str = m, params: dict[str, Any] = params) -> float:
                    try:
                        fused = scaled(list(adapters.values()), m, params, scale)
                    except MethodInputError:
                        return -math.inf
                    return _mean(_fused_scores(suite, fused, "val", tmp).values())

                scale, val = tune_scale(val_score, m, k, quick=quick)
                if math.isfinite(val) and (best is None or val > best[0] + 1e-12):
                    best = (val, params, scale)
            if best is None:
                continue
            val, params, scale = best
            tuned[m] = (params, scale)
            fused = scaled(list(adapters.values()), m, params, scale)
            add(
                f"{m} (tuned)",
                "ia3fuse tuned",
                _fused_scores(suite, fused, "test", tmp),
                {**params, "scale": round(scale, 4), "val_average": round(val, 4)},
            )
        if "task_arithmetic" in tuned:
            # every method moved exactly as far as tuned task arithmetic: method effects apart from scale
            norm = task_vector_norm(scaled(list(adapters.values()), "task_arithmetic", *tuned["task_arithmetic"]))
            for m, (params, _) in tuned.items():
                if m in ("task_arithmetic", "linear"):  # linear's norm does not grow with its scale
                    continue
                scale = scale_at_norm(list(adapters.values()), m, params, norm)
                if scale is None:
                    continue
                fused = scaled(list(adapters.values()), m, params, scale)
                add(
                    f"{m} (at task-arithmetic norm)",
                    "ia3fuse at TA norm",
                    _fused_scores(suite, fused, "test", tmp),
                    {**params, "scale": round(scale, 4), "norm": round(norm, 4)},
                )
        search_summary = None
        if search and hasattr(suite, "search_problem"):
            from .auto import run_search_rows

            search_rows, search_summary = run_search_rows(
                suite,
                quick=quick,
                seed=seed,
                progress=progress,
                log=log,
                score=lambda fused: _fused_scores(suite, fused, "test", tmp),
            )
            for r in search_rows:
                add(r["name"], r["group"], r["accuracy"], r["params"])
        router_summary = None
        if search and hasattr(suite, "search_problem"):
            from .auto import run_router_rows

            router_rows, router_summary = run_router_rows(
                suite,
                quick=quick,
                seed=seed,
                progress=progress,
                log=log,
                score=lambda mixture: _scores(suite, mixture, "test"),
            )
            for r in router_rows:
                add(r["name"], r["group"], r["accuracy"], r["params"])
        add(
            "multi-task adapter (upper bound)",
            "reference",
            _scores(suite, _peft_with(suite, suite.multitask_adapter_dir()), "test"),
        )
    own = {t: next(r["accuracy"][t] for r in rows if r["name"] == f"adapter: {t}") for t in tasks}
    for r in rows:
        r["normalized"] = (
            None if r["accuracy"] is None else _mean(r["accuracy"][t] / own[t] if own[t] > 0 else 0.0 for t in tasks)
        )
    done = time.perf_counter()
    return {
        "suite": suite.name,
        "tasks": tasks,
        "quick": quick,
        "seed": seed,
        "describe": suite.describe(),
        "rows": rows,
        "seconds": {"prepare": round(prepared - started, 2), "rows": round(done - prepared, 2)},
        "search": search_summary,
        "router": router_summary,
    }
