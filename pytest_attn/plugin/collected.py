"""What a collected test is to pytest-attn: its catalog case, its backend, whether it is one of ours."""
from __future__ import annotations

from typing import Optional

#: Fixtures that make a test an attention test (the plugin then has work to do for it).
ATTN_FIXTURES = frozenset({"attn_backend", "attn_case", "attn_session", "attn_device", "attn_seed", "make_attn_batch",
                           "attn_metadata_no_cache", "attn_metadata_paged", "attn_benchmark"})
ATTN_MARKERS = ("attn_gpu", "attn_bench", "attn_cases")
BACKEND_PROPERTY = "attn_backend"  # user_properties entry: which backend a test ran (reports, junit, summary)
FAILURE_PROPERTY = "attn_failure"  # user_properties entry of a failed report: its one-line comparison
RERUN_PROPERTY = "attn_rerun"  # ... and the command that reruns it from where the user ran pytest
TEST_PROPERTY = "attn_test"  # user_properties entry of an attention test that runs no particular backend
CASE_PROPERTY = "attn_case"
UNSUPPORTED_PROPERTY = "attn_unsupported"  # user_properties entry of a test its backend refused: the reasons, a list


def param(item, name: str):
    callspec = getattr(item, "callspec", None)
    return callspec.params.get(name) if callspec is not None else None


def case_of(item):
    """The catalog case a test runs (its attn_case parameter), or None."""
    from pytest_attn.cases.case import BatchCase

    case = param(item, "attn_case")
    return case if isinstance(case, BatchCase) else None


def backend_name_of(item) -> Optional[str]:
    from pytest_attn.core.contract import Backend

    backend = param(item, "attn_backend")
    return backend.name if isinstance(backend, Backend) else None


def is_attention_test(item) -> bool:
    if ATTN_FIXTURES.intersection(getattr(item, "fixturenames", ())):
        return True
    return any(item.get_closest_marker(m) is not None for m in ATTN_MARKERS)


def label(items) -> None:
    """Give each attention test the user properties its reports carry (the closing section, junit)."""
    for item in items:
        names = {k for k, _ in item.user_properties}
        backend, case = backend_name_of(item), case_of(item)
        if backend is not None and BACKEND_PROPERTY not in names:
            item.user_properties.append((BACKEND_PROPERTY, backend))
        elif backend is None and TEST_PROPERTY not in names:
            item.user_properties.append((TEST_PROPERTY, "1"))
        if case is not None and CASE_PROPERTY not in names:
            item.user_properties.append((CASE_PROPERTY, case.name))
