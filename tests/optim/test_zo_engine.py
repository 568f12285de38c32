"""The seeded-perturbation engine: unbiased estimates, seed replay, exact restore, sparsity, jvp."""

from __future__ import annotations

import pytest
import torch

from expertkit.models.tiny import tiny_model
from expertkit.optim.zo import ZOEngine, derive_seed, select_coordinates
from expertkit.optim.zo import sparsity as sparsity_mod
from expertkit.optim.zo.forward_grad import directional_derivative
from expertkit.optim.zo.params import ZOParams
from expertkit.optim.zo.sgd import ZOSGD

from .quadratic import Quadratic, bits


def test_two_sided_estimate_matches_true_gradient_over_20k_seeds() -> None:
    quad = Quadratic()
    method = ZOSGD([quad.theta], ZOParams(eps=1e-3), seed=0)
    grads, _ = method.estimate([0], list(range(20_000)), quad.loss_value(method), quad.loss_fn)
    estimate = sum(g * method.engine.direction(0, s) for s, g in zip(range(20_000), grads)) / 20_000  # (10,)
    true = quad.gradient()
    rel = float((estimate - true).norm() / true.norm())
    assert rel < 0.05, rel
    # every single projected gradient is the exact directional derivative (a quadratic, two-sided)
    z = method.engine.direction(0, 7)
    assert grads[7] == pytest.approx(float(true @ z), rel=1e-6)


def test_one_sided_estimate_is_biased_by_order_eps() -> None:
    quad = Quadratic()
    method = ZOSGD([quad.theta], ZOParams(eps=1e-2, estimator="one-sided"), seed=0)
    grads, base = method.estimate([0], [3], quad.loss_value(method), quad.loss_fn)
    z = method.engine.direction(0, 3)
    exact = float(quad.gradient() @ z) + 1e-2 / 2 * float(z @ quad.A @ z)  # (f(θ+εz)-f(θ))/ε
    assert grads[0] == pytest.approx(exact, rel=1e-6) and base == pytest.approx(float(quad.f(quad.theta.detach())))


def test_q_query_step_equals_mean_of_single_query_estimates() -> None:
    quad = Quadratic()
    theta0 = quad.theta.detach().clone()
    method = ZOSGD([quad.theta], ZOParams(eps=1e-3, q=4), seed=5)
    step_seed = derive_seed(5, 0)
    seeds = [derive_seed(step_seed, 0, j) for j in range(4)]
    singles = []
    for s in seeds:  # each a q = 1 estimate at θ0
        g, _ = method.estimate([0], [s], quad.loss_value(method), quad.loss_fn)
        singles.append(g[0] * method.engine.direction(0, s))
    assert torch.equal(bits(quad.theta), bits(theta0))  # estimating restored θ exactly
    method.step(quad.loss_fn, lr=0.1)
    expected = theta0 - 0.1 * torch.stack(singles).mean(0)
    torch.testing.assert_close(quad.theta.detach(), expected, rtol=1e-12, atol=1e-12)


def test_directions_are_regenerated_from_seeds_without_global_rng() -> None:
    p = torch.zeros(1000)
    eng = ZOEngine([p, torch.zeros(3, 4)])
    torch.manual_seed(0)
    state = torch.get_rng_state()
    a, b = eng.direction(0, 11), eng.direction(0, 11)
    assert torch.equal(a, b) and not torch.equal(a, eng.direction(0, 12))
    assert not torch.equal(eng.direction(1, 11).view(-1), a[:12])  # another tensor id, another stream
    assert torch.equal(state, torch.get_rng_state())
    assert a.mean().abs() < 0.1 and (a.std() - 1).abs() < 0.1


