"""Pure math on GGUF (llama.cpp) tensor bytes: scale rows through block scales, floats elementwise.

Every ggml quant type below keeps its blocks inside one row (along ``ne0``, the input features)
and dequantizes as a function that is linear in the block's fp16 super-scale(s): ``y = d * f(q)``
or ``y = d * f(q) - dmin * g(q)``. So ``diag(l) W`` is the same quants with every scale of row
``i`` multiplied by ``l[i]`` (negative ``l`` too); the only error is rounding the new scales to
fp16. Byte offsets of those fp16 fields inside one block, from ggml-common.h:

====================  ==========  ===========================================================
type                  block size  fp16 scale fields (byte offset in the block)
====================  ==========  ===========================================================
Q4_0, Q5_0, Q8_0      32          d @0
Q4_1, Q5_1            32          d @0, m @2
IQ4_NL                32          d @0
Q2_K                  256         d @80, dmin @82 (after scales[16], qs[64])
Q3_K                  256         d @108 (after hmask[32], qs[64], scales[12])
Q4_K, Q5_K            256         d @0, dmin @2
Q6_K                  256         d @208 (after ql[128], qh[64], scales[16])
IQ2_XXS/XS/S, IQ3_*   256         d @0
IQ1_S, IQ4_XS         256         d @0
IQ1_M                 256         d split in the top nibbles of the four uint16 scales @48
TQ1_0                 256         d @52
TQ2_0                 256         d @64
====================  ==========  ===========================================================

MXFP4 (power-of-two E8M0 scales) and NVFP4 (UE4M3 sub-scales) have no exact path. No I/O here:
functions take and return numpy arrays of one tensor's bytes, ``(rows, bytes per row)``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import numpy as np

if TYPE_CHECKING:
    from gguf import GGMLQuantizationType

__all__ = [
    "ScaleStats",
    "exact_types",
    "float_types",
    "scale_rows",
    "scale_cols",
    "dequantize",
    "requantize",
    "can_requantize",
]

_F16_SUBNORMAL = np.float32(2.0**-14)  # smallest normal fp16: below it rounding is absolute
_COARSE = 1e-2  # a relative rounding error of a scale that the fold warns about


def _types() -> type[GGMLQuantizationType]:  # the gguf package is optional: import on first use
    from gguf import GGMLQuantizationType as T

    return T


def _fields() -> dict[int, tuple[int, ...]]:
    T = _types()
    return {
        T.Q4_0: (0,),
        T.Q4_1: (0, 2),
        T.Q5_0: (0,),
        T.Q5_1: (0, 2),
        T.Q8_0: (0,),
        T.IQ4_NL: (0,),
        T.Q2_K: (80, 82),
        T.Q3_K: (108,),
        T.Q4_K: (0, 2),
        T.Q5_K: (0, 2),
        T.Q6_K: (208,),
        T.IQ2_XXS: (0,),
        T.IQ2_XS: (0,),
        T.IQ2_S: (0,),
        T.IQ3_XXS: (0,),
        T.IQ3_S: (0,),
        T.IQ1_S: (0,),
        T.IQ4_XS: (0,),
        T.TQ1_0: (52,),
        T.TQ2_0: (64,),
    }


_IQ1_M_SCALES = 48  # offset of IQ1_M's uint16 scales[4] (after qs[32], qh[16])


def exact_types() -> frozenset[int]:
    """The quant types whose rows scale exactly through their block scales."""
    return frozenset(_fields()) | {_types().IQ1_M}


def float_types() -> frozenset[int]:
    """Unquantized types, scaled elementwise (rows and columns)."""
    T = _types()
    return frozenset({T.F32, T.F16, T.BF16})


@dataclass
class ScaleStats:
    """How the rewritten fp16 scales of one tensor compare with the exact products."""

    max_rel: float = 0.0  # largest |fp16(s * l) - s * l| / |s * l| over non-zero products
    subnormal: int = 0  # new scales below fp16's normal range that rounding moved by more than 1%
    overflow: int = 0  # products beyond fp16's range (the fold refuses these)


def _block_view(raw: np.ndarray, qtype: int) -> np.ndarray:
    from gguf import GGML_QUANT_SIZES

    _, type_size = GGML_QUANT_SIZES[_types()(qtype)]
    rows = raw.shape[0]
    return raw.reshape(rows, -1, type_size)


def _round_f16(exact: np.ndarray, stats: ScaleStats) -> np.ndarray:
    with np.errstate(over="ignore"):
        new = exact.astype(np.float16)
    stats.overflow += int(np.count_nonzero(np.isinf(new) & np.isfinite(exact)))
    nz = exact != 0
    if nz.any():
        err = np.abs(new.astype(np.float64)[nz] - exact[nz]) / np.abs(exact[nz])
        stats.max_rel = max(stats.max_rel, float(err.max()))
        # below fp16's normal range the rounding step is fixed (2^-24): count the scales it moves by
        # more than 1% (fewer than ~50 steps), including products that underflow to 0
        coarse = (np.abs(new[nz]) < _F16_SUBNORMAL) & (err > _COARSE)
        stats.subnormal += int(np.count_nonzero(coarse))
    return new


def scale_rows(raw: np.ndarray, qtype: int, rows: np.ndarray) -> tuple[np.ndarray, ScaleStats]:
    """``diag(rows) W`` on one tensor's bytes, ``(n_rows, bytes per row)`` uint8.

    Quantized types: every fp16 block scale of row ``i`` times ``rows[i]``, rounded to fp16 once
    (nothing else changes). Float types: every element, computed in float32 and rounded once.

    Returns:
        The new bytes (same shape and size) and the rounding statistics of the new scales.
    """
    stats = ScaleStats()
    rows64 = rows.astype(np.float64).reshape(-1, 1)
    if qtype in float_types():
        return _float_scale(raw, qtype, rows.astype(np.float32).reshape(-1, 1)), stats
    blocks = _block_view(raw, qtype).copy()
    T = _types()
    if qtype == T.IQ1_M:
        sc = blocks[:, :, _IQ1_M_SCALES : _IQ1_M_SCALES + 8].copy().view(np.uint16)  # (rows, nb, 4)
        bits = np.zeros(sc.shape[:2], dtype=np.uint16)
        for i in range(4):
            bits |= ((sc[..., i] >> np.uint16(12)) & np.uint16(0xF)) << np.uint16(4 * i)
        exact = bits.view(np.float16).astype(np.float64) * rows64
        new = _round_f16(exact, stats).view(np.uint16)
        for i in range(4):
            sc[..., i] = (sc[..., i] & np.uint16(0x0FFF)) | (
                ((new >> np.uint16(4 * i)) & np.uint16(0xF)) << np.uint16(12)
            )
        blocks[:, :, _IQ1_M_SCALES : _IQ1_M_SCALES + 8] = sc.view(np.uint8).reshape(sc.shape[0], sc.shape[1], 8)
    else:
        for off in _fields()[qtype]:
            old = blocks[:, :, off : off + 2].copy().view(np.float16)[..., 0]  # (rows, nb)
            new = _round_f16(old.astype(np.float64) * rows64, stats)
            blocks[:, :, off : off + 2] = new.reshape(new.shape + (1,)).view(np.uint8)
    return blocks.reshape(raw.shape), stats


def scale_cols(raw: np.ndarray, qtype: int, cols: np.ndarray) -> np.ndarray:
    """``W diag(cols)`` for a float tensor's bytes (quantized blocks span columns: no exact path)."""
    if qtype not in float_types():
        raise ValueError(f"column scales need a float tensor, not type {qtype}")
    return _float_scale(raw, qtype, cols.astype(np.float32).reshape(1, -1))


