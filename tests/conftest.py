import pytest

# pytester's in-process runs drop the modules a run imported when it ends. torch's flex attention
# pulls in torch._inductor, whose C++ operator registrations cannot be made twice in one process:
# imported here, before any inner run, it stays imported for all of them.
try:
    import torch.nn.attention.flex_attention  # noqa: F401
except ImportError:  # no torch, or a torch without flex attention: nothing to keep
    pass

from backend_packages import DEMO_BACKENDS, DEMO_ENTRY_POINTS, write_backend_package


@pytest.fixture
def demo_backends(pytester):
    """Registers demo, ghost, narrow and forgets through a package's entry points."""
    return write_backend_package(pytester, "demo_attn", DEMO_BACKENDS, DEMO_ENTRY_POINTS)


# For the pytest runs that tests start (in-process, subprocesses, their isolation children and
# xdist workers): no hypothesis plugin (without a bytecode cache, importing it costs ~0.5 s of
# assertion rewriting in each process), and no warning that an in-process run cannot rewrite the
# plugins this process imported before it (pyproject names them with -p instead of autoloading),
# and no bundled suite added to runs given --attn-backend (the tests of that feature ask for it).
INNER_RUN_OPTIONS = "-p no:hypothesispytest -W ignore::pytest.PytestAssertRewriteWarning --attn-suite=off"


@pytest.fixture
def pytester(pytester, monkeypatch):
    """pytester with INNER_RUN_OPTIONS, set after it starts, since it clears PYTEST_ADDOPTS."""
    monkeypatch.setenv("PYTEST_ADDOPTS", INNER_RUN_OPTIONS)
    return pytester
