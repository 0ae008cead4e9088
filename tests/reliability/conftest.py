import pytest
from reliability_helpers import cli_env, kill_children


@pytest.fixture(scope="session")
def fork_server(tmp_path_factory):
    """One fork server for the session's kill tests (forkserver.py): each `loraplace run` it starts skips the
    interpreter's ~6–9 s of imports."""
    from forkserver import ForkServer

    server = ForkServer(cli_env(tmp_path_factory.mktemp("forkserver")))
    yield server
    server.close()


@pytest.fixture(autouse=True)
def _isolated(isolated_cache):
    """Each test: its own tokenisation cache, and no child process outlives it (pass, fail or timeout)."""
    yield
    kill_children()
