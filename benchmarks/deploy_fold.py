"""Benchmark: the streaming fold into quantized checkpoints that serving engines load (issue 17).

A TinyLlama-1.1B-shaped model (hidden 2048, intermediate 5632, 22 layers, 32 heads / 4 KV heads,
vocab 32000; random weights) is saved as bf16 safetensors and quantized to

* compressed-tensors W4A16 (int4, group 128, symmetric, bf16 scales), with the
  ``compressed_tensors`` library (min-max round-to-nearest, as llm-compressor's default observer);
* GPTQ 4-bit, group 128 (v1 layout), by round-to-nearest through ``tests/quant_specs.py`` (GPTQ's
  calibration is too slow for this CPU, and no GPTQ quantizer installs next to torch 2.13 here).

One IA3 adapter with PEFT's default Llama targets (k_proj, v_proj output-side, down_proj
feed-forward), l = 1 + 0.1 randn. Paths, each in its own subprocess (its peak RSS is its own):

* ``(a)`` ``ia3fuse fold --base QUANTIZED --adapter A -o OUT``: the checkpoint fold;
* ``(b)`` today's workaround: load the quantized checkpoint dequantized, PEFT
  ``merge_and_unload()``, quantize again with the same quantizer (RTN), save;
* ``(c)`` ``cp -r`` of the same checkpoint and ``sync``, on the same disk;
* ``(d)`` the full-precision streaming fold of the bf16 checkpoint, and ``cp`` of it.

Errors: relative logit error ``||logits - ref|| / ||ref||`` on a 2 x 16 batch, where ref is
PEFT's unmerged IA3 on the quantized base (compressed-tensors: loaded by transformers, dequantized;
GPTQ: a dense model holding the spec dequantizer's weights).

Usage::

    python benchmarks/deploy_fold.py            # full size (about 15 minutes on 2 CPUs)
    python benchmarks/deploy_fold.py --quick    # 2 layers, same widths

Writes ``benchmarks/results/deploy_fold.{json,md}`` (``deploy_fold_quick.*`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "tests"))

SHAPE = dict(
    vocab_size=32000,
    hidden_size=2048,
    intermediate_size=5632,
    num_hidden_layers=22,
    num_attention_heads=32,
    num_key_value_heads=4,
    max_position_embeddings=2048,
)
TARGETS = dict(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])


def _du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


# --- setup ------------------------------------------------------------------------------------------


def setup(work: Path, layers: int) -> None:
    import torch
    import transformers

    from factories import random_ia3_adapter

    if (work / "done").exists():
        return
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**{**SHAPE, "num_hidden_layers": layers})
    model = transformers.LlamaForCausalLM(config).to(torch.bfloat16).eval()
    model.save_pretrained(work / "fp")
    random_ia3_adapter(model, work / "adapter", seed=1, spread=0.1, **TARGETS)
    from ct_checkpoints import quantize_ct

    quantize_ct(model, "w4a16_group", work / "ct", group_size=128)
    del model
    _write_gptq(work / "fp", work / "gptq")
    (work / "done").write_text("ok")


def _write_gptq(fp: Path, out: Path, scale: dict[str, Any] | None = None) -> None:
    """GPTQ 4-bit g128 (v1 layout) of every decoder Linear of ``fp`` by RTN; ``scale``: module ->
    (rows, cols) applied to the float weight first (the workaround's merge)."""
    import torch
    from safetensors.torch import load_file, save_file

    from quant_specs import gptq_quantize, quant_config

    dense = load_file(str(fp / "model.safetensors"))
    tensors: dict[str, torch.Tensor] = {}
    for name, t in dense.items():
        module = name.rsplit(".", 1)[0]
        if name.endswith(".weight") and ".layers." in name and t.dim() == 2:
            w = t.float()
            if scale and module in scale:
                rows, cols = scale[module]
                w = (
                    w
                    * (rows.reshape(-1, 1) if rows is not None else 1)
                    * (cols.reshape(1, -1) if cols is not None else 1)
                )
            for k, v in gptq_quantize(w, bits=4, group_size=128, sym=True, desc_act=False).items():
                tensors[f"{module}.{k}"] = v.contiguous()
        else:
            tensors[name] = t.contiguous()
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((fp / "config.json").read_text())
    config["quantization_config"] = quant_config("gptq", bits=4, group_size=128, sym=True, desc_act=False)
    (out / "config.json").write_text(json.dumps(config, indent=2))


# --- workers (one per subprocess) -------------------------------------------------------------------


def _rss_mib() -> float:
    """This process's peak RSS (VmHWM: unlike ru_maxrss, not inherited from the parent across exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker_fold(work: Path, src: str, out: str) -> dict[str, Any]:
    t0 = time.perf_counter()
    import ia3fuse

    t1 = time.perf_counter()
    report = ia3fuse.fold_checkpoint(work / src, work / "adapter", work / out, progress=False, overwrite=True)
    t2 = time.perf_counter()
    # the same fold again, imports and module caches warm: the streaming part alone
    report = ia3fuse.fold_checkpoint(
        work / src, work / "adapter", work / f"{out}-again", progress=False, overwrite=True
    )
    t3 = time.perf_counter()
    shutil.rmtree(work / f"{out}-again")
    changed = sum(
        int(torch_numel(e.shape)) * {"float32": 4, "bfloat16": 2, "float16": 2}.get(e.dtype, 1) for e in report.entries
    )
    return {
        "wall_s": t2 - t0,
        "import_s": t1 - t0,
        "fold_s": t2 - t1,
        "warm_fold_s": t3 - t2,
        "peak_rss_mib": _rss_mib(),
        "bytes_rewritten": changed,
        "bytes_total": _du(work / src),
        "tensors_changed": report.changed,
        "summary": report.summary(),
        "breakdown": report.breakdown(),
    }


def torch_numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def worker_workaround_ct(work: Path) -> dict[str, Any]:
    t0 = time.perf_counter()
    import torch
    import transformers
    from peft import PeftModel

    from ct_checkpoints import quantize_ct

    model = transformers.AutoModelForCausalLM.from_pretrained(
        work / "ct",
        quantization_config=transformers.CompressedTensorsConfig(dequantize=True),
        dtype=torch.bfloat16,
        device_map="cpu",
    )
    merged = PeftModel.from_pretrained(model, str(work / "adapter")).merge_and_unload()
    merged.config.quantization_config = None
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(merged.config, attr):
            delattr(merged.config, attr)
    merged.hf_quantizer = None
    quantize_ct(merged, "w4a16_group", work / "ct-workaround", group_size=128)
    return {"wall_s": time.perf_counter() - t0, "peak_rss_mib": _rss_mib()}


def worker_workaround_gptq(work: Path) -> dict[str, Any]:
    t0 = time.perf_counter()
    import ia3fuse

    adapter = ia3fuse.load_adapter(work / "adapter")
    scale = {}
    for path, vec in adapter.vectors.items():
        module = path.removeprefix("base_model.model.")
        ff = adapter.feedforward[path]
        scale[module] = (None, vec.reshape(-1).float()) if ff else (vec.reshape(-1).float(), None)
    fp = work / "gptq-dequantized"
    _dequantize_gptq(work / "gptq", fp)
    _write_gptq(fp, work / "gptq-workaround", scale)
    return {"wall_s": time.perf_counter() - t0, "peak_rss_mib": _rss_mib()}


def _dequantize_gptq(src: Path, out: Path) -> None:
    """A dense bf16 checkpoint holding the GPTQ checkpoint's dequantized weights (tests/quant_specs)."""
    from safetensors.torch import load_file, save_file

    from quant_specs import gptq_dequantize

    t = load_file(str(src / "model.safetensors"))
    dense = {}
    for name in list(t):
        if name.endswith(".qweight"):
            module = name[: -len(".qweight")]
            parts = {k: t[f"{module}.{k}"] for k in ("qweight", "qzeros", "scales", "g_idx")}
            dense[f"{module}.weight"] = gptq_dequantize(parts, bits=4).contiguous()  # float32: no second rounding
        elif name.rsplit(".", 1)[1] not in ("qzeros", "scales", "g_idx"):
            dense[name] = t[name]
    out.mkdir(parents=True, exist_ok=True)
    save_file(dense, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    config.pop("quantization_config", None)
    (out / "config.json").write_text(json.dumps(config, indent=2))


def worker_logits(work: Path, kind: str, folder: str, adapter: bool, dtype: str = "float32") -> dict[str, Any]:
    import torch
    import transformers

    path = work / folder
    if kind == "ct":
        model = transformers.AutoModelForCausalLM.from_pretrained(
            path,
            quantization_config=transformers.CompressedTensorsConfig(dequantize=True),
            dtype=getattr(torch, dtype),
            device_map="cpu",
        )
    else:
        dense = work / f"{folder}-dequantized"
        if not dense.exists():
            _dequantize_gptq(path, dense)
        model = transformers.AutoModelForCausalLM.from_pretrained(dense, dtype=getattr(torch, dtype))
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(work / "adapter"))
    model.eval()
    ids = torch.randint(1, 32000, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float()
    suffix = "" if dtype == "float32" else f"-{dtype}"
    torch.save(logits, work / f"logits-{folder}-{int(adapter)}{suffix}.pt")
    return {"peak_rss_mib": _rss_mib()}


def worker_cp(work: Path, src: str) -> dict[str, Any]:
    dst = work / f"{src}-copy"
    shutil.rmtree(dst, ignore_errors=True)
    t0 = time.perf_counter()
    subprocess.run(["cp", "-r", str(work / src), str(dst)], check=True)
    subprocess.run(["sync"], check=True)
    wall = time.perf_counter() - t0
    shutil.rmtree(dst)
    return {"wall_s": wall, "bytes_total": _du(work / src)}


WORKERS = {
    "fold": worker_fold,
    "workaround_ct": worker_workaround_ct,
    "workaround_gptq": worker_workaround_gptq,
    "logits": worker_logits,
    "cp": worker_cp,
}


def run(work: Path, name: str, *args: Any) -> dict[str, Any]:
    out = work / "result.json"
    cmd = [sys.executable, __file__, "--worker", name, "--work", str(work), *map(str, args)]
    subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "2"})
    return json.loads(out.read_text())


