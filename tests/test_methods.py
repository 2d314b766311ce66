"""Fusion methods: hand-checked numbers, parameter validation, registry, invariants.

Vectors are IA3 scales ``l`` (identity 1); task vectors are ``tau = l - 1``. Hand computations
are written next to each expected tensor.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch.testing import assert_close

import ia3fuse
from ia3fuse.errors import IA3FuseError, InvalidParameterError, MethodInputError, UnknownMethodError
from ia3fuse.fusion import _masks, get_method, method_names

F64 = torch.float64
ALL_METHODS = [
    "linear",
    "task_arithmetic",
    "geometric",
    "ties",
    "dare_linear",
    "dare_ties",
    "magnitude_prune",
    "breadcrumbs",
    "svd",
]
LAM_METHODS = ["task_arithmetic", "ties", "dare_linear", "dare_ties", "magnitude_prune", "breadcrumbs", "svd"]
DENSITY_METHODS = ["ties", "dare_linear", "dare_ties", "magnitude_prune", "breadcrumbs"]


def from_taus(*taus: list[float]) -> torch.Tensor:
    """Stack of IA3 vectors (k, n) whose task vectors are the given rows."""
    return 1 + torch.tensor(taus, dtype=F64)


def w(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=F64)


def fuse(name: str, vectors: torch.Tensor, weights: torch.Tensor, **params) -> torch.Tensor:
    return get_method(name)(vectors, weights, **params)


# The 3-adapter example used by ties / dare_ties (n = 4, no magnitude ties within a row).
TIES_TAUS = (
    [0.6, -0.1, 0.05, -0.9],
    [-0.2, 0.5, -0.1, 0.3],
    [0.1, 0.05, -0.7, 0.2],
)


# ---------------------------------------------------------------------------------------------
# Hand-checked numbers, one block per method
# ---------------------------------------------------------------------------------------------


def test_linear_is_raw_weighted_sum_of_l():
    v = torch.tensor([[1.2, 0.8, 1.0, 2.0], [0.6, 1.4, 1.0, 0.0]], dtype=F64)
    # 0.5*l1 + 0.25*l2 = [0.6+0.15, 0.4+0.35, 0.5+0.25, 1.0+0.0]; the weights sum to 0.75, so
    # linear (PEFT's formula) shrinks even an untouched entry (l = 1) to 0.75.
    assert_close(fuse("linear", v, w(0.5, 0.25)), w(0.75, 0.75, 0.75, 1.0))


def test_linear_equals_task_arithmetic_when_weights_sum_to_one():
    v = torch.tensor([[1.2, 0.8, 1.0, 2.0], [0.6, 1.4, 1.0, 0.0]], dtype=F64)
    # 0.25*l1 + 0.75*l2 = [0.3+0.45, 0.2+1.05, 1.0, 0.5+0.0]
    expected = w(0.75, 1.25, 1.0, 0.5)
    assert_close(fuse("linear", v, w(0.25, 0.75)), expected)
    assert_close(fuse("task_arithmetic", v, w(0.25, 0.75)), expected)


def test_task_arithmetic_hand_numbers_and_lam():
    v = torch.tensor([[1.2, 0.8, 1.0, 2.0], [0.6, 1.4, 1.0, 0.0]], dtype=F64)
    # tau1 = [0.2, -0.2, 0, 1], tau2 = [-0.4, 0.4, 0, -1]
    # 0.5*tau1 + 0.25*tau2 = [0.1-0.1, -0.1+0.1, 0, 0.5-0.25] = [0, 0, 0, 0.25]
    assert_close(fuse("task_arithmetic", v, w(0.5, 0.25)), w(1.0, 1.0, 1.0, 1.25))
    # lam = 2: 1 + 2*[0, 0, 0, 0.25]
    assert_close(fuse("task_arithmetic", v, w(0.5, 0.25), lam=2.0), w(1.0, 1.0, 1.0, 1.5))
    # lam = -1 negates the merged task vector: 1 - 0.25
    assert_close(fuse("task_arithmetic", v, w(0.5, 0.25), lam=-1.0), w(1.0, 1.0, 1.0, 0.75))


def test_geometric_hand_numbers():
    v = torch.tensor([[2.0, 4.0, 0.5, 1.0], [8.0, 1.0, 2.0, 9.0]], dtype=F64)
    # weights 1/2, 1/2: sqrt(l1*l2) = [sqrt 16, sqrt 4, sqrt 1, sqrt 9]
    assert_close(fuse("geometric", v, w(0.5, 0.5)), w(4.0, 2.0, 1.0, 3.0))
    # weights 1, 1: the product, i.e. both adapters active at once
    assert_close(fuse("geometric", v, w(1.0, 1.0)), w(16.0, 4.0, 1.0, 9.0))
    # weights 2, -1: l1^2 / l2 = [4/8, 16/1, 0.25/2, 1/9]
    assert_close(fuse("geometric", v, w(2.0, -1.0)), w(0.5, 16.0, 0.125, 1.0 / 9.0))


@pytest.mark.parametrize("bad", [0.0, -0.5])
def test_geometric_rejects_non_positive_values(bad):
    v = torch.tensor([[1.0, 2.0, 1.5], [1.0, bad, 1.0]], dtype=F64)
    with pytest.raises(MethodInputError) as info:
        fuse("geometric", v, w(0.5, 0.5))
    msg = str(info.value)
    assert f"every IA3 value must be > 0, but this adapter has {bad:.6g}" in msg
    assert "use method 'task_arithmetic'" in msg
    assert info.value.adapter_index == 1


def test_geometric_rejects_nan():
    v = torch.tensor([[float("nan"), 2.0], [1.0, 1.0]], dtype=F64)
    with pytest.raises(MethodInputError, match="must be > 0, but this adapter has nan"):
        fuse("geometric", v, w(0.5, 0.5))


def test_ties_density_half_total_majority():
    v = from_taus(*TIES_TAUS)
    # density 0.5 of n=4 keeps the 2 largest |tau| per adapter:
    #   tau1 [0.6, -0.1, 0.05, -0.9] -> [0.6, 0, 0, -0.9]
    #   tau2 [-0.2, 0.5, -0.1, 0.3]  -> [0, 0.5, 0, 0.3]
    #   tau3 [0.1, 0.05, -0.7, 0.2]  -> [0, 0, -0.7, 0.2]
    # weights 1,1,1. Elected sign = sign of the summed mass:
    #   e0: 0.6 -> +   e1: 0.5 -> +   e2: -0.7 -> -   e3: -0.9+0.3+0.2 = -0.4 -> -
    # disjoint mean of agreeing entries: [0.6, 0.5, -0.7, -0.9/1]
    assert_close(fuse("ties", v, w(1, 1, 1), density=0.5), w(1.6, 1.5, 0.3, 0.1))


def test_ties_frequency_majority_differs_from_total():
    v = from_taus(*TIES_TAUS)
    # Same trimmed vectors as above. On e3 the votes are (-, +, +): frequency elects + although the
    # mass -0.4 is negative, so e3 = mean(0.3, 0.2) = 0.25; the other entries are unchanged.
    out = fuse("ties", v, w(1, 1, 1), density=0.5, majority_sign_method="frequency")
    assert_close(out, w(1.6, 1.5, 0.3, 1.25))
    total = fuse("ties", v, w(1, 1, 1), density=0.5, majority_sign_method="total")
    assert not torch.equal(out, total)


def test_ties_disjoint_mean_is_weighted_by_weight_magnitudes():
    v = from_taus(*TIES_TAUS)
    # weights 0.2, 0.6, 0.2, frequency election (e3: votes -,+,+ -> +):
    #   e3 = (0.6*0.3 + 0.2*0.2) / (0.6 + 0.2) = 0.22 / 0.8 = 0.275
    #   single contributors keep their own value: e0 = 0.2*0.6/0.2 = 0.6, e1 = 0.5, e2 = -0.7
    out = fuse("ties", v, w(0.2, 0.6, 0.2), density=0.5, majority_sign_method="frequency")
    assert_close(out, w(1.6, 1.5, 0.3, 1.275))


def test_ties_weights_above_one_normalise_by_their_sum():
    v = from_taus(*TIES_TAUS)
    # weights 2, 3, 1; trimmed vectors as above. e3 weighted: -1.8, 0.9, 0.2
    #   total: mass -0.7 -> -, e3 = -1.8 / 2 = -0.9
    #   frequency: votes -,+,+ -> +, e3 = (0.9 + 0.2) / (3 + 1) = 0.275
    # single contributors: e0 = 2*0.6/2, e1 = 3*0.5/3, e2 = -0.7
    assert_close(fuse("ties", v, w(2, 3, 1), density=0.5), w(1.6, 1.5, 0.3, 0.1))
    out = fuse("ties", v, w(2, 3, 1), density=0.5, majority_sign_method="frequency")
    assert_close(out, w(1.6, 1.5, 0.3, 1.275))


def test_ties_vote_tie_elects_positive_sign():
    # frequency votes on e0 are (+, -) -> 0, which elects + (as PEFT and mergekit do):
    # e0 = 0.4; e1 votes (-, -) -> mean(-0.2, -0.6) = -0.4
    v = from_taus([0.4, -0.2], [-0.8, -0.6])
    out = fuse("ties", v, w(1, 1), density=1.0, majority_sign_method="frequency")
    assert_close(out, w(1.4, 0.6))
    # total mass exactly 0 on e0 (0.5 - 0.5) also elects +
    v = from_taus([0.5, 0.25], [-0.5, 0.25])
    assert_close(fuse("ties", v, w(1, 1), density=1.0), w(1.5, 1.25))


def test_ties_density_one_keeps_everything():
    v = from_taus(*TIES_TAUS)
    # No trimming, weights 1,1,1:
    #   e0: 0.6, -0.2, 0.1  -> mass +0.5 -> mean(0.6, 0.1)   = 0.35
    #   e1: -0.1, 0.5, 0.05 -> mass +0.45 -> mean(0.5, 0.05) = 0.275
    #   e2: 0.05, -0.1, -0.7 -> mass -0.75 -> mean(-0.1, -0.7) = -0.4
    #   e3: -0.9, 0.3, 0.2  -> mass -0.4 -> -0.9
    assert_close(fuse("ties", v, w(1, 1, 1), density=1.0), w(1.35, 1.275, 0.6, 0.1))


def test_ties_lam_scales_merged_task_vector():
    v = from_taus(*TIES_TAUS)
    # 1 + 0.5 * [0.6, 0.5, -0.7, -0.9]
    assert_close(fuse("ties", v, w(1, 1, 1), density=0.5, lam=0.5), w(1.3, 1.25, 0.65, 0.55))


def test_ties_entry_nobody_keeps_stays_at_identity():
    # tau1 keeps only e0 and tau2 only e1 (density 0.25 of 4 -> 1 entry): e2, e3 get no vote -> 1
    v = from_taus([0.8, 0.1, -0.2, 0.05], [0.1, -0.6, 0.3, 0.2])
    assert_close(fuse("ties", v, w(0.5, 0.5), density=0.25), w(1.8, 0.4, 1.0, 1.0))


def test_magnitude_prune_hand_numbers():
    v = from_taus([0.6, -0.1, 0.05, -0.9], [-0.2, 0.5, -0.1, 0.3])
    # density 0.5 keeps 2 of 4 per adapter: [0.6, 0, 0, -0.9] and [0, 0.5, 0, 0.3]
    # weights 1, 1: [0.6, 0.5, 0, -0.6]; a pruned entry is tau = 0, i.e. l = 1, never l = 0
    assert_close(fuse("magnitude_prune", v, w(1, 1), density=0.5), w(1.6, 1.5, 1.0, 0.4))
    # weights 0.5, 0.5: [0.3, 0.25, 0, -0.3]
    assert_close(fuse("magnitude_prune", v, w(0.5, 0.5), density=0.5), w(1.3, 1.25, 1.0, 0.7))
    # density 0.75 keeps 3: [0.6, -0.1, 0, -0.9] and [-0.2, 0.5, 0, 0.3]; sum with lam 2
    #   2*[0.4, 0.4, 0, -0.6]
    assert_close(fuse("magnitude_prune", v, w(1, 1), density=0.75, lam=2.0), w(1.8, 1.8, 1.0, -0.2))


def test_magnitude_prune_small_density_keeps_at_least_one_entry():
    v = from_taus([0.6, -0.1, 0.05, -0.9])
    # density 0.1 of 4 entries = 0.4 -> at least one entry: the largest, -0.9
    assert_close(fuse("magnitude_prune", v, w(1.0), density=0.1), w(1.0, 1.0, 1.0, 0.1))


def test_magnitude_prune_rounds_the_kept_count_up():
    v = from_taus([0.6, -0.1, 0.05, -0.9])
    # density 0.3 of 4 entries = 1.2 -> ceil -> 2 kept: -0.9 and 0.6
    assert_close(fuse("magnitude_prune", v, w(1.0), density=0.3), w(1.6, 1.0, 1.0, 0.1))


def test_breadcrumbs_drops_top_gamma_and_keeps_band():
    v = from_taus([0.9, -0.5, 0.3, 0.1, -0.2], [0.1, 0.2, -0.8, 0.4, 0.05])
    # n = 5, gamma 0.2 drops the top 1, density 0.4 keeps the next 2 by |tau|:
    #   tau1 ranks: 0.9(e0) | -0.5(e1) 0.3(e2) | -0.2(e4) 0.1(e3) -> [0, -0.5, 0.3, 0, 0]
    #   tau2 ranks: -0.8(e2) | 0.4(e3) 0.2(e1) | 0.1(e0) 0.05(e4) -> [0, 0.2, 0, 0.4, 0]
    # weights 1, 0.5: [0, -0.5+0.1, 0.3, 0.2, 0]
    out = fuse("breadcrumbs", v, w(1.0, 0.5), density=0.4, gamma=0.2)
    assert_close(out, w(1.0, 0.6, 1.3, 1.2, 1.0))


def test_breadcrumbs_without_gamma_is_magnitude_prune_and_full_band_is_task_arithmetic():
    v = from_taus([0.9, -0.5, 0.3, 0.1, -0.2], [0.1, 0.2, -0.8, 0.4, 0.05])
    # gamma 0, density 0.4: keep top 2 -> [0.9, -0.5, 0, 0, 0] + 0.5*[0, 0, -0.8, 0.4, 0]
    out = fuse("breadcrumbs", v, w(1.0, 0.5), density=0.4, gamma=0.0)
    assert_close(out, w(1.9, 0.5, 0.6, 1.2, 1.0))
    assert_close(out, fuse("magnitude_prune", v, w(1.0, 0.5), density=0.4))
    full = fuse("breadcrumbs", v, w(1.0, 0.5), density=1.0, gamma=0.0, lam=0.5)
    assert_close(full, fuse("task_arithmetic", v, w(1.0, 0.5), lam=0.5))


def test_breadcrumbs_density_plus_gamma_may_equal_one():
    v = from_taus([0.9, -0.5, 0.3, 0.1, -0.2])
    # gamma 0.2 drops 0.9; density 0.8 keeps the remaining 4 entries
    out = fuse("breadcrumbs", v, w(1.0), density=0.8, gamma=0.2)
    assert_close(out, w(1.0, 0.5, 1.3, 1.1, 0.8))


# --- DARE ------------------------------------------------------------------------------------


def test_dare_linear_density_one_equals_task_arithmetic():
    v = torch.tensor([[1.2, 0.8, 1.0, 2.0], [0.6, 1.4, 1.0, 0.0]], dtype=F64)
    # every entry kept (rand < 1 always), rescale by 1/1: [1, 1, 1, 1.25] as in task_arithmetic
    out = fuse("dare_linear", v, w(0.5, 0.25), density=1.0, seed=3)
    assert_close(out, w(1.0, 1.0, 1.0, 1.25))
    for seed in (0, 1, 99):
        assert_close(
            fuse("dare_linear", v, w(0.5, 0.25), density=1.0, seed=seed, lam=0.3),
            fuse("task_arithmetic", v, w(0.5, 0.25), lam=0.3),
        )


def test_dare_ties_density_one_equals_ties_density_one():
    v = from_taus(*TIES_TAUS)
    # same numbers as test_ties_density_one_keeps_everything
    assert_close(fuse("dare_ties", v, w(1, 1, 1), density=1.0, seed=5), w(1.35, 1.275, 0.6, 0.1))
    out = fuse("dare_ties", v, w(1, 1, 1), density=1.0, majority_sign_method="frequency")
    assert_close(out, w(1.35, 1.275, 0.6, 1.25))


def _dense_taus(k: int, n: int) -> torch.Tensor:
    # all entries non-zero, so a dropped entry is recognisable as tau = 0
    g = torch.Generator().manual_seed(1234)
    mags = torch.rand((k, n), generator=g, dtype=F64) * 0.5 + 0.1
    signs = torch.where(torch.rand((k, n), generator=g, dtype=F64) < 0.5, -1.0, 1.0).to(F64)
    return mags * signs


def test_dare_linear_mask_is_the_seeded_random_mask_and_kept_entries_are_rescaled():
    taus = _dense_taus(1, 64)
    out = fuse("dare_linear", 1 + taus, w(1.0), density=0.3, seed=7)
    mask = _masks.random_mask(taus.shape, 0.3, 7)
    kept = (out - 1) != 0
    assert torch.equal(kept, mask[0])
    assert 0 < int(mask.sum()) < 64
    # kept entries are tau / density, dropped ones tau = 0 (l = 1)
    assert_close(out, 1 + torch.where(mask[0], taus[0] / 0.3, torch.zeros_like(taus[0])))


def test_dare_linear_seeded_two_adapters_hand_formula():
    taus = _dense_taus(2, 16)
    d, seed = 0.5, 11
    mask = _masks.random_mask(taus.shape, d, seed)
    # 1 + lam * sum_i w_i * (tau_i * m_i / d)
    expected = 1 + 0.8 * (0.25 * taus[0] * mask[0] / d + 0.75 * taus[1] * mask[1] / d)
    out = fuse("dare_linear", 1 + taus, w(0.25, 0.75), density=d, seed=seed, lam=0.8)
    assert_close(out, expected)
    # rescale=False keeps the surviving entries as they are
    plain = fuse("dare_linear", 1 + taus, w(0.25, 0.75), density=d, seed=seed, rescale=False)
    assert_close(plain, 1 + 0.25 * taus[0] * mask[0] + 0.75 * taus[1] * mask[1])


def test_dare_same_seed_same_result_different_seeds_differ():
    v = 1 + _dense_taus(2, 64)
    for name in ("dare_linear", "dare_ties"):
        a = fuse(name, v, w(0.5, 0.5), density=0.5, seed=0)
        b = fuse(name, v, w(0.5, 0.5), density=0.5, seed=0)
        c = fuse(name, v, w(0.5, 0.5), density=0.5, seed=1)
        assert torch.equal(a, b), name
        assert not torch.equal(a, c), name


def test_dare_ties_is_ties_on_the_dropped_and_rescaled_vectors():
    taus = _dense_taus(3, 32)
    d, seed = 0.4, 21
    mask = _masks.random_mask(taus.shape, d, seed)
    dropped = 1 + taus * mask / d
    for majority in ("total", "frequency"):
        out = fuse("dare_ties", 1 + taus, w(0.5, 0.3, 0.2), density=d, seed=seed, majority_sign_method=majority)
        ref = fuse("ties", dropped, w(0.5, 0.3, 0.2), density=1.0, majority_sign_method=majority)
        assert_close(out, ref)


# --- SVD -------------------------------------------------------------------------------------


def test_svd_full_rank_equals_task_arithmetic():
    taus = _dense_taus(3, 5)
    ws = w(0.5, 0.3, 0.2)
    assert_close(fuse("svd", 1 + taus, ws, svd_rank=3, lam=0.7), fuse("task_arithmetic", 1 + taus, ws, lam=0.7))


def test_svd_rank_one_stack_is_reproduced_exactly():
    # tau_i = c_i * u with u = [1, 2, -2, 0], c = [0.1, -0.2]: the stack has rank 1
    v = from_taus([0.1, 0.2, -0.2, 0.0], [-0.2, -0.4, 0.4, 0.0])
    # rank-1 approximation is exact: 1*tau1 + 1*tau2 = -0.1*u = [-0.1, -0.2, 0.2, 0]
    out = fuse("svd", v, w(1.0, 1.0), svd_rank=1)
    assert_close(out, w(0.9, 0.8, 1.2, 1.0))
    assert_close(out, fuse("task_arithmetic", v, w(1.0, 1.0)))


def test_svd_rank_one_against_hand_svd():
    v = from_taus([0.3, 0.1, 0.3, 0.1], [0.1, 0.3, 0.1, 0.3])
    # M M^T = [[0.2, 0.12], [0.12, 0.2]]: eigenvalues 0.32 (u = [1, 1]/sqrt 2) and 0.08
    # (u = [1, -1]/sqrt 2). The rank-1 part u u^T M replaces each row by the mean of the rows:
    # [[0.2]*4, [0.2]*4]. Weights 1, 0 therefore give 0.2 everywhere (task_arithmetic: tau1).
    assert_close(fuse("svd", v, w(1.0, 0.0), svd_rank=1), w(1.2, 1.2, 1.2, 1.2))
    assert_close(fuse("task_arithmetic", v, w(1.0, 0.0)), w(1.3, 1.1, 1.3, 1.1))
    # default rank is k - 1 = 1; weights 0.75, 0.25 and lam 2: 1 + 2*0.2
    assert_close(fuse("svd", v, w(0.75, 0.25), lam=2.0), w(1.4, 1.4, 1.4, 1.4))


def test_svd_default_rank_is_k_minus_one():
    taus = _dense_taus(3, 6)
    ws = w(0.2, 0.3, 0.5)
    assert_close(fuse("svd", 1 + taus, ws), fuse("svd", 1 + taus, ws, svd_rank=2))
    assert not torch.allclose(fuse("svd", 1 + taus, ws), fuse("svd", 1 + taus, ws, svd_rank=3))


# --- every method ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL_METHODS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_output_keeps_module_shape_and_dtype(name, dtype):
    vectors = (1 + _dense_taus(3, 6)).reshape(3, 2, 3).to(dtype)
    out = fuse(name, vectors, w(0.5, 0.3, 0.2))
    assert out.shape == (2, 3)
    assert out.dtype == dtype
    flat = fuse(name, vectors.reshape(3, 6), w(0.5, 0.3, 0.2))
    assert_close(out.reshape(6), flat)


@pytest.mark.parametrize("name", LAM_METHODS)
def test_lam_scales_the_merged_task_vector(name):
    v = 1 + _dense_taus(3, 8)
    ws = w(0.5, 0.3, 0.2)
    one = fuse(name, v, ws, lam=1.0)
    assert_close(fuse(name, v, ws, lam=0.0), torch.ones(8, dtype=F64))
    assert_close(fuse(name, v, ws, lam=2.5) - 1, 2.5 * (one - 1))
    assert not torch.allclose(one, torch.ones(8, dtype=F64))


# ---------------------------------------------------------------------------------------------
# Parameter validation and the registry
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, listing",
    [
        ("linear", "none"),
        ("geometric", "none"),
        ("task_arithmetic", "lam"),
        ("ties", "density, majority_sign_method, lam"),
        ("dare_linear", "density, rescale, seed, lam"),
        ("dare_ties", "density, majority_sign_method, rescale, seed, lam"),
        ("magnitude_prune", "density, lam"),
        ("breadcrumbs", "density, gamma, lam"),
        ("svd", "svd_rank, lam"),
    ],
)
def test_unknown_parameter_lists_valid_parameters(name, listing):
    with pytest.raises(InvalidParameterError) as info:
        get_method(name).validate({"densty": 0.5})
    assert str(info.value) == f"method {name!r} has no parameter 'densty'; its parameters are: {listing}"


def test_several_unknown_parameters_are_all_named():
    with pytest.raises(InvalidParameterError) as info:
        get_method("ties").validate({"foo": 1, "bar": 2, "density": 0.5})
    assert str(info.value) == (
        "method 'ties' has no parameter 'bar', 'foo'; its parameters are: density, majority_sign_method, lam"
    )


@pytest.mark.parametrize("name", DENSITY_METHODS)
@pytest.mark.parametrize("density", [0, 1.5, -0.1])
def test_density_out_of_range_is_rejected(name, density):
    with pytest.raises(InvalidParameterError) as info:
        get_method(name).validate({"density": density})
    msg = str(info.value)
    assert msg.startswith(f"method {name!r}: density={density!r} is invalid (")
    assert "pass a value in (0, 1]" in msg


def test_density_error_through_calling_the_method():
    v = from_taus(*TIES_TAUS)
    with pytest.raises(InvalidParameterError) as info:
        fuse("ties", v, w(1, 1, 1), density=1.5)
    assert "density=1.5 is invalid" in str(info.value)
    assert "(0, 1]" in str(info.value)


@pytest.mark.parametrize("name", ["ties", "dare_ties"])
def test_majority_sign_method_must_be_total_or_frequency(name):
    with pytest.raises(InvalidParameterError) as info:
        get_method(name).validate({"majority_sign_method": "foo"})
    msg = str(info.value)
    assert f"method {name!r}: majority_sign_method='foo' is invalid" in msg
    assert "'total'" in msg and "'frequency'" in msg


def test_several_bad_values_are_reported_together():
    with pytest.raises(InvalidParameterError) as info:
        get_method("dare_ties").validate({"density": 2.0, "seed": -1})
    msg = str(info.value)
    assert "density=2.0 is invalid" in msg
    assert "seed=-1 is invalid" in msg
    assert "pass an integer >= 0" in msg


@pytest.mark.parametrize("lam", [float("nan"), float("inf")])
def test_lam_must_be_finite(lam):
    with pytest.raises(InvalidParameterError, match=r"method 'task_arithmetic': lam=(nan|inf) is invalid"):
        get_method("task_arithmetic").validate({"lam": lam})


def test_breadcrumbs_gamma_range_and_density_plus_gamma():
    with pytest.raises(InvalidParameterError) as info:
        get_method("breadcrumbs").validate({"gamma": 1.0})
    assert "gamma=1.0 is invalid" in str(info.value)
    assert "pass a value in [0, 1)" in str(info.value)
    v = from_taus([0.9, -0.5, 0.3, 0.1, -0.2])
    with pytest.raises(InvalidParameterError) as info:
        fuse("breadcrumbs", v, w(1.0), density=0.9, gamma=0.2)
    assert str(info.value) == (
        "method 'breadcrumbs': density=0.9 plus gamma=0.2 exceeds 1; the kept band is the next "
        "density fraction after the top gamma, so pass density + gamma <= 1"
    )


def test_svd_rank_bounds():
    v = from_taus([0.1, 0.2, 0.3], [0.3, 0.2, 0.1])
    with pytest.raises(InvalidParameterError) as info:
        fuse("svd", v, w(0.5, 0.5), svd_rank=3)
    assert str(info.value) == ("method 'svd': svd_rank=3 exceeds the number of adapters (2); pass an integer in 1..2")
    with pytest.raises(InvalidParameterError, match=r"method 'svd': svd_rank=0 is invalid"):
        get_method("svd").validate({"svd_rank": 0})


@pytest.mark.parametrize("name", ALL_METHODS)
def test_validate_fills_in_the_signature_defaults(name):
    spec = get_method(name)
    filled = spec.validate({})
    assert filled == {p.name: p.default for p in spec.params}


def test_validate_returns_given_values():
    assert get_method("dare_ties").validate({"density": 0.3, "seed": 4, "majority_sign_method": "frequency"}) == {
        "density": 0.3,
        "majority_sign_method": "frequency",
        "rescale": True,
        "seed": 4,
        "lam": 1.0,
    }


def test_unknown_method_lists_all_valid_names():
    with pytest.raises(UnknownMethodError) as info:
        ia3fuse.get_method("nope")
    assert str(info.value) == "unknown fusion method 'nope'; valid methods are: " + ", ".join(ALL_METHODS)
    assert isinstance(info.value, IA3FuseError)


def test_registry_lists_nine_documented_methods():
    specs = ia3fuse.methods()
    assert [m.name for m in specs] == ALL_METHODS
    assert method_names() == ALL_METHODS
    for m in specs:
        assert m.summary.strip(), m.name
        assert m.paper.startswith("https://"), m.name
        assert get_method(m.name) is m
        assert ia3fuse.get_method(m.name) is m
        for p in m.params:
            assert p.description, (m.name, p.name)
    assert {m.name for m in specs if m.randomized} == {"dare_linear", "dare_ties"}


# ---------------------------------------------------------------------------------------------
# Properties (hypothesis)
# ---------------------------------------------------------------------------------------------

# IA3 values on a dyadic grid 1 + i/8 in [0.125, 3]: all positive (geometric), and weighted sums
# with quarter weights are exact, so sign elections do not flip on rounding.
GRID = st.integers(-7, 16).map(lambda i: 1 + i / 8)
QUARTERS = st.integers(1, 8).map(lambda i: i / 4)
PROPS = settings(max_examples=40, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def stacks(draw, min_k: int = 1, max_k: int = 3, max_n: int = 6) -> torch.Tensor:
    k = draw(st.integers(min_k, max_k))
    n = draw(st.integers(1, max_n))
    rows = draw(st.lists(st.lists(GRID, min_size=n, max_size=n), min_size=k, max_size=k))
    return torch.tensor(rows, dtype=F64)


ONE_ADAPTER_UNCHANGED = [
    ("linear", {}),
    ("task_arithmetic", {}),
    ("geometric", {}),
    ("ties", {"density": 1.0}),
    ("ties", {"density": 1.0, "majority_sign_method": "frequency"}),
    ("magnitude_prune", {"density": 1.0}),
    ("breadcrumbs", {"density": 1.0, "gamma": 0.0}),
    ("dare_linear", {"density": 1.0}),
    ("dare_ties", {"density": 1.0}),
    ("svd", {}),
    ("svd", {"svd_rank": 1}),
]


@pytest.mark.parametrize("name, params", ONE_ADAPTER_UNCHANGED, ids=lambda x: str(x))
@PROPS
@given(vectors=stacks(min_k=1, max_k=1))
def test_one_adapter_with_weight_one_is_unchanged(name, params, vectors):
    assert_close(fuse(name, vectors, w(1.0), **params), vectors[0])


IDENTICAL_FUSE_TO_THEMSELVES = [
    ("linear", {}),
    ("task_arithmetic", {}),
    ("geometric", {}),
    ("ties", {"density": 1.0}),
    ("ties", {"density": 1.0, "majority_sign_method": "frequency"}),
    ("magnitude_prune", {"density": 1.0}),
    ("svd", {}),
]


@pytest.mark.parametrize("name, params", IDENTICAL_FUSE_TO_THEMSELVES, ids=lambda x: str(x))
@PROPS
@given(
    row=st.lists(GRID, min_size=1, max_size=6),
    raw=st.lists(st.integers(1, 4), min_size=1, max_size=3),
)
def test_identical_adapters_fuse_to_themselves(name, params, row, raw):
    k = len(raw)
    vectors = torch.tensor([row] * k, dtype=F64)
    weights = torch.tensor(raw, dtype=F64) / sum(raw)
    assert_close(fuse(name, vectors, weights, **params), vectors[0])


PRUNING = [
    ("ties", {"density": 0.5}),
    ("ties", {"density": 0.3, "majority_sign_method": "frequency"}),
    ("magnitude_prune", {"density": 0.5}),
    ("breadcrumbs", {"density": 0.5, "gamma": 0.2}),
]


@pytest.mark.parametrize("name, params", PRUNING, ids=lambda x: str(x))
@PROPS
@given(
    row=st.lists(GRID, min_size=1, max_size=6),
    raw=st.lists(st.integers(1, 4), min_size=2, max_size=3),
)
def test_identical_adapters_fuse_to_one_pruned_adapter(name, params, row, raw):
    k = len(raw)
    vectors = torch.tensor([row] * k, dtype=F64)
    weights = torch.tensor(raw, dtype=F64) / sum(raw)
    single = fuse(name, vectors[:1], w(1.0), **params)
    assert_close(fuse(name, vectors, weights, **params), single)


DETERMINISTIC = [
    ("linear", {}),
    ("task_arithmetic", {"lam": 0.5}),
    ("geometric", {}),
    ("ties", {"density": 0.5}),
    ("ties", {"density": 1.0, "majority_sign_method": "frequency"}),
    ("magnitude_prune", {"density": 0.5}),
    ("breadcrumbs", {"density": 0.5, "gamma": 0.2}),
    ("svd", {}),
    ("svd", {"svd_rank": 1}),
]


@st.composite
def stacks_weights_perm(draw):
    vectors = draw(stacks(min_k=2, max_k=3))
    k = vectors.shape[0]
    weights = torch.tensor(draw(st.lists(QUARTERS, min_size=k, max_size=k)), dtype=F64)
    perm = draw(st.permutations(range(k)))
    return vectors, weights, torch.tensor(perm)


def _svd_truncation_is_unique(vectors: torch.Tensor, rank: int) -> bool:
    # With equal singular values at the cut the rank-r approximation is not unique, so
    # permutation invariance can only be asked where there is a gap (or nothing is cut).
    s = torch.linalg.svdvals(vectors - 1)
    if rank >= s.numel():
        return True
    return bool(s[rank] < 1e-9 or s[rank - 1] - s[rank] > 1e-3)


@pytest.mark.parametrize("name, params", DETERMINISTIC, ids=lambda x: str(x))
@PROPS
@given(case=stacks_weights_perm())
def test_permuting_adapters_with_their_weights_changes_nothing(name, params, case):
    vectors, weights, perm = case
    if name == "svd":
        rank = params.get("svd_rank", vectors.shape[0] - 1)
        assume(_svd_truncation_is_unique(vectors, rank))
    assert_close(
        fuse(name, vectors[perm], weights[perm], **params),
        fuse(name, vectors, weights, **params),
        atol=1e-9,
        rtol=1e-9,
    )


@pytest.mark.parametrize(
    "name, params",
    [
        ("task_arithmetic", {}),
        ("task_arithmetic", {"lam": 0.75}),
        ("ties", {"density": 0.5}),
        ("ties", {"density": 1.0, "majority_sign_method": "frequency"}),
    ],
    ids=lambda x: str(x),
)
@PROPS
@given(
    vectors=stacks(min_k=1, max_k=3),
    data=st.data(),
)
def test_identity_fill_adapter_changes_nothing(name, params, vectors, data):
    k, n = vectors.shape
    weights = torch.tensor(data.draw(st.lists(QUARTERS, min_size=k, max_size=k)), dtype=F64)
    fill_weight = data.draw(st.floats(-4, 4, allow_nan=False))
    at = data.draw(st.integers(0, k))
    filled = torch.cat([vectors[:at], torch.ones(1, n, dtype=F64), vectors[at:]])
    filled_w = torch.cat([weights[:at], w(fill_weight), weights[at:]])
    assert_close(fuse(name, filled, filled_w, **params), fuse(name, vectors, weights, **params))


def test_breadcrumbs_band_is_checked_before_any_work():
    with pytest.raises(InvalidParameterError, match=r"density=0.9 plus gamma=0.2 exceeds 1"):
        get_method("breadcrumbs").validate({"density": 0.9, "gamma": 0.2})
