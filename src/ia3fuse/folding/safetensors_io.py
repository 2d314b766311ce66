"""Safetensors I/O for the streaming checkpoint fold: read the input shards' headers, write the
output shards by hand (every header computed first, then the tensors streamed one at a time, so
memory stays bounded by the largest tensor). No decisions here: a `_Job` says what to write."""

from __future__ import annotations

import errno
import json
import os
import re
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Iterator, Optional, Union

import torch
from torch import Tensor

from ..errors import FoldError
from .math import scale_bias, scale_weight

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# safetensors dtype code -> torch dtype (the ones torch can hold)
_ST_TO_TORCH: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "U16": torch.uint16,
    "U32": torch.uint32,
    "U64": torch.uint64,
}
_TORCH_TO_ST = {v: k for k, v in _ST_TO_TORCH.items()}
_CASTABLE = {"F64", "F32", "F16", "BF16"}  # what ``dtype=`` converts; integers, bools and fp8 stay as stored
_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}
_COPY_CHUNK = 64 * 2**20


@dataclass
class _Source:
    """One tensor of the input checkpoint, as its file's header describes it."""

    name: str
    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte offset of its data in ``file``
    nbytes: int


@dataclass
class _Scale:
    rows: Optional[Tensor]
    cols: Optional[Tensor]
    bias: bool
    transposed: bool
    groups: int
    modules: tuple[str, ...]
    # a quantized module's statistic: the tensor viewed as ``view``, its rows along ``axis``
    view: Optional[tuple[int, ...]] = None
    axis: int = 0


@dataclass
class _Job:
    """One tensor of the output: where it comes from and what happens to it."""

    src: _Source
    dtype: str
    nbytes: int
    scale: Optional[_Scale] = None
    shard: int = 0
    trained: Optional[Tensor] = None  # the adapter's trained copy (modules_to_save) written instead
    replace: Optional[Tensor] = None  # a new tensor (its own dtype and shape) written instead, then scaled

    @property
    def raw(self) -> bool:
        """Copied byte for byte (never decoded)."""
        return self.scale is None and self.trained is None and self.replace is None and self.dtype == self.src.dtype

    @property
    def shape(self) -> tuple[int, ...]:
        return self.src.shape if self.replace is None else tuple(self.replace.shape)


def _read_header(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) != 8:
                raise ValueError("the file is shorter than a safetensors header")
            (n,) = struct.unpack("<Q", head)
            if n > 100 * 2**20:
                raise ValueError(f"its header claims {n} bytes")
            header = json.loads(fh.read(n))
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise FoldError(f"{str(path)!r} is not a readable safetensors file ({exc}); re-save the checkpoint") from None
    if not isinstance(header, dict):
        raise FoldError(f"{str(path)!r} is not a readable safetensors file (its header is not a JSON object)")
    header.pop("__metadata__", None)
    header["__data_start__"] = 8 + n
    return header


