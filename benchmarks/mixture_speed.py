"""Benchmark: serving per-request IA3 mixtures with `ia3fuse.Mixture` vs PEFT's add_weighted_adapter.

A TinyLlama-1.1B-shaped ``LlamaForCausalLM`` with random weights and K IA3 adapters with random
vectors (PEFT's default Llama targets: k_proj, v_proj output-side, down_proj feed-forward), built
with PEFT and saved to a temp folder. One process, one copy of the weights: the plain model, the
model hooked by the Mixture and the PeftModel are three module trees over the same tensors.

(a) Serving R requests (default 32 prompts of ``--seq`` tokens) with R different mixtures
    (Dirichlet(1) weights over K, seeded):

    * ia3fuse: one ``mixture(input_ids=..., mixture_weights=W)`` prefill forward over the batch,
      ``W`` of shape (R, K) (the scales are computed from ``W`` inside the timed call).
    * PEFT: per request ``add_weighted_adapter(names, w, "mix_i")`` (a weighted sum of the l
      vectors, stored in the base model's dtype), ``set_adapter("mix_i")``, a batch-1 forward,
      ``delete_adapter("mix_i")`` (so memory does not grow). The whole loop is timed.

    The weights sum to 1, so PEFT's weighted sum of l equals the Mixture's delta form
    ``1 + sum_k w_k (l_k - 1)``; the logits of 3 requests are compared.
(b) Overhead at batch 1 and batch R: forward of the Mixture with (B, K) weights vs a PeftModel
    with one fused IA3 adapter active (PEFT's ``add_weighted_adapter``, vectors in the base
    dtype), vs one adapter as PEFT loads it (float32 vectors), vs the base model alone.
    Forwards of the paths are timed round-robin, median of ``--repeats``.
(c) Peak memory of each path: ``torch.cuda.max_memory_allocated`` on CUDA; on CPU the process's
    resident high-water mark, reset before each path through ``/proc/self/clear_refs``
    (best-effort).

Forwards run under ``torch.inference_mode()`` with ``use_cache=False`` and return the logits of
every position. Usage::

    python benchmarks/mixture_speed.py                                   # cuda + bf16 if available
    python benchmarks/mixture_speed.py --device cuda --dtype bfloat16    # 22 layers
    python benchmarks/mixture_speed.py --device cpu --dtype float32 --layers 2 --seq 32 --threads 1
    python benchmarks/mixture_speed.py --quick                           # 2 small layers, smoke run

Writes ``<out>/mixture_speed_<device>.{json,md}`` (``..._quick`` with ``--quick``). Nothing is
downloaded. On a CPU shared with other processes, ``--threads 1`` keeps timings usable (two
OpenMP threads on two busy CPUs stall in barriers); the results record how busy the machine was,
and the markdown gives ratios of the minima next to those of the medians.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import os
import re
import resource
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never download anything
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from merge_speed import LLAMA_SHAPE, _machine_busy_seconds, _write_json_atomic, _write_text_atomic, host_facts

RESULTS = HERE / "results"
MiB = 1024 * 1024
QUICK_SHAPE = dict(
    LLAMA_SHAPE,
    hidden_size=256,
    intermediate_size=704,
    num_hidden_layers=2,
    num_attention_heads=8,
    num_key_value_heads=2,
    vocab_size=1024,
)
SPREAD = 0.2  # adapter vectors l = 1 + SPREAD * N(0, 1)
CHECK_REQUESTS = 3


# --------------------------------------------------------------------------------------------
# model, adapters, inputs
# --------------------------------------------------------------------------------------------


def build_model(config: Any, device: Any, dtype: Any, seed: int) -> Any:
    """A LlamaForCausalLM with random weights, allocated straight on ``device`` in ``dtype``.

    Built on the meta device and filled once (as transformers' init would: normal(0, 0.02),
    norms at 1), which skips the slow per-module init on CPU.
    """
    import torch
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to(dtype).to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, config.initializer_range, generator=gen)
    # to_empty leaves buffers uninitialised: rebuild the rotary embedding (float32 inv_freq, as from_pretrained).
    with torch.device(device):
        model.model.rotary_emb = type(model.model.rotary_emb)(config=config).to(device)
    return model.eval()


def shallow_copy(model: Any) -> Any:
    """A second module tree over the same parameter and buffer tensors (no weight memory)."""
    memo = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return copy.deepcopy(model, memo)


def make_adapters(model: Any, root: Path, k: int, seed: int) -> tuple[list[str], dict[str, Any]]:
    """K IA3 adapters in PEFT's format (default Llama targets), l = 1 + SPREAD * N(0, 1)."""
    import torch
    from peft import IA3Config, get_peft_model

    peft_model = get_peft_model(shallow_copy(model), IA3Config(task_type="CAUSAL_LM"))
    vectors = [p for n, p in peft_model.named_parameters() if ".ia3_l." in n]
    dirs = []
    for i in range(k):
        gen = torch.Generator().manual_seed(seed + 1000 + i)
        with torch.no_grad():
            for p in vectors:
                p.copy_(1 + SPREAD * torch.randn(p.shape, generator=gen))
        out = root / f"task{i + 1}"  # not "a3": PEFT warns of names inside its prefix "ia3_"
        peft_model.save_pretrained(out)
        dirs.append(str(out))
    cfg = peft_model.peft_config["default"]
    info = {
        "ia3_modules": len(vectors),
        "ia3_values_per_adapter": sum(p.numel() for p in vectors),
        "target_modules": sorted(cfg.target_modules),
        "feedforward_modules": sorted(cfg.feedforward_modules),
        "spread": SPREAD,
    }
    return dirs, info


