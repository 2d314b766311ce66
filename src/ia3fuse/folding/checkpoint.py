"""Streaming fold: an IA3 adapter into an on-disk safetensors checkpoint, one tensor at a time.

The model is never materialised. Its skeleton is built from ``config.json`` on the ``meta``
device, only to learn each target module's kind (nn.Linear, GPT-2's Conv1D, Conv2d/3d), size
and tied weights; the decisions are the in-memory fold's for full-precision layers.
The output shards are written by hand: every header is computed from the input headers first,
then the tensors are streamed, so memory stays bounded by the largest tensor.

Layers, as elsewhere: the math is ``fold/math.py`` (shared with the dense backend); the rest is
plumbing (module paths -> checkpoint names) and I/O (safetensors headers, shards, files).
"""

from __future__ import annotations

import json
import re
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Iterator, Optional, Union

import torch
from torch import Tensor, nn

from .._io import atomic_output_dir, check_output_path
from ..adapter import IA3Adapter, load_adapter
from ..errors import FoldError
from .._text import count, format_table, summarize
from .checkpoint_files import CARD_FILE, CONFIG_FILE, copy_files, write_card
from .dense import DenseBackend
from .math import scale_bias, scale_weight
from .misfit import refusal
from .provenance import Provenance

__all__ = ["fold_checkpoint", "CheckpointFoldReport", "ChangedTensor"]

PathLike = Union[str, Path]

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# safetensors dtype code -> torch dtype (the ones torch can hold)
_ST_TO_TORCH: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
}
_TORCH_TO_ST = {v: k for k, v in _ST_TO_TORCH.items()}
_CASTABLE = {"F64", "F32", "F16", "BF16"}  # what ``dtype=`` converts; integers, bools and fp8 stay as stored
_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}
_UNITS = {
    "": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
    "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40,
}
_COPY_CHUNK = 64 * 2**20


# --- math ----------------------------------------------------------------------------------------


# --- report --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChangedTensor:
    """One checkpoint tensor that the fold changed."""

    tensor: str  # its name in the checkpoint
    scaled: str  # "rows", "cols", "rows, cols", or "trained copy" (a modules_to_save tensor written over it)
    modules: tuple[str, ...]  # the IA3 module path(s) of the adapter it carries
    shape: tuple[int, ...]
    dtype: str  # as written


@dataclass
class CheckpointFoldReport:
    """What `fold_checkpoint` wrote."""

    output: Path
    model_type: str
    entries: list[ChangedTensor]
    tensors: int  # tensors written (changed or not)
    shards: int
    total_size: int  # bytes of tensor data
    dtype: Optional[str]  # the requested output dtype, None when every tensor kept its own
    copied_files: list[str] = field(default_factory=list)
    skipped_files: list[str] = field(default_factory=list)

    @property
    def changed(self) -> int:
        """How many tensors the fold changed."""
        return len(self.entries)

    @property
    def modules(self) -> int:
        """How many IA3 modules of the adapter were folded."""
        return len({m for e in self.entries for m in e.modules})

    def summary(self) -> str:
        """One line: where, what changed, how it was written."""
        dtype = f", dtype {self.dtype}" if self.dtype else ""
        return (
            f"wrote {self.output}: folded {count(self.modules, 'IA3 module')} into {self.changed} of {self.tensors} tensors "
            f"({self.model_type}), {self.shards} shard{'s' if self.shards != 1 else ''}, "
            f"{self.total_size / 1e6:.1f} MB{dtype}"
        )

    def table(self, max_width: Optional[int] = 100) -> str:
        """A markdown table of the changed tensors: name, rows/cols, shape, dtype, IA3 module.

        Args:
            max_width: the widest line (the IA3 module cells wrap to fit); None: one line per
                tensor, for a markdown file. The IA3 module column is left out when every tensor
                belongs to the module of the same path (the checkpoint adds or drops no prefix).
        """
        own = all(e.modules == (e.tensor.rsplit(".", 1)[0],) for e in self.entries)
        headers = ["tensor", "scaled", "shape", "dtype"] + ([] if own else ["IA3 module"])
        rows = [
            [e.tensor, e.scaled, "x".join(map(str, e.shape)), e.dtype] + ([] if own else [", ".join(e.modules)])
            for e in self.entries
        ]
        return format_table(headers, rows, max_width=max_width, wrap=(1, 4))

    def breakdown(self) -> str:
        """One line: how many tensors were scaled by rows and by columns (every one exactly)."""
        counts: dict[str, int] = {}
        for e in self.entries:
            counts[e.scaled] = counts.get(e.scaled, 0) + 1
        ordered = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
        shown = ", ".join(
            f"{n} replaced by the adapter's trained copies (modules_to_save)" if k == "trained copy"
            else f"{n} by {k.replace(', ', ' and ')}"
            for k, n in ordered
        ) or "no tensor"
        return f"exact: {shown} (float32 products, rounded once to the output dtype)"

    def to_dict(self) -> dict[str, Any]:
        return {
            "output": str(self.output), "model_type": self.model_type, "tensors": self.tensors, "shards": self.shards,
            "total_size": self.total_size, "dtype": self.dtype, "copied_files": self.copied_files,
            "skipped_files": self.skipped_files,
            "entries": [
                {"tensor": e.tensor, "scaled": e.scaled, "modules": list(e.modules), "shape": list(e.shape),
                 "dtype": e.dtype}
                for e in self.entries
            ],
        }


