"""One shared check suite over every registered merge method, on hand-placed tensors."""

from __future__ import annotations

import math

import pytest
import torch

from expertkit.errors import ConfigError, IncompatibleModelsError, UnknownNameError
from expertkit.merge import METHODS, merge_state_dicts
from expertkit.merge.methods.base import elect_and_mean, top_k_mask

T = torch.tensor
BASE = {"w": T([0.0, 0.0, 0.0, 0.0])}
M1 = {"w": T([1.0, -2.0, 3.0, 0.5])}
M2 = {"w": T([2.0, 1.0, -1.0, 0.0])}

# method -> (models, base, weights, params, expected "w", stats)
CASES: dict[str, list[tuple]] = {
    "linear": [
        ([M1, M2], None, None, {}, [1.5, -0.5, 1.0, 0.25], None),
        ([M1, M2], None, [3.0, 1.0], {}, [1.25, -1.25, 2.0, 0.375], None),
        ([M1, M2], None, [1.0, 1.0], {"normalize": False}, [3.0, -1.0, 2.0, 0.5], None),
    ],
    "task_arithmetic": [
        ([M1, M2], {"w": T([1.0, 1.0, 1.0, 1.0])}, None, {"lambda": 0.5},
         [1.0 + 0.5 * (0 + 1), 1.0 + 0.5 * (-3 + 0), 1.0 + 0.5 * (2 - 2), 1.0 + 0.5 * (-0.5 - 1)], None),
        ([M1, M2], BASE, [1.0, 3.0], {"normalize": True}, [1.75, 0.25, 0.0, 0.125], None),
    ],
    "ties": [
        # density 1: elected signs +,-,+,+ ; disjoint means: (1+2)/2, -2, 3, 0.5 (0 does not vote)
        ([M1, M2], BASE, None, {"density": 1.0}, [1.5, -2.0, 3.0, 0.5], None),
        ([M1, M2], BASE, None, {}, [1.5, -2.0, 3.0, 0.5], None),  # mergekit's default density 1: no trim
        # density 0.5 keeps 2 of 4 per model: M1 -> [0,-2,3,0], M2 -> [2,1,0,0]
        # sums [2,-1,3,0] -> signs + - + + ; agree: [2], [-2], [3], none -> [2,-2,3,0]
        ([M1, M2], BASE, None, {"density": 0.5}, [2.0, -2.0, 3.0, 0.0], None),
        # weights scale votes and values: w=[1,3]: sums [7,1,0,0.5] -> + + + +
        # el 1: (1*1+3*2)/4 ; el 2: only M2 (3*1)/3 ; el 3: only M1 3/1 ; el 4: M1 0.5
        ([M1, M2], BASE, [1.0, 3.0], {"density": 1.0}, [7 / 4, 1.0, 3.0, 0.5], None),
        ([M1, M2], BASE, None, {"density": 1.0, "normalize": False, "lambda": 2.0}, [6.0, -4.0, 6.0, 1.0], None),
        # rescale: M1 trimmed at 0.5 to [0,-2,3,0] keeps L1 5 of 6.5, so it is multiplied by 1.3
        ([M1], BASE, None, {"density": 0.5, "rescale": True}, [0.0, -2.6, 3.9, 0.0], None),
    ],
    "dare_linear": [
        ([M1, M2], BASE, None, {"density": 1.0}, [3.0, -1.0, 2.0, 0.5], None),
    ],
    "dare_ties": [
        ([M1, M2], BASE, None, {"density": 1.0, "normalize": True}, [1.5, -2.0, 3.0, 0.5], None),
        # mergekit's default: no normalisation, the agreeing w_i d_i are summed
        ([M1, M2], BASE, None, {}, [3.0, -2.0, 3.0, 0.5], None),
    ],
    "breadcrumbs": [
        # density 0.75 keeps 3 of 4, gamma 0: drops the smallest |d|: M1 0.5, M2 0
        ([M1, M2], BASE, None, {"density": 0.75, "gamma": 0.0}, [3.0, -1.0, 2.0, 0.0], None),
        # density 0.5, gamma 0.25: drop the largest (M1: 3, M2: 2) and the smallest (M1: 0.5, M2: 0)
        ([M1, M2], BASE, None, {"density": 0.5, "gamma": 0.25}, [1.0, -1.0, -1.0, 0.0], None),
        # rescale: M1 keeps [1,-2,0,0] (L1 3 of 6.5), M2 keeps [0,1,-1,0] (L1 2 of 4)
        ([M1, M2], BASE, None, {"density": 0.5, "gamma": 0.25, "rescale": True},
         [6.5 / 3, -13 / 3 + 2.0, -2.0, 0.0], None),
    ],
    "model_stock": [
        # d1 = [1,0,0,0], d2 = [0,1,0,0]: cos 0 -> t 0 -> base
        ([{"w": T([1.0, 0, 0, 0])}, {"w": T([0.0, 1, 0, 0])}], BASE, None, {}, [0.0, 0.0, 0.0, 0.0], None),
        # parallel deltas: cos 1 -> t = 2/2 = 1 -> the average
        ([{"w": T([1.0, 1, 0, 0])}, {"w": T([3.0, 3, 0, 0])}], BASE, None, {}, [2.0, 2.0, 0.0, 0.0], None),
        # cos 0.5 (60 degrees), N = 2: t = 1 / 1.5 = 2/3 of the average [0.5, sqrt(3)/4 ...]
        ([{"w": T([1.0, 0, 0, 0])}, {"w": T([0.5, math.sqrt(3) / 2, 0, 0])}], BASE, None, {},
         [2 / 3 * 0.75, 2 / 3 * math.sqrt(3) / 4, 0.0, 0.0], None),
    ],
    "breadcrumbs_ties": [
        # density 0.75, gamma 0: M1 -> [1,-2,3,0], M2 -> [2,1,-1,0]; sums [3,-1,2,0] -> + - + (+)
        ([M1, M2], BASE, None, {"density": 0.75, "gamma": 0.0}, [3.0, -2.0, 3.0, 0.0], None),  # summed
        ([M1, M2], BASE, None, {"density": 0.75, "gamma": 0.0, "normalize": True}, [1.5, -2.0, 3.0, 0.0], None),
    ],
    "della": [  # density 1 (mergekit's default): nothing dropped, so TIES with its disjoint mean
        ([M1, M2], BASE, None, {}, [1.5, -2.0, 3.0, 0.5], None),
    ],
    "della_linear": [  # nothing dropped: task arithmetic
        ([M1, M2], BASE, [1.0, 0.5], {}, [2.0, -1.5, 2.5, 0.5], None),
    ],
    "sce": [
        # weights by mean square: M1 57/16, M2 24/16 -> 57/81, 24/81; signs of M1 + M2: + - + +
        ([M1, M2], BASE, None, {}, [(57 + 2 * 24) / 81, -2.0, 3.0, 0.5], None),
        # variances (0.25, 2.25, 4, 0.0625): top 2 of 4 keep elements 1, 2; element 0 then has no vote
        ([M1, M2], BASE, None, {"select_topk": 0.5}, [0.0, -2.0, 3.0, 0.0], None),
    ],
    "ram": [
        # active counts [2, 2, 2, 1]: shared entries averaged, M1's unique 0.5 kept whole
        ([M1, M2], BASE, None, {}, [1.5, -0.5, 1.0, 0.5], None),
        # epsilon 1.5: M1 active at 1, 2; M2 at 0; no overlap; element 3 unchanged
        ([M1, M2], BASE, None, {"epsilon": 1.5}, [2.0, -2.0, 3.0, 0.0], None),
    ],
    "ramplus_tl": [
        # M1: O = 3 shared, U = 1 unique -> lambda = 1 + r min(3, alpha); M2 has no unique entry
        ([M1, M2], BASE, None, {"r": 1.0, "alpha": 10.0}, [1.5, -0.5, 1.0, 0.5 * 4], None),
        ([M1, M2], BASE, None, {}, [1.5, -0.5, 1.0, 0.5 * 1.02], None),  # r 0.1, alpha 0.2
    ],
    "nearswap": [
        # |b - m| = [1, 2, 3, 0.5], t = 1: w = [1, 1/2, 1/3, 1]
        ([M1], BASE, None, {"t": 1.0}, [1.0, -1.0, 1.0, 0.5], None),
        # equal element (w = 1, any t), |d| 2 -> 1/4, 0.5 -> 1, 1 -> 1/2
        ([{"w": T([1.0, 3.0, 1.5, 0.0])}], {"w": T([1.0, 1.0, 1.0, 1.0])}, None, {"t": 0.5},
         [1.0, 1.5, 1.5, 0.5], None),
    ],
    "arcee_fusion": [
        # 1-D: one KL for the tensor, so |d| decides; quantiles of |d|: 0.275, 0.45, 0.625 -> fence
        # 0.45 + 1.5 * 0.35 = 0.975: only the 10 is fused, the base elsewhere
        ([{"w": T([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 10.0])}], {"w": torch.zeros(8)}, None, {},
         [0.0] * 7 + [10.0], None),
    ],
    "nuslerp": [
        # orthogonal unit vectors, t = w2 / (w1 + w2) = 0.75: sin(pi/8), sin(3 pi/8)
        ([{"w": T([1.0, 0, 0, 0])}, {"w": T([0.0, 1, 0, 0])}], None, [1.0, 3.0], {},
         [math.sin(math.pi / 8), math.sin(3 * math.pi / 8), 0.0, 0.0], None),
        # with a base: SLERP of the task vectors [1,0,..] and [0,1,..] at t = 0.5, plus the base
        ([{"w": T([2.0, 1, 0, 0])}, {"w": T([1.0, 2, 0, 0])}], {"w": T([1.0, 1, 0, 0])}, None, {},
         [1 + math.sqrt(0.5), 1 + math.sqrt(0.5), 0.0, 0.0], None),
        # row by row: row 0 orthogonal (midpoint), row 1 parallel (linear)
        ([{"w": T([[1.0, 0], [1.0, 0]])}, {"w": T([[0.0, 1], [2.0, 0]])}], None, None,
         {"nuslerp_flatten": False}, [[math.sqrt(0.5), math.sqrt(0.5)], [1.5, 0.0]], None),
    ],
    "multislerp": [
        # directions [1,0] and [0,1] -> mean direction [1,1]/sqrt 2; mean norm (1 + 3) / 2
        ([{"w": T([1.0, 0, 0, 0])}, {"w": T([0.0, 3, 0, 0])}], None, None, {},
         [math.sqrt(2), math.sqrt(2), 0.0, 0.0], None),
        ([{"w": T([1.0, 0, 0, 0])}, {"w": T([0.0, 3, 0, 0])}], None, None, {"normalize_weights": False},
         [2 * math.sqrt(2), 2 * math.sqrt(2), 0.0, 0.0], None),
    ],
    "karcher": [
        # two directions: the geodesic midpoint, times the mean norm 1.5
        ([{"w": T([1.0, 0, 0, 0])}, {"w": T([0.0, 2, 0, 0])}], None, None, {},
         [1.5 * math.sqrt(0.5), 1.5 * math.sqrt(0.5), 0.0, 0.0], None),
        # e1 twice and e2: the Karcher mean is 30 degrees from e1 (2 phi = pi/2 - phi), not the
        # 26.6 degrees of the normalised Euclidean mean the iteration starts from
        ([{"w": T([1.0, 0, 0, 0])}, {"w": T([1.0, 0, 0, 0])}, {"w": T([0.0, 1, 0, 0])}], None, None,
         {"tol": 1e-9, "max_iter": 50}, [math.cos(math.pi / 6), 0.5, 0.0, 0.0], None),
    ],
    "slerp": [
        # orthogonal unit vectors, t = 0.5: both coefficients sin(pi/4)/sin(pi/2)
        ([{"w": T([0.0, 1.0, 0, 0])}], {"w": T([1.0, 0.0, 0, 0])}, None, {"t": 0.5},
         [math.sqrt(0.5), math.sqrt(0.5), 0.0, 0.0], None),
        # parallel: linear fallback
        ([{"w": T([2.0, 2.0, 0, 0])}], {"w": T([1.0, 1.0, 0, 0])}, None, {"t": 0.25}, [1.25, 1.25, 0, 0], None),
        # no base, two models, t = 0 gives the first
        ([{"w": T([1.0, 0, 0, 0])}, {"w": T([0.0, 1, 0, 0])}], None, None, {"t": 0.0}, [1.0, 0, 0, 0], None),
    ],
    "passthrough": [
        ([M1], None, None, {"scale": 2.0}, [2.0, -4.0, 6.0, 1.0], None),
    ],
    "fisher": [
        # Fisher [1,0,..] vs [0,1,..]: each element from the model with information; none: the mean
        ([M1, M2], None, None, {"eps": 0.0},
         [1.0, 1.0, 2.0, 0.25], [{"w": T([1.0, 0.0, 3.0, 0.0])}, {"w": T([0.0, 1.0, 1.0, 0.0])}]),
    ],
    "regmean": [
        # W1 = I, W2 = 2I; G1 = diag(1, 3), G2 = diag(3, 1): W = (W1 G1 + W2 G2)(G1 + G2)^-1
        ([{"w": torch.eye(2)}, {"w": 2 * torch.eye(2)}], None, None, {"alpha": 1.0, "ridge": 0.0},
         [[7 / 4, 0.0], [0.0, 5 / 4]], [{"w": torch.diag(T([1.0, 3.0]))}, {"w": torch.diag(T([3.0, 1.0]))}]),
        # no Gram matrix for a tensor: the plain mean
        ([M1, M2], None, None, {}, [1.5, -0.5, 1.0, 0.25], [{}, {}]),
    ],
}


