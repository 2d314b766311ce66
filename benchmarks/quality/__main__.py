"""``python -m benchmarks.quality``: run the multi-task quality suites, or rewrite docs/benchmarks.md.

Run from the repository root (the ``benchmarks`` folder must be importable) with the dev extra
installed (``pip install -e ".[dev]"``)::

    python -m benchmarks.quality run --quick           # both suites, small: a few minutes on 2 cores
    python -m benchmarks.quality run --suite causal    # one suite, full size; trained models are cached
    python -m benchmarks.quality report                # docs/benchmarks.md from benchmarks/results/
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

ROOT = Path(__file__).resolve().parents[2]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.quality",
        description="Run the multi-task quality suites, or rewrite docs/benchmarks.md.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    qp = sub.add_parser("run", help="fuse each suite's task adapters with every method and score every task")
    qp.add_argument("--suite", choices=["encoder", "causal", "all"], default="all", help="which suite (default all)")
    qp.add_argument("--quick", action="store_true", help="small data and training: a few minutes on 2 cores")
    qp.add_argument("--cache", default=None, help="folder for trained models (default ~/.cache/ia3fuse/bench)")
    qp.add_argument(
        "--out",
        default=str(ROOT / "benchmarks" / "results"),
        help="folder for the JSON, markdown and PNG results (default benchmarks/results)",
    )
    qp.add_argument("--seed", type=int, default=0, help="data and training seed")
    qp.add_argument("--methods", nargs="+", default=None, help="only these fusion methods")
    qp.add_argument("--no-progress", action="store_true", help="no progress bars")
    qp.add_argument("--no-search", action="store_true", help="skip the weight-search and router rows")
    rp = sub.add_parser("report", help="rewrite docs/benchmarks.md from benchmarks/results/")
    rp.add_argument(
        "--results",
        default=str(ROOT / "benchmarks" / "results"),
        help="folder of the results (default benchmarks/results)",
    )
    rp.add_argument(
        "-o",
        "--output",
        default=str(ROOT / "docs" / "benchmarks.md"),
        help="the page to write (default docs/benchmarks.md)",
    )
    return parser


def _run(args: argparse.Namespace) -> None:
    from . import SUITES, get_suite
    from .report import quality_markdown, write_quality
    from .runner import run_quality

    default_cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ia3fuse" / "bench"
    cache = Path(args.cache) if args.cache else default_cache
    names = list(SUITES) if args.suite == "all" else [args.suite]
    for name in names:
        result = run_quality(
            get_suite(name),
            cache=cache,
            quick=args.quick,
            seed=args.seed,
            progress=not args.no_progress,
            methods=args.methods,
            search=not args.no_search,
        )
        paths = write_quality(result, Path(args.out))
        print(quality_markdown(result))
        print("wrote " + ", ".join(str(p) for p in paths))


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Parse ``argv``, run the command; user errors exit with status 2 and one line."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded
    args = _parser().parse_args(argv)
    from ia3fuse.errors import IA3FuseError

    try:
        if args.command == "report":
            from .report import write_benchmarks_doc

            print(f"wrote {write_benchmarks_doc(Path(args.results), Path(args.output))}")
        else:
            _run(args)
    except IA3FuseError as exc:
        print(f"benchmarks.quality: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
