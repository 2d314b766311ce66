"""The ``ia3fuse`` command: thin subcommands over the Python API.

User errors print one line and exit 2 (``--debug`` shows the traceback).
"""

from __future__ import annotations

import argparse
import os
import sys
import typing
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence

__all__ = ["main"]


def _param_flags(parser: argparse.ArgumentParser, skip: Sequence[str] = ()) -> list[str]:
    """One flag per method parameter name, typed from the registry (the methods' schema)."""
    from .fusion import methods

    seen: dict[str, Any] = {}
    for m in methods():
        for p in m.params:
            if p.name not in skip:
                seen.setdefault(p.name, (p, []))[1].append(m.name)
    group = parser.add_argument_group("method parameters (each applies to the methods listed)")
    for name, (p, owners) in seen.items():
        ann = p.annotation
        if typing.get_origin(ann) is typing.Annotated:
            ann = typing.get_args(ann)[0]
        args = typing.get_args(ann)
        flag = "--" + name.replace("_", "-")
        help_ = f"{p.description}. Methods: {', '.join(owners)}"
        if ann is bool:
            group.add_argument(
                flag, dest=f"param_{name}", action=argparse.BooleanOptionalAction, default=None, help=help_
            )
        elif typing.get_origin(ann) is typing.Literal:
            group.add_argument(flag, dest=f"param_{name}", choices=list(args), default=None, help=help_)
        else:
            base = next((a for a in args if a is not type(None)), ann) if args else ann
            group.add_argument(
                flag, dest=f"param_{name}", type=base, default=None, metavar=base.__name__.upper(), help=help_
            )
    return list(seen)


def _weight(text: str) -> Any:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"weight {text!r} is not a number or a comma-separated depth gradient such as 0,0.5,1"
        ) from None
    return values[0] if len(values) == 1 else values


