"""Live PEFT models: read IA3 adapters out of a PeftModel and add a fused one in place.

`add_weighted_adapter` mirrors the signature of PEFT's LoRA version and computes its vectors
with the offline `merge`, so both paths give identical vectors for the same inputs.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional, Sequence

import torch

from ._text import summarize
from .adapter import IA3Adapter
from .errors import IA3FuseError, IncompatibleAdaptersError, InvalidParameterError
from .fusion import join_params
from .merging import Extras, Missing, merge
from .weights import WeightsArg

__all__ = ["adapter_from_peft", "add_weighted_adapter", "ia3_layers"]


def _tuner(peft_model: Any) -> Any:
    from peft import PeftModel
    from peft.tuners.ia3 import IA3Model

    tuner = peft_model.base_model if isinstance(peft_model, PeftModel) else peft_model
    if not isinstance(tuner, IA3Model):
        raise IA3FuseError(
            f"the model is a {type(peft_model).__name__} whose tuner is {type(tuner).__name__}, not IA3Model; "
            "pass a PeftModel holding IA3 adapters"
        )
    return tuner


def ia3_layers(peft_model: Any) -> dict[str, Any]:
    """Every IA3 layer of the model by module path (relative to the base model)."""
    from peft.tuners.ia3 import IA3Layer

    root = _tuner(peft_model).model
    return {path: m for path, m in root.named_modules() if isinstance(m, IA3Layer)}


def _plain(value: Any) -> Any:
    return sorted(value) if isinstance(value, (set, frozenset)) else value


def _config_dict(config: Any) -> dict[str, Any]:
    out = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if hasattr(value, "value"):  # enums such as TaskType / PeftType
            value = value.value
        out[f.name] = _plain(value)
    return out


def _saved_wrappers(peft_model: Any) -> dict[str, Any]:
    """PEFT's ModulesToSaveWrapper modules (trained copies such as a classifier head), by path."""
    from peft.utils import ModulesToSaveWrapper

    root = _tuner(peft_model).model
    return {path: m for path, m in root.named_modules() if isinstance(m, ModulesToSaveWrapper)}


def _extras_key(path: str, name: str) -> str:
    return f"base_model.model.{path}.{name}"  # as PEFT saves modules_to_save tensors


def adapter_from_peft(peft_model: Any, adapter_name: str) -> IA3Adapter:
    """Copy the IA3 adapter ``adapter_name`` out of a live PeftModel (vectors on CPU), with its
    trained modules (``modules_to_save``) as ``extras`` under the keys PEFT saves them with.

    Raises:
        IA3FuseError: the model has no IA3 adapter of that name (the message lists them).
    """
    tuner = _tuner(peft_model)
    if adapter_name not in tuner.peft_config:
        raise IA3FuseError(
            f"the model has no adapter {adapter_name!r}; its adapters are: {', '.join(map(repr, tuner.peft_config))}"
        )
    vectors, feedforward = {}, {}
    for path, layer in ia3_layers(peft_model).items():
        if adapter_name in layer.ia3_l:
            vectors[path] = layer.ia3_l[adapter_name].detach().to("cpu").clone()
            feedforward[path] = bool(layer.is_feedforward)
    extras = {}
    for path, wrapper in _saved_wrappers(peft_model).items():
        if adapter_name in wrapper.modules_to_save:
            for key, value in wrapper.modules_to_save[adapter_name].state_dict().items():
                extras[_extras_key(path, key)] = value.detach().to("cpu").clone()
    return IA3Adapter(vectors, feedforward, _config_dict(tuner.peft_config[adapter_name]), adapter_name, extras)


