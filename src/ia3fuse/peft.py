"""Live PEFT models: read IA3 adapters out of a PeftModel and add a fused one in place.

`add_weighted_adapter` mirrors the signature of PEFT's LoRA version and computes its vectors
with the offline `merge`, so both paths give identical vectors for the same inputs.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

import torch

from .adapter import IA3Adapter
from .errors import IA3FuseError, IncompatibleAdaptersError, InvalidParameterError
from .merge import merge
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


def adapter_from_peft(peft_model: Any, adapter_name: str) -> IA3Adapter:
    """Copy the IA3 adapter ``adapter_name`` out of a live PeftModel (vectors on CPU).

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
    return IA3Adapter(vectors, feedforward, _config_dict(tuner.peft_config[adapter_name]), adapter_name)


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
    missing: str = "identity",
    strict: bool = False,
    **params: Any,
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
        **params: other method parameters (``lam``, ``seed``, ``gamma``...).

    Returns:
        The fused adapter as an `IA3Adapter` (the same vectors that were written in place).

    Raises:
        IA3FuseError: unknown adapters, an existing name without ``overwrite``, bad weights or
            parameters; the model is unchanged then.

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
    for key, value in (("svd_rank", svd_rank), ("density", density), ("majority_sign_method", majority_sign_method)):
        if value is not None:
            params[key] = value
    fused = merge(
        [adapter_from_peft(peft_model, a) for a in adapters],
        weights,
        combination_type,
        missing=missing,  # type: ignore[arg-type]
        strict=strict,
        extras="drop",
        name=adapter_name,
        **params,
    )
    _install(peft_model, tuner, fused, adapters[0], adapter_name)
    return fused


def _install(peft_model: Any, tuner: Any, fused: IA3Adapter, template: str, adapter_name: str) -> None:
    active = list(tuner.active_adapters)
    # Build the config before deleting anything: the template may be the adapter being replaced.
    config = dataclasses.replace(
        tuner.peft_config[template],
        target_modules=fused.config["target_modules"],
        feedforward_modules=fused.config["feedforward_modules"],
        init_ia3_weights=True,
    )
    if adapter_name in tuner.peft_config:
        peft_model.delete_adapter(adapter_name)
    tuner.peft_config[adapter_name] = config
    tuner.inject_adapter(tuner.model, adapter_name)
    layers = ia3_layers(peft_model)
    stray = [p for p in fused.vectors if p not in layers or adapter_name not in layers[p].ia3_l]
    if stray:
        raise InvalidParameterError(f"the fused adapter has modules the model lacks: {stray[:3]}")
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
    kept = [a for a in active if a in tuner.peft_config]
    if kept and list(tuner.active_adapters) != kept:
        tuner.set_adapter(kept if len(kept) > 1 else kept[0])
