"""`search_weights` and its result; see the package docstring (`ia3fuse.search`)."""

from __future__ import annotations

import contextlib
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor

from .._io import atomic_output_dir, check_output_path
from ..adapter import IA3Adapter, PathLike, as_adapters
from ..errors import DataError, IA3FuseError, IA3FuseWarning, IncompatibleAdaptersError, InvalidParameterError
from ..merging import Extras, merge, trained_modules, weights_to_plain
from ..recipe import AdapterRef, Recipe
from ..fusion import get_method, join_params
from .._text import count
from ..scaling import ScaleHooks, TaskStack
from .data import Batch, make_batches, read_records
from .objectives import agreement_notes, collapse_notes, prediction_logits, resolve_objective
from .optim import OPTIMIZERS, Trace, run_adam, run_cma
from .._runtime import model_device
from ..forms import MethodForm, formed_methods
from .space import GRANULARITIES, SEARCHABLE_METHODS, WeightSpace

__all__ = [
    "search_weights",
    "SearchResult",
    "load_model",
    "load_tokenizer",
    "GRANULARITIES",
    "OPTIMIZERS",
    "SEARCHABLE_METHODS",
    "Batch",
    "make_batches",
    "read_records",
]


@dataclass
class SearchResult:
    """The outcome of `search_weights`.

    Attributes:
        weights: ``(K, G)`` float64, one row per adapter, one column per group of modules.
        names: the adapters' names (rows). groups: the groups' labels (columns).
        schedule: the weights in the form `ia3fuse.merge` takes (a list, or a `WeightSchedule`).
        adapter: the fused adapter, ``merge(adapters, schedule, method, **params)``.
        history: one entry per evaluation: ``forwards`` (cumulative forward passes),
            ``objective``, ``penalized`` (with the L1 term) and ``best`` (best penalized so far).
        forwards: the forward passes spent, one per batch per evaluation: ``budget // batches``
            evaluations, fewer only when CMA-ES stopped itself (``stopped``).
        initial_objective: the objective at the starting weights.
        final_objective: the objective of ``adapter`` itself (the merged vectors, exactly).
        budget: the budget in forward passes. stopped: why the search ended before spending
            it ("" when it did not).
        notes: the warnings the search raised, e.g. a task whose predictions the entropy
            objective collapsed onto one answer (`ia3fuse.search.objectives.collapse_notes`).
    """

    weights: Tensor
    names: list[str]
    groups: list[str]
    granularity: str
    method: str
    params: dict[str, Any]
    objective: str
    optimizer: str
    schedule: Any
    adapter: IA3Adapter
    history: list[dict[str, float]]
    forwards: int
    initial_objective: float
    final_objective: float
    sources: list[Optional[str]] = field(default_factory=list)
    budget: Optional[int] = None
    stopped: str = ""
    extras: Extras = "error"  # the policy for the adapters' trained modules (see ia3fuse.merge)
    notes: list[str] = field(default_factory=list)  # warnings raised (e.g. a task collapsed by entropy)

    def passes(self) -> str:
        """The forward passes spent of the budget, e.g. ``"39 of 40 forward passes (3 per
        evaluation: one per batch)"``, and why fewer when CMA-ES stopped itself."""
        if self.budget is None:
            return count(self.forwards, "forward pass", "forward passes")
        spent = f"{self.forwards} of {count(self.budget, 'forward pass', 'forward passes')}"
        if self.stopped:
            return f"{spent} ({self.stopped})"
        if self.forwards < self.budget and self.history:
            return f"{spent} ({int(self.history[0]['forwards'])} per evaluation: one per batch)"
        return spent

    def weight_of(self, adapter: str) -> list[float]:
        """The weights of one adapter, one per group."""
        return self.weights[self.names.index(adapter)].tolist()

    def recipe(self, relative_to: Optional[PathLike] = None) -> Recipe:
        """The `Recipe` that ``ia3fuse merge`` turns into ``adapter`` bit for bit.

        Adapter paths are absolute, or relative to ``relative_to`` (the recipe's folder); an
        adapter given in memory (no directory) appears by name only.
        """
        refs: list[Union[str, AdapterRef]] = []
        for name, src in zip(self.names, self.sources or [None] * len(self.names)):
            if src is None:
                refs.append(AdapterRef(name=name))
                continue
            where = Path(src).resolve()
            refs.append(
                AdapterRef(
                    path=str(where if relative_to is None else os.path.relpath(where, Path(relative_to).resolve())),
                    name=name,
                )
            )
        return Recipe(
            adapters=refs,
            method=self.method,
            weights=weights_to_plain(self.schedule),
            parameters=dict(self.params),
            missing="identity",
            extras=self.extras,
            name=self.adapter.name,
        )

    def weights_table(self) -> str:
        """The weights as a markdown table (adapters x groups)."""
        head = "| adapter | " + " | ".join(self.groups) + " |"
        rule = "|---|" + "---:|" * len(self.groups)
        rows = [
            f"| {n} | " + " | ".join(f"{v:.4f}" for v in row) + " |"
            for n, row in zip(self.names, self.weights.tolist())
        ]
        return "\n".join([head, rule, *rows])

    def summary(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "parameters": self.params,
            "objective": self.objective,
            "optimizer": self.optimizer,
            "granularity": self.granularity,
            "forwards": self.forwards,
            "budget": self.budget,
            "stopped": self.stopped,
            "initial_objective": self.initial_objective,
            "final_objective": self.final_objective,
            "notes": self.notes,
            "names": self.names,
            "groups": self.groups,
            "weights": self.weights.tolist(),
        }

    def save(self, path: PathLike, *, overwrite: bool = False, plots: bool = True) -> Path:
        """Write ``adapter/``, ``recipe.yaml``, ``weights.md``, ``search.json`` (summary and
        history) and, with matplotlib, ``weights.png`` (heatmap) and ``objective.png``; atomically."""
        import json

        import yaml

        out = check_output_path(Path(path), overwrite=overwrite)
        with atomic_output_dir(out, overwrite=overwrite) as tmp:
            (tmp / "adapter").mkdir()
            self.adapter._write_files(tmp / "adapter")  # inside this atomic write: errors name `out`
            (tmp / "recipe.yaml").write_text(
                "# ia3fuse search result; reproduce the adapter with: ia3fuse merge recipe.yaml -o OUT\n"
                + yaml.safe_dump(self.recipe(relative_to=out).plain(), sort_keys=False)
            )
            (tmp / "weights.md").write_text(
                f"# Searched weights of {self.adapter.name} ({self.granularity}-wise, {self.optimizer}, "
                f"objective {self.objective})\n\n"
                f"{self.weights_table()}\n\nObjective {self.initial_objective:.6g} -> {self.final_objective:.6g} "
                f"in {self.passes()}.\n"
            )
            (tmp / "search.json").write_text(json.dumps({**self.summary(), "history": self.history}, indent=1) + "\n")
            if plots:
                from .plots import plot_objective, plot_weights

                plot_weights(self, tmp / "weights.png")
                plot_objective(
                    {f"{self.optimizer}, {self.granularity}-wise": self.history}, tmp / "objective.png", self.objective
                )
            self._write_extra(tmp, plots)
        return out

    def _write_extra(self, folder: Path, plots: bool) -> None:
        """More files in the same atomic write (the automatic search's candidate ranking)."""


