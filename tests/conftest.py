import pytest

from backend_packages import DEMO_BACKENDS, DEMO_ENTRY_POINTS, write_backend_package


@pytest.fixture
def demo_backends(pytester):
    """Registers demo, ghost, narrow and forgets through a package's entry points."""
    return write_backend_package(pytester, "demo_attn", DEMO_BACKENDS, DEMO_ENTRY_POINTS)
