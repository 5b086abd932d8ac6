"""Hand-computed cases for neuro, te and twin, and the SVD helpers.

Tolerance: small exact-valued float32 examples, atol=1e-5 unless stated.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from adapters.merge import ModuleInputs, exact_low_rank, get_merge_method, relative_error
from adapters.merge.svd import truncated_svd
from adapters.merge.te import histogram_mi, row_coefficients, top_rows_mask

T = torch.tensor
TOL = {"atol": 1e-5, "rtol": 1e-5}

# --- neuro -----------------------------------------------------------------------------

W_AXES = T([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])  # neuron 0 along e0, neuron 1 along e1


def neuro(deltas, weights, base=W_AXES, **params):
    m = get_merge_method("neuro")
    return m.merge(deltas, weights, m.params(**params), ModuleInputs(base_weight=base))


def test_neuro_coordinate_elect_mean_of_orthogonal_parts():
    d1 = T([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0]])
    d2 = T([[1.0, -1.0, 2.0], [1.0, 1.0, 0.0]])
    # parallel parts (column 0 of row 0, column 1 of row 1) dropped:
    #   orth1 = [[0, 1, 0], [0, 0, 1]],  orth2 = [[0, -1, 2], [1, 0, 0]]
    # row 0, col 1: 1 vs -1 sums to 0 -> elected + (ties go to +) -> only task 1 -> 1
    out = neuro([d1, d2], [1.0, 1.0], mask_ratio=1.0, orthogonal_merge="coordinate")
    torch.testing.assert_close(out, T([[0.0, 1.0, 2.0], [1.0, 0.0, 1.0]]), **TOL)


def test_neuro_svd_orthogonal_tasks_add_up():
    # orthogonal parts of row 0 are orthogonal to each other: each SVD direction holds one
    # task, so the disjoint mean keeps each weighted part whole
    d1 = T([[5.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    d2 = T([[-3.0, 0.0, 2.0], [0.0, 0.0, 0.0]])
    out = neuro([d1, d2], [0.6, 0.4], mask_ratio=1.0)
    torch.testing.assert_close(out, T([[0.0, 0.6, 0.8], [0.0, 0.0, 0.0]]), **TOL)


def test_neuro_svd_identical_directions_average():
    # same orthogonal part v in both tasks: rank 1, both coordinates agree -> mean of w_i v
    v = T([0.0, 3.0, 4.0])
    d1 = torch.stack([v + T([7.0, 0.0, 0.0]), torch.zeros(3)])
    d2 = torch.stack([v, torch.zeros(3)])
    out = neuro([d1, d2], [0.2, 0.6], mask_ratio=1.0)
    torch.testing.assert_close(out[0], (0.2 + 0.6) / 2 * v, **TOL)


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_neuron_bases_equal_a_batched_svd(k):
    # The Gram-matrix basis against LAPACK's SVD of each neuron's [K, in] block, on random
    # rows plus a zero neuron and a rank-deficient one (two tasks share a row): coordinates
    # times directions rebuild the block, and the merge (elect + mean per direction, which is
    # invariant to each direction's sign) equals the SVD-based one. Tolerance: 1e-5 relative.
    from adapters.merge.neuro import _merge_svd, neuron_bases
    from adapters.merge.ops import elect_and_mean

    g = torch.Generator().manual_seed(k)
    orth = torch.randn(k, 6, 40, generator=g) * (torch.rand(k, 6, 40, generator=g) < 0.3)
    orth[:, 0] = 0.0
    if k > 1:
        orth[1, 1] = orth[0, 1]
    coords, vh = neuron_bases(orth)
    torch.testing.assert_close(coords @ vh, orth.transpose(0, 1), atol=1e-5, rtol=1e-5)
    w = torch.rand(k, generator=g) + 0.1
    u, s, ref_vh = torch.linalg.svd(orth.transpose(0, 1), full_matrices=False)
    ref_coords = u * s[:, None, :]
    ref_coords = torch.where(ref_coords.abs() <= 1e-5 * s[:, :1, None], 0.0, ref_coords)
    ref = torch.einsum("oj,oji->oi", elect_and_mean(ref_coords.transpose(0, 1), w, "total"),
                       ref_vh)
    out = _merge_svd(orth, w, "total")
    assert ((out - ref).norm() / ref.norm()).item() < 1e-5
    assert out.abs().max() > 0  # not vacuous


def test_neuro_lambda_2_from_masked_l1():
    # mask_ratio 0.5 of 4 entries keeps 2. d1 keeps 4, -3 (removed L1 3/10: sigma 0.3);
    # d2 keeps 6, 2 (removed 2/10: sigma 0.2). W swaps the axes: row 0 is along e1, row 1
    # along e0, so d2's kept 2 at (1, 0) is parallel and dropped.
    w = T([[0.0, 1.0], [1.0, 0.0]])
    d1, d2 = T([[4.0, 1.0], [2.0, -3.0]]), T([[6.0, 1.0], [2.0, 1.0]])
    single = neuro([d1], [1.0], base=w, mask_ratio=0.5)
    torch.testing.assert_close(single, T([[4.0, 0.0], [0.0, -3.0]]) / (1 - 0.3), **TOL)
    # orthogonal parts [[4, 0], [0, -3]] and [[6, 0], [0, 0]]: mean (4 + 6) / 2 at (0, 0);
    # lambda_2 = 1 / (1 - max(0.3, 0.2))
    both = neuro([d1, d2], [1.0, 1.0], base=w, mask_ratio=0.5, orthogonal_merge="coordinate")
    torch.testing.assert_close(both, T([[5.0, 0.0], [0.0, -3.0]]) / (1 - 0.3), **TOL)
    fixed = neuro([d1], [1.0], base=w, mask_ratio=0.5, lambda_2=2.0)
    torch.testing.assert_close(fixed, T([[8.0, 0.0], [0.0, -6.0]]), **TOL)


@pytest.mark.parametrize("mode", ["svd", "coordinate"])
def test_neuro_lambda_1_zero_leaves_nothing_along_pretrained_rows(mode):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(16, 12, generator=g)
    deltas = [torch.randn(16, 12, generator=g) for _ in range(3)]
    out = neuro(deltas, [0.5, 0.3, 0.2], base=base, orthogonal_merge=mode)
    unit = base / base.norm(dim=1, keepdim=True)
    along = (out * unit).sum(dim=1)
    assert along.abs().max() < 1e-5 * out.abs().max()
    with_par = neuro(deltas, [0.5, 0.3, 0.2], base=base, orthogonal_merge=mode, lambda_1=1.0)
    assert (with_par * unit).sum(dim=1).abs().max() > 1e-3


# --- te --------------------------------------------------------------------------------


def test_histogram_mi_hand_values():
    label = T([1, 1, 1, 1, 0, 0, 0, 0])
    separated = T([1.0, 2.0, 3.0, 4.0, 0.0, 0.0, 0.0, 0.0])  # median edge 0: bins = label
    identical = T([1.0, 2.0, 3.0, 4.0, 1.0, 2.0, 3.0, 4.0])  # same distribution per class
    constant = torch.full((8,), 5.0)
    mi = histogram_mi(torch.stack([separated, identical, constant], dim=1), label, n_bins=2)
    torch.testing.assert_close(mi, T([math.log(2), 0.0, 0.0]), **TOL)


def test_te_relevance_keeps_task_specific_rows():
    # row 0 reads x0, which only task 0's exemplars carry; row 1 reads x1, distributed alike
    # for both tasks; with keep_ratio 0.5 task 0 keeps row 0 only
    own = T([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0], [4.0, 4.0]])
    other = T([[0.0, 1.0], [0.0, 2.0], [0.0, 3.0], [0.0, 4.0]])
    d0 = T([[1.0, 0.0], [0.0, 1.0]])
    d1 = T([[1.0, 0.0], [0.0, 1.0]])
    te = get_merge_method("te")
    params = te.params(keep_ratio=0.5, n_bins=2)
    prep = te.prepare([d0, d1], params, ModuleInputs(task_inputs=[own, other]))
    assert prep[0].row_mask.tolist() == [True, False]
    torch.testing.assert_close(prep[0].relevance, T([math.log(2), 0.0]), **TOL)
    # task 1's delta row 0 is silent on its own inputs (x0 = 0) but fires on task 0's:
    # MI is symmetric, so that row is task-specific too
    assert prep[1].row_mask.tolist() == [True, False]


def test_te_row_coefficients_hierarchy():
    masks = T([[True, True, False], [False, True, True]])
    w = T([0.6, 0.4])
    full = row_coefficients(masks, w, exclusive_full=True)
    torch.testing.assert_close(full, T([[1.0, 0.6, 0.0], [0.0, 0.4, 1.0]]))
    scaled = row_coefficients(masks, w, exclusive_full=False)
    torch.testing.assert_close(scaled, T([[0.6, 0.6, 0.0], [0.0, 0.4, 0.4]]))
    # a weight-0 adapter is not selected: row 1 becomes exclusive to adapter 0
    torch.testing.assert_close(row_coefficients(masks, T([0.6, 0.0]), True),
                               T([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]]))


def test_te_combine_applies_row_coefficients():
    d0 = T([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    d1 = T([[10.0, 20.0], [30.0, 40.0], [50.0, 60.0]])
    te = get_merge_method("te")
    x = [torch.randn(6, 2, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    prep = te.prepare([d0, d1], te.params(), ModuleInputs(task_inputs=x))
    prep = [type(p)(p.delta, m, p.relevance)
            for p, m in zip(prep, T([[True, True, False], [False, True, True]]), strict=True)]
    out = te.combine(prep, [0.6, 0.4], te.params())
    torch.testing.assert_close(out, T([[1.0, 2.0], [13.8, 18.4], [50.0, 60.0]]), **TOL)


def test_top_rows_mask_keeps_at_least_one():
    assert top_rows_mask(T([0.1, 0.9, 0.5]), 0.01).tolist() == [False, True, False]
    assert top_rows_mask(T([0.1, 0.9, 0.5]), 0.5).tolist() == [False, True, True]


# --- twin ------------------------------------------------------------------------------


def test_twin_hand_case():
    d1, d2 = T([[2.0, 0.0], [0.0, 0.0]]), T([[0.0, 0.0], [0.0, 4.0]])
    twin = get_merge_method("twin")
    # shared = (d1 + d2) / 2 = diag(1, 2); exclusive_1 = diag(1, -2), exclusive_2 = diag(-1, 2)
    full = twin.params(rank=2)
    prep = twin.prepare([d1, d2], full)
    torch.testing.assert_close(twin.combine(prep, [1.0, 0.0], full), d1, **TOL)
    torch.testing.assert_close(twin.combine(prep, [0.5, 0.5], full), T([[1.0, 0.0], [0.0, 2.0]]),
                               **TOL)
    torch.testing.assert_close(twin.combine(prep[1:], [1.0], full), d2, **TOL)
    # rank 1 keeps exclusive_1's larger singular direction, diag(0, -2)
    one = twin.params(rank=1)
    prep1 = twin.prepare([d1, d2], one)
    torch.testing.assert_close(twin.combine(prep1, [1.0, 0.0], one), T([[1.0, 0.0], [0.0, 0.0]]),
                               **TOL)
    # shared weight 1 instead of 1/N: shared = diag(2, 4)
    lam = twin.params(rank=2, shared_weight=1.0)
    torch.testing.assert_close(twin.combine(twin.prepare([d1, d2], lam), [0.0, 0.0], lam),
                               T([[2.0, 0.0], [0.0, 4.0]]), **TOL)


def test_twin_factors_match_dense_and_sets_do_not_mix():
    g = torch.Generator().manual_seed(0)
    deltas = [torch.randn(8, 3, generator=g) @ torch.randn(3, 6, generator=g) for _ in range(3)]
    twin = get_merge_method("twin")
    params = twin.params(rank=2)
    prep = twin.prepare(deltas, params)
    b, a = twin.combine_factors(prep[:2], [0.7, 0.3], params)
    assert b.shape[0] == 8 and a.shape[1] == 6 and b.shape[1] == a.shape[0]
    assert b.shape[1] <= 6 + 2 * 2  # shared at its numerical rank + two rank-2 exclusives
    torch.testing.assert_close(b @ a, twin.combine(prep[:2], [0.7, 0.3], params), **TOL)
    other = twin.prepare(deltas, params)
    with pytest.raises(ValueError, match="different preparations"):
        twin.combine([prep[0], other[1]], [0.5, 0.5], params)


# --- svd -------------------------------------------------------------------------------


def test_truncated_svd_full_rank_exact_and_error_decreases():
    g = torch.Generator().manual_seed(0)
    delta = torch.randn(20, 12, generator=g)
    b, a = truncated_svd(delta, 12)
    torch.testing.assert_close(b @ a, delta, atol=1e-5, rtol=1e-5)
    assert relative_error(delta, *truncated_svd(delta, 50)) < 1e-5  # rank capped at 12
    errors = [relative_error(delta, *truncated_svd(delta, r)) for r in range(1, 13)]
    assert all(x > y for x, y in itertools.pairwise(errors))
    # Eckart-Young: the error is exactly the tail of the singular values
    s = torch.linalg.svdvals(delta)
    assert errors[3] == pytest.approx(float(s[4:].norm() / s.norm()), rel=1e-4)


def test_exact_low_rank_recovers_a_sum_of_lora_deltas():
    g = torch.Generator().manual_seed(1)
    lora = [torch.randn(16, 2, generator=g) @ torch.randn(2, 10, generator=g) for _ in range(2)]
    b, a = exact_low_rank(lora[0] + lora[1])
    assert b.shape == (16, 4) and a.shape == (4, 10)
    torch.testing.assert_close(b @ a, lora[0] + lora[1], atol=1e-4, rtol=1e-4)


def test_truncated_svd_keeps_dtype_and_rejects_bad_rank():
    delta = torch.randn(6, 4).to(torch.bfloat16)
    b, a = truncated_svd(delta, 2)
    assert b.dtype == a.dtype == torch.bfloat16 and b.shape == (6, 2) and a.shape == (2, 4)
    with pytest.raises(ValueError, match="rank"):
        truncated_svd(delta, 0)
