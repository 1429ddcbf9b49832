"""--attn-isolate: run a backend's tests each in a fresh ``python -m pytest`` subprocess.

A kernel that kills its process (SIGSEGV, SIGABRT) or poisons the CUDA context then fails only
its own test: the parent turns the child's outcome into this process's reports (the child's own
reports, serialised as xdist does, when it got that far; a failure naming the signal when it
died), and every other result is kept. Works with and without xdist.

The child runs the one test ID with this run's pytest-attn options (the resolved seed included, so
it generates the same inputs), plugins (-p) and configuration; PYTEST_ATTN_ISOLATED_CHILD tells it
not to isolate again and where to write its reports. The child runs that test alone (never the
bundled suite besides it); it may name it from another root than this run's (a test outside the
rootdir, e.g. the bundled suite run from a user's project), so its reports are matched by the
test's file and name and take this run's node ID.

A test that pytest-benchmark times runs in this process: its timings are recorded here (the
table, --benchmark-json, --benchmark-compare), and a child's would be lost.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from typing import Optional

import pytest

from pytest_attn.plugin.collected import RERUN_PROPERTY, backend_name_of

CHILD_ENV = "PYTEST_ATTN_ISOLATED_CHILD"  # in the child: the file its reports go to (one JSON per line)
TARGET_ENV = "PYTEST_ATTN_ISOLATED_TEST"  # in the child: the one test it runs (see _test_key)
OUTPUT_TAIL_LINES = 40  # of the child's output, shown when it died

_NAMES_KEY = pytest.StashKey[Optional[frozenset]]()
# Options of the parent passed on to the child as given (flag -> takes a value).
_FORWARDED_OPTIONS = {"-p": True, "-c": True, "--config-file": True, "--rootdir": True, "--confcutdir": True,
                      "-o": True, "--override-ini": True, "--import-mode": True, "-W": True,
                      "--pythonwarnings": True, "--noconftest": False, "--pyargs": False}


# -- which tests ----------------------------------------------------------------------------------
def isolated_backends(config) -> Optional[frozenset]:
    """Backend names from --attn-isolate ('all' kept as is), None when not asked. Unknown names
    stop the run with a usage message."""
    if _NAMES_KEY not in config.stash:
        names = frozenset(n.strip() for item in config.getoption("attn_isolate", None) or []
                          for n in item.split(",") if n.strip())
        if names - {"all"}:
            from pytest_attn.plugin.session import attn_session_of

            known = set(attn_session_of(config).registry.names)
            unknown = sorted(names - known - {"all"})
            if unknown:
                raise pytest.UsageError(
                    f"pytest-attn: --attn-isolate names unknown backend(s) {', '.join(map(repr, unknown))}; "
                    f"registered: {', '.join(sorted(known))} (or 'all')")
        config.stash[_NAMES_KEY] = names or None
    return config.stash[_NAMES_KEY]


def check_options(config) -> None:
    """Validate --attn-isolate at configure time (a usage error there, not mid-run)."""
    isolated_backends(config)


def wants_isolation(item) -> bool:
    if os.environ.get(CHILD_ENV):
        return False
    try:
        names = isolated_backends(item.config)
    except pytest.UsageError as exc:
        pytest.exit(str(exc), returncode=pytest.ExitCode.USAGE_ERROR)
    if not names or _timed_by_pytest_benchmark(item):
        return False
    return "all" in names or backend_name_of(item) in names


def _timed_by_pytest_benchmark(item) -> bool:
    """pytest-benchmark keeps a test's timings in the process that ran it."""
    return "benchmark" in getattr(item, "fixturenames", ())


# -- the hook -------------------------------------------------------------------------------------
def run_isolated_if_asked(item, nextitem) -> Optional[bool]:
    """pytest_runtest_protocol: True after running ``item`` in a subprocess; None (the usual
    in-process protocol) when it is not to be isolated. In the child: record its reports."""
    child_file = os.environ.get(CHILD_ENV)
    if child_file:
        if os.environ.get(TARGET_ENV, _test_key(item)) != _test_key(item):
            return True  # a test the child's addopts collected besides its own: not run, never reported
        _ReportRecorder.ensure_registered(item.config, child_file)
        return None
    if not wants_isolation(item):
        return None
    item.ihook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
    for report in run_in_subprocess(item):
        item.ihook.pytest_runtest_logreport(report=report)
    _teardown_towards(item, nextitem)
    item.ihook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)
    return True


