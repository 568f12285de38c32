"""DP-SGD on Opacus: per-example gradients equal a loop, clipping bounds every example, the noise has
the configured std, Poisson batches, and LoRA weights really train (Opacus issue 820)."""

from __future__ import annotations

import pytest
import torch
from scipy import stats

from expertkit.privacy.dp import PrivateOptimizer
from expertkit.train.data import per_example_loss
from tests.privacy.helpers import make_batch, wrapped


def private(model, *, sigma=0.0, clip=1.0, pool=64, batch=4, steps=10, lr=0.1, masks=None):
    params = [p for p in model.parameters() if p.requires_grad]
    return PrivateOptimizer(torch.optim.SGD(params, lr=lr), model, pool_size=pool, batch_size=batch, steps=steps,
                            seed=0, delta=1e-3, max_grad_norm=clip, noise_multiplier=sigma, masks=masks)


def loop_grads(model, batch) -> list[list[torch.Tensor]]:
    """Per-example gradients by one backward pass per example (the slow reference)."""
    params = [p for p in model.parameters() if p.requires_grad]
    ids, mask, labels = batch
    out = []
    for i in range(ids.shape[0]):
        loss = per_example_loss(model, ids[i:i + 1], mask[i:i + 1], labels[i:i + 1]).sum()
        out.append([g.detach() for g in torch.autograd.grad(loss, params)])
    return out


def norm(tensors) -> float:
    return float(torch.sqrt(sum((t.double() ** 2).sum() for t in tensors)))


@pytest.mark.parametrize("scheme", ["lora", "prefix", "full"])
def test_per_example_gradients_equal_a_loop_and_the_clipped_sum_is_opacus_rule(scheme):
    model = wrapped(scheme)
    batch = make_batch()
    ref = loop_grads(model, batch)  # before any hook exists
    norms = [norm(g) for g in ref]
    clip = sorted(norms)[1] * 1.01  # two examples are clipped, two are not
    opt = private(model, clip=clip)
    params = opt.params
    opt.private_gradient(lambda: per_example_loss(model, *batch))
    for j, p in enumerate(params):
        for i in range(len(ref)):
            torch.testing.assert_close(p.grad_sample[i], ref[i][j], rtol=1e-4, atol=1e-6)
        clipped_sum = sum(min(1.0, clip / (norms[i] + 1e-6)) * ref[i][j] for i in range(len(ref)))
        torch.testing.assert_close(p.summed_grad, clipped_sum, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(p.grad, clipped_sum / 4, rtol=1e-4, atol=1e-6)  # / expected batch, no noise
    assert len({round(x, 4) for x in norms}) == 4  # the examples really differ
    opt.close()


def test_every_clipped_per_example_gradient_is_within_the_bound():
    model = wrapped("lora")
    batch = make_batch(n=6)
    raw = [norm(g) for g in loop_grads(model, batch)]
    clip = sorted(raw)[2]
    opt = private(model, clip=clip)
    for i in range(6):  # one example at a time: its clipped gradient is the summed one
        opt.private_gradient(lambda i=i: per_example_loss(model, *(t[i:i + 1] for t in batch)))
        contribution = norm([p.summed_grad for p in opt.params])
        assert contribution <= clip * (1 + 1e-5)
        assert contribution == pytest.approx(min(raw[i], clip), rel=1e-4)
    assert sum(r > clip for r in raw) == 3  # half of them needed clipping
    opt.close()


def test_the_noise_has_the_configured_std():
    model = wrapped("lora")
    batch = make_batch()
    sigma, clip, expected = 1.7, 0.3, 4
    opt = private(model, sigma=sigma, clip=clip, batch=expected)
    torch.manual_seed(123)
    opt.private_gradient(lambda: per_example_loss(model, *batch))
    noise = torch.cat([(p.grad * expected - p.summed_grad).flatten() for p in opt.params]).double()  # (params,)
    n = noise.numel()
    assert n > 500
    std = sigma * clip
    # (n-1) s^2 / std^2 is chi-square with n-1 degrees of freedom: a 99.9 % interval for s
    lo, hi = (std * (stats.chi2.ppf(q, n - 1) / (n - 1)) ** 0.5 for q in (0.0005, 0.9995))
    assert lo < float(noise.std()) < hi
    assert abs(float(noise.mean())) < 4 * std / n**0.5
    assert hi / lo < 1.2  # the interval is tight enough to catch a wrong std (e.g. sigma instead of sigma * C)
    opt.close()


def test_poisson_batches_are_a_pure_function_of_the_step_with_the_expected_size():
    opt = private(wrapped("lora"), pool=200, batch=10)
    sizes = [len(opt.batch_indices(s, 200)) for s in range(300)]
    assert opt.batch_indices(7, 200) == opt.batch_indices(7, 200)
    assert opt.batch_indices(7, 200) != opt.batch_indices(8, 200)
    assert abs(sum(sizes) / 300 - 10) < 4 * (10 * 0.95 / 300) ** 0.5  # mean of Binomial(200, 0.05)
    assert len(set(sizes)) > 5  # Poisson: the size varies
    opt.close()


def test_an_empty_batch_is_pure_noise_and_counts_as_a_step():
    model = wrapped("lora")
    opt = private(model, sigma=1.0, clip=0.5)
    opt.private_gradient(lambda: torch.zeros(0))
    assert all(p.grad.abs().sum() > 0 for p in opt.params)
    assert opt.accountant.history == [(1.0, 4 / 64, 1)]
    opt.close()


def test_sgd_update_and_accountant_after_steps(tmp_path):
    model = wrapped("lora")
    batch = make_batch()
    opt = private(model, sigma=0.8, lr=0.5)
    before = [p.detach().clone() for p in opt.params]
    opt.step(lambda: per_example_loss(model, *batch), 0.5)
    for p, b in zip(opt.params, before):
        torch.testing.assert_close(p.detach(), b - 0.5 * p.grad)
    opt.step(lambda: per_example_loss(model, *batch), 0.5)
    from expertkit.privacy.accounting import epsilon_spent

    assert opt.epsilon() == epsilon_spent(0.8, 4 / 64, 2, 1e-3)
    opt.close()
    assert not any(hasattr(p, "grad_sample") for p in model.parameters())
