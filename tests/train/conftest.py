"""Shared helpers of the training tests."""

from __future__ import annotations

import pytest

from expertkit.train import StepInfo


def _interrupt_at(at: int):
    """A training callback that raises KeyboardInterrupt after step ``at`` (a simulated Ctrl-C)."""

    def callback(info: StepInfo) -> None:
        if info.step == at:
            raise KeyboardInterrupt

    return callback


@pytest.fixture
def interrupt_at():
    """``interrupt_at(k)``: a callback that stops training with KeyboardInterrupt after step ``k``."""
    return _interrupt_at
