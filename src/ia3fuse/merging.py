"""Offline fusion: adapters -> adapter. Plans the modules (union, identity fill, checks) and
calls one registered method per module. No base model is needed."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Literal, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor

from ._io import check_output_path
from ._runtime import torch_threads
from .adapter import IA3Adapter, PathLike, _targets_module, as_adapters, is_feedforward_module
from ._text import summarize
from .errors import IA3FuseWarning, IncompatibleAdaptersError, InvalidParameterError, MethodInputError, RecipeError
from .fusion import get_method, join_params
from .recipe import AdapterRef, Recipe
from .stack import ModulePlan, module_seed, plan_modules
from .weights import (
    WeightPlan,
    WeightsArg,
    layer_index,
    layer_positions,
    plan_weights,
    weights_to_plain,
)

__all__ = ["merge", "run_recipe", "merge_extras", "fused_config", "weights_to_plain", "cli_choice", "trained_modules"]

Missing = Literal["identity", "zero"]
Extras = Literal["error", "first", "average", "drop"]
AdaptersArg = Union[Sequence[Union[IA3Adapter, PathLike]], Mapping[str, Union[IA3Adapter, PathLike]]]


def _check_bases(adapters: Sequence[IA3Adapter], strict: bool, mixed_bases: bool) -> None:
    """Adapters of different models: refused when they name different base models and hold
    different modules, or share no module and no layer stack (a mix of two models, e.g. a Llama
    adapter and a BERT one); with ``strict``, refused whenever they name different bases;
    warned otherwise."""
    if mixed_bases:
        return
    force = f"pass {cli_choice('mixed_bases', True)} to fuse them anyway"
    modules = [set(a.vectors) for a in adapters]
    bases = {a.base_model for a in adapters if a.base_model}
    desc = ", ".join(f"{a.name!r}: {a.base_model!r}" for a in adapters)
    if len(bases) > 1 and any(m != modules[0] for m in modules[1:]):
        raise IncompatibleAdaptersError(
            f"the adapters name different base models ({desc}) and target different modules "
            f"({len(set.intersection(*modules))} of {len(set.union(*modules))} shared), so the fused adapter would "
            f"mix two models; fuse adapters trained on one base, or {force}"
        )
    stacks = [{where[0] for where in map(layer_index, m) if where is not None} for m in modules]
    if len(adapters) > 1 and not set.intersection(*modules) and all(stacks) and not set.intersection(*stacks):
        # No shared module and no shared layer stack ('model.layers' vs 'encoder.layer'): two model
        # layouts, whatever the configs say (disjoint adapters of one model share a stack).
        where = ", ".join(f"{a.name!r}: {', '.join(sorted(st))}" for a, st in zip(adapters, stacks))
        raise IncompatibleAdaptersError(
            f"the adapters share no module and their layers lie in different places ({where}), so they were "
            f"trained on different models; fuse adapters of one model, or {force}"
        )
    if len(bases) < 2:
        return
    msg = f"the adapters name different base models ({desc}); fusing them is only meaningful on one base"
    if strict:
        raise IncompatibleAdaptersError(msg + f"; pass {cli_choice('strict', False)} to fuse anyway")
    warnings.warn(msg, IA3FuseWarning, stacklevel=3)


def _compute_dtype(adapters: Sequence[IA3Adapter]) -> torch.dtype:
    dtypes = {v.dtype for a in adapters for v in a.vectors.values()}
    return torch.float64 if torch.float64 in dtypes else torch.float32


def _output_dtype(adapters: Sequence[IA3Adapter]) -> torch.dtype:
    dtypes = {v.dtype for a in adapters for v in a.vectors.values()}
    return dtypes.pop() if len(dtypes) == 1 else torch.float32


EXTRAS_CHOICES = ("error", "first", "average", "drop")


def cli_choice(option: str, value: Any) -> str:
    """How to pass ``option=value``, in Python and on the command line (messages serve both)."""
    flag = "--" + option.replace("_", "-")
    if value is True:
        return f"{option}=True ({flag} on the command line)"
    if value is False:
        return f"{option}=False (no {flag} on the command line)"
    return f"{option}={value!r} ({flag} {value} on the command line)"


def _extras_choices(first: str) -> str:
    return (
        f"pass {cli_choice('extras', 'first')} to keep {first!r}'s, {cli_choice('extras', 'average')} to average "
        f"them with the adapters' weights, or {cli_choice('extras', 'drop')} to leave them out (the base model's "
        "modules are used)"
    )


def merge_extras(adapters: Sequence[IA3Adapter], policy: str, plan: Optional[WeightPlan] = None) -> dict[str, Tensor]:
    """The non-IA3 tensors (``modules_to_save``, e.g. a classifier head) of the fused adapter.

    ``policy``: ``"error"`` keeps them when every adapter that has them has the same ones and
    refuses otherwise; ``"first"`` keeps the first adapter's; ``"average"`` averages them with
    the adapters' per-adapter weights (normalised to sum to 1; every adapter must have the same
    tensors); ``"drop"`` leaves them out. Called before any fusion work, so a refusal costs nothing.

    Raises:
        IncompatibleAdaptersError: different tensors under ``"error"``; tensors ``"average"`` cannot average.
        InvalidParameterError: an unknown policy.
    """
    if policy not in EXTRAS_CHOICES:
        raise InvalidParameterError(
            f"extras={policy!r} is not a policy; pass one of {', '.join(map(repr, EXTRAS_CHOICES))}"
        )
    having = [a for a in adapters if a.extras]
    if not having or policy == "drop":
        return {}
    first = having[0]
    if policy == "first":
        return dict(first.extras)
    if policy == "average":
        return _average_extras(adapters, plan)
    for other in having[1:]:
        same = set(other.extras) == set(first.extras) and all(
            torch.equal(other.extras[k], first.extras[k]) for k in first.extras
        )
        if not same:
            key = sorted(set(first.extras) ^ set(other.extras) or first.extras)[0]
            raise IncompatibleAdaptersError(
                f"adapters {first.name!r} and {other.name!r} carry different trained modules (modules_to_save, "
                f"e.g. {key!r}: a classifier head); ia3fuse fuses IA3 vectors, so choose what the fused adapter "
                f"gets: {_extras_choices(first.name)}"
            )
    return dict(first.extras)


def _first_or_drop() -> str:
    return f"{cli_choice('extras', 'first')} or {cli_choice('extras', 'drop')}"


def _average_extras(adapters: Sequence[IA3Adapter], plan: Optional[WeightPlan]) -> dict[str, Tensor]:
    keys = set(adapters[0].extras)
    for a in adapters:
        if set(a.extras) != keys or any(a.extras[k].shape != adapters[0].extras[k].shape for k in keys):
            raise IncompatibleAdaptersError(
                f"extras='average' needs every adapter to carry the same trained modules (modules_to_save) with the "
                f"same shapes; {a.name!r} differs from {adapters[0].name!r}; pass {_first_or_drop()}"
            )
    raw = plan.default if plan is not None else tuple(1.0 for _ in adapters)
    per_adapter = [w for w in raw if isinstance(w, float)]
    if len(per_adapter) != len(raw):
        raise IncompatibleAdaptersError(
            "extras='average' weighs the trained modules with one number per adapter, but the weights are depth "
            f"gradients; pass plain per-adapter weights, or {_first_or_drop()}"
        )
    total = float(sum(per_adapter))
    if total == 0.0:
        raise IncompatibleAdaptersError(
            "extras='average' divides by the sum of the adapters' weights, which is 0; pass weights with a nonzero "
            f"sum, or {_first_or_drop()}"
        )
    out = {}
    for k in sorted(keys):
        first = adapters[0].extras[k]
        if not first.is_floating_point():
            if any(not torch.equal(a.extras[k], first) for a in adapters):
                raise IncompatibleAdaptersError(
                    f"extras='average' cannot average the integer tensor {k!r}, which differs between adapters; "
                    f"pass {_first_or_drop()}"
                )
            out[k] = first.clone()
            continue
        acc = sum(float(w) * a.extras[k].double() for w, a in zip(per_adapter, adapters))
        assert isinstance(acc, Tensor)  # a sum over at least one adapter
        out[k] = (acc / total).to(first.dtype)
    return out


# PEFT task types whose model class wraps a head (classifier, score, qa_outputs) by itself.
_TASKS_WITH_HEADS = ("SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS")


def fused_config(
    adapters: Sequence[IA3Adapter], plans: Sequence[ModulePlan], *, keeps_extras: bool = True
) -> dict[str, Any]:
    """An adapter_config.json for the fused modules that PEFT maps back onto exactly those modules.

    ``keeps_extras=False``: the fused adapter carries no modules_to_save tensors, so its config
    lists none (PEFT would otherwise look for them when loading it).
    """
    config = dict(adapters[0].config)
    targets = [a.config.get("target_modules") for a in adapters]
    target_lists = [t for t in targets if isinstance(t, list)]
    ffs = [a.config.get("feedforward_modules") for a in adapters]
    target_modules: Any = None
    ff_modules: Any = None
    if len(target_lists) == len(targets) and all(f is None or isinstance(f, list) for f in ffs):
        target_modules = sorted({n for t in target_lists for n in t})
        ff_modules = sorted({n for f in ffs if f for n in f})
        fits = all(
            _targets_module(target_modules, m.path) and is_feedforward_module(ff_modules, m.path) == m.feedforward
            for m in plans
        )
        # An adapter's exclude_modules only held for its own targets; the union of names without
        # them could target modules no adapter has, or (kept) exclude another adapter's modules.
        if not fits or any(a.config.get("exclude_modules") for a in adapters):
            target_modules = None
    if target_modules is None:
        # Name every module exactly: always correct, whatever form the inputs used.
        target_modules = [m.path for m in plans]
        ff_modules = [m.path for m in plans if m.feedforward]
    config.update(
        peft_type="IA3",
        target_modules=target_modules,
        feedforward_modules=ff_modules,
        init_ia3_weights=True,
        inference_mode=True,
    )
    if config.get("exclude_modules") is not None:
        config["exclude_modules"] = None  # target_modules names every module exactly then
    if not keeps_extras:
        config["modules_to_save"] = None
        if config.get("task_type") in _TASKS_WITH_HEADS:
            # PEFT's model class for these tasks adds the head to modules_to_save itself and then
            # expects its tensors in the file; without a task type the base model's head is used.
            config["task_type"] = None
    return config


def _fuse_module(
    spec: Any,
    method: str,
    params: dict[str, Any],
    m: ModulePlan,
    loaded: Sequence[IA3Adapter],
    plan: Any,
    depth: Optional[float],
    compute: torch.dtype,
    fill: float,
    out_dtype: torch.dtype,
) -> Tensor:
    """Stack one module's vectors (filling absent ones), look up its weights, call the method."""
    stack = torch.stack(
        [
            a.vectors[m.path].detach().to("cpu", compute)
            if m.path in a.vectors
            else torch.full(m.shape, fill, dtype=compute)
            for a in loaded
        ]
    )
    w = plan.for_module(m.path, m.kind, depth)
    call = dict(params)
    if spec.randomized:
        call["seed"] = module_seed(params["seed"], m.path)
    try:
        fused = spec.fn(stack, w, **call)
    except MethodInputError as exc:
        who = getattr(exc, "adapter_index", None)
        where = f"module {m.path!r}" + (f", adapter {loaded[who].name!r}" if who is not None else "")
        raise MethodInputError(f"{method}: {where}: {exc}") from None
    if not torch.isfinite(fused).all():
        raise MethodInputError(
            f"{method}: module {m.path!r} fused to non-finite values with weights {w.tolist()}; "
            "use smaller weights or another method"
        )
    return fused.to(out_dtype)


