"""The compressed-tensors checkpoint helper (tests/ct_checkpoints.py): what it writes, and that the
library and transformers read it back.

The layout test spells out, per scheme, the on-disk format that folding into these checkpoints relies
on (tensor names, dtypes, shapes, int32 packing, the dequantization formula), checked against the
library's own decompression.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file

from ct_checkpoints import (
    ARCHS,
    BLOCK,
    GROUP_SIZE,
    SCHEMES,
    STATIC_INPUT_SCHEMES,
    build_ct_checkpoint,
    dequantized_weights,
    load_ct,
    tiny_ct_config,
)

FORMATS = {
    "w4a16_group": "pack-quantized",
    "w4a16_asym": "pack-quantized",
    "w8a16_channel": "pack-quantized",
    "w8a8_int_dynamic": "int-quantized",
    "w8a8_int_static": "int-quantized",
    "fp8_channel": "float-quantized",
    "fp8_tensor": "float-quantized",
    "fp8_block": "float-quantized",
}
# relative Frobenius error of the dequantized weights against the float originals (measured ~0.1, ~0.007, ~0.027)
TOLERANCE = {"w4": 0.15, "w8": 0.01, "fp": 0.04}
DOWN = "model.layers.0.mlp.down_proj"  # llama: out 64, in 128


@pytest.fixture(scope="module")
def llama_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ct")
    return {scheme: build_ct_checkpoint(root / scheme, scheme, arch="llama") for scheme in SCHEMES}


def _reference_weights(arch: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """The float weights the checkpoint was quantized from (same seed, same config)."""
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(tiny_ct_config(arch)).state_dict()


def _unpack_int32(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Signed values from int32 words along the last dim: value i sits at bits [i*bits, (i+1)*bits) of the
    little-endian bit stream, stored unsigned with an offset of 2**(bits-1)."""
    per_word = 32 // bits
    shifts = torch.arange(per_word, dtype=torch.int32) * bits
    values = (packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return values.flatten(-2)[..., :n] - (1 << (bits - 1))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_config_and_tensors(llama_checkpoints: dict[str, Path], scheme: str) -> None:
    path = llama_checkpoints[scheme]
    qconfig = json.loads((path / "config.json").read_text())["quantization_config"]
    assert qconfig["quant_method"] == "compressed-tensors"
    assert qconfig["quantization_status"] == "compressed"
    assert qconfig["format"] == FORMATS[scheme]
    assert qconfig["ignore"] == ["lm_head"]
    (group,) = qconfig["config_groups"].values()
    assert group["targets"] == ["Linear"] and group["format"] == FORMATS[scheme]

    tensors = load_file(str(path / "model.safetensors"))
    names = {name.rpartition(".")[2] for name in tensors if name.startswith(DOWN + ".")}
    if FORMATS[scheme] == "pack-quantized":
        expected = {"weight_packed", "weight_scale", "weight_shape"}
        if scheme == "w4a16_asym":
            expected.add("weight_zero_point")
    else:
        expected = {"weight", "weight_scale"}
    if scheme in STATIC_INPUT_SCHEMES:
        expected.add("input_scale")
    assert names == expected
    if scheme in STATIC_INPUT_SCHEMES:
        input_scale = tensors[f"{DOWN}.input_scale"]
        assert input_scale.shape == (1,) and torch.isfinite(input_scale).all() and (input_scale > 0).all()
    # the embeddings and lm_head stay dense
    assert tensors["model.embed_tokens.weight"].dtype == torch.float32
    assert tensors["lm_head.weight"].dtype == torch.float32


@pytest.mark.parametrize("scheme", SCHEMES)
def test_layout_and_dequantization_formula(llama_checkpoints: dict[str, Path], scheme: str) -> None:
    """weight = (q - zero_point) * scale, broadcast per tensor / row / (row, group) / (row block, column block)."""
    tensors = load_file(str(llama_checkpoints[scheme] / "model.safetensors"))
    library = dequantized_weights(llama_checkpoints[scheme])[DOWN]
    scale = tensors[f"{DOWN}.weight_scale"]
    assert scale.dtype == torch.float32
    out_features, in_features = 64, 128
    if FORMATS[scheme] == "pack-quantized":
        bits = 4 if scheme.startswith("w4") else 8
        packed = tensors[f"{DOWN}.weight_packed"]
        assert packed.dtype == torch.int32 and packed.shape == (out_features, in_features * bits // 32)
        assert tensors[f"{DOWN}.weight_shape"].tolist() == [out_features, in_features]
        q = _unpack_int32(packed, bits, in_features).float()
        if bits == 4:
            assert scale.shape == (out_features, in_features // GROUP_SIZE)
        else:
            assert scale.shape == (out_features, 1)
        zero_point = torch.zeros_like(scale)
        if scheme == "w4a16_asym":
            packed_zp = tensors[f"{DOWN}.weight_zero_point"]
            # zero points are packed along the output dim (dim 0), same bit layout
            assert packed_zp.dtype == torch.int32 and packed_zp.shape == (out_features * bits // 32, scale.shape[1])
            zero_point = _unpack_int32(packed_zp.T, bits, out_features).T.float()
            assert zero_point.min() >= -8 and zero_point.max() <= 7
        group = in_features // scale.shape[1]
        manual = (q - zero_point.repeat_interleave(group, 1)) * scale.repeat_interleave(group, 1)
    else:
        weight = tensors[f"{DOWN}.weight"]
        assert weight.shape == (out_features, in_features)
        assert weight.dtype == (torch.float8_e4m3fn if scheme.startswith("fp8") else torch.int8)
        expected_scale_shape = {"fp8_tensor": (1,), "fp8_block": (out_features // BLOCK[0], in_features // BLOCK[1])}
        assert scale.shape == expected_scale_shape.get(scheme, (out_features, 1))
        if scheme == "fp8_block":
            scale = scale.repeat_interleave(BLOCK[0], 0).repeat_interleave(BLOCK[1], 1)
        manual = weight.float() * scale
    torch.testing.assert_close(manual, library, rtol=0, atol=0)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_load_ct_matches_library_dequantization(llama_checkpoints: dict[str, Path], scheme: str) -> None:
    path = llama_checkpoints[scheme]
    model = load_ct(path)
    assert not model.training
    weights = dequantized_weights(path)
    assert len(weights) == 14  # 2 layers x (q, k, v, o, gate, up, down); lm_head is not quantized
    reference = _reference_weights("llama")
    state = model.state_dict()
    for name, weight in weights.items():
        module = model.get_submodule(name)
        assert type(module) is torch.nn.Linear and module.weight.dtype == torch.float32
        assert weight.dtype == torch.float32 and weight.shape == module.weight.shape
        torch.testing.assert_close(state[f"{name}.weight"], weight, rtol=0, atol=0)
        error = (weight - reference[f"{name}.weight"]).norm() / reference[f"{name}.weight"].norm()
        assert error < TOLERANCE[scheme[:2]], (name, error)
    torch.testing.assert_close(state["lm_head.weight"], reference["lm_head.weight"], rtol=0, atol=0)
    with torch.no_grad():
        logits = model(input_ids=torch.arange(8).unsqueeze(0)).logits
    assert logits.shape == (1, 8, 128) and torch.isfinite(logits).all()


@pytest.mark.parametrize(
    ("arch", "scheme"), [("qwen2", "w4a16_asym"), ("opt", "w8a8_int_static"), ("opt", "fp8_block")]
)
def test_other_archs(tmp_path: Path, arch: str, scheme: str) -> None:
    path = build_ct_checkpoint(tmp_path / "ckpt", scheme, arch=arch, seed=3)
    weights = dequantized_weights(path)
    if arch == "opt":
        assert {"model.decoder.layers.0.fc1", "model.decoder.layers.0.fc2"} <= set(weights)
        assert weights["model.decoder.layers.0.fc1"].shape == (128, 64)
    assert len(weights) == (12 if arch == "opt" else 14)
    model = load_ct(path)
    reference = _reference_weights(arch, seed=3)
    for name, weight in weights.items():
        torch.testing.assert_close(model.get_submodule(name).weight, weight, rtol=0, atol=0)
        error = (weight - reference[f"{name}.weight"]).norm() / reference[f"{name}.weight"].norm()
        assert error < TOLERANCE[scheme[:2]], (name, error)
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.arange(8).unsqueeze(0)).logits).all()


def test_bfloat16_scales(tmp_path: Path) -> None:
    path = build_ct_checkpoint(tmp_path / "bf16", "w8a8_int_static", dtype=torch.bfloat16)
    tensors = load_file(str(path / "model.safetensors"))
    assert tensors[f"{DOWN}.weight_scale"].dtype == torch.bfloat16
    assert tensors[f"{DOWN}.input_scale"].dtype == torch.bfloat16
    assert load_ct(path).get_submodule(DOWN).weight.dtype == torch.float32


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="scheme"):
        build_ct_checkpoint(tmp_path / "a", "w3a16")
    with pytest.raises(ValueError, match="arch"):
        build_ct_checkpoint(tmp_path / "b", "w4a16_group", arch="gpt2")
    assert set(ARCHS) == {"llama", "qwen2", "opt"}
