"""A full disk mid-write: a clean OutputPathError naming the output and "No space left on
device", no output and no temporary directory left, an existing output kept whole.

The disk fills where each writer really writes: inside safetensors' ``save_file`` (which then
raises its own SafetensorError, as it does on a real full disk), in a Python file's ``write``,
and at the final ``fsync``; each fake writes part of the file first, so a partial file exists
when the error comes. Where the tests run as root and may mount, two tests also fill a real small tmpfs
(elsewhere they skip with the reason).
"""

from __future__ import annotations

import errno
import importlib
import io
import os
import subprocess
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import save as st_bytes
from test_cli import Inputs, leftovers, snapshot
from test_cli import inputs as _cli_inputs  # noqa: F401 (a fixture)

import ia3fuse
from ia3fuse import OutputPathError
from ia3fuse.cli import main as cli_main
from factories import save_tiny_model, tiny_model
from ia3fuse.search import SearchResult

ckpt = importlib.import_module("ia3fuse.folding.safetensors_io")  # where the shards are opened and written
adapter_mod = importlib.import_module("ia3fuse.adapter")

ENOSPC = "No space left on device"
ST_ENOSPC = f"Error while serializing: I/O error: {ENOSPC} (os error 28)"  # safetensors' own wording


@pytest.fixture(scope="module")
def good(_cli_inputs: Inputs) -> Inputs:  # noqa: F811 (the fixture imported above)
    """test_cli's good inputs (adapters a, b, other_base, wide, lora, ...), built once per module."""
    return _cli_inputs


def _full() -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _written(out: Path) -> str:
    return f"writing output {str(out)!r} failed"


class _FillingFile(io.RawIOBase):
    """A binary file that takes ``room`` bytes, writes them, then fails with ENOSPC."""

    def __init__(self, real: Any, room: list[int]) -> None:
        self.real, self.room = real, room

    def write(self, data: Any) -> int:
        data = memoryview(data).cast("B")
        if len(data) > self.room[0]:
            self.real.write(data[: self.room[0]])
            self.real.flush()
            self.room[0] = 0
            raise _full()
        self.room[0] -= len(data)
        return self.real.write(data)

    def tell(self) -> int:
        return self.real.tell()

    def writable(self) -> bool:
        return True

    def close(self) -> None:
        self.real.close()
        super().close()


