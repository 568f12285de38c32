"""The integer grid of a quantized weight: bit widths, groups, scales, zero-points, round-to-nearest.

One convention throughout, the one of the ``compressed-tensors`` storage format (so that what is
computed here is stored and read back bit for bit):

* a ``b``-bit code is a signed integer ``q`` in ``[-2^(b-1), 2^(b-1) - 1]``;
* a weight row is cut into groups of ``group_size`` consecutive input columns (``-1``: the whole
  row is one group, i.e. one scale per output channel); each group has a scale ``s`` and, when
  asymmetric, a zero-point ``z`` (an integer in the code range);
* the grid always holds 0: symmetric ``s = max|w| / ((2^b - 1) / 2)``, ``z = 0``; asymmetric
  ``s = (max(w, 0) - min(w, 0)) / (2^b - 1)``, ``z = round(clamp(-2^(b-1) - min(w, 0) / s))`` with the
  unrounded ``s``; then ``s`` is rounded to its dtype and a 0 there becomes the dtype's epsilon
  (compressed-tensors' ``calculate_qparams``; ``tests/quant/test_grid_compressed_tensors.py``
  compares scales, zero-points, codes and weights with compressed-tensors' own functions);
* ``q = clamp(round(w / s + z))`` (round half to even), and the dequantized weight is
  ``(q - z) * s`` computed in the scale's dtype (float16 by default), then cast back, exactly as
  ``compressed_tensors.quantization.lifecycle.forward.dequantize`` does.

:func:`rtn` quantizes a whole matrix by rounding to nearest: the slow reference GPTQ is checked
against (its layer error must never be smaller than GPTQ's).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from expertkit.errors import ConfigError

#: bit widths a weight can be quantized to; 16 means "kept in 16-bit floating point"
QUANT_BITS = (2, 3, 4, 5, 6, 7, 8)
KEEP_BITS = 16
SCALE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def check_bits(bits: int, where: str = "bits") -> int:
    """``bits`` if it is 2..8 or 16 (kept), else a :class:`ConfigError` saying what is allowed."""
    if isinstance(bits, bool) or not isinstance(bits, int) or (bits not in QUANT_BITS and bits != KEEP_BITS):
        raise ConfigError(f"{where}: {bits!r} bits is not a weight precision expertkit can store; use 2 to 8 "
                          f"(integer codes) or {KEEP_BITS} (kept in 16-bit floating point).")
    return bits


def code_range(bits: int) -> tuple[int, int]:
    """``(q_min, q_max)`` of signed ``bits``-bit codes."""
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


@dataclass(frozen=True)
class Scheme:
    """How one weight matrix is quantized."""

    bits: int
    group_size: int = 128  # -1: one group per output row
    symmetric: bool = True
    scale_dtype: str = "float16"
    clip_grid: int = 0  # ranges tried per group, shrunk from 1 down to 1 - CLIP_SHRINK (0 or 1: no search)

    def __post_init__(self) -> None:
        check_bits(self.bits)
        if self.clip_grid < 0:
            raise ConfigError(f"clip_grid must be 0 (no search) or a number of candidate ranges, not {self.clip_grid}.")
        if self.group_size == 0 or self.group_size < -1:
            raise ConfigError(f"group_size must be a positive number of columns or -1 (per channel), not {self.group_size}.")
        if self.scale_dtype not in SCALE_DTYPES:
            raise ConfigError(f"scale_dtype {self.scale_dtype!r} is not one of {', '.join(SCALE_DTYPES)}.")

    @property
    def quantized(self) -> bool:
        """False for 16-bit (kept) weights."""
        return self.bits != KEEP_BITS

    def groups(self, columns: int) -> int:
        """Number of groups in a row of ``columns`` input features."""
        return 1 if self.group_size == -1 else -(-columns // self.group_size)

    def width(self, columns: int) -> int:
        """Columns per group for rows of ``columns`` input features."""
        return columns if self.group_size == -1 else self.group_size

    def check_shape(self, columns: int, name: str = "weight") -> None:
        """A group size must divide the row length (the storage format requires it)."""
        if self.quantized and self.group_size != -1 and columns % self.group_size:
            raise ConfigError(f"{name}: {columns} input columns are not a multiple of group_size {self.group_size}; "
                              "choose a group size that divides every quantized layer's input size, or -1.")

    def storage_bits(self, rows: int, columns: int) -> int:
        """Exact bits this matrix takes stored: codes, plus a scale (and a zero-point) per group."""
        if not self.quantized:
            return rows * columns * KEEP_BITS
        per_group = torch.finfo(SCALE_DTYPES[self.scale_dtype]).bits + (0 if self.symmetric else self.bits)
        return rows * columns * self.bits + rows * self.groups(columns) * per_group


def group_params(w: torch.Tensor, scheme: Scheme) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero-point ``(rows,)`` each for one group ``w`` ``(rows, width)``; the scale is rounded
    to the scheme's scale dtype (so that what is stored is what was used).

    In the order of compressed-tensors' ``calculate_qparams`` (tested equal): the zero-point comes
    from the unrounded scale; then the scale is rounded to its dtype, and a scale that is 0 there
    (an all-zero group, or one too small for the dtype) becomes the dtype's epsilon; an all-zero
    group's zero-point is 0.

    With ``scheme.clip_grid = n > 1`` the range ``[min, max]`` is also tried shrunk by ``n - 1``
    factors evenly spaced down to ``1 - CLIP_SHRINK`` (the values outside are clipped to the grid's
    ends), and each row keeps the candidate whose dequantized group is nearest ``w`` in squared
    error (the full range is the first candidate, so a row's error never grows). At 2-4 bits a few
    outliers otherwise stretch the grid over values that almost no weight takes; this search is the
    clipping option of GPTQ's reference code (there with an error exponent of 2.4; 2 here).
    """
    lo = w.amin(dim=1).clamp(max=0)  # (rows,)
    hi = w.amax(dim=1).clamp(min=0)
    scale, zero = _range_params(lo, hi, scheme, w.dtype)
    if scheme.clip_grid <= 1:
        return scale, zero
    best = _squared_error(w, scale, zero, scheme)
    for factor in torch.linspace(1.0, 1.0 - CLIP_SHRINK, scheme.clip_grid)[1:].tolist():
        s, z = _range_params(lo * factor, hi * factor, scheme, w.dtype)
        err = _squared_error(w, s, z, scheme)
        better = err < best
        scale, zero, best = torch.where(better, s, scale), torch.where(better, z, zero), torch.where(better, err, best)
    return scale, zero


#: the most a range is shrunk by the clipping search (to 40% of max |w|)
CLIP_SHRINK = 0.6


def _squared_error(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, scheme: Scheme) -> torch.Tensor:
    """``(rows,)`` squared error of ``w`` ``(rows, width)`` quantized and dequantized on the grid."""
    return (fake_quantize(w, scale[:, None], zero[:, None], scheme) - w).square().sum(dim=1)


def _range_params(lo: torch.Tensor, hi: torch.Tensor, scheme: Scheme,
                  dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`group_params` for the range ``[lo, hi]`` ``(rows,)`` each (``lo <= 0 <= hi``)."""
    q_min, q_max = code_range(scheme.bits)
    if scheme.symmetric:
        raw = torch.maximum(lo.abs(), hi) / ((q_max - q_min) / 2)
        zero = torch.zeros_like(raw)
    else:
        raw = (hi - lo) / (q_max - q_min)
        safe = torch.where(raw > 0, raw, torch.ones_like(raw))
        zero = torch.where(raw > 0, torch.round((q_min - lo / safe).clamp(q_min, q_max)), torch.zeros_like(raw))
    sd = SCALE_DTYPES[scheme.scale_dtype]
    scale = raw.to(sd).to(dtype)
    scale = torch.where(scale > 0, scale, torch.full_like(scale, torch.finfo(sd).eps))
    return scale, zero


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes (as floats) of ``w`` ``(rows, ...)`` on the grid of ``scale``/``zero`` ``(rows, ...)``."""
    q_min, q_max = code_range(bits)
    return torch.clamp(torch.round(w / scale + zero), q_min, q_max)  # z added before rounding, as compressed-tensors


def dequantize_codes(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, scale_dtype: str,
                     out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(q - z) * s`` computed in the scale dtype (as the storage format does), cast to ``out_dtype``."""
    sd = SCALE_DTYPES[scale_dtype]
    return ((q.to(sd) - zero.to(sd)) * scale.to(sd)).to(out_dtype)


def fake_quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, scheme: Scheme) -> torch.Tensor:
    """Quantize then dequantize ``w`` on a given grid (shapes broadcast)."""
    return dequantize_codes(quantize_codes(w, scale, zero, scheme.bits), scale, zero, scheme.scale_dtype, w.dtype)


@dataclass
class QuantizedWeight:
    """A quantized matrix: integer codes, per-group scales and zero-points, and its scheme."""

    codes: torch.Tensor  # (rows, columns) int8
    scale: torch.Tensor  # (rows, groups) float
    zero: torch.Tensor  # (rows, groups) int8 (zeros when symmetric)
    scheme: Scheme

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``(rows, columns)`` weight the codes stand for."""
        width = self.scheme.width(self.codes.shape[1])
        scale = self.scale.repeat_interleave(width, dim=1)[:, : self.codes.shape[1]]  # (rows, columns)
        zero = self.zero.to(scale.dtype).repeat_interleave(width, dim=1)[:, : self.codes.shape[1]]
        return dequantize_codes(self.codes, scale, zero, self.scheme.scale_dtype, dtype)


def rtn(weight: torch.Tensor, scheme: Scheme) -> QuantizedWeight:
    """Round-to-nearest quantization of ``weight`` ``(rows, columns)``, group by group."""
    if not scheme.quantized:
        raise ConfigError("rtn() quantizes; a 16-bit scheme keeps the weight as it is.")
    w = weight.detach().float()
    rows, cols = w.shape
    scheme.check_shape(cols)
    width = scheme.width(cols)
    codes = torch.empty(rows, cols)
    scales, zeros = [], []
    for start in range(0, cols, width):
        block = w[:, start:start + width]  # (rows, width)
        scale, zero = group_params(block, scheme)
        codes[:, start:start + width] = quantize_codes(block, scale[:, None], zero[:, None], scheme.bits)
        scales.append(scale)
        zeros.append(zero)
    return QuantizedWeight(codes.to(torch.int8), torch.stack(scales, 1), torch.stack(zeros, 1).to(torch.int8), scheme)
