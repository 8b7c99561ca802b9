"""The `hardened_server` fixture: `python -m server` with keys, CORS and small bounds (see tests/hardened.py).

A plugin (`pytest_plugins = ["tests.hardened_server"]`) rather than a fixture imported into each module, so that
test_auth and test_limits share one server per session instead of each starting one (~30 s on two cores).
"""

from __future__ import annotations

import pytest

from tests.hardened import HARDENED_ENV
from tests.support import running_server


@pytest.fixture(scope="session")
def hardened_server():
    with running_server(HARDENED_ENV, name="hardened") as srv:
        yield srv
