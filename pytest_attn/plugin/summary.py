"""The closing ``pytest-attn`` section: per backend, how many tests passed, failed and were
skipped, the skip reasons grouped with their counts (visible without -r), and for each failure the
command that reruns exactly it from where the user ran pytest.

It does not repeat pytest's short summary (-ra), printed just below it, and pytest's does not
repeat it: pytest's gives each failure one line, its node ID and the verdict's first line (the
crash message is cut to that line, so that CI, where pytest prints it whole, does not get the
failure's whole report again); this section gives what that line cannot, the command, which pytest
would cut to the terminal's width and whose node ID a user of the bundled suite cannot paste.

Reports come from the workers under xdist, so the section is built from the reports' user
properties (set on the worker, where the item is), not from the items."""
from __future__ import annotations

from collections import Counter, defaultdict
from typing import Optional

from pytest_attn.plugin.collected import BACKEND_PROPERTY, FAILURE_PROPERTY, RERUN_PROPERTY, TEST_PROPERTY

OTHER = "(other pytest-attn tests)"
MAX_FAILURES_SHOWN = 20


def _property(report, name) -> Optional[str]:
    for key, value in getattr(report, "user_properties", ()):
        if key == name:
            return value
    return None


def _skip_reason(report, backend: str) -> str:
    longrepr = report.longrepr
    reason = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
    reason = reason.removeprefix("Skipped: ").strip()
    for prefix in (f"{backend}: ", f"backend {backend!r} "):
        reason = reason.removeprefix(prefix)
    return reason


class Summary:
    """Registered when pytest-attn is active; collects outcomes as reports arrive."""

    name = "attn-summary"

    def __init__(self):
        self.outcomes: dict[str, dict[str, str]] = defaultdict(dict)  # backend -> nodeid -> outcome
        self.skips: dict[str, Counter] = defaultdict(Counter)
        self.failures: dict[str, list[tuple[str, Optional[str]]]] = defaultdict(list)  # (nodeid, rerun)

    def pytest_runtest_logreport(self, report):
        backend = _property(report, BACKEND_PROPERTY)
        if backend is None and not _property(report, TEST_PROPERTY):
            return
        backend = backend or OTHER
        seen = self.outcomes[backend]
        if report.failed:
            if seen.get(report.nodeid) != "failed":
                seen[report.nodeid] = "failed"
                self.failures[backend].append((report.nodeid, _property(report, RERUN_PROPERTY)))
        elif hasattr(report, "wasxfail"):  # a listed known failure, failing as its entry says
            seen[report.nodeid] = "xfailed"
        elif report.skipped:
            if report.nodeid not in seen:
                seen[report.nodeid] = "skipped"
                self.skips[backend][_skip_reason(report, backend)] += 1
        elif report.when == "call" and report.nodeid not in seen:
            seen[report.nodeid] = "passed"

    def lines(self, max_reruns: Optional[int] = MAX_FAILURES_SHOWN) -> list[str]:
        """The section's lines: per backend its counts, its skip reasons grouped, and a rerun command
        for each failure (the first ``max_reruns``; None: all)."""
        out = []
        for backend, seen in self.outcomes.items():
            counts = Counter(seen.values())
            parts = [f"{counts[k]} {k}" for k in ("passed", "failed", "xfailed", "skipped") if counts[k]]
            out.append(f"{backend}: {', '.join(parts) or 'nothing ran'}")
            for reason, n in self.skips[backend].most_common():
                out.append(f"  skipped {n}: {reason}")
            shown = self.failures[backend][:max_reruns]
            for nodeid, command in shown:
                out.append(f"  rerun: {command}" if command else f"  failed: {nodeid}")
            hidden = len(self.failures[backend]) - len(shown)
            if hidden > 0:
                out.append(f"  ... and {hidden} more (each failure's report above ends with its rerun command)")
        return out

    def pytest_terminal_summary(self, terminalreporter):
        # --tb=no prints no failure report, and so none of their rerun commands: all of them here
        everything = terminalreporter.config.getoption("tbstyle", "auto") == "no"
        lines = self.lines(None if everything else MAX_FAILURES_SHOWN)
        if lines:
            terminalreporter.write_sep("=", "pytest-attn")
            for line in lines:
                terminalreporter.write_line(line)