def dirichlet(n: int, k: int, seed: int) -> Any:
    """``n`` draws of Dirichlet(1, ..., 1) over ``k`` (normalised exponentials), float64."""
    import torch

    e = -torch.rand(n, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).log()
    return e / e.sum(1, keepdim=True)


# --------------------------------------------------------------------------------------------
# timing and memory
# --------------------------------------------------------------------------------------------


class Clock:
    """Wall-clock timing that waits for the device (torch.cuda.synchronize on CUDA)."""

    def __init__(self, device: Any) -> None:
        import torch

        self.cuda = device.type == "cuda"
        self._sync = torch.cuda.synchronize if self.cuda else (lambda: None)

    def sync(self) -> None:
        self._sync()

    def time(self, fn: Callable[[], Any]) -> float:
        self.sync()
        t = time.perf_counter()
        fn()
        self.sync()
        return time.perf_counter() - t


def _status_kib(field: str) -> Optional[int]:
    try:
        m = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    except OSError:
        return None
    return int(m.group(1)) if m else None


class Memory:
    """Peak memory of one block: CUDA allocator peak, or the process's RSS high-water mark on CPU."""

    def __init__(self, device: Any) -> None:
        self.cuda = device.type == "cuda"
        self.kind = "torch.cuda.max_memory_allocated" if self.cuda else "process RSS high-water mark (VmHWM)"

    def _reset_hwm(self) -> bool:
        try:  # "5" resets VmHWM to the current RSS (Linux >= 4.0)
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            return False
        return True

    @contextlib.contextmanager
    def peak(self, into: dict[str, Any], key: str) -> Iterator[None]:
        import torch

        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        else:
            ok = self._reset_hwm()
            before = (_status_kib("VmRSS") or 0) * 1024
        yield
        if self.cuda:
            torch.cuda.synchronize()
            peak, after = torch.cuda.max_memory_allocated(), torch.cuda.memory_allocated()
        else:
            peak = (_status_kib("VmHWM") or 0) * 1024 if ok else None
            after = (_status_kib("VmRSS") or 0) * 1024
        into[key] = {
            "before_mib": before / MiB,
            "peak_mib": None if peak is None else peak / MiB,
            "extra_mib": None if peak is None else (peak - before) / MiB,
            "after_mib": after / MiB,
        }


def _own_cpu_seconds() -> float:
    u = resource.getrusage(resource.RUSAGE_SELF)
    return u.ru_utime + u.ru_stime


def _summary(samples: list[float]) -> dict[str, Any]:
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples), "samples": samples}


# --------------------------------------------------------------------------------------------
# the benchmark
# --------------------------------------------------------------------------------------------


