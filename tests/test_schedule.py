"""Longest first under xdist: the order each worker sorts its collection into, the durations runs
record for the next one, and (through real -n 2 runs) which worker starts with which test."""
import fnmatch
import json
from types import SimpleNamespace

import pytest

from pytest_attn.plugin.xdist import schedule
from pytest_attn.cases.catalog import CATALOG


class FakeItem:
    def __init__(self, nodeid, long=False, case=None):
        self.nodeid = nodeid
        self._long = long
        self.callspec = SimpleNamespace(params={"attn_case": case}) if case is not None else None

    def get_closest_marker(self, name):
        return object() if name == schedule.LONG_MARKER and self._long else None

    def __repr__(self):
        return self.nodeid


def ids(items):
    return [item.nodeid for item in items]


# -- the order ------------------------------------------------------------------------------------
def test_unrecorded_tests_go_long_marker_first_then_cases_by_work_then_the_rest_in_order():
    items = [FakeItem("a"), FakeItem("small-case", case=CATALOG["hd64-ragged"]), FakeItem("b"),
             FakeItem("long", long=True), FakeItem("big-case", case=CATALOG["vit-2048"])]
    schedule.longest_first(items, {})
    assert ids(items) == ["long", "big-case", "small-case", "a", "b"]


def test_recorded_durations_come_before_estimates_and_a_new_long_test_before_everything():
    items = [FakeItem("quick"), FakeItem("slow"), FakeItem("new-long", long=True), FakeItem("new"),
             FakeItem("old-long", long=True)]
    recorded = {"quick": 0.01, "slow": 3.0, "old-long": 0.5}
    schedule.longest_first(items, recorded)
    # a recorded attn_long test is placed by its duration, like any other
    assert ids(items) == ["new-long", "slow", "old-long", "quick", "new"]


def test_dealing_into_blocks_gives_each_block_its_share_of_the_long_tests():
    # shorter blocks first, the way xdist cuts its list (11 tests, 2 workers: 5 then 6)
    assert schedule.dealt_into_blocks(list("abcde"), 2) == list("bdace")
    assert schedule.dealt_into_blocks(list("abcdefg"), 3) == list("cfbeadg")
    assert schedule.dealt_into_blocks(list("abc"), 1) == list("abc")


def test_recorded_durations_ignore_a_damaged_cache():
    cache = {schedule.CACHE_KEY: {"t::a": 1.5, "t::b": "fast", 3: 2.0}}
    config = SimpleNamespace(cache=SimpleNamespace(get=lambda key, default: cache.get(key, default)))
    assert schedule.recorded_durations(config) == {"t::a": 1.5}
    cache[schedule.CACHE_KEY] = ["not", "a", "dict"]
    assert schedule.recorded_durations(config) == {}
    assert schedule.recorded_durations(SimpleNamespace()) == {}  # -p no:cacheprovider


# -- real runs ------------------------------------------------------------------------------------
TIMED_TESTS = """
import time
import pytest

@pytest.mark.parametrize("i", range(8))
def test_short(i):
    pass

def test_slow():
    time.sleep(0.3)

def test_medium():
    time.sleep(0.1)

@pytest.mark.attn_long
def test_marked_long():
    pass
"""
# Each worker logs the tests it starts, in order: {worker: [test names]}. (Not by
# PYTEST_XDIST_WORKER: under an outer xdist run, the inner controller inherits the outer worker's.)
LOG_STARTS = """
import json, os

WORKER = None

def pytest_configure(config):
    global WORKER
    WORKER = getattr(config, "workerinput", {}).get("workerid")

def pytest_runtest_logstart(nodeid, location):
    if WORKER:
        with open(os.environ["ATTN_START_LOG"], "a") as f:
            f.write(json.dumps([WORKER, nodeid.split("::")[1]]) + "\\n")
"""


def starts(log):
    order = {}
    for line in log.read_text().splitlines():
        worker, name = json.loads(line)
        order.setdefault(worker, []).append(name)
    log.unlink()
    return order


def durations_in_cache(pytester):
    return json.loads((pytester.path / ".pytest_cache" / "v" / "attn" / "durations").read_text())