def _build_parser() -> tuple[argparse.ArgumentParser, list[str]]:
    parser = argparse.ArgumentParser(prog="ia3fuse", description="Fuse IA3 adapters trained with Hugging Face PEFT.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    mp = sub.add_parser(
        "merge",
        help="fuse adapters (from a YAML recipe or flags)",
        description="ia3fuse merge recipe.yaml [-o OUT]  or  ia3fuse merge A B --weights 0.3 0.7 --method ties --density 0.5 -o OUT",
    )
    mp.add_argument("inputs", nargs="+", help="one recipe .yaml file, or adapter directories")
    mp.add_argument("-o", "--output", help="output directory (must not exist unless --force)")
    mp.add_argument(
        "--weights", nargs="+", type=_weight, help="one weight per adapter; a comma list is a depth gradient"
    )
    mp.add_argument("--method", default=None, help="fusion method (see 'ia3fuse methods'); default task_arithmetic")
    mp.add_argument(
        "--missing", choices=["identity", "zero"], default=None, help="how a module an adapter lacks counts"
    )
    mp.add_argument(
        "--extras",
        choices=["error", "first", "average", "drop"],
        default=None,
        help="trained non-IA3 modules (modules_to_save, e.g. a classifier head): refuse when they differ "
        "(error, the default), keep the first adapter's, average them with the weights, or drop them",
    )
    mp.add_argument("--name", default=None, help="name of the fused adapter (model card)")
    mp.add_argument("--strict", action="store_true", default=None, help="refuse adapters of different base models")
    mp.add_argument(
        "--mixed-bases",
        action="store_true",
        default=None,
        help="fuse adapters that name different base models and target different modules",
    )
    mp.add_argument("--force", action="store_true", help="replace an existing output directory")
    mp.add_argument("--allow-pickle", action="store_true", help="read legacy adapter_model.bin (weights_only=True)")
    param_names = _param_flags(mp)

    ip = sub.add_parser("inspect", help="print a table of an adapter's modules")
    ip.add_argument("adapter", help="adapter directory")
    ip.add_argument("--allow-pickle", action="store_true", help="read legacy adapter_model.bin (weights_only=True)")

    sub.add_parser("methods", help="list the fusion methods")

    fp = sub.add_parser(
        "fold",
        help="fold an adapter into a safetensors checkpoint or a GGUF file on disk",
        description="ia3fuse fold --base MODEL_DIR --adapter ADAPTER_DIR -o OUT [--dtype bfloat16] [--max-shard-size 5GB]\n"
        "ia3fuse fold --gguf MODEL.gguf --adapter ADAPTER_DIR -o OUT.gguf [--exact require] [--permute-qk yes]",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    src = fp.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--base",
        help="base model directory (config.json + safetensors), full precision or quantized (compressed-tensors, "
        "GPTQ, AWQ, bitsandbytes, MLX)",
    )
    src.add_argument("--gguf", help="base model as a llama.cpp GGUF file (any quant type)")
    fp.add_argument("--adapter", required=True, help="IA3 adapter directory trained on that base")
    fp.add_argument(
        "-o",
        "--output",
        required=True,
        help="output model directory (--base) or .gguf file (--gguf); must not exist unless --force",
    )
    fp.add_argument(
        "--dtype",
        choices=["float32", "float16", "bfloat16"],
        default=None,
        help="--base only: convert float tensors to this dtype (default: keep each tensor's dtype)",
    )
    fp.add_argument(
        "--max-shard-size", default=None, help="--base only: largest output shard, e.g. 5GB or 500MiB (default 5GB)"
    )
    fp.add_argument(
        "--exact",
        choices=["auto", "require", "allow_requant"],
        default=None,
        help="--gguf only: 'require' refuses any dequantize-scale-requantize step (default auto: warn)",
    )
    fp.add_argument(
        "--permute-qk",
        choices=["auto", "yes", "no"],
        default=None,
        help="--gguf only: were q/k rows permuted by llama.cpp's converter (default auto: by architecture)",
    )
    fp.add_argument("--measure-error", action="store_true", help="--gguf only: report every changed tensor's error")
    fp.add_argument(
        "--extras",
        choices=["keep", "drop"],
        default="keep",
        help="the adapter's trained non-IA3 modules (modules_to_save, e.g. a classifier head): write them "
        "over the base's (keep, the default; --base only) or fold the IA3 vectors only (drop)",
    )
    fp.add_argument("--verbose", action="store_true", help="also print the table of every changed tensor")
    fp.add_argument(
        "--report",
        metavar="FILE",
        default=None,
        help="write the table of every changed tensor to FILE (markdown); must not exist unless --force",
    )
    fp.add_argument("--force", action="store_true", help="replace an existing output")
    fp.add_argument("--no-progress", action="store_true", help="no progress bar")
    fp.add_argument("--allow-pickle", action="store_true", help="read a legacy adapter_model.bin (weights_only=True)")

    sp_ = sub.add_parser(
        "search",
        help="find fusion weights from a few examples (Adam through the merge, or CMA-ES)",
        description="ia3fuse search --model DIR --adapters A B C --data few.jsonl [--granularity layer] -o OUT",
    )
    sp_.add_argument("--model", required=True, help="base model directory (transformers, with its tokenizer)")
    sp_.add_argument("--adapters", nargs="+", required=True, help="IA3 adapter directories trained on that base")
    sp_.add_argument(
        "--data",
        required=True,
        help='JSON lines: {"input": ..., "target": ...} (LMs), {"input": ..., "label": N} (classifiers) or {"input": ...}',
    )
    sp_.add_argument(
        "-o", "--output", required=True, help="output folder: adapter/, recipe.yaml, weights.md/png, objective.png"
    )
    sp_.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the model directory)")
    sp_.add_argument(
        "--objective",
        choices=["loss", "entropy"],
        default="loss",
        help="loss on labeled examples, or prediction entropy (labels unused); default loss",
    )
    sp_.add_argument(
        "--granularity",
        choices=["task", "layer", "module"],
        default="task",
        help="one weight per adapter, per adapter and layer, or per adapter, layer and module kind",
    )
    sp_.add_argument("--optimizer", choices=["adam", "cma"], default="adam", help="adam (gradients) or cma (CMA-ES)")
    sp_.add_argument(
        "--method",
        default="task_arithmetic",
        help="fusion method (see 'ia3fuse methods'), or 'auto': choose the method, its parameter, a scale and the "
        "weights, with a held-out estimate",
    )
    sp_.add_argument(
        "--holdout",
        type=float,
        default=0.25,
        help="with --method auto: share of the examples kept for the estimate (another share chooses; default 0.25)",
    )
    sp_.add_argument(
        "--budget", type=int, default=None, help="forward passes to spend (default 100 passes over the data)"
    )
    sp_.add_argument("--l1", type=float, default=0.0, help="penalty l1 * mean |weight| (LoraHub: 0.05)")
    sp_.add_argument(
        "--bounds",
        nargs=2,
        type=float,
        metavar=("LOW", "HIGH"),
        default=None,
        help="bounds of every weight (cma default -1.5 1.5)",
    )
    sp_.add_argument("--init", nargs="+", type=float, default=None, help="starting weight(s): one, or one per adapter")
    sp_.add_argument("--seed", type=int, default=0, help="seed of CMA-ES and of randomized methods' drop masks")
    sp_.add_argument("--batch-size", type=int, default=8, help="examples per forward pass")
    sp_.add_argument("--lr", type=float, default=0.05, help="Adam learning rate")
    sp_.add_argument("--sigma0", type=float, default=0.2, help="CMA-ES initial step size")
    sp_.add_argument("--popsize", type=int, default=None, help="CMA-ES population (default 4 + 3 ln n)")
    sp_.add_argument("--name", default="searched", help="name of the fused adapter")
    sp_.add_argument(
        "--extras",
        choices=["error", "first", "drop"],
        default="error",
        help="trained non-IA3 modules (modules_to_save, e.g. a classifier head): refuse when they differ "
        "(error, the default), score with the first adapter's, or with the model's own (drop)",
    )
    sp_.add_argument("--force", action="store_true", help="replace an existing output folder")
    sp_.add_argument("--no-progress", action="store_true", help="no progress bar")
    sp_.add_argument("--allow-pickle", action="store_true", help="read legacy adapter_model.bin (weights_only=True)")
    search_params = _param_flags(sp_, skip=("seed",))

    dp = sub.add_parser("demo", help="build a tiny model and adapters, fuse with every method, check in PEFT")
    dp.add_argument("--workdir", default="ia3fuse-demo", help="folder for the demo files (default ./ia3fuse-demo)")
    dp.add_argument("--arch", default="llama", help="tiny architecture: llama, gpt2, t5 or bert")

    st = sub.add_parser(
        "studio",
        help="a local web app: fusion weights by eye, live outputs, search and export",
        description="Start the studio on localhost and print its URL (Ctrl-C stops it). Needs pip install 'ia3fuse[studio]'.",
    )
    st.add_argument("--model", help="base model folder (with its tokenizer unless --tokenizer)")
    st.add_argument("--adapters", nargs="+", metavar="DIR", help="IA3 adapter folders")
    st.add_argument("--data", help="JSON-lines examples: prompts, scores (with targets or labels) and search")
    st.add_argument("--tokenizer", help="tokenizer folder (default: --model)")
    st.add_argument("--demo", action="store_true", help="open the built-in example (tiny model, three adapters)")
    st.add_argument("--workdir", help="folder for the --demo files (default: a new temporary folder)")
    st.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    st.add_argument("--port", type=int, default=7860, help="port (default 7860; 0 picks a free one)")
    st.add_argument("--extras", choices=["error", "first", "drop"], default="error", help="the adapters' heads")
    st.add_argument("--open", action="store_true", help="open the page in the default web browser")
    return parser, param_names + [p for p in search_params if p not in param_names]


