"""Writing quantized models: the compressed-tensors format, a dequantized HF folder, GGUF; and reading back.

**compressed-tensors** (``pack-quantized``, what vLLM and llm-compressor use): for every quantized
linear ``M`` of the on-disk layout (per-expert names, e.g. ``...block_sparse_moe.experts.3.w1``) the
folder holds ``M.weight_packed`` (int32: the ``b``-bit codes packed densely by
``compressed_tensors``' ``pack_to_int32``), ``M.weight_scale`` (one scale per group, float16 by
default), ``M.weight_shape`` and, when asymmetric, ``M.weight_zero_point`` (packed likewise); config.json
gets a ``quantization_config`` with one config group per distinct (bits, group size, symmetry), built
with compressed-tensors' own ``QuantizationConfig`` / ``QuantizationScheme`` / ``QuantizationArgs``;
matrices kept in 16-bit are stored as float16 and listed under ``ignore``. Everything else (embeddings,
norms, routers) is stored as the model holds it.

:func:`load_compressed` reads such a folder on CPU: every module is decompressed by compressed-tensors'
own ``PackedQuantizationCompressor.decompress`` with its group's scheme, the dense weights go into a
temporary folder and transformers loads that. (transformers 5.24's own loader dequantizes only
checkpoints whose experts share one scheme; see docs/quant.md for what it does with mixed ones.)
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from expertkit.errors import CheckpointError, ConfigError

FORMAT = "pack-quantized"


def _disk_key(role: Any, name: str) -> tuple[Any, ...]:
    return (role.stack, role.layer, role.expert, role.module, name.rsplit(".", 1)[-1])


def _record_index(result: Any) -> dict[tuple[Any, ...], Any]:
    """Records keyed the way on-disk tensors are classified: (stack, layer, expert, module, 'weight')."""
    out = {}
    for rec in result.records.values():
        t = rec.target
        if t.transposed:
            raise ConfigError(f"{t.name}: weights stored transposed (GPT-2 Conv1D) cannot be written in the "
                              "compressed-tensors format; use formats: [dequantized].")
        out[(t.stack, t.layer, t.expert, t.module, "weight")] = rec
    return out


def quantization_config(groups: dict[tuple[int, int, bool], list[str]], ignore: list[str], act_order: bool) -> dict:
    """The ``quantization_config`` of config.json, built with compressed-tensors' classes."""
    import compressed_tensors
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

    schemes = {}
    for i, ((bits, group, sym), modules) in enumerate(sorted(groups.items())):
        args = QuantizationArgs(num_bits=bits, type="int", symmetric=sym,
                                strategy="channel" if group == -1 else "group", group_size=None if group == -1 else group,
                                actorder="weight" if act_order else None)
        schemes[f"group_{i}"] = QuantizationScheme(targets=sorted(modules), weights=args, format=FORMAT)
    qc = QuantizationConfig(config_groups=schemes, format=FORMAT, quantization_status="compressed", ignore=sorted(ignore))
    return {"quant_method": "compressed-tensors", "version": compressed_tensors.__version__,
            **qc.model_dump(mode="json", exclude={"quant_method"})}