def load_model(path: PathLike, *, classifier: bool = False, dtype: Optional[torch.dtype] = None) -> Any:
    """Load a base model for a search from a local directory (no downloads).

    Seq2seq configs load as ``AutoModelForSeq2SeqLM``; otherwise a causal LM, or a sequence
    classifier with ``classifier=True``.

    Raises:
        DataError: the directory holds no loadable transformers model.
    """
    import transformers as tf

    from .._runtime import no_hf_progress_bars

    try:
        config = tf.AutoConfig.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise DataError(
            f"model {str(path)!r} is not a transformers model directory ({str(exc).splitlines()[0]})"
        ) from None
    cls: type[Union[tf.AutoModelForSeq2SeqLM, tf.AutoModelForSequenceClassification, tf.AutoModelForCausalLM]]
    if getattr(config, "is_encoder_decoder", False):
        cls = tf.AutoModelForSeq2SeqLM
    elif classifier:
        cls = tf.AutoModelForSequenceClassification
    else:
        cls = tf.AutoModelForCausalLM
    kwargs: dict[str, Any] = {"local_files_only": True}  # Any: mypy checks a **dict against every keyword
    if dtype is not None:
        kwargs["dtype"] = dtype
    with no_hf_progress_bars():
        try:
            return cls.from_pretrained(str(path), **kwargs).eval()
        except (OSError, ValueError) as exc:
            raise DataError(
                f"model {str(path)!r} cannot be loaded as {cls.__name__} ({str(exc).splitlines()[0]})"
            ) from None


