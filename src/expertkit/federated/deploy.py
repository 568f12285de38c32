"""Real deployment: ``expertkit fl serve`` (a SuperLink running the signed ServerApp) and
``expertkit fl client`` (a SuperNode running the signing ClientApp).

* :data:`server_app` / :data:`client_app` are the Flower app components. The run config carries
  the federated config (JSON), the server's key file, the trust-store folder and the result
  folder; each SuperNode's ``--node-config`` carries its ``partition-id``, its own ``key-file``
  and the ``server-key`` (the server's ``.pub``) it trusts.
* :func:`serve` starts ``flower-superlink``, writes a Flower app folder and a private
  ``FLWR_HOME`` connection file, submits the run with ``flwr run --stream``, waits for it to
  finish, reads the result and stops the SuperLink. :func:`supernode_command` is the
  ``flower-supernode`` command line of one client.

TLS: without ``tls`` everything runs with ``--insecure`` (loopback tests). With
``TlsFiles(ca, cert, key)`` the SuperLink serves HTTPS with ``--ssl-certfile/--ssl-keyfile/
--ssl-ca-certfile`` and clients pass ``--root-certificates ca.pem`` (see docs/federated.md).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from expertkit.errors import ExpertkitError
from expertkit.federated.client_mod import SigningMod
from expertkit.federated.config import FlConfig


def _bin(name: str) -> str:
    """A console script of this environment (next to the Python interpreter), else from PATH."""
    here = Path(sys.executable).parent / name
    found = str(here) if here.exists() else shutil.which(name)
    if found is None:
        raise ExpertkitError(f"'{name}' not found; install flwr (flwr[simulation]) into this environment.")
    return found


def _env(flwr_home: Path | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # superexec is launched by name
    env["FLWR_TELEMETRY_ENABLED"] = "0"
    if flwr_home is not None:
        env["FLWR_HOME"] = str(flwr_home)
    return env


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, proc: subprocess.Popen[Any], timeout: float) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise ExpertkitError(f"flower-superlink exited with status {proc.returncode} before listening.")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise ExpertkitError(f"flower-superlink did not listen on port {port} within {timeout:.0f} s.")


@dataclass(frozen=True)
class TlsFiles:
    """PEM files for TLS: the CA certificate, and the SuperLink's certificate and key."""

    ca: Path
    cert: Path
    key: Path


# -- the Flower app components -------------------------------------------------------------------
_cache: dict[str, Any] = {}


def _cfg(context: Any) -> FlConfig:
    raw = str(context.run_config["fl-config"])
    if _cache.get("raw") != raw:
        _cache.update(raw=raw, cfg=FlConfig.model_validate_json(raw))
    return _cache["cfg"]


class _NodeKeyMod:
    """Signing mod whose keys come from the SuperNode's ``--node-config`` (``key-file``, ``server-key``)."""

    def __call__(self, msg: Any, ctxt: Any, call_next: Any) -> Any:
        from expertkit.federated.keys import load_identity, load_public

        key, server = str(ctxt.node_config["key-file"]), str(ctxt.node_config["server-key"])
        if (key, server) not in _cache:
            _cache[(key, server)] = SigningMod(load_identity(key), [load_public(server)])
        return _cache[(key, server)](msg, ctxt, call_next)


def _make_apps() -> tuple[Any, Any]:
    from flwr.clientapp import ClientApp
    from flwr.serverapp import ServerApp

    from expertkit.federated.apps import train_handler

    client = ClientApp(mods=[_NodeKeyMod()])
    client.train()(train_handler(_cfg))
    server = ServerApp()

    @server.main()
    def main(grid: Any, context: Any) -> None:
        from expertkit.federated.apps import run_server
        from expertkit.federated.keys import TrustStore, load_identity
        from expertkit.federated.simulate import write_result

        rc = context.run_config
        cfg = _cfg(context)
        result = run_server(cfg, grid, server=load_identity(str(rc["server-key"])),
                            lookup=TrustStore(str(rc["trust-dir"])).lookup)
        result["config"] = cfg.model_dump(mode="json")
        write_result(Path(str(rc["result-dir"])), result)

    return server, client


server_app, client_app = _make_apps()


# -- processes ---------------------------------------------------------------------------------------
def supernode_command(superlink: str, partition: int, key_file: str | Path, server_key: str | Path, *,
                      port: int | None = None, root_certificates: str | Path | None = None) -> list[str]:
    """The ``flower-supernode`` command line of one client."""
    cmd = [_bin("flower-supernode"), "--superlink", superlink, "--max-wait-time", "120"]
    cmd += ["--root-certificates", str(root_certificates)] if root_certificates else ["--insecure"]
    if port is not None:
        cmd += ["--port", str(port)]
    node = f'partition-id={partition} key-file="{Path(key_file).resolve()}" server-key="{Path(server_key).resolve()}"'
    return cmd + ["--node-config", node]