# --- plumbing: the input checkpoint ---------------------------------------------------------------


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


@dataclass
class _Job:
    """One tensor of the output: where it comes from and what happens to it."""

    src: _Source
    dtype: str
    nbytes: int
    scale: Optional[_Scale] = None
    shard: int = 0
    trained: Optional[Tensor] = None  # the adapter's trained copy (modules_to_save) written instead

    @property
    def raw(self) -> bool:
        """Copied byte for byte (never decoded)."""
        return self.scale is None and self.trained is None and self.dtype == self.src.dtype


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
            raise FoldError(f"{str(index)!r} is not a safetensors index (no 'weight_map': {exc!r}); re-save the checkpoint") from None
        missing = [n for n in names if not (base / n).is_file()]
        if missing:
            raise FoldError(f"{str(index)!r} lists {missing[0]!r}, which {str(base)!r} lacks; the download is incomplete")
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
            raise FoldError(f"{str(path)!r} is not a readable safetensors file ({exc}); re-save the checkpoint") from None
        entries = []
        for name, info in header.items():
            if name not in keys:
                raise FoldError(f"{str(path)!r}: tensor {name!r} is in the header but unreadable")
            if name in seen:
                raise FoldError(f"tensor {name!r} is in both {seen[name].name!r} and {path.name!r}; the checkpoint is corrupt")
            seen[name] = path
            start, end = info["data_offsets"]
            entries.append(_Source(name, path, info["dtype"], tuple(info["shape"]), data_start + start, end - start))
        out.extend(sorted(entries, key=lambda s: s.start))  # file order: sequential reads
    return out


