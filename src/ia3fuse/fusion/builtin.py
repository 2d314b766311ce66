"""The fusion methods: pure functions over a stack of IA3 vectors for one module.

``vectors`` is ``(k, *shape)`` (identity = 1), ``weights`` is ``(k,)`` float64. Methods other
than ``linear`` and ``geometric`` work on task vectors ``tau = l - 1`` and return ``1 + merged``,
so pruning never zeroes an activation and a missing adapter (tau = 0) changes nothing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Literal, Optional

from pydantic import Field

from ..errors import InvalidParameterError, MethodInputError
from . import _masks
from .registry import register

if TYPE_CHECKING:  # torch is imported in the functions: registering the methods (CLI flags) needs only their schema
    from torch import Tensor

Lam = Annotated[
    float, Field(allow_inf_nan=False, description="lam scales the merged task vector: l = 1 + lam * merged tau")
]
Density = Annotated[
    float,
    Field(
        gt=0,
        le=1,
        allow_inf_nan=False,
        description="density is the fraction of each task vector's entries kept; pass a value in (0, 1]",
    ),
]
Majority = Annotated[
    Literal["total", "frequency"],
    Field(
        description="majority_sign_method elects each entry's sign by summed mass ('total') or by vote count ('frequency')"
    ),
]
Seed = Annotated[int, Field(ge=0, description="seed makes the random drop masks reproducible; pass an integer >= 0")]
Rescale = Annotated[
    bool, Field(description="rescale divides kept entries by density so their expectation is unchanged")
]
Gamma = Annotated[
    float,
    Field(
        ge=0,
        lt=1,
        allow_inf_nan=False,
        description="gamma is the fraction of largest-magnitude entries dropped as outliers; pass a value in [0, 1)",
    ),
]
SvdRank = Annotated[
    Optional[int],
    Field(
        ge=1,
        description="svd_rank is the rank kept of the stacked task vectors; pass an integer in 1..number of adapters (default: adapters - 1)",
    ),
]


def _flat(vectors: Tensor) -> Tensor:
    return vectors.reshape(vectors.shape[0], -1)


def _weighted_sum(taus: Tensor, weights: Tensor) -> Tensor:
    return (taus * weights.to(taus.dtype).unsqueeze(1)).sum(0)


@register(
    "linear",
    summary="Weighted sum of the raw vectors, sum_i w_i l_i (what PEFT's add_weighted_adapter computes)",
    paper="https://arxiv.org/abs/2205.05638",
    form="linear",
)
def linear(vectors: Tensor, weights: Tensor) -> Tensor:
    # Accumulate in adapter order exactly as PEFT does, so missing="zero" is bit-for-bit.
    out = vectors[0].new_zeros(vectors[0].shape)
    for vec, w in zip(vectors, weights.tolist()):
        out += vec * w
    return out


@register(
    "task_arithmetic",
    summary="Weighted sum of task vectors around the identity, 1 + lam * sum_i w_i (l_i - 1)",
    paper="https://arxiv.org/abs/2212.04089",
    form="delta",
)
def task_arithmetic(vectors: Tensor, weights: Tensor, *, lam: Lam = 1.0) -> Tensor:
    taus = _flat(vectors) - 1
    return (1 + lam * _weighted_sum(taus, weights)).reshape(vectors.shape[1:])


@register(
    "geometric",
    summary="Weighted geometric mean in log space, exp(sum_i w_i log l_i); all weights 1 = all adapters active at once",
    paper="https://arxiv.org/abs/2205.05638",
    form="log",
)
def geometric(vectors: Tensor, weights: Tensor) -> Tensor:
    flat = _flat(vectors)
    mins = flat.min(dim=1).values
    for i, m in enumerate(mins.tolist()):
        if not m > 0:
            err = MethodInputError(
                f"geometric fusion takes log(l), so every IA3 value must be > 0, but this adapter has {m:.6g}; "
                "use method 'task_arithmetic' (delta space), which accepts any value"
            )
            err.adapter_index = i
            raise err
    logs = flat.double().log()
    return _weighted_sum(logs, weights.double()).exp().to(vectors.dtype).reshape(vectors.shape[1:])


@register(
    "ties",
    summary="TIES: trim each task vector to its top-density magnitudes, elect signs, average agreeing entries",
    paper="https://arxiv.org/abs/2306.01708",
    form="elected",
)
def ties(
    vectors: Tensor,
    weights: Tensor,
    *,
    density: Density = 0.2,
    majority_sign_method: Majority = "total",
    lam: Lam = 1.0,
) -> Tensor:
    taus = _flat(vectors) - 1
    trimmed = taus * _masks.top_magnitude_mask(taus, density)
    weighted = trimmed * weights.to(taus.dtype).unsqueeze(1)
    merged = _masks.elect_and_merge(weighted, weights, majority_sign_method)
    return (1 + lam * merged).reshape(vectors.shape[1:])


@register(
    "dare_linear",
    summary="DARE: drop task-vector entries at random (keep prob. density), rescale, weighted sum",
    paper="https://arxiv.org/abs/2311.03099",
    randomized=True,
    form="delta",
)
def dare_linear(
    vectors: Tensor, weights: Tensor, *, density: Density = 0.5, rescale: Rescale = True, seed: Seed = 0, lam: Lam = 1.0
) -> Tensor:
    taus = _dare(_flat(vectors) - 1, density, rescale, seed)
    return (1 + lam * _weighted_sum(taus, weights)).reshape(vectors.shape[1:])


@register(
    "dare_ties",
    summary="DARE random drop and rescale, then TIES sign election and disjoint mean",
    paper="https://arxiv.org/abs/2311.03099",
    randomized=True,
    form="elected",
)
def dare_ties(
    vectors: Tensor,
    weights: Tensor,
    *,
    density: Density = 0.5,
    majority_sign_method: Majority = "total",
    rescale: Rescale = True,
    seed: Seed = 0,
    lam: Lam = 1.0,
) -> Tensor:
    taus = _dare(_flat(vectors) - 1, density, rescale, seed)
    weighted = taus * weights.to(taus.dtype).unsqueeze(1)
    merged = _masks.elect_and_merge(weighted, weights, majority_sign_method)
    return (1 + lam * merged).reshape(vectors.shape[1:])


def _dare(taus: Tensor, density: float, rescale: bool, seed: int) -> Tensor:
    kept = taus * _masks.random_mask(taus.shape, density, seed)
    return kept / density if rescale else kept


@register(
    "magnitude_prune",
    summary="Keep each task vector's top-density magnitudes, then weighted sum",
    paper="https://arxiv.org/abs/2306.01708",
    form="delta",
)
def magnitude_prune(vectors: Tensor, weights: Tensor, *, density: Density = 0.5, lam: Lam = 1.0) -> Tensor:
    taus = _flat(vectors) - 1
    pruned = taus * _masks.top_magnitude_mask(taus, density)
    return (1 + lam * _weighted_sum(pruned, weights)).reshape(vectors.shape[1:])


def _check_band(params: dict) -> None:
    density, gamma = params["density"], params["gamma"]
    if density + gamma > 1 + 1e-12:
        raise InvalidParameterError(
            f"method 'breadcrumbs': density={density} plus gamma={gamma} exceeds 1; "
            "the kept band is the next density fraction after the top gamma, so pass density + gamma <= 1"
        )


@register(
    "breadcrumbs",
    summary="Model Breadcrumbs: drop the largest gamma and smallest entries of each task vector, keep density, weighted sum",
    paper="https://arxiv.org/abs/2312.06795",
    check=_check_band,
    form="delta",
)
def breadcrumbs(
    vectors: Tensor, weights: Tensor, *, density: Density = 0.9, gamma: Gamma = 0.01, lam: Lam = 1.0
) -> Tensor:
    _check_band({"density": density, "gamma": gamma})
    taus = _flat(vectors) - 1
    pruned = taus * _masks.band_mask(taus, density, gamma)
    return (1 + lam * _weighted_sum(pruned, weights)).reshape(vectors.shape[1:])


@register(
    "svd",
    summary="Rank-r approximation of the stacked task vectors (drops adapter-specific interference), then weighted sum",
    paper="https://arxiv.org/abs/2412.00081",
    form="delta",
)
def svd(vectors: Tensor, weights: Tensor, *, svd_rank: SvdRank = None, lam: Lam = 1.0) -> Tensor:
    k = vectors.shape[0]
    rank = max(1, k - 1) if svd_rank is None else svd_rank
    if rank > k:
        raise InvalidParameterError(
            f"method 'svd': svd_rank={rank} exceeds the number of adapters ({k}); pass an integer in 1..{k}"
        )
    import torch

    taus = (_flat(vectors) - 1).double()
    u, s, vh = torch.linalg.svd(taus, full_matrices=False)
    low = (u[:, :rank] * s[:rank]) @ vh[:rank]
    merged = _weighted_sum(low, weights.double()).to(vectors.dtype)
    return (1 + lam * merged).reshape(vectors.shape[1:])
