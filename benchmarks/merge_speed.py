"""Benchmark: fusing 8 IA3 adapters of a TinyLlama-1.1B-shaped model, ia3fuse vs PEFT.

Paths (each run in its own subprocess, so each one's peak RSS is its own):

* ``peft``: load the base model, ``PeftModel.from_pretrained`` + ``load_adapter`` for every
  adapter, PEFT's ``add_weighted_adapter``, ``save_pretrained(selected_adapters=["fused"])``.
  Timed end to end (wall clock from process start) and split by step. In the same process,
  after PEFT is done, ``ia3fuse.add_weighted_adapter`` on the live model is timed alone.
* ``cli``: ``ia3fuse merge A1..A8 --weights ... --method task_arithmetic -o OUT`` (wall clock,
  process start included).
* ``api_task_arithmetic`` / ``api_ties``: ``ia3fuse.merge(dirs, weights, ...).save(out)``,
  timed in-process (imports excluded).

The weights sum to 1, so PEFT's IA3 ``add_weighted_adapter`` (a plain weighted sum of l) and
task arithmetic (``1 + sum_i w_i (l_i - 1)``) give the same vectors; the script checks that.

Usage::

    python benchmarks/merge_speed.py                 # full (22 layers), ~minutes
    python benchmarks/merge_speed.py --quick         # 2 layers, same shapes, smoke run

Writes ``benchmarks/results/merge_speed.{json,md}`` (``merge_speed_quick.*`` with ``--quick``,
``..._threadsN.*`` with ``--threads N``). Nothing is downloaded: the base model gets random
weights from a config. Wall times are sensitive to other processes on the machine: the results
record how many CPUs other processes kept busy during each timed run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never download anything
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
MARKER = ".merge_speed_setup.json"

# TinyLlama-1.1B's shape.
LLAMA_SHAPE = dict(
    hidden_size=2048,
    intermediate_size=5632,
    num_hidden_layers=22,
    num_attention_heads=32,
    num_key_value_heads=4,
    vocab_size=32000,
    max_position_embeddings=2048,
    tie_word_embeddings=False,
)
QUICK_LAYERS = 2
TIES_DENSITY = 0.5
MiB = 1024 * 1024


# --------------------------------------------------------------------------------------------
# helpers shared by the parent and the workers
# --------------------------------------------------------------------------------------------


def _peak_rss_mib() -> float:
    # ru_maxrss is KiB on Linux: the process's peak resident set so far.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _rss_now_mib() -> float:
    import psutil

    return psutil.Process().memory_info().rss / MiB


def _write_json_atomic(path: Path, data: Any) -> None:
    _write_text_atomic(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def _write_text_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def adapter_weights(n: int) -> list[float]:
    """Unequal weights that sum to 1: w_i = i / (1 + ... + n)."""
    total = n * (n + 1) / 2
    return [(i + 1) / total for i in range(n)]


# --------------------------------------------------------------------------------------------
# workers (run as `python merge_speed.py --_worker SPEC.json`)
# --------------------------------------------------------------------------------------------


def _worker_setup(spec: dict[str, Any]) -> dict[str, Any]:
    """Build the random base model and the adapters in PEFT's own format (not timed)."""
    import torch
    from peft import IA3Config, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    t0 = time.perf_counter()
    dtype = getattr(torch, spec["dtype"])
    base_dir, adapter_dirs = Path(spec["base_dir"]), [Path(p) for p in spec["adapter_dirs"]]
    config = LlamaConfig(**spec["model_config"])
    # Build on the meta device and fill once: skips transformers' slow per-module init.
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to_empty(device="cpu").to(dtype)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02, generator=gen)
    n_params = sum(p.numel() for p in model.parameters())
    model.name_or_path = str(base_dir)  # recorded as base_model_name_or_path in the adapters
    model.save_pretrained(base_dir)
    t_base = time.perf_counter() - t0

    peft_model = get_peft_model(model, IA3Config(task_type="CAUSAL_LM"))
    vectors = [p for n, p in peft_model.named_parameters() if ".ia3_l." in n]
    for i, out in enumerate(adapter_dirs):
        gen = torch.Generator().manual_seed(1000 + i)
        with torch.no_grad():
            for p in vectors:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype))
        peft_model.save_pretrained(out)
    return {
        "parameters": n_params,
        "ia3_modules": len(vectors),
        "ia3_values_per_adapter": sum(p.numel() for p in vectors),
        "ia3_dtype": str(vectors[0].dtype).removeprefix("torch."),
        "base_bytes": sum(f.stat().st_size for f in base_dir.iterdir() if f.is_file()),
        "adapter_bytes": (adapter_dirs[0] / "adapter_model.safetensors").stat().st_size,
        "torch_threads": torch.get_num_threads(),
        "seconds_base": t_base,
        "seconds_total": time.perf_counter() - t0,
    }