def merge(
    adapters: AdaptersArg,
    weights: WeightsArg = None,
    method: str = "task_arithmetic",
    *,
    missing: Missing = "identity",
    strict: bool = False,
    mixed_bases: bool = False,
    extras: Extras = "error",
    name: str = "fused",
    allow_pickle: bool = False,
    layers: Optional[Mapping[str, int]] = None,
    params: Optional[Mapping[str, Any]] = None,
    **method_params: Any,
) -> IA3Adapter:
    """Fuse IA3 adapters into one, offline (no base model).

    Args:
        adapters: IA3Adapter objects or adapter directories, as a list or a mapping
            name -> adapter.
        weights: one weight per adapter (list, or mapping name -> weight); a weight may be a
            list of numbers, a depth gradient over the layers; or a `WeightSchedule` / dict with
            ``default``, ``kinds`` (``attention`` / ``feedforward``) and regex ``overrides``.
            None means 1/k each.
        method: a registered fusion method (see `ia3fuse.methods()`).
        missing: how a module that an adapter lacks counts: ``"identity"`` (l = 1, tau = 0,
            the default) or ``"zero"`` (l = 0, PEFT's add_weighted_adapter behaviour).
        strict: raise instead of warning when the adapters name different base models.
        mixed_bases: fuse adapters that name different base models and target different
            modules (refused by default: the result would mix two models).
        extras: trained non-IA3 modules (``modules_to_save``, e.g. a classifier head):
            ``"error"`` keeps them when the adapters agree and refuses when they differ, keep the
            ``"first"`` adapter's, ``"average"`` them with the per-adapter weights, or ``"drop"``
            them (from the config too). See `merge_extras`.
        name: the fused adapter's name.
        allow_pickle: let paths with only ``adapter_model.bin`` load (``weights_only=True``).
        layers: the model's layer count per stack (e.g. ``{"model.layers": 32}``) for depth
            gradients, as mergekit counts them; without it (no model), a stack runs over the
            highest layer index the adapters hold (see `ia3fuse.weights.layer_positions`).
        params: the method's parameters (e.g. ``{"density": 0.5, "lam": 1.0}``).
        **method_params: the same as keyword arguments (``density=0.5``); a name given both
            ways is refused.

    Returns:
        The fused adapter; its ``recipe`` records the inputs. Inputs are not modified.

    Raises:
        UnknownMethodError, InvalidParameterError, InvalidWeightsError,
        IncompatibleAdaptersError, AdapterFormatError, MethodInputError.

    Example:
        >>> fused = ia3fuse.merge(["a", "b"], [0.3, 0.7], method="ties", density=0.5)  # doctest: +SKIP
        >>> fused.save("fused")  # doctest: +SKIP
    """
    spec = get_method(method)
    params = spec.validate(join_params(params, method_params))
    if missing not in ("identity", "zero"):
        raise InvalidParameterError(f"missing={missing!r} is not a fill rule; pass 'identity' or 'zero'")
    if extras not in EXTRAS_CHOICES:
        raise InvalidParameterError(
            f"extras={extras!r} is not a policy; pass one of {', '.join(map(repr, EXTRAS_CHOICES))}"
        )
    loaded = as_adapters(adapters, allow_pickle=allow_pickle)
    if not loaded:
        raise IncompatibleAdaptersError("no adapters given; pass at least one adapter")
    names = [a.name for a in loaded]
    plan = plan_weights(weights, names)
    _check_bases(loaded, strict, mixed_bases)
    modules = plan_modules(loaded)
    extra_tensors = merge_extras(loaded, extras, plan)  # refuses before any fusion work
    depths = layer_positions([m.path for m in modules], layers)
    compute, out_dtype = _compute_dtype(loaded), _output_dtype(loaded)
    fill = 1.0 if missing == "identity" else 0.0
    vectors: dict[str, Tensor] = {}
    with torch_threads(1):  # tiny ops: the thread pool only adds latency
        for m in modules:
            vectors[m.path] = _fuse_module(
                spec, method, params, m, loaded, plan, depths[m.path], compute, fill, out_dtype
            )
    recipe = Recipe(
        adapters=[AdapterRef(path=a.source, name=a.name) for a in loaded],
        method=method,
        weights=weights_to_plain(weights),
        parameters=params,
        missing=missing,
        strict=strict,
        mixed_bases=mixed_bases,
        extras=extras,
        name=name,
    )
    return IA3Adapter(
        vectors=vectors,
        feedforward={m.path: m.feedforward for m in modules},
        config=fused_config(loaded, modules, keeps_extras=bool(extra_tensors)),
        name=name,
        extras=extra_tensors,
        recipe=recipe,
    )


