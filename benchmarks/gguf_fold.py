"""Benchmark: folding one IA3 adapter into a TinyLlama-1.1B-shaped GGUF file on CPU.

The files have random weights in TinyLlama's shapes (22 layers, hidden 2048, ffn 5632, 32 heads,
4 kv heads, vocab 32000) in three layouts: ``Q4_K_M``-style (Q4_K, with Q6_K for attn_v and
ffn_down of every other layer and for output, as llama.cpp's Q4_K_M mix), all ``Q8_0``, all
``Q4_0``. The adapter has PEFT's default Llama targets (k_proj and v_proj output-side, down_proj
feed-forward), ``l = 1 + 0.1 N(0, 1)``. In one run, per layout:

* ``ia3fuse``: `ia3fuse.fold_gguf` end to end (copy the file, rewrite the block scales of
  attn_k, attn_v and, for down_proj, ffn_up's rows), and its per-tensor compute alone;
* ``requantize (gguf-py)``: the naive path on the same IA3 modules: dequantize each tensor,
  scale it (down_proj: its columns), quantize it again with the gguf package's numpy quantizers,
  where it has them (Q8_0, Q4_0: not K-quants);
* ``requantize (ggml C)``: the same with ggml's own C quantizer (through llama-cpp-python's
  libggml), for every type, where llama-cpp-python is installed.

For each: wall time and peak traced memory (tracemalloc: numpy's allocations, not the page cache
of the memory-mapped file) of the per-tensor work, and each tensor's relative error
``||W_new - W_exact|| / ||W_exact||`` against ``diag(l) W`` (or ``W diag(l)``) of the input
tensor, dequantized by ggml's reference (the gguf package). Writes
``benchmarks/results/gguf_fold.{json,md}``.

Usage::

    python benchmarks/gguf_fold.py            # full, ~10 minutes on 2 CPUs, ~2.5 GB of temporary files
    python benchmarks/gguf_fold.py --quick    # same widths, 2 layers: a smoke run
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import tracemalloc
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))  # test support: random blocks, ggml's C library

import ggml_c  # noqa: E402
import gguf_files  # noqa: E402
from gguf import GGMLQuantizationType as Q  # noqa: E402
from merge_speed import host_facts  # noqa: E402

import ia3fuse  # noqa: E402
from ia3fuse.folding import gguf_blocks  # noqa: E402

SHAPE = {"layers": 22, "hidden": 2048, "ffn": 5632, "heads": 32, "kv": 4, "vocab": 32000}


def layout_types(layout: str, layer: Optional[int], kind: str) -> int:
    if layout == "Q8_0":
        return Q.Q8_0
    if layout == "Q4_0":
        return Q.Q4_0
    # Q4_K_M-style: llama.cpp's mix, Q6_K for output and half of attn_v / ffn_down
    if kind == "output" or (kind in ("attn_v", "ffn_down") and layer is not None and layer % 2 == 0):
        return Q.Q6_K
    return Q.Q4_K


def build(path: Path, layout: str, layers: int, rng: np.random.Generator) -> Path:
    h, f, kvd, v = SHAPE["hidden"], SHAPE["ffn"], SHAPE["hidden"] // SHAPE["heads"] * SHAPE["kv"], SHAPE["vocab"]
    tensors: dict[str, tuple[int, np.ndarray, tuple[int, ...]]] = {}

    def add(name: str, kind: str, layer: Optional[int], rows: int, cols: int) -> None:
        t = layout_types(layout, layer, kind)
        # weights ~ N(0, 0.02): block scales of the size real checkpoints have
        scale = {Q.Q8_0: (4e-4, 7e-4), Q.Q4_0: (8e-3, 1.4e-2), Q.Q4_K: (2e-4, 4e-4), Q.Q6_K: (2e-5, 5e-5)}[t]
        tensors[name] = (t, gguf_files.random_blocks(t, rows, cols, rng, scale=scale), (rows, cols))

    add("token_embd.weight", "embd", None, v, h)
    for i in range(layers):
        tensors[f"blk.{i}.attn_norm.weight"] = (Q.F32, np.ones(h, np.float32).view(np.uint8).reshape(1, -1), (h,))
        add(f"blk.{i}.attn_q.weight", "attn_q", i, h, h)
        add(f"blk.{i}.attn_k.weight", "attn_k", i, kvd, h)
        add(f"blk.{i}.attn_v.weight", "attn_v", i, kvd, h)
        add(f"blk.{i}.attn_output.weight", "attn_output", i, h, h)
        tensors[f"blk.{i}.ffn_norm.weight"] = (Q.F32, np.ones(h, np.float32).view(np.uint8).reshape(1, -1), (h,))
        add(f"blk.{i}.ffn_gate.weight", "ffn_gate", i, f, h)
        add(f"blk.{i}.ffn_up.weight", "ffn_up", i, f, h)
        add(f"blk.{i}.ffn_down.weight", "ffn_down", i, h, f)
    tensors["output_norm.weight"] = (Q.F32, np.ones(h, np.float32).view(np.uint8).reshape(1, -1), (h,))
    add("output.weight", "output", None, v, h)
    return gguf_files.write_raw(path, "llama", tensors, heads=SHAPE["heads"], kv=SHAPE["kv"], blocks=layers)


def make_adapter(path: Path, layers: int, rng: np.random.Generator) -> Path:
    from safetensors.numpy import save_file

    kvd = SHAPE["hidden"] // SHAPE["heads"] * SHAPE["kv"]
    path.mkdir()
    (path / "adapter_config.json").write_text(
        json.dumps(
            {
                "peft_type": "IA3",
                "target_modules": ["k_proj", "v_proj", "down_proj"],
                "feedforward_modules": ["down_proj"],
                "base_model_name_or_path": "TinyLlama-1.1B-shaped",
                "task_type": "CAUSAL_LM",
                "fan_in_fan_out": False,
                "init_ia3_weights": True,
            }
        )
    )
    vecs = {}
    for i in range(layers):
        p = f"base_model.model.model.layers.{i}"
        vecs[f"{p}.self_attn.k_proj.ia3_l"] = (1 + 0.1 * rng.standard_normal((kvd, 1))).astype(np.float32)
        vecs[f"{p}.self_attn.v_proj.ia3_l"] = (1 + 0.1 * rng.standard_normal((kvd, 1))).astype(np.float32)
        vecs[f"{p}.mlp.down_proj.ia3_l"] = (1 + 0.1 * rng.standard_normal((1, SHAPE["ffn"]))).astype(np.float32)
    save_file(vecs, str(path / "adapter_model.safetensors"))
    return path


def tasks(reader: Any, adapter: ia3fuse.IA3Adapter, layers: int) -> list[dict[str, Any]]:
    """Per IA3 module: the tensor the naive path changes (and how), and the one ia3fuse changes."""
    by_name = {t.name: t for t in reader.tensors}
    n_kv = SHAPE["kv"]
    out = []
    for i in range(layers):
        p = f"model.layers.{i}"
        k = adapter.vectors[f"{p}.self_attn.k_proj"].numpy().reshape(-1)
        v = adapter.vectors[f"{p}.self_attn.v_proj"].numpy().reshape(-1)
        d = adapter.vectors[f"{p}.mlp.down_proj"].numpy().reshape(-1)
        from ia3fuse.folding.gguf_map import llama_permute

        out.append(
            {
                "module": "k",
                "naive": (by_name[f"blk.{i}.attn_k.weight"], llama_permute(k, n_kv), None),
                "ours": (by_name[f"blk.{i}.attn_k.weight"], llama_permute(k, n_kv), None),
            }
        )
        out.append(
            {
                "module": "v",
                "naive": (by_name[f"blk.{i}.attn_v.weight"], v, None),
                "ours": (by_name[f"blk.{i}.attn_v.weight"], v, None),
            }
        )
        out.append(
            {
                "module": "down",
                "naive": (by_name[f"blk.{i}.ffn_down.weight"], None, d),
                "ours": (by_name[f"blk.{i}.ffn_up.weight"], d, None),
            }
        )
    return out


def raw_of(t: Any) -> np.ndarray:
    ne = [int(x) for x in t.shape]
    return np.asarray(t.data).reshape(int(np.prod(ne[1:])), -1)


def run_path(
    name: str,
    jobs: list[tuple[Any, Optional[np.ndarray], Optional[np.ndarray]]],
    fn: Callable[[np.ndarray, int, Optional[np.ndarray], Optional[np.ndarray], int], np.ndarray],
) -> dict[str, Any]:
    """Time and trace ``fn`` tensor by tensor (peak: the largest working memory of one tensor's step,
    above what was allocated before it), then measure each result's error (untimed, untraced)."""
    seconds, peak, errors = 0.0, 0, []
    tracemalloc.start()
    for t, rows, cols in jobs:
        raw = raw_of(t)
        base = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        t0 = time.perf_counter()
        new = fn(raw, int(t.tensor_type), rows, cols, int(t.shape[0]))
        seconds += time.perf_counter() - t0
        peak = max(peak, tracemalloc.get_traced_memory()[1] - base)
        tracemalloc.stop()
        before = gguf_blocks.dequantize(raw, int(t.tensor_type)).astype(np.float64)
        want = (
            before * (rows.reshape(-1, 1) if rows is not None else 1) * (cols.reshape(1, -1) if cols is not None else 1)
        )
        after = gguf_blocks.dequantize(new, int(t.tensor_type))
        errors.append(float(np.linalg.norm(after - want) / np.linalg.norm(want)))
        del new, before, want, after
        tracemalloc.start()
    tracemalloc.stop()
    return {
        "path": name,
        "tensors": len(jobs),
        "seconds": seconds,
        "peak_mib": peak / 2**20,
        "max_error": max(errors),
        "mean_error": statistics.fmean(errors),
    }


