"""docs/federated.md: the Python example runs as written and finds the replayed update."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_federated_doc_python_example_runs(capsys):
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "federated.md").read_text(), flags=re.S)
    namespace: dict = {}
    exec(compile(blocks[0], "docs/federated.md", "exec"), namespace)  # noqa: S102 - our own doc
    rejections = namespace["result"]["signing"]["rejections"]
    assert [(r["server_round"], r["client"]) for r in rejections] == [(2, "client-2")]
    assert "replay" in capsys.readouterr().out


def test_federated_doc_keys_commands_run_and_write_standard_pem(tmp_path, monkeypatch, cli):
    """The "Keys" block runs as written (in a fresh folder), and the key file is what the text says."""
    import shlex

    from cryptography.hazmat.primitives.asymmetric import mldsa
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    text = (ROOT / "docs" / "federated.md").read_text()
    block = re.search(r"## Keys\n\n```bash\n(.*?)```", text, flags=re.S).group(1)
    monkeypatch.chdir(tmp_path)
    old = ""
    for line in block.strip().splitlines():
        command = line.split("  #")[0].replace("<old fingerprint>", old)
        args = shlex.split(command)
        assert args[0] == "expertkit"
        code, out, err = cli(args[1:])
        assert code == 0, (line, err)
        if args[3] == "rotate":
            old = out.split("old ")[1].split()[0]
    assert old and "revoked" in cli(["fl", "keys", "list", "--store", "trust"])[1]
    key = load_pem_private_key((tmp_path / "keys" / "client-0" / "client-0.key").read_bytes(), None)
    assert isinstance(key, mldsa.MLDSA65PrivateKey)
