"""``build_moe``: a sparse MoE from one dense model, Branch-Train-MiX style, cached by its recipe.

1. **Branch and train** (:mod:`~expertkit.moe.experts`): one copy of the base per cluster, its MLPs
   trained at full rank on the cluster's tasks plus general text.
2. **Dense experts**: each written as a full model folder (the base with that expert's MLPs), which
   also serves as the "dense expert" baseline of the experiments.
3. **Routers from centroids**: the mean MLP input of each cluster's prompts in the uniform average
   of the experts (:func:`~expertkit.merge.mixture.hidden_state_routers`).
4. **MiX** (:func:`~expertkit.merge.mixture.dense_to_moe`): experts become one layer's experts of a
   ``MixtralForCausalLM`` (or ``Qwen2MoeForCausalLM`` with the base MLP as the shared expert);
   attention, norms and embeddings are the base's (they were never trained, so this is exact).
5. **Router training** (:mod:`~expertkit.moe.router_train`) on the mixture of all clusters with the
   load-balancing loss.
6. The effective rank of the experts' pairwise differences (:mod:`~expertkit.moe.rank`) goes into
   ``moe_build.json`` beside the weights.

The MoE lives under ``<cache>/moe-build/<fingerprint>/``, where the fingerprint hashes the recipe
and the base's weights: a second build of the same recipe reuses the finished MoE; an interrupted
one resumes (finished experts are kept, training resumes from its last checkpoint). Experts live
under ``<cache>/moe-build/experts/<cluster>-<expert recipe hash>/`` (MLP tensors and the dense
folder), so recipes that differ only in routing or target share them.
The finished MoE is installed atomically, and copied atomically to ``out`` when one is given.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from expertkit.errors import ConfigError
from expertkit.moe.config import MoeBuildConfig

FORMAT = "expertkit-moe-build-v1"
META_NAME = "moe_build.json"


@dataclass
class BuildResult:
    """A finished MoE: its folder, the recipe fingerprint and the build record."""

    path: Path
    fingerprint: str
    meta: dict[str, Any]
    reused: bool = False

    @property
    def dense_experts(self) -> dict[str, Path]:
        """``{cluster name: dense expert folder}`` (kept in the build cache)."""
        return {name: Path(p) for name, p in self.meta["dense_experts"].items()}


def recipe_fingerprint(config: MoeBuildConfig, base_fingerprint: str) -> str:
    """Hash of the recipe and the base weights (``model_digest`` of the loaded base): the build cache key."""
    text = json.dumps({"format": FORMAT, "recipe": config.fingerprint_fields(), "base": base_fingerprint},
                      sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def build_key(config: MoeBuildConfig, base: Any = None) -> str:
    """The build cache key of ``config``: the recipe and every byte of the base's weights (not its
    sampled fingerprint: two bases differing only in tensors the fingerprint does not read, a merged
    LoRA on q/v say, must not share experts). ``base``: the loaded base, when already loaded."""
    from expertkit.models.loader import load_model
    from expertkit.weights.fingerprint import model_digest

    base = base if base is not None else load_model(config.base)
    return recipe_fingerprint(config, model_digest(base.model))


def cached_build(config: MoeBuildConfig) -> Path | None:
    """The finished MoE folder of ``config`` in the cache, or ``None``; never builds."""
    from expertkit.models.bundled import cache_root

    fp = build_key(config)
    final = cache_root() / "moe-build" / fp / "moe"
    return final if _finished(final, fp) is not None else None


def _finished(folder: Path, fp: str) -> dict[str, Any] | None:
    try:
        meta = json.loads((folder / META_NAME).read_text())
    except (OSError, ValueError):
        return None
    weights = list(folder.glob("*.safetensors"))
    return meta if meta.get("fingerprint") == fp and weights and (folder / "config.json").is_file() else None


def build_moe(config: MoeBuildConfig, out: str | os.PathLike[str] | None = None, *,
              overwrite: bool = False) -> BuildResult:
    """Build (or reuse) the MoE of ``config``; with ``out``, also copy it there (see the module docstring)."""
    from expertkit.models.bundled import cache_root
    from expertkit.models.loader import load_model
    from expertkit.weights.fingerprint import model_digest

    out_path = Path(out) if out is not None else None
    if out_path is not None and out_path.exists() and not overwrite:
        raise ConfigError(f"output folder exists: {out_path}. Choose another path or pass --overwrite.")
    base = load_model(config.base)
    if base.path is None or base.tokenizer is None:
        raise ConfigError(f"base '{config.base}' must be a local model folder with a tokenizer.")
    base_fp = model_digest(base.model)  # every byte: see build_key
    fp = recipe_fingerprint(config, base_fp)
    work = cache_root() / "moe-build" / fp
    final = work / "moe"
    with _build_lock(work.parent):  # one build at a time: two would train the same experts into the same files
        meta = _finished(final, fp)
        reused = meta is not None
        if meta is None:
            meta = _build(config, base, base_fp, fp, work, final)
    result = BuildResult(final, fp, meta, reused)
    if out_path is not None:
        copy_folder(final, out_path)
        result = BuildResult(out_path, fp, meta, reused)
    return result


@contextlib.contextmanager
def _build_lock(root: Path) -> Iterator[None]:
    """An exclusive lock on the build cache; a second build waits (and says so) until the first ends."""
    import fcntl

    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            from expertkit.progress import note

            fh.seek(0)
            note(f"waiting for another MoE build to finish (process {fh.read().strip() or '?'}; lock {root / '.lock'})")
            fcntl.flock(fh, fcntl.LOCK_EX)
        fh.seek(0)
        fh.truncate()
        fh.write(str(os.getpid()))
        fh.flush()
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _build(config: MoeBuildConfig, base: Any, base_fp: str, fp: str, work: Path, final: Path) -> dict[str, Any]:
    from expertkit.fileio import write_atomic
    from expertkit.moe.data import cluster_data
    from expertkit.moe.experts import identity, train_expert, write_dense_expert
    from expertkit.moe.rank import difference_ranks

    began = time.perf_counter()
    work.mkdir(parents=True, exist_ok=True)
    (work / "recipe.json").write_text(json.dumps(config.fingerprint_fields(), indent=1) + "\n")
    per_task = max(64, -(-config.expert_steps * config.batch_size // min(len(c.tasks) for c in config.clusters)))
    data = cluster_data(base.tokenizer, config, per_task)
    experts, dense, records = [], {}, []
    for i, cluster in enumerate(config.clusters):
        ident = identity(config, i, base_fp)
        # experts are keyed by their own recipe, so a build that changes only the routers reuses them
        home = work.parent / "experts" / f"{cluster.name}-{ident}"
        mlp_file = home / "mlp.safetensors"
        records.append(train_expert(base.model, base.tokenizer, data[i], config, i, mlp_file, ident))
        experts.append(mlp_file)
        folder = home / "dense"
        marker = folder / ".expertkit-expert"
        if not (marker.is_file() and marker.read_text() == ident):
            write_dense_expert(base.path, mlp_file, folder)
            marker.write_text(ident)
        dense[cluster.name] = str(folder)
    routers = _init_routers(config, list(dense.values()))
    mixed = _mix(config, list(dense.values()), routers, base.path, work)
    router_record = _train_and_install(config, mixed, base.tokenizer, data, work, final, fp)
    ranks = difference_ranks(experts, base.path)
    meta = {"format": FORMAT, "fingerprint": fp, "base": config.base, "base_digest": base_fp,
            "base_fingerprint": base.fingerprint,
            "recipe": config.fingerprint_fields(), "experts": records, "dense_experts": dense,
            "router_training": router_record, "difference_ranks": ranks,
            "seconds": time.perf_counter() - began}
    write_atomic(final / META_NAME, json.dumps(meta, indent=1) + "\n")
    shutil.rmtree(mixed, ignore_errors=True)
    return meta


def _init_routers(config: MoeBuildConfig, dense: list[str]) -> dict[int, Any]:
    from expertkit.merge.mixture import hidden_state_routers, uniform_probe
    from expertkit.moe.data import cluster_prompts
    from expertkit.progress import status

    if config.router.init == "zeros":
        return {}
    with status("Router initialisation from hidden-state centroids"):
        probe = uniform_probe(dense)
        prompts = cluster_prompts(config, config.router.init_prompts)
        return hidden_state_routers(probe.model, probe.tokenizer, prompts, scale=config.router.scale)


def _mix(config: MoeBuildConfig, dense: list[str], routers: dict[int, Any], base: Path, work: Path) -> Path:
    from expertkit.merge.mixture import dense_to_moe
    from expertkit.progress import status

    mixed = work / "mixed-init"
    marker = mixed / ".expertkit-mixed"
    if marker.is_file():
        return mixed
    with status(f"Writing the {config.target} mixture of {len(dense)} experts"):
        shared = base if config.target == "qwen2_moe" else None
        dense_to_moe(dense, mixed, routers=routers, top_k=config.top_k, overwrite=True, target=config.target,
                     shared=shared)
    marker.write_text("done")
    return mixed


def _train_and_install(config: MoeBuildConfig, mixed: Path, tokenizer: Any, data: list[Any], work: Path,
                       final: Path, fp: str) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM

    from expertkit.fileio import install_folder
    from expertkit.moe.router_train import train_routers

    record: dict[str, Any] = {"steps": 0}
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=work))
    try:
        if config.router.steps:
            model = AutoModelForCausalLM.from_pretrained(mixed, dtype=torch.float32)
            record = train_routers(model, tokenizer, data, config, work / "router.state.safetensors", fp)
            model.save_pretrained(staging / "moe")
            del model
            copy_extras(mixed, staging / "moe")
            usual_permissions(staging / "moe")  # save_pretrained may leave its files 0600
        else:
            shutil.copytree(mixed, staging / "moe", ignore=shutil.ignore_patterns(".*"))
        install_folder(staging / "moe", final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    (work / "router.state.safetensors").unlink(missing_ok=True)
    return record


def is_weights_file(name: str) -> bool:
    """Whether ``name`` is a checkpoint's weights file or shard index (never copied between checkpoints)."""
    return name.endswith((".safetensors", ".safetensors.index.json", ".bin", ".bin.index.json"))


def copy_extras(src: Path, dest: Path) -> None:
    """Copy ``src``'s tokenizer, template and generation files into ``dest`` where it lacks them.

    Weights files and shard indexes are never copied: the mixture's shards next to the trained
    model's own file would leave two checkpoints in one folder (and transformers loads whichever
    it finds first)."""
    for extra in src.iterdir():
        if (extra.is_file() and not extra.name.startswith(".") and not is_weights_file(extra.name)
                and not (dest / extra.name).exists()):
            shutil.copy2(extra, dest / extra.name)


def usual_permissions(folder: Path) -> None:
    """Give every file directly in ``folder`` the usual mode (``0o666`` less the umask)."""
    from expertkit.fileio import umask

    mode = 0o666 & ~umask()
    for f in folder.iterdir():
        if f.is_file():
            os.chmod(f, mode)


def copy_folder(src: Path, dest: Path) -> Path:
    """Copy a model folder to ``dest`` atomically (a temporary sibling, fsync, rename)."""
    from expertkit.fileio import staged_folder

    with staged_folder(dest) as tmp:
        shutil.copytree(src, tmp, ignore=shutil.ignore_patterns(".*"), dirs_exist_ok=True)
    return dest