def add_weighted_adapter(
    peft_model: Any,
    adapters: Sequence[str],
    weights: WeightsArg,
    adapter_name: str,
    combination_type: str = "task_arithmetic",
    svd_rank: Optional[int] = None,
    density: Optional[float] = None,
    majority_sign_method: Optional[str] = None,
    *,
    overwrite: bool = False,
    missing: Missing = "identity",
    strict: bool = False,
    mixed_bases: bool = False,
    extras: Extras = "error",
    params: Optional[Mapping[str, Any]] = None,
    **method_params: Any,
) -> IA3Adapter:
    """Add a fused IA3 adapter to a live PeftModel, like PEFT's LoRA ``add_weighted_adapter``.

    The new adapter is not activated (call ``peft_model.set_adapter(adapter_name)``).

    Args:
        peft_model: a PeftModel (or IA3Model) that holds the IA3 ``adapters``.
        adapters: names of adapters loaded in the model.
        weights: as for `ia3fuse.merge` (list, mapping, depth gradients, `WeightSchedule`).
        adapter_name: the new adapter's name.
        combination_type: a fusion method name (see `ia3fuse.methods()`).
        svd_rank, density, majority_sign_method: method parameters, as in PEFT.
        overwrite: replace an existing adapter of that name instead of refusing.
        missing: ``"identity"`` (default) or ``"zero"`` (PEFT's IA3 behaviour).
        strict: raise if the adapters name different base models.
        mixed_bases: fuse adapters of different base models with different modules anyway.
        extras: the adapters' trained modules (``modules_to_save``, e.g. a classifier head):
            ``"error"`` (default) refuses adapters whose heads differ, ``"first"`` gives the fused
            adapter the first adapter's, ``"average"`` their weighted average, ``"drop"`` none
            (the base model's module is used), as in `ia3fuse.merge`.
        params: other method parameters as a dict (``{"lam": 0.8, "seed": 1}``).
        **method_params: the same as keyword arguments; a name given both ways is refused.

    Returns:
        The fused adapter as an `IA3Adapter` (the same vectors that were written in place).

    Raises:
        IA3FuseError: unknown adapters, an existing name without ``overwrite``, bad weights or
            parameters, heads that differ, modules the model lacks; everything is checked before
            the model is touched, and a failure while installing is rolled back, so the model is
            unchanged then. (An IA3FuseError is a ValueError, as PEFT's errors are.)

    Example:
        >>> ia3fuse.add_weighted_adapter(model, ["a", "b"], [0.5, 0.5], "ab", "ties", density=0.5)  # doctest: +SKIP
        >>> model.set_adapter("ab")  # doctest: +SKIP
    """
    tuner = _tuner(peft_model)
    if isinstance(adapters, str) or not adapters:
        raise IncompatibleAdaptersError(f"adapters is {adapters!r}; pass a non-empty list of adapter names")
    unknown = [a for a in adapters if a not in tuner.peft_config]
    if unknown:
        raise IA3FuseError(
            f"the model has no adapter {', '.join(map(repr, unknown))}; its adapters are: "
            f"{', '.join(map(repr, tuner.peft_config))}"
        )
    if adapter_name in tuner.peft_config and not overwrite:
        raise IA3FuseError(
            f"an adapter named {adapter_name!r} already exists; pass overwrite=True to replace it, or another adapter_name"
        )
    named = {"svd_rank": svd_rank, "density": density, "majority_sign_method": majority_sign_method}
    method_params.update({k: v for k, v in named.items() if v is not None})
    params = join_params(params, method_params)
    inputs = [adapter_from_peft(peft_model, a) for a in adapters]
    fused = merge(
        inputs,
        weights,
        combination_type,
        missing=missing,
        strict=strict,
        mixed_bases=mixed_bases,
        extras=extras,
        name=adapter_name,
        layers=model_layers(tuner.model, [p for a in inputs for p in a.vectors]),
        **params,
    )
    config = _fused_peft_config(tuner, fused, adapters[0])
    _check_fits(peft_model, config, fused)
    previous = None
    if adapter_name in tuner.peft_config:  # kept to restore it if the install fails
        previous = (adapter_from_peft(peft_model, adapter_name), tuner.peft_config[adapter_name])
    try:
        _install(peft_model, tuner, fused, config, adapter_name)
    except BaseException:
        if adapter_name in tuner.peft_config:
            peft_model.delete_adapter(adapter_name)
        if previous is not None:
            _install(peft_model, tuner, previous[0], previous[1], adapter_name)
        raise
    return fused


