"""Full-precision layers (fp32/fp16/bf16 nn.Linear, GPT-2's Conv1D, Conv2d/Conv3d).

Rows and columns both fold exactly: the scale is applied in float32 and rounded once to the
weight's dtype, the same rounding the unmerged IA3 forward does to its activations.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from .base import FoldOptions, Snapshot, register_backend
from .math import scale_bias, scale_weight

__all__ = ["DenseBackend"]


def _conv1d_type() -> Optional[type]:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency
        return None
    return Conv1D


# torch types a Module attribute as ``Tensor | Module``; handles() checked that these are tensors.
def _weight(module: nn.Module) -> Tensor:
    w = module.weight
    assert isinstance(w, Tensor)
    return w


def _bias(module: nn.Module) -> Optional[Tensor]:
    b = getattr(module, "bias", None)
    assert b is None or isinstance(b, Tensor)
    return b


class DenseBackend:
    """nn.Linear, transformers' Conv1D (weight stored (in, out)) and nn.Conv2d/Conv3d."""

    name = "dense"

    def handles(self, module: nn.Module) -> bool:
        conv1d = _conv1d_type()
        types: tuple[type, ...] = (nn.Linear, nn.Conv2d, nn.Conv3d) + ((conv1d,) if conv1d else ())
        weight = getattr(module, "weight", None)
        return (
            isinstance(module, types)
            and isinstance(weight, Tensor)
            and type(weight) in (Tensor, nn.Parameter)  # not a quantized subclass
            and weight.is_floating_point()
        )

    def _is_conv1d(self, module: nn.Module) -> bool:
        conv1d = _conv1d_type()
        return conv1d is not None and isinstance(module, conv1d)

    def features(self, module: nn.Module) -> tuple[int, int]:
        if isinstance(module, (nn.Conv2d, nn.Conv3d)):
            return module.out_channels, module.in_channels
        if self._is_conv1d(module):
            w = _weight(module)
            return w.shape[1], w.shape[0]
        assert isinstance(module, nn.Linear)  # handles() accepted it
        return module.out_features, module.in_features

    def exact_rows(self, module: nn.Module) -> Optional[str]:
        return None

    def exact_cols(self, module: nn.Module) -> Optional[str]:
        return None

    def snapshot(self, module: nn.Module, *, weights: bool) -> Snapshot:
        snap: Snapshot = {}
        if weights:
            snap["weight"] = _weight(module).detach().clone()
            bias = _bias(module)
            if bias is not None:
                snap["bias"] = bias.detach().clone()
        return snap

    def restore(self, module: nn.Module, snap: Snapshot) -> None:
        with torch.no_grad():
            _weight(module).copy_(snap["weight"])
            if "bias" in snap:
                bias = _bias(module)
                assert bias is not None  # snapshot() saved it because there was one
                bias.copy_(snap["bias"])

    def _apply(self, module: nn.Module, rows: Optional[Tensor], cols: Optional[Tensor]) -> None:
        with torch.no_grad():
            w = _weight(module)
            groups = getattr(module, "groups", 1)
            new = scale_weight(w.detach(), rows, cols, transposed=self._is_conv1d(module), groups=groups)
            w.copy_(new.to(w.dtype))
            bias = _bias(module)
            if rows is not None and bias is not None:
                bias.copy_(scale_bias(bias.detach(), rows).to(bias.dtype))

    def scale_rows(self, module: nn.Module, rows: Tensor, *, options: FoldOptions) -> str:
        self._apply(module, rows, None)
        return "dense"

    def scale_cols(self, module: nn.Module, cols: Tensor, *, options: FoldOptions) -> str:
        self._apply(module, None, cols)
        return "dense"

    def requantize(
        self, module: nn.Module, rows: Optional[Tensor], cols: Optional[Tensor], *, options: FoldOptions
    ) -> str:
        self._apply(module, rows, cols)  # nothing to requantize: exact in full precision
        return "dense"

    def dequantize(self, module: nn.Module) -> Tensor:
        w = _weight(module).detach().to(torch.float32, copy=True)
        if self._is_conv1d(module):
            return w.t()
        return w.reshape(w.shape[0], -1)


register_backend(DenseBackend())
