"""Quantized checkpoint tensors written to each format's own specification, and reference dequantizers.

A test helper: ``*_quantize`` writes the tensors one quantized ``nn.Linear`` (weight ``w`` of shape
``[out, in]``) has in a checkpoint, under the names the format uses (suffixes after the module
path); ``*_dequantize`` turns them back into a float32 ``[out, in]`` weight. The dequantizers are
ports of the formats' own library code (each cites the file and function it follows); the writers
use round-to-nearest (RTN) with the format's own scale/zero rules, which is all a checkpoint's
layout depends on. bitsandbytes is the exception: its tensors are made and read by the installed
bitsandbytes itself (``bnb_state``/``bnb_dequantize``), the way transformers saves and reads them.

Sources (snapshots read for this file):

* GPTQ v1: ModelCloud/GPTQModel @ f4c327a1 ``gptqmodel/utils/model_dequant.py`` and
  ``gptqmodel/nn_modules/qlinear/__init__.py``; AutoGPTQ/AutoGPTQ @ 9f7d3707
  ``auto_gptq/nn_modules/qlinear/qlinear_cuda.py`` / ``qlinear_cuda_old.py``.
* AWQ: casper-hansen/AutoAWQ @ 88e4c76b ``awq/utils/packing_utils.py``,
  ``awq/modules/linear/gemm.py``, ``awq/modules/linear/gemv.py``, ``awq/quantize/quantizer.py``;
  casper-hansen/AutoAWQ_kernels ``awq_ext/quantization/gemv_cuda.cu``.
* MLX: ml-explore/mlx @ 846d1762 ``mlx/ops.cpp`` (``affine_quantize``, ``pack_and_quantize``,
  ``affine_dequantize``) and ``mlx/backend/cpu/quantized.cpp`` (``quantize``); ml-explore/mlx-lm
  @ d78bf58e ``mlx_lm/utils.py`` (``quantize_model``).
* bitsandbytes: the installed package (``bnb.nn.Linear8bitLt`` / ``Linear4bit``
  ``_save_to_state_dict``, ``bnb.functional``), as transformers' ``integrations/bitsandbytes.py``
  uses it.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "GPTQ_BITS",
    "MLX_BITS",
    "MLX_GROUP_SIZES",
    "awq_dequantize",
    "awq_quantize",
    "bnb_dequantize",
    "bnb_state",
    "bnb_unnest",
    "gptq_dequantize",
    "gptq_quantize",
    "mlx_dequantize",
    "mlx_quantize",
    "pack_bitstream",
    "quant_config",
    "unpack_bitstream",
]

GPTQ_BITS = (2, 3, 4, 8)
MLX_BITS = (2, 3, 4, 5, 6, 8)
MLX_GROUP_SIZES = (32, 64, 128)
AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # AutoAWQ awq/utils/packing_utils.py
AWQ_REVERSE_ORDER = [0, 4, 1, 5, 2, 6, 3, 7]  # AutoAWQ awq/utils/packing_utils.py

_U32 = (1 << 32) - 1


# --------------------------------------------------------------------------------------------------
# bit packing shared by the writers
# --------------------------------------------------------------------------------------------------


def _to_int32(words: Tensor) -> Tensor:
    """int64 words in [0, 2**32) -> the int32 tensor with the same bits."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def pack_bitstream(values: Tensor, bits: int) -> Tensor:
    """Pack unsigned ``bits``-wide codes along the last dim into int32 words, LSB first.

    Code ``k`` occupies bits ``k*bits .. k*bits+bits-1`` of the little-endian bit stream made of the
    words, so a code may straddle two words. This is the layout of GPTQ's ``qweight``/``qzeros``
    (2/4/8 bits: code ``j`` of a word at shift ``bits*j``; 3 bits: 32 codes in 3 words, code 10 split
    2+1 bits and code 21 split 1+2 bits, as GPTQModel ``PackableQuantLinear.pack_original`` and
    ``model_dequant._pack_cols_3bit`` write it) and of MLX's ``weight`` (``pack_and_quantize`` in
    mlx/ops.cpp; 3/5/6 bits as bytes in mlx/backend/cpu/quantized.cpp ``quantize``).
    """
    n = values.shape[-1]
    if (n * bits) % 32:
        raise ValueError(f"{n} codes of {bits} bits do not fill whole 32-bit words")
    v = values.to(torch.int64)
    if bool(((v < 0) | (v >= 1 << bits)).any()):
        raise ValueError(f"codes out of range for {bits} bits")
    stream = ((v.unsqueeze(-1) >> torch.arange(bits)) & 1).reshape(*v.shape[:-1], n * bits // 32, 32)
    return _to_int32((stream << torch.arange(32)).sum(-1))


def unpack_bitstream(words: Tensor, bits: int) -> Tensor:
    """Inverse of :func:`pack_bitstream`: int32/uint32 words -> int64 codes along the last dim."""
    w = words.view(torch.int32).to(torch.int64) & _U32
    stream = ((w.unsqueeze(-1) >> torch.arange(32)) & 1).reshape(*w.shape[:-1], -1, bits)
    return (stream << torch.arange(bits)).sum(-1)


# --------------------------------------------------------------------------------------------------
# GPTQ, checkpoint_format "gptq" (v1)
# --------------------------------------------------------------------------------------------------


def gptq_quantize(w: Tensor, bits: int, group_size: int, sym: bool, desc_act: bool, seed: int = 0) -> dict[str, Tensor]:
    """GPTQ v1 tensors of one Linear: ``qweight``, ``qzeros``, ``scales``, ``g_idx``.

    * ``qweight`` int32 ``[in*bits/32, out]``: codes packed along the input dim (see
      :func:`pack_bitstream`); needs ``in % 32 == 0`` for 3 bits, ``in % (32/bits) == 0`` otherwise.
    * ``qzeros`` int32 ``[groups, out*bits/32]``: zero points **minus one** (v1), packed along out.
    * ``scales`` fp16 ``[groups, out]``; ``g_idx`` int32 ``[in]``: group of each input column.
    * dequantized ``w[o, i] = scales[g_idx[i], o] * (q[i, o] - (z[g_idx[i], o] + 1))``.

    ``groups = ceil(in / group_size)`` (``group_size=-1``: one group). ``desc_act`` (act-order):
    GPTQ quantizes columns in a permuted order (here a random one from ``seed``, standing in for the
    Hessian order) and forms groups along it, so ``g_idx[i] = invperm[i] // group_size`` is not
    monotonic; ``qweight`` stays in the original column order (GPTQModel gptq.py: ``Q[:, invperm]``,
    ``g_idx[invperm]``). Scale/zero per group and row: GPTQModel ``Quantizer.find_params``
    (gptqmodel/quantization/quantizer.py). One deviation, for v1's ``zero-1`` storage: an
    asymmetric group whose zero point would be 0 (all values >= ~0) gets zero 1 and
    ``scale = xmax/(maxq-1)`` instead, since a stored ``-1`` is read as ``maxq+1`` by AutoGPTQ's
    ``qlinear_cuda`` but as 0 by ``qlinear_cuda_old``/GPTQModel (see ``gptq_dequantize``).
    """
    if bits not in GPTQ_BITS:
        raise ValueError(f"GPTQ v1 bits must be one of {GPTQ_BITS}, not {bits}")
    out_f, in_f = w.shape
    gs = in_f if group_size == -1 else group_size
    if gs <= 0:
        raise ValueError(f"group_size must be positive or -1, not {group_size}")
    maxq = 2**bits - 1
    n_groups = math.ceil(in_f / gs)
    W = w.detach().to(torch.float32)
    if desc_act:
        perm = torch.randperm(in_f, generator=torch.Generator().manual_seed(seed))
    else:
        perm = torch.arange(in_f)
    invperm = torch.argsort(perm)
    g_idx = (invperm // gs).to(torch.int32)

    scales = torch.empty(n_groups, out_f, dtype=torch.float16)
    zeros = torch.empty(n_groups, out_f, dtype=torch.int64)
    q = torch.empty(out_f, in_f, dtype=torch.int64)
    for g in range(n_groups):
        cols = perm[g * gs : (g + 1) * gs]
        x = W[:, cols]
        # GPTQModel Quantizer.find_params (perchannel, weight=True)
        tmp = torch.zeros(out_f)
        xmin = torch.minimum(x.min(1)[0], tmp)
        xmax = torch.maximum(x.max(1)[0], tmp)
        if sym:
            xmax = torch.maximum(xmin.abs(), xmax)
            neg = xmin < 0
            xmin[neg] = -xmax[neg]
        both0 = (xmin == 0) & (xmax == 0)
        xmin[both0] = -1
        xmax[both0] = 1
        scale = (xmax - xmin) / maxq
        if sym:
            zero = torch.full_like(scale, (maxq + 1) / 2)
        else:
            zero = torch.round(-xmin / scale)
            at0 = zero == 0  # v1 cannot store zero 0 unambiguously (zero-1 == -1)
            scale = torch.where(at0, xmax / (maxq - 1), scale)
            zero = torch.where(at0, torch.ones_like(zero), zero)
        s16 = scale.to(torch.float16)
        # GPTQModel quantizer.quantize: q = clamp(round(x / scale) + zero, 0, maxq), with the stored scale
        q[:, cols] = torch.clamp(torch.round(x / s16.float()[:, None]) + zero[:, None], 0, maxq).to(torch.int64)
        scales[g] = s16
        zeros[g] = zero.to(torch.int64)

    return {
        "qweight": pack_bitstream(q, bits).t().contiguous(),  # [out, in] packed along in, then transposed
        "qzeros": pack_bitstream(zeros - 1, bits),  # v1: zero - 1 (never -1 here, see above)
        "scales": scales,
        "g_idx": g_idx,
    }


def _gptq_unpack_rows(packed: Tensor, bits: int) -> Tensor:
    """GPTQModel gptqmodel/utils/model_dequant.py ``unpack_rows`` / ``_unpack_rows_3bit``."""
    p = packed.to(torch.int64)
    mask = (1 << bits) - 1
    if bits == 3:
        rows, cols = p.shape
        words = p.reshape(rows // 3, 3, cols)
        word0, word1, word2 = words[:, 0, :], words[:, 1, :], words[:, 2, :]
        out = torch.empty(rows // 3, 32, cols, dtype=torch.int64)
        for idx in range(10):
            out[:, idx, :] = (word0 >> (3 * idx)) & 0x7
        out[:, 10, :] = ((word0 >> 30) & 0x3) | ((word1 << 2) & 0x4)
        for idx in range(10):
            out[:, 11 + idx, :] = (word1 >> (1 + 3 * idx)) & 0x7
        out[:, 21, :] = ((word1 >> 31) & 0x1) | ((word2 << 1) & 0x6)
        for idx in range(10):
            out[:, 22 + idx, :] = (word2 >> (2 + 3 * idx)) & 0x7
        return out.reshape(-1, cols)
    pack_factor = 32 // bits
    pu = p & _U32
    out = torch.empty(p.shape[0] * pack_factor, p.shape[1], dtype=torch.int64)
    for i in range(pack_factor):
        out[i::pack_factor, :] = (pu >> (i * bits)) & mask
    return out


def _gptq_unpack_cols(packed: Tensor, bits: int) -> Tensor:
    """GPTQModel gptqmodel/utils/model_dequant.py ``unpack_cols`` / ``_unpack_cols_3bit``."""
    return _gptq_unpack_rows(packed.t(), bits).t()


def gptq_dequantize(t: dict[str, Tensor], bits: int) -> Tensor:
    """float32 ``[out, in]`` from GPTQ v1 tensors.

    Port of GPTQModel gptqmodel/utils/model_dequant.py ``convert_gptq_file`` for
    ``checkpoint_format="gptq"``: ``_correct_gptq_v1_qzeros`` (unpack, ``(z + 1) & mask``, which
    is GPTQModel's v1 -> v2 conversion, ``convert_gptq_v1_to_v2_format_module``), ``unpack_rows``,
    ``unpack_cols``, then ``(q - z[g_idx]) * scales[g_idx]``. AutoGPTQ ``qlinear_cuda.QuantLinear``
    (CPU path of ``forward``) computes the same (it masks before ``+ 1``, so it differs only for a
    stored ``-1``, which ``gptq_quantize`` never writes).
    """
    mask = (1 << bits) - 1
    zeros = (_gptq_unpack_cols(t["qzeros"], bits) + 1) & mask
    weight = _gptq_unpack_rows(t["qweight"], bits)
    g_idx = t["g_idx"].to(torch.long)
    scales = t["scales"].to(torch.float32)
    n_in = g_idx.shape[0]
    weight = weight[:n_in]
    zeros = zeros[:, : scales.shape[1]]
    return ((weight.to(torch.float32) - zeros.to(torch.float32)[g_idx]) * scales[g_idx]).t().contiguous()


# --------------------------------------------------------------------------------------------------
# AWQ (AutoAWQ), versions "gemm" and "gemv", 4 bits, zero_point=True
# --------------------------------------------------------------------------------------------------


def _awq_zeros_width(in_features: int, group_size: int, pack_num: int = 8) -> int:
    """AutoAWQ awq/modules/linear/gemv.py ``calculate_zeros_width``."""
    if group_size >= 128:
        size_multiplier = 1
    elif group_size == 64:
        size_multiplier = 2
    elif group_size == 32:
        size_multiplier = 4
    else:
        raise NotImplementedError(f"AWQ GEMV supports group sizes 32, 64 and >= 128, not {group_size}")
    base_width = -(-(in_features // group_size) // pack_num)
    return -(-base_width // size_multiplier) * size_multiplier


def awq_quantize(w: Tensor, bits: int = 4, group_size: int = 128, version: str = "gemm") -> dict[str, Tensor]:
    """AutoAWQ tensors of one Linear: ``qweight``, ``qzeros``, ``scales`` (all int32 but scales fp16).

    RTN scales/zeros as AutoAWQ ``AwqQuantizer.pseudo_quantize_tensor`` (zero_point=True, float32
    arithmetic here): ``scale = max(max - min, 1e-5) / 15``, ``zero = clamp(-round(min/scale), 0, 15)``,
    ``q = clamp(round(w/scale) + zero, 0, 15)``; dequantized ``w = (q - zero) * scale`` (no v1-style
    offset). ``group_size=-1``: one group per row.

    * ``"gemm"`` (``WQLinear_GEMM.from_linear``): ``qweight`` int32 ``[in, out/8]``, 8 output columns
      per word in AWQ's interleaved order ``[0, 2, 4, 6, 1, 3, 5, 7]`` (nibble ``i`` holds column
      ``8*c + order[i]``); ``qzeros`` int32 ``[in/group_size, out/8]`` (same packing);
      ``scales`` fp16 ``[in/group_size, out]``.
    * ``"gemv"`` (``WQLinear_GEMV.from_linear``): ``qweight`` int32 ``[out, in/8]``, natural order
      (nibble ``i`` = input ``8*c + i``); ``qzeros`` int32 ``[out, zw]`` and ``scales`` fp16
      ``[out, 8*zw]``, ``zw = calculate_zeros_width(in, group_size)`` (groups rounded up to whole
      words, padded with zeros); only group sizes 32, 64 and >= 128 (the CUDA kernel: 64 and 128).
    """
    if bits != 4:
        raise NotImplementedError("AutoAWQ packs 4-bit weights only")
    out_f, in_f = w.shape
    gs = in_f if group_size == -1 else group_size
    if in_f % gs or out_f % 8 or in_f % 8:
        raise ValueError(f"AWQ needs in % group_size == 0 and in, out % 8 == 0; got [{out_f}, {in_f}], {gs}")
    max_int = 2**bits - 1
    wg = w.detach().to(torch.float32).reshape(-1, gs)
    max_val = wg.amax(dim=1, keepdim=True)
    min_val = wg.amin(dim=1, keepdim=True)
    scales16 = ((max_val - min_val).clamp(min=1e-5) / max_int).to(torch.float16)
    s = scales16.to(torch.float32)
    zeros_g = (-torch.round(min_val / s)).clamp_(0, max_int)
    q = torch.clamp(torch.round(wg / s) + zeros_g, 0, max_int).to(torch.int64).reshape(out_f, in_f)
    scales = scales16.reshape(out_f, -1)  # [out, G]
    zeros = zeros_g.to(torch.int64).reshape(out_f, -1)  # [out, G]
    pack_num = 32 // bits

    if version == "gemm":
        intweight = q.t().contiguous()  # [in, out]
        zt = zeros.t().contiguous()  # [G, out]
        qweight = torch.zeros(in_f, out_f // pack_num, dtype=torch.int64)
        qzeros = torch.zeros(zt.shape[0], out_f // pack_num, dtype=torch.int64)
        for col in range(out_f // pack_num):
            for i in range(pack_num):
                qweight[:, col] |= intweight[:, col * pack_num + AWQ_ORDER[i]] << (i * bits)
                qzeros[:, col] |= zt[:, col * pack_num + AWQ_ORDER[i]] << (i * bits)
        return {"qweight": _to_int32(qweight), "qzeros": _to_int32(qzeros), "scales": scales.t().contiguous()}
    if version == "gemv":
        zw = _awq_zeros_width(in_f, gs)
        qscales = torch.zeros(out_f, zw * pack_num, dtype=torch.float16)
        qscales[:, : scales.shape[1]] = scales
        qweight = torch.zeros(out_f, in_f // pack_num, dtype=torch.int64)
        for col in range(in_f // pack_num):
            for i in range(pack_num):
                qweight[:, col] |= q[:, col * pack_num + i] << (i * bits)
        qzeros = torch.zeros(out_f, zw, dtype=torch.int64)
        for col in range((zeros.shape[1] + pack_num - 1) // pack_num):
            for i in range(pack_num):
                if col * pack_num + i < zeros.shape[1]:
                    qzeros[:, col] |= zeros[:, col * pack_num + i] << (i * bits)
        return {"qweight": _to_int32(qweight), "qzeros": _to_int32(qzeros), "scales": qscales}
    raise ValueError(f"AWQ version must be 'gemm' or 'gemv', not {version!r}")


def awq_dequantize(t: dict[str, Tensor], version: str = "gemm", group_size: int | None = None) -> Tensor:
    """float32 ``[out, in]`` from AutoAWQ tensors.

    ``"gemm"``: port of AutoAWQ awq/utils/packing_utils.py ``dequantize_gemm`` (``unpack_awq``,
    ``reverse_awq_order``, ``& 15``, ``(iweight - izeros) * scales`` repeated per group), transposed;
    AutoAWQ multiplies in fp16, this port in float32. The group size follows from the shapes
    (``in / scales.shape[0]``). ``"gemv"``: AutoAWQ has no torch dequantizer for it; this follows
    the CUDA kernel (AutoAWQ_kernels awq_ext/quantization/gemv_cuda.cu ``gemv_kernel_g64/_g128``:
    nibble ``k`` of word ``j`` is input ``8*j + k``, zero of group ``g`` is nibble ``g % 8`` of
    word ``g // 8``, ``scale * (q - zero)``); ``group_size`` is required, since the padded
    scales do not tell it.
    """
    bits = 4
    mask = (1 << bits) - 1
    shifts = torch.arange(0, 32, bits)
    if version == "gemm":
        qweight, qzeros, scales = t["qweight"], t["qzeros"], t["scales"]
        # unpack_awq: right-shift int32, keep the low byte (int8), mask later
        iweights = torch.bitwise_right_shift(qweight[:, :, None], shifts[None, None, :]).to(torch.int8)
        iweights = iweights.view(iweights.shape[0], -1)
        izeros = torch.bitwise_right_shift(qzeros[:, :, None], shifts[None, None, :]).to(torch.int8)
        izeros = izeros.view(izeros.shape[0], -1)
        # reverse_awq_order
        order = torch.arange(iweights.shape[-1]).view(-1, 32 // bits)[:, AWQ_REVERSE_ORDER].view(-1)
        iweights, izeros = iweights[:, order], izeros[:, order]
        iweights = torch.bitwise_and(iweights, mask).to(torch.float32)
        izeros = torch.bitwise_and(izeros, mask).to(torch.float32)
        gs = qweight.shape[0] // scales.shape[0]
        deq = (iweights - izeros.repeat_interleave(gs, dim=0)) * scales.to(torch.float32).repeat_interleave(gs, dim=0)
        return deq.t().contiguous()
    if version == "gemv":
        if group_size is None:
            raise ValueError("AWQ GEMV tensors do not tell the group size; pass group_size")
        qweight, qzeros, scales = t["qweight"], t["qzeros"], t["scales"]
        out_f = qweight.shape[0]
        in_f = qweight.shape[1] * 8
        gs = in_f if group_size == -1 else group_size
        iweight = ((qweight.to(torch.int64)[:, :, None] >> shifts) & mask).reshape(out_f, in_f)
        izeros = ((qzeros.to(torch.int64)[:, :, None] >> shifts) & mask).reshape(out_f, -1)
        g = torch.arange(in_f) // gs
        return scales.to(torch.float32)[:, g] * (iweight - izeros[:, g]).to(torch.float32)
    raise ValueError(f"AWQ version must be 'gemm' or 'gemv', not {version!r}")


# --------------------------------------------------------------------------------------------------
# MLX affine quantization (mlx.core.quantize, mlx-lm checkpoints)
# --------------------------------------------------------------------------------------------------


def mlx_quantize(w: Tensor, bits: int, group_size: int, dtype: torch.dtype | None = None) -> dict[str, Tensor]:
    """MLX tensors of one Linear: ``weight`` uint32 ``[out, in*bits/32]``, ``scales``, ``biases``.

    ``scales``/``biases`` ``[out, in/group_size]`` in ``dtype`` (MLX: the weight's dtype; mlx-lm
    checkpoints: the model's, usually bf16/fp16); dequantized ``w = q * scale + bias`` per group.
    Codes packed LSB first along the input dim across words (3/5/6 bits straddle words, see
    :func:`pack_bitstream`). Port of mlx/backend/cpu/quantized.cpp ``quantize`` (= the
    ``affine_quantize`` fallback in mlx/ops.cpp): per group, ``scale = max((max-min)/n_bins, 1e-7)``,
    made **negative** unless ``|min| > |max|``; ``edge`` = min or max accordingly;
    ``q0 = rint(edge/scale)``; if ``q0 != 0``: ``scale = edge/q0``, ``bias = edge``, else
    ``bias = 0``; ``q = clamp(rint((w - bias)/scale), 0, n_bins)``, all in float32, then scale and
    bias cast to ``dtype``. So MLX itself writes negative scales for about half of the groups.
    """
    if bits not in MLX_BITS:
        raise ValueError(f"MLX affine bits must be one of {MLX_BITS}, not {bits}")
    if group_size not in MLX_GROUP_SIZES:
        raise ValueError(f"MLX affine group_size must be one of {MLX_GROUP_SIZES}, not {group_size}")
    out_f, in_f = w.shape
    if in_f % group_size:
        raise ValueError(f"in_features {in_f} is not a multiple of group_size {group_size}")
    dtype = w.dtype if dtype is None else dtype
    n_bins = float(2**bits - 1)
    wg = w.detach().to(torch.float32).reshape(out_f, in_f // group_size, group_size)
    w_max = wg.amax(-1)
    w_min = wg.amin(-1)
    mask = w_min.abs() > w_max.abs()
    scale = torch.clamp_min((w_max - w_min) / n_bins, 1e-7)
    scale = torch.where(mask, scale, -scale)
    edge = torch.where(mask, w_min, w_max)
    q0 = torch.round(edge / scale)
    nz = q0 != 0
    scale = torch.where(nz, edge / q0, scale)
    bias = torch.where(nz, edge, torch.zeros_like(edge))
    q = torch.clamp(torch.round((wg - bias[..., None]) / scale[..., None]), 0, n_bins).to(torch.int64)
    weight = pack_bitstream(q.reshape(out_f, in_f), bits).view(torch.uint32)
    return {"weight": weight, "scales": scale.to(dtype), "biases": bias.to(dtype)}


def mlx_dequantize(t: dict[str, Tensor], bits: int, group_size: int) -> Tensor:
    """float32 ``[out, in]``: port of the ``affine_dequantize`` fallback in mlx/ops.cpp.

    Power-of-two bits: code at ``start`` = ``(w << (32 - (start + bits))) >> (32 - bits)``;
    others: explode each word into its 32 bits, regroup ``bits`` at a time, ``sum(bit << k)``.
    Then ``w * scales + biases`` per group (MLX computes in the scales' dtype; float32 here).
    """
    words = t["weight"].view(torch.int32).to(torch.int64) & _U32
    scales, biases = t["scales"].to(torch.float32), t["biases"].to(torch.float32)
    if bits & (bits - 1) == 0:
        parts = [((words << (32 - (start + bits))) & _U32) >> (32 - bits) for start in range(0, 32, bits)]
        codes = torch.stack(parts, -1).reshape(words.shape[0], -1)
    else:
        bitsarr = (words.unsqueeze(-1) >> torch.arange(32)) & 1
        codes = (bitsarr.reshape(words.shape[0], -1, bits) << torch.arange(bits)).sum(-1)
    out_f = codes.shape[0]
    codes = codes.reshape(out_f, -1, group_size).to(torch.float32)
    return (codes * scales[..., None] + biases[..., None]).reshape(out_f, -1)


# --------------------------------------------------------------------------------------------------
# bitsandbytes, as transformers saves it (module state dict)
# --------------------------------------------------------------------------------------------------


def bnb_state(
    w: Tensor, kind: str, double_quant: bool = False, *, dtype: torch.dtype | None = None, blocksize: int = 64
) -> dict[str, Tensor]:
    """The tensors transformers saves for one bnb-quantized Linear (no bias), names relative to it.

    Made by bitsandbytes itself on CPU: the weight goes through ``Int8Params``/``Params4bit`` and
    ``.to("cpu")`` (what transformers' bnb quantizer does when it loads a float weight), and the
    names come from the module's ``state_dict()`` (``Linear8bitLt``/``Linear4bit``
    ``_save_to_state_dict``, which transformers' ``save_pretrained`` writes unchanged):

    * ``"int8"``: ``weight`` int8 ``[out, in]``, ``SCB`` fp32 ``[out]`` (row absmax),
      ``weight_format`` uint8 scalar (0 = "row"). ``w = weight * SCB / 127``.
    * ``"nf4"``/``"fp4"``: ``weight`` uint8 ``[out*in/2, 1]`` (two codes a byte, flattened
      row-major weight), ``weight.absmax`` fp32 ``[out*in/blocksize]``, ``weight.quant_map`` fp32
      ``[16]``, ``weight.quant_state.bitsandbytes__<kind>`` uint8 (packed JSON: quant_type,
      blocksize, dtype, shape, and with double quant nested_blocksize/nested_dtype/nested_offset).
      Double quant: ``weight.absmax`` is uint8 codes, plus ``weight.nested_absmax`` fp32
      ``[ceil(n_blocks/256)]`` and ``weight.nested_quant_map`` fp32 ``[256]``.
      ``w = quant_map[code] * absmax[block]``.

    ``dtype``: the float dtype the weight is loaded in (recorded in the 4-bit quant state and used
    for the dequantized output); default ``w.dtype``.
    """
    import bitsandbytes as bnb

    w = w.detach().to(dtype or w.dtype).clone()
    out_f, in_f = w.shape
    module: torch.nn.Module
    if kind == "int8":
        module = bnb.nn.Linear8bitLt(in_f, out_f, bias=False, has_fp16_weights=False)
        module.weight = bnb.nn.Int8Params(w, requires_grad=False, has_fp16_weights=False)
    elif kind in ("nf4", "fp4"):
        module = bnb.nn.Linear4bit(
            in_f, out_f, bias=False, compute_dtype=w.dtype, compress_statistics=double_quant, quant_type=kind
        )
        module.weight = bnb.nn.Params4bit(
            w,
            requires_grad=False,
            quant_type=kind,
            compress_statistics=double_quant,
            blocksize=blocksize,
            quant_storage=torch.uint8,
        )
    else:
        raise ValueError(f"kind must be 'int8', 'nf4' or 'fp4', not {kind!r}")
    module = module.to("cpu")
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _bnb_quant_state(t: dict[str, Tensor]) -> Any:
    import bitsandbytes as bnb

    return bnb.functional.QuantState.from_dict(
        {k[len("weight.") :]: v for k, v in t.items() if k.startswith("weight.")}, device=torch.device("cpu")
    )


def bnb_dequantize(t: dict[str, Tensor], kind: str) -> Tensor:
    """float32 ``[out, in]`` with bitsandbytes' own functions, as transformers dequantizes
    (integrations/bitsandbytes.py ``dequantize_bnb_weight``): 8-bit
    ``bnb.functional.int8_vectorwise_dequant(weight, SCB)``; 4-bit
    ``bnb.functional.dequantize_4bit(weight, QuantState.from_dict(...))`` (GPTQModel's
    ``model_dequant.convert_bitsandbytes_shard`` does the same).
    """
    import bitsandbytes as bnb

    if kind == "int8":
        return bnb.functional.int8_vectorwise_dequant(t["weight"], t["SCB"]).to(torch.float32)
    if kind in ("nf4", "fp4"):
        return bnb.functional.dequantize_4bit(t["weight"], quant_state=_bnb_quant_state(t)).to(torch.float32)
    raise ValueError(f"kind must be 'int8', 'nf4' or 'fp4', not {kind!r}")


def bnb_unnest(t: dict[str, Tensor]) -> dict[str, Tensor]:
    """A double-quant 4-bit state rewritten without nesting: ``weight.absmax`` becomes the fp32
    absmax ``dequantize_4bit`` computes internally (``dequantize_blockwise(absmax, state2) +
    offset``), so the dequantized weight is bit-identical and a row's blocks can be scaled exactly.
    """
    import bitsandbytes as bnb

    qs = _bnb_quant_state(t)
    if not qs.nested:
        return dict(t)
    absmax = bnb.functional.dequantize_blockwise(qs.absmax, qs.state2)
    absmax += qs.offset
    flat = bnb.functional.QuantState(
        absmax=absmax.to(torch.float32),
        shape=qs.shape,
        code=qs.code,
        blocksize=qs.blocksize,
        quant_type=qs.quant_type,
        dtype=qs.dtype,
    )
    out = {k: v for k, v in t.items() if not k.startswith("weight.")}
    out.update({"weight." + k: v for k, v in flat.as_dict(packed=True).items()})
    return out


# --------------------------------------------------------------------------------------------------
# config.json entries
# --------------------------------------------------------------------------------------------------


def quant_config(fmt: str, **kw: Any) -> dict[str, Any]:
    """The ``quantization_config`` of config.json for ``fmt`` ("gptq", "awq", "bnb"), or for
    ``"mlx"`` the **top-level** entries mlx-lm writes (``quantization`` and its copy
    ``quantization_config``, mlx_lm/utils.py ``quantize_model``), to merge into config.json.

    * gptq (AutoGPTQ ``BaseQuantizeConfig.to_dict`` less the local paths; transformers'
      ``GPTQConfig`` and vLLM read bits, group_size, desc_act, sym, checkpoint_format):
      ``bits``, ``group_size`` (default 128), ``desc_act``, ``sym`` (default True).
    * awq (AutoAWQ ``AwqConfig.to_transformers_dict``): ``bits`` (4), ``group_size`` (128),
      ``zero_point`` (True), ``version`` ("gemm" | "gemv"), ``modules_to_not_convert``.
    * mlx: ``bits`` (4), ``group_size`` (64), ``mode`` ("affine").
    * bnb: ``kind`` ("int8" | "nf4" | "fp4"), ``double_quant``, ``compute_dtype`` (torch dtype);
      returns ``transformers.BitsAndBytesConfig(...).to_dict()``.
    """
    if fmt == "gptq":
        return {
            "bits": kw.get("bits", 4),
            "group_size": kw.get("group_size", 128),
            "damp_percent": kw.get("damp_percent", 0.01),
            "desc_act": kw.get("desc_act", False),
            "static_groups": kw.get("static_groups", False),
            "sym": kw.get("sym", True),
            "true_sequential": kw.get("true_sequential", True),
            "quant_method": "gptq",
            "checkpoint_format": "gptq",
        }
    if fmt == "awq":
        return {
            "quant_method": "awq",
            "zero_point": kw.get("zero_point", True),
            "group_size": kw.get("group_size", 128),
            "bits": kw.get("bits", 4),
            "version": kw.get("version", "gemm").lower(),
            "modules_to_not_convert": kw.get("modules_to_not_convert"),
        }
    if fmt == "mlx":
        params = {"group_size": kw.get("group_size", 64), "bits": kw.get("bits", 4), "mode": kw.get("mode", "affine")}
        return {"quantization": dict(params), "quantization_config": dict(params)}
    if fmt == "bnb":
        from transformers import BitsAndBytesConfig

        kind = kw.get("kind", "nf4")
        if kind == "int8":
            cfg = BitsAndBytesConfig(load_in_8bit=True)
        else:
            cfg = BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type=kind,
                bnb_4bit_use_double_quant=kw.get("double_quant", False),
                bnb_4bit_compute_dtype=kw.get("compute_dtype", torch.float32),
            )
        return cfg.to_dict()
    raise ValueError(f"unknown format {fmt!r}")