def _cmd_merge(args: argparse.Namespace, param_names: list[str]) -> int:
    from .errors import RecipeError
    from .merging import run_recipe
    from .recipe import load_recipe, parse_recipe
    from ._text import count

    params = {n: getattr(args, f"param_{n}") for n in param_names if getattr(args, f"param_{n}") is not None}
    flag_fields = {
        "weights": args.weights,
        "method": args.method,
        "missing": args.missing,
        "extras": args.extras,
        "name": args.name,
        "strict": args.strict,
        "mixed_bases": args.mixed_bases,
    }
    given = {k: v for k, v in flag_fields.items() if v is not None}
    first = Path(args.inputs[0])
    if len(args.inputs) == 1 and first.suffix in (".yaml", ".yml") and not first.is_dir():
        if given or params:
            raise RecipeError(
                f"options {', '.join('--' + k.replace('_', '-') for k in [*given, *params])} conflict with the recipe "
                f"{args.inputs[0]!r}; put them in the recipe, or pass adapter directories instead of a recipe"
            )
        recipe = load_recipe(first)
    else:
        data: dict[str, Any] = {"adapters": list(args.inputs), **given}
        if params:
            data["parameters"] = params
        recipe = parse_recipe(data, source="the command line")
    if args.output is None and recipe.output is None:
        raise RecipeError("no output directory; pass -o DIR (or 'output:' in the recipe)")
    out = run_recipe(recipe, output=args.output, overwrite=args.force, allow_pickle=args.allow_pickle)
    print(f"wrote {out} ({recipe.method}, {count(len(recipe.adapters), 'adapter')})")
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from .adapter import load_adapter
    from .tables import adapter_table

    adapter = load_adapter(args.adapter, allow_pickle=args.allow_pickle)
    print(adapter_table(adapter))
    return 0


