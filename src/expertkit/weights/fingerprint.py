"""Short, stable fingerprints of model weights.

A fingerprint names a set of weights cheaply: it reads the headers and a few
dozen values, never the whole model, so it costs milliseconds even for a
multi-gigabyte checkpoint. Patches record the fingerprint of the base they were
made on, and refuse (by default) to be applied to another base.

What is hashed (``sha256``, hex digest truncated to 16 characters), exactly:

1. the line ``expertkit-fingerprint-v1\\n``;
2. for every tensor, in sorted name order, the line
   ``{name}\\t{dtype}\\t{shape}\\n`` where ``dtype`` is the safetensors dtype
   string (``F32``, ``BF16``, ...; ``str(dtype)`` for dtypes safetensors lacks)
   and ``shape`` is the comma-joined sizes (empty for a scalar);
3. for each *sampled* tensor, in sorted name order, the line
   ``sample {name}\\n`` followed by the little-endian float32 bytes of up to
   :data:`SAMPLE_VALUES` elements of the flattened tensor, at flat indices
   ``i * numel // k`` for ``i in range(k)``, ``k = min(SAMPLE_VALUES, numel)``
   (each value cast to float32 first; a complex value gives its real and imaginary parts, in
   that order, and a ``float4_e2m1fn_x2`` element, which packs two 4-bit values, its byte value).

The sampled tensors are up to :data:`SAMPLE_TENSORS` tensors with at least one
element, taken at evenly spaced positions ``round(j * (n - 1) / (m - 1))`` of
the sorted list of the ``n`` non-empty tensor names (all of them when
``n <= SAMPLE_TENSORS``).

So a renamed, reshaped, re-typed, added or removed tensor, or a change to a
sampled value, changes the fingerprint; a change to an unsampled value does
not. A fingerprint identifies a base model; it is not an integrity checksum.
It depends only on the tensors present: a state dict holding tied weights
twice (``lm_head.weight`` and the embedding) differs from the folder that
``save_pretrained`` wrote with the tied copy left out.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from expertkit.errors import InputTypeError
from expertkit.weights._format import DTYPE_NAMES
from expertkit.weights.reader import Checkpoint

SAMPLE_TENSORS = 8
SAMPLE_VALUES = 64
FINGERPRINT_LENGTH = 16
#: safetensors ``__metadata__`` key under which a file may record the fingerprint of its base.
FINGERPRINT_METADATA_KEY = "expertkit.base_fingerprint"

Source = Checkpoint | Mapping[str, torch.Tensor] | str | os.PathLike[str]


def _dtype_str(dtype: torch.dtype) -> str:
    return DTYPE_NAMES.get(dtype, str(dtype))


def sample_indices(numel: int, k: int = SAMPLE_VALUES) -> list[int]:
    """Flat indices of the values sampled from a tensor with ``numel`` elements."""
    k = min(k, numel)
    return [i * numel // k for i in range(k)]


def sampled_names(shapes: Mapping[str, tuple[int, ...]], m: int = SAMPLE_TENSORS) -> list[str]:
    """Names of the tensors whose values enter the fingerprint (sorted)."""
    names = sorted(n for n, s in shapes.items() if _numel(s) > 0)
    if len(names) <= m:
        return names
    return [names[round(j * (len(names) - 1) / (m - 1))] for j in range(m)]


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _values_bytes(flat_values: torch.Tensor) -> bytes:
    """Little-endian float32 bytes of a 1-D tensor of sampled values."""
    v = flat_values.detach().cpu()
    if v.is_complex():
        v = torch.view_as_real(v)  # (k, 2): real, imaginary
    elif v.dtype == torch.float4_e2m1fn_x2:  # torch cannot cast it; hash its bytes' values
        v = v.view(torch.uint8)
    v = v.to(torch.float32).contiguous()
    return v.numpy().astype("<f4", copy=False).tobytes()


def _sample_from_checkpoint(ckpt: Checkpoint, name: str) -> torch.Tensor:
    """Read just the sampled elements of one tensor (seeks, no full read)."""
    info = ckpt.info(name)
    idx = sample_indices(info.numel)
    if not info.shard.endswith(".safetensors"):  # a pickle held in memory by the reader
        return ckpt.read(name).reshape(-1)[idx]
    item = info.nbytes // info.numel
    raw = bytearray(len(idx) * item)
    with open(ckpt.folder / info.shard, "rb") as fh:
        for j, i in enumerate(idx):
            fh.seek(info.offset + i * item)
            raw[j * item : (j + 1) * item] = fh.read(item)
    # (k * itemsize,) bytes -> (k,) tensor of the stored dtype
    return torch.frombuffer(raw, dtype=torch.uint8).view(info.dtype)


def _digest(
    meta: Mapping[str, tuple[tuple[int, ...], torch.dtype]],
    sample: Callable[[str], torch.Tensor],  # name -> (k,) sampled values
) -> str:
    h = hashlib.sha256(b"expertkit-fingerprint-v1\n")
    for name in sorted(meta):
        shape, dtype = meta[name]
        h.update(f"{name}\t{_dtype_str(dtype)}\t{','.join(str(s) for s in shape)}\n".encode())
    for name in sampled_names({n: s for n, (s, _) in meta.items()}):
        h.update(f"sample {name}\n".encode())
        h.update(_values_bytes(sample(name)))
    return h.hexdigest()[:FINGERPRINT_LENGTH]


def fingerprint(source: Source) -> str:
    """Return the 16-hex-character fingerprint of a set of weights.

    Args:
        source: a :class:`Checkpoint`, a path to a checkpoint folder or a
            ``.safetensors`` file, or a state dict (name -> tensor).

    The same weights give the same fingerprint whichever form they come in.
    See the module docstring for exactly what is hashed.
    """
    if isinstance(source, Mapping):
        bad = [k for k, v in source.items() if not isinstance(v, torch.Tensor)]
        if bad:
            raise InputTypeError(
                f"fingerprint() needs a state dict of tensors; entries {bad[:3]} are not tensors."
            )
        meta = {k: (tuple(v.shape), v.dtype) for k, v in source.items()}
        return _digest(meta, lambda n: source[n].detach().reshape(-1)[sample_indices(source[n].numel())])
    if isinstance(source, Checkpoint):
        return _fingerprint_checkpoint(source)
    if isinstance(source, (str, os.PathLike)):
        with Checkpoint(Path(source)) as ckpt:
            return _fingerprint_checkpoint(ckpt)
    raise InputTypeError(
        f"fingerprint() takes a Checkpoint, a path or a state dict, not {type(source).__name__}."
    )


def _fingerprint_checkpoint(ckpt: Checkpoint) -> str:
    meta = {i.name: (i.shape, i.dtype) for i in ckpt.infos()}
    return _digest(meta, lambda n: _sample_from_checkpoint(ckpt, n))


def content_digest(state: Mapping[str, torch.Tensor], extra: str = "") -> str:
    """SHA-256 (hex, 32 characters) of every tensor's name, dtype, shape and bytes, plus ``extra``.

    Unlike :func:`fingerprint`, which samples a few values to name a base cheaply, this reads every
    byte (about 1 GB/s), so two models that differ anywhere get different digests. Evaluation caches
    key on it: a sampled fingerprint would let a model changed only in unsampled tensors (routers
    trained alone, a few re-quantized experts, weights edited in memory after loading) hit another
    model's cached scores. A tensor shared under two names (tied weights) is read once.
    """
    h = hashlib.sha256(b"expertkit-content-v1\n")
    h.update(extra.encode())
    done: dict[tuple[int, int, tuple[int, ...], torch.dtype], bytes] = {}  # storage -> its bytes' digest
    for name in sorted(state):
        t = state[name].detach()
        h.update(f"\n{name}\t{_dtype_str(t.dtype)}\t{','.join(str(s) for s in t.shape)}\n".encode())
        ident = (t.data_ptr(), t.numel(), tuple(t.stride()), t.dtype)
        if ident not in done:
            flat = t.cpu().contiguous().reshape(-1).view(torch.uint8)  # (numel * itemsize,) raw bytes
            done[ident] = hashlib.sha256(memoryview(flat.numpy())).digest()
        h.update(done[ident])
    return h.hexdigest()[:32]


_CONFIG_NOISE = ("_name_or_path", "transformers_version", "_commit_hash")


def model_digest(model: torch.nn.Module) -> str:
    """:func:`content_digest` of a model as it is in memory now: every weight and buffer, its class
    and its config (less the fields that name where it was loaded from). Caches of results computed
    from a model (evaluations, routing statistics) key on this, never on a folder's fingerprint."""
    config = getattr(model, "config", None)
    described = config.to_dict() if hasattr(config, "to_dict") else {}
    described = {k: v for k, v in described.items() if k not in _CONFIG_NOISE}
    extra = type(model).__name__ + json.dumps(described, sort_keys=True, default=str)
    return content_digest(model.state_dict(), extra)

