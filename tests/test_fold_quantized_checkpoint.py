"""The streaming fold into quantized checkpoints (issue 17): only the per-row statistics change,
every packed tensor is copied byte for byte, and the format's own loader runs the output like
PEFT's unmerged IA3 on the same quantized base.

Formats whose quantizer runs here are built with it (bitsandbytes through transformers,
compressed-tensors with its own library); the others are written per their specification by
``tests/quant_specs.py``, whose dequantizers are ports of the formats' own code.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from safetensors import safe_open  # noqa: E402

import ia3fuse  # noqa: E402
from ia3fuse.errors import FoldError  # noqa: E402
from factories import random_ia3_adapter, tiny_model  # noqa: E402

IDS = torch.randint(1, 128, (2, 8), generator=torch.Generator().manual_seed(0))
LLAMA_TARGETS = dict(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def assert_only_statistics_changed(base: Path, out: Path, report: Any) -> set[str]:
    """Every tensor the report does not name is byte-identical; returns the changed names."""
    before, after = tensors(base), tensors(out)
    assert sorted(before) == sorted(after)
    changed = {e.tensor for e in report.entries}
    for name, t in before.items():
        if name not in changed:
            assert after[name].dtype == t.dtype and torch.equal(after[name].view(torch.uint8), t.view(torch.uint8)), (
                name
            )
    return changed


# --- bitsandbytes: checkpoints saved by transformers ----------------------------------------------

pytest.importorskip("bitsandbytes")

BNB = {
    "int8": dict(load_in_8bit=True),
    "nf4": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32),
    "fp4": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_compute_dtype=torch.float32),
}


@pytest.fixture(scope="module")
def bnb_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    root = tmp_path_factory.mktemp("bnb-ckpt")
    base = tiny_model("llama", hidden_size=64, intermediate_size=128, head_dim=16)
    base.save_pretrained(root / "base")
    out = {"adapter": random_ia3_adapter(base, root / "adapter", seed=3, spread=0.3, **LLAMA_TARGETS)}
    for name, cfg in {**BNB, "nf4-double": {**BNB["nf4"], "bnb_4bit_use_double_quant": True}}.items():
        model = AutoModelForCausalLM.from_pretrained(
            root / "base", quantization_config=BitsAndBytesConfig(**cfg), dtype=torch.float32
        )
        model.save_pretrained(root / name)
        out[name] = root / name
    return out


def _bnb_logits(folder: Path, adapter: Path | None = None) -> torch.Tensor:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter))
    model.train()  # train mode: bnb does not repack 4-bit weights for its CPU kernel
    with torch.no_grad():
        return model(input_ids=IDS).logits


@pytest.mark.parametrize("quant", list(BNB))
def test_bnb_checkpoint_fold_matches_peft_on_the_quantized_base(bnb_files, tmp_path, quant):
    base, adapter = bnb_files[quant], bnb_files["adapter"]
    report = ia3fuse.fold_checkpoint(base, adapter, tmp_path / "out", progress=False)
    changed = assert_only_statistics_changed(base, tmp_path / "out", report)
    stat = "SCB" if quant == "int8" else "weight.absmax"
    # k/v rows take their own vectors; down_proj's input scale moves onto up_proj's rows
    assert {n.rsplit(".", 2)[0] if quant != "int8" else n.rsplit(".", 1)[0] for n in changed} == {
        f"model.layers.{i}.{m}" for i in range(2) for m in ("self_attn.k_proj", "self_attn.v_proj", "mlp.up_proj")
    }
    assert all(n.endswith(stat) for n in changed)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["quantization_config"] == json.loads((base / "config.json").read_text())["quantization_config"]
    ref = _bnb_logits(base, adapter)
    assert rel(_bnb_logits(tmp_path / "out"), ref) < 1e-5


def test_bnb_double_quant_checkpoint_is_unnested_exactly_where_rows_are_scaled(bnb_files, tmp_path):
    """Each nested block of absmax spans many rows (and adds an offset): the scaled modules' absmax
    is decoded to float32 first (the values bitsandbytes computes), their nested tensors dropped."""
    base, adapter = bnb_files["nf4-double"], bnb_files["adapter"]
    report = ia3fuse.fold_checkpoint(base, adapter, tmp_path / "out", progress=False)
    before, after = tensors(base), tensors(tmp_path / "out")
    scaled = {
        f"model.layers.{i}.{m}" for i in range(2) for m in ("self_attn.k_proj", "self_attn.v_proj", "mlp.up_proj")
    }
    nested = {f"{m}.weight.{k}" for m in scaled for k in ("nested_absmax", "nested_quant_map")}
    assert set(before) - set(after) == nested and set(after) <= set(before)
    for name, t in after.items():
        module = name.split(".weight")[0]
        if module in scaled and (name.endswith(".absmax") or ".quant_state." in name):
            continue
        assert torch.equal(t.view(torch.uint8), before[name].view(torch.uint8)), name  # packed weights and the rest
    assert all(after[f"{m}.weight.absmax"].dtype == torch.float32 for m in scaled)
    assert (
        "nested"
        not in bytes(after["model.layers.0.mlp.up_proj.weight.quant_state.bitsandbytes__nf4"].tolist()).decode()
    )
    assert report.breakdown().startswith("exact: 6 quantization statistics by rows, 6 4-bit quant states unnested")
    assert rel(_bnb_logits(tmp_path / "out"), _bnb_logits(base, adapter)) < 1e-5


def test_unknown_quantization_method_is_refused(bnb_files, tmp_path):
    import shutil

    base = tmp_path / "odd"
    shutil.copytree(bnb_files["int8"], base)
    config = json.loads((base / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "eetq"}
    (base / "config.json").write_text(json.dumps(config))
    with pytest.raises(FoldError) as info:
        ia3fuse.fold_checkpoint(base, bnb_files["adapter"], tmp_path / "out", progress=False)
    assert str(info.value) == (
        f"{str(base)!r} is quantized with 'eetq'; the streaming fold handles compressed-tensors, gptq, awq "
        "(gemm, gemv), bitsandbytes (8-bit, 4-bit) and mlx checkpoints and full-precision ones: for another method, "
        "load the model and use ia3fuse.fold"
    )
    assert not (tmp_path / "out").exists()


def test_missing_statistic_is_refused_naming_the_tensor(bnb_files, tmp_path):
    import shutil

    from safetensors.torch import save_file

    base = tmp_path / "broken"

    shutil.copytree(bnb_files["int8"], base)
    data = tensors(base)
    del data["model.layers.0.self_attn.k_proj.SCB"]
    save_file(data, str(base / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(FoldError) as info:
        ia3fuse.fold_checkpoint(base, bnb_files["adapter"], tmp_path / "out", progress=False)
    assert str(info.value) == (
        "cannot fold the adapter into this checkpoint: the checkpoint lacks 'model.layers.0.self_attn.k_proj.SCB', "
        "the row statistics (SCB) its quantization_config (bitsandbytes) promises; the checkpoint is incomplete: "
        "pass the folder the quantizer wrote"
    )
    assert not (tmp_path / "out").exists()


# --- compressed-tensors (llm-compressor's output, vLLM's native format) ---------------------------

ct = pytest.importorskip("compressed_tensors", reason="compressed-tensors is not installed")

from ct_checkpoints import build_ct_checkpoint, load_ct  # noqa: E402

EXACT_CT = ("w4a16_group", "w4a16_asym", "w8a16_channel", "w8a8_int_dynamic", "w8a8_int_static", "fp8_channel")
TARGETS = {
    "llama": LLAMA_TARGETS,
    "qwen2": LLAMA_TARGETS,
    "opt": dict(target_modules=["k_proj", "v_proj", "fc2"], feedforward_modules=["fc2"]),
}
# The neighbour that takes each architecture's feed-forward vector on its rows.
NEIGHBOUR = {"llama": "mlp.up_proj", "qwen2": "mlp.up_proj", "opt": "fc1"}


@pytest.fixture(scope="module")
def ct_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("ct")


def _ct_setup(
    root: Path, scheme: str, arch: str, *, dtype: torch.dtype = torch.float32, spread: float = 0.2
) -> tuple[Path, Path]:
    base = root / f"{scheme}-{arch}-{str(dtype)[6:]}"
    if not base.exists():
        build_ct_checkpoint(base, scheme, arch, seed=1, dtype=dtype)
    adapter = root / f"adapter-{arch}-{spread}"
    if not adapter.exists():  # the adapter is trained on the base's dense twin (same module paths)
        random_ia3_adapter(load_ct(base), adapter, seed=5, spread=spread, **TARGETS[arch])
    return base, adapter


def _ct_logits(folder: Path, adapter: Path | None = None) -> torch.Tensor:
    from peft import PeftModel

    model = load_ct(folder)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter)).eval()
    with torch.no_grad():
        return model(input_ids=IDS).logits


@pytest.mark.parametrize("arch", ["llama", "qwen2", "opt"])
@pytest.mark.parametrize("scheme", EXACT_CT)
def test_compressed_tensors_fold_matches_peft_on_the_quantized_base(ct_root, tmp_path, scheme, arch):
    base, adapter = _ct_setup(ct_root, scheme, arch)
    report = ia3fuse.fold_checkpoint(base, adapter, tmp_path / "out", progress=False)
    changed = assert_only_statistics_changed(base, tmp_path / "out", report)
    prefix = "model.decoder.layers" if arch == "opt" else "model.layers"
    modules = {f"{prefix}.{i}.{m}" for i in range(2) for m in ("self_attn.k_proj", "self_attn.v_proj", NEIGHBOUR[arch])}
    stats = {f"{m}.weight_scale" for m in modules}
    biases = {f"{m}.bias" for m in modules if f"{m}.bias" in tensors(base)}  # OPT: all; Qwen2: k and v
    assert changed == stats | biases
    assert {e.path for e in report.entries} == ({"statistic", "dense"} if biases else {"statistic"})
    assert json.loads((tmp_path / "out" / "config.json").read_text()) == json.loads((base / "config.json").read_text())
    # float32 scales: the products round once at 2^-24
    assert rel(_ct_logits(tmp_path / "out"), _ct_logits(base, adapter)) < 2e-6


def test_compressed_tensors_bf16_scales_fold_at_the_storage_floor(ct_root, tmp_path):
    """llm-compressor writes bf16 scales: each product rounds to bf16 once (relative 2^-9 per row)."""
    base, adapter = _ct_setup(ct_root, "w4a16_group", "llama", dtype=torch.bfloat16)
    ia3fuse.fold_checkpoint(base, adapter, tmp_path / "out", progress=False)
    before, after = tensors(base), tensors(tmp_path / "out")
    vectors = ia3fuse.load_adapter(adapter).vectors
    l = vectors["model.layers.0.self_attn.k_proj"].reshape(-1, 1).float()
    name = "model.layers.0.self_attn.k_proj.weight_scale"
    assert after[name].dtype == torch.bfloat16
    assert torch.equal(after[name], (before[name].float() * l).to(torch.bfloat16))
    assert rel(_ct_logits(tmp_path / "out"), _ct_logits(base, adapter)) < 2e-2


def test_compressed_tensors_block_scales_are_refused(ct_root, tmp_path):
    base, adapter = _ct_setup(ct_root, "fp8_block", "llama")
    with pytest.raises(
        FoldError,
        match=r"holds one scale per block of 32 rows \(strategy 'block'\).*the streaming fold writes no lossy tensor",
    ):
        ia3fuse.fold_checkpoint(base, adapter, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_fp8_per_tensor_scales_are_widened_to_channels_exactly(ct_root, tmp_path):
    """One FP8 scale per tensor cannot take a row scale, but the same value repeated per row can:
    the scaled modules (and those an engine fuses with them: q/k/v, gate/up) move to per-channel
    scales under a config group that names them; the fp8 weights stay byte for byte."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base, adapter = _ct_setup(ct_root, "fp8_tensor", "llama")
    report = ia3fuse.fold_checkpoint(base, adapter, tmp_path / "out", progress=False)
    before, after = tensors(base), tensors(tmp_path / "out")
    mods = [
        f"model.layers.{i}.{m}"
        for i in range(2)
        for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")
    ]
    assert report.widened == sorted(mods)
    for name, t in before.items():
        if name.rsplit(".", 1)[0] in mods and name.endswith(".weight_scale"):
            assert t.numel() == 1 and after[name].shape[1] == 1 and after[name].shape[0] > 1
        else:
            assert torch.equal(after[name].view(torch.uint8), t.view(torch.uint8)), name
    q = "model.layers.0.self_attn.q_proj.weight_scale"  # fused sibling: widened, unscaled
    assert torch.equal(after[q], before[q].reshape(1, 1).expand(after[q].shape[0], 1))
    config = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    group = config["config_groups"]["ia3fuse_channel"]
    assert group["targets"] == sorted(mods) and group["weights"]["strategy"] == "channel"
    assert group["input_activations"] == config["config_groups"]["group_0"]["input_activations"]
    assert "moved from per-tensor to per-channel scales (config group 'ia3fuse_channel')" in report.breakdown()
    # decompressed, and through the runtime-quantized forward (static fp8 input scales)
    assert rel(_ct_logits(tmp_path / "out"), _ct_logits(base, adapter)) < 2e-6

    def runtime(path: Path, adapter: Path | None = None) -> torch.Tensor:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, device_map="cpu").eval()
        if adapter is not None:
            model = PeftModel.from_pretrained(model, str(adapter)).eval()
        with torch.no_grad():
            return model(input_ids=IDS).logits

    assert rel(runtime(tmp_path / "out"), runtime(base, adapter)) < 2e-6


