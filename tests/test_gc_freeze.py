"""gc.freeze after collection and after the last test: on in the outermost run of a process, off in
pytester's in-process runs and with --attn-gc-freeze=off, undone once pytest has cleaned up, and
no unraisable exception lost on the way."""
import gc
import subprocess
import sys
import textwrap

import pytest

FREEZE_SEEN = """
import gc

def test_frozen_during_the_run():
    print("frozen objects:", gc.get_freeze_count())
"""


def frozen_count(result) -> int:
    line = next(line for line in result.stdout.lines if "frozen objects:" in line)
    return int(line.split("frozen objects:")[1].split()[0])


def test_the_outermost_run_freezes_what_collection_built(pytester):
    pytester.makepyfile(FREEZE_SEEN)
    result = pytester.runpytest_subprocess("-s", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
    assert frozen_count(result) > 10_000  # pytest, pluggy, the plugin, the test module...


def test_the_option_turns_it_off(pytester):
    pytester.makepyfile(FREEZE_SEEN)
    result = pytester.runpytest_subprocess("-s", "-p", "no:cacheprovider", "--attn-gc-freeze=off")
    result.assert_outcomes(passed=1)
    assert frozen_count(result) == 0


def test_an_in_process_run_leaves_the_outer_runs_heap_alone(pytester):
    pytester.makepyfile(FREEZE_SEEN)
    before = gc.get_freeze_count()  # (frozen objects can still be freed: the count only falls)
    result = pytester.runpytest("-s")
    result.assert_outcomes(passed=1)
    after = gc.get_freeze_count()
    assert frozen_count(result) <= before and after <= before, "the inner run froze its own objects"
    assert after > 0 or before == 0, "the inner run unfroze the outer run's objects"


def test_a_program_that_called_pytest_main_gets_its_collector_back(pytester):
    pytester.makepyfile(FREEZE_SEEN)
    script = textwrap.dedent("""
        import gc, sys
        import pytest
        assert pytest.main(["-q", "-s", "-p", "no:cacheprovider"]) == 0
        print("after pytest.main:", gc.get_freeze_count())
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=pytester.path, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "frozen objects: 0" not in done.stdout  # it did freeze during the run
    assert "after pytest.main: 0" in done.stdout


UNRAISABLE_AT_THE_END = """
class Cycle:
    def __init__(self):
        self.me = self

    def __del__(self):
        raise RuntimeError("raised in __del__ of a cycle")


def test_leaves_a_cycle_behind():
    Cycle()  # garbage in a reference cycle: only the collector finds it, after the last test
"""


@pytest.mark.parametrize("freeze", ["on", "off"])
def test_garbage_left_by_the_last_test_is_still_collected_and_reported(pytester, freeze):
    pytester.makepyfile(UNRAISABLE_AT_THE_END)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", f"--attn-gc-freeze={freeze}")
    output = result.stdout.str() + result.stderr.str()
    assert "raised in __del__ of a cycle" in output
