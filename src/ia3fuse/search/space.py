"""What a weight search varies, and the fused vector as a differentiable function of it.

`WeightSpace` maps the free weights ``theta`` of shape ``(K, G)`` (K adapters, G groups of
modules: one group, one per layer, or one per layer and module kind) onto every entry of the
flat index, and back into a weight schedule that `ia3fuse.merge` reproduces exactly.
The fused vector as a differentiable function of the weights is the method's form
(`ia3fuse.forms.MethodForm`), shared with `ia3fuse.Mixture`.
"""

from __future__ import annotations

import re
from typing import Any, Literal

import torch
from torch import Tensor

from ..errors import InvalidParameterError
from ..forms import MethodForm, formed_methods
from ..scaling import TaskStack
from ..weights import WeightSchedule

__all__ = ["GRANULARITIES", "WeightSpace", "MethodForm", "SEARCHABLE_METHODS"]  # MethodForm: from ia3fuse.forms

Granularity = Literal["task", "layer", "module"]
GRANULARITIES = ("task", "layer", "module")

# The built-in methods with a form (`ia3fuse.forms`); a method registered later with a form is
# searchable too.
SEARCHABLE_METHODS = formed_methods()


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
