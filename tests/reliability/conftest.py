import pytest
from reliability_helpers import kill_children


@pytest.fixture(autouse=True)
def _isolated(isolated_cache):
    """Each test: its own tokenisation cache, and no child process outlives it (pass, fail or timeout)."""
    yield
    kill_children()
