"""GGUF fold: folded tensors equal diag(l) dequant(W) for every ggml type with fp16 block scales, in the
row order llama.cpp's converter writes, with everything else in the file byte for byte."""

from __future__ import annotations

import copy
import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("gguf")

import gguf_files as gf  # noqa: E402
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q  # noqa: E402

import ia3fuse  # noqa: E402
from ia3fuse import FoldError, OutputPathError  # noqa: E402
from archs import tiny_arch_model  # noqa: E402
from factories import random_ia3_adapter  # noqa: E402
from ia3fuse.folding import gguf_blocks  # noqa: E402
from ia3fuse.folding.gguf_map import llama_permute, qkv_by_heads, qkv_falcon  # noqa: E402

TARGETS = {
    "llama": (["q_proj", "k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "qwen2": (["q_proj", "k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "gpt2": (["c_attn", "mlp.c_proj"], ["mlp.c_proj"]),
    "bloom": (["query_key_value", "mlp.dense_4h_to_h"], ["mlp.dense_4h_to_h"]),
    "gpt_neox": (["query_key_value", "dense_4h_to_h"], ["dense_4h_to_h"]),
    "falcon": (["query_key_value", "dense_4h_to_h"], ["dense_4h_to_h"]),
    "t5": (["k", "v", "wo"], ["wo"]),
}
SCALED_TYPES = sorted(gguf_blocks.exact_types())


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """Per model type: the tiny model, an adapter, and its F32 GGUF file."""
    root = tmp_path_factory.mktemp("gguf_zoo")
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for mt, (targets, ff) in TARGETS.items():
            model = tiny_arch_model(mt)
            adapter = random_ia3_adapter(
                model, root / f"ad_{mt}", seed=3, target_modules=targets, feedforward_modules=ff, spread=0.2
            )
            out[mt] = (model, adapter, gf.convert(model, root / f"{mt}.gguf", model_type=mt))
    return out


def fold(src, adapter, out, **kw):
    kw.setdefault("progress", False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ia3fuse.fold_gguf(src, adapter, out, **kw)


def outside(path: Path, report) -> bytes:
    """The data section with every changed tensor's data cut out (the unaffected tensors)."""
    reader = __import__("gguf").GGUFReader(str(path))
    data = bytes(reader.data)
    tensors = {t.name: t for t in reader.tensors}
    spans = sorted((tensors[e.module].data_offset, tensors[e.module].n_bytes) for e in report.entries)
    parts, pos = [], reader.data_offset
    for off, n in spans:
        parts.append(data[pos:off])
        pos = off + n
    parts.append(data[pos:])
    return b"".join(parts)


def header(path: Path) -> tuple[dict[str, bytes], bytes, bytes]:
    """(every key -> its raw key/value bytes, the raw tensor-info bytes, the data section)."""
    reader = __import__("gguf").GGUFReader(str(path))
    data = bytes(reader.data)

    def raw(field) -> bytes:
        return data[field.offset : field.offset + sum(int(p.nbytes) for p in field.parts)]

    kvs = {k: raw(f) for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    return kvs, b"".join(raw(t.field) for t in reader.tensors), data[reader.data_offset :]


# --- end to end against "fold the HF model, then convert" ----------------------------------------


@pytest.mark.parametrize("model_type", list(TARGETS))
def test_f32_fold_equals_converting_the_folded_model(zoo, tmp_path, model_type):
    """Same float32 products: bit-identical to folding the HF model first and converting it after,
    which checks names, the q/k permutation and fused-qkv regrouping for each architecture."""
    model, adapter, src = zoo[model_type]
    report = fold(src, adapter, tmp_path / "out.gguf")
    assert report.exact and report.output == (tmp_path / "out.gguf").resolve()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        folded = ia3fuse.fold(copy.deepcopy(model), adapter)
    ref = gf.read(gf.convert(folded, tmp_path / "ref.gguf", model_type=model_type))
    got = gf.read(tmp_path / "out.gguf")
    assert got.keys() == ref.keys()
    for name in got:
        assert np.array_equal(got[name][1], ref[name][1]), name
    assert len(report.entries) >= 4


def test_llama_permutation_is_needed_and_wrong_one_fails(zoo, tmp_path):
    model, adapter, src = zoo["llama"]
    report = fold(src, adapter, tmp_path / "ok.gguf")
    assert report.permuted_qk
    assert "q/k permuted" in next(e for e in report.entries if e.module == "blk.0.attn_q.weight").carries
    wrong = fold(src, adapter, tmp_path / "wrong.gguf", permute_qk=False)
    assert not wrong.permuted_qk
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        folded = ia3fuse.fold(copy.deepcopy(model), adapter)
    ref = gf.read(gf.convert(folded, tmp_path / "ref.gguf", model_type="llama"))
    got_ok, got_wrong = gf.read(tmp_path / "ok.gguf"), gf.read(tmp_path / "wrong.gguf")
    for name in ("blk.0.attn_q.weight", "blk.1.attn_k.weight"):
        assert np.array_equal(got_ok[name][1], ref[name][1])
        err = np.abs(gf.dequant(got_wrong[name]) - gf.dequant(ref[name])).max()
        assert err > 1e-3, (name, err)
    # v is not permuted, so the override changes nothing there
    assert np.array_equal(got_wrong["blk.0.attn_v.weight"][1], ref["blk.0.attn_v.weight"][1])


def test_permutations_match_the_converter():
    """Our vector permutations are the converter's weight permutations, applied to a (rows, 1) column."""
    rng = np.random.default_rng(0)
    l = rng.standard_normal(48).astype(np.float32)
    col = torch.from_numpy(l).reshape(-1, 1)
    assert np.array_equal(llama_permute(l, 3), gf.llama_permute(col, 3).reshape(-1).numpy())
    assert np.array_equal(qkv_by_heads(l, 4), gf._qkv_heads(col, 4).reshape(-1).numpy())
    assert np.array_equal(qkv_falcon(l, 4, 2), gf._qkv_falcon(col, 4, 2).reshape(-1).numpy())
    assert not np.array_equal(llama_permute(l, 3), l)


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.F16, Q.BF16], ids=lambda t: Q(t).name)
def test_quantized_llama_equals_scaled_dequantized_weights(zoo, tmp_path, qtype):
    """A Llama file quantized with the gguf package: q/k/v rows and, for down_proj, ffn_up's rows
    (the gated-MLP rewrite) carry l; every block equals l * dequant(W) up to fp16 scale rounding."""
    model, adapter, _ = zoo["llama"]
    src = gf.convert(model, tmp_path / "in.gguf", model_type="llama", qtype=qtype)
    report = fold(src, adapter, tmp_path / "out.gguf", measure_error=True)
    assert report.exact
    before, after = gf.read(src), gf.read(tmp_path / "out.gguf")
    vecs = ia3fuse.load_adapter(adapter).vectors
    n_head, n_kv = model.config.num_attention_heads, model.config.num_key_value_heads
    for layer in range(2):
        p = f"model.layers.{layer}"
        scales = {
            f"blk.{layer}.attn_q.weight": llama_permute(vecs[f"{p}.self_attn.q_proj"].numpy().reshape(-1), n_head),
            f"blk.{layer}.attn_k.weight": llama_permute(vecs[f"{p}.self_attn.k_proj"].numpy().reshape(-1), n_kv),
            f"blk.{layer}.attn_v.weight": vecs[f"{p}.self_attn.v_proj"].numpy().reshape(-1),
        }
        if qtype in (Q.F16, Q.BF16):  # float down_proj takes its own columns
            w = gf.dequant(before[f"blk.{layer}.ffn_down.weight"]) * vecs[f"{p}.mlp.down_proj"].numpy().reshape(1, -1)
            tol = 1e-3 if qtype == Q.F16 else 8e-3
            np.testing.assert_allclose(gf.dequant(after[f"blk.{layer}.ffn_down.weight"]), w, rtol=tol, atol=1e-6)
            assert np.array_equal(after[f"blk.{layer}.ffn_up.weight"][1], before[f"blk.{layer}.ffn_up.weight"][1])
        else:
            scales[f"blk.{layer}.ffn_up.weight"] = vecs[f"{p}.mlp.down_proj"].numpy().reshape(-1)
            assert np.array_equal(after[f"blk.{layer}.ffn_down.weight"][1], before[f"blk.{layer}.ffn_down.weight"][1])
        for name, l in scales.items():
            want = gf.dequant(before[name]) * l.reshape(-1, 1)
            got = gf.dequant(after[name])
            # fp16 rounding of d (and of the min m): |d q| + |m| <= 3 max|w| per row, plus subnormal steps
            bound = 3 * 2.0**-11 * np.abs(want).max(axis=1, keepdims=True) + 2.0**-20
            if qtype in (Q.F16, Q.BF16):  # elementwise: one rounding of each product
                bound = (2.0**-8 if qtype == Q.BF16 else 2.0**-11) * np.abs(want) + 2.0**-24
            assert (np.abs(got - want) <= bound).all(), name
            rel = np.linalg.norm(got - want) / np.linalg.norm(want)
            entry = next(e for e in report.entries if e.module == name)
            assert entry.rel_error == pytest.approx(rel, rel=1e-3, abs=1e-9)


# --- every quant type with fp16 scales, on hand-built blocks -------------------------------------


@pytest.mark.parametrize("qtype", SCALED_TYPES + [Q.F32, Q.F16, Q.BF16], ids=lambda t: Q(t).name)
def test_every_type_scales_rows_exactly_and_only_scale_bytes_change(tmp_path, qtype):
    rng = np.random.default_rng(int(qtype))
    ne0 = 512
    k = gf.random_blocks(qtype, 32, ne0, rng)
    v = gf.random_blocks(qtype, 32, ne0, rng)
    src = gf.write_raw(
        tmp_path / "in.gguf",
        "qwen2",
        {
            "token_embd.weight": (Q.F32, gf.random_blocks(Q.F32, 8, ne0, rng), (8, ne0)),
            "blk.0.attn_k.weight": (qtype, k, (32, ne0)),
            "blk.0.attn_v.weight": (qtype, v, (32, ne0)),
        },
    )
    lk = rng.uniform(-2, 2, 32).astype(np.float32)  # negative l included
    lv = rng.uniform(0.5, 1.5, 32).astype(np.float32)
    adapter = make_adapter(
        tmp_path / "ad", {"model.layers.0.self_attn.k_proj": lk, "model.layers.0.self_attn.v_proj": lv}
    )
    report = fold(src, adapter, tmp_path / "out.gguf", measure_error=True)
    assert report.exact
    before, after = gf.read(src), gf.read(tmp_path / "out.gguf")
    for name, l in (("blk.0.attn_k.weight", lk), ("blk.0.attn_v.weight", lv)):
        want = gf.dequant(before[name]) * l.reshape(-1, 1)
        got = gf.dequant(after[name])
        err = np.linalg.norm(got - want) / np.linalg.norm(want)
        assert err < (4e-3 if qtype == Q.BF16 else 6e-4), (name, err)
        # the fold is not a no-op: the unscaled tensor is far off
        assert np.linalg.norm(gf.dequant(before[name]) - want) / np.linalg.norm(want) > 0.05
        if qtype in gguf_blocks._fields():
            bs, ts = GGML_QUANT_SIZES[qtype]
            old_b = before[name][1].reshape(32, -1, ts)
            new_b = after[name][1].reshape(32, -1, ts)
            mask = np.ones(ts, bool)
            for off in gguf_blocks._fields()[qtype]:
                mask[off : off + 2] = False
            assert np.array_equal(old_b[:, :, mask], new_b[:, :, mask])  # only scale bytes changed
            for off in gguf_blocks._fields()[qtype]:
                d_old = old_b[:, :, off : off + 2].copy().view(np.float16)[..., 0].astype(np.float32)
                d_new = new_b[:, :, off : off + 2].copy().view(np.float16)[..., 0]
                assert np.array_equal(d_new, (d_old * l.reshape(-1, 1)).astype(np.float16))
    assert gf.read(tmp_path / "out.gguf")["token_embd.weight"][1].tobytes() == before["token_embd.weight"][1].tobytes()


def test_iq1_m_scale_is_repacked_across_the_four_scale_words(tmp_path):
    rng = np.random.default_rng(5)
    raw = gf.random_blocks(Q.IQ1_M, 4, 256, rng)
    l = np.array([2.0, -0.5, 1.0, 0.25], dtype=np.float32)
    new, stats = gguf_blocks.scale_rows(raw, Q.IQ1_M, l)
    assert stats.overflow == 0
    np.testing.assert_allclose(
        gguf_blocks.dequantize(new, Q.IQ1_M), gguf_blocks.dequantize(raw, Q.IQ1_M) * l[:, None], rtol=0, atol=1e-9
    )
    # the low 12 bits of each scale word (the 3-bit sub-scales) are untouched
    old_w = raw.reshape(4, -1, 56)[:, :, 48:56].copy().view(np.uint16)
    new_w = new.reshape(4, -1, 56)[:, :, 48:56].copy().view(np.uint16)
    assert np.array_equal(old_w & 0x0FFF, new_w & 0x0FFF)
    assert not np.array_equal(old_w, new_w)


def make_adapter(path: Path, vectors: dict, feedforward: tuple = (), base: str = "tiny") -> Path:
    from safetensors.torch import save_file

    path.mkdir(parents=True)
    targets = sorted({p.rsplit(".", 1)[-1] for p in vectors})
    (path / "adapter_config.json").write_text(
        json.dumps(
            {
                "peft_type": "IA3",
                "target_modules": targets,
                "feedforward_modules": sorted({p.rsplit(".", 1)[-1] for p in feedforward}),
                "base_model_name_or_path": base,
                "fan_in_fan_out": False,
                "init_ia3_weights": True,
                "task_type": "CAUSAL_LM",
            }
        )
    )
    tensors = {}
    for p, l in vectors.items():
        t = torch.tensor(np.asarray(l), dtype=torch.float32)
        tensors[f"base_model.model.{p}.ia3_l"] = t.reshape(1, -1) if p in feedforward else t.reshape(-1, 1)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    return path


# --- file-level guarantees ----------------------------------------------------------------------


def test_metadata_and_unaffected_tensors_are_byte_identical(zoo, tmp_path):
    model, adapter, _ = zoo["llama"]
    src = gf.convert(model, tmp_path / "in.gguf", model_type="llama", qtype=Q.Q8_0)
    report = fold(src, adapter, tmp_path / "out.gguf")
    out = tmp_path / "out.gguf"
    assert outside(out, report) == outside(src, report)
    assert header(out)[2] != header(src)[2]  # the changed tensors did change
    (keys_in, infos_in, data_in), (keys_out, infos_out, data_out) = header(src), header(out)
    assert infos_out == infos_in and len(data_out) == len(data_in)  # tensor offsets are relative: unchanged
    added = [k for k in keys_out if k not in keys_in]
    assert added == ["ia3fuse.version", "ia3fuse.adapter.name", "ia3fuse.adapter.path", "ia3fuse.adapter.base_model"]
    assert {k: v for k, v in keys_out.items() if k in keys_in} == keys_in  # every input key, byte for byte
    import gguf

    meta = gguf.GGUFReader(str(out)).fields["ia3fuse.test.note"].contents()
    assert meta == "metadata that must survive a fold"
    changed = {e.module for e in report.entries}
    assert changed == {f"blk.{i}.{n}.weight" for i in range(2) for n in ("attn_q", "attn_k", "attn_v", "ffn_up")}


def test_identity_adapter_round_trips_byte_identical(zoo, tmp_path):
    model, adapter, _ = zoo["llama"]
    src = gf.convert(model, tmp_path / "in.gguf", model_type="llama", qtype=Q.Q4_1)
    ones = {p: np.ones(v.numel(), np.float32) for p, v in ia3fuse.load_adapter(adapter).vectors.items()}
    ff = [p for p, f in ia3fuse.load_adapter(adapter).feedforward.items() if f]
    ident = make_adapter(tmp_path / "ones", ones, feedforward=tuple(ff))
    report = fold(src, ident, tmp_path / "out.gguf")
    assert len(report.entries) == 8
    (keys_in, infos_in, data_in), (keys_out, infos_out, data_out) = header(src), header(tmp_path / "out.gguf")
    assert (data_out, infos_out) == (data_in, infos_in)
    assert {k: v for k, v in keys_out.items() if not k.startswith("ia3fuse.") or k in keys_in} == keys_in


def test_provenance_keys_name_the_adapter_and_its_recipe(zoo, tmp_path):
    """A fused adapter records its recipe; a second fold replaces the first one's keys and keeps the others."""
    import gguf

    _, adapter, src = zoo["qwen2"]
    fused = ia3fuse.merge({"x": adapter, "y": adapter}, weights=[0.3, 0.7], method="task_arithmetic", name="fused")
    fused.save(tmp_path / "fused")
    fold(src, tmp_path / "fused", tmp_path / "once.gguf")
    fold(tmp_path / "once.gguf", adapter, tmp_path / "twice.gguf")
    fields = {
        k: f.contents()
        for k, f in gguf.GGUFReader(str(tmp_path / "once.gguf")).fields.items()
        if k.startswith("ia3fuse.")
    }
    assert fields == {
        "ia3fuse.test.note": "metadata that must survive a fold",
        "ia3fuse.version": ia3fuse.__version__,
        "ia3fuse.adapter.name": "fused",
        "ia3fuse.adapter.path": str(tmp_path / "fused"),
        "ia3fuse.adapter.base_model": "tiny",
        "ia3fuse.recipe": json.dumps(fused.recipe.plain(), sort_keys=True, separators=(",", ":")),
    }
    assert json.loads(fields["ia3fuse.recipe"])["weights"] == [0.3, 0.7]
    again = {
        k: f.contents()
        for k, f in gguf.GGUFReader(str(tmp_path / "twice.gguf")).fields.items()
        if k.startswith("ia3fuse.")
    }
    assert again == {
        "ia3fuse.test.note": "metadata that must survive a fold",
        "ia3fuse.version": ia3fuse.__version__,
        "ia3fuse.adapter.name": adapter.name,
        "ia3fuse.adapter.path": str(adapter),
        "ia3fuse.adapter.base_model": "tiny",
    }


def test_input_is_unchanged_and_no_temp_left(zoo, tmp_path):
    _, adapter, src = zoo["qwen2"]
    before = src.read_bytes()
    fold(src, adapter, tmp_path / "out.gguf")
    assert src.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.gguf"]


def test_overwrite_replaces_only_with_force(zoo, tmp_path):
    _, adapter, src = zoo["qwen2"]
    out = tmp_path / "out.gguf"
    out.write_bytes(b"old")
    with pytest.raises(OutputPathError, match="already exists; pass another path, or overwrite=True"):
        fold(src, adapter, out)
    assert out.read_bytes() == b"old"
    fold(src, adapter, out, overwrite=True)
    assert out.read_bytes()[:4] == b"GGUF"


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.F32], ids=lambda t: Q(t).name)
def test_experts_fold_onto_their_slice_of_ffn_up_exps(tmp_path, qtype):
    rng = np.random.default_rng(9)
    E, ff, h = 3, 64, 256
    tensors = {
        "blk.0.ffn_up_exps.weight": (qtype, gf.random_blocks(qtype, E * ff, h, rng), (E, ff, h)),
        "blk.0.ffn_gate_exps.weight": (qtype, gf.random_blocks(qtype, E * ff, h, rng), (E, ff, h)),
        "blk.0.ffn_down_exps.weight": (qtype, gf.random_blocks(qtype, E * h, ff, rng), (E, h, ff)),
    }
    src = gf.write_raw(tmp_path / "in.gguf", "llama", tensors)
    l = rng.uniform(0.5, 1.5, ff).astype(np.float32)
    p = "model.layers.0.block_sparse_moe.experts.1.w2"
    adapter = make_adapter(tmp_path / "ad", {p: l}, feedforward=(p,))
    report = fold(src, adapter, tmp_path / "out.gguf")
    assert [e.module for e in report.entries] == ["blk.0.ffn_up_exps.weight"]
    assert "of expert 1" in report.entries[0].carries
    before, after = gf.read(src), gf.read(tmp_path / "out.gguf")
    want = gf.dequant(before["blk.0.ffn_up_exps.weight"]).reshape(E, ff, h).copy()
    want[1] *= l.reshape(-1, 1)
    got = gf.dequant(after["blk.0.ffn_up_exps.weight"]).reshape(E, ff, h)
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-7)
    assert np.array_equal(got[0], gf.dequant(before["blk.0.ffn_up_exps.weight"]).reshape(E, ff, h)[0])


