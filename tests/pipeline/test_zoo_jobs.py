"""The zoo planner's candidates as executor jobs give the in-process evaluator's scores and choice.

A cluster of three random perturbations of a tiny Llama's attention projections (over its own
weights as the base) is scored on the toy lo-hi task by the in-process ``PatchedEvaluator`` and by
:class:`~expertkit.pipeline.zoo_jobs.JobEvaluator` on the local executor and on the package's local
Ray; the selections (every trial's score, the budget cut, the winner) must be equal.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from expertkit.merge.zoo import select_strategy
from expertkit.merge.zoo.evaluator import PatchedEvaluator
from expertkit.pipeline.executor import ExecutorConfig, LocalExecutor, ModelCache
from expertkit.pipeline.zoo_jobs import JobEvaluator

N = 24  # validation examples of lo-hi


def _cluster(folder: Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """(members, base): three seeded perturbations of the q/v projections, and the originals."""
    weights = load_file(folder / "model.safetensors")
    base = {n: t for n, t in weights.items() if "q_proj" in n or "v_proj" in n}
    gen = torch.Generator().manual_seed(0)
    members = {f"e{i}": {n: t + torch.randn(t.shape, generator=gen) * 0.5 for n, t in base.items()} for i in range(3)}
    return members, base


@pytest.fixture
def in_process(tiny_checkpoint, lohi):
    """(folder, members, base, the in-process selection with budget 9, its evaluator)."""
    folder = tiny_checkpoint("llama")
    members, base = _cluster(folder)
    evaluator = PatchedEvaluator(folder, [lohi.name], n=N)
    return folder, members, base, select_strategy(members, evaluator, base=base, budget=9), evaluator


def test_local_jobs_give_the_in_process_scores_and_reuse_them_from_the_cache(in_process, tmp_path, monkeypatch):
    folder, members, base, expected, evaluator = in_process
    scores = [t.score for t in expected.trials if t.score is not None]
    assert len(scores) == 10 and len(set(scores)) >= 3  # 9 evaluations (one memo hit); the scores differ
    assert [t.note for t in expected.trials][-2:] == ["skipped: budget"] * 2  # the grid is cut at the budget
    cache = tmp_path / "cache"

    def jobs() -> JobEvaluator:
        return JobEvaluator(LocalExecutor(ModelCache()), folder, ["lo-hi"], tmp_path / "work", n=N, cache_dir=cache)

    first = jobs()
    assert select_strategy(members, first, base=base, budget=9, evaluate_many=first.many) == expected
    assert first.history == evaluator.history  # the same per-task scores, in the same order
    assert list((tmp_path / "work" / "candidates").iterdir()) == []  # the candidates' files are removed
    assert len(list(cache.glob("eval-*.json"))) == 9  # one cached score per evaluated candidate
    # a rerun is served by the evaluation cache: the model is never run
    evaluation = sys.modules["expertkit.tasks.evaluate"]  # the module (the package exports a function of that name)
    monkeypatch.setattr(evaluation, "_run", lambda *a, **k: pytest.fail("a cached candidate was evaluated again"))
    again = jobs()
    assert select_strategy(members, again, base=base, budget=9, evaluate_many=again.many) == expected


def test_local_jobs_run_a_cmaes_search_as_in_process(tiny_checkpoint, lohi, tmp_path):
    folder = tiny_checkpoint("llama")
    members, base = _cluster(folder)
    expected = select_strategy(members, PatchedEvaluator(folder, [lohi.name], n=N), base=base, budget=12,
                               search="cmaes")
    assert [t.note for t in expected.trials].count("cmaes") == 7  # one generation of 6, then 1 of the next
    jobs = JobEvaluator(LocalExecutor(ModelCache()), folder, [lohi], tmp_path / "work", n=N)
    assert select_strategy(members, jobs, base=base, budget=12, search="cmaes", evaluate_many=jobs.many) == expected


def test_ray_jobs_give_the_in_process_selection(local_ray, tiny_checkpoint, lohi, tmp_path):
    from expertkit.pipeline.ray_executor import RayExecutor

    folder = tiny_checkpoint("llama")
    members, base = _cluster(folder)
    # two batches: the members, then the grid cut at the budget (no greedy steps: fewer round trips)
    kw = {"base": base, "budget": 7, "greedy": False}
    expected = select_strategy(members, PatchedEvaluator(folder, [lohi.name], n=N), **kw)
    assert [t.note for t in expected.trials].count("skipped: budget") == 3
    work = tmp_path / "work"
    work.mkdir()
    jobs = JobEvaluator(RayExecutor(ExecutorConfig(kind="ray", max_retries=0), work, ""), folder, ["lo-hi"], work,
                        n=N)
    assert select_strategy(members, jobs, evaluate_many=jobs.many, **kw) == expected
    logs = sorted((work / "logs").glob("candidate_*.log"))
    assert len(logs) == 7  # one job per evaluated candidate
    pids = {line.split(" pid ")[1].split()[0] for log in logs for line in log.read_text().splitlines()
            if line.startswith("=== candidate:")}
    assert pids and str(os.getpid()) not in pids  # they ran in Ray's workers
    assert list((work / "candidates").iterdir()) == []
