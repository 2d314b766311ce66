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


def test_bnb_double_quant_checkpoint_is_refused_with_the_way_out(bnb_files, tmp_path):
    with pytest.raises(FoldError, match=r"double-quantized \(bnb_4bit_use_double_quant\): the streaming fold"):
        ia3fuse.fold_checkpoint(bnb_files["nf4-double"], bnb_files["adapter"], tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


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
