"""Which weight takes which scale: IA3 module paths -> row/column scales per weight module.

Output-side vectors scale their own module's rows. Input-side (feed-forward) vectors scale
their own module's columns when its format allows that exactly (full precision); otherwise
they move to a neighbour whose *rows* produce that input, where the math allows it exactly:

* gated MLP ``down(act(gate x) * up x)``: scaling down's inputs = scaling up's output rows
  (Llama, Mistral, Qwen, Gemma, Mixtral's w1/w2/w3, Phi-3's fused ``gate_up_proj``);
* ReLU MLP ``fc2(relu(fc1 x + b))`` with every l > 0: relu(z) * l = relu(z * l), so fc1's rows
  and bias take l (OPT).

Anything else needs the lossy dequantize-scale-requantize fallback.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from ..errors import FoldError
from .base import FoldBackend, backend_for
from .misfit import refusal

__all__ = ["Work", "plan_fold", "place_input", "relu_blocked", "BackendFor"]

# down-projection name -> (name of the module whose rows feed it, name of the gate beside it)
_GATED = {"down_proj": ("up_proj", "gate_proj"), "w2": ("w3", "w1")}
_RELU_PAIRS = {"fc2": "fc1"}
_RELU_NAMES = {"relu"}
_SUPPORTED = (
    "ia3fuse folds into nn.Linear, Conv1D, Conv2d/Conv3d, bitsandbytes Linear8bitLt/Linear4bit, torchao-quantized "
    "Linear and HQQLinear"
)

# (module, its path) -> the backend that folds into it, or None when none does
BackendFor = Callable[[nn.Module, str], Optional[FoldBackend]]


def relu_blocked(l: Any) -> Optional[str]:
    """None when ``relu(z) * l = relu(z * l)`` holds for every entry (all l > 0), else why not."""
    return None if bool((l > 0).all()) else "the ReLU rewrite (relu(z) * l = relu(z * l)) needs every l > 0"


def place_input(cols: Optional[str], neighbour: Optional[str]) -> tuple[str, Optional[str]]:
    """The one decision for an input-side (feed-forward) vector, shared by every fold.

    Args:
        cols: None when the module's own columns take the scale exactly, else why not.
        neighbour: None when a neighbour's rows produce this input and take the scale exactly,
            else why not.

    Returns:
        ``("cols", None)``, ``("neighbour", None)``, or ``("cols", reason)``: the lossy fallback,
        with both reasons.
    """
    if cols is None:
        return "cols", None
    if neighbour is None:
        return "neighbour", None
    return "cols", f"{cols}; {neighbour}"


@dataclass
class Work:
    """Everything that happens to one weight module."""

    path: str
    module: nn.Module
    backend: FoldBackend
    rows: Optional[Tensor] = None
    cols: Optional[Tensor] = None
    sources: list[str] = field(default_factory=list)
    how: list[str] = field(default_factory=list)
    lossy: Optional[str] = None

    def add_rows(self, scale: Tensor) -> None:
        self.rows = scale if self.rows is None else self.rows * scale

    def add_cols(self, scale: Tensor) -> None:
        self.cols = scale if self.cols is None else self.cols * scale


class _Absent(Exception):
    """The model has no module at the adapter's path."""


def _module(model: nn.Module, path: str) -> nn.Module:
    try:
        module = model.get_submodule(path)
    except AttributeError:
        raise _Absent(path) from None
    while isinstance(
        base := getattr(module, "base_layer", None), nn.Module
    ):  # a PEFT wrapper: fold into its base layer
        module = base
    return module


def _activation(model: nn.Module) -> Optional[str]:
    cfg = getattr(model, "config", None)
    for key in ("activation_function", "hidden_act", "hidden_activation"):
        value = getattr(cfg, key, None)
        if isinstance(value, str):
            return value
    return None


def _neighbour(model: nn.Module, path: str, l: Tensor) -> tuple[Optional[tuple[str, Optional[slice]]], str]:
    """The module whose output rows feed ``path``'s input exactly, or None with the reason."""
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    prefix = f"{parent_path}." if parent_path else ""
    if name in _GATED:
        up, gate = _GATED[name]
        if isinstance(getattr(parent, up, None), nn.Module) and isinstance(getattr(parent, gate, None), nn.Module):
            return (prefix + up, None), f"gated MLP: {up} rows"
    if name == "down_proj" and isinstance(getattr(parent, "gate_up_proj", None), nn.Module):
        n = l.numel()
        return (prefix + "gate_up_proj", slice(n, 2 * n)), "gated MLP: up half of gate_up_proj rows"
    if name in _RELU_PAIRS and isinstance(getattr(parent, _RELU_PAIRS[name], None), nn.Module):
        act = _activation(model)
        if act not in _RELU_NAMES:
            return None, f"{_RELU_PAIRS[name]} -> {name} has activation {act!r}, not ReLU"
        blocked = relu_blocked(l)
        if blocked is not None:
            return None, blocked
        return (prefix + _RELU_PAIRS[name], None), "ReLU MLP: fc1 rows and bias"
    return None, "no exact rewrite for this module's input (not a gated or ReLU MLP)"


