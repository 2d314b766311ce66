"""File plumbing: atomic output directories, path checks. No math here."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, Sequence

from .errors import OutputPathError

__all__ = ["atomic_output_dir", "check_output_path"]


def check_output_path(out: Path, inputs: Sequence[Path] = (), *, overwrite: bool = False) -> Path:
    """Refuse an output that exists (unless ``overwrite``), is a symlink, is an input or lies inside one.

    Returns:
        The absolute output path.
    """
    out = Path(out)
    if out.is_symlink():
        raise OutputPathError(f"output {str(out)!r} is a symbolic link; pass a real directory path")
    resolved = out.resolve()
    for inp in inputs:
        inp_r = Path(inp).resolve()
        if resolved == inp_r:
            raise OutputPathError(
                f"output {str(out)!r} is also an input; pass a different output directory so the input is kept"
            )
        if inp_r in resolved.parents:
            raise OutputPathError(
                f"output {str(out)!r} lies inside the input {str(inp)!r}; pass a directory outside every input"
            )
        if resolved in inp_r.parents:
            raise OutputPathError(
                f"output {str(out)!r} contains the input {str(inp)!r}, which writing it would delete; "
                "pass a directory that holds no input"
            )
    if not resolved.parent.is_dir():
        raise OutputPathError(
            f"the folder {str(resolved.parent)!r} of output {str(out)!r} does not exist or is not a directory; create it first"
        )
    if out.exists() and not overwrite:
        raise OutputPathError(
            f"output {str(out)!r} already exists; pass another path, or overwrite=True (--force on the command line)"
        )
    if out.exists() and not out.is_dir():
        raise OutputPathError(f"output {str(out)!r} exists and is not a directory; pass a directory path")
    return resolved


@contextlib.contextmanager
def atomic_output_dir(out: Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success rename it to ``out``, on error remove it.

    An existing ``out`` (with ``overwrite``) is moved aside first and deleted only after the
    new directory is in place, so a crash never leaves neither.
    """
    out = Path(out).absolute()
    parent = out.parent
    if not parent.is_dir():
        raise OutputPathError(
            f"the folder {str(parent)!r} of output {str(out)!r} does not exist; create it first"
        )
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=parent))
    except OSError as exc:
        raise OutputPathError(f"cannot write output {str(out)!r} ({exc.strerror or exc}); pick a writable folder") from None
    try:
        try:
            yield tmp
        except OSError as exc:
            raise OutputPathError(
                f"writing output {str(out)!r} failed ({exc.strerror or exc}); nothing was written"
            ) from exc
        for root, _dirs, files in os.walk(tmp):
            for name in files:
                with open(os.path.join(root, name), "rb") as fh:
                    os.fsync(fh.fileno())
        if out.exists():
            if not overwrite:
                raise OutputPathError(f"output {str(out)!r} appeared while writing; pass another path")
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=parent))
            os.rename(out, old / "x")
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
