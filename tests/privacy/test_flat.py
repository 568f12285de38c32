"""DP-Flat's parts: the perturbation uses released gradients only, distillation adds its pull,
sparse prefix trains the chosen layers' columns only, sharpness is the top Hessian eigenvalue."""

from __future__ import annotations

import pytest
import torch

from expertkit.privacy.dp import PrivateOptimizer
from expertkit.privacy.prefix import layer_columns, layer_sharpness, prefix_masks, prefix_parameter, select_layers
from expertkit.privacy.sharpness import power_iteration
from expertkit.privacy.wrappers import WeightDistillation, WeightPerturbation
from expertkit.train.data import per_example_loss
from tests.privacy.helpers import make_batch, wrapped


def core(model, *, sigma=0.0, masks=None, lr=0.1):
    params = [p for p in model.parameters() if p.requires_grad]
    return PrivateOptimizer(torch.optim.SGD(params, lr=lr), model, pool_size=64, batch_size=4, steps=10, seed=0,
                            delta=1e-3, max_grad_norm=0.5, noise_multiplier=sigma, masks=masks)


def loss_of(model, batch):
    return lambda: per_example_loss(model, *batch)


def test_the_perturbation_is_the_last_released_gradient_and_ignores_the_current_batch():
    torch.manual_seed(0)
    runs = []
    for current in (make_batch(seed=1), make_batch(seed=2)):  # same history, different batch at the last step
        torch.manual_seed(0)
        model = wrapped("lora")
        opt = WeightPerturbation(core(model, sigma=2.0), rho=0.05)
        opt.step(loss_of(model, make_batch(seed=0)), 0.1)
        released = [p.grad.detach().clone() for p in opt.params]  # noised, clipped, averaged: what DP releases
        clipped_only = [p.summed_grad.detach() / 4 for p in opt.params]  # not released
        opt.step(loss_of(model, current), 0.1)
        runs.append((released, clipped_only, opt.last_perturbation, opt))
    released, clipped_only, delta, opt = runs[0]
    scale = torch.sqrt(sum((r.double() ** 2).sum() for r in released)).float()
    for d, r in zip(delta, released):
        torch.testing.assert_close(d, 0.05 * r / scale)
    assert sum(float((d - 0.05 * c).abs().sum()) for d, c in zip(delta, clipped_only)) > 1e-3  # not the unnoised one
    for a, b in zip(runs[0][2], runs[1][2]):
        assert torch.equal(a, b)  # the step's own private batch plays no part in its perturbation
    assert opt.accountant.history == [(2.0, 4 / 64, 2)]  # one query per step: nothing extra charged
    assert runs[0][3].inner.epsilon() == runs[1][3].inner.epsilon()


def test_the_update_is_applied_to_the_unperturbed_weights():
    model = wrapped("lora")
    opt = WeightPerturbation(core(model, sigma=0.5, lr=0.2), rho=0.1)
    batch = make_batch()
    opt.step(loss_of(model, batch), 0.2)
    before = [p.detach().clone() for p in opt.params]
    opt.step(loss_of(model, batch), 0.2)
    assert opt.last_perturbation is not None
    for p, b in zip(opt.params, before):
        torch.testing.assert_close(p.detach(), b - 0.2 * p.grad)  # w - lr * g(w + delta): the ascent is undone


def test_distillation_adds_the_pull_towards_the_teacher():
    batch = make_batch()
    plain_model, kd_model = wrapped("lora"), wrapped("lora")
    plain = core(plain_model)
    teacher = [torch.randn_like(p) for p in plain.params]
    kd = WeightDistillation(core(kd_model), teacher, weight=0.3)
    plain.private_gradient(loss_of(plain_model, batch))
    kd.private_gradient(loss_of(kd_model, batch))
    for p, q, t in zip(plain.params, kd.params, teacher):
        torch.testing.assert_close(q.grad - p.grad, 0.3 * (q.detach() - t))


def test_distillation_refuses_a_teacher_of_another_shape():
    from expertkit.errors import IncompatibleModelsError

    model = wrapped("lora")
    with pytest.raises(IncompatibleModelsError, match="same scheme"):
        WeightDistillation(core(model), [torch.zeros(3)], weight=0.1)


def test_prefix_columns_are_each_layers_keys_and_values():
    model = wrapped("prefix").eval()
    _, param, layers = prefix_parameter(model)
    assert layers == 2 and param.shape == (3, 2 * 2 * 32)  # 3 tokens x layers x (key, value) x kv_dim 2 heads * 16
    before = model.get_prompt(batch_size=1)
    with torch.no_grad():
        param[:, layer_columns(param, 2, 1)] += 1.0
    after = model.get_prompt(batch_size=1)

    def layer_kv(cache, layer):
        return torch.cat([t.flatten() for t in (cache.layers[layer].keys, cache.layers[layer].values)])

    assert torch.equal(layer_kv(before, 0), layer_kv(after, 0))
    assert not torch.equal(layer_kv(before, 1), layer_kv(after, 1))