def _float_scale(raw: np.ndarray, qtype: int, scale: np.ndarray) -> np.ndarray:
    T = _types()
    n = raw.shape[0]
    if qtype == T.F32:
        return (raw.view(np.float32) * scale).astype(np.float32).view(np.uint8).reshape(n, -1)
    if qtype == T.F16:
        return (raw.view(np.float16).astype(np.float32) * scale).astype(np.float16).view(np.uint8).reshape(n, -1)
    return _to_bf16(_from_bf16(raw) * scale).view(np.uint8).reshape(n, -1)


def _from_bf16(raw: np.ndarray) -> np.ndarray:
    return (raw.view(np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)


def _to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits, round to nearest even (ggml_compute_fp32_to_bf16)."""
    n = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    nan = (n & 0x7FFFFFFF) > 0x7F800000
    n = np.where(nan, (n & 0xFFFF0000) | (64 << 16), n + (0x7FFF + ((n >> 16) & 1)))
    return (n >> 16).astype(np.uint16)


def dequantize(raw: np.ndarray, qtype: int) -> np.ndarray:
    """The tensor as float32 ``(n_rows, ne0)`` (ggml's reference dequantization, in numpy)."""
    from gguf import quants

    T = _types()
    n = raw.shape[0]
    if qtype == T.BF16:
        return _from_bf16(raw).reshape(n, -1)
    if qtype == T.F32:
        return raw.view(np.float32).reshape(n, -1).copy()
    if qtype == T.F16:
        return raw.view(np.float16).astype(np.float32).reshape(n, -1)
    return quants.dequantize(raw, T(qtype)).reshape(n, -1)


@functools.lru_cache(maxsize=None)
def can_requantize(qtype: int) -> bool:
    """True when the gguf package can quantize this type again (dequantize-scale-requantize)."""
    from gguf import GGML_QUANT_SIZES, quants

    if qtype in float_types():
        return True
    try:
        t = _types()(qtype)  # gguf's functions take the enum (an int crashes their NotImplementedError message)
        quants.quantize(np.zeros((1, GGML_QUANT_SIZES[t][0]), dtype=np.float32), t)
    except (NotImplementedError, KeyError, ValueError):  # ValueError: a code this gguf version does not know
        return False
    return True


def requantize(raw: np.ndarray, qtype: int, rows: Optional[np.ndarray], cols: Optional[np.ndarray]) -> np.ndarray:
    """Lossy: dequantize, scale rows and columns in float32, quantize to the same type again."""
    from gguf import quants

    w = dequantize(raw, qtype)
    if rows is not None:
        w = w * rows.astype(np.float32).reshape(-1, 1)
    if cols is not None:
        w = w * cols.astype(np.float32).reshape(1, -1)
    T = _types()
    if qtype == T.BF16:
        return _to_bf16(w).view(np.uint8).reshape(raw.shape)
    return np.ascontiguousarray(quants.quantize(w.astype(np.float32), T(qtype))).view(np.uint8).reshape(raw.shape)