def test_every_registered_method_has_a_hand_placed_case():
    assert set(CASES) == set(METHODS.names())


@pytest.mark.parametrize(("method", "case"), [(m, c) for m, cs in CASES.items() for c in cs])
def test_method_on_hand_placed_tensors(method, case):
    models, base, weights, params, expected, stats = case
    snapshot = [{k: v.clone() for k, v in sd.items()} for sd in [*models, *([base] if base else [])]]
    out = merge_state_dicts(method, models, base, weights=weights, params=params, stats=stats)
    torch.testing.assert_close(out["w"], T(expected), rtol=1e-6, atol=1e-6)
    for before, after in zip(snapshot, [*models, *([base] if base else [])], strict=True):
        assert all(torch.equal(before[k], after[k]) for k in before), "a method modified its inputs"


@pytest.mark.parametrize("method", METHODS.names())
def test_every_method_computes_in_float32_and_rounds_once_to_the_input_dtype(method):
    """bfloat16 inputs give exactly the float32 merge of the same values, rounded to bfloat16."""
    g = torch.Generator().manual_seed(0)
    n = 1 if METHODS.get(method).max_models == 1 else 2
    models = [{"w": torch.randn(3, 5, generator=g).to(torch.bfloat16)} for _ in range(n)]
    base = {"w": torch.randn(3, 5, generator=g).to(torch.bfloat16)}
    stat = {"fisher": torch.rand(3, 5, generator=g), "gram": torch.eye(5) + 0.1}.get(METHODS.get(method).stats)
    stats = [{"w": stat} for _ in models] if stat is not None else None
    fields = METHODS.get(method).params.model_fields
    params = ({"density": 0.6} if "density" in fields else {"scale": 0.3} if "scale" in fields
              else {"t": 0.5} if method == "nearswap" else {})
    out = merge_state_dicts(method, models, base, stats=stats, params=params, seed=5)["w"]
    up = [{"w": sd["w"].float()} for sd in models]
    ref = merge_state_dicts(method, up, {"w": base["w"].float()}, stats=stats, params=params, seed=5)["w"]
    assert ref.dtype == torch.float32 and out.dtype == torch.bfloat16
    assert torch.equal(out, ref.to(torch.bfloat16))
    if method != "arcee_fusion":  # arcee_fusion picks input elements: nothing to round
        assert not torch.equal(ref, ref.to(torch.bfloat16).float())  # the float32 result did need rounding


