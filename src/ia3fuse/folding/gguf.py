"""Fold an IA3 adapter into a GGUF (llama.cpp) file: scale rows through block scales, exactly.

The output is the input file, byte for byte (every key, every tensor info, every other tensor),
with only the affected tensors rewritten in place: for quantized tensors only their fp16 block
scales change (`gguf_blocks`); names and row order come from `gguf_map`. The header gains the
``ia3fuse.*`` provenance keys (`gguf_header`), which moves the data section as a whole; tensor
offsets are relative to it and stay. The input is memory-mapped and copied in chunks, so memory
stays bounded by the largest changed tensor.
"""

from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional, Union

import numpy as np

from .._io import atomic_output_file, check_output_path
from ..adapter import IA3Adapter, load_adapter
from ..errors import FoldError, MissingDependencyError
from ..errors import IA3FuseWarning
from . import gguf_blocks as blocks
from .gguf_header import header_with_strings
from .provenance import GGUF_KEYS, Provenance
from .base import check_options
from .model import refuse_lossy
from .report import FileFoldReport, FoldEntry
from .gguf_map import Arch, GGUFTensor, Job, plan_gguf

__all__ = ["fold_gguf", "GGUFFoldReport"]

PathLike = Union[str, Path]
Exact = Literal["auto", "require", "allow_requant"]
_CHUNK = 64 * 2**20
# types whose fp16 super-scales are often subnormal already: a small |l| makes their rounding absolute
_SUBNORMAL_PRONE = ("Q6_K", "Q5_K", "IQ4_XS")


@dataclass
class GGUFFoldReport(FileFoldReport):
    """What `fold_gguf` wrote: one entry per changed tensor.

    Each entry's ``module`` is the GGUF tensor name and its ``layer`` the type and shape in ggml
    order, ``ne0`` (the input features) first, as llama.cpp prints it.
    """

    permuted_qk: bool = False

    def summary(self) -> str:
        """One line: where, what changed, how."""
        perm = "; q/k rows permuted as llama.cpp's converter does" if self.permuted_qk else ""
        return super().summary() + perm

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "permuted_qk": self.permuted_qk}


def _read(path: Path) -> Any:
    try:
        import gguf
    except ImportError:  # pragma: no cover - the extra is missing
        raise MissingDependencyError("folding into GGUF files", "gguf", "gguf") from None
    if not path.is_file():
        what = "does not exist" if not path.exists() else "is not a file"
        raise FoldError(f"GGUF file {str(path)!r} {what}; pass a .gguf model file")
    try:
        reader = gguf.GGUFReader(str(path), "r")
    except Exception as exc:  # the reader raises ValueError, KeyError, struct and numpy errors
        raise FoldError(f"{str(path)!r} is not a readable GGUF file ({exc}); re-download or re-convert it") from None
    if reader.byte_order != "I" or sys.byteorder != "little":
        raise FoldError(f"{str(path)!r} is a big-endian GGUF file; ia3fuse folds little-endian files only")
    size = path.stat().st_size
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size:
            raise FoldError(f"{str(path)!r} is truncated: tensor {t.name!r} ends past the end of the file")
    return reader


def _field(reader: Any, key: str) -> Any:
    f = reader.fields.get(key)
    if f is None:
        return None
    try:
        value = f.contents()
    except Exception:  # noqa: BLE001 - a malformed field reads as absent
        return None
    return value


def _arch(reader: Any, path: Path) -> Arch:
    name = _field(reader, "general.architecture")
    if not isinstance(name, str):
        raise FoldError(f"{str(path)!r} has no general.architecture; it is not a llama.cpp model file")
    blocks_ = _field(reader, f"{name}.block_count")
    if not isinstance(blocks_, int):
        raise FoldError(f"{str(path)!r} has no {name}.block_count; it is not a llama.cpp model file")
    return Arch(
        name, blocks_, _field(reader, f"{name}.attention.head_count"), _field(reader, f"{name}.attention.head_count_kv")
    )


def _tensors(reader: Any) -> dict[str, GGUFTensor]:
    return {
        t.name: GGUFTensor(
            t.name, int(t.tensor_type), tuple(int(d) for d in t.shape), int(t.data_offset), int(t.n_bytes)
        )
        for t in reader.tensors
    }


def _raw(reader: Any, t: GGUFTensor) -> np.ndarray:
    return np.asarray(reader.data[t.offset : t.offset + t.nbytes]).reshape(t.rows, -1)


def _new_bytes(raw: np.ndarray, job: Job) -> tuple[np.ndarray, blocks.ScaleStats, str]:
    t = job.tensor
    stats = blocks.ScaleStats()
    if _is_bias(job):  # a bias holds one value per output row (per expert and row for experts)
        assert job.rows is not None and job.cols is None
        flat = blocks.scale_cols(raw.reshape(1, -1), t.qtype, job.rows.reshape(-1))
        return flat.reshape(raw.shape), stats, "elementwise"
    if job.lossy is not None:
        return blocks.requantize(raw, t.qtype, job.rows, job.cols), stats, "requantize"
    new = raw
    if job.rows is not None:
        new, stats = blocks.scale_rows(new, t.qtype, job.rows)
    if job.cols is not None:
        new = blocks.scale_cols(new, t.qtype, job.cols)
    return new, stats, "elementwise" if t.qtype in blocks.float_types() else "block scales"