def _worker_api(spec: dict[str, Any]) -> dict[str, Any]:
    """ia3fuse.merge(...).save(out), timed in-process (imports excluded)."""
    import ia3fuse

    merge = ia3fuse.merge  # the package loads its names on first use: import them before timing
    rss_before = _rss_now_mib()
    t0 = time.perf_counter()
    fused = merge(spec["adapter_dirs"], spec["weights"], spec["method"], **spec["params"])
    fused.save(spec["out"])
    seconds = time.perf_counter() - t0
    return {
        "seconds": seconds,
        "rss_before_mib": rss_before,
        "peak_rss_mib": _peak_rss_mib(),
        "t_end_wall": time.time(),
    }


def _worker_peft(spec: dict[str, Any]) -> dict[str, Any]:
    """PEFT's path end to end, split by step; then ia3fuse's live add_weighted_adapter."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    res: dict[str, Any] = {"t_imported_wall": time.time()}
    dirs, weights, names = (
        spec["adapter_dirs"],
        spec["weights"],
        [f"a{i + 1}" for i in range(len(spec["adapter_dirs"]))],
    )

    t = time.perf_counter()
    base = AutoModelForCausalLM.from_pretrained(spec["base_dir"], dtype=getattr(torch, spec["dtype"]))
    res["load_base"] = time.perf_counter() - t

    t = time.perf_counter()
    model = PeftModel.from_pretrained(base, dirs[0], adapter_name=names[0])
    for name, path in zip(names[1:], dirs[1:]):
        model.load_adapter(path, adapter_name=name)
    res["load_adapters"] = time.perf_counter() - t

    t = time.perf_counter()
    model.add_weighted_adapter(names, weights, "fused")
    res["add_weighted_adapter"] = time.perf_counter() - t

    t = time.perf_counter()
    model.save_pretrained(spec["out"], selected_adapters=["fused"])
    res["save"] = time.perf_counter() - t
    res["t_end_wall"] = time.time()
    res["in_process"] = res["load_base"] + res["load_adapters"] + res["add_weighted_adapter"] + res["save"]
    res["peak_rss_mib"] = _peak_rss_mib()

    # Not part of PEFT's timed path: ia3fuse on the same live model.
    import ia3fuse
    from ia3fuse.live import ia3_layers

    t = time.perf_counter()
    ia3fuse.add_weighted_adapter(model, names, weights, "fused2")
    res["ia3fuse_add_weighted_adapter"] = time.perf_counter() - t
    # Error of each live fused vector against the exact (float64) weighted sum of the loaded ones.
    err: dict[str, float] = {"fused": 0.0, "fused2": 0.0}
    layers = [layer for layer in ia3_layers(model).values() if "fused" in layer.ia3_l]
    for layer in layers:
        exact = sum(w * layer.ia3_l[n].detach().double() for n, w in zip(names, weights))
        for k in err:
            err[k] = max(err[k], (layer.ia3_l[k].detach().double() - exact).abs().max().item())
    res["live_max_abs_err_vs_fp64"] = {"peft_fused": err["fused"], "ia3fuse_fused2": err["fused2"]}
    res["live_dtypes"] = {
        "inputs": str(layers[0].ia3_l[names[0]].dtype).removeprefix("torch."),
        "peft_fused": str(layers[0].ia3_l["fused"].dtype).removeprefix("torch."),
        "ia3fuse_fused2": str(layers[0].ia3_l["fused2"].dtype).removeprefix("torch."),
    }
    res["fused_modules"] = len(layers)
    res["peak_rss_mib_after_live"] = _peak_rss_mib()
    return res


WORKERS = {"setup": _worker_setup, "api": _worker_api, "peft": _worker_peft}


def _run_worker(spec_path: str, workers: Optional[dict[str, Any]] = None) -> int:
    """Run one worker from its spec file and write its result (also used by fold_speed.py)."""
    spec = json.loads(Path(spec_path).read_text())
    result = (workers or WORKERS)[spec["kind"]](spec)
    _write_json_atomic(Path(spec["result"]), result)
    return 0


# --------------------------------------------------------------------------------------------
# parent: runs subprocesses and measures them
# --------------------------------------------------------------------------------------------


class Bench:
    """Runs one subprocess per measurement; logs go to the work folder."""

    def __init__(self, workdir: Path, threads: Optional[int] = None, script: Optional[Path] = None) -> None:
        self.workdir = workdir
        self.script = Path(script or __file__).resolve()  # the script whose --_worker runs a spec
        self.logs = workdir / "logs"
        self.logs.mkdir(exist_ok=True)
        self.env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
        if threads is not None:
            self.env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        self.count = 0

    def spawn(self, argv: list[str], label: str) -> dict[str, Any]:
        """Run argv; return wall seconds, start wall time and the child's own peak RSS (wait4)."""
        self.count += 1
        log = self.logs / f"{self.count:03d}-{label}"
        with open(f"{log}.out", "wb") as out, open(f"{log}.err", "wb") as err:
            busy0 = _machine_busy_seconds()
            t_wall = time.time()
            t0 = time.perf_counter()
            proc = subprocess.Popen(argv, stdout=out, stderr=err, env=self.env, cwd=self.workdir)
            # wait4 gives this child's rusage alone (RUSAGE_CHILDREN would mix all children).
            _, status, usage = os.wait4(proc.pid, 0)
            seconds = time.perf_counter() - t0
            busy1 = _machine_busy_seconds()
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            tail = Path(f"{log}.err").read_text(errors="replace")[-3000:]
            raise RuntimeError(f"{label} failed with exit status {proc.returncode}:\n{tail}")
        cpu = usage.ru_utime + usage.ru_stime
        others = None if busy0 is None or busy1 is None else max(0.0, (busy1 - busy0 - cpu) / seconds)
        return {
            "wall": seconds,
            "t_start_wall": t_wall,
            "peak_rss_mib": usage.ru_maxrss / 1024,
            "cpu_seconds": cpu,
            "other_cpus_busy": others,
            "loadavg_1min_after": os.getloadavg()[0],
        }

    def worker(self, kind: str, label: str, **spec: Any) -> dict[str, Any]:
        spec_path = self.logs / f"{self.count + 1:03d}-{label}.spec.json"
        result = self.logs / f"{self.count + 1:03d}-{label}.result.json"
        _write_json_atomic(spec_path, {"kind": kind, "result": str(result), **spec})
        proc = self.spawn([sys.executable, str(self.script), "--_worker", str(spec_path)], label)
        return {"process": proc, **json.loads(result.read_text())}


