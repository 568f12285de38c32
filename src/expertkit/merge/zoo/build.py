"""``build_plan``: a zoo plan to model folders, written atomically.

Output folder layout::

    OUT/plan.yaml                 the plan that was built
    OUT/clusters/<cluster>/       each cluster's representative (a loadable HF model folder)
    OUT/mixture/                  mixture.kind = ffn: a Mixtral or Qwen2-MoE folder
    OUT/router/router.json        mixture.kind = model: the sequence router over the representatives
    OUT/build.json                what was built

A representative is the merge of the cluster's ``merge`` members with its ``method`` and
``params``, computed by the same call as during planning (the tensors that vary inside the
cluster, merged by :func:`~expertkit.merge.zoo.select.merge_members`), so it equals the candidate
that was scored. Every other tensor is identical in all members and is streamed from the first
member into the output, one tensor at a time. The whole output is assembled in a temporary sibling
folder and renamed into place at the end: a failed build leaves nothing.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from pathlib import Path
from typing import Any

from expertkit.fileio import install_folder
from expertkit.errors import CheckpointError
from expertkit.merge.zoo.members import MemberWeights, ZooMember
from expertkit.merge.zoo.plan import ClusterSpec, ZooPlan, plan_text
from expertkit.merge.zoo.planner import members_of, varying_names
from expertkit.merge.zoo.select import MergeFn, merge_members


def build_representative(plan: ZooPlan, cluster: ClusterSpec, out_dir: Path, *, merge: MergeFn | None = None) -> Path:
    """Write one cluster's representative model folder to ``out_dir``."""
    from expertkit.weights import ShardedWriter

    members = members_of(plan, cluster.merged)
    readers = [MemberWeights(m) for m in members]
    try:
        base = Path(cluster.base) if cluster.base else None
        vary = varying_names(readers, base) if len(readers) > 1 or members[0].kind == "adapter" else []
        if len(readers) == 1 and members[0].kind == "adapter":
            vary = [n for n in readers[0].names() if n in readers[0].changed()]
        models = {r.member.name: r.state_dict(vary) for r in readers}
        base_sd = None
        if base is not None:
            with MemberWeights(ZooMember("base", base, "model")) as b:
                base_sd = b.state_dict(vary)
        weights = [cluster.weights.get(m, 1.0) for m in cluster.merged] if cluster.weights else None
        merged = merge_members(cluster.method, cluster.merged, models, base_sd, cluster.params, merge=merge,
                               seed=plan.seed, weights=weights)
        first = readers[0]
        with ShardedWriter(out_dir, template=first.member.weights_base, layout=first.ckpt.infos(),
                           max_shard_size="2GB") as writer:
            for name in first.names():
                t = merged[name] if name in merged else first.read(name)
                writer.add(name, t.to(first.dtype(name)))
    finally:
        for r in readers:
            r.close()
    return out_dir


def _prompts(tasks: list[str], k: int, seed: int) -> list[str]:
    from expertkit.tasks import get_task

    out = []
    for t in tasks:
        task = get_task(t)
        out += [task.format_prompt(e) for e in task.examples("train", k, seed)]
    return out


def build_plan(plan: ZooPlan, out_dir: str | os.PathLike[str], *, overwrite: bool = False,
               merge: MergeFn | None = None) -> Path:
    """Build every cluster representative and the mixture of ``plan`` into ``out_dir``."""
    from expertkit.progress import note

    out_dir = Path(out_dir).absolute()
    if out_dir.exists() and not overwrite:
        raise CheckpointError(f"output folder exists: {out_dir}. Choose another path or pass overwrite=True.")
    for m in plan.members:
        for p in (m.path, m.base):
            if p is not None and not Path(p).exists():
                raise CheckpointError(f"member {m.name}: {p} does not exist; fix the path in the plan.")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.parent / f".{out_dir.name}.tmp-{secrets.token_hex(4)}"
    staging.mkdir()
    info: dict[str, Any] = {"clusters": {}, "mixture": None}
    try:
        reps = {}
        for c in plan.clusters:
            note(f"building {c.name}: {c.method} of {', '.join(c.merged)}")
            reps[c.name] = build_representative(plan, c, staging / "clusters" / c.name, merge=merge)
            info["clusters"][c.name] = {"path": f"clusters/{c.name}", "method": c.method, "merged": c.merged,
                                        "tasks": c.tasks}
        mixed = plan.mixed_clusters()
        prompts = [_prompts(c.tasks or plan.tasks, plan.mixture.prompts_per_task, plan.seed) for c in mixed]
        if plan.mixture.kind == "ffn" and len(mixed) >= 2:
            from expertkit.merge.mixture import build_ffn_mixture

            note(f"building the FFN-level mixture of {', '.join(c.name for c in mixed)}")
            summary = build_ffn_mixture([reps[c.name] for c in mixed], staging / "mixture", prompts,
                                        top_k=plan.mixture.top_k, train_steps=plan.mixture.router_train_steps,
                                        lr=plan.mixture.router_lr, seed=plan.seed)
            info["mixture"] = {"kind": "ffn", "path": "mixture", "experts": [c.name for c in mixed],
                               "top_k": plan.mixture.top_k, "router_train_losses": summary["router_train_losses"]}
        elif plan.mixture.kind == "model" and len(mixed) >= 2:
            from expertkit.merge.mixture import SequenceRouter, minilm_embed

            router = SequenceRouter.fit([c.name for c in mixed], prompts, minilm_embed(plan.mixture.embedder),
                                        plan.mixture.embedder)
            router.save(staging / "router")
            info["mixture"] = {"kind": "model", "path": "router", "experts": [c.name for c in mixed]}
        (staging / "plan.yaml").write_text(plan_text(plan))
        (staging / "build.json").write_text(json.dumps(info, indent=1))
        install_folder(staging, out_dir)  # an existing out_dir is replaced only now
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir
