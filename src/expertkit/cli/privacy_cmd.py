"""``expertkit privacy``: privacy accounting from the command line (Opacus's RDP and PRV accountants).

    expertkit privacy epsilon --noise-multiplier 1.1 --sample-rate 0.01 --steps 1000 --delta 1e-5
    expertkit privacy noise --epsilon 3 --sample-rate 0.01 --steps 1000 --delta 1e-5

Training with DP is ``expertkit train --dp`` (see ``docs/privacy.md``). Wired in by :func:`register`.
"""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console

out = Console(soft_wrap=True)
privacy_app = typer.Typer(help="Differential privacy accounting (DP training is `expertkit train --dp`).",
                          no_args_is_help=True)

SampleRate = Annotated[float, typer.Option(help="Poisson sample rate q = batch size / private examples.")]
Steps = Annotated[int, typer.Option(min=1, help="Training steps.")]
Delta = Annotated[float, typer.Option(help="delta of (epsilon, delta)-DP.")]
Accountant = Annotated[str, typer.Option(help="rdp or prv.")]


@privacy_app.command("epsilon")
def epsilon_cmd(
    noise_multiplier: Annotated[float, typer.Option(min=0, help="Noise std / clipping norm.")],
    sample_rate: SampleRate, steps: Steps, delta: Delta = 1e-5, accountant: Accountant = "rdp",
) -> None:
    """The epsilon spent by DP-SGD with this noise, sample rate and number of steps."""
    from expertkit.privacy.accounting import epsilon_spent

    eps = epsilon_spent(noise_multiplier, sample_rate, steps, delta, accountant)
    out.print(f"epsilon {eps:.4g} at delta {delta:g} ({accountant}; noise multiplier {noise_multiplier:g}, "
              f"sample rate {sample_rate:g}, {steps} steps)", highlight=False)


@privacy_app.command("noise")
def noise_cmd(
    epsilon: Annotated[float, typer.Option(help="Target epsilon.")],
    sample_rate: SampleRate, steps: Steps, delta: Delta = 1e-5, accountant: Accountant = "rdp",
) -> None:
    """The noise multiplier that reaches a target epsilon (refused, with the reason, when none does)."""
    from expertkit.privacy.accounting import calibrate, epsilon_spent

    sigma = calibrate(epsilon, delta, sample_rate, steps, accountant)
    spent = epsilon_spent(sigma, sample_rate, steps, delta, accountant)
    out.print(f"noise multiplier {sigma:.4g} (spends epsilon {spent:.4g} at delta {delta:g}, {accountant})",
              highlight=False)


def register(app: typer.Typer) -> None:
    """Add ``expertkit privacy`` to the main app."""
    app.add_typer(privacy_app, name="privacy")