def trained_modules(model: Any, adapters: Sequence[IA3Adapter], extras: str) -> dict[str, tuple[Tensor, Tensor]]:
    """The trained modules (modules_to_save, e.g. a classifier head) a model runs with while many
    adapters scale it at once (a mixture, a weight search): model tensor name -> (tensor, value),
    checked, nothing changed. ``"average"`` is refused: those weights change per sample or step."""
    from .adapter import trained_module_targets

    if extras == "average":
        raise InvalidParameterError(
            "extras='average' weighs the trained modules with fixed weights, but a mixture's or a search's weights "
            f"change; pass {cli_choice('extras', 'first')} or {cli_choice('extras', 'drop')}"
        )
    chosen = merge_extras(adapters, extras)
    targets, problems = trained_module_targets(model, chosen)
    if problems:
        raise IncompatibleAdaptersError(
            f"{len(problems)} of the adapters' trained modules (modules_to_save) do not fit the model "
            f"({summarize(problems, 2)}); pass {cli_choice('extras', 'drop')} to mix the IA3 vectors only"
        )
    return targets


def run_recipe(
    recipe: Recipe, *, output: Optional[Union[str, Path]] = None, overwrite: bool = False, allow_pickle: bool = False
) -> Path:
    """Fuse as ``recipe`` says and save to its output (or ``output``), atomically.

    The output is checked (exists, is an input, is a symlink) before any adapter is read.

    Returns:
        The absolute output directory.
    """
    target = output if output is not None else recipe.output
    if target is None:
        raise RecipeError("the recipe has no output; add 'output: DIR' to it or pass -o DIR")
    unpathed = [r.label() for r in recipe.refs if r.path is None]
    if unpathed:
        raise RecipeError(
            f"the recipe names adapters {', '.join(map(repr, unpathed))} without a path (they were fused in memory); "
            "add 'path:' to each adapter entry"
        )
    inputs = [Path(r.path) for r in recipe.refs if r.path is not None]
    check_output_path(Path(target), inputs, overwrite=overwrite)
    fused = merge(
        {name: str(ref.path) for name, ref in zip(recipe.adapter_names(), recipe.refs)}
        if len(set(recipe.adapter_names())) == len(recipe.refs)
        else [str(ref.path) for ref in recipe.refs],
        recipe.weights_arg(),
        recipe.method,
        missing=recipe.missing,
        strict=recipe.strict,
        mixed_bases=recipe.mixed_bases,
        extras=recipe.extras,
        name=recipe.name,
        allow_pickle=allow_pickle,
        **recipe.parameters,
    )
    return fused.save(target, overwrite=overwrite)