# --- lossy paths and refusals ---------------------------------------------------------------------


def test_gelu_mlp_requantizes_under_auto_and_is_refused_under_require(zoo, tmp_path):
    model, adapter, _ = zoo["gpt2"]
    src = gf.convert(model, tmp_path / "in.gguf", model_type="gpt2", qtype=Q.Q8_0)
    with pytest.raises(FoldError) as exc:
        ia3fuse.fold_gguf(src, adapter, tmp_path / "req.gguf", exact="require", progress=False)
    assert str(exc.value).startswith(
        "2 tensor(s) can only be folded by dequantize-scale-requantize ('blk.0.ffn_down.weight': Q8_0 blocks span "
        "input columns; no exact rewrite for this input (the MLP has no gate and is not ReLU)"
    )
    assert str(exc.value).endswith(
        "pass exact='allow_requant' (--exact allow_requant) to accept that error, or keep the adapter unmerged"
    )
    assert not (tmp_path / "req.gguf").exists()
    with pytest.warns(UserWarning, match=r"2 tensor\(s\) were folded by dequantize-scale-requantize"):
        report = ia3fuse.fold_gguf(src, adapter, tmp_path / "auto.gguf", progress=False)
    lossy = [e for e in report.entries if not e.exact]
    assert [e.module for e in lossy] == ["blk.0.ffn_down.weight", "blk.1.ffn_down.weight"]
    assert all(e.path == "requantize" and 0 < e.rel_error < 0.05 for e in lossy)
    before, after = gf.read(src), gf.read(tmp_path / "auto.gguf")
    l = ia3fuse.load_adapter(adapter).vectors["transformer.h.0.mlp.c_proj"].numpy().reshape(1, -1)
    want = gf.dequant(before["blk.0.ffn_down.weight"]) * l
    got = gf.dequant(after["blk.0.ffn_down.weight"])
    assert np.linalg.norm(got - want) / np.linalg.norm(want) == pytest.approx(lossy[0].rel_error, rel=1e-3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ia3fuse.fold_gguf(src, adapter, tmp_path / "quiet.gguf", exact="allow_requant", progress=False)


def test_can_requantize_takes_the_header_s_plain_int_codes():
    # gguf names a type it cannot quantize by the enum's .name: a plain int code crashed that message
    assert gguf_blocks.can_requantize(int(Q.I32)) is False
    assert gguf_blocks.can_requantize(999) is False  # a code this gguf version does not know
    assert gguf_blocks.can_requantize(int(Q.Q8_0)) is True


def test_mxfp4_requantizes_and_nvfp4_is_refused(tmp_path):
    rng = np.random.default_rng(2)
    for qtype, ok in ((Q.MXFP4, True), (Q.NVFP4, False)):
        d = tmp_path / Q(qtype).name
        d.mkdir()
        src = gf.write_raw(
            d / "in.gguf", "qwen2", {"blk.0.attn_v.weight": (qtype, gf.random_blocks(qtype, 16, 128, rng), (16, 128))}
        )
        adapter = make_adapter(d / "ad", {"model.layers.0.self_attn.v_proj": rng.uniform(0.5, 1.5, 16)})
        if ok:
            with pytest.raises(FoldError, match=r"^1 tensor\(s\) can only be folded by dequantize-scale-requantize"):
                ia3fuse.fold_gguf(src, adapter, d / "out.gguf", exact="require", progress=False)
        if ok:
            report = fold(src, adapter, d / "out.gguf")
            assert report.entries[0].path == "requantize"
            assert report.entries[0].reason == "MXFP4 has no exact row scale (its block scales are not fp16)"
        else:
            with pytest.raises(FoldError) as exc:
                fold(src, adapter, d / "out.gguf")
            assert str(exc.value) == (
                "cannot fold the adapter into this GGUF file: 'blk.0.attn_v.weight' (NVFP4) cannot be folded exactly "
                "(NVFP4 has no exact row scale (its block scales are not fp16)), and the gguf package cannot quantize "
                "NVFP4 again; fold the Hugging Face checkpoint instead (ia3fuse fold --base) and convert that, or keep "
                "the adapter unmerged"
            )
            assert not (d / "out.gguf").exists()


def test_subnormal_scales_warn(tmp_path):
    rng = np.random.default_rng(4)
    raw = gf.random_blocks(Q.Q6_K, 8, 256, rng, scale=(2e-5, 5e-5))  # already subnormal super-scales
    src = gf.write_raw(tmp_path / "in.gguf", "qwen2", {"blk.0.attn_v.weight": (Q.Q6_K, raw, (8, 256))})
    adapter = make_adapter(tmp_path / "ad", {"model.layers.0.self_attn.v_proj": np.full(8, 0.02)})
    with pytest.warns(
        UserWarning,
        match=r"[1-8] new block scale\(s\) in 1 tensor\(s\) of type Q6_K .* below fp16's normal "
        r"range, where rounding is absolute, not relative: those blocks are off by more than 1% \(Q6_K store",
    ):
        report = ia3fuse.fold_gguf(src, adapter, tmp_path / "out.gguf", progress=False, measure_error=True)
    assert report.entries[0].rel_error > 1e-3  # the absolute rounding shows
    assert report.notes and "Q6_K" in report.notes[0]


def test_scale_overflow_is_refused(tmp_path):
    rng = np.random.default_rng(4)
    src = gf.write_raw(
        tmp_path / "in.gguf",
        "qwen2",
        {"blk.0.attn_v.weight": (Q.Q8_0, gf.random_blocks(Q.Q8_0, 4, 64, rng, scale=(6e4, 6.5e4)), (4, 64))},
    )
    adapter = make_adapter(tmp_path / "ad", {"model.layers.0.self_attn.v_proj": np.full(4, 3.0)})
    with pytest.raises(FoldError) as exc:
        fold(src, adapter, tmp_path / "out.gguf")
    assert str(exc.value) == (
        "'blk.0.attn_v.weight': 8 block scale(s) times the adapter's scale exceed fp16's range (65504); "
        "the adapter's values are far too large for this file"
    )
    assert list(tmp_path.glob("*out.gguf*")) == []


BAD = [
    ("not gguf", "notgguf", "is not a readable GGUF file (GGUF magic invalid); re-download or re-convert it"),
    ("missing", "missing", "does not exist; pass a .gguf model file"),
    (
        "other model",
        "other",
        (
            "cannot fold the adapter into this GGUF file: 1 of the adapter's 2 modules does not fit "
            "the file (GGUF architecture 'qwen2'): 'model.layers.0.self_attn.k_proj' (maps to 'blk.0.attn_k.weight', which "
            "the file lacks); the adapter was trained on another base model ('tiny', as its adapter_config.json records): "
            "fold it into that base, or use an adapter trained on this one"
        ),
    ),
    (
        "length",
        "length",
        (
            "cannot fold the adapter into this GGUF file: the adapter's module does not fit the file "
            "(GGUF architecture 'qwen2'): 'model.layers.0.self_attn.v_proj' ('blk.0.attn_v.weight' has 16 output rows, the "
            "adapter's vector 8); the adapter was trained on another base model ('tiny', as its adapter_config.json "
            "records): fold it into that base, or use an adapter trained on this one"
        ),
    ),
    (
        "unknown permute",
        "perm",
        "cannot fold the adapter into this GGUF file: llama.cpp's converter may or may not permute "
        "q/k rows for architecture 'mistral3' ('model.layers.0.self_attn.k_proj' -> 'blk.0.attn_k.weight'); pass "
        "permute_qk=True or False (--permute-qk yes/no)",
    ),
]


@pytest.mark.parametrize("case,kind,message", BAD, ids=[b[0] for b in BAD])
def test_bad_inputs_give_exact_errors_and_write_nothing(tmp_path, case, kind, message):
    rng = np.random.default_rng(1)
    v = {"blk.0.attn_v.weight": (Q.Q8_0, gf.random_blocks(Q.Q8_0, 16, 64, rng), (16, 64))}
    src = tmp_path / "in.gguf"
    vecs = {"model.layers.0.self_attn.v_proj": np.ones(16)}
    if kind == "notgguf":
        src.write_bytes(b"GGML" + bytes(100))
    elif kind == "missing":
        pass
    elif kind == "perm":
        v["blk.0.attn_k.weight"] = (Q.Q8_0, gf.random_blocks(Q.Q8_0, 16, 64, rng), (16, 64))
        gf.write_raw(src, "mistral3", v)
        vecs["model.layers.0.self_attn.k_proj"] = np.ones(16)
    else:
        gf.write_raw(src, "qwen2", v)
        if kind == "other":
            vecs["model.layers.0.self_attn.k_proj"] = np.ones(16)
        if kind == "length":
            vecs["model.layers.0.self_attn.v_proj"] = np.ones(8)
    adapter = make_adapter(tmp_path / "ad", vecs)
    snapshot = src.read_bytes() if src.exists() else None
    with pytest.raises(FoldError) as exc:
        ia3fuse.fold_gguf(src, adapter, tmp_path / "out.gguf", progress=False)
    assert str(exc.value).endswith(message)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["ad"] + (["in.gguf"] if snapshot is not None else []))
    if snapshot is not None:
        assert src.read_bytes() == snapshot