def write_compressed(result: Any, out: Path, work: Path) -> Path:
    """Write ``result``'s model as a compressed-tensors folder at ``out`` (``work``: scratch space)."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    from expertkit.quant.apply import codes_of
    from expertkit.weights.arch import describe
    from expertkit.weights.reader import Checkpoint
    from expertkit.weights.writer import ShardedWriter

    index = _record_index(result)
    dense = _save_dense(result, work / "dense")
    groups: dict[tuple[int, int, bool], list[str]] = {}
    ignore: list[str] = []
    with Checkpoint(dense) as ckpt:
        roles = describe(ckpt.names(), ckpt.config).roles
        found = {name: index.get(_disk_key(roles[name], name)) for name in ckpt.names()}
        missing = set(map(id, index.values())) - {id(r) for r in found.values() if r is not None}
        if missing:
            raise CheckpointError(f"{len(missing)} quantized matrices have no tensor in the saved layout; the "
                                  "architecture descriptor does not match how transformers saves this model.")
        for name, rec in found.items():
            if rec is None:
                continue
            module = name.rsplit(".", 1)[0]
            if rec.scheme.quantized:
                groups.setdefault((rec.scheme.bits, rec.scheme.group_size, rec.scheme.symmetric), []).append(module)
            else:
                ignore.append(module)
        config = json.loads((dense / "config.json").read_text())
        config["quantization_config"] = quantization_config(groups, ignore, result.config.gptq.act_order)
        (dense / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        with ShardedWriter(out, template=dense, overwrite=True) as writer:
            for name in ckpt.names():
                rec, t = found[name], ckpt.read(name)
                if rec is None:
                    writer.add(name, t)
                    continue
                module = name.rsplit(".", 1)[0]
                if not rec.scheme.quantized:
                    writer.add(name, t.half())
                    continue
                q = codes_of(t, rec)
                writer.add(f"{module}.weight_packed", pack_to_int32(q.codes, rec.scheme.bits))
                writer.add(f"{module}.weight_scale", q.scale.to(getattr(torch, rec.scheme.scale_dtype)))
                writer.add(f"{module}.weight_shape", torch.tensor(list(t.shape), dtype=torch.int64))
                if not rec.scheme.symmetric:
                    writer.add(f"{module}.weight_zero_point", pack_to_int32(q.zero, rec.scheme.bits, packed_dim=0))
    return out


def _save_dense(result: Any, folder: Path) -> Path:
    """``save_pretrained`` of the (dequantized) model and its tokenizer: the on-disk layout transformers uses."""
    loaded = result.loaded
    loaded.model.save_pretrained(folder)
    if loaded.tokenizer is not None:
        loaded.tokenizer.save_pretrained(folder)
    return folder


def write_outputs(result: Any, out: Path, *, overwrite: bool = False) -> dict[str, Path]:
    """Every format of ``result.config.formats`` under ``out`` (the first one is ``out`` itself), plus
    ``quantization.json``; written atomically (nothing appears unless everything was written)."""
    from expertkit.fileio import staged_folder, write_atomic

    out = Path(out)
    if out.exists() and not overwrite:
        raise CheckpointError(f"{out} exists; pass --overwrite (or overwrite=True) to replace it.")
    formats = list(result.config.formats)
    paths: dict[str, Path] = {}
    with staged_folder(out) as tmp, tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.work-") as w:
        work = Path(w)
        first = formats[0]
        if first == "compressed":
            write_compressed(result, tmp, work)
        elif first == "dequantized":
            shutil.rmtree(tmp)
            _save_dense(result, tmp)
        tmp.mkdir(exist_ok=True)
        paths[first] = out
        if "dequantized" in formats[1:]:
            _save_dense(result, tmp / "dequantized")
            paths["dequantized"] = out / "dequantized"
        if "compressed" in formats[1:]:
            write_compressed(result, tmp / "compressed", work)
            paths["compressed"] = out / "compressed"
        if "gguf" in formats:
            from expertkit.quant.gguf import write_gguf

            write_gguf(result, tmp / "model.gguf")
            paths["gguf"] = out / "model.gguf"
        write_atomic(tmp / "quantization.json", json.dumps(result.report(), indent=1, default=_json) + "\n")
    return paths


def _json(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def is_compressed(folder: str | Path) -> bool:
    """True when ``folder``'s config.json declares a compressed-tensors quantization."""
    try:
        config = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return (config.get("quantization_config") or {}).get("quant_method") == "compressed-tensors"


def decompressed_state(folder: str | Path) -> dict[str, torch.Tensor]:
    """The dense tensors (on-disk names) of a compressed-tensors folder, decompressed by compressed-tensors."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig

    from expertkit.weights.reader import Checkpoint

    folder = Path(folder)
    raw = json.loads((folder / "config.json").read_text())["quantization_config"]
    try:
        qc = QuantizationConfig.model_validate({k: v for k, v in raw.items() if k != "version"})
    except ValueError as exc:
        raise CheckpointError(f"{folder}: invalid quantization_config ({exc}).") from None
    out: dict[str, torch.Tensor] = {}
    with Checkpoint(folder) as ckpt:
        names = ckpt.names()
        packed = {n.rsplit(".", 1)[0] for n in names if n.endswith(".weight_packed")}
        for module in sorted(packed):
            scheme = _scheme_for(qc, module)
            parts = {k: ckpt.read(f"{module}.{k}") for k in ("weight_packed", "weight_scale", "weight_shape",
                                                             "weight_zero_point") if f"{module}.{k}" in ckpt}
            compressor = BaseCompressor.get_value_from_registry(scheme.format or qc.format)
            out[f"{module}.weight"] = compressor.decompress(parts, scheme)["weight"].float()
        for name in names:
            if name.rsplit(".", 1)[0] not in packed:
                out[name] = ckpt.read(name)
    return out


def _scheme_for(qc: Any, module: str) -> Any:
    for scheme in qc.config_groups.values():
        for target in scheme.targets:
            if target == module or (target.startswith("re:") and re.fullmatch(target[3:], module)):
                return scheme
    raise CheckpointError(f"{module} has packed weights but no config group of quantization_config targets it.")


def load_compressed(folder: str | Path, *, dtype: torch.dtype = torch.float32) -> Any:
    """A transformers model (CPU, ``dtype``) from a compressed-tensors folder, decompressed by compressed-tensors."""
    from expertkit.weights.writer import TEMPLATE_FILES, save_state_dict

    folder = Path(folder)
    state = decompressed_state(folder)
    with tempfile.TemporaryDirectory(prefix="expertkit-decompressed-") as tmp:
        dense = Path(tmp) / "model"
        save_state_dict({k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}, dense)
        del state
        config = json.loads((folder / "config.json").read_text())
        config.pop("quantization_config", None)
        (dense / "config.json").write_text(json.dumps(config))
        for name in TEMPLATE_FILES:
            if name != "config.json" and (folder / name).exists():
                shutil.copy2(folder / name, dense / name)
        from expertkit.models import load_model  # the dense folder: every model kind load_model reads (e.g. an
                                                 # MC-SMoE-compressed MoE with fewer experts per layer)

        model = load_model(str(dense), dtype=dtype, with_tokenizer=False).model
    model.eval()
    return model
