"""``expertkit train``: train one expert on a task with any registered optimizer and scheme.

    expertkit train family_relation experts/fr --optimizer zo-sgd --scheme lora --steps 200
    expertkit optimizers          # registered optimizers and their parameters

Zeroth-order methods (``zo-*``, ``forward-grad``) get the MeZO/ZO-Bench learning rate and ε of
the scheme unless ``--lr`` / ``--eps`` are given (see ``docs/zo.md``). ``--dp`` trains with
differential privacy: ``adamw`` becomes ``dp-adamw`` and ``sgd`` ``dp-sgd``, with ``--epsilon``,
``--delta``, ``--max-grad-norm``, ``--accountant`` (or ``--noise-multiplier``); DP-Flat's parts
go in ``--param`` (``rho=0.05``, ``prefix_layers=[3,7]``, ``teacher=DIR``, ``distill_weight=0.1``;
see ``docs/privacy.md``). Wired in by :func:`register`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

out = Console(soft_wrap=True)


def _parse_params(items: list[str]) -> dict[str, Any]:
    """``["q=2", "block=layer"]`` -> ``{"q": 2, "block": "layer"}`` (values read as YAML scalars)."""
    import yaml

    from expertkit.errors import ConfigError

    params: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--param '{item}' is not KEY=VALUE (e.g. --param q=2).")
        params[key.strip()] = yaml.safe_load(value)
    return params


def resolve_settings(
    optimizer: str, scheme: str, lr: float | None, eps: float | None, params: dict[str, Any],
) -> tuple[float | None, dict[str, Any]]:
    """The learning rate and optimizer parameters after applying the per-scheme ZO defaults."""
    from expertkit.train.optimizers import optimizer_entry

    entry = optimizer_entry(optimizer)
    params = dict(params)
    if entry.extra.get("zo"):
        from expertkit.optim.zo import zo_defaults

        defaults = zo_defaults(scheme)
        lr = defaults["lr"] if lr is None else lr
        if eps is not None or "eps" not in params:
            params["eps"] = defaults["eps"] if eps is None else eps
    elif eps is not None:
        from expertkit.errors import ConfigError

        raise ConfigError(f"--eps is a zeroth-order setting; optimizer '{optimizer}' is first-order.")
    return lr, params


def dp_settings(optimizer: str, dp: bool, params: dict[str, Any], **options: Any) -> tuple[str, dict[str, Any]]:
    """``(optimizer, params)`` after ``--dp``: the DP variant of a first-order optimizer and the DP options."""
    from expertkit.errors import ConfigError

    given = {k: v for k, v in options.items() if v is not None}
    if not dp:
        if given:
            flags = ", ".join("--" + k.replace("_", "-") for k in given)
            raise ConfigError(f"{flags} only apply with --dp (differentially private training).")
        return optimizer, params
    private = {"adamw": "dp-adamw", "sgd": "dp-sgd", "dp-adamw": "dp-adamw", "dp-sgd": "dp-sgd"}
    if optimizer not in private:
        raise ConfigError(f"--dp needs a first-order optimizer (adamw or sgd); '{optimizer}' has no DP variant.")
    if "noise_multiplier" in given and "epsilon" not in given:
        params.setdefault("epsilon", None)
    return private[optimizer], {**params, **given}


def train_cmd(
    task: Annotated[str, typer.Argument(help="Task name (see `expertkit tasks list`).")],
    out_dir: Annotated[Path, typer.Argument(help="Output folder (PEFT adapter, or a full model for --scheme full).")],
    model: Annotated[str, typer.Option(help="Base model: bundled name or folder.")] = "smollm2-135m",
    optimizer: Annotated[str, typer.Option(help="A registered optimizer (`expertkit optimizers`).")] = "adamw",
    scheme: Annotated[str, typer.Option(help="lora, full, prefix or prompt.")] = "lora",
    steps: Annotated[int, typer.Option(min=1, help="Optimizer steps.")] = 40,
    lr: Annotated[float | None, typer.Option(help="Learning rate (default: per optimizer and scheme).")] = None,
    eps: Annotated[float | None, typer.Option(help="ZO perturbation scale ε (default: per scheme).")] = None,
    param: Annotated[list[str] | None, typer.Option(help="Optimizer parameter KEY=VALUE (repeatable).")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Examples per step.")] = 8,
    rank: Annotated[int, typer.Option(min=1, help="LoRA rank.")] = 8,
    virtual_tokens: Annotated[int, typer.Option(min=1, help="Virtual tokens of prefix/prompt tuning.")] = 10,
    prefix_init: Annotated[str, typer.Option(help="Prefix tuning's start: real (the model's own keys/values of "
                                             "sampled tokens) or random (PEFT's N(0, 1)).")] = "real",
    seed: Annotated[int, typer.Option(help="Seed of init, data and directions.")] = 0,
    eval_n: Annotated[int, typer.Option(min=0, help="Evaluate on this many test examples after training.")] = 0,
    resume: Annotated[bool, typer.Option(help="Continue an interrupted run in OUT_DIR.")] = True,
    select_n: Annotated[int, typer.Option(min=0, help="Early stopping: score the start, every checkpoint and the "
                                          "last step on this many validation examples and write the best.")] = 0,
    save_every: Annotated[int, typer.Option(min=0, help="Checkpoint every this many steps (0 = never).")] = 25,
    train_examples: Annotated[int | None, typer.Option(min=1, help="Training pool size (default steps * batch size); "
                                                       "with --dp, the number of private examples n.")] = None,
    dp: Annotated[bool, typer.Option("--dp", help="Differentially private training (DP-SGD on Opacus).")] = False,
    epsilon: Annotated[float | None, typer.Option(help="--dp: target epsilon of the whole run (inf = no noise).")] = None,
    delta: Annotated[float | None, typer.Option(help="--dp: delta, below 1/n (default 1e-5).")] = None,
    max_grad_norm: Annotated[float | None, typer.Option(help="--dp: per-example clipping norm (default 1.0).")] = None,
    noise_multiplier: Annotated[float | None, typer.Option(help="--dp: noise multiplier instead of a target epsilon.")] = None,
    accountant: Annotated[str | None, typer.Option(help="--dp: rdp (default) or prv.")] = None,
) -> None:
    """Train one expert on TASK and write it to OUT_DIR (resumable; written atomically)."""
    from expertkit.models import load_model
    from expertkit.train import train_lora

    optimizer, params = dp_settings(optimizer, dp, _parse_params(param or []), epsilon=epsilon, delta=delta,
                                    max_grad_norm=max_grad_norm, noise_multiplier=noise_multiplier,
                                    accountant=accountant)
    lr, params = resolve_settings(optimizer, scheme, lr, eps, params)
    overrides: dict[str, Any] = {
        "optimizer": optimizer, "optimizer_params": params, "scheme": scheme, "steps": steps,
        "batch_size": batch_size, "rank": rank, "num_virtual_tokens": virtual_tokens, "seed": seed,
        "prefix_init": prefix_init,
        "eval_n": eval_n, "resume": resume, "select_n": select_n, "save_every": save_every,
    }
    if lr is not None:
        overrides["lr"] = lr
    if train_examples is not None:
        overrides["train_examples"] = train_examples
    from expertkit.config import validate
    from expertkit.train import LoraTrainConfig

    config = validate(LoraTrainConfig, overrides, source="training options")  # before the (slow) model load
    res = train_lora(load_model(model), task, out_dir, config)
    what = "reused" if res.reused else f"trained {res.steps} steps in {res.seconds:.0f} s"
    line = f"{what}: loss {res.losses[0]:.4f} -> {res.train_loss:.4f}"
    if res.metrics:
        m = res.metrics
        line += f"; {m['split']} accuracy {m['accuracy']:.3f} [{m['ci'][0]:.3f}, {m['ci'][1]:.3f}] (n={m['n']})"
    if sel := res.meta.get("selection"):
        acc = dict((int(step), a) for step, a in sel["curve"])[sel["step"]]
        line += f"; kept step {sel['step']} of {res.steps} (validation {acc:.3f}, n={sel['n']})"
    if (spent := res.meta.get("optimizer_report")) and "epsilon" in spent:
        line += (f"; privacy spent: epsilon {spent['epsilon']:.3g} at delta {spent['delta']:g} "
                 f"(noise multiplier {spent['noise_multiplier']:.3g}, {spent['accountant']})")
    out.print(f"[green]done[/green]: {line}; wrote {res.out_dir}", highlight=False)


def optimizers_cmd() -> None:
    """List the registered optimizers (first- and zeroth-order) and their parameters."""
    from expertkit.cli.helptext import print_entries
    from expertkit.train.optimizers import OPTIMIZERS, _load_plugins

    missing = _load_plugins()
    print_entries(out, OPTIMIZERS, kind=lambda e: "zeroth-order" if e.extra.get("zo") else "first-order")
    for package, dependency in missing.items():
        out.print(f"(optimizers of {package} are not listed: it needs the package '{dependency}', "
                  "which is not installed)", highlight=False)


def register(app: typer.Typer) -> None:
    """Add ``expertkit train`` and ``expertkit optimizers`` to the main app."""
    app.command("train")(train_cmd)
    app.command("optimizers")(optimizers_cmd)