def _cmd_methods() -> int:
    from .tables import methods_table

    print(methods_table())
    return 0


def _cmd_fold(args: argparse.Namespace) -> int:
    from .adapter import load_adapter
    from .errors import FoldError
    from .folding.checkpoint import fold_checkpoint

    if args.gguf is not None:
        return _cmd_fold_gguf(args)
    wrong = [f for f, v in (("--exact", args.exact), ("--permute-qk", args.permute_qk)) if v is not None]
    wrong += ["--measure-error"] if args.measure_error else []
    if wrong:
        raise FoldError(
            f"{', '.join(wrong)} appl{'y' if len(wrong) > 1 else 'ies'} to --gguf only; a --base fold is always exact"
        )
    _check_report_path(args, args.base)
    adapter = load_adapter(args.adapter, allow_pickle=args.allow_pickle)
    report = fold_checkpoint(
        args.base,
        adapter,
        args.output,
        dtype=args.dtype,
        max_shard_size=args.max_shard_size or "5GB",
        overwrite=args.force,
        progress=not args.no_progress,
        extras=args.extras,
    )
    _print_fold(args, report)
    return 0


def _check_report_path(args: argparse.Namespace, base: str) -> None:
    """Refuse a --report path before folding, so a fold is never done for a report that cannot be written."""
    from ._io import check_output_path
    from .errors import OutputPathError

    if args.report is None:
        return
    if Path(args.report).resolve() == Path(args.output).resolve():
        raise OutputPathError(f"--report {args.report!r} is the fold's output; pass another file for the report")
    check_output_path(Path(args.report), [Path(base), Path(args.adapter)], overwrite=args.force, file=True)


