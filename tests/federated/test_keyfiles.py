"""Key files in standard encodings (issue 20): PEM / PKCS#8 that `cryptography` writes and reads,
with the FIPS 204 seed for ML-DSA; the JSON files of earlier versions are still read."""

from __future__ import annotations

import base64
import json
import os

import numpy as np
import pytest
from cryptography.hazmat.primitives import serialization as ser
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, mldsa
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict

from expertkit.errors import CheckpointError
from expertkit.federated.digest import binding_message
from expertkit.federated.keys import TrustStore, generate_key, load_identity, load_public, rotate_key
from expertkit.federated.records import CLIENT_ROLE, SIG_KEY, digest_content, sign_content, verify_content
from expertkit.federated.signing import get_signer

RUN, ROUND = "run-1", 3
MAKERS = {"ml-dsa-65": mldsa.MLDSA65PrivateKey.generate, "ml-dsa-44": mldsa.MLDSA44PrivateKey.generate,
          "ed25519": ed25519.Ed25519PrivateKey.generate}


def _update(seed: int = 0) -> RecordDict:
    rng = np.random.default_rng(seed)
    return RecordDict({"arrays": ArrayRecord({"l0.lora_A": Array(rng.standard_normal((4, 3)).astype(np.float32))}),
                       "metrics": MetricRecord({"num-examples": 16})})


def _binding(content: RecordDict, sender: str) -> bytes:
    return binding_message(digest_content(content), alg="sha3-256", run_id=RUN, server_round=ROUND, sender=sender,
                           role=CLIENT_ROLE)


def _verify(content: RecordDict, store: TrustStore):
    return verify_content(content, store.lookup, run_id=RUN, server_round=ROUND, role=CLIENT_ROLE)


def _write(path, data: bytes, mode: int = 0o600) -> None:
    path.write_bytes(data)
    os.chmod(path, mode)


@pytest.mark.parametrize("scheme", list(MAKERS))
def test_a_key_made_by_cryptography_signs_updates_that_expertkit_verifies(tmp_path, scheme):
    key = MAKERS[scheme]()
    _write(tmp_path / "client-7.key", key.private_bytes(ser.Encoding.PEM, ser.PrivateFormat.PKCS8, ser.NoEncryption()))
    _write(tmp_path / "client-7.pub", key.public_key().public_bytes(ser.Encoding.PEM, ser.PublicFormat.SubjectPublicKeyInfo),
           0o644)
    ident = load_identity(tmp_path / "client-7.key")  # owner from the file name, scheme from the algorithm
    assert (ident.owner, ident.scheme) == ("client-7", scheme)
    assert ident.public == key.public_key().public_bytes_raw() and ident.secret == key.private_bytes_raw()
    store = TrustStore(tmp_path / "trust", create=True)
    assert store.trust(tmp_path / "client-7.pub").fingerprint == ident.fingerprint
    c = _update()
    sign_content(c, ident, run_id=RUN, server_round=ROUND, role=CLIENT_ROLE)
    assert _verify(c, store).ok
    key.public_key().verify(c[SIG_KEY]["signature"], _binding(c, "client-7"))  # and cryptography agrees
    if scheme.startswith("ml-dsa"):  # the pqcrypto reference accepts it too
        ref = get_signer(f"{scheme}-pqcrypto")
        assert ref.verify(ident.public, _binding(c, "client-7"), c[SIG_KEY]["signature"])
    c[SIG_KEY]["signature"] = key.sign(_binding(c, "client-7"))  # cryptography signs the same update itself
    assert _verify(c, store).ok
    c["metrics"]["num-examples"] = 17
    assert "altered" in _verify(c, store).reason


@pytest.mark.parametrize("scheme", list(MAKERS))
def test_expertkit_key_files_are_standard_pem_that_cryptography_uses(tmp_path, scheme):
    ident = generate_key("client-0", scheme, tmp_path)
    key_bytes, pub_bytes = (tmp_path / "client-0.key").read_bytes(), (tmp_path / "client-0.pub").read_bytes()
    assert b"-----BEGIN PRIVATE KEY-----" in key_bytes and b"-----BEGIN PUBLIC KEY-----" in pub_bytes
    assert f"scheme: {scheme}\n".encode() in key_bytes and f"fingerprint: {ident.fingerprint}".encode() in pub_bytes
    theirs = ser.load_pem_private_key(key_bytes, None)  # the header lines are RFC 7468 explanatory text
    their_pub = ser.load_pem_public_key(pub_bytes)
    assert theirs.private_bytes_raw() == ident.secret and their_pub.public_bytes_raw() == ident.public
    if scheme.startswith("ml-dsa"):
        assert len(ident.secret) == 32  # the FIPS 204 seed
        der = theirs.private_bytes(ser.Encoding.DER, ser.PrivateFormat.PKCS8, ser.NoEncryption())
        assert der.endswith(b"\x80\x20" + ident.secret)  # RFC 9881 seed form: [0] IMPLICIT OCTET STRING (32)
    store = TrustStore(tmp_path / "trust", create=True)
    store.trust(tmp_path / "client-0.pub")
    c = _update(1)
    sign_content(c, ident, run_id=RUN, server_round=ROUND, role=CLIENT_ROLE)
    their_pub.verify(c[SIG_KEY]["signature"], _binding(c, "client-0"))  # expertkit's signature, their verifier
    c[SIG_KEY]["signature"] = theirs.sign(_binding(c, "client-0"))  # their signature with expertkit's key file
    assert _verify(c, store).ok
    assert load_identity(tmp_path / "client-0.key") == ident and load_public(tmp_path / "client-0.pub") == ident.public_key