def shorten_failure(item, report, excinfo) -> None:
    """A failed attention test reports the user's test and the backend's own frames, short, and the
    verdict: pytest-attn's frames (harness, bundled suite) are left out and no tensor is printed,
    unless --tb=long, --tb=native or --full-trace asks for everything. The verdict is the first
    line, and the only line of the crash message that pytest's short summary (whole where CI is
    set, else cut to the terminal), --tb=line and junit show. A section and a
    user property carry the command that reruns exactly this test from where the user ran pytest."""
    from pytest_attn.core.errors import AttnCheckFailure, AttnError

    if not report.failed:
        return
    exc = excinfo.value
    if isinstance(exc, (AttnCheckFailure, AttnError)):
        if _shortens(item.config):
            report.longrepr = short_repr(item, excinfo)
        line = verdict_line(exc)
        report.user_properties.append((FAILURE_PROPERTY, line))
        crash = getattr(report.longrepr, "reprcrash", None)
        if crash is not None and crash.message:  # pytest's short summary prints it whole where CI is set
            crash.message = crash.message.splitlines()[0]
    if _property(report, BACKEND_PROPERTY) or _property(report, TEST_PROPERTY):
        command = _rerun(item)
        report.sections.append(("pytest-attn: rerun this test", command))
        report.user_properties.append((RERUN_PROPERTY, command))


def verdict_line(exc) -> str:
    """The one line that says what failed: a comparison's summary, or the error's first line."""
    from pytest_attn.core.errors import AttnCheckFailure

    if isinstance(exc, AttnCheckFailure):
        return exc.summary
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def _shortens(config) -> bool:
    return config.getoption("tbstyle", "auto") in ("auto", "short") and not config.getoption("fulltrace", False)


def short_repr(item, excinfo):
    """pytest's short traceback of the chain (the backend's exception, then pytest-attn's verdict),
    with only the frames outside pytest-attn: the user's test and the backend's code. An exception
    whose frames are all pytest-attn's (the bundled suite's test, the harness) shows its message alone."""
    from _pytest._code.code import ReprEntry

    harness_only: set[int] = set()
    longrepr = excinfo.getrepr(style="short", chain=True, funcargs=False, truncate_locals=True,
                               tbfilter=_outside_pytest_attn(item, harness_only))
    for (reprtraceback, _, _), exc in zip(getattr(longrepr, "chain", ()), _chain_of(excinfo.value)):
        if id(exc) in harness_only and getattr(reprtraceback, "reprentries", None):
            last = reprtraceback.reprentries[-1]
            message = [line for line in last.lines if line.startswith("E ")]
            reprtraceback.reprentries = [ReprEntry(message, None, None, None, "short")]
    return longrepr


def _chain_of(exc) -> list:
    """The exceptions pytest shows for ``exc``, oldest first (as its ExceptionChainRepr orders them)."""
    chain, seen = [], set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        chain.append(exc)
        exc = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)
    return chain[::-1]


def _outside_pytest_attn(item, harness_only: set):
    """A traceback filter, for each exception of the chain: from the test function on (pytest's own
    frames cut, as pytest does for its reports), without the frames that hide themselves, and
    without pytest-attn's own frames; where nothing else is left, the last frame is kept (pytest
    needs one) and the exception noted in ``harness_only``."""
    import inspect
    from pathlib import Path

    from _pytest._code import Traceback

    package = Path(__file__).resolve().parents[1]  # all of pytest_attn
    code = getattr(inspect.unwrap(getattr(item, "obj", None)), "__code__", None)

    def keep(excinfo):
        traceback = excinfo.traceback
        if code is not None:
            traceback = traceback.cut(path=code.co_filename, firstlineno=code.co_firstlineno - 1)
        traceback = traceback.filter(excinfo)
        outside = [entry for entry in traceback if not _is_within(entry.path, package)]
        if outside or not traceback:
            return Traceback(outside)
        harness_only.add(id(excinfo.value))
        return traceback[-1:]

    return keep


def _is_within(path, folder) -> bool:
    from pathlib import Path

    try:
        return Path(path).resolve().is_relative_to(folder)
    except (OSError, ValueError, TypeError):
        return False


def _rerun(item) -> str:
    from pytest_attn.plugin.rerun import rerun_command
    from pytest_attn.plugin.session import attn_session_of

    return rerun_command(item, attn_session_of(item.config).seed)
