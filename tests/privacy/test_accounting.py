"""Accounting: our ε is Opacus's, matches the closed form without subsampling, and the impossible is refused."""

from __future__ import annotations

import math

import numpy as np
import pytest

from expertkit.privacy.accounting import PrivacyBudgetError, calibrate, check_setting, epsilon_spent


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_epsilon_equals_a_fresh_opacus_accountant_stepped_the_same(accountant):
    from opacus.accountants import PRVAccountant, RDPAccountant

    acc = RDPAccountant() if accountant == "rdp" else PRVAccountant()
    for _ in range(50):
        acc.step(noise_multiplier=1.1, sample_rate=0.02)
    assert epsilon_spent(1.1, 0.02, 50, 1e-5, accountant) == pytest.approx(acc.get_epsilon(delta=1e-5), rel=1e-9)


def test_epsilon_without_subsampling_is_the_gaussian_mechanisms_closed_form():
    # q = 1: each step is the Gaussian mechanism, RDP alpha / (2 sigma^2) per step (Mironov 2017); converted
    # to (eps, delta) by Balle et al. 2020's bound, which Opacus uses, minimised over Opacus's orders.
    from opacus.accountants.rdp import RDPAccountant

    sigma, steps, delta = 2.0, 10, 1e-5
    alphas = np.array(RDPAccountant.DEFAULT_ALPHAS, dtype=float)
    rdp = steps * alphas / (2 * sigma**2)
    eps = rdp - (np.log(delta) + np.log(alphas)) / (alphas - 1) + np.log((alphas - 1) / alphas)
    assert epsilon_spent(sigma, 1.0, steps, delta) == pytest.approx(float(eps.min()), rel=1e-6)
    assert 7.5 < eps.min() < 8.5  # by hand: 1.25 a + 11.5 / (a - 1) is least near a = 4, about 8.8 less the corrections


def test_no_noise_is_infinite_epsilon_and_no_steps_is_zero():
    assert epsilon_spent(0.0, 0.1, 5, 1e-5) == math.inf
    assert epsilon_spent(1.0, 0.1, 0, 1e-5) == 0.0
    assert calibrate(math.inf, 1e-5, 0.1, 10) == 0.0


def test_calibrated_noise_is_the_smallest_that_meets_the_target_and_matches_make_private_with_epsilon():
    import torch
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    sigma = calibrate(3.0, 1e-5, 0.125, 16)
    assert epsilon_spent(sigma, 0.125, 16, 1e-5) <= 3.0
    assert epsilon_spent(sigma * 0.97, 0.125, 16, 1e-5) > 3.0 - 0.03  # barely any less noise would overspend
    # Opacus's own calibration for the same accountant, q (64 examples, batches of 8) and steps (2 epochs of 8)
    model = torch.nn.Linear(2, 1)
    loader = DataLoader(TensorDataset(torch.zeros(64, 2), torch.zeros(64, 1)), batch_size=8)
    _, opt, _ = PrivacyEngine(accountant="rdp").make_private_with_epsilon(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), data_loader=loader,
        target_epsilon=3.0, target_delta=1e-5, epochs=2, max_grad_norm=1.0,
    )
    assert opt.noise_multiplier == sigma


def test_an_unreachable_epsilon_is_refused_with_the_reason():
    # full-batch RDP cannot go below log(1/delta) / (max order - 1), whatever the noise
    with pytest.raises(PrivacyBudgetError) as info:
        calibrate(0.05, 1e-5, 1.0, 100)
    msg = str(info.value)
    assert "epsilon 0.05 at delta 1e-05 cannot be reached with 100 steps at sample rate 1" in msg
    assert "raise epsilon or delta" in msg and "\n" not in msg


def test_delta_and_sample_rate_must_make_sense():
    with pytest.raises(PrivacyBudgetError, match=r"delta 0.01 must be in \(0, 1/n\)"):
        check_setting(delta=0.01, sample_rate=0.1, pool_size=200)
    with pytest.raises(PrivacyBudgetError, match="batch size of at most 50"):
        check_setting(delta=1e-5, sample_rate=1.2, pool_size=50)
    check_setting(delta=1e-3, sample_rate=0.5, pool_size=200)  # fine


def test_the_search_keeps_opacus_largest_alpha_warning_about_its_trial_noise_to_itself():
    import warnings

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        sigma = calibrate(3.0, 1e-5, 0.016, 50)
        spent = epsilon_spent(sigma, 0.016, 50, 1e-5)
    assert 2.9 < spent <= 3.0
    assert not [w for w in seen if "largest alpha" in str(w.message)]  # the answer's best order is inside the range
    with warnings.catch_warnings(record=True) as seen:  # a genuinely truncated bound still warns
        warnings.simplefilter("always")
        epsilon_spent(1e6, 0.016, 50, 1e-5)
    assert [w for w in seen if "largest alpha" in str(w.message)]