def start_supernode(superlink: str, partition: int, key_file: str | Path, server_key: str | Path, *,
                    log: Path | None = None, **kw: Any) -> subprocess.Popen[Any]:
    """Start one SuperNode in the background, in a process group of its own; the caller ends it with
    :func:`stop` (which also ends the SuperExec and app processes it started: ``terminate()`` alone
    would leave them running, orphaned)."""
    out = open(log, "ab") if log is not None else subprocess.DEVNULL  # noqa: SIM115
    return subprocess.Popen(supernode_command(superlink, partition, key_file, server_key, **kw), env=_env(),
                            stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def _app_folder(folder: Path, run_config: dict[str, str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    lines = [
        '[build-system]', 'requires = ["hatchling"]', 'build-backend = "hatchling.build"', '',
        '[project]', 'name = "expertkit-signed-fl"', 'version = "1.0.0"', 'dependencies = []', '',
        '[tool.hatch.build.targets.wheel]', 'packages = ["."]', '',
        '[tool.flwr.app]', 'publisher = "expertkit"', '',
        '[tool.flwr.app.components]', 'serverapp = "expertkit_fl_app:server_app"',
        'clientapp = "expertkit_fl_app:client_app"', '', '[tool.flwr.app.config]',
    ] + [f"{k} = {json.dumps(v)}" for k, v in run_config.items()]
    (folder / "pyproject.toml").write_text("\n".join(lines) + "\n")
    (folder / "expertkit_fl_app.py").write_text(
        '"""Flower app components of a signed expertkit run (code in expertkit.federated.deploy)."""\n\n'
        "from expertkit.federated import deploy\n\nserver_app = deploy.server_app\nclient_app = deploy.client_app\n")
    return folder


def serve(cfg: FlConfig, server_key: str | Path, trust_dir: str | Path, workdir: str | Path, *, port: int = 9092,
          host: str = "127.0.0.1", tls: TlsFiles | None = None, timeout: float = 3600,
          on_started: Any = None) -> dict[str, Any]:
    """Start a SuperLink, run ``cfg`` on the SuperNodes that connect, return the result; always stops it."""
    work = Path(workdir).resolve()
    home, results = work / "flwr-home", work / "result"
    home.mkdir(parents=True, exist_ok=True)
    link = [_bin("flower-superlink"), "--host", host, "--port", str(port), "--disable-runtime-dependency-installation"]
    if tls is None:
        link.append("--insecure")
    else:
        link += ["--ssl-certfile", str(tls.cert), "--ssl-keyfile", str(tls.key), "--ssl-ca-certfile", str(tls.ca)]
    conn = [f'address = "{host}:{port}"'] + (["insecure = true"] if tls is None else [f'root-certificates = "{tls.ca}"'])
    (home / "config.toml").write_text('[superlink]\ndefault = "expertkit"\n\n[superlink.expertkit]\n' + "\n".join(conn) + "\n")
    app = _app_folder(work / "app", {
        "fl-config": cfg.model_dump_json(), "server-key": str(Path(server_key).resolve()),
        "trust-dir": str(Path(trust_dir).resolve()), "result-dir": str(results),
    })
    with open(work / "superlink.log", "ab") as log:
        proc = subprocess.Popen(link, env=_env(home), stdout=log, stderr=subprocess.STDOUT, cwd=work,
                                start_new_session=True)
    try:
        _wait_port(port, proc, 60)
        if on_started is not None:
            on_started()
        with open(work / "flwr-run.log", "ab") as log:
            run = subprocess.run([_bin("flwr"), "run", str(app), "expertkit", "--stream"], env=_env(home), cwd=work,
                                 stdout=log, stderr=subprocess.STDOUT, timeout=timeout)
        if run.returncode != 0 or not (results / "result.json").exists():
            raise ExpertkitError(f"the federated run failed (flwr run status {run.returncode}); see "
                                 f"{work / 'flwr-run.log'} and {work / 'superlink.log'}.")
        return json.loads((results / "result.json").read_text())
    finally:
        stop(proc)


def stop(proc: subprocess.Popen[Any]) -> None:
    """Stop a process group started here (the SuperLink, a SuperNode) with everything in it: SIGTERM,
    then SIGKILL for whatever is left after 10 s. The group is signalled even when its leader has
    already exited, since its children (SuperExec, app processes) may still run."""
    import signal

    def alive() -> bool:
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return False
        return True

    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        proc.poll()
        return
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        proc.poll()  # reap the leader so that it does not count as alive
        if not alive():
            return
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(10)