def _is_bias(job: Job) -> bool:
    return job.tensor.name.endswith(".bias") or len(job.tensor.ne) == 1


def _error(before: np.ndarray, after: np.ndarray, job: Job) -> float:
    want = before.astype(np.float64)
    if _is_bias(job):
        assert job.rows is not None  # a bias (1-D) only takes row scales
        want = (want.reshape(-1) * job.rows.reshape(-1)).reshape(want.shape)
    else:
        if job.rows is not None:
            want = want * job.rows.reshape(-1, 1)
        if job.cols is not None:
            want = want * job.cols.reshape(1, -1)
    denom = float(np.linalg.norm(want)) or 1e-30
    return float(np.linalg.norm(after.astype(np.float64) - want) / denom)


def _copy(src: Path, dst: Path, bar: Any, header: bytes, data_start: int) -> None:
    """``header``, then the input's data section (from ``data_start`` to its end) as it is."""
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        fout.write(header)
        fin.seek(data_start)
        bar.update(data_start)
        while True:
            chunk = fin.read(_CHUNK)
            if not chunk:
                break
            fout.write(chunk)
            bar.update(len(chunk))


def fold_gguf(
    gguf_path: PathLike,
    adapter: Union[IA3Adapter, PathLike],
    out_path: PathLike,
    *,
    exact: Exact = "auto",
    permute_qk: Optional[bool] = None,
    measure_error: Union[bool, Literal["lossy"]] = "lossy",
    overwrite: bool = False,
    progress: bool = True,
    extras: str = "keep",
) -> GGUFFoldReport:
    """Fold an IA3 adapter into a GGUF model file for llama.cpp; write a new GGUF file.

    Output-side vectors (k, v, q, fused qkv) scale tensor rows: for every quant type that keeps
    fp16 block scales (Q4_0/1, Q5_0/1, Q8_0, Q2_K..Q6_K, IQ1..IQ4, TQ1_0/TQ2_0) by multiplying
    those scales, which is exact up to rounding the new scales to fp16; F32/F16/BF16 tensors are
    scaled elementwise. Feed-forward (input-side) vectors move onto ``ffn_up``'s rows in gated
    MLPs (exact), scale the columns of float tensors, or otherwise need dequantize-scale-requantize.
    Everything else in the file is copied byte for byte; the header gains string keys that record
    the fold (``ia3fuse.version``, ``ia3fuse.adapter.name``/``.path``/``.base_model`` and, for a
    fused adapter, ``ia3fuse.recipe`` as JSON), replacing those of an earlier fold.

    Args:
        gguf_path: the GGUF model file (converted from the adapter's Hugging Face base model).
        adapter: the PEFT IA3 adapter (`IA3Adapter` or its directory).
        out_path: the output ``.gguf`` file, written atomically; it must not exist unless ``overwrite``.
        exact: ``"auto"`` requantizes where there is no exact path (with a warning), ``"require"``
            refuses that before writing anything, ``"allow_requant"`` is ``"auto"`` without the warning.
        permute_qk: whether the file's q/k rows were permuted by llama.cpp's converter
            (``LlamaModel.permute``); None decides by architecture (yes for llama, mistral and
            mixtral files, which llama.cpp calls ``llama``; no for qwen2, gemma, phi3, ...).
        measure_error: dequantize each changed tensor before and after to report its relative
            error: ``True`` for all, ``"lossy"`` (default) for the requantized ones, ``False`` never.
        overwrite: replace an existing ``out_path`` (in one rename, once the new file is complete).
        progress: show a progress bar on stderr.
        extras: an adapter with trained non-IA3 modules (``modules_to_save``) is refused under
            ``"keep"`` (the default; a GGUF fold cannot write them), folded without them under
            ``"drop"``.

    Returns:
        A `GGUFFoldReport` (a `FoldReport`): one entry per changed tensor.

    Raises:
        FoldError: the file is not a readable GGUF model; the adapter's modules have no tensor in
            it or another size; a layout or permutation is unknown; a lossy step under
            ``exact="require"``, or where the gguf package cannot quantize the type; a scale that
            would overflow fp16. Nothing is written then.
        OutputPathError: ``out_path`` exists, is an input, or writing it failed (nothing is left).

    Example:
        >>> report = ia3fuse.fold_gguf("tinyllama-q4_k_m.gguf", "adapters/math", "tinyllama-math.gguf")  # doctest: +SKIP
        >>> print(report.summary())  # doctest: +SKIP
    """
    check_options(exact=exact, measure_error=measure_error, permute_qk=permute_qk, extras=extras)
    src = Path(gguf_path)
    loaded = adapter if isinstance(adapter, IA3Adapter) else load_adapter(adapter)
    if loaded.extras and extras == "keep":
        keys = sorted(loaded.extras)
        raise FoldError(
            f"the adapter also holds {len(keys)} trained non-IA3 tensor(s) (modules_to_save, e.g. {keys[0]!r}), which "
            "a GGUF fold cannot write; pass extras='drop' (--extras drop on the command line) to fold the IA3 vectors "
            "only, or fold the Hugging Face checkpoint (ia3fuse fold --base, which keeps them) and convert that"
        )
    out = check_output_path(
        Path(out_path), [src] + ([Path(loaded.source)] if loaded.source else []), overwrite=overwrite, file=True
    )
    reader = _read(src)
    arch = _arch(reader, src)
    tensors = _tensors(reader)
    vectors = {p: v.detach().reshape(-1).float().cpu().numpy() for p, v in loaded.vectors.items()}
    jobs, permuted = plan_gguf(
        vectors,
        loaded.feedforward,
        tensors,
        arch,
        permute_qk=permute_qk,
        exact_types=blocks.exact_types(),
        float_types=blocks.float_types(),
        requantizable=blocks.can_requantize,
        trained_on=loaded.base_model,
    )
    lossy = [j for j in jobs if j.lossy]
    if exact == "require":
        refuse_lossy([(j.tensor.name, j.lossy) for j in lossy], "tensor", " (--exact allow_requant)")
    jobs.sort(key=lambda j: j.tensor.offset)
    header, data_start = header_with_strings(reader, GGUF_KEYS, Provenance.of(loaded).gguf_metadata())
    shift = len(header) - data_start  # where each tensor moves in the output

    from tqdm.auto import tqdm

    entries: list[FoldEntry] = []
    subnormal: dict[str, int] = {}
    size = src.stat().st_size
    bar = tqdm(
        total=size + sum(j.tensor.nbytes for j in jobs),
        desc="ia3fuse fold",
        unit="B",
        unit_scale=True,
        disable=not progress,
        file=sys.stderr,
    )
    try:
        with atomic_output_file(out, overwrite=overwrite) as tmp:
            _copy(src, tmp, bar, header, data_start)
            with open(tmp, "r+b") as fh:
                for job in jobs:
                    raw = _raw(reader, job.tensor)
                    new, stats, path = _new_bytes(raw, job)
                    if stats.overflow:
                        raise FoldError(
                            f"{job.tensor.name!r}: {stats.overflow} block scale(s) times the adapter's scale exceed "
                            "fp16's range (65504); the adapter's values are far too large for this file"
                        )
                    if stats.subnormal:
                        subnormal[job.tensor.name] = stats.subnormal
                    if new.nbytes != job.tensor.nbytes:  # a bug, never a user error
                        raise FoldError(f"internal error: {job.tensor.name!r} changed size; nothing was written")
                    fh.seek(job.tensor.offset + shift)
                    fh.write(np.ascontiguousarray(new).tobytes())
                    measure = measure_error is True or (measure_error == "lossy" and job.lossy is not None)
                    error = (
                        _error(blocks.dequantize(raw, job.tensor.qtype), blocks.dequantize(new, job.tensor.qtype), job)
                        if measure
                        else None
                    )
                    if any(h.startswith("neighbour") for h in job.how):
                        path += " + neighbour"
                    layer = f"{job.tensor.type_name} {'x'.join(map(str, job.tensor.ne))}"
                    entries.append(FoldEntry(job.tensor.name, layer, path, job.describe(), error, job.lossy))
                    bar.update(job.tensor.nbytes)
    finally:
        bar.close()
        del reader  # close the memory map
    notes = []
    if subnormal:
        types = sorted({_type_of(entries, n) for n in subnormal})
        prone = [t for t in types if t in _SUBNORMAL_PRONE]
        notes.append(
            f"{sum(subnormal.values())} new block scale(s) in {len(subnormal)} tensor(s) of type {', '.join(types)} "
            f"(e.g. {next(iter(subnormal))!r}) fall below fp16's normal range, where rounding is absolute, not "
            "relative: those blocks are off by more than 1%"
            + (
                f" ({', '.join(prone)} store super-scales near fp16's limit already; small |l| values push them below it)"
                if prone
                else ""
            )
        )
    if lossy and exact == "auto":
        notes.append(f"{len(lossy)} tensor(s) were folded by dequantize-scale-requantize (lossy); see the fold report")
    for note in notes:
        warnings.warn(note, IA3FuseWarning, stacklevel=2)
    return GGUFFoldReport(
        entries=entries,
        model_type=arch.name,
        output=out,
        tensors=len(tensors),
        modules=len({s for j in jobs for s in j.sources}),
        permuted_qk=permuted,
        notes=notes,
    )


def _type_of(entries: list[FoldEntry], name: str) -> str:
    return next(e.layer.split()[0] for e in entries if e.module == name)
