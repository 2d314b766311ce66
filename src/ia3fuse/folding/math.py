"""Pure fold math: diag(rows) W diag(cols) for every weight layout the fold handles.

Shared by the in-memory dense backend and the streaming checkpoint fold, so both give
bit-identical weights.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

__all__ = ["scale_weight", "scale_bias", "scale_bias_in_place", "fold_vector", "scale_dense"]


def scale_weight(
    weight: Tensor,
    rows: Optional[Tensor],
    cols: Optional[Tensor],
    *,
    transposed: bool = False,
    groups: int = 1,
) -> Tensor:
    """``diag(rows) W diag(cols)`` in float32, for any weight layout that `ia3fuse.fold` handles.

    The same float32 products, in the same order, as the in-memory dense fold, so both give
    bit-identical weights. ``weight`` is not changed.

    Args:
        weight: ``(out, in)`` (nn.Linear), ``(in, out)`` with ``transposed`` (GPT-2's Conv1D) or
            ``(out, in / groups, *kernel)`` (Conv2d/Conv3d).
        rows: one scale per output feature (channel), or None.
        cols: one scale per input feature (channel), or None.
        transposed: the weight is stored ``(in, out)``.
        groups: a convolution's groups.

    Returns:
        A new float32 tensor of ``weight``'s shape.
    """
    new = weight.to(torch.float32, copy=True)
    if rows is not None:
        shape = (1, -1) if transposed else (-1,) + (1,) * (new.dim() - 1)
        new.mul_(rows.to(torch.float32).reshape(shape))
    if cols is not None:
        cols = cols.to(torch.float32)
        if transposed:
            new.mul_(cols.reshape(-1, 1))
        elif new.dim() > 2:
            out_ch, in_pg = new.shape[0], new.shape[1]
            out_pg = out_ch // groups
            # weight[o, j] reads input channel (o // out_pg) * in_pg + j
            scale = cols.reshape(groups, 1, in_pg).expand(groups, out_pg, in_pg).reshape(out_ch, in_pg)
            new.mul_(scale.reshape(scale.shape + (1,) * (new.dim() - 2)))
        else:
            new.mul_(cols.reshape(1, -1))
    return new


def scale_bias(bias: Tensor, rows: Tensor) -> Tensor:
    """``bias * rows`` in float32 (an output-side IA3 vector scales the bias with the rows)."""
    return bias.float() * rows.to(torch.float32)


def scale_bias_in_place(bias: object, rows: Tensor) -> None:
    """A layer's bias (None or absent: nothing) times ``rows``, in float32, rounded to its dtype."""
    if isinstance(bias, Tensor):
        bias.copy_(scale_bias(bias.detach(), rows).to(bias.dtype))


def fold_vector(values: Tensor, n: int, what: str, layer: str, device: Optional[torch.device] = None) -> Tensor:
    """``values`` checked as one finite scale per output row (``what="rows"``) or input column
    (``"cols"``) of ``layer`` (its type name, for the message), as float64 on ``device`` (float32
    on Apple's MPS, which has no float64).

    Raises:
        FoldError: a wrong count or a NaN/Inf entry, named.
    """
    from ..errors import FoldError

    t = torch.as_tensor(values).detach().reshape(-1)
    if t.numel() != n:
        raise FoldError(
            f"{what} has {t.numel()} values but {layer} has {n}; pass one scale per "
            f"{'output row' if what == 'rows' else 'input column'}"
        )
    if not torch.isfinite(t).all():
        raise FoldError(f"{what} contains NaN or Inf; an IA3 scale must be finite")
    dtype = torch.float32 if device is not None and device.type == "mps" else torch.float64
    return t.to(device=device, dtype=dtype)


def scale_dense(dense: Tensor, rows: Optional[Tensor], cols: Optional[Tensor], layer: str) -> Optional[Tensor]:
    """The lossy fallback's middle step: a dequantized float32 weight ``(out, in)`` times
    ``diag(rows)`` and ``diag(cols)``, in place. Returns the checked row vector (`fold_vector`'s,
    for the bias) or None."""
    out, in_ = dense.shape
    l = None if rows is None else fold_vector(rows, out, "rows", layer, dense.device)
    if l is not None:
        dense.mul_(l.float()[:, None])
    if cols is not None:
        dense.mul_(fold_vector(cols, in_, "cols", layer, dense.device).float()[None, :])
    return l
