"""Fold backends for bitsandbytes ``Linear8bitLt`` and ``Linear4bit`` layers.

Both formats keep a statistic per output row (8-bit: ``SCB``, the row absmax) or per block of
``blocksize`` consecutive elements of the flattened ``(out, in)`` weight (4-bit: ``absmax``).
An output-side scale ``l`` therefore folds exactly into the statistic (and the bias): the codes
never change, and a signed statistic handles ``l < 0`` (bnb's CPU and CUDA kernels multiply by it).

Where bitsandbytes 0.50 keeps things (measured on CPU):

* 8-bit: after ``.to(device)`` the codes and statistic are ``weight.CB`` (= ``weight.data``) and
  ``weight.SCB``; the first forward (train or eval) moves them to ``state.CB``/``state.SCB`` and
  sets the weight's to None (``weight.data`` keeps sharing ``state.CB``'s storage). Eval uses the
  int8 matmul (``int8_scaled_mm``, also with an outlier ``threshold``), train on CPU dequantizes
  ``CB * SCB / 127``; both read ``state.SCB``. ``has_fp16_weights=True`` (or a layer not quantized
  yet) keeps a float master weight instead, and bnb re-derives CB/SCB from it.
* 4-bit, canonical layout: packed codes ``(out*in/2, 1)``, ``quant_state.absmax`` fp32
  ``(out*in/blocksize,)`` or, with double quant, uint8 codes plus ``state2`` (fp32 absmax per 256
  entries) and a scalar ``offset``.
* 4-bit, CPU-repacked layout: on its first eval-mode forward without grad on an AVX512-BF16 CPU,
  ``Linear4bit`` permutes the codes to ``(out, in/2)`` for its fused kernel, decodes any nested
  absmax and stores it as **bf16** laid out ``(in/blocksize, out)``; ``quant_state.dtype`` becomes
  bf16 and ``packing_format_for_cpu`` is set. The fused kernel casts absmax (and activations) to
  bf16 whatever dtype it is given, so a scaled absmax cannot be stored there exactly: bf16(a * l)
  differs from bf16(a) * l by up to 2^-9 relative per block. The exact path ("unnest") therefore
  undoes the permutation (bijective, bit exact), widens the bf16 absmax to fp32 (exact), scales it
  and sets ``module.support_avx512bf16_for_cpu = False`` so bnb does not repack (and round) it
  again: the layer then runs bnb's dequantize + matmul path in its compute dtype. ``"renest"``
  keeps whatever layout the layer has (nested uint8 absmax, or the repacked bf16 one) and accepts
  that layout's rounding.

``snapshot``/``restore`` keep the small statistics (and the pin flag); the repacked permutation is
recomputed on restore rather than stored.
"""

from __future__ import annotations

import copy
from typing import Any, Optional

import torch
from torch import Tensor, nn

import bitsandbytes as bnb
import bitsandbytes.functional as bnbF
from bitsandbytes.functional import QuantState

from ..errors import FoldError
from .base import FoldOptions, Snapshot, register_backend
from .math import fold_vector, scale_dense

__all__ = ["Int8Backend", "FourBitBackend", "INT8", "FOUR_BIT"]

_DEFAULT = FoldOptions()
_DOUBLE_QUANT = ("unnest", "renest")
# Linear4bit's own switch for the CPU repack; False pins a folded layer to the canonical layout.
_PIN = "support_avx512bf16_for_cpu"


# --------------------------------------------------------------------------- shared helpers


def _check_double_quant(options: FoldOptions) -> str:
    mode = options.double_quant
    if mode not in _DOUBLE_QUANT:
        raise FoldError(
            f"double_quant={mode!r} is not a valid choice; use 'unnest' (exact, fp32 absmax) or "
            "'renest' (keeps bitsandbytes' layout, re-quantizing the scaled statistics)"
        )
    return mode


def _scale_bias(module: nn.Module, rows: Tensor) -> None:
    bias = getattr(module, "bias", None)
    if bias is not None:
        bias.data.copy_((bias.data.to(rows.dtype) * rows).to(bias.dtype))


def _snap_bias(module: nn.Module) -> Optional[Tensor]:
    bias = getattr(module, "bias", None)
    return None if bias is None else bias.data.detach().clone()