def _print_fold(args: argparse.Namespace, report: Any) -> None:
    """The summary and the counts per path; the per-tensor table only with --verbose or --report."""
    from ._io import atomic_output_file

    print(report.summary())
    print(report.breakdown())
    if args.report is not None:
        text = f"# ia3fuse fold\n\n{report.summary()}\n\n{report.breakdown()}\n\n{report.table(max_width=None)}\n"
        with atomic_output_file(Path(args.report), overwrite=args.force) as tmp:
            tmp.write_text(text, encoding="utf-8")
        print(f"wrote the per-tensor table to {args.report}")
    if args.verbose:
        print(report.table())
    elif args.report is None:
        print("(per-tensor table: --verbose, or --report FILE for a markdown file)")


def _cmd_fold_gguf(args: argparse.Namespace) -> int:
    from .adapter import load_adapter
    from .errors import FoldError
    from .folding.gguf import fold_gguf

    wrong = [f for f, v in (("--dtype", args.dtype), ("--max-shard-size", args.max_shard_size)) if v is not None]
    if wrong:
        raise FoldError(
            f"{', '.join(wrong)} appl{'y' if len(wrong) > 1 else 'ies'} to --base only; a GGUF fold keeps every tensor's type"
        )
    _check_report_path(args, args.gguf)
    adapter = load_adapter(args.adapter, allow_pickle=args.allow_pickle)
    permute = {None: None, "auto": None, "yes": True, "no": False}[args.permute_qk]
    report = fold_gguf(
        args.gguf,
        adapter,
        args.output,
        exact=args.exact or "auto",
        permute_qk=permute,
        measure_error=True if args.measure_error else "lossy",
        overwrite=args.force,
        progress=not args.no_progress,
        extras=args.extras,
    )
    _print_fold(args, report)
    return 0


def _cmd_search(args: argparse.Namespace, param_names: list[str]) -> int:
    from ._io import check_output_path
    from .search import load_tokenizer, read_records, search_weights
    from .search import load_model as load_search_model

    params = {n: getattr(args, f"param_{n}") for n in param_names if getattr(args, f"param_{n}", None) is not None}
    out = Path(args.output)
    check_output_path(out, [Path(args.model), Path(args.data), *map(Path, args.adapters)], overwrite=args.force)
    records = read_records(args.data)
    classifier = bool(records) and "label" in records[0]
    model = load_search_model(args.model, classifier=classifier)
    tokenizer = load_tokenizer(args.tokenizer or args.model)
    init = None if args.init is None else (args.init[0] if len(args.init) == 1 else args.init)
    result = search_weights(
        model,
        list(args.adapters),
        records,
        tokenizer=tokenizer,
        objective=args.objective,
        granularity=args.granularity,
        optimizer=args.optimizer,
        method=args.method,
        budget=args.budget,
        l1=args.l1,
        bounds=tuple(args.bounds) if args.bounds else None,
        init=init,
        seed=args.seed,
        batch_size=args.batch_size,
        lr=args.lr,
        sigma0=args.sigma0,
        popsize=args.popsize,
        name=args.name,
        progress=not args.no_progress,
        allow_pickle=args.allow_pickle,
        extras=args.extras,
        **({"holdout": args.holdout} if args.method == "auto" else {}),
        **params,
    )
    written = result.save(out, overwrite=args.force)
    from .search.auto import AutoSearchResult

    if isinstance(result, AutoSearchResult):
        print(result.candidates_table())
        print()
        held = result.heldout
        metric = "" if held["metric"] is None else f", metric {100 * held['metric']:.1f}%"
        print(
            f"chosen: {result.method} ({result.granularity}-wise); held-out {result.objective} "
            f"{held['objective']:.6g}{metric} on {held['examples']} examples no choice used"
        )
        if result.layer_note:
            print(result.layer_note)
    print(result.weights_table())
    print(
        f"{result.objective}: {result.initial_objective:.6g} -> {result.final_objective:.6g} "
        f"({result.optimizer}, {result.granularity}-wise) in {result.passes()}"
    )
    extra = ", candidates.md/json/png" if isinstance(result, AutoSearchResult) else ""
    print(f"wrote {written} (adapter/, recipe.yaml, weights.md, weights.png, objective.png, search.json{extra})")
    return 0