def test_undo_is_bit_exact_where_float_arithmetic_is_not() -> None:
    theta = torch.tensor([1e-8, 1.0, -0.0, 3.0, 0.1, -2.5e-5])
    eng = ZOEngine([theta])
    seed, scale = 1, 1e-3
    naive = theta.clone()
    d = eng.direction(0, seed) * scale
    naive.add_(d).sub_(d)
    assert not torch.equal(bits(naive), bits(theta))  # plain in-place undo loses bits here
    before = theta.clone()
    patches = eng.add([0], [seed], [scale], record=True)
    assert not torch.equal(theta, before)
    eng.undo([0], [seed], [scale], patches)
    assert torch.equal(bits(theta), bits(before))
    assert 0 < patches[0][0].numel() < theta.numel()  # only the coordinates that needed it were kept


def test_memory_of_patches_is_a_small_fraction_on_weight_like_values() -> None:
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(1 << 18, generator=gen) * 0.02
    before = w.clone()
    eng = ZOEngine([w])
    patches = eng.add([0], [3], [1e-3], record=True)
    frac = patches[0][0].numel() / w.numel()
    assert 0.0 < frac < 0.15
    eng.undo([0], [3], [1e-3], patches)
    assert torch.equal(bits(w), bits(before))


# ------------------------------------------------------------------ sparsity
@pytest.mark.parametrize("scope,by", [("layer", "magnitude"), ("layer", "random"), ("global", "magnitude")])
def test_sparsity_perturbs_the_requested_fraction(scope: str, by: str) -> None:
    model = tiny_model("llama", seed=0)
    params = [p for p in model.parameters()]
    index = select_coordinates(params, 0.7, scope=scope, by=by, seed=1)
    total = sum(p.numel() for p in params)
    chosen = sum(i.numel() for i in index)
    assert abs(chosen / total - 0.3) < 0.01
    if scope == "layer":
        for p, i in zip(params, index):
            assert i.numel() == round(0.3 * p.numel())
    eng = ZOEngine(params)
    for k, i in enumerate(index):
        eng.set_index(k, i)
    before = [p.detach().clone() for p in params]
    eng.add(range(len(params)), [4], [1e-3])
    changed = sum(int((p.detach() != b).sum()) for p, b in zip(params, before))
    assert changed <= chosen and changed > 0.95 * chosen  # only the chosen ones move (a few round to 0)
    for p, b, i in zip(params, before, index):
        outside = torch.ones(p.numel(), dtype=torch.bool)
        outside[i] = False
        assert torch.equal(p.detach().view(-1)[outside], b.view(-1)[outside])


def test_magnitude_mask_keeps_the_smallest_weights() -> None:
    w = torch.tensor([0.5, -0.01, 0.2, 0.03, -0.9, 0.0, 0.07, -0.3, 0.1, 0.6])
    (idx,) = select_coordinates([w], 0.6, scope="layer", by="magnitude")
    assert idx.tolist() == [1, 3, 5, 6]


def test_sampled_global_threshold_is_within_one_percent(monkeypatch) -> None:
    monkeypatch.setattr(sparsity_mod, "EXACT_GLOBAL", 1000)
    monkeypatch.setattr(sparsity_mod, "SAMPLE", 1 << 16)
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(300, 200, generator=gen), torch.randn(50_000, generator=gen) * 3]
    index = select_coordinates(params, 0.9, scope="global")
    frac = sum(i.numel() for i in index) / sum(p.numel() for p in params)
    assert abs(frac - 0.1) < 0.01


# ------------------------------------------------------------------ forward gradient
def test_forward_grad_directional_derivative_equals_autograd() -> None:
    model = tiny_model("llama", seed=0)
    ids = torch.randint(3, 90, (2, 7), generator=torch.Generator().manual_seed(0))
    names = [n for n, _ in model.named_parameters()][:6] + ["lm_head.weight"]
    params = dict(model.named_parameters())
    gen = torch.Generator().manual_seed(1)
    tangents = {n: torch.randn(params[n].shape, generator=gen) for n in names}

    def loss_fn() -> torch.Tensor:
        return model(input_ids=ids, labels=ids).loss

    value, deriv = directional_derivative(model, names, tangents, loss_fn)
    loss = loss_fn()
    grads = torch.autograd.grad(loss, [params[n] for n in names])
    expected = sum(float((g * tangents[n]).sum()) for g, n in zip(grads, names))
    assert value == pytest.approx(float(loss.detach()), rel=1e-5)
    assert deriv == pytest.approx(expected, rel=1e-4)
    assert model.config._attn_implementation == "sdpa"  # switched back after the jvp


