"""Run-time IA3 scaling: K adapters' vectors on one flat index, applied to a model by hooks.

`TaskStack` lays the modules of K adapters (their union, identity-filled) side by side on a
flat index of N entries, so a whole adapter is one row of a ``(K, N)`` tensor and a fused
adapter is one ``(N,)`` vector. `ScaleHooks` multiplies each IA3 module's output (or input,
for feed-forward modules) by its slice of a flat scale tensor set by the caller: ``(N,)`` for
one vector, ``(B, N)`` for one per sample, ``(B, T, N)`` for one per token. Weight search and
dynamic mixtures both run on these two pieces: the base model is hooked once, and a new
candidate or mixture is one tensor assignment, with no re-injection and no re-merge.

The hooks compute what PEFT's IA3 layers compute: output-side ``(W x + b) * l``, feed-forward
``W (x * l) + b``, in the vector's dtype, cast back to the activation's dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
from torch import Tensor, nn

from ._text import summarize
from .adapter import IA3Adapter
from .errors import IA3FuseError, IncompatibleAdaptersError
from .stack import ModulePlan, plan_modules
from .weights import layer_positions

__all__ = ["Segment", "TaskStack", "ScaleHooks", "module_size"]


@dataclass(frozen=True)
class Segment:
    """One IA3 module on the flat index: entries ``offset : offset + size``."""

    path: str
    feedforward: bool
    shape: tuple[int, ...]
    offset: int
    size: int
    layer: Optional[str]  # "stack.index" of its numbered layer (e.g. "model.layers.3"), or None

    @property
    def kind(self) -> str:
        return "feedforward" if self.feedforward else "attention"


def _layer_of(path: str) -> Optional[str]:
    parts = path.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return None


class TaskStack:
    """The vectors of K adapters on one flat index (modules: their union; absent = identity).

    Attributes:
        adapters: the K adapters, in order.
        segments: one `Segment` per module, in first-seen order.
        vectors: ``(K, N)`` float32 tensor of the IA3 vectors ``l`` (1 where an adapter lacks a module).
    """

    def __init__(self, adapters: Sequence[IA3Adapter], *, device: Any = "cpu", dtype: torch.dtype = torch.float32):
        if not adapters:
            raise IncompatibleAdaptersError("no adapters given; pass at least one adapter")
        names = [a.name for a in adapters]
        if len(set(names)) != len(names):
            raise IncompatibleAdaptersError(
                f"adapter names repeat ({', '.join(names)}); give each adapter a distinct name"
            )
        self.adapters = list(adapters)
        plans: list[ModulePlan] = plan_modules(self.adapters)
        segments, offset = [], 0
        for m in plans:
            size = 1
            for d in m.shape:
                size *= d
            segments.append(Segment(m.path, m.feedforward, m.shape, offset, size, _layer_of(m.path)))
            offset += size
        self.segments: list[Segment] = segments
        rows = []
        for a in self.adapters:
            parts = [
                a.vectors[s.path].detach().reshape(-1).to("cpu", torch.float64)
                if s.path in a.vectors
                else torch.ones(s.size, dtype=torch.float64)
                for s in segments
            ]
            rows.append(torch.cat(parts))
        self.vectors: Tensor = torch.stack(rows).to(device=device, dtype=dtype)

    @property
    def names(self) -> list[str]:
        return [a.name for a in self.adapters]

    @property
    def size(self) -> int:
        return self.vectors.shape[1]

    def layers(self) -> list[str]:
        """The numbered layers in order of depth per stack (e.g. encoder then decoder), then "other"."""
        seen = list(dict.fromkeys(s.layer for s in self.segments if s.layer is not None))
        depth = layer_positions(seen)
        stacks = list(dict.fromkeys(name.rsplit(".", 1)[0] for name in seen))
        ordered = sorted(seen, key=lambda n: (stacks.index(n.rsplit(".", 1)[0]), depth[n] or 0.0))
        if any(s.layer is None for s in self.segments):
            ordered.append("other")
        return ordered

    def unflatten(self, flat: Tensor) -> dict[str, Tensor]:
        """A flat ``(N,)`` vector as {module path: vector in the adapters' shape} (on CPU)."""
        flat = flat.detach().to("cpu")
        return {s.path: flat[s.offset : s.offset + s.size].reshape(s.shape).clone() for s in self.segments}


def module_size(module: nn.Module, feedforward: bool) -> Optional[int]:
    """How many entries an IA3 vector of this module has, or None for a module type we don't know."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency
        Conv1D = ()  # type: ignore[assignment,misc]  # isinstance(x, ()) is False
    base = getattr(module, "base_layer", module)  # a PEFT wrapper holds the real layer
    if isinstance(base, nn.modules.conv._ConvNd):
        return base.in_channels if feedforward else base.out_channels
    if isinstance(base, Conv1D):
        return base.weight.shape[0] if feedforward else base.nf
    if hasattr(base, "in_features") and hasattr(base, "out_features"):  # nn.Linear and bitsandbytes layers
        # torch types an unknown Module attribute as Tensor | Module; these are ints
        return int(base.in_features if feedforward else base.out_features)  # type: ignore[arg-type]
    return None


def _is_conv(module: nn.Module) -> bool:
    return isinstance(getattr(module, "base_layer", module), nn.modules.conv._ConvNd)


class ScaleHooks:
    """Hooks on a model's IA3 modules that apply slices of one flat scale tensor.

    Set ``hooks.scales`` to ``None`` (no scaling), a ``(N,)`` tensor, a ``(B, N)`` tensor (one
    vector per sample; a batch of ``B * r`` rows, as beam search and ``num_return_sequences``
    make with ``repeat_interleave``, repeats each sample's vector ``r`` times) or a
    ``(B, T, N)`` tensor (one vector per token of a ``T``-token forward). Gradients flow
    through the scales.

    Raises:
        IncompatibleAdaptersError: a module the stack scales is missing from the model, or its
            size differs from the adapters' vectors (adapters of another base model).
    """

    def __init__(self, model: nn.Module, segments: Sequence[Segment], *, model_name: str = "the model"):
        problems = []
        targets = []
        for s in segments:
            try:
                module = model.get_submodule(s.path)
            except AttributeError:
                problems.append(f"it has no module {s.path!r}")
                continue
            size = module_size(module, s.feedforward)
            if size is None:
                problems.append(
                    f"module {s.path!r} is a {type(module).__name__}, which IA3 cannot scale (Linear, Conv1D and Conv layers can)"
                )
            elif size != s.size:
                side = "input" if s.feedforward else "output"
                problems.append(f"module {s.path!r} has {size} {side} features but the adapters' vectors have {s.size}")
            else:
                targets.append((s, module))
        if problems:
            shown = summarize(problems, 4)
            model_type = getattr(getattr(model, "config", None), "model_type", None)
            what = type(model).__name__ + (f", model type {model_type!r}" if model_type else "")
            raise IncompatibleAdaptersError(
                f"the adapters do not fit {model_name} ({what}): {shown}; pass the base model the "
                "adapters were trained on"
            )
        self.scales: Optional[Tensor] = None
        self._expanded: dict[int, Tensor] = {}
        self._expanded_for: Optional[Tensor] = None
        self._handles = []
        for s, module in targets:
            conv = _is_conv(module)
            if s.feedforward:
                self._handles.append(module.register_forward_pre_hook(self._input_hook(s, conv)))
            else:
                self._handles.append(module.register_forward_hook(self._output_hook(s, conv)))

    def remove(self) -> None:
        """Take every hook off the model."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self.scales = None

    def _batched(self, rows: int) -> Tensor:
        scales = self.scales
        assert scales is not None
        b = scales.shape[0]
        if rows == b:
            return scales
        if rows % b:
            raise IA3FuseError(
                f"the mixture weights hold {b} rows but the model ran a batch of {rows}; pass one row of weights per sample"
            )
        if self._expanded_for is not scales:
            self._expanded, self._expanded_for = {}, scales
        if rows not in self._expanded:
            self._expanded[rows] = scales.repeat_interleave(rows // b, dim=0)
        return self._expanded[rows]

    def _scale_for(self, s: Segment, act: Tensor, conv: bool) -> Tensor:
        return self._slice(s, act, conv).to(act.device, non_blocking=True)

    def _slice(self, s: Segment, act: Tensor, conv: bool) -> Tensor:
        scales = self.scales
        assert scales is not None
        if scales.dim() == 1:
            vec = scales[s.offset : s.offset + s.size]
            return vec.view(-1, *([1] * (act.dim() - 2))) if conv else vec
        if scales.dim() == 2:
            vec = self._batched(act.shape[0])[:, s.offset : s.offset + s.size]
            if conv:
                return vec.view(vec.shape[0], -1, *([1] * (act.dim() - 2)))
            return vec.view(vec.shape[0], *([1] * (act.dim() - 2)), -1)
        vec = self._batched(act.shape[0])[:, :, s.offset : s.offset + s.size]
        if conv or act.dim() != 3 or act.shape[1] != vec.shape[1]:
            raise IA3FuseError(
                f"per-token weights cover {vec.shape[1]} tokens but module {s.path!r} ran on an activation of shape "
                f"{tuple(act.shape)}; pass per-token weights only to a forward over exactly those tokens "
                "(not to generate(), whose steps see one token; use per-sample weights there)"
            )
        return vec

    def _output_hook(self, s: Segment, conv: bool) -> Any:
        def hook(module: nn.Module, args: Any, output: Tensor) -> Optional[Tensor]:
            if self.scales is None:
                return None
            return (output * self._scale_for(s, output, conv)).to(output.dtype)

        return hook

    def _input_hook(self, s: Segment, conv: bool) -> Any:
        def hook(module: nn.Module, args: tuple) -> Optional[tuple]:
            if self.scales is None or not args:
                return None
            x = args[0]
            return ((x * self._scale_for(s, x, conv)).to(x.dtype), *args[1:])

        return hook
