"""PortLLM stages: make an evolved base, then port the run's experts onto it and evaluate them there.

* ``evolve``: continued pretraining of the run's base model on a corpus (default: BBC News
  training articles) into ``<run>/evolved/`` (a model folder with a model card).
* ``port``: every expert of the earlier ``train_experts`` stages (or of the ``experts`` folder, e.g.
  ``runs/quickstart/experts``) is ported, without training, to
  the new base (the ``evolve`` stage's output unless ``new_base`` is given) as a PEFT adapter
  (exact for LoRA experts) in ``<run>/ported/<task>/``; then, on each expert's own task: the old
  base + expert, the new base zero-shot, and the new base + ported expert, with 95% intervals,
  and the measured drift of the base.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field

from expertkit.config import Config
from expertkit.pipeline.config import STAGES
from expertkit.pipeline.context import RunContext


class EvolveParams(Config):
    """Parameters of the ``evolve`` stage."""

    corpus: str = Field("bbc", description="'bbc' (BBC News training articles), a .txt file or a folder of them")
    steps: int = Field(40, ge=1, description="AdamW steps of continued pretraining")
    lr: float = Field(5e-5, gt=0, description="peak learning rate")
    batch_size: int = Field(4, ge=1, description="blocks of seq_len tokens per step")
    seq_len: int = Field(128, ge=8, description="tokens per block")


class EvolveStage:
    """Continue pretraining the base model: a "version 2" for porting experiments."""

    def run(self, ctx: RunContext, params: EvolveParams) -> dict[str, Any]:
        """Write ``<run>/evolved`` (reused when a finished one with the same settings exists)."""
        import json

        from expertkit.port.evolve import META_NAME, evolve

        out = ctx.run_dir / "evolved"
        wanted = {"corpus": params.corpus, "steps": params.steps, "lr": params.lr,
                  "batch_size": params.batch_size, "seq_len": params.seq_len, "seed": ctx.seed}
        meta = json.loads((out / META_NAME).read_text()) if (out / META_NAME).is_file() else None
        if meta is None or {k: meta.get(k) for k in wanted} != wanted:
            meta = evolve(ctx.model(), out, overwrite=True, corpus=params.corpus, steps=params.steps, lr=params.lr,
                          batch_size=params.batch_size, seq_len=params.seq_len, seed=ctx.seed).meta
        return {"path": "evolved", "loss_first": meta["loss_first"], "loss_last": meta["loss_last"],
                "steps": meta["steps"], "corpus": meta["corpus"], "seconds": round(meta["seconds"], 1)}

    def report(self, result: dict[str, Any]) -> str:
        """One line: how the evolved base was made."""
        return (f"`{result['path']}/`: {result['steps']} steps of continued pretraining on `{result['corpus']}`; "
                f"loss {result['loss_first']:.3f} -> {result['loss_last']:.3f} ({result['seconds']} s).")


class PortParams(Config):
    """Parameters of the ``port`` stage."""

    new_base: str | None = Field(None, description="the new base; default: the earlier evolve stage's model")
    experts: str | None = Field(None, description="a folder of expert adapters (one per task, with expertkit.json); "
                                "default: the experts trained earlier in this run")
    scale: float = Field(1.0, description="lambda in theta_new + lambda * delta")
    n: int = Field(100, ge=1, description="evaluation examples per task")
    split: str = Field("test", pattern="^(validation|test)$", description="validation or test")
    batch_size: int = Field(16, ge=1, description="examples per forward pass")


def _new_base(ctx: RunContext, params: PortParams) -> Path:
    from expertkit.errors import ConfigError
    from expertkit.port.apply import _folder

    if params.new_base is not None:
        return _folder(params.new_base)
    evolved = ctx.earlier("evolve")
    if not evolved:
        raise ConfigError("port: no new_base given and no evolve stage earlier in the run; add one of them.")
    return ctx.run_dir / evolved[-1]["path"]


def _experts(ctx: RunContext, params: PortParams) -> dict[str, dict[str, Any]]:
    """``{name: {"path", "task"}}`` from ``params.experts`` or the run's train_experts stages."""
    import json

    from expertkit.errors import ConfigError

    experts: dict[str, dict[str, Any]] = {}
    if params.experts is not None:
        folder = Path(params.experts).absolute()
        for meta in sorted(folder.glob("*/expertkit.json")):
            task = json.loads(meta.read_text()).get("task")
            if task and (meta.parent / "adapter_config.json").is_file():
                experts[meta.parent.name] = {"path": str(meta.parent), "task": task}
        if not experts:
            raise ConfigError(f"port: {folder} holds no expert adapters (folders with adapter_config.json and "
                              "expertkit.json); train them first, e.g. with `make run`.")
        return experts
    for res in ctx.earlier("train_experts"):
        experts.update(res["experts"])
    if not experts:
        raise ConfigError("port: no experts to port; add a train_experts stage before it, or set experts: FOLDER.")
    return experts


