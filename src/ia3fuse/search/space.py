"""What a weight search varies, and the fused vector as a differentiable function of it.

`WeightSpace` maps the free weights ``theta`` of shape ``(K, G)`` (K adapters, G groups of
modules: one group, one per layer, or one per layer and module kind) onto every entry of the
flat index, and back into a weight schedule that `ia3fuse.merge` reproduces exactly.
`MethodForm` writes a fusion method as a function of per-entry weights ``W`` ``(K, N)``:
methods that are linear in the weights become ``1 + lam * sum_k W_k * B_k`` over a basis of
preprocessed task vectors computed once (pruned, dropped or low-rank, exactly as the method
computes them); TIES-style methods also hold their sign election fixed at the initial weights.
"""

from __future__ import annotations

import re
from typing import Any, Literal

import torch
from torch import Tensor

from ..errors import InvalidParameterError, MethodInputError
from ..stack import module_seed
from ..fusion import get_method
from ..scaling import TaskStack
from ..weights import WeightSchedule

__all__ = ["GRANULARITIES", "WeightSpace", "MethodForm", "SEARCHABLE_METHODS"]

Granularity = Literal["task", "layer", "module"]
GRANULARITIES = ("task", "layer", "module")

# Methods whose fused task vector is a weighted sum of per-adapter vectors that do not depend on
# the weights (masks, drops and low-rank bases depend only on the task vectors).
_DELTA_LINEAR = ("task_arithmetic", "magnitude_prune", "breadcrumbs", "dare_linear", "svd")
_ELECTED = ("ties", "dare_ties")
SEARCHABLE_METHODS = ("linear", "geometric", *_DELTA_LINEAR, *_ELECTED)


class WeightSpace:
    """The groups of modules that share one weight per adapter.

    Attributes:
        granularity: ``"task"`` (one group), ``"layer"`` (one per numbered layer, plus "other"
            for modules outside layers) or ``"module"`` (one per layer and module kind).
        groups: a label per group, e.g. ``"model.layers.3"`` or ``"model.layers.3:feedforward"``.
    """

    def __init__(self, stack: TaskStack, granularity: str):
        if granularity not in GRANULARITIES:
            raise InvalidParameterError(
                f"granularity={granularity!r} is not a search granularity; pass one of {', '.join(GRANULARITIES)}"
            )
        self.granularity = granularity
        self.stack = stack
        segs = stack.segments
        if granularity == "task":
            keys = ["all"] * len(segs)
        elif granularity == "layer":
            keys = [s.layer or "other" for s in segs]
        else:
            keys = [f"{s.layer or 'other'}:{s.kind}" for s in segs]
        if granularity == "task":
            order = ["all"]
        else:
            layers = stack.layers()
            order = sorted(set(keys), key=lambda k: (layers.index(k.split(":")[0]), k))
        self.groups: list[str] = order
        self.segment_group = [order.index(k) for k in keys]
        sizes = torch.tensor([s.size for s in segs])
        self._entry_group = torch.repeat_interleave(torch.tensor(self.segment_group), sizes)

    @property
    def shape(self) -> tuple[int, int]:
        return (len(self.stack.adapters), len(self.groups))

    def expand(self, theta: Tensor) -> Tensor:
        """Per-entry weights ``(K, N)`` from group weights ``theta`` ``(K, G)``."""
        return theta[:, self._entry_group.to(theta.device)]

    def initial(self, init: Any) -> Tensor:
        """Starting weights ``(K, G)`` float64: ``None`` = 1/K each, a number, or one value per adapter."""
        k, g = self.shape
        if init is None:
            return torch.full((k, g), 1.0 / k, dtype=torch.float64)
        values = torch.as_tensor(init, dtype=torch.float64)
        if values.dim() == 0:
            return values.expand(k, g).clone()
        if values.shape == (k,):
            return values.unsqueeze(1).expand(k, g).clone()
        if tuple(values.shape) == (k, g):
            return values.clone()
        raise InvalidParameterError(
            f"init has shape {tuple(values.shape)}; pass a number, one value per adapter ({k}), or a ({k}, {g}) table"
        )

    def schedule(self, theta: Tensor) -> Any:
        """The weights ``theta`` as `ia3fuse.merge` takes them, so merge reproduces the search's fusion.

        ``task``: a plain list; otherwise a `WeightSchedule` with one regex override per group
        (a layer's path prefix, narrowed to the exact module names of one kind for ``module``).
        """
        values = [[float(v) for v in row] for row in theta.detach().to("cpu", torch.float64).T.tolist()]
        if self.granularity == "task":
            return values[0]
        overrides = []
        default = values[0]
        for gi, label in enumerate(self.groups):
            layer = label.split(":")[0]
            paths = sorted(s.path for s, g in zip(self.stack.segments, self.segment_group) if g == gi)
            if layer == "other":
                if self.granularity == "layer":
                    default = values[gi]  # the one group of modules outside numbered layers
                    continue
                pattern = "^(?:" + "|".join(re.escape(p) for p in paths) + ")$"
            elif self.granularity == "layer":
                pattern = "^" + re.escape(layer) + r"\."
            else:
                rests = [p[len(layer) + 1 :] for p in paths]
                pattern = "^" + re.escape(layer) + r"\.(?:" + "|".join(re.escape(r) for r in rests) + ")$"
            overrides.append((pattern, values[gi]))
        return WeightSchedule(default=default, overrides=overrides)