def test_adapter_of_another_base_is_refused_once_with_a_count_and_two_examples(zoo, tmp_path):
    """An adapter of a wider model misfits its attention modules (the MLP width is the same): one sentence with
    a count and two examples, not one per module."""
    _, _, src = zoo["llama"]
    wide = tiny_arch_model("llama", hidden_size=48, head_dim=12)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adapter = random_ia3_adapter(
            wide,
            tmp_path / "wide",
            seed=1,
            target_modules=TARGETS["llama"][0],
            feedforward_modules=TARGETS["llama"][1],
            base_name="org/wide-llama",
        )
    with pytest.raises(FoldError) as exc:
        fold(src, adapter, tmp_path / "out.gguf")
    assert str(exc.value) == (
        "cannot fold the adapter into this GGUF file: 6 of the adapter's 8 modules do not fit the file (GGUF "
        "architecture 'llama'): e.g. 'model.layers.0.self_attn.k_proj' ('blk.0.attn_k.weight' has 32 output rows, "
        "the adapter's vector 24) and 'model.layers.0.self_attn.q_proj' ('blk.0.attn_q.weight' has 64 output rows, "
        "the adapter's vector 48); the adapter was trained on another base model ('org/wide-llama', as its "
        "adapter_config.json records): fold it into that base, or use an adapter trained on this one"
    )
    assert not (tmp_path / "out.gguf").exists()


