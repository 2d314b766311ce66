"""A fusion method as a differentiable function of its weights, from the form it declares at
registration (`ia3fuse.fusion.register(..., form=...)`). One module, used by the weight search
(per-entry weights ``(K, N)``) and by mixtures (per-sample weights ``(B, K)``):

* ``linear``: ``sum_k w_k l_k``; ``log``: ``exp(sum_k w_k log l_k)``;
* ``delta``: ``1 + lam * sum_k w_k B_k`` over a basis computed once, ``B_k + 1`` being what the
  method makes of adapter k alone (weight 1, ``lam=1``): its pruning, drops or low-rank
  approximation exactly as the method computes them;
* ``elected``: TIES-style, the ``delta`` basis with its sign election held fixed at the weights the
  form is built with (`ia3fuse.fusion._masks.elect`, the function ``ties`` itself uses), then the
  weighted mean of the agreeing entries.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .errors import InvalidParameterError, MethodInputError
from .fusion import get_method, methods
from .fusion._masks import elect
from .scaling import TaskStack
from .stack import module_seed

__all__ = ["MethodForm", "formed_methods", "mix"]


def formed_methods() -> tuple[str, ...]:
    """The registered methods that declare a form: the ones search and mixtures can use."""
    return tuple(m.name for m in methods() if m.form is not None)


class MethodForm:
    """A fusion method over the adapters of ``stack`` as a differentiable function of its weights.

    Args:
        stack: the adapters on the flat index.
        method: a registered method that declares a form.
        params: its validated parameters.
        init: per-entry weights ``(K, N)`` at which sign-elected forms fix their election.
        device: where the basis lives (the model's device).
    """

    def __init__(self, stack: TaskStack, method: str, params: dict[str, Any], init: Tensor, device: Any):
        spec = get_method(method)
        if spec.form is None:
            raise InvalidParameterError(
                f"method {method!r} declares no form, so it has no differentiable function of its weights; pass one of "
                f"{', '.join(formed_methods())}, or register it with form=..."
            )
        self.method, self.kind = method, spec.form
        self.lam = float(params.get("lam", 1.0))
        vectors = stack.vectors.to("cpu", torch.float32)
        if self.kind == "linear":
            basis = vectors
        elif self.kind == "log":
            low = vectors.min().item()
            if not low > 0:
                raise MethodInputError(
                    f"geometric fusion takes log(l), so every IA3 value must be > 0, but the adapters hold {low:.6g}; "
                    "use method 'task_arithmetic' (delta space), which accepts any value"
                )
            basis = vectors.double().log().float()
        else:
            basis = self._basis(stack, method, params)
        self.basis = basis.to(device)
        self.agree = None
        if self.kind == "elected":
            weighted = self.basis * init.to(self.basis)
            self.agree = elect(weighted, params.get("majority_sign_method", "total")).to(self.basis.dtype)

    @staticmethod
    def _basis(stack: TaskStack, method: str, params: dict[str, Any]) -> Tensor:
        """Row k = what the method makes of adapter k's task vector alone (one-hot weights, lam = 1)."""
        spec = get_method(method)
        k = len(stack.adapters)
        call = {**params, **({"lam": 1.0} if any(p.name == "lam" for p in spec.params) else {})}
        parts = []
        for s in stack.segments:
            seg = stack.vectors[:, s.offset : s.offset + s.size].to("cpu", torch.float32).reshape(k, *s.shape)
            if spec.randomized:
                call["seed"] = module_seed(params["seed"], s.path)
            rows = [spec.fn(seg, torch.eye(k, dtype=torch.float64)[i], **call).reshape(-1) - 1 for i in range(k)]
            parts.append(torch.stack(rows))
        return torch.cat(parts, dim=1)

    def __call__(self, weights: Tensor) -> Tensor:
        """The fused IA3 vector ``(N,)`` for per-entry weights ``(K, N)`` (the weight search)."""
        w = weights.to(self.basis.dtype)
        if self.kind == "linear":
            return (w * self.basis).sum(0)
        if self.kind == "log":
            return (w * self.basis).sum(0).exp()
        if self.kind == "delta":
            return 1 + self.lam * (w * self.basis).sum(0)
        assert self.agree is not None
        num = (w * self.basis * self.agree).sum(0)
        den = (w.abs() * self.agree).sum(0)
        merged = torch.where(den > 0, num / den.clamp_min(torch.finfo(den.dtype).tiny), torch.zeros_like(num))
        return 1 + self.lam * merged


def mix(kind: str, rows: Tensor, basis: Tensor, lam: float, agree: Any = None, ones: Any = None) -> Tensor:
    """The fused IA3 vectors ``(B, N)`` for per-sample weights ``rows`` ``(B, K)`` (mixtures): one
    ``(B, K) x (K, N)`` product per form, with the basis (and election) of a `MethodForm`;
    ``ones``: a ``(1, N)`` buffer of ones to reuse (the delta form's identity)."""
    if kind == "delta":  # 1 + lam * rows @ basis in one kernel
        if ones is None:
            ones = torch.ones(1, basis.shape[1], device=basis.device, dtype=basis.dtype)
        return torch.addmm(ones, rows, basis, alpha=lam)
    if kind == "linear":
        return rows @ basis
    if kind == "log":
        return (rows @ basis).exp_()
    num = rows @ (basis * agree)
    den = rows.abs() @ agree
    merged = torch.where(den > 0, num / den.clamp_min(torch.finfo(den.dtype).tiny), torch.zeros_like(num))
    return 1 + lam * merged
