"""The quantized-checkpoint writers and reference dequantizers of ``quant_specs`` follow their formats.

For every format: quantize -> dequantize lands within the format's resolution, the tensors have the
format's names, dtypes and shapes, and scaling the per-output-row statistic by ``c_i`` gives exactly
``diag(c) @ W`` (to the rounding of the statistic's dtype; bit-exact for powers of two, negative
ones included). Where the format's own library can be imported (AutoGPTQ, AutoAWQ, MLX,
bitsandbytes + transformers), its code is the reference; otherwise the test skips with the reason.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch

import quant_specs as qs

OUT, IN = 64, 128


def _weight(seed: int = 0, out: int = OUT, inp: int = IN) -> torch.Tensor:
    return torch.randn(out, inp, generator=torch.Generator().manual_seed(seed)) * 0.05


def _factors(n: int, seed: int = 1, powers_of_two: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    sign = torch.where(torch.rand(n, generator=g) < 0.3, -1.0, 1.0)
    if powers_of_two:
        return sign * 2.0 ** torch.randint(-2, 3, (n,), generator=g).float()
    return sign * (0.5 + 1.5 * torch.rand(n, generator=g))


def _assert_row_fold(scaled: torch.Tensor, ref: torch.Tensor, c: torch.Tensor, bound: torch.Tensor) -> None:
    """``scaled == diag(c) @ ref`` within ``bound`` (elementwise)."""
    diff = (scaled - c[:, None] * ref).abs()
    assert bool((diff <= bound).all()), float((diff - bound).max())


def _load_file(package: str, relpath: str, name: str) -> ModuleType:
    """One module file of an installed package, without running the package's ``__init__``
    (AutoGPTQ's and AutoAWQ's import transformers-4 model classes at package level)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        pytest.skip(f"{package} is not installed")
    path = Path(list(spec.submodule_search_locations)[0]) / relpath
    if not path.is_file():
        pytest.skip(f"{package} has no {relpath}")
    mod_spec = importlib.util.spec_from_file_location(name, path)
    assert mod_spec is not None and mod_spec.loader is not None
    module = importlib.util.module_from_spec(mod_spec)
    sys.modules[name] = module
    mod_spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------------------------------------------
