"""Merge methods against PEFT's reference functions, plus cross-method invariants.

Tolerance: float32 tensors of O(1) entries; results that should be identical to PEFT are
compared with atol=1e-6, rtol=1e-5 (the same operations, possibly in another order).
"""

from __future__ import annotations

import pytest
import torch
from peft.utils import merge_utils as peft_merge

from adapters.merge import MERGE_METHODS, ModuleInputs, UnknownMergeMethodError, get_merge_method
from adapters.merge.dare import adapter_seed, dare_drop

TOL = {"atol": 1e-6, "rtol": 1e-5}
WEIGHTS = [[1.0, 1.0, 1.0], [0.5, 0.3, 0.2], [0.7, -0.4, 1.3]]


def make_deltas(k: int = 3, out: int = 12, inp: int = 10, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(out, inp, generator=g) for _ in range(k)]


def make_inputs(deltas: list[torch.Tensor], seed: int = 1) -> ModuleInputs:
    g = torch.Generator().manual_seed(seed)
    out, inp = deltas[0].shape
    return ModuleInputs(
        base_weight=torch.randn(out, inp, generator=g),
        task_inputs=[torch.randn(16, inp, generator=g) + i for i in range(len(deltas))],
        adapter_keys=[f"adapter{i}/layers.0.q_proj" for i in range(len(deltas))],
    )


# --- against PEFT ----------------------------------------------------------------------


@pytest.mark.parametrize("weights", WEIGHTS)
def test_linear_equals_peft_task_arithmetic(weights):
    deltas = make_deltas()
    ours = get_merge_method("linear").merge(deltas, weights)
    ref = peft_merge.task_arithmetic(deltas, torch.tensor(weights))
    torch.testing.assert_close(ours, ref, **TOL)


@pytest.mark.parametrize("density", [0.1, 0.2, 0.5, 1.0])
@pytest.mark.parametrize("weights", WEIGHTS)
def test_ties_trim_equals_peft_magnitude_prune(density, weights):
    # TIES' preparation is PEFT's magnitude pruning; weighted-summed it is `magnitude_prune`
    deltas = make_deltas()
    ties = get_merge_method("ties")
    trimmed = ties.prepare(deltas, ties.params(density=density))
    ours = get_merge_method("linear").combine(trimmed, weights, None)
    ref = peft_merge.magnitude_prune(deltas, torch.tensor(weights), density)
    torch.testing.assert_close(ours, ref, **TOL)


@pytest.mark.parametrize("density", [0.2, 0.5, 1.0])
@pytest.mark.parametrize("sign", ["total", "frequency"])
@pytest.mark.parametrize("weights", WEIGHTS)
def test_ties_equals_peft(density, sign, weights):
    deltas = make_deltas()
    ties = get_merge_method("ties")
    ours = ties.merge(deltas, weights, ties.params(density=density, majority_sign_method=sign))
    ref = peft_merge.ties(deltas, torch.tensor(weights), density, sign)
    torch.testing.assert_close(ours, ref, **TOL)