def model_layers(model: Any, paths: Sequence[str]) -> dict[str, int]:
    """The model's layer count for each stack (``model.layers``...) that ``paths`` number layers in."""
    from .weights import layer_index

    counts = {}
    for where in {w for p in paths if (w := layer_index(p)) is not None}:
        stack = where[0]
        try:
            counts[stack] = len(model.get_submodule(stack))
        except (AttributeError, TypeError):  # not a ModuleList / Sequential: keep the offline rule
            continue
    return counts


def _fused_peft_config(tuner: Any, fused: IA3Adapter, template: str) -> Any:
    """The template adapter's PEFT config with the fused adapter's targets and trained modules."""
    config = tuner.peft_config[template]
    changes: dict[str, Any] = {
        "target_modules": fused.config["target_modules"],
        "feedforward_modules": fused.config["feedforward_modules"],
        "modules_to_save": fused.config.get("modules_to_save") if fused.extras else None,
        "init_ia3_weights": True,
    }
    if hasattr(config, "exclude_modules"):  # PEFT >= 0.14; the targets name every fused module
        changes["exclude_modules"] = None
    return dataclasses.replace(config, **changes)


def _check_fits(peft_model: Any, config: Any, fused: IA3Adapter) -> None:
    """Every fused vector and trained module has a place in the model, checked before any change."""
    from peft.tuners.tuners_utils import check_target_module_exists

    root = _tuner(peft_model).model
    targeted = {path for path, _ in root.named_modules() if path and check_target_module_exists(config, path)}
    stray = [p for p in fused.vectors if p not in targeted]
    wrappers = _saved_wrappers(peft_model)
    keys = {_extras_key(path, k) for path, w in wrappers.items() for k in w.original_module.state_dict()}
    stray += sorted(k for k in fused.extras if k not in keys)
    if stray:
        shown = summarize([repr(s) for s in stray], 3, ", ")
        raise InvalidParameterError(
            f"the fused adapter has {len(stray)} module(s) that the model cannot take ({shown}); fuse adapters "
            "trained on this model"
        )


def _install(peft_model: Any, tuner: Any, fused: IA3Adapter, config: Any, adapter_name: str) -> None:
    active = list(tuner.active_adapters)
    if adapter_name in tuner.peft_config:
        peft_model.delete_adapter(adapter_name)
    tuner.peft_config[adapter_name] = config
    tuner.inject_adapter(tuner.model, adapter_name)
    layers = ia3_layers(peft_model)
    with torch.no_grad():
        for path, layer in layers.items():
            if adapter_name in layer.ia3_l:
                param = layer.ia3_l[adapter_name]
                param.requires_grad_(False)  # a fused adapter is not trained further, as in PEFT
                vec = fused.vectors.get(path)
                if vec is None:
                    param.fill_(1.0)
                else:
                    # Keep the inputs' dtype: PEFT would give the new vector the base layer's (e.g. bf16).
                    param.data = vec.reshape(param.shape).to(device=param.device, dtype=vec.dtype)
        for path, wrapper in _saved_wrappers(peft_model).items():
            prefix = _extras_key(path, "")
            state = {k[len(prefix) :]: v for k, v in fused.extras.items() if k.startswith(prefix)}
            if state:
                if adapter_name not in wrapper.modules_to_save:
                    wrapper.update(adapter_name)
                wrapper.modules_to_save[adapter_name].load_state_dict(state)
                wrapper.modules_to_save[adapter_name].requires_grad_(False)
    kept = [a for a in active if a in tuner.peft_config]
    if kept and list(tuner.active_adapters) != kept:
        tuner.set_adapter(kept if len(kept) > 1 else kept[0])
