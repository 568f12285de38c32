"""Keys for signed federated learning: key files, fingerprints, and the server's allowlist.

* :func:`generate_key` writes ``<owner>.key`` (secret, mode 0600, in a 0700 folder) and
  ``<owner>.pub`` (public); writes are atomic, and an existing key is never overwritten (use
  :func:`rotate_key`). Ed25519 and ML-DSA keys are PEM files that ``cryptography`` and OpenSSL
  read (PKCS#8 with the FIPS 204 seed for ML-DSA; see :mod:`.keyfile`); other schemes use small
  JSON files (``expertkit-fl-key-v1``). Both formats are read for every scheme.
* :func:`load_identity` refuses a secret key file that group or others can read, like ssh.
* :class:`TrustStore` is the server's allowlist: a folder of trusted ``.pub`` files plus
  ``revoked.json``. A key is trusted when its file is in the folder and its fingerprint is not
  revoked; a revoked fingerprint stays refused even if its file is copied back. Rotation is
  ``rotate_key`` on the client, ``trust`` of the new public key and ``revoke`` of the old one.

A fingerprint is SHA-256 over the scheme name and the public key bytes (first 16 bytes, hex).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from expertkit.errors import CheckpointError, ConfigError, UnknownNameError
from expertkit.federated.keyfile import (
    decode_pem,
    encode_public,
    encode_secret,
    is_pem,
    pem_encodable,
    read_key_bytes,
)
from expertkit.federated.signing.base import get_signer
from expertkit.fileio import write_atomic

FORMAT = "expertkit-fl-key-v1"
_OWNER = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def fingerprint(scheme: str, public: bytes) -> str:
    """Hex fingerprint of a public key (scheme-bound, 32 hex digits)."""
    return hashlib.sha256(scheme.encode() + b"\x00" + public).hexdigest()[:32]


def check_owner(owner: str) -> str:
    """``owner`` if it is a valid client / server id (letters, digits, ``_.-``; at most 64)."""
    if not _OWNER.match(owner):
        raise ConfigError(f"invalid key owner '{owner}': use letters, digits, '_', '.', '-' (at most 64, "
                          "starting with a letter or digit).")
    return owner


@dataclass(frozen=True)
class PublicKey:
    """A public key with its owner and scheme."""

    owner: str
    scheme: str
    public: bytes

    @property
    def fingerprint(self) -> str:
        """See :func:`fingerprint`."""
        return fingerprint(self.scheme, self.public)

    def to_json(self) -> dict[str, Any]:
        """The JSON ``.pub`` file content (schemes without a standard encoding)."""
        return {"format": FORMAT, "owner": self.owner, "scheme": self.scheme,
                "public": base64.b64encode(self.public).decode(), "fingerprint": self.fingerprint}

    def file_bytes(self) -> bytes:
        """The ``.pub`` file: PEM (SubjectPublicKeyInfo) where a standard encoding exists, else JSON."""
        if pem_encodable(self.scheme):
            return encode_public(self.owner, self.scheme, self.public, self.fingerprint)
        return json.dumps(self.to_json(), indent=1).encode()


@dataclass(frozen=True)
class Identity:
    """A signer's own key pair: what a client (or the server) signs with."""

    owner: str
    scheme: str
    public: bytes
    secret: bytes

    @property
    def fingerprint(self) -> str:
        """Fingerprint of the public half."""
        return fingerprint(self.scheme, self.public)

    @property
    def public_key(self) -> PublicKey:
        """The public half."""
        return PublicKey(self.owner, self.scheme, self.public)

    def sign(self, message: bytes) -> bytes:
        """Sign ``message`` with this identity's scheme."""
        return get_signer(self.scheme).sign(self.secret, message)

    @classmethod
    def generate(cls, owner: str, scheme: str) -> Identity:
        """A fresh in-memory identity (nothing written)."""
        public, secret = get_signer(scheme).keygen()
        return cls(check_owner(owner), scheme, public, secret)


def _write_private(path: Path, data: bytes, mode: int) -> None:
    """Atomically create ``path`` with ``mode`` (the temporary file has the mode from the start)."""
    write_atomic(path, data, mode=mode)


