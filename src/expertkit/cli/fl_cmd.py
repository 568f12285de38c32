"""``expertkit fl``: federated LoRA fine-tuning on Flower with post-quantum signed updates.

Commands: ``simulate CONFIG`` (Flower simulation engine, or inline), ``serve`` / ``client`` (a real
SuperLink / SuperNode), ``keys ...`` (generate, rotate, trust, revoke, list, schemes) and
``measure`` (per-scheme timings and sizes, per-round overhead). Heavy imports stay inside commands.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

fl_app = typer.Typer(help="Federated fine-tuning on Flower with post-quantum signed updates.",
                     no_args_is_help=True, add_completion=False)
keys_app = typer.Typer(help="Signing keys: generate, rotate, trust, revoke, list.", no_args_is_help=True,
                       add_completion=False)
fl_app.add_typer(keys_app, name="keys")
out = Console(soft_wrap=True)


@fl_app.command("simulate")
def simulate_cmd(
    config: Annotated[Path, typer.Argument(help="a federated run config YAML, e.g. examples/fl_smollm.yaml")],
    engine: Annotated[str | None, typer.Option(help="ray (Flower simulation engine) or inline (one process).")] = None,
    output_dir: Annotated[Path | None, typer.Option(help="Folder for runs (default: the config's output_dir).")] = None,
) -> None:
    """Run N clients fine-tuning LoRA on their shards; signed updates unless signing.scheme is 'none'."""
    import logging

    import flwr  # noqa: F401  (sets up its logger; keep its INFO lines out of the way)

    from expertkit.federated.config import load_fl_config
    from expertkit.federated.simulate import simulate

    logging.getLogger("flwr").setLevel(logging.WARNING)
    cfg = load_fl_config(str(config))
    update = {k: v for k, v in (("engine", engine), ("output_dir", str(output_dir) if output_dir else None)) if v}
    cfg = cfg.model_validate({**cfg.model_dump(), **update}) if update else cfg
    res = simulate(cfg)
    acc = ", ".join(f"round {k}: {v:.3f}" for k, v in res["accuracy"].items()) or "no evaluation"
    out.print(f"[green]done[/green]: {cfg.clients} clients, {cfg.rounds} rounds, scheme {res['scheme']}; accuracy {acc}")
    if res.get("signing"):
        for r in res["signing"]["rejections"]:
            out.print(f"  dropped round {r['server_round']} update of {r['client'] or '(no client id)'} from node "
                      f"{r['node_id']} (counted against {r['charged']}): {r['reason']}")
        if res["signing"]["flagged"]:
            out.print(f"  [red]reported[/red] (failed verification repeatedly): {', '.join(res['signing']['flagged'])}")
    out.print(f"result: {Path(cfg.output_dir) / cfg.name / 'result.json'}")


@fl_app.command("serve")
def serve_cmd(
    config: Annotated[Path, typer.Argument(help="a federated run config YAML (clients = SuperNodes to wait for)")],
    server_key: Annotated[Path, typer.Option(help="the server's secret key file (expertkit fl keys gen server)")],
    trust: Annotated[Path, typer.Option(help="trust-store folder with the clients' public keys")],
    workdir: Annotated[Path, typer.Option(help="folder for the app, logs and the result")] = Path("runs/fl-serve"),
    host: Annotated[str, typer.Option(help="address the SuperLink listens on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="SuperLink port (Fleet, Control and Runtime APIs)")] = 9092,
    tls_ca: Annotated[Path | None, typer.Option(help="CA certificate (PEM); with --tls-cert/--tls-key: HTTPS")] = None,
    tls_cert: Annotated[Path | None, typer.Option(help="SuperLink certificate (PEM)")] = None,
    tls_key: Annotated[Path | None, typer.Option(help="SuperLink private key (PEM)")] = None,
) -> None:
    """Start a SuperLink, run the signed federated job on the SuperNodes that connect, then stop it."""
    from expertkit.errors import ConfigError
    from expertkit.federated.config import load_fl_config
    from expertkit.federated.deploy import TlsFiles, serve

    tls_parts = (tls_ca, tls_cert, tls_key)
    if any(tls_parts) and not all(tls_parts):
        raise ConfigError("TLS needs all of --tls-ca, --tls-cert and --tls-key (or none of them for --insecure).")
    tls = TlsFiles(tls_ca, tls_cert, tls_key) if all(tls_parts) else None  # type: ignore[arg-type]
    cfg = load_fl_config(str(config))
    out.print(f"SuperLink on {host}:{port}; waiting for {cfg.clients} SuperNode(s) "
              "(start them with `expertkit fl client`).")
    res = serve(cfg, server_key, trust, workdir, host=host, port=port, tls=tls)
    out.print(f"[green]done[/green]: accuracy {res['accuracy']}; rejected {len(res['signing']['rejections'])} "
              f"update(s); result in {workdir / 'result' / 'result.json'}")


@fl_app.command("client")
def client_cmd(
    superlink: Annotated[str, typer.Option(help="SuperLink address host:port")],
    key: Annotated[Path, typer.Option(help="this client's secret key file")],
    server_key: Annotated[Path, typer.Option(help="the server's public key (.pub) this client trusts")],
    partition_id: Annotated[int, typer.Option(help="this client's shard of the task")],
    port: Annotated[int | None, typer.Option(help="local port of the SuperNode's runtime API")] = None,
    root_certificates: Annotated[Path | None, typer.Option(help="CA certificate (PEM) for a TLS SuperLink")] = None,
) -> None:
    """Run a SuperNode that trains on its shard, signs its updates and verifies the server's model."""
    import subprocess

    from expertkit.federated.deploy import _env, supernode_command
    from expertkit.federated.keys import load_identity, load_public

    load_identity(key), load_public(server_key)  # fail early on a bad key file
    cmd = supernode_command(superlink, partition_id, key, server_key, port=port, root_certificates=root_certificates)
    code = subprocess.call(cmd, env=_env())
    if code < 0:  # killed by signal N: exit 128 + N, as a shell reports it
        code = 128 - code
    if code:
        typer.echo(f"error: the SuperNode (flower-supernode) exited with status {code}.", err=True)
    # SystemExit, not typer.Exit: click returns typer.Exit's code from the command when it runs with
    # standalone_mode=False (as expertkit's main does) instead of exiting, so the code could be lost.
    raise SystemExit(code)


