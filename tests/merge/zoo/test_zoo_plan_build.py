"""The plan file round trip, its validation, `build` and the `expertkit zoo` commands."""

from __future__ import annotations

import pytest
import torch
import yaml

from expertkit.errors import ConfigError
from expertkit.merge import merge_state_dicts
from expertkit.merge.zoo import MemberWeights, build_plan, discover_zoo, load_plan, plan_zoo, save_plan
from expertkit.weights import Checkpoint

TASKS = ["family_relation", "bbc_topic"]


def _flat_evaluator(folder, tasks):
    return lambda tensors: 0.5


@pytest.fixture(scope="module")
def plan(tiny_zoo):
    return plan_zoo([tiny_zoo["experts"]], TASKS, evaluator_factory=_flat_evaluator, progress=False)


def _edit(path, change):
    data = yaml.safe_load(path.read_text())
    change(data)
    path.write_text(yaml.safe_dump(data, sort_keys=False))


def test_plan_file_round_trips(plan, tmp_path):
    path = save_plan(plan, tmp_path / "plan.yaml")
    assert path.read_text().startswith("# expertkit zoo plan")
    assert load_plan(path) == plan


def test_plan_file_errors_name_the_key_and_every_problem(plan, tmp_path):
    path = save_plan(plan, tmp_path / "plan.yaml")

    def typo(d):
        d["clusters"][0]["methd"] = "ties"

    _edit(path, typo)
    with pytest.raises(ConfigError, match="unknown key 'methd'. Did you mean 'method'"):
        load_plan(path)
    path = save_plan(plan, tmp_path / "plan.yaml")

    def misplace(d):
        d["clusters"][1]["members"].append("a0")
        d["clusters"][0]["merge"] = ["a0", "zz"]

    _edit(path, misplace)
    with pytest.raises(ConfigError) as exc:
        load_plan(path)
    assert "member 'a0' is in clusters cluster0 and cluster1" in str(exc.value)
    assert "merge lists 'zz'" in str(exc.value)


def test_build_writes_each_cluster_merge_and_a_loadable_mixtral(plan, tiny_zoo, tmp_path):
    from transformers import MixtralForCausalLM

    edited = plan.model_copy(update={"clusters": [
        plan.clusters[0].model_copy(update={"method": "ties", "params": {"density": 0.5}, "merge": ["a0", "a2"]}),
        plan.clusters[1].model_copy(update={"method": "linear", "params": {}, "merge": None}),
    ]})
    out = build_plan(edited, tmp_path / "built")
    members = {m.name: m for m in discover_zoo([tiny_zoo["experts"]])}
    with Checkpoint(tiny_zoo["baseA"]) as base, Checkpoint(out / "clusters" / "cluster0") as rep, \
            MemberWeights(members["a0"]) as a0, MemberWeights(members["a2"]) as a2:
        for name in base.names():
            expected = merge_state_dicts("ties", [{name: a0.read(name)}, {name: a2.read(name)}],
                                         {name: base.read(name)}, params={"density": 0.5})[name]
            assert torch.equal(rep.read(name), expected), name
    with Checkpoint(out / "clusters" / "cluster1") as rep, MemberWeights(members["b0"]) as b0, \
            MemberWeights(members["b1"]) as b1:
        q = "model.layers.1.self_attn.q_proj.weight"
        torch.testing.assert_close(rep.read(q), (b0.read(q) + b1.read(q)) / 2)
    moe = MixtralForCausalLM.from_pretrained(out / "mixture")
    assert moe.config.num_local_experts == 2
    assert sorted(p.name for p in out.iterdir()) == ["build.json", "clusters", "mixture", "plan.yaml"]
    assert load_plan(out / "plan.yaml") == edited


def test_unknown_method_in_a_plan_is_refused_with_a_suggestion(plan):
    from expertkit.merge.zoo import ZooPlan

    data = plan.model_dump()
    data["clusters"][0]["method"] = "tie"
    with pytest.raises(Exception, match="unknown merge method 'tie'. Did you mean 'ties'"):
        ZooPlan.model_validate(data)


def test_failed_build_leaves_no_output(plan, tmp_path, monkeypatch):
    import expertkit.merge.mixture as mixture

    def broken(*args, **kwargs):
        raise ConfigError("mixture failed")

    monkeypatch.setattr(mixture, "build_ffn_mixture", broken)
    with pytest.raises(ConfigError, match="mixture failed"):
        build_plan(plan, tmp_path / "built")
    assert list(tmp_path.iterdir()) == []  # neither the output nor its staging folder




def test_cli_plan_and_build_on_a_tiny_zoo(tiny_zoo, tmp_path, cli):
    plan_path = tmp_path / "plan.yaml"
    code, out, err = cli(["--quiet", "zoo", "plan", str(tiny_zoo["a0"]), str(tiny_zoo["a1"]), str(tiny_zoo["b0"]),
                           "-t", "family_relation", "--n", "2", "--budget", "6", "--mixture", "model",
                           "--out", str(plan_path)])
    assert code == 0, err
    assert "cluster0: a0, a1 ->" in out and "cluster1: b0 -> single of b0" in out
    plan = load_plan(plan_path)
    assert plan.mixture.kind == "model" and plan.validation.n == 2
    assert all(t.endswith("]") for t in plan.clusters[0].trials)
    _edit(plan_path, lambda d: d["mixture"].update(kind="none"))
    code, out, err = cli(["--quiet", "zoo", "build", str(plan_path), str(tmp_path / "out")])
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "out" / "clusters").iterdir()) == ["cluster0", "cluster1"]
    code, _, err = cli(["zoo", "build", str(plan_path), str(tmp_path / "out")])
    assert code == 2 and "output folder exists" in err


def test_cli_plan_with_local_executor_jobs_writes_the_same_plan(tiny_zoo, tmp_path, cli, monkeypatch):
    monkeypatch.setenv("EXPERTKIT_CACHE", str(tmp_path / "cache"))
    args = ["--quiet", "zoo", "plan", str(tiny_zoo["a0"]), str(tiny_zoo["a1"]), str(tiny_zoo["a2"]),
            "-t", "family_relation", "-t", "leg_count", "--n", "2", "--budget", "6", "--mixture", "none"]
    code, _, err = cli([*args, "--out", str(tmp_path / "here.yaml")])
    assert code == 0, err
    code, _, err = cli([*args, "--out", str(tmp_path / "jobs.yaml"), "--executor", "local"])
    assert code == 0, err
    here, jobs = load_plan(tmp_path / "here.yaml"), load_plan(tmp_path / "jobs.yaml")
    assert jobs == here and len(here.clusters[0].trials) == 3 + 2 + 7
    assert list((tmp_path / "jobs-jobs" / "candidates").iterdir()) == []  # the candidates' files are removed
    assert len(list((tmp_path / "cache" / "eval").glob("eval-*.json"))) == 2 * 6  # 6 candidates x 2 tasks
    code, _, err = cli([*args, "--address", "auto"])
    assert code == 2 and "--address names a Ray cluster: pass it with --executor ray" in err