def test_bad_arguments(zoo, tmp_path):
    _, adapter, src = zoo["qwen2"]
    with pytest.raises(FoldError, match=r"^exact='yes' is not a policy; pass 'auto', 'require' or 'allow_requant'$"):
        ia3fuse.fold_gguf(src, adapter, tmp_path / "o.gguf", exact="yes")
    with pytest.raises(
        FoldError, match=r"^permute_qk='auto' is not a choice; pass None \(by architecture\), True or False$"
    ):
        ia3fuse.fold_gguf(src, adapter, tmp_path / "o.gguf", permute_qk="auto")
    with pytest.raises(OutputPathError, match="is also an input"):
        ia3fuse.fold_gguf(src, adapter, src)
    (tmp_path / "dir.gguf").mkdir()
    with pytest.raises(OutputPathError, match=r"exists and is a directory; pass a file path"):
        ia3fuse.fold_gguf(src, adapter, tmp_path / "dir.gguf", overwrite=True)


def test_truncated_file_is_refused(zoo, tmp_path):
    _, adapter, src = zoo["qwen2"]
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(src.read_bytes()[:-100])
    with pytest.raises(
        FoldError, match=r"is truncated: tensor '.*' ends past the end of the file|is not a readable GGUF file"
    ):
        ia3fuse.fold_gguf(cut, adapter, tmp_path / "out.gguf", progress=False)
    assert not (tmp_path / "out.gguf").exists()