def _prepare_workdir(args: argparse.Namespace, prefix: str = "ia3bench-", marker: str = MARKER) -> tuple[Path, bool]:
    """The work folder, and whether this run created it (then it is removed at the end)."""
    if args.workdir is None:
        return Path(tempfile.mkdtemp(prefix=prefix)), True
    wd = Path(args.workdir).absolute()
    if wd.exists() and any(wd.iterdir()) and not (wd / marker).exists():
        raise SystemExit(
            f"--workdir {str(wd)!r} is not empty and was not made by this script; pass an empty or new folder"
        )
    created = not wd.exists()
    wd.mkdir(parents=True, exist_ok=True)
    return wd, created


def _setup(bench: Bench, args: argparse.Namespace, model_config: dict[str, Any]) -> dict[str, Any]:
    wd = bench.workdir
    adapter_dirs = [str(wd / "adapters" / f"a{i + 1}") for i in range(args.adapters)]
    key = {"model_config": model_config, "dtype": args.dtype, "adapters": args.adapters}
    marker = wd / MARKER
    if marker.exists():
        saved = json.loads(marker.read_text())
        if saved.get("key") == key:
            print(f"reusing the base model and adapters in {wd}", flush=True)
            return saved
        shutil.rmtree(wd / "base", ignore_errors=True)
        shutil.rmtree(wd / "adapters", ignore_errors=True)
        marker.unlink()
    (wd / "adapters").mkdir(exist_ok=True)
    print(
        f"setup: building a {model_config['num_hidden_layers']}-layer model ({args.dtype}) and "
        f"{args.adapters} adapters in {wd}",
        flush=True,
    )
    info = bench.worker(
        "setup",
        "setup",
        base_dir=str(wd / "base"),
        adapter_dirs=adapter_dirs,
        model_config=model_config,
        dtype=args.dtype,
    )
    info.pop("process")
    saved = {"key": key, "base_dir": str(wd / "base"), "adapter_dirs": adapter_dirs, "info": info}
    _write_json_atomic(marker, saved)
    return saved


