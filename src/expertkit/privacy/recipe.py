"""One DP-Flat run end to end: split, teacher, layer choice, DP training, accuracy, sharpness, MIA.

:func:`train_private` is what the ``dp_train`` pipeline stage and ``experiments/dp_flat.py`` call:

1. :func:`~expertkit.privacy.split.privacy_split`: ``n_public`` + ``n_private`` disjoint training examples.
2. With ``distill_weight > 0``: a non-DP teacher (``adamw``, same scheme) trained on the **public**
   part only, into ``<out>/teacher`` (reused when finished), then passed as the DP optimizer's teacher.
3. With ``prefix_layers = k > 0`` (scheme ``prefix``): the ``k`` flattest layers by the top Hessian
   eigenvalue of each layer's prefix block, measured at the seeded initial prefix on **public** examples.
4. DP training of the student on the private part (``<out>/student``), ε accounted.
5. Accuracy on the test split (per-example scores kept for paired comparisons), the top Hessian
   eigenvalue of the trained weights on test examples, and the loss-threshold MIA AUC of the private
   training examples against test examples.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from pydantic import Field

from expertkit.config import Config
from expertkit.train.config import LoraTrainConfig


class PrivateRecipe(Config):
    """A DP-Flat run (frozen; unknown keys are errors)."""

    task: str = Field(description="a registered task (its train split is cut into public and private parts)")
    n_public: int = Field(100, ge=1, description="public training examples (teacher, layer choice)")
    n_private: int = Field(300, ge=2, description="private training examples (the DP student's data)")
    train: LoraTrainConfig = Field(
        default_factory=lambda: LoraTrainConfig(optimizer="dp-adamw"),
        description="the student's training; its optimizer must be dp-sgd or dp-adamw",
    )
    teacher_steps: int = Field(40, ge=1, description="steps of the non-DP teacher on the public part")
    distill_weight: float = Field(0.0, ge=0, description="weight distillation from the teacher (0 = no teacher)")
    prefix_layers: int = Field(0, ge=0, description="sparse prefix: train the k flattest layers (0 = all; scheme prefix)")
    sharpness_examples: int = Field(4, ge=1, description="examples of the sharpness measurements")
    sharpness_iters: int = Field(8, ge=1, description="power iterations of each sharpness measurement")
    eval_n: int = Field(300, ge=1, description="test examples scored")
    mia_n: int = Field(100, ge=1, description="members and non-members of the membership inference attack")


def _batch(tokenizer: Any, task: Any, examples: list[Any], max_prompt_tokens: int) -> tuple[torch.Tensor, ...]:
    from expertkit.tasks.infer import pad_id_of
    from expertkit.train.data import collate, encode_examples

    return collate(encode_examples(tokenizer, task, examples, max_prompt_tokens), pad_id_of(tokenizer))


def prefix_layer_sharpness(loaded: Any, task: Any, examples: list[Any], config: LoraTrainConfig,
                           iters: int) -> list[float]:
    """Each prefix layer's sharpness at the seeded initial prefix, measured on ``examples`` (public)."""
    from expertkit.privacy.prefix import layer_sharpness
    from expertkit.train.schemes import wrap

    batch = _batch(loaded.tokenizer, task, examples, config.max_prompt_tokens)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)  # the same initial prefix as training draws
        model, give_back = wrap(loaded.model, config, loaded.path)
        try:
            return layer_sharpness(model, batch, iters=iters, seed=config.seed)
        finally:
            give_back()


def trained_sharpness(loaded: Any, out: Path, task: Any, examples: list[Any], config: LoraTrainConfig,
                      iters: int) -> float:
    """Top Hessian eigenvalue of the loss on ``examples`` w.r.t. the trained parameters of ``out``."""
    from peft import PeftModel

    from expertkit.models import load_model
    from expertkit.privacy.sharpness import top_eigenvalue

    batch = _batch(loaded.tokenizer, task, examples, config.max_prompt_tokens)
    if config.scheme == "full":
        model = load_model(str(out)).model
        params = list(model.parameters())
        return top_eigenvalue(model, params, batch, iters=iters, seed=config.seed)
    model = PeftModel.from_pretrained(loaded.model, str(out))  # PEFT refuses trainable prompt learning here
    try:
        params = [p for n, p in model.named_parameters() if "default" in n.split(".")]  # the adapter's own
        for p in params:
            p.requires_grad_(True)
        return top_eigenvalue(model, params, batch, iters=iters, seed=config.seed)
    finally:
        if not model.active_peft_config.is_prompt_learning:
            model.unload()  # the base weights were never changed


def _public_key(loaded: Any, recipe: PrivateRecipe, what: dict[str, Any]) -> str:
    """A digest of everything a public-part artefact depends on: the base's contents (its
    :func:`~expertkit.weights.fingerprint.model_digest`, not its folder, so that a base rebuilt under the
    same path never reuses a stale teacher), the task and its split, ``what``."""
    import hashlib

    from expertkit.weights.fingerprint import model_digest

    ident = {"model": model_digest(loaded.model), "task": recipe.task, "n_public": recipe.n_public,
             "n_private": recipe.n_private, "seed": recipe.train.seed, **what}
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:16]


