"""Benchmark: what one weight change costs in `ia3fuse studio` against PEFT's way of trying a mixture.

A TinyLlama-1.1B-shaped ``LlamaForCausalLM`` (random weights, float32, ``--layers`` of them) and
K random IA3 adapters on PEFT's default Llama targets. One process, one copy of the weights.
Each change draws new weights (Dirichlet(1), seeded) and runs one prefill forward over a batch
of ``--batch`` prompts of ``--seq`` tokens (``use_cache=False``, ``torch.inference_mode``):

* studio: ``Studio.fuse`` (`ia3fuse.merge` of the K adapters), the flat vector assigned to the
  hooks, the forward. The same code as a slider move, without generation and HTTP.
* PEFT: ``add_weighted_adapter(names, w, "mix")``, ``set_adapter("mix")``, the forward,
  ``delete_adapter("mix")`` (PEFT's IA3 merge only sums the vectors; it has no TIES for IA3).

Also the fusion step alone (no forward) for both, and the studio with TIES. Medians of
``--repeats`` changes, paths interleaved. Writes ``<out>/studio_latency.{json,md}``.

    python benchmarks/studio_latency.py                # 22 layers, about 2 minutes on 2 CPUs
    python benchmarks/studio_latency.py --layers 2 --repeats 5   # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch


def _timed(fn: Callable[[list[float]], Any], w: list[float]) -> float:
    start = time.perf_counter()
    fn(w)
    return (time.perf_counter() - start) * 1e3


def main(argv: Any = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=22)
    ap.add_argument("--adapters", type=int, default=3)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args(argv)

    import transformers
    from peft import IA3Config, PeftModel, get_peft_model

    from ia3fuse.studio import Studio

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=args.layers,
        num_attention_heads=32,
        num_key_value_heads=4,
        vocab_size=32000,
    )
    base = transformers.LlamaForCausalLM(cfg).eval()
    tmp = Path(tempfile.mkdtemp(prefix="ia3fuse-studio-bench-"))
    names = [f"a{i}" for i in range(args.adapters)]
    gen = torch.Generator().manual_seed(1)
    for name in names:  # random vectors on PEFT's default targets, saved as PEFT saves them
        peft_model = get_peft_model(base, IA3Config(init_ia3_weights=True))
        with torch.no_grad():
            for n, p in peft_model.named_parameters():
                if "ia3_l" in n:
                    p.copy_(1 + 0.2 * torch.randn(p.shape, generator=gen))
        peft_model.save_pretrained(str(tmp / name))
        base = peft_model.unload()
    studio = Studio(base, [tmp / n for n in names])
    peft = PeftModel.from_pretrained(base, str(tmp / names[0]), adapter_name=names[0])
    for name in names[1:]:
        peft.load_adapter(str(tmp / name), adapter_name=name)
    peft.eval()
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), generator=gen)
    draws = torch.distributions.Dirichlet(torch.ones(args.adapters)).sample((args.repeats + 1,)).tolist()

    def studio_change(w: list[float], method: str = "task_arithmetic", forward: bool = True) -> None:
        params = {"density": 0.5} if method == "ties" else {}
        fused = studio.fuse(studio.fusion({"weights": w, "method": method, "params": params}))
        studio.hooks.scales = studio._flat(fused)
        if forward:
            peft.disable_adapter_layers()  # PEFT's layers off: the studio's hooks scale the base
            try:
                base(input_ids=ids, use_cache=False)
            finally:
                peft.enable_adapter_layers()
        studio.hooks.scales = None

    def peft_change(w: list[float], forward: bool = True) -> None:
        peft.add_weighted_adapter(names, w, "mix")
        peft.set_adapter("mix")
        if forward:
            peft(input_ids=ids, use_cache=False)
        peft.set_adapter(names[0])
        peft.delete_adapter("mix")

    paths: dict[str, Callable[[list[float]], None]] = {
        "studio change (task_arithmetic): fuse + forward": lambda w: studio_change(w),
        "studio change (TIES, density 0.5): fuse + forward": lambda w: studio_change(w, "ties"),
        "PEFT change: add_weighted_adapter + set_adapter + forward + delete": lambda w: peft_change(w),
        "studio fuse only (task_arithmetic)": lambda w: studio_change(w, forward=False),
        "studio fuse only (TIES)": lambda w: studio_change(w, "ties", forward=False),
        "PEFT fuse only (add_weighted_adapter + set + delete)": lambda w: peft_change(w, forward=False),
    }
    times: dict[str, list[float]] = {k: [] for k in paths}
    with torch.inference_mode():
        for fn in paths.values():  # warm-up
            fn(draws[0])
        for w in draws[1:]:
            for k, fn in paths.items():
                times[k].append(_timed(fn, w))
        # the two paths give the same logits (weights sum to 1: PEFT's sum is the delta form)
        w = draws[0]
        studio.hooks.scales = studio._flat(studio.fuse(studio.fusion({"weights": w})))
        peft.disable_adapter_layers()
        ours = base(input_ids=ids[:1], use_cache=False).logits
        peft.enable_adapter_layers()
        studio.hooks.scales = None
        peft.add_weighted_adapter(names, w, "mix")
        peft.set_adapter("mix")
        theirs = peft(input_ids=ids[:1], use_cache=False).logits
        err = float((ours - theirs).abs().max() / theirs.abs().max())
    medians = {k: statistics.median(v) for k, v in times.items()}
    peft_full = medians["PEFT change: add_weighted_adapter + set_adapter + forward + delete"]
    peft_fuse = medians["PEFT fuse only (add_weighted_adapter + set + delete)"]
    rows = []
    for k, v in medians.items():
        ref = peft_fuse if "only" in k else peft_full
        rows.append({"path": k, "median_ms": v, "min_ms": min(times[k]), "vs_peft": ref / v})
    result = {
        "model": f"LlamaForCausalLM, TinyLlama-1.1B shape, {args.layers} layers, random weights, float32",
        "adapters": args.adapters,
        "batch": [args.batch, args.seq],
        "repeats": args.repeats,
        "max_rel_logit_difference_vs_peft": err,
        "rows": rows,
        "machine": f"{os.cpu_count()} CPUs, torch {torch.__version__}, Python {platform.python_version()}",
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "studio_latency.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [
        "# Studio: the cost of one weight change (CPU)",
        "",
        f"{result['model']}; {args.adapters} IA3 adapters (k_proj, v_proj, down_proj); one prefill forward over "
        f"{args.batch} x {args.seq} tokens per change; median of {args.repeats} changes, paths interleaved. "
        f"Machine: {result['machine']}.",
        "",
        "| path | median ms | min ms | PEFT / this |",
        "|---|---:|---:|---:|",
        *[f"| {r['path']} | {r['median_ms']:.1f} | {r['min_ms']:.1f} | {r['vs_peft']:.2f}x |" for r in rows],
        "",
        f"Same mixture, same logits: max relative difference {err:.2e} (PEFT's sum of l = the delta form when "
        "the weights sum to 1). The fuse-only rows compare with PEFT's fuse-only row; the others with PEFT's full change.",
        "",
    ]
    (out / "studio_latency.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
