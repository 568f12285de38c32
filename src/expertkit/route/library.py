"""The expert library: LoRA experts on one base, each with a task description and (optionally) gates.

A library is a folder with ``library.json`` (the manifest) beside the experts it names::

    library.json          {"format", "base_fingerprint", "experts": [{name, task, description,
                           adapter, gates}], ...}
    experts/<name>/       a PEFT LoRA adapter folder (expertkit.train.train_lora writes these)
    gates/<name>.safetensors   Phatgoose gate vectors of that expert, one (in_features,) per module

Any capability can build one from adapter folders it already has (:meth:`ExpertLibrary.from_adapters`)
and read the stacked factors (:meth:`ExpertLibrary.stacks`). Every expert must carry the same base
fingerprint (``adapter_model.safetensors`` metadata written by expertkit training); experts made on
different bases are refused, as is an empty library.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from expertkit.errors import CheckpointError, ConfigError, IncompatibleModelsError

FORMAT = "expertkit-route-library-v1"
MANIFEST = "library.json"


@dataclass(frozen=True)
class Expert:
    """One expert of a library: its adapter folder, the task it was trained on, its description."""

    name: str
    task: str
    description: str
    adapter: Path
    gates: Path | None = None


@dataclass(frozen=True)
class LoraStack:
    """The factors of every expert at one module, stacked.

    ``a``: ``(E, r, in)`` with the LoRA scale folded in; ``b``: ``(E, out, r)``;
    ``gates``: ``(E, in)`` Phatgoose gate vectors, or ``None`` when the library has none.
    ``delta_e = b[e] @ a[e]`` is expert ``e``'s weight delta ``(out, in)``.
    """

    a: torch.Tensor
    b: torch.Tensor
    gates: torch.Tensor | None = None


@dataclass
class ExpertLibrary:
    """Experts on one base model (identified by its fingerprint)."""

    experts: list[Expert]
    base_fingerprint: str | None
    root: Path | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.experts:
            raise ConfigError("the expert library is empty; add at least one expert (a LoRA adapter folder).")
        names = [e.name for e in self.experts]
        if len(set(names)) != len(names):
            raise ConfigError(f"expert names must be unique in a library; got {names}.")

    @property
    def names(self) -> list[str]:
        """Expert names in library order (the expert axis of every score and stack)."""
        return [e.name for e in self.experts]

    @property
    def descriptions(self) -> list[str]:
        """Expert descriptions in library order."""
        return [e.description for e in self.experts]

    def index(self, name: str) -> int:
        """Position of expert ``name`` (an unknown name lists the known ones)."""
        from expertkit.errors import unknown

        if name not in self.names:
            raise unknown("expert", name, self.names)
        return self.names.index(name)

    def expert_for_task(self, task: str) -> int | None:
        """Position of the expert trained on ``task``, or ``None`` (a held-out task)."""
        return next((i for i, e in enumerate(self.experts) if e.task == task), None)

    def digest(self) -> str:
        """SHA-256 of what routing reads: each expert's name, task, description, adapter weights and config,
        and gates, in library order. Two libraries built apart (another machine, a rebuilt cache) have
        the same digest only when their experts are byte for byte the same."""
        import hashlib

        from expertkit.fileio import sha256_file

        h = hashlib.sha256()
        for e in self.experts:
            files = [Path(e.adapter) / "adapter_model.safetensors", Path(e.adapter) / "adapter_config.json"]
            parts = [e.name, e.task, e.description, *(sha256_file(f) for f in files),
                     sha256_file(e.gates) if e.gates is not None else "-"]
            h.update("\0".join(parts).encode() + b"\n")
        return h.hexdigest()

    @property
    def has_gates(self) -> bool:
        """Whether every expert has trained gate vectors (local routing needs them)."""
        return all(e.gates is not None for e in self.experts)

    # ------------------------------------------------------------------ building
    @classmethod
    def from_adapters(cls, experts: list[Expert], *, root: Path | None = None,
                      meta: dict[str, Any] | None = None) -> ExpertLibrary:
        """A library of existing adapter folders; their base fingerprints must agree."""
        if not experts:
            raise ConfigError("the expert library is empty; add at least one expert (a LoRA adapter folder).")
        fps = {e.name: adapter_fingerprint(e.adapter) for e in experts}
        distinct = {fp for fp in fps.values() if fp is not None}
        if len(distinct) > 1:
            first = next(iter(fps.items()))
            other = next((n, f) for n, f in fps.items() if f != first[1])
            raise IncompatibleModelsError(
                f"experts were trained on different bases: '{first[0]}' on {first[1]}, '{other[0]}' on "
                f"{other[1]}; a library holds experts of one base model only."
            )
        return cls(list(experts), next(iter(distinct), None), root, dict(meta or {}))

    def save(self, root: str | os.PathLike[str]) -> Path:
        """Write ``library.json`` into ``root`` (paths relative to it where they lie inside)."""
        from expertkit.fileio import write_atomic

        root = Path(root)
        root.mkdir(parents=True, exist_ok=True)

        def rel(p: Path | None) -> str | None:
            if p is None:
                return None
            p = Path(p).resolve()
            try:
                return str(p.relative_to(root.resolve()))
            except ValueError:
                return str(p)

        data = {"format": FORMAT, "base_fingerprint": self.base_fingerprint, "meta": self.meta,
                "experts": [{"name": e.name, "task": e.task, "description": e.description,
                             "adapter": rel(e.adapter), "gates": rel(e.gates)} for e in self.experts]}
        write_atomic(root / MANIFEST, json.dumps(data, indent=1))
        self.root = root
        return root / MANIFEST

    @classmethod
    def load(cls, root: str | os.PathLike[str]) -> ExpertLibrary:
        """Read a library folder written by :meth:`save` (or by :func:`~expertkit.route.build_library`)."""
        root = Path(root)
        path = root / MANIFEST
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise CheckpointError(f"{root} is not an expert library ({MANIFEST} is missing); build one with "
                                  "`expertkit route build`.") from None
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{path}: unreadable library manifest ({exc}).") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("experts"), list):
            raise CheckpointError(f"{path}: not an expertkit library manifest (format {FORMAT} expected).")
        experts = []
        for i, e in enumerate(data["experts"]):
            if not isinstance(e, dict) or not all(isinstance(e.get(k), str) for k in ("name", "task", "adapter")):
                raise CheckpointError(f"{path}: expert {i} needs string fields name, task and adapter.")
            gates = e.get("gates")
            experts.append(Expert(e["name"], e["task"], str(e.get("description") or e["task"]),
                                  root / e["adapter"], None if gates is None else root / gates))
        lib = cls.from_adapters(experts, root=root, meta=data.get("meta") or {})
        if data.get("base_fingerprint") and lib.base_fingerprint not in (None, data["base_fingerprint"]):
            raise IncompatibleModelsError(f"{path}: the manifest names base {data['base_fingerprint']} but its "
                                          f"experts carry {lib.base_fingerprint}; rebuild the library.")
        return lib

    def check_base(self, fingerprint: str | None) -> None:
        """Refuse to route a model whose fingerprint differs from the experts' base."""
        if fingerprint and self.base_fingerprint and fingerprint != self.base_fingerprint:
            raise IncompatibleModelsError(
                f"the library's experts were trained on base {self.base_fingerprint}, not on this model "
                f"({fingerprint}); route the base they were trained on, or build a library for this one."
            )

    # ------------------------------------------------------------------ factors
    def stacks(self, *, dtype: torch.dtype = torch.float32) -> dict[str, LoraStack]:
        """``module name -> LoraStack`` over every expert (the modules must agree across experts)."""
        from expertkit.weights.lora import LoraAdapter

        per_module: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        for k, expert in enumerate(self.experts):
            with LoraAdapter.open(expert.adapter) as adapter:
                found = {name[: -len(".weight")]: (a, b) for name, a, b in adapter.factors(dtype=dtype)}
            if k and sorted(found) != sorted(per_module):
                raise IncompatibleModelsError(
                    f"expert '{expert.name}' adapts other modules than '{self.experts[0].name}'; "
                    "train every expert of a library with the same target_modules.")
            for module, ab in found.items():
                per_module.setdefault(module, []).append(ab)
        gates = self._gates(sorted(per_module)) if self.has_gates else None
        out = {}
        for module, pairs in per_module.items():
            ranks = {a.shape[0] for a, _ in pairs}
            if len(ranks) > 1:
                raise IncompatibleModelsError(f"experts have different LoRA ranks at {module} ({sorted(ranks)}); "
                                              "train every expert of a library with one rank.")
            out[module] = LoraStack(torch.stack([a for a, _ in pairs]), torch.stack([b for _, b in pairs]),
                                    None if gates is None else gates[module])
        return out

    def _gates(self, modules: list[str]) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        rows: dict[str, list[torch.Tensor]] = {m: [] for m in modules}
        for expert in self.experts:
            assert expert.gates is not None  # has_gates checked by the caller
            try:
                tensors = load_file(expert.gates)
            except (OSError, ValueError) as exc:
                raise CheckpointError(f"{expert.gates}: unreadable gate file ({exc}); rebuild the library.") from None
            missing = [m for m in modules if m not in tensors]
            if missing:
                raise CheckpointError(f"{expert.gates} has no gate for {missing[0]}; rebuild the library's gates.")
            for m in modules:
                rows[m].append(tensors[m].float())
        return {m: torch.stack(v) for m, v in rows.items()}  # (E, in) each


def adapter_fingerprint(adapter: str | os.PathLike[str]) -> str | None:
    """The base fingerprint an expertkit adapter records in its weights' metadata (``None`` if absent)."""
    from safetensors import safe_open

    from expertkit.weights.fingerprint import FINGERPRINT_METADATA_KEY

    weights = Path(adapter) / "adapter_model.safetensors"
    if not weights.is_file():
        raise CheckpointError(f"{adapter} is not a LoRA adapter folder (no adapter_model.safetensors).")
    try:
        with safe_open(str(weights), framework="pt") as f:
            return (f.metadata() or {}).get(FINGERPRINT_METADATA_KEY)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{weights}: unreadable ({exc}).") from None
