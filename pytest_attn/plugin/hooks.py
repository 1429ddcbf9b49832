"""pytest-attn's hooks: thin, each calling a named helper of a module of this package.

The plugin is loaded in every pytest run of an environment where pytest-attn is installed, so it
does nothing until asked: a run that gives no ``--attn-*`` option and collects no test that uses
its fixtures or markers imports no backend, prints nothing and changes nothing.
"""
from __future__ import annotations

import pytest

from pytest_attn.plugin.benchmark import attn_benchmark  # noqa: F401  (fixtures)
from pytest_attn.plugin.fixtures import (attn_backend, attn_case, attn_device, attn_metadata_no_cache, attn_metadata_paged,  # noqa: F401
                       attn_seed, attn_session, make_attn_batch)

_CONFIGURED = pytest.StashKey[bool]()  # the run gave an --attn-* option
_ACTIVE = pytest.StashKey[bool]()  # ... or collected attention tests
_SUITE_ADDED = pytest.StashKey[bool]()

MARKERS = (
    "attn_cases(*names_or_tags): run this test on these catalog cases only (pytest-attn)",
    "attn_gpu: needs a CUDA device; skipped with a reason on CPU, failed under --attn-strict (pytest-attn)",
    "attn_no_output_check: launches kernels but does not compare outputs with the reference (kernel traces, "
    "determinism): a known failure's entry neither expects it to fail nor reports it fixed (pytest-attn)",
    "attn_graph_replay: replays a captured CUDA graph; deselected for a backend without a graph decoder (pytest-attn)",
    "attn_differential: compares this run's backends; deselected when fewer than two run, or its case is outside "
    "--attn-cases (pytest-attn)",
    "attn_bench: a pytest-attn timing benchmark (pytest-benchmark); runs serially, and only when asked for "
    "(-m attn_bench, --benchmark-only, a --benchmark-save/autosave/json/compare option, or --benchmark-disable: "
    "once, untimed; --benchmark-skip leaves them out)",
    "attn_gate_threshold(fraction): the slowdown past which this benchmark's rows regress in pytest-attn's gate "
    "(--attn-gate), e.g. 0.2 for 20%; overrides the regime's default (pytest-attn)",
)


def pytest_addhooks(pluginmanager):
    from pytest_attn.plugin import hookspec

    pluginmanager.add_hookspecs(hookspec)


def pytest_attn_suite_modules(config, backends):
    """The suite modules backends declare themselves (``Backend.suite_modules``)."""
    return [name for backend in backends for name in getattr(backend, "suite_modules", ())]


def pytest_ignore_collect(collection_path, config):
    """A backend's own suite module is left out of a run that selects none of its backends."""
    if not configured(config):
        return None
    from pytest_attn.plugin.bundled_suite import suite_files

    return True if collection_path.resolve() in suite_files(config)[1] else None


def pytest_addoption(parser):
    from pytest_attn.plugin.options import add_options

    add_options(parser)


def configured(config) -> bool:
    return config.stash.get(_CONFIGURED, False)


def active(config) -> bool:
    return config.stash.get(_ACTIVE, False)


# tryfirst: pin the GPU before any other plugin can initialise CUDA, and register gc_freeze's
# clean-up before pytest's unraisable-exception plugin registers its own, so that it runs after it.
@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    from pytest_attn.plugin import gc_freeze
    from pytest_attn.plugin import options
    from pytest_attn.plugin.xdist import schedule

    for marker in (*MARKERS, schedule.LONG_MARKER_HELP):
        config.addinivalue_line("markers", marker)
    config.stash[_CONFIGURED] = config.stash[_ACTIVE] = bool(options.given(config))
    options.env_seed()  # a bad $PYTEST_ATTN_SEED is a usage error now, not a traceback at collection
    if configured(config):
        options.check(config)  # before anything reads an option: it parses their values
    gc_freeze.start(config)
    if configured(config):
        _start(config)


def _start(config) -> None:
    """What a run that asked for pytest-attn gets at configure time."""
    from pytest_attn.plugin import bundled_suite as bundled
    from pytest_attn.plugin.xdist import gpu_workers
    from pytest_attn.plugin import known_failures, run_report
    from pytest_attn.plugin.xdist import schedule
    from pytest_attn.core.errors import AttnInputError, UnknownBackendError
    from pytest_attn.plugin.isolation import check_options
    from pytest_attn.plugin.session import attn_session_of

    gpu_workers.pin_worker(config)  # before anything can initialise CUDA in an xdist worker
    gpu_workers.limit_serial_threads(config)
    if config.pluginmanager.hasplugin("xdist"):  # xdist's hooks exist only when xdist is loaded
        config.pluginmanager.register(gpu_workers.XdistHooks(config), "attn-xdist-gpus")
    schedule.configure(config)
    try:
        session = attn_session_of(config)
        session.selected  # resolve names now: an unknown one is a usage error
        session.check_named()  # and so is a named backend that is broken
        session.device  # and so is a device this machine does not have
    except (UnknownBackendError, AttnInputError) as exc:
        raise pytest.UsageError(f"pytest-attn: {exc}") from None
    check_options(config)  # an unknown --attn-isolate name is a usage error now, not at the first test
    known_failures.configure(config)  # --attn-known-failures: a malformed file is a usage error now
    try:
        config.stash[_SUITE_ADDED] = bundled.add_to_run(config)
    except AttnInputError as exc:  # a backend's suite module that cannot run
        raise pytest.UsageError(f"pytest-attn: {exc}") from None
    _register_summary(config)
    run_report.configure(config)  # --attn-report: a bad suffix is a usage error now