# ------------------------------------------------------------------ fast path: chunks, threads, fused passes
@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 1000 coordinates, threads from 3000: the chunked, threaded path on small tensors."""
    from expertkit.optim.zo import engine as engine_mod

    monkeypatch.setattr(engine_mod, "CHUNK", 1000)
    monkeypatch.setattr(engine_mod, "PARALLEL_MIN", 3000)


def weights(seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(70, 100, generator=gen) * 0.02, torch.randn(2500, generator=gen) * 0.5, torch.zeros(7)]


def test_directions_do_not_depend_on_the_thread_count(small_chunks) -> None:
    one, four = ZOEngine(weights(), threads=1), ZOEngine(weights(), threads=4)
    for i in range(3):
        a, b = one.direction(i, 5), four.direction(i, 5)
        assert torch.equal(a, b) and a.shape == one.slots[i].param.shape
    z = one.direction(0, 5).view(-1)
    assert not torch.equal(z[:1000], z[1000:2000])  # each chunk its own stream


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("sparse", [False, True])
def test_perturb_mirror_restore_is_bit_exact_and_sees_both_points(small_chunks, threads: int, sparse: bool) -> None:
    params = weights()
    before = [p.clone() for p in params]
    eng = ZOEngine(params, threads=threads)
    if sparse:
        for i, idx in enumerate(select_coordinates(params, 0.5, by="random", seed=2)):
            eng.set_index(i, idx)
    ids, eps = [0, 1, 2], 1e-3
    z = [eng.dense(i, eng.direction(i, 9)) for i in ids]
    patches = eng.perturb(ids, 9, eps)
    for p, b, zi in zip(params, before, z):
        torch.testing.assert_close(p, b + eps * zi, rtol=0, atol=1e-6)
    patches = eng.mirror(ids, 9, eps, patches)
    for p, b, zi in zip(params, before, z):
        torch.testing.assert_close(p, b - eps * zi, rtol=0, atol=1e-6)
    kept = sum(v[0].numel() for v in patches.values())
    assert 0 < kept < 0.2 * sum(p.numel() for p in params)
    eng.restore(ids, 9, eps, patches, mirrored=True)
    for p, b in zip(params, before):
        assert torch.equal(bits(p), bits(b))


def test_fused_restore_and_update_equals_restore_then_add(small_chunks) -> None:
    params, ref = weights(), weights()
    fused, plain = ZOEngine(params, threads=2), ZOEngine(ref, threads=2)
    ids, seeds, coeffs = [0, 1, 2], [3, 4], [-0.01, 0.02]
    patches = fused.perturb(ids, 4, 1e-3, record=True)
    fused.restore(ids, 4, 1e-3, patches, mirrored=False, then=(seeds, coeffs))
    plain.add(ids, seeds, coeffs)
    for p, r, w in zip(params, ref, weights()):
        torch.testing.assert_close(p, r, rtol=1e-6, atol=1e-8)  # rounding of the fused sum only
        assert (p - w).abs().max() > 1e-3  # the update was applied (|coeffs| ~ 0.01, |z| ~ 1)


def test_full_step_with_lr_zero_is_bit_identical_on_the_threaded_path(small_chunks) -> None:
    params = [torch.nn.Parameter(p) for p in weights()]
    before = [bits(p).clone() for p in params]
    target = [torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) for p in params]

    def loss_fn() -> torch.Tensor:
        return sum(((p - t) ** 2).sum() for p, t in zip(params, target)).reshape(1)

    opt = ZOSGD(params, ZOParams(eps=1e-3, q=2), seed=0)
    opt.engine.threads = 3
    assert opt.fused
    opt.step(loss_fn, 0.0)
    assert all(torch.equal(bits(p), b) for p, b in zip(params, before))
    opt.step(loss_fn, 1e-3)
    assert not all(torch.equal(bits(p), b) for p, b in zip(params, before))