def _checkpoint_files(base: Path) -> list[Path]:
    if not base.is_dir():
        what = "does not exist" if not base.exists() else "is not a directory"
        raise FoldError(f"base model path {str(base)!r} {what}; pass a Hugging Face model directory")
    index = base / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            names = sorted(set(weight_map.values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise FoldError(
                f"{str(index)!r} is not a safetensors index (no 'weight_map': {exc!r}); re-save the checkpoint"
            ) from None
        missing = [n for n in names if not (base / n).is_file()]
        if missing:
            raise FoldError(
                f"{str(index)!r} lists {missing[0]!r}, which {str(base)!r} lacks; the download is incomplete"
            )
        return [base / n for n in names]
    if (base / SINGLE_FILE).is_file():
        return [base / SINGLE_FILE]
    found = sorted(p.name for p in base.iterdir() if p.suffix in (".bin", ".safetensors", ".pt", ".h5", ".msgpack"))
    hint = f" (found {', '.join(found[:3])})" if found else ""
    raise FoldError(
        f"{str(base)!r} has no {SINGLE_FILE} nor {INDEX_FILE}{hint}; the streaming fold reads safetensors "
        "checkpoints: re-save the model with save_pretrained(safe_serialization=True)"
    )


def _sources(files: list[Path]) -> list[_Source]:
    from safetensors import safe_open

    out: list[_Source] = []
    seen: dict[str, Path] = {}
    for path in files:
        header = _read_header(path)
        data_start = header.pop("__data_start__")
        try:  # let safetensors itself validate offsets and sizes before anything is written
            with safe_open(str(path), framework="pt") as handle:
                keys = set(handle.keys())
        except Exception as exc:  # safetensors raises its own error type and others
            raise FoldError(
                f"{str(path)!r} is not a readable safetensors file ({exc}); re-save the checkpoint"
            ) from None
        entries = []
        for name, info in header.items():
            if name not in keys:
                raise FoldError(f"{str(path)!r}: tensor {name!r} is in the header but unreadable")
            if name in seen:
                raise FoldError(
                    f"tensor {name!r} is in both {seen[name].name!r} and {path.name!r}; the checkpoint is corrupt"
                )
            seen[name] = path
            start, end = info["data_offsets"]
            entries.append(_Source(name, path, info["dtype"], tuple(info["shape"]), data_start + start, end - start))
        out.extend(sorted(entries, key=lambda s: s.start))  # file order: sequential reads
    return out


def _parse_size(size: Union[int, str]) -> int:
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    elif isinstance(size, str):
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", size)
        unit = m.group(2).upper() if m else None
        if m is None or unit not in _UNITS:
            raise FoldError(
                f"max_shard_size={size!r} is not a size; pass bytes, or a number with a unit such as '5GB' or '500MiB'"
            )
        value = int(float(m.group(1)) * _UNITS[unit])
    else:
        raise FoldError(f"max_shard_size is a {type(size).__name__}; pass bytes (int) or a string such as '5GB'")
    if value <= 0:
        raise FoldError(f"max_shard_size={size!r} is not positive; pass a size such as '5GB'")
    return value


def _shard_names(n: int) -> list[str]:
    return [SINGLE_FILE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def _header(jobs: list[_Job]) -> bytes:
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for job in jobs:
        header[job.src.name] = {
            "dtype": job.dtype,
            "shape": list(job.shape),
            "data_offsets": [offset, offset + job.nbytes],
        }
        offset += job.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors pads the header so the data starts 8-aligned
    return struct.pack("<Q", len(raw)) + raw


def scale_stat(stat: Tensor, rows: Tensor, view: tuple[int, ...], axis: int) -> Tensor:
    """A quantized module's per-row statistic times its row scale, in float32 (stored shape)."""
    new = stat.to(torch.float32, copy=True).reshape(view)
    shape = [1] * new.dim()
    shape[axis] = -1
    return new.mul_(rows.to(torch.float32).reshape(shape)).reshape(stat.shape)


def _read_tensor_at(src: _Source) -> Tensor:
    """One (small) tensor of the checkpoint, read on its own."""
    from safetensors import safe_open

    with safe_open(str(src.file), framework="pt") as handle:
        return handle.get_tensor(src.name)


def _read_tensor(handle: Any, name: str) -> Tensor:
    """One tensor of an open input shard (the only place input tensors are decoded)."""
    return handle.get_tensor(name)


def _write_bytes(out: BinaryIO, tensor: Tensor) -> None:
    out.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().data)


# copy_file_range errors that mean "not here" (other file systems, kernels, special files)
_NO_KERNEL_COPY = {errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EBADF, errno.ENOTSUP}


def _fds(src: BinaryIO, out: BinaryIO) -> Optional[tuple[int, int]]:
    """Both files' descriptors, or None when either is not a plain OS file."""
    try:
        return src.fileno(), out.fileno()
    except (OSError, ValueError):  # io.UnsupportedOperation: a file-like object without a descriptor
        return None


def _copy_range(src: BinaryIO, out: BinaryIO, start: int, nbytes: int) -> None:
    """Copy ``nbytes`` of ``src`` from ``start`` to the end of ``out``: in the kernel where it can
    (``copy_file_range``: no trip through user space, a reflink where the file system shares
    extents), else through a buffer."""
    fds = _fds(src, out) if nbytes and hasattr(os, "copy_file_range") else None
    if fds is not None:
        out.flush()
        pos, done = out.tell(), 0
        try:
            while done < nbytes:
                n = os.copy_file_range(fds[0], fds[1], nbytes - done, start + done, pos + done)
                if n == 0:
                    raise FoldError(f"{src.name!r} ended early; the checkpoint is truncated")
                done += n
        except OSError as exc:  # not supported between these files: copy the rest through user space
            if exc.errno not in _NO_KERNEL_COPY:
                raise
        out.seek(pos + done)
        start, nbytes = start + done, nbytes - done
        if not nbytes:
            return
    src.seek(start)
    left = nbytes
    while left:
        chunk = src.read(min(left, _COPY_CHUNK))
        if not chunk:
            raise FoldError(f"{src.name!r} ended early; the checkpoint is truncated")
        out.write(chunk)
        left -= len(chunk)


def _write_tensor(out: BinaryIO, job: _Job, raw: BinaryIO, handle: Any) -> None:
    """Write one output tensor: a byte copy, or decode -> scale/cast -> encode."""
    if job.raw:
        _copy_range(raw, out, job.src.start, job.nbytes)
        return
    dtype = _ST_TO_TORCH[job.dtype]
    if job.trained is not None:
        _write_bytes(out, job.trained.to(dtype).contiguous())
        return
    tensor = _read_tensor(handle, job.src.name) if job.replace is None else job.replace
    s = job.scale
    if s is None:
        tensor = tensor.to(dtype)
    elif s.view is not None:
        assert s.rows is not None  # a statistic only takes row scales
        tensor = scale_stat(tensor, s.rows, s.view, s.axis).to(dtype)
        if not bool(torch.isfinite(tensor).all()):
            raise FoldError(
                f"{job.src.name!r} overflows {str(dtype).removeprefix('torch.')} once scaled (largest |l| "
                f"{float(s.rows.abs().max()):.3g}); this adapter cannot be folded into this checkpoint: keep it "
                "unmerged (PEFT or ia3fuse.Mixture)"
            )
    elif s.bias:
        assert s.rows is not None  # a bias only takes row scales
        tensor = scale_bias(tensor, s.rows).to(dtype)
    else:
        tensor = scale_weight(tensor, s.rows, s.cols, transposed=s.transposed, groups=s.groups).to(dtype)
    _write_bytes(out, tensor)


class _Inputs:
    """The open handles of one input shard at a time (inputs are read in file order)."""

    def __init__(self) -> None:
        self.path: Optional[Path] = None
        self.raw: Optional[BinaryIO] = None
        self.handle: Any = None
        self._ctx: Any = None

    def get(self, path: Path) -> tuple[BinaryIO, Any]:
        from safetensors import safe_open

        if path != self.path:
            self.close()
            self.raw = open(path, "rb")
            self._ctx = safe_open(str(path), framework="pt")
            self.handle = self._ctx.__enter__()
            self.path = path
        assert self.raw is not None  # opened with self.path
        return self.raw, self.handle

    def close(self) -> None:
        if self.raw is not None:
            self.raw.close()
        if self._ctx is not None:
            self._ctx.__exit__(None, None, None)
        self.path = self.raw = self.handle = self._ctx = None


def _write_shards(tmp: Path, jobs: list[_Job], n_shards: int, progress: bool) -> None:
    from tqdm.auto import tqdm

    names = _shard_names(n_shards)
    inputs = _Inputs()
    bar = tqdm(total=len(jobs), desc="ia3fuse fold", unit="tensor", disable=not progress, file=sys.stderr)
    try:
        for shard, name in enumerate(names):
            part = [j for j in jobs if j.shard == shard]
            header = _header(part)
            with open(tmp / name, "wb") as out:
                out.write(header)
                for job in part:
                    raw, handle = inputs.get(job.src.file)
                    _write_tensor(out, job, raw, handle)
                    bar.update(1)
                end = out.tell()
            want = len(header) + sum(j.nbytes for j in part)
            if end != want:  # a bug, never a user error: refuse to leave a corrupt file
                raise FoldError(f"internal error: {name} has {end} bytes, its header says {want}; nothing was written")
    finally:
        inputs.close()
        bar.close()


def _assign_shards(jobs: list[_Job], max_bytes: int) -> int:
    """Greedy, in order, as transformers does: a tensor larger than the limit gets a shard alone."""
    shard, size = 0, 0
    for i, job in enumerate(jobs):
        if i and size + job.nbytes > max_bytes:
            shard, size = shard + 1, 0
        job.shard = shard
        size += job.nbytes
    return shard + 1 if jobs else 1


def _iter_jobs(
    sources: list[_Source],
    scales: dict[str, _Scale],
    dtype: Optional[torch.dtype],
    keep: Optional[re.Pattern[str]],
    replaced: Optional[dict[str, Optional[Tensor]]] = None,
) -> Iterator[_Job]:
    replaced = replaced or {}
    for src in sources:
        if src.name in replaced:
            new = replaced[src.name]
            if new is not None:  # None: the tensor is dropped
                st = _TORCH_TO_ST[new.dtype]
                yield _Job(src, st, new.numel() * new.element_size(), scales.get(src.name), replace=new)
            continue
        out = src.dtype
        if dtype is not None and src.dtype in _CASTABLE and not (keep is not None and keep.search(src.name)):
            out = _TORCH_TO_ST[dtype]
        if out == src.dtype:
            nbytes = src.nbytes
        else:
            nbytes = _numel(src.shape) * _ST_TO_TORCH[out].itemsize
        yield _Job(src, out, nbytes, scales.get(src.name))


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