def _cmd_studio(args: argparse.Namespace) -> int:
    import tempfile

    from .errors import IA3FuseError
    from .studio.server import StudioServer, require, warn_if_public

    require()  # before loading anything: the one-line install hint
    if args.demo == bool(args.model or args.adapters):
        raise IA3FuseError("pass --demo, or --model DIR with --adapters DIR [DIR ...]")
    if args.model and not args.adapters:
        raise IA3FuseError("--model needs --adapters DIR [DIR ...]")
    if args.adapters and not args.model:
        raise IA3FuseError("--adapters needs --model DIR, the base model they were trained on")
    if not 0 <= args.port <= 65535:
        raise IA3FuseError(f"--port {args.port} is not a port; pass 0 to 65535 (0 picks a free one)")
    from .studio import Studio

    if args.demo:
        from .search import read_records
        from .studio.demo import build_studio_demo

        workdir = Path(args.workdir or tempfile.mkdtemp(prefix="ia3fuse-studio-demo-"))
        base, tokenizer, base_dir, adapter_dirs, data = build_studio_demo(workdir)
        studio = Studio(
            base,
            adapter_dirs,
            tokenizer=tokenizer,
            records=read_records(data),
            base_dir=base_dir,
            title="demo: tiny llama",
        )
        print(f"demo files in {workdir}")
    else:
        studio = Studio.from_dirs(
            args.model, args.adapters, data=args.data, tokenizer_dir=args.tokenizer, extras=args.extras
        )
    warn_if_public(args.host)
    try:
        server = StudioServer(studio, host=args.host, port=args.port)
        url = server.start()
        print(f"ia3fuse studio: {url} (Ctrl-C stops it)", flush=True)
        if args.open:
            import webbrowser

            webbrowser.open(url)
        try:
            server.wait()
        except KeyboardInterrupt:
            print("ia3fuse studio: stopped", file=sys.stderr)
        finally:
            server.stop()
    finally:
        studio.close()
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    print(run_demo(Path(args.workdir), arch=args.arch))
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``ia3fuse`` command; returns the exit status.

    It sets ``HF_HUB_OFFLINE`` (ia3fuse never downloads anything), its own warning printer and
    quieter loggers for dependencies' import-time noise while it runs, and restores all three, so
    calling it from Python leaves the process as it was.
    """
    from ._logs import quiet_dependencies, restore_levels

    offline, hook = os.environ.get("HF_HUB_OFFLINE"), warnings.showwarning
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    levels = quiet_dependencies()
    try:
        return _main(argv)
    except BrokenPipeError:  # the reader went away (`ia3fuse methods | head`): not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes
        return 0
    finally:
        warnings.showwarning = hook
        restore_levels(levels)
        if offline is None:
            os.environ.pop("HF_HUB_OFFLINE", None)


def _main(argv: Optional[Sequence[str]]) -> int:
    parser, param_names = _build_parser()  # imports no torch: --help and usage errors stay fast
    args = parser.parse_args(argv)
    from .errors import IA3FuseError, IA3FuseWarning

    def show(message: Any, category: Any, *rest: Any, **kw: Any) -> None:
        if issubclass(category, IA3FuseWarning):
            print(f"ia3fuse: warning: {message}", file=sys.stderr)
        else:
            shown(message, category, *rest, **kw)

    shown = warnings.showwarning
    warnings.showwarning = show

    try:
        if args.command == "merge":
            return _cmd_merge(args, param_names)
        if args.command == "inspect":
            return _cmd_inspect(args)
        if args.command == "methods":
            return _cmd_methods()
        if args.command == "fold":
            return _cmd_fold(args)
        if args.command == "search":
            return _cmd_search(args, param_names)
        if args.command == "studio":
            return _cmd_studio(args)
        return _cmd_demo(args)
    except IA3FuseError as exc:
        if args.debug:
            raise
        print(f"ia3fuse: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
