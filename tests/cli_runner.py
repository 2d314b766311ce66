"""Run the ``ia3fuse`` command in tests: in-process by default, or through the real entry point.

A subprocess costs a torch import (~1.5-3 s on two cores), so most CLI tests call
``ia3fuse.cli.main`` in this process, with the working directory, stdout/stderr, the warning
hooks and ``HF_HUB_OFFLINE`` as a fresh process would have them, and restore all of it after.
``real=True`` runs the installed console script in a subprocess: the fast tier keeps a few such
smoke tests, and each parametrized CLI matrix repeats itself that way under ``slow``.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import traceback
import warnings
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Optional

import pytest

_SCRIPT = Path(sys.executable).parent / "ia3fuse"
CLI = [str(_SCRIPT)] if _SCRIPT.is_file() else [sys.executable, "-m", "ia3fuse.cli"]

# The two ways a CLI matrix runs: in-process always, the real entry point in the full suite only.
RUNNERS = ["in-process", pytest.param("subprocess", marks=pytest.mark.slow)]


def run_cli(*args: object, cwd: Optional[Path] = None, real: bool = False) -> subprocess.CompletedProcess[str]:
    """``ia3fuse ARGS`` as (returncode, stdout, stderr); ``real=True`` runs the console script."""
    argv = [str(a) for a in args]
    if real:
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        return subprocess.run([*CLI, *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    from ia3fuse.cli import main

    out, err = io.StringIO(), io.StringIO()
    here, offline, hook = os.getcwd(), os.environ.get("HF_HUB_OFFLINE"), warnings.showwarning
    try:
        os.environ["HF_HUB_OFFLINE"] = "1"
        if cwd is not None:
            os.chdir(cwd)
        with warnings.catch_warnings(), redirect_stdout(out), redirect_stderr(err):
            warnings.resetwarnings()  # a fresh interpreter's filters, not pytest's
            for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
                warnings.simplefilter("ignore", category)
            try:
                status = main(argv)
            except SystemExit as exc:  # argparse: usage errors and --help
                status = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            except Exception:  # what the interpreter would print for an uncaught error (--debug)
                traceback.print_exc()
                status = 1
    finally:
        os.chdir(here)
        warnings.showwarning = hook
        if offline is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = offline
    return subprocess.CompletedProcess(argv, status, out.getvalue(), err.getvalue())
