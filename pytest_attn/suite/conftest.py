"""The suite's tests that cannot apply to this run are not run: modules that test one backend
family are collected only when such a backend is selected, and GPU-only tests, graph-replay tests of
backends without a graph decoder, and differential tests with fewer than two backends (or a case
outside --attn-cases) are deselected. So --attn-strict on a CPU-only backend can be clean."""
from pytest_attn.plugin.bundled_suite import BACKEND_MODULES


def pytest_ignore_collect(collection_path, config):
    family = BACKEND_MODULES.get(collection_path.name)
    if family is None:
        return None
    from pytest_attn.plugin.session import attn_session_of

    return True if not attn_session_of(config).selects(family) else None


def pytest_collection_modifyitems(config, items):
    from pytest_attn.plugin.bundled_suite import deselect_inapplicable

    deselect_inapplicable(config, items)
