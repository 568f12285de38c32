"""Build an expert library: one LoRA expert per task, then its Phatgoose gates; cached and resumable.

``build_library(base, config)`` trains each task's expert with :func:`expertkit.train.train_lora`
(which resumes from its checkpoint and reuses a finished adapter of the same config and base),
then its gate vectors (:mod:`expertkit.route.gates`, reused when finished with the same identity),
and writes ``library.json`` last. An interrupted build therefore loses at most the current step
range; running it again continues. Without ``out`` the library goes to
``<expertkit cache>/route/<base digest>-<config hash>`` (the digest reads every byte of the base), so the same recipe on the same base is
found again by any caller.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator

from expertkit.config import Config
from expertkit.route.gates import GateConfig
from expertkit.route.library import MANIFEST, Expert, ExpertLibrary
from expertkit.train.config import LoraTrainConfig

#: Ten held-in suite tasks (experts) and four held-out ones for the GLIDER experiment and the default
#: build: tasks the bundled model is weak on zero-shot and a LoRA expert can learn. Not leap_year: the
#: base model and the MoE answer "No" to all 300 test questions (its majority class, 0.803) and the
#: calendar dense expert scores the same 0.803 (docs/results.md, MoE subject and MoE PTQ), so it cannot
#: tell routers apart; next_number instead (base 0.057, its dense expert 0.320).
HELD_IN: tuple[str, ...] = ("family_relation", "reverse_words", "leg_count", "bbc_topic", "add_sub", "gcd",
                            "count_bits", "spell_backward", "sort_numbers", "next_number")
HELD_OUT: tuple[str, ...] = ("arith_mixed", "letter_count", "weekday_offset", "syllogism")


class LibraryConfig(Config):
    """What goes into a library: the tasks (one expert each), how experts and gates train."""

    model: str = Field("smollm2-135m", description="the base model (bundled name or local folder)")
    tasks: list[str] = Field(default_factory=lambda: list(HELD_IN), min_length=1,
                             description="one expert per task (held-in tasks)")
    descriptions: dict[str, str] = Field(default_factory=dict,
                                         description="task -> description; default: the task's own description")
    train: LoraTrainConfig = Field(default_factory=lambda: LoraTrainConfig(steps=60, batch_size=8),
                                   description="LoRA training of each expert")
    gates: GateConfig = Field(default_factory=GateConfig, description="gate training of each expert")

    @field_validator("tasks")
    @classmethod
    def _tasks(cls, v: list[str]) -> list[str]:
        return cls.check_tasks(v)

    @staticmethod
    def check_tasks(v: list[str]) -> list[str]:
        """Known task names, each with a train split, none twice (a ``ValueError`` names the problem)."""
        from expertkit.errors import UnknownNameError
        from expertkit.tasks.base import get_task

        for name in v:
            try:
                if get_task(name).eval_only:
                    raise ValueError(f"task '{name}' is evaluation only; an expert needs a train split")
            except UnknownNameError as exc:  # pydantic reports ValueErrors beside the file's other errors
                raise ValueError(str(exc)) from None
        if len(set(v)) != len(v):
            raise ValueError("a task is listed twice")
        return v

    def fingerprint(self) -> str:
        """A hash of everything that changes the library's weights (not the model source's name)."""
        fields = self.model_dump(mode="json", exclude={"model"})
        fields["train"] = self.train.training_fields()
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]


def default_library_dir(base_fingerprint: str, config: LibraryConfig) -> Path:
    """Where the library of ``config`` on the base whose ``model_digest`` is ``base_fingerprint`` is cached."""
    from expertkit.models.bundled import cache_root

    return cache_root() / "route" / f"{base_fingerprint[:16]}-{config.fingerprint()}"


def build_library(base: Any, config: LibraryConfig | None = None, out: str | os.PathLike[str] | None = None,
                  *, gates: bool = True) -> ExpertLibrary:
    """Train (or resume, or reuse) each task's expert and gates; return the library.

    ``base`` is a :class:`~expertkit.models.LoadedModel` or a source :func:`~expertkit.models.load_model`
    accepts (default: ``config.model``).
    """
    from expertkit.models.loader import LoadedModel, load_model
    from expertkit.progress import note
    from expertkit.route.gates import train_gates
    from expertkit.tasks.base import get_task
    from expertkit.train import train_lora
    from expertkit.weights.fingerprint import fingerprint, model_digest

    config = config or LibraryConfig()
    loaded = base if isinstance(base, LoadedModel) else load_model(base if base is not None else config.model)
    if loaded.fingerprint is None:
        loaded.fingerprint = fingerprint(dict(loaded.model.state_dict()))
    # the cache folder names the base by every byte (the sampled fingerprint could not tell apart two
    # bases that differ only in tensors it does not read)
    base_digest = model_digest(loaded.model)
    root = Path(out) if out is not None else default_library_dir(base_digest, config)
    experts = []
    for i, name in enumerate(config.tasks, 1):
        task = get_task(name)
        adapter = root / "experts" / name
        note(f"Expert {i}/{len(config.tasks)}: {name}")
        train_lora(loaded, task, adapter, config.train)
        gate_path = None
        if gates:
            gate_path = root / "gates" / f"{name}.safetensors"
            train_gates(loaded, adapter, task, gate_path, config.gates, base_digest=base_digest)
        experts.append(Expert(name, name, config.descriptions.get(name, task.description), adapter, gate_path))
    lib = ExpertLibrary.from_adapters(experts, root=root, meta={"config": config.model_dump(mode="json"),
                                                                "library_fingerprint": config.fingerprint()})
    lib.save(root)
    return lib


def library_exists(root: str | os.PathLike[str]) -> bool:
    """Whether ``root`` holds a finished library (its manifest is written last)."""
    return (Path(root) / MANIFEST).is_file()
