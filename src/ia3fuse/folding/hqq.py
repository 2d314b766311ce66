"""Fold backend for HQQ's ``HQQLinear`` layers (hqq 0.2, in memory).

HQQ dequantizes ``W = ((W_q - zero) * scale).reshape(out, in)``: ``meta["scale"]`` and
``meta["zero"]`` hold one value per group of ``group_size`` elements, both in the layer's
``compute_dtype``; the zero counts codes, so scaling a group's values scales its ``scale`` alone.
Where a group lies depends on ``axis``:

* ``axis=1`` (hqq's default): the flattened ``(out, in)`` weight is cut into rows of
  ``group_size`` consecutive elements, ``scale`` has shape ``(out * in / group_size, 1)``. With
  ``in % group_size == 0`` every group lies inside one output row, so an output-side scale ``l``
  folds exactly: ``scale.view(out, in / group_size) *= l[:, None]`` (any sign of ``l``). Columns do
  not: a column scale changes values inside every group.
* ``axis=0``: the flattened weight is laid out ``(group_size, out * in / group_size)`` and each
  group is one of its columns: ``group_size`` elements ``out * in / group_size`` apart, which with
  ``out % group_size == 0`` is one input column, every ``(out / group_size)``-th row. Such a group
  spans rows (a row scale changes its codes: requantize) but never columns, so an input-side scale
  folds exactly: ``scale.view(out / group_size, in) *= l[None, :]``.

The scaled statistic is computed in float64 and rounded once to ``compute_dtype``: float32
layers fold at the float32 floor; float16/bfloat16 ones take one rounding of the scale per group,
as a dense half-precision weight takes one per element. Layers whose scales are themselves
quantized (``quant_scale``) or packed with their zeros (``offload_meta``), both deprecated in hqq
0.2, are not exact: their scale codes would change. ``requantize`` dequantizes, scales and runs
the layer's own ``quantize`` with its ``quant_config`` (nbits, group size, axis, optimizer).

``snapshot`` keeps a deep copy of ``meta`` (scales and zeros, small) and the bias; ``W_q`` only
for requantize, which installs new codes and never changes the old ones. hqq is imported only
when a model holds its layers (importing it costs about a second).
"""

from __future__ import annotations

import copy
import sys
from typing import Any, Optional

import torch
from torch import Tensor, nn

from ..errors import FoldError
from .base import FoldOptions, Snapshot, register_backend
from .math import fold_vector, scale_bias_in_place, scale_dense

__all__ = ["HQQBackend", "HQQ"]

_DEFAULT = FoldOptions()


def _hqq_linear_type() -> Optional[type]:
    mod = sys.modules.get("hqq.core.quantize")  # no HQQLinear can exist before hqq is imported
    return getattr(mod, "HQQLinear", None)


def _layer(module: nn.Module) -> Any:
    return module  # typed as Any: HQQLinear's attributes (meta, W_q, quantize) are its own


def _shape(module: nn.Module) -> tuple[int, int]:
    out, in_ = _layer(module).meta["shape"]
    return int(out), int(in_)


def _scale(module: nn.Module) -> Optional[Tensor]:
    """The float scale tensor a fold multiplies, or None when the layer keeps none."""
    scale = _layer(module).meta.get("scale")
    return scale if isinstance(scale, Tensor) and scale.is_floating_point() else None


def _stored_scale_reason(module: nn.Module) -> Optional[str]:
    meta = _layer(module).meta
    if _scale(module) is not None and not meta.get("quant_scale"):
        return None
    how = "packed with the zeros (offload_meta)" if "zero_scale" in meta else "quantized (quant_scale)"
    return (
        f"HQQLinear keeps its scales {how}, deprecated in hqq 0.2: a scaled group scale would change their "
        "codes; requantize instead, or quantize without quant_scale/offload_meta"
    )


def _groups(module: nn.Module) -> tuple[int, int]:
    """``(axis, group_size)``; hqq resolves a ``group_size`` of None to the whole axis."""
    meta = _layer(module).meta
    out, in_ = _shape(module)
    group = meta.get("group_size") or (in_ if meta["axis"] == 1 else out)
    return int(meta["axis"]), int(group)


