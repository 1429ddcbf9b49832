"""The closing ``pytest-attn`` section: per backend, how many tests passed, failed and were
skipped, the skip reasons grouped with their counts (visible without -r), and for each failure the
command that reruns it (pytest's own short summary, just below, gives each failure's one-line
cause: the two do not repeat each other). Reports come from the workers under xdist, so the section is built
from the reports' user properties, not from the items."""
from __future__ import annotations

from collections import Counter, defaultdict
from typing import Optional

from .items import BACKEND_PROPERTY, FAILURE_PROPERTY, RERUN_PROPERTY, TEST_PROPERTY

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
        self.failures: dict[str, list[tuple[str, str]]] = defaultdict(list)

    def pytest_runtest_logreport(self, report):
        backend = _property(report, BACKEND_PROPERTY)
        if backend is None and not _property(report, TEST_PROPERTY):
            return
        backend = backend or OTHER
        seen = self.outcomes[backend]
        if report.failed:
            if seen.get(report.nodeid) != "failed":
                seen[report.nodeid] = "failed"
                self.failures[backend].append((report.nodeid, _property(report, RERUN_PROPERTY) or report.nodeid))
        elif report.skipped:
            if report.nodeid not in seen:
                seen[report.nodeid] = "skipped"
                self.skips[backend][_skip_reason(report, backend)] += 1
        elif report.when == "call" and report.nodeid not in seen:
            seen[report.nodeid] = "passed"

    def lines(self) -> list[str]:
        out = []
        for backend, seen in self.outcomes.items():
            counts = Counter(seen.values())
            parts = [f"{counts[k]} {k}" for k in ("passed", "failed", "skipped") if counts[k]]
            out.append(f"{backend}: {', '.join(parts) or 'nothing ran'}")
            for reason, n in self.skips[backend].most_common():
                out.append(f"  skipped {n}: {reason}")
            for _, command in self.failures[backend][:MAX_FAILURES_SHOWN]:
                out.append(f"  rerun: {command}")
            hidden = len(self.failures[backend]) - MAX_FAILURES_SHOWN
            if hidden > 0:
                out.append(f"  ... and {hidden} more (each failure's report above ends with its rerun command)")
        return out

    def pytest_terminal_summary(self, terminalreporter):
        lines = self.lines()
        if lines:
            terminalreporter.write_sep("=", "pytest-attn")
            for line in lines:
                terminalreporter.write_line(line)


def shorten_failure(item, report, excinfo) -> None:
    """A failed attention test reports the user's test and the backend's own frames, short, and the
    verdict (pytest-attn's harness frames are hidden, and no tensor is printed); its first line is
    the one-line cause pytest's short summary shows. A section and a user property carry the
    command that reruns exactly this test from where the user ran pytest."""
    from .errors import AttnCheckFailure, AttnError

    if not report.failed:
        return
    exc = excinfo.value
    if isinstance(exc, (AttnCheckFailure, AttnError)):
        report.longrepr = excinfo.getrepr(style="short", chain=True, funcargs=False, tbfilter=_from_the_test(item),
                                          truncate_locals=True)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        line = exc.summary if isinstance(exc, AttnCheckFailure) else f"{type(exc).__name__}: {first}"
        report.user_properties.append((FAILURE_PROPERTY, line))
    if _property(report, BACKEND_PROPERTY) or _property(report, TEST_PROPERTY):
        command = _rerun(item)
        report.sections.append(("pytest-attn: rerun this test", command))
        report.user_properties.append((RERUN_PROPERTY, command))


def _from_the_test(item):
    """A traceback filter, for each exception of the chain: from the test function on (pytest's own
    frames cut, as pytest does for its reports), without the frames that hide themselves."""
    import inspect

    code = getattr(inspect.unwrap(getattr(item, "obj", None)), "__code__", None)

    def keep(excinfo):
        traceback = excinfo.traceback
        if code is not None:
            traceback = traceback.cut(path=code.co_filename, firstlineno=code.co_firstlineno - 1)
        return traceback.filter(excinfo)

    return keep


def _rerun(item) -> str:
    from .rerun import rerun_command
    from .session import attn_session_of

    return rerun_command(item, attn_session_of(item.config).seed)