def _key_dir(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    return folder


def save_identity(identity: Identity, key_dir: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
    """Write ``<owner>.key`` (0600) and ``<owner>.pub`` into ``key_dir`` (0700); returns the key path."""
    folder = _key_dir(Path(key_dir))
    key_path, pub_path = folder / f"{identity.owner}.key", folder / f"{identity.owner}.pub"
    if key_path.exists() and not overwrite:
        raise CheckpointError(f"{key_path} exists; use `expertkit fl keys rotate` to replace a key.")
    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    if pem_encodable(identity.scheme, identity.secret):
        data = encode_secret(identity.owner, identity.scheme, identity.secret, identity.fingerprint, created)
        pub = identity.public_key.file_bytes()
    else:  # no standard encoding: FN-DSA, SLH-DSA, hybrids, pqcrypto's expanded ML-DSA keys
        secret = {**identity.public_key.to_json(), "secret": base64.b64encode(identity.secret).decode(),
                  "created": created}
        data, pub = json.dumps(secret, indent=1).encode(), json.dumps(identity.public_key.to_json(), indent=1).encode()
    _write_private(key_path, data, 0o600)
    _write_private(pub_path, pub, 0o644)
    return key_path


def generate_key(owner: str, scheme: str, key_dir: str | os.PathLike[str]) -> Identity:
    """Generate a key pair for ``owner`` with ``scheme`` and store it in ``key_dir``."""
    identity = Identity.generate(owner, scheme)
    save_identity(identity, key_dir)
    return identity


def rotate_key(owner: str, key_dir: str | os.PathLike[str], scheme: str | None = None) -> tuple[Identity, Identity]:
    """Replace ``owner``'s key with a new one; the old pair moves to ``key_dir/retired/``.

    Returns ``(old, new)``. On the server, ``trust`` the new public key and ``revoke`` the old
    fingerprint.
    """
    folder = Path(key_dir)
    old = load_identity(folder / f"{owner}.key")
    new = Identity.generate(owner, scheme or old.scheme)
    retired = _key_dir(folder / "retired")
    for suffix in (".key", ".pub"):
        src = folder / f"{owner}{suffix}"
        if src.exists():
            os.replace(src, retired / f"{owner}.{old.fingerprint[:16]}{suffix}")
    save_identity(new, folder)
    return old, new


def _read_key(path: Path, what: str) -> dict[str, Any]:
    """A key file as ``{"owner", "scheme", "public", "secret" (or None), "fingerprint" (or None)}``, either format."""
    data = read_key_bytes(path, what)
    if is_pem(data):
        fields = decode_pem(data, path)
    else:
        fields = _read_json(data, path)
    try:
        check_owner(fields["owner"])
    except ConfigError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    get_signer(fields["scheme"])
    if fields["fingerprint"] not in (None, fingerprint(fields["scheme"], fields["public"])):
        raise CheckpointError(f"{path}: recorded fingerprint does not match the key; the file was altered.")
    return fields


def _read_json(data: bytes, path: Path) -> dict[str, Any]:
    """The JSON format (``expertkit-fl-key-v1``)."""
    try:
        raw = json.loads(data)
    except ValueError as exc:
        raise CheckpointError(f"{path} is not a readable expertkit key file ({str(exc)[:200]}).") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an expertkit key file (PEM or format {FORMAT} expected).")
    try:
        fields = {k: raw[k] for k in ("owner", "scheme", "public")}
        if not all(isinstance(v, str) for v in fields.values()):
            raise TypeError("owner, scheme and public must be strings")
        fields["public"] = base64.b64decode(fields["public"], validate=True)
        secret = raw.get("secret")
        fields["secret"] = None if secret is None else base64.b64decode(secret, validate=True)
        fields["fingerprint"] = raw.get("fingerprint")
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: malformed key file ({str(exc)[:200]}).") from None
    return fields


def load_public(path: str | os.PathLike[str]) -> PublicKey:
    """Read a ``.pub`` file (PEM or JSON); a recorded fingerprint must match its key.

    A secret key file is accepted too (its public half is used).
    """
    fields = _read_key(Path(path), "public key")
    return PublicKey(fields["owner"], fields["scheme"], fields["public"])


def load_identity(path: str | os.PathLike[str]) -> Identity:
    """Read a secret ``.key`` file (PEM or JSON); refuse it when group or others may read it."""
    path = Path(path)
    if path.exists() and stat.S_IMODE(path.stat().st_mode) & 0o077:
        raise CheckpointError(f"{path} is readable by group or others (mode {oct(stat.S_IMODE(path.stat().st_mode))}); "
                              f"run `chmod 600 {path}` or generate a new key.")
    fields = _read_key(path, "secret key")
    if fields["secret"] is None:
        raise CheckpointError(f"{path} holds no secret key (is it a .pub file?).")
    return Identity(fields["owner"], fields["scheme"], fields["public"], fields["secret"])


class TrustStore:
    """The server's allowlist of client public keys: a folder of ``.pub`` files and ``revoked.json``."""

    REVOKED = "revoked.json"

    def __init__(self, folder: str | os.PathLike[str], *, create: bool = False) -> None:
        self.folder = Path(folder)
        if create:
            _key_dir(self.folder)
        elif not self.folder.is_dir():
            raise CheckpointError(f"trust store {self.folder} does not exist; create it with `expertkit fl keys trust`.")
        self.reload()

    def reload(self) -> None:
        """Re-read the folder (after keys were added or revoked by another process)."""
        self._revoked: dict[str, dict[str, Any]] = {}
        rpath = self.folder / self.REVOKED
        if rpath.exists():
            self._revoked = {r["fingerprint"]: r for r in json.loads(rpath.read_text())}
        self._keys: dict[str, PublicKey] = {}
        for p in sorted(self.folder.glob("*.pub")):
            key = load_public(p)
            self._keys[key.fingerprint] = key

    def trust(self, key: PublicKey | str | os.PathLike[str]) -> PublicKey:
        """Add a public key (a :class:`PublicKey` or a ``.pub`` path); a revoked key is refused."""
        key = key if isinstance(key, PublicKey) else load_public(key)
        if key.fingerprint in self._revoked:
            raise ConfigError(f"key {key.fingerprint} of '{key.owner}' was revoked "
                              f"({self._revoked[key.fingerprint].get('reason', '')}); generate a new key.")
        _write_private(self.folder / f"{key.owner}-{key.fingerprint[:16]}.pub", key.file_bytes(), 0o644)
        self._keys[key.fingerprint] = key
        return key

    def revoke(self, fp: str, reason: str = "revoked") -> PublicKey:
        """Revoke the key with fingerprint (or unique prefix) ``fp``; it is refused from now on."""
        key = self._find(fp)
        entry = {"fingerprint": key.fingerprint, "owner": key.owner, "reason": reason,
                 "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        self._revoked[key.fingerprint] = entry
        _write_private(self.folder / self.REVOKED, json.dumps(list(self._revoked.values()), indent=1).encode(), 0o644)
        return key

    def _find(self, fp: str) -> PublicKey:
        hits = [k for f, k in self._keys.items() if f.startswith(fp)]
        if len(hits) != 1:
            raise UnknownNameError(f"{'no' if not hits else 'several'} trusted key(s) match fingerprint '{fp}'; "
                                   "see `expertkit fl keys list`.")
        return hits[0]

    def lookup(self, fp: str, owner: str) -> tuple[PublicKey | None, str]:
        """``(key, "")`` when ``fp`` is trusted for ``owner``, else ``(None, reason)``."""
        if fp in self._revoked:
            return None, f"key {fp[:16]} of '{self._revoked[fp]['owner']}' is revoked ({self._revoked[fp]['reason']})"
        key = self._keys.get(fp)
        if key is None:
            return None, f"unknown key {fp[:16]} (not in the allowlist)"
        if key.owner != owner:
            return None, f"key {fp[:16]} belongs to '{key.owner}', not to '{owner}'"
        return key, ""

    def keys(self) -> list[tuple[PublicKey, bool]]:
        """Every key in the folder and whether it is active (not revoked)."""
        return [(k, f not in self._revoked) for f, k in sorted(self._keys.items(), key=lambda kv: kv[1].owner)]

    def active(self, owner: str) -> list[PublicKey]:
        """The non-revoked keys of ``owner`` (several while a rotation is under way)."""
        return [k for f, k in self._keys.items() if k.owner == owner and f not in self._revoked]
