"""The suite's modules that test one backend family are collected only when such a backend is
selected (--attn-backend), so that a run against another backend neither collects nor skips them."""
from pytest_attn.bundled import BACKEND_MODULES


def pytest_ignore_collect(collection_path, config):
    family = BACKEND_MODULES.get(collection_path.name)
    if family is None:
        return None
    from pytest_attn.session import attn_session_of

    return True if not attn_session_of(config).selects(family) else None