# bit packing
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_bitstream_roundtrip(bits: int) -> None:
    codes = torch.randint(0, 2**bits, (5, 64), generator=torch.Generator().manual_seed(bits))
    packed = qs.pack_bitstream(codes, bits)
    assert packed.dtype == torch.int32 and packed.shape == (5, 64 * bits // 32)
    assert torch.equal(qs.unpack_bitstream(packed, bits), codes)


def _pack_original_3bit(intweight: torch.Tensor) -> torch.Tensor:
    """AutoGPTQ qlinear_cuda_old.QuantLinear.pack / GPTQModel pack_original, 3-bit loop, verbatim."""
    iw = intweight.numpy().astype("uint32")
    qweight = np.zeros((iw.shape[0] // 32 * 3, iw.shape[1]), dtype="uint32")
    i = row = 0
    while row < qweight.shape[0]:
        for j in range(i, i + 10):
            qweight[row] |= iw[j] << (3 * (j - i))
        i += 10
        qweight[row] |= iw[i] << 30
        row += 1
        qweight[row] |= (iw[i] >> 2) & 1
        i += 1
        for j in range(i, i + 10):
            qweight[row] |= iw[j] << (3 * (j - i) + 1)
        i += 10
        qweight[row] |= iw[i] << 31
        row += 1
        qweight[row] |= (iw[i] >> 1) & 0x3
        i += 1
        for j in range(i, i + 10):
            qweight[row] |= iw[j] << (3 * (j - i) + 2)
        i += 10
        row += 1
    return torch.from_numpy(qweight.astype("int32"))


def test_gptq_3bit_packing_is_the_reference_loop() -> None:
    codes = torch.randint(0, 8, (64, 6), generator=torch.Generator().manual_seed(3))  # [in, out]
    assert torch.equal(qs.pack_bitstream(codes.t(), 3).t(), _pack_original_3bit(codes))


# --------------------------------------------------------------------------------------------------
# GPTQ v1
# --------------------------------------------------------------------------------------------------


def _gptq_step(t: dict[str, torch.Tensor]) -> torch.Tensor:
    """The quantization step of each weight element, ``[out, in]``."""
    return t["scales"].float()[t["g_idx"].long()].t().abs()


@pytest.mark.parametrize("group_size", [32, 48, -1])
@pytest.mark.parametrize("desc_act", [False, True])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("bits", qs.GPTQ_BITS)
def test_gptq_roundtrip(bits: int, sym: bool, desc_act: bool, group_size: int) -> None:
    w = _weight()
    t = qs.gptq_quantize(w, bits, group_size, sym, desc_act)
    gs = IN if group_size == -1 else group_size
    groups = math.ceil(IN / gs)
    assert set(t) == {"qweight", "qzeros", "scales", "g_idx"}
    assert t["qweight"].dtype == torch.int32 and t["qweight"].shape == (IN * bits // 32, OUT)
    assert t["qzeros"].dtype == torch.int32 and t["qzeros"].shape == (groups, OUT * bits // 32)
    assert t["scales"].dtype == torch.float16 and t["scales"].shape == (groups, OUT)
    assert t["g_idx"].dtype == torch.int32 and t["g_idx"].shape == (IN,)
    assert torch.equal(torch.bincount(t["g_idx"].long(), minlength=groups).clamp(max=1), torch.ones(groups).long())
    monotonic = bool((t["g_idx"][1:] >= t["g_idx"][:-1]).all())
    assert monotonic != (desc_act and groups > 1)
    if not desc_act:
        assert torch.equal(t["g_idx"].long(), torch.arange(IN) // gs)
    zeros_minus_1 = qs.unpack_bitstream(t["qzeros"], bits)
    assert bool((zeros_minus_1 >= 0).all() and (zeros_minus_1 <= 2**bits - 2).all())  # no stored -1
    if sym:  # v1 stores zero - 1 = 2**(bits-1) - 1 (0x77777777 for 4 bits)
        assert bool((zeros_minus_1 == 2 ** (bits - 1) - 1).all())
    d = qs.gptq_dequantize(t, bits)
    assert d.dtype == torch.float32 and d.shape == (OUT, IN)
    # half a step, plus the fp16 rounding of the scale times |w| (GPTQ's sym grid clips xmax by
    # half a step, its range being [-2**(bits-1), 2**(bits-1) - 1] steps)
    assert bool(((d - w).abs() <= 0.5 * _gptq_step(t) + w.abs() / 1024).all())


@pytest.mark.parametrize("bits", qs.GPTQ_BITS)
def test_gptq_asym_group_without_negatives_keeps_zero_1(bits: int) -> None:
    """A group whose minimum is >= 0 would get zero 0, stored as -1 in v1 (read back as 0 by
    GPTQModel and qlinear_cuda_old, as 2**bits by qlinear_cuda): the writer uses zero 1 instead."""
    w = _weight().abs()
    t = qs.gptq_quantize(w, bits, 32, sym=False, desc_act=False)
    assert bool((qs.unpack_bitstream(t["qzeros"], bits) == 0).all())  # zero 1 everywhere
    d = qs.gptq_dequantize(t, bits)
    assert bool(((d - w).abs() <= 0.5 * _gptq_step(t) + w.abs() / 1024).all())


@pytest.mark.parametrize("powers_of_two", [False, True])
@pytest.mark.parametrize("desc_act", [False, True])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("bits", qs.GPTQ_BITS)
def test_gptq_row_scale_folds(bits: int, sym: bool, desc_act: bool, powers_of_two: bool) -> None:
    t = qs.gptq_quantize(_weight(), bits, 32, sym, desc_act)
    ref = qs.gptq_dequantize(t, bits)
    c = _factors(OUT, powers_of_two=powers_of_two)
    scaled = dict(t, scales=(t["scales"].float() * c[None, :]).to(torch.float16))  # scales[:, i] *= c_i
    bound = torch.zeros(()) if powers_of_two else 2.0**-11 * (c[:, None] * ref).abs()
    _assert_row_fold(qs.gptq_dequantize(scaled, bits), ref, c, bound)


@pytest.mark.parametrize("desc_act", [False, True])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("bits", qs.GPTQ_BITS)
def test_gptq_matches_autogptq(bits: int, sym: bool, desc_act: bool) -> None:
    """AutoGPTQ's own CPU dequantization (``qlinear_cuda.QuantLinear.forward`` without its CUDA
    extension: ``x @ (scales[g_idx] * (q - (z + 1)))`` in fp16), on the identity."""
    mod = _load_file("auto_gptq", "nn_modules/qlinear/qlinear_cuda.py", "_quant_specs_autogptq_cuda")
    for group_size in (32, -1):
        t = qs.gptq_quantize(_weight(), bits, group_size, sym, desc_act)
        layer = mod.QuantLinear(bits, group_size, IN, OUT, False)
        for name, value in t.items():
            setattr(layer, name, value)
        with torch.no_grad():
            theirs = layer(torch.eye(IN, dtype=torch.float16)).float().t()
        ours = qs.gptq_dequantize(t, bits)
        assert torch.allclose(theirs, ours, rtol=2.0**-10, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# AWQ
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("version", "group_size"), [("gemm", 32), ("gemm", 64), ("gemm", 128), ("gemm", -1), ("gemv", 32), ("gemv", 64)]
)
def test_awq_roundtrip(version: str, group_size: int) -> None:
    w = _weight()
    t = qs.awq_quantize(w, 4, group_size, version)
    gs = IN if group_size == -1 else group_size
    groups = IN // gs
    assert set(t) == {"qweight", "qzeros", "scales"}
    assert t["qweight"].dtype == torch.int32 and t["qzeros"].dtype == torch.int32
    assert t["scales"].dtype == torch.float16
    if version == "gemm":
        assert t["qweight"].shape == (IN, OUT // 8)
        assert t["qzeros"].shape == (groups, OUT // 8)
        assert t["scales"].shape == (groups, OUT)
        step = t["scales"].float().repeat_interleave(gs, 0).t()
    else:
        zw = qs._awq_zeros_width(IN, gs)
        assert t["qweight"].shape == (OUT, IN // 8)
        assert t["qzeros"].shape == (OUT, zw)
        assert t["scales"].shape == (OUT, 8 * zw)
        assert not bool(t["scales"][:, groups:].any())  # padding
        step = t["scales"].float()[:, torch.arange(IN) // gs]
    d = qs.awq_dequantize(t, version, group_size)
    assert d.dtype == torch.float32 and d.shape == (OUT, IN)
    # half a step, plus the fp16 rounding of the scale times |w| (AWQ's zero = round(-min/scale) can
    # leave max half a step outside the grid)
    assert bool(((d - w).abs() <= 0.5 * step + w.abs() / 1024).all())


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_awq_gemm_and_gemv_hold_the_same_weight(group_size: int) -> None:
    w = _weight(2)
    gemm = qs.awq_dequantize(qs.awq_quantize(w, 4, group_size, "gemm"), "gemm")
    gemv = qs.awq_dequantize(qs.awq_quantize(w, 4, group_size, "gemv"), "gemv", group_size)
    assert torch.equal(gemm, gemv)


def test_awq_gemm_interleaved_order() -> None:
    """Nibble ``i`` of a GEMM word holds output column ``8*c + [0, 2, 4, 6, 1, 3, 5, 7][i]``."""
    w = torch.zeros(8, 32)
    w[:, 1], w[:, 2] = -0.75, 0.75  # every row: scale 0.1 (fp16), zero 8
    w[:, 0] = torch.arange(8) * 0.1  # input 0 of output o: code o + 8
    t = qs.awq_quantize(w, 4, 32, "gemm")
    nibbles = ((t["qweight"][0].long() & 0xFFFFFFFF) >> torch.arange(0, 32, 4)) & 0xF
    assert torch.equal(nibbles, torch.tensor(qs.AWQ_ORDER) + 8)
    zeros = ((t["qzeros"][0].long() & 0xFFFFFFFF) >> torch.arange(0, 32, 4)) & 0xF
    assert torch.equal(zeros, torch.full((8,), 8))


@pytest.mark.parametrize("powers_of_two", [False, True])
@pytest.mark.parametrize("version", ["gemm", "gemv"])
def test_awq_row_scale_folds(version: str, powers_of_two: bool) -> None:
    t = qs.awq_quantize(_weight(), 4, 64, version)
    ref = qs.awq_dequantize(t, version, 64)
    c = _factors(OUT, powers_of_two=powers_of_two)
    if version == "gemm":  # scales [groups, out]: column i
        scales = (t["scales"].float() * c[None, :]).to(torch.float16)
    else:  # scales [out, padded groups]: row i
        scales = (t["scales"].float() * c[:, None]).to(torch.float16)
    bound = torch.zeros(()) if powers_of_two else 2.0**-11 * (c[:, None] * ref).abs()
    _assert_row_fold(qs.awq_dequantize(dict(t, scales=scales), version, 64), ref, c, bound)


@pytest.mark.parametrize("group_size", [32, 128, -1])
def test_awq_matches_autoawq(group_size: int) -> None:
    """AutoAWQ's own ``awq.utils.packing_utils.dequantize_gemm`` (its naive GEMM path; fp16)."""
    mod = _load_file("awq", "utils/packing_utils.py", "_quant_specs_awq_packing_utils")
    t = qs.awq_quantize(_weight(), 4, group_size, "gemm")
    gs = IN if group_size == -1 else group_size
    theirs = mod.dequantize_gemm(t["qweight"], t["qzeros"], t["scales"], 4, gs).float().t()
    assert torch.allclose(theirs, qs.awq_dequantize(t, "gemm"), rtol=2.0**-10, atol=1e-7)


# --------------------------------------------------------------------------------------------------
# MLX
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("group_size", qs.MLX_GROUP_SIZES)
@pytest.mark.parametrize("bits", qs.MLX_BITS)
def test_mlx_roundtrip(bits: int, group_size: int) -> None:
    w = _weight()
    t = qs.mlx_quantize(w, bits, group_size, dtype=torch.float16)
    assert set(t) == {"weight", "scales", "biases"}
    assert t["weight"].dtype == torch.uint32 and t["weight"].shape == (OUT, IN * bits // 32)
    for name in ("scales", "biases"):
        assert t[name].dtype == torch.float16 and t[name].shape == (OUT, IN // group_size)
    assert bool((t["scales"] < 0).any()) and bool((t["scales"] > 0).any())  # MLX's own sign choice
    d = qs.mlx_dequantize(t, bits, group_size)
    assert d.dtype == torch.float32 and d.shape == (OUT, IN)
    step = t["scales"].float().abs().repeat_interleave(group_size, 1)
    # MLX keeps 0 on the grid (scale = edge / rint(edge / scale)), which can leave the group's far
    # end up to one step outside the grid: error <= 1 step, plus the fp16 rounding of scale (times
    # up to 2**bits - 1) and of bias
    bias = t["biases"].float().abs().repeat_interleave(group_size, 1)
    assert bool(((d - w).abs() <= step + 2.0**-11 * (step * (2**bits - 1) + bias) + 1e-7).all())


@pytest.mark.parametrize("powers_of_two", [False, True])
@pytest.mark.parametrize("bits", [3, 4, 6])
def test_mlx_row_scale_folds(bits: int, powers_of_two: bool) -> None:
    t = qs.mlx_quantize(_weight(), bits, 32, dtype=torch.float16)
    ref = qs.mlx_dequantize(t, bits, 32)
    c = _factors(OUT, powers_of_two=powers_of_two)
    scaled = {
        "weight": t["weight"],
        "scales": (t["scales"].float() * c[:, None]).to(torch.float16),  # scales[i] and biases[i]
        "biases": (t["biases"].float() * c[:, None]).to(torch.float16),
    }
    if powers_of_two:
        bound = torch.zeros(())
    else:
        q_s = (t["scales"].float().abs() * (2**bits - 1)).repeat_interleave(32, 1)
        bound = 2.0**-11 * c.abs()[:, None] * (q_s + t["biases"].float().abs().repeat_interleave(32, 1))
    _assert_row_fold(qs.mlx_dequantize(scaled, bits, 32), ref, c, bound)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_mlx_matches_mlx(dtype: torch.dtype) -> None:
    """``mlx.core.quantize`` writes the same bits and ``mlx.core.dequantize`` reads the same weight."""
    mx = pytest.importorskip("mlx.core", reason="mlx is not installed (pip install 'mlx[cpu]' on Linux)")
    w = _weight(4).to(dtype)
    mx_dtype = mx.float16 if dtype == torch.float16 else mx.float32
    for bits in qs.MLX_BITS:
        for group_size in qs.MLX_GROUP_SIZES:
            t = qs.mlx_quantize(w, bits, group_size)
            wq, scales, biases = mx.quantize(mx.array(w.float().numpy()).astype(mx_dtype), group_size, bits)
            assert np.array_equal(np.array(wq), t["weight"].numpy())
            assert np.array_equal(np.array(scales.astype(mx.float32)), t["scales"].float().numpy())
            assert np.array_equal(np.array(biases.astype(mx.float32)), t["biases"].float().numpy())
            theirs = mx.dequantize(
                mx.array(t["weight"].numpy()),
                mx.array(t["scales"].float().numpy()),
                mx.array(t["biases"].float().numpy()),
                group_size,
                bits,
            )
            assert np.array_equal(np.array(theirs), qs.mlx_dequantize(t, bits, group_size).numpy())


# --------------------------------------------------------------------------------------------------
# bitsandbytes
# --------------------------------------------------------------------------------------------------

BNB_CASES = [("int8", False), ("nf4", False), ("nf4", True), ("fp4", False), ("fp4", True)]


@pytest.mark.parametrize(("kind", "double_quant"), BNB_CASES)
def test_bnb_state_layout_and_roundtrip(kind: str, double_quant: bool) -> None:
    pytest.importorskip("bitsandbytes")
    w = _weight()
    t = qs.bnb_state(w, kind, double_quant)
    if kind == "int8":
        assert set(t) == {"weight", "SCB", "weight_format"}
        assert t["weight"].dtype == torch.int8 and t["weight"].shape == (OUT, IN)
        assert t["SCB"].dtype == torch.float32 and t["SCB"].shape == (OUT,)
        assert t["weight_format"].dtype == torch.uint8 and t["weight_format"].shape == ()
        assert torch.equal(t["SCB"], w.half().float().abs().amax(1))  # Int8Params quantizes w.half()
        bound = 0.5 * t["SCB"][:, None] / 127 + w.abs() * 2.0**-11  # plus w's rounding to fp16
    else:
        keys = {"weight", "weight.absmax", "weight.quant_map", f"weight.quant_state.bitsandbytes__{kind}"}
        if double_quant:
            keys |= {"weight.nested_absmax", "weight.nested_quant_map"}
        assert set(t) == keys
        n_blocks = OUT * IN // 64
        assert t["weight"].dtype == torch.uint8 and t["weight"].shape == (OUT * IN // 2, 1)
        assert t["weight.absmax"].shape == (n_blocks,)
        assert t["weight.absmax"].dtype == (torch.uint8 if double_quant else torch.float32)
        assert t["weight.quant_map"].dtype == torch.float32 and t["weight.quant_map"].shape == (16,)
        if double_quant:
            assert t["weight.nested_absmax"].shape == (math.ceil(n_blocks / 256),)
            assert t["weight.nested_quant_map"].shape == (256,)
        packed = t[f"weight.quant_state.bitsandbytes__{kind}"]
        meta = json.loads(bytes(packed.tolist()).decode())
        assert meta["quant_type"] == kind and meta["blocksize"] == 64 and meta["shape"] == [OUT, IN]
        # half the widest gap of the 4-bit code book, times the block's absmax
        gap = t["weight.quant_map"].sort().values.diff().max()
        absmax = w.reshape(-1, 64).abs().amax(1).repeat_interleave(64).reshape(OUT, IN)
        bound = (0.5 * gap + 0.02) * absmax
    d = qs.bnb_dequantize(t, kind)
    assert d.dtype == torch.float32 and d.shape == (OUT, IN)
    assert bool(((d - w).abs() <= bound).all())


@pytest.mark.parametrize("powers_of_two", [False, True])
@pytest.mark.parametrize(("kind", "double_quant"), BNB_CASES)
def test_bnb_row_scale_folds(kind: str, double_quant: bool, powers_of_two: bool) -> None:
    """int8: ``SCB[i] *= c_i``; 4-bit: the ``in/blocksize`` absmax entries of row ``i`` (``in`` a
    multiple of the block size), after un-nesting a double-quant absmax."""
    pytest.importorskip("bitsandbytes")
    t = qs.bnb_state(_weight(), kind, double_quant)
    if double_quant:
        flat = qs.bnb_unnest(t)
        assert "weight.nested_absmax" not in flat and flat["weight.absmax"].dtype == torch.float32
        assert torch.equal(qs.bnb_dequantize(flat, kind), qs.bnb_dequantize(t, kind))  # bit-identical
        t = flat
    ref = qs.bnb_dequantize(t, kind)
    c = _factors(OUT, powers_of_two=powers_of_two)
    if kind == "int8":
        scaled = dict(t, SCB=t["SCB"] * c)
    else:
        absmax = t["weight.absmax"].reshape(OUT, IN // 64) * c[:, None]
        scaled = dict(t, **{"weight.absmax": absmax.reshape(-1)})
    bound = torch.zeros(()) if powers_of_two else 2.0**-22 * (c[:, None] * ref).abs()
    _assert_row_fold(qs.bnb_dequantize(scaled, kind), ref, c, bound)


def test_bnb_state_is_what_transformers_saves(tmp_path: Path) -> None:
    """A tiny Llama quantized by transformers and saved: the module's tensors are ``bnb_state``'s,
    bit for bit, and config.json's quantization_config is ``quant_config("bnb", ...)``."""
    pytest.importorskip("bitsandbytes")
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=32,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=4,
        head_dim=16,
    )
    torch.manual_seed(0)
    base = LlamaForCausalLM(cfg)
    base.save_pretrained(tmp_path / "base")
    prefix = "model.layers.0.mlp.up_proj."
    for kind, double_quant in [("int8", False), ("nf4", True), ("fp4", False)]:
        if kind == "int8":
            bnb_cfg = BitsAndBytesConfig(load_in_8bit=True)
        else:
            bnb_cfg = BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type=kind,
                bnb_4bit_use_double_quant=double_quant,
                bnb_4bit_compute_dtype=torch.float32,
            )
        model = AutoModelForCausalLM.from_pretrained(
            tmp_path / "base", quantization_config=bnb_cfg, dtype=torch.float32
        )
        model.save_pretrained(tmp_path / kind)
        saved = load_file(tmp_path / kind / "model.safetensors")
        theirs = {k[len(prefix) :]: v for k, v in saved.items() if k.startswith(prefix)}
        ours = qs.bnb_state(base.model.layers[0].mlp.up_proj.weight.data, kind, double_quant)
        assert sorted(theirs) == sorted(ours)
        for name, value in ours.items():
            assert theirs[name].dtype == value.dtype and torch.equal(theirs[name], value), name
        config = json.loads((tmp_path / kind / "config.json").read_text())
        assert config["quantization_config"] == qs.quant_config("bnb", kind=kind, double_quant=double_quant)


# --------------------------------------------------------------------------------------------------
# quantization_config
# --------------------------------------------------------------------------------------------------


def test_quant_config_gptq_and_awq_read_back_by_transformers() -> None:
    from transformers import AwqConfig, GPTQConfig

    gptq = qs.quant_config("gptq", bits=3, group_size=32, desc_act=True, sym=False)
    assert gptq["quant_method"] == "gptq" and gptq["checkpoint_format"] == "gptq"
    back = GPTQConfig.from_dict(gptq).to_dict()
    assert {k: back[k] for k in ("bits", "group_size", "desc_act", "sym", "checkpoint_format")} == {
        "bits": 3,
        "group_size": 32,
        "desc_act": True,
        "sym": False,
        "checkpoint_format": "gptq",
    }
    for version in ("gemm", "gemv"):
        awq = qs.quant_config("awq", group_size=64, version=version)
        assert awq == {
            "quant_method": "awq",
            "zero_point": True,
            "group_size": 64,
            "bits": 4,
            "version": version,
            "modules_to_not_convert": None,
        }
        back = AwqConfig.from_dict(awq).to_dict()
        assert back["version"] == version and back["group_size"] == 64 and back["zero_point"] is True


def test_quant_config_mlx_is_what_mlx_lm_writes() -> None:
    cfg = qs.quant_config("mlx", bits=3, group_size=32)
    assert cfg == {
        "quantization": {"group_size": 32, "bits": 3, "mode": "affine"},
        "quantization_config": {"group_size": 32, "bits": 3, "mode": "affine"},
    }