def ours(raw: np.ndarray, qtype: int, rows, cols, ne0: int) -> np.ndarray:
    return gguf_blocks.scale_rows(raw, qtype, rows)[0]


def naive_py(raw: np.ndarray, qtype: int, rows, cols, ne0: int) -> np.ndarray:
    return gguf_blocks.requantize(raw, qtype, rows, cols)


def naive_c(ggml: Any) -> Callable[..., np.ndarray]:
    def fn(raw: np.ndarray, qtype: int, rows, cols, ne0: int) -> np.ndarray:
        w = ggml.dequantize(raw, qtype, ne0)
        if rows is not None:
            w *= rows.reshape(-1, 1)
        if cols is not None:
            w *= cols.reshape(1, -1)
        return ggml.quantize(w, qtype)

    return fn


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=SHAPE["layers"])
    ap.add_argument("--quick", action="store_true", help="2 layers (same widths): a smoke run")
    ap.add_argument("--layouts", nargs="+", default=["Q4_K_M", "Q8_0", "Q4_0"])
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--workdir", default=None, help="folder for the temporary GGUF files (default: a temp dir)")
    args = ap.parse_args()
    if args.quick:
        args.layers = 2
    import gguf

    ggml = ggml_c.load()
    rng = np.random.default_rng(0)
    rows_out = []
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        work = Path(tmp)
        adapter_dir = make_adapter(work / "adapter", args.layers, rng)
        adapter = ia3fuse.load_adapter(adapter_dir)
        for layout in args.layouts:
            src = build(work / f"tinyllama-{layout}.gguf", layout, args.layers, rng)
            size = src.stat().st_size
            t0 = time.perf_counter()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                report = ia3fuse.fold_gguf(src, adapter, work / "out.gguf", exact="require", progress=False)
            e2e = time.perf_counter() - t0
            reader = gguf.GGUFReader(str(src))
            ts = tasks(reader, adapter, args.layers)
            types = sorted(
                {Q(int(j["ours"][0].tensor_type)).name for j in ts}
                | {Q(int(j["naive"][0].tensor_type)).name for j in ts}
            )
            base = {"layout": layout, "file_mb": size / 1e6, "types": ", ".join(types)}
            row = run_path("ia3fuse (block scales)", [j["ours"] for j in ts], ours)
            rows_out.append(
                {
                    **base,
                    **row,
                    "end_to_end_s": e2e,
                    "exact": report.exact,
                    "warnings": [str(w.message) for w in caught],
                }
            )
            if all(gguf_blocks.can_requantize(int(j["naive"][0].tensor_type)) for j in ts):
                rows_out.append({**base, **run_path("requantize (gguf-py numpy)", [j["naive"] for j in ts], naive_py)})
            else:
                rows_out.append(
                    {
                        **base,
                        "path": "requantize (gguf-py numpy)",
                        "tensors": len(ts),
                        "seconds": None,
                        "note": "the gguf package cannot quantize "
                        + ", ".join(t for t in types if not gguf_blocks.can_requantize(Q[t])),
                    }
                )
            if ggml is not None:
                rows_out.append({**base, **run_path("requantize (ggml C)", [j["naive"] for j in ts], naive_c(ggml))})
            del reader
            src.unlink()
            (work / "out.gguf").unlink()
            print(json.dumps(rows_out[-1], default=str)[:200], file=sys.stderr)
    result = {
        "shape": {**SHAPE, "layers": args.layers},
        "host": host_facts(),
        "ggml_c": ggml is not None,
        "rows": rows_out,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "gguf_fold" if args.layers == SHAPE["layers"] else f"gguf_fold_{args.layers}layers"
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    (out / f"{stem}.md").write_text(markdown(result))
    print(markdown(result))
    return 0


def markdown(result: dict[str, Any]) -> str:
    s = result["shape"]
    lines = [
        "# GGUF fold: TinyLlama-1.1B-shaped files, one IA3 adapter (k, v, down_proj)",
        "",
        f"Random weights, {s['layers']} layers, hidden {s['hidden']}, ffn {s['ffn']}, {s['heads']} heads / {s['kv']} kv heads, "
        f"vocab {s['vocab']}. Host: {result['host'].get('cpu_model')}, {result['host'].get('cpu_count')} CPUs. "
        "Times (summed) and peak traced memory (numpy allocations of the largest single-tensor step) are for the per-tensor work over the IA3 modules' tensors; "
        "the end-to-end column is `ia3fuse.fold_gguf` writing the whole output file. Error: "
        "||W_new - W_exact|| / ||W_exact|| per tensor, dequantized by ggml's reference.",
        "",
        "| layout | types touched | path | tensors | time (s) | peak memory (MiB) | max error | mean error | end to end (s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        if r.get("seconds") is None:
            lines.append(f"| {r['layout']} | {r['types']} | {r['path']} | {r['tensors']} | n/a: {r['note']} | | | | |")
            continue
        e2e = f"{r['end_to_end_s']:.2f} ({r['file_mb']:.0f} MB)" if "end_to_end_s" in r else ""
        lines.append(
            f"| {r['layout']} | {r['types']} | {r['path']} | {r['tensors']} | {r['seconds']:.2f} | {r['peak_mib']:.1f} | "
            f"{r['max_error']:.2e} | {r['mean_error']:.2e} | {e2e} |"
        )
    lines.append("")
    by = {}
    for r in result["rows"]:
        by.setdefault(r["layout"], {})[r["path"]] = r
    for layout, paths in by.items():
        ours_ = paths.get("ia3fuse (block scales)")
        for name, r in paths.items():
            if r is ours_ or r.get("seconds") is None:
                continue
            lines.append(
                f"- {layout}, {name}: {r['seconds'] / ours_['seconds']:.0f}x the time, "
                f"{r['peak_mib'] / max(ours_['peak_mib'], 1e-9):.1f}x the peak memory and "
                f"{r['mean_error'] / ours_['mean_error']:.0f}x the mean error of ia3fuse's block-scale fold."
            )
    warn = [w for r in result["rows"] for w in r.get("warnings", [])]
    if warn:
        lines += ["", "Warnings during the folds:", *[f"- {w}" for w in warn]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