def _restore_bias(module: nn.Module, saved: Optional[Tensor]) -> None:
    if saved is not None:
        module.bias.data = saved.clone()  # also restores a dtype that a forward may have cast


def _unique(tensors: list[Optional[Tensor]]) -> list[Tensor]:
    """The distinct tensors among ``tensors`` (bnb aliases weight.data, weight.CB and state.CB)."""
    seen: set[tuple[int, tuple[int, ...]]] = set()
    out = []
    for t in tensors:
        if t is None:
            continue
        key = (t.data_ptr(), tuple(t.shape))
        if key not in seen:
            seen.add(key)
            out.append(t)
    return out


# --------------------------------------------------------------------------- 8-bit


def _int8_float_master(module: nn.Module) -> bool:
    """True when the layer keeps a float weight (``has_fp16_weights`` or not quantized yet)."""
    return module.weight.dtype != torch.int8


def _int8_scbs(module: bnb.nn.Linear8bitLt) -> list[Tensor]:
    return _unique([getattr(module.weight, "SCB", None), module.state.SCB])


def _int8_cbs(module: bnb.nn.Linear8bitLt) -> list[Tensor]:
    return _unique([module.weight.data, getattr(module.weight, "CB", None), module.state.CB])


def _int8_active(module: bnb.nn.Linear8bitLt) -> tuple[Tensor, Tensor]:
    """(CB, SCB) the next forward uses: the weight's until ``init_8bit_state`` moves them."""
    cb, scb = getattr(module.weight, "CB", None), getattr(module.weight, "SCB", None)
    if cb is not None and scb is not None:
        return cb, scb
    if module.state.CB is not None and module.state.SCB is not None:
        return module.state.CB, module.state.SCB
    raise FoldError(
        f"{type(module).__name__} has int8 weights but no row statistic (SCB); it was not quantized by "
        "bitsandbytes (load it with BitsAndBytesConfig or call module.to(device))"
    )


def _int8_reset_cache(module: bnb.nn.Linear8bitLt) -> None:
    # Float-master layers: bnb re-derives CB/SCB from the float weight when these are None.
    module.state.CB = None
    module.state.SCB = None


