"""A fold of a bitsandbytes 4-bit / 8-bit model survives save_pretrained and reload."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("bitsandbytes")

from peft import PeftModel  # noqa: E402
from transformers import AutoModelForCausalLM, BitsAndBytesConfig  # noqa: E402

import ia3fuse  # noqa: E402
from factories import random_ia3_adapter, tiny_model  # noqa: E402

QUANT = {
    "int8": dict(load_in_8bit=True),
    "nf4": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32),
    "fp4-double-quant": dict(
        load_in_4bit=True,
        bnb_4bit_quant_type="fp4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    ),
}


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("bnb-save")
    # widths that bitsandbytes' CPU kernels accept (multiples of the 64-element block)
    base = tiny_model("llama", hidden_size=64, intermediate_size=128, head_dim=16)
    base.save_pretrained(root / "base")
    return root / "base", random_ia3_adapter(base, root / "adapter", seed=1, spread=0.3)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("quant", list(QUANT))
def test_folded_quantized_model_saves_and_reloads(files, tmp_path, quant):
    base_dir, adapter = files
    ids = torch.randint(1, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    model = AutoModelForCausalLM.from_pretrained(
        base_dir, quantization_config=BitsAndBytesConfig(**QUANT[quant]), dtype=torch.float32
    )
    peft_model = PeftModel.from_pretrained(model, str(adapter)).train()  # train mode: no CPU repacking
    with torch.no_grad():
        ref = peft_model(input_ids=ids).logits
    folded = ia3fuse.fold(peft_model, exact="require")
    assert folded.ia3fuse_report.exact
    paths = {e.path for e in folded.ia3fuse_report.entries}
    assert paths == {"statistic", "statistic + neighbour"}  # down_proj's scale moved onto up_proj's rows
    with torch.no_grad():
        out = folded(input_ids=ids).logits
    assert _rel(out, ref) < 1e-5
    folded.save_pretrained(tmp_path / "folded")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "folded", dtype=torch.float32).train()
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).logits, out)
