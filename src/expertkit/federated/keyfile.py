"""Key files in standard encodings: PEM as ``cryptography`` and OpenSSL write and read them.

* Ed25519 (RFC 8410) and ML-DSA (FIPS 204; RFC 9881, the 32-byte seed form) keys: the secret
  key is an unencrypted PKCS#8 ``PRIVATE KEY`` PEM (the file is mode 0600), the public key a
  SubjectPublicKeyInfo ``PUBLIC KEY`` PEM. expertkit's own facts (format, owner, scheme,
  fingerprint) are ``name: value`` lines *before* the PEM block: RFC 7468 (section 5.2) lets text
  precede the block and PEM readers skip it, so ``cryptography``'s ``load_pem_private_key``, Go's
  ``pem.Decode`` or ``openssl pkey -in`` read the file as it is.
* A bare PEM from another tool is read too: the scheme follows from the key's algorithm
  (Ed25519 -> ``ed25519``, ML-DSA-65 -> ``ml-dsa-65``), the owner from the file name.
* Other schemes (FN-DSA, SLH-DSA, hybrids) and ML-DSA keys held as pqcrypto's expanded secret
  key (no seed: ``cryptography`` cannot load that form) have no encoding another library reads;
  they keep expertkit's JSON format (``expertkit-fl-key-v1``, see :mod:`.keys`), which is read
  for every scheme, so key files of earlier versions keep working.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from expertkit.errors import CheckpointError

PEM_FORMAT = "expertkit-fl-key-v2"
MAX_KEY_FILE_BYTES = 1 << 20  # the largest key file is a few tens of kB (SLH-DSA in JSON)
_MLDSA = re.compile(r"^ml-dsa-(44|65|87)(-openssl|-pqcrypto)?$")
_HEADER_LINE = re.compile(r"^([a-z-]{1,32}): ?(.{0,200})$")


def _mldsa_level(scheme: str) -> str | None:
    m = _MLDSA.match(scheme)
    return m.group(1) if m else None


def pem_encodable(scheme: str, secret: bytes | None = None) -> bool:
    """Whether a key of ``scheme`` (and this ``secret``, if given) has a standard PEM encoding here."""
    if scheme == "ed25519":
        return True
    if _mldsa_level(scheme) is None:
        return False
    from expertkit.federated.signing.mldsa import HAS_OPENSSL_MLDSA, SEED_BYTES

    return HAS_OPENSSL_MLDSA and (secret is None or len(secret) == SEED_BYTES)


def _crypto_key(scheme: str, raw: bytes, private: bool) -> Any:
    """``raw`` (public key, or Ed25519 secret / ML-DSA seed) as a ``cryptography`` key object."""
    if scheme == "ed25519":
        from cryptography.hazmat.primitives.asymmetric import ed25519

        return (ed25519.Ed25519PrivateKey.from_private_bytes(raw) if private
                else ed25519.Ed25519PublicKey.from_public_bytes(raw))
    from cryptography.hazmat.primitives.asymmetric import mldsa

    level = _mldsa_level(scheme)
    if private:
        return getattr(mldsa, f"MLDSA{level}PrivateKey").from_seed_bytes(raw)
    return getattr(mldsa, f"MLDSA{level}PublicKey").from_public_bytes(raw)


def _scheme_of(key: Any, path: Path) -> str:
    """The scheme a ``cryptography`` key object belongs to (``ed25519`` or ``ml-dsa-NN``)."""
    name = type(key).__name__  # Ed25519PrivateKey, MLDSA65PublicKey, ...
    if name.startswith("Ed25519"):
        return "ed25519"
    m = re.match(r"^MLDSA(44|65|87)(Private|Public)Key$", name)
    if m:
        return f"ml-dsa-{m.group(1)}"
    raise CheckpointError(f"{path} holds a {name}: expertkit reads Ed25519 and ML-DSA keys from PEM files "
                          "(other schemes from its JSON key files).")


def _header(**fields: str) -> bytes:
    return "".join(f"{k}: {v}\n" for k, v in {"format": PEM_FORMAT, **fields}.items()).encode()


def encode_secret(owner: str, scheme: str, secret: bytes, fingerprint: str, created: str) -> bytes:
    """The ``.key`` file: expertkit's header lines, then the PKCS#8 PEM of the secret key."""
    from cryptography.hazmat.primitives import serialization as ser

    pem = _crypto_key(scheme, secret, True).private_bytes(ser.Encoding.PEM, ser.PrivateFormat.PKCS8,
                                                          ser.NoEncryption())
    return _header(owner=owner, scheme=scheme, fingerprint=fingerprint, created=created) + pem