def _registered(module: nn.Module, path: str) -> Optional[FoldBackend]:
    return backend_for(module)


def plan_fold(
    model: nn.Module,
    vectors: dict[str, Tensor],
    feedforward: dict[str, bool],
    *,
    trained_on: Optional[str] = None,
    backends: BackendFor = _registered,
    supported: str = _SUPPORTED,
    target: str = "this model",
    where: Optional[str] = None,
) -> list[Work]:
    """Decide, for every IA3 vector, which weight module takes it and how; check shapes.

    The one planner of every fold into a model's structure: `ia3fuse.fold` plans on the loaded
    model, the checkpoint fold on the meta-device skeleton built from ``config.json`` with the
    backends of the checkpoint's format.

    Args:
        trained_on: the adapter's base model name, for the message when its modules do not fit.
        backends: the backend of each module (default: the registered in-memory backends).
        supported: what those backends fold into, for the message naming an unsupported layer.
        target, where: what the refusal names as the fold's target and the model matched against.

    Raises:
        FoldError: modules the model lacks or of another length (counted once, with two
            examples: an adapter of another base), an unsupported layer type, a weight tied to
            another module's, listing every problem before anything is changed.
    """
    model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
    works: dict[str, Work] = {}
    problems: list[str] = []
    misfits: list[str] = []
    names: dict[int, list[str]] = {}  # id(parameter) -> all its names: more than one = tied weights
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)

    def work(path: str) -> Optional[Work]:
        if path not in works:
            module = _module(model, path)
            backend = backends(module, path)
            if backend is None:
                problems.append(f"{path!r} is a {type(module).__name__} (model type {model_type!r}); {supported}")
                return None
            tied = [n for n in names.get(id(getattr(module, "weight", None)), []) if not n.startswith(f"{path}.")]
            if tied:
                raise FoldError(
                    f"{path!r} (model type {model_type!r}) has its weight tied to {', '.join(map(repr, tied))}; "
                    "folding it would change those too: keep this adapter unmerged (PEFT or ia3fuse.Mixture) "
                    "or untie the weights first"
                )
            works[path] = Work(path, module, backend)
        return works[path]

    for path, vec in vectors.items():
        try:
            w = work(path)
        except _Absent:
            misfits.append(f"{path!r} (absent)")
            continue
        except FoldError as exc:
            problems.append(str(exc))
            continue
        if w is None:
            continue
        l = vec.detach().reshape(-1).to("cpu", torch.float32)
        out_f, in_f = w.backend.features(w.module)
        want = in_f if feedforward[path] else out_f
        if l.numel() != want:
            side = "input" if feedforward[path] else "output"
            misfits.append(f"{path!r} ({want} {side} features, the adapter's vector {l.numel()})")
            continue
        if not feedforward[path]:
            w.add_rows(l)
            w.sources.append(path)
            w.how.append("rows")
            continue
        cols_reason = w.backend.exact_cols(w.module)
        target_, why = (None, "") if cols_reason is None else _neighbour(model, path, l)
        nbr = None
        if target_ is not None:
            try:
                nbr = work(target_[0])
            except (FoldError, _Absent):
                nbr = None
        nbr_reason: Optional[str]
        if nbr is None:
            nbr_reason = why if target_ is None else f"the neighbour {target_[0]!r} cannot take its rows"
        else:
            nbr_reason = nbr.backend.exact_rows(nbr.module)
        place, lossy = place_input(cols_reason, nbr_reason)
        if place == "neighbour":
            assert nbr is not None and target_ is not None  # place_input chose an existing neighbour
            n_out = nbr.backend.features(nbr.module)[0]
            scale = torch.ones(n_out)
            sl = target_[1] if target_[1] is not None else slice(0, n_out)
            if scale[sl].numel() != l.numel():
                problems.append(
                    f"{target_[0]!r} has {n_out} output rows, which do not match {path!r}'s {l.numel()} inputs"
                )
                continue
            scale[sl] = l
            nbr.add_rows(scale)
            nbr.sources.append(path)
            nbr.how.append(f"neighbour ({why})")
            continue
        w.add_cols(l)
        w.sources.append(path)
        w.how.append("cols")
        if lossy is not None:
            w.lossy = cols_reason if target_ is not None else lossy
    for w in works.values():
        if w.rows is not None and w.lossy is None:
            rows_reason = w.backend.exact_rows(w.module)
            if rows_reason is not None:
                w.lossy = rows_reason
    message = refusal(
        target,
        misfits=misfits,
        problems=problems,
        modules=len(vectors),
        where=where or f"the model (model type {model_type!r})",
        trained_on=trained_on,
    )
    if message:
        raise FoldError(message)
    return [w for w in works.values() if w.rows is not None or w.cols is not None]


def describe(work: Work) -> str:
    """The plan of one weight module in words (for reports)."""
    return ", ".join(h if s == work.path else f"{h} for {s}" for s, h in zip(work.sources, work.how))
