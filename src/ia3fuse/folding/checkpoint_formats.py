"""Quantized checkpoint formats for the streaming fold: which tensors of a quantized module hold
its per-row scales, and whether a row or column scale folds into them exactly.

Every format here stores the weight as packed integers (or fp8) plus a floating statistic per
output row, or per group of input columns inside a row. An output-side IA3 vector scales rows:
it multiplies those statistics and leaves the packed tensor untouched, so the engine that loaded
the base loads the output the same way. A column scale would change every group of a row
differently: never exact, so input-side vectors move onto the rows of the neighbour that feeds
them (`plan.py`), or the fold is refused.

Formats, by ``quantization_config.quant_method`` (or mlx-lm's ``quantization`` key):

========================  ==========================================  ========================
format                    row statistics (suffix: row axis)            left as stored
========================  ==========================================  ========================
compressed-tensors        ``weight_scale``: 0 (channel, group)         ``weight_packed`` /
                                                                       ``weight``, zero points
gptq (v1 and v2)          ``scales``: 1                                ``qweight``, ``qzeros``,
                                                                       ``g_idx``
awq (gemm)                ``scales``: 1                                ``qweight``, ``qzeros``
awq (gemv)                ``scales``: 0                                ``qweight``, ``qzeros``
bitsandbytes 8-bit        ``SCB``: 0                                   ``weight`` (int8)
bitsandbytes 4-bit        ``weight.absmax`` viewed (out, in/block): 0  ``weight`` (packed)
mlx                       ``scales`` and ``biases``: 0                 ``weight`` (packed)
========================  ==========================================  ========================

A statistic is multiplied in float32 and rounded once to its own dtype (fp16 scales: a relative
error of at most 2^-11 per row, the format's storage floor; fp32 scales: 2^-24).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Mapping, Optional

from torch import Tensor, nn

from ..errors import FoldError

__all__ = [
    "Stat",
    "QuantModule",
    "QuantBackend",
    "CheckpointFormat",
    "checkpoint_format",
    "negative_refusal",
    "unnest_bnb",
    "SUPPORTED",
]

SUPPORTED = "compressed-tensors, gptq, awq (gemm, gemv), bitsandbytes (8-bit, 4-bit) and mlx"
_COLS = "its groups of input columns share one statistic per row, so a column scale has no exact place"
_NEGATIVE = (
    "a negative statistic is not verified with the serving engines' kernels for this format (Marlin, Machete, "
    "exllama, AWQ, fp8 GEMMs)"
)


@dataclass(frozen=True)
class Stat:
    """One tensor of per-row statistics: its full name, the shape to view it as, the row axis."""

    name: str
    view: tuple[int, ...]
    axis: int


@dataclass(frozen=True)
class QuantModule:
    """A quantized module of the checkpoint: what scales its rows, and why rows or columns may not fold."""

    format: str  # for reports, e.g. "gptq 4-bit"
    stats: tuple[Stat, ...]
    rows_reason: Optional[str] = None  # None: rows fold exactly
    negative_ok: bool = False  # the format's kernels take a negative statistic (measured)
    # bnb 4-bit double quantization: (absmax, nested_absmax, nested_quant_map, quant state) to unnest
    nested: Optional[tuple[str, str, str, str]] = None
    # compressed-tensors per-tensor scale: the per-channel shape it is widened to (same values)
    widen: Optional[tuple[int, ...]] = None

    @property
    def cols_reason(self) -> str:
        return f"{self.format}: {_COLS}"


class QuantBackend:
    """What the planner asks of a quantized checkpoint module (its skeleton module on the meta
    device gives the features); the checkpoint fold writes the statistics itself."""

    def __init__(self, module: QuantModule, features: tuple[int, int]) -> None:
        self.name = module.format
        self.quant = module
        self._features = features

    def handles(self, module: nn.Module) -> bool:
        return True

    def features(self, module: nn.Module) -> tuple[int, int]:
        return self._features

    def exact_rows(self, module: nn.Module) -> Optional[str]:
        return self.quant.rows_reason

    def exact_cols(self, module: nn.Module) -> Optional[str]:
        return self.quant.cols_reason

    # The checkpoint fold scales the statistics on disk itself; the in-memory operations of the
    # backend interface have no meaning on a meta-device skeleton.
    def _on_disk(self, *args: Any, **kwargs: Any) -> Any:
        raise FoldError(f"internal error: {self.name} modules of a checkpoint are folded on disk, not in memory")

    snapshot = restore = scale_rows = scale_cols = requantize = dequantize = _on_disk


def _shape(sources: Mapping[str, Any], name: str) -> Optional[tuple[int, ...]]:
    src = sources.get(name)
    return None if src is None else tuple(src.shape)


class CheckpointFormat:
    """One quantization method: finds each module's statistics among the checkpoint's tensors."""

    def __init__(self, method: str, config: Mapping[str, Any]) -> None:
        self.method = method
        self.config = config

    @property
    def label(self) -> str:
        """The method in words, e.g. ``"gptq 4-bit"`` or ``"compressed-tensors pack-quantized"``."""
        c = self.config
        if self.method == "compressed-tensors":
            return f"compressed-tensors {c.get('format') or 'mixed'}"
        if self.method == "bitsandbytes":
            return (
                "bitsandbytes 8-bit"
                if c.get("load_in_8bit")
                else f"bitsandbytes 4-bit {c.get('bnb_4bit_quant_type', 'fp4')}"
            )
        if self.method == "awq":
            return f"awq {c.get('bits', c.get('w_bit', '?'))}-bit {c.get('version', 'gemm')}"
        return f"{self.method} {c.get('bits', '?')}-bit"

    def module(self, prefix: str, out_f: int, in_f: int, sources: Mapping[str, Any]) -> Optional[QuantModule]:
        """The quantized module at ``prefix`` (its checkpoint name), or None when it is stored in
        full precision (``prefix.weight`` a float tensor: an ignored module).

        Raises:
            FoldError: the module's tensors do not match the format (named, with the fix).
        """
        weight = sources.get(f"{prefix}.weight")
        if weight is not None and weight.dtype in ("F32", "F16", "BF16", "F64"):
            return None
        return getattr(self, "_" + self.method.replace("-", "_"))(prefix, out_f, in_f, sources)

    def _need(self, sources: Mapping[str, Any], name: str, what: str) -> tuple[int, ...]:
        shape = _shape(sources, name)
        if shape is None:
            raise FoldError(
                f"the checkpoint lacks {name!r}, the {what} its quantization_config ({self.method}) promises; "
                "the checkpoint is incomplete: pass the folder the quantizer wrote"
            )
        return shape

    def _bad(self, name: str, shape: tuple[int, ...], want: str) -> FoldError:
        return FoldError(
            f"the checkpoint's {name!r} has shape {list(shape)}, but a {self.method} module of this size needs {want}; "
            "the checkpoint and its config.json disagree"
        )

    def _compressed_tensors(self, prefix: str, out_f: int, in_f: int, sources: Mapping[str, Any]) -> QuantModule:
        name = f"{prefix}.weight_scale"
        shape = self._need(sources, name, "weight scale")
        fmt = f"compressed-tensors ({self.config.get('format', '?')})"
        numel = 1
        for s in shape:
            numel *= s
        if numel == 1:
            reason = self._tensor_group_problem()
            if reason is None:  # one scale per tensor becomes one per row: the same values, exactly
                return QuantModule(fmt, (Stat(name, (out_f, 1), 0),), widen=(out_f, 1))
            return QuantModule(
                fmt,
                (Stat(name, shape, 0),),
                rows_reason=f"{name!r} is one scale for the whole tensor (strategy 'tensor'): rows cannot take "
                f"different scales, and {reason}; quantize with strategy 'channel' or 'group' to fold exactly",
            )
        if len(shape) == 2 and shape[0] == out_f:
            if in_f % shape[1]:
                raise self._bad(name, shape, f"[{out_f}, groups] with groups dividing {in_f} input features")
            return QuantModule(fmt, (Stat(name, shape, 0),))
        if len(shape) == 2 and shape[0] < out_f:
            return QuantModule(
                fmt,
                (Stat(name, shape, 0),),
                rows_reason=f"{name!r} holds one scale per block of {-(-out_f // shape[0])} rows (strategy 'block'): "
                "rows of a block cannot take different scales",
            )
        raise self._bad(name, shape, f"[{out_f}, 1] (channel), [{out_f}, groups] (group) or [1] (tensor)")

    def _tensor_groups(self) -> list[str]:
        groups = self.config.get("config_groups") or {}
        return [
            k for k, g in groups.items() if isinstance(g, dict) and (g.get("weights") or {}).get("strategy") == "tensor"
        ]

    def _tensor_group_problem(self) -> Optional[str]:
        """None when per-tensor scales can be widened to per-channel ones (one config group of
        strategy 'tensor' whose scheme can be copied), else why not."""
        found = self._tensor_groups()
        if len(found) != 1:
            return f"the quantization_config has {len(found)} config groups of strategy 'tensor' (ia3fuse widens one)"
        return None

    def widened_config(self, modules: list[str]) -> dict[str, Any]:
        """The quantization_config with ``modules`` (checkpoint names) moved to per-channel scales:
        a copy of the per-tensor group with ``strategy: channel``, targeting them by exact name
        (compressed-tensors and vLLM rank an exact name above a class-name target)."""
        import copy

        config = copy.deepcopy(dict(self.config))
        group = copy.deepcopy(config["config_groups"][self._tensor_groups()[0]])
        group["weights"]["strategy"] = "channel"
        group["targets"] = sorted(modules)
        config["config_groups"]["ia3fuse_channel"] = group
        return config

    def _gptq(self, prefix: str, out_f: int, in_f: int, sources: Mapping[str, Any]) -> QuantModule:
        fmt_name = str(self.config.get("checkpoint_format", "gptq")).lower()
        if fmt_name not in ("gptq", "gptq_v2"):
            raise FoldError(
                f"the GPTQ checkpoint's checkpoint_format is {fmt_name!r}; ia3fuse folds the 'gptq' and 'gptq_v2' "
                "layouts (qweight, qzeros, scales, g_idx), not kernel-repacked ones: fold the original GPTQ checkpoint"
            )
        self._need(sources, f"{prefix}.qweight", "packed weight")
        name = f"{prefix}.scales"
        shape = self._need(sources, name, "scales")
        if len(shape) != 2 or shape[1] != out_f:
            raise self._bad(name, shape, f"[groups, {out_f}]")
        return QuantModule(f"gptq {self.config.get('bits', '?')}-bit", (Stat(name, shape, 1),))

    def _awq(self, prefix: str, out_f: int, in_f: int, sources: Mapping[str, Any]) -> QuantModule:
        version = str(self.config.get("version", "gemm")).lower()
        self._need(sources, f"{prefix}.qweight", "packed weight")
        name = f"{prefix}.scales"
        shape = self._need(sources, name, "scales")
        if version == "gemm":
            if len(shape) != 2 or shape[1] != out_f:
                raise self._bad(name, shape, f"[groups, {out_f}]")
            return QuantModule("awq gemm", (Stat(name, shape, 1),))
        if version == "gemv":
            if len(shape) != 2 or shape[0] != out_f:
                raise self._bad(name, shape, f"[{out_f}, groups]")
            return QuantModule("awq gemv", (Stat(name, shape, 0),))
        raise FoldError(
            f"the AWQ checkpoint's version is {version!r}; ia3fuse folds the 'gemm' and 'gemv' layouts, not "
            "kernel-repacked ones (exllama, marlin, ipex): fold the original AWQ checkpoint"
        )

    def _bitsandbytes(self, prefix: str, out_f: int, in_f: int, sources: Mapping[str, Any]) -> QuantModule:
        if self.config.get("load_in_8bit"):
            shape = self._need(sources, f"{prefix}.SCB", "row statistics (SCB)")
            if shape != (out_f,):
                raise self._bad(f"{prefix}.SCB", shape, f"[{out_f}]")
            return QuantModule("bitsandbytes 8-bit", (Stat(f"{prefix}.SCB", shape, 0),), negative_ok=True)
        name = f"{prefix}.weight.absmax"
        shape = self._need(sources, name, "4-bit block statistics (absmax)")
        blocksize, state = self._blocksize(prefix, sources)
        nested = None
        if f"{prefix}.weight.nested_absmax" in sources:
            nested = (name, f"{prefix}.weight.nested_absmax", f"{prefix}.weight.nested_quant_map", state)
            for part in nested[1:3]:
                self._need(sources, part, "nested statistics (bnb_4bit_use_double_quant)")
        if in_f % blocksize or shape != (out_f * in_f // blocksize,):
            return QuantModule(
                "bitsandbytes 4-bit",
                (Stat(name, shape, 0),),
                rows_reason=f"{name!r} has blocks of {blocksize} values that cross rows of {in_f}: a row scale does "
                "not fit them",
                negative_ok=True,
                nested=nested,
            )
        return QuantModule(
            "bitsandbytes 4-bit", (Stat(name, (out_f, in_f // blocksize), 0),), negative_ok=True, nested=nested
        )

    def _blocksize(self, prefix: str, sources: Mapping[str, Any]) -> tuple[int, str]:
        from .safetensors_io import _read_tensor_at

        for key in sources:
            if key.startswith(f"{prefix}.weight.quant_state.bitsandbytes__"):
                raw = _read_tensor_at(sources[key])
                state = json.loads(bytes(raw.tolist()).decode())
                return int(state.get("blocksize", 64)), key
        raise FoldError(
            f"the checkpoint lacks {prefix + '.weight.quant_state.bitsandbytes__nf4'!r} (or __fp4), the 4-bit quant "
            "state its quantization_config (bitsandbytes) promises; pass the folder transformers wrote"
        )

    def _mlx(self, prefix: str, out_f: int, in_f: int, sources: Mapping[str, Any]) -> QuantModule:
        scales, biases = f"{prefix}.scales", f"{prefix}.biases"
        s_shape = self._need(sources, scales, "scales")
        b_shape = self._need(sources, biases, "biases")
        if len(s_shape) != 2 or s_shape[0] != out_f or b_shape != s_shape:
            raise self._bad(scales, s_shape, f"[{out_f}, groups] (and biases of the same shape)")
        return QuantModule(
            f"mlx {self.config.get('bits', '?')}-bit", (Stat(scales, s_shape, 0), Stat(biases, b_shape, 0))
        )


_METHODS = {"compressed-tensors", "gptq", "awq", "bitsandbytes", "mlx"}


def checkpoint_format(config: Mapping[str, Any], where: str) -> Optional[CheckpointFormat]:
    """The quantized format of a checkpoint's ``config.json``, or None for full precision.

    Raises:
        FoldError: a quantization method ia3fuse does not fold, named with the supported ones.
    """
    quant = config.get("quantization_config")
    mlx = config.get("quantization")
    if isinstance(mlx, dict) and not (isinstance(quant, dict) and quant.get("quant_method")):  # mlx-lm's key
        mode = mlx.get("mode", "affine")
        if mode != "affine":
            raise FoldError(
                f"{where} is an MLX checkpoint quantized in mode {mode!r}; ia3fuse folds the 'affine' mode "
                "(scales and biases per group)"
            )
        return CheckpointFormat("mlx", mlx)
    if not quant:
        return None
    if not isinstance(quant, dict):
        raise FoldError(f"{where}'s quantization_config is a {type(quant).__name__}, not a mapping")
    method = str(quant.get("quant_method", "")).lower().replace("_", "-")
    if method == "compressed-tensors":
        formats = {str(quant.get("format", ""))} | {
            str(g.get("format"))
            for g in (quant.get("config_groups") or {}).values()
            if isinstance(g, dict) and g.get("format")
        }
        known = {"pack-quantized", "int-quantized", "float-quantized", "naive-quantized"}
        unknown = sorted(f for f in formats - known if f not in ("", "None", "dense"))
        if unknown:
            raise FoldError(
                f"{where} is compressed-tensors with format {', '.join(map(repr, unknown))}; ia3fuse folds "
                f"{', '.join(sorted(known))} (sparse and 2:4 formats are not supported)"
            )
    if method not in _METHODS:
        raise FoldError(
            f"{where} is quantized with {quant.get('quant_method')!r}; the streaming fold handles {SUPPORTED} "
            "checkpoints and full-precision ones: for another method, load the model and use ia3fuse.fold"
        )
    if (
        method == "bitsandbytes"
        and quant.get("load_in_4bit")
        and quant.get("bnb_4bit_quant_storage")
        not in (
            None,
            "uint8",
        )
    ):
        raise FoldError(
            f"{where} stores its 4-bit weights as {quant['bnb_4bit_quant_storage']!r}; the streaming fold reads the "
            "default uint8 storage"
        )
    return CheckpointFormat(method, quant)


def unnest_bnb(nested: tuple[str, str, str, str], sources: Mapping[str, Any]) -> dict[str, Optional[Tensor]]:
    """A double-quantized 4-bit module's statistics rewritten flat: ``absmax`` decoded to the float32
    values bitsandbytes computes from its nested form (``nested_quant_map[absmax] * nested_absmax
    + offset``, blockwise), the nested tensors dropped (None), the quant state without its nested
    keys. The module's weight dequantizes to the same values, and its rows can then be scaled exactly."""
    import torch

    from .safetensors_io import _read_tensor_at

    absmax_name, nested_absmax, nested_map, state_name = nested
    state = json.loads(bytes(_read_tensor_at(sources[state_name]).tolist()).decode())
    codes = _read_tensor_at(sources[absmax_name]).long()
    scales = _read_tensor_at(sources[nested_absmax]).float()
    code = _read_tensor_at(sources[nested_map]).float()
    block = int(state.get("nested_blocksize", 256))
    flat = code[codes] * scales.repeat_interleave(block)[: codes.numel()] + float(state.get("nested_offset", 0.0))
    flat_state = {k: v for k, v in state.items() if not k.startswith("nested_")}
    packed = torch.tensor(list(json.dumps(flat_state).encode()), dtype=torch.uint8)
    return {absmax_name: flat.to(torch.float32), nested_absmax: None, nested_map: None, state_name: packed}


def negative_refusal(fmt: QuantModule, name: str, count: int) -> str:
    return (
        f"{name!r} would take {count} negative scale(s): {_NEGATIVE} ({fmt.format}); keep this adapter unmerged "
        "(PEFT or ia3fuse.Mixture) or fold it into the full-precision checkpoint"
    )
