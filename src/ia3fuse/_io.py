"""File plumbing: atomic output directories, path checks. No math here."""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Iterator, Optional, Sequence

from .errors import OutputPathError

__all__ = ["atomic_output_dir", "atomic_output_file", "check_output_path"]


def check_output_path(out: Path, inputs: Sequence[Path] = (), *, overwrite: bool = False, file: bool = False) -> Path:
    """Refuse an output that exists (unless ``overwrite``), is a symlink, is an input or lies inside one.

    Missing folders above the output are fine: the atomic writers create them (and remove them
    again if the write fails).

    Args:
        file: the output is one file (else a directory).

    Returns:
        The absolute output path.
    """
    out = Path(out)
    what = "file" if file else "directory"
    if out.is_symlink():
        raise OutputPathError(f"output {str(out)!r} is a symbolic link; pass a real {what} path")
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
    blocker = _non_directory_ancestor(resolved)
    if blocker is not None:
        raise OutputPathError(
            f"the folder {str(blocker)!r} of output {str(out)!r} is not a directory; pass an output path "
            "whose folders are directories (missing ones are created)"
        )
    if out.exists() and not overwrite:
        raise OutputPathError(
            f"output {str(out)!r} already exists; pass another path, or overwrite=True (--force on the command line)"
        )
    if out.exists() and file and out.is_dir():
        raise OutputPathError(f"output {str(out)!r} exists and is a directory; pass a file path")
    if out.exists() and not file and not out.is_dir():
        raise OutputPathError(f"output {str(out)!r} exists and is not a directory; pass a directory path")
    return resolved


def _non_directory_ancestor(path: Path) -> Optional[Path]:
    """The nearest existing ancestor of ``path`` if it is not a directory, else None."""
    for parent in path.parents:
        if os.path.lexists(parent):
            return None if parent.is_dir() else parent
    return None


def _make_parents(parent: Path, out: Path) -> list[Path]:
    """Create ``parent`` and its missing ancestors (as ``mkdir -p``); return those created, outermost first."""
    missing = []
    for p in (parent, *parent.parents):
        if os.path.lexists(p):
            break
        missing.append(p)
    missing.reverse()
    try:
        for p in missing:
            os.mkdir(p)
    except OSError as exc:
        _remove_created(missing)
        raise OutputPathError(
            f"cannot create the folder {str(parent)!r} of output {str(out)!r} ({exc.strerror or exc}); "
            "pick a writable folder"
        ) from None
    return missing


def _remove_created(created: list[Path]) -> None:
    """Remove folders `_make_parents` created (innermost first) if they are still empty: nothing is left."""
    for p in reversed(created):
        with contextlib.suppress(OSError):
            os.rmdir(p)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _ordinary_mode(path: Path, *, directory: bool) -> None:
    """Give a temporary (created 0700 / 0600) the mode an ordinary mkdir / open would: umask applied,
    so a server running as another user can read the output."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


def _writer_id() -> str:
    """This host and pid namespace, hashed: within both, a pid names one process."""
    try:
        namespace = str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        namespace = ""
    return hashlib.sha256(f"{socket.gethostname()}/{namespace}".encode()).hexdigest()[:8]


def _remove_stale_temps(parent: Path, name: str, *, files: bool = False) -> None:
    """Delete ``.NAME.tmp-<writer>-<pid>-*`` directories (``files``: files) whose writer, on this host,
    is dead (killed): a directory output's temporaries are directories, a file output's are files.

    ``.old-`` siblings are kept: after a kill between the two renames of an overwrite, one
    holds the only complete copy of the output.
    """
    if os.name != "posix":  # os.kill(pid, 0) would terminate the process on Windows
        return
    pattern = re.compile(rf"\.{re.escape(name)}\.tmp-{_writer_id()}-(\d+)-[a-z0-9_]+")
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return
    for entry in entries:
        found = pattern.fullmatch(entry.name)
        if not found or _alive(int(found.group(1))):
            continue
        if not files and entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path, ignore_errors=True)
        elif files and entry.is_file(follow_symlinks=False):
            with contextlib.suppress(OSError):
                os.unlink(entry.path)


def _alive(pid: int) -> bool:
    if pid <= 0:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # it exists, e.g. owned by another user
        return True
    return True


@contextlib.contextmanager
def atomic_output_dir(out: Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success rename it to ``out``, on error remove it.

    An existing ``out`` (with ``overwrite``) is moved aside first and deleted only after the
    new directory is in place; a process killed between those two renames leaves no ``out``,
    its previous copy in ``.NAME.old-*/x``. The temporary sibling is named after this process
    (``.NAME.tmp-<host>-<pid>-*``), so a later write of ``out`` removes one a killed writer left.
    """
    out = Path(out).absolute()
    parent = out.parent
    created = _make_parents(parent, out)
    _remove_stale_temps(parent, out.name)  # left by a writer that was killed (no cleanup ran)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{_writer_id()}-{os.getpid()}-", dir=parent))
        _ordinary_mode(tmp, directory=True)
    except OSError as exc:
        _remove_created(created)
        raise OutputPathError(
            f"cannot write output {str(out)!r} ({exc.strerror or exc}); pick a writable folder"
        ) from None
    try:
        try:
            yield tmp
            for root, dirs, files in os.walk(tmp):  # a full disk may only show here (delayed allocation)
                for name in dirs:
                    _ordinary_mode(Path(root, name), directory=True)
                for name in files:
                    # Some writers (safetensors) create files 0600 whatever the umask.
                    _ordinary_mode(Path(root, name), directory=False)
                    with open(os.path.join(root, name), "rb") as fh:
                        os.fsync(fh.fileno())
        except OSError as exc:
            raise OutputPathError(
                f"writing output {str(out)!r} failed ({exc.strerror or exc}); nothing was written"
            ) from exc
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
        _remove_created(created)
        raise


@contextlib.contextmanager
def atomic_output_file(out: Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling file path; on success fsync it and rename it to ``out``, else remove it.

    The rename replaces an existing ``out`` (with ``overwrite``) in one step, so readers see the old
    file or the new one, never a part. The temporary file is named after this process, as in
    `atomic_output_dir`, so a later write of ``out`` removes one that a killed writer left.
    """
    out = Path(out).absolute()
    parent = out.parent
    created = _make_parents(parent, out)
    _remove_stale_temps(parent, out.name, files=True)
    try:
        fd, name = tempfile.mkstemp(prefix=f".{out.name}.tmp-{_writer_id()}-{os.getpid()}-", dir=parent)
        os.close(fd)
        _ordinary_mode(Path(name), directory=False)
    except OSError as exc:
        _remove_created(created)
        raise OutputPathError(
            f"cannot write output {str(out)!r} ({exc.strerror or exc}); pick a writable folder"
        ) from None
    tmp = Path(name)
    try:
        try:
            yield tmp
            with open(tmp, "rb") as fh:  # a full disk may only show here (delayed allocation)
                os.fsync(fh.fileno())
        except OSError as exc:
            raise OutputPathError(
                f"writing output {str(out)!r} failed ({exc.strerror or exc}); nothing was written"
            ) from exc
        if out.exists() and not overwrite:
            raise OutputPathError(f"output {str(out)!r} appeared while writing; pass another path")
        os.replace(tmp, out)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        _remove_created(created)
        raise