def _teardown_towards(item, nextitem) -> None:
    """What the skipped in-process teardown would have done: tear down this process's fixtures
    (set up by earlier tests) that ``nextitem`` does not share, so the next test starts clean."""
    from _pytest.runner import CallInfo

    call = CallInfo.from_call(lambda: item.session._setupstate.teardown_exact(nextitem), when="teardown")
    if call.excinfo is not None:
        item.ihook.pytest_runtest_logreport(report=item.ihook.pytest_runtest_makereport(item=item, call=call))


# -- the child ------------------------------------------------------------------------------------
class _ReportRecorder:
    """Registered in the child: appends each report, serialised, to the parent's file as it
    happens, so whatever ran before a crash is kept."""

    name = "attn-isolated-child-recorder"

    def __init__(self, config, path: str):
        self.config, self.path = config, path

    @classmethod
    def ensure_registered(cls, config, path: str) -> None:
        if not config.pluginmanager.has_plugin(cls.name):
            config.pluginmanager.register(cls(config, path), cls.name)

    def pytest_runtest_logreport(self, report):
        data = self.config.hook.pytest_report_to_serializable(config=self.config, report=report)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(data) + "\n")


def child_command(item, seed: Optional[int] = None) -> list[str]:
    """``python -m pytest <this test> ...`` with what makes the child collect and run it the same."""
    config = item.config
    # The file by its absolute path (so the child's working directory and --pyargs do not matter),
    # then the rest of the node ID; the same rootdir gives the child the same node ID.
    rest = item.nodeid.split("::", 1)
    target = str(item.path) + ("::" + rest[1] if len(rest) > 1 else "") if item.path.exists() else item.nodeid
    # no:cacheprovider: the parent keeps --lf/--ff state; -q and no colour: the output is for a report
    cmd = [sys.executable, "-m", "pytest", target, "-p", "no:cacheprovider", "-q", "--no-header", "--color=no",
           "--attn-suite=off"]  # this one test, not the bundled suite too (an --attn-suite=on in addopts)
    if config.pluginmanager.hasplugin("xdist"):
        cmd.append("-n0")  # the child runs this one test itself, whatever addopts say
    cmd += _forwarded_invocation_args(list(config.invocation_params.args))
    if not any(a == "--rootdir" or a.startswith("--rootdir=") for a in cmd):
        cmd.append(f"--rootdir={config.rootpath}")
    if config.inipath is not None and not any(a in ("-c", "--config-file") or a.startswith("--config-file=") for a in cmd):
        cmd += ["-c", str(config.inipath)]
    from pytest_attn.plugin.rerun import attn_options

    # the same options a rerun of this test gets: its own backend and case, the run's settings
    return cmd + attn_options(item, seed if seed is not None else config.getoption("attn_seed", None))


def _forwarded_invocation_args(args: list[str]) -> list[str]:
    out, i = [], 0
    while i < len(args):
        arg = args[i]
        flag, eq, _ = arg.partition("=")
        if flag in _FORWARDED_OPTIONS:
            takes_value = _FORWARDED_OPTIONS[flag]
            if takes_value and not eq and i + 1 < len(args):
                if not (arg == "-p" and args[i + 1] == "no:cacheprovider"):  # the child has it already
                    out += [arg, args[i + 1]]
                i += 2
                continue
            out.append(arg)
        elif arg.startswith("-p") and len(arg) > 2 and arg != "-pno:cacheprovider":  # -pNAME
            out.append(arg)
        i += 1
    return out


def _session_seed(config) -> Optional[int]:
    try:
        from pytest_attn.plugin.session import attn_session_of

        return attn_session_of(config).seed  # the resolved seed: the child must not re-read the environment
    except Exception:
        return None


def run_in_subprocess(item) -> list:
    """Run ``item`` alone in a fresh pytest and return its setup/call/teardown reports."""
    import tempfile

    config = item.config
    cmd = child_command(item, seed=_session_seed(config))
    fd, report_file = tempfile.mkstemp(prefix="attn-isolated-", suffix=".jsonl")
    os.close(fd)
    env = dict(os.environ)
    env[CHILD_ENV] = report_file
    env[TARGET_ENV] = _test_key(item)
    env.setdefault("PYTHONFAULTHANDLER", "1")  # a Python traceback on SIGSEGV/SIGABRT, in the output
    for name in ("PYTEST_XDIST_WORKER", "PYTEST_XDIST_WORKER_COUNT", "PYTEST_XDIST_TESTRUNUID"):
        env.pop(name, None)  # the child is a plain pytest run, not an xdist worker
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=str(config.invocation_params.dir), env=env, stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace")
        reports = _read_reports(config, report_file, item)
    finally:
        os.unlink(report_file)
    duration = time.perf_counter() - start
    return _complete(item, reports, proc.returncode, proc.stdout, duration, cmd)


