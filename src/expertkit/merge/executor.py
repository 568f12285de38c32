"""The streaming merge executor behind ``expertkit merge CONFIG OUT``.

:func:`run_merge` merges tensor by tensor: for each output tensor it reads that one tensor from
every input (a base shared by several LoRA inputs is read once), merges it with the same
:func:`~expertkit.merge.core.merge_tensor` the in-memory reference uses, writes it at its offset
in the output shards and drops it. Resident tensor memory is therefore the inputs' tensors plus
the output (and the method's working copies), bounded by the largest tensor times a small
factor, never by model size.

Before any tensor is read, every input is opened (headers only), the per-tensor jobs are laid
out and checked for compatibility (architecture, tied embeddings, names, shapes, vocabulary);
any mismatch is one error and nothing is written. The output is written by
:class:`~expertkit.weights.ShardedWriter` into a temporary folder and renamed into place at the
end, so a failed merge leaves no output. ``config.json`` is the reference model's with the layer
count, vocabulary size and dtype updated; tokenizer files come from the tokenizer source.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from pathlib import Path
from typing import Any

import torch

from expertkit.errors import ConfigError
from expertkit.merge.config import IGNORED_PARAMS, MergeConfig, model_key_problems
from expertkit.merge.core import as_weights, check_weights, get_method, merge_tensor, resolve_params
from expertkit.merge.methods.base import check_method_inputs
from expertkit.merge.plan import MergePlan, TensorJob, VocabPlan, build_plan, check_compatible
from expertkit.merge.sources import FolderSource, LoraSource, SourceSet
from expertkit.weights.reader import Checkpoint
from expertkit.weights.writer import TEMPLATE_FILES, ShardedWriter

MERGE_METADATA_KEY = "expertkit.merge"


def _dtype(name: str | None) -> torch.dtype | None:
    return getattr(torch, name) if name else None


def prepare(config: MergeConfig, sources: SourceSet) -> MergePlan:
    """Validate the method contract, lay out the jobs and check compatibility (no tensor data read)."""
    method = get_method(config.merge_method)
    plan = build_plan(config, sources, method)
    n_inputs = len(plan.jobs[0].inputs) if plan.jobs else 0
    check_method_inputs(method, n_inputs, bool(plan.jobs and plan.jobs[0].base))
    if method.stats and config.models is not None and not all(m.stats for m in config.models):
        raise ConfigError(f"merge method '{method.name}' needs per-model statistics ({method.stats}); give "
                          "'stats: FILE' for every model (expertkit.merge.stats writes them).")
    for job in plan.jobs:  # every parameter of every tensor resolves (typos, ranges) before any work
        _params(method, job)
    check_compatible(plan, config.tokenizer_source)
    return plan


def _check_model_keys(method: Any, keys: set[str], i: int, where: str) -> None:
    """Refuse parameters set on model ``i`` that the method would not use (a typo, or a global one)."""
    problems = model_key_problems(method, keys)
    if problems:
        raise ConfigError(f"{where}, model {i + 1}: " + " ".join(problems))


def _params(method: Any, job: TensorJob) -> tuple[list[float], Any, list[Any]]:
    """(weights, shared params, per-model params) of one job, settings resolved for its tensor.

    ``weight`` is per model; the method's ``per_model`` parameters may be set per model; every
    other parameter comes from the slice or top-level ``parameters``.
    """
    from expertkit.merge.config import resolve_settings

    shared_all = resolve_settings(job.shared_params, job.out_name, t=job.t, group=job.group)
    shared = {k: v for k, v in shared_all.items() if k != "weight" and k not in IGNORED_PARAMS}
    where = f"parameters for '{job.out_name}'"
    p = resolve_params(method, shared, where=where)
    raw: list[Any] = []
    per_model = []
    for i, sources in enumerate(job.model_params):
        mine = resolve_settings(sources, job.out_name, t=job.t, group=job.group)
        _check_model_keys(method, set(mine) - set(shared_all), i, where)
        raw.append(mine.get("weight", 1.0))
        own = {k: v for k, v in mine.items() if k in method.per_model and shared.get(k) != v}
        per_model.append(resolve_params(method, {**shared, **own}, where=where) if own else p)
    weights = as_weights(raw, where=where)
    check_weights(method, weights, p, where=where)
    return weights, p, per_model


def _align_rows(t: torch.Tensor, rows: int, fill: torch.Tensor | None) -> torch.Tensor:
    """``t`` cut or padded to ``rows`` rows; padding rows come from ``fill`` (same trailing shape)."""
    if t.shape[0] == rows:
        return t
    if t.shape[0] > rows:
        return t[:rows].clone()
    out = torch.empty((rows, *t.shape[1:]), dtype=t.dtype)
    out[: t.shape[0]] = t
    assert fill is not None  # the fill has `rows` rows when any input is shorter
    out[t.shape[0]:] = fill[t.shape[0]:rows].to(t.dtype)
    return out


def _vocab_fill(tensors: list[torch.Tensor], rows: int) -> torch.Tensor | None:
    """Per row, the mean over the inputs that have that row (None when every input has all rows)."""
    if all(t.shape[0] >= rows for t in tensors):
        return None
    total = torch.zeros((rows, *tensors[0].shape[1:]), dtype=torch.float32)
    count = torch.zeros(rows, dtype=torch.float32)
    for t in tensors:
        n = min(rows, t.shape[0])
        total[:n] += t[:n].float()
        count[:n] += 1
    return total / count.clamp(min=1).reshape(-1, *([1] * (total.dim() - 1)))


class _JobReader:
    """Reads one job's tensors; a base folder shared by LoRA inputs is read once per job.

    For a ``zero_copy`` method, folder tensors are mapped (copy-on-write) instead of read: the
    method only reads them, so their bytes are never copied out of the page cache.
    """

    def __init__(self, plan: MergePlan, dtype: torch.dtype | None) -> None:
        self.plan, self.dtype = plan, dtype
        self.zero_copy = plan.method.zero_copy
        self.cache: dict[tuple[int, str], torch.Tensor] = {}

    def read(self, idx: int, name: str) -> torch.Tensor:
        src = self.plan.sources[idx]
        if isinstance(src, LoraSource):
            base = None if name in src.replaced else self._folder(src.base, name)
            t = src.apply(name, base)
        else:
            t = self._folder(src, name)
        return t.to(self.dtype) if self.dtype is not None and t.dtype.is_floating_point else t

    def _folder(self, src: FolderSource, name: str) -> torch.Tensor:
        key = (id(src), name)
        if key not in self.cache:
            self.cache[key] = src.view(name) if self.zero_copy else src.read(name)
        return self.cache[key]


def merge_job(plan: MergePlan, job: TensorJob, *, dtype: torch.dtype | None, out_dtype: torch.dtype | None,
              seed: int, stats: list[Checkpoint | None]) -> torch.Tensor:
    """Read, align and merge one output tensor."""
    reader = _JobReader(plan, dtype)
    tensors = [reader.read(i, n) for i, n in job.inputs]
    base = reader.read(*job.base) if job.base else None
    vocab: VocabPlan | None = plan.vocab
    if vocab is not None and job.group in ("embedding", "lm_head"):
        everything = [*tensors, *([base] if base is not None else [])]
        fill = _vocab_fill(everything, vocab.rows)
        tensors = [_align_rows(t, vocab.rows, fill) for t in tensors]
        base = _align_rows(base, vocab.rows, fill) if base is not None else None
    weights, p, ps = _params(plan.method, job)
    st = None
    if plan.method.stats:
        st = [s.read(n) if s is not None and n in s else None for s, (_, n) in zip(stats, job.inputs, strict=True)]
    return merge_tensor(plan.method, job.out_name, tensors, base, weights=weights, params=p, per_model=ps,
                        seed=seed, stats=st, out_dtype=out_dtype,
                        owned=not plan.method.zero_copy)


def _stage_template(plan: MergePlan, out_dir: Path, out_dtype: torch.dtype | None) -> Path:
    """A temporary folder with the output's config.json and tokenizer files."""
    staging = out_dir.parent / f".{out_dir.name}.template-{secrets.token_hex(4)}"
    staging.mkdir(parents=True)
    ref_folder = plan.reference.folder
    tok_folder = plan.vocab.template.folder if plan.vocab is not None else ref_folder
    for fname in TEMPLATE_FILES:
        src = (ref_folder if fname in ("config.json", "generation_config.json") else tok_folder) / fname
        if src.is_file():
            shutil.copyfile(src, staging / fname)
    cfg_path = staging / "config.json"
    if cfg_path.is_file():
        cfg = json.loads(cfg_path.read_text())
        if plan.num_layers is not None:
            for key in ("num_hidden_layers", "n_layer", "num_layers"):
                if key in cfg:
                    cfg[key] = plan.num_layers
                    break
        if plan.vocab is not None and "vocab_size" in cfg:
            cfg["vocab_size"] = plan.vocab.rows
        if out_dtype is not None:
            key = "dtype" if "dtype" in cfg else "torch_dtype"
            cfg[key] = str(out_dtype).removeprefix("torch.")
        cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
    return staging