@fl_app.command("measure")
def measure_cmd(
    schemes: Annotated[list[str] | None, typer.Option("--scheme", help="scheme(s) to measure (default: the paper's set)")] = None,
    sizes_mb: Annotated[list[float] | None, typer.Option("--size-mb", help="update size(s) in MB")] = None,
    full_model: Annotated[bool, typer.Option(help="also the full bundled model size (SmolLM2-135M, fp32)")] = True,
    round_seconds: Annotated[float | None, typer.Option(help="round time to express overhead as a fraction")] = None,
    repeats: Annotated[int, typer.Option(min=1, help="repetitions per timing (median)")] = 5,
    json_out: Annotated[Path | None, typer.Option("--json", help="also write the result as JSON")] = None,
) -> None:
    """Per scheme: keygen/sign/verify time, key and signature sizes; per-round overhead by update size."""
    import json

    from expertkit.federated.measure import markdown, measure

    full = 134_515_008 * 4 if full_model else None  # SmolLM2-135M parameters, fp32 bytes
    res = measure(schemes, sizes_mb or (1, 10, 100), full_model_bytes=full, round_seconds=round_seconds,
                  repeats=repeats)
    out.print(markdown(res))
    if json_out:
        from expertkit.fileio import write_atomic

        write_atomic(json_out, json.dumps(res, indent=1))