def test_stale_temp_of_a_killed_writer_is_removed(zoo, tmp_path):
    from ia3fuse._io import _writer_id

    _, adapter, src = zoo["qwen2"]
    stale = tmp_path / f".out.gguf.tmp-{_writer_id()}-999999999-abc"
    stale.write_bytes(b"partial")
    fold(src, adapter, tmp_path / "out.gguf")
    assert not stale.exists()
    assert os.path.exists(tmp_path / "out.gguf")


# --- command line -------------------------------------------------------------------------------


def cli(*args, capsys):
    from ia3fuse.cli import main

    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_folds_a_gguf_file(zoo, tmp_path, capsys):
    _, adapter, _ = zoo["llama"]
    model = zoo["llama"][0]
    src = gf.convert(model, tmp_path / "in.gguf", model_type="llama", qtype=Q.Q8_0)
    code, out, err = cli(
        "fold",
        "--gguf",
        src,
        "--adapter",
        adapter,
        "-o",
        tmp_path / "out.gguf",
        "--no-progress",
        "--exact",
        "require",
        "--measure-error",
        capsys=capsys,
    )
    assert code == 0, err
    assert out.splitlines() == [  # a summary, not a row per tensor
        (
            f"wrote {tmp_path / 'out.gguf'}: folded 8 IA3 modules into 8 of 21 tensors (llama), 8 exact, 0 requantized; "
            "q/k rows permuted as llama.cpp's converter does"
        ),
        "exact: 6 block scales, 2 block scales + neighbour; max rel. error 2.26e-04 (8 measured)",
        "(per-tensor table: --verbose, or --report FILE for a markdown file)",
    ]
    api = fold(src, adapter, tmp_path / "api.gguf")
    assert (tmp_path / "out.gguf").read_bytes() == (tmp_path / "api.gguf").read_bytes()
    assert api.exact
    code, out, err = cli(
        "fold",
        "--gguf",
        src,
        "--adapter",
        adapter,
        "-o",
        tmp_path / "no.gguf",
        "--no-progress",
        "--permute-qk",
        "no",
        capsys=capsys,
    )
    assert code == 0 and "q/k rows permuted" not in out
    assert (tmp_path / "no.gguf").read_bytes() != (tmp_path / "out.gguf").read_bytes()