def _partial_save_file(tensors: dict[str, torch.Tensor], filename: str, metadata: Any = None) -> None:
    """safetensors.torch.save_file on a disk that fills halfway through the file."""
    data = st_bytes(tensors, metadata=metadata)
    Path(filename).write_bytes(data[: len(data) // 2])
    raise SafetensorError(ST_ENOSPC)


@pytest.fixture(scope="module")
def base(good: Inputs, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny llama the ``inputs`` adapters were trained on, saved (model.safetensors ~107 KiB)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return save_tiny_model(tmp_path_factory.mktemp("base") / "base", "llama", 0)


class _Kept:
    """The folder that receives the output, before the write; `check` says nothing new is left."""

    def __init__(self, out: Path, *roots: Path) -> None:
        self.out, self.roots = out, roots
        self.before = [snapshot(r) for r in roots]

    def check(self) -> None:
        assert [snapshot(r) for r in self.roots] == self.before
        assert leftovers(self.out.parent, self.out.name) == []


def _fused(good: Inputs) -> ia3fuse.IA3Adapter:
    return ia3fuse.merge([good.a, good.b], [0.3, 0.7])


# --- IA3Adapter.save (what `ia3fuse merge` writes) -----------------------------------------------


def test_safetensors_filling_the_disk(good: Inputs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fused, out = _fused(good), tmp_path / "OUT"
    kept = _Kept(out, tmp_path, good.root)
    monkeypatch.setattr(adapter_mod, "save_file", _partial_save_file)
    with pytest.raises(OutputPathError) as caught:
        fused.save(out)
    assert str(caught.value) == f"{_written(out)} ({ST_ENOSPC}); nothing was written"
    kept.check()


def test_a_python_write_filling_the_disk(good: Inputs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fused, out = _fused(good), tmp_path / "OUT"
    kept = _Kept(out, tmp_path, good.root)
    real_write_text = Path.write_text

    def write_text(self: Path, data: str, *args: Any, **kwargs: Any) -> int:
        if self.name == "README.md":  # the last file: the other two are complete by now
            real_write_text(self, data[: len(data) // 2])
            raise _full()
        return real_write_text(self, data, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", write_text)
    with pytest.raises(OutputPathError) as caught:
        fused.save(out)
    assert str(caught.value) == f"{_written(out)} ({ENOSPC}); nothing was written"
    kept.check()


def test_fsync_filling_the_disk(good: Inputs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Delayed allocation can report a full disk only at fsync, after every write succeeded."""
    fused, out = _fused(good), tmp_path / "OUT"
    kept = _Kept(out, tmp_path, good.root)
    calls = []

    def fsync(fd: int) -> None:
        calls.append(fd)
        if len(calls) == 2:
            raise _full()

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(OutputPathError) as caught:
        fused.save(out)
    assert str(caught.value) == f"{_written(out)} ({ENOSPC}); nothing was written"
    assert len(calls) == 2
    kept.check()


def test_overwrite_keeps_the_old_output_whole(good: Inputs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "OUT"
    ia3fuse.load_adapter(good.a).save(out)
    kept = _Kept(out, tmp_path, good.root)
    monkeypatch.setattr(adapter_mod, "save_file", _partial_save_file)
    with pytest.raises(OutputPathError, match=ENOSPC):
        _fused(good).save(out, overwrite=True)
    kept.check()  # the old OUT is byte for byte what it was


# --- the other writers -------------------------------------------------------------------------


def _search_result(good: Inputs) -> SearchResult:
    fused = _fused(good)
    return SearchResult(
        weights=torch.tensor([[0.3], [0.7]]),
        names=["a", "b"],
        groups=["all"],
        granularity="task",
        method="task_arithmetic",
        params={"lam": 1.0},
        objective="loss",
        optimizer="adam",
        schedule=[0.3, 0.7],
        adapter=fused,
        history=[{"forwards": 0.0, "objective": 1.0}],
        forwards=0,
        initial_objective=1.0,
        final_objective=1.0,
        sources=[str(good.a), str(good.b)],
    )


def _mixture(good: Inputs) -> ia3fuse.Mixture:
    return ia3fuse.Mixture(tiny_model("llama", seed=0), {"a": good.a, "b": good.b})


@pytest.mark.parametrize("writer", ["search_result", "mixture"])
def test_nested_adapter_writes_name_the_real_output(
    writer: str, good: Inputs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SearchResult and Mixture write adapters inside their own output: the error names that output."""
    obj = _search_result(good) if writer == "search_result" else _mixture(good)
    out = tmp_path / "OUT"
    # The unpatched write works (so the failure below is the disk's).
    saved = obj.save(tmp_path / "GOOD", plots=False) if writer == "search_result" else obj.save(tmp_path / "GOOD")
    assert (saved / ("adapter" if writer == "search_result" else "adapters/1") / "adapter_model.safetensors").is_file()
    kept = _Kept(out, tmp_path, good.root)
    monkeypatch.setattr(adapter_mod, "save_file", _partial_save_file)
    with pytest.raises(OutputPathError) as caught:
        obj.save(out, plots=False) if writer == "search_result" else obj.save(out)
    assert str(caught.value) == f"{_written(out)} ({ST_ENOSPC}); nothing was written"
    kept.check()


def test_fold_checkpoint_streaming_write(
    good: Inputs, base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "OUT"
    kept = _Kept(out, tmp_path, good.root, base)
    room = [50_000]  # the shard is ~107 KiB: the header and some tensors fit, then the disk is full
    opened = []

    def fake_open(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        real = open(file, mode, *args, **kwargs)  # noqa: SIM115 (the caller's `with` closes it)
        if "w" not in mode:
            return real
        opened.append(Path(file).name)
        return _FillingFile(real, room)

    monkeypatch.setattr(ckpt, "open", fake_open, raising=False)
    with pytest.raises(OutputPathError) as caught:
        ia3fuse.fold_checkpoint(base, good.a, out, progress=False)
    assert str(caught.value) == f"{_written(out)} ({ENOSPC}); nothing was written"
    assert opened == ["model.safetensors"] and room == [0]
    kept.check()


# --- the command line --------------------------------------------------------------------------


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> Callable[..., tuple[int, str, str]]:
    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)  # main replaces it; restore after

    def run(*argv: object) -> tuple[int, str, str]:
        capsys.readouterr()
        status = cli_main([str(a) for a in argv])
        out, err = capsys.readouterr()
        return status, out, err

    return run


def test_cli_merge_on_a_full_disk(
    good: Inputs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cli: Callable[..., tuple[int, str, str]]
) -> None:
    out = tmp_path / "OUT"
    kept = _Kept(out, tmp_path, good.root)
    monkeypatch.setattr(adapter_mod, "save_file", _partial_save_file)
    status, stdout, stderr = cli("merge", good.a, good.b, "--method", "ties", "-o", out)
    assert (status, stdout) == (2, "")
    assert stderr == f"ia3fuse: error: {_written(out)} ({ST_ENOSPC}); nothing was written\n"
    kept.check()


# --- a real full disk (a 64 KiB tmpfs) -----------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 64 KiB tmpfs, or a skip where mounting is not allowed (not root, no CAP_SYS_ADMIN in a
    container). Each mount command has a time limit, so a stuck mount skips or unmounts lazily
    instead of hanging the run."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "small"
    mnt.mkdir()
    try:
        res = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)],
            capture_output=True,
            text=True,
            check=False,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"cannot mount a tmpfs here: {exc}")
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.strip()}")
    try:
        yield mnt
    finally:
        try:
            done = subprocess.run(["umount", str(mnt)], capture_output=True, check=False, timeout=30).returncode == 0
        except subprocess.TimeoutExpired:
            done = False
        if not done:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True, check=False, timeout=30)


def _fill(disk: Path, leave: int) -> None:
    """Fill ``disk`` up to ``leave`` free bytes."""
    stat = os.statvfs(disk)
    (disk / "filler").write_bytes(b"\0" * (stat.f_bavail * stat.f_frsize - leave))


def test_real_full_disk_cli_merge(good: Inputs, small_disk: Path, cli: Callable[..., tuple[int, str, str]]) -> None:
    _fill(small_disk, 4096)  # one page: adapter_config.json fits, the safetensors file does not
    out = small_disk / "OUT"
    kept = _Kept(out, small_disk, good.root)
    status, stdout, stderr = cli("merge", good.a, good.b, "-o", out)
    assert (status, stdout) == (2, "")
    assert stderr.startswith(f"ia3fuse: error: {_written(out)} (") and ENOSPC in stderr
    assert stderr.endswith("); nothing was written\n") and stderr.count("\n") == 1
    kept.check()
    assert os.listdir(small_disk) == ["filler"]


def test_real_full_disk_fold_checkpoint(good: Inputs, base: Path, small_disk: Path) -> None:
    out = small_disk / "OUT"  # the ~107 KiB shard cannot fit in 64 KiB
    kept = _Kept(out, small_disk, good.root, base)
    with pytest.raises(OutputPathError) as caught:
        ia3fuse.fold_checkpoint(base, good.a, out, progress=False)
    assert str(caught.value) == f"{_written(out)} ({ENOSPC}); nothing was written"
    kept.check()
    assert os.listdir(small_disk) == []