def _read_config(base: Path) -> dict[str, Any]:
    path = base / CONFIG_FILE
    if not path.is_file():
        raise FoldError(f"{str(base)!r} has no {CONFIG_FILE}; pass the directory save_pretrained wrote")
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise FoldError(f"{str(path)!r} is not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise FoldError(f"{str(path)!r} holds a {type(config).__name__}, not a JSON object")
    if config.get("quantization_config"):
        method = config["quantization_config"].get("quant_method", "?") if isinstance(config["quantization_config"], dict) else "?"
        raise FoldError(
            f"{str(base)!r} is a quantized checkpoint ({method}); the streaming fold handles full-precision "
            "checkpoints: load the model and use ia3fuse.fold instead"
        )
    return config


def _skeleton(base: Path) -> nn.Module:
    """The model's modules on the meta device (no memory, no weights), built from config.json."""
    import transformers

    try:
        config = transformers.AutoConfig.from_pretrained(str(base))
    except Exception as exc:  # transformers raises several types for unknown/broken configs
        raise FoldError(f"cannot read the model config in {str(base)!r} ({exc})") from None
    errors = []
    classes = [getattr(transformers, a, None) for a in (getattr(config, "architectures", None) or [])]
    for cls in [c for c in classes if c is not None] + [transformers.AutoModel]:
        try:
            with torch.device("meta"):
                if cls is transformers.AutoModel:
                    return transformers.AutoModel.from_config(config)
                return cls._from_config(config)
        except Exception as exc:  # any failure: try the next class
            errors.append(f"{getattr(cls, '__name__', cls)}: {exc}")
    raise FoldError(
        f"cannot build the model of {str(base)!r} (model type {getattr(config, 'model_type', '?')!r}) from its "
        f"config on the meta device ({'; '.join(errors)}); the streaming fold needs a transformers architecture"
    )


# --- plumbing: adapter module paths -> skeleton modules -> checkpoint tensors ---------------------


def _candidates(path: str, names: Any) -> list[str]:
    """Names equal to ``path``, or that add or drop a prefix to it at a component boundary."""
    if path in names:
        return [path]
    return sorted(n for n in names if n.endswith("." + path) or path.endswith("." + n))


def _rewrite(path: str, name: str) -> str:
    if name == path:
        return "same path"
    if name.endswith("." + path):
        return f"adds prefix {name[: -len(path)]!r}"
    return f"drops prefix {path[: -len(name)]!r}"


def _resolve(paths: list[str], names: Any, what: str) -> tuple[dict[str, str], list[str], list[str]]:
    """Map each path to its unique counterpart in ``names``: (found, absent paths, other problems)."""
    found: dict[str, str] = {}
    absent, problems = [], []
    for p in paths:
        hits = _candidates(p, names)
        if not hits:
            absent.append(p)
        elif len(hits) > 1:
            problems.append(
                f"the adapter's module {p!r} matches {len(hits)} modules of {what} ({', '.join(map(repr, hits[:4]))}); "
                "the match is ambiguous: pass an adapter saved for this model class"
            )
        else:
            found[p] = hits[0]
    rewrites = {_rewrite(p, n) for p, n in found.items()}
    if len(rewrites) > 1:
        shown = "; ".join(f"{p!r} -> {n!r}" for p, n in list(found.items())[:4])
        problems.append(
            f"the adapter's modules map to {what} inconsistently ({', '.join(sorted(rewrites))}: {shown}); "
            "the adapter does not belong to this model"
        )
    return found, absent, problems


def _tied(skeleton: nn.Module) -> dict[str, list[str]]:
    """Parameter name -> the other names that share its tensor (tied weights)."""
    by_id: dict[int, list[str]] = {}
    for name, p in skeleton.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(name)
    return {n: [o for o in names if o != n] for names in by_id.values() if len(names) > 1 for n in names}


def _layout(module: nn.Module) -> tuple[bool, int]:
    """(weight stored (in, out), groups) of a module that the dense backend handles."""
    from transformers.pytorch_utils import Conv1D

    if isinstance(module, Conv1D):
        return True, 1
    return False, int(getattr(module, "groups", 1))


def _plan_trained(extras: dict[str, Tensor], sources: dict[str, _Source]) -> dict[str, Tensor]:
    """Checkpoint tensor name -> the adapter's trained copy (modules_to_save) that replaces it,
    as PEFT's merge_and_unload keeps it; every tensor checked before anything is written."""
    leaves = {k: k.removeprefix("base_model.model.").rpartition(".") for k in extras}
    ckpt = {n.rpartition(".")[0] for n in sources}
    found, absent, problems = _resolve(sorted({owner for owner, _, _ in leaves.values()}), ckpt, "the checkpoint")
    problems += [f"the checkpoint has no module {m!r}" for m in absent]
    out = {}
    for key, (owner, _, leaf) in leaves.items():
        name = f"{found[owner]}.{leaf}" if owner in found else None
        src = sources.get(name) if name else None
        if owner in found and src is None:
            problems.append(f"the checkpoint has no tensor {name!r}")
        elif src is not None and src.shape != tuple(extras[key].shape):
            problems.append(f"{key!r} is {tuple(extras[key].shape)} but the checkpoint's {name!r} is {src.shape}")
        elif src is not None and src.dtype not in _CASTABLE:
            problems.append(f"the checkpoint's {name!r} is {src.dtype}, not a float tensor")
        elif src is not None:
            out[src.name] = extras[key]
    if problems:
        raise FoldError(
            f"the adapter's trained modules (modules_to_save, e.g. a classifier head) do not fit this checkpoint "
            f"({summarize(problems, 3)}); fold into the checkpoint the adapter was trained on, or pass "
            "extras='drop' (--extras drop on the command line) to fold the IA3 vectors only"
        )
    return out


def _plan(
    adapter: IA3Adapter, skeleton: nn.Module, sources: dict[str, _Source]
) -> tuple[dict[str, _Scale], str]:
    """Checkpoint tensor name -> its scale; checks every module before anything is written.

    The decisions are the in-memory fold's for full-precision layers (`DenseBackend`): an
    output-side vector scales its module's rows and bias, a feed-forward one its columns.
    """
    model_type = getattr(getattr(skeleton, "config", None), "model_type", type(skeleton).__name__)
    weighted = {n for n, m in skeleton.named_modules() if isinstance(getattr(m, "weight", None), Tensor)}
    what = f"the model built from config.json ({type(skeleton).__name__}, model type {model_type!r})"
    to_skel, absent, problems = _resolve(list(adapter.vectors), weighted, what)
    tied = _tied(skeleton)
    dense = DenseBackend()
    misfits = []
    for path, vec in adapter.vectors.items():
        if path in absent:
            misfits.append(f"{path!r} (absent)")
            continue
        if path not in to_skel:
            continue
        module = skeleton.get_submodule(to_skel[path])
        if f"{to_skel[path]}.weight" in tied:
            others = ", ".join(map(repr, tied[f"{to_skel[path]}.weight"]))
            problems.append(f"{path!r} has its weight tied to {others}; folding it would change those too")
        elif not dense.handles(module):
            problems.append(
                f"{path!r} is a {type(module).__name__} (model type {model_type!r}); the streaming fold scales "
                "nn.Linear, Conv1D and Conv2d/Conv3d weights"
            )
        else:
            out_f, in_f = dense.features(module)
            want = in_f if adapter.feedforward[path] else out_f
            if vec.numel() != want:
                side = "input" if adapter.feedforward[path] else "output"
                misfits.append(f"{path!r} ({want} {side} features, the adapter's vector {vec.numel()})")
    message = refusal("this checkpoint", misfits=misfits, problems=problems, modules=len(adapter.vectors), where=what,
                      trained_on=adapter.base_model)
    if message:
        raise FoldError(message)

    ckpt_modules = {n[: -len(".weight")] for n in sources if n.endswith(".weight")}
    to_ckpt, absent, problems = _resolve(list(to_skel.values()), ckpt_modules, "the checkpoint's tensors")
    problems = [
        f"the checkpoint has no tensor of {p!r}, which config.json builds; the checkpoint and its config.json disagree"
        for p in absent
    ] + problems
    if problems:
        raise FoldError(refusal("this checkpoint", misfits=[], problems=problems, modules=len(adapter.vectors),
                                where=what, trained_on=None))
    scales: dict[str, _Scale] = {}
    for path, vec in adapter.vectors.items():
        skel = to_skel[path]
        module = skeleton.get_submodule(skel)
        l = vec.detach().reshape(-1).to("cpu", torch.float32)
        rows, cols = (None, l) if adapter.feedforward[path] else (l, None)
        transposed, groups = _layout(module)
        for role in ("weight", "bias"):
            param = getattr(module, role, None)
            key = f"{to_ckpt[skel]}.{role}"
            src = sources.get(key)
            if param is None:
                if src is not None:
                    problems.append(f"the checkpoint holds {key!r} but config.json builds {skel!r} without a bias")
                continue
            if src is None:
                problems.append(f"the checkpoint lacks {key!r}, which config.json's {skel!r} has")
            elif src.shape != tuple(param.shape):
                problems.append(
                    f"the checkpoint's {key!r} has shape {src.shape} but config.json builds {tuple(param.shape)}; "
                    "the checkpoint and its config.json disagree"
                )
            elif src.dtype not in _CASTABLE:
                problems.append(f"the checkpoint's {key!r} is {src.dtype}; the streaming fold scales float tensors only")
            elif role == "weight" or rows is not None:  # an input-side scale leaves the bias alone
                scales[key] = _Scale(rows, cols if role == "weight" else None, role == "bias", transposed, groups, (path,))
    if problems:
        raise FoldError(f"cannot fold the adapter into this checkpoint: {summarize(problems)}")
    return scales, model_type


# --- I/O: output shards -------------------------------------------------------------------------


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


def _parse_dtype(dtype: Union[str, torch.dtype, None]) -> Optional[torch.dtype]:
    if dtype is None:
        return None
    if isinstance(dtype, torch.dtype) and dtype in _DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype.lower().removeprefix("torch.") in _DTYPES:
        return _DTYPES[dtype.lower().removeprefix("torch.")]
    raise FoldError(f"dtype={dtype!r} is not an output dtype; pass 'float32', 'float16', 'bfloat16' or None (keep)")


def _keep_fp32(skeleton: nn.Module, dtype: Optional[torch.dtype]) -> Optional[re.Pattern[str]]:
    """The tensors that transformers would keep in float32 at this dtype (``_keep_in_fp32_modules``)."""
    names = set()
    if dtype == torch.float16:
        names |= set(getattr(skeleton, "_keep_in_fp32_modules", None) or ())
    if dtype in (torch.float16, torch.bfloat16):
        names |= set(getattr(skeleton, "_keep_in_fp32_modules_strict", None) or ())
    if not names:
        return None
    return re.compile("|".join(f"(?:{n.replace('*', '.*')})" for n in sorted(names)))


def _shard_names(n: int) -> list[str]:
    return [SINGLE_FILE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def _header(jobs: list[_Job]) -> bytes:
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for job in jobs:
        header[job.src.name] = {"dtype": job.dtype, "shape": list(job.src.shape), "data_offsets": [offset, offset + job.nbytes]}
        offset += job.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors pads the header so the data starts 8-aligned
    return struct.pack("<Q", len(raw)) + raw


def _read_tensor(handle: Any, name: str) -> Tensor:
    """One tensor of an open input shard (the only place input tensors are decoded)."""
    return handle.get_tensor(name)


def _write_bytes(out: BinaryIO, tensor: Tensor) -> None:
    out.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().data)


def _copy_range(src: BinaryIO, out: BinaryIO, start: int, nbytes: int) -> None:
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
    tensor = _read_tensor(handle, job.src.name)
    s = job.scale
    if s is None:
        tensor = tensor.to(dtype)
    elif s.bias:
        tensor = scale_bias(tensor, s.rows).to(dtype)  # type: ignore[arg-type]
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
        return self.raw, self.handle  # type: ignore[return-value]

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
    sources: list[_Source], scales: dict[str, _Scale], dtype: Optional[torch.dtype], keep: Optional[re.Pattern[str]]
) -> Iterator[_Job]:
    for src in sources:
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


