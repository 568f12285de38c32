"""Default learning rate and ε per fine-tuning scheme (the MeZO / ZO-Bench grids).

MeZO and ZO-Bench search full fine-tuning at lr 1e-6..1e-7 with ε = 1e-3, LoRA at lr
1e-4..5e-5 with ε = 1e-2, prefix tuning at lr 1e-2..1e-3 with ε = 1e-1. Prompt tuning
follows prefix tuning (both train a few virtual-token vectors). The default is the top of
each grid; ``grid`` gives the whole range for a sweep.
"""

from __future__ import annotations

from expertkit.errors import unknown

ZO_DEFAULTS: dict[str, dict[str, float]] = {
    "full": {"lr": 1e-6, "eps": 1e-3},
    "lora": {"lr": 1e-4, "eps": 1e-2},
    "prefix": {"lr": 1e-2, "eps": 1e-1},
    "prompt": {"lr": 1e-2, "eps": 1e-1},
}
ZO_GRIDS: dict[str, tuple[float, ...]] = {
    "full": (1e-6, 5e-7, 1e-7),
    "lora": (1e-4, 5e-5),
    "prefix": (1e-2, 5e-3, 1e-3),
    "prompt": (1e-2, 5e-3, 1e-3),
}


def zo_defaults(scheme: str) -> dict[str, float]:
    """``{"lr": ..., "eps": ...}`` for ``scheme`` (full, lora, prefix, prompt)."""
    if scheme not in ZO_DEFAULTS:
        raise unknown("fine-tuning scheme", scheme, ZO_DEFAULTS)
    return dict(ZO_DEFAULTS[scheme])


def grid(scheme: str) -> tuple[float, ...]:
    """The learning rates MeZO/ZO-Bench searched for ``scheme``."""
    zo_defaults(scheme)
    return ZO_GRIDS[scheme]
