"""Federated tests: markers, quiet Flower logs, one torch thread. Shared helpers are in fl_helpers.py."""

from __future__ import annotations

import logging

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "deployment: starts a real Flower SuperLink and SuperNodes on loopback")
    config.addinivalue_line("markers", "ray: runs Flower's Ray simulation engine on a local 2-CPU Ray (about 40 s)")


@pytest.fixture(autouse=True)
def _quiet_flower_one_thread():
    """Flower logs at WARNING; torch on one thread (tiny models: threads only contend on a busy machine)."""
    import torch

    logging.getLogger("flwr").setLevel(logging.WARNING)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