class HQQBackend:
    """``hqq.core.quantize.HQQLinear``: rows fold into the group scales with ``axis=1``, columns
    with ``axis=0``."""

    name = "hqq"

    def handles(self, module: nn.Module) -> bool:
        hqq_linear = _hqq_linear_type()
        layer = _layer(module)
        return (
            hqq_linear is not None
            and isinstance(module, hqq_linear)
            and getattr(layer, "W_q", None) is not None
            and isinstance(getattr(layer, "meta", None), dict)
        )

    def features(self, module: nn.Module) -> tuple[int, int]:
        return _shape(module)

    def exact_rows(self, module: nn.Module) -> Optional[str]:
        reason = _stored_scale_reason(module)
        if reason is not None:
            return reason
        out, in_ = _shape(module)
        axis, group = _groups(module)
        scale = _scale(module)
        assert scale is not None  # _stored_scale_reason() checked it
        if axis == 0:
            return (
                f"HQQLinear with axis=0 groups {group} values down a column of the weight, across {group} output "
                "rows, so a row scale would change the codes of every group; requantize instead, or quantize with "
                "axis=1 (groups inside rows)"
            )
        if in_ % group or scale.numel() != out * in_ // group:
            return (
                f"in_features={in_} is not a multiple of the HQQ group_size {group}: groups of the flattened weight "
                "straddle output rows, so a row scale cannot fold into the group scales exactly; requantize instead"
            )
        return None

    def exact_cols(self, module: nn.Module) -> Optional[str]:
        reason = _stored_scale_reason(module)
        if reason is not None:
            return reason
        out, in_ = _shape(module)
        axis, group = _groups(module)
        scale = _scale(module)
        assert scale is not None  # _stored_scale_reason() checked it
        if axis == 1:
            return (
                f"HQQLinear with axis=1 groups {group} consecutive inputs of a row; a column scale changes values "
                "inside every group and so the codes; requantize instead"
            )
        if out % group or scale.numel() != out * in_ // group:
            return (
                f"out_features={out} is not a multiple of the HQQ group_size {group}: axis=0 groups straddle "
                "input columns, so a column scale cannot fold into the group scales exactly; requantize instead"
            )
        return None

    def snapshot(self, module: nn.Module, *, weights: bool) -> Snapshot:
        layer = _layer(module)
        bias = layer.bias
        snap: Snapshot = {
            "meta": copy.deepcopy(layer.meta),
            "bias": bias.detach().clone() if isinstance(bias, Tensor) else None,
        }
        if weights:
            snap["W_q"] = layer.W_q  # requantize installs new codes and never changes these
        return snap

    def restore(self, module: nn.Module, snap: Snapshot) -> None:
        layer = _layer(module)
        with torch.no_grad():
            if "W_q" in snap:
                layer.W_q = snap["W_q"]
            layer.meta = copy.deepcopy(snap["meta"])
            if snap["bias"] is not None and isinstance(layer.bias, Tensor):
                layer.bias.copy_(snap["bias"])

    def _multiply(self, module: nn.Module, view: tuple[int, int], factor: Tensor) -> None:
        scale = _scale(module)
        assert scale is not None  # exact_rows()/exact_cols() checked it
        scaled = scale.to(torch.float64).reshape(view) * factor.to(scale.device)
        scale.copy_(scaled.reshape(scale.shape).to(scale.dtype))

    def scale_rows(self, module: nn.Module, rows: Tensor, *, options: FoldOptions = _DEFAULT) -> str:
        reason = self.exact_rows(module)
        if reason is not None:
            raise FoldError(reason)
        out, in_ = _shape(module)
        _, group = _groups(module)
        l = fold_vector(rows, out, "rows", "HQQLinear")
        with torch.no_grad():
            self._multiply(module, (out, in_ // group), l[:, None])
            scale_bias_in_place(_layer(module).bias, l.float())
        return "statistic"

    def scale_cols(self, module: nn.Module, cols: Tensor, *, options: FoldOptions = _DEFAULT) -> str:
        reason = self.exact_cols(module)
        if reason is not None:
            raise FoldError(reason)
        out, in_ = _shape(module)
        _, group = _groups(module)
        c = fold_vector(cols, in_, "cols", "HQQLinear")
        with torch.no_grad():
            self._multiply(module, (out // group, in_), c[None, :])
        return "statistic"

    def requantize(
        self, module: nn.Module, rows: Optional[Tensor], cols: Optional[Tensor], *, options: FoldOptions = _DEFAULT
    ) -> str:
        layer = _layer(module)
        config = layer.quant_config
        if not isinstance(config, dict) or not isinstance(config.get("weight_quant_params"), dict):
            raise FoldError(
                "HQQLinear has no quant_config to quantize again with (a layer loaded without one); keep the "
                "adapter unmerged, or fold only modules that take an exact path (exact='require' lists them)"
            )
        with torch.no_grad():
            dense = self.dequantize(module)
            l = scale_dense(dense, rows, cols, "HQQLinear")
            # HQQLinear.quantize assigns a plain tensor to W_q, which a registered Parameter refuses
            codes = layer.W_q
            del layer.W_q
            try:
                # hqq 0.2 ignores (and clears) quantized scale/zero settings; pass them as the layer holds them
                layer.quantize(
                    dense,
                    weight_quant_params=dict(config["weight_quant_params"]),
                    scale_quant_params=config.get("scale_quant_params"),
                    zero_quant_params=config.get("zero_quant_params"),
                )
            except BaseException:
                layer.W_q = codes
                raise
            if l is not None:
                scale_bias_in_place(_layer(module).bias, l)
        return "requantize"

    def dequantize(self, module: nn.Module) -> Tensor:
        with torch.no_grad():
            return _layer(module).dequantize().float().reshape(_shape(module))


HQQ = register_backend(HQQBackend())
