"""`search_weights` and its result; see the package docstring (`ia3fuse.search`)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor

from .._io import atomic_output_dir, check_output_path
from ..adapter import IA3Adapter, PathLike, as_adapters
from ..errors import DataError, IA3FuseError, IncompatibleAdaptersError, InvalidParameterError
from ..merging import Extras, merge, trained_modules, weights_to_plain
from ..recipe import AdapterRef, Recipe
from ..fusion import get_method, join_params
from .._text import count
from ..scaling import ScaleHooks, TaskStack
from .data import Batch, make_batches, read_records
from .objectives import resolve_objective
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
        return out


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
    if type(model).__name__ == "PeftModel" or hasattr(model, "peft_config"):
        raise IA3FuseError(
            f"the model is a {type(model).__name__}; pass the base model (peft_model.get_base_model() with the adapters "
            "unloaded, or the model loaded without PEFT): the search injects the adapters itself"
        )
    loaded = as_adapters(adapters, allow_pickle=allow_pickle)
    if not loaded:
        raise IncompatibleAdaptersError("no adapters given; pass at least one adapter")
    # Heads (modules_to_save) first: scoring candidates with the wrong head would waste the budget.
    trained = trained_modules(model, loaded, extras)
    device = model_device(model)
    stack = TaskStack(loaded, device=device)
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

    saved_flags = [(p, p.requires_grad) for p in model.parameters()]
    modes = [(m, m.training) for m in model.modules()]
    from tqdm.auto import tqdm

    hooks = ScaleHooks(model, stack.segments)  # checks that the adapters fit the model; changes nothing yet
    bar = tqdm(total=total, desc=f"search ({optimizer}, {granularity})", unit="fwd", disable=not progress or rank != 0)

    def on_step(trace: Trace) -> None:
        bar.update(trace.forwards - bar.n)
        bar.set_postfix({obj_name: f"{trace.history[-1]['objective']:.4f}", "best": f"{trace.best_value:.4f}"})
        if callback is not None and rank == 0:
            last = trace.history[-1]
            callback({"forwards": float(last["forwards"]), "objective": last["objective"], "best": trace.best_value})

    originals = {name: t.detach().clone() for name, (t, _) in trained.items()}
    try:
        with torch.no_grad():  # the chosen trained modules, restored in `finally`
            for t, v in trained.values():
                t.copy_(v.to(t.device, t.dtype))
        for p, _ in saved_flags:
            p.requires_grad_(False)
        model.eval()
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
    finally:
        bar.close()
        hooks.remove()
        with torch.no_grad():
            for name_, original in originals.items():
                trained[name_][0].copy_(original)
        for p, flag in saved_flags:
            p.requires_grad_(flag)
        for m, mode in modes:
            m.training = mode
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
    )