def train_private(loaded: Any, recipe: PrivateRecipe, out_dir: str | Path, *,
                  shared: str | Path | None = None) -> dict[str, Any]:
    """Run ``recipe`` on ``loaded`` (a :class:`~expertkit.models.LoadedModel`) into ``out_dir``.

    ``shared``: a folder where what depends on the public part only -- the teacher and the prefix
    layers' sharpness -- is kept under a digest of its inputs and reused by runs with the same inputs
    (the cells of a sweep over ε differ only in the DP student; on bbc_topic the sparse-prefix cell
    took 841 s measuring the sharpness at ε = 3 and 243 s reading it back at ε = 8). Runs on one machine take turns
    (a file lock). Without it, the teacher goes to ``<out_dir>/teacher`` and the sharpness is measured every time."""
    from expertkit.errors import ConfigError
    from expertkit.fileio import locked, write_atomic
    from expertkit.privacy.mia import loss_threshold_mia
    from expertkit.privacy.split import privacy_split
    from expertkit.tasks.base import get_task
    from expertkit.tasks.evaluate import evaluate
    from expertkit.train import train_lora

    out_dir = Path(out_dir)
    cfg = recipe.train
    if not cfg.optimizer.startswith("dp-"):
        raise ConfigError(f"train.optimizer must be dp-sgd or dp-adamw for a private run; got '{cfg.optimizer}'.")
    if recipe.prefix_layers and cfg.scheme != "prefix":
        raise ConfigError("prefix_layers (sparse prefix tuning) needs train.scheme: prefix.")
    task = get_task(recipe.task)
    split = privacy_split(task, recipe.n_public, recipe.n_private, cfg.seed)
    params = dict(cfg.optimizer_params)
    result: dict[str, Any] = {"task": task.name, "n_public": recipe.n_public, "n_private": recipe.n_private}
    if recipe.distill_weight > 0:
        teacher_cfg = cfg.model_copy(update={"optimizer": "adamw", "optimizer_params": {}, "steps": recipe.teacher_steps,
                                             "train_examples": None, "eval_n": 0})
        if shared is None:
            teacher = out_dir / "teacher"
            train_lora(loaded, split.public, teacher, teacher_cfg)
        else:
            key = _public_key(loaded, recipe, {"teacher": teacher_cfg.model_dump(mode="json")})
            teacher = Path(shared) / f"teacher-{key}"
            with locked(Path(shared) / f"teacher-{key}.lock"):
                train_lora(loaded, split.public, teacher, teacher_cfg)  # returns at once when finished
        params.update(teacher=str(teacher), distill_weight=recipe.distill_weight)
        result["teacher"] = str(teacher)
    public = list(split.public_examples[: recipe.sharpness_examples])
    if recipe.prefix_layers:
        def measure() -> list[float]:
            return prefix_layer_sharpness(loaded, split.public, public, cfg, recipe.sharpness_iters)

        if shared is None:
            sharp = measure()
        else:  # what the prefix depends on: the student's settings less its optimizer's (ε, noise, rho)
            scheme = cfg.model_dump(mode="json", exclude={"optimizer", "optimizer_params"})
            key = _public_key(loaded, recipe, {"scheme": scheme, "examples": recipe.sharpness_examples,
                                               "iters": recipe.sharpness_iters})
            cache = Path(shared) / f"layer-sharpness-{key}.json"
            with locked(Path(shared) / f"layer-sharpness-{key}.lock"):
                if not cache.is_file():
                    write_atomic(cache, json.dumps(measure()))
                sharp = json.loads(cache.read_text())
        from expertkit.privacy.prefix import select_layers

        layers = select_layers(sharp, recipe.prefix_layers)
        params["prefix_layers"] = list(layers)
        result["layer_sharpness"], result["prefix_layers"] = sharp, list(layers)
    student_cfg = cfg.model_copy(update={"optimizer_params": params, "train_examples": recipe.n_private, "eval_n": 0})
    res = train_lora(loaded, split.private, out_dir / "student", student_cfg)
    adapter = None if cfg.scheme == "full" else out_dir / "student"
    model = loaded if adapter is not None else None
    if model is None:
        from expertkit.models import load_model

        model = load_model(str(out_dir / "student"))
    ev = evaluate(model, None, task, split="test", n=recipe.eval_n, seed=cfg.seed, adapter=adapter)
    test = task.examples("test", max(recipe.mia_n, recipe.sharpness_examples), cfg.seed + 1)
    mia = loss_threshold_mia(model.model, model.tokenizer, task, list(split.private_examples[: recipe.mia_n]),
                             test[: recipe.mia_n], adapter=adapter, max_prompt_tokens=cfg.max_prompt_tokens)
    sharp = trained_sharpness(loaded, out_dir / "student", task, test[: recipe.sharpness_examples], cfg,
                              recipe.sharpness_iters)
    report = res.meta.get("optimizer_report", {})
    result.update({
        "accuracy": ev.accuracy, "ci": [ev.ci_low, ev.ci_high], "scores": list(ev.scores),
        "epsilon": report.get("epsilon", math.inf), "privacy": report, "mia": mia.as_dict(),
        "top_eigenvalue": sharp, "train_loss": res.train_loss, "seconds": res.seconds,
        "student": str(out_dir / "student"),
    })
    return result