def _json_key(owner: str, scheme: str, public: bytes, secret: bytes) -> dict:
    """A key file as expertkit wrote it before PEM (format expertkit-fl-key-v1)."""
    from expertkit.federated.keys import fingerprint

    return {"format": "expertkit-fl-key-v1", "owner": owner, "scheme": scheme,
            "public": base64.b64encode(public).decode(), "fingerprint": fingerprint(scheme, public),
            "secret": base64.b64encode(secret).decode(), "created": "2026-01-01T00:00:00Z"}


def test_old_json_key_files_keep_working_and_rotate_to_pem(tmp_path):
    ref = get_signer("ml-dsa-65-pqcrypto")
    public, expanded = ref.keygen()  # what ml-dsa-65 used to generate: pqcrypto's 4032-byte expanded key
    assert len(expanded) == 4032
    data = _json_key("client-0", "ml-dsa-65", public, expanded)
    _write(tmp_path / "client-0.key", json.dumps(data).encode())
    _write(tmp_path / "client-0.pub", json.dumps({k: v for k, v in data.items() if k != "secret"}).encode(), 0o644)
    ident = load_identity(tmp_path / "client-0.key")
    assert ident.secret == expanded and ident.public_key == load_public(tmp_path / "client-0.pub")
    store = TrustStore(tmp_path / "trust", create=True)
    store.trust(tmp_path / "client-0.pub")  # the trust store now holds it as PEM
    assert b"BEGIN PUBLIC KEY" in next((tmp_path / "trust").glob("*.pub")).read_bytes()
    c = _update(2)
    sign_content(c, ident, run_id=RUN, server_round=ROUND, role=CLIENT_ROLE)  # the default signer, expanded key
    assert _verify(c, store).ok and TrustStore(tmp_path / "trust").lookup(ident.fingerprint, "client-0")[0]
    old, new = rotate_key("client-0", tmp_path)
    assert old == ident and len(new.secret) == 32 and b"BEGIN PRIVATE KEY" in (tmp_path / "client-0.key").read_bytes()
    assert json.loads((tmp_path / "retired" / f"client-0.{old.fingerprint[:16]}.key").read_text())["secret"]


def test_schemes_without_a_standard_encoding_stay_json(tmp_path):
    for scheme in ("fn-dsa-512", "ed25519+ml-dsa-44", "ml-dsa-44-pqcrypto"):
        ident = generate_key(f"c-{scheme.replace('+', '_')}", scheme, tmp_path)
        path = tmp_path / f"{ident.owner}.key"
        assert json.loads(path.read_text())["format"] == "expertkit-fl-key-v1"
        assert load_identity(path) == ident


def _pem_with_header(tmp_path, **header) -> object:
    key = mldsa.MLDSA65PrivateKey.generate()
    text = "".join(f"{k}: {v}\n" for k, v in header.items()).encode()
    path = tmp_path / "client-0.key"
    _write(path, text + key.private_bytes(ser.Encoding.PEM, ser.PrivateFormat.PKCS8, ser.NoEncryption()))
    return path


def test_unreadable_or_inconsistent_key_files_are_refused_with_one_line(tmp_path):
    path = _pem_with_header(tmp_path, format="expertkit-fl-key-v2", owner="client-0", scheme="ed25519")
    with pytest.raises(CheckpointError, match="the header says ed25519 but the file holds an ml-dsa-65 key"):
        load_identity(path)
    path = _pem_with_header(tmp_path, format="expertkit-fl-key-v2", owner="client-0", scheme="ml-dsa-65-pqcrypto")
    with pytest.raises(CheckpointError, match="seed cannot sign with ml-dsa-65-pqcrypto"):
        load_identity(path)
    path = _pem_with_header(tmp_path, format="expertkit-fl-key-v2", owner="../etc", scheme="ml-dsa-65")
    with pytest.raises(CheckpointError, match="invalid key owner"):
        load_identity(path)
    assert load_identity(_pem_with_header(tmp_path, format="expertkit-fl-key-v2", scheme="ml-dsa-65-openssl")).scheme \
        == "ml-dsa-65-openssl"
    key = ed25519.Ed25519PrivateKey.generate()
    enc = key.private_bytes(ser.Encoding.PEM, ser.PrivateFormat.PKCS8, ser.BestAvailableEncryption(b"pw"))
    _write(path, enc)
    with pytest.raises(CheckpointError, match="encrypted key; expertkit reads unencrypted PKCS#8"):
        load_identity(path)
    ec_key = ec.generate_private_key(ec.SECP256R1())
    _write(path, ec_key.private_bytes(ser.Encoding.PEM, ser.PrivateFormat.PKCS8, ser.NoEncryption()))
    with pytest.raises(CheckpointError, match="holds a ECPrivateKey: expertkit reads Ed25519 and ML-DSA keys from PEM"):
        load_identity(path)
    for bad in (b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n", b"[1, 2]", b"{\"format\": 1}",
                json.dumps({"format": "expertkit-fl-key-v1", "owner": 7, "scheme": "ed25519", "public": ""}).encode(),
                json.dumps({"format": "expertkit-fl-key-v1", "owner": "c", "scheme": "ed25519", "public": "!"}).encode(),
                json.dumps({"format": "expertkit-fl-key-v1", "scheme": "ed25519"}).encode(), b"\xff" * 10):
        _write(path, bad)
        with pytest.raises(CheckpointError) as info:
            load_identity(path)
        assert len(str(info.value).replace(str(path), "")) < 300 and "\n" not in str(info.value)
    _write(path, b" " * (2 << 20))
    with pytest.raises(CheckpointError, match="larger than"):
        load_identity(path)
