"""End to end in llama.cpp itself: logits of a folded GGUF file against PEFT's unmerged IA3 model.

Runs where the llama.cpp Python binding is installed (llama-cpp-python builds from source for
about an hour on two cores, so CI does not install it; see docs/gguf.md)."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch

pytest.importorskip("gguf")
llama_cpp = pytest.importorskip("llama_cpp")

import gguf_files as gf  # noqa: E402
from gguf import GGMLQuantizationType as Q  # noqa: E402

import ia3fuse  # noqa: E402
from archs import tiny_arch_model  # noqa: E402
from factories import random_ia3_adapter  # noqa: E402

TOKENS = [1, 5, 9, 33, 70, 12, 99, 4, 17, 64]


def logits(path) -> np.ndarray:
    llm = llama_cpp.Llama(model_path=str(path), logits_all=True, n_ctx=64, verbose=False, n_threads=1)
    llm.eval(TOKENS)
    return np.array(llm.scores[: len(TOKENS)])


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize(
    "model_type,qtype",
    [("llama", Q.F32), ("llama", Q.Q8_0), ("qwen2", Q.F32), ("qwen2", Q.Q8_0)],
    ids=lambda v: Q(v).name if isinstance(v, int) else v,
)
def test_llama_cpp_logits_of_folded_file_match_peft(tmp_path, model_type, qtype):
    """Llama files have permuted q/k rows, Qwen2 files do not: the opposite choice must fail."""
    from peft import PeftModel

    model = tiny_arch_model(model_type)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adapter = random_ia3_adapter(
            model,
            tmp_path / "ad",
            seed=3,
            target_modules=["q_proj", "k_proj", "v_proj", "down_proj"],
            feedforward_modules=["down_proj"],
            spread=0.3,
        )
        with torch.no_grad():
            base = model(torch.tensor([TOKENS])).logits[0].numpy()
            peft = (
                PeftModel.from_pretrained(copy.deepcopy(model), str(adapter))(torch.tensor([TOKENS])).logits[0].numpy()
            )
        src = gf.convert(model, tmp_path / "in.gguf", model_type=model_type, qtype=qtype, vocab=True)
        report = ia3fuse.fold_gguf(src, adapter, tmp_path / "out.gguf", progress=False)
        assert report.permuted_qk == (model_type == "llama")
        ia3fuse.fold_gguf(src, adapter, tmp_path / "wrong.gguf", progress=False, permute_qk=not report.permuted_qk)
    unfolded, folded, wrong = logits(src), logits(tmp_path / "out.gguf"), logits(tmp_path / "wrong.gguf")
    converter_error = rel(unfolded, base)  # llama.cpp vs torch on the base model: the floor
    assert rel(unfolded, peft) > 0.2  # the adapter matters
    assert rel(wrong, peft) > 0.05  # the other q/k row order is wrong
    if qtype == Q.F32:
        assert rel(folded, peft) < 3e-3
    else:  # Q8_0: quantization noise of the same size as the base file's
        assert rel(folded, peft) < 2 * converter_error + 1e-2


def test_every_type_against_ggml_c_quantizer_and_dequantizer():
    """Real blocks from ggml's C quantizer (K-quants and IQ types included, which the gguf package
    cannot quantize); the folded bytes, read back by ggml's C dequantizer, equal l * W up to fp16
    rounding of the new scales, negative l included."""
    import ggml_c
    from ia3fuse.folding import gguf_blocks

    ggml = ggml_c.load()
    rng = np.random.default_rng(0)
    w = rng.standard_normal((16, 512)).astype(np.float32) * 0.05
    l = rng.uniform(-2, 2, 16).astype(np.float32)
    for qtype in sorted(gguf_blocks.exact_types()):
        raw = ggml.quantize(w, qtype)
        before = ggml.dequantize(raw, qtype, 512)
        assert np.array_equal(gguf_blocks.dequantize(raw, qtype), before), Q(qtype).name
        new, stats = gguf_blocks.scale_rows(raw, qtype, l)
        want = before * l[:, None]
        err = np.linalg.norm(ggml.dequantize(new, qtype, 512) - want) / np.linalg.norm(want)
        assert err < 1e-3 and stats.overflow == 0, (Q(qtype).name, err)
        assert np.linalg.norm(before - want) / np.linalg.norm(want) > 0.5  # not a no-op