def encode_public(owner: str, scheme: str, public: bytes, fingerprint: str) -> bytes:
    """The ``.pub`` file: expertkit's header lines, then the SubjectPublicKeyInfo PEM."""
    from cryptography.hazmat.primitives import serialization as ser

    pem = _crypto_key(scheme, public, False).public_bytes(ser.Encoding.PEM, ser.PublicFormat.SubjectPublicKeyInfo)
    return _header(owner=owner, scheme=scheme, fingerprint=fingerprint) + pem


def is_pem(data: bytes) -> bool:
    """Whether a key file's bytes hold a PEM block (else it is the JSON format)."""
    return b"-----BEGIN " in data


def _owner_from_name(path: Path) -> str:
    name = path.name
    for suffix in (".pem", ".key", ".pub"):
        name = name.removesuffix(suffix)
    return name


def decode_pem(data: bytes, path: Path) -> dict[str, Any]:
    """Read a PEM key file: ``{"owner", "scheme", "public", "secret" (or None), "fingerprint" (or None)}``.

    The header lines are optional; when present they must be well formed and agree with the key.
    """
    from cryptography.hazmat.primitives import serialization as ser

    text_end = data.index(b"-----BEGIN ")
    fields: dict[str, str] = {}
    for line in data[:text_end].decode("utf-8", "replace").splitlines():
        if not line.strip():
            continue
        m = _HEADER_LINE.match(line.strip())
        if m is None:
            raise CheckpointError(f"{path}: unreadable line before the PEM block: {line[:60]!r}.")
        fields[m.group(1)] = m.group(2).strip()
    if fields and fields.get("format") != PEM_FORMAT:
        raise CheckpointError(f"{path}: header format {fields.get('format', '(none)')[:40]!r}, expected {PEM_FORMAT}.")
    label = data[text_end + 11 : text_end + 60].split(b"-----")[0]
    if b"ENCRYPTED" in label:
        raise CheckpointError(f"{path} holds an encrypted key; expertkit reads unencrypted PKCS#8 keys (the file is "
                              "kept 0600): decrypt it with `openssl pkey -in KEY -out PLAIN`.")
    private = label.endswith(b"PRIVATE KEY")
    try:
        key = ser.load_pem_private_key(data, None) if private else ser.load_pem_public_key(data)
    except Exception as exc:  # noqa: BLE001 - ValueError, UnsupportedAlgorithm: any unreadable key
        raise CheckpointError(f"{path} is not a readable PEM key ({str(exc)[:200]}).") from None
    algorithm = _scheme_of(key, path)
    scheme = fields.get("scheme", algorithm)
    level = _mldsa_level(scheme)
    if scheme != algorithm and (level is None or level != _mldsa_level(algorithm)):
        raise CheckpointError(f"{path}: the header says {scheme[:40]} but the file holds an {algorithm} key.")
    if private and scheme.endswith("-pqcrypto"):
        raise CheckpointError(f"{path}: a FIPS 204 seed cannot sign with {scheme} (pqcrypto takes expanded keys); "
                              f"set 'scheme: {algorithm}'.")
    public_obj = key.public_key() if private else key
    return {"owner": fields.get("owner", _owner_from_name(path)), "scheme": scheme,
            "public": public_obj.public_bytes_raw(), "secret": key.private_bytes_raw() if private else None,
            "fingerprint": fields.get("fingerprint")}


def read_key_bytes(path: Path, what: str) -> bytes:
    """A key file's bytes (at most :data:`MAX_KEY_FILE_BYTES`)."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_KEY_FILE_BYTES + 1)
    except FileNotFoundError:
        raise CheckpointError(f"{what} not found: {path}") from None
    except OSError as exc:
        raise CheckpointError(f"{path} is not a readable key file ({exc}).") from None
    if len(data) > MAX_KEY_FILE_BYTES:
        raise CheckpointError(f"{path} is larger than {MAX_KEY_FILE_BYTES} bytes: not a key file.")
    return data