class Int8Backend:
    """``bnb.nn.Linear8bitLt``: an output-side scale folds into the row statistic ``SCB``."""

    name = "bnb-int8"

    def handles(self, module: nn.Module) -> bool:
        return isinstance(module, bnb.nn.Linear8bitLt)

    def features(self, module: nn.Module) -> tuple[int, int]:
        assert isinstance(module, bnb.nn.Linear8bitLt)  # handles() accepted it
        return module.out_features, module.in_features

    def exact_rows(self, module: nn.Module) -> Optional[str]:
        return None

    def exact_cols(self, module: nn.Module) -> Optional[str]:
        return (
            "Linear8bitLt keeps one absmax per output row (SCB); a column scale cuts across every "
            "row's statistic and changes the int8 codes, so it cannot fold exactly; requantize instead"
        )

    def snapshot(self, module: nn.Module, *, weights: bool) -> Snapshot:
        assert isinstance(module, bnb.nn.Linear8bitLt)  # handles() accepted it
        snap: Snapshot = {"bias": _snap_bias(module)}
        if _int8_float_master(module):
            snap["weight"] = module.weight.data.detach().clone()
            return snap
        cb, scb = _int8_active(module)
        snap["SCB"] = scb.detach().clone()
        if weights:
            snap["CB"] = cb.detach().clone()
        return snap

    def restore(self, module: nn.Module, snap: Snapshot) -> None:
        assert isinstance(module, bnb.nn.Linear8bitLt)  # handles() accepted it
        with torch.no_grad():
            if "weight" in snap:
                module.weight.data = snap["weight"].clone()
                _int8_reset_cache(module)
            else:
                # Write back in place so every alias (weight.data / weight.CB / state.CB) agrees.
                for t in _int8_scbs(module):
                    t.copy_(snap["SCB"])
                if "CB" in snap:
                    for t in _int8_cbs(module):
                        t.copy_(snap["CB"])
            _restore_bias(module, snap["bias"])

    def scale_rows(self, module: nn.Module, rows: Tensor, *, options: FoldOptions = _DEFAULT) -> str:
        assert isinstance(module, bnb.nn.Linear8bitLt)  # handles() accepted it
        w = module.weight
        l = fold_vector(rows, module.out_features, "rows", type(module).__name__, w.device)
        with torch.no_grad():
            if _int8_float_master(module):
                w.data.copy_((w.data.float() * l.float()[:, None]).to(w.dtype))
                _int8_reset_cache(module)
            else:
                _int8_active(module)  # raises when there is no statistic to scale
                for scb in _int8_scbs(module):
                    scb.copy_((scb.to(l.dtype) * l).to(scb.dtype))
            _scale_bias(module, l)
        return "statistic"

    def scale_cols(self, module: nn.Module, cols: Tensor, *, options: FoldOptions = _DEFAULT) -> str:
        raise FoldError(self.exact_cols(module) or "")

    def requantize(
        self, module: nn.Module, rows: Optional[Tensor], cols: Optional[Tensor], *, options: FoldOptions = _DEFAULT
    ) -> str:
        assert isinstance(module, bnb.nn.Linear8bitLt)  # handles() accepted it
        w = module.weight
        with torch.no_grad():
            dense = self.dequantize(module)
            l = scale_dense(dense, rows, cols, type(module).__name__)
            if _int8_float_master(module):
                w.data.copy_(dense.to(w.dtype))
                _int8_reset_cache(module)
            else:
                # Same quantizer and input dtype as Int8Params._quantize.
                cb_new, scb_new, _ = bnbF.int8_vectorwise_quant(dense.to(torch.float16))
                for t in _int8_cbs(module):
                    t.copy_(cb_new)
                for t in _int8_scbs(module):
                    t.copy_(scb_new)
            if l is not None:
                _scale_bias(module, l)
        return "requantize"

    def dequantize(self, module: nn.Module) -> Tensor:
        assert isinstance(module, bnb.nn.Linear8bitLt)  # handles() accepted it
        if _int8_float_master(module):
            return module.weight.data.detach().float().clone()
        cb, scb = _int8_active(module)
        return bnbF.int8_vectorwise_dequant(cb, scb).float()


# --------------------------------------------------------------------------- 4-bit


def _qstate(module: nn.Module) -> Optional[QuantState]:
    qs = getattr(module.weight, "quant_state", None)
    return qs if qs is not None else getattr(module, "quant_state", None)


def _repacked(qs: QuantState) -> bool:
    return bool(getattr(qs, "packing_format_for_cpu", False))


def _was_nested(qs: QuantState) -> bool:
    """Whether the layer was double-quantized (the CPU repack decodes it but remembers)."""
    return bool(qs.original_nested) if _repacked(qs) else bool(qs.nested)


def _unpack_cpu(data: Tensor, qs: QuantState) -> Tensor:
    """Codes of a CPU-repacked weight back in the canonical packed layout (bit exact)."""
    tmp = copy.copy(qs)  # the inverse rewrites fields of the state it gets; keep ours intact
    # bnb would re-nest the bf16 absmax, lossily; we only want codes. (QuantState declares no
    # original_nested: bnb's CPU repack sets it.)
    tmp.original_nested = False  # type: ignore[attr-defined]
    codes, _ = bnbF._convert_weight_packed_for_cpu_inverse(data, tmp)
    return codes


def _pack_cpu(data: Tensor, shape: torch.Size, blocksize: int) -> Tensor:
    """Canonical codes permuted into bnb's CPU layout (what its first eval forward does)."""
    blocks = shape[0] * shape[1] // blocksize
    tmp = QuantState(absmax=torch.zeros(blocks), shape=shape, blocksize=blocksize, dtype=torch.float32)
    packed, _ = bnbF._convert_weight_packed_for_cpu(data, tmp)
    return packed


def _absmax_rows(qs: QuantState) -> Tensor:
    """Decoded absmax as fp32 ``(out, in/blocksize)``, whatever the layout."""
    out = qs.shape[0]
    if _repacked(qs):
        return qs.absmax.t().float().contiguous()  # stored bf16 (in/bs, out); widening is exact
    if qs.nested:
        decoded = bnbF.dequantize_blockwise(qs.absmax, qs.state2) + qs.offset
        return decoded.float().reshape(out, -1)
    return qs.absmax.float().reshape(out, -1)