class MethodForm:
    """A fusion method as a differentiable function of per-entry weights ``W`` ``(K, N)``.

    Args:
        stack: the adapters on the flat index.
        method: a method in `SEARCHABLE_METHODS`.
        params: its validated parameters.
        init: per-entry weights ``(K, N)`` at which TIES-style sign elections are fixed.
        device: where the basis lives (the model's device).
    """

    def __init__(self, stack: TaskStack, method: str, params: dict[str, Any], init: Tensor, device: Any):
        if method not in SEARCHABLE_METHODS:
            raise InvalidParameterError(
                f"method {method!r} has no differentiable form for weight search; pass one of {', '.join(SEARCHABLE_METHODS)}"
            )
        self.method = method
        self.lam = float(params.get("lam", 1.0))
        vectors = stack.vectors.to("cpu", torch.float32)
        if method == "linear":
            self.kind, basis = "linear", vectors
        elif method == "geometric":
            low = vectors.min().item()
            if not low > 0:
                raise MethodInputError(
                    f"geometric fusion takes log(l), so every IA3 value must be > 0, but the adapters hold {low:.6g}; "
                    "use method 'task_arithmetic' (delta space), which accepts any value"
                )
            self.kind, basis = "log", vectors.double().log().float()
        else:
            self.kind, basis = ("elected" if method in _ELECTED else "delta"), self._basis(stack, method, params)
        self.basis = basis.to(device)
        if self.kind == "elected":
            self.agree = self._election(init.to(self.basis), params.get("majority_sign_method", "total"))

    @staticmethod
    def _basis(stack: TaskStack, method: str, params: dict[str, Any]) -> Tensor:
        """Row k = what the method makes of adapter k's task vector alone (one-hot weights, lam = 1)."""
        spec = get_method(method)
        k = len(stack.adapters)
        call = {**params, "lam": 1.0}
        parts = []
        for s in stack.segments:
            seg = stack.vectors[:, s.offset : s.offset + s.size].to("cpu", torch.float32).reshape(k, *s.shape)
            if spec.randomized:
                call["seed"] = module_seed(params["seed"], s.path)
            rows = [spec.fn(seg, torch.eye(k, dtype=torch.float64)[i], **call).reshape(-1) - 1 for i in range(k)]
            parts.append(torch.stack(rows))
        return torch.cat(parts, dim=1)

    def _election(self, init: Tensor, majority: str) -> Tensor:
        weighted = self.basis * init
        signs = weighted.sign()
        votes = weighted.sum(0) if majority == "total" else signs.sum(0)
        elected = torch.where(votes >= 0, 1.0, -1.0).to(weighted.dtype)
        return (signs == elected).to(weighted.dtype)

    def __call__(self, weights: Tensor) -> Tensor:
        """The fused IA3 vector ``(N,)`` for per-entry weights ``(K, N)``."""
        w = weights.to(self.basis.dtype)
        if self.kind == "linear":
            return (w * self.basis).sum(0)
        if self.kind == "log":
            return (w * self.basis).sum(0).exp()
        if self.kind == "delta":
            return 1 + self.lam * (w * self.basis).sum(0)
        num = (w * self.basis * self.agree).sum(0)
        den = (w.abs() * self.agree).sum(0)
        merged = torch.where(den > 0, num / den.clamp_min(torch.finfo(den.dtype).tiny), torch.zeros_like(num))
        return 1 + self.lam * merged

