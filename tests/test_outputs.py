"""What every writer leaves on disk: the permissions an ordinary write would give (umask applied,
so a server running as another user can read the output), and missing parent folders created
(as PEFT's save_pretrained and mergekit do), then removed again when the write fails."""

from __future__ import annotations

import errno
import os
import stat
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

import ia3fuse
from cli_runner import run_cli
from ia3fuse import OutputPathError
from factories import random_ia3_adapter, tiny_model


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("outputs")
    model = tiny_model("llama", 0)
    model.save_pretrained(str(root / "base"))
    a = random_ia3_adapter(model, root / "a", seed=1, spread=0.2)
    b = random_ia3_adapter(model, root / "b", seed=2, spread=0.2)
    return {"root": root, "model": model, "base": root / "base", "a": a, "b": b}


@pytest.fixture(params=[0o022, 0o027, 0o077], ids=["umask022", "umask027", "umask077"])
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def modes(root: Path) -> dict[str, int]:
    """Permission bits of ``root`` and of everything under it, by path relative to ``root``."""
    out = {".": stat.S_IMODE(root.stat().st_mode)}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            out[str(p.relative_to(root))] = stat.S_IMODE(p.lstat().st_mode)
    return out


def _gguf(world: dict[str, Any], out: Path) -> Path:
    pytest.importorskip("gguf")
    import gguf_files as gf

    src = world["root"] / "base.gguf"
    if not src.exists():
        gf.convert(world["model"], src, model_type="llama")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ia3fuse.fold_gguf(src, world["a"], out, progress=False)
    return out


WRITERS: dict[str, Callable[[dict[str, Any], Path], Any]] = {
    "merge": lambda w, out: ia3fuse.merge([w["a"], w["b"]]).save(out),
    "fold_checkpoint": lambda w, out: ia3fuse.fold_checkpoint(w["base"], w["a"], out, progress=False),
    "mixture": lambda w, out: ia3fuse.Mixture(tiny_model("llama", 0), {"a": w["a"], "b": w["b"]}).save(out),
    "fold_gguf": _gguf,
}


@pytest.mark.parametrize("writer", list(WRITERS))
def test_outputs_get_the_umask_modes_of_an_ordinary_write(
    world: dict[str, Any], tmp_path: Path, umask: int, writer: str
) -> None:
    out = tmp_path / ("OUT.gguf" if writer == "fold_gguf" else "OUT")
    WRITERS[writer](world, out)
    got = modes(out)
    assert len(got) > (0 if writer == "fold_gguf" else 2)
    for rel, mode in got.items():
        is_dir = (out / rel).is_dir()
        want = (0o777 if is_dir else 0o666) & ~umask
        assert mode == want, (rel, oct(mode), oct(want))


@pytest.mark.parametrize("writer", list(WRITERS))
def test_missing_parent_folders_are_created(world: dict[str, Any], tmp_path: Path, writer: str) -> None:
    out = tmp_path / "new" / "deeper" / ("OUT.gguf" if writer == "fold_gguf" else "OUT")
    WRITERS[writer](world, out)
    assert out.exists()
    assert sorted(os.listdir(tmp_path / "new" / "deeper")) == [out.name]  # no temporary left beside it


def test_a_failed_write_removes_the_folders_it_created(
    world: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full_disk(*args: Any, **kwargs: Any) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(ia3fuse.adapter, "_save_safetensors", full_disk)
    out = tmp_path / "new" / "deeper" / "OUT"
    with pytest.raises(OutputPathError, match="No space left on device"):
        ia3fuse.merge([world["a"], world["b"]]).save(out)
    assert os.listdir(tmp_path) == []
    (tmp_path / "new").mkdir()  # a folder that was there before is kept
    with pytest.raises(OutputPathError, match="No space left on device"):
        ia3fuse.merge([world["a"], world["b"]]).save(out)
    assert os.listdir(tmp_path) == ["new"] and os.listdir(tmp_path / "new") == []


def test_a_file_in_the_way_is_refused_by_name(world: dict[str, Any], tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("x")
    out = tmp_path / "afile" / "sub" / "OUT"
    with pytest.raises(OutputPathError) as caught:
        ia3fuse.merge([world["a"], world["b"]]).save(out)
    assert str(caught.value) == (
        f"the folder {str(tmp_path / 'afile')!r} of output {str(out)!r} is not a directory; pass an output path "
        "whose folders are directories (missing ones are created)"
    )
    assert sorted(os.listdir(tmp_path)) == ["afile"]


def test_cli_merge_into_a_missing_folder(world: dict[str, Any], tmp_path: Path) -> None:
    res = run_cli("merge", world["a"], world["b"], "-o", tmp_path / "out" / "x", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "out" / "x" / "adapter_model.safetensors").is_file()
