import pytest

from backend_packages import DEMO_BACKENDS, DEMO_ENTRY_POINTS, write_backend_package


@pytest.fixture
def demo_backends(pytester):
    """Registers demo, ghost, narrow and forgets through a package's entry points."""
    return write_backend_package(pytester, "demo_attn", DEMO_BACKENDS, DEMO_ENTRY_POINTS)


@pytest.fixture(autouse=True)
def _lean_inner_pytest_runs(monkeypatch):
    """The pytest runs these tests start (pytester, their isolation children and xdist workers)
    use no hypothesis; its plugin costs ~0.7 s of start-up in each such process."""
    monkeypatch.setenv("PYTEST_ADDOPTS", "-p no:hypothesispytest")
