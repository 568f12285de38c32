"""Quantize a model's targets in place: every matrix replaced by its dequantized codes.

The model stays an ordinary transformers model (it runs, evaluates and saves as usual) whose
quantized matrices hold exactly the values their codes stand for; each :class:`Record` keeps the
grid (scales, zero-points, scheme) from which the codes are recovered exactly for storage
(:func:`codes_of`, checked bit for bit).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from expertkit.errors import ConfigError
from expertkit.quant.budget import Format
from expertkit.quant.gptq import GptqSettings, gptq
from expertkit.quant.grid import QuantizedWeight, Scheme, dequantize_codes, rtn
from expertkit.quant.targets import Target


@dataclass
class Record:
    """How one matrix was quantized."""

    target: Target
    scheme: Scheme
    scale: torch.Tensor | None  # (rows, groups); None when kept in 16-bit
    zero: torch.Tensor | None  # (rows, groups) int8
    method: str  # gptq | rtn | rtn-no-tokens | keep
    error: float | None = None  # tr((W-Q) H (W-Q)^T) / tr(W H W^T), when a Hessian was there
    rtn_error: float | None = None  # the same for round-to-nearest (reference)

    def as_dict(self) -> dict[str, Any]:
        """JSON-able summary."""
        return {"bits": self.scheme.bits, "group_size": self.scheme.group_size, "method": self.method,
                "group": self.target.group, "layer": self.target.layer, "expert": self.target.expert,
                "kind": self.target.kind, "weights": self.target.numel, "error": self.error, "rtn_error": self.rtn_error}


def _relative(w: torch.Tensor, h: torch.Tensor, *dequantized: torch.Tensor) -> list[float]:
    """``tr((W-Q) H (W-Q)^T) / tr(W H W^T)`` for each ``Q``, in float32 with the denominator computed once:
    a report, so not :func:`~expertkit.quant.gptq.layer_error`'s float64 (which took a third of the
    quantization time on SmolLM2-sized experts)."""
    hf = h.float()  # (cols, cols)
    denom = float(((w @ hf) * w).sum())
    out = []
    for q in dequantized:
        d = w - q  # (rows, cols)
        out.append(float(((d @ hf) * d).sum()) / denom if denom > 0 else 0.0)
    return out


@torch.no_grad()
def quantize_targets(model: Any, targets: list[Target], bits: dict[str, int], fmt: Format, *, method: str = "gptq",
                     settings: GptqSettings = GptqSettings(), hessian: Callable[[str], torch.Tensor | None] | None = None,
                     compare_rtn: bool = True, description: str = "Quantizing", store: Any = None) -> dict[str, Record]:
    """Quantize every target to ``bits[name]`` (GPTQ with ``hessian(key)``, or RTN) and write it back.

    A target whose Hessian is missing or empty (an expert no token reached) is rounded to nearest and
    marked ``rtn-no-tokens``. ``store`` (a :class:`~expertkit.quant.codestore.CodeStore`): a matrix already
    quantized at its bits with these settings is read from it instead of solved again, and a new one is
    kept there; only valid when ``hessian`` does not depend on the allocation (the caller's duty).
    """
    from expertkit.progress import track

    if method not in ("gptq", "rtn"):
        raise ConfigError(f"unknown method {method!r}; use 'gptq' or 'rtn'.")
    if method == "gptq" and hessian is None:
        raise ConfigError("GPTQ needs calibration Hessians.")
    records: dict[str, Record] = {}
    for t in track(targets, description):
        w = t.read(model)  # (rows, cols)
        scheme = fmt.scheme(bits[t.name], t.cols)
        if not scheme.quantized:
            t.write(model, w.half().float())
            records[t.name] = Record(t, scheme, None, None, "keep")
            continue
        hit = store.get(t.name, scheme, method, settings) if store is not None else None
        if hit is not None:
            q, info = hit
            rec = Record(t, scheme, q.scale, q.zero, info["method"], info["error"], info["rtn_error"])
        else:
            q, rec = _solve(t, w, scheme, method, settings, hessian, compare_rtn)
            if store is not None:
                store.put(t.name, scheme, method, settings, q,
                          {"method": rec.method, "error": rec.error, "rtn_error": rec.rtn_error})
        t.write(model, q.dequantize())
        records[t.name] = rec
    return records


def _solve(t: Target, w: torch.Tensor, scheme: Scheme, method: str, settings: GptqSettings,
           hessian: Callable[[str], torch.Tensor | None] | None, compare_rtn: bool) -> tuple[QuantizedWeight, Record]:
    """One matrix quantized (GPTQ where its Hessian is usable, else RTN), with its layer errors."""
    h = hessian(t.hessian) if hessian is not None else None
    usable = h is not None and bool(torch.diagonal(h).abs().sum() > 0)
    if method == "gptq" and usable:
        q, how = gptq(w, h, scheme, settings), "gptq"
    else:
        q, how = rtn(w, scheme), ("rtn" if method == "rtn" else "rtn-no-tokens")
    rec = Record(t, scheme, q.scale, q.zero, how)
    if h is not None and usable:
        deq = q.dequantize()
        if compare_rtn and how != "rtn":
            rec.error, rec.rtn_error = _relative(w, h, deq, rtn(w, scheme).dequantize())
        else:
            (rec.error,) = _relative(w, h, deq)
            rec.rtn_error = rec.error if how == "rtn" and compare_rtn else None
    return q, rec


def codes_of(weight: torch.Tensor, record: Record) -> QuantizedWeight:
    """The codes of a quantized matrix ``weight`` ``(rows, cols)`` (as held by the model), recovered from its
    grid; raises if they do not reproduce ``weight`` exactly (it was changed since quantization)."""
    s = record.scheme
    width = s.width(weight.shape[1])
    scale = record.scale.repeat_interleave(width, dim=1)  # (rows, cols)
    zero = record.zero.float().repeat_interleave(width, dim=1)
    codes = torch.round(weight.float() / scale) + zero
    q = QuantizedWeight(codes.to(torch.int8), record.scale, record.zero, s)
    back = dequantize_codes(codes, scale, zero, s.scale_dtype, weight.dtype)
    if not torch.equal(back, weight):
        raise ConfigError(f"{record.target.name}: the weights no longer match their quantization grid "
                          "(were they changed after quantizing?); quantize again before saving.")
    return q


def summarize(records: dict[str, Record], started: float | None = None) -> dict[str, Any]:
    """Counts per method and mean relative layer errors (GPTQ and RTN) per structure."""
    out: dict[str, Any] = {"methods": {}, "by_group": {}}
    for r in records.values():
        out["methods"][r.method] = out["methods"].get(r.method, 0) + 1
        if r.error is None:
            continue
        g = out["by_group"].setdefault(r.target.group, {"n": 0, "error": 0.0, "rtn_error": 0.0})
        g["n"] += 1
        g["error"] += r.error
        g["rtn_error"] += r.rtn_error or 0.0
    for g in out["by_group"].values():
        g["error"] /= g["n"]
        g["rtn_error"] /= g["n"]
    if started is not None:
        out["seconds"] = round(time.perf_counter() - started, 2)
    return out