def rel(work: Path, a: str, b: str) -> float:
    import torch

    x, y = torch.load(work / a), torch.load(work / b)
    return float((x - y).norm() / y.norm())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 layers instead of 22")
    parser.add_argument("--work", default="/tmp/ia3fuse-deploy-bench", help="scratch folder (about 12 GB at full size)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("rest", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    work = Path(args.work) if args.worker else Path(args.work) / ("quick" if args.quick else "full")
    if args.worker:
        fn = WORKERS[args.worker]
        rest: list[Any] = [r == "True" if r in ("True", "False") else r for r in args.rest]
        result = fn(work, *rest)
        (work / "result.json").write_text(json.dumps(result))
        return
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    setup(work, 2 if args.quick else SHAPE["num_hidden_layers"])
    setup_s = time.perf_counter() - t0
    res: dict[str, Any] = {"setup_s": setup_s, "layers": 2 if args.quick else SHAPE["num_hidden_layers"]}
    for fmt in ("ct", "gptq"):
        r: dict[str, Any] = {}
        r["a"] = run(work, "fold", fmt, f"{fmt}-folded")
        r["b"] = run(work, f"workaround_{fmt}")
        r["c"] = run(work, "cp", fmt)
        for folder, adapter in ((fmt, True), (f"{fmt}-folded", False), (f"{fmt}-workaround", False)):
            run(work, "logits", fmt, folder, adapter)
        r["error_a"] = rel(work, f"logits-{fmt}-folded-0.pt", f"logits-{fmt}-1.pt")
        r["error_b"] = rel(work, f"logits-{fmt}-workaround-0.pt", f"logits-{fmt}-1.pt")
        run(work, "logits", fmt, fmt, False)
        r["adapter_effect"] = rel(work, f"logits-{fmt}-0.pt", f"logits-{fmt}-1.pt")
        run(work, "logits", fmt, fmt, True, "bfloat16")  # PEFT unmerged, run in bf16: the usual compute floor
        r["bf16_floor"] = rel(work, f"logits-{fmt}-1-bfloat16.pt", f"logits-{fmt}-1.pt")
        res[fmt] = r
    res["fp"] = {"a": run(work, "fold", "fp", "fp-folded"), "c": run(work, "cp", "fp")}
    res["script_s"] = time.perf_counter() - t0
    name = "deploy_fold_quick" if args.quick else "deploy_fold"
    out = HERE / "results"
    (out / f"{name}.json").write_text(json.dumps(res, indent=2) + "\n")
    (out / f"{name}.md").write_text(report(res))
    print(report(res))


def report(res: dict[str, Any]) -> str:
    import platform

    import torch
    import transformers

    lines = [
        "# Deploy fold: IA3 into quantized checkpoints, streamed (CPU)",
        "",
        f"Base: LlamaForCausalLM, TinyLlama-1.1B shape with {res['layers']} layers, random weights, bf16. Adapter: "
        "k_proj, v_proj (output-side), down_proj (feed-forward, moved onto up_proj's rows), l = 1 + 0.1 randn. "
        f"Machine: {os.cpu_count()} CPUs, torch {torch.__version__}, transformers {transformers.__version__}, "
        f"Python {platform.python_version()}. Each path in its own subprocess; files in the page cache.",
        "",
        "| format | path | wall s | peak RSS MiB | bytes rewritten | throughput vs cp (warm) | logit rel. error vs PEFT unmerged |",
        "|---|---|---|---|---|---|---|",
    ]
    for fmt, label in (("ct", "compressed-tensors W4A16 g128"), ("gptq", "GPTQ 4-bit g128 (v1)")):
        r = res[fmt]
        cp = r["c"]["wall_s"]
        a, b = r["a"], r["b"]
        lines.append(
            f"| {label} | (a) `ia3fuse fold` | {a['wall_s']:.2f} (warm {a['warm_fold_s']:.2f}) | {a['peak_rss_mib']:,.0f} | "
            f"{a['bytes_rewritten']:,} of {a['bytes_total']:,} | {cp / a['wall_s']:.0%} ({cp / a['warm_fold_s']:.0%}) | "
            f"{r['error_a']:.2e} |"
        )
        lines.append(
            f"| {label} | (b) dequantize, PEFT merge, requantize (RTN) | {b['wall_s']:.2f} | {b['peak_rss_mib']:,.0f} | "
            f"all | {cp / b['wall_s']:.0%} | {r['error_b']:.2e} |"
        )
        lines.append(f"| {label} | (c) `cp -r` + `sync` | {cp:.2f} | – | {r['c']['bytes_total']:,} | 100% | – |")
    fp = res["fp"]
    lines.append(
        f"| bf16 (full precision) | (d) `ia3fuse fold` | {fp['a']['wall_s']:.2f} (warm {fp['a']['warm_fold_s']:.2f}) | "
        f"{fp['a']['peak_rss_mib']:,.0f} | {fp['a']['bytes_rewritten']:,} of {fp['a']['bytes_total']:,} | "
        f"{fp['c']['wall_s'] / fp['a']['wall_s']:.0%} ({fp['c']['wall_s'] / fp['a']['warm_fold_s']:.0%}) | "
        "exact (float32 products) |"
    )
    lines.append(f"| bf16 (full precision) | (c) `cp -r` + `sync` | {fp['c']['wall_s']:.2f} | – | – | 100% | – |")
    lines += [
        "",
        "**Ratios** (wall): "
        + "; ".join(
            f"{fmt} (b)/(a) = {res[fmt]['b']['wall_s'] / res[fmt]['a']['wall_s']:.0f}x" for fmt in ("ct", "gptq")
        )
        + ". The adapter itself moves the logits by "
        + ", ".join(f"{res[fmt]['adapter_effect']:.2e} ({fmt})" for fmt in ("ct", "gptq"))
        + " (base vs PEFT unmerged), the scale the errors are read against; running PEFT's unmerged model in "
        "bf16 instead of float32 moves them by "
        + ", ".join(f"{res[fmt]['bf16_floor']:.2e} ({fmt})" for fmt in ("ct", "gptq"))
        + " (the compute floor of a bf16 deployment). (a)'s error is the rounding of each new scale to its "
        "dtype (compressed-tensors: bf16, 2^-9 relative per row; GPTQ: fp16, 2^-11); (b) quantizes the merged "
        "weights afresh, so every scaled layer gets new 4-bit codes: an error as large as the adapter's effect.",
        "",
        "Wall s of (a) and (d): the first `fold_checkpoint` call of a fresh process, imports included (transformers "
        "and what it imports itself: with torchao and hqq installed, both, about 1.6 s) and the config-built "
        "meta-device skeleton; in parentheses (warm), the same fold again in that process: the streaming part. Peak RSS: the process's "
        "high-water mark (VmHWM), imports included. Bytes rewritten: the tensors the fold changed; every "
        "other tensor is copied byte for byte. Throughput vs cp: `cp -r` + `sync` wall time of the same input "
        "divided by the path's wall time (warm: by the warm fold's).",
        f"Script run time: {res['script_s']:.0f} s (setup {res['setup_s']:.0f} s).",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
