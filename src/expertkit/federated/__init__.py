"""Federated LoRA fine-tuning on Flower with post-quantum signed updates.

* :mod:`.signing` — one :class:`~.signing.Signer` per scheme, registered by name: ML-DSA (FIPS 204;
  OpenSSL through ``cryptography`` where available, else pqcrypto), FN-DSA (FALCON), SLH-DSA
  (FIPS 205), Ed25519 and Ed25519 + post-quantum hybrids.
* :mod:`.digest` — canonical streamed hashing of an update and the message that binds it to run,
  round, sender and role.
* :mod:`.keys` — key files (0600; PEM / PKCS#8 where a standard encoding exists, :mod:`.keyfile`),
  fingerprints, the server's allowlist with rotation and revocation.
* :mod:`.records` — signing / verifying Flower message contents, every field type-checked;
  :mod:`.replies` — the shape checks a verified reply must pass before aggregation.
* :mod:`.client_mod` (ClientApp mod) and :mod:`.strategy` (:class:`SignedStrategy`, wraps any
  strategy) — the Flower integration.
* :mod:`.simulate`, :mod:`.deploy`, :mod:`.inline` — runners: simulation engine, SuperLink /
  SuperNodes, in-process grid. :mod:`.measure` — the per-scheme measurement.

See docs/federated.md.
"""

from expertkit.federated.client_mod import SigningMod
from expertkit.federated.config import FlConfig, load_fl_config
from expertkit.federated.keys import Identity, PublicKey, TrustStore, generate_key, load_identity, load_public
from expertkit.federated.signing import SIGNERS, Signer, get_signer
from expertkit.federated.strategy import SignedStrategy

__all__ = [
    "SIGNERS", "FlConfig", "Identity", "PublicKey", "SignedStrategy", "Signer", "SigningMod", "TrustStore",
    "generate_key", "get_signer", "load_fl_config", "load_identity", "load_public",
]