@pytest.mark.parametrize("method", [m for m in METHODS.names() if METHODS.get(m).needs_base])
def test_methods_needing_a_base_say_so(method):
    with pytest.raises(ConfigError, match="needs a base model"):
        merge_state_dicts(method, [M1, M2])


def test_dare_drops_with_probability_p_and_rescales_by_one_over_one_minus_p():
    base = {"w": torch.zeros(20000)}
    model = {"w": torch.ones(20000)}
    out = merge_state_dicts("dare_linear", [model], base, params={"density": 0.25}, seed=3)["w"]
    kept = out != 0
    assert set(out[kept].unique().tolist()) == {4.0}  # 1 / (1 - 0.75)
    assert abs(kept.float().mean().item() - 0.25) < 0.02
    again = merge_state_dicts("dare_linear", [model], base, params={"density": 0.25}, seed=3)["w"]
    other = merge_state_dicts("dare_linear", [model], base, params={"density": 0.25}, seed=4)["w"]
    assert torch.equal(out, again) and not torch.equal(out, other)


def test_ties_top_k_is_per_tensor():
    base = {"a": torch.zeros(4), "b": torch.zeros(4)}
    model = {"a": T([10.0, 20.0, 30.0, 40.0]), "b": T([0.1, 0.2, 0.3, 0.4])}
    out = merge_state_dicts("ties", [model], base, params={"density": 0.5})
    assert out["a"].tolist() == [0.0, 0.0, 30.0, 40.0]
    assert torch.allclose(out["b"], T([0.0, 0.0, 0.3, 0.4]))  # a global top-k would zero all of b


