"""Privacy accounting on Opacus's accountants: ε spent, and the noise that reaches a target ε.

* :func:`epsilon_spent`: ε after ``steps`` Poisson-subsampled Gaussian steps (noise multiplier
  σ, sample rate q) at ``delta``, by Opacus's RDP or PRV accountant.
* :func:`calibrate`: the smallest σ (to Opacus's tolerance) whose ε is at most the target, by
  ``opacus.accountants.utils.get_noise_multiplier`` (the search behind
  ``PrivacyEngine.make_private_with_epsilon``), called with our exact sample rate and step count.
  A target that no σ reaches is refused with the reason (:class:`PrivacyBudgetError`).

ε = ∞ means "no privacy": σ = 0 (the training still clips per-example gradients, so the
non-private runs of an experiment differ from the private ones only in the noise).
"""

from __future__ import annotations

import math
import warnings

from expertkit.errors import ConfigError

ACCOUNTANTS = ("rdp", "prv")


class PrivacyBudgetError(ConfigError):
    """A DP configuration cannot reach the requested (ε, δ), or is not a valid DP setting."""


def make_accountant(name: str):  # -> opacus.accountants.IAccountant
    """A fresh Opacus accountant: ``"rdp"`` (Rényi DP) or ``"prv"`` (privacy random variables)."""
    from opacus.accountants import create_accountant

    if name not in ACCOUNTANTS:
        from expertkit.errors import unknown

        raise unknown("accountant", name, ACCOUNTANTS)
    return create_accountant(mechanism=name)


def check_setting(*, delta: float, sample_rate: float, pool_size: int) -> None:
    """Refuse a δ or a sample rate that makes the guarantee meaningless or ill-defined."""
    if not 0 < sample_rate <= 1:
        raise PrivacyBudgetError(
            f"sample rate {sample_rate:.4g} (batch size / private examples) must be in (0, 1]; "
            f"use a batch size of at most {pool_size}, the number of private examples."
        )
    if not 0 < delta < 1 / pool_size:
        raise PrivacyBudgetError(
            f"delta {delta:g} must be in (0, 1/n) = (0, {1 / pool_size:.3g}) for n = {pool_size} private "
            "examples (a larger delta allows releasing an example outright); lower delta."
        )


def epsilon_spent(noise_multiplier: float, sample_rate: float, steps: int, delta: float,
                  accountant: str = "rdp") -> float:
    """ε after ``steps`` steps of noise ``noise_multiplier`` at ``sample_rate`` (∞ when σ = 0)."""
    if noise_multiplier == 0 or steps == 0:
        return math.inf if steps else 0.0
    acc = make_accountant(accountant)
    acc.history = [(noise_multiplier, sample_rate, steps)]
    return float(acc.get_epsilon(delta=delta))


def calibrate(epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str = "rdp") -> float:
    """The noise multiplier σ that spends at most ``epsilon`` (0.0 for ε = ∞); refuses the impossible."""
    from opacus.accountants.utils import MAX_SIGMA, get_noise_multiplier

    if math.isinf(epsilon):
        return 0.0
    if not epsilon > 0:
        raise PrivacyBudgetError(f"epsilon must be positive (or inf for no privacy); got {epsilon}.")
    tolerance = min(0.01, epsilon / 100)
    # The search tries σ up to 1e6, whose best RDP order is the largest Opacus tries: it warns "Optimal
    # order is the largest alpha" about those trial values, not the answer. Silenced here only; the ε of
    # the σ returned is computed again by the caller (epsilon_spent), where a genuine warning shows.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        try:
            return float(get_noise_multiplier(target_epsilon=epsilon, target_delta=delta, sample_rate=sample_rate,
                                              steps=steps, accountant=accountant, epsilon_tolerance=tolerance))
        except ValueError as exc:
            failure = str(exc)
        floor = epsilon_spent(MAX_SIGMA, sample_rate, steps, delta, accountant)
    raise PrivacyBudgetError(
        f"epsilon {epsilon:g} at delta {delta:g} cannot be reached with {steps} steps at sample rate "
        f"{sample_rate:.4g} by the {accountant} accountant: even noise multiplier {MAX_SIGMA:g} spends "
        f"epsilon {floor:.3g} ({failure}); raise epsilon or delta, or use fewer steps or a smaller batch.")
