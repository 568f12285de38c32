"""Quantized matrices kept on disk, so that many bit allocations of one model share their work.

With Hessians gathered in one calibration pass of the *unquantized* model (``quantize_model(...,
calibration=...)``), a matrix's codes at ``b`` bits depend only on the matrix, its Hessian, ``b``, the
format and GPTQ's settings: not on how the other matrices were allocated. An experiment that compares
allocation policies at several average bit-widths (``experiments/moe_quant.py``: 7 policies x 4 bit
points, each a mix of 2, 3 and 4 bits) therefore needs each (matrix, bits) solved once, not once per
system. Measured on the bundled MoE (840 matrices, docs/results.md): GPTQ of every matrix takes 340-390 s
per system on 2 cores, scoring the system about a minute. GPTQ libraries quantize a model at one
setting and keep no per-matrix results across allocations, hence this small store of our own.

Layout: ``<folder>/identity.json`` (what the caller says the codes depend on besides the settings: the
model's weights and the calibration; a store opened with another identity is refused), and one
safetensors file per matrix under ``<folder>/<settings key>/``: its ``codes`` (int8), ``scale`` and
``zero``, with the method and the layer errors in the file's metadata. Every file is written
atomically, so processes sharing a store (Ray cells) can only ever write the same bytes twice.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from expertkit.errors import ConfigError
from expertkit.quant.grid import QuantizedWeight, Scheme


class CodeStore:
    """Per-matrix quantization results of one model and one calibration (see the module docstring)."""

    def __init__(self, folder: str | Path, identity: dict[str, Any]) -> None:
        from expertkit.fileio import write_atomic

        self.folder = Path(folder)
        self.identity = json.loads(json.dumps(identity, sort_keys=True, default=str))
        path = self.folder / "identity.json"
        if path.is_file():
            held = json.loads(path.read_text())
            if held != self.identity:
                diff = sorted(k for k in set(held) | set(self.identity) if held.get(k) != self.identity.get(k))
                raise ConfigError(f"{self.folder} holds codes of another model or calibration (differs in: "
                                  f"{', '.join(diff)}); give another folder or delete this one.")
        else:
            write_atomic(path, json.dumps(self.identity, indent=1, sort_keys=True) + "\n")

    @staticmethod
    def _key(scheme: Scheme, method: str, settings: Any) -> str:
        what = {"scheme": asdict(scheme), "method": method, "settings": asdict(settings)}
        return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]

    def _path(self, name: str, scheme: Scheme, method: str, settings: Any) -> Path:
        slug = re.sub(r"[^\w.-]+", "_", name)[:120]  # readable, and the hash keeps "a[1]" and "a_1_" apart
        tag = hashlib.sha1(name.encode()).hexdigest()[:8]
        return self.folder / self._key(scheme, method, settings) / f"{slug}-{tag}.safetensors"

    def get(self, name: str, scheme: Scheme, method: str,
            settings: Any) -> tuple[QuantizedWeight, dict[str, Any]] | None:
        """``(codes, {"method", "error", "rtn_error"})`` of matrix ``name`` quantized so, or None if not stored."""
        from safetensors import safe_open

        path = self._path(name, scheme, method, settings)
        if not path.is_file():
            return None
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            if meta.get("name") != name:
                raise ConfigError(f"{path} holds {meta.get('name')!r}, not {name!r}: the code store is damaged; "
                                  "delete the folder and quantize again.")
            q = QuantizedWeight(fh.get_tensor("codes"), fh.get_tensor("scale"), fh.get_tensor("zero"), scheme)
        info = {k: (None if meta.get(k, "") == "" else float(meta[k])) for k in ("error", "rtn_error")}
        return q, {"method": meta["method"], **info}

    def put(self, name: str, scheme: Scheme, method: str, settings: Any, q: QuantizedWeight,
            info: dict[str, Any]) -> None:
        """Keep the result ``q`` (with ``info``: the method used and the layer errors) of matrix ``name``."""
        from safetensors.torch import save

        from expertkit.fileio import write_atomic

        meta = {"name": name, "method": str(info["method"])}
        meta.update({k: ("" if info.get(k) is None else repr(float(info[k]))) for k in ("error", "rtn_error")})
        tensors = {"codes": q.codes.contiguous(), "scale": q.scale.contiguous(), "zero": q.zero.contiguous()}
        write_atomic(self._path(name, scheme, method, settings), save(tensors, metadata=meta))
