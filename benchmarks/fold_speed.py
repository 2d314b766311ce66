"""Benchmark: folding one IA3 adapter into a 4-bit / 8-bit TinyLlama-1.1B-shaped model on CPU.

The model is loaded through transformers' ``BitsAndBytesConfig`` (nf4, nf4 with double quant,
or int8) from a random bf16 checkpoint, and wrapped with one IA3 adapter of PEFT's default Llama
targets (k_proj, v_proj output-side; down_proj feed-forward). Paths, each run in its own
subprocess so that each one's memory is its own:

* ``(a)`` ``ia3fuse.fold(peft_model)``: row scales fold into the 4-bit block absmax / the 8-bit
  row statistic SCB; down_proj's input scale moves to up_proj's rows (gated-MLP rewrite).
  ``double_quant="unnest"`` (default) and ``"renest"`` rows.
* ``(b)`` naive per-layer dequantize-scale-requantize: ``FOUR_BIT.requantize`` /
  ``INT8.requantize`` (ia3fuse's own lossy fallback, called directly) on the same layers, with
  down_proj's input scale as columns of down_proj (no neighbour rewrite), after removing
  PEFT's wrappers.
* ``(c)`` today's workaround: load the bf16 checkpoint unquantized, PEFT ``merge_and_unload()``,
  ``save_pretrained``, reload that with the same ``BitsAndBytesConfig``.

(a) and (b) run on a model that already served eval-mode forwards ("after inference": on an
AVX512-BF16 CPU bitsandbytes 0.50 has then repacked every 4-bit layer for its fused bf16 kernel)
and on a freshly loaded one (canonical layout). Every worker measures the fold step's wall time,
its peak RSS (the kernel's high-water mark, reset right before the step through
``/proc/self/clear_refs``), the process's peak RSS, the forward time (batch 2 x 32) before and
after, and the relative logit error ``||logits - ref|| / ||ref||`` against PEFT's unmerged IA3
forward on the same quantized model; plus two noise floors of that forward (one-ulp changes of
the IA3 vectors; bnb's canonical vs repacked kernel).

Usage::

    python benchmarks/fold_speed.py --threads 1     # full (22 layers), ~10 minutes per repeat
    python benchmarks/fold_speed.py --quick         # 2 layers, same widths, smoke run

``--threads 1`` keeps timings stable on a machine shared with other processes (see ``--help``).

Writes ``benchmarks/results/fold_speed.{json,md}`` (``fold_speed_quick.*`` with ``--quick``).
Nothing is downloaded: the base model gets random weights from a config.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import re
import shutil
import statistics
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never download anything
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import merge_speed as ms  # shared helpers: model shape, setup worker, atomic writes, Bench

RESULTS = HERE / "results"
MARKER = ".fold_speed_setup.json"
MiB = 1024 * 1024
BATCH = (2, 32)  # token ids for the logit check and the forward timing
PIN = "support_avx512bf16_for_cpu"  # Linear4bit's switch for bnb's CPU repack
FORWARD_REPEATS = 3  # timed forwards before and after the fold (after one untimed warm-up); best and median kept


@dataclass(frozen=True)
class Run:
    """One measured path."""

    key: str
    label: str
    quant: str  # "nf4", "nf4-dq" (double quant), "int8"
    method: str  # "fold" (ia3fuse), "requantize" (per layer), "workaround" (bf16 merge + requantize)
    state: str  # "used": after eval forwards (4-bit layers CPU-repacked); "fresh": right after loading
    base: str  # the run whose fold time this one's is divided by
    double_quant: str = "unnest"


A, B = "(a) `ia3fuse.fold(peft_model)`", "(b) per-layer dequantize-scale-requantize"
RUNS = [
    Run("a", A, "nf4", "fold", "used", "a"),
    Run("b", B, "nf4", "requantize", "used", "a"),
    Run("c", "(c) workaround: load bf16, PEFT merge_and_unload, save, reload nf4", "nf4", "workaround", "-", "a"),
    Run("a_renest", '(a) `fold(peft_model, double_quant="renest")`', "nf4", "fold", "used", "a", "renest"),
    Run("a_fresh", A, "nf4", "fold", "fresh", "a_fresh"),
    Run("b_fresh", B, "nf4", "requantize", "fresh", "a_fresh"),
    Run("a_dq_unnest", '(a) `fold(peft_model, double_quant="unnest")`', "nf4-dq", "fold", "used", "a"),
    Run("a_dq_renest", '(a) `fold(peft_model, double_quant="renest")`', "nf4-dq", "fold", "used", "a", "renest"),
    Run("a_int8", A, "int8", "fold", "used", "a_int8"),
    Run("b_int8", B, "int8", "requantize", "used", "a_int8"),
]
STATE_TITLES = {"used": "after inference", "fresh": "fresh load", "-": "–"}
QUANT_TITLES = {"nf4": "nf4", "nf4-dq": "nf4 + double quant", "int8": "int8 (LLM.int8, threshold 6.0)"}


# --------------------------------------------------------------------------------------------
# memory: the kernel's high-water mark, resettable per step
# --------------------------------------------------------------------------------------------


def _status_mib(field: str) -> float:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE).group(1)) / 1024


class HighWater:
    """Peak RSS of one step and of the whole process.

    Writing "5" to /proc/self/clear_refs resets VmHWM (Linux >= 4.0); this keeps the peak seen
    before each reset, so the process peak survives. (wait4's ru_maxrss would not: it reads the
    reset mark.)
    """

    def __init__(self) -> None:
        self._before_resets = 0.0

    def reset(self) -> bool:
        self._before_resets = max(self._before_resets, _status_mib("VmHWM"))
        try:
            Path("/proc/self/clear_refs").write_text("5")
            return True
        except OSError:
            return False

    def step_peak(self) -> float:
        return _status_mib("VmHWM")

    def process_peak(self) -> float:
        return max(self._before_resets, _status_mib("VmHWM"))


def _quiesce() -> float:
    """Collect garbage and hand freed heap back to the OS, so a step's RSS rise is its own."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    return _status_mib("VmRSS")