def _nest(absmax: Tensor) -> dict[str, Any]:
    """Double-quantize an fp32 absmax exactly as ``bnb.functional.quantize_4bit`` does."""
    offset = absmax.mean()
    qabsmax, state2 = bnbF.quantize_blockwise(absmax - offset, blocksize=256)
    return {"absmax": qabsmax, "offset": offset, "state2": state2, "nested": True}


def _set_fields(qs: QuantState, fields: dict[str, Any]) -> None:
    """Replace a QuantState's fields in place (module.quant_state and weight.quant_state alias it)."""
    qs.__dict__.clear()
    qs.__dict__.update(fields)


def _canonical_fields(qs: QuantState, **changes: Any) -> dict[str, Any]:
    """``qs``'s fields in the canonical layout (repack bookkeeping dropped), with ``changes``."""
    fields = {k: v for k, v in vars(qs).items() if not k.startswith("original_")}
    if _repacked(qs):
        fields["dtype"] = qs.original_dtype
    fields.pop("packing_format_for_cpu", None)
    fields.update(state2=None, offset=None, nested=False)
    fields.update(changes)
    return fields


def _clone_fields(fields: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in fields.items():
        if isinstance(v, Tensor):
            out[k] = v.detach().clone()
        elif isinstance(v, QuantState):
            state2 = QuantState.__new__(QuantState)
            state2.__dict__.update(_clone_fields(vars(v)))
            out[k] = state2
        else:
            out[k] = v
    return out


class FourBitBackend:
    """``bnb.nn.Linear4bit`` (nf4/fp4): an output-side scale folds into each row's block absmax."""

    name = "bnb-4bit"

    def handles(self, module: nn.Module) -> bool:
        return isinstance(module, bnb.nn.Linear4bit)

    def features(self, module: nn.Module) -> tuple[int, int]:
        assert isinstance(module, bnb.nn.Linear4bit)  # handles() accepted it
        return module.out_features, module.in_features

    def exact_rows(self, module: nn.Module) -> Optional[str]:
        qs = _qstate(module)
        if qs is None:
            return (
                "Linear4bit weight is not quantized yet (no quant_state); move the layer to a device "
                "(module.to('cpu') or .cuda()) so bitsandbytes quantizes it"
            )
        if tuple(qs.shape) != (module.out_features, module.in_features):
            return (
                f"Linear4bit weight was quantized with shape {tuple(qs.shape)}, not (out, in) = "
                f"{(module.out_features, module.in_features)}; its blocks do not follow output rows"
            )
        if module.in_features % qs.blocksize:
            return (
                f"in_features={module.in_features} is not a multiple of the 4-bit blocksize "
                f"{qs.blocksize}: blocks of the flattened weight straddle output rows, so a row scale "
                "cannot fold into the block absmax exactly; requantize instead"
            )
        return None

    def exact_cols(self, module: nn.Module) -> Optional[str]:
        return (
            "Linear4bit keeps one absmax per block of consecutive elements of a row; a column scale "
            "changes values inside every block and so the 4-bit codes; requantize instead"
        )

    def snapshot(self, module: nn.Module, *, weights: bool) -> Snapshot:
        assert isinstance(module, bnb.nn.Linear4bit)  # handles() accepted it
        qs = _qstate(module)
        if qs is None:
            raise FoldError(self.exact_rows(module) or "")
        snap: Snapshot = {
            "weight.quant_state": _clone_fields(vars(qs)),
            "bias": _snap_bias(module),
            _PIN: getattr(module, _PIN, None),
        }
        if weights:
            snap["weight.data"] = module.weight.data.detach().clone()
        return snap

    def restore(self, module: nn.Module, snap: Snapshot) -> None:
        assert isinstance(module, bnb.nn.Linear4bit)  # handles() accepted it
        qs = _qstate(module)
        assert qs is not None  # snapshot() refused a layer without one
        fields = _clone_fields(snap["weight.quant_state"])
        with torch.no_grad():
            if "weight.data" in snap:
                module.weight.data = snap["weight.data"].clone()
            elif _repacked(qs) != bool(fields.get("packing_format_for_cpu", False)):
                # Codes are unchanged by exact folds; only the CPU permutation may differ.
                if _repacked(qs):
                    module.weight.data = _unpack_cpu(module.weight.data, qs)
                else:
                    module.weight.data = _pack_cpu(module.weight.data, fields["shape"], fields["blocksize"])
            _set_fields(qs, fields)
            module.weight.quant_state = qs  # type: ignore[attr-defined]  # a Params4bit, typed as nn.Linear's Tensor
            module.quant_state = qs
            _restore_bias(module, snap["bias"])
            if snap.get(_PIN) is not None:
                setattr(module, _PIN, snap[_PIN])

    def scale_rows(self, module: nn.Module, rows: Tensor, *, options: FoldOptions = _DEFAULT) -> str:
        reason = self.exact_rows(module)
        if reason is not None:
            raise FoldError(reason)
        mode = _check_double_quant(options)
        assert isinstance(module, bnb.nn.Linear4bit)  # handles() accepted it
        qs = _qstate(module)
        assert qs is not None  # exact_rows() refused a layer without one
        l = fold_vector(rows, module.out_features, "rows", type(module).__name__, module.weight.device)
        with torch.no_grad():
            if _repacked(qs) and mode == "renest":
                # Keep bnb's fused CPU layout: bf16 absmax (in/bs, out); costs one bf16 rounding.
                qs.absmax = (qs.absmax.to(l.dtype) * l[None, :]).to(qs.absmax.dtype)
            else:
                scaled = (_absmax_rows(qs).to(l.dtype) * l[:, None]).float().reshape(-1)
                stats = _nest(scaled) if (mode == "renest" and _was_nested(qs)) else {"absmax": scaled}
                if _repacked(qs):
                    module.weight.data = _unpack_cpu(module.weight.data, qs)
                _set_fields(qs, _canonical_fields(qs, **stats))
                if mode == "unnest" and hasattr(module, _PIN):
                    # bnb's CPU repack would round the scaled absmax to bf16 (see module docstring).
                    setattr(module, _PIN, False)
            _scale_bias(module, l)
        return "statistic"

    def scale_cols(self, module: nn.Module, cols: Tensor, *, options: FoldOptions = _DEFAULT) -> str:
        raise FoldError(self.exact_cols(module) or "")

    def requantize(
        self, module: nn.Module, rows: Optional[Tensor], cols: Optional[Tensor], *, options: FoldOptions = _DEFAULT
    ) -> str:
        assert isinstance(module, bnb.nn.Linear4bit)  # handles() accepted it
        qs = _qstate(module)
        if qs is None:
            raise FoldError(self.exact_rows(module) or "")
        w = module.weight
        dtype = qs.original_dtype if _repacked(qs) else qs.dtype
        with torch.no_grad():
            dense = self.dequantize(module)
            l = scale_dense(dense, rows, cols, type(module).__name__)
            data, new = bnbF.quantize_4bit(
                dense,
                blocksize=qs.blocksize,
                compress_statistics=bool(getattr(w, "compress_statistics", _was_nested(qs))),
                quant_type=qs.quant_type,
                quant_storage=getattr(w, "quant_storage", torch.uint8),
            )
            new.dtype = dtype  # quantized from fp32 for accuracy; keep the layer's own dtype
            w.data = data
            _set_fields(qs, vars(new))
            if l is not None:
                _scale_bias(module, l)
        return "requantize"

    def dequantize(self, module: nn.Module) -> Tensor:
        assert isinstance(module, bnb.nn.Linear4bit)  # handles() accepted it
        qs = _qstate(module)
        if qs is None:
            return module.weight.data.detach().float().clone()
        if _repacked(qs):
            data = _unpack_cpu(module.weight.data, qs)
            state = QuantState(
                absmax=_absmax_rows(qs).reshape(-1),
                shape=qs.shape,
                code=qs.code,
                blocksize=qs.blocksize,
                quant_type=qs.quant_type,
                dtype=torch.float32,
            )
        else:
            data = module.weight.data
            state = copy.copy(qs)
            state.dtype = torch.float32  # the fp32 product code * absmax, before any compute cast
        return bnbF.dequantize_4bit(data, state).float()


INT8 = register_backend(Int8Backend())
FOUR_BIT = register_backend(FourBitBackend())
