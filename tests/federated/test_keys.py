"""Key files and the allowlist: permissions, fingerprints, rotation and revocation."""

from __future__ import annotations

import os
import stat

import pytest

from expertkit.errors import CheckpointError, ConfigError
from expertkit.federated.keys import (
    TrustStore,
    fingerprint,
    generate_key,
    load_identity,
    load_public,
    rotate_key,
)


def test_generate_writes_owner_only_secret(tmp_path):
    ident = generate_key("client-0", "ml-dsa-65", tmp_path / "keys")
    key, pub = tmp_path / "keys" / "client-0.key", tmp_path / "keys" / "client-0.pub"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "keys").stat().st_mode) == 0o700
    loaded = load_identity(key)
    assert loaded == ident and load_public(pub) == ident.public_key
    assert ident.fingerprint == fingerprint("ml-dsa-65", ident.public) and len(ident.fingerprint) == 32
    assert fingerprint("ml-dsa-44", ident.public) != ident.fingerprint  # scheme-bound
    with pytest.raises(CheckpointError, match="rotate"):
        generate_key("client-0", "ml-dsa-65", tmp_path / "keys")
    os.chmod(key, 0o644)
    with pytest.raises(CheckpointError, match="chmod 600"):
        load_identity(key)
    with pytest.raises(ConfigError, match="invalid key owner"):
        generate_key("../evil", "ed25519", tmp_path / "keys")


def test_tampered_public_file_is_refused(tmp_path):
    import json

    generate_key("c", "fn-dsa-512", tmp_path)  # no standard encoding: the JSON format
    data = json.loads((tmp_path / "c.pub").read_text())
    data["public"] = data["public"][:-4] + "AAA="
    (tmp_path / "c.pub").write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="altered"):
        load_public(tmp_path / "c.pub")
    a, b = generate_key("a", "ed25519", tmp_path / "a"), generate_key("b", "ed25519", tmp_path / "b")
    header = (tmp_path / "a" / "a.pub").read_text().split("-----BEGIN")[0]  # a's fingerprint over b's key
    (tmp_path / "b.pub").write_text(header + "-----BEGIN" + (tmp_path / "b" / "b.pub").read_text().split("-----BEGIN")[1])
    assert a.fingerprint != b.fingerprint
    with pytest.raises(CheckpointError, match="altered"):
        load_public(tmp_path / "b.pub")


def test_trust_rotate_revoke(tmp_path):
    old = generate_key("client-0", "ed25519", tmp_path / "client")
    store = TrustStore(tmp_path / "trust", create=True)
    store.trust(tmp_path / "client" / "client-0.pub")
    assert store.lookup(old.fingerprint, "client-0")[0] == old.public_key
    key, why = store.lookup(old.fingerprint, "client-1")
    assert key is None and "belongs to 'client-0'" in why
    key, why = store.lookup("0" * 32, "client-0")
    assert key is None and "unknown key" in why

    old2, new = rotate_key("client-0", tmp_path / "client")
    assert old2 == old and new.fingerprint != old.fingerprint
    assert load_identity(tmp_path / "client" / "client-0.key") == new
    assert (tmp_path / "client" / "retired" / f"client-0.{old.fingerprint[:16]}.key").exists()
    store.trust(new.public_key)
    assert {k.fingerprint for k in store.active("client-0")} == {old.fingerprint, new.fingerprint}
    store.revoke(old.fingerprint[:10], reason="rotated")
    assert [k.fingerprint for k in store.active("client-0")] == [new.fingerprint]
    key, why = store.lookup(old.fingerprint, "client-0")
    assert key is None and "revoked (rotated)" in why

    fresh = TrustStore(tmp_path / "trust")  # state survives a restart
    assert fresh.lookup(old.fingerprint, "client-0")[0] is None
    assert fresh.lookup(new.fingerprint, "client-0")[0] == new.public_key
    with pytest.raises(ConfigError, match="revoked"):
        fresh.trust(old.public_key)  # a revoked key cannot be re-added
    with pytest.raises(CheckpointError, match="does not exist"):
        TrustStore(tmp_path / "nowhere")
