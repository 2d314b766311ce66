"""End to end on bitsandbytes models: fold equals PEFT's unmerged forward, per architecture,
format and mode; unfold restores the logits bit for bit."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

pytest.importorskip("bitsandbytes")

from peft import PeftModel  # noqa: E402
from transformers import AutoModelForCausalLM, BitsAndBytesConfig  # noqa: E402

import ia3fuse  # noqa: E402
from factories import random_ia3_adapter, tiny_model  # noqa: E402

# widths that bitsandbytes' CPU kernels accept in both layouts (multiples of 32 and of the block)
SIZES = {
    "llama": dict(hidden_size=64, intermediate_size=128, head_dim=16),
    "opt": dict(hidden_size=64, ffn_dim=128, word_embed_proj_dim=64),
    "gpt2": dict(n_embd=64),
}
QUANT = {
    "int8": dict(load_in_8bit=True),
    "nf4": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32),
    "fp4-dq": dict(
        load_in_4bit=True,
        bnb_4bit_quant_type="fp4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    ),
}
# the feed-forward module of each, and where its scale goes on a quantized model
FEEDFORWARD = {"llama": ("down_proj", "up_proj"), "opt": ("fc2", "fc1"), "gpt2": ("c_proj", None)}


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    root = tmp_path_factory.mktemp("bnb-models")
    out = {}
    for arch, sizes in SIZES.items():
        base = tiny_model(arch, **sizes)
        base.save_pretrained(root / arch)
        # spread 0.25 keeps l > 0 (the ReLU rewrite needs it) yet far from 1
        out[arch] = (root / arch, random_ia3_adapter(base, root / f"{arch}-adapter", seed=2, spread=0.25))
    return out


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("quant", list(QUANT))
@pytest.mark.parametrize("arch", list(SIZES))
def test_fold_matches_peft_and_unfolds(files, arch, quant, mode):
    base_dir, adapter = files[arch]
    ids = torch.randint(1, 128, (2, 8), generator=torch.Generator().manual_seed(1))
    model = AutoModelForCausalLM.from_pretrained(
        base_dir, quantization_config=BitsAndBytesConfig(**QUANT[quant]), dtype=torch.float32
    )
    peft_model = PeftModel.from_pretrained(model, str(adapter))
    getattr(peft_model, mode)()
    with torch.no_grad():
        ref = peft_model(input_ids=ids).logits  # in eval mode, also triggers bnb's CPU repacking
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        folded = ia3fuse.fold(peft_model, keep_originals=True)
    report = folded.ia3fuse_report
    ff, neighbour = FEEDFORWARD[arch]
    by_module = {e.module.rsplit(".", 1)[-1]: e for e in report.entries}
    with torch.no_grad():
        out = folded(input_ids=ids).logits
    if neighbour is not None:
        assert report.exact
        assert ff not in by_module and by_module[neighbour].path == "statistic + neighbour"
        # exact: the forward's own rounding floor (bf16 kernels after the CPU repack)
        assert _rel(out, ref) < (1e-2 if mode == "eval" and quant != "int8" else 1e-5)
    else:
        # GELU MLP: no exact rewrite; the requantized layer is reported with its error
        assert not report.exact and by_module[ff].path == "requantize" and by_module[ff].rel_error is not None
        assert by_module["c_attn"].path == "statistic"
        assert _rel(out, ref) < 0.1  # requantizing 4-bit c_proj costs a few percent here
    ia3fuse.unfold(folded)
    with torch.no_grad():
        restored = folded(input_ids=ids).logits
    base_model = AutoModelForCausalLM.from_pretrained(
        base_dir, quantization_config=BitsAndBytesConfig(**QUANT[quant]), dtype=torch.float32
    )
    getattr(base_model, mode)()
    with torch.no_grad():
        if mode == "eval":
            base_model(input_ids=ids)  # same repacking history as the folded model
        torch.testing.assert_close(restored, base_model(input_ids=ids).logits, rtol=0, atol=0)


def _wrapped_rows(table: str) -> list[list[str]]:
    """The body rows of a wrapped markdown table, each continuation row (blank first cell) joined to its row."""
    rows: list[list[str]] = []
    for line in table.splitlines()[2:]:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[0]:
            rows.append(cells)
        else:
            rows[-1] = [f"{a} {b}".strip() for a, b in zip(rows[-1], cells)]
    return rows


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_report_table_fits_100_columns_and_keeps_every_cell(files, arch):
    """Neighbour rows (llama) and requantized rows with their reasons (gpt2) are wider than 100
    columns on one line; the table wraps them, and nothing is cut."""
    base_dir, adapter = files[arch]
    model = AutoModelForCausalLM.from_pretrained(
        base_dir, quantization_config=BitsAndBytesConfig(**QUANT["nf4"]), dtype=torch.float32
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = ia3fuse.fold(PeftModel.from_pretrained(model, str(adapter)), measure_error=True).ia3fuse_report
    assert max(len(line) for line in report.table(max_width=None).splitlines()) > 100
    text = report.table()
    assert max(len(line) for line in text.splitlines()) <= 100
    table, _, notes = text.partition("\n\nlossy because:\n")

    def squeeze(s: str) -> str:  # a long word may be split across lines
        return "".join(s.split())

    rows = _wrapped_rows(table)
    assert [squeeze(c) for r in rows for c in r] == [
        squeeze(c)
        for e in report.entries
        for c in (e.module, e.layer, e.path, e.carries, "-" if e.rel_error is None else f"{e.rel_error:.2e}")
    ]
    reasons = {e.reason for e in report.entries if e.reason}
    if arch == "gpt2":
        assert len(reasons) == 1 and not report.exact
        c_proj = [e.module for e in report.entries if e.reason]
        assert " ".join(notes.split()) == f"- {c_proj[0]} and {len(c_proj) - 1} more: {reasons.pop()}"
    else:
        assert report.exact and not reasons and not notes
        assert any("neighbour" in r[3] for r in rows)