# --------------------------------------------------------------------------------------------
# workers (run as `python fold_speed.py --_worker SPEC.json`)
# --------------------------------------------------------------------------------------------


def _load_quantized(path: str, quant: str, compute_dtype: str) -> Any:
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    compute = getattr(torch, compute_dtype)
    if quant == "int8":
        cfg = BitsAndBytesConfig(load_in_8bit=True)
    else:
        cfg = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=compute,
            bnb_4bit_use_double_quant=quant == "nf4-dq",
        )
    # The unquantized modules (embeddings, norms, lm_head) stay float32 whatever the compute dtype:
    # in a bf16 model PEFT 0.21's 4-bit IA3 layer returns float32 k/v (it casts its input to float32
    # and never back), and attention then fails on mixed dtypes.
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=cfg, dtype=torch.float32, device_map="cpu")
    return model.eval()


def _ids(vocab: int) -> Any:
    import torch

    return torch.randint(0, vocab, BATCH, generator=torch.Generator().manual_seed(1234))


def _logits(model: Any, ids: Any) -> Any:
    import torch

    with torch.no_grad():
        return model(input_ids=ids).logits.double()


def _rel(got: Any, ref: Any) -> float:
    return float((got - ref).norm() / ref.norm())


def _timed_forwards(model: Any, ids: Any, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        _logits(model, ids)
        out.append(time.perf_counter() - t)
    return out


def _canonical_logits(model: Any, ids: Any) -> Optional[Any]:
    """Logits with bnb's CPU repack held off, so that 4-bit layers run the canonical kernel
    (float32 dequantize + matmul in the compute dtype); None without 4-bit layers or when some
    layer is already repacked (that cannot be switched back)."""
    layers = [m for m in model.modules() if hasattr(m, PIN)]
    if not layers or _repacked_layers(model):
        return None
    flags = [getattr(m, PIN) for m in layers]
    for m in layers:
        setattr(m, PIN, False)
    try:
        return _logits(model, ids)
    finally:
        for m, flag in zip(layers, flags):
            setattr(m, PIN, flag)  # ia3fuse pins the layers it folded: keep that as it was


def _rounding_floor(peft_model: Any, ids: Any, ref: Any) -> float:
    """PEFT's unmerged logits with every IA3 vector moved by about one float32 ulp,
    l * (1 + 2^-23 z), against ``ref``: how far rounding-level differences alone carry.
    (2^-24 would round most factors back to exactly 1.)"""
    import torch

    from ia3fuse.live import ia3_layers

    gen = torch.Generator().manual_seed(7)
    vectors = [layer.ia3_l["default"] for layer in ia3_layers(peft_model).values()]
    saved = [v.detach().clone() for v in vectors]
    with torch.no_grad():
        for v in vectors:
            v.mul_(1 + 2.0**-23 * torch.randn(v.shape, generator=gen, dtype=v.dtype))
    try:
        return _rel(_logits(peft_model, ids), ref)
    finally:
        with torch.no_grad():
            for v, orig in zip(vectors, saved):
                v.copy_(orig)


def _repacked_layers(model: Any) -> int:
    return sum(
        bool(getattr(getattr(getattr(m, "weight", None), "quant_state", None), "packing_format_for_cpu", False))
        for m in model.modules()
    )


def _references(peft_model: Any, ids: Any, spec: dict[str, Any]) -> dict[str, Any]:
    """PEFT's unmerged logits through bnb's canonical 4-bit kernel (fp32 dequantize + matmul in the
    compute dtype) and through the CPU-repacked bf16 kernel that every eval forward switches to.

    State "used" runs the repacking forwards (as a model that served requests before the fold);
    "fresh" leaves the layers in the canonical layout and takes the repacked reference from the
    file an earlier "used" worker of the same format wrote.
    """
    import torch

    res: dict[str, Any] = {}
    ref_path = Path(spec["ref_path"])
    ref_canon = _canonical_logits(peft_model, ids)
    if spec["state"] == "fresh":
        ref = torch.load(ref_path)["ref"]
    else:
        t = time.perf_counter()
        ref = _logits(peft_model, ids)  # the first eval forward: bnb repacks 4-bit layers here
        res["first_forward_before"] = time.perf_counter() - t
        res["forward_before"] = _timed_forwards(peft_model, ids, FORWARD_REPEATS)
        res["noise_floor_repacked_vs_canonical"] = None if ref_canon is None else _rel(ref, ref_canon)
        res["noise_floor_rounding"] = _rounding_floor(peft_model, ids, ref)
        if ref_path.exists():
            res["ref_matches_saved"] = bool(torch.equal(torch.load(ref_path)["ref"], ref))
        else:
            tmp = ref_path.with_suffix(".tmp")
            torch.save({"ref": ref, "ref_canon": ref_canon}, tmp)
            os.replace(tmp, ref_path)
    res["repacked_layers_before"] = _repacked_layers(peft_model)
    res["_ref"], res["_ref_canon"] = ref, ref_canon
    return res


def _requantize_each(peft_model: Any) -> tuple[Any, dict[str, int]]:
    """The naive fold: every IA3 vector into its own layer by dequantize-scale-requantize."""
    from ia3fuse.folding.base import backend_for
    from ia3fuse.live import ia3_layers

    layers = ia3_layers(peft_model)
    jobs = [
        (path, layer.ia3_l["default"].detach().float().reshape(-1), bool(layer.is_feedforward))
        for path, layer in layers.items()
    ]
    # PEFT's unload() refuses 4-bit IA3 models ("Cannot merge ia3 layers ... 4-bit"), even without
    # merging; put each wrapper's base layer back by hand.
    base = peft_model.base_model.model
    for path, layer in layers.items():
        parent, _, name = path.rpartition(".")
        setattr(base.get_submodule(parent), name, layer.get_base_layer())
    paths: Counter[str] = Counter()
    for path, l, feedforward in jobs:
        module = base.get_submodule(path)
        backend = backend_for(module)
        rows, cols = (None, l) if feedforward else (l, None)
        paths[f"{backend.requantize(module, rows, cols)} ({'cols' if feedforward else 'rows'})"] += 1
    return base, dict(paths)


def _worker_fold(spec: dict[str, Any]) -> dict[str, Any]:
    """(a) or (b) on the quantized model, with PEFT's unmerged forward as the reference."""
    import torch
    from peft import PeftModel

    import ia3fuse

    hw = HighWater()
    res: dict[str, Any] = {"torch_threads": torch.get_num_threads()}
    t = time.perf_counter()
    model = _load_quantized(spec["base_dir"], spec["quant"], spec["compute_dtype"])
    res["load_quantized"] = time.perf_counter() - t
    peft_model = PeftModel.from_pretrained(model, spec["adapter_dir"]).eval()
    ids = _ids(model.config.vocab_size)
    refs = _references(peft_model, ids, spec)
    ref, ref_canon = refs.pop("_ref"), refs.pop("_ref_canon")
    res.update(refs)

    rss_before = _quiesce()
    res["step_peak_resettable"] = hw.reset()
    t = time.perf_counter()
    if spec["method"] == "fold":
        folded = ia3fuse.fold(peft_model, double_quant=spec["double_quant"], measure_error=False)
        seconds = time.perf_counter() - t
        report = folded.ia3fuse_report
        res["fold_paths"] = dict(Counter(e.path for e in report.entries))
        res["fold_carries"] = dict(Counter(re.sub(r"model\.layers\.\d+\.", "", e.carries) for e in report.entries))
        res["fold_exact"] = report.exact
    else:
        folded, res["fold_paths"] = _requantize_each(peft_model)
        seconds = time.perf_counter() - t
    res["fold_seconds"] = seconds
    res["step_peak_rss_mib"] = hw.step_peak()
    res["rss_before_step_mib"] = rss_before
    res["rss_after_step_mib"] = _status_mib("VmRSS")
    del peft_model
    res["rss_after_step_trimmed_mib"] = _quiesce()

    out_canon = _canonical_logits(folded, ids)  # fresh load only: nothing is repacked yet
    res["rel_error_canonical_both"] = None if out_canon is None else _rel(out_canon, ref_canon)
    t = time.perf_counter()
    out = _logits(folded, ids)  # may repack layers again (requantized ones do; pinned ones do not)
    res["first_forward_after"] = time.perf_counter() - t
    res["repacked_layers_after"] = _repacked_layers(folded)
    res["forward_after"] = _timed_forwards(folded, ids, FORWARD_REPEATS)
    res["rel_error_vs_peft"] = _rel(out, ref)
    res["rel_error_vs_peft_canonical"] = None if ref_canon is None else _rel(out, ref_canon)

    if spec["method"] == "fold":
        # In-process repeats: unfold restores the base bit for bit (the CPU layout included), so
        # every refold does the same work as the first (without stripping PEFT's wrappers).
        adapter = ia3fuse.load_adapter(spec["adapter_dir"])
        unfold_s, refold_s = [], []
        for _ in range(spec["inner"]):
            t = time.perf_counter()
            ia3fuse.unfold(folded)
            unfold_s.append(time.perf_counter() - t)
            t = time.perf_counter()
            ia3fuse.fold(folded, adapter, double_quant=spec["double_quant"], measure_error=False)
            refold_s.append(time.perf_counter() - t)
        res["unfold_seconds"], res["refold_seconds"] = unfold_s, refold_s
        res["refold_logits_identical"] = bool(torch.equal(_logits(folded, ids), out))
        # Per-layer weight error (float32 dequantized, vs diag(r) W diag(c)), untimed.
        ia3fuse.unfold(folded)
        t = time.perf_counter()
        ia3fuse.fold(folded, adapter, double_quant=spec["double_quant"], measure_error=True)
        res["fold_measure_error_seconds"] = time.perf_counter() - t
        res["weight_rel_error_max"] = folded.ia3fuse_report.max_error
    res["peak_rss_mib"] = hw.process_peak()
    return res


def _worker_workaround(spec: dict[str, Any]) -> dict[str, Any]:
    """(c): unquantized bf16 model, PEFT merge_and_unload, save, reload quantized."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    hw = HighWater()
    saved = torch.load(spec["ref_path"])
    ref, ref_canon = saved["ref"], saved["ref_canon"]
    res: dict[str, Any] = {"torch_threads": torch.get_num_threads()}
    out_dir = Path(spec["out_dir"])
    rss_before = _quiesce()
    res["step_peak_resettable"] = hw.reset()
    t0 = t = time.perf_counter()
    base = AutoModelForCausalLM.from_pretrained(spec["base_dir"], dtype=torch.bfloat16, device_map="cpu")
    res["load_bf16"] = time.perf_counter() - t
    t = time.perf_counter()
    merged = PeftModel.from_pretrained(base, spec["adapter_dir"]).merge_and_unload()
    res["merge_and_unload"] = time.perf_counter() - t
    t = time.perf_counter()
    merged.save_pretrained(out_dir)
    res["save_bf16"] = time.perf_counter() - t
    del base, merged
    gc.collect()
    t = time.perf_counter()
    model = _load_quantized(str(out_dir), spec["quant"], spec["compute_dtype"])
    res["reload_quantized"] = time.perf_counter() - t
    res["fold_seconds"] = time.perf_counter() - t0
    res["step_peak_rss_mib"] = hw.step_peak()
    res["rss_before_step_mib"] = rss_before
    res["rss_after_step_mib"] = _status_mib("VmRSS")
    res["rss_after_step_trimmed_mib"] = _quiesce()
    res["fold_paths"] = {"bf16 merge + reload": 1}

    ids = _ids(model.config.vocab_size)
    out_canon = _canonical_logits(model, ids)
    res["rel_error_canonical_both"] = None if out_canon is None or ref_canon is None else _rel(out_canon, ref_canon)
    t = time.perf_counter()
    out = _logits(model, ids)
    res["first_forward_after"] = time.perf_counter() - t
    res["repacked_layers_after"] = _repacked_layers(model)
    res["forward_after"] = _timed_forwards(model, ids, FORWARD_REPEATS)
    res["rel_error_vs_peft"] = _rel(out, ref)
    res["rel_error_vs_peft_canonical"] = None if ref_canon is None else _rel(out, ref_canon)
    res["peak_rss_mib"] = hw.process_peak()
    shutil.rmtree(out_dir, ignore_errors=True)
    return res


WORKERS = {"setup": ms._worker_setup, "fold": _worker_fold, "workaround": _worker_workaround}


def _run_worker(spec_path: str) -> int:
    return ms._run_worker(spec_path, WORKERS)


# --------------------------------------------------------------------------------------------
# parent
# --------------------------------------------------------------------------------------------


class FoldBench(ms.Bench):
    """merge_speed's subprocess runner, pointed at this script's workers."""

    def __init__(self, workdir: Path, threads: Optional[int] = None) -> None:
        super().__init__(workdir, threads, script=Path(__file__))


def _prepare_workdir(args: argparse.Namespace) -> tuple[Path, bool]:
    return ms._prepare_workdir(args, prefix="ia3fold-", marker=MARKER)


def _setup(bench: FoldBench, model_config: dict[str, Any]) -> dict[str, Any]:
    """The random bf16 base and one IA3 adapter in PEFT's format (merge_speed's setup worker)."""
    wd = bench.workdir
    key = {"model_config": model_config, "dtype": "bfloat16", "adapters": 1}
    marker = wd / MARKER
    if marker.exists():
        saved = json.loads(marker.read_text())
        if saved.get("key") == key:
            print(f"reusing the base model and adapter in {wd}", flush=True)
            return saved
        for d in ("base", "adapter"):
            shutil.rmtree(wd / d, ignore_errors=True)
        marker.unlink()
    print(
        f"setup: building a {model_config['num_hidden_layers']}-layer bf16 model and one IA3 adapter in {wd}",
        flush=True,
    )
    adapter_dir = wd / "adapter"
    info = bench.worker(
        "setup",
        "setup",
        base_dir=str(wd / "base"),
        adapter_dirs=[str(adapter_dir)],
        model_config=model_config,
        dtype="bfloat16",
    )
    info.pop("process")
    saved = {"key": key, "base_dir": str(wd / "base"), "adapter_dir": str(adapter_dir), "info": info}
    ms._write_json_atomic(marker, saved)
    return saved


def _median(values: list[Optional[float]]) -> Optional[float]:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def _aggregate(run: Run, samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over the subprocess repeats (forwards: best and median of all timed forwards)."""
    last = samples[-1]
    out: dict[str, Any] = {
        **asdict(run),
        "repeats": len(samples),
        "fold_seconds": ms._summary([r["fold_seconds"] for r in samples]),
        "peak_rss_mib": _median([r["peak_rss_mib"] for r in samples]),
        "step_peak_rss_mib": _median([r["step_peak_rss_mib"] for r in samples]),
        "rss_before_step_mib": _median([r["rss_before_step_mib"] for r in samples]),
        "rss_increase_mib": _median([r["step_peak_rss_mib"] - r["rss_before_step_mib"] for r in samples]),
        "rss_retained_mib": _median([r["rss_after_step_mib"] - r["rss_before_step_mib"] for r in samples]),
        "rss_retained_after_trim_mib": _median(
            [r["rss_after_step_trimmed_mib"] - r["rss_before_step_mib"] for r in samples]
        ),
        "step_peak_resettable": all(r["step_peak_resettable"] for r in samples),
        "rel_error_vs_peft": _median([r["rel_error_vs_peft"] for r in samples]),
        "rel_error_vs_peft_canonical": _median([r["rel_error_vs_peft_canonical"] for r in samples]),
        "rel_error_canonical_both": _median([r["rel_error_canonical_both"] for r in samples]),
        "first_forward_after_s": _median([r["first_forward_after"] for r in samples]),
        "repacked_layers_before": last.get("repacked_layers_before"),
        "repacked_layers_after": last.get("repacked_layers_after"),
        "fold_paths": last["fold_paths"],
        "process_wall_s": _median([r["process"]["wall"] for r in samples]),
        "other_cpus_busy": _median([r["process"]["other_cpus_busy"] for r in samples]),
    }
    for when in ("before", "after"):
        times = [t for r in samples for t in r.get(f"forward_{when}", [])]
        out[f"forward_{when}_s"] = {"best": min(times), "median": statistics.median(times)} if times else None
    for k in (
        "load_quantized",
        "noise_floor_repacked_vs_canonical",
        "noise_floor_rounding",
        "fold_measure_error_seconds",
        "weight_rel_error_max",
        "load_bf16",
        "merge_and_unload",
        "save_bf16",
        "reload_quantized",
    ):
        if k in last:
            out[k] = _median([r[k] for r in samples])
    if "refold_seconds" in last:
        out["refold_seconds"] = ms._summary([t for r in samples for t in r["refold_seconds"]])
        out["unfold_seconds"] = ms._summary([t for r in samples for t in r["unfold_seconds"]])
        out["refold_logits_identical"] = all(r["refold_logits_identical"] for r in samples)
        out["fold_carries"] = last["fold_carries"]
        out["fold_exact"] = last["fold_exact"]
    if any("ref_matches_saved" in r for r in samples):
        out["ref_matches_saved"] = all(r.get("ref_matches_saved", True) for r in samples)
    out["samples"] = samples
    return out