def load_tokenizer(path: PathLike) -> Any:
    """Load the tokenizer saved in a local directory (no downloads).

    Raises:
        DataError: the directory holds no tokenizer.
    """
    import transformers as tf

    try:
        return tf.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, TypeError) as exc:
        raise DataError(
            f"no tokenizer in {str(path)!r} ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); "
            "pass --tokenizer DIR with the base model's tokenizer"
        ) from None


def _check_args(
    optimizer: str, budget: Optional[int], l1: float, bounds: Any, lr: float, sigma0: float
) -> Optional[tuple[float, float]]:
    for name, value, what in (("lr", lr, "Adam's learning rate"), ("sigma0", sigma0, "CMA-ES's initial step size")):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
            raise InvalidParameterError(f"{name}={value!r}; {what} must be a finite number > 0")
    if optimizer not in OPTIMIZERS:
        raise InvalidParameterError(f"optimizer={optimizer!r} is not an optimizer; pass one of {', '.join(OPTIMIZERS)}")
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int) or budget < 1):
        raise InvalidParameterError(f"budget={budget!r}; pass the number of forward passes to spend, an integer >= 1")
    if isinstance(l1, bool) or not isinstance(l1, (int, float)) or not math.isfinite(l1) or l1 < 0:
        raise InvalidParameterError(f"l1={l1!r}; pass a finite penalty >= 0")
    if bounds is None:
        return None
    try:
        lo, hi = (float(b) for b in bounds)
    except (TypeError, ValueError):
        raise InvalidParameterError(f"bounds={bounds!r}; pass (low, high), e.g. (-1.5, 1.5)") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise InvalidParameterError(f"bounds={bounds!r}; pass finite (low, high) with low < high")
    return (lo, hi)


