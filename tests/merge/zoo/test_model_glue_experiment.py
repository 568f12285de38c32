"""experiments/model_glue.py plans its zoo with the candidates as jobs on the sweep executor: the plan
equals the in-process planner's (the experiment's behaviour before ``--executor`` existed)."""

from __future__ import annotations

import argparse

from expertkit.merge.zoo import plan_zoo

from tests.scripts import load_script


def test_make_plan_on_the_local_executor_equals_the_in_process_plan(tiny_zoo, tmp_path):
    exp = load_script("experiments/model_glue.py")
    members = [tiny_zoo["a0"], tiny_zoo["a1"], tiny_zoo["a2"]]
    args = argparse.Namespace(out=tmp_path / "glue", val_n=2, budget=6, group="all", search="grid",
                              executor="local", address=None, cpus_per_cell=1.0)
    jobs = exp.make_plan(args, members, ["family_relation"])
    here = plan_zoo(members, ["family_relation"], group="all", n=2, budget=6, mixture="ffn", search="grid",
                    progress=False)
    assert jobs == here and len(here.clusters) == 1 and len(here.clusters[0].trials) == 3 + 2 + 7
    assert list((tmp_path / "glue" / "plan-jobs" / "candidates").iterdir()) == []  # removed once scored
    assert len(list((tmp_path / "glue" / "eval-cache").glob("eval-*.json"))) == 6  # one per evaluated candidate