def test_sparse_prefix_trains_only_the_chosen_layer_and_spends_noise_only_there():
    model = wrapped("prefix")
    masks = prefix_masks(model, [1])
    _, param, _ = prefix_parameter(model)
    start = param.detach().clone()
    opt = core(model, sigma=1.0, masks=masks)
    for s in range(2):
        opt.step(loss_of(model, make_batch(seed=s)), 0.1)
    moved = (param.detach() != start)  # (tokens, columns)
    cols = layer_columns(param, 2, 1)
    assert moved[:, cols].all() and not moved[:, : cols.start].any()


def test_power_iteration_finds_the_top_eigenvalue_of_a_known_hessian():
    gen = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=gen, dtype=torch.float64))
    a = q @ torch.diag(torch.tensor([5.0, 2.0, 1.0, 0.5, 0.2, 0.1], dtype=torch.float64)) @ q.T  # (6, 6)
    x = torch.randn(2, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    loss = 0.5 * x.flatten() @ a @ x.flatten()  # Hessian is a
    assert power_iteration(loss, [x], iters=60) == pytest.approx(5.0, rel=1e-6)
    # restricted to the second column of x: the top eigenvalue of that 2x2 diagonal block
    idx = torch.tensor([1, 4])
    block = torch.linalg.eigvalsh(a[idx][:, idx]).max()
    assert power_iteration(loss, [x], iters=60, block=(0, slice(1, 2))) == pytest.approx(float(block), rel=1e-6)


def test_power_iteration_gives_the_top_not_the_largest_magnitude_eigenvalue_of_an_indefinite_hessian():
    gen = torch.Generator().manual_seed(1)
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=gen, dtype=torch.float64))
    a = q @ torch.diag(torch.tensor([-7.0, 3.0, 1.0, 0.5, -0.2, 0.1], dtype=torch.float64)) @ q.T  # (6, 6)
    x = torch.randn(6, generator=gen, dtype=torch.float64, requires_grad=True)
    loss = 0.5 * x @ a @ x
    assert power_iteration(loss, [x], iters=200) == pytest.approx(3.0, rel=1e-4)  # not -7
    neg = torch.diag(torch.tensor([-4.0, -1.0, -0.5], dtype=torch.float64))  # all negative: the top is -0.5
    y = torch.randn(3, generator=gen, dtype=torch.float64, requires_grad=True)
    assert power_iteration(0.5 * y @ neg @ y, [y], iters=300) == pytest.approx(-0.5, rel=1e-3)


def test_layer_sharpness_is_each_prefix_blocks_top_eigenvalue():
    model = wrapped("prefix", virtual_tokens=1)  # blocks of 64 coordinates: an exact Hessian is cheap
    batch = make_batch(n=2)
    sharp = layer_sharpness(model, batch, iters=100)
    name, param, _ = prefix_parameter(model)
    base = param.detach().clone()
    for layer in range(2):  # the slow reference: the exact Hessian of the block by autograd, then eigvalsh
        cols = layer_columns(param, 2, layer)
        x0 = base[:, cols].clone()
        h = torch.autograd.functional.hessian(lambda x, c=cols: _block_loss(model, name, base, c, x, batch), x0,
                                         vectorize=True)
        eig = torch.linalg.eigvalsh(h.reshape(x0.numel(), x0.numel()).double())
        assert sharp[layer] == pytest.approx(float(eig.max()), rel=1e-3)  # the top, not the largest |eigenvalue|
    assert sharp[0] != pytest.approx(sharp[1], rel=0.01)
    assert select_layers(sharp, 1) == (min(range(2), key=lambda i: sharp[i]),)


def _block_loss(model, name, base, cols, x, batch):
    from expertkit.privacy.sharpness import eager_attention

    w = torch.cat([base[:, : cols.start], x, base[:, cols.stop:]], dim=1)  # (tokens, columns)
    emb = dict(model.named_modules())[name.rsplit(".", 1)[0]]
    saved = emb.weight
    del emb.weight
    emb.weight = w
    try:
        with eager_attention(model):
            return per_example_loss(model.eval(), *batch).mean()
    finally:
        del emb.weight
        emb.weight = saved


def test_select_layers_takes_the_flattest_or_sharpest():
    assert select_layers([3.0, 1.0, 2.0, 0.5], 2) == (1, 3)
    assert select_layers([3.0, 1.0, 2.0, 0.5], 2, prefer="sharp") == (0, 2)
    from expertkit.errors import ConfigError

    with pytest.raises(ConfigError, match="between 1 and 4"):
        select_layers([3.0, 1.0, 2.0, 0.5], 5)
