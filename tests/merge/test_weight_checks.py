"""Merge weights and parameters are checked before any work (issue 20): non-finite values and
weights that (nearly) cancel under a normalising method are refused with the numbers."""

from __future__ import annotations

import math

import pytest
import torch

from expertkit.errors import ConfigError
from expertkit.merge import MergeConfig, merge_state_dicts, run_merge

T = torch.tensor
BASE = {"w": T([0.0, 0.0, 0.0])}
A = {"w": T([1.0, 2.0, 3.0])}
B = {"w": T([3.0, 2.0, 1.0])}


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_weights_are_refused(bad):
    with pytest.raises(ConfigError, match=r"weight of model 2 is (nan|inf|-inf); weights must be finite"):
        merge_state_dicts("linear", [A, B], weights=[1.0, bad])
    with pytest.raises(ConfigError, match="weight of model 1"):
        merge_state_dicts("ties", [A, B], BASE, weights=[bad, 1.0])


@pytest.mark.parametrize(("method", "params"), [
    ("ties", {"density": math.nan}), ("dare_linear", {"density": math.inf}), ("slerp", {"t": math.nan}),
    ("task_arithmetic", {"lambda": math.inf}), ("breadcrumbs", {"gamma": math.nan}),
])
def test_non_finite_parameters_are_refused(method, params):
    key = next(iter(params))
    with pytest.raises(ConfigError, match=f"{key}.*finite number"):
        merge_state_dicts(method, [A], BASE, params=params)


def test_weights_that_nearly_cancel_under_normalize_are_refused_with_the_numbers():
    # 1 - 0.9999999 = 1e-7: the normalised linear merge would be (A - 0.9999999 B) * 1e7
    with pytest.raises(ConfigError) as err:
        merge_state_dicts("linear", [A, B], weights=[1.0, -0.9999999])
    text = str(err.value)
    assert "[1, -0.9999999] sum to 1e-07" in text and "absolute sum of 2" in text
    assert "multiply the merge by 2e+07" in text and "normalize: false" in text
    with pytest.raises(ConfigError, match="division is by zero"):
        merge_state_dicts("linear", [A, B], weights=[1.0, -1.0])
    with pytest.raises(ConfigError, match="sum to 0"):
        merge_state_dicts("linear", [A, B], weights=[0.0, 0.0])
    # without normalize nothing is divided: A - B exactly
    out = merge_state_dicts("linear", [A, B], weights=[1.0, -1.0], params={"normalize": False})
    assert out["w"].tolist() == [-2.0, 0.0, 2.0]
    # weights of one sign never cancel, however small
    out = merge_state_dicts("linear", [A, B], weights=[1e-9, 3e-9])
    torch.testing.assert_close(out["w"], T([2.5, 2.0, 1.5]))


def test_the_disjoint_mean_refuses_any_subset_of_weights_that_cancels():
    # TIES divides, element by element, by the weights of the agreeing models: here models 2 and 3
    with pytest.raises(ConfigError, match=r"models 2, 3 \[-0\.5, 0\.5000001\] sum to 1e-07.*disjoint mean"):
        merge_state_dicts("ties", [A, B, A], BASE, weights=[2.0, -0.5, 0.5000001])
    with pytest.raises(ConfigError, match="models 1, 2"):
        merge_state_dicts("dare_ties", [A, B], BASE, weights=[1.0, -1.0], params={"normalize": True})
    # not normalised: w1 d1 + w2 d2 over the agreeing models, no division
    out = merge_state_dicts("ties", [A, B], BASE, weights=[1.0, -1.0], params={"normalize": False})
    # w d = [1,2,3] and [-3,-2,-1]: sums [-2, 0, 2] -> signs - + + ; agreeing: B, A, A
    assert out["w"].tolist() == [-3.0, 2.0, 3.0]


def test_the_executor_refuses_before_writing_anything(tmp_path, tiny_checkpoint):
    a, b = tiny_checkpoint("llama", 0), tiny_checkpoint("llama", 1)
    for weight, needle in [(math.nan, "weight of model 2 is nan"), (-0.9999999, "sum to 1e-07"),
                           ("heavy", "weight of model 2 is 'heavy'; weights must be numbers")]:
        data = {"merge_method": "linear", "models": [{"model": str(a)},
                                                     {"model": str(b), "parameters": {"weight": weight}}]}
        with pytest.raises(ConfigError, match=needle):
            run_merge(MergeConfig.model_validate(data), tmp_path / "out", progress=False)
        assert list(tmp_path.iterdir()) == []
    # a weight gradient that crosses the cancelling point only at one depth is caught there too
    data = {"merge_method": "linear", "models": [
        {"model": str(a)}, {"model": str(b), "parameters": {"weight": [-1.0, 1.0]}}]}
    with pytest.raises(ConfigError, match="parameters for .*division is by zero"):
        run_merge(MergeConfig.model_validate(data), tmp_path / "out", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_cli_refuses_a_nan_parameter_without_a_traceback(tmp_path, tiny_checkpoint, cli):
    a, b = tiny_checkpoint("llama", 0), tiny_checkpoint("llama", 1)
    cfg = tmp_path / "m.yaml"
    cfg.write_text(f"merge_method: ties\nbase_model: {a}\nmodels:\n  - model: {b}\n"
                   "parameters: {density: .nan}\n")
    code, _, err = cli(["--quiet", "merge", str(cfg), str(tmp_path / "out")])
    assert code == 2 and "density" in err and "finite number" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