@pytest.mark.attn_long
def test_a_run_records_durations_and_the_next_xdist_run_starts_each_worker_on_a_longest_test(pytester, monkeypatch):
    log = pytester.path / "starts.jsonl"
    monkeypatch.setenv("ATTN_START_LOG", str(log))
    pytester.makeconftest(LOG_STARTS)
    pytester.makepyfile(test_timed=TIMED_TESTS)

    first = pytester.runpytest_subprocess()  # a serial run records durations too
    first.assert_outcomes(passed=11)
    recorded = durations_in_cache(pytester)
    assert len(recorded) == 11 and recorded["test_timed.py::test_slow"] >= 0.3
    assert recorded["test_timed.py::test_slow"] > recorded["test_timed.py::test_medium"] > recorded["test_timed.py::test_short[0]"]

    second = pytester.runpytest_subprocess("-n", "2")
    second.assert_outcomes(passed=11)
    second.stdout.fnmatch_lines(["attn schedule: longest first, one test at a time (durations of 11 tests recorded *"])
    order = starts(log)
    # the two longest start the two workers (not both on gw0, as xdist's first piece would have it)
    assert sorted(o[0] for o in order.values()) == ["test_medium", "test_slow"], order


def test_worksteal_blocks_each_start_with_a_long_test_recorded_or_marked(pytester, monkeypatch):
    log = pytester.path / "starts.jsonl"
    monkeypatch.setenv("ATTN_START_LOG", str(log))
    pytester.makeconftest(LOG_STARTS)
    pytester.makepyfile(test_timed=TIMED_TESTS)
    cache = pytester.path / ".pytest_cache" / "v" / "attn"
    cache.mkdir(parents=True)
    (cache / "durations").write_text(json.dumps({"test_timed.py::test_slow": 0.3, "test_timed.py::test_medium": 0.1}))

    result = pytester.runpytest_subprocess("-n", "2", "--dist", "worksteal")
    result.assert_outcomes(passed=11)
    result.stdout.fnmatch_lines(["attn schedule: longest first, one block per worker, dealt in turn *"])
    order = starts(log)
    assert sorted(o[0] for o in order.values()) == ["test_marked_long", "test_slow"], order


class FakeConfig:
    """What schedule reads and changes of a controller's Config."""

    def __init__(self, dist="load", maxschedchunk=None, attn_schedule="longest-first", workers=2):
        self.option = SimpleNamespace(dist=dist, maxschedchunk=maxschedchunk, attn_schedule=attn_schedule,
                                      numprocesses=workers, tx=[])
        self.registered = {}
        self.pluginmanager = SimpleNamespace(hasplugin=lambda name: name == "xdist",
                                             register=lambda plugin, name: self.registered.setdefault(name, plugin))

    def getoption(self, name, default=None):
        return getattr(self.option, name, default)


@pytest.mark.parametrize("options, chunk, header", [
    ({}, 1, "attn schedule: longest first, one test at a time (no durations recorded yet: *"),
    ({"maxschedchunk": 4}, 4, "attn schedule: longest first, --maxschedchunk=4 (*"),
    ({"attn_schedule": "xdist"}, None, "attn schedule: xdist's own (--dist load)"),
    ({"dist": "loadfile"}, None, "attn schedule: xdist's own (--dist loadfile)"),
    ({"dist": "worksteal"}, None, "attn schedule: longest first, one block per worker, dealt in turn (*"),
])
def test_one_test_at_a_time_unless_the_user_chose_otherwise(options, chunk, header):
    config = FakeConfig(**options)
    schedule.configure(config)
    assert config.option.maxschedchunk == chunk
    assert fnmatch.fnmatch(schedule.header_line(config), header), schedule.header_line(config)
    assert set(config.registered) == {"attn-durations", "attn-xdist-schedule"}
    node = SimpleNamespace(workerinput={})
    config.registered["attn-xdist-schedule"].pytest_configure_node(node)
    assert node.workerinput == {schedule.WORKERINPUT_DIST: config.option.dist, schedule.WORKERINPUT_CHUNK: chunk}


def test_a_serial_run_has_no_schedule_line():
    assert schedule.header_line(FakeConfig(dist="no", workers=None)) is None


def test_serial_runs_keep_the_collected_order_and_record_durations(pytester):
    pytester.makepyfile(test_timed=TIMED_TESTS)
    result = pytester.runpytest("-v", "-p", "no:randomly")
    result.assert_outcomes(passed=11)
    names = [line.split("::")[1].split()[0] for line in result.stdout.lines if line.startswith("test_timed.py::")]
    assert names[0] == "test_short[0]" and names[-1] == "test_marked_long"
    assert "attn schedule" not in result.stdout.str()
    assert "test_timed.py::test_slow" in durations_in_cache(pytester)
