"""Canonical, streamed hashing of a model update, and the message that binds it to a round.

An update is a sequence of *items* in a fixed order: tensors (name, dtype, shape, raw bytes) and
scalars (name, value). :class:`UpdateHasher` feeds each item to SHA3-256 or BLAKE2b as it comes,
one tensor at a time, without ever concatenating the update; every field is length-prefixed and
type-tagged, so no two different updates share an encoding (a byte moved from one tensor to the
next, a renamed tensor, a reordered pair or a changed dtype all change the digest).
:func:`canonical_bytes` builds the same encoding in memory: the slow reference that the tests
compare the streamed digest against.

:func:`binding_message` is what is actually signed: the digest plus the run id, the round, the
sender (a client id or ``"server"``) and the role, so a valid signature cannot be replayed in
another round or run, or reassigned to another client.
"""

from __future__ import annotations

import hashlib
import numbers
import struct
from collections.abc import Iterable, Iterator
from typing import Any

from expertkit.errors import ConfigError, unknown

DIGESTS = ("sha3-256", "blake2b")
MAGIC = b"expertkit-fl-update-v1\x00"
SIGN_MAGIC = b"expertkit-fl-signed-v1\x00"


def _new(alg: str) -> Any:
    if alg == "sha3-256":
        return hashlib.sha3_256()
    if alg == "blake2b":
        return hashlib.blake2b(digest_size=32)
    raise unknown("digest algorithm", alg, DIGESTS)


U64_LIMIT = 1 << 64  # every length and dimension is encoded as an unsigned 64-bit integer
I64_RANGE = (-(1 << 63), 1 << 63)  # integer values: what a Flower record can carry over the wire (sint64)


class MalformedUpdateError(ConfigError):
    """An update (or a field of it) has a type or value that has no canonical encoding.

    Raised instead of ``struct.error`` / ``OverflowError`` / ``ValueError`` from deep inside the
    encoder, so a verifier can refuse one attacker-made reply and carry on with the others.
    """


def _u64(n: int) -> bytes:
    if not 0 <= n < U64_LIMIT:
        raise MalformedUpdateError(f"{n if abs(n) < 1 << 80 else 'a huge number'} is outside 0 .. 2^64-1")
    return struct.pack(">Q", n)


def _dim(d: Any) -> int:
    """A tensor dimension: an integer (not a bool) in 0 .. 2^64-1."""
    if isinstance(d, bool) or not isinstance(d, numbers.Integral):
        raise MalformedUpdateError(f"a dimension of type {type(d).__name__} (an integer is needed)")
    d = int(d)
    if not 0 <= d < U64_LIMIT:
        raise MalformedUpdateError(f"dimension {d if abs(d) < 1 << 80 else 'a huge number'} (0 .. 2^64-1 expected)")
    return d


def _text(value: Any, what: str) -> bytes:
    if not isinstance(value, str):
        raise MalformedUpdateError(f"{what} of type {type(value).__name__} (a string is needed)")
    return value.encode("utf-8", "surrogatepass")


def _field(data: bytes) -> bytes:
    return _u64(len(data)) + data


def encode_scalar(value: Any) -> bytes:
    """Type-tagged, length-prefixed encoding of a record value (bool, int, float, str, bytes, list)."""
    if isinstance(value, bool):
        return b"?" + (b"\x01" if value else b"\x00")
    if isinstance(value, int):
        if not I64_RANGE[0] <= value < I64_RANGE[1]:
            raise MalformedUpdateError("an integer value outside the signed 64-bit range")
        return b"i" + _field(str(value).encode())
    if isinstance(value, float):
        return b"f" + struct.pack(">d", value)
    if isinstance(value, str):
        return b"s" + _field(value.encode("utf-8", "surrogatepass"))
    if isinstance(value, (bytes, bytearray, memoryview)):
        return b"b" + _field(bytes(value))
    if isinstance(value, (list, tuple)):
        return b"L" + _u64(len(value)) + b"".join(encode_scalar(v) for v in value)
    raise MalformedUpdateError(f"cannot hash a value of type {type(value).__name__}; use bool, int, float, str, bytes "
                               "or lists.")


def tensor_header(name: str, dtype: str, shape: Iterable[int], nbytes: int) -> bytes:
    """The encoding that precedes a tensor's bytes.

    Raises :class:`MalformedUpdateError` for a name or dtype that is not a string, or a shape that
    is not a sequence of integers in 0 .. 2^64-1 (checked before anything is hashed).
    """
    if not isinstance(shape, (tuple, list)):
        raise MalformedUpdateError(f"tensor '{str(name)[:80]}': shape of type {type(shape).__name__} (a tuple is needed)")
    try:
        dims = [_dim(d) for d in shape]
    except MalformedUpdateError as exc:
        raise MalformedUpdateError(f"tensor '{str(name)[:80]}': {exc}") from None
    return b"T" + _field(_text(name, "a tensor name")) + _field(_text(dtype, "a dtype")) + _u64(len(dims)) + b"".join(
        _u64(d) for d in dims) + _u64(nbytes)