@pytest.mark.parametrize("drop_rate", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("weights", WEIGHTS)
def test_dare_linear_equals_peft_same_seed(drop_rate, weights):
    # without adapter keys our masks come from one generator seeded `seed`, in order: the
    # same stream PEFT draws from the global RNG after torch.manual_seed(seed)
    deltas, seed = make_deltas(), 1234
    dare = get_merge_method("dare_linear")
    ours = dare.merge(deltas, weights, dare.params(drop_rate=drop_rate, seed=seed))
    torch.manual_seed(seed)
    ref = peft_merge.dare_linear(deltas, torch.tensor(weights), 1.0 - drop_rate)
    torch.testing.assert_close(ours, ref, **TOL)


@pytest.mark.parametrize("drop_rate", [0.1, 0.5])
@pytest.mark.parametrize("sign", ["total", "frequency"])
@pytest.mark.parametrize("weights", WEIGHTS)
def test_dare_ties_equals_peft_same_seed(drop_rate, sign, weights):
    deltas, seed = make_deltas(), 99
    dare = get_merge_method("dare_ties")
    params = dare.params(drop_rate=drop_rate, seed=seed, majority_sign_method=sign)
    ours = dare.merge(deltas, weights, params)
    torch.manual_seed(seed)
    ref = peft_merge.dare_ties(deltas, torch.tensor(weights), 1.0 - drop_rate, sign)
    torch.testing.assert_close(ours, ref, **TOL)


def test_dare_keyed_masks_equal_peft_per_adapter_seed():
    # with keys each adapter has its own stream: PEFT on that adapter alone, seeded alike
    deltas, weights = make_deltas(), [0.5, 0.3, 0.2]
    inputs = make_inputs(deltas)
    dare = get_merge_method("dare_linear")
    params = dare.params(drop_rate=0.3, seed=7)
    ours = dare.merge(deltas, weights, params, inputs)
    ref = torch.zeros_like(deltas[0])
    for d, w, key in zip(deltas, weights, inputs.adapter_keys, strict=True):
        torch.manual_seed(adapter_seed(7, key))
        ref += peft_merge.dare_linear([d], torch.tensor([w]), 0.7)
    torch.testing.assert_close(ours, ref, **TOL)


def test_dare_keyed_mask_does_not_depend_on_other_adapters():
    deltas = make_deltas()
    inputs = make_inputs(deltas)
    dare = get_merge_method("dare_linear")
    params = dare.params(drop_rate=0.5, seed=3)
    alone = dare.prepare(deltas[1:2], params, ModuleInputs(adapter_keys=inputs.adapter_keys[1:2]))
    together = dare.prepare(deltas, params, inputs)
    torch.testing.assert_close(alone[0], together[1], atol=0, rtol=0)


# --- invariants ------------------------------------------------------------------------


@pytest.mark.parametrize("drop_rate", [0.1, 0.5, 0.9])
def test_dare_rescale_keeps_expected_sum(drop_rate):
    # LoRAX's bug (rescale result discarded) would give a ratio of 1 - p, far outside 2%
    g = torch.Generator().manual_seed(0)
    delta = torch.rand(1000, 1000, generator=g) + 0.5
    dropped = dare_drop(delta, drop_rate, torch.Generator().manual_seed(1))
    ratio = float(dropped.sum() / delta.sum())
    assert abs(ratio - 1.0) < 0.02, ratio
    kept = float((dropped != 0).float().mean())
    assert abs(kept - (1.0 - drop_rate)) < 0.01, kept


@pytest.mark.parametrize("method", ["ties", "dare_ties"])
@pytest.mark.parametrize("sign", ["total", "frequency"])
def test_ties_never_mixes_signs(method, sign):
    # every nonzero output entry is the mean of only those weighted inputs sharing its sign
    deltas, weights = make_deltas(k=4, seed=5), torch.tensor([0.4, 0.3, 0.2, 0.1])
    m = get_merge_method(method)
    params = m.params(majority_sign_method=sign)
    prepared = torch.stack(m.prepare(deltas, params))
    out = m.combine(list(prepared), weights, params)
    same = (prepared.sign() == out.sign()) & (out != 0)
    expected = (prepared * weights[:, None, None] * same).sum(0) / same.sum(0).clamp(min=1)
    torch.testing.assert_close(out, expected, **TOL)
    assert ((prepared * out).lt(0) & same).sum() == 0


EXACT_PARAMS = {
    "linear": {},
    "ties": {"density": 1.0},
    "dare_linear": {"drop_rate": 0.0},
    "dare_ties": {"drop_rate": 0.0},
    "neuro": {"mask_ratio": 1.0, "lambda_1": 1.0},
    "te": {"keep_ratio": 1.0},
    "twin": {"rank": 10},  # = min(out, in): exclusive parts are exact
}


@pytest.mark.parametrize("name", sorted(MERGE_METHODS))
def test_one_adapter_at_weight_one_gives_it_back(name):
    deltas = make_deltas()
    inputs = make_inputs(deltas)
    method = MERGE_METHODS[name]
    params = method.params(**EXACT_PARAMS[name])
    prepared = method.prepare(deltas, params, inputs)
    # the request selects adapter 1 alone (prepared with the whole set: twin, te need it).
    # Passing the others at weight 0 would not do for ties / dare_ties: in PEFT's semantics
    # a weight-0 adapter still votes in the sign election and counts in the mean.
    merged = method.combine(prepared[1:2], [1.0], params)
    torch.testing.assert_close(merged, deltas[1], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", sorted(n for n, m in MERGE_METHODS.items() if not m.exact_single))
def test_methods_flagged_inexact_do_not_give_the_adapter_back_at_defaults(name):
    # ties / dare trim or drop, neuro drops the parallel part, te prunes rows, twin truncates
    deltas = make_deltas(out=40, inp=30)
    inputs = make_inputs(deltas)
    method = MERGE_METHODS[name]
    params = method.params(rank=4) if name == "twin" else method.params()
    merged = method.combine(method.prepare(deltas, params, inputs)[1:2], [1.0], params)
    assert not torch.allclose(merged, deltas[1], atol=1e-3)


@pytest.mark.parametrize("name", sorted(MERGE_METHODS))
def test_same_inputs_twice_same_result(name):
    deltas = make_deltas()
    method = MERGE_METHODS[name]
    results = [method.merge(deltas, [0.5, 0.3, 0.2], method.params(), make_inputs(deltas))
               for _ in range(2)]
    torch.testing.assert_close(results[0], results[1], atol=0, rtol=0)


def test_linear_is_not_factor_wise_merging():
    # PEFT's add_weighted_adapter(..., "linear") (like LoRAX) merges the factors, with
    # sqrt(w) on each: (sum sqrt(w_i) B_i)(sum sqrt(w_j) A_j) has cross terms
    # sqrt(w_i w_j) B_i A_j. Two rank-1 adapters on orthogonal axes make them visible.
    from peft import LoraConfig, get_peft_model

    model = torch.nn.Sequential(torch.nn.Linear(2, 2, bias=False))
    cfg = LoraConfig(r=1, lora_alpha=1, target_modules=["0"])
    peft_model = get_peft_model(model, cfg, adapter_name="first")
    peft_model.add_adapter("second", cfg)
    layer = peft_model.base_model.model[0]
    factors = {"first": ([[1.0], [0.0]], [[1.0, 0.0]]), "second": ([[0.0], [1.0]], [[0.0, 1.0]])}
    with torch.no_grad():
        for name, (b, a) in factors.items():
            layer.lora_B[name].weight.copy_(torch.tensor(b))
            layer.lora_A[name].weight.copy_(torch.tensor(a))
    deltas = [layer.get_delta_weight(name) for name in factors]
    for kind in ("linear", "cat"):
        peft_model.add_weighted_adapter(list(factors), [0.5, 0.5], kind, combination_type=kind)

    ours = get_merge_method("linear").merge(deltas, [0.5, 0.5])
    torch.testing.assert_close(ours, torch.tensor([[0.5, 0.0], [0.0, 0.5]]))
    torch.testing.assert_close(ours, layer.get_delta_weight("cat"))  # exact concatenation
    torch.testing.assert_close(layer.get_delta_weight("linear"), torch.full((2, 2), 0.5))


# --- registry and parameters -----------------------------------------------------------


def test_registry_names():
    assert set(MERGE_METHODS) == {"linear", "ties", "dare_linear", "dare_ties", "neuro", "te",
                                  "twin"}
    assert all(m.name == n for n, m in MERGE_METHODS.items())


def test_unknown_method_lists_valid_names():
    with pytest.raises(UnknownMergeMethodError, match="valid: dare_linear, dare_ties, linear"):
        get_merge_method("slerp")


def test_unknown_parameter_is_named():
    with pytest.raises(ValueError, match=r"unknown parameter 'densty'.*valid: density"):
        get_merge_method("ties").params(densty=0.3)


@pytest.mark.parametrize(("name", "overrides", "param"), [
    ("ties", {"density": 0.0}, "density"),
    ("ties", {"density": 1.5}, "density"),
    ("ties", {"density": True}, "density"),
    ("ties", {"majority_sign_method": "max"}, "majority_sign_method"),
    ("dare_linear", {"drop_rate": 1.0}, "drop_rate"),
    ("dare_ties", {"drop_rate": -0.1}, "drop_rate"),
    ("dare_linear", {"seed": -1}, "seed"),
    ("dare_ties", {"majority_sign_method": "sum"}, "majority_sign_method"),
    ("neuro", {"mask_ratio": 0.0}, "mask_ratio"),
    ("neuro", {"lambda_1": float("inf")}, "lambda_1"),
    ("neuro", {"lambda_2": float("nan")}, "lambda_2"),
    ("neuro", {"orthogonal_merge": "qr"}, "orthogonal_merge"),
    ("te", {"keep_ratio": 2.0}, "keep_ratio"),
    ("te", {"n_bins": 1}, "n_bins"),
    ("te", {"exclusive_full": "yes"}, "exclusive_full"),
    ("twin", {"rank": 0}, "rank"),
    ("twin", {"shared_weight": float("nan")}, "shared_weight"),
])
def test_out_of_range_parameter_is_named(name, overrides, param):
    with pytest.raises(ValueError, match=param):
        get_merge_method(name).params(**overrides)


def test_params_are_hashable_and_compare_by_value():
    ties = get_merge_method("ties")
    assert ties.params(density=0.3) == ties.params(density=0.3)
    assert len({ties.params(density=0.3), ties.params(density=0.3)}) == 1


@pytest.mark.parametrize(("name", "field"), [("neuro", "base_weight"), ("te", "task_inputs")])
def test_missing_prepare_inputs_are_named(name, field):
    method = get_merge_method(name)
    with pytest.raises(ValueError, match=field):
        method.prepare(make_deltas(), method.params(), ModuleInputs())


def test_mismatched_shapes_name_the_delta():
    deltas = make_deltas()
    deltas[2] = deltas[2][:, :5]
    with pytest.raises(ValueError, match="delta 2 has shape"):
        get_merge_method("linear").merge(deltas, [1.0, 1.0, 1.0])


def test_weight_count_must_match():
    with pytest.raises(ValueError, match="2 weights for 3 adapters"):
        get_merge_method("ties").merge(make_deltas(), [1.0, 1.0])
