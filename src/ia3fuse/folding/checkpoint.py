"""Streaming fold: an IA3 adapter into an on-disk safetensors checkpoint, one tensor at a time.

The model is never materialised. This module holds the entry point and its report; the
decisions (the meta-device skeleton, module paths -> checkpoint names, each tensor's scale) are
in ``checkpoint_plan.py``, the safetensors headers and shards in ``safetensors_io.py``, the
other files of the folder and the model card in ``checkpoint_files.py``, the math in ``math.py``
(shared with the dense backend).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch

from .._io import atomic_output_dir, check_output_path
from ..adapter import IA3Adapter, load_adapter
from ..errors import FoldError
from .._text import count, format_table
from .base import check_options
from .checkpoint_files import CARD_FILE, copy_files, write_card
from .provenance import Provenance
from .report import FileFoldReport, FoldEntry
from .checkpoint_formats import checkpoint_format
from .checkpoint_plan import _keep_fp32, _parse_dtype, _plan, _plan_trained, _read_config, _skeleton
from .safetensors_io import (
    _ST_TO_TORCH,
    INDEX_FILE,
    _assign_shards,
    _checkpoint_files,
    _iter_jobs,
    _numel,
    _parse_size,
    _shard_names,
    _sources,
    _write_shards,
)

__all__ = ["fold_checkpoint", "CheckpointFoldReport", "ChangedTensor"]

PathLike = Union[str, Path]


# --- report --------------------------------------------------------------------------------------


@dataclass
class ChangedTensor(FoldEntry):
    """One checkpoint tensor that the fold changed: a `FoldEntry` whose ``module`` is the tensor's
    name, with the checkpoint's own view of it."""

    tensor: str = ""  # its name in the checkpoint
    scaled: str = ""  # "rows", "cols", "rows, cols", or "trained copy" (a modules_to_save tensor written over it)
    modules: tuple[str, ...] = ()  # the IA3 module path(s) of the adapter it carries
    shape: tuple[int, ...] = ()
    dtype: str = ""  # as written

    @classmethod
    def of(
        cls, tensor: str, scaled: str, modules: tuple[str, ...], shape: tuple[int, ...], dtype: str, path: str
    ) -> "ChangedTensor":
        carries = scaled if scaled in ("trained copy", "unnested", "widened") else f"{scaled} for {', '.join(modules)}"
        layer = f"{dtype} {'x'.join(map(str, shape))}"
        return cls(
            tensor, layer, path, carries, None, tensor=tensor, scaled=scaled, modules=modules, shape=shape, dtype=dtype
        )