def test_top_k_mask_and_election_helpers():
    assert top_k_mask(T([1.0, -5.0, 2.0, 0.5]), 0.5).tolist() == [False, True, True, False]
    assert top_k_mask(T([1.0, 2.0]), 0.01).tolist() == [False, True]  # at least one element
    # sum of +1 and -1 is 0 -> elected +1; only the positive delta agrees
    assert elect_and_mean([T([1.0]), T([-1.0])], [1.0, 1.0], True).tolist() == [1.0]
    # a negative weight flips the vote: w d = [-1, 2] -> +; only the second agrees
    assert elect_and_mean([T([1.0]), T([2.0])], [-1.0, 1.0], True).tolist() == [2.0]
    # w d = [1, 0.5]: both agree; the divisor -1 + 1 = 0 counts as 1 (as in mergekit)
    assert elect_and_mean([T([-1.0]), T([0.5])], [-1.0, 1.0], True).tolist() == [1.5]


def test_slerp_of_antiparallel_or_near_parallel_vectors_falls_back_to_linear():
    out = merge_state_dicts("slerp", [{"w": T([-1.0, 0.0])}], {"w": T([1.0, 0.0])}, params={"t": 0.5})
    assert out["w"].tolist() == [0.0, 0.0]


def test_bad_inputs_are_clear_errors():
    with pytest.raises(UnknownNameError, match="Did you mean 'ties'"):
        merge_state_dicts("tie", [M1], BASE)
    with pytest.raises(ConfigError, match="density"):
        merge_state_dicts("ties", [M1], BASE, params={"density": 2.0})
    with pytest.raises(ConfigError, match="unknown key 'densty'"):
        merge_state_dicts("ties", [M1], BASE, params={"densty": 0.5})
    with pytest.raises(IncompatibleModelsError, match="different shapes"):
        merge_state_dicts("linear", [M1, {"w": torch.zeros(5)}])
    with pytest.raises(IncompatibleModelsError, match="different tensors"):
        merge_state_dicts("linear", [M1, {"v": torch.zeros(4)}])
    with pytest.raises(ConfigError, match="one weight per model"):
        merge_state_dicts("linear", [M1, M2], weights=[1.0])
    with pytest.raises(IncompatibleModelsError, match="integer/bool"):
        merge_state_dicts("linear", [{"i": T([1, 2])}, {"i": T([1, 3])}])


