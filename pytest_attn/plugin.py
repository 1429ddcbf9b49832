"""pytest-attn's options and hooks. Hooks stay thin; the work is in the modules they call:
session (options to run state), fixtures, harness (running cases), reference (checking), and the
feature modules registered at configure time (benchmarks, isolation, GPU pinning)."""
from __future__ import annotations

import pytest

from .errors import UnknownBackendError, UnsupportedCase, AttnInputError
from .bench import attn_benchmark  # noqa: F401
from .fixtures import (attn_backend, attn_case, attn_device, attn_metadata_no_cache, attn_metadata_paged,  # noqa: F401
                       attn_seed, attn_session, make_attn_batch)

SESSION_KEY = pytest.StashKey["AttnSession"]()


def pytest_addoption(parser):
    group = parser.getgroup("attn", "attention backends (pytest-attn)")
    group.addoption("--attn-backend", action="append", default=[], metavar="NAME[,NAME...]",
                    help="backends to test (repeatable; 'all' = every registered backend). "
                         "Default: every backend available here.")
    group.addoption("--attn-device", default=None, metavar="DEVICE",
                    help="cpu, cuda or cuda:N. Default: cuda when torch sees a GPU, else cpu.")
    group.addoption("--attn-dtype", action="append", default=[], metavar="DTYPE[,DTYPE...]",
                    help="run every case in these dtypes (bfloat16/bf16, float16/fp16, float32/fp32) "
                         "instead of each case's own.")
    group.addoption("--attn-seed", type=int, default=None, metavar="N",
                    help="seed of all generated inputs (default: $PYTEST_ATTN_SEED or 20261125).")
    group.addoption("--attn-strict", action="store_true", default=False,
                    help="fail, instead of skip, when a backend is unavailable or does not support a case.")
    group.addoption("--attn-cases", action="append", default=[], metavar="NAME|TAG[,...]",
                    help="only catalog cases with these names or tags (see `pytest-attn cases`).")
    group.addoption("--attn-max-tokens", type=int, default=None, metavar="N",
                    help="deselect cases with sequences longer than N tokens (default 2048 on cpu, "
                         "no limit on cuda; 0 = no limit).")
    group.addoption("--attn-isolate", action="append", default=[], metavar="NAME[,NAME...]",
                    help="run these backends' tests ('all': every test) each in a fresh subprocess, so a "
                         "crash or a poisoned CUDA context fails only that test.")
    group.addoption("--attn-gpus", default=None, metavar="IDS",
                    help="GPUs for xdist workers, round robin (e.g. 0,1). Default: CUDA_VISIBLE_DEVICES "
                         "or every GPU torch sees.")
    group.addoption("--attn-schedule", choices=("longest-first", "xdist"), default="longest-first",
                    help="under xdist (--dist load or worksteal): run the longest tests first, by the "
                         "durations earlier runs recorded (default), or leave xdist's order alone.")
    group.addoption("--attn-gc-freeze", choices=("on", "off"), default="on",
                    help="keep the garbage collector off the objects alive after collection and after "
                         "the last test (gc.freeze; default on).")
    bench = parser.getgroup("attn-bench", "attention benchmarks (pytest-attn, with pytest-benchmark)")
    bench.addoption("--attn-bench-warmup", type=int, default=10, metavar="N",
                    help="warm-up calls before timing (default 10); first-call costs stay out.")
    bench.addoption("--attn-bench-iters", type=int, default=50, metavar="N",
                    help="timed calls per benchmark (default 50).")
    bench.addoption("--attn-bench-cold-l2", action="store_true", default=False,
                    help="flush the GPU's L2 cache before each timed call.")
    bench.addoption("--attn-bench-graph", choices=("auto", "on", "off"), default="auto",
                    help="time CUDA-graph replays where the backend can be captured (auto), always, or never.")


# tryfirst: pin the GPU before any other plugin can initialise CUDA, and register gc_freeze's
# clean-up before pytest's unraisable-exception plugin registers its own, so that it runs after it.
@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    from . import gc_freeze, gpu_workers, schedule

    gpu_workers.pin_worker(config)  # before anything can initialise CUDA in an xdist worker
    gc_freeze.start(config)
    if config.pluginmanager.hasplugin("xdist"):  # xdist's hooks exist only when xdist is loaded
        config.pluginmanager.register(gpu_workers.XdistHooks(config), "attn-xdist-gpus")
    schedule.configure(config)
    config.addinivalue_line("markers", "attn_cases(*names_or_tags): run this test on these catalog cases only")
    config.addinivalue_line("markers", "gpu: needs a CUDA device; skipped with a reason on CPU (fails under --attn-strict)")
    config.addinivalue_line("markers", schedule.LONG_MARKER_HELP)
    from .session import AttnSession

    try:
        config.stash[SESSION_KEY] = AttnSession.from_config(config)
        config.stash[SESSION_KEY].selected  # resolve names now: an unknown one is a usage error
    except (UnknownBackendError, AttnInputError) as exc:
        raise pytest.UsageError(f"pytest-attn: {exc}") from None
    from .isolation import check_options

    check_options(config)  # an unknown --attn-isolate name is a usage error now, not at the first test


def pytest_benchmark_update_machine_info(config, machine_info):
    from .bench import update_machine_info

    update_machine_info(config, machine_info)


def pytest_benchmark_compare_machine_info(config, benchmarksession, machine_info, compared_benchmark):
    from .bench import compare_machine_info

    compare_machine_info(config, benchmarksession, machine_info, compared_benchmark)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_protocol(item, nextitem):
    from .isolation import run_isolated_if_asked

    return run_isolated_if_asked(item, nextitem)  # None: the usual in-process protocol


def attn_session_of(config):
    return config.stash[SESSION_KEY]


def pytest_report_header(config):
    from .report import header_lines

    return header_lines(attn_session_of(config), config)


def pytest_generate_tests(metafunc):
    from .fixtures import parametrize

    parametrize(metafunc, attn_session_of(metafunc.config))


@pytest.hookimpl(trylast=True)  # after other plugins' reordering (pytest-randomly): the sort is stable
def pytest_collection_modifyitems(config, items):
    from .fixtures import deselect_oversized
    from .schedule import order_for_workers

    deselect_oversized(config, items, attn_session_of(config))
    order_for_workers(config, items)


@pytest.hookimpl(trylast=True)
def pytest_collection_finish(session):
    from .gc_freeze import freeze

    freeze(session.config)  # what collection built (torch, the items) lives until the end


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    from .gc_freeze import freeze

    freeze(config)  # before pytest's five collections at clean-up


def pytest_runtest_setup(item):
    if item.get_closest_marker("gpu") is not None:
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
    try:
        return (yield)
    except UnsupportedCase as exc:
        message = f"{exc.backend}: " + "; ".join(exc.reasons)
        if attn_session_of(item.config).strict:
            pytest.fail(f"unsupported case under --attn-strict: {message}", pytrace=False)
        pytest.skip(message)
