"""Interference preview statistics on hand-made task vectors.

Tolerance: exact small cases at 1e-9 (float64 accumulations); DARE's random mass at 0.02.
"""

from __future__ import annotations

import pytest
import torch

from adapters.merge import ModuleInputs, get_merge_method
from adapters.merge.preview import (
    cosine_matrix,
    parallel_energy,
    preview,
    sign_conflict_rate,
    sign_conflicts,
)

T = torch.tensor


def test_cosine_is_over_the_whole_flattened_task_vector():
    # per module the two tasks are parallel (+1) then anti-parallel (-1); flattened, 0
    by_module = {
        "q": [T([[1.0, 0.0]]), T([[1.0, 0.0]])],
        "v": [T([[0.0, 1.0]]), T([[0.0, -1.0]])],
    }
    torch.testing.assert_close(cosine_matrix(by_module), T([[1.0, 0.0], [0.0, 1.0]]).double())
    assert cosine_matrix({"q": by_module["q"]})[0, 1] == pytest.approx(1.0)
    assert cosine_matrix({"v": by_module["v"]})[0, 1] == pytest.approx(-1.0)


def test_cosine_of_a_zero_task_vector_is_zero():
    cos = cosine_matrix({"q": [T([[1.0, 2.0]]), torch.zeros(1, 2)]})
    assert cos[0, 1] == 0 and cos[1, 1] == 0


def test_sign_conflicts_count_only_entries_with_two_nonzero_values():
    deltas = [T([[1.0, -1.0, 0.0, 2.0]]), T([[1.0, 1.0, 3.0, -2.0]]), T([[0.0, 0.0, 0.0, 1.0]])]
    # entry 0: +,+ agree; entry 1: -,+ conflict; entry 2: one nonzero, not eligible;
    # entry 3: +,-,+ conflict
    assert sign_conflicts(deltas) == (2, 3)
    assert sign_conflict_rate(deltas) == pytest.approx(2 / 3)
    # trimmed to the top half (2 entries each): task 0 keeps 2 and one of +-1, task 1 keeps
    # 3 and -2, task 2 keeps 1: only entry 3 keeps two or more values (2, -2, 1), a conflict
    assert sign_conflicts(deltas, density=0.5) == (1, 1)
    assert sign_conflict_rate([T([[1.0, 2.0]])]) == 0.0


def test_parallel_energy_split():
    base = T([[1.0, 0.0], [1.0, 1.0]])
    delta = T([[3.0, 4.0], [1.0, 1.0]])
    # row 0: 3 along e0 (9), 4 across (16); row 1: [1, 1] along its own row (2), 0 across
    energy = parallel_energy([delta], base)
    torch.testing.assert_close(energy, T([[11.0, 16.0]]).double())
    assert float(energy.sum()) == pytest.approx(float(delta.square().sum()))


def test_preview_reports_removed_mass_per_method():
    g = torch.Generator().manual_seed(0)
    deltas = [torch.randn(64, 48, generator=g) for _ in range(2)]
    base = torch.randn(64, 48, generator=g)
    inputs = [torch.randn(20, 48, generator=g) for _ in range(2)]
    report = preview({"q": deltas}, base_weights={"q": base}, task_inputs={"q": inputs},
                     adapter_ids=["a", "b"],
                     params={"dare_linear": get_merge_method("dare_linear").params(drop_rate=0.3)})
    assert set(report.removed_mass) == {"ties", "dare_linear", "dare_ties", "neuro", "te"}
    ties = get_merge_method("ties")
    trimmed = ties.prepare(deltas, ties.params())
    for i in range(2):
        expected = 1 - float(trimmed[i].abs().sum() / deltas[i].abs().sum())
        assert report.removed_mass["ties"][i] == pytest.approx(expected, rel=1e-6)
    # DARE drops a random 30% of entries: about 30% of the mass
    assert report.removed_mass["dare_linear"] == pytest.approx([0.3, 0.3], abs=0.02)
    neuro = get_merge_method("neuro")
    assert report.removed_mass["neuro"][0] > report.removed_mass["ties"][0]  # r=0.15 < 0.2
    assert report.removed_mass["neuro"][0] == pytest.approx(
        neuro.prepare(deltas, neuro.params(), ModuleInputs(base_weight=base))[0].sigma)
    assert report.removed_mass["te"] == pytest.approx([0.5, 0.5], abs=0.1)  # half the rows
    assert report.parallel_fraction is not None and all(0 < f < 1 for f in
                                                         report.parallel_fraction)
    assert report.sign_conflict["q"] == pytest.approx(report.sign_conflict_total)


def test_preview_skips_what_lacks_inputs_and_aggregates_modules():
    deltas_q = [T([[1.0, 1.0]]), T([[1.0, -1.0]])]
    deltas_v = [T([[1.0, 1.0, 1.0, 1.0]]), T([[1.0, 1.0, 1.0, 1.0]])]
    report = preview({"q": deltas_q, "v": deltas_v})
    assert "neuro" not in report.removed_mass and "te" not in report.removed_mass
    assert report.parallel_fraction is None
    assert report.sign_conflict == {"q": 0.5, "v": 0.0}
    assert report.sign_conflict_total == pytest.approx(1 / 6)  # 1 of 2 + 4 eligible entries