def _machine_busy_seconds() -> Optional[float]:
    """CPU-seconds all CPUs spent busy since boot (/proc/stat), or None off Linux."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _warm_page_cache(paths: list[Path]) -> None:
    # Every repeat then reads from RAM, as in a workflow that just trained or downloaded them.
    for root in paths:
        for f in sorted(root.rglob("*")):
            if f.is_file():
                with open(f, "rb") as fh:
                    while fh.read(64 * MiB):
                        pass


def _summary(samples: list[float]) -> dict[str, Any]:
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples), "samples": samples}


def _check_outputs(adapter_dirs: list[str], weights: list[float], outputs: dict[str, Path]) -> dict[str, Any]:
    """Each saved fused adapter against the exact float64 weighted sum of the input files."""
    from safetensors.torch import load_file

    inputs = [load_file(str(Path(d) / "adapter_model.safetensors")) for d in adapter_dirs]
    exact = {k: sum(w * t[k].double() for w, t in zip(weights, inputs)) for k in inputs[0]}
    out: dict[str, Any] = {}
    for name, path in outputs.items():
        got = load_file(str(path / "adapter_model.safetensors"))
        out[name] = {
            "same_keys": set(got) == set(exact),
            "tensors": len(got),
            "dtype": str(next(iter(got.values())).dtype).removeprefix("torch."),
            "max_abs_err_vs_fp64": max((got[k].double() - exact[k]).abs().max().item() for k in exact if k in got),
        }
    out["input_dtype"] = str(next(iter(inputs[0].values())).dtype).removeprefix("torch.")
    return out


def host_facts() -> dict[str, Any]:
    """The machine a benchmark ran on: CPUs, RAM, Python, platform, package versions."""
    cpu_model = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import psutil

        ram = psutil.virtual_memory().total / 2**30
    except ImportError:
        ram = None
    versions = {}
    for pkg in ("ia3fuse", "torch", "transformers", "peft", "safetensors", "accelerate"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    return {
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_model": cpu_model,
        "ram_gib": round(ram, 1) if ram else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": versions,
    }


def _machine(setup_info: dict[str, Any], dtype: str) -> dict[str, Any]:
    return {**host_facts(), "torch_threads": setup_info.get("torch_threads"), "dtype": dtype}


def _fmt_s(s: dict[str, Any]) -> str:
    return f"{s['median']:.3f} ({s['min']:.3f}–{s['max']:.3f})"


def _markdown(data: dict[str, Any]) -> str:
    m, t, cfg = data["machine"], data["timings"], data["model_config"]
    peft_wall, peft_inproc, peft_awa = (
        t["peft_end_to_end_wall"]["median"],
        t["peft_in_process"]["median"],
        t["peft_add_weighted_adapter"]["median"],
    )
    rss = data["peak_rss_mib"]

    def ratio(x: float, ref: float) -> str:
        r = ref / x
        return f"{r:.0f}x" if r >= 10 else f"{r:.1f}x" if r >= 1 else f"{r:.2g}x"

    rows = [
        (
            f"PEFT: load base + {data['adapters']} adapters, add_weighted_adapter, save",
            "subprocess wall, start to saved",
            t["peft_end_to_end_wall"],
            rss["peft"],
            "1.0x",
            "1.0x",
        ),
        ("&nbsp;&nbsp;PEFT: process start + imports", "wall", t["peft_start_and_imports"], None, None, None),
        ("&nbsp;&nbsp;PEFT: load base (from_pretrained)", "in-process", t["peft_load_base"], None, None, None),
        (
            f"&nbsp;&nbsp;PEFT: load {data['adapters']} adapters",
            "in-process",
            t["peft_load_adapters"],
            None,
            None,
            None,
        ),
        ("&nbsp;&nbsp;PEFT: add_weighted_adapter", "in-process", t["peft_add_weighted_adapter"], None, None, None),
        ("&nbsp;&nbsp;PEFT: save_pretrained (fused only)", "in-process", t["peft_save"], None, None, None),
        (
            "`ia3fuse merge ... --method task_arithmetic` (CLI)",
            "subprocess wall, start to exit",
            t["cli_task_arithmetic_wall"],
            rss["cli_task_arithmetic"],
            ratio(t["cli_task_arithmetic_wall"]["median"], peft_wall),
            ratio(t["cli_task_arithmetic_wall"]["median"], peft_wall) + " (vs PEFT wall)",
        ),
        (
            "`ia3fuse.merge(...).save()` task_arithmetic (API)",
            "in-process",
            t["api_task_arithmetic"],
            rss["api_task_arithmetic"],
            ratio(t["api_task_arithmetic"]["median"], peft_wall),
            ratio(t["api_task_arithmetic"]["median"], peft_inproc) + " (vs PEFT in-process)",
        ),
        (
            f"`ia3fuse.merge(...).save()` ties, density {TIES_DENSITY} (API)",
            "in-process",
            t["api_ties"],
            rss["api_ties"],
            ratio(t["api_ties"]["median"], peft_wall),
            ratio(t["api_ties"]["median"], peft_inproc) + " (vs PEFT in-process)",
        ),
        (
            "`ia3fuse.add_weighted_adapter` on the live PeftModel",
            "in-process, after PEFT's",
            t["ia3fuse_add_weighted_adapter"],
            None,
            ratio(t["ia3fuse_add_weighted_adapter"]["median"], peft_wall),
            ratio(t["ia3fuse_add_weighted_adapter"]["median"], peft_awa) + " (vs PEFT add_weighted_adapter)",
        ),
    ]
    v = m["versions"]
    layers = cfg["num_hidden_layers"]
    lines = [
        f"# Merge speed: {data['adapters']} IA3 adapters, TinyLlama-1.1B shape"
        + (" (quick: 2 layers)" if data["quick"] else ""),
        "",
        f"Base: LlamaForCausalLM, hidden {cfg['hidden_size']}, intermediate {cfg['intermediate_size']}, "
        f"{layers} layers, {cfg['num_attention_heads']} heads / {cfg['num_key_value_heads']} KV heads, "
        f"vocab {cfg['vocab_size']}; {data['setup']['parameters'] / 1e9:.3f} B random parameters in "
        f"**{m['dtype']}** ({data['setup']['base_bytes'] / 2**30:.2f} GiB safetensors). "
        f"Adapters: PEFT's default IA3 targets (k_proj, v_proj, down_proj), {data['setup']['ia3_modules']} "
        f"vectors, {data['setup']['ia3_values_per_adapter']:,} values ({data['setup']['ia3_dtype']}) each, "
        f"l = 1 + 0.1 randn. Weights i/{sum(range(1, data['adapters'] + 1))} (sum 1).",
        "",
        f"Machine: {m['cpu_model']}, {m['cpu_count']} CPUs, {m['ram_gib']} GiB RAM, torch {v['torch']} "
        f"({data['threads'] or m['torch_threads']} threads), transformers {v['transformers']}, peft {v['peft']}, "
        f"ia3fuse {v['ia3fuse']}, Python {m['python']}. "
        + (f"OMP_NUM_THREADS={data['threads']} in every timed process. " if data["threads"] else "")
        + f"Median of {data['repeats']} runs (min–max); files in the page cache.",
        "",
        "| Path | Timed | Median s (min–max) | Peak RSS MiB | PEFT end-to-end / this | Like-for-like ratio |",
        "|---|---|---|---|---|---|",
    ]
    for name, what, s, r, r1, r2 in rows:
        lines.append(
            f"| {name} | {what} | {_fmt_s(s)} | {'' if r is None else f'{r:,.0f}'} | {r1 or ''} | {r2 or ''} |"
        )
    chk, saved = data["checks"], data["checks"]["saved"]
    live = chk["live_max_abs_err_vs_fp64"]
    lines += [
        "",
        "Ratios are PEFT's time over ia3fuse's (above 1: ia3fuse is faster). Like-for-like compares the CLI with "
        "PEFT's whole process, the API with PEFT's in-process steps (load base to save, imports excluded), and the "
        "live call with PEFT's add_weighted_adapter alone.",
        "",
        "Peak RSS is each subprocess's own maximum resident set (`wait4` rusage), interpreter and imports "
        "included; the PEFT figure is read right after its save (before the ia3fuse live call). transformers "
        "memory-maps the safetensors base and this path never touches its weights, so they barely count. "
        f"The ia3fuse API processes held {data['rss_before_call_mib']['api_task_arithmetic']:,.0f} MiB after "
        "`import ia3fuse`, before the timed call.",
        "",
        "Checks (weights sum to 1, so PEFT's weighted sum of l equals task arithmetic), max |error| against the "
        f"exact float64 result: saved files: ia3fuse CLI {saved['cli']['max_abs_err_vs_fp64']:.1e} "
        f"({saved['cli']['dtype']}), PEFT {saved['peft']['max_abs_err_vs_fp64']:.1e} ({saved['peft']['dtype']}); "
        f"same keys: {saved['cli']['same_keys'] and saved['peft']['same_keys']}. Live model (inputs "
        f"{chk['live_dtypes']['inputs']}): ia3fuse `fused2` {live['ia3fuse_fused2']:.1e} "
        f"({chk['live_dtypes']['ia3fuse_fused2']}), PEFT `fused` {live['peft_fused']:.1e} "
        f"({chk['live_dtypes']['peft_fused']}).",
        "",
        f"Contention: other processes kept a median {data['other_cpus_busy']['median']:.2f} of the "
        f"{m['cpu_count']} CPUs busy while the timed processes ran (1-minute load average "
        f"{min(data['loadavg_1min']['samples']):.1f}–{data['loadavg_1min']['max']:.1f}); wall times include "
        "their interference.",
        "",
        f"Script run time: {data['script_seconds']:.0f} s (setup {data['setup_seconds']:.0f} s).",
        "",
    ]
    return "\n".join(lines)


def _bench(args: argparse.Namespace) -> None:
    t_script = time.perf_counter()
    model_config = dict(LLAMA_SHAPE, num_hidden_layers=QUICK_LAYERS if args.quick else LLAMA_SHAPE["num_hidden_layers"])
    workdir, created = _prepare_workdir(args)
    try:
        bench = Bench(workdir, args.threads)
        t_setup = time.perf_counter()
        setup = _setup(bench, args, model_config)
        setup_seconds = time.perf_counter() - t_setup
        dirs, weights = setup["adapter_dirs"], adapter_weights(args.adapters)
        _warm_page_cache([workdir / "base", workdir / "adapters"])
        outs = workdir / "outputs"
        shutil.rmtree(outs, ignore_errors=True)
        outs.mkdir()
        cli = shutil.which("ia3fuse", path=str(Path(sys.executable).parent)) or shutil.which("ia3fuse")
        if cli is None:
            raise SystemExit("the ia3fuse command is not installed next to this Python; pip install -e . first")

        keys = [
            "peft_end_to_end_wall",
            "peft_start_and_imports",
            "peft_load_base",
            "peft_load_adapters",
            "peft_add_weighted_adapter",
            "peft_save",
            "peft_in_process",
            "ia3fuse_add_weighted_adapter",
            "cli_task_arithmetic_wall",
            "api_task_arithmetic",
            "api_task_arithmetic_process_wall",
            "api_ties",
            "api_ties_process_wall",
        ]
        samples: dict[str, list[float]] = {k: [] for k in keys}
        rss: dict[str, list[float]] = {
            k: [] for k in ("peft", "peft_after_live", "cli_task_arithmetic", "api_task_arithmetic", "api_ties")
        }
        rss_before: dict[str, list[float]] = {"api_task_arithmetic": [], "api_ties": []}
        live_errs: list[dict[str, float]] = []
        live_dtypes: dict[str, str] = {}
        cpu: dict[str, list[float]] = {"peft": [], "cli_task_arithmetic": []}
        loads: list[float] = [os.getloadavg()[0]]
        others: list[float] = []
        keep: dict[str, Path] = {}
        # Round-robin over the paths, so slow drift of the machine hits them all alike.
        for rep in range(args.repeats):
            print(f"repeat {rep + 1}/{args.repeats}", flush=True)

            out = outs / f"peft-{rep}"
            r = bench.worker(
                "peft",
                f"peft-{rep}",
                base_dir=setup["base_dir"],
                adapter_dirs=dirs,
                weights=weights,
                dtype=args.dtype,
                out=str(out),
            )
            t0 = r["process"]["t_start_wall"]
            samples["peft_end_to_end_wall"].append(r["t_end_wall"] - t0)
            samples["peft_start_and_imports"].append(r["t_imported_wall"] - t0)
            for k in ("load_base", "load_adapters", "add_weighted_adapter", "save", "in_process"):
                samples[f"peft_{k}"].append(r[k])
            samples["ia3fuse_add_weighted_adapter"].append(r["ia3fuse_add_weighted_adapter"])
            rss["peft"].append(r["peak_rss_mib"])
            rss["peft_after_live"].append(r["process"]["peak_rss_mib"])
            live_errs.append(r["live_max_abs_err_vs_fp64"])
            live_dtypes = r["live_dtypes"]
            cpu["peft"].append(r["process"]["cpu_seconds"])
            others.append(r["process"]["other_cpus_busy"])
            print(
                f"  peft: {samples['peft_end_to_end_wall'][-1]:.2f} s wall, add_weighted_adapter "
                f"{r['add_weighted_adapter']:.3f} s; ia3fuse live {r['ia3fuse_add_weighted_adapter']:.3f} s",
                flush=True,
            )

            out = outs / f"cli-{rep}"
            argv = [
                cli,
                "merge",
                *dirs,
                "--weights",
                *map(repr, weights),
                "--method",
                "task_arithmetic",
                "-o",
                str(out),
            ]
            p = bench.spawn(argv, f"cli-{rep}")
            samples["cli_task_arithmetic_wall"].append(p["wall"])
            rss["cli_task_arithmetic"].append(p["peak_rss_mib"])
            cpu["cli_task_arithmetic"].append(p["cpu_seconds"])
            others.append(p["other_cpus_busy"])
            loads.append(p["loadavg_1min_after"])
            print(f"  cli: {p['wall']:.2f} s wall", flush=True)

            for label, method, params in (
                ("api_task_arithmetic", "task_arithmetic", {}),
                ("api_ties", "ties", {"density": TIES_DENSITY}),
            ):
                out = outs / f"{label}-{rep}"
                r = bench.worker(
                    "api",
                    f"{label}-{rep}",
                    adapter_dirs=dirs,
                    weights=weights,
                    method=method,
                    params=params,
                    out=str(out),
                )
                samples[label].append(r["seconds"])
                samples[f"{label}_process_wall"].append(r["process"]["wall"])
                rss[label].append(r["process"]["peak_rss_mib"])
                rss_before[label].append(r["rss_before_mib"])
                others.append(r["process"]["other_cpus_busy"])
                print(f"  {label}: {r['seconds']:.3f} s in-process", flush=True)

            if rep == 0:  # keep one output of each for the checks; later ones are deleted
                keep = {"peft": outs / "peft-0" / "fused", "cli": outs / "cli-0"}
            else:
                for d in outs.glob(f"*-{rep}"):
                    shutil.rmtree(d)

        loads.append(os.getloadavg()[0])
        checks = {
            "saved": _check_outputs(dirs, weights, keep),
            "live_max_abs_err_vs_fp64": {k: max(e[k] for e in live_errs) for k in live_errs[0]},
            "live_dtypes": live_dtypes,
        }
        script_seconds = time.perf_counter() - t_script
        data = {
            "benchmark": "merge_speed",
            "quick": args.quick,
            "adapters": args.adapters,
            "repeats": args.repeats,
            "weights": weights,
            "ties_density": TIES_DENSITY,
            "model_config": model_config,
            "setup": setup["info"],
            "machine": _machine(setup["info"], args.dtype),
            "timings": {k: _summary(v) for k, v in samples.items()},
            "peak_rss_mib": {k: statistics.median(v) for k, v in rss.items()},
            "peak_rss_mib_samples": rss,
            "rss_before_call_mib": {k: statistics.median(v) for k, v in rss_before.items()},
            "cpu_seconds_median": {k: statistics.median(v) for k, v in cpu.items()},
            # Other processes on the machine inflate wall times; this records how busy it was.
            "loadavg_1min": {"samples": loads, "max": max(loads)},
            # CPUs kept busy by other processes while each subprocess ran (machine busy time minus its own).
            "other_cpus_busy": {
                "samples": others,
                "median": statistics.median([o for o in others if o is not None] or [0.0]),
            },
            "threads": args.threads,
            "ratios": {},
            "checks": checks,
            "setup_seconds": setup_seconds,
            "script_seconds": script_seconds,
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        med = {k: v["median"] for k, v in data["timings"].items()}
        data["ratios"] = {
            "peft_wall_over_cli_wall": med["peft_end_to_end_wall"] / med["cli_task_arithmetic_wall"],
            "peft_wall_over_api_task_arithmetic": med["peft_end_to_end_wall"] / med["api_task_arithmetic"],
            "peft_wall_over_api_ties": med["peft_end_to_end_wall"] / med["api_ties"],
            "peft_in_process_over_api_task_arithmetic": med["peft_in_process"] / med["api_task_arithmetic"],
            "peft_in_process_over_api_ties": med["peft_in_process"] / med["api_ties"],
            "peft_add_weighted_adapter_over_ia3fuse_add_weighted_adapter": med["peft_add_weighted_adapter"]
            / med["ia3fuse_add_weighted_adapter"],
            "peft_peak_rss_over_cli_peak_rss": data["peak_rss_mib"]["peft"]
            / data["peak_rss_mib"]["cli_task_arithmetic"],
        }
        stem = "merge_speed" + ("_quick" if args.quick else "") + (f"_threads{args.threads}" if args.threads else "")
        out_dir = Path(args.results).absolute()
        _write_json_atomic(out_dir / f"{stem}.json", data)
        md = _markdown(data)
        _write_text_atomic(out_dir / f"{stem}.md", md)
        print(md)
        print(f"wrote {out_dir / (stem + '.json')} and {out_dir / (stem + '.md')}")
    finally:
        if created and not args.keep_workdir:
            shutil.rmtree(workdir, ignore_errors=True)
        elif workdir.exists():
            shutil.rmtree(workdir / "outputs", ignore_errors=True)
            print(f"kept the work folder {workdir}")


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--workdir",
        help="folder for the base model, adapters and outputs (default: a temp dir); "
        "removed at the end if this run created it; a folder set up by an earlier run is reused",
    )
    parser.add_argument("--repeats", type=int, default=3, help="runs of each timed path; the median is reported")
    parser.add_argument("--adapters", type=int, default=8, help="number of adapters to fuse")
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_LAYERS} layers instead of 22 (smoke run)")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16", help="base model dtype")
    parser.add_argument("--results", default=str(RESULTS), help="folder for the JSON and markdown results")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="OMP_NUM_THREADS/MKL_NUM_THREADS for every "
        "timed process (default: torch's default, one per CPU); results get a _threadsN suffix",
    )
    parser.add_argument("--keep-workdir", action="store_true", help="do not delete the work folder at the end")
    parser.add_argument("--_worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._worker:
        return _run_worker(args._worker)
    if args.repeats < 1 or args.adapters < 2:
        parser.error("--repeats must be >= 1 and --adapters >= 2")
    _bench(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
