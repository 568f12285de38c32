"""Fixtures of the pipeline tests.

``local_ray``
    One local Ray (2 CPUs) for every test module of this package that asks for it, started on first
    use and stopped after the package's tests; the requesting module's functions travel to the
    workers by value (cloudpickle), since a test module cannot be imported there by name.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture(scope="package")
def _ray_once() -> Iterator[None]:
    import ray  # a pinned runtime dependency: a broken install fails, it does not skip

    for attempt in range(3):  # on a loaded machine Ray's raylet can miss its fixed 30 s start-up window
        try:
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
            break
        except Exception:
            ray.shutdown()
            if attempt == 2:
                raise
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def local_ray(_ray_once: None, request: pytest.FixtureRequest) -> Iterator[None]:
    """The package's local Ray; this test module's functions are shipped to its workers by value."""
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(request.module)
    yield
    cloudpickle.unregister_pickle_by_value(request.module)