def _register_summary(config) -> None:
    """The closing section, and the verdict on whether the run tested what it named (which reads it)."""
    from pytest_attn.plugin.run_verdict import RunVerdict
    from pytest_attn.plugin.session import attn_session_of
    from pytest_attn.plugin.summary import Summary

    if not config.pluginmanager.has_plugin(Summary.name):
        summary = Summary()
        config.pluginmanager.register(summary, Summary.name)
        config.pluginmanager.register(RunVerdict(config, attn_session_of(config), summary), RunVerdict.name)


def pytest_report_header(config):
    if not configured(config):
        return None
    return _header(config)


def pytest_report_collectionfinish(config, items):
    """A run without --attn-* options that collected attention tests gets the header here."""
    if configured(config) or not active(config):
        return None
    return _header(config)


def _header(config) -> list[str]:
    from pytest_attn.plugin.bundled_suite import header_line
    from pytest_attn.plugin.header import header_lines
    from pytest_attn.plugin.session import attn_session_of

    return header_lines(attn_session_of(config), config, header_line(config, config.stash.get(_SUITE_ADDED, False)))


def pytest_generate_tests(metafunc):
    if {"attn_backend", "attn_case"}.isdisjoint(metafunc.fixturenames):
        return
    from pytest_attn.plugin.fixtures import parametrize
    from pytest_attn.plugin.session import attn_session_of

    parametrize(metafunc, attn_session_of(metafunc.config))


@pytest.hookimpl(trylast=True)  # after other plugins' reordering (pytest-randomly): the sort is stable
def pytest_collection_modifyitems(config, items):
    from pytest_attn.plugin.collected import is_attention_test

    attention = [item for item in items if is_attention_test(item)]
    if not attention and not configured(config):
        return
    config.stash[_ACTIVE] = True
    _register_summary(config)
    from pytest_attn.plugin.xdist.gpu_workers import limit_serial_threads

    limit_serial_threads(config)
    from pytest_attn.plugin.benchmark import deselect_unasked_benchmarks
    from pytest_attn.plugin.bundled_suite import deselect_inapplicable
    from pytest_attn.plugin.fixtures import deselect_oversized
    from pytest_attn.plugin.collected import label
    from pytest_attn.plugin.xdist.schedule import order_for_workers
    from pytest_attn.plugin.session import attn_session_of

    label(attention)
    deselect_unasked_benchmarks(config, items)
    deselect_oversized(config, items, attn_session_of(config))
    deselect_inapplicable(config, items)
    if configured(config):
        order_for_workers(config, items)


@pytest.hookimpl(trylast=True)
def pytest_collection_finish(session):
    if active(session.config):
        from pytest_attn.plugin.gc_freeze import freeze

        freeze(session.config)  # what collection built (torch, the items) lives until the end


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    if active(config):
        from pytest_attn.plugin.gc_freeze import freeze

        freeze(config)  # before pytest's five collections at clean-up


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_protocol(item, nextitem):
    if not configured(item.config):
        return None
    from pytest_attn.plugin.isolation import run_isolated_if_asked

    return run_isolated_if_asked(item, nextitem)  # None: the usual in-process protocol


def pytest_runtest_setup(item):
    if item.get_closest_marker("attn_gpu") is None:
        return
    from pytest_attn.plugin.session import attn_session_of

    session = attn_session_of(item.config)
    if session.device_type != "cuda":
        reason = f"needs a CUDA device; this run's device is {session.device}"
        if session.strict:
            pytest.fail(f"{reason} (--attn-strict)", pytrace=False)
        pytest.skip(reason)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    """A backend's UnsupportedCase (raised before any launch) becomes a skip with its reasons,
    or a failure under --attn-strict."""
    from pytest_attn.core.errors import UnsupportedCase
    from pytest_attn.plugin.collected import UNSUPPORTED_PROPERTY

    from pytest_attn.plugin.known_failures import expected_failures, refused_as_known

    try:
        with expected_failures(item):  # a (backend, case) a known-failures file lists must fail
            return (yield)
    except UnsupportedCase as exc:
        exc = refused_as_known(item, exc)  # refused only for known failures: xfail, or run and expect failure
        from pytest_attn.plugin.session import attn_session_of

        message = f"{exc.backend}: " + "; ".join(exc.reasons)
        item.user_properties.append((UNSUPPORTED_PROPERTY, list(exc.reasons)))  # one by one, for --attn-report
        if attn_session_of(item.config).strict:
            pytest.fail(f"unsupported case under --attn-strict: {message}", pytrace=False)
        pytest.skip(message)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """A failed comparison is reported by its message alone (the harness's frames say nothing a
    user needs), and its one-line summary travels with the report for the closing section."""
    report = yield
    if call.excinfo is not None and active(item.config):
        from pytest_attn.plugin.summary import shorten_failure

        shorten_failure(item, report, call.excinfo)
    return report


@pytest.hookimpl(optionalhook=True)
def pytest_benchmark_update_machine_info(config, machine_info):
    from pytest_attn.plugin.benchmark import update_machine_info

    update_machine_info(config, machine_info)


@pytest.hookimpl(optionalhook=True)
def pytest_benchmark_compare_machine_info(config, benchmarksession, machine_info, compared_benchmark):
    from pytest_attn.plugin.benchmark import compare_machine_info

    compare_machine_info(config, benchmarksession, machine_info, compared_benchmark)


def pytest_sessionfinish(session):
    if configured(session.config):
        from pytest_attn.plugin.perf_gate import sessionfinish

        sessionfinish(session)  # --attn-gate: its verdict sets the exit status


def pytest_terminal_summary(terminalreporter, config):
    if configured(config):
        from pytest_attn.plugin.perf_gate import terminal_summary

        terminal_summary(terminalreporter, config)