def test_cli_verbose_prints_the_table_in_100_columns_and_report_writes_it(zoo, tmp_path, capsys):
    model, adapter, _ = zoo["llama"]
    src = gf.convert(model, tmp_path / "in.gguf", model_type="llama", qtype=Q.Q8_0)
    md = tmp_path / "fold.md"
    code, out, err = cli(
        "fold",
        "--gguf",
        src,
        "--adapter",
        adapter,
        "-o",
        tmp_path / "out.gguf",
        "--no-progress",
        "--verbose",
        "--report",
        md,
        capsys=capsys,
    )
    assert code == 0, err
    report = fold(src, adapter, tmp_path / "api.gguf")
    summary = report.summary().replace(str(tmp_path / "api.gguf"), str(tmp_path / "out.gguf"))
    assert out.splitlines() == [
        summary,
        report.breakdown(),
        f"wrote the per-tensor table to {md}",
        *report.table().splitlines(),
    ]
    assert max(len(line) for line in report.table().splitlines()) <= 100
    wide = report.table(max_width=None)
    assert max(len(line) for line in wide.splitlines()) > 100  # the one-line-per-tensor table would not fit
    assert "| blk.0.ffn_up.weight | Q8_0 64x128 | block scales + neighbour |" in wide
    assert md.read_text() == f"# ia3fuse fold\n\n{summary}\n\n{report.breakdown()}\n\n{wide}\n"
    code, out, err = cli(
        "fold",
        "--gguf",
        src,
        "--adapter",
        adapter,
        "-o",
        tmp_path / "x.gguf",
        "--report",
        tmp_path / "x.gguf",
        capsys=capsys,
    )
    assert (code, err.strip()) == (
        2,
        f"ia3fuse: error: --report {str(tmp_path / 'x.gguf')!r} is the fold's output; pass another file for the report",
    )


