"""Name resolution for the streaming checkpoint fold: the module skeleton built from
``config.json`` on the meta device, the adapter's module paths matched to its modules and to the
checkpoint's tensor names, and each tensor's scale, every problem found before anything is written.
The decisions are `plan_fold`'s (the in-memory fold's planner), with the checkpoint format's backends
(`checkpoint_formats.py`)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch
from torch import Tensor, nn

from .._text import summarize
from ..adapter import IA3Adapter
from ..errors import FoldError
from .base import FoldBackend
from .checkpoint_formats import SUPPORTED, CheckpointFormat, QuantBackend, QuantModule, negative_refusal, unnest_bnb
from .dense import DenseBackend
from .plan import plan_fold
from .misfit import refusal
from .checkpoint_files import CONFIG_FILE
from .safetensors_io import _CASTABLE, _Scale, _Source, _numel, _read_tensor_at

_DENSE = DenseBackend()
_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


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


@dataclass
class CheckpointPlan:
    """What the streaming fold writes: each changed tensor's scale, tensors written anew (None:
    dropped), and a new quantization_config where the fold changes it (None: unchanged)."""

    scales: dict[str, _Scale]
    model_type: str
    replaced: dict[str, Optional[Tensor]]
    quantization_config: Optional[dict[str, Any]] = None
    widened: list[str] = field(default_factory=list)  # modules moved from per-tensor to per-channel scales


# Modules that serving engines fuse into one layer (vLLM's packed_modules_mapping): they must share
# one quantization scheme, so widening one widens its siblings (their scales unchanged).
_FUSED = ({"q_proj", "k_proj", "v_proj"}, {"gate_proj", "up_proj"})


def _to_skel(name: str, skel_path: str, ckpt: str) -> str:
    """The skeleton path of checkpoint module ``name``, by the prefix rewrite of ``skel_path`` -> ``ckpt``."""
    if ckpt == skel_path:
        return name
    if ckpt.endswith(skel_path):
        return name.removeprefix(ckpt[: -len(skel_path)])
    return skel_path[: -len(ckpt)] + name


def _fused_siblings(path: str, to_ckpt: Callable[[str], str], skeleton: nn.Module) -> list[str]:
    parent, _, leaf = path.rpartition(".")
    for group in _FUSED:
        if leaf in group:
            owner = skeleton.get_submodule(parent) if parent else skeleton
            return [to_ckpt(f"{parent}.{n}" if parent else n) for n in sorted(group - {leaf}) if hasattr(owner, n)]
    return []


def _rewriter(found: dict[str, str]) -> Callable[[str], str]:
    """Skeleton path -> checkpoint name, by the one prefix rewrite that ``found`` shows."""
    for path, name in found.items():
        if name == path:
            break
        if name.endswith("." + path):
            prefix = name[: -len(path)]
            return lambda p: prefix + p
        dropped = path[: -len(name)]
        return lambda p: p.removeprefix(dropped)
    return lambda p: p


def _plan(
    adapter: IA3Adapter, skeleton: nn.Module, sources: dict[str, _Source], fmt: Optional[CheckpointFormat] = None
) -> CheckpointPlan:
    """Checkpoint tensor name -> its scale; checks every module before anything is written.

    Also the tensors a format rewrites whole (None: dropped): a double-quantized bnb 4-bit module
    whose rows take a scale is unnested first (`unnest_bnb`); a compressed-tensors per-tensor scale
    is widened to one per row (the same value each), with a config group that says so, and so are
    the scales of the modules an engine fuses with it (q/k/v, gate/up).

    The decisions are `plan_fold`'s on the meta-device skeleton, with the checkpoint format's
    backends: `DenseBackend` for full-precision modules (an output-side vector scales its rows and
    bias, a feed-forward one its columns), a `QuantBackend` for each quantized module (rows scale
    its statistics; a feed-forward vector moves to the neighbour's rows); here they are only mapped
    to tensor names.
    """
    model_type = getattr(getattr(skeleton, "config", None), "model_type", type(skeleton).__name__)
    weighted = {n for n, m in skeleton.named_modules() if isinstance(getattr(m, "weight", None), Tensor)}
    what = f"the model built from config.json ({type(skeleton).__name__}, model type {model_type!r})"
    to_skel, absent, problems = _resolve(list(adapter.vectors), weighted, what)
    ckpt_modules = {n.rsplit(".", 1)[0] for n in sources}
    found, _, more = _resolve(sorted(set(to_skel.values())), ckpt_modules, "the checkpoint's tensors")
    problems += more
    if problems:
        raise FoldError(
            refusal(
                "this checkpoint",
                misfits=[],
                problems=problems,
                modules=len(adapter.vectors),
                where=what,
                trained_on=None,
            )
        )
    to_ckpt = _rewriter(found)
    quant: dict[str, QuantModule] = {}

    def backends(module: nn.Module, path: str) -> Optional[FoldBackend]:
        if not _DENSE.handles(module):
            return None
        if fmt is None:
            return _DENSE
        q = fmt.module(to_ckpt(path), *_DENSE.features(module), sources)
        if q is None:
            return _DENSE
        quant[path] = q
        return QuantBackend(q, _DENSE.features(module))

    renamed = {to_skel.get(p, p): v for p, v in adapter.vectors.items()}
    feedforward = {to_skel.get(p, p): adapter.feedforward[p] for p in adapter.vectors}
    supported = "the streaming fold scales nn.Linear, Conv1D and Conv2d/Conv3d weights" + (
        f" and the quantized modules of {SUPPORTED} checkpoints" if fmt is not None else ""
    )
    works = plan_fold(
        skeleton,
        renamed,
        feedforward,
        trained_on=adapter.base_model,
        backends=backends,
        supported=supported,
        target="this checkpoint",
        where=what,
    )
    from_skel = {v: k for k, v in to_skel.items()}

    scales: dict[str, _Scale] = {}
    replaced: dict[str, Optional[Tensor]] = {}  # tensors written anew (None: dropped), e.g. unnested bnb statistics
    widened: list[str] = []  # compressed-tensors modules moved from per-tensor to per-channel scales
    for w in works:
        modules = tuple(from_skel.get(p, p) for p in w.sources)
        ckpt = to_ckpt(w.path)
        q = quant.get(w.path)
        if q is not None:
            if w.lossy is not None:
                problems.append(
                    f"{ckpt!r} ({q.format}) cannot take its IA3 scale exactly ({w.lossy}); the streaming fold writes "
                    "no lossy tensor: keep this adapter unmerged (PEFT or ia3fuse.Mixture) or fold it into the "
                    "full-precision checkpoint and quantize that"
                )
                continue
            assert w.rows is not None and w.cols is None  # a quantized module takes rows only, else lossy
            negative = int((w.rows < 0).sum())
            if negative and not q.negative_ok:
                problems.append(negative_refusal(q, ckpt, negative))
                continue
            if q.nested is not None:
                replaced.update(unnest_bnb(q.nested, sources))
            if q.widen is not None:
                for name in [ckpt, *_fused_siblings(w.path, to_ckpt, skeleton)]:
                    key = f"{name}.weight_scale"
                    per_tensor = key in sources and _numel(sources[key].shape) == 1
                    if per_tensor and name not in widened:
                        n_out = _DENSE.features(skeleton.get_submodule(_to_skel(name, w.path, ckpt)))[0]
                        replaced[key] = _read_tensor_at(sources[key]).reshape(1, 1).expand(n_out, 1).clone()
                        widened.append(name)
            for stat in q.stats:
                scales[stat.name] = _Scale(w.rows, None, False, False, 1, modules, view=stat.view, axis=stat.axis)
            bias = sources.get(f"{ckpt}.bias")
            if bias is not None and bias.dtype in _CASTABLE:
                scales[bias.name] = _Scale(w.rows, None, True, False, 1, modules)
            continue
        if f"{ckpt}.weight" not in sources:
            problems.append(
                f"the checkpoint has no tensor of {w.path!r}, which config.json builds; the checkpoint and its "
                "config.json disagree"
            )
            continue
        transposed, groups = _layout(w.module)
        for role in ("weight", "bias"):
            param = getattr(w.module, role, None)
            key = f"{ckpt}.{role}"
            src = sources.get(key)
            if param is None:
                if src is not None:
                    problems.append(f"the checkpoint holds {key!r} but config.json builds {w.path!r} without a bias")
                continue
            if src is None:
                problems.append(f"the checkpoint lacks {key!r}, which config.json's {w.path!r} has")
            elif src.shape != tuple(param.shape):
                problems.append(
                    f"the checkpoint's {key!r} has shape {src.shape} but config.json builds {tuple(param.shape)}; "
                    "the checkpoint and its config.json disagree"
                )
            elif src.dtype not in _CASTABLE:
                problems.append(
                    f"the checkpoint's {key!r} is {src.dtype}; the streaming fold scales float tensors only"
                )
            elif role == "weight" or w.rows is not None:  # an input-side scale leaves the bias alone
                scales[key] = _Scale(
                    w.rows, w.cols if role == "weight" else None, role == "bias", transposed, groups, modules
                )
    if problems:
        raise FoldError(f"cannot fold the adapter into this checkpoint: {summarize(problems)}")
    quant_config = None
    if widened:
        assert fmt is not None  # only a compressed-tensors format widens
        quant_config = fmt.widened_config(widened)
    return CheckpointPlan(scales, model_type, replaced, quant_config, sorted(widened))


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