class PortStage:
    """Port the run's experts onto the new base and evaluate them there."""

    def run(self, ctx: RunContext, params: PortParams) -> dict[str, Any]:
        """Port every expert (as an adapter) and evaluate old/new/ported on its task."""
        from expertkit.errors import ConfigError
        from expertkit.models import load_model
        from expertkit.models.bundled import cache_root
        from expertkit.port import port
        from expertkit.progress import status
        from expertkit.tasks.evaluate import evaluate

        experts = _experts(ctx, params)
        new_dir = _new_base(ctx, params)
        rows: dict[str, dict[str, Any]] = {}
        ported: dict[str, Path] = {}
        for name, e in experts.items():
            out = ctx.run_dir / "ported" / name
            res = port(ctx.run_dir / e["path"], new_dir, out, scale=params.scale, as_adapter=True,
                       old_base=ctx.model_path(), overwrite=True)
            ported[name] = out
            rows[name] = {"task": e["task"], "relation": res.diagnosis.relation,
                          "median_rel_drift": res.diagnosis.median_rel_drift}
        with status(f"Loading the new base {new_dir.name}"):
            new = load_model(new_dir)
        kw = {"split": params.split, "n": params.n, "seed": ctx.seed, "batch_size": params.batch_size,
              "cache_dir": cache_root() / "eval"}
        for name, row in rows.items():
            task = row["task"]
            for label, model, adapter in (("old_expert", ctx.model(), ctx.run_dir / experts[name]["path"]),
                                          ("new_base", new, None), ("new_ported", new, ported[name])):
                r = evaluate(model, None, task, adapter=adapter, **kw)
                row[label] = {"accuracy": r.accuracy, "ci": [r.ci_low, r.ci_high]}
            row["ported_beats_new_base"] = row["new_ported"]["ci"][0] > row["new_base"]["ci"][1]
        return {"new_base": str(new_dir), "scale": params.scale, "split": params.split, "n": params.n,
                "experts": rows}

    def report(self, result: dict[str, Any]) -> str:
        """Old expert, new base, ported expert per task; the drift of the base."""
        lines = ["| expert | drift of the base (median, relative) | old base + expert | new base | "
                 "new base + ported expert | ported beats new base beyond the 95% intervals |",
                 "|---|---:|---:|---:|---:|---|"]

        def cell(c: dict[str, Any]) -> str:
            return f"{c['accuracy']:.2f} [{c['ci'][0]:.2f}, {c['ci'][1]:.2f}]"

        for name, r in result["experts"].items():
            drift = r["median_rel_drift"]
            lines.append(f"| {name} | {'-' if drift is None else f'{drift:.4f}'} | {cell(r['old_expert'])} | "
                         f"{cell(r['new_base'])} | {cell(r['new_ported'])} | "
                         f"{'yes' if r['ported_beats_new_base'] else '**no**'} |")
        lines += ["", f"Ported without training (scale {result['scale']}) onto `{result['new_base']}`; "
                  f"accuracy on the {result['split']} split, n = {result['n']} per task."]
        return "\n".join(lines)


STAGES.add("evolve", EvolveStage(), params=EvolveParams,
           summary="continue pretraining the base on another corpus (an evolved base for porting)")
STAGES.add("port", PortStage(), params=PortParams,
           summary="port the run's experts onto an evolved base without training, and evaluate them there")