def _machine(device: Any) -> dict[str, Any]:
    import torch

    cuda = device.type == "cuda"
    return {
        **host_facts(),
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if cuda else None,
        "cuda": torch.version.cuda if cuda else None,
        "torch_threads": torch.get_num_threads(),
    }


def _diff(a: Any, b: Any) -> dict[str, float]:
    a, b = a.double(), b.double()
    return {"max_abs": (a - b).abs().max().item(), "rel_l2": ((a - b).norm() / b.norm()).item()}


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from peft import PeftModel
    from transformers import LlamaConfig

    import ia3fuse

    t_script = time.perf_counter()
    busy0, own0 = _machine_busy_seconds(), _own_cpu_seconds()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    shape = dict(QUICK_SHAPE if args.quick else LLAMA_SHAPE)
    if args.layers is not None:
        shape["num_hidden_layers"] = args.layers
    config = LlamaConfig(**shape)
    R, K, seq = args.requests, args.adapters, args.seq
    clock, memory = Clock(device), Memory(device)
    torch.manual_seed(args.seed)

    t = time.perf_counter()
    base = build_model(config, device, dtype, args.seed)
    plain, mixed_base, peft_base = base, shallow_copy(base), shallow_copy(base)
    n_params = sum(p.numel() for p in base.parameters())
    t_build = time.perf_counter() - t
    print(
        f"model: {shape['num_hidden_layers']} layers, {n_params / 1e9:.3f} B parameters, {args.dtype} on {device} "
        f"({t_build:.1f} s)",
        flush=True,
    )

    tmp = tempfile.TemporaryDirectory(prefix="ia3mix-")
    t = time.perf_counter()
    dirs, adapter_info = make_adapters(base, Path(tmp.name), K, args.seed)
    names = [Path(d).name for d in dirs]
    peft_model = PeftModel.from_pretrained(peft_base, dirs[0], adapter_name=names[0])
    for name, d in zip(names[1:], dirs[1:]):
        peft_model.load_adapter(d, adapter_name=name)
    peft_model.eval()
    mixture = ia3fuse.Mixture(mixed_base, dict(zip(names, dirs)))
    assert mixture.names == names
    t_adapters = time.perf_counter() - t
    loaded_dtype = str(peft_model.base_model.model.model.layers[0].self_attn.k_proj.ia3_l[names[0]].dtype)

    gen = torch.Generator().manual_seed(args.seed + 1)
    ids = torch.randint(0, config.vocab_size, (R, seq), generator=gen).to(device)
    W64 = dirichlet(R, K, args.seed + 2)
    W = W64.float()  # on the CPU, as weights arriving with requests would be
    w_lists = [[float(v) for v in row] for row in W64]
    check = sorted({0, R // 2, R - 1})[:CHECK_REQUESTS]

    def fwd_plain(x: Any) -> Any:
        with torch.inference_mode():
            return plain(input_ids=x, use_cache=False).logits

    def fwd_mix(x: Any, w: Any) -> Any:
        with torch.inference_mode():
            return mixture(input_ids=x, mixture_weights=w, use_cache=False).logits

    def fwd_peft(x: Any) -> Any:
        with torch.inference_mode():
            return peft_model(input_ids=x, use_cache=False).logits

    def peft_serve(
        requests: list[int],
        prefix: str,
        keep: Optional[dict[int, Any]] = None,
        steps: Optional[dict[str, list[float]]] = None,
    ) -> None:
        """PEFT's path for each request: fuse, activate, forward batch 1, delete."""
        for i in requests:
            name = f"{prefix}{i}"
            t0 = time.perf_counter()
            peft_model.add_weighted_adapter(names, w_lists[i], name)
            if steps is not None:  # each step's device work counts to that step
                clock.sync()
            t1 = time.perf_counter()
            peft_model.set_adapter(name)
            if steps is not None:
                clock.sync()
            t2 = time.perf_counter()
            logits = fwd_peft(ids[i : i + 1])
            if steps is not None:
                clock.sync()
            t3 = time.perf_counter()
            if keep is not None and i in keep:
                keep[i] = logits[0].float().cpu()
            peft_model.delete_adapter(name)
            if steps is not None:
                clock.sync()
                t4 = time.perf_counter()
                for k, v in (
                    ("add_weighted_adapter", t1 - t0),
                    ("set_adapter", t2 - t1),
                    ("forward", t3 - t2),
                    ("delete_adapter", t4 - t3),
                ):
                    steps[k].append(v)

    timings: dict[str, Any] = {}
    mem: dict[str, Any] = {}
    checks: dict[str, Any] = {}

    # ---------------------------------------------------------------- (a) serving R mixtures
    print(f"(a) serving {R} requests x {seq} tokens with {R} mixtures of {K} adapters", flush=True)
    out = fwd_mix(ids, W)  # warm-up, and the logits the check uses
    mix_logits = {i: out[i].float().cpu() for i in check}
    del out
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Adapter mix_i was active which is now deleted ..."
        peft_serve(list(range(min(2, R))), "warm_")
        # Alternate the two paths, so slow drift of the machine hits both alike.
        samples, loops, peft_logits = [], [], {i: None for i in check}
        for rep in range(max(args.repeats, args.loop_repeats)):
            if rep < args.repeats:
                samples.append(clock.time(lambda: fwd_mix(ids, W)))
            if rep < args.loop_repeats:
                keep = peft_logits if rep == 0 else None
                loops.append(clock.time(lambda rep=rep, keep=keep: peft_serve(list(range(R)), f"mix{rep}_", keep=keep)))
        timings["a_mixture_forward"] = _summary(samples)
        timings["a_peft_loop"] = _summary(loops)
        print(
            f"  ia3fuse Mixture, one forward of {R}: {statistics.median(samples):.4f} s; "
            f"PEFT loop of {R}: {statistics.median(loops):.3f} s",
            flush=True,
        )
        steps: dict[str, list[float]] = {
            k: [] for k in ("add_weighted_adapter", "set_adapter", "forward", "delete_adapter")
        }
        t_split = clock.time(lambda: peft_serve(list(range(R)), "split_", steps=steps))
        timings["a_peft_loop_synced_steps_total"] = t_split
        timings["a_peft_steps"] = {k: _summary(v) for k, v in steps.items()}
        print(
            f"  PEFT add_weighted_adapter alone: {1e3 * statistics.median(steps['add_weighted_adapter']):.1f} ms "
            f"per mixture",
            flush=True,
        )
        a_mem_adapters_before = len(peft_model.peft_config)
        with memory.peak(mem, "a_peft_loop"):
            peft_serve(list(range(R)), "mem_")
        assert len(peft_model.peft_config) == a_mem_adapters_before == K
    with memory.peak(mem, "a_mixture_forward"):
        fwd_mix(ids, W)

    checks["a_logits"] = {
        str(i): {
            "mixture_vs_peft": _diff(mix_logits[i], peft_logits[i]),
            "max_abs_logit": peft_logits[i].abs().max().item(),
        }
        for i in check
    }
    # Noise floor of the comparison: the same request through the Mixture alone (batch 1) vs in the batch.
    checks["a_mixture_batch_vs_alone"] = {
        str(i): _diff(mix_logits[i], fwd_mix(ids[i : i + 1], W[i : i + 1])[0].float().cpu()) for i in check
    }
    base_logits = fwd_plain(ids[check]).float().cpu()
    checks["a_adapter_effect"] = {  # how much the mixtures move the logits: the scale the differences compare to
        str(i): _diff(mix_logits[i], base_logits[j]) for j, i in enumerate(check)
    }

    # ---------------------------------------------------------------- (b) overhead vs one adapter
    print("(b) forward overhead vs a single fused IA3 adapter", flush=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model.add_weighted_adapter(names, w_lists[0], "fused")
    fused_dtype = str(peft_model.base_model.model.model.layers[0].self_attn.k_proj.ia3_l["fused"].dtype)
    paths: dict[str, tuple[Callable[[], None], Callable[[Any], Any]]] = {
        "base": (lambda: None, lambda b: fwd_plain(ids[:b])),
        "mixture": (lambda: None, lambda b: fwd_mix(ids[:b], W[:b])),
        "peft_fused": (lambda: peft_model.set_adapter("fused"), lambda b: fwd_peft(ids[:b])),
        "peft_loaded": (lambda: peft_model.set_adapter(names[0]), lambda b: fwd_peft(ids[:b])),
    }
    batches = sorted({1, R})
    for b in batches:
        for prepare, fn in paths.values():  # warm-up
            prepare()
            fn(b)
        samples_b: dict[str, list[float]] = {k: [] for k in paths}
        for _ in range(args.repeats):  # round-robin, so drift hits every path alike
            for key, (prepare, fn) in paths.items():
                prepare()
                samples_b[key].append(clock.time(lambda fn=fn, b=b: fn(b)))
        for key, s in samples_b.items():
            timings[f"b_{key}_batch{b}"] = _summary(s)
        for key, (prepare, fn) in paths.items():
            prepare()
            with memory.peak(mem, f"b_{key}_batch{b}"):
                fn(b)
        medians = {k: statistics.median(v) for k, v in samples_b.items()}
        print(f"  batch {b}: " + ", ".join(f"{k} {1e3 * v:.1f} ms" for k, v in medians.items()), flush=True)
    peft_model.set_adapter("fused")
    checks["b_batch1_mixture_vs_peft_fused"] = _diff(
        fwd_mix(ids[:1], W[:1]).float().cpu(), fwd_peft(ids[:1]).float().cpu()
    )

    # ---------------------------------------------------------------- results
    def med(key: str) -> float:
        return timings[key]["median"]

    ratios = {
        "a_speedup_peft_loop_over_mixture": med("a_peft_loop") / med("a_mixture_forward"),
        "a_throughput_mixture_rps": R / med("a_mixture_forward"),
        "a_throughput_peft_rps": R / med("a_peft_loop"),
        "a_peft_add_weighted_adapter_ms": 1e3 * timings["a_peft_steps"]["add_weighted_adapter"]["median"],
        "a_peft_share_of_loop_in_add_weighted_adapter": sum(timings["a_peft_steps"]["add_weighted_adapter"]["samples"])
        / t_split,
    }

    def low(key: str) -> float:  # interference only adds time: the minima are a second view
        return timings[key]["min"]

    ratios["a_speedup_min_over_min"] = low("a_peft_loop") / low("a_mixture_forward")
    for b in batches:
        for ref in ("peft_fused", "peft_loaded", "base"):
            ratios[f"b_overhead_mixture_vs_{ref}_batch{b}"] = med(f"b_mixture_batch{b}") / med(f"b_{ref}_batch{b}") - 1
            ratios[f"b_overhead_min_mixture_vs_{ref}_batch{b}"] = (
                low(f"b_mixture_batch{b}") / low(f"b_{ref}_batch{b}") - 1
            )
        ratios[f"b_overhead_peft_fused_vs_base_batch{b}"] = med(f"b_peft_fused_batch{b}") / med(f"b_base_batch{b}") - 1
    tmp.cleanup()
    wall = time.perf_counter() - t_script
    busy1, own1 = _machine_busy_seconds(), _own_cpu_seconds()
    others = None if busy0 is None or busy1 is None else max(0.0, (busy1 - busy0 - (own1 - own0)) / wall)
    return {
        "benchmark": "mixture_speed",
        "quick": args.quick,
        "settings": {
            "device": str(device),
            "dtype": args.dtype,
            "requests": R,
            "adapters": K,
            "seq": seq,
            "repeats": args.repeats,
            "loop_repeats": args.loop_repeats,
            "seed": args.seed,
            "check_requests": check,
            "use_cache": False,
            "logits": "all positions",
            "attn_implementation": getattr(config, "_attn_implementation", None),
            "mixture_form": mixture.form,
            "mixture_weights": "Dirichlet(1) over K, float32 on the CPU",
            "peft_fused_dtype": fused_dtype.removeprefix("torch."),
            "peft_loaded_dtype": loaded_dtype.removeprefix("torch."),
            "peft_loaded_adapter": names[0],
            "mixture_scales_dtype": str(mixture.basis.dtype).removeprefix("torch."),
        },
        "model_config": shape,
        "parameters": n_params,
        "adapters_info": adapter_info,
        "machine": _machine(device),
        # CPUs kept busy by other processes during the run (machine busy time minus this process's own).
        "other_cpus_busy": others,
        "loadavg_1min_end": os.getloadavg()[0],
        "timings": timings,
        "ratios": ratios,
        "memory": {"kind": memory.kind, "paths": mem},
        "checks": checks,
        "seconds": {
            "build_model": t_build,
            "adapters_and_wrapping": t_adapters,
            "script": time.perf_counter() - t_script,
        },
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


# --------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------


def _ms(s: dict[str, Any]) -> str:
    return f"{1e3 * s['median']:.1f} ({1e3 * s['min']:.1f}–{1e3 * s['max']:.1f})"


def _pct(x: float) -> str:
    return f"{100 * x:+.1f}%"


def _mib(m: Optional[dict[str, Any]], key: str) -> str:
    v = None if m is None else m.get(key)
    return "–" if v is None else f"{v:,.0f}"


def markdown(data: dict[str, Any]) -> str:
    s, cfg, m, t, r = data["settings"], data["model_config"], data["machine"], data["timings"], data["ratios"]
    mem, chk = data["memory"]["paths"], data["checks"]
    R, K, seq = s["requests"], s["adapters"], s["seq"]
    v = m["versions"]
    where = m["gpu"] or m["cpu_model"] or "CPU"
    steps = t["a_peft_steps"]
    lines = [
        f"# Mixture speed: {R} requests, {R} mixtures of {K} IA3 adapters, TinyLlama-1.1B shape"
        + (" (quick: small sizes)" if data["quick"] else ""),
        "",
        f"Base: LlamaForCausalLM, hidden {cfg['hidden_size']}, intermediate {cfg['intermediate_size']}, "
        f"{cfg['num_hidden_layers']} layers, {cfg['num_attention_heads']} heads / {cfg['num_key_value_heads']} KV heads, "
        f"vocab {cfg['vocab_size']}; {data['parameters'] / 1e9:.3f} B random parameters in **{s['dtype']}** on "
        f"**{s['device']}** ({s['attn_implementation']} attention). Adapters: PEFT's default IA3 targets "
        f"({', '.join(data['adapters_info']['target_modules'])}; feed-forward "
        f"{', '.join(data['adapters_info']['feedforward_modules'])}), {data['adapters_info']['ia3_modules']} vectors, "
        f"l = 1 + {data['adapters_info']['spread']} N(0, 1). Requests: {seq} random tokens each; mixture weights "
        f"Dirichlet(1) (seed {s['seed']}). Forwards: `torch.inference_mode()`, `use_cache=False`, logits of every position.",
        "",
        f"Machine: {where}, {m['cpu_count']} CPUs ({m['torch_threads']} torch threads), torch {v['torch']}"
        + (f" (CUDA {m['cuda']})" if m["cuda"] else "")
        + f", transformers {v['transformers']}, peft {v['peft']}, ia3fuse {v['ia3fuse']}, Python {m['python']}.",
        "",
        f"## (a) Serving {R} requests with {R} different mixtures",
        "",
        "| path | what is timed | median ms (min–max) | requests/s | speedup |",
        "|---|---|---|---|---|",
        f"| ia3fuse `Mixture` | one forward of the batch of {R}, weights ({R}, {K}) | {_ms(t['a_mixture_forward'])} | "
        f"{r['a_throughput_mixture_rps']:,.1f} | **{r['a_speedup_peft_loop_over_mixture']:,.1f}x** |",
        f"| PEFT | per request: `add_weighted_adapter`, `set_adapter`, batch-1 forward, `delete_adapter`; "
        f"loop of {R} (runs: {s['loop_repeats']}) | {_ms(t['a_peft_loop'])} | {r['a_throughput_peft_rps']:,.1f} | 1x |",
        f"| &nbsp;&nbsp;PEFT's {R} batch-1 forwards alone | sum of the forward steps below | "
        f"{1e3 * sum(steps['forward']['samples']):.1f} | {R / sum(steps['forward']['samples']):,.1f} | |",
        f"| base model, no adapters (context) | one forward of the batch of {R}, from (b) | {_ms(t[f'b_base_batch{R}'])} | "
        f"{R / t[f'b_base_batch{R}']['median']:,.1f} | |",
        "",
        f"Speedup = PEFT loop / Mixture forward, medians (goal: at least 10x; "
        f"{r['a_speedup_min_over_min']:,.1f}x from the minima). The two paths are timed alternately. PEFT's steps per request, timed with a "
        f"device sync between steps (loop total {t['a_peft_loop_synced_steps_total']:.3f} s): "
        f"`add_weighted_adapter` **{1e3 * steps['add_weighted_adapter']['median']:.1f} ms** "
        f"({1e3 * steps['add_weighted_adapter']['min']:.1f}–{1e3 * steps['add_weighted_adapter']['max']:.1f}), "
        f"`set_adapter` {1e3 * steps['set_adapter']['median']:.2f} ms, forward {1e3 * steps['forward']['median']:.1f} ms, "
        f"`delete_adapter` {1e3 * steps['delete_adapter']['median']:.1f} ms; `add_weighted_adapter` is "
        f"{100 * r['a_peft_share_of_loop_in_add_weighted_adapter']:.0f}% of the loop. Every mixture adapter is "
        f"deleted after its request, so PEFT's memory does not grow "
        f"(memory before/after a loop, as in (c): {_mib(mem.get('a_peft_loop'), 'before_mib')} / "
        f"{_mib(mem.get('a_peft_loop'), 'after_mib')} MiB).",
        "",
        "Agreement (Mixture batch forward vs PEFT's batch-1 forward with its fused adapter, same request): "
        + "; ".join(
            f"request {i}: max |diff| {c['mixture_vs_peft']['max_abs']:.2e} (rel L2 {c['mixture_vs_peft']['rel_l2']:.1e}, "
            f"max |logit| {c['max_abs_logit']:.2f}; adapters move the logits by {chk['a_adapter_effect'][i]['max_abs']:.2e})"
            for i, c in chk["a_logits"].items()
        )
        + f". PEFT stores each fused vector in the base's dtype ({s['peft_fused_dtype']}); the Mixture computes "
        f"its scales in {s['mixture_scales_dtype']}. Noise floor, the same request through the Mixture alone "
        f"(batch 1) vs in the batch: max |diff| "
        + ", ".join(f"{c['max_abs']:.2e}" for c in chk["a_mixture_batch_vs_alone"].values())
        + ".",
        "",
        "## (b) Forward overhead against a single merged adapter",
        "",
        "| batch | base model, no adapter | PEFT, one fused adapter | PEFT, one loaded adapter | ia3fuse `Mixture`, "
        "weights (B, K) | Mixture vs PEFT fused | Mixture vs PEFT loaded | Mixture vs base |",
        "|---|---|---|---|---|---|---|---|",
    ]
    batches = sorted({1, R})
    for b in batches:
        lines.append(
            f"| {b} | {_ms(t[f'b_base_batch{b}'])} | {_ms(t[f'b_peft_fused_batch{b}'])} | "
            f"{_ms(t[f'b_peft_loaded_batch{b}'])} | {_ms(t[f'b_mixture_batch{b}'])} | "
            f"**{_pct(r[f'b_overhead_mixture_vs_peft_fused_batch{b}'])}** | "
            f"{_pct(r[f'b_overhead_mixture_vs_peft_loaded_batch{b}'])} | {_pct(r[f'b_overhead_mixture_vs_base_batch{b}'])} |"
        )
    lines += [
        "",
        f"Median ms (min–max) of {s['repeats']} forwards per path, timed round-robin. Overhead = Mixture / other - 1 "
        f"(goal: at most +5% against PEFT's fused adapter); from the minima: "
        + ", ".join(
            f"batch {b} {_pct(r[f'b_overhead_min_mixture_vs_peft_fused_batch{b}'])} vs PEFT fused, "
            f"{_pct(r[f'b_overhead_min_mixture_vs_base_batch{b}'])} vs base"
            for b in batches
        )
        + f". PEFT fused: `add_weighted_adapter` of mixture 0, vectors "
        f"in {s['peft_fused_dtype']}; PEFT loaded: adapter {s['peft_loaded_adapter']} as "
        f"`load_adapter` leaves it ({s['peft_loaded_dtype']} vectors). The Mixture at batch 1 uses mixture 0 "
        f"(max |diff| against PEFT fused: {chk['b_batch1_mixture_vs_peft_fused']['max_abs']:.2e}).",
        "",
        f"## (c) Peak memory ({data['memory']['kind']}, MiB)",
        "",
        "| path | before | peak | peak - before |",
        "|---|---|---|---|",
    ]
    mem_rows = [("a_mixture_forward", f"(a) Mixture, one forward of {R}"), ("a_peft_loop", f"(a) PEFT loop of {R}")]
    for b in batches:
        for key, label in (
            ("base", "base"),
            ("peft_fused", "PEFT fused"),
            ("peft_loaded", "PEFT loaded"),
            ("mixture", "Mixture"),
        ):
            mem_rows.append((f"b_{key}_batch{b}", f"(b) {label}, batch {b}"))
    for key, label in mem_rows:
        mm = mem.get(key)
        lines.append(f"| {label} | {_mib(mm, 'before_mib')} | {_mib(mm, 'peak_mib')} | {_mib(mm, 'extra_mib')} |")
    lines += [
        "",
        "All paths share one copy of the weights (included in 'before'). "
        + (
            "On CPU the figures are the process's resident set, reset before each path (`/proc/self/clear_refs`), so "
            "freed memory kept by the allocator counts as resident; best-effort."
            if not m["gpu"]
            else "The PEFT loop serves one request at a time, so its activations are those of batch 1."
        ),
        "",
        (
            ""
            if data["other_cpus_busy"] is None
            else f"Contention: other processes kept {data['other_cpus_busy']:.2f} of the {m['cpu_count']} CPUs busy on average "
            f"during the run (1-minute load average at the end {data['loadavg_1min_end']:.1f}); wall times include "
            "their interference. "
        ),
        "",
        f"Script run time: {data['seconds']['script']:.0f} s (model {data['seconds']['build_model']:.1f} s, adapters "
        f"and wrapping {data['seconds']['adapters_and_wrapping']:.1f} s).",
        "",
    ]
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    import torch

    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if cuda else "cpu")
    parser.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        default=None,
        help="base model dtype (default: bfloat16 on cuda, float32 on cpu)",
    )
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default 22; --quick: 2)")
    parser.add_argument("--seq", type=int, default=None, help="tokens per request (default 64; --quick: 16)")
    parser.add_argument("--requests", type=int, default=32, help="requests, each with its own mixture")
    parser.add_argument("--adapters", type=int, default=4, help="K, adapters in every mixture")
    parser.add_argument(
        "--repeats", type=int, default=None, help="timed forwards per path (default 20 on cuda, 5 on cpu)"
    )
    parser.add_argument(
        "--loop-repeats", type=int, default=None, help="timed runs of PEFT's whole loop (default 3 on cuda, 2 on cpu)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch.set_num_threads (default: torch's, one per "
        "CPU); 1 keeps CPU timings stable when other processes share the machine",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="2 layers of small width, 16 tokens, 3 repeats, 1 torch thread on CPU (smoke run)",
    )
    parser.add_argument("--out", default=str(RESULTS), help="folder for the JSON and markdown results")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not cuda:
        parser.error("--device cuda, but torch sees no CUDA device; pass --device cpu")
    on_gpu = args.device == "cuda"
    args.dtype = args.dtype or ("bfloat16" if on_gpu else "float32")
    args.seq = args.seq or (16 if args.quick else 64)
    args.repeats = args.repeats or (3 if args.quick else 20 if on_gpu else 5)
    args.loop_repeats = args.loop_repeats or (1 if args.quick else 3 if on_gpu else 2)
    if args.quick and not on_gpu and args.threads is None:
        args.threads = 1  # a smoke run: two threads on a shared 2-CPU machine can stall 100x in OpenMP barriers
    if min(args.seq, args.requests, args.repeats, args.loop_repeats) < 1 or args.adapters < 2:
        parser.error("--seq, --requests, --repeats and --loop-repeats must be >= 1, --adapters >= 2")
    if args.layers is not None and args.layers < 1:
        parser.error(f"--layers {args.layers}; pass at least 1")

    data = run(args)
    stem = f"mixture_speed_{args.device}" + ("_quick" if args.quick else "")
    out_dir = Path(args.out).absolute()
    _write_json_atomic(out_dir / f"{stem}.json", data)
    md = markdown(data)
    _write_text_atomic(out_dir / f"{stem}.md", md)
    print(md)
    print(f"wrote {out_dir / (stem + '.json')} and {out_dir / (stem + '.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
