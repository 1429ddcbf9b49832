"""The closing ``pytest-attn`` section: per backend, how many tests passed, failed and were
skipped, the skip reasons grouped with their counts (visible without -r), and each failing case
with its one-line comparison. Reports come from the workers under xdist, so the section is built
from the reports' user properties, not from the items."""
from __future__ import annotations

from collections import Counter, defaultdict
from typing import Optional

from .items import BACKEND_PROPERTY, FAILURE_PROPERTY, TEST_PROPERTY

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
                line = _property(report, FAILURE_PROPERTY) or _first_line(report)
                self.failures[backend].append((report.nodeid, line))
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
            for nodeid, line in self.failures[backend][:MAX_FAILURES_SHOWN]:
                out.append(f"  FAILED {nodeid.split('::')[-1]}: {line}")
            hidden = len(self.failures[backend]) - MAX_FAILURES_SHOWN
            if hidden > 0:
                out.append(f"  ... and {hidden} more failures (see above)")
        return out

    def pytest_terminal_summary(self, terminalreporter):
        lines = self.lines()
        if lines:
            terminalreporter.write_sep("=", "pytest-attn")
            for line in lines:
                terminalreporter.write_line(line)


def _first_line(report) -> str:
    text = getattr(report, "longreprtext", "") or str(report.longrepr or "")
    for line in text.strip().splitlines():
        line = line.strip()
        if line.startswith("E "):
            return line[2:].strip()
    lines = [l.strip() for l in text.strip().splitlines() if l.strip()]
    return lines[-1] if lines else report.outcome


def shorten_failure(report, excinfo) -> None:
    """For a failed comparison (AttnCheckFailure), the report shows its message without the
    harness's traceback; any failure with a one-line cause carries it for the closing section."""
    from .errors import AttnCheckFailure, AttnError

    exc = excinfo.value
    if isinstance(exc, AttnCheckFailure):
        report.longrepr = f"{type(exc).__name__}: {exc}"
        report.user_properties.append((FAILURE_PROPERTY, exc.summary))
    elif isinstance(exc, AttnError) and report.failed:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        report.user_properties.append((FAILURE_PROPERTY, f"{type(exc).__name__}: {first}"))
