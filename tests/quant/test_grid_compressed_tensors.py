"""The grid of :mod:`expertkit.quant.grid` against compressed-tensors' own functions (pinned 0.20.0):
scales and zero-points from ``calculate_qparams``, codes from ``quantize``, weights from ``dequantize``."""

from __future__ import annotations

import pytest
import torch

import compressed_tensors  # noqa: F401 - a pinned runtime dependency: a failed import must fail, not skip

from compressed_tensors.quantization import QuantizationArgs  # noqa: E402
from compressed_tensors.quantization.lifecycle.forward import dequantize, quantize  # noqa: E402
from compressed_tensors.quantization.utils.helpers import calculate_qparams  # noqa: E402

from expertkit.quant.grid import QUANT_BITS, SCALE_DTYPES, Scheme, rtn  # noqa: E402


def _weights() -> list[torch.Tensor]:
    """``(16, 64)`` matrices: centred, shifted, all positive, with all-zero groups, with tiny groups."""
    g = torch.Generator().manual_seed(0)
    out = [torch.randn(16, 64, generator=g) * (0.02 + 0.01 * i) + (0.01 * i if i % 3 == 0 else 0.0) for i in range(12)]
    out.append(torch.randn(16, 64, generator=g).abs())
    zeros = torch.randn(16, 64, generator=g)
    zeros[:, :32] = 0  # whole groups of zeros (and half-zero rows per channel)
    zeros[3] = 0  # a whole row of zeros
    out.append(zeros)
    tiny = torch.randn(16, 64, generator=g)
    tiny[:, 32:] *= 1e-9  # scales that underflow float16
    out.append(tiny)
    return out


@pytest.mark.parametrize("scale_dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [32, 64, -1])
def test_grid_equals_compressed_tensors(group_size, symmetric, scale_dtype):
    mismatches = []
    for bits in QUANT_BITS:
        args = QuantizationArgs(num_bits=bits, type="int", symmetric=symmetric,
                                strategy="channel" if group_size == -1 else "group",
                                group_size=None if group_size == -1 else group_size,
                                scale_dtype=SCALE_DTYPES[scale_dtype])
        for i, w in enumerate(_weights()):
            ours = rtn(w, Scheme(bits, group_size, symmetric, scale_dtype))
            width = 64 if group_size == -1 else group_size
            groups = w.reshape(16, -1, width)  # (rows, groups, width)
            scale, zero = calculate_qparams(groups.amin(-1), groups.amax(-1), args)  # (rows, groups) each
            if group_size == -1:
                scale, zero = scale.reshape(16, 1), zero.reshape(16, 1)
            codes = quantize(w, scale, zero, args)  # (16, 64), integer values
            weight = dequantize(codes.to(torch.int8), scale.to(SCALE_DTYPES[scale_dtype]), zero.to(torch.int8), args,
                                dtype=torch.float32)
            for what, theirs, mine in (("scale", scale.float(), ours.scale.float()),
                                       ("zero", zero.float(), ours.zero.float()),
                                       ("codes", codes.float(), ours.codes.float()),
                                       ("weight", weight, ours.dequantize(torch.float32))):
                if not torch.equal(theirs, mine):
                    mismatches.append((bits, i, what, int((theirs != mine).sum())))
    assert not mismatches, mismatches[:8]
