"""``expertkit fl simulate CONFIG``: a federated LoRA run on Flower's simulation engine (or inline).

Keys: every client and the server get a fresh key pair of ``signing.scheme`` for the run (a
simulation runs on one machine; real sites use ``expertkit fl keys`` and ``fl serve`` /
``fl client``). The server trusts exactly the clients' public keys; each client trusts the
server's. Output: ``output_dir/name/result.json`` (accuracy per round and its per-example scores and
predictions, losses, timings, signing report with every rejected update and its reason) and
``global_lora.safetensors``.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

from expertkit.federated.config import FlConfig
from expertkit.federated.keys import Identity
from expertkit.federated.records import static_lookup


def make_identities(cfg: FlConfig) -> tuple[Identity | None, dict[int, Identity] | None]:
    """``(server, {partition: client})`` fresh identities, or ``(None, None)`` when signing is off."""
    if cfg.signing.scheme == "none":
        return None, None
    server = Identity.generate("server", cfg.signing.scheme)
    clients = {p: Identity.generate(f"client-{p}", cfg.signing.scheme) for p in range(cfg.clients)}
    return server, clients


def simulate(cfg: FlConfig, *, write: bool = True) -> dict[str, Any]:
    """Run ``cfg`` and return the result (``final_state`` holds the global LoRA tensors)."""
    from expertkit.federated.apps import make_client_app, run_server

    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    server, clients = make_identities(cfg)
    server_keys = [server.public_key] if server is not None else None
    lookup = static_lookup([c.public_key for c in clients.values()]) if clients is not None else None
    client_app = make_client_app(cfg, clients, server_keys)
    if cfg.engine == "inline":
        result = _inline(cfg, client_app, server, lookup)
    else:
        result = _ray(cfg, client_app, server, lookup)
    result["config"] = cfg.model_dump(mode="json")
    if write:
        write_result(Path(cfg.output_dir) / cfg.name, result)
    return result


def _inline(cfg: FlConfig, client_app: Any, server: Identity | None, lookup: Any) -> dict[str, Any]:
    from expertkit.federated.apps import run_server
    from expertkit.federated.inline import InlineGrid, task_identity

    state = random.getstate()
    random.seed(cfg.seed)  # Flower samples nodes with the global RNG: fixed order, reproducible sums
    try:
        with task_identity():
            return run_server(cfg, InlineGrid(client_app, cfg.clients), server=server, lookup=lookup,
                              run_id=f"{cfg.name}-{cfg.seed}")
    finally:
        random.setstate(state)


def _ray(cfg: FlConfig, client_app: Any, server: Identity | None, lookup: Any) -> dict[str, Any]:
    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation

    from expertkit.errors import ExpertkitError
    from expertkit.federated.apps import run_server

    holder: dict[str, Any] = {}
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Any, context: Any) -> None:
        try:
            holder["result"] = run_server(cfg, grid, server=server, lookup=lookup)
        except BaseException as exc:  # the engine swallows ServerApp errors: keep it for the caller
            holder["error"] = exc
            raise

    backend = {"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
               "init_args": {"num_cpus": max(1, min(cfg.clients, os.cpu_count() or 1)), "include_dashboard": False}}
    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=cfg.clients, backend_config=backend)
    if "error" in holder:
        raise holder["error"]
    if "result" not in holder:
        raise ExpertkitError("the Flower simulation ended without a result; run with --debug to see its log.")
    return holder["result"]


def write_result(out: Path, result: dict[str, Any]) -> Path:
    """Write ``result.json`` and ``global_lora.safetensors`` into ``out`` (each atomically)."""
    import torch
    from safetensors.torch import save_file

    from expertkit.fileio import write_atomic

    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: torch.from_numpy(v.copy()) for k, v in result["final_state"].items()}
    tmp = out / ".global_lora.safetensors.tmp"
    save_file(tensors, tmp)
    os.replace(tmp, out / "global_lora.safetensors")
    public = {k: v for k, v in result.items() if k != "final_state"}
    write_atomic(out / "result.json", json.dumps(public, indent=1))
    return out
