"""Fixtures shared by the flow tests."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def harness():
    """A temporary Prefect server and database for one test module (`prefect_test_harness`)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield
