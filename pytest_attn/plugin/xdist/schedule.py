"""Under xdist: the longest tests first, handed out one at a time, so that workers finish together.

xdist cannot split a test. A worker that draws a long test near the end holds the whole run up
while the others idle: on the 2-core CI machine, with xdist's own order, one worker idled for 12
of the run's 36 s. So each worker sorts its collection (identically, as xdist requires) by the
time each test is expected to take, longest first:

1. the time it took last time, recorded in pytest's cache (``.pytest_cache/v/attn/durations``,
   written by the controller or the serial run at the end of every run);
2. for a test never recorded: ``attn_long`` tests first, then catalog cases by their work, then
   the rest in collected order.

How that order reaches the workers depends on ``--dist``:

- ``load`` (what ``-n`` uses by default): tests go out one at a time (xdist's
  ``--maxschedchunk=1``, unless given), so each worker, when it finishes a test, takes the longest
  one left: longest-processing-time-first scheduling. xdist starts every worker with two tests, in
  one contiguous piece each, so the first 2N tests are dealt in turn: worker i starts with the
  i-th longest test, not the two longest with worker 0.
- ``worksteal``: xdist gives each worker one contiguous block and steals from the ends of blocks
  later, so the sorted tests are dealt into the blocks in turn (a block is sorted[j::N]): each
  block starts with its share of the long tests and ends with short ones to steal.
- other modes (loadscope, loadfile, loadgroup, each) keep the collected order.

``--attn-schedule=xdist`` leaves xdist's order and chunking alone. The sort is stable, so
pytest-randomly's shuffle still orders the tests whose estimates are equal. Serial runs keep the
collected order.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Optional

from pytest_attn.plugin.collected import case_of
from pytest_attn.plugin.xdist.gpu_workers import is_worker, worker_count

LONG_MARKER = "attn_long"
LONG_MARKER_HELP = (f"{LONG_MARKER}: takes seconds, not milliseconds (starts processes, big inputs); "
                    "until its duration is recorded, xdist workers run it before other tests")
CACHE_KEY = "attn/durations"
# The controller's --dist and --maxschedchunk, for the workers: xdist sets a worker's --dist to
# "no" and does not pass on the options the controller changed.
WORKERINPUT_DIST = "attn_dist"
WORKERINPUT_CHUNK = "attn_maxschedchunk"
REORDERED_MODES = ("load", "worksteal")
# Tests xdist's load scheduling sends each worker at the start ("at least 2", its --maxschedchunk
# help says): one to run and one queued behind it, since a worker runs a test only once it knows
# the next one. With fewer than 2 per worker it sends them round robin.
FIRST_PIECE = 2


def enabled(config) -> bool:
    return config.getoption("attn_schedule", "longest-first") == "longest-first"


def dist_mode(config) -> str:
    if is_worker(config):
        return config.workerinput.get(WORKERINPUT_DIST, "no")
    return getattr(config.option, "dist", "no") or "no"


# -- recorded durations -------------------------------------------------------------------------
def recorded_durations(config) -> dict[str, float]:
    """{node id: seconds} from earlier runs; empty without pytest's cache (-p no:cacheprovider)."""
    cache = getattr(config, "cache", None)
    if cache is None:
        return {}
    stored = cache.get(CACHE_KEY, {})
    if not isinstance(stored, dict):
        return {}
    return {k: float(v) for k, v in stored.items() if isinstance(k, str) and isinstance(v, (int, float))}


class DurationRecorder:
    """Adds up each test's setup, call and teardown times as the reports arrive (from the workers,
    under xdist) and merges them into pytest's cache when the session ends."""

    name = "attn-durations"

    def __init__(self, config):
        self.config = config
        self.seconds: dict[str, float] = defaultdict(float)

    def pytest_runtest_logreport(self, report):
        duration = getattr(report, "duration", None)
        if isinstance(duration, (int, float)) and duration >= 0:
            self.seconds[report.nodeid] += duration

    def pytest_sessionfinish(self, session):
        cache = getattr(self.config, "cache", None)
        if cache is None or not self.seconds:
            return
        stored = recorded_durations(self.config)
        stored.update({nodeid: round(seconds, 4) for nodeid, seconds in self.seconds.items()})
        cache.set(CACHE_KEY, stored)