@dataclass
class CheckpointFoldReport(FileFoldReport):
    """What `fold_checkpoint` wrote."""

    shards: int = 0
    total_size: int = 0  # bytes of tensor data
    dtype: Optional[str] = None  # the requested output dtype, None when every tensor kept its own
    quantization: Optional[str] = None  # the checkpoint's quantization method, None for full precision
    widened: list[str] = field(default_factory=list)  # modules moved from per-tensor to per-channel scales
    copied_files: list[str] = field(default_factory=list)
    skipped_files: list[str] = field(default_factory=list)

    def _changes(self) -> list[ChangedTensor]:
        return [e for e in self.entries if isinstance(e, ChangedTensor)]

    def summary(self) -> str:
        """One line: where, what changed, how it was written."""
        dtype = f", dtype {self.dtype}" if self.dtype else ""
        return (
            f"wrote {self.output}: folded {count(self.modules, 'IA3 module')} into {self.changed} of {self.tensors} tensors "
            f"({self.model_type}{', ' + self.quantization if self.quantization else ''}), "
            f"{self.shards} shard{'s' if self.shards != 1 else ''}, "
            f"{self.total_size / 1e6:.1f} MB{dtype}"
        )

    def table(self, max_width: Optional[int] = 100) -> str:
        """A markdown table of the changed tensors: name, rows/cols, shape, dtype, IA3 module.

        Args:
            max_width: the widest line (the IA3 module cells wrap to fit); None: one line per
                tensor, for a markdown file. The IA3 module column is left out when every tensor
                belongs to the module of the same path (the checkpoint adds or drops no prefix).
        """
        own = all(e.modules == (e.tensor.rsplit(".", 1)[0],) for e in self._changes())
        headers = ["tensor", "scaled", "shape", "dtype"] + ([] if own else ["IA3 module"])
        rows = [
            [e.tensor, e.scaled, "x".join(map(str, e.shape)), e.dtype] + ([] if own else [", ".join(e.modules)])
            for e in self._changes()
        ]
        return format_table(headers, rows, max_width=max_width, wrap=(1, 4))

    def breakdown(self) -> str:
        """One line: how many tensors were scaled by rows and by columns (every one exactly)."""
        counts: dict[str, int] = {}
        for e in self._changes():
            key = (
                e.scaled if e.scaled in ("unnested", "widened") else "statistic" if e.path == "statistic" else e.scaled
            )
            counts[key] = counts.get(key, 0) + 1
        ordered = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
        shown = (
            ", ".join(
                f"{n} replaced by the adapter's trained copies (modules_to_save)"
                if k == "trained copy"
                else f"{n} quantization statistics by rows"
                if k == "statistic"
                else f"{n} 4-bit quant states unnested (double quantization decoded to float32 absmax, exactly)"
                if k == "unnested"
                else f"{n} per-tensor scales widened to per-channel unchanged (fused with a scaled module)"
                if k == "widened"
                else f"{n} by {k.replace(', ', ' and ')}"
                for k, n in ordered
            )
            or "no tensor"
        )
        packed = "; packed weights copied byte for byte" if "statistic" in counts else ""
        if self.widened:
            packed += (
                f"; {count(len(self.widened), 'module')} moved from per-tensor to per-channel scales (config group "
                "'ia3fuse_channel')"
            )
        return f"exact: {shown} (float32 products, each rounded once to its tensor's dtype){packed}"

    def to_dict(self) -> dict[str, Any]:
        return {
            **super().to_dict(),
            "shards": self.shards,
            "total_size": self.total_size,
            "dtype": self.dtype,
            "quantization": self.quantization,
            "widened": list(self.widened),
            "copied_files": self.copied_files,
            "skipped_files": self.skipped_files,
            "entries": [
                {
                    "tensor": e.tensor,
                    "scaled": e.scaled,
                    "modules": list(e.modules),
                    "shape": list(e.shape),
                    "dtype": e.dtype,
                    "path": e.path,
                }
                for e in self._changes()
            ],
        }


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

    A quantized checkpoint (compressed-tensors, GPTQ, AWQ, bitsandbytes, MLX: its
    ``quantization_config``) keeps its format: row scales multiply each quantized module's per-row
    statistics (scales, ``SCB``, ``absmax``), feed-forward vectors move onto the rows of the layer
    that feeds them (gated ``up_proj``, ReLU ``fc1``), and every packed tensor is copied byte for
    byte. What cannot be folded exactly is refused. See docs/deploy.md.

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
            adapter from another base), the checkpoint is not a safetensors model, its
            quantization method is unknown, or a quantized module cannot take its scale exactly;
            nothing is written then.
        OutputPathError: ``out_dir`` exists, is or lies inside an input, or writing it failed
            (no partial output is left).

    Example:
        >>> report = ia3fuse.fold_checkpoint("llama-7b", "adapters/math", "llama-7b-math")  # doctest: +SKIP
        >>> print(report.summary())  # doctest: +SKIP
    """
    check_options(extras=extras)
    out_dtype = _parse_dtype(dtype)
    max_bytes = _parse_size(max_shard_size)
    if sys.byteorder != "little":  # pragma: no cover - safetensors data is little-endian
        raise FoldError("the streaming fold writes safetensors' little-endian bytes and needs a little-endian machine")
    base = Path(base_dir)
    loaded = adapter if isinstance(adapter, IA3Adapter) else load_adapter(adapter)
    inputs = [base] + ([Path(loaded.source)] if loaded.source else [])
    out = check_output_path(Path(out_dir), inputs, overwrite=overwrite)

    config = _read_config(base)
    fmt = checkpoint_format(config, repr(str(base)))
    if fmt is not None and out_dtype is not None:
        raise FoldError(
            f"dtype={dtype!r} converts a full-precision checkpoint; {str(base)!r} is quantized ({fmt.label}) and its "
            "scales keep the dtypes its kernels read: leave dtype unset (no --dtype)"
        )
    sources = _sources(_checkpoint_files(base))
    skeleton = _skeleton(base)
    by_name = {s.name: s for s in sources}
    plan = _plan(loaded, skeleton, by_name, fmt)
    scales, model_type = plan.scales, plan.model_type
    trained = _plan_trained(loaded.extras, by_name) if extras == "keep" else {}
    jobs = list(_iter_jobs(sources, scales, out_dtype, _keep_fp32(skeleton, out_dtype), plan.replaced))
    for job in jobs:
        job.trained = trained.get(job.src.name)
    n_shards = _assign_shards(jobs, max_bytes)
    names = _shard_names(n_shards)

    config_text = None
    if plan.quantization_config is not None:
        config["quantization_config"] = plan.quantization_config
        config_text = json.dumps(config, indent=2) + "\n"
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
                "metadata": {
                    "total_size": sum(j.nbytes for j in jobs),
                    "total_parameters": sum(_numel(j.shape) for j in jobs),
                },
                "weight_map": {j.src.name: names[j.shard] for j in sorted(jobs, key=lambda j: j.src.name)},
            }
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")

    entries: list[FoldEntry] = []
    for job in jobs:
        if job.trained is not None:
            dtype_name = str(_ST_TO_TORCH[job.dtype]).removeprefix("torch.")
            entries.append(
                ChangedTensor.of(
                    job.src.name, "trained copy", ("modules_to_save",), job.src.shape, dtype_name, "trained copy"
                )
            )
        if job.scale is None:
            if job.replace is not None:  # statistics rewritten whole: bnb double quant unnested, scales widened
                dtype_name = str(_ST_TO_TORCH[job.dtype]).removeprefix("torch.")
                how = "widened" if job.src.name.endswith(".weight_scale") else "unnested"
                entries.append(ChangedTensor.of(job.src.name, how, (), job.shape, dtype_name, "statistic"))
            continue
        s = job.scale
        scaled = ", ".join(k for k, v in (("rows", s.rows), ("cols", s.cols)) if v is not None)
        dtype_name = str(_ST_TO_TORCH[job.dtype]).removeprefix("torch.")
        path = "dense" if s.view is None else "statistic"
        entries.append(ChangedTensor.of(job.src.name, scaled, s.modules, job.shape, dtype_name, path))
    return CheckpointFoldReport(
        output=out,
        model_type=model_type,
        entries=entries,
        tensors=len(jobs),
        modules=folded,
        shards=n_shards,
        total_size=sum(j.nbytes for j in jobs),
        dtype=None if out_dtype is None else str(out_dtype).removeprefix("torch."),
        copied_files=copied,
        skipped_files=skipped,
        quantization=None if fmt is None else fmt.label,
        widened=plan.widened,
    )