@keys_app.command("gen")
def keys_gen(
    owner: Annotated[str, typer.Argument(help="client id (e.g. client-0) or 'server'")],
    scheme: Annotated[str, typer.Option(help="signature scheme (see `expertkit fl keys schemes`)")] = "ml-dsa-65",
    directory: Annotated[Path, typer.Option("--dir", help="key folder (created 0700)")] = Path("keys"),
) -> None:
    """Generate a key pair: OWNER.key (0600) and OWNER.pub."""
    from expertkit.federated.keys import generate_key

    ident = generate_key(owner, scheme, directory)
    out.print(f"{directory / (owner + '.key')}: {scheme}, fingerprint {ident.fingerprint}")


@keys_app.command("rotate")
def keys_rotate(
    owner: Annotated[str, typer.Argument(help="whose key to replace")],
    directory: Annotated[Path, typer.Option("--dir", help="key folder")] = Path("keys"),
    scheme: Annotated[str | None, typer.Option(help="new scheme (default: keep)")] = None,
) -> None:
    """Replace OWNER's key; the old pair moves to DIR/retired/. Then trust the new .pub and revoke the old."""
    from expertkit.federated.keys import rotate_key

    old, new = rotate_key(owner, directory, scheme)
    out.print(f"rotated {owner}: old {old.fingerprint} -> new {new.fingerprint}. On the server: "
              f"`expertkit fl keys trust {directory / (owner + '.pub')}` and `expertkit fl keys revoke {old.fingerprint}`.")


@keys_app.command("trust")
def keys_trust(
    public: Annotated[Path, typer.Argument(help="a client's .pub file")],
    store: Annotated[Path, typer.Option(help="trust-store folder (created if missing)")] = Path("trust"),
) -> None:
    """Add a public key to the server's allowlist."""
    from expertkit.federated.keys import TrustStore

    key = TrustStore(store, create=True).trust(public)
    out.print(f"trusted {key.owner} ({key.scheme}) fingerprint {key.fingerprint}")


@keys_app.command("revoke")
def keys_revoke(
    fingerprint: Annotated[str, typer.Argument(help="fingerprint (or a unique prefix)")],
    store: Annotated[Path, typer.Option(help="trust-store folder")] = Path("trust"),
    reason: Annotated[str, typer.Option(help="recorded with the revocation")] = "revoked",
) -> None:
    """Revoke a key: its updates are refused from now on, even if its file is added again."""
    from expertkit.federated.keys import TrustStore

    key = TrustStore(store).revoke(fingerprint, reason)
    out.print(f"revoked {key.owner} fingerprint {key.fingerprint} ({reason})")


@keys_app.command("list")
def keys_list(store: Annotated[Path, typer.Option(help="trust-store folder")] = Path("trust")) -> None:
    """The allowlist: owner, scheme, fingerprint, active or revoked."""
    from expertkit.federated.keys import TrustStore

    table = Table(title=f"trust store {store}")
    for col in ("owner", "scheme", "fingerprint", "status"):
        table.add_column(col)
    for key, active in TrustStore(store).keys():
        table.add_row(key.owner, key.scheme, key.fingerprint, "active" if active else "[red]revoked[/red]")
    out.print(table)


@keys_app.command("schemes")
def keys_schemes() -> None:
    """The registered signature schemes with sizes and standards."""
    from expertkit.federated.signing import SIGNERS

    table = Table(title="signature schemes")
    for col in ("name", "post-quantum", "standard", "level", "public key (B)", "signature (B)", "summary"):
        table.add_column(col, overflow="fold")
    for e in SIGNERS:
        info = e.extra["info"]
        table.add_row(e.name, "yes" if e.obj.post_quantum else "no", info.standard, str(info.security_level),
                      str(e.obj.public_key_size), str(e.obj.signature_size), e.summary)
    out.print(table)


def register(app: typer.Typer) -> None:
    """Add ``expertkit fl`` to the main app."""
    app.add_typer(fl_app, name="fl")
