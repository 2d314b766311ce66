"""Fold backend for torchao's quantized ``nn.Linear`` weights (tensor subclasses, in memory).

``torchao.quantization.quantize_`` swaps a Linear's weight for a tensor subclass that keeps
integer (or float8) codes plus a small statistic per row or per group of ``group_size``
consecutive inputs of a row. Where that statistic never spans two rows, an output-side scale
``l`` folds into it exactly (the codes never change, any sign of ``l`` works); an input-side
scale would change values inside every group, so ``exact_cols`` always gives a reason and the
planner moves it to a neighbour's rows or requantizes.

What torchao 0.18 stores (read from its source, checked on CPU):

* ``Int8Tensor`` (``Int8WeightOnlyConfig``): ``W = (qdata - zero_point) * scale``, int8 codes,
  ``scale`` float32 ``(out / b0, in / b1)`` for ``block_size = [b0, b1]`` (``PerRow``: ``[1, in]``,
  ``PerGroup(g)``: ``[1, g]``, ``PerTensor``: ``[out, in]``). Rows fold into ``scale``; the int8
  ``zero_point`` counts codes and stays.
* ``IntxUnpackedToInt8Tensor`` (``IntxWeightOnlyConfig(weight_dtype=torch.int4, ...)``, the plain
  int1..int8 format): the same formula, ``scale`` in the weight's dtype (or ``scale_dtype``).
* ``Float8Tensor`` (``Float8WeightOnlyConfig``): ``W = qdata * scale``, ``scale`` float32, per row
  by default.
* ``Int4OpaqueTensor`` (``PrototypeInt4WeightOnlyConfig``, torchao's int4 weight-only path for
  CPU: tinygemm's ``_weight_int4pack_mm_for_cpu``): ``W = (q - 8) * scale + zero`` with the zero
  in the float domain, both packed in ``scale_and_zero`` ``(in / group, out, 2)``. A row scale
  multiplies the scale *and* the zero of that row's groups. The codes are packed in a layout that
  depends on the CPU's vector width; ``dequantize`` decodes them through the packing function
  itself, so it holds wherever the layer runs.

``Int4WeightOnlyConfig`` itself does not run on a CPU in torchao 0.18: its ``plain`` and
``preshuffled`` packings need the CUDA ``mslk`` kernels, ``tile_packed_to_4d`` needs CUDA and
``plain_int32`` refuses the CPU; those subclasses (``Int4Tensor``, ``Int4PreshuffledTensor``,
``Int4TilePackedTo4dTensor``, ``Int4PlainInt32Tensor``) and the DA8W4 variant of
``Int4OpaqueTensor`` (its kernel is not built for CPUs here) are not handled.

The scaled statistic is computed in float64 and rounded once to its own dtype: float32 for
int8/float8, the model's dtype for int4/intx (one bfloat16 rounding on a bfloat16 model, the same
rounding a dense bfloat16 weight takes when folded). ``requantize`` dequantizes, scales and
quantizes again with the tensor's own settings (block size, int/float8 dtype, symmetric or not,
activation settings kept); it cannot know torchao options that the tensor does not record (the
HQQ choice of qparams for int4, an fp8 value bound), and uses torchao's defaults for those.

torchao is imported only when a layer holds one of its tensors (importing it costs seconds).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from ..errors import FoldError
from .base import FoldOptions, Snapshot, register_backend
from .math import fold_vector, scale_bias_in_place, scale_dense

__all__ = ["TorchaoBackend", "TORCHAO"]

_DEFAULT = FoldOptions()


# --------------------------------------------------------------------------- formats


def _block(w: Any) -> tuple[int, int]:
    """The ``(rows, cols)`` of weight elements that share one statistic."""
    block = getattr(w, "block_size", None)
    if block is not None and len(block) == 2:
        return int(block[0]), int(block[1])
    scale = w.scale  # Float8Tensor may leave block_size unset: read it off the scale's shape
    out, in_ = w.shape
    rows = 1 if scale.dim() == 0 else scale.shape[0]
    cols = 1 if scale.dim() < 2 else scale.shape[1]
    return out // rows, in_ // cols


def _granularity(w: Any) -> Any:
    from torchao.quantization.granularity import PerBlock, PerGroup, PerRow, PerTensor

    (b0, b1), (out, in_) = _block(w), tuple(w.shape)
    if (b0, b1) == (out, in_):
        return PerTensor()
    if b0 == 1:
        return PerRow() if b1 == in_ else PerGroup(b1)
    return PerBlock((b0, b1))


def _mapping(w: Any) -> Any:
    from torchao.quantization.quant_primitives import MappingType

    zp = getattr(w, "zero_point", None)
    symmetric = zp is None or not bool((zp != 0).any())
    return MappingType.SYMMETRIC if symmetric else MappingType.ASYMMETRIC


def _int8_dequantize(w: Any) -> Tensor:
    return w.dequantize(torch.float32)


def _int8_requantize(w: Any, dense: Tensor) -> Any:
    return type(w).from_hp(
        dense.to(w.dtype),
        _granularity(w),
        mapping_type=_mapping(w),
        act_quant_kwargs=w.act_quant_kwargs,
        act_quant_scale=w.act_quant_scale,
        act_quant_zero_point=w.act_quant_zero_point,
        act_pre_scale=w.act_pre_scale,
        reduce_range=w.reduce_range,
    )


def _intx_dequantize(w: Any) -> Tensor:
    from torchao.quantization.quant_primitives import _DTYPE_TO_QVALUE_BOUNDS, dequantize_affine

    qmin, qmax = _DTYPE_TO_QVALUE_BOUNDS[w.target_dtype]
    return dequantize_affine(
        w.qdata, w.block_size, w.scale, w.zero_point, torch.int8, qmin, qmax, output_dtype=torch.float32
    )


def _intx_requantize(w: Any, dense: Tensor) -> Any:
    from torchao.quantization.quant_primitives import _DTYPE_TO_QVALUE_BOUNDS, quantize_affine

    hp = dense.to(w.dtype)
    new = type(w).from_hp(
        hp,
        tuple(w.block_size),
        w.target_dtype,
        mapping_type=_mapping(w),
        activation_quantization=w.activation_quantization,
    )
    if new.scale.dtype != w.scale.dtype:
        # IntxWeightOnlyConfig(scale_dtype=...): cast the scale, then derive the codes from it (as torchao does)
        qmin, qmax = _DTYPE_TO_QVALUE_BOUNDS[w.target_dtype]
        new.scale = new.scale.to(w.scale.dtype)
        new.qdata = quantize_affine(
            hp, new.block_size, new.scale, new.zero_point, output_dtype=torch.int8, quant_min=qmin, quant_max=qmax
        )
    return new


def _float8_dequantize(w: Any) -> Tensor:
    return w.dequantize(torch.float32)


def _float8_requantize(w: Any, dense: Tensor) -> Any:
    return type(w).from_hp(
        dense.to(w.dtype),
        float8_dtype=w.qdata.dtype,
        granularity=_granularity(w),
        mm_config=w.mm_config,
        kernel_preference=w.kernel_preference,
        act_quant_kwargs=w.act_quant_kwargs,
    )


def _int4_cpu_slots(out: int, in_: int) -> Tensor:
    """For each 4-bit slot of the CPU-packed weight (byte-major, low nibble first), the flat index
    ``row * in + col`` of the code it holds. torch's ``_convert_weight_to_int4pack_for_cpu`` permutes
    codes by the CPU's vector width; packing the index's base-16 digits through it recovers that
    permutation on this machine, whatever the width."""
    n = out * in_
    dtype = torch.int32 if n < 2**31 else torch.int64
    index = torch.arange(n, dtype=dtype)
    slots = torch.zeros(n, dtype=dtype)
    shift = 0
    while shift == 0 or (1 << shift) < n:
        digit = ((index >> shift) & 0xF).to(torch.int32).reshape(out, in_)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(digit, 1).reshape(-1)
        slots |= torch.stack([packed & 0xF, packed >> 4], dim=-1).reshape(-1).to(dtype) << shift
        shift += 4
    return slots


def _int4_opaque_dequantize(w: Any) -> Tensor:
    out, in_ = w.shape
    group = int(w.block_size[1])
    packed = w.qdata.reshape(-1)
    codes = torch.empty(out * in_, dtype=torch.float32)
    codes[_int4_cpu_slots(out, in_).long()] = torch.stack([packed & 0xF, packed >> 4], dim=-1).reshape(-1).float()
    sz = w.scale_and_zero.float()  # (in / group, out, 2)
    scale = sz[..., 0].t().repeat_interleave(group, dim=1)
    zero = sz[..., 1].t().repeat_interleave(group, dim=1)
    return (codes.reshape(out, in_) - 8) * scale + zero


def _int4_opaque_requantize(w: Any, dense: Tensor) -> Any:
    from torchao.quantization.quantize_.workflows import Int4ChooseQParamsAlgorithm

    new = type(w).from_hp(
        dense.to(w.dtype), list(w.block_size), int4_choose_qparams_algorithm=Int4ChooseQParamsAlgorithm.TINYGEMM
    )
    new.act_pre_scale = w.act_pre_scale
    return new


def _int4_opaque_supported(w: Any) -> bool:
    # the A16W4 (tinygemm) layout; DA8W4 (act_mapping_type set) packs for a kernel not built here
    return w.act_mapping_type is None and tuple(w.qdata.shape) == (w.shape[0], w.shape[1] // 2)


@dataclass(frozen=True)
class _Format:
    """Where one torchao tensor subclass keeps the statistic a row scale multiplies."""

    stat: str  # the attribute holding it
    row_dim: int  # its dimension that runs over output rows
    formula: str  # the dequantization, for messages
    dequantize: Callable[[Any], Tensor]  # float32 (out, in)
    requantize: Callable[[Any, Tensor], Any]  # the same format from a float32 (out, in) weight
    supported: Callable[[Any], bool] = lambda w: True


_FORMATS: dict[str, _Format] = {
    "Int8Tensor": _Format("scale", 0, "(q - zero_point) * scale", _int8_dequantize, _int8_requantize),
    "IntxUnpackedToInt8Tensor": _Format("scale", 0, "(q - zero_point) * scale", _intx_dequantize, _intx_requantize),
    "Float8Tensor": _Format("scale", 0, "q * scale", _float8_dequantize, _float8_requantize),
    "Int4OpaqueTensor": _Format(
        "scale_and_zero",
        1,
        "(q - 8) * scale + zero (float zero)",
        _int4_opaque_dequantize,
        _int4_opaque_requantize,
        _int4_opaque_supported,
    ),
}


# --------------------------------------------------------------------------- helpers


def _weight(module: nn.Module) -> Any:
    return module.weight


def _format(module: nn.Module) -> _Format:
    fmt = _FORMATS.get(type(_weight(module)).__name__)
    assert fmt is not None  # handles() accepted it
    return fmt


class TorchaoBackend:
    """``nn.Linear`` whose weight is a torchao ``Int8Tensor``, ``IntxUnpackedToInt8Tensor``,
    ``Float8Tensor`` or (A16W4) ``Int4OpaqueTensor``: rows fold into the per-row/per-group scale."""

    name = "torchao"

    def handles(self, module: nn.Module) -> bool:
        if "torchao" not in sys.modules or not isinstance(module, nn.Linear):
            return False  # no torchao tensor can exist before torchao is imported
        w: Any = getattr(module, "weight", None)
        fmt = _FORMATS.get(type(w).__name__)
        return fmt is not None and type(w).__module__.startswith("torchao.") and w.dim() == 2 and fmt.supported(w)

    def features(self, module: nn.Module) -> tuple[int, int]:
        assert isinstance(module, nn.Linear)  # handles() accepted it
        return module.out_features, module.in_features

    def exact_rows(self, module: nn.Module) -> Optional[str]:
        w, fmt = _weight(module), _format(module)
        name = type(w).__name__
        b0, b1 = _block(w)
        stat = getattr(w, fmt.stat)
        if b0 != 1 or stat.dim() <= fmt.row_dim or stat.shape[fmt.row_dim] != w.shape[0]:
            shared = "the whole weight" if (b0, b1) == tuple(w.shape) else f"each block of {b0}x{b1}"
            return (
                f"torchao {name} keeps one {fmt.stat} for {shared} (block_size {[b0, b1]}), so one statistic spans "
                "several output rows and a row scale would change its codes; requantize instead (or quantize with a "
                "per-row or per-group granularity)"
            )
        return None

    def exact_cols(self, module: nn.Module) -> Optional[str]:
        w, fmt = _weight(module), _format(module)
        b0, b1 = _block(w)
        return (
            f"torchao {type(w).__name__} computes {fmt.formula} with one {fmt.stat} per block of {b0}x{b1} "
            "(rows x inputs); a column scale changes values inside every block and so the codes; requantize instead"
        )

    def snapshot(self, module: nn.Module, *, weights: bool) -> Snapshot:
        w, fmt = _weight(module), _format(module)
        bias = getattr(module, "bias", None)
        snap: Snapshot = {
            f"weight.{fmt.stat}": getattr(w, fmt.stat).detach().clone(),
            "bias": None if bias is None else bias.detach().clone(),
        }
        if weights:
            # requantize installs a new tensor and never changes this one: keeping it is an exact copy
            snap["weight"] = w
        return snap

    def restore(self, module: nn.Module, snap: Snapshot) -> None:
        with torch.no_grad():
            if "weight" in snap:
                module.weight = snap["weight"]
            w, fmt = _weight(module), _format(module)
            getattr(w, fmt.stat).copy_(snap[f"weight.{fmt.stat}"])
            bias = getattr(module, "bias", None)
            if snap["bias"] is not None and isinstance(bias, Tensor):
                bias.copy_(snap["bias"])

    def scale_rows(self, module: nn.Module, rows: Tensor, *, options: FoldOptions = _DEFAULT) -> str:
        reason = self.exact_rows(module)
        if reason is not None:
            raise FoldError(reason)
        w, fmt = _weight(module), _format(module)
        l = fold_vector(rows, w.shape[0], "rows", type(module).__name__)
        stat = getattr(w, fmt.stat)
        shape = [1] * stat.dim()
        shape[fmt.row_dim] = -1
        with torch.no_grad():
            stat.copy_((stat.to(torch.float64) * l.to(stat.device).reshape(shape)).to(stat.dtype))
            scale_bias_in_place(getattr(module, "bias", None), l.float())
        return "statistic"

    def scale_cols(self, module: nn.Module, cols: Tensor, *, options: FoldOptions = _DEFAULT) -> str:
        raise FoldError(self.exact_cols(module) or "")

    def requantize(
        self, module: nn.Module, rows: Optional[Tensor], cols: Optional[Tensor], *, options: FoldOptions = _DEFAULT
    ) -> str:
        w, fmt = _weight(module), _format(module)
        with torch.no_grad():
            dense = fmt.dequantize(w)
            l = scale_dense(dense, rows, cols, type(module).__name__)
            module.weight = nn.Parameter(fmt.requantize(w, dense), requires_grad=False)
            if l is not None:
                scale_bias_in_place(getattr(module, "bias", None), l)
        return "requantize"

    def dequantize(self, module: nn.Module) -> Tensor:
        with torch.no_grad():
            return _format(module).dequantize(_weight(module)).float()


TORCHAO = register_backend(TorchaoBackend())