def test_integer_tensors_that_agree_are_copied():
    out = merge_state_dicts("linear", [{"i": T([1, 2])}, {"i": T([1, 2])}])
    assert out["i"].tolist() == [1, 2] and out["i"].dtype == torch.int64


def test_della_keeps_by_magnitude_rank_and_divides_each_kept_entry_by_its_probability():
    n = 1001
    model = {"w": torch.arange(1, n + 1, dtype=torch.float32).repeat(400, 1)}  # (400, n): rank = column
    base = {"w": torch.zeros(400, n)}
    out = merge_state_dicts("della_linear", [model], base, params={"density": 0.5, "epsilon": 0.2}, seed=1)["w"]
    p = 0.3 + 0.4 * torch.arange(n) / (n - 1)  # keep probability of rank r: 0.3 .. 0.7
    kept = out != 0
    torch.testing.assert_close(out[kept], (model["w"] / p)[kept])  # the paper's rescaling, entry by entry
    rate = kept.float().mean(0)  # (n,): keep rate per rank
    for lo in range(0, 1000, 100):  # 40,000 draws per bucket: standard error about 0.0025
        assert abs(float(rate[lo:lo + 100].mean()) - float(p[lo:lo + 100].mean())) < 0.01, lo
    again = merge_state_dicts("della_linear", [model], base, params={"density": 0.5, "epsilon": 0.2}, seed=1)["w"]
    assert torch.equal(out, again)
    with pytest.raises(ConfigError, match="density - epsilon > 0 and density \\+ epsilon < 1"):
        merge_state_dicts("della", [model], base, params={"density": 0.9, "epsilon": 0.15})


def test_required_parameters_and_cancelling_directions_are_refused():
    with pytest.raises(ConfigError, match="t: required field is missing"):
        merge_state_dicts("nearswap", [M1], BASE)
    with pytest.raises(IncompatibleModelsError, match="directions of 'w' cancel"):
        merge_state_dicts("karcher", [M1, {"w": -M1["w"]}])
    # multislerp, as mergekit: no mean direction gives the base; a model equal to the base adds none
    out = merge_state_dicts("multislerp", [M1, M1], M1)["w"]
    assert torch.equal(out, M1["w"])
    one = {"w": T([1.0, -2.0, 3.0, 2.5])}  # task vector [0, 0, 0, 2]: length (2 + 0) / 2
    assert merge_state_dicts("multislerp", [one, M1], M1)["w"].tolist() == [1.0, -2.0, 3.0, 1.5]
