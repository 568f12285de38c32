"""Helpers of the federated tests."""

from __future__ import annotations

from expertkit.federated.config import FlConfig


def tiny_fl(**overrides) -> FlConfig:
    """A 3-client, 2-round inline run of a tiny llama on the toy lo/hi task (about a second)."""
    base = dict(model="tiny:llama", task="toy:lohi", clients=3, rounds=2, examples_per_client=16, local_steps=2,
                batch_size=4, lr=1e-2, eval_n=0, engine="inline", target_modules=("q_proj", "v_proj"))
    base.update(overrides)
    return FlConfig.model_validate(base)


def reply(content, node):
    """A reply message from node ``node`` carrying ``content`` (inside ``task_identity()``)."""
    from flwr.app import Message, MessageType

    ask = Message(content=content, dst_node_id=node, message_type=MessageType.TRAIN)
    return Message(content, reply_to=ask)


def make_tls(folder):
    """A throwaway CA and a SuperLink certificate for 127.0.0.1 / localhost (PEM files in ``folder``).

    Returns ``TlsFiles(ca, cert, key)``. For loopback tests only: a one-day validity, no passphrase.
    """
    import datetime
    import ipaddress
    from pathlib import Path

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    from expertkit.federated.deploy import TlsFiles

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=1)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(name("expertkit test CA")).issuer_name(name("expertkit test CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(start).not_valid_after(end)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                       crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    san = x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    cert = (x509.CertificateBuilder().subject_name(name("localhost")).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(end).add_extension(san, critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    files = TlsFiles(folder / "ca.pem", folder / "server.pem", folder / "server.key.pem")
    files.ca.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    files.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files.key.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                            serialization.NoEncryption()))
    files.key.chmod(0o600)
    return files