def as_buffer(tensor: Any) -> memoryview:
    """The raw bytes of a torch tensor or numpy array as a flat byte view (no copy when contiguous)."""
    try:
        import torch

        if isinstance(tensor, torch.Tensor):
            t = tensor.detach().cpu().contiguous().reshape(-1)
            return memoryview(t.view(torch.uint8).numpy())
    except ImportError:  # pragma: no cover
        pass
    import numpy as np

    a = np.ascontiguousarray(tensor).reshape(-1)
    return memoryview(a.view(np.uint8))


def dtype_name(tensor: Any) -> str:
    """``float32``-style dtype name of a torch tensor or numpy array."""
    return str(tensor.dtype).removeprefix("torch.")


class UpdateHasher:
    """Streamed canonical hash of an update: call :meth:`section`, :meth:`tensor`, :meth:`scalar` in order."""

    def __init__(self, alg: str = "sha3-256") -> None:
        self.alg = alg
        self._h = _new(alg)
        self._h.update(MAGIC)

    def section(self, kind: str, name: str) -> None:
        """Start a named group of items (e.g. a Flower record)."""
        self._h.update(b"R" + _field(_text(kind, "a record kind")) + _field(_text(name, "a record name")))

    def tensor(self, name: str, dtype: str, shape: Iterable[int], data: bytes | memoryview) -> None:
        """Add a tensor given its declared dtype and shape and its raw bytes."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise MalformedUpdateError(f"tensor '{str(name)[:80]}': data of type {type(data).__name__} (bytes needed)")
        view = memoryview(data).cast("B")
        self._h.update(tensor_header(name, dtype, shape, view.nbytes))
        self._h.update(view)

    def scalar(self, name: str, value: Any) -> None:
        """Add a named scalar (or list of scalars)."""
        self._h.update(b"S" + _field(_text(name, "a value name")) + encode_scalar(value))

    def digest(self) -> bytes:
        """The 32-byte digest of everything added so far."""
        return self._h.digest()


def digest_tensors(tensors: Iterable[tuple[str, Any]] | dict[str, Any], alg: str = "sha3-256") -> bytes:
    """Canonical digest of named torch tensors / numpy arrays, in the order given."""
    items = tensors.items() if isinstance(tensors, dict) else tensors
    h = UpdateHasher(alg)
    for name, t in items:
        h.tensor(name, dtype_name(t), tuple(t.shape), as_buffer(t))
    return h.digest()


def canonical_bytes(items: Iterable[tuple[str, ...]]) -> bytes:
    """Slow reference: the whole canonical encoding in memory.

    ``items`` are ``("section", kind, name)``, ``("tensor", name, dtype, shape, bytes)`` or
    ``("scalar", name, value)``; hashing the result equals :class:`UpdateHasher`'s digest.
    """
    out = bytearray(MAGIC)
    for item in items:
        if item[0] == "section":
            out += b"R" + _field(item[1].encode()) + _field(item[2].encode())
        elif item[0] == "tensor":
            _, name, dtype, shape, data = item
            data = bytes(data)
            out += tensor_header(name, dtype, shape, len(data)) + data
        else:
            out += b"S" + _field(item[1].encode()) + encode_scalar(item[2])
    return bytes(out)


def reference_digest(items: Iterable[tuple[str, ...]], alg: str = "sha3-256") -> bytes:
    """Digest of :func:`canonical_bytes` in one call (the slow reference)."""
    h = _new(alg)
    h.update(canonical_bytes(items))
    return h.digest()


def binding_message(digest: bytes, *, alg: str, run_id: str, server_round: int, sender: str, role: str) -> bytes:
    """The bytes that are signed: the update digest bound to run, round, sender and role.

    ``role`` is ``"client-update"`` for a client's training reply and ``"global-model"`` for the
    server's model; a signature made for one never verifies as the other.
    """
    if server_round < 0:
        raise ConfigError(f"server_round must be >= 0, got {server_round}.")
    fields: Iterator[bytes] = iter((
        alg.encode(), digest, run_id.encode(), str(int(server_round)).encode(), sender.encode(), role.encode(),
    ))
    return SIGN_MAGIC + b"".join(_field(f) for f in fields)