def _read_reports(config, path: str, item) -> list:
    """The child's reports of ``item``, with this run's node ID and location. The child may name
    the test otherwise (a test outside the rootdir gets its node ID from the child's own argument),
    so they are matched by _test_key."""
    reports = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                data = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by the crash
                continue
            report = config.hook.pytest_report_from_serializable(config=config, data=data)
            if report is None or _test_key(report) != _test_key(item):
                continue
            report.nodeid, report.location = item.nodeid, item.location
            if isinstance(report.longrepr, list):  # a skip's (path, line, message): a list after JSON
                report.longrepr = tuple(report.longrepr)
            reports.append(report)
    return reports


def _test_key(item_or_report) -> str:
    """A test's file relative to the rootdir, and its name in that file: the same in the parent and
    the child (which is given the parent's rootdir), whichever node ID each gives the test."""
    location = getattr(item_or_report, "location", None) or ("",)
    return f"{location[0]}::{item_or_report.nodeid.split('::', 1)[-1]}"


def describe_exit(returncode: int) -> str:
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"killed by {name} (signal {-returncode})"
    return f"exited with status {returncode}"


def _complete(item, reports: list, returncode: int, output: str, duration: float, cmd: list[str]) -> list:
    """The child's reports, completed with a failure when it died before finishing the test."""
    from _pytest.reports import TestReport

    phases = {r.when: r for r in reports}
    if "teardown" in phases:  # it finished the test; whatever happened after is not this test's
        return reports
    if not reports and returncode >= 0:
        try:
            status = f"{pytest.ExitCode(returncode).name.lower().replace('_', ' ')}, status {returncode}"
        except ValueError:
            status = f"status {returncode}"
        problem = (f"the isolated subprocess never started {item.nodeid} ({status}): it must collect the same "
                   "test IDs as this run; its output below says why it did not")
    else:
        phase = next(p for p in ("setup", "call", "teardown") if p not in phases and not _no_call(p, phases))
        problem = (f"{item.nodeid} crashed its isolated subprocess during {phase}: {describe_exit(returncode)}. "
                   "--attn-isolate ran it alone, so only this test fails.")
    tail = "\n".join(_useful_lines(output)[-OUTPUT_TAIL_LINES:])
    rerun = _rerun_command(item)
    longrepr = (f"{problem}\n\nrerun it from here: {rerun}\nthe isolated subprocess ran: {' '.join(cmd)}\n\n"
                f"last lines of its output:\n{tail}")
    keywords = {k: 1 for k in item.keywords}
    out, reported = list(reports), False
    for when in ("setup", "call", "teardown"):
        if when in phases:
            continue
        if _no_call(when, phases):
            continue
        outcome, text = ("passed", None) if reported else ("failed", longrepr)
        properties = list(item.user_properties) + ([] if reported else [(RERUN_PROPERTY, rerun)])
        out.append(TestReport(item.nodeid, item.location, keywords, outcome, text, when,
                              user_properties=properties, duration=0.0 if reported else duration))
        reported = True
    return out


def _rerun_command(item) -> str:
    """The command that reruns this test from where pytest ran (what the closing section lists for
    a failure; a bare node ID of the bundled suite does not work from a user's project)."""
    from pytest_attn.plugin.rerun import rerun_command

    return rerun_command(item, _session_seed(item.config))


def _no_call(when: str, phases: dict) -> bool:
    """A failed or skipped setup has no call phase."""
    return when == "call" and "setup" in phases and not phases["setup"].passed


_NOISE = re.compile(r'File "[^"]*[/\\](_pytest|pluggy|pytest)[/\\]|File "<frozen runpy>"|^Extension modules:')


def _useful_lines(output: str) -> list[str]:
    """The child's output without pytest's and pluggy's own frames in faulthandler tracebacks."""
    return [line for line in output.rstrip().splitlines() if not _NOISE.search(line.strip())]
