"""The scales' clipping search: never a larger error than the full range, smaller where outliers stretch the
grid, reaching the stored model through the config, and stored and read back bit for bit."""

from __future__ import annotations

import pytest
import torch

from expertkit.errors import ConfigError
from expertkit.models import load_model
from expertkit.models.tiny import save_tiny
from expertkit.quant.config import QuantizeConfig
from expertkit.quant.gptq import gptq, layer_error
from expertkit.quant.grid import Scheme, fake_quantize, group_params, rtn
from expertkit.quant.run import quantize

CALIB = {"text_blocks": 0, "tasks": ["add_sub"], "prompts_per_task": 4, "batch_size": 4}


def _row_errors(w, scheme):
    s, z = group_params(w, scheme)
    return (fake_quantize(w, s[:, None], z[:, None], scheme) - w).square().sum(1)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_the_search_never_raises_a_rows_error_and_lowers_it_on_heavy_tailed_weights(bits, symmetric):
    g = torch.Generator().manual_seed(bits)
    z, chi2 = torch.randn(64, 32, generator=g), torch.randn(3, 64, 32, generator=g).square().sum(0)
    w = z / (chi2 / 3).sqrt()  # Student's t with 3 degrees of freedom: a few large weights stretch each grid
    full = _row_errors(w, Scheme(bits, 32, symmetric, "float32"))
    searched = _row_errors(w, Scheme(bits, 32, symmetric, "float32", clip_grid=20))
    assert (searched <= full).all()  # the full range is the first candidate
    assert (searched < full).float().mean() > 0.4  # most rows gain (measured: 61-95% of rows)
    assert searched.sum() < (0.95 if bits < 4 else 0.99) * full.sum()  # measured: 0.66-0.89 at 2-3 bits, 0.68-0.96 at 4


def test_no_search_and_a_one_point_search_are_the_full_range():
    w = torch.randn(8, 16, generator=torch.Generator().manual_seed(0))
    for grid in (0, 1):
        assert torch.equal(rtn(w, Scheme(3, 16, clip_grid=grid)).codes, rtn(w, Scheme(3, 16)).codes)
    with pytest.raises(ConfigError, match="clip_grid must be 0"):
        Scheme(3, 16, clip_grid=-2)


def test_gptq_with_the_search_on_an_outlier_layer_has_a_smaller_layer_error():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(48, 64, generator=g)
    w[:, 7] *= 8  # an outlier input column: every row's group 0 is stretched
    x = torch.randn(512, 64, generator=g) @ torch.randn(64, 64, generator=g) * 0.3  # correlated inputs
    h = 2 * x.T @ x / len(x)
    plain = layer_error(w, gptq(w, h, Scheme(3, 32, scale_dtype="float32")).dequantize(), h)
    clipped = layer_error(w, gptq(w, h, Scheme(3, 32, scale_dtype="float32", clip_grid=20)).dequantize(), h)
    assert clipped < plain


def test_the_config_reaches_the_scales_and_the_folder_reads_back_bit_for_bit(tmp_path):
    folder = save_tiny("llama", tmp_path / "m", seed=4)
    cfg = {"model": str(folder), "group_size": 32, "calibration": CALIB, "method": "rtn",
           "policy": {"kind": "uniform", "bits": 2}}
    plain, _ = quantize(QuantizeConfig.model_validate(cfg), tmp_path / "plain")
    clipped, _ = quantize(QuantizeConfig.model_validate({**cfg, "clip_grid": 20}), tmp_path / "clipped")
    name = "model.layers.0.mlp.down_proj.weight"
    original = load_model(str(folder)).model.state_dict()[name].float()
    err = {k: float((r.loaded.model.state_dict()[name].float() - original).square().sum()) for k, r in
           (("plain", plain), ("clipped", clipped))}
    assert err["clipped"] < err["plain"]
    back = load_model(str(tmp_path / "clipped")).model.state_dict()
    want = clipped.loaded.model.state_dict()
    assert all(torch.equal(back[k], want[k]) for k in want)
    with pytest.raises(ValueError, match="clip_grid"):
        QuantizeConfig.model_validate({**cfg, "clip_grid": -1})
