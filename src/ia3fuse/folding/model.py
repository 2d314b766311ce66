"""Fold IA3 vectors into a model's weights: exact where the format allows, reported always.

``fold`` changes the model in place, one layer at a time (no model-sized temporaries), and
returns the plain model; the `FoldReport` of the call is ``model.ia3fuse_report`` and holds what
``unfold`` needs to restore the base bit for bit.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Literal, Optional, Union

import torch
from torch import nn

from ..adapter import IA3Adapter, load_adapter
from ..errors import FoldError
from .._text import summarize
from . import dense as _dense  # noqa: F401  (registers the full-precision backend)
from .base import FoldOptions, backends, check_options
from .plan import Work, describe, plan_fold
from .report import FoldEntry, FoldReport

__all__ = ["fold", "unfold", "FoldReport", "FoldEntry", "backends"]

Exact = Literal["auto", "require", "allow_requant"]
REPORT_ATTR = "ia3fuse_report"


def _active_vectors(peft_model: Any) -> tuple[dict[str, torch.Tensor], dict[str, bool]]:
    """The product of the active IA3 adapters' vectors per module, as PEFT's forward applies them."""
    from ..live import _tuner, ia3_layers

    tuner = _tuner(peft_model)
    active = list(tuner.active_adapters)
    vectors: dict[str, torch.Tensor] = {}
    feedforward: dict[str, bool] = {}
    for path, layer in ia3_layers(peft_model).items():
        if layer.disable_adapters:
            raise FoldError("the model's adapters are disabled (disable_adapter); enable them before folding")
        if layer.merged_adapters:
            raise FoldError(
                f"{path!r} already has adapters merged by PEFT ({layer.merged_adapters}); unmerge them before folding"
            )
        held = [a for a in active if a in layer.ia3_l]
        if not held:
            continue
        vec = layer.ia3_l[held[0]].detach().float().reshape(-1).clone()
        for a in held[1:]:
            vec = vec * layer.ia3_l[a].detach().float().reshape(-1)
        vectors[path] = vec
        feedforward[path] = bool(layer.is_feedforward)
    return vectors, feedforward


def _active_base_name(peft_model: Any) -> Optional[str]:
    from ..live import _tuner

    tuner = _tuner(peft_model)
    names = {getattr(tuner.peft_config[a], "base_model_name_or_path", None) for a in tuner.active_adapters}
    return names.pop() if len(names) == 1 else None


def _strip_ia3(peft_model: Any) -> nn.Module:
    """The base model with every IA3 wrapper replaced by its base layer (works on 4/8-bit too)."""
    from ..live import _tuner, ia3_layers

    tuner = _tuner(peft_model)
    root = tuner.model
    replacements: dict[str, nn.Module] = {
        path: layer.get_base_layer() for path, layer in ia3_layers(peft_model).items()
    }
    for path, module in root.named_modules():
        # modules_to_save wrappers (e.g. a trained classifier head): keep the active trained copy, as
        # PEFT's merge_and_unload does
        copies = getattr(module, "modules_to_save", None)
        if isinstance(copies, nn.ModuleDict) and isinstance(getattr(module, "original_module", None), nn.Module):
            active = getattr(module, "active_adapter", None)
            active = active[0] if isinstance(active, list) and active else active
            replacements[path] = (
                copies[active] if isinstance(active, str) and active in copies else module.original_module
            )
    for path, new in replacements.items():
        parent_path, _, name = path.rpartition(".")
        parent = root.get_submodule(parent_path) if parent_path else root
        setattr(parent, name, new)
    return root


def _is_peft(model: Any) -> bool:
    try:
        from peft import PeftModel
        from peft.tuners.ia3 import IA3Model
    except ImportError:  # pragma: no cover
        return False
    return isinstance(model, (PeftModel, IA3Model))


def _layer_name(work: Work) -> str:
    m = work.module
    extra = ""
    qs = getattr(getattr(m, "weight", None), "quant_state", None)
    if qs is not None:
        extra = f" {getattr(qs, 'quant_type', '')}"
    weight = getattr(m, "weight", None)  # HQQLinear keeps none: its compute dtype then
    if weight is not None and work.backend.name == "torchao":
        extra = f" {type(weight).__name__}"  # the torchao tensor subclass: Int8Tensor, Float8Tensor...
    dtype = getattr(weight, "dtype", None) or getattr(m, "compute_dtype", None)
    return f"{type(m).__name__}{extra} ({str(dtype).removeprefix('torch.')})"


def _expected(before: torch.Tensor, work: Work) -> torch.Tensor:
    out = before
    if work.rows is not None:
        out = out * work.rows.reshape(-1, 1)
    if work.cols is not None:
        groups = getattr(work.module, "groups", 1)
        n_out, n_in = out.shape[0], work.cols.numel()
        in_pg = n_in // groups
        # weight row o of a grouped convolution reads input channels of group o // (out / groups)
        cols = work.cols.reshape(groups, 1, in_pg).expand(groups, n_out // groups, in_pg).reshape(n_out, in_pg)
        out = out * cols.repeat_interleave(before.shape[1] // in_pg, dim=1)
    return out


def fold(
    model: nn.Module,
    adapter: Union[IA3Adapter, str, Path, None] = None,
    *,
    exact: Exact = "auto",
    double_quant: str = "unnest",
    keep_originals: bool = False,
    measure_error: Union[bool, Literal["lossy"]] = "lossy",
    extras: str = "keep",
) -> nn.Module:
    """Fold an IA3 adapter into the model's weights, in place, and return the plain model.

    Output-side vectors scale weight rows (for bitsandbytes, the per-row / per-block statistics,
    exactly); feed-forward vectors scale weight columns in full precision, or move to the rows of
    the neighbour that feeds them (gated and ReLU MLPs), or fall back to
    dequantize-scale-requantize.

    Args:
        model: a PeftModel with an active IA3 adapter (several active adapters multiply, as in
            PEFT's forward), or a plain model together with ``adapter``.
        adapter: an IA3Adapter or adapter directory, for a plain model.
        exact: ``"auto"`` folds exactly where possible and requantizes where it must (with a
            warning); ``"require"`` refuses any lossy step before changing anything;
            ``"allow_requant"`` is ``"auto"`` without the warning.
        double_quant: for 4-bit double quantization: ``"unnest"`` stores the scaled absmax in
            float32 (exact, ~+9% memory), ``"renest"`` re-quantizes it (small error).
        keep_originals: also keep copies of full-precision weights so `unfold` can restore them
            (quantized statistics are always kept: they are tiny).
        measure_error: dequantize each changed layer before and after to report its relative
            error (one layer-sized temporary at a time): ``True`` for every layer, ``"lossy"``
            (default) only for the requantized ones (exact paths then cost no temporaries),
            ``False`` never.
        extras: the adapter's trained non-IA3 modules (``modules_to_save``, e.g. a classifier
            head): ``"keep"`` (default) copies them over the model's, as PEFT's
            ``merge_and_unload`` does (a PeftModel keeps its active adapter's copies either way);
            ``"drop"`` leaves the model's own.

    Returns:
        The plain model (PEFT wrappers removed). Its ``ia3fuse_report`` attribute is the
        `FoldReport`.

    Raises:
        FoldError: modules absent or of another shape (an adapter from another base), unsupported
            layers, a lossy step under ``exact="require"``; the model is unchanged then.

    Example:
        >>> model = ia3fuse.fold(peft_model)  # doctest: +SKIP
        >>> print(model.ia3fuse_report.table())  # doctest: +SKIP
    """
    check_options(exact=exact, double_quant=double_quant, measure_error=measure_error, extras=extras)  # model untouched
    trained: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    if _is_peft(model):
        if adapter is not None:
            raise FoldError(
                "pass either a PeftModel with an active IA3 adapter, or a plain model plus an adapter, not both"
            )
        vectors, feedforward = _active_vectors(model)
        base = None
        trained_on = _active_base_name(model)
    else:
        if adapter is None:
            raise FoldError("the model is not a PeftModel, so pass the IA3 adapter (an IA3Adapter or its directory)")
        loaded = adapter if isinstance(adapter, IA3Adapter) else load_adapter(adapter)
        if extras == "keep":
            trained = _trained_targets(model, loaded.extras)
        vectors, feedforward = loaded.vectors, loaded.feedforward
        base = model
        trained_on = loaded.base_model
    if not vectors:
        raise FoldError("the adapter has no IA3 vectors for this model's modules; nothing to fold")
    target = base if base is not None else _peek_base(model)
    works = plan_fold(target, vectors, feedforward, trained_on=trained_on)
    lossy = [w for w in works if w.lossy]
    if exact == "require":
        refuse_lossy([(w.path, w.lossy) for w in lossy], "module")
    if base is None:
        target = _strip_ia3(model)
    options = FoldOptions(double_quant=double_quant)
    entries = [
        _apply(w, options, keep_originals, measure_error is True or (measure_error == "lossy" and w.lossy is not None))
        for w in works
    ]
    model_type = getattr(getattr(target, "config", None), "model_type", type(target).__name__)
    report = FoldReport(entries, model_type, trained=sorted(trained))
    with torch.no_grad():
        for name, (tensor, value) in trained.items():
            if keep_originals:
                report._trained_originals[name] = (tensor, tensor.detach().clone())
            tensor.copy_(value.to(tensor.device, tensor.dtype))
    if lossy and exact == "auto":
        warnings.warn(
            f"{len(lossy)} module(s) were folded by dequantize-scale-requantize (lossy); see the fold report",
            stacklevel=2,
        )
    object.__setattr__(target, REPORT_ATTR, report)
    return target


def _trained_targets(model: nn.Module, extras: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Model tensor name -> (the model's tensor, the adapter's value), every one checked first."""
    from ..adapter import trained_module_targets

    out, problems = trained_module_targets(model, extras)
    if problems:
        shown = summarize(problems, 2)
        raise FoldError(
            f"{len(problems)} of the adapter's trained modules (modules_to_save) do not fit the model ({shown}); "
            "fold into the model the adapter was trained on, or pass extras='drop' (--extras drop on the command "
            "line) to fold the IA3 vectors only"
        )
    return out


def refuse_lossy(lossy: list[tuple[str, Optional[str]]], what: str, flag: str = "") -> None:
    """Under ``exact="require"``: refuse, naming up to five (item, reason) pairs that have no exact path."""
    if lossy:
        listing = "; ".join(f"{name!r}: {why}" for name, why in lossy[:5])
        raise FoldError(
            f"{len(lossy)} {what}(s) can only be folded by dequantize-scale-requantize ({listing}); "
            f"pass exact='allow_requant'{flag} to accept that error, or keep the adapter unmerged"
        )


def _peek_base(peft_model: Any) -> nn.Module:
    from ..live import _tuner

    return _tuner(peft_model).model


def _apply(work: Work, options: FoldOptions, keep_originals: bool, measure: bool) -> FoldEntry:
    backend, module = work.backend, work.module
    before = backend.dequantize(module) if measure else None
    snap = backend.snapshot(module, weights=keep_originals or work.lossy is not None)
    if work.lossy is not None:
        path = backend.requantize(module, work.rows, work.cols, options=options)
    else:
        labels = []
        if work.rows is not None:
            labels.append(backend.scale_rows(module, work.rows, options=options))
        if work.cols is not None:
            labels.append(backend.scale_cols(module, work.cols, options=options))
        path = labels[0]
    if any(h.startswith("neighbour") for h in work.how):
        path += " + neighbour"
    error = None
    if before is not None:
        want = _expected(before, work)
        after = backend.dequantize(module)
        error = float((after - want).norm() / want.norm().clamp_min(1e-30))
    return FoldEntry(work.path, _layer_name(work), path, describe(work), error, work.lossy, snap or None)


def unfold(model: nn.Module) -> nn.Module:
    """Undo the last `fold` of ``model`` bit for bit, from the originals its report kept.

    Raises:
        FoldError: the model was not folded by ia3fuse, or a full-precision layer was folded
            without ``keep_originals=True`` (dividing by l would not be exact).
    """
    report = getattr(model, REPORT_ATTR, None)
    if not isinstance(report, FoldReport):
        raise FoldError("the model carries no ia3fuse fold report; unfold only undoes ia3fuse.fold on the same model")
    missing = [e.module for e in report.entries if e._snapshot is None]
    if missing:
        raise FoldError(
            f"{len(missing)} full-precision module(s) (e.g. {missing[0]!r}) were folded without keep_originals=True, "
            "so they cannot be restored exactly; fold with keep_originals=True to be able to unfold"
        )
    from .base import backend_for

    if len(report._trained_originals) != len(report.trained):
        raise FoldError(
            f"the fold copied the adapter's trained modules ({', '.join(map(repr, report.trained[:2]))}) without "
            "keep_originals=True, so they cannot be restored; fold with keep_originals=True to be able to unfold"
        )
    for e in report.entries:
        module = model.get_submodule(e.module)
        backend = backend_for(module)
        assert backend is not None
        assert e._snapshot is not None  # refused above otherwise
        backend.restore(module, e._snapshot)
    with torch.no_grad():
        for tensor, original in report._trained_originals.values():
            tensor.copy_(original)
    object.__delattr__(model, REPORT_ATTR)
    return model
