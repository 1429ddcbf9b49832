import pytest

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


@pytest.fixture(scope="session")
def flex_compilation_imported():
    """pytester's in-process runs drop the modules a run imported when it ends. The first flex
    attention call imports torch._inductor and dozens of modules more, whose registrations (C++
    operators, cache artifact types) cannot be made twice in one process: a flex backend that made
    that first call inside an inner run broke every later flex call of its worker. So one call is
    made here, before any pytester exists (a session fixture is set up before the function-scoped
    pytester takes its snapshot of sys.modules), and what it imports stays for every inner run."""
    import warnings

    from pytest_attn.cases.catalog import CATALOG
    from pytest_attn.check.harness import run_case
    from pytest_attn_backends.flex import BACKENDS

    flex = BACKENDS[0]
    if flex.available():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # flex's "called without torch.compile()" advice
            run_case(flex, CATALOG["softcap-30-ragged"], seed=0)


@pytest.fixture
def pytester(flex_compilation_imported, pytester, monkeypatch):
    """pytester with INNER_RUN_OPTIONS, set after it starts, since it clears PYTEST_ADDOPTS."""
    monkeypatch.setenv("PYTEST_ADDOPTS", INNER_RUN_OPTIONS)
    return pytester
