"""Masks and sign election shared by the sparsifying methods (pure tensor math)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported in the functions, as in fusion.py: the method registry loads without torch
    import torch
    from torch import Tensor


def keep_count(fraction: float, n: int) -> int:
    """How many of ``n`` entries a ``fraction`` keeps: at least one when fraction > 0."""
    return min(n, max(1, math.ceil(fraction * n - 1e-9))) if fraction > 0 else 0


def top_magnitude_mask(taus: Tensor, density: float) -> Tensor:
    """Per row of ``taus`` (k, n), keep the ``density`` fraction of entries of largest |tau|."""
    import torch

    k, n = taus.shape
    keep = keep_count(density, n)
    mask = torch.zeros_like(taus, dtype=torch.bool)
    if keep:
        idx = taus.abs().topk(keep, dim=1, sorted=False).indices
        mask.scatter_(1, idx, True)
    return mask


def band_mask(taus: Tensor, density: float, gamma: float) -> Tensor:
    """Per row, drop the top ``gamma`` fraction by |tau| and keep the next ``density`` fraction."""
    import torch

    k, n = taus.shape
    drop_top = math.floor(gamma * n + 1e-9)
    keep = keep_count(density, n)
    keep = min(keep, n - drop_top)
    order = taus.abs().argsort(dim=1, descending=True, stable=True)
    mask = torch.zeros_like(taus, dtype=torch.bool)
    mask.scatter_(1, order[:, drop_top : drop_top + keep], True)
    return mask


def random_mask(shape: torch.Size, density: float, seed: int) -> Tensor:
    """Bernoulli(density) keep mask from a private generator: same seed, same mask."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=gen, dtype=torch.float64) < density


def elect(weighted: Tensor, majority: str) -> Tensor:
    """TIES sign election over weighted task vectors ``weighted`` (k, n): which entries agree
    with the elected sign of their column, that of the summed mass (``total``) or of the vote
    count (``frequency``); ties go to ``+``. Shared by `elect_and_merge` and the method forms."""
    import torch

    signs = weighted.sign()
    votes = weighted.sum(0) if majority == "total" else signs.sum(0)
    elected = torch.where(votes >= 0, 1.0, -1.0).to(weighted.dtype)
    return signs == elected


def elect_and_merge(weighted: Tensor, weights: Tensor, majority: str) -> Tensor:
    """TIES sign election and disjoint mean of weighted task vectors ``weighted`` (k, n).

    The elected sign per entry is that of the summed mass (``total``) or of the vote count
    (``frequency``); only agreeing entries are averaged, normalised by the weights' magnitudes,
    so uniform weights give the plain mean of the agreeing entries.
    """
    import torch

    agree = elect(weighted, majority)
    num = (weighted * agree).sum(0)
    den = (weights.abs().unsqueeze(1).to(weighted.dtype) * agree).sum(0)
    return torch.where(den > 0, num / den.clamp_min(torch.finfo(weighted.dtype).tiny), torch.zeros_like(num))