def test_negative_scales_are_refused_where_the_kernels_are_not_verified(ct_root, tmp_path):
    base, _ = _ct_setup(ct_root, "w4a16_group", "llama")
    adapter = random_ia3_adapter(load_ct(base), tmp_path / "neg", seed=5, spread=3.0, **LLAMA_TARGETS)
    with pytest.raises(FoldError, match=r"would take \d+ negative scale\(s\): a negative statistic is not verified"):
        ia3fuse.fold_checkpoint(base, adapter, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("scheme", ["w8a8_int_static", "w8a8_int_dynamic", "fp8_channel"])
def test_activation_scales_stay_valid_in_the_quantized_forward(ct_root, tmp_path, scheme):
    """transformers' default compressed-tensors load runs the format's quantized forward: inputs are
    quantized at run time, with the stored static ``input_scale`` for W8A8-static. The fold leaves
    every layer's input as PEFT's unmerged IA3 feeds it, so the same scales stay valid."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base, adapter = _ct_setup(ct_root, scheme, "llama")
    ia3fuse.fold_checkpoint(base, adapter, tmp_path / "out", progress=False)
    assert torch.equal(  # the stored activation scales are copied as they are
        *(tensors(p).get("model.layers.0.mlp.down_proj.input_scale", torch.zeros(1)) for p in (base, tmp_path / "out"))
    )

    def logits(path: Path, adapter: Path | None = None) -> torch.Tensor:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, device_map="cpu").eval()
        if adapter is not None:
            model = PeftModel.from_pretrained(model, str(adapter)).eval()
        with torch.no_grad():
            return model(input_ids=IDS).logits

    ref = logits(base, adapter)
    assert rel(logits(base), ref) > 0.05  # the adapter matters
    assert rel(logits(tmp_path / "out"), ref) < 2e-6


def test_dtype_conversion_of_a_quantized_checkpoint_is_refused(ct_root, tmp_path):
    base, adapter = _ct_setup(ct_root, "w4a16_group", "llama")
    with pytest.raises(FoldError) as info:
        ia3fuse.fold_checkpoint(base, adapter, tmp_path / "out", dtype="bfloat16", progress=False)
    assert str(info.value) == (
        f"dtype='bfloat16' converts a full-precision checkpoint; {str(base)!r} is quantized (compressed-tensors "
        "pack-quantized) and its scales keep the dtypes its kernels read: leave dtype unset (no --dtype)"
    )
    assert not (tmp_path / "out").exists()


def test_cli_folds_a_quantized_checkpoint_and_names_its_format(ct_root, tmp_path):
    from cli_runner import run_cli

    base, adapter = _ct_setup(ct_root, "w4a16_group", "llama")
    result = run_cli("fold", "--base", base, "--adapter", adapter, "-o", tmp_path / "out", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "6 of " in result.stdout and "(llama, compressed-tensors pack-quantized)" in result.stdout
    assert (
        "exact: 6 quantization statistics by rows (float32 products, each rounded once to its tensor's dtype); "
        "packed weights copied byte for byte" in result.stdout
    )


# --- formats written per their specification: GPTQ, AWQ, MLX --------------------------------------
# No GPTQ/AWQ loader installs next to torch 2.13 on a CPU (gptqmodel builds CUDA kernels, AutoGPTQ and
# AutoAWQ import transformers-4 code) and MLX runs on Apple silicon: ``tests/quant_specs.py`` writes
# their layouts and dequantizes them with ports of their own code (checked against the libraries'
# sources in tests/test_quant_specs.py). The folded checkpoint is read back through those ports.

import quant_specs as qs  # noqa: E402

SPEC = {
    # name: (format, quantizer keywords, the statistics' suffixes)
    "gptq-4bit-g32-sym": ("gptq", dict(bits=4, group_size=32, sym=True, desc_act=False), ("scales",)),
    "gptq-4bit-g32-asym-act-order": ("gptq", dict(bits=4, group_size=32, sym=False, desc_act=True), ("scales",)),
    "gptq-3bit-g32-asym": ("gptq", dict(bits=3, group_size=32, sym=False, desc_act=False), ("scales",)),
    "gptq-2bit-g64-sym-act-order": ("gptq", dict(bits=2, group_size=64, sym=True, desc_act=True), ("scales",)),
    "gptq-8bit-one-group": ("gptq", dict(bits=8, group_size=-1, sym=False, desc_act=False), ("scales",)),
    "awq-gemm-g32": ("awq", dict(bits=4, group_size=32, version="gemm"), ("scales",)),
    "awq-gemv-g32": ("awq", dict(bits=4, group_size=32, version="gemv"), ("scales",)),
    "mlx-4bit-g32-fp16": ("mlx", dict(bits=4, group_size=32, dtype=torch.float16), ("scales", "biases")),
    "mlx-3bit-g64-fp16": ("mlx", dict(bits=3, group_size=64, dtype=torch.float16), ("scales", "biases")),
    "mlx-8bit-g32-fp32": ("mlx", dict(bits=8, group_size=32, dtype=torch.float32), ("scales", "biases")),
}
_PARTS = {
    "gptq": ("qweight", "qzeros", "scales", "g_idx"),
    "awq": ("qweight", "qzeros", "scales"),
    "mlx": ("weight", "scales", "biases"),
}


def write_spec_checkpoint(out: Path, fmt: str, kw: dict[str, Any], model: Any) -> Path:
    """``model``'s decoder Linears quantized per the format's specification, the rest as they are."""
    from safetensors.torch import save_file

    quantize = {"gptq": qs.gptq_quantize, "awq": qs.awq_quantize, "mlx": qs.mlx_quantize}[fmt]
    data = {}
    for name, t in model.state_dict().items():
        module = name.rsplit(".", 1)[0]
        if ".layers." in name and name.endswith(".weight") and t.dim() == 2:
            data.update({f"{module}.{k}": v.contiguous() for k, v in quantize(t.float(), **kw).items()})
        else:
            data[name] = t.detach().clone().contiguous()
    out.mkdir(parents=True)
    save_file(data, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    extra = {k: v for k, v in kw.items() if k in ("bits", "group_size", "sym", "desc_act", "version")}
    if fmt == "mlx":
        config.update(qs.quant_config("mlx", **extra))
    else:
        config["quantization_config"] = qs.quant_config(fmt, **extra)
    (out / "config.json").write_text(json.dumps(config))
    return out


def spec_dense_model(folder: Path, fmt: str, kw: dict[str, Any]) -> Any:
    """The checkpoint's dequantized weights (through the format's ported dequantizer) in a float32 model."""
    import transformers

    data = tensors(folder)
    dense = {}
    for name in data:
        module = name.rsplit(".", 1)[0]
        if name.endswith("." + _PARTS[fmt][0]) and f"{module}.scales" in data:
            parts = {k: data[f"{module}.{k}"] for k in _PARTS[fmt]}
            if fmt == "gptq":
                w = qs.gptq_dequantize(parts, kw["bits"])
            elif fmt == "awq":
                w = qs.awq_dequantize(parts, kw["version"], kw["group_size"])
            else:
                w = qs.mlx_dequantize(parts, kw["bits"], kw["group_size"])
            dense[f"{module}.weight"] = w.float()
        elif name.rsplit(".", 1)[0] + ".weight" not in dense and not any(
            name.endswith("." + p) for p in _PARTS[fmt][1:]
        ):
            dense[name] = data[name].float()
    config = transformers.AutoConfig.from_pretrained(folder)
    model = transformers.AutoModelForCausalLM.from_config(config).float().eval()
    model.load_state_dict(dense, strict=False)
    return model


@pytest.fixture(scope="module")
def spec_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path]:
    root = tmp_path_factory.mktemp("spec")
    model = tiny_model("llama", hidden_size=64, intermediate_size=128, head_dim=16)
    return model, random_ia3_adapter(model, root / "adapter", seed=7, spread=0.2, **LLAMA_TARGETS)


@pytest.mark.parametrize("name", list(SPEC))
def test_spec_format_fold_scales_only_the_statistics_and_matches_peft(spec_model, tmp_path, name):
    from peft import PeftModel

    fmt, kw, stats = SPEC[name]
    model, adapter = spec_model
    base = write_spec_checkpoint(tmp_path / "base", fmt, kw, model)
    report = ia3fuse.fold_checkpoint(base, adapter, tmp_path / "out", progress=False)
    changed = assert_only_statistics_changed(base, tmp_path / "out", report)
    modules = {
        f"model.layers.{i}.{m}" for i in range(2) for m in ("self_attn.k_proj", "self_attn.v_proj", "mlp.up_proj")
    }
    assert changed == {f"{m}.{s}" for m in modules for s in stats}
    # each statistic is the float32 product rounded once to its dtype
    vectors = ia3fuse.load_adapter(adapter).vectors
    before, after = tensors(base), tensors(tmp_path / "out")
    l = vectors["model.layers.1.self_attn.v_proj"].reshape(-1).float()
    for s in stats:
        key = f"model.layers.1.self_attn.v_proj.{s}"
        axis = 1 if fmt == "gptq" or (fmt == "awq" and kw["version"] == "gemm") else 0
        shape = [1, 1]
        shape[axis] = -1
        assert torch.equal(after[key], (before[key].float() * l.reshape(shape)).to(before[key].dtype))
    # through the format's dequantizer: PEFT's unmerged IA3 on the same quantized base
    ref_model = PeftModel.from_pretrained(spec_dense_model(base, fmt, kw), str(adapter)).eval()
    with torch.no_grad():
        ref = ref_model(input_ids=IDS).logits
        out = spec_dense_model(tmp_path / "out", fmt, kw)(input_ids=IDS).logits
        plain = spec_dense_model(base, fmt, kw)(input_ids=IDS).logits
    floor = 2e-6 if before[f"model.layers.1.self_attn.v_proj.{stats[0]}"].dtype == torch.float32 else 2e-3
    assert rel(out, ref) < floor < rel(plain, ref)


def test_kernel_repacked_gptq_layouts_are_refused(spec_model, tmp_path):
    model, adapter = spec_model
    base = write_spec_checkpoint(
        tmp_path / "base", "gptq", dict(bits=4, group_size=32, sym=True, desc_act=False), model
    )
    config = json.loads((base / "config.json").read_text())
    config["quantization_config"]["checkpoint_format"] = "marlin"
    (base / "config.json").write_text(json.dumps(config))
    with pytest.raises(FoldError, match=r"checkpoint_format is 'marlin'; ia3fuse folds the 'gptq' and 'gptq_v2'"):
        ia3fuse.fold_checkpoint(base, adapter, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_fp16_scale_overflow_is_refused_and_nothing_is_written(spec_model, tmp_path):
    model, _ = spec_model
    base = write_spec_checkpoint(
        tmp_path / "base", "gptq", dict(bits=4, group_size=32, sym=True, desc_act=False), model
    )
    adapter = ia3fuse.load_adapter(random_ia3_adapter(model, tmp_path / "a", seed=7, spread=0.2, **LLAMA_TARGETS))
    key = "model.layers.0.self_attn.k_proj"
    adapter.vectors[key] = torch.full_like(adapter.vectors[key], 1e9)
    with pytest.raises(FoldError, match=r"'model\.layers\.0\.self_attn\.k_proj\.scales' overflows float16 once scaled"):
        ia3fuse.fold_checkpoint(base, adapter, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_a_module_the_quantizer_ignored_is_folded_densely(ct_root, tmp_path):
    """``ignore: [lm_head]`` keeps lm_head in full precision inside a quantized checkpoint: an IA3
    vector on it scales its dense rows, next to the statistics of the quantized modules."""
    base, _ = _ct_setup(ct_root, "w4a16_group", "llama")
    targets = dict(target_modules=["v_proj", "lm_head"], feedforward_modules=[])
    adapter = random_ia3_adapter(load_ct(base), tmp_path / "a", seed=9, spread=0.2, **targets)
    report = ia3fuse.fold_checkpoint(base, adapter, tmp_path / "out", progress=False)
    assert {(e.tensor, e.path) for e in report.entries} == {
        ("lm_head.weight", "dense"),
        ("model.layers.0.self_attn.v_proj.weight_scale", "statistic"),
        ("model.layers.1.self_attn.v_proj.weight_scale", "statistic"),
    }
    assert rel(_ct_logits(tmp_path / "out"), _ct_logits(base, adapter)) < 2e-6
