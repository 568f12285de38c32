"""The quantization grid, RTN and GPTQ: known answers, GPTQ vs the direct OBQ update, GPTQ vs RTN."""

from __future__ import annotations

import pytest
import torch

from expertkit.errors import ConfigError
from expertkit.quant.gptq import GptqSettings, gptq, layer_error, obq_reference
from expertkit.quant.grid import Scheme, check_bits, code_range, group_params, rtn


@pytest.mark.parametrize("bits", [0, 1, 9, 12, 32, -4])
def test_bit_widths_outside_2_to_8_and_16_are_one_clear_error(bits):
    with pytest.raises(ConfigError, match=rf"{bits} bits is not a weight precision .* use 2 to 8"):
        check_bits(bits)


def test_code_ranges_and_known_group_parameters():
    assert code_range(2) == (-2, 1) and code_range(4) == (-8, 7) and code_range(8) == (-128, 127)
    w = torch.tensor([[-3.0, 1.5, 0.0, 0.75]])
    s, z = group_params(w, Scheme(4, symmetric=True, scale_dtype="float32"))
    assert s.tolist() == pytest.approx([3.0 / 7.5]) and z.tolist() == [0.0]  # max|w| / ((2^4 - 1) / 2)
    s, z = group_params(w, Scheme(4, symmetric=False, scale_dtype="float32"))
    assert s.tolist() == pytest.approx([4.5 / 15]) and z.tolist() == [-8 + 10]  # round(-8 - (-3) / 0.3) = 2
    s, z = group_params(torch.tensor([[0.5, 2.0]]), Scheme(3, symmetric=False, scale_dtype="float32"))
    assert s.tolist() == pytest.approx([2.0 / 7]) and z.tolist() == [-4]  # 0 stays on the grid: min is 0


def test_rtn_by_hand_and_float16_scales():
    w = torch.tensor([[1.0, -0.5, 0.25, 0.3], [0.0, 0.0, 0.0, 0.0]])
    q = rtn(w, Scheme(2, group_size=2, symmetric=True, scale_dtype="float32"))
    # group 1 of row 0: scale 1/1.5, codes round(1.5) -> 2 clamped to 1, round(-0.75) = -1
    assert q.codes[0].tolist() == [1, -1, 1, 1] and q.codes[1].tolist() == [0, 0, 0, 0]
    assert q.dequantize()[0].tolist() == pytest.approx([2 / 3, -2 / 3, 0.2, 0.2])
    q16 = rtn(torch.tensor([[0.1234567, -0.3]]), Scheme(4, group_size=-1))
    assert q16.scale.dtype == torch.float32 and q16.scale.half().float().equal(q16.scale)  # stored as float16


def test_group_size_must_divide_the_row():
    with pytest.raises(ConfigError, match="not a multiple of group_size 4"):
        rtn(torch.ones(2, 6), Scheme(3, group_size=4))
    with pytest.raises(ConfigError, match="positive number of columns or -1"):
        Scheme(3, group_size=0)


def test_gptq_equals_obq_on_the_case_worked_by_hand():
    # W = [1.5, 0.4], H = [[2, 1], [1, 2]], 2-bit symmetric, one scale per row: s = 1.5 / 1.5 = 1, codes in [-2, 1].
    # Column 0: q0 = clamp(round(1.5)) = 1; H^-1 = [[2, -1], [-1, 2]] / 3, so the error (1.5 - 1) / (2/3) = 0.75
    # moves column 1 by -0.75 * (-1/3): 0.4 -> 0.65, which rounds to q1 = 1 (RTN would give 0).
    w, h = torch.tensor([[1.5, 0.4]]), torch.tensor([[2.0, 1.0], [1.0, 2.0]])
    scheme, settings = Scheme(2, group_size=-1, scale_dtype="float32"), GptqSettings(damp=0.0)
    for method in (gptq, obq_reference):
        q = method(w, h, scheme, settings, dtype=torch.float64)
        assert q.codes.tolist() == [[1, 1]] and q.scale.tolist() == [[1.0]]
    assert rtn(w, scheme).codes.tolist() == [[1, 0]]
    # layer errors e H e^T: GPTQ e = [0.5, -0.6] -> 0.62; RTN e = [0.5, 0.4] -> 1.22
    assert layer_error(w, torch.tensor([[1.0, 1.0]]), h) == pytest.approx(0.62)
    assert layer_error(w, torch.tensor([[1.0, 0.0]]), h) == pytest.approx(1.22)


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("block_size", [1, 5, 64])
def test_blocked_gptq_equals_the_unblocked_obq_update(act_order, symmetric, block_size):
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(300, 12, generator=gen) @ torch.randn(12, 12, generator=gen)  # correlated inputs
    h = x.T @ x
    w = torch.randn(6, 12, generator=gen)
    scheme = Scheme(3, group_size=4, symmetric=symmetric)  # blocks of 5 straddle groups of 4
    settings = GptqSettings(damp=0.01, block_size=block_size, act_order=act_order)
    fast = gptq(w, h, scheme, settings, dtype=torch.float64)
    slow = obq_reference(w, h, scheme, settings)
    assert torch.equal(fast.codes, slow.codes) and torch.equal(fast.scale, slow.scale)
    assert torch.equal(fast.zero, slow.zero)


def test_gptq_layer_error_is_at_most_rtn_on_random_layers_with_correlated_inputs():
    for seed in range(20):
        gen = torch.Generator().manual_seed(seed)
        mix = torch.eye(32) + 0.8 * torch.randn(32, 32, generator=gen)
        x = torch.randn(512, 32, generator=gen) @ mix  # (tokens, in)
        h = x.T @ x
        w = torch.randn(16, 32, generator=gen)
        for bits, group in ((2, 8), (3, 16), (4, -1)):
            scheme = Scheme(bits, group_size=group)
            e_gptq = layer_error(w, gptq(w, h, scheme).dequantize(), h)
            e_rtn = layer_error(w, rtn(w, scheme).dequantize(), h)
            assert e_gptq <= e_rtn, (seed, bits)


def test_dead_inputs_are_zeroed_and_a_singular_hessian_without_damping_is_refused():
    h = torch.diag(torch.tensor([2.0, 0.0, 1.0, 3.0]))
    q = gptq(torch.ones(2, 4), h, Scheme(4, group_size=-1))
    assert q.dequantize()[:, 1].tolist() == [0.0, 0.0]  # no input ever reached column 1
    x = torch.randn(3, 4)
    singular = x.T @ x + torch.diag(torch.tensor([1e-9, 0, 0, 0]))  # rank 3 but no dead column... nearly
    singular[1, 1] = singular[0, 0]
    singular[0, 1] = singular[1, 0] = singular[0, 0]  # columns 0 and 1 identical: not positive definite
    with pytest.raises(ConfigError, match="not positive definite even after dampening; raise 'damp'"):
        gptq(torch.ones(2, 4), singular, Scheme(4, group_size=-1), GptqSettings(damp=0.0))


def test_storage_bits_count_codes_scales_and_zero_points():
    assert Scheme(3, 32, True).storage_bits(64, 128) == 64 * 128 * 3 + 64 * 4 * 16
    assert Scheme(3, 32, False).storage_bits(64, 128) == 64 * 128 * 3 + 64 * 4 * (16 + 3)
    assert Scheme(4, -1, True, "float32").storage_bits(10, 100) == 10 * 100 * 4 + 10 * 32
    assert Scheme(16).storage_bits(4, 4) == 16 * 16