def test_cli_refusals_are_one_line(zoo, tmp_path, capsys):
    model, adapter, src = zoo["gpt2"]
    q8 = gf.convert(model, tmp_path / "q8.gguf", model_type="gpt2", qtype=Q.Q8_0)
    code, out, err = cli(
        "fold", "--gguf", q8, "--adapter", adapter, "-o", tmp_path / "o.gguf", "--exact", "require", capsys=capsys
    )
    assert code == 2 and err.startswith("ia3fuse: error: 2 tensor(s) can only be folded by dequantize-scale-requantize")
    assert len(err.strip().splitlines()) == 1
    code, out, err = cli(
        "fold", "--gguf", src, "--adapter", adapter, "-o", tmp_path / "o.gguf", "--dtype", "float16", capsys=capsys
    )
    assert (code, err.strip()) == (
        2,
        "ia3fuse: error: --dtype applies to --base only; a GGUF fold keeps every tensor's type",
    )
    code, out, err = cli(
        "fold",
        "--base",
        tmp_path,
        "--adapter",
        adapter,
        "-o",
        tmp_path / "o",
        "--exact",
        "require",
        "--permute-qk",
        "yes",
        capsys=capsys,
    )
    assert (code, err.strip()) == (
        2,
        "ia3fuse: error: --exact, --permute-qk apply to --gguf only; a --base fold is always exact",
    )
    with pytest.raises(SystemExit) as exc:
        cli("fold", "--base", tmp_path, "--gguf", src, "--adapter", adapter, "-o", tmp_path / "o", capsys=capsys)
    assert exc.value.code == 2
    assert not (tmp_path / "o.gguf").exists() and not (tmp_path / "o").exists()


def test_phi3_fused_gate_up_takes_the_scale_on_its_up_half(tmp_path):
    """Phi-3 keeps [gate; up] in one ffn_up tensor (llama.cpp splits it at run time): down_proj's
    input scale goes to rows n..2n only."""
    rng = np.random.default_rng(6)
    n, h = 64, 128
    tensors = {
        "blk.0.ffn_up.weight": (Q.Q8_0, gf.random_blocks(Q.Q8_0, 2 * n, h, rng), (2 * n, h)),
        "blk.0.ffn_down.weight": (Q.Q8_0, gf.random_blocks(Q.Q8_0, h, n, rng), (h, n)),
    }
    src = gf.write_raw(tmp_path / "in.gguf", "phi3", tensors)
    l = rng.uniform(0.5, 1.5, n).astype(np.float32)
    p = "model.layers.0.mlp.down_proj"
    report = fold(src, make_adapter(tmp_path / "ad", {p: l}, feedforward=(p,)), tmp_path / "out.gguf", exact="require")
    assert [(e.module, e.path) for e in report.entries] == [("blk.0.ffn_up.weight", "block scales + neighbour")]
    assert "up half of the fused ffn_up rows" in report.entries[0].carries
    before, after = gf.read(src), gf.read(tmp_path / "out.gguf")
    up0, up1 = gf.dequant(before["blk.0.ffn_up.weight"]), gf.dequant(after["blk.0.ffn_up.weight"])
    assert np.array_equal(up1[:n], up0[:n])  # the gate half is untouched
    np.testing.assert_allclose(up1[n:], up0[n:] * l[:, None], rtol=1e-3, atol=1e-7)
    assert np.array_equal(after["blk.0.ffn_down.weight"][1], before["blk.0.ffn_down.weight"][1])


def test_cli_prints_lossy_warning_as_one_line(zoo, tmp_path, capsys):
    model, adapter, _ = zoo["gpt2"]
    q8 = gf.convert(model, tmp_path / "q8.gguf", model_type="gpt2", qtype=Q.Q8_0)
    code, out, err = cli(
        "fold",
        "--gguf",
        q8,
        "--adapter",
        adapter,
        "-o",
        tmp_path / "o.gguf",
        "--no-progress",
        "--verbose",
        capsys=capsys,
    )
    assert code == 0
    assert (
        "ia3fuse: warning: 2 tensor(s) were folded by dequantize-scale-requantize (lossy); see the fold report"
        in err.splitlines()
    )
    assert (
        out.splitlines()[1]
        == "exact: 2 block scales, 2 elementwise; lossy: 2 requantize; max rel. error 5.75e-03 (2 measured)"
    )
    row = next(line for line in out.splitlines() if line.startswith("| blk.0.ffn_down.weight "))
    assert [c.strip() for c in row.split("|")[2:4]] == ["Q8_0 256x64", "requantize"]  # ggml order: ne0 (inputs) first
    assert "lossy because:" in out.splitlines() and max(len(line) for line in out.splitlines()[2:]) <= 100


