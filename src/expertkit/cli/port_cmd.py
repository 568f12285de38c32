"""``expertkit port ...`` (PortLLM patches) and ``expertkit evolve`` (make an evolved base)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markdown import Markdown

port_app = typer.Typer(
    help="PortLLM: carry a fine-tuning patch made on an old base to an updated base, without training.",
    no_args_is_help=True,
    add_completion=False,
)
out = Console(soft_wrap=True)


@port_app.command("extract")
def extract(
    source: Annotated[Path, typer.Argument(help="a PEFT LoRA adapter folder, or a fine-tuned model folder")],
    dest: Annotated[Path, typer.Argument(help="the patch folder to write")],
    base: Annotated[str | None, typer.Option(help="the model SOURCE was trained from (required for a model folder)")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace DEST if it exists.")] = False,
) -> None:
    """Make a patch: low-rank factors from an adapter, or fine-tuned minus base (a task vector)."""
    from expertkit.port import extract_patch

    patch = extract_patch(source, base)
    patch.save(dest, overwrite=overwrite)
    kind = f"{len(patch.factors)} low-rank, {len(patch.deltas)} dense, {len(patch.replacements)} replaced tensors"
    sketched = "with" if patch.sketch else "without (no base at hand)"
    out.print(f"wrote {patch.kind} patch to {dest}: {kind}; {sketched} a sketch of the old base.")


@port_app.command("apply")
def apply(
    patch: Annotated[Path, typer.Argument(help="a patch folder (from `port extract`) or a PEFT adapter folder")],
    new_base: Annotated[str, typer.Argument(help="the updated base: a model folder or a bundled model name")],
    dest: Annotated[Path, typer.Argument(help="the folder to write (a model, or an adapter with --as-adapter)")],
    scale: Annotated[float, typer.Option("--scale", help="lambda: theta_new + lambda * delta")] = 1.0,
    as_adapter: Annotated[bool, typer.Option("--as-adapter", help="Write a PEFT adapter for the new base instead of a model.")] = False,
    rank: Annotated[int, typer.Option(help="SVD rank for dense patches written as adapters")] = 16,
    old_base: Annotated[str | None, typer.Option(help="the base the patch was made on, to measure drift exactly")] = None,
    force: Annotated[bool, typer.Option(help="Port even when the new base looks unrelated to the patch's base.")] = False,
    skip_non_matrix: Annotated[bool, typer.Option(help="With --as-adapter: leave out norm/bias deltas (listed).")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace DEST if it exists.")] = False,
) -> None:
    """Apply a patch to a new base, after checking compatibility and measuring the base's drift."""
    from expertkit.port import port

    res = port(patch, new_base, dest, scale=scale, as_adapter=as_adapter, rank=rank, old_base=old_base,
               force=force, skip_non_matrix=skip_non_matrix, overwrite=overwrite)
    out.print(Markdown(res.diagnosis.markdown()))
    if res.adapter is not None:
        out.print(f"adapter rank {res.adapter['rank']}; largest SVD residual {res.adapter['max_residual']:.2e}"
                  + (f"; left out: {', '.join(res.adapter['skipped'])}" if res.adapter["skipped"] else ""))
    out.print(f"wrote the ported {res.kind} to {res.path} (scale {scale}).")


@port_app.command("diagnose")
def diagnose_cmd(
    patch: Annotated[Path, typer.Argument(help="a patch folder or a PEFT adapter folder")],
    new_base: Annotated[str, typer.Argument(help="the updated base")],
    old_base: Annotated[str | None, typer.Option(help="the base the patch was made on (exact drift)")] = None,
) -> None:
    """Report how far the new base moved from the patch's base, per layer, without writing anything."""
    from expertkit.port.apply import _folder, _load_patch
    from expertkit.port.diagnose import diagnose

    diag = diagnose(_load_patch(patch), _folder(new_base), old_base=_folder(old_base) if old_base else None)
    out.print(Markdown(diag.markdown()))


def evolve_cmd(
    base: Annotated[str, typer.Argument(help="the model to continue pretraining (folder or bundled name)")],
    dest: Annotated[Path, typer.Argument(help="the folder of the evolved model")],
    corpus: Annotated[str, typer.Option(help="'bbc', a .txt file (documents separated by blank lines) or a folder")] = "bbc",
    steps: Annotated[int, typer.Option(help="AdamW steps")] = 100,
    lr: Annotated[float, typer.Option(help="peak learning rate")] = 5e-5,
    batch_size: Annotated[int, typer.Option(help="blocks per step")] = 4,
    seq_len: Annotated[int, typer.Option(help="tokens per block")] = 128,
    seed: Annotated[int, typer.Option(help="data order seed")] = 0,
    overwrite: Annotated[bool, typer.Option(help="Replace DEST if it exists.")] = False,
) -> None:
    """Continue pretraining a model on another corpus: an evolved "version 2" base with a model card."""
    from expertkit.port import evolve

    res = evolve(base, dest, corpus=corpus, steps=steps, lr=lr, batch_size=batch_size, seq_len=seq_len,
                 seed=seed, overwrite=overwrite)
    out.print(f"wrote {res.path}: loss {res.meta['loss_first']:.3f} -> {res.meta['loss_last']:.3f} "
              f"over {steps} steps ({res.meta['seconds']:.0f} s).")


def register(app: typer.Typer) -> None:
    """Add ``expertkit port`` and ``expertkit evolve`` to the main app."""
    app.add_typer(port_app, name="port")
    app.command("evolve")(evolve_cmd)
