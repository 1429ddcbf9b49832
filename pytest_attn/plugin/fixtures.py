"""Fixtures and parametrization. Tests ask for ``attn_backend`` (one test per selected backend,
the backend's name in the test ID) and ``attn_case`` (one per catalog case), or build their own
batches with ``make_attn_batch``. Nothing here imports torch at import time."""
from __future__ import annotations

import pytest

from pytest_attn.check.batch import AttnBatch, build_batch
from pytest_attn.cases.catalog import select
from pytest_attn.core.contract import Backend
from pytest_attn.plugin.collected import case_of
from pytest_attn.core.metadata import AttentionMetadata


# -- parametrization ------------------------------------------------------------------------------
def parametrize(metafunc, session) -> None:
    if _pairs_with_fuzz(metafunc, session):
        _parametrize_with_fuzz(metafunc, session, session.cases())
        return
    if "attn_backend" in metafunc.fixturenames:
        backends = session.selected
        if backends:
            metafunc.parametrize("attn_backend", backends, ids=[b.name for b in backends], indirect=True)
        else:
            _parametrize_none(metafunc, "attn_backend", "no attention backend is available here: "
                              + "; ".join(f"{n} ({why})" for n, why in session.unavailable))
    if "attn_case" in metafunc.fixturenames:
        marker = metafunc.definition.get_closest_marker("attn_cases")
        cases = session.cases()  # the catalog's and --attn-case-file's
        if marker is not None:  # a test narrows the catalog: @pytest.mark.attn_cases("cache", ...)
            wanted = set(_marked_cases(marker))
            cases = [c for c in cases if c in wanted]
        if not cases:
            _parametrize_none(metafunc, "attn_case", _no_case_reason(marker, session))
            return
        params, ids = _in_dtypes(cases, session)
        metafunc.parametrize("attn_case", params, ids=ids, indirect=True)


def _in_dtypes(cases: list, session) -> tuple[list, list[str]]:
    """The cases as parameters, each in every --attn-dtype (its own dtype without one), and their IDs."""
    if not session.dtypes:
        return cases, [c.name for c in cases]
    params = [c.with_dtype(d) for c in cases for d in session.dtypes]
    return params, [f"{c.name}-{c.layer_spec.dtype}" for c in params]


def _pairs_with_fuzz(metafunc, session) -> bool:
    """--attn-fuzz, on a test that takes a backend and a case and no @pytest.mark.attn_cases."""
    names = metafunc.fixturenames
    return bool(session.fuzz and "attn_backend" in names and "attn_case" in names and session.selected
                and metafunc.definition.get_closest_marker("attn_cases") is None)


def _parametrize_with_fuzz(metafunc, session, cases: list) -> None:
    """--attn-fuzz: (backend, case) pairs, since each backend's random cases are drawn within its own
    capabilities: every backend with every selected case, then with its fuzz cases. The IDs are those
    two separate parametrizations would give (backend-case)."""
    pairs, ids = [], []
    for backend in session.selected:
        params, names = _in_dtypes(cases + session.fuzz_cases(backend), session)
        pairs += [(backend, c) for c in params]
        ids += [f"{backend.name}-{n}" for n in names]
    if not pairs:
        reason = f"no case is selected and no fuzz case fits the backends (--attn-fuzz={session.fuzz})"
        metafunc.parametrize(["attn_backend", "attn_case"], [pytest.param(None, None, marks=pytest.mark.skip(
            reason=reason))], ids=["none"], indirect=True)
        return
    metafunc.parametrize(["attn_backend", "attn_case"], pairs, ids=ids, indirect=True)


def _marked_cases(marker) -> list:
    """The cases an attn_cases marker names; a name or tag the catalog lacks fails this test's
    collection in one line (the test's own code is wrong, not the run's options)."""
    from pytest_attn.core.errors import AttnInputError

    try:
        return select([str(arg) for arg in marker.args])
    except AttnInputError as exc:
        pytest.fail(f"@pytest.mark.attn_cases: {exc}", pytrace=False)


def _parametrize_none(metafunc, name: str, reason: str) -> None:
    """One skipped test saying why there is nothing to run, instead of pytest's empty parameter set."""
    metafunc.parametrize(name, [pytest.param(None, marks=pytest.mark.skip(reason=reason))], ids=["none"],
                         indirect=True)


def _no_case_reason(marker, session) -> str:
    narrowed = f"@pytest.mark.attn_cases({', '.join(map(repr, marker.args))})" if marker is not None else ""
    given = f"--attn-cases={','.join(session.case_filter)}" if session.case_filter else ""
    return f"no catalog case is in both {narrowed} and {given}" if narrowed and given else \
        f"no catalog case matches {narrowed or given}"


def deselect_oversized(config, items, session) -> None:
    """Drop cases over --attn-max-tokens (by default 2048 on CPU), reporting them as deselected."""
    limit = session.max_tokens if any(case_of(i) for i in items) else None
    if not limit:
        return
    keep, drop = [], []
    for item in items:
        case = case_of(item)
        (drop if case is not None and case.max_tokens > limit else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


# -- fixtures -------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def attn_session(request):
    """The run's state: selected backends, device, dtypes, seed, strictness."""
    from pytest_attn.plugin.session import attn_session_of

    return attn_session_of(request.config)


@pytest.fixture
def attn_backend(request, attn_session) -> Backend:
    """One selected backend. Unavailable: skipped with the reason (failed under --attn-strict)."""
    return attn_session.require_available(request.param)


@pytest.fixture
def attn_case(request):
    """One case: of the catalog (pytest_attn.cases.catalog.CATALOG), of --attn-case-file, or of --attn-fuzz."""
    return request.param


@pytest.fixture
def attn_device(attn_session) -> str:
    return attn_session.device


@pytest.fixture
def attn_seed(attn_session) -> int:
    """The run's seed; inputs derive from it and the case name (harness.derive_seed)."""
    return attn_session.seed


@pytest.fixture
def make_attn_batch(attn_device, attn_seed):
    """Factory: ``make_attn_batch([256, 1024], head_dim=80)`` for a ragged batch without a cache,
    ``make_attn_batch([1, 1], cached_lens=[40, 7], kv_layout="HND")`` for decode on a paged cache,
    ``make_attn_batch([64], kv_lens=[300])`` for cross-attention; LayerSpec keywords
    (window_left=..., logits_soft_cap=..., sinks=..., kv_dtype="fp8", ...) set the layer."""

    def make(seq_lens, **kwargs) -> AttnBatch:
        kwargs.setdefault("device", attn_device)
        kwargs.setdefault("seed", attn_seed)
        return build_batch(seq_lens, **kwargs)

    return make


@pytest.fixture
def attn_metadata_no_cache() -> AttentionMetadata:
    """The seed's shape of batch: a ragged mix of images, no kv_cache_manager."""
    return AttentionMetadata.ragged([256, 1024, 576])


@pytest.fixture
def attn_metadata_paged(attn_device) -> AttentionMetadata:
    """A mixed step on a real paged cache: two new prompts and two requests decoding."""
    from pytest_attn.core.kv_cache import PagedKVCacheManager

    manager = PagedKVCacheManager(num_kv_heads=8, head_dim=128, page_size=16, num_pages=32, dtype="bfloat16",
                                  device=attn_device)
    manager.prepare([40, 17], [0, 1], num_contexts=2)
    return manager.prepare([33, 5, 1, 1], [2, 3, 0, 1], num_contexts=2)