def _distributed() -> tuple[int, int]:
    """(rank, world size) under ``accelerate launch`` / torchrun; (0, 1) otherwise."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1
    from accelerate import PartialState

    state = PartialState()
    return state.process_index, state.num_processes


def _all_sum(t: Tensor, world: int) -> Tensor:
    if world > 1:
        import torch.distributed as dist

        dist.all_reduce(t)
    return t


def search_weights(
    model: Any,
    adapters: Union[Sequence[Union[IA3Adapter, PathLike]], Mapping[str, Union[IA3Adapter, PathLike]]],
    data: Union[str, Path, Sequence[Any]],
    *,
    objective: Union[str, Callable[..., Tensor]] = "loss",
    granularity: str = "task",
    optimizer: str = "adam",
    method: str = "task_arithmetic",
    budget: Optional[int] = None,
    l1: float = 0.0,
    bounds: Optional[tuple[float, float]] = None,
    seed: int = 0,
    tokenizer: Any = None,
    batch_size: int = 8,
    init: Any = None,
    lr: float = 0.05,
    sigma0: float = 0.2,
    popsize: Optional[int] = None,
    name: str = "searched",
    progress: bool = False,
    allow_pickle: bool = False,
    extras: Extras = "error",
    params: Optional[Mapping[str, Any]] = None,
    callback: Optional[Callable[[dict[str, float]], None]] = None,
    metric: Optional[Callable[..., float]] = None,
    holdout: float = 0.25,
    methods: Optional[Sequence[str]] = None,
    predict: Optional[Callable[[Any, dict[str, Any]], Sequence[Any]]] = None,
    **method_params: Any,
) -> SearchResult:
    """Find fusion weights that minimise an objective on a few examples.

    Args:
        model: the base transformers model (causal LM, seq2seq LM, sequence classifier, or any
            module whose user objective scores it), not a PeftModel.
        adapters: IA3 adapters (objects or directories), a list or a mapping name -> adapter.
        data: a JSON-lines file or records (see `ia3fuse.search.data`), or ready batches.
        objective: ``"loss"`` (mean loss on labeled examples; causal LMs: target tokens only),
            ``"entropy"`` (prediction entropy, labels unused) or ``callable(model, inputs) -> scalar``.
        granularity: one weight per adapter (``"task"``), per adapter and layer (``"layer"``),
            or per adapter, layer and module kind (``"module"``).
        optimizer: ``"adam"`` (through the differentiable method; TIES/DARE masks fixed at the
            start) or ``"cma"`` (CMA-ES, gradient-free).
        method: a fusion method that declares a form (the built-in ones: `SEARCHABLE_METHODS`; a method
            registered with ``form=`` too); ``params`` its parameters as a dict, or as keyword
            arguments (``**method_params``; a name given both ways is refused).
        budget: forward passes to spend (default: 100 passes over the data).
        l1: penalty ``l1 * mean(|weights|)`` added to the objective (LoraHub uses 0.05).
        bounds: (low, high) for every weight; CMA-ES defaults to (-1.5, 1.5), Adam to none.
        seed: seeds CMA-ES and, for randomized methods (DARE), the drop masks; Adam itself
            is deterministic given the data.
        tokenizer: the base model's tokenizer, for text records.
        batch_size: examples per forward pass.
        init: starting weights: None (1/K each), a number, one per adapter, or a (K, G) table.
        lr: Adam's learning rate. sigma0, popsize: CMA-ES's step size and population.
        name: the fused adapter's name.
        progress: show a progress bar with the objective.
        extras: the adapters' trained modules (``modules_to_save``, e.g. a classifier head):
            ``"error"`` (default) uses them when the adapters agree and refuses up front when they
            differ, ``"first"`` scores every candidate with the first adapter's, ``"drop"`` with the
            model's own; the fused adapter gets the same (see `ia3fuse.merge`).
        callback: called after each step with ``{"forwards", "objective", "best"}`` (cumulative
            forward passes, the step's objective, the best so far), e.g. to draw a live curve.
        method ``"auto"``: choose the method, its key parameter, a global scale and the weights
            (task-wise, or layer-wise where that wins on validation), with a held-out estimate;
            returns an `AutoSearchResult` (see `ia3fuse.search.auto`). ``optimizer`` must be
            ``"adam"``; ``granularity`` ``"layer"`` lets layer-wise weights compete (``"task"``:
            task-wise only); ``params``, ``l1``, ``bounds`` and ``init`` must be left out.
            ``holdout``: the share of the examples kept for the estimate; ``methods``: the
            methods to consider (default: every searchable one); ``metric``:
            ``callable(model, inputs) -> float`` in [0, 1] (e.g. accuracy) scored on the
            held-out examples next to the objective (default for labeled text: accuracy).
        predict: ``callable(model, inputs) -> one answer per example``, for the entropy
            objective's collapse check with a user objective (the built-in one reads its own
            logits): a task whose answers fall onto one is named in ``result.notes``.

    Returns:
        A `SearchResult`; ``result.adapter`` is the fused adapter, ``result.save(dir)`` writes
        it with its recipe, weight table and plots.

    Raises:
        DataError: empty or malformed data, examples longer than the context, a tokenizer that
            does not match the model. IncompatibleAdaptersError: adapters of another base.
        InvalidParameterError: bad budget, bounds, l1, optimizer, granularity or method.

    Example:
        >>> result = ia3fuse.search_weights(model, ["a", "b"], "few.jsonl", tokenizer=tok,
        ...                                 granularity="layer", budget=200)  # doctest: +SKIP
        >>> result.save("searched")  # doctest: +SKIP
    """
    if method == "auto":
        return _search_auto(
            model,
            adapters,
            data,
            objective=objective,
            granularity=granularity,
            optimizer=optimizer,
            budget=budget,
            l1=l1,
            bounds=bounds,
            init=init,
            seed=seed,
            tokenizer=tokenizer,
            batch_size=batch_size,
            lr=lr,
            name=name,
            progress=progress,
            allow_pickle=allow_pickle,
            extras=extras,
            params=join_params(params, method_params),
            callback=callback,
            metric=metric,
            holdout=holdout,
            methods=methods,
            predict=predict,
        )
    box = _check_args(optimizer, budget, l1, bounds, lr, sigma0)
    if optimizer == "cma" and bounds is None:
        box = (-1.5, 1.5)
    spec = get_method(method)
    params = spec.validate({**join_params(params, method_params), **({"seed": seed} if spec.randomized else {})})
    if spec.form is None:
        raise InvalidParameterError(
            f"method {method!r} has no differentiable form for weight search; pass one of {', '.join(formed_methods())}"
        )
    obj_name, obj_fn = resolve_objective(objective)
    loaded, trained, device, stack = _inputs(model, adapters, allow_pickle, extras)
    batches = make_batches(data, model, tokenizer=tokenizer, batch_size=batch_size, need_labels=objective == "loss")
    cost = len(batches)
    total = budget if budget is not None else 100 * cost
    if total < cost:
        raise InvalidParameterError(
            f"budget={total} forward passes is less than one pass over the data ({cost} batches); "
            f"pass a budget >= {cost} or fewer examples"
        )
    space = WeightSpace(stack, granularity)
    theta0 = space.initial(init)
    form = MethodForm(stack, method, params, space.expand(theta0).float(), device)
    rank, world = _distributed()
    local = [b.to(device) for b in batches[rank::world]]

    examples = sum(b.size for b in batches)

    def mean_objective(backward: bool, scales: Any) -> Tensor:
        """The objective averaged over examples (each batch's mean weighted by its size),
        summed across processes; with ``backward``, its gradient too (one backward per batch)."""
        value = torch.zeros((), dtype=torch.float64, device=device)
        for b in local:
            hooks.scales = scales() if callable(scales) else scales
            loss = obj_fn(model, b) * (b.size / examples)
            if backward:
                loss.backward()
            value += loss.detach().double()
        hooks.scales = None
        value = _all_sum(value, world)
        if not torch.isfinite(value):
            raise DataError(f"the objective is {float(value)}; check the data (labels all -100?) and the bounds")
        return value

    def evaluate(theta: Tensor, grad: bool) -> tuple[float, float, Optional[Tensor]]:
        th = theta.detach().to(device, torch.float32).requires_grad_(grad)
        with torch.set_grad_enabled(grad):
            value = mean_objective(grad, lambda: form(space.expand(th)))
            penalty = l1 * th.abs().mean()
            if grad and l1 and rank == 0:  # counted once, not once per process
                penalty.backward()
        g = None
        if grad:
            g = _all_sum(th.grad if th.grad is not None else torch.zeros_like(th), world).to("cpu", torch.float64)
        objective_value = float(value)
        return objective_value, objective_value + float(penalty.detach()), g

    from tqdm.auto import tqdm

    hooks = ScaleHooks(model, stack.segments)  # checks that the adapters fit the model; changes nothing yet
    bar = tqdm(total=total, desc=f"search ({optimizer}, {granularity})", unit="fwd", disable=not progress or rank != 0)

    def on_step(trace: Trace) -> None:
        bar.update(trace.forwards - bar.n)
        bar.set_postfix({obj_name: f"{trace.history[-1]['objective']:.4f}", "best": f"{trace.best_value:.4f}"})
        if callback is not None and rank == 0:
            last = trace.history[-1]
            callback({"forwards": float(last["forwards"]), "objective": last["objective"], "best": trace.best_value})

    try:
        with _prepared(model, trained):
            if optimizer == "adam":
                trace = run_adam(evaluate, theta0, budget=total, cost=cost, lr=lr, bounds=box, on_step=on_step)
            else:
                trace = run_cma(
                    evaluate,
                    theta0,
                    budget=total,
                    cost=cost,
                    sigma0=sigma0,
                    popsize=popsize,
                    bounds=box,
                    seed=seed,
                    on_step=on_step,
                )
            best = trace.best_theta if trace.best_theta is not None else theta0
            schedule = space.schedule(best)
            fused = merge(loaded, schedule, method, name=name, extras=extras, **params)
            flat = torch.cat([fused.vectors[s.path].reshape(-1).to(device, torch.float32) for s in stack.segments])
            with torch.no_grad():
                final_value = float(mean_objective(False, flat))
                notes = (
                    _collapse(model, hooks, batches, data, objective, batch_size, flat, predict, stack)
                    if rank == 0
                    else []
                )
    finally:
        bar.close()
        hooks.remove()
    for message in notes:
        warnings.warn(message, IA3FuseWarning, stacklevel=2)
    return SearchResult(
        weights=best.to(torch.float64).clone(),
        names=stack.names,
        groups=list(space.groups),
        granularity=granularity,
        method=method,
        params=params,
        objective=obj_name,
        optimizer=optimizer,
        schedule=schedule,
        adapter=fused,
        history=trace.history,
        forwards=trace.forwards,
        initial_objective=trace.history[0]["objective"],
        final_objective=final_value,
        sources=[a.source for a in loaded],
        budget=total,
        stopped=trace.stopped,
        extras=extras,
        notes=notes,
    )


def _collapse(
    model: Any,
    hooks: ScaleHooks,
    batches: Sequence[Batch],
    data: Any,
    objective: Any,
    batch_size: int,
    flat: Tensor,
    predict: Optional[Callable[[Any, dict[str, Any]], Sequence[Any]]] = None,
    stack: Optional[TaskStack] = None,
) -> list[str]:
    """With an entropy objective, what went wrong per task, without labels: answers collapsed onto
    one (`collapse_notes`: the base model's answers against the fusion's) and answers no adapter
    gives (`agreement_notes`: each adapter of ``stack`` alone against the fusion). Costs one pass
    over the data per answer set (base, fusion, each adapter), outside the budget.

    Answers come from ``predict(model, inputs)`` (one per example) when given (what a user
    objective needs), else from the built-in entropy objective's logits (argmax). A task is a
    record's ``task`` field, or a ready batch's ``task`` entry; otherwise all examples."""
    name = objective if isinstance(objective, str) else getattr(objective, "__name__", "")
    if name != "entropy" or (predict is None and objective != "entropy"):
        return []
    records = read_records(data) if isinstance(data, (str, Path)) else list(data)
    ready = bool(records) and all(
        isinstance(r, Mapping) and any(isinstance(v, Tensor) for v in r.values()) for r in records
    )
    experts = {} if stack is None else dict(zip(stack.names, stack.vectors.to(flat.device, torch.float32)))
    sets: dict[str, Optional[Tensor]] = {"base": None, "fusion": flat, **experts}
    answers: dict[str, dict[str, list[Any]]] = {key: {} for key in sets}
    for i, b in enumerate(batches):
        b = b.to(flat.device)
        if ready:
            names = [str(records[i].get("task", "all"))] * b.size
        else:
            names = [str(r.get("task", "all")) for r in records[i * batch_size : i * batch_size + b.size]]
        for key, scales in sets.items():
            hooks.scales = scales
            with torch.no_grad():
                preds = list(predict(model, b.inputs)) if predict else prediction_logits(model, b).argmax(-1).tolist()
            for task, p in zip(names, preds):
                answers[key].setdefault(task, []).append(p)
    hooks.scales = None
    own = {key: answers[key] for key in experts}
    return collapse_notes(answers["base"], answers["fusion"]) + agreement_notes(own, answers["fusion"])


@contextlib.contextmanager
def _prepared(model: Any, trained: Mapping[str, tuple[Tensor, Tensor]]) -> Iterator[None]:
    """The model as a search runs it: eval mode, parameters frozen, the chosen trained modules
    (heads) installed; all three put back afterwards, whatever happens."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    modes = [(m, m.training) for m in model.modules()]
    originals = {name: t.detach().clone() for name, (t, _) in trained.items()}
    try:
        with torch.no_grad():
            for t, v in trained.values():
                t.copy_(v.to(t.device, t.dtype))
        for p, _ in flags:
            p.requires_grad_(False)
        model.eval()
        yield
    finally:
        with torch.no_grad():
            for name, original in originals.items():
                trained[name][0].copy_(original)
        for p, flag in flags:
            p.requires_grad_(flag)
        for m, mode in modes:
            m.training = mode


def _inputs(
    model: Any, adapters: Any, allow_pickle: bool, extras: Extras
) -> tuple[list[IA3Adapter], dict[str, tuple[Tensor, Tensor]], Any, TaskStack]:
    """The adapters, the heads they bring (checked first: scoring candidates with the wrong head
    would waste the budget), the model's device and the stack, for a search on ``model``."""
    if type(model).__name__ == "PeftModel" or hasattr(model, "peft_config"):
        raise IA3FuseError(
            f"the model is a {type(model).__name__}; pass the base model (peft_model.get_base_model() with the adapters "
            "unloaded, or the model loaded without PEFT): the search injects the adapters itself"
        )
    loaded = as_adapters(adapters, allow_pickle=allow_pickle)
    if not loaded:
        raise IncompatibleAdaptersError("no adapters given; pass at least one adapter")
    trained = trained_modules(model, loaded, extras)
    device = model_device(model)
    return loaded, trained, device, TaskStack(loaded, device=device)


def _search_auto(
    model: Any,
    adapters: Any,
    data: Any,
    *,
    objective: Union[str, Callable[..., Tensor]],
    granularity: str,
    optimizer: str,
    budget: Optional[int],
    l1: float,
    bounds: Any,
    init: Any,
    seed: int,
    tokenizer: Any,
    batch_size: int,
    lr: float,
    name: str,
    progress: bool,
    allow_pickle: bool,
    extras: Extras,
    params: Mapping[str, Any],
    callback: Optional[Callable[[dict[str, float]], None]],
    metric: Optional[Callable[..., float]],
    holdout: float,
    methods: Optional[Sequence[str]],
    predict: Optional[Callable[[Any, dict[str, Any]], Sequence[Any]]],
) -> SearchResult:
    """``search_weights(method="auto")``: the stages of `ia3fuse.search.auto` under one budget."""
    from .auto import AutoRun, AutoSearchResult, auto_candidates, default_metric, separation_warning, split_examples
    from .auto import warn

    if optimizer != "adam":
        raise InvalidParameterError(
            f"method='auto' trains its weights with Adam; leave optimizer at 'adam', not {optimizer!r}"
        )
    if granularity not in ("task", "layer"):
        raise InvalidParameterError(
            f"granularity={granularity!r}; method='auto' takes 'task' (task-wise weights) or 'layer' (layer-wise "
            "weights may compete, and win only on validation)"
        )
    if params or l1 or bounds is not None or init is not None:
        raise InvalidParameterError(
            "method='auto' chooses the method's parameters, the scale and the starting weights itself; leave params, "
            "l1, bounds and init out"
        )
    if isinstance(holdout, bool) or not isinstance(holdout, (int, float)) or not 0 < holdout < 0.5:
        raise InvalidParameterError(
            f"holdout={holdout!r}; pass the share of examples to hold out, above 0 and below 0.5"
        )
    _check_args("adam", budget, 0.0, None, lr, 0.2)
    for m in methods or []:
        if get_method(m).form is None:
            raise InvalidParameterError(
                f"method {m!r} has no differentiable form for weight search; pass methods from {', '.join(formed_methods())}"
            )
    obj_name, obj_fn = resolve_objective(objective)
    loaded, trained, device, stack = _inputs(model, adapters, allow_pickle, extras)
    need_labels = obj_name == "loss"
    batches = make_batches(data, model, tokenizer=tokenizer, batch_size=batch_size, need_labels=need_labels)
    total = budget if budget is not None else 100 * len(batches)
    pass_rows = sum(b.size for b in batches) / len(batches)
    parts = split_examples(data, seed=seed, holdout=holdout, val=holdout)
    splits = {
        part: [
            b.to(device)
            for b in make_batches(p, model, tokenizer=tokenizer, batch_size=batch_size, need_labels=need_labels)
        ]
        for part, p in zip(("fit", "val", "holdout"), parts)
    }
    text = (
        not isinstance(data, (list, tuple))
        or not data
        or not any(isinstance(v, Tensor) for v in dict(data[0]).values())
    )
    if metric is None and need_labels and text:
        metric = default_metric(model)
    k = len(loaded)
    candidates = auto_candidates(k, methods)
    screen_evals = 6
    top = min(3, len(candidates))
    rows = {part: sum(b.size for b in bs) for part, bs in splits.items()}

    def cost(part: str) -> float:  # as AutoRun counts: a pass over part of a batch is that part of a pass
        return rows[part] / pass_rows

    step = cost("fit") + cost("val")
    screen_cost = len(candidates) * screen_evals * step
    hold_cost = (len(candidates) + top + 2) * cost("holdout") * (2 if metric is not None else 1)
    left = total - screen_cost - hold_cost - (top + 1) * cost("val")
    layer_share = 0.35 if granularity == "layer" else 0.0
    task_steps = int(left * (1 - layer_share) / top / step)
    layer_steps = int(left * layer_share / step)
    if task_steps < 3 or (granularity == "layer" and layer_steps < 3):
        need = screen_cost + hold_cost + (top + 1) * cost("val") + step * (3 * top + (3 if layer_share else 0))
        need = need / (1 - layer_share) if layer_share else need
        raise InvalidParameterError(
            f"budget={total} forward passes is too small for method='auto' ({len(candidates)} candidates to screen, "
            f"{top} to train); pass a budget >= {math.ceil(need)}"
        )
    hooks = ScaleHooks(model, stack.segments)
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc="search (auto)", unit="fwd", disable=not progress)

    def on_step(point: dict[str, float]) -> None:
        bar.update(min(total, int(point["forwards"])) - bar.n)
        bar.set_postfix({obj_name: f"{point['objective']:.4f}", "best": f"{point['best']:.4f}"})
        if callback is not None:
            callback(point)

    run = AutoRun(
        model=model,
        stack=stack,
        hooks=hooks,
        objective=obj_fn,
        metric=metric,
        splits=splits,
        pass_rows=pass_rows,
        budget=total,
        seed=seed,
        lr=lr,
        device=device,
        methods=methods,
        on_step=on_step,
    )
    try:
        with _prepared(model, trained):
            screened = run.screen(screen_evals)
            finals = [run.train(c, "task", task_steps) for c in screened[:top]]
            best_task = min(finals, key=lambda c: c.selection)
            if granularity == "layer":
                groups = len(WeightSpace(stack, "layer").groups)
                assert best_task.theta is not None
                start = best_task.theta.expand(-1, groups).clone()
                finals.append(run.train(best_task, "layer", layer_steps, start=start, anchor=start, rho=1.0))
            chosen = min(finals, key=lambda c: (c.selection, c.stage == "layer-wise"))
            with torch.no_grad():
                for c in [*screened, *finals]:
                    scales = run.scales_of(c)
                    c.heldout = run.value("holdout", scales)
                    c.heldout_metric = run.score("holdout", scales)
                space = run.space_of(chosen)
                assert chosen.theta is not None
                schedule = space.schedule(chosen.theta)
                final_params = run.final_params(chosen)
                fused = merge(loaded, schedule, chosen.method, name=name, extras=extras, **final_params)
                flat = torch.cat([fused.vectors[s.path].reshape(-1).to(device, torch.float32) for s in stack.segments])
                final_value = run.value("holdout", flat)
                final_metric = run.score("holdout", flat)
                uniform = torch.cat(
                    [
                        merge(loaded, None, "task_arithmetic").vectors[s.path].reshape(-1).to(device, torch.float32)
                        for s in stack.segments
                    ]
                )
                initial_value = run.value("holdout", uniform)
                collapsed = _collapse(model, hooks, batches, data, objective, batch_size, flat, predict, stack)
    finally:
        bar.close()
        hooks.remove()
    notes = list(collapsed)
    ranked = sorted(finals, key=lambda c: c.selection)
    if len(ranked) >= 2:
        message = separation_warning(ranked[0], ranked[1])
        if message:
            notes.append(message)
    held = run.rows["holdout"]
    if held < 30:
        spread = 100 * math.sqrt(0.25 / held)
        notes.append(
            f"the held-out estimate rests on {held} examples: an accuracy measured on them is uncertain by up to "
            f"+-{spread:.0f} points (one standard error); give more examples for a sharper estimate"
        )
    for message in notes:
        warn(message)
    layer_note = ""
    if granularity == "layer":
        layer = finals[-1]
        layer_note = (
            "layer-wise weights won on validation"
            if chosen is layer
            else f"layer-wise weights did not beat task-wise on validation ({layer.selection:.4g} vs {best_task.selection:.4g}); kept task-wise"
        )
    return AutoSearchResult(
        weights=chosen.theta.to(torch.float64).clone(),
        names=stack.names,
        groups=list(space.groups),
        granularity="layer" if chosen.stage == "layer-wise" else "task",
        method=chosen.method,
        params=final_params,
        objective=obj_name,
        optimizer="adam",
        schedule=schedule,
        adapter=fused,
        history=run.history,
        forwards=int(round(run.spent)),
        initial_objective=initial_value,
        final_objective=final_value,
        sources=[a.source for a in loaded],
        budget=total,
        stopped="",
        extras=extras,
        candidates=[c.row() for c in sorted([*screened, *finals], key=lambda c: (c.stage == "screen", c.selection))],
        chosen=chosen.row(),
        heldout={"objective": final_value, "metric": final_metric, "examples": held},
        split={part: run.rows[part] for part in ("fit", "val", "holdout")},
        notes=notes,
        layer_note=layer_note,
        excluded=dict(run.excluded),
    )