def _fmt(x: Optional[float], spec: str) -> str:
    return "–" if x is None else format(x, spec)


def _fmt_ratio(r: float) -> str:
    return f"{r:,.0f}x" if r >= 10 else f"{r:.2g}x"


def _fmt_secs(s: float) -> str:
    return f"{s:.2f}" if s >= 1 else f"{s:.3f}" if s >= 0.01 else f"{s:.4f}"


def _markdown(data: dict[str, Any]) -> str:
    m, cfg, res = data["machine"], data["model_config"], data["results"]
    v = m["versions"]
    lines = [
        "# Fold speed: one IA3 adapter into a quantized TinyLlama-1.1B-shaped model (CPU)"
        + (" (quick: 2 layers)" if data["quick"] else ""),
        "",
        f"Base: LlamaForCausalLM, hidden {cfg['hidden_size']}, intermediate {cfg['intermediate_size']}, "
        f"{cfg['num_hidden_layers']} layers, {cfg['num_attention_heads']} heads / {cfg['num_key_value_heads']} KV "
        f"heads, vocab {cfg['vocab_size']}; {data['setup']['parameters'] / 1e9:.3f} B random parameters saved "
        "as bf16 safetensors, loaded through transformers' `BitsAndBytesConfig` (4-bit: nf4, blocksize 64) with "
        f"**`bnb_4bit_compute_dtype=torch.{data['compute_dtype']}`** and `dtype=torch.float32` "
        "for the unquantized modules. Adapter: PEFT's default IA3 targets (k_proj, v_proj output-side; "
        f"down_proj feed-forward), {data['setup']['ia3_modules']} vectors, l = 1 + 0.1 randn, saved once in "
        f"PEFT's format. Logits on a fixed batch of {BATCH[0]} x {BATCH[1]} token ids.",
        "",
        f"Machine: {m['cpu_model']}, {m['cpu_count']} CPUs, {m['ram_gib']} GiB RAM, torch {v['torch']} "
        f"({data['threads'] or m['torch_threads']} thread{'s' if (data['threads'] or m['torch_threads']) != 1 else ''}), "
        f"transformers {v['transformers']}, peft {v['peft']}, bitsandbytes {v.get('bitsandbytes')}, ia3fuse "
        f"{v['ia3fuse']}, Python {m['python']}. Each path runs in its own subprocess, {data['repeats']} time(s) "
        "(median shown); files in the page cache.",
        "",
        "| Format | Model at fold | Path | Fold wall s | Peak RSS MiB (step / process) | RSS increase MiB "
        f"(peak / after trim) | Logit rel. error vs PEFT unmerged | Same, both on bnb's canonical kernel "
        f"({data['compute_dtype']} matmul) | "
        "Fold time / (a)'s | Forward s before → after |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key, r in res.items():
        t = _fmt_secs(r["fold_seconds"]["median"])
        if "refold_seconds" in r:
            t += f" (refolds {_fmt_secs(r['refold_seconds']['median'])})"
        ratio = "1x" if r["base"] == key else "–" if r.get("ratio_vs_base") is None else _fmt_ratio(r["ratio_vs_base"])
        if r["base"] != key and r["base"] in res and res[r["base"]]["quant"] != r["quant"]:
            ratio += " (vs nf4 (a))"
        fb, fa = r["forward_before_s"], r["forward_after_s"]
        fwd = f"{_fmt(fb and fb['best'], '.2f')} → {_fmt(fa and fa['best'], '.2f')}"
        lines.append(
            f"| {QUANT_TITLES[r['quant']]} | {STATE_TITLES[r['state']]} | {r['label']} | {t} | "
            f"{r['step_peak_rss_mib']:,.0f} / {r['peak_rss_mib']:,.0f} | {r['rss_increase_mib']:,.0f} / "
            f"{r['rss_retained_after_trim_mib']:,.0f} | {r['rel_error_vs_peft']:.2e} | "
            f"{_fmt(r['rel_error_canonical_both'], '.2e')} | {ratio} | {fwd} |"
        )
    lines += ["", *[f"{n}\n" for n in _notes(data)]]
    return "\n".join(lines)


def _goal(res: dict[str, dict[str, Any]], cfg: dict[str, Any], compute: str) -> Optional[str]:
    """The project's goal for (a), checked: noise floor, no weight-sized temporaries, 100x (b)."""
    if not all(k in res for k in ("a", "b", "a_fresh", "b_fresh")):
        return None
    a, b, af, bf = res["a"], res["b"], res["a_fresh"], res["b_fresh"]
    fresh, used = (
        bf["fold_seconds"]["median"] / af["fold_seconds"]["median"],
        b["fold_seconds"]["median"] / a["fold_seconds"]["median"],
    )
    text = (
        "**Goal check** (the project's goal for (a): at the compute-dtype noise floor, no weight-sized "
        "temporaries, at least 100x faster than (b) on CPU). *Fresh load:* "
        f"(b)/(a) = {_fmt_ratio(fresh)} ({'met' if fresh >= 100 else 'not met'}); the step's RSS rose by "
        f"{af['rss_increase_mib']:,.0f} MiB (new scaled float32 absmax and the kept originals; one up_proj weight "
        f"in float32 is {cfg['intermediate_size'] * cfg['hidden_size'] * 4 / MiB:.0f} MiB); with both sides on bnb's canonical kernel ({compute} matmul) (a) differs from "
        f"PEFT by {_fmt(af['rel_error_canonical_both'], '.1e')} ({compute} rounding) and (b) by "
        f"{_fmt(bf['rel_error_canonical_both'], '.1e')}. *After inference* (layers repacked): (b)/(a) = "
        f"{_fmt_ratio(used)} ({'met' if used >= 100 else 'not met'}) and the step's RSS peak rose by "
        f"{a['rss_increase_mib']:,.0f} MiB ({a['rss_retained_after_trim_mib']:,.0f} MiB left after `malloc_trim`): "
        "undoing bnb's repack is most of the time and memory (see below)."
    )
    if "a_renest" in res:
        rn = res["a_renest"]
        text += (
            f' `double_quant="renest"` folds the repacked layers in {_fmt_secs(rn["fold_seconds"]["median"])} s '
            f"((b)/that = {_fmt_ratio(b['fold_seconds']['median'] / rn['fold_seconds']['median'])}, "
            f"+{rn['rss_increase_mib']:,.0f} MiB) at the price of one bf16 rounding per block absmax (weight error "
            f"{_fmt(rn.get('weight_rel_error_max'), '.1e')})."
        )
    return text


def _notes(data: dict[str, Any]) -> list[str]:
    res = data["results"]
    out = []
    if data["ratios"]:
        out.append(
            "**Ratios** (fold wall time, median): "
            + "; ".join(f"{k} = {_fmt_ratio(v)}" for k, v in data["ratios"].items())
            + "."
        )
    goal = _goal(res, data["model_config"], data["compute_dtype"])
    if goal:
        out.append(goal)
    out.append(
        "**Model at fold.** *After inference*: the PeftModel ran eval-mode forwards before the fold (the reference "
        'logits and the "before" timings), so bitsandbytes had repacked every 4-bit layer for its fused CPU '
        "kernel (`packing_format_for_cpu`). *Fresh load*: the fold runs right after loading, the 4-bit layers "
        'still in the canonical layout (their reference through the repacked kernel comes from the "after '
        "inference\" worker: same model, same batch; the after-inference workers' references were bit-identical: "
        f"{all(r.get('ref_matches_saved', True) for r in res.values())}). (c) starts from the checkpoint on disk."
    )
    a = res.get("a") or res.get("a_fresh")
    if a:
        paths = ", ".join(f"{n} x {p}" for p, n in a["fold_paths"].items())
        carries = "; ".join(f"{n} x {c}" for c, n in a["fold_carries"].items())
        errs = ", ".join(
            f"{k} {r['weight_rel_error_max']:.1e}" for k, r in res.items() if r.get("weight_rel_error_max") is not None
        )
        out.append(
            f"**(a)** `FoldReport` paths (nf4): {paths} (exact: {a['fold_exact']}); what they carry: {carries}. "
            "Fold wall time is the first fold of the PeftModel (PEFT wrappers stripped); in parentheses the median "
            f"of {data['inner']} in-process `unfold` + `fold(model, adapter)` repeats (unfold restores the base bit "
            "for bit, layout included; each refold gave logits identical to the first fold's: "
            f"{all(r.get('refold_logits_identical', True) for r in res.values())}). Largest per-layer weight error "
            f"(`measure_error=True`, float32, vs diag(r) W diag(c)): {errs}. `measure_error=True` is `fold`'s "
            "default: it dequantizes every changed layer before and after (one float32 layer at a time), and the "
            "same fold then took "
            + ", ".join(
                f"{k} {_fmt_secs(r['fold_measure_error_seconds'])} s"
                for k, r in res.items()
                if r.get("fold_measure_error_seconds") is not None
            )
            + " (timed after an unfold, untimed elsewhere)."
        )
    if any(k in res for k in ("b", "b_fresh", "b_int8")):
        out.append(
            "**(b)** calls ia3fuse's own lossy fallback `FOUR_BIT.requantize(module, rows, cols)` / "
            "`INT8.requantize(...)` directly on each of the same modules with PEFT's wrappers removed (PEFT's "
            "`unload()` refuses 4-bit IA3 models): k_proj/v_proj take rows, down_proj takes its input scale as "
            "columns of down_proj (no neighbour rewrite). Each call dequantizes the layer to float32, scales it and "
            "quantizes it again with bitsandbytes' own quantizer (same blocksize, quant type, double quant); "
            "timed from reading the vectors to the last layer."
        )
    c = res.get("c")
    if c:
        load = next((r["load_quantized"] for r in res.values() if r["quant"] == "nf4" and "load_quantized" in r), None)
        out.append(
            f"**(c)** times the whole workaround in one process: load the bf16 checkpoint unquantized "
            f"({c['load_bf16']:.1f} s), `PeftModel.from_pretrained(...).merge_and_unload()` in bf16 "
            f"({c['merge_and_unload']:.1f} s), `save_pretrained` ({c['save_bf16']:.1f} s), reload with the same "
            f"`BitsAndBytesConfig` ({c['reload_quantized']:.1f} s; bitsandbytes quantizes while loading). For "
            f"scale, loading the nf4 model that (a) and (b) start from took {_fmt(load, '.1f')} s. Its error is "
            "against PEFT's unmerged forward on that nf4 model; it quantizes the merged weights afresh, so every "
            "scaled layer gets new 4-bit codes."
        )
    floors = []
    for quant in ("nf4", "nf4-dq", "int8"):
        r = next((r for r in res.values() if r["quant"] == quant and r.get("noise_floor_rounding") is not None), None)
        if r is None:
            continue
        kernel = r.get("noise_floor_repacked_vs_canonical")
        floors.append(
            f"{QUANT_TITLES[quant]}: rounding {r['noise_floor_rounding']:.2e}"
            + (f", kernel {kernel:.2e}" if kernel is not None else "")
        )
    if floors:
        out.append(
            "**Noise floors** (relative logit differences of PEFT's unmerged model with itself): *rounding*: every "
            "IA3 vector moved by about one float32 ulp, l (1 + 2^-23 z); *kernel*: bnb's canonical 4-bit kernel "
            "(dequantize to float32, matmul in the compute dtype) against the fused bf16 kernel it repacks layers "
            f"for. {'; '.join(floors)}. Rounding-level differences grow through {data['model_config']['num_hidden_layers']} "
            "random layers: the bf16 kernel "
            "rounds activations, and LLM.int8 quantizes them per row at every layer (with an outlier threshold), "
            "so a one-ulp change flips int8 codes downstream. The error column (PEFT as a user runs it, repacked) "
            "is to be read against these; the column with both sides on the canonical kernel (fresh-load "
            "rows and (c), where no layer is repacked yet) isolates the fold itself."
        )
    if "a" in res:
        r = res["a"]
        out.append(
            '**CPU inference after the fold.** The exact `"unnest"` fold pins the 4-bit layers it scales (k_proj, '
            "v_proj, up_proj) to the canonical layout (`support_avx512bf16_for_cpu=False`), undoing bnb's repack "
            "where it had happened, because the fused kernel would round the scaled absmax to bf16. Those layers "
            "then dequantize to float32 and run a float32 matmul on every forward: "
            f"{r['repacked_layers_before']} repacked layers before, {r['repacked_layers_after']} after, and the "
            f"forward (best of {FORWARD_REPEATS}) goes from {r['forward_before_s']['best']:.2f} s to "
            f"{r['forward_after_s']['best']:.2f} s. Undoing the repack is also most of (a)'s time and memory after "
            "inference: bitsandbytes' `_convert_weight_packed_for_cpu_inverse` unpacks each layer's codes through "
            "an int32 tensor of out x in elements (as large as the float32 weight) and several uint8 ones; the "
            'freed blocks stay in the heap until `malloc_trim`. `"renest"` keeps the repacked bf16 layout and '
            "the forward speed; (b) and (c) leave canonical layers that bnb repacks on the next forward."
        )
    out.append(
        "**Columns.** Fold wall s: the step alone, in-process (imports and model load excluded). Peak RSS: the "
        "kernel's high-water mark during the step (reset through `/proc/self/clear_refs` right before it) / over "
        "the whole process (model load included; loading quantizes the model). RSS increase: step peak minus "
        "RSS before the step (after `gc.collect()` and `malloc_trim`) / what remained after the step and another "
        "`malloc_trim` ((c): the reloaded model itself)"
        + (
            ""
            if all(r["step_peak_resettable"] for r in res.values())
            else " (/proc/self/clear_refs was not writable: step peaks are the process's peaks so far)"
        )
        + ". Fold time / (a)'s: against the default fold of the same "
        "format and model state (above 1: (a) is faster). Forward: "
        f"batch {BATCH[0]} x {BATCH[1]}, best of {FORWARD_REPEATS} after a warm-up forward (medians in the JSON), "
        "PEFT's unmerged model before, the folded model after; fresh-load rows ran no repacked forward before."
    )
    busy = [r["other_cpus_busy"] for r in res.values() if r.get("other_cpus_busy") is not None]
    if busy:
        out.append(
            f"**Contention.** Other processes kept {min(busy):.2f}–{max(busy):.2f} of the {data['machine']['cpu_count']} "
            "CPUs busy while the workers ran (per path in the JSON); wall times include their interference."
            + (
                f" Every worker ran with OMP_NUM_THREADS={data['threads']} (`--threads {data['threads']}`): with torch's "
                "default of one thread per CPU, another process on one core made the threads wait for each other and "
                "the same step swung by up to 10x between runs."
                if data["threads"]
                else " torch used one thread per CPU; with another process on one core its threads wait for each other, "
                "so timings can swing by up to 10x (`--threads 1` avoids that)."
            )
        )
    out.append(
        f"**Repeats.** {data['repeats']} subprocess run(s) per path (`--repeats`, default 1: the slow paths take "
        f"minutes), plus {data['inner']} in-process refolds for (a). Script run time: {data['script_seconds']:.0f} s "
        f"(setup {data['setup_seconds']:.0f} s)."
    )
    return out


def _check_runs(runs: list[Run]) -> None:
    """Fresh-load workers and (c) read the repacked-kernel reference an earlier worker wrote."""
    for i, run in enumerate(runs):
        needs_ref = run.method == "workaround" or run.state == "fresh"
        if needs_ref and not any(
            p.quant == run.quant and p.state == "used" and p.method != "workaround" for p in runs[:i]
        ):
            raise SystemExit(
                f"path {run.key} needs the reference logits that an earlier {run.quant} "
                "after-inference path (a or b) computes; add one to --paths"
            )


def _bench(args: argparse.Namespace) -> None:
    t_script = time.perf_counter()
    model_config = dict(
        ms.LLAMA_SHAPE, num_hidden_layers=ms.QUICK_LAYERS if args.quick else ms.LLAMA_SHAPE["num_hidden_layers"]
    )
    runs = [r for r in RUNS if r.key in args.paths]
    _check_runs(runs)
    workdir, created = _prepare_workdir(args)
    try:
        bench = FoldBench(workdir, args.threads)
        t_setup = time.perf_counter()
        setup = _setup(bench, model_config)
        setup_seconds = time.perf_counter() - t_setup
        ms._warm_page_cache([workdir / "base", workdir / "adapter"])
        refs = workdir / "refs"
        samples: dict[str, list[dict[str, Any]]] = {r.key: [] for r in runs}
        for rep in range(args.repeats):
            print(f"repeat {rep + 1}/{args.repeats}", flush=True)
            shutil.rmtree(refs, ignore_errors=True)
            refs.mkdir()
            for run in runs:
                spec = dict(
                    base_dir=setup["base_dir"],
                    adapter_dir=setup["adapter_dir"],
                    compute_dtype=args.compute_dtype,
                    quant=run.quant,
                    method=run.method,
                    state=run.state,
                    double_quant=run.double_quant,
                    ref_path=str(refs / f"{run.quant}.pt"),
                    inner=args.inner,
                )
                if run.method == "workaround":
                    r = bench.worker("workaround", f"{run.key}-{rep}", out_dir=str(workdir / "merged"), **spec)
                else:
                    r = bench.worker("fold", f"{run.key}-{rep}", **spec)
                samples[run.key].append(r)
                print(
                    f"  {run.key:12s} fold {r['fold_seconds']:9.4f} s, step peak RSS {r['step_peak_rss_mib']:6.0f} "
                    f"MiB (+{r['step_peak_rss_mib'] - r['rss_before_step_mib']:.0f}), rel. error "
                    f"{r['rel_error_vs_peft']:.2e}, process {r['process']['wall']:.0f} s",
                    flush=True,
                )
        results = {r.key: _aggregate(r, samples[r.key]) for r in runs}
        for r in results.values():
            base = results.get(r["base"])
            r["ratio_vs_base"] = None if base is None else r["fold_seconds"]["median"] / base["fold_seconds"]["median"]
        ratios = {
            name: results[num]["fold_seconds"]["median"] / results[den]["fold_seconds"]["median"]
            for num, den, name in (
                ("b", "a", "nf4 after inference (b)/(a)"),
                ("c", "a", "nf4 (c)/(a after inference)"),
                ("b_fresh", "a_fresh", "nf4 fresh load (b)/(a)"),
                ("c", "a_fresh", "nf4 (c)/(a fresh load)"),
                ("b_int8", "a_int8", "int8 (b)/(a)"),
            )
            if num in results and den in results
        }
        machine = ms._machine(setup["info"], "bfloat16")
        try:
            machine["versions"]["bitsandbytes"] = metadata.version("bitsandbytes")
        except metadata.PackageNotFoundError:
            machine["versions"]["bitsandbytes"] = None
        data = {
            "benchmark": "fold_speed",
            "quick": args.quick,
            "repeats": args.repeats,
            "inner": args.inner,
            "compute_dtype": args.compute_dtype,
            "batch": list(BATCH),
            "forward_repeats": FORWARD_REPEATS,
            "model_config": model_config,
            "setup": setup["info"],
            "machine": machine,
            "threads": args.threads,
            "ratios": ratios,
            "results": results,
            "setup_seconds": setup_seconds,
            "script_seconds": time.perf_counter() - t_script,
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        stem = "fold_speed" + ("_quick" if args.quick else "")  # the thread count is recorded inside
        out_dir = Path(args.results).absolute()
        ms._write_json_atomic(out_dir / f"{stem}.json", data)
        md = _markdown(data)
        ms._write_text_atomic(out_dir / f"{stem}.md", md)
        print(md)
        print(f"wrote {out_dir / (stem + '.json')} and {out_dir / (stem + '.md')}")
    finally:
        if created and not args.keep_workdir:
            shutil.rmtree(workdir, ignore_errors=True)
        elif workdir.exists():
            shutil.rmtree(workdir / "merged", ignore_errors=True)
            print(f"kept the work folder {workdir}")


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--workdir",
        help="folder for the base model, adapter and the workaround's merged copy "
        "(default: a temp dir); removed at the end if this run created it; a folder set up by an "
        "earlier run is reused",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="subprocess runs of every path (default 1: the slow paths take minutes); the median is reported",
    )
    parser.add_argument("--inner", type=int, default=5, help="in-process unfold + refold repeats for (a)")
    parser.add_argument("--quick", action="store_true", help=f"{ms.QUICK_LAYERS} layers instead of 22 (smoke run)")
    parser.add_argument(
        "--compute-dtype",
        choices=["float32", "bfloat16"],
        default="float32",
        help="bnb_4bit_compute_dtype (the unquantized modules stay float32)",
    )
    parser.add_argument(
        "--paths",
        default=",".join(r.key for r in RUNS),
        help=f"comma-separated subset of {','.join(r.key for r in RUNS)}",
    )
    parser.add_argument("--results", default=str(RESULTS), help="folder for the JSON and markdown results")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="OMP_NUM_THREADS/MKL_NUM_THREADS for every "
        "process (default: torch's default, one per CPU). On a shared machine 1 keeps timings stable: "
        "with another process on one core, torch's threads wait for each other (10x swings)",
    )
    parser.add_argument("--keep-workdir", action="store_true", help="do not delete the work folder at the end")
    parser.add_argument("--_worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._worker:
        return _run_worker(args._worker)
    args.paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    unknown = sorted(set(args.paths) - {r.key for r in RUNS})
    if unknown:
        parser.error(f"unknown --paths {unknown}; choose from {[r.key for r in RUNS]}")
    if args.repeats < 1 or args.inner < 1:
        parser.error("--repeats and --inner must be >= 1")
    _bench(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