@pytest.mark.slow
def test_sigkill_during_a_gguf_fold_leaves_no_output_or_a_complete_one(tmp_path):
    """Kill the CLI while it writes (copying, then patching): OUT is absent or complete, and the
    next run removes the dead writer's temporary file."""
    import signal
    import subprocess
    import sys
    import time

    rng = np.random.default_rng(8)
    src = gf.write_raw(
        tmp_path / "in.gguf",
        "qwen2",
        {
            "token_embd.weight": (Q.F32, gf.random_blocks(Q.F32, 6144, 2048, rng), (6144, 2048)),  # 48 MiB to copy
            "blk.0.attn_k.weight": (Q.Q8_0, gf.random_blocks(Q.Q8_0, 2048, 2048, rng), (2048, 2048)),
            "blk.0.attn_v.weight": (Q.Q8_0, gf.random_blocks(Q.Q8_0, 2048, 2048, rng), (2048, 2048)),
        },
    )
    adapter = make_adapter(
        tmp_path / "ad", {f"model.layers.0.self_attn.{m}_proj": rng.uniform(0.5, 1.5, 2048) for m in "kv"}
    )
    fold(src, adapter, tmp_path / "ref.gguf")
    ref = (tmp_path / "ref.gguf").read_bytes()
    out = tmp_path / "out.gguf"
    argv = [
        sys.executable,
        "-m",
        "ia3fuse.cli",
        "fold",
        "--gguf",
        str(src),
        "--adapter",
        str(adapter),
        "-o",
        str(out),
        "--no-progress",
        "--force",
    ]
    outcomes = []
    for delay in (0.0, 0.02, 0.1, 0.3, 2.0):
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while not list(tmp_path.glob(".out.gguf.tmp-*")) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.002)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert not out.exists() or out.read_bytes() == ref
        outcomes.append((out.exists(), len(list(tmp_path.glob(".out.gguf.tmp-*")))))
        if out.exists():
            out.unlink()
    assert any(left for _, left in outcomes)  # at least one kill landed inside the write window
    assert subprocess.run(argv, capture_output=True).returncode == 0
    assert out.read_bytes() == ref
    assert list(tmp_path.glob(".out.gguf.tmp-*")) == []
    assert src.exists() and (tmp_path / "ref.gguf").read_bytes() == ref


def test_unknown_fused_qkv_order_and_bad_head_counts_are_refused(tmp_path):
    rng = np.random.default_rng(3)
    src = gf.write_raw(
        tmp_path / "glm.gguf",
        "chatglm",
        {"blk.0.attn_qkv.weight": (Q.Q8_0, gf.random_blocks(Q.Q8_0, 48, 64, rng), (48, 64))},
    )
    p = "transformer.encoder.layers.0.self_attention.query_key_value"
    with pytest.raises(FoldError) as exc:
        fold(src, make_adapter(tmp_path / "ad", {p: np.ones(48)}), tmp_path / "out.gguf")
    assert str(exc.value) == (
        "cannot fold the adapter into this GGUF file: the row order of the fused 'blk.0.attn_qkv.weight' in "
        f"architecture 'chatglm' is unknown to ia3fuse ({p!r}); fold the Hugging Face checkpoint instead "
        "(ia3fuse fold --base) and convert it"
    )
    src = gf.write_raw(
        tmp_path / "llama.gguf",
        "llama",
        {"blk.0.attn_q.weight": (Q.Q8_0, gf.random_blocks(Q.Q8_0, 16, 64, rng), (16, 64))},
        heads=3,
    )
    with pytest.raises(FoldError) as exc:
        fold(
            src, make_adapter(tmp_path / "ad2", {"model.layers.0.self_attn.q_proj": np.ones(16)}), tmp_path / "out.gguf"
        )
    assert str(exc.value) == (
        "cannot fold the adapter into this GGUF file: cannot permute 'blk.0.attn_q.weight' like llama.cpp's converter: "
        "head count 3 does not divide its 16 rows in pairs; the file's metadata does not match the tensor"
    )
    assert not (tmp_path / "out.gguf").exists()


def test_t5_relu_mlp_takes_positive_scales_on_ffn_up_rows(tmp_path):
    """llama.cpp runs T5 v1.0's ungated MLP with ReLU: relu(z) * l = relu(z * l) for l > 0, so wo's
    input scale folds into wi's rows (ffn_up); a negative l has no exact path."""
    rng = np.random.default_rng(11)
    d, ff = 64, 128
    src = gf.write_raw(
        tmp_path / "t5.gguf",
        "t5",
        {
            "enc.blk.0.ffn_up.weight": (Q.Q8_0, gf.random_blocks(Q.Q8_0, ff, d, rng), (ff, d)),
            "enc.blk.0.ffn_down.weight": (Q.Q8_0, gf.random_blocks(Q.Q8_0, d, ff, rng), (d, ff)),
        },
    )
    p = "encoder.block.0.layer.1.DenseReluDense.wo"
    l = rng.uniform(0.5, 1.5, ff).astype(np.float32)
    report = fold(src, make_adapter(tmp_path / "ad", {p: l}, feedforward=(p,)), tmp_path / "out.gguf", exact="require")
    assert [(e.module, e.carries) for e in report.entries] == [
        ("enc.blk.0.ffn_up.weight", f"neighbour (ReLU MLP: ffn_up rows) for {p}")
    ]
    before, after = gf.read(src), gf.read(tmp_path / "out.gguf")
    np.testing.assert_allclose(
        gf.dequant(after["enc.blk.0.ffn_up.weight"]),
        gf.dequant(before["enc.blk.0.ffn_up.weight"]) * l[:, None],
        rtol=1e-3,
        atol=1e-7,
    )
    l[3] = -0.5
    with pytest.raises(FoldError, match=r"the ReLU rewrite \(relu\(z\) \* l = relu\(z \* l\)\) needs every l > 0"):
        ia3fuse.fold_gguf(
            src,
            make_adapter(tmp_path / "neg", {p: l}, feedforward=(p,)),
            tmp_path / "neg.gguf",
            exact="require",
            progress=False,
        )
