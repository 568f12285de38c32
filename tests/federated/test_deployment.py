"""A real Flower deployment on loopback, over TLS: one SuperLink, two SuperNodes, two signed rounds,
clean shutdown.

Marked ``deployment`` (about a minute on a busy 2-core machine: every ClientApp message starts a
fresh ``flwr-clientapp`` process that imports torch). Deselect with ``-m "not deployment"``.
The SuperLink serves TLS with a throwaway CA and certificate for 127.0.0.1 (``make_tls``); the
SuperNodes and the ``flwr run`` connection trust that CA only.
"""

from __future__ import annotations

import os
import socket
import ssl

import pytest
from fl_helpers import make_tls, tiny_fl

from expertkit.federated.deploy import free_port, serve, start_supernode, stop
from expertkit.federated.keys import TrustStore, generate_key


def _tls_peer(port: int, ca) -> dict:
    """Handshake with the SuperLink, verifying its certificate against ``ca``; its subject."""
    ctx = ssl.create_default_context(cafile=str(ca))
    ctx.set_alpn_protocols(["h2"])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
            ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        return dict(x[0] for x in tls.getpeercert()["subject"])


@pytest.mark.deployment
def test_superlink_and_two_supernodes_complete_two_signed_rounds_over_tls(tmp_path, monkeypatch):
    monkeypatch.setenv("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", "0.1")  # Flower's default 1 s: a slower start per app
    tls = make_tls(tmp_path / "tls")
    generate_key("server", "ml-dsa-65", tmp_path / "server")
    trust = TrustStore(tmp_path / "trust", create=True)
    for p in range(2):
        generate_key(f"client-{p}", "ml-dsa-65", tmp_path / f"client-{p}")
        trust.trust(tmp_path / f"client-{p}" / f"client-{p}.pub")
    port = free_port()
    nodes, peer = [], {}

    def start_nodes() -> None:
        peer.update(_tls_peer(port, tls.ca))
        for p in range(2):
            nodes.append(start_supernode(f"127.0.0.1:{port}", p, tmp_path / f"client-{p}" / f"client-{p}.key",
                                         tmp_path / "server" / "server.pub", port=free_port(),
                                         root_certificates=tls.ca, log=tmp_path / f"supernode-{p}.log"))

    try:
        res = serve(tiny_fl(clients=2, rounds=2, threads=1), tmp_path / "server" / "server.key", tmp_path / "trust",
                    tmp_path / "work", port=port, tls=tls, on_started=start_nodes, timeout=240)
    finally:
        for n in nodes:
            stop(n)
    assert [n.poll() is not None for n in nodes] == [True, True]  # SuperNodes stopped
    for n in nodes:  # with their SuperExec and app processes (a plain terminate() left those orphaned)
        with pytest.raises(ProcessLookupError):
            os.killpg(n.pid, 0)
    assert peer == {"commonName": "localhost"}  # the SuperLink spoke TLS with the test CA's certificate
    assert "--insecure" not in " ".join(nodes[0].args)
    assert res["signing"]["accepted"] == {"1": ["client-0", "client-1"], "2": ["client-0", "client-1"]}
    assert res["signing"]["rejections"] == [] and res["signed"]
    assert (tmp_path / "work" / "result" / "global_lora.safetensors").exists()
    with socket.socket() as s:  # the SuperLink is gone: its port is closed
        assert s.connect_ex(("127.0.0.1", port)) != 0