# --- entry point ---------------------------------------------------------------------------------


def fold_checkpoint(
    base_dir: PathLike,
    adapter: Union[IA3Adapter, PathLike],
    out_dir: PathLike,
    *,
    dtype: Union[str, torch.dtype, None] = None,
    max_shard_size: Union[int, str] = "5GB",
    overwrite: bool = False,
    progress: bool = True,
    extras: str = "keep",
) -> CheckpointFoldReport:
    """Fold an IA3 adapter into a safetensors checkpoint on disk, one tensor at a time.

    Output-side vectors scale weight rows and biases, feed-forward vectors scale weight columns,
    in float32, rounded once to the output dtype: the same tensors as `ia3fuse.fold` on the
    loaded model. Every other tensor (tied embeddings included) is copied unchanged, byte for
    byte unless ``dtype`` converts it. Memory stays bounded by the largest tensor.

    The base's other files are copied, sub-folders included (a sentence-transformers model keeps
    ``modules.json``, ``1_Pooling/``, ...), except weight files the fold does not write (other
    formats, ``onnx/`` exports of the unfolded model). ``README.md`` is the base's model card with
    a section appended that names the adapter, its base model, its fusion recipe (if it was fused)
    and the ia3fuse version; a new card when the base has none.

    Args:
        base_dir: a Hugging Face model directory: ``config.json`` plus ``model.safetensors`` or
            sharded ``model-0000x-of-0000y.safetensors`` with ``model.safetensors.index.json``.
        adapter: a PEFT IA3 adapter (`IA3Adapter` or its directory) trained on this base. Its
            module paths may lack or carry the prefix of the checkpoint's class (``bert.``,
            ``model.``): they are matched by unique suffix.
        out_dir: the output directory, written atomically; it must not exist unless ``overwrite``.
        dtype: ``"float32"``, ``"float16"`` or ``"bfloat16"`` to convert every float tensor (except
            those the model class keeps in float32 at that dtype); None keeps each tensor's dtype.
        max_shard_size: the largest shard, in bytes or as ``"5GB"``/``"500MiB"``; more than one
            shard also writes ``model.safetensors.index.json``.
        overwrite: replace an existing ``out_dir`` (only once the new one is complete).
        progress: show a progress bar over tensors on stderr.
        extras: the adapter's trained non-IA3 modules (``modules_to_save``, e.g. the classifier
            head PEFT saves with a ``SEQ_CLS`` adapter): ``"keep"`` (default) writes them over the
            checkpoint's tensors of the same names, as PEFT's ``merge_and_unload`` keeps them;
            ``"drop"`` keeps the checkpoint's own.

    Returns:
        A `CheckpointFoldReport`: one entry per changed tensor, and counts.

    Raises:
        FoldError: the adapter's modules are absent, ambiguous, tied or of another size (an
            adapter from another base), or the checkpoint is not a full-precision safetensors
            model; nothing is written then.
        OutputPathError: ``out_dir`` exists, is or lies inside an input, or writing it failed
            (no partial output is left).

    Example:
        >>> report = ia3fuse.fold_checkpoint("llama-7b", "adapters/math", "llama-7b-math")  # doctest: +SKIP
        >>> print(report.summary())  # doctest: +SKIP
    """
    out_dtype = _parse_dtype(dtype)
    max_bytes = _parse_size(max_shard_size)
    if extras not in ("keep", "drop"):
        raise FoldError(f"extras={extras!r} is not a choice; pass 'keep' or 'drop'")
    if sys.byteorder != "little":  # pragma: no cover - safetensors data is little-endian
        raise FoldError("the streaming fold writes safetensors' little-endian bytes and needs a little-endian machine")
    base = Path(base_dir)
    loaded = adapter if isinstance(adapter, IA3Adapter) else load_adapter(adapter)
    inputs = [base] + ([Path(loaded.source)] if loaded.source else [])
    out = check_output_path(Path(out_dir), inputs, overwrite=overwrite)

    config = _read_config(base)
    sources = _sources(_checkpoint_files(base))
    skeleton = _skeleton(base)
    by_name = {s.name: s for s in sources}
    scales, model_type = _plan(loaded, skeleton, by_name)
    trained = _plan_trained(loaded.extras, by_name) if extras == "keep" else {}
    jobs = list(_iter_jobs(sources, scales, out_dtype, _keep_fp32(skeleton, out_dtype)))
    for job in jobs:
        job.trained = trained.get(job.src.name)
    n_shards = _assign_shards(jobs, max_bytes)
    names = _shard_names(n_shards)

    config_text = None
    if out_dtype is not None:
        dtype_name = str(out_dtype).removeprefix("torch.")
        keys = [k for k in ("dtype", "torch_dtype") if k in config] or ["dtype"]
        config.update(dict.fromkeys(keys, dtype_name))
        config_text = json.dumps(config, indent=2) + "\n"

    folded = len({m for s in scales.values() for m in s.modules})
    changed = f"{count(folded, 'IA3 module')} into {len(scales)} of {len(jobs)} tensors ({model_type})"
    if out_dtype is not None:
        changed += f", converted to {str(out_dtype).removeprefix('torch.')}"
    section = Provenance.of(loaded).card_section(str(base_dir), changed)

    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        copied, skipped = copy_files(base, tmp, config_text)
        write_card(base, tmp, section, out.name)
        copied = copied if CARD_FILE in copied else sorted([*copied, CARD_FILE])
        _write_shards(tmp, jobs, n_shards, progress)
        if n_shards > 1:
            index = {
                "metadata": {"total_size": sum(j.nbytes for j in jobs), "total_parameters": sum(_numel(j.src.shape) for j in jobs)},
                "weight_map": {j.src.name: names[j.shard] for j in sorted(jobs, key=lambda j: j.src.name)},
            }
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")

    entries = []
    for job in jobs:
        if job.trained is not None:
            dtype_name = str(_ST_TO_TORCH[job.dtype]).removeprefix("torch.")
            entries.append(ChangedTensor(job.src.name, "trained copy", ("modules_to_save",), job.src.shape, dtype_name))
        if job.scale is None:
            continue
        s = job.scale
        scaled = ", ".join(k for k, v in (("rows", s.rows), ("cols", s.cols)) if v is not None)
        dtype_name = str(_ST_TO_TORCH[job.dtype]).removeprefix("torch.")
        entries.append(ChangedTensor(job.src.name, scaled, s.modules, job.src.shape, dtype_name))
    return CheckpointFoldReport(
        output=out, model_type=model_type, entries=entries, tensors=len(jobs), shards=n_shards,
        total_size=sum(j.nbytes for j in jobs), dtype=None if out_dtype is None else str(out_dtype).removeprefix("torch."),
        copied_files=copied, skipped_files=skipped,
    )