def run_merge(config: MergeConfig, out_dir: str | os.PathLike[str], *, overwrite: bool = False,
              allow_pickle: bool = False, progress: bool = True) -> Path:
    """Run a merge config and write a loadable Hugging Face folder at ``out_dir``; returns it.

    Every input is checked before any work; on any error (bad config, incompatible models, an
    interruption) nothing is left at ``out_dir`` (an existing folder is replaced only when
    ``overwrite`` and only once the new one is complete).
    """
    from expertkit.progress import track

    out_dir = Path(out_dir).absolute()
    if out_dir.exists() and not overwrite:
        raise ConfigError(f"output folder exists: {out_dir}. Choose another path or pass overwrite "
                          "(CLI: --overwrite).")
    sources = SourceSet(base_ref=config.base_model, allow_pickle=allow_pickle)
    staging: Path | None = None
    stats: list[Checkpoint | None] = []
    try:
        plan = prepare(config, sources)
        dtype, out_dtype = _dtype(config.dtype), _dtype(config.out_dtype or config.dtype)
        stats = [Checkpoint(p) if p else None for p in plan.stats]
        layout = []
        for job in plan.jobs:
            i, n = job.inputs[0]
            shape = list(plan.sources[i].shape(n))
            if plan.vocab is not None and job.group in ("embedding", "lm_head"):
                shape[0] = plan.vocab.rows
            ref_dtype = plan.sources[job.base[0]].dtype(job.base[1]) if job.base else plan.sources[i].dtype(n)
            dt = (out_dtype or dtype or ref_dtype) if ref_dtype.is_floating_point else ref_dtype
            layout.append((job.out_name, shape, dt))
        staging = _stage_template(plan, out_dir, out_dtype)
        meta = {MERGE_METADATA_KEY: json.dumps(config.model_dump(mode="json", exclude_none=True), sort_keys=True)}
        with ShardedWriter(out_dir, max_shard_size=config.max_shard_size, template=staging, metadata=meta,
                           overwrite=overwrite, layout=layout) as writer:
            jobs = track(plan.jobs, f"Merging ({config.merge_method})") if progress else plan.jobs
            for job, (_, _, dt) in zip(jobs, layout, strict=True):
                out = merge_job(plan, job, dtype=dtype, out_dtype=dt, seed=config.seed, stats=stats)
                writer.add(job.out_name, out)
                del out
        return out_dir
    finally:
        for s in stats:
            if s is not None:
                s.close()
        sources.close()
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
