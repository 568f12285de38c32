"""expertkit's merges against mergekit's own output on tiny models (skipped when mergekit is absent).

linear, task arithmetic and TIES must agree to float32 rounding. DARE draws random masks with a
different generator (mergekit: the global torch RNG; expertkit: a per-tensor generator) and
rescales differently (mergekit: match the L1 norm; expertkit: 1/(1-p)), so DARE-linear is
compared statistically: both keep about ``density`` of each task vector and both are unbiased
estimates of the task-arithmetic merge (regression slope of their merged task vector on the
undropped one within 0.05 of 1).
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from expertkit.merge import MergeConfig, run_merge
from expertkit.weights import Checkpoint

pytestmark = [pytest.mark.peers]
try:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge as mergekit_run
    from mergekit.options import MergeOptions
except ImportError:  # pragma: no cover - depends on the environment
    pytestmark.append(pytest.mark.skip(reason="mergekit is not installed (pip install mergekit==0.1.5); "
                                       "the comparison with mergekit's output is skipped"))


def _sd(path: Path) -> dict[str, torch.Tensor]:
    with Checkpoint(path) as ck:
        return dict(ck.iter_tensors())


def _both(tmp_path: Path, data: dict, tag: str) -> tuple[dict, dict]:
    logging.getLogger("mergekit").setLevel(logging.ERROR)
    mergekit_run(MergeConfiguration.model_validate(data), str(tmp_path / f"mk-{tag}"),
                 MergeOptions(random_seed=0, quiet=True, write_model_card=False))
    ours = run_merge(MergeConfig.model_validate(data), tmp_path / f"ek-{tag}", progress=False)
    return _sd(ours), _sd(tmp_path / f"mk-{tag}")


def _config(method: str, zoo: list[Path], params: dict, base: bool = True) -> dict:
    base_path, *models = zoo
    data = {"merge_method": method, "dtype": "float32", "parameters": params,
            "models": [{"model": str(m), "parameters": {"weight": w}} for m, w in zip(models, [0.7, 0.5], strict=True)]}
    if base:
        data["base_model"] = str(base_path)
    return data


@pytest.fixture
def zoo(tiny_checkpoint):
    return [tiny_checkpoint("llama", s) for s in range(3)]


@pytest.mark.parametrize(("method", "params", "base"), [
    ("linear", {}, False),
    ("task_arithmetic", {"lambda": 0.8}, True),
    ("ties", {"density": 0.4}, True),
    ("ties", {"density": 0.7, "normalize": False}, True),
])
def test_deterministic_methods_match_mergekit(tmp_path, zoo, method, params, base):
    ours, theirs = _both(tmp_path, _config(method, zoo, params, base), method)
    assert set(ours) == set(theirs)
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], atol=1e-6, rtol=1e-5, msg=name)


def test_dare_linear_matches_mergekit_statistically(tmp_path, zoo):
    density = 0.5
    ours, theirs = _both(tmp_path, _config("dare_linear", zoo, {"density": density}), "dare")
    full, _ = _both(tmp_path, _config("task_arithmetic", zoo, {}), "ta")
    base = _sd(zoo[0])
    names = [n for n in base if base[n].numel() >= 4096]  # the big matrices: enough samples
    flat = {k: torch.cat([(d[n] - base[n]).reshape(-1) for n in names]) for k, d in
            {"ours": ours, "theirs": theirs, "full": full}.items()}
    x = flat["full"]
    for who in ("ours", "theirs"):
        slope = float((flat[who] * x).sum() / (x * x).sum())
        assert abs(slope - 1.0) < 0.05, (who, slope)
    # two models, each keeping `density`: an element survives in neither with (1 - density)^2
    for who in ("ours", "theirs"):
        zero = float((flat[who] == 0).float().mean())
        assert abs(zero - (1 - density) ** 2) < 0.02, (who, zero)
