"""``expertkit fl``: keys, simulate (inline, tiny model), measure, and one-line errors."""

from __future__ import annotations

import json

import yaml





def test_keys_lifecycle(tmp_path, cli):
    d, store = tmp_path / "keys", tmp_path / "trust"
    code, out, _ = cli(["fl", "keys", "gen", "client-0", "--scheme", "fn-dsa-512", "--dir", str(d)])
    assert code == 0 and "fn-dsa-512" in out
    old_fp = out.split("fingerprint ")[1].split()[0]
    assert cli(["fl", "keys", "trust", str(d / "client-0.pub"), "--store", str(store)])[0] == 0
    code, out, _ = cli(["fl", "keys", "rotate", "client-0", "--dir", str(d)])
    assert code == 0 and old_fp in out
    assert cli(["fl", "keys", "trust", str(d / "client-0.pub"), "--store", str(store)])[0] == 0
    assert cli(["fl", "keys", "revoke", old_fp[:12], "--store", str(store), "--reason", "rotated"])[0] == 0
    code, out, _ = cli(["fl", "keys", "list", "--store", str(store)])
    assert code == 0 and out.count("active") == 1 and out.count("revoked") == 1
    code, _, err = cli(["fl", "keys", "gen", "client-1", "--scheme", "ml-dsa-66", "--dir", str(d)])
    assert code == 2 and "ml-dsa-65" in err  # unknown scheme: one line, nearest name


def test_simulate_from_config(tmp_path, cli):
    cfg = {"name": "t", "model": "tiny:llama", "task": "toy:lohi", "clients": 2, "rounds": 1, "examples_per_client": 8,
           "local_steps": 1, "batch_size": 4, "eval_n": 4, "engine": "inline", "output_dir": str(tmp_path),
           "signing": {"scheme": "ed25519+ml-dsa-44"}, "attack": {"kind": "tamper", "client": 0}}
    path = tmp_path / "fl.yaml"
    path.write_text(yaml.safe_dump(cfg))
    code, out, err = cli(["fl", "simulate", str(path)])
    assert code == 0, err
    assert "dropped round 1 update of client-0 from node 1 (counted against node 1): bad ed25519+ml-dsa-44" in out
    res = json.loads((tmp_path / "t" / "result.json").read_text())
    assert res["scheme"] == "ed25519+ml-dsa-44" and res["signing"]["accepted"] == {"1": ["client-1"]}
    assert (tmp_path / "t" / "global_lora.safetensors").exists()
    path.write_text(yaml.safe_dump({**cfg, "clents": 3}))
    code, _, err = cli(["fl", "simulate", str(path)])
    assert code == 2 and "clients" in err


def test_measure_prints_the_table(tmp_path, cli):
    code, out, _ = cli(["fl", "measure", "--scheme", "ed25519", "--scheme", "fn-dsa-512", "--size-mb", "1",
                            "--no-full-model", "--repeats", "1", "--round-seconds", "10",
                            "--json", str(tmp_path / "m.json")])
    assert code == 0 and "fn-dsa-512 | yes | 897 |" in out
    res = json.loads((tmp_path / "m.json").read_text())
    assert [r["scheme"] for r in res["schemes"]] == ["ed25519", "fn-dsa-512"]
    assert res["overhead"][0]["update_bytes"] == 2**20


def test_serve_and_client_pass_the_tls_files_on(tmp_path, cli, monkeypatch):
    """`fl serve --tls-*` reaches serve() as TlsFiles; `fl client --root-certificates` drops --insecure.
    (The loopback deployment test runs the same TLS path with real processes.)"""
    import subprocess

    from expertkit.federated import deploy
    from expertkit.federated.keys import generate_key

    generate_key("server", "ed25519", tmp_path / "server")
    generate_key("client-0", "ed25519", tmp_path / "client-0")
    cfg = tmp_path / "fl.yaml"
    cfg.write_text(yaml.safe_dump({"model": "tiny:llama", "task": "toy:lohi", "clients": 1, "rounds": 1}))
    pems = [tmp_path / f"{n}.pem" for n in ("ca", "cert", "key")]
    seen = {}

    def fake_serve(cfg, server_key, trust, workdir, **kw):
        seen.update(kw)
        return {"accuracy": {}, "signing": {"rejections": []}}

    monkeypatch.setattr(deploy, "serve", fake_serve)
    base = ["fl", "serve", str(cfg), "--server-key", str(tmp_path / "server" / "server.key"), "--trust",
            str(tmp_path / "trust"), "--workdir", str(tmp_path / "w")]
    code, _, err = cli(base + ["--tls-ca", str(pems[0]), "--tls-cert", str(pems[1]), "--tls-key", str(pems[2])])
    assert code == 0, err
    assert seen["tls"] == deploy.TlsFiles(*pems)
    code, _, err = cli(base + ["--tls-ca", str(pems[0])])
    assert code == 2 and "--tls-cert" in err
    calls = []
    monkeypatch.setattr(subprocess, "call", lambda cmd, **kw: calls.append(cmd) or 0)
    client = ["fl", "client", "--superlink", "127.0.0.1:9092", "--key", str(tmp_path / "client-0" / "client-0.key"),
              "--server-key", str(tmp_path / "server" / "server.pub"), "--partition-id", "0"]
    assert cli(client + ["--root-certificates", str(pems[0])])[0] == 0
    assert cli(client)[0] == 0
    tls_cmd, plain_cmd = calls
    assert tls_cmd[tls_cmd.index("--root-certificates") + 1] == str(pems[0]) and "--insecure" not in tls_cmd
    assert "--insecure" in plain_cmd and "--root-certificates" not in plain_cmd


def test_client_exits_with_the_supernodes_status(tmp_path, cli, monkeypatch):
    """`fl client` returns what flower-supernode returned (a signal N as 128 + N), with one line."""
    import subprocess

    from expertkit.federated.keys import generate_key

    generate_key("server", "ed25519", tmp_path / "server")
    generate_key("client-0", "ed25519", tmp_path / "client-0")
    client = ["fl", "client", "--superlink", "127.0.0.1:9092", "--key", str(tmp_path / "client-0" / "client-0.key"),
              "--server-key", str(tmp_path / "server" / "server.pub"), "--partition-id", "0"]
    for child, want in ((0, 0), (3, 3), (1, 1), (-9, 137)):
        monkeypatch.setattr(subprocess, "call", lambda cmd, child=child, **kw: child)
        code, _, err = cli(client)
        assert code == want
        assert (f"exited with status {want}" in err) == bool(want)
