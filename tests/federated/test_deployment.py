"""A real Flower deployment on loopback: one SuperLink, two SuperNodes, two signed rounds, clean shutdown.

Marked ``deployment`` (about a minute and a half on a busy 2-core machine: every ClientApp message
starts a fresh ``flwr-clientapp`` process that imports torch). Deselect with ``-m "not deployment"``.
"""

from __future__ import annotations

import pytest
from fl_helpers import tiny_fl

from expertkit.federated.deploy import free_port, serve, start_supernode
from expertkit.federated.keys import TrustStore, generate_key


@pytest.mark.deployment
def test_superlink_and_two_supernodes_complete_two_signed_rounds(tmp_path):
    generate_key("server", "ml-dsa-65", tmp_path / "server")
    trust = TrustStore(tmp_path / "trust", create=True)
    for p in range(2):
        generate_key(f"client-{p}", "ml-dsa-65", tmp_path / f"client-{p}")
        trust.trust(tmp_path / f"client-{p}" / f"client-{p}.pub")
    port = free_port()
    nodes = []

    def start_nodes() -> None:
        for p in range(2):
            nodes.append(start_supernode(f"127.0.0.1:{port}", p, tmp_path / f"client-{p}" / f"client-{p}.key",
                                         tmp_path / "server" / "server.pub", port=free_port(),
                                         log=tmp_path / f"supernode-{p}.log"))

    try:
        res = serve(tiny_fl(clients=2, rounds=2, threads=1), tmp_path / "server" / "server.key", tmp_path / "trust",
                    tmp_path / "work", port=port, on_started=start_nodes, timeout=240)
    finally:
        for n in nodes:
            n.terminate()
    assert [n.wait(20) is not None for n in nodes] == [True, True]  # SuperNodes stopped
    assert res["signing"]["accepted"] == {"1": ["client-0", "client-1"], "2": ["client-0", "client-1"]}
    assert res["signing"]["rejections"] == [] and res["signed"]
    assert (tmp_path / "work" / "result" / "global_lora.safetensors").exists()
    import socket

    with socket.socket() as s:  # the SuperLink is gone: its port is closed
        assert s.connect_ex(("127.0.0.1", port)) != 0