# -- the order ----------------------------------------------------------------------------------
def expected_cost(item, recorded: dict[str, float]) -> tuple[float, int, float]:
    """Sort key, smallest first: (-recorded seconds, rank of the estimate, -case work)."""
    seconds = recorded.get(item.nodeid)
    if seconds is not None:
        return (-seconds, 0, 0.0)
    if item.get_closest_marker(LONG_MARKER) is not None:
        return (float("-inf"), 0, 0.0)  # known to be long, not yet how long: before everything
    case = case_of(item)
    if case is not None:
        return (0.0, 1, -case.work)
    return (0.0, 2, 0.0)


def longest_first(items: list, recorded: dict[str, float]) -> None:
    """Reorder ``items`` in place by expected_cost; stable for equal estimates."""
    items.sort(key=lambda item: expected_cost(item, recorded))


def dealt_into_blocks(items: list, blocks: int) -> list:
    """Deal ``items`` in turn into ``blocks`` contiguous blocks, shorter blocks first, as xdist
    cuts a list into pieces (len // blocks for the first, and so on): [a0, a1, a2, a3, a4] into 2
    blocks -> [a1, a3 | a0, a2, a4]. Each block starts with one of the first ``blocks`` items."""
    if blocks <= 1:
        return list(items)
    return [item for start in reversed(range(blocks)) for item in items[start::blocks]]


def order_for_workers(config, items: list) -> None:
    """In an xdist worker under --dist load or worksteal: sort the collection longest first, and
    deal it into the pieces xdist hands out first. Elsewhere leave it alone."""
    if not is_worker(config) or not enabled(config) or dist_mode(config) not in REORDERED_MODES:
        return
    longest_first(items, recorded_durations(config))
    workers = int(config.workerinput.get("workercount", 1))
    if dist_mode(config) == "worksteal":
        items[:] = dealt_into_blocks(items, workers)
    elif config.workerinput.get(WORKERINPUT_CHUNK) == 1 and len(items) >= FIRST_PIECE * workers:
        head = FIRST_PIECE * workers  # xdist sends each worker FIRST_PIECE tests, then one at a time
        items[:head] = dealt_into_blocks(items[:head], workers)


# -- in the controller (or a serial run) ----------------------------------------------------------
class XdistScheduleHooks:
    """Registered in the controller when xdist is loaded: tells each worker how tests go out."""

    def __init__(self, config):
        self.config = config

    def pytest_configure_node(self, node):
        node.workerinput[WORKERINPUT_DIST] = dist_mode(self.config)
        node.workerinput[WORKERINPUT_CHUNK] = getattr(self.config.option, "maxschedchunk", None)


def configure(config) -> None:
    """In the controller (or a serial run): record durations (the controller sees every report),
    tell the workers the --dist mode, and under --dist load hand tests out one at a time unless
    --maxschedchunk was given."""
    if is_worker(config):
        return
    config.pluginmanager.register(DurationRecorder(config), DurationRecorder.name)
    if config.pluginmanager.hasplugin("xdist"):
        config.pluginmanager.register(XdistScheduleHooks(config), "attn-xdist-schedule")
    if enabled(config) and dist_mode(config) == "load" and getattr(config.option, "maxschedchunk", 0) is None:
        config.option.maxschedchunk = 1


def header_line(config) -> Optional[str]:
    if is_worker(config) or not worker_count(config):
        return None
    mode = dist_mode(config)
    if not enabled(config) or mode not in REORDERED_MODES:
        return f"attn schedule: xdist's own (--dist {mode})"
    known = len(recorded_durations(config))
    source = (f"durations of {known} tests recorded by earlier runs, estimates for the rest" if known
              else "no durations recorded yet: attn_long tests, then cases by size")
    how = ("one test at a time" if mode == "load" and config.option.maxschedchunk == 1
           else "one block per worker, dealt in turn" if mode == "worksteal"
           else f"--maxschedchunk={config.option.maxschedchunk}")
    return f"attn schedule: longest first, {how} ({source})"
